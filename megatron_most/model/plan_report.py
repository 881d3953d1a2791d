"""The planner's outputs: a ranked table for people, JSON for scripts (tools/plan_layout.py)."""

from __future__ import annotations

import json

from megatron_most.model.hardware import GEMM_EFFICIENCY, GPUS, LINK_EFFICIENCY, MEMORY_USABLE


def best_per_layout(plans: list) -> list:
    """The first (best) plan of each distinct TP/PP/VPP/EP/ETP layout, in rank order."""
    seen, out = set(), []
    for p in plans:
        key = (p.tp, p.pp, p.vpp, p.ep, p.etp)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def format_table(plans: list, top: int = 8, distinct: bool = True) -> str:
    """Markdown table of the `top` plans (the best schedule of each layout when `distinct`)."""
    rows = best_per_layout(plans) if distinct else list(plans)
    first = plans[0]
    hw = GPUS[first.gpu]
    lines = [
        f"{first.preset or 'model'} on {first.gpus} x {hw.name}: seq {first.seq_length}, global batch "
        f"{first.global_batch}; {sum(p.fits for p in plans)} of {len(plans)} plans fit "
        f"(memory <= {MEMORY_USABLE:.0%} of {hw.memory_gib:g} GiB; GEMM efficiency {GEMM_EFFICIENCY}, "
        f"link efficiency {LINK_EFFICIENCY})",
        "",
        "| # | layout | mbs | recompute | GiB/GPU | states | activations | fits | step s | TFLOP/s/GPU | MFU "
        "| compute | TP | EP | bubble | DP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, p in enumerate(rows[:top], 1):
        m, t = p.memory, p.times
        states = (m["weights"] + m["grads"] + m["optimizer"]) / 2**30
        lines.append(
            f"| {rank} | {p.describe()} | {p.micro_batch} | {p.recompute or 'none'} | {m['total'] / 2**30:.1f} | {states:.1f} "
            f"| {(m['activations'] + m['dispatch']) / 2**30:.1f} | {'yes' if p.fits else 'no'} | {p.step_time:.2f} "
            f"| {p.tflops_per_gpu:.0f} | {p.mfu:.1%} | {t['compute']:.2f} | {t['tp']:.2f} | {t['ep']:.2f} "
            f"| {t['bubble']:.2f} | {t['dp']:.2f} |"
        )
    return "\n".join(lines)


def to_json(plans: list) -> str:
    return json.dumps([p.to_dict() for p in plans], indent=1)
