"""Checkpoint conversion: write Megatron-Core `torch_dist` checkpoints without holding the model."""

from megatron_most.convert.writer import WriteStats, write_torch_dist

__all__ = ["WriteStats", "write_torch_dist"]

# HF DeepSeek-V2 -> MoST conversion (import lazily: megatron_most.convert.hf_to_megatron / mapping / hf_reader)
