"""A replicated (non-tensor-parallel) linear layer for Megatron's local MLA spec.

MLA's key/value down-projection output holds both the compressed latent and the shared rotary
key `k_pos_emb`, which every attention head uses. Megatron 0.16.1's local spec makes it a
ColumnParallelLinear: each TP rank then keeps only its own columns of the gradient of
`k_pos_emb`, which covers only its own heads, and the other heads' contributions are lost
(a 1e-4-scale gradient error at TP2; Transformer Engine's spec avoids it with a duplicated
TELinear). This layer is that duplicated projection without TE: full weights on every rank,
sequence-parallel input, weight gradients summed over TP by finalize_model_grads.

`LocalMLASelfAttention` is the local spec's attention module that accepts it: Megatron's MLA
takes a replicated kv down-projection only under its module-level name `Linear`, which is
bound to a TE-era class (None without Transformer Engine). The subclass points that name at
`ReplicatedLinear` for the duration of its own constructor and restores it afterwards, so no
other model in the process (a TE build included) sees a change.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from megatron.core.transformer import multi_latent_attention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_most.platform import init_device

_seam = threading.Lock()


class ReplicatedLinear(torch.nn.Module):
    def __init__(self, input_size, output_size, *, config, init_method, bias=False, skip_bias_add=False, **_):
        super().__init__()
        where = dict(dtype=config.params_dtype, device=init_device(config))
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, **where))
        if config.perform_initialization:
            init_method(self.weight)
        self.bias = torch.nn.Parameter(torch.zeros(output_size, **where)) if bias else None
        self.skip_bias_add = skip_bias_add
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x):  # x: [seq(/tp), batch, input]
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {}, sharded_offsets)  # replicated


@contextlib.contextmanager
def _mla_accepts(linear: type):
    """Megatron seam: MLA checks its kv_down class against the module-level `Linear`."""
    with _seam:
        saved = multi_latent_attention.Linear
        multi_latent_attention.Linear = linear
        try:
            yield
        finally:
            multi_latent_attention.Linear = saved


class LocalMLASelfAttention(MLASelfAttention):
    """MLASelfAttention whose spec may name `ReplicatedLinear` for linear_kv_down_proj."""

    def __init__(self, *args, **kwargs):
        with _mla_accepts(ReplicatedLinear):
            super().__init__(*args, **kwargs)
