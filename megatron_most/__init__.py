"""megatron_most: MoST (speech+text LLM with a Modality-Aware MoE) on Megatron-Core.

Importing the package never imports Transformer Engine or apex; GPU extras are picked at run
time by `megatron_most.platform`.
"""

__version__ = "0.1.0"

import warnings as _warnings

# Megatron-Core warns on import when Transformer Engine / apex are absent. megatron_most picks
# the local modules itself on such machines (platform.has_transformer_engine), so the warnings
# only bury the tools' output.
_warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex is not installed", category=UserWarning)
_warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning)
