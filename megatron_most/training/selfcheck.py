"""Parallel self-check: a tiny Megatron MoE GPT trained at a layout must match one rank.

Run under torchrun (see tools/selfcheck.py). Rank 0 first runs a single-rank reference job in
a subprocess: it builds the model, saves its initial weights as a torch_dist checkpoint, runs
one forward-backward (its gradients saved as a checkpoint too) and a few optimizer steps
(losses, grad norms and final weights saved). Then every rank, at the requested layout:

1. loads the initial checkpoint (resharded from TP1/PP1/EP1 to this layout), runs one
   forward-backward with plain DDP and compares every local gradient shard with the
   reference gradients (loaded through the same resharding);
2. loads it again and trains the same steps with grad clipping and the distributed optimizer
   (`--dist-opt`), comparing losses, grad norms and final weights;
3. saves a torch_dist checkpoint at this layout, reloads it, and checks the weights and the
   loss round-trip exactly.

With `--model mamoe` the MoE layers are MAMoE (modality ids from the tokens, some padding); with
`--model most` the model is the tiny MoST preset (MLA, MAMoE, unit tokens and continuous audio
features). Both also require that no token reached an expert outside its modality group.

Rank 0 prints one line: `PASS ...` or `FAIL ...` with the max loss / grad / weight differences.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig

from megatron_most.model.checkpoint import load_sharded, load_values, save_values
from megatron_most.model.config import tiny
from megatron_most.model.loss import lm_loss
from megatron_most.model.most import build_model as build_most
from megatron_most.model.spec import decoder_block_spec
from megatron_most.moe import MAMoEConfig, mamoe_block_spec, pack_routing_info, stats
from megatron_most.platform.layout import ParallelLayout
from megatron_most.platform.runtime import device, fusion_settings, initialize, place
from megatron_most.platform.spawn import single_process_env
from megatron_most.training.engine import forward_backward, train_step, wrap

NUM_EXPERTS = 4
SEQ, MICRO, GLOBAL, VOCAB = 32, 2, 8, 128
LR = 1e-2
LOSS_TOL, GRAD_TOL = 1e-5, 1e-5
"""fp32 tolerances on |difference| / max(1, |reference|): reduction order differs by layout."""
ADAM_EPS = 1e-2
WEIGHT_TOL = 1e-4
"""Adam divides by sqrt(v) + eps: with a tiny eps, rounding noise in near-zero gradients becomes
a full step of size LR. With eps = 1e-2 a gradient difference d moves a weight by at most
LR * d / eps per step (3e-5 over 3 steps at d = GRAD_TOL), while a real bug (d >= 1e-3) moves
it by 1e-3 or more."""


def mamoe_config():
    """MAMoE for the check: experts {0, 1} text, {2, 3} audio (the release's split in small), top-2.
    With EP2 the balanced placement puts one text and one audio expert on each rank."""

    return MAMoEConfig(
        num_experts=NUM_EXPERTS,
        text_experts=(0, 1),
        audio_experts=(2, 3),
        topk=2,
        shared_expert_size=64,
        balance_loss="per_group",
        balance_coeff=1e-2,
    )


KINDS = ("moe", "mamoe", "most")
"""moe: Megatron's MoE layers; mamoe: the same GPT with MAMoE layers; most: the tiny MoST preset
(MLA, MAMoE, discrete units and continuous audio features in the batches)."""


def num_experts(kind: str) -> int:
    return most_config().mamoe.num_experts if kind == "most" else NUM_EXPERTS


def most_config():
    return tiny()


def build_model(layout: ParallelLayout, kind: str = "moe", recompute: str | None = None):
    """The check's model for this pipeline stage. moe/mamoe: a 4-layer GPT (first layer dense,
    shared expert, top-2 of 4 experts). `recompute`: None, "selective" (MoE) or "full"."""
    if kind == "most":
        most = most_config()
        return build_most(most, most.transformer_config(layout, precision="fp32", ddp=True, **_RECOMPUTE[recompute]))
    mamoe = kind == "mamoe"

    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        sequence_parallel=layout.sp,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        moe_layer_freq=[0, 1, 1, 1],
        moe_ffn_hidden_size=32,
        **(mamoe_config().megatron_fields() if mamoe else _MOE_FIELDS),
        **_RECOMPUTE[recompute],
        **fusion_settings(ddp=True),  # every model of the check is trained DDP-wrapped
    )
    spec = decoder_block_spec(config)
    if mamoe:
        spec = mamoe_block_spec(spec, config, mamoe_config())
    model = GPTModel(
        config,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    return place(model)


_MOE_FIELDS = dict(
    num_moe_experts=NUM_EXPERTS,
    moe_router_topk=2,
    moe_shared_expert_intermediate_size=64,
    moe_token_dispatcher_type="alltoall",
    moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=1e-2,
    moe_router_dtype="fp32",
)
_RECOMPUTE = {
    None: {},
    "selective": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def _batches(step: int, kind: str = "moe"):
    """This data-parallel rank's micro-batches of the global batch of `step`."""

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    gen = torch.Generator().manual_seed(1000 + step)
    if kind == "most":  # one fixed batch: the loss must fall as the model fits it
        tokens = most_tokens(torch.Generator().manual_seed(1000))
    else:
        tokens = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=gen)  # [global_batch, seq+1]
    mine = tokens.chunk(dp_size)[dp_rank]
    return iter(mine.split(MICRO))


def modality_of(tokens: torch.Tensor) -> torch.Tensor:
    """The check's modality rule: the upper half of the vocabulary is audio."""
    return (tokens >= VOCAB // 2).long()


def forward_step(data_iterator, model, kind: str = "moe"):
    batch = next(data_iterator).to(next(model.parameters()).device)  # [micro, seq+1]
    tokens, labels = batch[:, :-1], batch[:, 1:]
    positions = torch.arange(SEQ, device=batch.device).expand_as(tokens)
    padding = torch.zeros_like(tokens, dtype=torch.bool)
    padding[0, -3:] = True  # every stage gets the ids from its batch; row 0 ends in padding
    if kind == "most":
        return _most_forward_step(model, tokens, labels, positions, padding)
    routing = pack_routing_info(modality_of(tokens), padding) if kind == "mamoe" else None
    output = model(tokens, positions, None, labels=labels, padding_mask=routing)  # [micro, seq] loss

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule rescales `loss` in place

    return output, loss_func


def _most_forward_step(model, tokens, labels, positions, padding):
    layout = most_config().tokens
    frames = int((tokens == layout.feature).sum())
    gen = torch.Generator().manual_seed(int(tokens.sum()))  # same micro-batch, same features
    features = torch.randn(frames, most_config().audio_feature_dim, generator=gen)
    output = model(tokens, positions, None, labels=labels, audio_features=features, padding_mask=padding)
    return output, functools.partial(lm_loss, labels=labels, loss_mask=~padding, tokens=layout)


def most_tokens(gen: torch.Generator) -> torch.Tensor:
    """[GLOBAL, SEQ + 1] MoST sequences: text, a continuous-feature span in even samples and a
    discrete-unit span in odd ones."""
    most = most_config()
    layout = most.tokens
    tokens = torch.randint(0, most.text_vocab_size, (GLOBAL, SEQ + 1), generator=gen)
    tokens[0::2, 2], tokens[0::2, 3:9], tokens[0::2, 9] = layout.boa, layout.feature, layout.eoa
    units = layout.unit(torch.randint(0, most.num_units, (GLOBAL // 2, 8), generator=gen))
    tokens[1::2, 12], tokens[1::2, 13:21], tokens[1::2, 21] = layout.boa, units, layout.eoa
    return tokens


def _schedule(dp: int) -> dict:
    return dict(num_microbatches=GLOBAL // (MICRO * dp), seq_length=SEQ, micro_batch_size=MICRO)


def _data_parallel_size(model) -> int:
    config = model.config
    return torch.distributed.get_world_size() // (
        config.tensor_model_parallel_size * config.pipeline_model_parallel_size
    )


def _backward_once(model, kind: str):
    """Wrap `model` in DDP and run one forward-backward over the step-0 batch: (ddp, loss)."""

    ddp, _ = wrap(model, _optimizer_config(distributed=False))
    ddp.zero_grad_buffer()
    step = functools.partial(forward_step, kind=kind)
    return ddp, forward_backward(ddp, step, _batches(0, kind), **_schedule(_data_parallel_size(model)))


def _train(model, kind: str, steps: int, dist_opt: bool):
    ddp, optimizer = wrap(model, _optimizer_config(distributed=dist_opt))
    step = functools.partial(forward_step, kind=kind)
    kwargs = _schedule(_data_parallel_size(model))
    return [train_step(ddp, optimizer, step, _batches(s, kind), **kwargs) for s in range(steps)]


def _optimizer_config(distributed: bool):
    return OptimizerConfig(
        optimizer="adam",
        lr=LR,
        adam_beta2=0.95,
        adam_eps=ADAM_EPS,
        clip_grad=1.0,
        weight_decay=0.01,
        use_distributed_optimizer=distributed,
        params_dtype=torch.float32,
    )


def _weights(module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _grads(ddp) -> dict:
    return {name: p.main_grad.detach().clone() for name, p in ddp.module.named_parameters()}


def _max_rel_diff(ours: dict, ref: dict) -> float:
    worst, worst_name = 0.0, None
    for name, value in ours.items():
        scale = max(1.0, ref[name].abs().max().item())
        diff = (value - ref[name]).abs().max().item() / scale
        if diff > worst:
            worst, worst_name = diff, name
    if os.environ.get("SELFCHECK_DEBUG") and worst_name:
        print(f"rank {torch.distributed.get_rank()}: largest difference {worst:.2e} in {worst_name}", flush=True)
    return _global_max(worst)


def _global_max(value: float) -> float:
    t = torch.tensor([value], device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def reference(workdir: Path, steps: int, kind: str) -> None:
    """Single-rank run: initial weights, step-0 gradients, per-step losses and final weights."""
    layout = ParallelLayout()
    initialize(layout, num_experts=num_experts(kind))
    model = build_model(layout, kind)
    save_values(model, _weights(model), workdir / "init")
    ddp, _ = _backward_once(model, kind)
    save_values(model, _grads(ddp), workdir / "grads")
    model = build_model(layout, kind)
    model.load_state_dict(load_values(model, workdir / "init"), strict=False)
    results = _train(model, kind, steps, dist_opt=False)
    save_values(model, _weights(model), workdir / "final")
    (workdir / "reference.json").write_text(json.dumps([r.__dict__ for r in results]))


def _run_reference(workdir: Path, steps: int, kind: str, timeout_s: float) -> str | None:
    """Run `reference` in a fresh single-process job; return an error message or None."""
    env = single_process_env()
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = str(torch.cuda.current_device())
    cmd = [
        sys.executable,
        "-m",
        "megatron_most.training.selfcheck",
        "--reference",
        "--workdir",
        str(workdir),
        "--steps",
        str(steps),
    ]
    cmd += ["--model", kind]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"single-rank reference run timed out after {timeout_s:.0f}s"
    if proc.returncode != 0:
        return f"single-rank reference run failed:\n{proc.stderr[-4000:]}"
    return None


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def check(
    layout: ParallelLayout,
    *,
    steps: int = 3,
    dist_opt: bool = True,
    kind: str = "moe",
    workdir: str | None = None,
    timeout_s: float = 600.0,
) -> dict:
    """Run the comparison at `layout` (inside a torchrun job); returns the figures on every rank."""
    initialize(layout, num_experts=num_experts(kind), timeout_s=timeout_s)

    rank = torch.distributed.get_rank()
    with contextlib.ExitStack() as stack:
        if rank == 0:
            root = (
                Path(workdir)
                if workdir
                else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="selfcheck_")))
            )
            base = root / kind
            base.mkdir(parents=True, exist_ok=True)
            done = (base / "reference.json").exists() and json.loads((base / "reference.json").read_text())
            error = None if done and len(done) == steps else _run_reference(base, steps, kind, timeout_s)
            shared = (str(base), error)
        else:
            shared = None
        base, error = _broadcast(shared)
        if error:
            raise RuntimeError(error)
        base = Path(base)
        ref = json.loads((base / "reference.json").read_text())

        # 1. Gradients of one forward-backward with plain DDP.
        model = build_model(layout, kind)
        model.load_state_dict(load_values(model, base / "init"), strict=False)
        ddp, loss0 = _backward_once(model, kind)
        grad_diff = _max_rel_diff(_grads(ddp), load_values(model, base / "grads"))

        # 2. Training steps with clipping and (optionally) the distributed optimizer.
        model = build_model(layout, kind)
        model.load_state_dict(load_values(model, base / "init"), strict=False)
        results = _train(model, kind, steps, dist_opt)
        loss_diff = max(abs(r.loss - e["loss"]) / max(1.0, abs(e["loss"])) for r, e in zip(results, ref))
        norm_diff = max(abs(r.grad_norm - e["grad_norm"]) / max(1.0, e["grad_norm"]) for r, e in zip(results, ref))
        weight_diff = _max_rel_diff(_weights(model), load_values(model, base / "final"))
        routing = _routing_figures(model, kind) if kind != "moe" else {}

        # 3. Save at this layout, reload into a fresh model, and check an exact round trip.
        ckpt = base / f"ckpt_{layout.describe().replace(' ', '_')}"
        if rank == 0:
            ckpt.mkdir(exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
        reloaded = build_model(layout, kind)
        reloaded.load_state_dict(load_sharded(reloaded.sharded_state_dict(), ckpt), strict=False)
        roundtrip_diff = _max_rel_diff(_weights(reloaded), _weights(model))
        torch.distributed.barrier()

    figures = dict(
        loss_diff=max(abs(loss0 - ref[0]["loss"]), loss_diff),
        grad_diff=max(grad_diff, norm_diff),
        weight_diff=weight_diff,
        roundtrip_diff=roundtrip_diff,
        losses=[loss0] + [r.loss for r in results],
        ref_losses=[e["loss"] for e in ref],
        **routing,
    )
    figures["passed"] = (
        figures["loss_diff"] <= LOSS_TOL
        and figures["grad_diff"] <= GRAD_TOL
        and figures["weight_diff"] <= WEIGHT_TOL
        and figures["roundtrip_diff"] == 0.0
        and figures.get("cross_group_tokens", 0) == 0
    )
    return figures


def _routing_figures(model, kind: str) -> dict:
    """Tokens routed during training per MoE layer and modality, and how many reached an expert
    of the other group."""

    text, audio = (most_config().mamoe if kind == "most" else mamoe_config()).groups()
    gathered = stats.collect(model)
    tokens = gathered["tokens"]  # [layers, modality, experts]
    cross = tokens[:, 0, list(audio)].sum() + tokens[:, 1, list(text)].sum()
    return dict(
        routed_tokens=int(tokens.sum().item()),
        cross_group_tokens=int(cross.item()),
        routed_by_layer={layer: tokens[i].sum(-1).long().tolist() for i, layer in enumerate(gathered["layers"])},
    )


def summary_line(layout: ParallelLayout, figures: dict) -> str:
    verdict = "PASS" if figures["passed"] else "FAIL"
    return (
        f"{verdict} {layout.describe()} world={torch.distributed.get_world_size()}: "
        f"max loss diff {figures['loss_diff']:.2e}, max grad diff {figures['grad_diff']:.2e}, "
        f"max weight diff {figures['weight_diff']:.2e}, checkpoint round trip {figures['roundtrip_diff']:.1e}"
        + (
            f", MAMoE tokens routed {figures['routed_tokens']} / outside their group {figures['cross_group_tokens']}"
            if "routed_tokens" in figures
            else ""
        )
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    p.add_argument(
        "--sp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sequence parallelism (default: on when --tp > 1, which Megatron-Core requires for MoE)",
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dist-opt", choices=["on", "off"], default="on", help="distributed optimizer")
    p.add_argument(
        "--workdir",
        default=None,
        help="directory visible to all ranks (needed across nodes; default: a temp dir); "
        "a reference run already there is reused",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a hung collective fails")
    p.add_argument(
        "--model",
        choices=KINDS,
        default="moe",
        help="moe: Megatron MoE GPT; mamoe: the same with MAMoE layers; most: the tiny MoST preset (MLA, "
        "MAMoE, unit tokens and audio features)",
    )
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reference:
        reference(Path(args.workdir), args.steps, args.model)
        return 0
    sp = args.tp > 1 if args.sp is None else args.sp
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sp=sp)
    figures = check(
        layout,
        steps=args.steps,
        dist_opt=args.dist_opt == "on",
        kind=args.model,
        workdir=args.workdir,
        timeout_s=args.timeout,
    )
    if torch.distributed.get_rank() == 0:
        print(summary_line(layout, figures), flush=True)
        if os.environ.get("SELFCHECK_DEBUG"):
            print(figures)
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
