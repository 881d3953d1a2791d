"""Checkpoint conversion.

    python tools/convert_checkpoint.py hf-to-megatron --hf DeepSeek-V2-Lite/ --out ckpt/most_init \
        --preset deepseek_v2_lite_most [--tp 2 --pp 1 --ep 4 --etp 1] [--seed 0] [--dtype bf16] [--verify]

hf-to-megatron reads the HF safetensors checkpoint (index + shards, bf16) and config.json (the
hub's rope_scaling or transformers 5's rope_parameters), maps it with the table in
megatron_most/convert/mapping.py onto MoSTModel (preset: MAMoE groups, audio paths), and writes
a torch_dist checkpoint in the HF checkpoint's dtype unless --dtype says otherwise. One
process, one tensor in memory at a time.

--tp/--pp/--ep/--etp (default 1/1/1 and etp = tp; --sp on by default when tp > 1, as
Megatron-Core requires for MoE with TP) name the layout the checkpoint is made for: it is
checked against config.json before any shard is read (EP divides the experts, TP the heads,
the dense and shared FFN widths and the padded vocabulary, ETP the expert FFN width, PP <= layers;
an error names the flag and exits 2 with nothing written), --verify runs the Megatron side
at it, and conversion.json in --out records it with the source, dtype and verify figures. The
torch_dist checkpoint itself is layout-independent: it reshards on load to any layout that
divides the model.

    python tools/convert_checkpoint.py megatron-to-hf --megatron ckpt/most_init --out hf_export/ \
        [--tokenizer DeepSeek-V2-Lite/] [--bos-id 100000 --eos-id 100001] [--format auto] \
        [--max-shard-size 5GB] [--dtype bf16] [--verify]

megatron-to-hf reads a torch_dist checkpoint (any layout) and its most_config.json one tensor at
a time and writes a Hugging Face checkpoint (safetensors shards + model.safetensors.index.json,
config.json, tokenizer files copied from --tokenizer). A text-only model with vanilla routing is
written in the plain DeepSeek-V2 format that transformers loads natively; a MoST model (MAMoE
routing, audio paths) in the MoST format: the whole padded vocabulary, the audio projection,
and the model code (configuration_most.py, modeling_most.py, auto_map) for
AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True). bos/eos/pad ids in config.json
come from --bos-id/--eos-id/--pad-id, else --tokenizer, else the source checkpoint's (recorded in
conversion.json by hf-to-megatron, with its generation_config.json, which is written back), else
DeepSeek-V2's 100000/100001.

A MoST model exported in the MoST format converts back with hf-to-megatron (any --preset: the
MoST config.json gives the MAMoE groups, masking, variant and audio paths).

--verify (both directions) runs the source and the converted model on the same inputs (text,
and text with unit tokens and audio-feature spans for a MoST model; both models in memory in
fp32), prints the max abs logit difference and PASS/FAIL; on FAIL nothing is written and the
exit status is 1. Other errors exit with 2. hf-to-megatron at a layout other than TP = PP = EP = 1
runs the converted model on lcm(tp*pp, etp*ep*pp) gloo processes on this machine.

Conversion and --verify run on the CPU on every machine (fp32 logits; this tool hides the GPUs
from CUDA before torch starts): conversion moves bytes, and a GPU holds no more than RAM.
"""

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: see the docstring

import argparse  # noqa: E402
import sys  # noqa: E402

from megatron_most.convert.cli import run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    h2m = sub.add_parser(
        "hf-to-megatron",
        help="HF DeepSeek-V2 (or MoST export) safetensors -> MoST torch_dist checkpoint",
        description="HF DeepSeek-V2 (or MoST-format export) safetensors -> MoST torch_dist checkpoint. The checkpoint reshards on load: it "
        "loads at any TP/PP/EP/ETP layout that divides the model. --tp/--pp/--ep/--etp name the layout it is made "
        "for: checked against config.json before anything is read or written, used by --verify, and recorded in "
        "conversion.json next to most_config.json.",
    )
    h2m.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + safetensors)")
    h2m.add_argument("--out", required=True, help="output checkpoint directory (must not exist or be empty)")
    h2m.add_argument("--preset", required=True, help="MoSTConfig preset giving MAMoE groups and audio paths")
    h2m.add_argument("--seed", type=int, default=0, help="seed of the newly initialised tensors")
    h2m.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), help="checkpoint dtype (default: the HF checkpoint's)"
    )
    h2m.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (default 1)")
    h2m.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (default 1)")
    h2m.add_argument("--ep", type=int, default=1, help="target expert-parallel size (default 1)")
    h2m.add_argument("--etp", type=int, default=None, help="target expert tensor-parallel size (default: --tp)")
    h2m.add_argument(
        "--sp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sequence parallelism in the target layout (default: on when --tp > 1)",
    )
    h2m.add_argument(
        "--verify",
        action="store_true",
        help="compare logits of the source and converted models, the converted one run at the target "
        "layout (gloo processes on this machine unless 1x1x1); FAIL exits 1 and writes nothing",
    )
    m2h = sub.add_parser("megatron-to-hf", help="MoST torch_dist checkpoint -> Hugging Face checkpoint")
    m2h.add_argument("--megatron", required=True, help="torch_dist checkpoint directory (with most_config.json)")
    m2h.add_argument("--out", required=True, help="output HF directory (must not exist or be empty)")
    m2h.add_argument("--tokenizer", help="directory whose tokenizer files are copied into --out (and give bos/eos ids)")
    m2h.add_argument("--bos-id", type=int, help="bos_token_id (default: the tokenizer's, the source's, 100000)")
    m2h.add_argument("--eos-id", type=int, help="eos_token_id (default: the tokenizer's, the source's, 100001)")
    m2h.add_argument("--pad-id", type=int, help="pad_token_id (default: the tokenizer's, the source's, none)")
    m2h.add_argument(
        "--format",
        default="auto",
        choices=("auto", "deepseek_v2", "most"),
        help="deepseek_v2 (text-only vanilla models), most (remote code), auto (default: plain when it fits)",
    )
    m2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    m2h.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="HF tensor dtype (default: as stored)")
    m2h.add_argument("--verify", action="store_true", help="compare logits of the source and exported models")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "megatron-to-hf":
        options = dict(
            megatron_dir=args.megatron,
            out_dir=args.out,
            tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size,
            fmt=args.format,
            bos_token_id=args.bos_id,
            eos_token_id=args.eos_id,
            pad_token_id=args.pad_id,
        )
    else:
        sp = args.tp > 1 if args.sp is None else args.sp
        options = dict(
            hf_dir=args.hf,
            out_dir=args.out,
            preset=args.preset,
            seed=args.seed,
            layout=dict(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sp=sp),
        )
    return run(args.command, dtype=args.dtype, verify=args.verify, **options)


if __name__ == "__main__":
    sys.exit(main())
