"""Checkpoint conversion.

    python tools/convert_checkpoint.py hf-to-megatron --hf DeepSeek-V2-Lite/ --out ckpt/most_init \
        --preset deepseek_v2_lite_most [--seed 0] [--verify]

hf-to-megatron reads the HF safetensors checkpoint (index + shards, bf16) and config.json (the
hub's rope_scaling or transformers 5's rope_parameters), maps it with the table in
megatron_most/convert/mapping.py onto MoSTModel (preset: MAMoE groups, audio paths), and writes
a torch_dist checkpoint that loads at any TP/PP/EP layout. One process, one tensor in memory at
a time. --verify loads both models and prints the max abs logit difference and PASS/FAIL
(needs memory for both models in fp32).
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
