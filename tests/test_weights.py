"""Starting ki_vla from real weights (pi05, PaliGemma), offline: full-size key maps on the meta device, tiny
checkpoints in each layout written here, the Hub error, and the training switches that matter when
fine-tuning pretrained weights (freezing, bf16, PEFT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_logged, venv_script
from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.policies.pi05.modeling_pi05 import PI05Policy
from lerobot.utils.constants import (
    ACTION,
    ACTION_TOKEN_MASK,
    ACTION_TOKENS,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
    OBS_STATE,
)
from safetensors.torch import load_file, save_file
from synthetic_dataset import ACTION_DIM, STATE_DIM
from tiny_setup import EXPERT_LM_HEAD, tiny_config, write_pi05_checkpoint
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.processor_ki import fast_tokenizer_of_checkpoint
from lerobot_ki.variants import TINY_BACKBONE, TINY_SIGLIP
from lerobot_ki.vocabulary import PALIGEMMA_VOCAB_SIZE
from lerobot_ki.weights import (
    EMBED,
    EXPERT,
    FAST_PLACEMENT,
    LM_HEAD,
    PALIGEMMA,
    WHY_EXPERT_LM_HEAD,
    WHY_FAST_PLACEMENT,
    WHY_NOT_PALIGEMMA,
    WHY_SIGLIP_HEAD,
    WHY_STATE_PROJ,
    HubUnavailableError,
    load_paligemma_backbone,
    load_pi05_weights,
    paligemma_to_ki_state_dict,
    pi05_to_ki_state_dict,
)

# The tiny policy of conftest's TINY_POLICY_ARGS (image 64, default FAST vocab), so that `lerobot-train`
# with those arguments fits the checkpoints written here.
TINY = dict(image_resolution=(64, 64), fast_vocab_size=1024)
# Where bf16 mode keeps float32 inside the towers (LeRobot pi05's rule, reused by ki_vla).
FLOAT32_SELECTORS = (
    "vision_tower",
    "multi_modal_projector",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",  # the final norms: `language_model.norm`, the expert's `model.norm.dense`
)


# --- helpers ---------------------------------------------------------------------------------------------
def _on_meta(policy_cls, config: PreTrainedConfig):
    """A full-size policy with no storage: shapes and names only. The config's device is set after its
    validation (which knows no 'meta'), so the policy's final `.to(device)` is a no-op."""
    config.device = "meta"
    with torch.device("meta"):
        return policy_cls(config)


def _batch(cfg: KIConfig, bsz: int = 2, with_actions: bool = True, seed: int = 0) -> dict:
    """A preprocessed batch made by hand (byte-tokenizer ids, FAST ids in its range): no dataset needed."""
    g = torch.Generator().manual_seed(seed)
    res = cfg.image_resolution[0]
    batch = {cam: torch.rand(bsz, 3, res, res, generator=g) for cam in cfg.image_features}
    batch[OBS_STATE] = torch.rand(bsz, STATE_DIM, generator=g) * 2 - 1
    prompt = torch.randint(4, 260, (bsz, 11), generator=g)
    batch[OBS_LANGUAGE_TOKENS] = torch.cat([torch.ones(bsz, 1, dtype=torch.long), prompt], dim=1)  # <bos>
    batch[OBS_LANGUAGE_ATTENTION_MASK] = torch.ones(bsz, 12, dtype=torch.bool)
    if with_actions:
        batch[ACTION] = torch.rand(bsz, cfg.chunk_size, ACTION_DIM, generator=g) * 2 - 1
        fast = torch.randint(260, 260 + cfg.fast_vocab_size, (bsz, 6), generator=g)
        batch[ACTION_TOKENS] = torch.cat([fast, torch.full((bsz, 1), 2)], dim=1)  # + <eos>
        batch[ACTION_TOKEN_MASK] = torch.ones(bsz, 7, dtype=torch.bool)
    return batch


def _actions(policy: KIPolicy, cfg: KIConfig) -> torch.Tensor:
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, generator=torch.Generator().manual_seed(7))
    return policy.predict_action_chunk(_batch(cfg, with_actions=False), noise=noise)


@pytest.fixture(scope="module")
def pi05_source(tmp_path_factory) -> tuple[KIPolicy, Path]:
    """A tiny policy with tied embeddings (as PaliGemma's) and its pi05-layout checkpoint."""
    torch.manual_seed(1)
    cfg = tiny_config(**TINY)
    source = KIPolicy(cfg).eval()
    pwe = source.model.paligemma_with_expert.paligemma
    with torch.no_grad():
        pwe.model.language_model.embed_tokens.weight.copy_(pwe.lm_head.weight)
    return source, write_pi05_checkpoint(tmp_path_factory.mktemp("pi05") / "pi05_tiny", source, cfg)


def _tiny_hf_paligemma(cfg: KIConfig, vocab: int) -> PaliGemmaForConditionalGeneration:
    """transformers' own PaliGemma at the tiny preset's sizes, every weight random (norms included)."""
    b, v = TINY_BACKBONE, TINY_SIGLIP
    hf_cfg = PaliGemmaConfig(
        text_config=dict(
            model_type="gemma",
            hidden_size=b.width,
            intermediate_size=b.mlp_dim,
            num_attention_heads=b.num_heads,
            num_key_value_heads=b.num_kv_heads,
            head_dim=b.head_dim,
            num_hidden_layers=b.depth,
            vocab_size=vocab,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            patch_size=v.patch_size,
            image_size=cfg.image_resolution[0],
            projection_dim=b.width,
            vision_use_head=False,
        ),
        projection_dim=b.width,
        image_token_index=vocab - 1,
    )
    torch.manual_seed(2)
    model = PaliGemmaForConditionalGeneration(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


# --- full size, meta device ------------------------------------------------------------------------------
@pytest.mark.parametrize("state_mode", ["text", "continuous"])
def test_every_pi05_key_maps_onto_ki_vla_at_full_size(state_mode):
    pi05 = _on_meta(PI05Policy, PI05Config(device="cpu"))
    ki = _on_meta(KIPolicy, KIConfig(device="cpu", state_mode=state_mode))
    pi05_sd, ki_sd = pi05.state_dict(), ki.state_dict()
    new = {FAST_PLACEMENT: WHY_FAST_PLACEMENT}
    if state_mode == "continuous":
        new |= {"model.state_proj.weight": WHY_STATE_PROJ, "model.state_proj.bias": WHY_STATE_PROJ}

    mapped, report = pi05_to_ki_state_dict(pi05_sd, ki, ki.config)

    assert len(pi05_sd) == 813
    assert report.dropped == {EXPERT_LM_HEAD: WHY_EXPERT_LM_HEAD}  # the only pi05 tensor left behind
    assert report.new == new  # the only ki_vla tensors pi05 cannot fill
    assert set(mapped) == set(ki_sd) - set(new)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(ki_sd[k].shape) for k in mapped}
    assert all(mapped[k] is pi05_sd[k] for k in mapped)  # same names: nothing is renamed
    assert report.renamed == {} and report.notes == []


def test_pi05_hub_layout_maps_at_full_size():
    """lerobot/pi05_base's file: no `model.` prefix, openpi's time-MLP names, the LM head without the
    (tied) embedding."""
    pi05_sd = _on_meta(PI05Policy, PI05Config(device="cpu")).state_dict()
    ki = _on_meta(KIPolicy, KIConfig(device="cpu"))
    hub = {
        k.removeprefix("model.").replace("time_mlp_", "action_time_mlp_"): v
        for k, v in pi05_sd.items()
        if k != EMBED
    }
    mapped, report = pi05_to_ki_state_dict(hub, ki, ki.config)
    assert set(mapped) == set(ki.state_dict()) - {FAST_PLACEMENT}
    assert mapped[EMBED] is mapped[LM_HEAD] is hub[LM_HEAD.removeprefix("model.")]
    assert sorted(report.renamed.values()) == [
        f"model.time_mlp_{io}.{p}" for io in ("in", "out") for p in ("bias", "weight")
    ]
    assert report.notes == ["embed_tokens.weight filled from the tied lm_head"]


def test_paligemma_3b_maps_onto_the_backbone_at_full_size():
    """transformers' PaliGemma 3B (the google/paligemma-3b-pt-224 config): every backbone tensor filled,
    the 64 extra vocabulary rows (<image> + padding) trimmed, the expert left to its initialisation."""
    hf_cfg = PaliGemmaConfig(
        text_config=dict(
            model_type="gemma",
            hidden_size=2048,
            intermediate_size=16384,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            num_hidden_layers=18,
            vocab_size=257216,
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=1152,
            intermediate_size=4304,
            num_attention_heads=16,
            num_hidden_layers=27,
            patch_size=14,
            image_size=224,
            projection_dim=2048,
            vision_use_head=False,
        ),
        projection_dim=2048,
        image_token_index=257152,
    )
    with torch.device("meta"):
        hf = PaliGemmaForConditionalGeneration(hf_cfg)
    hf_sd = hf.state_dict()
    ki = _on_meta(KIPolicy, KIConfig(device="cpu"))
    ki_sd = ki.state_dict()

    mapped, report = paligemma_to_ki_state_dict(hf_sd, ki, ki.config)

    backbone = {k for k in ki_sd if k.startswith(PALIGEMMA)}
    assert set(mapped) == backbone
    assert set(report.new) == set(ki_sd) - backbone
    assert set(report.new.values()) == {WHY_NOT_PALIGEMMA, WHY_FAST_PLACEMENT}
    assert all(tuple(mapped[k].shape) == tuple(ki_sd[k].shape) for k in mapped)
    assert tuple(hf_sd["lm_head.weight"].shape) == (257216, 2048)
    assert tuple(mapped[EMBED].shape) == (PALIGEMMA_VOCAB_SIZE, 2048)
    assert report.dropped == {}


# --- a tiny pi05 checkpoint through KIPolicy.from_pretrained --------------------------------------------
def test_pi05_checkpoint_loads_value_for_value_and_drives_the_actions(pi05_source):
    source, ckpt = pi05_source
    torch.manual_seed(3)
    fresh = KIPolicy(tiny_config(**TINY)).eval()

    loaded = KIPolicy.from_pretrained(ckpt)  # config derived from pi05's config.json

    cfg = loaded.config
    assert isinstance(cfg, KIConfig) and cfg.paligemma_variant == "tiny" and cfg.chunk_size == 10
    assert (cfg.max_action_dim, cfg.max_state_dim, tuple(cfg.image_resolution)) == (8, 8, (64, 64))
    assert cfg.repo_id is None  # pi05's Hub identity is not ours
    assert loaded.name_or_path == str(ckpt)
    ours, theirs = loaded.state_dict(), source.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert loaded.fast_tokenizer is None  # pi05 has none: the processor fits it on the fine-tuning data

    after = _actions(loaded, cfg)
    assert torch.equal(after, _actions(source, cfg))
    assert not torch.allclose(after, _actions(fresh, cfg), atol=1e-3)


def test_pi05_with_the_cli_config_clears_pretrained_path(pi05_source):
    """What lerobot-train does: config from the CLI with pretrained_path = the pi05 checkpoint. LeRobot
    would then load pi05's processors from it; cleared, it builds ki_vla's from the dataset."""
    source, ckpt = pi05_source
    cfg = tiny_config(**TINY)
    cfg.pretrained_path = ckpt
    loaded = KIPolicy.from_pretrained(ckpt, config=cfg)
    assert cfg.pretrained_path is None and loaded.name_or_path == str(ckpt)
    assert torch.equal(loaded.model.time_mlp_in.weight, source.model.time_mlp_in.weight)


def test_pi05_start_with_vlm_cotraining_counts_the_stream_as_new(pi05_source):
    _, ckpt = pi05_source
    cfg = tiny_config(**TINY, vlm_dataset="/data/not_read_until_training")  # the stream opens lazily
    cfg.pretrained_path = ckpt
    loaded = KIPolicy.from_pretrained(ckpt, config=cfg)
    assert loaded.vlm_cotraining.state.tolist() == [0] * 6


def test_pi05_shape_mismatch_names_the_flags(pi05_source):
    _, ckpt = pi05_source
    cfg = tiny_config(fast_vocab_size=1024, max_action_dim=12, image_resolution=(32, 32))
    with pytest.raises(ValueError) as err:
        KIPolicy.from_pretrained(ckpt, config=cfg)
    assert "--policy.max_action_dim=8" in str(err.value)
    assert "--policy.image_resolution=[64,64]" in str(err.value)


def test_lerobot_train_starts_from_a_pi05_checkpoint(
    pi05_source, dataset_root, offline_env, tiny_train_args, tmp_path
):
    """`lerobot-train --policy.type=ki_vla --policy.pretrained_path=<pi05 dir>`: the pi05 weights load, the
    pi05 processors in that dir are never read, ki_vla's (FAST fitted on the dataset) are saved."""
    source, ckpt = pi05_source
    out = tmp_path / "run"
    cmd = [
        venv_script("lerobot-train"),
        *tiny_train_args(dataset_root, out, f"--policy.pretrained_path={ckpt}"),
        "--batch_size=2",
        "--steps=2",
        "--save_freq=2",
        "--log_freq=1",
    ]
    log = run_logged(cmd, offline_env, tmp_path / "train.log")
    assert f"Weights from {ckpt}: " in log and "dropped x1: " + WHY_EXPERT_LM_HEAD in log
    saved = out / "checkpoints" / "000002" / "pretrained_model"
    assert json.loads((saved / "config.json").read_text())["type"] == "ki_vla"
    steps = [
        s["registry_name"] for s in json.loads((saved / "policy_preprocessor.json").read_text())["steps"]
    ]
    assert "ki_vla_fast_tokenizer" in steps
    weights = load_file(saved / "model.safetensors")
    # FAST fitted on the dataset, saved once: with the preprocessor, not in the weights.
    assert "fast_tokenizer_state" not in weights
    assert fast_tokenizer_of_checkpoint(saved) is not None
    # Two optimizer steps move a weight by ~2 lr; a fresh initialisation would be far off.
    key = PALIGEMMA + "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(weights[key], source.state_dict()[key], atol=5e-3)


# --- a tiny PaliGemma checkpoint, backbone only ----------------------------------------------------------
@pytest.mark.parametrize("layout", ["save_pretrained", "hub_original"])
def test_paligemma_checkpoint_fills_the_backbone_only(layout, tmp_path):
    cfg = tiny_config(**TINY)
    vocab = KIPolicy(cfg).model.layout.vocab_size
    hf = _tiny_hf_paligemma(cfg, vocab)
    hf_sd = hf.state_dict()  # in-memory layout: model.language_model..., lm_head.weight (tied)
    ckpt = tmp_path / "paligemma"
    if layout == "save_pretrained":  # transformers 5.x: sharded, `model.language_model.model...`
        hf.save_pretrained(ckpt, max_shard_size="400KB")
        assert (ckpt / "model.safetensors.index.json").is_file()
    else:  # the Hub's original layout, plus a SigLIP head PaliGemma does not use
        old = {}
        for key, value in hf_sd.items():
            key = key.removeprefix("model.").replace("language_model.", "language_model.model.")
            old[key.replace("lm_head.", "language_model.lm_head.")] = value.clone()
        old["vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, TINY_SIGLIP.hidden_size)
        ckpt.mkdir()
        save_file(old, ckpt / "model.safetensors")

    torch.manual_seed(4)
    plain = KIPolicy(tiny_config(**TINY))
    torch.manual_seed(4)
    policy = KIPolicy(tiny_config(**TINY, paligemma_pretrained_path=str(ckpt)))

    ours, init = policy.state_dict(), plain.state_dict()
    for key, value in ours.items():
        if key.startswith(PALIGEMMA):
            assert torch.equal(value, hf_sd[key.removeprefix(PALIGEMMA)]), key
        else:  # the expert, projections and time MLP: exactly their fresh initialisation
            assert torch.equal(value, init[key]), key
    report = load_paligemma_backbone(policy, policy.config, ckpt)
    assert set(report.mapped) == {k for k in ours if k.startswith(PALIGEMMA)}
    expected_drop = (
        {} if layout == "save_pretrained" else {"vision_tower.vision_model.head.probe": WHY_SIGLIP_HEAD}
    )
    assert report.dropped == expected_drop


def test_a_ki_checkpoint_does_not_reload_paligemma(tmp_path):
    """paligemma_pretrained_path is an init-time switch: loading a ki_vla checkpoint that carries it must not
    overwrite the trained backbone (nor need the PaliGemma files any more)."""
    cfg = tiny_config(paligemma_pretrained_path=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError):
        KIPolicy(cfg)
    cfg.paligemma_pretrained_path = None
    KIPolicy(cfg).save_pretrained(tmp_path / "ki")
    saved = json.loads((tmp_path / "ki" / "config.json").read_text())
    saved["paligemma_pretrained_path"] = str(tmp_path / "gone")
    (tmp_path / "ki" / "config.json").write_text(json.dumps(saved))
    KIPolicy.from_pretrained(tmp_path / "ki")


# --- no Hub ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("load", "repo_id"),
    [
        (lambda p, r: load_pi05_weights(p, p.config, r), "lerobot/pi05_base"),
        (lambda p, r: load_paligemma_backbone(p, p.config, r), "google/paligemma-3b-pt-224"),
        (lambda p, r: KIPolicy.from_pretrained(r), "lerobot/pi05_base"),
        (lambda p, r: KIPolicy(tiny_config(paligemma_pretrained_path=r)), "google/paligemma-3b-pt-224"),
    ],
)
def test_hub_ids_offline_give_one_clear_line(load, repo_id, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # no cached copy can answer
    with pytest.raises(HubUnavailableError) as err:
        load(KIPolicy(tiny_config()), repo_id)
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE=1" in msg
    assert f"`hf download {repo_id} --local-dir DIR`" in msg and f"pass DIR instead of '{repo_id}'" in msg


# --- what fine-tuning pretrained weights switches on -----------------------------------------------------
def _train_step(policy: KIPolicy, cfg: KIConfig) -> float:
    policy.train()
    loss, _ = policy.forward(_batch(cfg))
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("flag", ["train_expert_only", "freeze_vision_encoder"])
def test_frozen_parts_get_no_gradient_and_the_rest_trains(flag):
    cfg = tiny_config(**{flag: True})
    torch.manual_seed(0)
    policy = KIPolicy(cfg)
    _train_step(policy, cfg)
    frozen_prefix = PALIGEMMA + ("" if flag == "train_expert_only" else "model.vision_tower.")
    frozen_module = (
        policy.model.paligemma_with_expert.paligemma
        if flag == "train_expert_only"
        else policy.model.paligemma_with_expert.paligemma.model.vision_tower
    )
    assert not frozen_module.training  # dropout/BN-free, but kept in eval as pi05 does
    n_frozen = 0
    for name, p in policy.named_parameters():
        if name.startswith(frozen_prefix):
            n_frozen += 1
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
            # adaRMS's `dense` starts at zero, so at init the time MLP has no effect and a zero gradient.
            assert p.grad.abs().sum() > 0 or name.startswith("model.time_mlp_"), name
    assert n_frozen > 0


def test_bfloat16_keeps_norms_and_vision_in_float32_and_trains_on_cpu():
    cfg = tiny_config(dtype="bfloat16")
    torch.manual_seed(0)
    policy = KIPolicy(cfg)
    for name, p in policy.named_parameters():
        if name.startswith("model.paligemma_with_expert."):
            keep = any(s in name for s in FLOAT32_SELECTORS)
        else:  # action/time projections live outside the towers and are never cast (as in pi05)
            keep = True
        assert p.dtype == (torch.float32 if keep else torch.bfloat16), name
    assert policy.model.paligemma_with_expert.paligemma.lm_head.weight.dtype == torch.bfloat16
    loss = _train_step(policy, cfg)
    assert torch.isfinite(torch.tensor(loss))
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)


def test_peft_lora_wraps_expert_attention_and_projections(pi05_source):
    pytest.importorskip("peft")
    from lerobot.configs.default import PeftConfig

    _, ckpt = pi05_source
    cfg = tiny_config(**TINY)
    cfg.pretrained_path = ckpt
    policy = KIPolicy.from_pretrained(ckpt, config=cfg)  # as lerobot-train: pretrained_path gets cleared
    import dataclasses

    peft_model = policy.wrap_with_peft(peft_cli_overrides=dataclasses.asdict(PeftConfig(r=4)))
    assert peft_model.peft_config["default"].base_model_name_or_path == str(ckpt)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
    layers = TINY_BACKBONE.depth
    assert adapted == {
        *(f"{EXPERT}model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in ("q", "v")),
        *(f"model.{m}" for m in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out")),
    }
    loss = _train_step(peft_model.base_model.model, cfg)
    assert torch.isfinite(torch.tensor(loss))
    assert all(peft_model.get_parameter(n).grad is not None for n in trainable)


def test_peft_missing_is_a_clear_message(monkeypatch):
    from lerobot.utils import import_utils

    monkeypatch.setitem(import_utils._require_package_cache, "peft", False)
    with pytest.raises(ImportError, match=r"'peft' is required.*pip install 'lerobot\[peft\]'"):
        KIPolicy(tiny_config()).wrap_with_peft(peft_cli_overrides={"r": 4})
