"""MoST (DeepSeek-V2-Lite + modality-aware MoE) configuration for Hugging Face transformers 5.

Self-contained: imports only transformers. Shipped next to an exported checkpoint and mapped in
config.json by `auto_map` ("AutoConfig": "configuration_most.MoSTHFConfig").

Token layout (ids):
    [0, text_vocab_size)          text tokens of the base tokenizer        modality 0
    text_vocab_size + 0           <boa>  begin of audio                     modality 0
    text_vocab_size + 1           <eoa>  end of audio                       modality 0
    text_vocab_size + 2           <feat> one continuous audio frame        modality 1
    text_vocab_size + 3 + k       unit [Hu k], k < num_units                modality 1
`vocab_size` is the padded table size (a multiple of 128) and covers all of them.
"""

from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config


class MoSTHFConfig(DeepseekV2Config):
    model_type = "most"

    text_vocab_size: int | None = None
    """Base tokenizer's vocabulary; None = vocab_size (a text-only model)."""
    num_units: int = 0
    """Discrete HuBERT units [Hu0].. appended after the audio markers; 0 = no discrete path."""
    audio_feature_dim: int = 0
    """Width of continuous audio features projected at <feat> positions; 0 = no continuous path."""
    text_experts: list[int] | None = None
    """Routed experts of the text group; None = complement of audio_experts, or the first half."""
    audio_experts: list[int] | None = None
    """Routed experts of the audio group; None = every expert not in the text group."""
    masking: str = "zero_after_softmax"
    """zero_after_softmax (the release) or renormalize_in_group (other group's logits -> -inf)."""
    variant: str = "mamoe"
    """mamoe, vanilla (no modality masking) or no_shared (no shared experts)."""

    # -- derived token ids ------------------------------------------------------------------
    @property
    def text_vocab(self) -> int:
        return self.vocab_size if self.text_vocab_size is None else self.text_vocab_size

    @property
    def has_audio_tokens(self) -> bool:
        return bool(self.num_units or self.audio_feature_dim)

    @property
    def boa_token_id(self) -> int:
        return self.text_vocab

    @property
    def eoa_token_id(self) -> int:
        return self.text_vocab + 1

    @property
    def feature_token_id(self) -> int:
        return self.text_vocab + 2

    @property
    def first_unit_token_id(self) -> int:
        return self.text_vocab + 3

    def expert_groups(self) -> tuple[list[int], list[int]]:
        """(text experts, audio experts), sorted; same defaults as megatron_most's MAMoEConfig."""
        n = self.n_routed_experts
        text, audio = self.text_experts, self.audio_experts
        if text is None:
            text = range(n // 2) if audio is None else set(range(n)) - set(audio)
        if audio is None:
            audio = set(range(n)) - set(text)
        return sorted(text), sorted(audio)

    def validate_architecture(self):
        super().validate_architecture()
        if self.masking not in ("zero_after_softmax", "renormalize_in_group"):
            raise ValueError(f"masking={self.masking!r}: choose zero_after_softmax or renormalize_in_group")
        if self.variant not in ("mamoe", "vanilla", "no_shared"):
            raise ValueError(f"variant={self.variant!r}: choose mamoe, vanilla or no_shared")
        if self.has_audio_tokens and self.first_unit_token_id + self.num_units > self.vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size} cannot hold text_vocab_size={self.text_vocab} + 3 audio markers + "
                f"{self.num_units} units"
            )
        text, audio = self.expert_groups()
        if set(text) & set(audio) or set(text) | set(audio) != set(range(self.n_routed_experts)):
            raise ValueError(
                f"text_experts={text} and audio_experts={audio} must split 0..{self.n_routed_experts - 1} into two groups"
            )
        if self.variant != "vanilla" and self.num_experts_per_tok is not None:
            if self.num_experts_per_tok > min(len(text), len(audio)):
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} exceeds the smallest expert group "
                    f"({min(len(text), len(audio))} experts)"
                )


__all__ = ["MoSTHFConfig"]
