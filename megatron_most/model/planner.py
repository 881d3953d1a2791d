"""Layout planner: every valid TP/PP/VPP/EP/ETP/DP layout of a MoST model on N GPUs, with its
memory per GPU, whether it fits, and a projected step time, TFLOP/s per GPU and MFU.

    plans = plan(preset("deepseek_v2_most"), gpus=256, gpu="h100-80g")   # best first
    plans[0].tp, plans[0].step_time, plans[0].train_args()                 # -> TrainConfig names

`Plan` fields (stable names; tools/plan_layout.py and tools/sweep.py read them):
    preset, gpu, gpus, seq_length, global_batch   the question
    tp, pp, vpp, ep, etp, dp, expert_dp           the layout (vpp None = no interleaving)
    micro_batch, micro_batches, recompute         schedule; recompute as TrainConfig.recompute_granularity:
                                                  None | "selective" | "full" (plan()'s `recompute`
                                                  argument names the choices "none" | "selective" | "full")
    placement                                     MAMoE expert placement ("balanced" | "contiguous")
    memory          bytes per GPU on the busiest stage: weights, grads, optimizer (distributed
                    optimizer), activations (in-flight micro-batches included), dispatch (MoE
                    all-to-all buffers), total; and `stage`
    fits            memory.total <= MEMORY_USABLE x device memory
    step_time       projected seconds per optimizer step
    times           its parts: compute, tp, ep, pp_p2p (per micro-batch x micro-batches),
                    bubble, dp (seconds per step)
    tflops_per_gpu  model FLOPs per step / step_time / gpus (TFLOP/s); mfu = that / bf16 peak
`Plan.train_args()` gives the layout as TrainConfig (Megatron-LM) fields.

What the projection is: model FLOPs (model.flops) at GEMM_EFFICIENCY of the peak, recompute
FLOPs added as time, plus the communication of model.comm, not overlapped unless `overlap`
names it ("ep": all-to-all hidden behind compute; "dp": gradient/parameter traffic hidden), plus
the 1F1B bubble (pp - 1) / vpp micro-batch times. Memory: model.estimate's model states +
model.memory's activations. Stated inputs: model.hardware.
"""

from __future__ import annotations

import dataclasses

from megatron_most.model.comm import dp_seconds, ep_seconds, placement_imbalance, pp_seconds, tp_seconds
from megatron_most.model.estimate import count_parameters, estimate
from megatron_most.model.flops import attention_flops_per_token, by_category, layer_flops, matmul_params
from megatron_most.model.hardware import FP8_EFFICIENCY, GEMM_EFFICIENCY, MEMORY_USABLE
from megatron_most.model.hardware import gpu as gpu_named
from megatron_most.model.layout import check_layout, stage_layers
from megatron_most.model.memory import RECOMPUTE, dispatch_bytes, in_flight, stage_activations
from megatron_most.options import ConfigError, require
from megatron_most.platform.layout import ParallelLayout

ACTIVATION_BYTES = 2
"""bf16 activations (FP8 runs keep bf16 activations between layers too)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    preset: str
    gpu: str
    gpus: int
    seq_length: int
    global_batch: int
    tp: int
    pp: int
    vpp: int | None
    ep: int
    etp: int
    dp: int
    expert_dp: int
    micro_batch: int
    micro_batches: int
    recompute: str | None
    placement: str
    memory: dict
    fits: bool
    step_time: float
    times: dict
    tflops_per_gpu: float
    mfu: float

    def describe(self) -> str:
        vpp = f" VPP{self.vpp}" if self.vpp else ""
        return f"TP{self.tp} PP{self.pp}{vpp} EP{self.ep} ETP{self.etp} DP{self.dp}"

    def train_args(self) -> dict:
        """The layout as training.config.TrainConfig fields."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            num_layers_per_virtual_pipeline_stage=self._layers_per_chunk(),
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
            sequence_parallel=self.tp > 1,
            micro_batch_size=self.micro_batch,
            global_batch_size=self.global_batch,
            recompute_granularity=self.recompute,
            use_distributed_optimizer=True,
            mamoe_placement=self.placement,
            seq_length=self.seq_length,
        )

    def _layers_per_chunk(self) -> int | None:
        return self.memory["layers_per_rank"] // self.vpp if self.vpp else None

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), layout=self.describe(), train_args=self.train_args())


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every layout of one plan() call shares."""

    most: object
    name: str
    gpu: str
    gpus: int
    seq_length: int
    global_batch: int
    precision: str
    audio_share: float
    overlap: frozenset
    kernels: str


def evaluate(setting: Setting, counts, *, tp, pp, ep, etp, vpp, micro_batch, recompute, placement, est=None):
    """One layout's Plan (None when the batch does not split into its micro-batches). `est`:
    model.estimate's Estimate of (tp, pp, ep, etp), reused across schedules."""
    most, hw = setting.most, gpu_named(setting.gpu)
    layout = ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp, sp=tp > 1, vpp=vpp)
    est = est or estimate(most, layout, world_size=setting.gpus, seq_len=setting.seq_length, counts=counts)
    if setting.global_batch % (est.dp * micro_batch):
        return None
    micro_batches = setting.global_batch // (est.dp * micro_batch)
    if vpp and micro_batches % pp:
        return None  # Megatron's interleaved schedule needs micro-batches divisible by pp
    tokens = micro_batch * setting.seq_length
    imbalance = placement_imbalance(most.mamoe, ep, setting.audio_share, placement)
    stages = [
        _stage(setting, counts, est, s, tokens, layout, micro_batches, recompute, imbalance, hw)
        for s in range(len(est.stages))
    ]
    busiest = max(stages, key=lambda st: st["memory"]["total"])
    slowest = max(stages, key=lambda st: st["seconds"])
    per_mb = slowest["seconds"]
    peak = est.memory_stage
    dp_s = dp_seconds(peak.dense_params_per_gpu, peak.expert_params_per_gpu, est.dp, est.expert_dp, tp, etp * ep, hw)
    bubble = (pp - 1) / (vpp or 1) * per_mb
    times = {k: v * micro_batches for k, v in slowest["parts"].items()}
    times.update(bubble=bubble, dp=0.0 if "dp" in setting.overlap else dp_s)
    step = per_mb * micro_batches + bubble + times["dp"]
    tflops = est.flops_per_token * setting.seq_length * setting.global_batch / step / setting.gpus / 1e12
    memory = dict(busiest["memory"], layers_per_rank=len(range(*est.stages[0].layers)))
    return Plan(
        preset=setting.name,
        gpu=setting.gpu,
        gpus=setting.gpus,
        seq_length=setting.seq_length,
        global_batch=setting.global_batch,
        tp=tp,
        pp=pp,
        vpp=vpp,
        ep=ep,
        etp=etp,
        dp=est.dp,
        expert_dp=est.expert_dp,
        micro_batch=micro_batch,
        micro_batches=micro_batches,
        recompute=None if recompute == "none" else recompute,
        placement=placement,
        memory=memory,
        fits=memory["total"] <= MEMORY_USABLE * hw.memory_gib * 2**30,
        step_time=step,
        times=times,
        tflops_per_gpu=tflops,
        mfu=tflops / hw.bf16_tflops,
    )


def _stage(setting, counts, est, s, tokens, layout, micro_batches, recompute, imbalance, hw) -> dict:
    """Memory and per-micro-batch seconds of pipeline stage `s`."""
    most = setting.most
    start, end = est.stages[s].layers
    first, last = s == 0, s == len(est.stages) - 1
    tp, etp = layout.tp, layout.expert_tp
    matmul = attention = redo = 0.0
    qk = most.qk_nope_head_dim + most.qk_rope_head_dim
    per_layer_attention = attention_flops_per_token(
        1, most.num_attention_heads, qk, most.v_head_dim, setting.seq_length
    )
    moe_layers = 0
    for i in range(start, end):
        moe = i >= most.first_k_dense
        moe_layers += moe
        flops = layer_flops(most, counts.layers[i], setting.seq_length)
        attention += per_layer_attention
        matmul += flops["total"] - per_layer_attention + (imbalance - 1) * flops["moe_mlp"]
        if recompute == "full" or (recompute == "selective" and moe):  # a second forward of what is redone
            redo += (flops["total"] if recompute == "full" else flops["moe_mlp"]) / 3
    for piece, here in ((counts.first_stage, first), (counts.last_stage, last)):
        if here:
            matmul += 6 * matmul_params(by_category(piece), most.mamoe.topk, most.mamoe.num_experts)
    activations, working = stage_activations(
        most, range(start, end), setting.seq_length, tp, etp, ACTIVATION_BYTES, setting.kernels, recompute, first, last
    )
    held = in_flight(layout.pp, layout.vpp, s, micro_batches)
    act_bytes = activations * tokens * held + (working * tokens if recompute == "full" else 0)
    states = est.stages[s]
    dispatch = dispatch_bytes(most, tokens, tp, etp, ACTIVATION_BYTES) if moe_layers else 0
    memory = dict(
        stage=s,
        weights=states.weight_bytes,
        grads=states.grad_bytes,
        optimizer=states.optimizer_bytes,
        activations=int(act_bytes),
        dispatch=int(dispatch),
    )
    memory["total"] = sum(v for k, v in memory.items() if k != "stage")
    compute = _compute_seconds(setting, hw, tokens * (matmul + redo) / tp, tokens * attention / tp)
    again = 1.5 if recompute == "full" else 1.0  # full recompute repeats the forward's collectives
    tp_s = (end - start) * tp_seconds(tokens, most.hidden_size, tp, hw) * again
    ep_s = (
        moe_layers * ep_seconds(tokens, most, tp, layout.ep, etp, imbalance, hw) * (1.5 if recompute != "none" else 1)
    )
    p2p = pp_seconds(tokens, most.hidden_size, tp, layout.pp, hw)
    exposed_ep = max(0.0, ep_s - compute) if "ep" in setting.overlap else ep_s
    parts = dict(compute=compute, tp=tp_s, ep=exposed_ep, pp_p2p=p2p)
    return dict(memory=memory, seconds=sum(parts.values()), parts=parts)


def _compute_seconds(setting, hw, gemm_flops: float, attention_flops: float) -> float:
    bf16 = hw.bf16_tflops * 1e12 * GEMM_EFFICIENCY
    if setting.precision == "fp8":
        return gemm_flops / (hw.fp8_tflops * 1e12 * FP8_EFFICIENCY) + attention_flops / bf16
    return (gemm_flops + attention_flops) / bf16


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(
    most,
    gpus: int,
    gpu: str,
    seq_length: int | None = None,
    global_batch: int | None = None,
    micro_batch: int | None = None,
    *,
    name: str = "",
    precision: str = "bf16",
    recompute: tuple[str, ...] = RECOMPUTE,
    placements: tuple[str, ...] | None = None,
    audio_share: float = 0.5,
    overlap: tuple[str, ...] = (),
    max_tp: int = 8,
    kernels: str = "te",
    counts=None,
) -> list:
    """Every valid layout of `most` on `gpus` GPUs of kind `gpu`, best first (fitting plans by
    step time, then the rest). global_batch default: 8 x gpus sequences; micro_batch default:
    1, 2 and 4 are tried; placements default: the config's; audio_share: routed tokens that are
    audio (sets the contiguous placement's imbalance)."""
    hw = gpu_named(gpu)
    require(gpus >= 1, f"gpus={gpus}: must be >= 1")
    require(precision in ("bf16", "fp8"), f"precision={precision!r}: choose bf16 or fp8")
    require(precision != "fp8" or hw.fp8_tflops, f"precision=fp8 on gpu={gpu!r}: no FP8 tensor cores; use bf16")
    require(set(recompute) <= set(RECOMPUTE), f"recompute={recompute}: choose among {RECOMPUTE}")
    require(set(overlap) <= {"ep", "dp"}, f"overlap={overlap}: choose among ('ep', 'dp')")
    require(0 <= audio_share <= 1, f"audio_share={audio_share}: must be within 0..1")
    require(gpus % hw.gpus_per_node == 0 or gpus < hw.gpus_per_node,
            f"gpus={gpus}: use whole nodes of {hw.gpus_per_node} GPUs (or fewer than one node)")  # fmt: skip
    seq_length = most.seq_length if seq_length is None else seq_length
    require(
        1 <= seq_length <= most.max_position_embeddings, f"seq_length={seq_length}: outside 1..max_position_embeddings"
    )
    global_batch = 8 * gpus if global_batch is None else global_batch
    require(global_batch >= 1, f"global_batch={global_batch}: must be >= 1")
    setting = Setting(
        most, name, gpu, gpus, seq_length, global_batch, precision, audio_share, frozenset(overlap), kernels
    )
    counts = counts or count_parameters(most)
    plans = []
    for layout in candidate_layouts(most, gpus, max_tp):
        est = estimate(
            most, ParallelLayout(**layout, sp=layout["tp"] > 1), world_size=gpus, seq_len=seq_length, counts=counts
        )
        for vpp in _virtual_stages(most, layout["pp"]):
            for mb in (micro_batch,) if micro_batch else (1, 2, 4):
                for rc in recompute:
                    for placement in placements or (most.mamoe.placement,):
                        found = evaluate(
                            setting,
                            counts,
                            **layout,
                            vpp=vpp,
                            micro_batch=mb,
                            recompute=rc,
                            placement=placement,
                            est=est,
                        )
                        if found is not None:
                            plans.append(found)
    require(plans, f"no layout of {gpus} GPUs splits global_batch={global_batch}: choose a multiple of the GPU count")
    return sorted(plans, key=lambda p: (not p.fits, p.step_time, p.memory["total"]))


def candidate_layouts(most, gpus: int, max_tp: int = 8) -> list[dict]:
    """(tp, pp, ep, etp) that model.layout's checks accept on `gpus` GPUs (TP within a node)."""
    out = []
    for tp in (t for t in (1, 2, 4, 8) if t <= max_tp and gpus % t == 0):
        for pp in (p for p in _divisors(gpus // tp) if p <= most.num_layers):
            for etp in sorted({1, tp}):
                for ep in _divisors(most.mamoe.num_experts):
                    if gpus % (etp * ep * pp) == 0 and _valid(most, tp, pp, ep, etp):
                        out.append(dict(tp=tp, pp=pp, ep=ep, etp=etp))
    return out


def _valid(most, tp, pp, ep, etp) -> bool:
    try:
        layout = ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp, sp=tp > 1)
        check_layout(most, layout)
        stage_layers(most, layout)
    except ConfigError:
        return False
    return True


def _virtual_stages(most, pp: int) -> list[int | None]:
    """None, and 2..8 interleaved chunks when they split the layers evenly (Megatron's rule)."""
    if pp == 1:
        return [None]
    return [None] + [v for v in range(2, 9) if most.num_layers % (pp * v) == 0]
