"""MoST for Hugging Face transformers 5: DeepSeek-V2(-Lite) decoder + modality-aware MoE (MAMoE)
+ discrete (unit tokens) and continuous (<feat> frames) audio inputs.

Self-contained: imports only torch and transformers (it is copied next to exported weights and
loaded with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`).

- Every token has a modality, derived from its id: 1 for unit tokens and <feat>, else 0
  (`modality_ids` may be passed instead when only `inputs_embeds` are given).
- MoE layers: router logits over all experts; scores = softmax in fp32; a token may only reach
  experts of its modality's group: `zero_after_softmax` zeroes the other group's scores,
  `renormalize_in_group` masks its logits to -inf before the softmax; top-k of the masked scores
  are the weights (not renormalised). `variant="vanilla"` skips the masking, `"no_shared"` has
  no shared experts; otherwise the shared-expert MLP is added for every token. Padding
  (attention_mask == 0) gets no routed expert.
- Continuous audio: `audio_features` [frames, audio_feature_dim] are projected by
  `model.audio_projection` (Linear with bias) and replace the embeddings at the <feat>
  positions, in batch-major order. The sequence length never changes.

Tensor names follow the DeepSeek-V2 hub layout (experts stored one module per index):
  model.layers.L.mlp.gate.weight, model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight,
  model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight, ...
plus model.audio_projection.{weight,bias}.
"""

import inspect

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2MLP,
    DeepseekV2RMSNorm,
    DeepseekV2RotaryEmbedding,
)

from .configuration_most import MoSTHFConfig

MIN_TRANSFORMERS = "5.15"
"""Oldest release this code is tested on; DeepseekV2 attention in earlier 5.x releases computes
other logits for the same weights."""
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"MoST remote code needs transformers>={MIN_TRANSFORMERS}, found {transformers.__version__}: "
        f"pip install -U 'transformers>={MIN_TRANSFORMERS},<6'"
    )

# transformers 5.x renamed the cache argument (`past_key_values` -> `cache`, with
# `cache_position` dropped) and the output field with it; this file follows whichever API the
# installed release has, read off its own signatures, so one export loads on every 5.x release.
_ATTENTION_ARGS = inspect.signature(DeepseekV2Attention.forward).parameters
CACHE_ARG = "cache" if "cache" in _ATTENTION_ARGS else "past_key_values"
_MASK_ARGS = inspect.signature(create_causal_mask).parameters
_OUTPUT_CACHE = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"
assert _OUTPUT_CACHE in MoeCausalLMOutputWithPast.__dataclass_fields__


def _causal_mask(config, embeds, attention_mask, cache, position_ids):
    """create_causal_mask under the installed release's argument names."""
    given = {
        "config": config,
        "input_embeds": embeds,
        "inputs_embeds": embeds,
        "attention_mask": attention_mask,
        "cache": cache,
        "past_key_values": cache,
        "position_ids": position_ids,
        "cache_position": position_ids[0],
    }
    return create_causal_mask(**{name: value for name, value in given.items() if name in _MASK_ARGS})


def _cache_args(cache, position_ids) -> dict:
    """Keyword arguments naming the cache for the installed release's attention modules."""
    args = {CACHE_ARG: cache}
    if "cache_position" in _ATTENTION_ARGS:
        args["cache_position"] = position_ids[0]
    return args


def token_modality(input_ids: torch.Tensor, config: MoSTHFConfig) -> torch.Tensor:
    """[batch, seq] long: 1 for unit tokens and <feat> placeholders, 0 otherwise."""
    if not config.has_audio_tokens:
        return torch.zeros_like(input_ids)
    first = config.first_unit_token_id
    unit = (input_ids >= first) & (input_ids < first + config.num_units)
    return (unit | (input_ids == config.feature_token_id)).long()


class MoSTRouter(nn.Module):
    """Router ("gate"): weight [experts, hidden]; returns (logits, topk weights, topk indices)."""

    def __init__(self, config: MoSTHFConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        # Plain list, not a buffer: from_pretrained builds modules on the meta device and would
        # leave a non-persistent buffer uninitialised.
        self.groups = config.expert_groups()

    def allowed(self, device) -> torch.Tensor:
        """[2, experts] bool: row m marks the experts a token of modality m may reach."""
        allowed = torch.zeros(2, self.num_experts, dtype=torch.bool, device=device)
        for modality, experts in enumerate(self.groups):
            allowed[modality, experts] = True
        return allowed

    def forward(self, hidden_states: torch.Tensor, modality: torch.Tensor | None = None):
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = F.linear(hidden_states.float(), self.weight.float())  # [tokens, experts], fp32
        if self.config.variant == "vanilla":
            scores = torch.softmax(logits, dim=-1)
        else:
            if modality is None:
                modality = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            allowed = self.allowed(logits.device)[modality.reshape(-1)]  # [tokens, experts]
            if self.config.masking == "zero_after_softmax":
                scores = torch.softmax(logits, dim=-1) * allowed
            else:
                scores = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        weights, indices = torch.topk(scores, self.top_k, dim=-1)
        return logits, weights * self.config.routed_scaling_factor, indices


class MoSTMoE(nn.Module):
    def __init__(self, config: MoSTHFConfig):
        super().__init__()
        self.config = config
        self.gate = MoSTRouter(config)
        self.experts = nn.ModuleList(
            [
                DeepseekV2MLP(config, intermediate_size=config.moe_intermediate_size)
                for _ in range(config.n_routed_experts)
            ]
        )
        shared = config.n_shared_experts or 0
        self.shared_experts = None
        if config.variant != "no_shared" and shared > 0:
            self.shared_experts = DeepseekV2MLP(config, intermediate_size=config.moe_intermediate_size * shared)

    def forward(self, hidden_states, modality=None, valid=None):
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat, modality)
        if valid is not None:  # padding reaches no routed expert
            weights = weights * valid.reshape(-1, 1).to(weights.dtype)
        out = torch.zeros_like(flat)
        for e in torch.unique(indices).tolist():
            token, slot = torch.where(indices == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        out = out.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class MoSTDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoSTHFConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = DeepseekV2Attention(config=config, layer_idx=layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.mlp = MoSTMoE(config) if self.is_moe else DeepseekV2MLP(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        modality=None,
        valid=None,
        **kwargs,
    ):
        """kwargs: the cache arguments of `_cache_args` and the attention backend's options."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if self.is_moe:
            hidden_states = self.mlp(hidden_states, modality, valid)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class MoSTPreTrainedModel(PreTrainedModel):
    config: MoSTHFConfig
    config_class = MoSTHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoSTDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = False
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MoSTRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class MoSTModel(MoSTPreTrainedModel):
    def __init__(self, config: MoSTHFConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.audio_projection = (
            nn.Linear(config.audio_feature_dim, config.hidden_size, bias=True) if config.audio_feature_dim else None
        )
        self.layers = nn.ModuleList([MoSTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekV2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed(self, input_ids, audio_features=None):
        """Token embeddings with projected audio frames at the <feat> positions. In generation
        the features go with the step whose input holds the <feat> positions (the prompt) and
        no later step (`MoSTForCausalLM.prepare_inputs_for_generation`)."""
        embeddings = self.embed_tokens(input_ids)
        if not self.config.has_audio_tokens:
            return embeddings
        placeholders = input_ids == self.config.feature_token_id  # [batch, seq]
        frames = int(placeholders.sum())
        if audio_features is None:
            if frames:
                raise ValueError(f"input has {frames} <feat> positions but no audio_features were given")
            return embeddings
        if self.audio_projection is None:
            raise ValueError("audio_features given but the model has no continuous audio path (audio_feature_dim=0)")
        if audio_features.dim() != 2 or audio_features.shape[1] != self.config.audio_feature_dim:
            raise ValueError(
                f"audio_features has shape {tuple(audio_features.shape)}, expected [frames, {self.config.audio_feature_dim}]"
            )
        if audio_features.shape[0] != frames:
            raise ValueError(
                f"audio_features has {audio_features.shape[0]} frames but the input has {frames} <feat> positions"
            )
        weight = self.audio_projection.weight
        projected = self.audio_projection(audio_features.to(device=weight.device, dtype=weight.dtype))
        return embeddings.masked_scatter(placeholders.unsqueeze(-1), projected.to(embeddings.dtype))

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        audio_features=None,
        modality_ids=None,
        output_hidden_states=None,
        cache=None,
        **kwargs,
    ):
        """`cache` (transformers >= the rename) and `past_key_values` (before it) are the same
        argument; `cache_position`, which older releases pass, follows from the cache length."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        kwargs.pop("cache_position", None)
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0

        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, audio_features)
        batch, seq = inputs_embeds.shape[:2]
        if modality_ids is None:
            modality_ids = (
                token_modality(input_ids, self.config)
                if input_ids is not None
                else torch.zeros(batch, seq, dtype=torch.long, device=inputs_embeds.device)
            )
        valid = None
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] >= seq:
            valid = attention_mask[:, -seq:].bool()

        if position_ids is None:
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_seen).unsqueeze(0)

        causal_mask = _causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = () if output_hidden_states else None
        for layer in self.layers[: self.config.num_hidden_layers]:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                modality=modality_ids,
                valid=valid,
                **_cache_args(cache, position_ids),
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden, **{_OUTPUT_CACHE: cache}
        )


class MoSTForCausalLM(MoSTPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoSTHFConfig):
        super().__init__(config)
        self.model = MoSTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """generate() hands every step the prompt's `audio_features`; they belong to the step
        whose input holds the <feat> positions (the prompt, or its first chunk) and to no
        later cached step, which sees only the new tokens."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        step_ids = inputs.get("input_ids")
        if self.config.has_audio_tokens and step_ids is not None:
            if not bool((step_ids == self.config.feature_token_id).any()):
                inputs.pop("audio_features", None)
        return inputs

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        audio_features=None,
        modality_ids=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """labels: [batch, seq] in the usual HF convention (shifted inside); <feat> positions are
        never targets. audio_features: [frames, audio_feature_dim], frames in <feat> order."""
        kwargs.pop("output_attentions", None)
        kwargs.pop("output_router_logits", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            audio_features=audio_features,
            modality_ids=modality_ids,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            if self.config.has_audio_tokens:
                labels = labels.masked_fill(labels == self.config.feature_token_id, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_OUTPUT_CACHE: getattr(outputs, _OUTPUT_CACHE)},
        )


__all__ = ["MoSTPreTrainedModel", "MoSTModel", "MoSTForCausalLM", "token_modality"]
