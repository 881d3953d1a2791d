"""Size, compute and memory estimate of a MoST model at a parallel layout, without allocating it.

`count_parameters(most)` builds the real `MoSTModel` (TP=PP=EP=1, one process) with
`torch.device("meta")` as the default device, so every parameter has a shape but no storage:
the 15.7B-parameter DeepSeek-V2-Lite preset is counted exactly on a laptop. Each parameter is
put in a category by its name:

    embedding         embedding.word_embeddings (padded vocabulary x hidden)
    output_layer      output_layer (padded vocabulary x hidden; not tied to the embedding)
    attention         MLA projections: q_proj, kv_down_proj, kv_up_proj, linear_proj (o_proj)
    dense_mlp         SwiGLU MLP of the first_k_dense layers
    routed_experts    every routed expert of every MoE layer
    shared_experts    the always-on shared-expert MLP of the MoE layers
    router            gate weights [experts, hidden]
    norms             input / pre-MLP / kv_a RMSNorms of each layer and the final norm
    audio_projection  continuous-path HuBERT feature projection (weight + bias)

`estimate(most, ...)` turns those counts into per-pipeline-stage and per-GPU figures for a
layout arithmetically (see `Estimate` for the definitions and approximations). Nothing needs
more than one process; the parallel groups built for counting are TP=PP=EP=1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys

from megatron_most.model.config import MoSTConfig, read_config
from megatron_most.model.flops import active_params, attention_flops_per_token, matmul_params
from megatron_most.model.layout import check_layout, default_world_size, stage_layers
from megatron_most.model.most import build_meta_model, single_rank_groups
from megatron_most.options import require
from megatron_most.platform.layout import ParallelLayout

CATEGORIES = (
    "embedding",
    "output_layer",
    "attention",
    "dense_mlp",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
    "audio_projection",
)

WEIGHT_BYTES = 2
"""bf16 model weights (Megatron's bf16 training keeps the module parameters in bf16)."""
GRAD_BYTES = 4
"""fp32 main gradients (DistributedDataParallelConfig(grad_reduce_in_fp32=True), as training.engine)."""
OPTIMIZER_BYTES = 12
"""Adam with the distributed optimizer: fp32 master weight + exp_avg + exp_avg_sq, sharded over DP."""

# How a parameter is split across ranks (see Estimate for the rules).
VOCAB, TP, EXPERT, REPLICATED = "vocab", "tp", "expert", "replicated"

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def categorize(name: str) -> tuple[str, str]:
    """(category, sharding rule) of a MoSTModel parameter name (local or Transformer Engine spec).

    Raises ValueError for a name no rule covers, so a new kind of parameter is noticed here
    instead of being silently miscounted.
    """
    if name.startswith("embedding.word_embeddings."):
        return "embedding", VOCAB
    if name.startswith("output_layer."):
        return "output_layer", VOCAB
    if name.startswith("audio_projection."):
        return "audio_projection", REPLICATED
    if name.startswith("decoder.final_layernorm."):
        return "norms", REPLICATED
    match = _LAYER.match(name)
    if match:
        rest = match.group(2)
        if "layernorm" in rest.split(".")[-2] or rest.endswith("layer_norm_weight") or rest.endswith("layer_norm_bias"):
            return "norms", REPLICATED  # input/pre-MLP/kv/q norms, also when TE fuses them into a linear
        if rest.startswith("self_attention."):
            # MLA's down projections are whole on every TP rank: a duplicated TELinear in the
            # Transformer Engine spec, model.linear.ReplicatedLinear in the local spec.
            down = ".linear_kv_down_proj." in rest or ".linear_q_down_proj." in rest
            return "attention", REPLICATED if down else TP
        if rest.startswith("mlp.router."):
            return "router", REPLICATED
        if rest.startswith("mlp.experts."):
            return "routed_experts", EXPERT
        if rest.startswith("mlp.shared_experts."):
            if ".gate_weight" in rest:  # shared-expert gate (off in DeepSeek-V2), one vector
                return "shared_experts", REPLICATED
            return "shared_experts", TP
        if rest.startswith("mlp.linear_fc"):
            return "dense_mlp", TP
    raise ValueError(f"estimate.categorize: no category for parameter {name!r}; extend the rules in model/estimate.py")


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of the model as built at TP=PP=EP=1 (vocabulary padded as at TP=1)."""

    layers: tuple[dict, ...]
    """Per decoder layer: {(category, rule): count}."""
    first_stage: dict
    """Parameters outside the decoder layers on the first pipeline stage (embedding, audio projection)."""
    last_stage: dict
    """Parameters outside the decoder layers on the last pipeline stage (final norm, output layer)."""

    @property
    def by_category(self) -> dict[str, int]:
        totals = dict.fromkeys(CATEGORIES, 0)
        for part in (*self.layers, self.first_stage, self.last_stage):
            for (category, _), count in part.items():
                totals[category] += count
        return totals

    @property
    def total(self) -> int:
        return sum(self.by_category.values())


def count_parameters(most: MoSTConfig) -> ParameterCounts:
    """Count the parameters of the real MoSTModel for `most`, built on the meta device.

    Every dense layer holds the same parameters, as does every MoE layer, so the model is built
    with one layer of each kind and their counts repeated over the `num_layers`: exact, and
    seconds instead of minutes for the 671B shape."""
    dense = min(most.first_k_dense, 1)
    built = most.replace(num_layers=dense + min(most.num_layers - most.first_k_dense, 1), first_k_dense=dense)
    counts = _count_built(built)
    layers = tuple(counts.layers[0 if i < most.first_k_dense else dense] for i in range(most.num_layers))
    return dataclasses.replace(counts, layers=layers)


def _count_built(most: MoSTConfig) -> ParameterCounts:
    with single_rank_groups(most):
        model = build_meta_model(most)
        layers: list[dict] = [{} for _ in range(most.num_layers)]
        first: dict = {}
        last: dict = {}
        for name, param in model.named_parameters():
            key = categorize(name)
            match = _LAYER.match(name)
            if match:
                part = layers[int(match.group(1))]
            elif name.startswith(("decoder.final_layernorm.", "output_layer.")):
                part = last
            else:
                part = first
            part[key] = part.get(key, 0) + param.numel()
        del model
    return ParameterCounts(layers=tuple(layers), first_stage=first, last_stage=last)


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    stage: int
    layers: tuple[int, int]
    """Decoder layers [first, last) of this stage (0-based, as `decoder.layers.N`)."""
    params: int
    """Parameters of the stage, whole (all TP/EP shards together; vocabulary padded as at TP=1)."""
    params_per_gpu: int
    """Parameters one GPU of the stage holds: dense_params_per_gpu + expert_params_per_gpu."""
    dense_params_per_gpu: int
    """Non-expert parameters per GPU (optimizer state sharded over the data-parallel group)."""
    expert_params_per_gpu: int
    """Routed-expert parameters per GPU (optimizer state sharded over the expert-data-parallel group)."""
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Parameters, training FLOPs and per-GPU memory of a MoST model at a layout.

    Parameters
      - `categories`, `total`: the model as built at TP=1 (counted on the meta device).
      - `active`: parameters used per token = total - input embedding - routed experts
        + routed experts * topk / num_experts. The embedding table is a lookup (one row per
        token), which is also how DeepSeek counts its "2.4B activated" for DeepSeek-V2-Lite.
        Every token reaches `topk` experts whether routing is modality-aware or not.
      - Stages: layers split as Megatron's `get_num_layers_to_build`: num_layers // pp each, or
        Megatron's uneven split (num_layers_in_first/last_pipeline_stage) when given, or when
        pp does not divide num_layers (then first = m + ceil(r/2), last = m + floor(r/2),
        middle = m, with m = num_layers // pp, r = num_layers % pp; Megatron itself needs these
        two fields set in the TransformerConfig to build such a split). The embedding and audio
        projection are on the first stage, the final norm and output layer on the last.
    Per-GPU shards (exact for the parameters Megatron splits evenly):
      - embedding / output layer: padded vocabulary * hidden / tp (`TokenLayout.padded_size`),
      - attention, dense MLP, shared experts: / tp, except MLA's kv_down_proj, which is whole
        on every TP rank (duplicated TELinear / model.linear.ReplicatedLinear),
      - routed experts: / (ep * etp),
      - router, norms, audio projection: replicated on every rank.
    Memory per GPU (model states only; activations, buffers, communication scratch and
    allocator fragmentation are not included):
      weights WEIGHT_BYTES (bf16) and grads GRAD_BYTES (fp32 main grads) for every local
      parameter, plus OPTIMIZER_BYTES (fp32 master weight + two Adam moments) divided by the
      data-parallel size: DP = world / (tp * pp) for dense parameters, expert DP =
      world / (etp * ep * pp) for routed experts (Megatron's distributed optimizer shards only
      the optimizer state; its grad buffer is whole). The per-GPU memory of the job is the
      largest stage's.
    FLOPs per token (training = forward + backward = 3 x forward):
      matmul = 6 * (active - norms - audio projection): 2 FLOPs per multiply-add, forward
        and two backward GEMMs; norm weights are elementwise and the audio projection runs
        only on continuous audio frames (<feat> positions), so both are left out.
      attention = 6 * layers * heads * (qk_head_dim + v_head_dim) * seq_len with
        qk_head_dim = qk_nope + qk_rope (QK^T and scores x V over the whole sequence; the
        PaLM/Megatron convention without the causal discount: a causal kernel does about half).
      For qk = v = d this is the familiar 12 * layers * heads * d * seq_len.
    """

    name: str
    tp: int
    pp: int
    ep: int
    etp: int
    world_size: int
    dp: int
    expert_dp: int
    seq_len: int
    micro_batch: int
    categories: dict[str, int]
    total: int
    active: int
    stages: tuple[StageEstimate, ...]
    matmul_flops_per_token: int
    attention_flops_per_token: int
    notes: tuple[str, ...] = ()

    @property
    def flops_per_token(self) -> int:
        return self.matmul_flops_per_token + self.attention_flops_per_token

    @property
    def flops_per_micro_batch(self) -> int:
        """Training FLOPs of one micro-batch (micro_batch * seq_len tokens) over the whole model."""
        return self.flops_per_token * self.seq_len * self.micro_batch

    @property
    def flops_per_gpu_per_micro_batch(self) -> float:
        """flops_per_micro_batch / (tp * pp): a data-parallel replica's share per GPU, assuming
        balanced stages and expert load (expert parallelism moves tokens, not their total work)."""
        return self.flops_per_micro_batch / (self.tp * self.pp)

    @property
    def memory_stage(self) -> StageEstimate:
        """The stage with the largest per-GPU memory."""
        return max(self.stages, key=lambda s: s.total_bytes)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stages"}
        out["notes"] = list(self.notes)
        out["stages"] = [dict(dataclasses.asdict(s), total_bytes=s.total_bytes) for s in self.stages]
        out["flops_per_token"] = self.flops_per_token
        out["flops_per_micro_batch"] = self.flops_per_micro_batch
        out["flops_per_gpu_per_micro_batch"] = self.flops_per_gpu_per_micro_batch
        peak = self.memory_stage
        out["memory_per_gpu"] = dict(
            stage=peak.stage,
            weight_bytes=peak.weight_bytes,
            grad_bytes=peak.grad_bytes,
            optimizer_bytes=peak.optimizer_bytes,
            total_bytes=peak.total_bytes,
        )
        return out


def _per_gpu(counts: dict, most: MoSTConfig, layout: ParallelLayout) -> tuple[int, int]:
    """(dense, expert) parameters one GPU holds of `counts` ({(category, rule): n} at TP=1)."""
    tp, shards = layout.tp, layout.ep * layout.expert_tp
    dense = expert = 0
    for (_category, rule), n in counts.items():
        if rule == VOCAB:
            dense += n // tp  # the padded vocabulary splits evenly over TP (checked at layout time)
        elif rule == TP:
            dense += n // tp
        elif rule == EXPERT:
            expert += n // shards
        else:
            dense += n
    return dense, expert


def estimate(
    most: MoSTConfig,
    layout: ParallelLayout | None = None,
    *,
    name: str = "",
    world_size: int | None = None,
    seq_len: int | None = None,
    micro_batch: int = 1,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    counts: ParameterCounts | None = None,
) -> Estimate:
    """Estimate for `most` at `layout` on `world_size` GPUs (default: `default_world_size`).

    Layout and sizes are checked (ConfigError) before the model is built. `counts` reuses a
    `count_parameters` result (it does not depend on the layout).
    """
    layout = layout or ParallelLayout()
    seq_len = most.seq_length if seq_len is None else seq_len
    require(
        1 <= seq_len <= most.max_position_embeddings,
        f"seq_len={seq_len}: must be within 1..max_position_embeddings={most.max_position_embeddings}",
    )
    require(micro_batch >= 1, f"micro_batch={micro_batch}: must be >= 1")
    check_layout(most, layout)
    world_size = default_world_size(layout) if world_size is None else world_size
    require(world_size >= 1, f"world_size={world_size}: must be >= 1")
    dp = layout.dp(world_size)
    expert_dp = world_size // (layout.expert_tp * layout.ep * layout.pp)
    spans = stage_layers(most, layout, first_stage_layers, last_stage_layers)

    counts = counts or count_parameters(most)
    categories = counts.by_category
    total = sum(categories.values())
    mamoe = most.mamoe
    require(
        categories["routed_experts"] * mamoe.topk % mamoe.num_experts == 0, "estimate: routed experts of unequal size"
    )
    active = active_params(categories, mamoe.topk, mamoe.num_experts)
    matmul = matmul_params(categories, mamoe.topk, mamoe.num_experts)
    qk_dim = most.qk_nope_head_dim + most.qk_rope_head_dim
    heads, layers = most.num_attention_heads, most.num_layers
    attention_flops = attention_flops_per_token(layers, heads, qk_dim, most.v_head_dim, seq_len)

    stages = []
    for rank, (start, end) in enumerate(spans):
        part: dict = {}
        pieces = list(counts.layers[start:end])
        if rank == 0:
            pieces.append(counts.first_stage)
        if rank == len(spans) - 1:
            pieces.append(counts.last_stage)
        for piece in pieces:
            for key, n in piece.items():
                part[key] = part.get(key, 0) + n
        dense, expert = _per_gpu(part, most, layout)
        local = dense + expert
        stages.append(
            StageEstimate(
                stage=rank,
                layers=(start, end),
                params=sum(part.values()),
                params_per_gpu=local,
                dense_params_per_gpu=dense,
                expert_params_per_gpu=expert,
                weight_bytes=WEIGHT_BYTES * local,
                grad_bytes=GRAD_BYTES * local,
                optimizer_bytes=math.ceil(OPTIMIZER_BYTES * dense / dp)
                + math.ceil(OPTIMIZER_BYTES * expert / expert_dp),
            )
        )

    notes = []
    if layout.pp > 1 and most.num_layers % layout.pp and first_stage_layers is None and last_stage_layers is None:
        notes.append(
            f"{most.num_layers} layers do not divide by pp={layout.pp}: MoSTConfig.transformer_config splits them "
            f"unevenly, num_layers_in_first_pipeline_stage={spans[0][1] - spans[0][0]}, "
            f"num_layers_in_last_pipeline_stage={spans[-1][1] - spans[-1][0]}"
        )
    return Estimate(
        name=name,
        tp=layout.tp,
        pp=layout.pp,
        ep=layout.ep,
        etp=layout.expert_tp,
        world_size=world_size,
        dp=dp,
        expert_dp=expert_dp,
        seq_len=seq_len,
        micro_batch=micro_batch,
        categories=categories,
        total=total,
        active=active,
        stages=tuple(stages),
        matmul_flops_per_token=6 * matmul,
        attention_flops_per_token=attention_flops,
        notes=tuple(notes),
    )


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def _gib(n: int) -> str:
    if n < 2**30:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**30:.2f} GiB"


def format_table(est: Estimate) -> str:
    """A readable report of `est` (what tools/estimate.py prints)."""
    lines = []
    title = f"MoST estimate{': ' + est.name if est.name else ''}"
    lines += [title, "=" * len(title)]
    lines.append(
        f"layout  TP{est.tp} PP{est.pp} EP{est.ep} ETP{est.etp} on {est.world_size} GPUs "
        f"(DP {est.dp}, expert DP {est.expert_dp}), seq_len {est.seq_len}, micro-batch {est.micro_batch}"
    )
    lines += ["", f"{'parameters':<22}{'count':>18}{'':>12}"]
    for category in CATEGORIES:
        n = est.categories[category]
        lines.append(f"  {category:<20}{n:>18,}{_count(n):>12}")
    lines.append(f"  {'total':<20}{est.total:>18,}{_count(est.total):>12}")
    lines.append(f"  {'active per token':<20}{est.active:>18,}{_count(est.active):>12}")
    lines += ["", "training FLOPs per token"]
    lines.append(f"  {'matmul (6 x active)':<26}{_count(est.matmul_flops_per_token):>12}")
    lines.append(f"  {'attention (seq ' + str(est.seq_len) + ')':<26}{_count(est.attention_flops_per_token):>12}")
    lines.append(f"  {'total':<26}{_count(est.flops_per_token):>12}")
    lines.append(
        f"  {'per micro-batch':<26}{_count(est.flops_per_micro_batch):>12}"
        f"   ({_count(est.flops_per_gpu_per_micro_batch)} per GPU)"
    )
    lines += ["", "per pipeline stage (per GPU: TP/EP/ETP shards; memory = bf16 weights + fp32 grads + Adam / DP)"]
    header = (
        f"  {'stage':<6}{'layers':<10}{'params':>12}{'per GPU':>12}{'dense':>12}{'expert':>12}"
        f"{'weights':>12}{'grads':>12}{'optimizer':>12}{'total':>12}"
    )
    lines.append(header)
    for s in est.stages:
        lines.append(
            f"  {s.stage:<6}{f'{s.layers[0]}-{s.layers[1] - 1}':<10}{_count(s.params):>12}{_count(s.params_per_gpu):>12}"
            f"{_count(s.dense_params_per_gpu):>12}{_count(s.expert_params_per_gpu):>12}{_gib(s.weight_bytes):>12}"
            f"{_gib(s.grad_bytes):>12}{_gib(s.optimizer_bytes):>12}{_gib(s.total_bytes):>12}"
        )
    peak = est.memory_stage
    lines += [
        "",
        f"memory per GPU (model states, largest stage {peak.stage}): {_gib(peak.total_bytes)} "
        f"= weights {_gib(peak.weight_bytes)} + grads {_gib(peak.grad_bytes)} + optimizer {_gib(peak.optimizer_bytes)}"
        "  (activations not included)",
    ]
    lines += [f"note: {note}" for note in est.notes]
    return "\n".join(lines)


def main(argv=None) -> None:
    """`python -m megatron_most.model.estimate DIR SEQ_LEN`: training FLOPs per token of the
    MoSTConfig in DIR/most_config.json, printed as JSON. The training loop runs it in a child
    process: counting builds the whole model, which its own parallel groups forbid."""
    directory, seq_len = (argv or sys.argv[1:])[:2]
    most = read_config(directory)
    counts = count_parameters(most)
    print(json.dumps({"flops_per_token": estimate(most, seq_len=int(seq_len), counts=counts).flops_per_token}))


if __name__ == "__main__":
    main()
