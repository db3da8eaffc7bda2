"""Text tokenizers of the backbone, one interface for two kinds (a `tokenizers.Tokenizer` underneath,
serialisable to a string so it travels in the processor's saved state):

- `byte`: built offline from code: ids 0-3 are <pad> <bos> <eos> <unk>, 4-259 the 256 bytes;
- a Gemma/PaliGemma `tokenizer.json` (`google/paligemma-3b-pt-224` or a local copy).

Where FAST tokens and the special ids sit in each vocabulary is `vocabulary.py`'s business.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from lerobot_ki.configuration_ki import BYTE_TOKENIZER
from lerobot_ki.vocabulary import BYTE_SPECIALS, VocabLayout, vocab_layout


def build_byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer with no merges: every UTF-8 byte is one token, <bos> is prepended."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for raw bytes
    byte_chars = sorted(alphabet, key=_byte_value)
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    vocab.update({ch: len(BYTE_SPECIALS) + i for i, ch in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(list(BYTE_SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return tok


def _byte_value(ch: str) -> int:
    """Inverse of the GPT-2 byte->unicode map used by ByteLevel, so ids follow byte order."""
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


class TextTokenizer:
    """Prompt tokenization for one backbone vocabulary."""

    def __init__(self, tokenizer: Tokenizer, layout: VocabLayout):
        self.tokenizer = tokenizer
        self.layout = layout
        for token, expected in (("<pad>", layout.pad_id), ("<bos>", layout.bos_id), ("<eos>", layout.eos_id)):
            found = tokenizer.token_to_id(token)
            if found != expected:
                raise ValueError(
                    f"The text tokenizer maps {token} to {found}, but this backbone expects {expected}: "
                    "use a Gemma/PaliGemma tokenizer or `byte`."
                )

    # --- prompts ------------------------------------------------------------------------------------
    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (B, max_length) and their mask; a prompt that does not fit is an error."""
        ids = torch.full((len(texts), max_length), self.layout.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.bool)
        for i, enc in enumerate(self.tokenizer.encode_batch(texts)):
            if len(enc.ids) > max_length:
                need = len(enc.ids)
                # A saved preprocessor keeps its own max_length (the config's flag no longer reaches it),
                # so name both ways of raising it, and the one that needs no change at all.
                raise ValueError(
                    f"The prompt needs {need} tokens but the text tokenizer's max_length is {max_length} "
                    f"(prompt: {texts[i][:120]!r}). Shorten the task, or raise the limit: when training, "
                    f"--policy.tokenizer_max_length={need} (or more); with a saved checkpoint, the "
                    f"`max_length` of its preprocessor's `ki_vla_text_tokenizer` step, e.g. "
                    f"make_pre_post_processors(..., preprocessor_overrides={{'ki_vla_text_tokenizer': "
                    f"{{'max_length': {need}}}}}) or in policy_preprocessor.json."
                )
            ids[i, : len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
            mask[i, : len(enc.ids)] = True
        return ids, mask

    def encode_text(self, text: str, bos: bool) -> list[int]:
        """Ids of one text; `bos` adds the tokenizer's template (<bos> first), as prompts have it."""
        return self.tokenizer.encode(text, add_special_tokens=bos).ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens (<eos>, <pad>) left out."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- persistence ------------------------------------------------------------------------------
    def to_str(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, serialized: str, layout: VocabLayout) -> TextTokenizer:
        return cls(Tokenizer.from_str(serialized), layout)


def load_text_tokenizer(name: str, fast_vocab_size: int) -> TextTokenizer:
    """`byte`, a local directory/file holding a `tokenizer.json`, or a Hub id of a Gemma tokenizer."""
    layout = vocab_layout(name, fast_vocab_size)
    if name == BYTE_TOKENIZER:
        return TextTokenizer(build_byte_tokenizer(), layout)
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name, "tokenizer.json"))
        except Exception as e:
            raise OSError(
                f"Could not load the text tokenizer {name!r} ({type(e).__name__}). With no Hub access, "
                f"download it elsewhere (`hf download {name} tokenizer.json --local-dir DIR`), copy DIR "
                f"here and pass --policy.text_tokenizer=DIR. "
                f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}"
            ) from e
    return TextTokenizer(Tokenizer.from_file(str(path)), layout)
