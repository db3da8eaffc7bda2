"""Where FAST action tokens and the special tokens live in the backbone's vocabulary: the one place that maps
FAST ids to LM ids and back.

- `byte` (the tiny preset's tokenizer): ids 0-3 are <pad> <bos> <eos> <unk>, 4-259 the 256 bytes, and FAST
  token t is id `260 + t`. The LM vocabulary is `260 + fast_vocab_size`.
- PaliGemma (257,152 ids): the top 1,152 ids are 1,024 `<loc>` tokens (256000..257023) and 128 `<seg>`
  tokens (257024..257151), which VLM co-training data uses for localisation and segmentation. FAST token t
  is id `257152 - 1 - 1152 - t`: counting down from just below `<loc0000>` (pi0.5's placement).
- `paligemma_legacy`: checkpoints written before that placement put FAST token t at `257152 - 1 - 128 - t`,
  i.e. onto `<loc1023>` downwards. They still load and run with it (`KIPolicy` reads the placement a
  checkpoint records); nothing new is made with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lerobot_ki.configuration_ki import BYTE_TOKENIZER

BYTE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
BYTE_FAST_OFFSET = len(BYTE_SPECIALS) + 256

PALIGEMMA_VOCAB_SIZE = 257_152
PALIGEMMA_LOC_IDS = range(256_000, 257_024)  # <loc0000>..<loc1023>
PALIGEMMA_SEG_IDS = range(257_024, 257_152)  # <seg000>..<seg127>
# FAST ids count down from the id below the first <loc> token.
PALIGEMMA_FAST_TOP = PALIGEMMA_LOC_IDS.start - 1
PALIGEMMA_LEGACY_FAST_TOP = PALIGEMMA_VOCAB_SIZE - 1 - len(PALIGEMMA_SEG_IDS)


@dataclass(frozen=True)
class VocabLayout:
    """FAST token t is LM id `fast_offset + fast_sign * t`. Derived from the config alone (and, for old
    checkpoints, the placement they record), so the model can be sized before any tokenizer file is read."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    fast_offset: int
    fast_sign: int
    fast_vocab_size: int

    def fast_to_lm(self, fast_ids: list[int]) -> list[int]:
        """FAST ids -> LM ids (what the backbone reads and predicts)."""
        return fast_to_lm(fast_ids, self.fast_offset, self.fast_sign)

    def lm_to_fast(self, lm_ids: Tensor) -> Tensor:
        """LM ids -> FAST ids; ids outside the FAST range come back as -1."""
        fast = (lm_ids - self.fast_offset) * self.fast_sign
        return torch.where((fast >= 0) & (fast < self.fast_vocab_size), fast, torch.full_like(fast, -1))

    @property
    def text_vocab_size(self) -> int:
        """Ids of the text tokenizer itself: the byte layout appends its FAST ids after them, PaliGemma's
        places them inside its vocabulary."""
        return self.fast_offset if self.fast_sign == 1 else self.vocab_size

    def fast_lm_range(self) -> tuple[int, int]:
        """[lo, hi) of LM ids that are FAST tokens (decoding keeps to it, or away from it for text)."""
        ends = self.fast_to_lm([0, self.fast_vocab_size - 1])
        return min(ends), max(ends) + 1

    @property
    def placement(self) -> tuple[int, int]:
        """(fast_offset, fast_sign): what a checkpoint records so that it reloads with its own layout."""
        return self.fast_offset, self.fast_sign


def fast_to_lm(fast_ids: list[int], fast_offset: int, fast_sign: int) -> list[int]:
    """The FAST -> LM map, for holders of a placement alone (the processor's FAST step)."""
    return [fast_offset + fast_sign * t for t in fast_ids]


def vocab_layout(text_tokenizer: str, fast_vocab_size: int, legacy: bool = False) -> VocabLayout:
    """The layout for a text tokenizer (`byte`, or any Gemma/PaliGemma tokenizer) and FAST vocabulary.
    `legacy` gives the placement of checkpoints written before FAST ids moved below the <loc> tokens."""
    if text_tokenizer == BYTE_TOKENIZER:
        return VocabLayout(BYTE_FAST_OFFSET + fast_vocab_size, 0, 1, 2, BYTE_FAST_OFFSET, 1, fast_vocab_size)
    # Gemma/PaliGemma: <pad>=0 <eos>=1 <bos>=2.
    top = PALIGEMMA_LEGACY_FAST_TOP if legacy else PALIGEMMA_FAST_TOP
    if fast_vocab_size > PALIGEMMA_VOCAB_SIZE // 2:
        raise ValueError(
            f"fast_vocab_size={fast_vocab_size} does not fit into the PaliGemma vocabulary: "
            f"use --policy.fast_vocab_size <= {PALIGEMMA_VOCAB_SIZE // 2} (1024 is FAST's default)."
        )
    return VocabLayout(PALIGEMMA_VOCAB_SIZE, 0, 2, 1, top, -1, fast_vocab_size)


def layout_with_placement(layout: VocabLayout, placement: tuple[int, int]) -> VocabLayout:
    """`layout` with the FAST placement a checkpoint recorded; only the two placements this package ever
    wrote are accepted."""
    offset, sign = placement
    if placement == layout.placement:
        return layout
    if layout.vocab_size == PALIGEMMA_VOCAB_SIZE and placement == (PALIGEMMA_LEGACY_FAST_TOP, -1):
        return vocab_layout("paligemma", layout.fast_vocab_size, legacy=True)
    raise ValueError(
        f"The checkpoint places FAST token t at LM id {offset} + {sign} * t, which no ki_vla version wrote "
        f"for this tokenizer (expected {layout.fast_offset} + {layout.fast_sign} * t): was it saved with "
        "another --policy.text_tokenizer or --policy.fast_vocab_size?"
    )
