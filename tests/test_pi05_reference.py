"""ki_vla against a pi05 that LeRobot builds itself: the same weights and noise give the same action chunk.

The other equivalence tests call pi05's functions on our model; this one runs LeRobot's whole `PI05Policy`
(its towers, attention masks, adaRMS time conditioning, image preprocessing and Euler loop) as the
reference. LeRobot's pi05 builds only at PaliGemma's sizes: after making its PaliGemma config it sets the
vocabulary to 257152 rows, SigLIP's MLP to 4304 and the vision projection to 2048 (a 527M-row embedding
alone is 2 GB). To fit a CPU test, that config is pinned to the tiny sizes (`_pin`: those assignments keep
the tiny values) and `get_gemma_config` returns the tiny backbone and expert; nothing else is replaced.
(`benchmarks/pi05_equivalence.py` does the same at the real widths, ~12 GB.)
"""

from __future__ import annotations

import torch
from lerobot.policies.pi05 import modeling_pi05
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE
from tiny_setup import CAMERAS, STATE_DIM, tiny_config
from transformers import PaliGemmaConfig
from transformers.models.auto import CONFIG_MAPPING

from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.variants import TINY_BACKBONE, TINY_EXPERT, TINY_SIGLIP
from lerobot_ki.weights import EMBED, FAST_PLACEMENT, WHY_EXPERT_LM_HEAD, pi05_to_ki_state_dict

BATCH, PROMPT = 2, 12


def _pin(config, **values):
    """`config` with `values` set and kept: later assignments to those fields are ignored."""

    class Pinned(type(config)):
        def __setattr__(self, name, value):
            super().__setattr__(name, values.get(name, value))

    # transformers' Auto classes look a config up by its class name: keep it.
    Pinned.__name__ = Pinned.__qualname__ = type(config).__name__
    config.__class__ = Pinned
    for name, value in values.items():
        setattr(config, name, value)
    return config


def _tiny_pi05_config_mapping(vocab_rows: int) -> dict:
    def paligemma() -> PaliGemmaConfig:
        s = TINY_SIGLIP
        cfg = PaliGemmaConfig(
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": s.hidden_size,
                "num_hidden_layers": s.num_layers,
                "num_attention_heads": s.num_heads,
                "patch_size": s.patch_size,
                "vision_use_head": False,  # as PaliGemma's own default vision config
            }
        )
        _pin(cfg.text_config, vocab_size=vocab_rows)
        _pin(cfg.vision_config, intermediate_size=s.intermediate_size, projection_dim=TINY_BACKBONE.width)
        return cfg

    return {"paligemma": paligemma, "gemma": CONFIG_MAPPING["gemma"]}


def _tiny_gemma(variant: str):
    size = {"gemma_2b": TINY_BACKBONE, "gemma_300m": TINY_EXPERT}[variant]
    return modeling_pi05.GemmaConfig(**vars(size))


def _batch(ki_cfg, vocab_rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_rows, (BATCH, PROMPT), generator=g)
    mask = torch.ones(BATCH, PROMPT, dtype=torch.bool)
    ids[:, 0], ids[1, 8:], mask[1, 8:] = 2, 0, False  # <bos>; the second prompt is right-padded
    res = ki_cfg.image_resolution
    batch = {cam: torch.rand(BATCH, 3, *res, generator=g) for cam in CAMERAS}
    batch |= {
        OBS_STATE: torch.rand(BATCH, STATE_DIM, generator=g),
        OBS_LANGUAGE_TOKENS: ids,
        OBS_LANGUAGE_ATTENTION_MASK: mask,
    }
    return batch


def test_pi05_built_by_lerobot_and_ki_vla_sample_the_same_actions(monkeypatch):
    ki_cfg = tiny_config()
    torch.manual_seed(0)
    ki = KIPolicy(ki_cfg).eval()
    vocab_rows = ki.state_dict()[EMBED].shape[0]

    monkeypatch.setattr(modeling_pi05, "get_gemma_config", _tiny_gemma)
    monkeypatch.setattr(modeling_pi05, "CONFIG_MAPPING", _tiny_pi05_config_mapping(vocab_rows))
    pcfg = PI05Config(
        chunk_size=ki_cfg.chunk_size,
        n_action_steps=ki_cfg.n_action_steps,
        max_state_dim=ki_cfg.max_state_dim,
        max_action_dim=ki_cfg.max_action_dim,
        image_resolution=tuple(ki_cfg.image_resolution),
        dtype="float32",
        device="cpu",
    )
    pcfg.input_features, pcfg.output_features = ki_cfg.input_features, ki_cfg.output_features
    torch.manual_seed(1)
    pi05 = modeling_pi05.PI05Policy(pcfg).eval()
    # Every weight random (norms and adaRMS included), so that none is an identity hiding a wrong path.
    with torch.no_grad():
        for p in pi05.parameters():
            p.normal_(0, 0.05)

    mapped, report = pi05_to_ki_state_dict(pi05.state_dict(), ki, ki.config)
    assert set(mapped) == set(ki.state_dict()) - {FAST_PLACEMENT}  # every ki_vla tensor comes from pi05
    assert list(report.dropped.values()) == [WHY_EXPERT_LM_HEAD]
    ki.load_state_dict(mapped, strict=False)

    batch = _batch(ki_cfg, vocab_rows, seed=2)
    noise = torch.randn(
        BATCH, ki_cfg.chunk_size, ki_cfg.max_action_dim, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        theirs = pi05.predict_action_chunk(batch, noise=noise.clone())
        ours = ki.predict_action_chunk(batch, noise=noise.clone())
        other = pi05.predict_action_chunk(_batch(ki_cfg, vocab_rows, seed=4), noise=noise.clone())

    assert theirs.shape == ours.shape == (BATCH, ki_cfg.chunk_size, ki_cfg.output_features["action"].shape[0])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # The observation matters (else equal actions would prove little), and the two rows differ too.
    assert (theirs - other).abs().max() > 1e-3 and (theirs[0] - theirs[1]).abs().max() > 1e-3
