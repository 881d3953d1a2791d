"""Import the Megatron-Core modules that warn about missing GPU extras, with those warnings
silenced for the duration of the import only.

On machines without Transformer Engine or apex, Megatron-Core warns once per module at import
("Apex is not installed. Falling back to ..."); megatron_most picks its local modules itself on
such machines (`platform.has_transformer_engine`), so the warnings only bury a tool's output.
`warnings.catch_warnings` restores the caller's filters afterwards: nothing is filtered for
the rest of the user's process, and the modules stay imported, so they do not warn again.
Imported first by `megatron_most.platform` (and so by the package root), before any other
Megatron import.
"""

from __future__ import annotations

import importlib
import warnings

NOISY_MODULES = (
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.models.backends",
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.transformer.multi_latent_attention",
)
MISSING_EXTRAS = r"(Transformer Engine and )?Apex (is|are) not installed|Transformer Engine and Apex are not installed"

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=MISSING_EXTRAS, category=UserWarning)
    for _name in NOISY_MODULES:
        importlib.import_module(_name)
