"""The sped-up paths compute what the plain ones compute: the graph-safe embeddings (against pi05's), the
device-side Euler loop (against LeRobot's), the prompt trimming and the FAST CE on valid slots only change
no number. (The CUDA-graph replay needs a GPU: `benchmarks/vs_pi05_pi0fast.py` checks it against the eager
sampler on every GPU run.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lerobot.policies.common.flow_matching import euler_integrate
from lerobot.policies.pi05.modeling_pi05 import PI05Pytorch
from lerobot.utils.constants import (
    ACTION_TOKEN_MASK,
    ACTION_TOKENS,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
)
from synthetic_dataset import make_dataset
from tiny_setup import batch_of, build

from lerobot_ki import model_inputs
from lerobot_ki.cuda_graphs import flatten, unflatten
from lerobot_ki.model_inputs import PROMPT_LENGTH_MULTIPLE, robot_inputs, trim_prompt_padding
from lerobot_ki.transformer import fast_paths
from lerobot_ki.vla_model import euler_steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_path") / "ds"
    make_dataset(root)
    policy, pre, _, ds = build(root, seed=3)
    # Perturb every weight so that no bias or norm is an identity that could hide a wrong path.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return policy.eval(), batch_of(ds, pre, [0, 7, 19])


def _pad_prompt(batch: dict, extra: int) -> dict:
    out = dict(batch)
    ids, mask = batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]
    out[OBS_LANGUAGE_TOKENS] = torch.cat([ids, ids.new_zeros(ids.shape[0], extra)], dim=1)
    out[OBS_LANGUAGE_ATTENTION_MASK] = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return out


def test_graph_safe_prefix_and_suffix_match_pi05(tiny):
    policy, batch = tiny
    model = policy.model
    inputs = robot_inputs(batch, policy.config)
    images, img_masks, tokens, masks = (
        inputs.images,
        inputs.image_masks,
        inputs.prompt_ids,
        inputs.prompt_mask,
    )
    ours, theirs = (
        model.embed_images_and_prompt(images, img_masks, tokens, masks),
        PI05Pytorch.embed_prefix(model, images, img_masks, tokens, masks),
    )
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and torch.equal(a, b.to(a.dtype))
    x_t = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    time = torch.tensor([0.9, 0.5, 0.1])
    for a, b in zip(model.embed_suffix(x_t, time), PI05Pytorch.embed_suffix(model, x_t, time), strict=True):
        assert a.shape == b.shape and torch.allclose(a, b.to(a.dtype), atol=1e-6)


def test_device_side_euler_loop_matches_lerobots():
    torch.manual_seed(0)
    weight = torch.randn(6, 6)

    def velocity(x, t):  # depends on x and t, so a wrong time schedule changes the result
        return torch.tanh(x @ weight) * t[:, None, None] + t[:, None, None] ** 2

    noise = torch.randn(2, 5, 6)
    for steps in (1, 3, 10):
        assert torch.equal(euler_steps(velocity, noise, steps), euler_integrate(velocity, noise, steps))


def test_prompt_trimming_keeps_every_valid_token_and_changes_no_output(tiny):
    policy, batch = tiny
    wide = _pad_prompt(batch, 57)  # 57 more all-padding columns
    last_valid = int(batch[OBS_LANGUAGE_ATTENTION_MASK].bool().any(0).nonzero().max())
    tokens, masks = trim_prompt_padding(wide[OBS_LANGUAGE_TOKENS], wide[OBS_LANGUAGE_ATTENTION_MASK])
    assert tokens.shape[1] > last_valid and tokens.shape[1] % PROMPT_LENGTH_MULTIPLE == 0
    assert tokens.shape[1] < wide[OBS_LANGUAGE_TOKENS].shape[1]
    assert masks.sum() == batch[OBS_LANGUAGE_ATTENTION_MASK].sum()

    noise = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    chunk = policy.predict_action_chunk(batch, noise=noise.clone())
    chunk_wide = policy.predict_action_chunk(wide, noise=noise.clone())
    # Without trimming: the untrimmed prompt through the model directly.
    inputs = dataclasses.replace(
        robot_inputs(wide, policy.config),
        prompt_ids=wide[OBS_LANGUAGE_TOKENS],
        prompt_mask=wide[OBS_LANGUAGE_ATTENTION_MASK].bool(),
    )
    steps = policy.config.num_inference_steps
    untrimmed = policy.model.sample_actions(inputs, noise.clone(), steps)[:, :, : chunk.shape[-1]]
    assert torch.allclose(chunk, chunk_wide, atol=1e-5)
    assert torch.allclose(chunk, untrimmed, atol=1e-5)
    assert chunk.abs().max() > 0.05  # a real chunk, not zeros


def test_prompt_trimming_leaves_the_training_losses_unchanged(tiny, monkeypatch):
    policy, batch = tiny
    wide = _pad_prompt(batch, 40)
    losses = []
    for trim in (True, False):
        if not trim:
            monkeypatch.setattr(model_inputs, "trim_prompt_padding", lambda ids, mask: (ids, mask.bool()))
        torch.manual_seed(11)  # same flow noise and time
        _, info = policy.forward(wide)
        losses.append(info)
    for key in ("loss_fast_ce", "loss_flow", "fast_token_acc"):
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-5, abs=1e-6)
    assert losses[0]["loss_flow"] > 0 and losses[0]["loss_fast_ce"] > 0


def test_one_call_sampler_equals_prefill_then_expert_steps(tiny):
    policy, batch = tiny
    noise = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    model, steps = policy.model, policy.config.num_inference_steps
    inputs = robot_inputs(batch, policy.config)
    # What the CUDA graph records: the inputs flattened field by field and rebuilt inside the graph.
    tensors, spec = flatten(inputs)
    assert len(tensors) == 2 * len(inputs.images) + 3
    with fast_paths(all=False):  # the plain path; issue 17's against it: tests/test_fast_paths.py
        one_call = model.sample_actions(unflatten(tensors, spec), noise.clone(), steps)
        embs, pad = model.embed_prefix(inputs)
        _, kv = model.prefill(embs, pad)
        two_calls = euler_steps(lambda x, t: model.velocity(kv, pad, x, t), noise.clone(), steps)
        assert torch.equal(one_call, two_calls)
    one_call = model.sample_actions(unflatten(tensors, spec), noise.clone(), steps)  # the default
    chunk = policy.predict_action_chunk(batch, noise=noise.clone())
    assert torch.equal(one_call[:, :, : chunk.shape[-1]], chunk)


def test_fast_ce_on_valid_slots_only_equals_the_masked_mean_over_all_slots(tiny):
    policy, batch = tiny
    model = policy.model
    prefix_embs, prefix_pad = model.embed_prefix(robot_inputs(batch, policy.config))
    ids, mask = batch[ACTION_TOKENS], batch[ACTION_TOKEN_MASK].bool()
    assert (~mask).any() and mask.any()  # the batch has padding slots, so skipping them is exercised
    hidden, _, loss, acc = model.next_token_ce(prefix_embs, prefix_pad, ids, mask)
    # Reference: logits on every slot (slot j predicted from position j-1, slot 0 from the last prompt
    # token), CE averaged over the valid ones.
    n_prefix = prefix_pad.shape[1]
    last = n_prefix - 1 - prefix_pad.flip(-1).int().argmax(-1)
    rows = []
    for b in range(ids.shape[0]):
        idx = torch.cat([last[b : b + 1], n_prefix + torch.arange(ids.shape[1] - 1)])
        rows.append(model.paligemma_with_expert.lm_logits(hidden[b, idx][None])[0])
    logits = torch.stack(rows)  # (B, L, V)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
    ref_loss = (ce.view_as(mask) * mask).sum() / mask.sum()
    ref_acc = ((logits.argmax(-1) == ids) & mask).sum() / mask.sum()
    assert torch.allclose(loss, ref_loss, rtol=1e-5) and loss > 0
    assert torch.allclose(acc, ref_acc)
