"""Save a ki_vla backbone as a transformers PaliGemma checkpoint, the layout `google/paligemma-3b-pt-224`
has, so that `--policy.paligemma_pretrained_path=<dir>` starts a policy from it exactly as from the real
PaliGemma (and `transformers.PaliGemmaForConditionalGeneration.from_pretrained(<dir>)` opens it).

What is written: `config.json` + `model.safetensors` (`save_pretrained` of a plain
`PaliGemmaForConditionalGeneration`), and `tokenizer.json` of the backbone's text tokenizer. The vocabulary
holds the tokenizer's text ids plus one `<image>` id after them, as PaliGemma appends `<image>` after
its text vocabulary; ki_vla's FAST rows are not saved (real PaliGemma has none either: FAST ids are
placed by the policy that loads it, and rows that are FAST ids there start from their initialisation).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

VOCAB_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def paligemma_config(backbone, text_rows: int, special_ids: dict[str, int]) -> PaliGemmaConfig:
    """A plain transformers config with the sizes of `backbone` (our PaliGemma module) and `text_rows`
    text ids; `<image>` is id `text_rows`. `special_ids`: pad/bos/eos ids of the text tokenizer. The LM
    head is saved untied: ki_vla trains it apart from the token embedding (as pi05 does)."""
    text, vision = backbone.config.text_config, backbone.config.vision_config
    vocab = text_rows + 1
    text_cfg = GemmaConfig(
        vocab_size=vocab,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        hidden_activation=text.hidden_activation,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters=getattr(text, "rope_parameters", None),
        tie_word_embeddings=False,
        **{f"{name}_token_id": i for name, i in special_ids.items()},
    )
    vision_cfg = SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        patch_size=vision.patch_size,
        image_size=vision.image_size,
        projection_dim=vision.projection_dim,
        hidden_act=vision.hidden_act,
        layer_norm_eps=vision.layer_norm_eps,
        vision_use_head=False,  # PaliGemma feeds every patch token; google/paligemma-3b-pt-224 has no head
    )
    cfg = PaliGemmaConfig(
        text_config=text_cfg.to_dict(),
        vision_config=vision_cfg.to_dict(),
        image_token_index=text_rows,
        projection_dim=backbone.config.projection_dim,
        hidden_size=text.hidden_size,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    cfg.text_config.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    return cfg


@torch.no_grad()
def save_as_paligemma(
    backbone, text_rows: int, special_ids: dict[str, int], out_dir: str | Path, tokenizer_json: str | None
) -> Path:
    """Write `backbone` (the policy's `model.paligemma_with_expert.paligemma`) as a PaliGemma checkpoint.
    Rows >= `text_rows` of the embedding / LM head (FAST ids in the byte layout) are not saved; the
    `<image>` row is zero (ki_vla never reads it: it embeds images itself)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: not overwriting a saved checkpoint.")
    model = PaliGemmaForConditionalGeneration(paligemma_config(backbone, text_rows, special_ids))
    ours = {k: v.detach().float().cpu() for k, v in backbone.state_dict().items()}
    for key in VOCAB_KEYS:
        rows = ours[key][:text_rows]
        ours[key] = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # + the <image> row
    theirs = model.state_dict()
    missing = sorted(set(theirs) - set(ours))
    unexpected = sorted(set(ours) - set(theirs))
    mismatched = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f"The backbone does not map onto transformers' PaliGemma: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {mismatched[:5]}"
        )
    model.load_state_dict(ours, strict=True)
    model.save_pretrained(out)
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json)
    return out
