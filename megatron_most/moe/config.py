"""MAMoE options: expert partition, masking rule, balance loss, ablation variants, placement."""

from __future__ import annotations

from typing import Literal

from megatron_most.options import ConfigError, options, require


@options
class MAMoEConfig:
    num_experts: int = 64
    """Routed experts in each MoE layer (DeepSeek-V2-Lite: 64)."""
    text_experts: tuple[int, ...] | None = None
    """Expert indices of the text group; None = every expert not in `audio_experts`, or the
    first half when neither is given (the release's 0..31 of 64)."""
    audio_experts: tuple[int, ...] | None = None
    """Expert indices of the audio group; None = every expert not in the text group."""
    topk: int = 6
    """Experts per token (DeepSeek-V2-Lite: 6); must fit inside each group."""
    masking: Literal["zero_after_softmax", "renormalize_in_group"] = "zero_after_softmax"
    """zero_after_softmax: softmax over all experts, zero the other group's scores, top-k
    (the release; weights do not sum to 1). renormalize_in_group: mask the other group's logits
    to -inf before the softmax, so weights are a softmax inside the token's group."""
    variant: Literal["mamoe", "vanilla", "no_shared"] = "mamoe"
    """mamoe: modality routing + shared experts. vanilla (paper's VanillaMoE): no modality
    masking. no_shared (paper's NoShared): modality routing without shared experts."""
    shared_expert_size: int = 2816
    """Width of the always-on shared-expert MLP (DeepSeek-V2-Lite: 2 experts x 1408); 0 = none."""
    balance_loss: Literal["global", "per_group"] = "global"
    """global: sequence-level aux loss over all experts and tokens (the release). per_group:
    each group balanced over its own experts and the tokens of its modality."""
    balance_coeff: float = 0.001
    """Aux-loss coefficient (DeepSeek-V2-Lite aux_loss_alpha)."""
    z_loss_coeff: float | None = None
    """Router z-loss coefficient (ST-MoE); None = off."""
    placement: Literal["balanced", "contiguous"] = "balanced"
    """How logical experts map to expert-parallel ranks: balanced gives every rank the same
    share of text and audio experts; contiguous is Megatron's default (rank r holds experts
    r*n..r*n+n-1). Placement changes where experts live, never the math or checkpoints."""

    def __post_init__(self):
        require(self.num_experts >= 2, f"MAMoEConfig.num_experts={self.num_experts}: need at least 2 experts")
        for name in ("text_experts", "audio_experts"):
            group = getattr(self, name)
            if group is not None:
                bad = [e for e in group if not isinstance(e, int) or isinstance(e, bool)]
                require(not bad, f"MAMoEConfig.{name} must hold integer expert indices, got {bad}")
                object.__setattr__(self, name, tuple(group))  # lists from YAML/JSON become tuples
        text, audio = self.groups()
        everything = set(range(self.num_experts))
        for name, group in (("text_experts", text), ("audio_experts", audio)):
            outside = sorted(set(group) - everything)
            require(not outside, f"MAMoEConfig.{name} has indices {outside} outside 0..{self.num_experts - 1}")
            require(len(set(group)) == len(group), f"MAMoEConfig.{name} repeats an expert index: {list(group)}")
            require(group, f"MAMoEConfig.{name} is empty: each modality needs at least one expert")
        overlap = sorted(set(text) & set(audio))
        require(not overlap, f"MAMoEConfig: experts {overlap} are in both text_experts and audio_experts")
        missing = sorted(everything - set(text) - set(audio))
        require(not missing, f"MAMoEConfig: experts {missing} are in neither group; every expert needs a group")
        require(self.topk >= 1, f"MAMoEConfig.topk={self.topk}: must be >= 1")
        if self.variant == "vanilla":
            require(self.topk <= self.num_experts, f"MAMoEConfig.topk={self.topk} > num_experts={self.num_experts}")
        else:
            smallest = min(len(text), len(audio))
            require(
                self.topk <= smallest,
                f"MAMoEConfig.topk={self.topk} is larger than the smallest expert group ({smallest} experts): "
                "a token only reaches experts of its own group; lower topk or enlarge the group",
            )
        require(self.balance_coeff >= 0, f"MAMoEConfig.balance_coeff={self.balance_coeff}: must be >= 0")
        require(self.shared_expert_size >= 0, f"MAMoEConfig.shared_expert_size={self.shared_expert_size}: must be >= 0")

    def groups(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(text expert indices, audio expert indices), sorted."""
        text, audio = self.text_experts, self.audio_experts
        if text is None:  # the complement of the audio group, or the release's first half
            text = range(self.num_experts // 2) if audio is None else set(range(self.num_experts)) - set(audio)
        if audio is None:
            audio = set(range(self.num_experts)) - set(text)
        return tuple(sorted(text)), tuple(sorted(audio))

    @property
    def modality_routing(self) -> bool:
        return self.variant != "vanilla"

    @property
    def has_shared_experts(self) -> bool:
        return self.variant != "no_shared" and self.shared_expert_size > 0

    def megatron_fields(self) -> dict:
        """TransformerConfig MoE fields implied by this config (MAMoE computes its own balance loss)."""
        return dict(
            num_moe_experts=self.num_experts,
            moe_router_topk=self.topk,
            moe_shared_expert_intermediate_size=self.shared_expert_size if self.has_shared_experts else None,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_z_loss_coeff=self.z_loss_coeff,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_router_score_function="softmax",
        )


def check_expert_parallel(config: MAMoEConfig, ep: int) -> None:
    """EP must split the experts evenly (Megatron gives every rank the same number)."""
    if config.num_experts % ep:
        raise ConfigError(
            f"expert-parallel size {ep} does not divide MAMoEConfig.num_experts={config.num_experts}: "
            "every EP rank must hold the same number of experts"
        )
