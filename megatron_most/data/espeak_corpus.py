"""A speech+text corpus that any Linux box can make: espeak-ng speaks sentences from a small grammar.

The quickstart trains and evaluates on it, so it is built to measure generalisation honestly:

* voices = espeak-ng accent x variant (e.g. `en-gb-scotland+m3`), each utterance at a random speed
  and pitch; the held-out voices use variants that no training voice uses, so the held-out test
  is spoken by voices never trained on;
* sentences of 2-8 words from a fixed vocabulary (the ten digits and about 100 common words) made
  by a small grammar, so the text has structure an LM can learn; test sentences never occur in
  any training split (speech or text).

Files (OUT/): train.jsonl, test_seen.jsonl (training voices, new sentences), test_heldout.jsonl
(held-out voices, new sentences): speech manifests {"id", "audio", "text", "speaker"}; text.jsonl
and text_test.jsonl: {"id", "text"}; audio/*.wav (16 kHz mono); sp.model (a sentencepiece
tokenizer of the training text: unk 0, bos 1, eos 2); corpus.json (the settings and counts).
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from megatron_most.data.templates import TemplateOptions
from megatron_most.options import options, require

DIGITS = "zero one two three four five six seven eight nine".split()
WORDS = {
    "det": "the a my your this that every".split(),
    "adj": "red green blue small big old new cold warm happy quiet fast slow dark bright".split(),
    "noun": "cat dog bird house tree car book door window table river city garden road boat "
    "apple chair phone train letter".split(),
    "name": "anna peter maria david sarah john".split(),
    "verb": "sees opens finds likes moves takes reads wants".split(),
    "prep": "near under behind over inside".split(),
    "adv": "today again now slowly quickly".split(),
    "count": "two three four five six seven eight nine".split(),
}
TEMPLATES = (  # 2-8 words each; {x} draws from WORDS[x]
    "{det} {noun}",
    "{det} {adj} {noun}",
    "{name} {verb} {det} {noun}",
    "{name} {verb} {det} {adj} {noun} {adv}",
    "{det} {noun} {verb} {det} {adj} {noun}",
    "{count} {adj} {noun}s {prep} {det} {noun}",
    "{det} {adj} {noun} is {prep} {det} {noun}",
    "{name} has {count} {noun}s",
    "{digits}",
    "call {name} at {digits}",
    "{name} {verb} {det} {noun} {prep} {det} {adj} {noun}",
    "{det} {noun} is {adj} {adv}",
)
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f4", "f5", "klatt", "klatt3", "max", "paul")
HELDOUT_VARIANTS = ("m5", "m8", "f3", "klatt2", "linda", "john")


@options
class CorpusOptions:
    out: str = "corpus"
    """Output folder."""
    train: int = 4000
    """Training utterances (training voices)."""
    test: int = 150
    """Utterances in each test split (seen voices, held-out voices)."""
    text: int = 20000
    """Text-only training sentences; text_test.jsonl gets `test` more."""
    speed: tuple[int, int] = (140, 200)
    """espeak-ng words per minute, drawn uniformly per utterance."""
    pitch: tuple[int, int] = (25, 75)
    """espeak-ng pitch (0-99), drawn uniformly per utterance."""
    seed: int = 0
    """Sentences, voices, speeds and pitches."""
    workers: int = 4
    """Parallel espeak-ng/sox processes."""
    tokenizer_vocab: int = 300
    """Pieces of the sentencepiece model trained on the training text (sp.model; <= the model's
    text_vocab_size). 0 = no tokenizer."""

    def __post_init__(self):
        require(self.train >= 1 and self.test >= 1, f"train={self.train}, test={self.test}: both must be >= 1")
        require(self.text >= 0, f"text={self.text}: must be >= 0")
        require(self.workers >= 1, f"workers={self.workers}: must be >= 1")


def sentence(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    digits = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 4)))
    words = {slot: rng.choice(choices) for slot, choices in WORDS.items()}
    return template.format(digits=digits, **words)


def unique_sentences(rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[str]:
    """n distinct sentences, none in `exclude` (raises if the grammar runs out)."""
    out, seen, tries = [], set(exclude), 0
    while len(out) < n:
        tries += 1
        require(tries < 50 * n + 1000, f"the grammar gave only {len(out)} new sentences of {n} asked for")
        s = sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def voices(variants: tuple[str, ...]) -> list[str]:
    return [f"{accent}+{variant}" for accent in ACCENTS for variant in variants]


def speak(text: str, path: Path, *, voice: str = "en", speed: int = 175, pitch: int = 50, rate: int = 16000,
          channels: int = 1) -> Path:  # fmt: skip
    """espeak-ng speaks `text`; sox writes it to `path` (container from the suffix) at rate/channels."""
    path = Path(path)
    raw = path.with_name(path.stem + ".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text], check=True)
    subprocess.run(
        ["sox", str(raw), "-r", str(rate), "-c", str(channels), str(path)], check=True, stderr=subprocess.DEVNULL
    )
    raw.unlink()
    return path


def make_corpus(opts: CorpusOptions, progress: bool = True) -> dict:
    """Write the corpus (see the module docstring); return corpus.json's content."""
    out = Path(opts.out).resolve()  # manifests hold absolute audio paths
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(opts.seed)
    tests = unique_sentences(rng, 2 * opts.test + opts.test)  # seen, held-out, text_test
    pool = set(tests)
    jobs = {
        "test_seen": _utterances("seen", tests[: opts.test], voices(TRAIN_VARIANTS), opts, rng),
        "test_heldout": _utterances("heldout", tests[opts.test : 2 * opts.test], voices(HELDOUT_VARIANTS), opts, rng),
        "train": _utterances("train", _training_text(rng, opts.train, pool), voices(TRAIN_VARIANTS), opts, rng),
    }
    rows = [row for split in jobs.values() for row in split]
    todo = [
        r for r in rows if not Path(out / "audio" / f"{r['id']}.wav").is_file()
    ]  # a re-run speaks only what is missing
    with ThreadPoolExecutor(opts.workers) as pool_:
        speaking = pool_.map(lambda r: speak(r["text"], out / "audio" / f"{r['id']}.wav", voice=r["speaker"],
                                             speed=r["speed"], pitch=r["pitch"]), todo)  # fmt: skip
        for _ in tqdm(speaking, total=len(todo), desc="espeak-ng", disable=not progress, unit="utt"):
            pass
    for split, split_rows in jobs.items():
        _write_jsonl(
            out / f"{split}.jsonl", [{**r, "audio": str(out / "audio" / f"{r['id']}.wav")} for r in split_rows]
        )
    text_train = _training_text(rng, opts.text, pool)
    _write_jsonl(out / "text.jsonl", [{"id": f"text{i:06d}", "text": t} for i, t in enumerate(text_train)])
    _write_jsonl(
        out / "text_test.jsonl", [{"id": f"texttest{i:04d}", "text": t} for i, t in enumerate(tests[2 * opts.test :])]
    )
    if opts.tokenizer_vocab:  # the prompts' instructions too: a real tokenizer has their words as pieces
        instructions = [v for k, v in dataclasses.asdict(TemplateOptions()).items() if k.endswith("instruction")]
        texts = [r["text"] for r in jobs["train"]] + text_train + instructions * (1 + len(text_train) // 20)
        train_tokenizer(texts, out / "sp", opts.tokenizer_vocab)
    summary = {"options": dataclasses.asdict(opts), "splits": {k: len(v) for k, v in jobs.items()},
               "train_voices": voices(TRAIN_VARIANTS), "heldout_voices": voices(HELDOUT_VARIANTS),
               "vocabulary": vocabulary()}  # fmt: skip
    (out / "corpus.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_tokenizer(texts: list[str], prefix: Path, vocab_size: int) -> Path:
    """A BPE sentencepiece model (PREFIX.model) with Megatron's usual special ids."""
    import sentencepiece as spm

    source = prefix.with_suffix(".train.txt")
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(source), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    source.unlink()
    return prefix.with_suffix(".model")


def vocabulary() -> list[str]:
    words = set(DIGITS) | {w for ws in WORDS.values() for w in ws} | {w + "s" for w in WORDS["noun"]}
    words |= {w for t in TEMPLATES for w in t.split() if not w.startswith("{")}
    return sorted(words)


def _training_text(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    """n training sentences (repeats allowed, as in real corpora), never one of the test sentences."""
    out = []
    while len(out) < n:
        s = sentence(rng)
        if s not in exclude:
            out.append(s)
    return out


def _utterances(prefix: str, texts: list[str], voice_list: list[str], opts: CorpusOptions, rng) -> list[dict]:
    return [
        {
            "id": f"{prefix}{i:05d}",
            "text": t,
            "speaker": rng.choice(voice_list),
            "speed": rng.randint(*opts.speed),
            "pitch": rng.randint(*opts.pitch),
        }  # fmt: skip
        for i, t in enumerate(texts)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
