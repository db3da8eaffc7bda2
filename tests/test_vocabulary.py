"""Where FAST ids sit in the backbone vocabulary: clear of PaliGemma's <loc>/<seg> tokens, the same map
both ways, and checkpoints that keep the placement they were trained with."""

from __future__ import annotations

import pytest
import torch
from tiny_setup import tiny_config

from lerobot_ki.configuration_ki import PALIGEMMA_TOKENIZER
from lerobot_ki.modeling_ki import KIPolicy
from lerobot_ki.processor_ki import KIFastTokenizerStep
from lerobot_ki.vla_model import PLACEMENT_KEY
from lerobot_ki.vocabulary import (
    PALIGEMMA_LOC_IDS,
    PALIGEMMA_SEG_IDS,
    PALIGEMMA_VOCAB_SIZE,
    layout_with_placement,
    vocab_layout,
)


@pytest.mark.parametrize("fast_vocab_size", [256, 1024, 2048])
def test_paligemma_fast_ids_never_take_loc_or_seg_tokens(fast_vocab_size):
    layout = vocab_layout(PALIGEMMA_TOKENIZER, fast_vocab_size)
    lm = set(layout.fast_to_lm(list(range(fast_vocab_size))))
    assert len(lm) == fast_vocab_size and max(lm) < PALIGEMMA_VOCAB_SIZE
    assert not lm & set(PALIGEMMA_LOC_IDS) and not lm & set(PALIGEMMA_SEG_IDS)
    assert layout.fast_to_lm([0]) == [PALIGEMMA_LOC_IDS.start - 1]  # right below <loc0000> (pi0.5)
    assert not lm & {layout.pad_id, layout.bos_id, layout.eos_id}
    lo, hi = layout.fast_lm_range()
    assert set(range(lo, hi)) == lm
    # The legacy placement did collide: that is what moved.
    legacy = vocab_layout(PALIGEMMA_TOKENIZER, fast_vocab_size, legacy=True)
    assert legacy.fast_to_lm([0]) == [PALIGEMMA_LOC_IDS.stop - 1]


@pytest.mark.parametrize("name", ["byte", PALIGEMMA_TOKENIZER])
def test_fast_to_lm_and_back_are_inverse(name):
    layout = vocab_layout(name, 1024)
    fast = torch.arange(1024)
    lm = torch.tensor(layout.fast_to_lm(fast.tolist()))
    assert torch.equal(layout.lm_to_fast(lm), fast)
    lo, hi = layout.fast_lm_range()
    outside = torch.tensor([layout.eos_id, layout.pad_id, layout.bos_id, lo - 1, hi])
    assert (layout.lm_to_fast(outside) == -1).all()


def test_byte_layout_is_unchanged():
    layout = vocab_layout("byte", 1024)
    assert layout.fast_to_lm([0, 7]) == [260, 267] and layout.vocab_size == 260 + 1024
    assert (layout.pad_id, layout.bos_id, layout.eos_id) == (0, 1, 2)


def test_processor_fast_step_writes_the_layouts_ids():
    layout = vocab_layout(PALIGEMMA_TOKENIZER, 1024)
    step = KIFastTokenizerStep.for_layout(layout, max_fast_tokens=8)
    assert step.get_config() | {"fast_offset": 0} == {
        "max_fast_tokens": 8,
        "overflow": "error",
        "fast_offset": 0,
        "fast_sign": -1,
        "eos_id": 1,
        "pad_id": 0,
    }
    assert step.get_config()["fast_offset"] == layout.fast_offset == PALIGEMMA_LOC_IDS.start - 1


def test_checkpoints_keep_their_placement_and_unknown_ones_are_refused():
    policy = KIPolicy(tiny_config())
    assert policy.model.layout == vocab_layout("byte", policy.config.fast_vocab_size)
    assert policy.state_dict()["model." + PLACEMENT_KEY].tolist() == [260, 1]
    # A PaliGemma-vocabulary checkpoint from before the move records no placement: it reloads with the
    # legacy one, so its FAST ids mean what they meant in training.
    policy = KIPolicy(tiny_config(text_tokenizer=PALIGEMMA_TOKENIZER, fast_vocab_size=1024))
    pali = vocab_layout(PALIGEMMA_TOKENIZER, 1024)
    legacy = vocab_layout(PALIGEMMA_TOKENIZER, 1024, legacy=True)
    assert policy.model.layout == pali
    old = policy.state_dict()
    old.pop("model." + PLACEMENT_KEY)
    policy.load_state_dict(old)
    assert policy.model.layout == legacy
    assert layout_with_placement(pali, legacy.placement) == legacy
    with pytest.raises(ValueError, match="no ki_vla version wrote"):
        layout_with_placement(pali, (1234, 1))
    with pytest.raises(ValueError, match="no ki_vla version wrote"):
        layout_with_placement(vocab_layout("byte", 256), legacy.placement)
