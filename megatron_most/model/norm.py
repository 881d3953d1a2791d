"""RMSNorm / LayerNorm for Megatron's local (non-Transformer-Engine) layer specs.

Megatron's WrappedTorchNorm refuses sequence parallelism although nothing in a norm depends
on it: with SP each tensor-parallel rank normalises its own sequence slice with the same
weight, and the weight gradient must be summed over the TP group. Marking the parameters
`sequence_parallel` makes Megatron's finalize_model_grads do that all-reduce, as it does for TENorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_most.options import ConfigError


class Norm(torch.nn.Module):
    """Drop-in for TENorm / WrappedTorchNorm (same constructor) with sequence-parallel support."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ):
        super().__init__()
        self.kind = normalization or config.normalization
        if self.kind not in ("RMSNorm", "LayerNorm"):
            raise ConfigError(f"normalization={self.kind!r}: supported values are 'RMSNorm' and 'LayerNorm'")
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma or config.layernorm_zero_centered_gamma
        init = 0.0 if self.zero_centered_gamma else 1.0
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), init, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if self.kind == "LayerNorm" else None
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [seq, batch, hidden]
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        shape = (x.shape[-1],)
        if self.kind == "RMSNorm":
            return F.rms_norm(x, shape, weight, self.eps)
        return F.layer_norm(x, shape, weight, self.bias, self.eps)
