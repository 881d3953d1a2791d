"""The parallel layout: how a job's ranks split into tensor, pipeline, expert and data groups."""

from __future__ import annotations

from megatron_most.options import ConfigError, options, require


@options
class ParallelLayout:
    tp: int = 1
    """Tensor-parallel size (attention heads and MLP columns split across ranks)."""
    pp: int = 1
    """Pipeline-parallel size (decoder layers split into consecutive stages)."""
    ep: int = 1
    """Expert-parallel size (routed experts split across ranks; tokens move by all-to-all)."""
    etp: int | None = None
    """Tensor-parallel size inside each expert; None means the same as `tp` (Megatron's default)."""
    sp: bool = False
    """Sequence parallelism: activations outside attention/MLP are split along the sequence
    across the tensor-parallel group. Needs tp > 1."""
    vpp: int | None = None
    """Virtual pipeline stages (model chunks) per pipeline rank, for the interleaved 1F1B
    schedule; None = one chunk per rank. Needs pp > 1."""

    def __post_init__(self):
        for name in ("tp", "pp", "ep"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"ParallelLayout.{name}={value!r}: must be an integer >= 1")
        require(
            self.etp is None or (isinstance(self.etp, int) and self.etp >= 1),
            f"ParallelLayout.etp={self.etp!r}: must be None (same as tp) or an integer >= 1",
        )
        require(
            self.vpp is None or (isinstance(self.vpp, int) and self.vpp >= 1 and self.pp > 1),
            f"ParallelLayout.vpp={self.vpp!r}: virtual pipeline stages need pp > 1 and an integer >= 1",
        )
        require(
            not self.sp or self.tp > 1,
            f"ParallelLayout.sp=True with tp={self.tp}: sequence parallelism splits activations "
            "across the tensor-parallel group, so set tp >= 2 or sp=False",
        )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def dp(self, world_size: int) -> int:
        """Data-parallel size for `world_size` ranks, or ConfigError if the layout does not fit."""
        dense = self.tp * self.pp
        expert = self.expert_tp * self.ep * self.pp
        if world_size % dense:
            raise ConfigError(
                f"ParallelLayout(tp={self.tp}, pp={self.pp}) needs a world size divisible by "
                f"tp*pp={dense}, got world size {world_size}: change --tp/--pp or the number of ranks"
            )
        if world_size % expert:
            raise ConfigError(
                f"ParallelLayout(etp={self.expert_tp}, ep={self.ep}, pp={self.pp}) needs a world size "
                f"divisible by etp*ep*pp={expert}, got world size {world_size}: change --ep/--etp "
                "or the number of ranks"
            )
        return world_size // dense

    def check_experts(self, num_experts: int | None) -> None:
        """EP must divide the routed-expert count so every rank holds the same number."""
        if self.ep > 1 and not num_experts:
            raise ConfigError(f"ParallelLayout.ep={self.ep} but the model has no routed experts: set ep=1")
        if num_experts and num_experts % self.ep:
            raise ConfigError(
                f"ParallelLayout.ep={self.ep} does not divide num_experts={num_experts}: "
                f"choose ep among {[d for d in range(1, num_experts + 1) if num_experts % d == 0]}"
            )
        if num_experts and self.tp > 1 and not self.sp:
            raise ConfigError(
                f"ParallelLayout(tp={self.tp}, sp=False) with {num_experts} routed experts: "
                "Megatron-Core requires sequence parallelism when MoE runs with tensor parallelism; "
                "add --sp (sp=True)"
            )

    def describe(self) -> str:
        vpp = f" VPP{self.vpp}" if self.vpp else ""
        return f"TP{self.tp} PP{self.pp}{vpp} EP{self.ep} ETP{self.expert_tp}" + (" SP" if self.sp else "")
