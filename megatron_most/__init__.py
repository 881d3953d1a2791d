"""megatron_most: MoST (speech+text LLM with a Modality-Aware MoE) on Megatron-Core.

Importing the package never imports Transformer Engine or apex; GPU extras are picked at run
time by `megatron_most.platform`.
"""

__version__ = "0.1.0"
