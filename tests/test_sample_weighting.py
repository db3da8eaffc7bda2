"""LeRobot's per-sample loss weighting (`--sample_weighting.type=...`, RA-BC): `forward(batch,
reduction="none")` returns per-sample losses (B,), as pi05's does, whose uniformly weighted mean is the
plain loss, and lerobot-train runs with it."""

from __future__ import annotations

import pytest
import torch
from conftest import logged_steps, run_logged, venv_script
from tiny_setup import batch_of, build


@pytest.fixture(scope="module")
def policy_and_batch(dataset_root):
    policy, pre, _, ds = build(dataset_root)
    batch = batch_of(ds, pre, [0, 7, 19, 33])
    batch["action_is_pad"][1, -3:] = True  # samples with fewer flow targets than others
    return policy, batch


def _forward(policy, batch, reduction):
    torch.manual_seed(0)  # the same noise and flow times for both reductions
    return policy.forward(batch, reduction=reduction)


def test_per_sample_losses_weighted_uniformly_equal_the_plain_loss(policy_and_batch):
    policy, batch = policy_and_batch
    policy.train()
    loss, info = _forward(policy, batch, "mean")
    per_sample, info_none = _forward(policy, batch, "none")
    assert loss.shape == () and per_sample.shape == (4,)
    assert per_sample.std() > 0  # really one loss per sample, not the batch loss repeated
    weights = torch.ones(4)
    weighted = (per_sample * weights).sum() / weights.sum()  # lerobot_train.update_policy's reduction
    torch.testing.assert_close(weighted, loss, rtol=1e-5, atol=1e-6)
    assert info_none["loss"] == pytest.approx(info["loss"], rel=1e-5)
    # A weight on one sample only is that sample's loss, and the gradient flows through it.
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0])
    picked = (per_sample * one_hot).sum() / one_hot.sum()
    torch.testing.assert_close(picked, per_sample[2])
    picked.backward()
    assert policy.model.action_out_proj.weight.grad.abs().sum() > 0
    policy.zero_grad()
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        policy.forward(batch, reduction="sum")


def test_lerobot_train_with_uniform_sample_weighting(dataset_root, tmp_path, offline_env, tiny_train_args):
    out = tmp_path / "run"
    cmd = [
        venv_script("lerobot-train"),
        *tiny_train_args(dataset_root, out, "--sample_weighting.type=uniform"),
        "--batch_size=2",
        "--steps=2",
        "--log_freq=1",
        "--save_checkpoint=false",
    ]
    log = run_logged(cmd, offline_env, tmp_path / "train.log")
    assert "Creating sample weighter: uniform" in log
    assert logged_steps(log) == [1, 2]
