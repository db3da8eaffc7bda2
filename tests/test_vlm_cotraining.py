"""VLM co-training on the tiny preset: where its gradients go, the mixing ratio, a VLM task learned while
robot training goes on, text generation, and checkpoints that carry the stream position."""

from __future__ import annotations

import math
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import logged_metric, logged_steps, run_logged, venv_script
from safetensors.torch import load_file
from synthetic_dataset import make_dataset
from tiny_setup import batch_of, build, train_steps
from vlm_fixtures import COLOUR_NAMES, PROMPT, colour_records, save_hf_dataset

from lerobot_ki.model_inputs import vlm_inputs
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.processor_ki import text_tokenizer_of
from lerobot_ki.text_generation import generate_text, token_picker
from lerobot_ki.text_tokenizer import load_text_tokenizer
from lerobot_ki.vlm_cotraining import STATE_FIELDS, VLMCoTraining, collate, tokenize_example, vlm_loss
from lerobot_ki.vlm_data import BadVLMRecord, image_to_tensor


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("vlm_cotraining")
    make_dataset(base / "robot", episodes=3, length=16)  # one episode per task
    save_hf_dataset(base / "vlm", colour_records(256, seed=0))
    return base / "robot", base / "vlm"


def _build(roots, **overrides):
    robot, vlm = roots
    return build(robot, seed=0, vlm_dataset=str(vlm), **overrides)


def _examples(policy, n_images: list[int]):
    records = colour_records(len(n_images), seed=5)
    tok = policy.vlm_cotraining.tokenizer
    return [
        tokenize_example([image_to_tensor(r["image"])] * k, r["prompt"], r["answer"], tok, 72, 16, 2)
        for r, k in zip(records, n_images, strict=True)
    ]


# --- gradients -------------------------------------------------------------------------------------
def test_vlm_loss_trains_the_backbone_only_and_masks_absent_cameras(roots):
    policy, *_ = _build(roots)
    policy.train()
    batch = collate(_examples(policy, [1, 2]), policy.model.layout.pad_id)  # example 0 lacks camera 2
    loss, info = vlm_loss(policy.model, batch)
    assert info["vlm_loss"] > 0
    loss.backward()

    pwe = policy.model.paligemma_with_expert
    nonzero = {n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    for name in (
        "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight",
        "model.paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight",
        "model.paligemma_with_expert.paligemma.model.language_model.layers.3.mlp.down_proj.weight",
        "model.paligemma_with_expert.paligemma.lm_head.weight",
    ):
        assert name in nonzero, name
    # No flow, no expert: the action expert and the action/time projections get no gradient at all.
    not_backbone = [n for n in nonzero if not n.startswith("model.paligemma_with_expert.paligemma.")]
    assert not_backbone == [], not_backbone[:5]
    assert all(p.grad is None for p in pwe.gemma_expert.parameters())

    # The absent camera's tokens are padding: no query attends to them.
    with torch.no_grad():
        inputs = vlm_inputs(batch.images, batch.prompt_ids, batch.prompt_mask, policy.config, "cpu")
        _, pad = policy.model.embed_prefix(inputs)
    n_img = (policy.config.image_resolution[0] // 16) ** 2  # tiny SigLIP: 16-px patches
    assert pad[0, :n_img].all() and not pad[0, n_img : 2 * n_img].any()
    assert pad[1, : 2 * n_img].all()


def test_cotraining_adds_the_weighted_vlm_loss_to_the_robot_loss(roots):
    policy, pre, _, ds = _build(roots, vlm_mix_ratio=0.2, vlm_loss_weight=0.5)
    policy.train()
    batch = batch_of(ds, pre, range(0, 40, 5))  # 8 robot examples -> 2 VLM examples (0.2 of 10)
    torch.manual_seed(1)
    loss, info = policy.forward(batch)
    expected = info["loss_fast_ce"] + info["loss_flow"] + 0.5 * info["vlm_loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert info["vlm_ratio"] == pytest.approx(0.2)
    counts = dict(zip(STATE_FIELDS, policy.state_dict()["vlm_cotraining.state"].tolist(), strict=True))
    assert counts["vlm_examples"] == 2 and counts["robot_examples"] == 8 and counts["records_read"] == 2
    # Evaluation batches (policy.eval()) draw nothing.
    policy.eval()
    _, info = policy.forward(batch)
    assert "vlm_loss" not in info and policy.vlm_cotraining.counts()["vlm_examples"] == 2


def test_records_the_model_cannot_take_are_skipped_as_bad_records():
    tok = load_text_tokenizer("byte", 256)
    img = [torch.rand(3, 8, 8)]

    def reason(images=img, prompt="p", answer="a") -> str:
        with pytest.raises(BadVLMRecord) as err:
            tokenize_example(
                images, prompt, answer, tok, max_prompt_tokens=20, max_answer_tokens=6, max_images=2
            )
        return err.value.reason

    assert reason(images=img * 3) == "too many images"
    assert reason(prompt="x" * 30) == "prompt too long"
    assert reason(answer="purple") == "answer too long"  # 6 bytes + EOS
    ok = tokenize_example(img, "p", "red", tok, 20, 6, 2)
    assert ok.target_ids == [*tok.encode_text("red", bos=False), tok.layout.eos_id]
    assert ok.prompt_ids[0] == tok.layout.bos_id and tok.decode(ok.prompt_ids) == "p\n"


# --- mixing ratio ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.1, 0.37])
def test_mixing_ratio_holds_over_many_steps(roots, ratio):
    policy, *_ = _build(roots, vlm_mix_ratio=ratio)
    co: VLMCoTraining = policy.vlm_cotraining
    robot_total = vlm_total = 0
    per_step = []
    for step in range(400):
        batch = 8 if step % 50 else 5  # a short last batch now and then, as at an epoch's end
        n = len(co.draw(batch))
        robot_total += batch
        vlm_total += n
        per_step.append(n)
        # Never more than half an example off the target, at every step.
        assert abs(vlm_total - ratio / (1 - ratio) * robot_total) <= 0.5 + 1e-9
    assert co.achieved_ratio() == pytest.approx(vlm_total / (vlm_total + robot_total))
    assert abs(co.achieved_ratio() - ratio) < 1e-3
    expected = ratio / (1 - ratio) * 8
    assert set(per_step[1:50]) <= {int(np.floor(expected)), int(np.ceil(expected))}


def test_streaming_source_feeds_the_policy(roots):
    """--policy.vlm_streaming=true: the dataset is iterated (as a Hub dataset would be), not indexed."""
    policy, pre, _, ds = _build(roots, vlm_streaming=True, vlm_mix_ratio=0.5)
    policy.train()
    _, info = policy.forward(batch_of(ds, pre, range(4)))
    assert info["vlm_loss"] > 0 and info["vlm_ratio"] == 0.5
    assert isinstance(policy.vlm_cotraining._stream.source, datasets.IterableDataset)
    assert policy.vlm_cotraining.counts()["records_read"] == 4


# --- a VLM task learned while the robot trains ----------------------------------------------------------
def _colour_accuracy(policy, images, answers) -> float:
    out = generate_text(policy.model, policy.vlm_cotraining.tokenizer, images, PROMPT, max_new_tokens=8)
    return float(np.mean([o == a for o, a in zip(out, answers, strict=True)]))


def test_colour_task_is_learned_while_robot_training_continues(roots):
    # 4 robot + 8 VLM examples per step.
    policy, pre, _, ds = _build(roots, vlm_mix_ratio=2 / 3)
    held_out = colour_records(32, seed=99)  # images never trained on
    images = torch.stack([image_to_tensor(r["image"]) for r in held_out])
    answers = [r["answer"] for r in held_out]
    assert set(answers) == set(COLOUR_NAMES)
    acc_before = _colour_accuracy(policy, images, answers)

    frames = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    batches = [batch_of(ds, pre, frames[i : i + 4]) for i in range(0, len(frames) - 3, 4)]
    history = train_steps(policy, batches, steps := 100)
    acc_after = _colour_accuracy(policy, images, answers)
    print(f"colour accuracy on 32 held-out images: {acc_before:.2f} -> {acc_after:.2f} after {steps} steps")

    # Chance is 0.25 (four colours, each answer must be exact and end with EOS).
    assert acc_before <= 0.25
    assert acc_after >= 0.75, acc_after
    # ... and the robot losses kept falling alongside.

    def avg(key, part):
        return sum(h[key] for h in part) / len(part)

    assert avg("loss_fast_ce", history[-10:]) < 0.7 * avg("loss_fast_ce", history[:5])
    assert avg("loss_flow", history[-10:]) < 0.7 * avg("loss_flow", history[:5])
    assert history[-1]["vlm_ratio"] == pytest.approx(2 / 3)


# --- generate_text ---------------------------------------------------------------------------------
def test_generate_text_greedy_and_sampled(roots):
    policy, pre, *_ = _build(roots)
    # Co-training's tokenizer is the processor's (built from the same config); either can be handed over.
    tok = text_tokenizer_of(pre)
    assert tok.to_str() == policy.vlm_cotraining.tokenizer.to_str()
    images = torch.rand(6, 3, 40, 48)  # resized with padding to the model's 32x32, like robot frames
    greedy = generate_text(policy.model, tok, images, PROMPT, max_new_tokens=6)
    assert len(greedy) == 6 and greedy == generate_text(policy.model, tok, images, PROMPT, max_new_tokens=6)

    def sample(seed: int, **kw) -> list[str]:
        gen = torch.Generator().manual_seed(seed)
        return generate_text(policy.model, tok, images, PROMPT, max_new_tokens=6, generator=gen, **kw)

    hot = {"temperature": 1.5, "top_k": 50, "top_p": 0.95}
    assert sample(0, **hot) == sample(0, **hot)
    assert sample(0, **hot) != sample(1, **hot)
    assert sample(3, temperature=1e-6) == greedy  # temperature -> 0 is greedy
    assert sample(3, temperature=1.0, top_k=1) == greedy  # top-1 is greedy too


def test_token_picker_never_chooses_fast_tokens_and_checks_its_arguments():
    logits = torch.zeros(3, 20)
    logits[:, 10:15] = 100.0  # the "FAST" ids are by far the likeliest
    gen = torch.Generator().manual_seed(0)
    assert (token_picker((10, 15))(logits) < 10).all()
    sampled = token_picker((10, 15), temperature=1.0, generator=gen)(logits.repeat(50, 1))
    assert ((sampled < 10) | (sampled >= 15)).all()
    with pytest.raises(ValueError, match="top_p"):
        token_picker((0, 0), temperature=1.0, top_p=0.0)


# --- checkpoints -----------------------------------------------------------------------------------
def test_checkpoints_carry_the_stream_position(roots, tmp_path):
    policy, pre, _, ds = _build(roots, vlm_mix_ratio=0.3)
    policy.train()
    for _ in range(3):
        policy.forward(batch_of(ds, pre, range(4)))
    saved = policy.vlm_cotraining.counts().copy()
    assert saved["vlm_examples"] == round(0.3 / 0.7 * 12)
    policy.save_pretrained(tmp_path / "ckpt")

    loaded = KIPolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.vlm_cotraining.counts() == saved
    # It continues where it stopped: the next records are those the original stream reads next.
    examples = loaded.vlm_cotraining.draw(4)
    expected = policy.vlm_cotraining.draw(4)
    assert [e.target_ids for e in examples] == [e.target_ids for e in expected]

    # A co-trained checkpoint loads into a policy that does not co-train, and the reverse.
    plain_cfg = loaded.config
    plain_cfg.vlm_dataset = None
    assert KIPolicy.from_pretrained(tmp_path / "ckpt", config=plain_cfg).vlm_cotraining is None
    plain, *_ = build(roots[0], seed=0)
    plain.save_pretrained(tmp_path / "plain")
    cfg = loaded.config
    cfg.vlm_dataset = str(roots[1])
    restarted = KIPolicy.from_pretrained(tmp_path / "plain", config=cfg)
    assert restarted.vlm_cotraining.counts()["records_read"] == 0


# --- through lerobot-train -------------------------------------------------------------------------
def test_lerobot_train_logs_vlm_metrics_and_resume_continues_the_stream(
    dataset_root, offline_env, tiny_train_args, tmp_path
):
    vlm = save_hf_dataset(tmp_path / "vlm", colour_records(24, seed=3))
    out = tmp_path / "run"
    flags = [f"--policy.vlm_dataset={vlm}", "--policy.vlm_mix_ratio=0.5", "--policy.vlm_loss_weight=0.5"]
    cmd = [venv_script("lerobot-train"), *tiny_train_args(dataset_root, out, *flags)]
    log = run_logged(
        [*cmd, "--batch_size=2", "--steps=4", "--save_freq=2", "--log_freq=2", "--seed=1"],
        offline_env,
        tmp_path / "train.log",
    )
    assert logged_steps(log) == [2, 4]
    assert all(math.isfinite(v) and v > 0 for v in logged_metric(log, "vlm_loss"))
    assert len(logged_metric(log, "vlm_loss")) == 2
    assert logged_metric(log, "vlm_ratio") == [0.5, 0.5]

    resume = [
        sys.executable,
        "-m",
        "lerobot.scripts.lerobot_train",
        "--resume=true",
        f"--config_path={out / 'checkpoints' / '000004' / 'pretrained_model' / 'train_config.json'}",
        "--steps=6",
        "--log_freq=2",
    ]
    log = run_logged(resume, offline_env, tmp_path / "resume.log")
    assert logged_steps(log) == [6] and logged_metric(log, "vlm_ratio") == [0.5]

    def counts(step: int) -> dict[str, int]:
        weights = load_file(out / "checkpoints" / f"{step:06d}" / "pretrained_model" / "model.safetensors")
        return dict(zip(STATE_FIELDS, weights["vlm_cotraining.state"].tolist(), strict=True))

    # 2 robot + 2 VLM examples per step; the resumed run went on from the checkpoint's 8 records read.
    assert counts(4) == dict(
        epoch=0, index=8, records_read=8, records_bad=0, vlm_examples=8, robot_examples=8
    )
    assert counts(6) == dict(
        epoch=0, index=12, records_read=12, records_bad=0, vlm_examples=12, robot_examples=12
    )
