"""The PaliGemma backbone + Gemma action expert, built for any preset with LeRobot pi05's module tree.

LeRobot's `PaliGemmaWithExpertModel` cannot be built at our sizes (its constructor hard-codes the SigLIP
So400m tower and a 2048-wide image projection, which rules out `gemma_300m` and `tiny`), so we build the
same two towers, LeRobot's `PaliGemmaForConditionalGenerationWithPiGemma` and `PiGemmaForCausalLM`, at any
size, and reuse by name the four pi05 methods that apply (dtype policy, freezing, image and token
embedding). The module names stay those of pi05 (`paligemma.model.language_model.layers.N...`,
`gemma_expert.model...`) so `lerobot/pi05_base` state dicts load key for key. The forward is ours (see
`transformer.py`, whose `KIDecoderLayer` the decoder layers become): pi05's is not used.
"""

from __future__ import annotations

import torch
from lerobot.policies.pi05.modeling_pi05 import PaliGemmaWithExpertModel
from lerobot.policies.pi_gemma import PaliGemmaForConditionalGenerationWithPiGemma, PiGemmaForCausalLM
from torch import nn
from transformers.models.auto import CONFIG_MAPPING

from lerobot_ki.transformer import adopt_layers
from lerobot_ki.variants import GemmaSize, SiglipSize


class KIPaliGemmaWithExpert(nn.Module):
    # pi05's implementations, applied to this module (they read only `paligemma`, `gemma_expert` and the
    # two freezing flags, which it has under the same names).
    to_bfloat16_for_selected_params = PaliGemmaWithExpertModel.to_bfloat16_for_selected_params
    _set_requires_grad = PaliGemmaWithExpertModel._set_requires_grad
    embed_image = PaliGemmaWithExpertModel.embed_image
    embed_language_tokens = PaliGemmaWithExpertModel.embed_language_tokens

    def __init__(
        self,
        backbone: GemmaSize,
        expert: GemmaSize,
        vision: SiglipSize,
        vocab_size: int,
        image_size: int,
        precision: str = "float32",
        freeze_vision_encoder: bool = False,
        train_expert_only: bool = False,
    ):
        super().__init__()
        if (backbone.depth, backbone.num_kv_heads, backbone.head_dim) != (
            expert.depth,
            expert.num_kv_heads,
            expert.head_dim,
        ):
            raise ValueError(
                "The action expert reads the backbone's K/V layer by layer: depth, num_kv_heads and "
                f"head_dim must match (backbone {backbone}, expert {expert})."
            )
        self.freeze_vision_encoder = freeze_vision_encoder
        self.train_expert_only = train_expert_only

        vlm = CONFIG_MAPPING["paligemma"]()
        vlm._vocab_size = vocab_size  # noqa: SLF001
        vlm.image_token_index = vocab_size  # never used: images are embedded and placed by us
        text = vlm.text_config
        text.hidden_size = backbone.width
        text.intermediate_size = backbone.mlp_dim
        text.num_attention_heads = backbone.num_heads
        text.num_key_value_heads = backbone.num_kv_heads
        text.head_dim = backbone.head_dim
        text.num_hidden_layers = backbone.depth
        text.hidden_activation = "gelu_pytorch_tanh"
        text.vocab_size = vocab_size
        text.dtype = "float32"
        text.use_adarms = False
        text.adarms_cond_dim = None
        vis = vlm.vision_config
        vis.image_size = image_size
        vis.hidden_size = vision.hidden_size
        vis.intermediate_size = vision.intermediate_size
        vis.num_hidden_layers = vision.num_layers
        vis.num_attention_heads = vision.num_heads
        vis.patch_size = vision.patch_size
        vis.projection_dim = backbone.width  # the image projection feeds the backbone: match its width
        vis.projector_hidden_act = "gelu_fast"
        vis.dtype = "float32"
        vlm.text_config.num_image_tokens = (image_size // vision.patch_size) ** 2
        vlm.projection_dim = backbone.width

        expert_cfg = CONFIG_MAPPING["gemma"](
            head_dim=expert.head_dim,
            hidden_size=expert.width,
            intermediate_size=expert.mlp_dim,
            num_attention_heads=expert.num_heads,
            num_hidden_layers=expert.depth,
            num_key_value_heads=expert.num_kv_heads,
            vocab_size=vocab_size,
            hidden_activation="gelu_pytorch_tanh",
            dtype="float32",
            use_adarms=True,  # time enters the expert through adaptive RMSNorm (pi0.5)
            adarms_cond_dim=expert.width,
        )
        self.paligemma = PaliGemmaForConditionalGenerationWithPiGemma(config=vlm)
        self.gemma_expert = PiGemmaForCausalLM(config=expert_cfg)
        # The expert reads no tokens and writes no logits: its embedding and LM head would be dead
        # weight (263M parameters at full size in pi05).
        self.gemma_expert.model.embed_tokens = None
        self.gemma_expert.lm_head = None
        self.to_bfloat16_for_selected_params(precision)
        self._set_requires_grad()
        for stack in (self.language_model, self.expert_model):  # one layer class of ours: see its docstring
            adopt_layers(stack)

    def train(self, mode: bool = True) -> KIPaliGemmaWithExpert:
        """Frozen parts stay in eval mode, as in pi05."""
        super().train(mode)
        if self.freeze_vision_encoder:
            self.paligemma.model.vision_tower.eval()
        if self.train_expert_only:
            self.paligemma.eval()
        return self

    @property
    def language_model(self) -> nn.Module:
        return self.paligemma.model.language_model

    @property
    def expert_model(self) -> nn.Module:
        return self.gemma_expert.model

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, V) float32 logits of the PaliGemma LM head."""
        head = self.paligemma.lm_head
        return head(hidden.to(head.weight.dtype)).float()
