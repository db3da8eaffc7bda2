"""Start `ki_vla` from real weights: a LeRobot `pi05` checkpoint (backbone + expert + projections) or a
transformers PaliGemma checkpoint (the backbone alone).

ki_vla keeps pi05's module tree, so loading is mostly a matter of names. Each loader first makes a *plan*
from names and shapes only (our key -> checkpoint key), checks it completely (every checkpoint tensor is
either placed or dropped for a stated reason, every one of ours is either filled or new for a stated
reason, every shape agrees), and only then copies tensors, one at a time, from lazily opened safetensors
files: a 3B checkpoint is never held in memory next to the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lerobot_ki.configuration_ki import PALIGEMMA_TOKENIZER, KIConfig
from lerobot_ki.variants import VISION_VARIANTS
from lerobot_ki.vla_model import PLACEMENT_KEY
from lerobot_ki.vlm_cotraining import STATE_KEY
from lerobot_ki.vocabulary import PALIGEMMA_VOCAB_SIZE, vocab_layout

logger = logging.getLogger(__name__)

PI05_TYPE = "pi05"
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
# Rows a transformers PaliGemma checkpoint may hold after its text vocabulary (<image> + padding to 64).
VOCAB_PADDING = 64

PALIGEMMA = "model.paligemma_with_expert.paligemma."
EXPERT = "model.paligemma_with_expert.gemma_expert."
EMBED = PALIGEMMA + "model.language_model.embed_tokens.weight"
LM_HEAD = PALIGEMMA + "lm_head.weight"
# pi05's top-level modules besides the two towers; their old openpi names are renamed on the way in.
PI05_HEADS = ("action_in_proj.", "action_out_proj.", "time_mlp_in.", "time_mlp_out.", "state_proj.")
LEGACY_RENAMES = {"action_time_mlp_in.": "time_mlp_in.", "action_time_mlp_out.": "time_mlp_out."}
# pi05 config.json fields not carried into a KIConfig: the Hub identity and provenance of the pi05 run do
# not describe the new ki_vla policy.
PI05_NOT_CARRIED = frozenset(
    ("type", "pretrained_path", "repo_id", "push_to_hub", "private", "tags", "license", "use_peft")
)

# Reasons, shared by the report and the tests.
WHY_EXPERT_LM_HEAD = "the action expert writes no logits: ki_vla has no expert LM head (263M at full size)"
WHY_EXPERT_EMBED = "the action expert reads no tokens: ki_vla has no expert token embedding"
WHY_PLAIN_EXPERT_NORM = (
    "plain RMSNorm scale of a non-adaptive expert: ki_vla's expert norms are adaRMS (`dense`), as pi05's"
)
WHY_PI0_STATE_PROJ = (
    "pi0's state projection into the expert: pi05/ki_vla write the state into the prompt (ki_vla's "
    "continuous state token projects into the backbone, a different map)"
)
WHY_SIGLIP_HEAD = "SigLIP's attention-pooling head: PaliGemma feeds every patch token, the head is unused"
FAST_PLACEMENT = "model." + PLACEMENT_KEY
WHY_FAST_PLACEMENT = (
    "FAST ids take this version's place in the vocabulary (below PaliGemma's <loc> tokens; after the "
    "byte tokenizer's ids)"
)
VLM_STATE = STATE_KEY
WHY_VLM_STATE = "VLM co-training counters start at zero"
WHY_STATE_PROJ = "ki_vla's continuous state token (state_mode=continuous): pi05 writes the state as text"
WHY_NOT_PALIGEMMA = "not part of PaliGemma: the action expert, its projections and time MLP start fresh"


class HubUnavailableError(OSError):
    """A Hub download failed; the message is one line saying what to download and what to pass instead."""


@dataclass
class WeightReport:
    """What a checkpoint import did, key by key."""

    source: str
    mapped: dict[str, str] = field(default_factory=dict)  # our key -> checkpoint key
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint key -> our key, legacy name translated
    dropped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it is not loaded
    new: dict[str, str] = field(default_factory=dict)  # our key -> why it keeps its initialisation
    notes: list[str] = field(default_factory=list)  # ties and vocabulary trims, in words

    def summary(self) -> str:
        lines = [
            f"Weights from {self.source}: {len(self.mapped)} tensors loaded "
            f"({len(self.renamed)} from legacy names), {len(self.dropped)} dropped, {len(self.new)} new."
        ]
        for what, reasons in (("dropped", self.dropped), ("new", self.new)):
            for reason, count in Counter(reasons.values()).items():
                lines.append(f"  {what} x{count}: {reason}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Take:
    key: str  # checkpoint key
    rows: int | None = None  # keep only the first `rows` rows (vocabulary padding)


Shapes = Mapping[str, tuple[int, ...]]


# --- key names -------------------------------------------------------------------------------------------
def hf_paligemma_key(key: str) -> str:
    """A transformers PaliGemmaForConditionalGeneration key in its in-memory layout (transformers 5.x
    `state_dict()`: `model.vision_tower...`, `model.multi_modal_projector...`, `model.language_model...`,
    `lm_head.weight`) from any of the three layouts checkpoints come in: that one; the Hub's original
    one (`vision_tower...`, `language_model.model...`, `language_model.lm_head...`); and what transformers
    5.x `save_pretrained` writes (`model.language_model.model...`: it re-applies the old LM nesting)."""
    body = key.removeprefix("model.")
    if body.startswith("language_model.lm_head."):
        return body.removeprefix("language_model.")
    if body.startswith("language_model.model."):
        body = "language_model." + body.removeprefix("language_model.model.")
    if body.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")):
        return "model." + body
    return key


def pi05_key(key: str) -> tuple[str, bool]:
    """Our key for a pi05 checkpoint key (with or without LeRobot's `model.` prefix), and whether a legacy
    name was translated: openpi's `action_time_mlp_*`, the pre-4.52 PaliGemma layout inside the backbone."""
    rest = key.removeprefix("model.")
    body = rest if rest.startswith(("paligemma_with_expert.", *PI05_HEADS, *LEGACY_RENAMES)) else key
    canonical = body
    for old, new in LEGACY_RENAMES.items():
        if body.startswith(old):
            canonical = new + body.removeprefix(old)
    tower = "paligemma_with_expert.paligemma."
    if canonical.startswith(tower):
        canonical = tower + hf_paligemma_key(canonical.removeprefix(tower))
    return "model." + canonical, canonical != body


def _drop_reason(key: str) -> str | None:
    if key.startswith(EXPERT + "lm_head."):
        return WHY_EXPERT_LM_HEAD
    if key.startswith(EXPERT + "model.embed_tokens."):
        return WHY_EXPERT_EMBED
    if key.startswith(EXPERT) and key.endswith(("layernorm.weight", "model.norm.weight")):
        return WHY_PLAIN_EXPERT_NORM
    if key.startswith("model.state_proj."):
        return WHY_PI0_STATE_PROJ
    if key.startswith(PALIGEMMA + "model.vision_tower.vision_model.head."):
        return WHY_SIGLIP_HEAD
    return None


# What ki_vla adds to any imported checkpoint: the FAST tokenizer and where its ids sit.
KI_ONLY = {FAST_PLACEMENT: WHY_FAST_PLACEMENT}


def _pi05_new_reason(key: str) -> str | None:
    if key in KI_ONLY:
        return KI_ONLY[key]
    if key == VLM_STATE:
        return WHY_VLM_STATE
    if key.startswith("model.state_proj."):
        return WHY_STATE_PROJ
    return None


def _paligemma_new_reason(key: str) -> str | None:
    if key in KI_ONLY:
        return KI_ONLY[key]
    if not key.startswith(PALIGEMMA):
        return WHY_NOT_PALIGEMMA
    return None


# --- plans -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointKind:
    """What differs between the checkpoints ki_vla imports: their key names and what they lack."""

    name: str
    to_ours: Callable[[str], tuple[str, bool]]  # checkpoint key -> (our key, legacy name translated)
    new_reason: Callable[[str], str | None]  # why one of our tensors is not in such a checkpoint
    hub_first: str  # the file layout tried first on the Hub


def _plan(
    kind: CheckpointKind, shapes: Shapes, module: nn.Module, config: KIConfig, source: str
) -> tuple[dict[str, _Take], WeightReport]:
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    report = WeightReport(source=source)
    plan: dict[str, _Take] = {}
    for ckpt_key in sorted(shapes):
        key, legacy = kind.to_ours(ckpt_key)
        reason = _drop_reason(key)
        if reason is not None:
            report.dropped[ckpt_key] = reason
            continue
        if key in plan:
            raise ValueError(f"{source}: both {plan[key].key!r} and {ckpt_key!r} would load into {key!r}.")
        plan[key] = _Take(ckpt_key)
        if legacy:
            report.renamed[ckpt_key] = key
    _tie_embeddings(plan, report)
    report.new = {k: r for k in ours if k not in plan and (r := kind.new_reason(k)) is not None}
    _check(plan, shapes, ours, report, config)
    report.mapped = {k: take.key for k, take in plan.items()}
    return plan, report


def _tie_embeddings(plan: dict[str, _Take], report: WeightReport) -> None:
    """PaliGemma ties its LM head to the token embedding, so checkpoints often store only one of them
    (pi05_base: the head; transformers: the embedding). ki_vla holds both: fill the absent one."""
    if EMBED in plan and LM_HEAD not in plan:
        plan[LM_HEAD] = plan[EMBED]
        report.notes.append("lm_head.weight filled from the tied token embedding")
    elif LM_HEAD in plan and EMBED not in plan:
        plan[EMBED] = plan[LM_HEAD]
        report.notes.append("embed_tokens.weight filled from the tied lm_head")


def _check(
    plan: dict[str, _Take], shapes: Shapes, ours: Shapes, report: WeightReport, config: KIConfig
) -> None:
    problems: list[str] = []
    unexpected = sorted(k for k in plan if k not in ours)
    if unexpected:
        problems.append(
            f"{len(unexpected)} checkpoint tensor(s) have no place in this ki_vla "
            f"(a different --policy.paligemma_variant / --policy.action_expert_variant?): "
            f"{_few([plan[k].key for k in unexpected])}"
        )
    missing = sorted(k for k in ours if k not in plan and k not in report.new)
    if missing:
        problems.append(
            f"{len(missing)} ki_vla tensor(s) are missing from the checkpoint "
            f"(a different --policy.paligemma_variant / --policy.action_expert_variant?): {_few(missing)}"
        )
    for key in sorted(set(plan) & set(ours)):
        theirs, mine = tuple(shapes[plan[key].key]), tuple(ours[key])
        if theirs == mine:
            continue
        text_rows = vocab_layout(config.text_tokenizer, config.fast_vocab_size).text_vocab_size
        if key in (EMBED, LM_HEAD) and theirs[1:] == mine[1:] and 0 <= theirs[0] - text_rows <= VOCAB_PADDING:
            # transformers' PaliGemma appends an <image> token after the text vocabulary and pads it to a
            # multiple of 64 (257216 rows); the tokenizer never emits those ids and ki_vla embeds images
            # directly. The byte layout appends its FAST ids after the text ids: those rows are new.
            plan[key] = _Take(plan[key].key, rows=text_rows)
            name = key.removeprefix(PALIGEMMA)
            if theirs[0] > text_rows:
                report.notes.append(f"{name}: checkpoint rows {text_rows}..{theirs[0] - 1} dropped")
            if mine[0] > text_rows:
                report.notes.append(f"{name}: rows {text_rows}..{mine[0] - 1} (FAST ids) keep their init")
            continue
        hint = _shape_hint(key, theirs, mine, config)
        problems.append(f"{key}: checkpoint {theirs} vs ki_vla {mine} -> {hint}")
    if problems:
        raise ValueError(f"Cannot load {report.source} into ki_vla:\n  " + "\n  ".join(problems))


def _shape_hint(key: str, theirs: tuple[int, ...], mine: tuple[int, ...], config: KIConfig) -> str:
    """The flag that makes ki_vla's tensor the checkpoint's shape."""
    if key == "model.action_in_proj.weight" and theirs[1] != mine[1]:
        return f"pass --policy.max_action_dim={theirs[1]}"
    if key.startswith("model.action_out_proj.") and theirs[0] != mine[0]:
        return f"pass --policy.max_action_dim={theirs[0]}"
    if key.endswith("position_embedding.weight"):
        side = math.isqrt(theirs[0]) * VISION_VARIANTS[config.paligemma_variant].patch_size
        return f"pass --policy.image_resolution=[{side},{side}]"
    if key in (EMBED, LM_HEAD) and theirs[0] >= PALIGEMMA_VOCAB_SIZE:
        return (
            "the checkpoint has the PaliGemma vocabulary: leave --policy.text_tokenizer unset (or a Gemma "
            "tokenizer dir), not `byte`"
        )
    if key in (EMBED, LM_HEAD):
        return (
            f"the checkpoint has a {theirs[0]}-row vocabulary, not PaliGemma's: a backbone of the byte "
            "tokenizer (260 text ids + <image>) needs --policy.text_tokenizer=byte"
        )
    if key.startswith((EXPERT, "model.action_", "model.time_mlp_")):
        return "a different --policy.action_expert_variant"
    return "a different --policy.paligemma_variant"


def _few(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def _materialize(
    plan: dict[str, _Take], get: Callable[[str], Tensor], module: nn.Module
) -> dict[str, Tensor]:
    """The planned tensors; a partial-vocabulary one is completed with the module's own remaining rows."""
    ours = module.state_dict()
    out = {}
    for k, take in plan.items():
        value = get(take.key)
        if take.rows is not None:
            value = torch.cat([value[: take.rows], ours[k][take.rows :].to(value.dtype)])
        out[k] = value
    return out


@torch.no_grad()
def _copy_into(module: nn.Module, plan: dict[str, _Take], get: Callable[[str], Tensor]) -> None:
    """Copy tensor by tensor (cast to each parameter's dtype/device), so peak memory is one tensor."""
    targets = module.state_dict(keep_vars=True)
    for key, take in plan.items():
        value = get(take.key)
        if take.rows is None:
            targets[key].copy_(value)
        else:  # the leading (text) rows of a vocabulary-sized tensor
            targets[key][: take.rows].copy_(value[: take.rows])


# --- the importer -----------------------------------------------------------------------------------------
def _paligemma_to_ours(key: str) -> tuple[str, bool]:
    current = hf_paligemma_key(key)
    return PALIGEMMA + current, current != key


PI05 = CheckpointKind("pi05", pi05_key, _pi05_new_reason, hub_first=SINGLE_FILE)
PALIGEMMA_HF = CheckpointKind("PaliGemma", _paligemma_to_ours, _paligemma_new_reason, hub_first=SHARD_INDEX)


def import_state_dict(
    kind: CheckpointKind, state_dict: Mapping[str, Tensor], module: nn.Module, config: KIConfig
) -> tuple[dict[str, Tensor], WeightReport]:
    """A checkpoint's state dict -> the part of `module`'s (a KIPolicy) that it fills, plus the report.
    Shape mismatches raise, naming the flag to set."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    plan, report = _plan(kind, shapes, module, config, f"a {kind.name} state dict")
    return _materialize(plan, state_dict.__getitem__, module), report


def load_checkpoint(
    kind: CheckpointKind, module: nn.Module, config: KIConfig, source: str | Path, revision: str | None = None
) -> WeightReport:
    """Load a checkpoint (local dir, or a Hub id) into `module`, tensor by tensor from its safetensors."""
    reader = _SafetensorsReader(_checkpoint_files(source, revision, first=kind.hub_first))
    plan, report = _plan(kind, reader.shapes(), module, config, str(source))
    _copy_into(module, plan, reader.tensor)
    return report


def pi05_to_ki_state_dict(
    pi05_sd: Mapping[str, Tensor], module: nn.Module, config: KIConfig
) -> tuple[dict[str, Tensor], WeightReport]:
    """A LeRobot pi05 state dict (as PI05Policy saves it, with or without the `model.` prefix, openpi's
    legacy names tolerated) -> ki_vla's state dict, plus the report."""
    return import_state_dict(PI05, pi05_sd, module, config)


def paligemma_to_ki_state_dict(
    hf_sd: Mapping[str, Tensor], module: nn.Module, config: KIConfig
) -> tuple[dict[str, Tensor], WeightReport]:
    """A transformers PaliGemmaForConditionalGeneration state dict (any key layout) -> the backbone part of
    ki_vla's state dict; the expert and projections are reported as new."""
    return import_state_dict(PALIGEMMA_HF, hf_sd, module, config)


def load_pi05_weights(
    module: nn.Module, config: KIConfig, source: str | Path, revision: str | None = None
) -> WeightReport:
    """A pi05 checkpoint (local dir, or a Hub id such as `lerobot/pi05_base`) into `module`."""
    return load_checkpoint(PI05, module, config, source, revision)


def load_paligemma_backbone(
    module: nn.Module, config: KIConfig, source: str | Path, revision: str | None = None
) -> WeightReport:
    """`google/paligemma-3b-pt-224` (the transformers checkpoint, sharded or not: local dir or Hub id) into
    the backbone of `module`; the expert keeps its fresh initialisation."""
    return load_checkpoint(PALIGEMMA_HF, module, config, source, revision)


def ki_config_from_pi05(path_or_repo_id: str | Path, revision: str | None = None) -> KIConfig:
    """A KIConfig carrying every setting a pi05 config.json shares with it (variants, chunk_size, max
    dims, image_resolution, dtype, features, normalization, optimizer...); KI's own knobs at defaults."""
    import draccus

    raw = json.loads(Path(checkpoint_file(path_or_repo_id, "config.json", revision)).read_text())
    if raw.get("type") != PI05_TYPE:
        raise ValueError(f"{path_or_repo_id} holds a {raw.get('type')!r} config, not a pi05 one.")
    names = {f.name for f in dataclasses.fields(KIConfig) if f.init} - PI05_NOT_CARRIED
    carried = {k: v for k, v in raw.items() if k in names}
    ignored = sorted(set(raw) - set(carried) - PI05_NOT_CARRIED)
    if ignored:
        logger.info("pi05 settings with no ki_vla counterpart, not carried over: %s", ", ".join(ignored))
    if raw.get("use_relative_actions"):
        logger.warning("The pi05 checkpoint was trained on relative actions; ki_vla uses absolute ones.")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "config.json"
        cfg_file.write_text(json.dumps(carried))
        with draccus.config_type("json"):
            return draccus.parse(KIConfig, str(cfg_file), args=[])


# --- files -----------------------------------------------------------------------------------------------
class _SafetensorsReader:
    """Tensors by name across safetensors files, read one at a time (nothing is loaded up front)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            self._where.update(dict.fromkeys(handle.keys(), handle))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(h.get_slice(k).get_shape()) for k, h in self._where.items()}

    def tensor(self, key: str) -> Tensor:
        return self._where[key].get_tensor(key)


def is_local_source(path_or_repo_id: str | Path) -> bool:
    """A path that exists, or anything huggingface_hub would not take for a repo id (it decides)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(path_or_repo_id)
    if Path(text).expanduser().exists() or text.startswith(("/", ".", "~")):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def _checkpoint_files(path_or_repo_id: str | Path, revision: str | None, first: str) -> list[Path]:
    """The safetensors files of a checkpoint: one `model.safetensors`, or the shards its index names.
    `first` is the layout tried first on the Hub (pi05: a single file; PaliGemma: shards)."""
    if is_local_source(path_or_repo_id):
        path = Path(path_or_repo_id).expanduser()
        if path.is_file():
            return [path]
        if (path / SHARD_INDEX).is_file():
            return [path / name for name in _shard_names(path / SHARD_INDEX)]
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        raise FileNotFoundError(f"No {SINGLE_FILE} or {SHARD_INDEX} in {path}.")
    order = [first] + [name for name in (SINGLE_FILE, SHARD_INDEX) if name != first]
    for name in order:
        found = checkpoint_file(path_or_repo_id, name, revision, optional=True)
        if found is None:
            continue
        if name == SINGLE_FILE:
            return [Path(found)]
        return [Path(checkpoint_file(path_or_repo_id, s, revision)) for s in _shard_names(Path(found))]
    raise FileNotFoundError(f"The Hub repo {path_or_repo_id} has neither {SINGLE_FILE} nor {SHARD_INDEX}.")


def is_pi05_checkpoint(source: str | Path, revision: str | None = None, ours: str = "ki_vla") -> bool:
    """Whether `source` holds a pi05 checkpoint (to start from) rather than one of `ours` (to reload),
    from the `type` in its config.json (local dir or Hub); any other policy type is an error saying what
    to do. An unreachable Hub is one clear line here rather than a confusing error later."""
    cfg_file = checkpoint_file(source, "config.json", revision, optional=True)
    saved = None if cfg_file is None else json.loads(Path(cfg_file).read_text()).get("type")
    if saved is not None and saved not in (ours, PI05_TYPE):
        raise ValueError(
            f"{source} holds a '{saved}' policy, not '{ours}'. Load it with "
            f"--policy.type={saved} / --policy.path. ki_vla starts from pi05 checkpoints "
            "(--policy.pretrained_path) or PaliGemma (--policy.paligemma_pretrained_path): README, "
            "'Starting from real weights'."
        )
    return saved == PI05_TYPE


def _shard_names(index: Path) -> list[str]:
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def checkpoint_file(
    path_or_repo_id: str | Path, filename: str, revision: str | None, optional: bool = False
) -> str | None:
    """A file of a local dir or a Hub repo. A Hub that cannot be reached is one clear line."""
    if is_local_source(path_or_repo_id):
        path = Path(path_or_repo_id).expanduser() / filename
        if path.is_file():
            return str(path)
        if optional:
            return None
        raise FileNotFoundError(f"{path} does not exist.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError

    repo_id = str(path_or_repo_id)
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except RemoteEntryNotFoundError:
        if optional:
            return None
        raise
    except Exception as e:
        gated = (
            " (gated: accept its license on huggingface.co and `hf auth login` first)"
            if isinstance(e, GatedRepoError) or repo_id == PALIGEMMA_TOKENIZER
            else ""
        )
        raise HubUnavailableError(
            f"Cannot fetch {filename} of '{repo_id}' from the Hugging Face Hub ({type(e).__name__}"
            f"{', HF_HUB_OFFLINE=1' if os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', '') else ''}): "
            f"download it where the Hub is reachable with `hf download {repo_id} --local-dir DIR`{gated}, "
            f"then pass DIR instead of '{repo_id}'."
        ) from e
