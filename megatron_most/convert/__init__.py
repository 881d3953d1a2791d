"""Floor 4 (beside `data`): checkpoint conversion between Hugging Face and Megatron-Core
`torch_dist`, streamed one tensor at a time: the tensor table (`mapping`), config.json fields
(`hf_config`), readers and writers for both formats, the two directions and their `--verify`.
Imports `model`, `moe`, `platform`, `options`."""

from megatron_most.convert.writer import WriteStats, write_torch_dist

__all__ = ["WriteStats", "write_torch_dist"]

# The conversions themselves (not imported here: they load transformers): hf_to_megatron.convert,
# megatron_to_hf.export, cli.run (tools/convert_checkpoint.py); what both share in common.py.
