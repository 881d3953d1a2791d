"""MoSTModel: Megatron's GPTModel with MLA, MAMoE layers and the two audio input paths.

Text tokens, discrete HuBERT unit tokens and continuous HuBERT features share one sequence:

- Discrete path: units are vocabulary entries (moe.vocab.TokenLayout) embedded and predicted
  like text; they carry modality 1.
- Continuous path: each audio frame occupies one <feat> placeholder position between <boa> and
  <eoa>; its feature vector [feature_dim] is projected to the hidden size and replaces the
  placeholder's embedding. The sequence length never changes, so labels, loss mask, position
  ids and modality ids stay aligned; placeholders carry modality 1 and are never targets.

Packed rows (position ids restarting at 0 inside a row, as data/dataset.py makes them) get a
block-diagonal causal mask on local specs and THD PackedSeqParams on Transformer Engine, both
derived here from the position ids (model/packing.py).

Modality ids derive from the token ids on every pipeline stage, so generation needs no extra
input; they reach the MAMoE layers through Megatron's `padding_mask` argument (moe.layer).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel

from megatron_most.model.config import MoSTConfig
from megatron_most.model.packing import attention_inputs
from megatron_most.model.spec import decoder_block_spec
from megatron_most.moe import mamoe_block_spec, pack_routing_info
from megatron_most.options import ConfigError
from megatron_most.platform import ParallelLayout, has_transformer_engine, init_device, initialize, place, shutdown


class MoSTModel(GPTModel):
    def __init__(
        self,
        most: MoSTConfig,
        config,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage=None,
        use_te: bool | None = None,
    ):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if most.tokens.padded_size % tp:
            raise ConfigError(
                f"tensor-parallel size {tp} does not divide the padded vocabulary {most.tokens.padded_size}: "
                "use a power-of-two TP size"
            )
        super().__init__(
            config,
            mamoe_block_spec(decoder_block_spec(config, vp_stage=vp_stage, use_te=use_te), config, most.mamoe),
            vocab_size=most.tokens.padded_size,
            max_sequence_length=most.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            position_embedding_type="none",  # MLA applies its own YaRN rotary embedding
            share_embeddings_and_output_weights=False,
            scatter_embedding_sequence_parallel=False,  # audio frames go in before the SP scatter
            vp_stage=vp_stage,
        )
        self.most = most
        self.tokens = most.tokens
        self.uses_te = has_transformer_engine() if use_te is None else use_te
        self.audio_projection = None
        if pre_process and most.audio_feature_dim:
            self.audio_projection = torch.nn.Linear(
                most.audio_feature_dim,
                config.hidden_size,
                bias=True,
                dtype=config.params_dtype,
                device=init_device(config),
            )
            config.init_method(self.audio_projection.weight)
            torch.nn.init.zeros_(self.audio_projection.bias)

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq]
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        audio_features: torch.Tensor | None = None,  # [frames, feature_dim], in placeholder order
        audio_lengths: torch.Tensor | None = None,  # [spans] frames per <boa>..<eoa> span, if known
        padding_mask: torch.Tensor | None = None,  # [batch, seq] bool, True = padding
        **kwargs,
    ):
        if self.pre_process and self.most.validate_inputs:
            self.tokens.validate(input_ids, self.most.seq_length, audio_lengths)
        attention_mask, packed = attention_inputs(position_ids, attention_mask, self.uses_te)
        routing = pack_routing_info(self.tokens.modality(input_ids), padding_mask)
        shape = input_ids.shape
        if packed is not None:  # THD: the rows become one sequence of batch * seq tokens
            input_ids, position_ids, routing = (t.reshape(1, -1) for t in (input_ids, position_ids, routing))
            labels = labels.reshape(1, -1) if labels is not None else None
        decoder_input = self.embed(input_ids, position_ids, audio_features) if self.pre_process else None
        output = super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            padding_mask=routing,
            packed_seq_params=packed,
            **kwargs,
        )
        if packed is not None and self.post_process:  # [1, batch * seq(, vocab)] -> [batch, seq(, vocab)]
            output = output.reshape(*shape, *output.shape[2:])
        return output

    def embed(self, input_ids, position_ids, audio_features=None) -> torch.Tensor:
        """Token embeddings with audio frames in place: [seq(/tp under SP), batch, hidden]."""
        embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [seq, batch, hidden]
        placeholders = input_ids == self.tokens.feature  # [batch, seq]
        if audio_features is not None or placeholders.any():
            embeddings = self._place_audio(embeddings, placeholders, audio_features)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def _place_audio(self, embeddings, placeholders, audio_features):
        if self.audio_projection is None:
            raise ValueError(
                "input has <feat> positions or audio_features but the model has no continuous audio path (audio_feature_dim=0)"
            )
        if audio_features is None:
            raise ValueError(f"input has {int(placeholders.sum())} <feat> positions but no audio_features were given")
        if audio_features.dim() != 2 or audio_features.shape[1] != self.most.audio_feature_dim:
            raise ValueError(
                f"audio_features has shape {tuple(audio_features.shape)}, expected [frames, {self.most.audio_feature_dim}] "
                "(MoSTConfig.audio_feature_dim)"
            )
        frames = int(placeholders.sum())
        if audio_features.shape[0] != frames:
            raise ValueError(
                f"audio_features has {audio_features.shape[0]} frames but the input has {frames} <feat> positions"
            )
        weight = self.audio_projection.weight  # features come from the data path on the CPU: move them here
        projected = self.audio_projection(
            audio_features.to(device=weight.device, dtype=weight.dtype)
        )  # [frames, hidden]
        by_sample = embeddings.transpose(0, 1)  # [batch, seq, hidden]: frames are in sample order
        placed = by_sample.masked_scatter(placeholders.unsqueeze(-1), projected.to(by_sample.dtype))
        return placed.transpose(0, 1).contiguous()  # [seq, batch, hidden]


def build_model(most: MoSTConfig, config, *, vp_stage=None, use_te: bool | None = None) -> MoSTModel:
    """The MoST model chunk for this pipeline stage (Transformer Engine modules when `use_te`,
    default: when installed on a GPU machine), on this rank's device (`platform.place`)."""
    model = MoSTModel(
        most,
        config,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        use_te=use_te,
    )
    return place(model)


@contextlib.contextmanager
def single_rank_groups(most: MoSTConfig):
    """Megatron's parallel groups at TP=PP=EP=1 for building the whole model in this process.

    Initialises (and afterwards shuts down) a one-process group when none exists. An existing
    one is reused only if its model-parallel sizes are all 1: a model built under TP/PP/EP
    would hold only this rank's shard.
    """
    if parallel_state.model_parallel_is_initialized():
        sizes = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if sizes != (1, 1, 1):
            raise ConfigError(
                f"building the whole model needs TP=PP=EP=1, but this process has TP/PP/EP groups of sizes {sizes}: "
                "call it before initialising model parallelism or from a separate process (tools/estimate.py)"
            )
        yield
        return
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ConfigError(
            "building the whole model: torch.distributed is initialised without Megatron's groups; call it in a fresh process"
        )
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    try:
        yield
    finally:
        shutdown()


def build_meta_model(most: MoSTConfig):
    """The whole MoSTModel (TP=PP=EP=1) with every parameter on the meta device (no storage).

    Megatron's linears allocate on `torch.cuda.current_device()` unless use_cpu_initialization
    is set, in which case they follow the default device (here: meta); perform_initialization
    is off because there is nothing to initialise. Non-parameter buffers are still allocated:
    Megatron builds the YaRN cos/sin caches on the CPU whatever the default device (about 2 MiB
    per layer for DeepSeek-V2-Lite).
    Must run inside `single_rank_groups`.
    """
    config = most.transformer_config(ParallelLayout(), perform_initialization=False, use_cpu_initialization=True)
    # Local modules: TE allocates on the GPU whatever the default device; counts are identical.
    with torch.device("meta"):
        model = build_model(most, config, use_te=False)
    real = [name for name, p in model.named_parameters() if not p.is_meta]
    if real:
        raise RuntimeError(f"build_meta_model: parameters {real[:5]} were allocated off the meta device")
    return model
