"""Tokens per expert-parallel rank under balanced vs contiguous expert placement.

DeepSeek-V2-Lite-sized MAMoE routing (64 experts, text 0..31 / audio 32..63, top-6) with EP=8.
The real MAMoE router (megatron_most.moe.router.MAMoERouter, random weights, random hidden
states) routes 16k tokens of which a given share is text; the tokens routed to each logical
expert are then summed per EP rank with `placement.logical_of_physical` / `rank_loads`, for
placement='balanced' (every rank holds 4 text + 4 audio experts) and 'contiguous' (Megatron's
default: ranks 0-3 hold the text experts, ranks 4-7 the audio experts).

Single process, CPU, a few seconds. Run: python benchmarks/expert_placement.py. The last line
is `max/mean EP-rank load at 80% text: balanced X contiguous Y`; target: balanced <= 1.15 at
every share.
"""

from __future__ import annotations

import argparse
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_most.moe import MAMoEConfig, MAMoERouter, pack_routing_info
from megatron_most.moe.placement import logical_of_physical, rank_loads
from megatron_most.platform import ParallelLayout, initialize
from tests.mamoe_layers import layer_config

EXPERTS, TOPK, EP = 64, 6, 8
SHARES = (0.50, 0.80, 0.95)


def build_router(mamoe, hidden):
    config = layer_config(mamoe, hidden=hidden, moe_ffn=64, heads=4, hidden_dropout=0.1)
    router = MAMoERouter(config, pg_collection=get_default_pg_collection(), mamoe=mamoe)
    router.set_layer_number(1)
    return router.eval()


def route_tokens(router, text_share, tokens, seq, hidden, seed):
    """Route `tokens` random hidden states, `text_share` of them text; returns tokens per logical expert."""

    gen = torch.Generator().manual_seed(seed)
    batch = tokens // seq
    h = torch.randn(seq, batch, hidden, generator=gen)
    modality = torch.ones(batch * seq, dtype=torch.long)
    modality[torch.randperm(batch * seq, generator=gen)[: round(text_share * batch * seq)]] = 0  # exact share
    info = pack_routing_info(modality.view(batch, seq))
    with torch.no_grad():
        _, routing_map = router(h, padding_mask=info.t())  # router takes [seq, batch] routing info
    assert int(routing_map.sum()) == batch * seq * TOPK
    return routing_map.sum(0).double()  # [experts], logical order


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="router input size (DeepSeek-V2-Lite: 2048)")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()

    initialize(ParallelLayout(), num_experts=EXPERTS)
    torch.manual_seed(0)
    base = MAMoEConfig(num_experts=EXPERTS, topk=TOPK)
    router = build_router(base, args.hidden)
    text, audio = base.groups()
    print(
        f"{EXPERTS} experts (text {text[0]}..{text[-1]}, audio {audio[0]}..{audio[-1]}), top-{TOPK}, EP={EP}, "
        f"{args.tokens} tokens, router hidden {args.hidden}, random router weights and inputs"
    )
    placements = {}
    for placement in ("balanced", "contiguous"):
        slots = logical_of_physical(MAMoEConfig(num_experts=EXPERTS, topk=TOPK, placement=placement), EP)
        placements[placement] = slots
        n_local = EXPERTS // EP
        desc = " | ".join(
            f"r{r}: {sum(e in text for e in slots[r * n_local : (r + 1) * n_local])}T"
            f"+{sum(e in audio for e in slots[r * n_local : (r + 1) * n_local])}A"
            for r in range(EP)
        )
        print(f"{placement:>10} placement: {desc}")

    print()
    header = f"{'text':>5} {'placement':>10} | " + " ".join(f"{'rank' + str(r):>7}" for r in range(EP)) + " | max/mean"
    print(header)
    print("-" * len(header))
    ratios = {}
    for i, share in enumerate(SHARES):
        per_expert = route_tokens(router, share, args.tokens, args.seq, args.hidden, seed=100 + i)
        for placement, slots in placements.items():
            loads = rank_loads(per_expert.tolist(), slots, EP)
            ratio = max(loads) / (sum(loads) / EP)
            ratios[share, placement] = ratio
            print(f"{share:>5.0%} {placement:>10} | " + " ".join(f"{int(x):>7}" for x in loads) + f" | {ratio:.3f}")
        within = [per_expert[list(g)] for g in (text, audio)]
        print(
            f"{'':>5} {'':>10}   (per-expert max/mean inside the group: text {within[0].max() / within[0].mean():.3f}, "
            f"audio {within[1].max() / within[1].mean():.3f})"
        )
    worst = max(ratios[s, "balanced"] for s in SHARES)
    print()
    print(f"worst balanced max/mean over shares {', '.join(f'{s:.0%}' for s in SHARES)}: {worst:.3f} (target <= 1.15)")
    print(
        f"max/mean EP-rank load at 80% text: balanced {ratios[0.8, 'balanced']:.3f} contiguous {ratios[0.8, 'contiguous']:.3f}"
    )


if __name__ == "__main__":
    main()
