"""The pretraining loop on Megatron-Core's parts (what megatron/training/training.py does there).

    exit_code = pretrain(parse(argv))     # tools/pretrain_most.py, under torchrun

Order of things: every check that can fail on bad input (layout vs world size and model, data
prefixes vs the model's tokens, a checkpoint of another model) runs on every rank before any
process group exists; then the groups, the model chunks (one per virtual pipeline stage), DDP +
optimizer (engine), the LR scheduler and batch-size calculator, the resume, and the loop:

    each step   micro-batches of this DP rank -> schedule (forward/backward) -> guarded optimizer
                step (a non-finite loss or grad norm skips it) -> LR step -> counters
    intervals   log line + metrics.jsonl/TensorBoard/wandb, MAMoE routing stats + heatmap,
                validation per task, checkpoint
    exits       train_iters, --exit-interval, --exit-duration-in-mins, SIGTERM (and SIGUSR1 with
                --exit-signal-handler): a checkpoint, then exit status 0; too many skipped steps
                in a row: exit status 1 without a save (the last good checkpoint stays latest)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time

import torch
from megatron.core import num_microbatches_calculator as batches_calc
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_most.model.config import MoSTConfig
from megatron_most.model.layout import check_layout, stage_layers
from megatron_most.model.most import build_model
from megatron_most.options import ConfigError, require
from megatron_most.platform import device, initialize, shutdown
from megatron_most.training import batches, checkpoint, monitor
from megatron_most.training.config import TrainConfig, describe
from megatron_most.training.engine import optimizer_step, run_schedule, wrap_chunks, zero_grads
from megatron_most.training.metrics import Metrics

EXIT_SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1}


# ---------------------------------------------------------------------------------- before groups


def preflight(cfg: TrainConfig) -> MoSTConfig:
    """Everything that can be checked without a process group; the same error on every rank."""
    most = cfg.model_config()
    layout = cfg.layout
    world = int(os.environ.get("WORLD_SIZE", 1))
    dp = layout.dp(world)
    layout.check_experts(most.mamoe.num_experts)
    check_layout(most, layout)
    stage_layers(most, layout)
    gbs = cfg.global_batch_size or cfg.micro_batch_size * dp
    require(
        gbs % (cfg.micro_batch_size * dp) == 0,
        f"--global-batch-size={gbs} is not a multiple of --micro-batch-size {cfg.micro_batch_size} x DP {dp}",
    )
    if cfg.num_layers_per_virtual_pipeline_stage is not None:
        per_rank, chunk = most.num_layers // layout.pp, cfg.num_layers_per_virtual_pipeline_stage
        require(
            layout.pp > 1 and most.num_layers % layout.pp == 0 and per_rank % chunk == 0 and per_rank > chunk,
            f"--num-layers-per-virtual-pipeline-stage={chunk}: needs PP > 1 and must divide the {most.num_layers} "
            f"layers / PP {layout.pp} = {per_rank} per rank into at least two virtual stages",
        )
        micro = gbs // (cfg.micro_batch_size * dp)
        require(
            micro % layout.pp == 0 and cfg.rampup_batch_size is None,
            f"the interleaved schedule needs the micro-batches per step ({micro}) to be a multiple of PP "
            f"({layout.pp}) and no --rampup-batch-size",
        )
    require(most.seq_length <= most.max_position_embeddings, f"--seq-length={most.seq_length}: over the preset's range")
    batches.check_data(cfg, most)
    if cfg.load:
        checkpoint.check_model(cfg.load, most)
    if cfg.pretrained_checkpoint:
        checkpoint.check_model(cfg.pretrained_checkpoint, most)
    return most


# ---------------------------------------------------------------------------------- setup


def _chunks(cfg: TrainConfig, most: MoSTConfig) -> list:
    layout = cfg.layout
    recompute = {}
    if cfg.recompute_granularity == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method=cfg.recompute_method,
            recompute_num_layers=cfg.recompute_num_layers,
        )
    elif cfg.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["moe"])
    if layout.vpp:
        recompute["virtual_pipeline_model_parallel_size"] = layout.vpp
    config = most.transformer_config(layout, precision=cfg.precision, ddp=True, **recompute)
    stages = range(layout.vpp) if layout.vpp else [None]
    return [build_model(most, config, vp_stage=s) for s in stages]


def _optimizer_config(cfg: TrainConfig) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )


def _scheduler(cfg: TrainConfig, optimizer, gbs: int) -> OptimizerParamScheduler:
    """Megatron-LM's scheduler, counted in samples (so batch ramp-up moves it correctly)."""
    decay = (cfg.lr_decay_iters or cfg.train_iters) * gbs
    wsd = (cfg.lr_wsd_decay_iters * gbs) if cfg.lr_wsd_decay_iters else int(0.1 * decay)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * gbs,
        lr_decay_steps=decay,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=wsd if cfg.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style=cfg.lr_wsd_decay_style if cfg.lr_decay_style == "WSD" else None,
    )


@dataclasses.dataclass
class Counters:
    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


# ---------------------------------------------------------------------------------- signals


class ExitRequest:
    """Signals (and the wall clock) that ask the run to save and stop, agreed on by all ranks."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.start, self.received = cfg, time.monotonic(), None
        names = ["SIGTERM"] + (["SIGUSR1"] if cfg.exit_signal_handler else [])
        for name in names:
            signal.signal(EXIT_SIGNALS[name], self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def reason(self, iteration: int) -> str | None:
        """Why to stop after `iteration` (None: go on); one small all-reduce so that all ranks stop together."""
        cfg, minutes = self.cfg, (time.monotonic() - self.start) / 60
        local = [
            self.received is not None,
            cfg.exit_duration_in_mins is not None and minutes >= cfg.exit_duration_in_mins,
            cfg.exit_interval is not None and iteration % cfg.exit_interval == 0,
        ]
        flags = torch.tensor(local, dtype=torch.float32, device=device())
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        reasons = (
            "signal",
            f"--exit-duration-in-mins {cfg.exit_duration_in_mins}",
            f"--exit-interval {cfg.exit_interval}",
        )
        hit = [r for r, f in zip(reasons, flags.tolist()) if f]
        return hit[0] if hit else None


# ---------------------------------------------------------------------------------- the run


class Run:
    """One training job: the objects of `pretrain` and the step, eval and save around them."""

    def __init__(self, cfg: TrainConfig, most: MoSTConfig, log=print):
        self.cfg, self.most, self.log = cfg, most, log
        self.layout = cfg.layout
        self.dp = initialize(
            self.layout,
            num_experts=most.mamoe.num_experts,
            seed=cfg.seed,
            timeout_s=cfg.distributed_timeout_minutes * 60,
        )
        self.rank = torch.distributed.get_rank()
        self.gbs = cfg.global_batch_size or cfg.micro_batch_size * self.dp
        batches_calc.init_num_microbatches_calculator(
            self.rank, cfg.rampup_batch_size, self.gbs, cfg.micro_batch_size, self.dp, False
        )
        self.chunks = _chunks(cfg, most)
        self.ddps, self.optimizer = wrap_chunks(
            self.chunks,
            _optimizer_config(cfg),
            overlap_grad_reduce=cfg.overlap_grad_reduce,
            overlap_param_gather=cfg.overlap_param_gather,
        )
        self.scheduler = _scheduler(cfg, self.optimizer, self.gbs)
        self.counters = Counters()
        self.checkpointer = (
            checkpoint.Checkpointer(cfg.save, most=most, keep_last=cfg.keep_last, async_save=cfg.async_save, log=log)
            if cfg.save
            else None
        )
        self._resume()
        self.tasks = batches.task_names(cfg)
        self.valid_tasks = batches.task_names(cfg, "valid")
        self.train_data, self.valid = batches.build(cfg, most, global_batch=self.gbs)
        dp_rank = parallel_state.get_data_parallel_rank()
        self.train_iter = batches.loader(
            self.train_data, cfg, dp_rank=dp_rank, dp_size=self.dp, consumed=self.counters.consumed_train_samples
        )
        self.dp_rank = dp_rank
        self.keys = batches.report_keys(self.tasks)
        self.metrics = Metrics(
            log_dir=cfg.log_dir or cfg.save,
            tensorboard_dir=cfg.tensorboard_dir,
            wandb_project=cfg.wandb_project,
            wandb_exp_name=cfg.wandb_exp_name,
            config=cfg.to_dict(),
            is_writer=self.rank == 0,
            log=log,
        )
        self.monitor = monitor.Monitor(cfg, most, self, log=log)

    def _resume(self) -> None:
        cfg = self.cfg
        if cfg.load and checkpoint.latest_iteration(cfg.load) is not None:
            iteration, state = checkpoint.load(
                cfg.load, self.chunks, self.optimizer, self.scheduler,
                load_optim=not cfg.no_load_optim, load_rng=not cfg.no_load_rng,
            )  # fmt: skip
            self.counters = Counters(**{k: state[k] for k in dataclasses.asdict(Counters()) if k in state})
            self.counters.iteration = iteration
            self.log(
                f"resumed from {cfg.load} at iteration {iteration} ({self.counters.consumed_train_samples} samples)"
            )
        elif cfg.pretrained_checkpoint:
            checkpoint.load_pretrained(cfg.pretrained_checkpoint, self.chunks, optimizer=self.optimizer)
            self.log(f"initial weights from {cfg.pretrained_checkpoint} (iteration 0, new optimizer)")
        batches_calc.update_num_microbatches(self.counters.consumed_train_samples, consistency_check=False)

    # ------------------------------------------------------------------ one step
    def schedule(self, data, tasks, *, forward_only: bool = False) -> tuple[dict, int]:
        """The schedule over the next micro-batches of `data`: (summed report, micro-batches)."""
        n = (
            batches_calc.get_num_microbatches()
            if not forward_only
            else self.gbs // (self.cfg.micro_batch_size * self.dp)
        )
        micro = [next(data) for _ in range(n)]  # this step's batches (one list, replayed per chunk)
        step = functools.partial(forward_step, tasks, self.most)
        report = run_schedule(
            self.ddps,
            step,
            [iter(micro) for _ in self.ddps],
            num_microbatches=n,
            seq_length=self.most.seq_length,
            micro_batch_size=self.cfg.micro_batch_size,
            report_keys=batches.report_keys(tasks),
            forward_only=forward_only,
        )
        return report, n

    def train_step(self) -> dict:
        zero_grads(self.ddps, self.optimizer)
        report, n = self.schedule(self.train_iter, self.tasks)
        loss = report["loss"] / (n * self.dp)
        updated, grad_norm = optimizer_step(self.optimizer, math.isfinite(loss))
        gbs = batches_calc.get_current_global_batch_size()
        c = self.counters
        if updated:
            self.scheduler.step(increment=gbs)
        else:
            c.skipped_iterations += 1
            c.nan_iterations += int(not (math.isfinite(loss) and math.isfinite(grad_norm)))
        c.iteration += 1
        c.consumed_train_samples += gbs
        batches_calc.update_num_microbatches(c.consumed_train_samples, consistency_check=True)
        return dict(report, lm_loss=loss, grad_norm=grad_norm, updated=updated, global_batch=gbs)

    # ------------------------------------------------------------------ eval and save
    def evaluate(self) -> dict[str, float]:
        """Validation loss per task over the first eval_iters global batches of the valid split."""
        for chunk in self.chunks:
            chunk.eval()
        data = batches.loader(self.valid, self.cfg, dp_rank=self.dp_rank, dp_size=self.dp, workers=0)
        totals: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(self.cfg.eval_iters):
                report, _ = self.schedule(data, self.valid_tasks, forward_only=True)
                for key, value in report.items():
                    totals[key] = totals.get(key, 0.0) + value
        for chunk in self.chunks:
            chunk.train()
        return monitor.per_task(totals, self.valid_tasks, prefix="valid ")

    def save(self) -> None:
        if self.checkpointer is None:
            return
        state = dict(dataclasses.asdict(self.counters), config=self.cfg.to_dict())
        self.checkpointer.save(self.counters.iteration, self.chunks, self.optimizer, self.scheduler, state)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.finalize(blocking=True)
        self.monitor.close()
        self.metrics.close()


def forward_step(tasks, most, data_iterator, model):
    """The loop's forward step (a module attribute so tests can inject failures)."""
    return batches.forward_step(tasks, most, data_iterator, model)


def train(run: Run) -> int:
    """The loop; returns the exit status."""
    cfg, c = run.cfg, run.counters
    exits = ExitRequest(cfg)
    consecutive = 0
    while c.iteration < cfg.train_iters:
        start = time.perf_counter()
        result = run.train_step()
        consecutive = 0 if result["updated"] else consecutive + 1
        run.monitor.step(result, time.perf_counter() - start)
        if run.checkpointer is not None:
            run.checkpointer.finalize(blocking=False)
        if consecutive >= cfg.max_consecutive_skipped_iters:
            run.log(
                f"stopping: {consecutive} optimizer steps in a row were skipped (non-finite loss or gradients) up to "
                f"iteration {c.iteration}; the last saved checkpoint is left as the latest"
            )
            return 1
        if cfg.eval_interval and c.iteration % cfg.eval_interval == 0:
            run.monitor.validation(run.evaluate())
        reason = exits.reason(c.iteration)
        if reason is not None:
            run.log(f"exiting at iteration {c.iteration} ({reason}): saving a checkpoint")
            run.save()
            return 0
        if cfg.save_interval and c.iteration % cfg.save_interval == 0:
            if consecutive:  # in a streak of skipped steps: keep the last good checkpoint the latest
                run.metrics.event(c.iteration, f"checkpoint not saved: {consecutive} skipped steps in a row")
            else:
                run.save()
    if cfg.save and (not cfg.save_interval or c.iteration % cfg.save_interval):
        run.save()
    return 0


def pretrain(cfg: TrainConfig, log=print) -> int:
    """Train as configured; returns the process exit status (0: done or stopped by a signal)."""
    most = preflight(cfg)
    run = Run(cfg, most, log=log)
    if run.rank == 0:
        log(f"MoST pretraining, {run.layout.describe()} DP{run.dp}, resolved configuration:\n{describe(cfg)}")
    try:
        return train(run)
    finally:
        run.close()
        shutdown()


__all__ = ["pretrain", "preflight", "Run", "train", "ConfigError"]
