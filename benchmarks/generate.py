"""ASR generation time of our cached generation (megatron_most.inference.generate, MLA latent
cache) over transformers' `generate()` on the HF export of the same weights, tiny preset, one
CPU process.

Data: 64 espeak-ng utterances (tests/speech.make_corpus: wav/flac/ogg/mp3 at 8..44.1 kHz) are
loaded at 16 kHz (AudioLoader), turned into 16-d features by a tiny random HuBERT (hidden 16,
the tiny preset's audio_feature_dim) and rendered as ASR prompts in features mode
(inference.tasks.build_prompt: the release's template, <boa> <feat>... <eoa>, as training
renders it; a sentencepiece tokenizer trained on the corpus sentences).

Model: the tiny preset with random weights scaled as in tests/test_generate.py (so that logits
are far from uniform); the HF side is `MoSTForCausalLM` (megatron_most/convert/hf_most, the
remote code shipped with exports) holding the same tensors (tests/test_hf_most_model.hf_state_dict).

Both decode greedily, --new-tokens new tokens per utterance (stop on the tokenizer's <eos>; the
random model may never write it), in the same left-padded batches of --batch prompts (manifest
order). HF: one `generate()` call per batch with the attention mask (left padding), the batch's
features concatenated in row order (they fill the <feat> positions row-major) and
`suppress_tokens` = <feat> + the embedding table's padding rows, which ours never generates.
Transcripts are compared as token ids, utterance by utterance.

Timing: a warm-up batch of each, then --rounds rounds over all batches, alternating which side
goes first, in the same spawned process (platform.initialize needs one: it installs the CPU
compatibility layer, a TorchFunctionMode on every torch call of the process). HF runs with that
mode lifted (it is ours, and an HF user never has it); as a diagnostic, ours is also timed with
the mode lifted. Medians over rounds are reported. The cache speedup is `use_cache=False`
(Megatron's own forward over the whole sequence at every step, row by row) over the cached path
on the first --uncached-batches batches only (it is slow; the cached time there is the median of
3 runs). --profile prints cProfile tables of
one pass of each side.

    python -m benchmarks.generate [--utterances 64] [--batch 8] [--new-tokens 24] [--rounds 5]
        [--uncached-batches 1] [--threads 1] [--profile]

The last line is `generate ours/hf time ratio: X (identical N/64), cache speedup Y`; the target
is X <= 1.0.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import logging
import os
import pstats
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_most.platform.spawn import run_ranks  # noqa: E402

AUDIO_DIM = 16  # the tiny preset's audio_feature_dim
SEED = 0


# ---------------------------------------------------------------- prompts (parent process)


def make_prompts(work: Path, utterances: int) -> tuple[list[tuple[list[int], np.ndarray]], int, float]:
    """(ids, features [frames, 16] float32) per utterance, the tokenizer's eos id, audio seconds."""
    from megatron_most.audio import AudioLoader, AudioOptions, HubertEncoder
    from megatron_most.data.templates import AudioSegment, TemplateOptions
    from megatron_most.data.tokenizer import load_tokenizer
    from megatron_most.inference.tasks import build_prompt
    from megatron_most.model.config import preset
    from tests.speech import make_corpus, sentencepiece_model, tiny_hubert

    manifest = make_corpus(work / "corpus", utterances, seed=SEED)
    paths = [json.loads(line)["audio"] for line in manifest.read_text().splitlines()]
    with _stderr_to(work / "decode.log"):  # libmpg123 reports every mp3 frame it resyncs on
        waves = AudioLoader(AudioOptions(device="cpu")).load(paths)
    bad = [p for p, w in zip(paths, waves, strict=True) if not isinstance(w, np.ndarray)]
    if bad:
        raise RuntimeError(f"audio not loaded: {bad[:3]}")
    encoder = HubertEncoder(tiny_hubert(work / "hubert", hidden=AUDIO_DIM, seed=SEED))
    features = encoder(waves)
    tokenizer = load_tokenizer(sentencepiece_model(work / "sp"))
    layout, options = preset("tiny").tokens, TemplateOptions()
    prompts = []
    for path, feats in zip(paths, features, strict=True):
        audio = {path: AudioSegment(features=feats.numpy())}
        prompt = build_prompt("asr", {"audio": path}, audio, tokenizer, layout, options, mode="features")
        prompts.append((prompt.ids, prompt.features.numpy()))
    seconds = sum(len(w) for w in waves) / encoder.sample_rate
    return prompts, tokenizer.eos, seconds


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send what C libraries write to fd 2 into `path`; print it if the block fails."""
    saved = os.dup(2)
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            print(path.read_text(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ---------------------------------------------------------------- models (spawned rank)


def _models():
    """Our tiny MoSTModel (random, scaled weights) and the HF export holding the same tensors."""
    from megatron_most.convert.hf_most import hf_config
    from megatron_most.convert.hf_most.modeling_most import MoSTForCausalLM
    from megatron_most.model.config import preset
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize
    from tests.test_hf_most_model import hf_state_dict

    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)  # "Unknown MLP type"
    most = dataclasses.replace(preset("tiny"), validate_inputs=False)  # as inference.load builds it
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    torch.manual_seed(SEED)
    model = build_model(most, most.transformer_config(ParallelLayout(), sequence_parallel=False)).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # as tests/test_generate.py: logits far from uniform
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    with _compat_mode_lifted():
        hf = MoSTForCausalLM(hf_config(most)).float().eval()
        hf.load_state_dict(hf_state_dict(state, most), strict=True)
    return model, hf


@contextlib.contextmanager
def _compat_mode_lifted():
    """Run without the TorchFunctionModes on the stack (platform/compat_cpu.py's `_CudaMeansCpu`
    stays there for the life of the process), restoring them afterwards."""
    modes = []
    while torch._C._len_torch_function_stack():
        modes.append(torch._C._pop_torch_function_stack())
    try:
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


class Sides:
    """Both generators over the same batches of prompts."""

    def __init__(self, model, hf, prompts, batch: int, new_tokens: int, eos: int):
        from megatron_most.inference import Prompt

        self.model, self.hf, self.new_tokens, self.eos = model, hf, new_tokens, eos
        rows = [Prompt(ids, torch.from_numpy(feats)) for ids, feats in prompts]
        self.batches = [rows[i : i + batch] for i in range(0, len(rows), batch)]
        tokens = model.tokens
        self.suppress = [tokens.feature, *range(tokens.size, tokens.padded_size)]  # what ours never generates
        self.hf_inputs = [self._hf_batch(b) for b in self.batches]

    @staticmethod
    def _hf_batch(prompts) -> dict:
        width = max(len(p.ids) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding, as ours
            ids[row, width - len(p.ids) :] = torch.tensor(p.ids)
            mask[row, width - len(p.ids) :] = 1
        return {"input_ids": ids, "attention_mask": mask, "audio_features": torch.cat([p.features for p in prompts])}

    def ours(self, i: int, use_cache: bool = True) -> list[list[int]]:
        from megatron_most.inference import generate

        return generate(
            self.model, self.batches[i], max_new_tokens=self.new_tokens, eos_id=self.eos, use_cache=use_cache
        )

    def theirs(self, i: int) -> list[list[int]]:
        inputs = self.hf_inputs[i]
        with torch.no_grad(), _compat_mode_lifted():
            out = self.hf.generate(
                **inputs, max_new_tokens=self.new_tokens, do_sample=False, pad_token_id=0,
                eos_token_id=self.eos, suppress_tokens=self.suppress,
            )  # fmt: skip
        rows = []
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():  # cut after eos (HF pads finished rows)
            rows.append(row[: row.index(self.eos) + 1] if self.eos in row else row)
        return rows

    def run_all(self, side) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        outputs = [row for i in range(len(self.batches)) for row in side(i)]
        return time.perf_counter() - start, outputs


def _profile(fn, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def body(prompts, eos: int, batch: int, new_tokens: int, rounds: int, uncached_batches: int, profile: bool):
    model, hf = _models()
    sides = Sides(model, hf, prompts, batch, new_tokens, eos)

    def ours_lifted(i):
        with _compat_mode_lifted():
            return sides.ours(i)

    sides.ours(0), sides.theirs(0), ours_lifted(0)  # warm-up
    times = {"ours": [], "hf": [], "ours_lifted": []}
    outputs = {}
    order = [("ours", sides.ours), ("hf", sides.theirs), ("ours_lifted", ours_lifted)]
    for r in range(rounds):
        for name, side in order if r % 2 == 0 else order[::-1]:
            seconds, outputs[name] = sides.run_all(side)
            times[name].append(seconds)
    per_batch = []  # cached vs uncached on the first batches
    uncached_out = []
    for i in range(uncached_batches):
        cached = []
        for _ in range(3):
            start = time.perf_counter()
            sides.ours(i)
            cached.append(time.perf_counter() - start)
        start = time.perf_counter()
        uncached_out += sides.ours(i, use_cache=False)
        per_batch.append((statistics.median(cached), time.perf_counter() - start))
    profiles = {}
    if profile:
        profiles["ours"] = _profile(lambda: sides.run_all(sides.ours), 30)
        profiles["hf"] = _profile(lambda: sides.run_all(sides.theirs), 30)
    return {
        "times": times,
        "ours": outputs["ours"],
        "hf": outputs["hf"],
        "ours_lifted": outputs["ours_lifted"],
        "uncached": uncached_out,
        "per_batch": per_batch,
        "profiles": profiles,
        "prompt_lengths": [len(ids) for ids, _ in prompts],
        "frames": [f.shape[0] for _, f in prompts],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--uncached-batches", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the process")
    parser.add_argument("--profile", action="store_true", help="print cProfile tables of one pass of each side")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        prompts, eos, seconds = make_prompts(Path(tmp), args.utterances)
        print(
            f"prompts: {len(prompts)} ASR utterances, {seconds:.1f} s of audio, ready in {time.perf_counter() - start:.1f} s"
        )
    result = run_ranks(
        body, 1, threads=args.threads, timeout_s=3600,
        args=(prompts, eos, args.batch, args.new_tokens, args.rounds, args.uncached_batches, args.profile),
    )[0]  # fmt: skip
    lengths, frames = result["prompt_lengths"], result["frames"]
    print(
        f"prompt tokens {min(lengths)}..{max(lengths)} (mean {np.mean(lengths):.0f}), <feat> frames "
        f"{min(frames)}..{max(frames)}; batch {args.batch}, {args.new_tokens} new tokens, greedy, "
        f"{args.threads} thread(s)"
    )
    for name, profile in result["profiles"].items():
        print(f"---- cProfile: {name}, one pass over all batches\n{profile}")
    times = result["times"]
    for name, label in (
        ("ours", "ours (cached)"),
        ("hf", "HF generate()"),
        ("ours_lifted", "ours, compat mode lifted"),
    ):
        row = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{label:>26}: median {statistics.median(times[name]):.3f} s per {len(prompts)} utterances ({row})")
    ours, hf = result["ours"], result["hf"]
    identical = sum(a == b for a, b in zip(ours, hf, strict=True))
    same_lifted = sum(a == b for a, b in zip(ours, result["ours_lifted"], strict=True))
    first = [i for i, (a, b) in enumerate(zip(ours, hf, strict=True)) if a != b][:3]
    for i in first:
        print(f"utterance {i} differs:\n  ours {ours[i]}\n  hf   {hf[i]}")
    print(
        f"generated tokens per utterance: {min(map(len, ours))}..{max(map(len, ours))}; ours with the mode lifted identical {same_lifted}/{len(ours)}"
    )
    cached = sum(c for c, _ in result["per_batch"])
    uncached = sum(u for _, u in result["per_batch"])
    n_uncached = len(result["uncached"])
    same_uncached = sum(a == b for a, b in zip(result["uncached"], ours[:n_uncached], strict=True))
    print(
        f"uncached (use_cache=False) on the first {n_uncached} utterances: {uncached:.2f} s vs cached {cached:.2f} s, "
        f"identical {same_uncached}/{n_uncached}"
    )
    ratio = statistics.median(times["ours"]) / statistics.median(times["hf"])
    lifted = statistics.median(times["ours_lifted"]) / statistics.median(times["hf"])
    print(f"ours/hf with the compat mode lifted from ours too: {lifted:.3f}")
    print(
        f"generate ours/hf time ratio: {ratio:.3f} (identical {identical}/{len(ours)}), cache speedup {uncached / cached:.2f}"
    )


if __name__ == "__main__":
    main()
