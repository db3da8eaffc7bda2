"""`KIConfig`: every knob of the knowledge-insulated VLA, registered with LeRobot as `ki_vla`."""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature, PreTrainedConfig
from lerobot.optim import AdamWConfig, CosineDecayWithWarmupSchedulerConfig
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.utils.constants import ACTION, OBS_STATE

from lerobot_ki.naive_tokens import NAIVE_BINS, naive_budget_error, naive_tokens_per_chunk
from lerobot_ki.variants import BACKBONE_VARIANTS, EXPERT_VARIANTS

PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"
BYTE_TOKENIZER = "byte"
EMPTY_CAMERA = "empty_camera_"  # key infix of the blank cameras `empty_cameras` declares
# torch.compile modes that record no CUDA graphs of their own (ki_vla records the whole call in one).
EXPERT_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@PreTrainedConfig.register_subclass("ki_vla")
@dataclass
class KIConfig(PreTrainedConfig):
    # `gemma_2b` is the real PaliGemma 3B (SigLIP So400m + Gemma 2B); `tiny` trains on a 2-core CPU.
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    dtype: str = "float32"  # "float32" | "bfloat16" (norms and the vision tower stay float32)
    image_resolution: tuple[int, int] = (224, 224)
    # Load the PaliGemma backbone weights (the transformers checkpoint of google/paligemma-3b-pt-224: a
    # local dir or the Hub id) when the policy is built; the expert stays freshly initialised. Ignored
    # when a ki_vla checkpoint is loaded (its weights replace them). To start from pi05 instead, pass
    # --policy.pretrained_path=<pi05 checkpoint> (README "Starting from real weights").
    paligemma_pretrained_path: str | None = None
    # Cameras the dataset lacks but the model expects (e.g. a pretrained 3-camera model on a 2-camera
    # robot) are fed as masked-out blank images.
    empty_cameras: int = 0

    n_obs_steps: int = 1
    chunk_size: int = 50
    n_action_steps: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32

    # Detach the backbone K/V read by the action expert: the flow loss never reaches the VLM.
    # `false` is joint training (pi0.5 without KI), the paper's main ablation.
    stop_gradient: bool = True
    fast_loss_weight: float = 1.0  # 0 => pi0-style training of the flow expert only
    flow_loss_weight: float = 1.0  # alpha in CE + alpha * MSE
    # Expert passes per backbone pass, each with fresh noise and time: more flow supervision for
    # the same backbone FLOPs (the prefix K/V are reused).
    flow_samples_per_backbone_pass: int = 1
    state_mode: str = "text"  # "text": 256-bin state in the prompt (pi0.5); "continuous": a state token
    inference_mode: str = "flow"  # "flow": prefill + Euler steps of the expert; "fast": AR FAST decode
    # On CUDA, record flow inference (SigLIP + prefill + Euler steps) once per input shape as a CUDA
    # graph and replay it: removes the kernel-launch gaps that dominate at batch 1. Not used with RTC.
    cuda_graphs: bool = True
    # With dtype=bfloat16 on CUDA, run the float32 SigLIP tower and projector under bf16 autocast (the
    # weights stay float32, as in pi05): float32 GEMMs without tensor cores were 29 of the 71 ms of GPU
    # time of a 2-camera H100 inference call (benchmarks/profile_ki_inference.py).
    vision_autocast: bool = True
    # torch.compile the expert's velocity at inference (fuses its many small elementwise kernels); the
    # first call compiles (24 s at full size on an H200; 60.3 -> 45.1 ms per 2-camera chunk there).
    compile_expert: bool = False
    # torch.compile mode for compile_expert. The compiled expert runs inside our own CUDA graph, so the
    # modes that record CUDA graphs themselves ("reduce-overhead", "max-autotune") are refused at start-up;
    # "max-autotune-no-cudagraphs" autotunes the GEMMs (first call: minutes).
    compile_mode: str = "default"

    # Flow matching, openpi's conventions: training times drawn from Beta(alpha, beta), scaled and offset;
    # periods of the sinusoidal time embedding.
    num_inference_steps: int = 10  # Euler steps of the expert at inference
    time_sampling_beta_alpha: float = 1.5
    time_sampling_beta_beta: float = 1.0
    time_sampling_scale: float = 0.999
    time_sampling_offset: float = 0.001
    min_period: float = 4e-3
    max_period: float = 4.0

    # None => "byte" (built offline with `tokenizers`) for the tiny backbone, the PaliGemma
    # tokenizer otherwise. A local directory or Hub id of a `tokenizer.json` also works.
    text_tokenizer: str | None = None
    tokenizer_max_length: int = 200
    # "fast": DCT + BPE (fitted); "naive": 256 uniform bins per normalized action value, one token per
    # value (RT-2/OpenVLA style, the paper's ablation; chunk_size * action dims + EOS must fit
    # max_fast_tokens). Both use the FAST slots of the vocabulary and the same FAST step and decoding.
    action_tokenizer: str = "fast"
    # None => fit FAST on the training dataset when training starts and save it with the checkpoint.
    fast_tokenizer_path: str | None = None
    fast_vocab_size: int = 1024
    fast_scale: float = 10.0
    fast_fit_max_chunks: int = 4000
    # FAST tokens per chunk the backbone reads and predicts, EOS included. None => sized when training
    # starts, before the first step (`fast_artifacts.resolve_fast_budget`): the longest chunk of the FAST
    # fit + EOS, rounded up to a multiple of 8 (chunk_size x action dims + EOS for naive tokens). The
    # chosen value is written into this config, so the checkpoint's config.json records it.
    max_fast_tokens: int | None = None
    fast_overflow: str = "error"  # "error" | "truncate" (warned and counted) for chunks over budget
    fast_decode_max_failures: int = -1  # inference_mode=fast: -1 => never raise, zeros + counted warning

    # VLM co-training (README "VLM co-training"): general vision-language examples (images, a prompt, a
    # target text) mixed into robot training. The backbone learns them by next-token CE on the target
    # text only (no flow, no FAST loss). None = off.
    # A local `datasets` directory (save_to_disk), a folder of *.jsonl + image files, or a Hub dataset id.
    vlm_dataset: str | None = None
    vlm_dataset_config: str | None = None  # Hub dataset configuration name
    vlm_split: str = "train"
    vlm_streaming: bool = False  # iterate the dataset (Hub: no full download) instead of random access
    vlm_image_column: str = "image"  # one image or a list of images per record
    vlm_prompt_column: str = "prompt"
    vlm_answer_column: str = "answer"
    # Fraction of the examples trained on that are VLM examples, over the whole run: each step adds
    # as many VLM examples to the robot batch as keeps the cumulative fraction at this value.
    vlm_mix_ratio: float = 0.2
    vlm_loss_weight: float = 1.0  # loss = robot loss + vlm_loss_weight * VLM text CE
    vlm_shuffle_seed: int = 0  # record order: a permutation per epoch from (seed, epoch)
    vlm_max_answer_tokens: int = 48  # target text tokens, EOS included; longer records are skipped
    # Bad records (missing image, empty answer, unreadable file) are skipped, counted and logged; more
    # than this fraction of the records read (counted over at least 100) stops training with an error.
    vlm_max_bad_fraction: float = 0.1

    # Real-time chunking settings (lerobot-rollout --inference.type=rtc).
    rtc_config: RTCConfig | None = None
    # Training-time RTC (Black et al. 2025, arXiv 2512.05964): > 0 trains the expert to continue a
    # committed prefix of d ~ uniform{0..D} ground-truth actions (flow time 0, no loss on them), and
    # `--inference.type=rtc` then inpaints the committed actions instead of LeRobot's guidance (no autograd
    # at inference). Delays above D are clamped. 0 = off (RTC uses LeRobot's guidance).
    rtc_training_max_delay: int = 0

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.QUANTILES,
            "ACTION": NormalizationMode.QUANTILES,
        }
    )

    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory
    freeze_vision_encoder: bool = False
    train_expert_only: bool = False  # freeze the whole VLM: only the expert and projections learn
    device: str | None = None

    # None => 2.5e-5 (openpi's fine-tuning rate) for pretrained-size presets, 1e-3 for `tiny`, which
    # trains from scratch; decay_lr likewise defaults to a tenth of the peak.
    optimizer_lr: float | None = None
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 0.01
    optimizer_grad_clip_norm: float = 1.0
    scheduler_warmup_steps: int = 1_000
    scheduler_decay_steps: int = 30_000
    scheduler_decay_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("paligemma_variant", self.paligemma_variant, BACKBONE_VARIANTS)
        _check_choice("action_expert_variant", self.action_expert_variant, EXPERT_VARIANTS)
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("state_mode", self.state_mode, ("text", "continuous"))
        _check_choice("inference_mode", self.inference_mode, ("flow", "fast"))
        _check_choice("fast_overflow", self.fast_overflow, ("error", "truncate"))
        _check_choice("action_tokenizer", self.action_tokenizer, ("fast", "naive"))
        if self.action_tokenizer == "naive":
            if self.fast_tokenizer_path:
                raise ValueError(
                    "--policy.fast_tokenizer_path names a FAST tokenizer, but action_tokenizer=naive "
                    "uses none: drop one of the two flags."
                )
            if self.fast_vocab_size < NAIVE_BINS:
                raise ValueError(
                    f"action_tokenizer=naive uses {NAIVE_BINS} token ids in the FAST slot of the vocabulary, "
                    f"but fast_vocab_size={self.fast_vocab_size}: pass --policy.fast_vocab_size={NAIVE_BINS} "
                    "(or larger)."
                )
        if self.n_action_steps > self.chunk_size:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) cannot exceed chunk_size ({self.chunk_size}); "
                "lower --policy.n_action_steps or raise --policy.chunk_size."
            )
        if not 0 <= self.rtc_training_max_delay < self.chunk_size:
            raise ValueError(
                f"rtc_training_max_delay={self.rtc_training_max_delay} must be in [0, chunk_size="
                f"{self.chunk_size}): the committed prefix must leave at least one action to train on. "
                "Pass --policy.rtc_training_max_delay=D with D below --policy.chunk_size (0 = off)."
            )
        if self.image_resolution[0] != self.image_resolution[1]:
            raise ValueError(f"image_resolution must be square for SigLIP, got {self.image_resolution}")
        if self.flow_samples_per_backbone_pass < 1:
            raise ValueError("flow_samples_per_backbone_pass must be >= 1")
        if self.compile_mode not in EXPERT_COMPILE_MODES:
            raise ValueError(
                f"compile_mode={self.compile_mode!r} is not one of {EXPERT_COMPILE_MODES}: the compiled "
                "expert is replayed inside ki_vla's own CUDA graph, so torch.compile must not record graphs "
                "itself (use max-autotune-no-cudagraphs instead of max-autotune or reduce-overhead)."
            )
        if self.max_fast_tokens is not None and self.max_fast_tokens < 2:
            raise ValueError("max_fast_tokens must leave room for at least one FAST token and EOS")
        if self.optimizer_lr is None:
            self.optimizer_lr = 1e-3 if self.paligemma_variant == "tiny" else 2.5e-5
        if self.scheduler_decay_lr is None:
            self.scheduler_decay_lr = self.optimizer_lr / 10
        if self.vlm_dataset is not None:
            if not 0.0 < self.vlm_mix_ratio < 1.0:
                raise ValueError(
                    f"vlm_mix_ratio={self.vlm_mix_ratio} must be in (0, 1): the fraction of trained examples "
                    "that are VLM examples (drop --policy.vlm_dataset to train on robot data only)."
                )
            if self.vlm_loss_weight < 0 or not 0.0 <= self.vlm_max_bad_fraction <= 1.0:
                raise ValueError("vlm_loss_weight must be >= 0 and vlm_max_bad_fraction in [0, 1].")
            if self.vlm_max_answer_tokens < 2:
                raise ValueError("vlm_max_answer_tokens must leave room for one token and EOS.")
        if self.text_tokenizer is None:
            self.text_tokenizer = BYTE_TOKENIZER if self.paligemma_variant == "tiny" else PALIGEMMA_TOKENIZER

    def validate_features(self) -> None:
        features = self.input_features
        real_cameras = [k for k in self.image_features if EMPTY_CAMERA not in k]
        # Empty input features: a config not tied to any data yet (e.g. sizing a model); data without a
        # camera is refused here, before the FAST fit and the model build it would otherwise reach.
        if self.input_features and not real_cameras:
            raise ValueError(
                f"ki_vla needs at least one real camera, but the input features are {sorted(features)} (no "
                "image). Its vision-language backbone reads the robot's camera images; "
                "--policy.empty_cameras only adds blank, masked-out views beside real ones. Use a dataset "
                "with camera images (if they are stored under other names, map them with --rename_map)."
            )
        for i in range(self.empty_cameras):
            key = f"observation.images.{EMPTY_CAMERA}{i}"
            self.input_features[key] = PolicyFeature(
                type=FeatureType.VISUAL, shape=(3, *self.image_resolution)
            )
        if OBS_STATE not in self.input_features:
            self.input_features[OBS_STATE] = PolicyFeature(
                type=FeatureType.STATE, shape=(self.max_state_dim,)
            )
        if ACTION not in self.output_features:
            self.output_features[ACTION] = PolicyFeature(
                type=FeatureType.ACTION, shape=(self.max_action_dim,)
            )
        state_dim = self.input_features[OBS_STATE].shape[0]
        action_dim = self.output_features[ACTION].shape[0]
        if state_dim > self.max_state_dim:
            raise ValueError(
                f"The state has {state_dim} dims but max_state_dim is {self.max_state_dim}: "
                f"pass --policy.max_state_dim={state_dim} (or larger)."
            )
        if action_dim > self.max_action_dim:
            raise ValueError(
                f"The action has {action_dim} dims but max_action_dim is {self.max_action_dim}: "
                f"pass --policy.max_action_dim={action_dim} (or larger)."
            )
        if self.action_tokenizer == "naive":
            # Sized or checked here, when the policy is built, not when the first batch overflows it.
            if self.max_fast_tokens is None:
                self.max_fast_tokens = naive_tokens_per_chunk(self.chunk_size, action_dim)
            error = naive_budget_error(self.chunk_size, action_dim, self.max_fast_tokens)
            if error:
                raise ValueError(error)

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(
            lr=self.optimizer_lr,
            betas=self.optimizer_betas,
            eps=self.optimizer_eps,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> CosineDecayWithWarmupSchedulerConfig:
        return CosineDecayWithWarmupSchedulerConfig(
            peak_lr=self.optimizer_lr,
            decay_lr=self.scheduler_decay_lr,
            num_warmup_steps=self.scheduler_warmup_steps,
            num_decay_steps=self.scheduler_decay_steps,
        )

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}={value!r}; choose one of {sorted(choices)} (--policy.{name}=...).")
