"""Autoregressive generation for MoSTModel: batched prompts (left-padded), greedy or sampled
(temperature, top-k, top-p), stop on eos or after max_new_tokens, with the MLA latent cache
(inference/cache.py) or without it (each step re-runs Megatron's own forward on the whole
sequence, one row at a time: the reference the cache is tested against).

    prompts = [Prompt(ids=[...], features=None), Prompt(ids=[..., feat, feat, ...], features=f)]
    outputs = generate(model, prompts, max_new_tokens=64, eos_id=eos)     # new ids per prompt

Audio enters as the training data does: unit tokens in `ids`, or `<feat>` placeholders in
`ids` with one feature row each in `features` [frames, feature_dim]. Generated ids are never
`<feat>` (it has no frame to carry) nor padding rows of the embedding table.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_most.inference.cache import DecodeState, decode_step
from megatron_most.options import require
from megatron_most.platform import compat_cpu


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    """Token ids: text, audio markers, unit tokens and <feat> placeholders."""
    features: torch.Tensor | None = None
    """[frames, feature_dim]: one row per <feat> in `ids`, in order (continuous audio path)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    """Take the most likely token; otherwise sample with the settings below."""
    temperature: float = 1.0
    """Logits are divided by this before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches p (1.0: all)."""
    seed: int = 0
    """Seed of the sampling generator (the same on every rank, so ranks agree)."""

    def __post_init__(self):
        require(self.temperature > 0, f"Sampling.temperature={self.temperature}: must be > 0")
        require(self.top_k >= 0, f"Sampling.top_k={self.top_k}: must be >= 0 (0 = no limit)")
        require(0 < self.top_p <= 1, f"Sampling.top_p={self.top_p}: must be in (0, 1]")


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of `logits` [b, vocab] (disallowed ids already at -inf): [b]."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs >= sampling.top_p  # the mass before this token already reached p
        logits = logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


def _disallowed(model, device) -> torch.Tensor:
    """[vocab] True for ids generation never produces: <feat> and the table's padding rows."""
    tokens = model.tokens
    out = torch.arange(tokens.padded_size, device=device) >= tokens.size
    if tokens.audio:
        out[tokens.feature] = True
    return out


def _check(model, prompts: list[Prompt], max_new_tokens: int) -> None:
    require(prompts, "generate: no prompts")
    require(model.pre_process and model.post_process, "generate: the model must hold every layer (run at PP1)")
    for i, prompt in enumerate(prompts):
        require(prompt.ids, f"prompt {i}: empty")
        frames = sum(int(t == model.tokens.feature) for t in prompt.ids)
        given = 0 if prompt.features is None else prompt.features.shape[0]
        require(frames == given, f"prompt {i}: {frames} <feat> positions but {given} feature rows")
        total = len(prompt.ids) + max_new_tokens
        require(
            total <= model.most.max_position_embeddings,
            f"prompt {i}: {len(prompt.ids)} tokens + max_new_tokens {max_new_tokens} = {total} exceed the model's "
            f"{model.most.max_position_embeddings} positions",
        )


def _batch(prompts: list[Prompt], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-padded ids [b, s], valid [b, s] and the features of all prompts in batch order."""
    width = max(len(p.ids) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
        valid[row, width - len(prompt.ids) :] = True
    features = [p.features for p in prompts if p.features is not None]
    return ids.to(device), valid.to(device), torch.cat(features) if features else None


def _uncached_logits(model, prompts: list[Prompt], generated: list[list[int]]) -> torch.Tensor:
    """Last-position logits of each prompt + its generated ids through Megatron's forward: [b, vocab]."""
    rows = []
    for prompt, new in zip(prompts, generated, strict=True):
        ids = torch.tensor([prompt.ids + new], device=_device(model))
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        logits = model(ids, positions, None, audio_features=prompt.features)  # [1, s, vocab / tp]
        logits = gather_from_tensor_model_parallel_region(logits)
        rows.append(logits[0, -1].float())
    return torch.stack(rows)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(
    model,
    prompts: list[Prompt],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    sampling: Sampling = Sampling(),
    use_cache: bool = True,
) -> list[list[int]]:
    """New token ids per prompt (eos included when reached)."""
    _check(model, prompts, max_new_tokens)
    model.eval()
    device = _device(model)
    disallowed = _disallowed(model, device)
    generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
    generated: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    state = DecodeState.empty(model, len(prompts), device) if use_cache else None
    ids, valid, features = _batch(prompts, device)
    # Cached decoding names no CUDA device: it runs without the CPU compatibility layer's
    # per-call hop (platform/compat_cpu.py); Megatron's own forward (uncached) keeps it.
    with compat_cpu.suspended() if use_cache else contextlib.nullcontext():
        for _ in range(max_new_tokens):
            if use_cache:
                logits = decode_step(model, state, ids, valid, features, last_only=True)[:, -1]
            else:
                logits = _uncached_logits(model, prompts, generated)
            logits = logits[:, : disallowed.shape[0]].masked_fill(disallowed, float("-inf"))
            new = choose(logits, sampling, generator)
            tokens = new.tolist()
            for row in (~done).nonzero().view(-1).tolist():
                generated[row].append(tokens[row])
            if eos_id is not None:
                done |= new == eos_id
            if bool(done.all()):
                break
            ids, valid, features = new[:, None], torch.ones(len(prompts), 1, dtype=torch.bool, device=device), None
    return generated
