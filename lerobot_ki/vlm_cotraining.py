"""VLM co-training inside an unchanged `lerobot-train`: the policy owns a stream of VLM examples and adds
some to every training step (`VLMCoTraining.loss`); `vlm_loss(model, batch)` is the loss of any batch of
examples.

Mixing ratio. `vlm_mix_ratio` r is the fraction of all examples trained on that are VLM examples. With
R robot examples seen so far (this step's batch included), the VLM total is kept at round(r / (1 - r) * R):
each step draws the difference. So the achieved ratio V / (V + R) never drifts; it is off r only by
rounding (at most half an example). With a robot batch of 8 and r = 0.2, every step adds 2 VLM examples;
with r = 0.1 it adds 1 on most steps and 0 on some.

The counters (stream position, examples seen, bad records) are a buffer saved in `model.safetensors`, so
`lerobot-train --resume=true` continues the VLM order and the mix where the checkpoint left them. In a
multi-process run every process draws the same number of examples per step from its own shard; the
checkpoint holds the main process's counters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.model_inputs import vlm_inputs
from lerobot_ki.text_tokenizer import TextTokenizer, load_text_tokenizer
from lerobot_ki.vla_model import KIModel
from lerobot_ki.vlm_data import (
    BadVLMRecord,
    StreamPosition,
    VLMColumns,
    VLMStream,
    open_vlm_source,
    parse_record,
    process_rank,
)

logger = logging.getLogger(__name__)

STATE_FIELDS = ("epoch", "index", "records_read", "records_bad", "vlm_examples", "robot_examples")
STATE_KEY = "vlm_cotraining.state"  # its key in the policy's state dict


def vlm_prompt_text(prompt: str) -> str:
    """PaliGemma's convention: the answer follows the prompt after a newline."""
    return f"{prompt}\n"


@dataclass
class TokenizedVLMExample:
    images: list[Tensor]  # each (3, H, W) in [0, 1]
    prompt_ids: list[int]  # BOS + prompt + "\n"
    target_ids: list[int]  # answer + EOS


@dataclass
class VLMBatch:
    images: list[list[Tensor]]  # per example, its images (3, H, W) in [0, 1]
    prompt_ids: Tensor  # (B, Lp) right-padded
    prompt_mask: Tensor  # (B, Lp) bool
    target_ids: Tensor  # (B, Lt) right-padded
    target_mask: Tensor  # (B, Lt) bool


def tokenize_example(
    images: list[Tensor],
    prompt: str,
    answer: str | None,
    tokenizer: TextTokenizer,
    max_prompt_tokens: int,
    max_answer_tokens: int,
    max_images: int,
) -> TokenizedVLMExample:
    if len(images) > max_images:
        raise BadVLMRecord("too many images", f"{len(images)} images, the model has {max_images} cameras")
    prompt_ids = tokenizer.encode_text(vlm_prompt_text(prompt), bos=True)
    if len(prompt_ids) > max_prompt_tokens:
        raise BadVLMRecord(
            "prompt too long", f"{len(prompt_ids)} tokens > tokenizer_max_length={max_prompt_tokens}"
        )
    target_ids: list[int] = []
    if answer is not None:
        target_ids = tokenizer.encode_text(answer, bos=False) + [tokenizer.layout.eos_id]
        if len(target_ids) > max_answer_tokens:
            raise BadVLMRecord(
                "answer too long", f"{len(target_ids)} tokens > vlm_max_answer_tokens={max_answer_tokens}"
            )
    return TokenizedVLMExample(images, prompt_ids, target_ids)


def collate(examples: list[TokenizedVLMExample], pad_id: int) -> VLMBatch:
    def pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask

    prompt_ids, prompt_mask = pad([e.prompt_ids for e in examples])
    target_ids, target_mask = pad([e.target_ids for e in examples])
    return VLMBatch([e.images for e in examples], prompt_ids, prompt_mask, target_ids, target_mask)


def vlm_loss(model: KIModel, batch: VLMBatch) -> tuple[Tensor, dict[str, float]]:
    """Next-token CE of the backbone on the target text of VLM examples: no expert, no flow, no FAST."""
    device = model.action_in_proj.weight.device
    inputs = vlm_inputs(batch.images, batch.prompt_ids, batch.prompt_mask, model.config, device)
    loss, acc = model.text_loss(inputs, batch.target_ids.to(device), batch.target_mask.to(device))
    return loss, {"vlm_loss": float(loss.detach()), "vlm_token_acc": float(acc)}


class VLMCoTraining(nn.Module):
    """The policy's co-training state: counters (a saved buffer), the mixing rule and the stream, which
    is opened lazily at the first draw (loading a checkpoint for evaluation never touches the data).
    The records are tokenized with `tokenizer`, by default the config's (as the processor builds it)."""

    def __init__(self, config: KIConfig, num_cameras: int, tokenizer: TextTokenizer | None = None):
        super().__init__()
        self.config = config
        self.num_cameras = num_cameras
        self._tokenizer = tokenizer
        self.register_buffer("state", torch.zeros(len(STATE_FIELDS), dtype=torch.long))
        self._stream: VLMStream | None = None
        # Authoritative counters while training (the buffer mirrors them for checkpoints); DDP broadcasts
        # buffers from the main process, which must not move another process's position.
        self._counts: dict[str, int] | None = None

    # --- counters -------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        if self._counts is None:  # first use after construction or a checkpoint load
            self._counts = dict(zip(STATE_FIELDS, (int(v) for v in self.state.tolist()), strict=True))
        return self._counts

    def _sync_buffer(self) -> None:
        c = self.counts()
        if self._stream is not None:
            pos = self._stream.pos
            c.update(
                epoch=pos.epoch, index=pos.index, records_read=pos.records_read, records_bad=pos.records_bad
            )
        values = torch.tensor([c[f] for f in STATE_FIELDS], dtype=torch.long)
        self.state.copy_(values.to(self.state.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._counts, self._stream = None, None  # re-read from the loaded buffer

    def achieved_ratio(self) -> float:
        c = self.counts()
        total = c["vlm_examples"] + c["robot_examples"]
        return c["vlm_examples"] / total if total else 0.0

    def examples_for_step(self, robot_batch: int) -> int:
        """VLM examples to add to a step with `robot_batch` robot examples (see the module docstring)."""
        c = self.counts()
        r = self.config.vlm_mix_ratio
        target = round(r / (1.0 - r) * (c["robot_examples"] + robot_batch))
        return max(0, target - c["vlm_examples"])

    # --- drawing --------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_text_tokenizer(self.config.text_tokenizer, self.config.fast_vocab_size)
        return self._tokenizer

    def loss(self, model: KIModel, robot_batch: int) -> tuple[Tensor | None, dict[str, float]]:
        """This step's VLM examples (as many as keep the mix at vlm_mix_ratio) and their loss (None when
        the step draws none)."""
        examples = self.draw(robot_batch)
        info = {
            "vlm_ratio": self.achieved_ratio(),  # cumulative over the run, resumes included
            "vlm_bad_records": float(self.counts()["records_bad"]),
        }
        if not examples:
            return None, info
        loss, vlm_info = vlm_loss(model, collate(examples, model.layout.pad_id))
        return loss, {**info, **vlm_info}

    def draw(self, robot_batch: int) -> list[TokenizedVLMExample]:
        """This step's VLM examples; updates the counters as if the step is trained on them."""
        n = self.examples_for_step(robot_batch)
        examples = self.stream().take(n) if n else []
        c = self.counts()
        c["robot_examples"] += robot_batch
        c["vlm_examples"] += n
        self._sync_buffer()
        return examples

    def stream(self) -> VLMStream:
        if self._stream is None:
            cfg = self.config
            tokenizer = self.tokenizer
            source, base_dir = open_vlm_source(
                cfg.vlm_dataset,
                cfg.vlm_image_column,
                cfg.vlm_dataset_config,
                cfg.vlm_split,
                cfg.vlm_streaming,
            )
            columns = VLMColumns(cfg.vlm_image_column, cfg.vlm_prompt_column, cfg.vlm_answer_column)

            def prepare(record: dict) -> TokenizedVLMExample:
                ex = parse_record(record, columns, base_dir)
                return tokenize_example(
                    ex.images,
                    ex.prompt,
                    ex.answer,
                    tokenizer,
                    cfg.tokenizer_max_length,
                    cfg.vlm_max_answer_tokens,
                    self.num_cameras,
                )

            c = self.counts()
            rank, world_size = process_rank()
            self._stream = VLMStream(
                source,
                prepare,
                seed=cfg.vlm_shuffle_seed,
                rank=rank,
                world_size=world_size,
                max_bad_fraction=cfg.vlm_max_bad_fraction,
                position=StreamPosition(c["epoch"], c["index"], c["records_read"], c["records_bad"]),
            )
            size = f"{len(source)} records" if hasattr(source, "__len__") else "streamed"
            logger.info(
                "VLM co-training from %s (%s), process %d of %d, at epoch %d record %d; mix ratio %.3f",
                cfg.vlm_dataset,
                size,
                rank,
                world_size,
                c["epoch"],
                c["index"],
                cfg.vlm_mix_ratio,
            )
        return self._stream
