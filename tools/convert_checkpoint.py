"""Checkpoint conversion.

    python tools/convert_checkpoint.py hf-to-megatron --hf DeepSeek-V2-Lite/ --out ckpt/most_init \
        --preset deepseek_v2_lite_most [--seed 0] [--verify]

hf-to-megatron reads the HF safetensors checkpoint (index + shards, bf16) and config.json (the
hub's rope_scaling or transformers 5's rope_parameters), maps it with the table in
megatron_most/convert/mapping.py onto MoSTModel (preset: MAMoE groups, audio paths), and writes
a torch_dist checkpoint that loads at any TP/PP/EP layout. One process, one tensor in memory at
a time. --verify loads both models and prints the max abs logit difference and PASS/FAIL
(needs memory for both models in fp32).

    python tools/convert_checkpoint.py megatron-to-hf --megatron ckpt/most_init --out hf_export/ \
        [--tokenizer DeepSeek-V2-Lite/] [--max-shard-size 5GB] [--dtype bf16] [--verify]

megatron-to-hf reads a torch_dist checkpoint (any layout) and its most_config.json one tensor at
a time and writes a Hugging Face checkpoint (safetensors shards + model.safetensors.index.json,
config.json, tokenizer files copied from --tokenizer) in the plain DeepSeek-V2 format that
transformers loads natively. Only text-only models (vanilla routing, no audio) fit that format;
MoST models are refused. --verify compares the logits of the source MoSTModel (TP1) and of the
exported transformers model and exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h2m = sub.add_parser("hf-to-megatron", help="HF DeepSeek-V2 safetensors -> MoST torch_dist checkpoint")
    h2m.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    h2m.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    h2m.add_argument("--preset", required=True, help="MoSTConfig preset giving MAMoE groups and audio paths")
    h2m.add_argument("--seed", type=int, default=0, help="seed of the newly initialised tensors")
    h2m.add_argument("--verify", action="store_true", help="compare logits of the source and converted models")
    m2h = sub.add_parser("megatron-to-hf", help="MoST torch_dist checkpoint -> HF DeepSeek-V2 safetensors (text-only models)")
    m2h.add_argument("--megatron", required=True, help="torch_dist checkpoint directory (with most_config.json)")
    m2h.add_argument("--out", required=True, help="output HF directory (must not exist or be empty)")
    m2h.add_argument("--tokenizer", help="directory whose tokenizer files are copied into --out")
    m2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    m2h.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="HF tensor dtype (default: as stored)")
    m2h.add_argument("--verify", action="store_true", help="compare logits of the source and exported models")
    args = parser.parse_args(argv)
    if args.command == "megatron-to-hf":
        return _megatron_to_hf(args)

    from megatron_most.convert.hf_reader import CheckpointError
    from megatron_most.convert.hf_to_megatron import convert, verify
    from megatron_most.model.config import preset
    from megatron_most.options import ConfigError
    from megatron_most.platform import ParallelLayout, initialize

    try:
        base = preset(args.preset)
        initialize(ParallelLayout())
        most, _ = convert(args.hf, args.out, base, seed=args.seed)
        if args.verify:
            _, ok = verify(args.hf, args.out, most)
            return 0 if ok else 1
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _megatron_to_hf(args) -> int:
    from megatron_most.convert.hf_reader import CheckpointError
    from megatron_most.convert.megatron_to_hf import DTYPES, export, verify
    from megatron_most.options import ConfigError
    from megatron_most.platform import ParallelLayout, initialize

    try:
        initialize(ParallelLayout())
        most, _ = export(args.megatron, args.out, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
                         dtype=DTYPES[args.dtype] if args.dtype else None)
        if args.verify:
            _, ok = verify(args.megatron, args.out, most)
            return 0 if ok else 1
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
