"""megatron_most: MoST (speech+text LLM with a Modality-Aware MoE) on Megatron-Core.

Floors, bottom to top (imports run downward only; tests/test_layering.py checks it):
`options`/`rejects` -> `platform` -> `moe`, `audio` -> `model` -> `data`, `convert` ->
`training`, `inference` -> `eval`, with the thin CLIs of `tools/` on top.

Importing the package never imports Transformer Engine or apex; GPU extras are picked at run
time by `megatron_most.platform`.
"""

from megatron_most import platform as _platform  # noqa: F401 - first: quiets Megatron's import warnings

__version__ = "0.1.0"
