"""Inference: autoregressive generation of MoST with a latent key/value cache for MLA.

Floor 5 (beside `training`): it imports `model`, `moe`, `platform` and `options`.
"""

from megatron_most.inference.generate import Prompt, Sampling, generate

__all__ = ["Prompt", "Sampling", "generate"]
