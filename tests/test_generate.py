"""Generation with the MLA latent cache (megatron_most/inference) against Megatron's own forward.

A tiny random MoSTModel with MAMoE, units and continuous audio features (the configuration of
tests/test_hf_most_model.py). References: MoSTModel.forward over the whole sequence (Megatron's
local MLA, no cache) for the logits, and generation that re-runs that forward at every step,
one prompt at a time, for the tokens.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_distributed


def _model():
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize
    from tests.test_hf_most_model import MASKINGS, _most

    initialize(ParallelLayout(), num_experts=8)
    most = _most(MASKINGS[0])
    torch.manual_seed(0)
    model = build_model(most, most.transformer_config()).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than init weights, so that logits are far from uniform
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    return model


def _prompts(tokens):
    """Three prompts of different lengths: text + <boa> <feat>x5 <eoa>; text + units; <feat>x4 only."""
    from megatron_most.inference import Prompt

    gen = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, tokens.text_vocab_size, (n,), generator=gen).tolist()  # noqa: E731
    units = lambda n: tokens.unit(torch.randint(0, tokens.num_units, (n,), generator=gen)).tolist()  # noqa: E731
    feat = lambda n: [tokens.feature] * n  # noqa: E731
    return [
        Prompt(text(4) + [tokens.boa] + feat(5) + [tokens.eoa] + text(2), torch.randn(5, 16, generator=gen)),
        Prompt(text(3) + units(6)),
        Prompt([tokens.boa] + feat(4) + [tokens.eoa], torch.randn(4, 16, generator=gen)),
    ]


def _cached_logits_body():
    from megatron_most.inference.cache import DecodeState, decode_step

    model = _model()
    prompts = _prompts(model.tokens)
    diffs = {}
    with torch.no_grad():
        for i, prompt in enumerate(prompts):  # alone: prefill 4 tokens, then one token per step
            ids = torch.tensor([prompt.ids])
            reference = model(ids, torch.arange(ids.shape[1])[None], None, audio_features=prompt.features)[0]
            state = DecodeState.empty(model, 1, ids.device)
            frames = int((ids[0, :4] == model.tokens.feature).sum())
            feats = prompt.features
            steps = [
                decode_step(
                    model, state, ids[:, :4], torch.ones(1, 4, dtype=torch.bool), feats[:frames] if frames else None
                )
            ]
            for t in range(4, ids.shape[1]):
                f = feats[frames : frames + 1] if ids[0, t] == model.tokens.feature else None
                frames += f is not None
                steps.append(decode_step(model, state, ids[:, t : t + 1], torch.ones(1, 1, dtype=torch.bool), f))
            diffs[f"alone {i}"] = (torch.cat(steps, dim=1)[0] - reference).abs().max().item()
        from megatron_most.inference.generate import _batch

        ids, valid, features = _batch(prompts, torch.device("cpu"))  # all three, left-padded, one prefill
        batched = decode_step(model, DecodeState.empty(model, 3, ids.device), ids, valid, features)
        for i, prompt in enumerate(prompts):
            one = torch.tensor([prompt.ids])
            reference = model(one, torch.arange(one.shape[1])[None], None, audio_features=prompt.features)[0]
            diffs[f"batched {i}"] = (batched[i, -one.shape[1] :] - reference).abs().max().item()
    return diffs


def test_cached_logits_equal_the_megatron_forward():
    diffs = run_distributed(_cached_logits_body, 1, timeout_s=300)[0]
    assert max(diffs.values()) < 1e-4, diffs


def _generation_body(sampling_kwargs):
    from megatron_most.inference import Sampling, generate

    model = _model()
    prompts = _prompts(model.tokens)
    sampling = Sampling(**sampling_kwargs)
    cached = generate(model, prompts, max_new_tokens=10, eos_id=None, sampling=sampling)
    uncached = generate(model, prompts, max_new_tokens=10, eos_id=None, sampling=sampling, use_cache=False)
    return cached, uncached


@pytest.mark.parametrize(
    "sampling",
    [{}, {"greedy": False, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 5}],
    ids=["greedy", "sampled"],
)
def test_cached_generation_equals_uncached_token_for_token(sampling):
    cached, uncached = run_distributed(_generation_body, 1, args=(sampling,), timeout_s=300)[0]
    assert cached == uncached
    assert all(len(row) == 10 for row in cached)
    assert len({tuple(row) for row in cached}) == 3  # the prompts really lead to different outputs


def _stops_body():
    from megatron_most.inference import Prompt, generate

    model = _model()
    prompts = _prompts(model.tokens)
    free = generate(model, prompts, max_new_tokens=6, eos_id=None)
    eos = free[1][2]  # prompt 1's third token: it stops there, the others run on unless they meet it
    stopped = generate(model, prompts, max_new_tokens=6, eos_id=eos)
    with torch.no_grad():  # make <feat> and a padding row of the table the most likely outputs
        model.output_layer.weight[model.tokens.feature] = 5.0
        model.output_layer.weight[model.tokens.padded_size - 1] = 5.0
    forced = generate(model, prompts, max_new_tokens=4, eos_id=None)
    errors = []
    for bad in (Prompt([model.tokens.feature]), Prompt([]), Prompt([1] * 20000)):
        try:
            generate(model, [bad], max_new_tokens=2, eos_id=None)
        except Exception as e:  # noqa: BLE001 - the message is the point
            errors.append(f"{type(e).__name__}: {e}")
    return free, stopped, eos, forced, errors, model.tokens.feature, model.tokens.size


def test_eos_stops_a_row_and_feat_is_never_generated():
    free, stopped, eos, forced, errors, feat, size = run_distributed(_stops_body, 1, timeout_s=300)[0]
    assert stopped[1] == free[1][:3]
    for row_free, row_stopped in zip(free, stopped, strict=True):
        cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row_stopped == row_free[:cut]
    assert all(t != feat and t < size for row in forced for t in row)
    assert "0 feature rows" in errors[0] and "ConfigError" in errors[0]
    assert "empty" in errors[1]
    assert "exceed the model's" in errors[2]


def _ours_and_state():
    from megatron_most.inference import generate

    model = _model()
    prompts = _prompts(model.tokens)
    out = generate(model, prompts, max_new_tokens=8, eos_id=None)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return out, state, prompts


def test_batched_generation_agrees_with_the_hf_export_generate():
    """Ours (three prompts in one left-padded batch) vs transformers' generate() with its KV
    cache on the HF export of the same weights (tests/test_hf_most_model.py), prompt by prompt."""
    from tests.test_hf_most_model import MASKINGS, _hf_model, _most

    ours, state, prompts = run_distributed(_ours_and_state, 1, timeout_s=300)[0]
    hf = _hf_model(MASKINGS[0], state)
    tokens = _most(MASKINGS[0]).tokens
    suppress = [tokens.feature, *range(tokens.size, tokens.padded_size)]  # what ours never generates
    theirs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt.ids])
            extra = {} if prompt.features is None else {"audio_features": prompt.features}
            out = hf.generate(
                input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                suppress_tokens=suppress, **extra,
            )  # fmt: skip
            theirs.append(out[0, ids.shape[1] :].tolist())
    assert ours == theirs
