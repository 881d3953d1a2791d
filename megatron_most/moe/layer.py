"""MAMoELayer: Megatron's MoELayer with per-token modality ids and expert placement.

Modality ids travel the way Megatron threads its `padding_mask` argument (GPTModel ->
TransformerBlock -> TransformerLayer -> MLP -> router), which already survives full and selective
activation recompute (it is a checkpoint input) and is split along the sequence under sequence
parallelism on the first pipeline stage. MAMoE sends its *routing info* through that argument:
one int8 [batch, seq] tensor from `moe.modality.pack_routing_info` (padding, text, audio). Where
Megatron's signatures name it `padding_mask` (MoELayer.forward, TopKRouter.routing) we keep the
name; everywhere else it is `routing_info`. This layer splits it along the
sequence on later pipeline stages too (Megatron 0.16.1 splits only on the first), hands it to
the MAMoE router, and uses the MAMoE dispatcher for placement.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_most.moe.config import MAMoEConfig
from megatron_most.moe.dispatcher import MAMoEAlltoAllDispatcher


class MAMoELayer(MoELayer):
    def __init__(
        self, config, submodules=None, layer_number=None, pg_collection=None, *, mamoe: MAMoEConfig, slots: list[int]
    ):
        super().__init__(config, submodules, layer_number, pg_collection)
        if layer_number is not None:  # TransformerLayer sets it too; a layer built alone needs it for stats
            self.set_layer_number(layer_number)
        self.mamoe = mamoe
        self.token_dispatcher = MAMoEAlltoAllDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config=self.config,
            pg_collection=pg_collection or get_default_pg_collection(),
            slots=slots,
        )
        if self.use_shared_expert and self.shared_expert_overlap:
            self.token_dispatcher.set_shared_experts(self.shared_experts)

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        """hidden_states [seq, batch, hidden]; `padding_mask` is the routing info [batch, seq]."""
        if intermediate_tensors is not None:
            raise NotImplementedError("MAMoELayer does not support the EP-overlap partial forward")
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE with tensor parallelism needs sequence_parallel=True for training")
        routing_info = self._local_routing_info(padding_mask, hidden_states)  # [seq, batch] int8

        def moe(hidden_states, routing_info):
            shared = self.shared_experts_compute(hidden_states)
            probs, routing_map = self.route(hidden_states, routing_info)
            hidden_states, probs = self.preprocess(hidden_states, probs, routing_map)
            dispatched, probs = self.dispatch(hidden_states, probs)
            output, mlp_bias = self.routed_experts_compute(dispatched, probs)
            return self.postprocess(self.combine(output), shared), mlp_bias

        if self.moe_layer_recompute:
            return tensor_parallel.checkpoint(moe, False, hidden_states, routing_info)
        return moe(hidden_states, routing_info)

    def _local_routing_info(self, info, hidden_states):
        seq, batch = hidden_states.shape[:2]
        if info is None:
            if self.mamoe.modality_routing:
                raise ValueError(
                    "MAMoE layer got no modality ids: pass pack_routing_info(modality_ids, padding_mask) "
                    "as the model's padding_mask (or use variant='vanilla')"
                )
            return torch.zeros(seq, batch, dtype=torch.int8, device=hidden_states.device)
        info = info.transpose(0, 1)  # [seq or full seq, batch]
        if info.dtype != torch.int8:
            raise ValueError(f"MAMoE routing info must be int8 from pack_routing_info, got {info.dtype}")
        if info.shape[0] != seq and self.config.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            if info.shape[0] == seq * tp:  # later pipeline stages receive the full sequence
                rank = parallel_state.get_tensor_model_parallel_rank()
                info = info[rank * seq : (rank + 1) * seq]
        if tuple(info.shape) != (seq, batch):
            raise ValueError(
                f"MAMoE routing info covers [seq={info.shape[0]}, batch={info.shape[1]}] but the layer's "
                f"tokens are [seq={seq}, batch={batch}]: modality ids must match the input tokens"
            )
        return info.contiguous()
