"""Full-width hf-to-megatron conversion: peak memory and throughput against a plain copy.

    python benchmarks/convert_full_size.py [--layers N] [--dir /tmp]

1. Writes a random HF checkpoint with DeepSeek-V2-Lite's widths (hidden 2048, 16 heads of MLA,
   dense layer 0 of 10944, 64 routed experts of 1408 + 2 shared, vocab 102400) and N layers
   (default 8; 27 = the whole model, about 31 GB): bf16 safetensors shards of about 5 GB in the
   hub's per-expert layout, model.safetensors.index.json and the hub-form config.json. Written
   streaming: tensors are slices of one 256 MiB pool of N(0, 0.02) values, so generation holds
   no shard in memory.
2. Copies the shards byte for byte (read + write through a buffer, fsync), timed.
3. Converts them with `tools/convert_checkpoint.py hf-to-megatron --preset deepseek_v2_lite_most`
   in a subprocess, timed (process start and imports included), and takes the subprocess's peak
   RSS from getrusage(RUSAGE_CHILDREN).
   Before 2 and 3 the shards are dropped from the page cache (posix_fadvise DONTNEED), so both
   read from disk; both fsync what they write.
4. Deletes everything it wrote. Throughput = bytes of the HF shards / seconds. Targets: peak RSS
   <= 4 GiB, conversion >= 0.5 x copy. Last line:
       convert: X GB/s vs copy Y GB/s, peak RSS Z GiB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_most.convert.hf_config import hf_config_fields
from megatron_most.model.config import preset

ROOT = Path(__file__).resolve().parent.parent

SHARD_BYTES = 5 * 10**9
POOL = 128 * 2**20  # elements (bf16): 256 MiB


def hf_tensors(layers: int, most) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of DeepSeek-V2(-Lite) with `layers` layers, hub order."""
    h, heads, nope, rope, v = (
        most.hidden_size,
        most.num_attention_heads,
        most.qk_nope_head_dim,
        most.qk_rope_head_dim,
        most.v_head_dim,
    )
    lora, experts, moe = most.kv_lora_rank, most.mamoe.num_experts, most.moe_ffn_size
    shared = most.mamoe.shared_expert_size
    out = [("model.embed_tokens.weight", (most.text_vocab_size, h))]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * (nope + rope), h)),
            (p + "self_attn.kv_a_proj_with_mqa.weight", (lora + rope, h)),
            (p + "self_attn.kv_a_layernorm.weight", (lora,)),
            (p + "self_attn.kv_b_proj.weight", (heads * (nope + v), lora)),
            (p + "self_attn.o_proj.weight", (h, heads * v)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        if layer < most.first_k_dense:
            ffn = most.dense_ffn_size
            out += [
                (p + "mlp.gate_proj.weight", (ffn, h)),
                (p + "mlp.up_proj.weight", (ffn, h)),
                (p + "mlp.down_proj.weight", (h, ffn)),
            ]
            continue
        out.append((p + "mlp.gate.weight", (experts, h)))
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            out += [
                (q + "gate_proj.weight", (moe, h)),
                (q + "up_proj.weight", (moe, h)),
                (q + "down_proj.weight", (h, moe)),
            ]
        q = p + "mlp.shared_experts."
        out += [
            (q + "gate_proj.weight", (shared, h)),
            (q + "up_proj.weight", (shared, h)),
            (q + "down_proj.weight", (h, shared)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (most.text_vocab_size, h))]
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_checkpoint(directory: Path, layers: int) -> int:
    """The random bf16 HF checkpoint (shards + index + config.json); returns the shard bytes."""
    most = preset("deepseek_v2_lite").replace(num_layers=layers)
    tensors = hf_tensors(layers, most)
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)

    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(POOL, generator=gen) * 0.02).to(torch.bfloat16)
    pool_bytes = pool.view(torch.uint8).numpy()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(directory / file, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for _name, shape in shard:
                left = 2 * _numel(shape)
                start = 2 * int(torch.randint(0, POOL // 2, (1,), generator=gen))
                while left:  # slices of the pool (wrapping): distinct data per tensor, no big buffer
                    n = min(left, pool_bytes.nbytes - start)
                    f.write(memoryview(pool_bytes[start : start + n]))
                    left -= n
                    start = 0
            f.flush()
            os.fsync(f.fileno())
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = dict(
        architectures=["DeepseekV2ForCausalLM"],
        model_type="deepseek_v2",
        torch_dtype="bfloat16",
        bos_token_id=100000,
        eos_token_id=100001,
        **hf_config_fields(most, rope="scaling"),
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return sum((directory / f).stat().st_size for f in set(weight_map.values()))


def drop_cache(directory: Path) -> None:
    """Evict `directory`'s files from the page cache (they are clean: written and fsynced)."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def copy_shards(src: Path, dst: Path) -> float:
    """Seconds to copy every shard byte for byte (user-space buffer, fsync)."""
    dst.mkdir()
    start = time.perf_counter()
    for path in sorted(src.glob("*.safetensors")):
        with open(path, "rb") as fin, open(dst / path.name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 * 2**20)
            fout.flush()
            os.fsync(fout.fileno())
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (27 = DeepSeek-V2-Lite)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (needs about 2.2x the checkpoint)")
    args = parser.parse_args()
    if not 2 <= args.layers <= 27:
        parser.error(f"--layers {args.layers}: give 2..27 (layer 0 is dense)")
    work = Path(tempfile.mkdtemp(prefix="convert_full_size.", dir=args.dir))
    try:
        hf = work / "hf"
        hf.mkdir()
        start = time.perf_counter()
        nbytes = write_checkpoint(hf, args.layers)
        print(
            f"generated {args.layers} layers: {nbytes / 1e9:.2f} GB in {len(list(hf.glob('*.safetensors')))} shard(s) "
            f"({time.perf_counter() - start:.1f}s)",
            flush=True,
        )

        drop_cache(hf)
        copy_s = copy_shards(hf, work / "copy")
        shutil.rmtree(work / "copy")
        print(f"copy: {copy_s:.1f}s", flush=True)

        drop_cache(hf)
        command = [
            sys.executable,
            str(ROOT / "tools" / "convert_checkpoint.py"),
            "hf-to-megatron",
            "--hf",
            str(hf),
            "--out",
            str(work / "megatron"),
            "--preset",
            "deepseek_v2_lite_most",
        ]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        convert_s = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        if done.returncode:
            print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
            print(f"conversion failed with exit status {done.returncode}", file=sys.stderr)
            return 1
        written = sum(p.stat().st_size for p in (work / "megatron").rglob("*") if p.is_file())
        print(f"conversion: {convert_s:.1f}s, wrote {written / 1e9:.2f} GB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    convert_gbs, copy_gbs, peak_gib = nbytes / convert_s / 1e9, nbytes / copy_s / 1e9, peak / 2**30
    ok = peak_gib <= 4 and convert_gbs >= 0.5 * copy_gbs
    print(f"targets (peak RSS <= 4 GiB, >= 0.5 x copy): {'met' if ok else 'MISSED'}")
    print(f"convert: {convert_gbs:.2f} GB/s vs copy {copy_gbs:.2f} GB/s, peak RSS {peak_gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
