"""The paper's ablation (MAMoE vs VanillaMoE vs NoShared, plus the masking and balance-loss options)
at quickstart scale: every variant trained for the same steps on the same data over several seeds,
then one table (mean and spread over seeds) and one plot.

Per run: validation loss per task (ASR, TTS, text) from its metrics.jsonl, ASR WER on held-out
voices (tools/evaluate.py), and per-modality expert use from its last routing counts (the share
of each modality's tokens that reached the experts of its own group: 100% by construction under
modality routing, what VanillaMoE chooses freely otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from megatron_most.model.config import preset
from megatron_most.moe.modality import NAMES

VARIANTS = {  # name -> pretrain_most.py flags
    "MAMoE": [],
    "VanillaMoE": ["--mamoe-variant", "vanilla"],
    "NoShared": ["--mamoe-variant", "no_shared"],
    "MAMoE, renormalize_in_group": ["--mamoe-masking", "renormalize_in_group"],
    "MAMoE, per_group balance": ["--mamoe-balance-loss", "per_group"],
}
COLUMNS = (  # key, label, lower is better
    ("wer_heldout", "ASR WER held-out voices (%)"),
    ("valid_asr", "valid ASR loss"),
    ("valid_tts", "valid TTS loss"),
    ("valid_lm", "valid text loss"),
    ("text_own_group", "text tokens on text experts (%)"),
    ("audio_own_group", "audio tokens on audio experts (%)"),
)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def train(run: Path, flags: list[str], seed: int, data_path: list[str], iters: int, config: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tools/pretrain_most.py",
           "--config", config, "--data-path", *data_path, "--train-iters", str(iters), "--seed", str(seed),
           "--save", str(run), "--save-interval", str(iters), "--eval-interval", str(iters), "--eval-iters", "4",
           "--mamoe-stats-interval", str(iters), "--log-interval", str(max(1, iters // 5)),
           "--lr-warmup-iters", str(max(1, iters // 10)), *flags]  # fmt: skip
    with open(run.parent / f"{run.name}.log", "w") as log:
        subprocess.run(
            cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "disabled"}
        )


def evaluate_asr(run: Path, corpus: Path, data: Path) -> float | None:
    out = run / "eval"
    cmd = [sys.executable, "tools/evaluate.py", "asr", "--checkpoint", str(run), "--tokenizer", str(corpus / "sp.model"),
           "--audio-encoder", "logmel", "--data", str(data), "--out", str(out), "--batch-size", "16",
           "--max-new-tokens", "48"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wer = json.loads((out / "results.json").read_text())["asr"]["wer"]
    return None if wer is None else 100.0 * wer


def run_figures(run: Path) -> dict:
    """Validation losses and own-group expert shares of one finished run."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [r for r in records if any(k.startswith("valid loss/") for k in r)][-1]
    out = {f"valid_{task}": valid.get(f"valid loss/{task}") for task in ("asr", "tts", "lm")}
    counts = sorted((run / "routing").glob("routing_*.npz"))[-1]
    tokens = np.load(counts)["tokens"].astype(np.float64)  # [layers, modality, experts]
    groups = preset("small").mamoe.groups()
    for m, name in enumerate(NAMES):
        own = tokens[:, m, list(groups[m])].sum()
        out[f"{name}_own_group"] = 100.0 * own / max(tokens[:, m].sum(), 1.0)
    return out


def summarise(rows: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    """variant -> column -> (mean, standard deviation over seeds)."""
    table = {}
    for name, runs in rows.items():
        table[name] = {}
        for key, _ in COLUMNS:
            values = np.array([r[key] for r in runs if r.get(key) is not None], dtype=float)
            if len(values):
                table[name][key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return table


def markdown(table: dict, seeds: int, iters: int) -> str:
    head = "| Variant | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [f"Mean ± standard deviation over {seeds} seeds, {iters} steps each.", "", head,
             "|---|" + "---:|" * len(COLUMNS)]  # fmt: skip
    for name, cells in table.items():
        values = [f"{cells[k][0]:.3g} ± {cells[k][1]:.2g}" if k in cells else "—" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> Path:
    keys = [k for k, _ in COLUMNS[:4]]
    fig = Figure(figsize=(10, 3.4))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        names = [n for n in table if key in table[n]]
        means = [table[n][key][0] for n in names]
        spreads = [table[n][key][1] for n in names]
        ax.bar(range(len(names)), means, yerr=spreads, capsize=3, color=[f"C{j}" for j in range(len(names))])
        ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=6, rotation=45, ha="right")
        ax.set_title(dict(COLUMNS)[key], fontsize=8)
        if means:
            low = min(m - s for m, s in zip(means, spreads))
            ax.set_ylim(bottom=max(0.0, low * 0.95))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def ablation(quickstart: Path, out: Path, *, seeds: int, iters: int, variants: list[str], config: str,
             log=print) -> dict:  # fmt: skip
    """Train and score every variant x seed (finished runs are reused); write ablation.md/.json/.png."""
    packed, corpus = quickstart / "packed", quickstart / "corpus"
    data = ["0.3", str(packed / "asr"), "0.1", str(packed / "asr_units"), "0.4", str(packed / "tts"),
            "0.2", str(packed / "text")]  # fmt: skip
    heldout = out / "heldout.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    lines = (corpus / "test_heldout.jsonl").read_text().splitlines()
    heldout.write_text("\n".join(lines[:60]) + "\n")  # the first 60 held-out utterances: same for every run
    rows = {}
    for name in variants:
        rows[name] = []
        for seed in range(1, seeds + 1):
            run = out / slug(name) / f"seed{seed}"
            figures_file = run / "figures.json"
            if not figures_file.is_file():
                log(f"ablation: {name}, seed {seed}: training {iters} steps")
                run.parent.mkdir(parents=True, exist_ok=True)
                train(run, VARIANTS[name], seed, data, iters, config)
                figures = run_figures(run) | {"wer_heldout": evaluate_asr(run, corpus, heldout)}
                figures_file.write_text(json.dumps(figures))
            rows[name].append(json.loads(figures_file.read_text()))
    table = summarise(rows)
    (out / "ablation.md").write_text(markdown(table, seeds, iters))
    (out / "ablation.json").write_text(json.dumps({"runs": rows, "table": table, "iters": iters}, indent=1))
    plot(table, out / "ablation.png")
    return table
