"""The knowledge-insulated VLA: one backbone pass trained by FAST next-token CE, an expert trained by flow
matching that reads the backbone's image+prompt K/V through a stop-gradient.

Token sequence and who sees whom (DESIGN.md section 2):

    [images | prompt (task + state) ]  [FAST tokens + EOS]   ||   [expert tokens]
     bidirectional (prefix-LM)          causal, see prefix        see prefix + each other, never FAST

The expert tokens are never in the backbone's sequence, so nothing before them can see them; they read
the prefix K/V (which cannot depend on the FAST tokens: prefix rows do not attend to FAST columns).
Training therefore looks exactly like inference (prefill, then expert steps) plus a CE loss.

The model reads `ModelInputs` (model_inputs.py) and composes LeRobot's flow-matching and VLA functions; its
towers keep pi05's module names so that pi05 checkpoints load key for key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.policies.common.flow_matching import euler_integrate, sample_noise, sample_time_beta
from lerobot.policies.common.vla_utils import create_sinusoidal_pos_embedding, make_att_2d_masks
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.policies.rtc.modeling_rtc import RTCProcessor
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lerobot_ki.architecture import KIPaliGemmaWithExpert
from lerobot_ki.configuration_ki import KIConfig
from lerobot_ki.model_inputs import ModelInputs
from lerobot_ki.transformer import (
    KV,
    Geometry,
    Modulation,
    PrefixCond,
    active_fast_paths,
    make_geometry,
    plan_modulations,
    run_stack,
)
from lerobot_ki.variants import BACKBONE_VARIANTS, EXPERT_VARIANTS, VISION_VARIANTS
from lerobot_ki.vocabulary import VocabLayout, layout_with_placement, vocab_layout

PLACEMENT_KEY = "fast_token_placement"  # (fast_offset, fast_sign) of the VocabLayout the weights use


@dataclass(frozen=True)
class StepPlan:
    """The step-independent part of the expert's Euler steps in one sampler call (issue 17): the attention
    mask and RoPE of the action tokens, and each step's adaRMS modulations (time embedding, time MLP
    and every norm's dense for all steps at once). `modulations[k]` serves the k-th call of the step."""

    geometry: Geometry
    modulations: list[list[Modulation]]


def per_sample_share(sums: Tensor, n_total: Tensor) -> Tensor:
    """Per-sample losses (B,) from per-sample sums over tokens / action values, for LeRobot's per-sample
    weighting (`forward(batch, reduction="none")`): each sample's share of the batch-mean loss times B.
    The batch loss averages over all tokens (a sample with more FAST tokens or fewer padded steps weighs
    more), so this is what keeps uniform weights equal to it: their mean is exactly the mean loss."""
    return sums * sums.shape[0] / n_total


class KIModel(nn.Module):
    """Backbone + expert (pi05's module tree), the two losses, the flow sampler and token decoding."""

    def __init__(self, config: KIConfig):
        super().__init__()
        self.config = config
        layout = vocab_layout(config.text_tokenizer, config.fast_vocab_size)
        vocab_size = layout.vocab_size
        expert = EXPERT_VARIANTS[config.action_expert_variant]
        backbone = BACKBONE_VARIANTS[config.paligemma_variant]
        self.paligemma_with_expert = KIPaliGemmaWithExpert(
            backbone,
            expert,
            VISION_VARIANTS[config.paligemma_variant],
            vocab_size=vocab_size,
            image_size=config.image_resolution[0],
            precision=config.dtype,
            freeze_vision_encoder=config.freeze_vision_encoder,
            train_expert_only=config.train_expert_only,
        )
        self.action_in_proj = nn.Linear(config.max_action_dim, expert.width)
        self.action_out_proj = nn.Linear(expert.width, config.max_action_dim)
        self.time_mlp_in = nn.Linear(expert.width, expert.width)
        self.time_mlp_out = nn.Linear(expert.width, expert.width)
        if config.state_mode == "continuous":
            self.state_proj = nn.Linear(config.max_state_dim, backbone.width)
        # Where FAST ids sit in the vocabulary, saved with the weights they were trained with: checkpoints
        # from before FAST moved below PaliGemma's <loc> tokens reload with their own placement.
        self.register_buffer(PLACEMENT_KEY, torch.tensor(layout.placement, dtype=torch.long))
        self.gradient_checkpointing_enabled = False
        self._compiled_velocity: Callable[..., Tensor] | None = None  # config.compile_expert, built lazily

    @property
    def layout(self) -> VocabLayout:
        """The vocabulary layout: the config's, with the FAST placement these weights were trained with."""
        offset, sign = self.fast_token_placement.tolist()
        layout = vocab_layout(self.config.text_tokenizer, self.config.fast_vocab_size)
        return layout_with_placement(layout, (offset, sign))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + PLACEMENT_KEY not in state_dict:  # written before the placement was recorded
            legacy = vocab_layout(self.config.text_tokenizer, self.config.fast_vocab_size, legacy=True)
            state_dict[prefix + PLACEMENT_KEY] = torch.tensor(legacy.placement, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute activations in the backward pass: our layer loop reads the flag, and the towers get
        the flags pi05 sets on them."""
        self.gradient_checkpointing_enabled = True
        towers = self.paligemma_with_expert
        for module in (towers.language_model, towers.paligemma.model.vision_tower, towers.expert_model):
            module.gradient_checkpointing = True

    def _apply_checkpoint(self, func, *args):
        if self.gradient_checkpointing_enabled and self.training:
            return checkpoint(func, *args, use_reentrant=False, preserve_rng_state=False)
        return func(*args)

    def sample_noise(self, shape, device) -> Tensor:
        return sample_noise(shape, device)

    def sample_time(self, bsize: int, device) -> Tensor:
        cfg = self.config
        return sample_time_beta(
            bsize,
            device,
            alpha=cfg.time_sampling_beta_alpha,
            beta=cfg.time_sampling_beta_beta,
            scale=cfg.time_sampling_scale,
            offset=cfg.time_sampling_offset,
        )

    def sample_delay(self, bsize: int, device) -> Tensor:
        """Training-time RTC: committed prefix lengths d (B,), uniform over {0, ..., rtc_training_max_delay}
        (every delay up to the bound the robot may see is trained as often; d = 0 keeps the plain
        chunk-from-noise task in the mix)."""
        return torch.randint(0, self.config.rtc_training_max_delay + 1, (bsize,), device=device)

    # --- the prefix: images + prompt (+ a continuous state token) ------------------------------------
    def embed_images_and_prompt(
        self, images: list[Tensor], img_masks: list[Tensor], tokens: Tensor, masks: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """pi05's prefix embedding (SigLIP tokens per camera, then the prompt), minus its attention
        flags built from a Python list: that host->device copy cannot be captured in a CUDA graph. All
        prefix tokens are bidirectional, so the flags are zeros. (B, Lp, D), (B, Lp), (B, Lp)."""
        embs, pads = [], []
        batched = active_fast_paths().batched_vision and not torch.is_grad_enabled()
        if batched and len(images) > 1 and len({i.shape for i in images}) == 1:
            # One SigLIP pass over B x cameras images: fewer, larger matmuls than camera by camera. At
            # inference only: a training step stays today's, number for number (it measured no faster).
            per_camera = self._apply_checkpoint(self._embed_image, torch.cat(images)).split(
                images[0].shape[0]
            )
        else:
            per_camera = [self._apply_checkpoint(self._embed_image, img) for img in images]
        for emb, img_mask in zip(per_camera, img_masks, strict=True):  # (B, Ni, D) each
            embs.append(emb)
            pads.append(img_mask[:, None].expand(emb.shape[:2]))
        embs.append(self._apply_checkpoint(self.paligemma_with_expert.embed_language_tokens, tokens))
        pads.append(masks)
        pad = torch.cat(pads, dim=1)
        return torch.cat(embs, dim=1), pad, torch.zeros_like(pad)

    def _embed_image(self, img: Tensor) -> Tensor:
        if self.config.vision_autocast and self.config.dtype == "bfloat16" and img.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.paligemma_with_expert.embed_image(img)
        return self.paligemma_with_expert.embed_image(img)

    def embed_prefix(self, inputs: ModelInputs) -> tuple[Tensor, Tensor]:
        """Embeddings (B, Lp, D) and validity mask (B, Lp); all prefix tokens are bidirectional. A
        continuous state (B, S) becomes one more token; a (B, 0) state (text mode, VLM examples) none."""
        embs, pad, _ = self.embed_images_and_prompt(
            inputs.images, inputs.image_masks, inputs.prompt_ids, inputs.prompt_mask
        )
        state = inputs.state
        if state.shape[-1] > 0:
            state_emb = self.state_proj(state.to(self.state_proj.weight.dtype))[:, None]  # (B, 1, D)
            embs = torch.cat([embs, state_emb.to(embs.dtype)], dim=1)
            pad = torch.cat([pad, torch.ones_like(pad[:, :1])], dim=1)
        return embs, pad

    def _backbone(
        self,
        embs: Tensor,
        pad: Tensor,
        causal: Tensor,
        past: list[KV] | None = None,
        past_pad: Tensor | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """Runs the backbone over new tokens `embs` (B, L, D) whose pad mask is `pad` (B, L) and whose
        `causal` flags (B, L) follow LeRobot's convention (1 = starts a new causal block)."""
        past_pad = pad[:, :0] if past_pad is None else past_pad
        all_pad = torch.cat([past_pad, pad], dim=1)
        all_causal = torch.cat([torch.zeros_like(past_pad, dtype=causal.dtype), causal], dim=1)
        mask = make_att_2d_masks(all_pad, all_causal)[:, past_pad.shape[1] :]  # (B, L, Lpast + L)
        positions = (torch.cumsum(all_pad, dim=1) - 1)[:, past_pad.shape[1] :]
        return run_stack(
            self.paligemma_with_expert.language_model,
            embs,
            positions,
            mask,
            past=past,
            use_checkpoint=self.gradient_checkpointing_enabled and self.training,
        )

    def prefill(self, embs: Tensor, pad: Tensor) -> tuple[Tensor, list[KV]]:
        return self._backbone(embs, pad, torch.zeros_like(pad))

    # --- the expert ---------------------------------------------------------------------------------
    def embed_suffix(
        self,
        noisy_actions: Tensor,  # (B, T, A)
        timestep: Tensor,  # (B,)
        committed: Tensor | None = None,  # (B, T) bool: training-time RTC positions at flow time 0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | PrefixCond]:
        """pi05's expert input: projected noisy actions (B, T, De) and the adaRMS time condition (B, De),
        with every tensor made on the device (capturable in a CUDA graph). With `committed`, the condition
        is per token: time 0 on the committed positions, `timestep` elsewhere (a `PrefixCond`)."""
        if committed is not None:  # one time-MLP pass for both times: (2B,) = [timestep, 0]
            timestep = torch.cat([timestep, torch.zeros_like(timestep)])
        cond = self.time_condition(timestep)  # (B, De) or (2B, De)
        if committed is not None:
            cond = PrefixCond(cond, committed)  # (2B, De): [timestep's, time 0's]
        action_emb = self.action_in_proj(noisy_actions)
        bsz, horizon = action_emb.shape[:2]
        pad = torch.ones(bsz, horizon, dtype=torch.bool, device=action_emb.device)
        att = torch.zeros(bsz, horizon, dtype=action_emb.dtype, device=action_emb.device)
        att[:, 0] = 1  # the expert tokens start a new block that the prefix does not see
        return action_emb, pad, att, cond

    def time_condition(self, timestep: Tensor) -> Tensor:
        """pi05's adaRMS condition (N, De) of flow times (N,): sinusoidal embedding, then the time MLP."""
        time_emb = create_sinusoidal_pos_embedding(
            timestep,
            self.action_in_proj.out_features,
            min_period=self.config.min_period,
            max_period=self.config.max_period,
            device=timestep.device,
        ).to(timestep.dtype)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))

    def _expert_geometry(self, prefix_pad: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
        """The action tokens' attention mask (B, T, Lp + T) and RoPE positions (B, T)."""
        bsz, n_prefix = prefix_pad.shape
        # Expert tokens see every valid prefix token and each other; RoPE positions continue the prompt.
        mask = torch.cat(
            [
                prefix_pad[:, None, :].expand(bsz, horizon, n_prefix),
                torch.ones(bsz, horizon, horizon, dtype=torch.bool, device=prefix_pad.device),
            ],
            dim=2,
        )
        positions = prefix_pad.sum(-1, keepdim=True) + torch.arange(horizon, device=prefix_pad.device)
        return mask, positions

    def plan_steps(
        self,
        prefix_pad: Tensor,  # (B, Lp)
        horizon: int,
        times: list[float],  # the flow time of each step, as the sampler will pass them
        committed: Tensor | None = None,  # (B, T) bool: positions at flow time 0 (training-time RTC)
    ) -> StepPlan:
        """What `velocity` computes the same way at every step, for all `times` at once (see `StepPlan`).
        Times are made with `torch.full` as `euler_steps` makes them (no host->device copy: graphable)."""
        bsz, device = prefix_pad.shape[0], prefix_pad.device
        rows = []
        for t in times:  # per step the rows velocity would feed the time MLP: [t] * B (+ [0] * B)
            rows.append(torch.full((bsz,), t, dtype=torch.float32, device=device))
            if committed is not None:
                rows.append(torch.zeros(bsz, dtype=torch.float32, device=device))
        conds = self.time_condition(torch.cat(rows))  # (S * R, De)
        expert = self.paligemma_with_expert.expert_model
        mask, positions = self._expert_geometry(prefix_pad, horizon)
        dtype = expert.layers[0].self_attn.q_proj.weight.dtype
        return StepPlan(
            make_geometry(expert, positions, mask, dtype),
            plan_modulations(expert, conds, len(times), committed),
        )

    def velocity(
        self,
        prefix_kv: list[KV],
        prefix_pad: Tensor,  # (B, Lp)
        x_t: Tensor,  # (B, T, A)
        time: Tensor,  # (B,)
        committed: Tensor | None = None,  # (B, T) bool: positions at flow time 0 (training-time RTC)
        geometry: Geometry | None = None,  # with `modulations`: this step's part of a `StepPlan`
        modulations: list[Modulation] | None = None,  # made for this `time` and `committed`
    ) -> Tensor:
        """Flow velocity v(x_t, t) (B, T, A) from the expert reading the prefix K/V (detached if KI)."""
        if modulations is None:
            suffix_embs, _, _, cond = self.embed_suffix(x_t, time, committed)  # (B, T, De), condition
            mask, positions = self._expert_geometry(prefix_pad, suffix_embs.shape[1])
        else:  # planned: the time condition and geometry are already made
            suffix_embs, cond, mask, positions = self.action_in_proj(x_t), modulations, None, None
        out, _ = run_stack(
            self.paligemma_with_expert.expert_model,
            suffix_embs,
            positions,
            mask,
            past=prefix_kv,
            cond=cond,
            detach_past=self.config.stop_gradient,
            use_checkpoint=self.gradient_checkpointing_enabled and self.training,
            geometry=geometry,
        )
        return self.action_out_proj(out.to(self.action_out_proj.weight.dtype)).float()

    # --- training -----------------------------------------------------------------------------------
    def forward(
        self,
        inputs: ModelInputs,
        fast_ids: Tensor,  # (B, Lf) LM ids of FAST tokens + EOS, right-padded
        fast_mask: Tensor,  # (B, Lf) bool
        actions: Tensor,  # (B, T, max_action_dim) normalized, zero-padded dims
        flow_mask: Tensor,  # (B, T, max_action_dim) bool: real steps x real dims
        reduction: str = "mean",
    ) -> dict[str, Tensor]:
        """The two losses: scalars, or with reduction="none" per sample (B,) (see `per_sample_share`)."""
        prefix_embs, prefix_pad = self.embed_prefix(inputs)
        bsz, n_prefix = prefix_pad.shape
        _, kv, loss_fast, fast_acc = self.next_token_ce(
            prefix_embs, prefix_pad, fast_ids, fast_mask, reduction=reduction
        )

        # The image+prompt K/V do not depend on the FAST tokens (prefix rows never attend to them).
        prefix_kv = [(k[:, :, :n_prefix], v[:, :, :n_prefix]) for k, v in kv]
        horizon = actions.shape[1]
        loss_flow = actions.new_zeros(() if reduction == "mean" else (bsz,))
        for _ in range(self.config.flow_samples_per_backbone_pass):
            noise = self.sample_noise(actions.shape, actions.device)
            time = self.sample_time(bsz, actions.device)  # (B,)
            t = time[:, None, None]
            x_t = t * noise + (1 - t) * actions
            u_t = noise - actions
            loss_mask, committed = flow_mask, None
            if self.config.rtc_training_max_delay > 0:
                # Training-time RTC: the first d actions are the committed prefix, given clean (flow time
                # 0 is the data end of x_t = t * noise + (1 - t) * actions) and not trained on.
                committed = committed_positions(self.sample_delay(bsz, actions.device), horizon)  # (B, T)
                x_t = torch.where(committed[:, :, None], actions, x_t)
                loss_mask = flow_mask & ~committed[:, :, None]
            per_token = () if committed is None else (committed,)  # off: today's call, unchanged
            v_t = self.velocity(prefix_kv, prefix_pad, x_t, time, *per_token)
            # Mean over the trained (valid, uncommitted) positions: the loss scale does not depend on d.
            n_flow = loss_mask.sum().clamp(min=1)
            err = (v_t - u_t) ** 2 * loss_mask
            if reduction == "mean":
                loss_flow = loss_flow + err.sum() / n_flow
            else:
                loss_flow = loss_flow + per_sample_share(err.sum(dim=(1, 2)), n_flow)
        loss_flow = loss_flow / self.config.flow_samples_per_backbone_pass
        return {"loss_fast_ce": loss_fast, "loss_flow": loss_flow, "fast_token_acc": fast_acc}

    def text_loss(self, inputs: ModelInputs, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Next-token CE (and token accuracy) of the backbone on target text `ids` (B, L) after the
        prefix: no expert, no flow (VLM examples)."""
        prefix_embs, prefix_pad = self.embed_prefix(inputs)
        _, _, loss, acc = self.next_token_ce(prefix_embs, prefix_pad, ids, mask)
        return loss, acc

    def next_token_ce(
        self,
        prefix_embs: Tensor,  # (B, Lp, D)
        prefix_pad: Tensor,  # (B, Lp) bool
        ids: Tensor,  # (B, L) target LM ids (FAST tokens or answer text, + EOS), right-padded
        mask: Tensor,  # (B, L) bool
        reduction: str = "mean",
    ) -> tuple[Tensor, list[KV], Tensor, Tensor]:
        """One backbone pass over [prefix | ids] (prefix-LM: ids causal) and the next-token CE on `ids`
        only. Returns hidden (B, Lp + L, D), per-layer K/V, the mean CE (reduction="none": per sample,
        see `per_sample_share`) and the token accuracy."""
        bsz, n_prefix = prefix_pad.shape
        mask = mask.bool()
        embs = self.paligemma_with_expert.embed_language_tokens(ids).to(prefix_embs.dtype)
        hidden, kv = self._backbone(
            torch.cat([prefix_embs, embs], dim=1),
            torch.cat([prefix_pad, mask], dim=1),
            torch.cat([torch.zeros_like(prefix_pad), torch.ones_like(mask)], dim=1),
        )
        # Token j is predicted from position j-1; token 0 from the last valid prompt position (the
        # prompt is right-padded, so that index differs per sample).
        last_prefix = n_prefix - 1 - prefix_pad.flip(-1).int().argmax(-1)  # (B,)
        pred_idx = torch.cat(
            [
                last_prefix[:, None],
                n_prefix + torch.arange(ids.shape[1] - 1, device=ids.device)[None].expand(bsz, -1),
            ],
            dim=1,
        )  # (B, L)
        pred_hidden = hidden.gather(1, pred_idx[..., None].expand(-1, -1, hidden.shape[-1]))
        # The vocabulary-wide head only where there is a target: padding slots would cost as much.
        targets = ids[mask]  # (N,)
        logits = self.paligemma_with_expert.lm_logits(pred_hidden[mask])  # (N, V)
        n_tokens = mask.sum().clamp(min=1)
        if reduction == "mean":
            loss = F.cross_entropy(logits, targets, reduction="sum") / n_tokens
        else:
            ce = F.cross_entropy(logits, targets, reduction="none")  # (N,), in mask's row-major order
            rows = mask.nonzero()[:, 0]
            loss = per_sample_share(ce.new_zeros(bsz).index_add_(0, rows, ce), n_tokens)
        acc = (logits.argmax(-1) == targets).sum() / n_tokens
        return hidden, kv, loss, acc

    # --- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(
        self,
        inputs: ModelInputs,
        noise: Tensor,  # (B, T, A)
        num_steps: int,
        rtc_processor: RTCProcessor | None = None,
        rtc_enabled: bool = False,
        committed: Tensor | None = None,
        delay: Tensor | None = None,
        **rtc_kwargs,
    ) -> Tensor:
        """Observation -> chunk (B, T, A): prefill the backbone once, then `num_steps` Euler steps of the
        expert only. With no RTC processor there is no host sync: the unit a CUDA graph records.

        Training-time RTC: `committed` (B, T, A) holds the committed actions at its first `delay` (B,)
        positions (the rest is ignored); those positions are inpainted at every step (see `euler_steps`)."""
        prefix_kv, prefix_pad = self.prefix_cache(inputs)
        expert = self.inference_velocity()
        planned = rtc_processor is None and active_fast_paths().step_plan
        plan: StepPlan | None = None
        steps: Iterator[int] = iter(range(num_steps))

        def velocity(x_t: Tensor, time: Tensor, committed: Tensor | None = None) -> Tensor:
            if not planned:
                return expert(prefix_kv, prefix_pad, x_t, time, committed)
            nonlocal plan
            if plan is None:  # at the first step, from the committed mask euler_steps derived
                plan = self.plan_steps(prefix_pad, x_t.shape[1], euler_times(num_steps), committed)
            # euler_steps calls this once per time of euler_times, in order: step k uses plan row k.
            mods = plan.modulations[next(steps)]
            return expert(prefix_kv, prefix_pad, x_t, time, committed, plan.geometry, mods)

        if rtc_processor is not None:
            return integrate_guided(velocity, noise, num_steps, rtc_processor, rtc_enabled, **rtc_kwargs)
        return euler_steps(velocity, noise, num_steps, committed, delay)

    def prefix_cache(self, inputs: ModelInputs) -> tuple[list[KV], Tensor]:
        """What the expert reads at every Euler step: the backbone's prefix K/V and validity mask (B, Lp)."""
        prefix_embs, prefix_pad = self.embed_prefix(inputs)
        _, prefix_kv = self.prefill(prefix_embs, prefix_pad)
        return prefix_kv, prefix_pad

    def inference_velocity(self) -> Callable[..., Tensor]:
        """`velocity`, or its torch.compile'd version with `compile_expert` (compiled once, kept)."""
        if not self.config.compile_expert:
            return self.velocity
        if self._compiled_velocity is None:
            mode = self.config.compile_mode
            self._compiled_velocity = torch.compile(self.velocity, dynamic=False, mode=mode)
        return self._compiled_velocity

    @torch.no_grad()
    def generate(
        self,
        inputs: ModelInputs,
        max_new_tokens: int,
        eos_id: int,
        allowed: tuple[int, int] | None = None,
        pick: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Decoding from the backbone with a KV cache. Returns (B, <=max_new_tokens) ids,
        with `eos_id` after a sequence ended. `allowed` = [lo, hi) restricts decoding to that id range
        (plus EOS), which is how FAST decoding keeps to FAST tokens. `pick` maps logits (B, V) to the
        next ids (B,) (sampling, see `text_generation.py`); greedy (argmax) by default."""
        prefix_embs, prefix_pad = self.embed_prefix(inputs)
        bsz, n_prefix = prefix_pad.shape
        hidden, cache = self.prefill(prefix_embs, prefix_pad)
        last = n_prefix - 1 - prefix_pad.flip(-1).int().argmax(-1)
        h = hidden[torch.arange(bsz), last][:, None]  # (B, 1, D)
        cache_pad = prefix_pad
        done = torch.zeros(bsz, dtype=torch.bool, device=prefix_pad.device)
        out = []
        for _ in range(max_new_tokens):
            logits = self.paligemma_with_expert.lm_logits(h)[:, -1]  # (B, V)
            if allowed is not None:
                keep = torch.zeros_like(logits, dtype=torch.bool)
                keep[:, allowed[0] : allowed[1]] = True
                keep[:, eos_id] = True
                logits = logits.masked_fill(~keep, float("-inf"))
            chosen = pick(logits) if pick is not None else logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(logits[:, 0], eos_id, dtype=torch.long), chosen)
            out.append(nxt)
            done |= nxt == eos_id
            if bool(done.all()):
                break
            emb = self.paligemma_with_expert.embed_language_tokens(nxt[:, None]).to(prefix_embs.dtype)
            step_pad = torch.ones(bsz, 1, dtype=torch.bool, device=nxt.device)
            h, cache = self._backbone(
                emb, step_pad, torch.ones_like(step_pad), past=cache, past_pad=cache_pad
            )
            cache_pad = torch.cat([cache_pad, step_pad], dim=1)
        return torch.stack(out, dim=1)


def integrate_guided(
    velocity: Callable[[Tensor, Tensor], Tensor],  # (x_t (B, T, A), time (B,)) -> (B, T, A)
    noise: Tensor,  # (B, T, A)
    num_steps: int,
    rtc_processor: RTCProcessor,
    rtc_enabled: bool,
    **rtc_kwargs,
) -> Tensor:
    """LeRobot's Euler loop, which owns the RTC guidance and its debug tracking, over `velocity`."""
    if not guidance_differentiates_velocity():
        # LeRobot's vector-Jacobian product never reaches the velocity (see the function): the expert's
        # autograd graph would be recorded and thrown away, so run it without one.
        velocity = torch.no_grad()(velocity)
    return euler_integrate(
        velocity,
        noise,
        num_steps,
        rtc_processor=rtc_processor,
        rtc_enabled=rtc_enabled,
        inference_delay=rtc_kwargs.get("inference_delay"),
        prev_chunk_left_over=rtc_kwargs.get("prev_chunk_left_over"),
        execution_horizon=rtc_kwargs.get("execution_horizon"),
    )


@functools.cache
def guidance_differentiates_velocity() -> bool:
    """Whether LeRobot's `RTCProcessor.denoise_step` (the RTC guidance) differentiates its correction through
    the velocity model. LeRobot 0.6.1 computes v_t before it marks x_t as requiring grad, so the correction
    d(x_t - t * v_t)/dx_t^T err is err itself and the velocity's graph is never traversed. Probed once, on a
    toy velocity whose Jacobian is not zero, with LeRobot's own code: a LeRobot that does differentiate gets
    the expert run under autograd again, so its guidance is followed whichever it computes."""
    processor = RTCProcessor(RTCConfig(execution_horizon=4))
    x_t = torch.linspace(-1.0, 1.0, 8).reshape(1, 4, 2)
    step = dict(prev_chunk_left_over=torch.zeros(1, 4, 2), inference_delay=2, time=0.5, execution_horizon=4)
    with torch.no_grad():  # as in sample_actions: denoise_step enables grad itself
        through = processor.denoise_step(x_t, original_denoise_step_partial=lambda x: x * x, **step)
        detached = processor.denoise_step(
            x_t, original_denoise_step_partial=lambda x: (x * x).detach(), **step
        )
    return not torch.equal(through, detached)


def committed_positions(delay: Tensor, horizon: int) -> Tensor:
    """(B,) committed prefix lengths -> (B, T) bool, True at the first d positions; made on the device."""
    return torch.arange(horizon, device=delay.device)[None, :] < delay[:, None]


def euler_steps(
    velocity: Callable[..., Tensor],  # (x_t, time (B,)[, committed (B, T)]) -> (B, T, A)
    noise: Tensor,  # (B, T, A)
    num_steps: int,
    committed: Tensor | None = None,  # (B, T, A): committed actions at the first `delay` positions
    delay: Tensor | None = None,  # (B,) long
) -> Tensor:
    """The forward-Euler schedule of LeRobot's `euler_integrate` (t = 1 + k*dt, dt = -1/num_steps) with
    each step's time made on the device: no host->device copy per step, so the loop can be graphed.

    With `committed` (training-time RTC), the first d positions hold the committed actions at flow time 0
    before every step, as in training, and again after it (overwriting the step): the returned chunk starts
    with exactly the committed actions, and the rest is sampled conditioned on them."""
    x_t = noise
    keep = None
    if committed is not None:
        assert delay is not None, "committed actions need their prefix lengths"
        keep = committed_positions(delay, noise.shape[1])  # (B, T)
        committed = committed.to(noise.dtype)
        x_t = torch.where(keep[:, :, None], committed, x_t)
    dt = -1.0 / num_steps
    for t in euler_times(num_steps):
        time = torch.full((noise.shape[0],), t, dtype=torch.float32, device=noise.device)
        if keep is None:
            x_t = x_t + dt * velocity(x_t, time)
        else:  # the committed positions at time 0 (see embed_suffix), kept at the committed actions
            x_t = torch.where(keep[:, :, None], committed, x_t + dt * velocity(x_t, time, keep))
    return x_t


def euler_times(num_steps: int) -> list[float]:
    """The flow time of each forward-Euler step (LeRobot's `euler_integrate`: t = 1 + k*dt with
    dt = -1/num_steps), shared by `euler_steps` and the step plan that precomputes their conditions."""
    dt = -1.0 / num_steps
    return [1.0 + step * dt for step in range(num_steps)]
