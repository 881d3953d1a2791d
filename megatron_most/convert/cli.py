"""What tools/convert_checkpoint.py runs once its flags are parsed: one conversion in this
(single) process, its errors turned into the tool's exit status."""

from __future__ import annotations

import sys

from megatron_most.convert.common import DTYPES
from megatron_most.convert.hf_reader import CheckpointError
from megatron_most.convert.hf_to_megatron import convert
from megatron_most.convert.megatron_to_hf import export
from megatron_most.convert.verify import VerifyError
from megatron_most.model.config import preset
from megatron_most.options import ConfigError
from megatron_most.platform import ParallelLayout, has_gpu, initialize

COMMANDS = ("hf-to-megatron", "megatron-to-hf")


def run(command: str, *, dtype: str | None = None, **options) -> int:
    """Run `command` with `options` (the keyword arguments of its function):
    "hf-to-megatron": hf_to_megatron.convert, with `preset` (a name) for `base` and `layout` as the
    ParallelLayout fields; "megatron-to-hf": megatron_to_hf.export. `dtype` is a DTYPES name.
    Returns the exit status: 0, 1 when --verify FAILs, 2 for any other error of the inputs
    (checkpoint, config, layout, --out), each printed to stderr as "error: ..."."""
    if command not in COMMANDS:
        raise ValueError(f"command {command!r}: choose one of {COMMANDS}")
    dtype = DTYPES[dtype] if dtype else None
    if has_gpu():
        print(
            "error: the converter runs on the CPU; hide the GPUs before torch starts (CUDA_VISIBLE_DEVICES='', as "
            "tools/convert_checkpoint.py does)",
            file=sys.stderr,
        )
        return 2
    try:
        initialize(ParallelLayout())
        if command == "megatron-to-hf":
            export(dtype=dtype, **options)
        else:
            layout = ParallelLayout(**options.pop("layout"))
            convert(base=preset(options.pop("preset")), dtype=dtype, layout=layout, **options)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["COMMANDS", "run"]
