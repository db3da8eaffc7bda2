"""A checkpoint written by the code before issue 12 (commit 9762e74, `tests/fixtures/make_main_checkpoint.py`)
loads with today's code, policy and processors, and gives the same actions, losses, FAST tokens and text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.fixture_weights import seeded_weight
from lerobot.policies.factory import make_pre_post_processors
from safetensors.torch import load_file, save_file

from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.processor_ki import text_tokenizer_of
from lerobot_ki.text_generation import generate_text

FIXTURE = Path(__file__).parent / "fixtures" / "main_9762e74"
CAMERAS = ("observation.images.top", "observation.images.wrist")


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory) -> Path:
    """The fixture with its `model.safetensors` written again: seeded floats + the saved non-float buffers."""
    ckpt = tmp_path_factory.mktemp("old") / "ckpt"
    shutil.copytree(FIXTURE, ckpt)
    manifest = json.loads((ckpt / "weights_manifest.json").read_text())
    weights = load_file(ckpt / "non_float.safetensors")
    for key, (shape, dtype) in manifest.items():
        if key not in weights:
            assert dtype == "torch.float32", key
            weights[key] = seeded_weight(key, tuple(shape))
    save_file(weights, ckpt / "model.safetensors")
    return ckpt


def test_old_checkpoint_gives_the_same_outputs(old_checkpoint):
    expected = load_file(FIXTURE / "expected.safetensors")
    numbers = json.loads((FIXTURE / "expected.json").read_text())
    policy = KIPolicy.from_pretrained(old_checkpoint).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(old_checkpoint))
    obs = {k: expected[k] for k in (*CAMERAS, "observation.state")}

    batch = pre({**obs, "task": numbers["tasks"]})
    assert torch.equal(batch["observation.language.tokens"], expected["prompt_ids"])
    chunk = policy.predict_action_chunk(batch, noise=expected["noise"].clone())
    torch.testing.assert_close(chunk, expected["chunk"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post(chunk), expected["actions"], rtol=1e-5, atol=1e-5)
    assert chunk.abs().max() > 0.05  # a real chunk, not zeros

    train_batch = pre({**obs, "action": expected["action"], "task": numbers["tasks"]})
    assert torch.equal(train_batch["action.tokens"], expected["fast_ids"])
    assert torch.equal(train_batch["action.token_mask"], expected["fast_mask"])
    policy.train()
    torch.manual_seed(5)
    _, info = policy.forward(train_batch)
    for key in ("loss_fast_ce", "loss_flow", "fast_token_acc", "loss"):
        assert info[key] == pytest.approx(numbers[key], rel=1e-5, abs=1e-6), key
    policy.eval()

    tok = text_tokenizer_of(pre)
    texts = generate_text(policy.model, tok, obs[CAMERAS[0]], "What colour is it?", max_new_tokens=6)
    assert texts == numbers["texts"]
