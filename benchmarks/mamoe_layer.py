"""Forward+backward time of one MAMoE layer over Megatron-Core's own MoELayer, single rank, on
the platform device (the GPU where there is one, else the CPU).

Both layers have the same routed experts, hidden size, top-k, shared expert, dispatcher and
TransformerConfig (built from MAMoEConfig.megatron_fields()). The MAMoE layer is built from
`mamoe_block_spec` and routes with modality masking, modality ids from `pack_routing_info` and
its own sequence-level balance loss (alpha 0.001, as in the release); the vanilla layer is the
MoELayer of Megatron's decoder block spec (`model.spec.decoder_block_spec`), no masking, no aux
loss (megatron_fields() turns Megatron's own balance loss off).

The two are measured alternately (A B, then B A, ...) and the medians compared, because this
machine is noisy. Run: python -m benchmarks.mamoe_layer [--reps N]. The last line printed is
`mamoe/vanilla time ratio: X`; the target is <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_most.moe import MAMoEConfig, MAMoELayer, pack_routing_info
from megatron_most.platform import ParallelLayout, device, has_gpu, initialize
from tests.mamoe_layers import build_layer, layer_config

HIDDEN, EXPERTS, TOPK, MOE_FFN, SHARED, SEQ, BATCH = 256, 16, 4, 128, 256, 512, 4


def synchronize():
    if has_gpu():
        torch.cuda.synchronize()


def make_config(mamoe, **overrides):
    return layer_config(mamoe, hidden=HIDDEN, moe_ffn=MOE_FFN, heads=4, **overrides)


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).to(device())
    grad = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).to(device())
    # A speech+text mixture: each sequence is a text prompt then an audio span (about half audio).
    modality = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for b in range(BATCH):
        start = int(torch.randint(SEQ // 4, 3 * SEQ // 4, (1,), generator=gen))
        modality[b, start:] = 1
    return h, grad, modality.to(device())


def step(layer, h, grad, info):
    """One forward + backward; returns seconds (the GPU's queue drained before and after)."""
    synchronize()
    start = time.perf_counter()
    x = h.detach().requires_grad_()
    out, _ = layer(x, padding_mask=info) if info is not None else layer(x)
    (out * grad).sum().backward()
    synchronize()
    elapsed = time.perf_counter() - start
    for p in layer.parameters():
        p.grad = None
    return elapsed


def measure(pairs, reps, warmup=2):
    """pairs: {name: (layer, info)}; alternates the order every repetition. Returns {name: [s]}."""
    names = list(pairs)
    h, grad, _ = make_inputs()
    for _ in range(warmup):
        for name in names:
            step(pairs[name][0], h, grad, pairs[name][1])
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(step(pairs[name][0], h, grad, pairs[name][1]))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="measured repetitions per layer")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1 by default: on this shared 2-core machine a second spinning OpenMP "
        "thread makes timings swing by 10x whenever anything else runs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    initialize(ParallelLayout(), num_experts=EXPERTS)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    mamoe = MAMoEConfig(num_experts=EXPERTS, topk=TOPK, shared_expert_size=SHARED)
    config = make_config(mamoe)

    torch.manual_seed(0)
    layer_mamoe = build_layer(config, mamoe).to(device())
    torch.manual_seed(0)
    layer_vanilla = build_layer(config).to(device())
    assert type(layer_mamoe) is MAMoELayer and type(layer_vanilla) is MoELayer
    # Same weights in both (same parameter names, same shapes).
    layer_vanilla.load_state_dict(layer_mamoe.state_dict())
    n_params = [sum(p.numel() for p in m.parameters()) for m in (layer_mamoe, layer_vanilla)]
    assert n_params[0] == n_params[1], n_params

    _, _, modality = make_inputs()
    info = pack_routing_info(modality)
    mamoe_no_aux = build_layer(
        config, MAMoEConfig(num_experts=EXPERTS, topk=TOPK, shared_expert_size=SHARED, balance_coeff=0.0)
    )
    mamoe_no_aux.to(device()).load_state_dict(layer_mamoe.state_dict())

    where = torch.cuda.get_device_name() if has_gpu() else f"cpu, {torch.get_num_threads()} intra-op threads"
    print(f"torch {torch.__version__}, device {device()} ({where})")
    print(
        f"layer: hidden {HIDDEN}, {EXPERTS} experts (text {mamoe.groups()[0][0]}..{mamoe.groups()[0][-1]}, audio "
        f"{mamoe.groups()[1][0]}..{mamoe.groups()[1][-1]}), top-{TOPK}, moe ffn {MOE_FFN}, shared {SHARED}, "
        f"SwiGLU, fp32; tokens seq {SEQ} x batch {BATCH} = {SEQ * BATCH} ({modality.float().mean():.0%} audio)"
    )
    print(f"parameters per layer: {n_params[0]:,}; repetitions {args.reps} each, alternating order")

    t0 = time.perf_counter()
    times = measure(
        {"mamoe": (layer_mamoe, info), "vanilla": (layer_vanilla, None), "mamoe_no_aux": (mamoe_no_aux, info)},
        args.reps,
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, values in times.items():
        q = statistics.quantiles(values, n=4)
        print(
            f"{name:>13}: median {med[name] * 1e3:8.2f} ms  (q1 {q[0] * 1e3:.2f}, q3 {q[2] * 1e3:.2f}, "
            f"min {min(values) * 1e3:.2f}, max {max(values) * 1e3:.2f})"
        )
    print(f"mamoe without balance loss / vanilla: {med['mamoe_no_aux'] / med['vanilla']:.3f}")
    print(f"measured in {time.perf_counter() - t0:.1f} s")
    print(f"mamoe/vanilla time ratio: {med['mamoe'] / med['vanilla']:.3f}")


if __name__ == "__main__":
    main()
