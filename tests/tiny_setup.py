"""A tiny ki_vla policy with its processors and batches from the synthetic dataset, built in-process, and its
weights written as a pi05 checkpoint (the layout of lerobot/pi05_base)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from safetensors.torch import save_file
from synthetic_dataset import ACTION_DIM, STATE_DIM

from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.fast_artifacts import fit_fast_on_dataset
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.processor_ki import make_ki_vla_pre_post_processors
from lerobot_ki.weights import EMBED, EXPERT, FAST_PLACEMENT

CAMERAS = ("observation.images.top", "observation.images.wrist")
EXPERT_LM_HEAD = EXPERT + "lm_head.weight"


def tiny_config(**overrides) -> KIConfig:
    kwargs = dict(
        paligemma_variant="tiny",
        action_expert_variant="tiny",
        chunk_size=10,
        n_action_steps=5,
        image_resolution=(32, 32),
        max_state_dim=8,
        max_action_dim=8,
        tokenizer_max_length=72,
        fast_vocab_size=256,
        max_fast_tokens=40,
        device="cpu",
    )
    kwargs.update(overrides)
    cfg = KIConfig(**kwargs)
    cfg.input_features = {cam: PolicyFeature(FeatureType.VISUAL, (3, 32, 32)) for cam in CAMERAS}
    cfg.input_features["observation.state"] = PolicyFeature(FeatureType.STATE, (STATE_DIM,))
    cfg.output_features = {"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))}
    return cfg


def load_dataset(root: Path, chunk_size: int = 10) -> LeRobotDataset:
    fps = 10
    return LeRobotDataset(
        "local/ki_synthetic", root=root, delta_timestamps={"action": [i / fps for i in range(chunk_size)]}
    )


def build(root: Path, seed: int = 0, **overrides):
    """(policy, preprocessor, postprocessor, dataset) with FAST fitted on the dataset, as training does."""
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    ds = load_dataset(root, cfg.chunk_size)
    fast, _ = fit_fast_on_dataset("local/ki_synthetic", root, cfg, ds.meta.stats)
    policy = KIPolicy(cfg, dataset_stats=ds.meta.stats, fast_tokenizer=fast)
    pre, post = make_ki_vla_pre_post_processors(cfg, ds.meta.stats, fast_tokenizer=fast)
    return policy, pre, post, ds


def batch_of(ds: LeRobotDataset, pre, indices) -> dict:
    return pre(torch.utils.data.default_collate([ds[int(i)] for i in indices]))


def train_steps(policy, batches: list[dict], steps: int) -> list[dict]:
    """`steps` AdamW steps (lr 1e-3, clip 1.0) cycling over preprocessed `batches`; the logged dicts."""
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    policy.train()
    history = []
    for step in range(steps):
        loss, info = policy.forward(batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        history.append(info)
    return history


def pi05_config_json(cfg: KIConfig) -> dict:
    """A pi05 config.json for `cfg`'s sizes: the fields PI05Config has, with pi05's own at their defaults."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        ours = json.loads((Path(tmp) / "config.json").read_text())
    pi05_fields = {f.name for f in dataclasses.fields(PI05Config)}
    raw = {k: v for k, v in ours.items() if k in pi05_fields}
    raw.update(type="pi05", compile_model=False, use_relative_actions=False, repo_id="lerobot/pi05_base")
    return raw


def write_pi05_checkpoint(root: Path, source: KIPolicy, cfg: KIConfig) -> Path:
    """`source`'s weights as lerobot/pi05_base stores them: no `model.` prefix, openpi's
    `action_time_mlp_*`, only the LM head of the (tied) embedding pair, and the expert LM head pi05
    carries. Plus pi05 processors that must never be read (they name a step nobody registered)."""
    sd = {k: v.clone() for k, v in source.state_dict().items() if k not in (FAST_PLACEMENT, EMBED)}
    pi05 = {}
    for key, value in sd.items():
        key = key.removeprefix("model.").replace("time_mlp_", "action_time_mlp_")
        pi05[key] = value.contiguous()
    width = source.model.action_in_proj.out_features
    pi05[EXPERT_LM_HEAD.removeprefix("model.")] = torch.randn(source.model.layout.vocab_size, width)
    root.mkdir(parents=True)
    save_file(pi05, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(pi05_config_json(cfg)))
    bogus = {"name": "policy_preprocessor", "steps": [{"registry_name": "a_pi05_step_nobody_registered"}]}
    (root / "policy_preprocessor.json").write_text(json.dumps(bogus))
    return root
