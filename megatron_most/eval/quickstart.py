"""The quickstart's report: what the run learned, in one Markdown page with two pictures.

Reads what scripts/quickstart.sh leaves in OUT: corpus/corpus.json, train/metrics.jsonl (losses),
train/routing/*.npz + .png (MAMoE routing heatmaps) and eval/*/results.json (tools/evaluate.py),
and writes OUT/report.md, OUT/loss_curves.png and OUT/routing_heatmap.png. `summary_line` is the
command's last line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from megatron_most.moe.modality import NAMES

EVALS = {  # result name -> folder under OUT/eval
    "asr_seen_voices": "asr_seen",
    "asr_heldout_voices": "asr_heldout",
    "tts_heldout_texts": "tts",
    "text_perplexity": "text",
}
TARGETS = {"asr_seen_voices": 25.0, "asr_heldout_voices": 60.0}
"""The quickstart issue's targets: ASR WER (%) on new sentences of training voices and of held-out voices."""


def read_results(out: Path) -> dict[str, dict]:
    results = {}
    for folder in EVALS.values():
        path = out / "eval" / folder / "results.json"
        if path.is_file():
            results.update(json.loads(path.read_text()))
    return results


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], path: Path) -> Path | None:
    """Training loss per task (and validation loss per task, dashed) against iterations."""
    keys = sorted({k for r in records for k in r if k.startswith("loss/") and "tokens" not in k})
    valid = sorted({k for r in records for k in r if k.startswith("valid") and "loss/" in k})
    if not keys:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for key in keys + valid:
        points = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
        if points:
            x, y = zip(*points)
            ax.plot(x, y, "--" if key in valid else "-", marker="." if key in valid else None, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Loss per task (train solid, validation dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def copy_heatmap(run: Path, path: Path) -> tuple[Path | None, dict | None]:
    """The last routing heatmap of the run, and its per-modality expert shares per layer."""
    pngs = sorted((run / "routing").glob("routing_*.png"))
    npzs = sorted((run / "routing").glob("routing_*.npz"))
    shares = None
    if npzs:
        data = np.load(npzs[-1])
        tokens = data["tokens"].astype(np.float64)  # [layers, modality, experts]
        total = tokens.sum(-1, keepdims=True)
        shares = {
            "layers": [int(x) for x in data["layers"]],
            "shares": np.divide(tokens, total, out=np.zeros_like(tokens), where=total > 0).round(3).tolist(),
        }
    if not pngs:
        return None, shares
    shutil.copyfile(pngs[-1], path)
    return path, shares


def _pct(value) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}%"


def summary_line(results: dict, minutes: float, report: Path) -> str:
    def wer(name):
        return _pct(results.get(name, {}).get("wer"))

    return (
        f"quickstart: seen-voice ASR WER {wer('asr_seen_voices')}, held-out-voice ASR WER "
        f"{wer('asr_heldout_voices')}, TTS self-ASR WER {wer('tts_heldout_texts')}, {minutes:.0f} min, report {report}"
    )


def _figures(results: dict) -> list[str]:
    rows = ["| Figure | Value | Target | Items |", "|---|---:|---:|---:|"]
    for name, label in (
        ("asr_seen_voices", "ASR WER, new sentences, training voices"),
        ("asr_heldout_voices", "ASR WER, new sentences, held-out voices"),
    ):
        r = results.get(name, {})
        target = f"<= {TARGETS[name]:.0f}%"
        rows.append(
            f"| {label} (CER {_pct(r.get('cer'))}) | {_pct(r.get('wer'))} | {target} | {r.get('n_scored', '—')} |"
        )
    tts = results.get("tts_heldout_texts", {})
    rows.append(
        f"| TTS: the model's own ASR on its generated units, WER | {_pct(tts.get('wer'))} | | {tts.get('n_scored', '—')} |"
    )
    reference = tts.get("reference_units_asr", {})
    rows.append(f"| ... the same ASR on the references' units (its ceiling), WER | {_pct(reference.get('wer'))} | | |")
    units = tts.get("units", {})
    rows.append(
        f"| TTS unit accuracy vs the held-out references (aligned hits) | {_pct(units.get('unit_accuracy'))} | | |"
    )
    rows.append(f"| TTS unit error rate vs the held-out references | {_pct(units.get('unit_error_rate'))} | | |")
    text = results.get("text_perplexity", {})
    ppl = text.get("perplexity")
    rows.append(
        f"| Text perplexity, held-out sentences | {'—' if ppl is None else f'{ppl:.2f}'} | | {text.get('n_scored', '—')} |"
    )
    return rows


def _examples(out: Path, n: int = 5) -> list[str]:
    path = out / "eval" / "asr_heldout" / "asr_heldout_voices.items.jsonl"
    if not path.is_file():
        return []
    items = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    lines = ["| Reference | Transcript (held-out voice) |", "|---|---|"]
    return lines + [f"| {i.get('reference', '')} | {i.get('hypothesis', i.get('failed', ''))} |" for i in items]


def write_report(out: Path, minutes: float) -> tuple[Path, str]:
    out = Path(out)
    results = read_results(out)
    records = read_metrics(out / "train" / "metrics.jsonl")
    curves = plot_losses(records, out / "loss_curves.png")
    heatmap, shares = copy_heatmap(out / "train", out / "routing_heatmap.png")
    corpus = (
        json.loads((out / "corpus" / "corpus.json").read_text()) if (out / "corpus" / "corpus.json").is_file() else {}
    )
    trained = [r for r in records if "lm loss" in r]
    last = trained[-1] if trained else {}
    lines = [
        "# Quickstart report",
        "",
        f"Small MoST (MAMoE: text experts and audio experts apart) trained at EP2 on 2 CPU ranks on an espeak-ng corpus: "
        f"{corpus.get('splits', {}).get('train', '?')} training utterances from {len(corpus.get('train_voices', []))} voices, "
        f"tests spoken by training voices and by {len(corpus.get('heldout_voices', []))} held-out voices (variants no "
        f"training voice uses), all test sentences new. Whole command: {minutes:.0f} min.",
        "",
        "## Figures",
        "",
        *_figures(results),
        "",
        f"Training: {last.get('iteration', '?')} iterations, final lm loss {last.get('lm loss', float('nan')):.3f}.",
        "",
        "## Loss curves",
        "",
        "![loss curves](loss_curves.png)" if curves else "(no metrics.jsonl)",
        "",
        "## Routing heatmap (share of each modality's tokens per expert and layer)",
        "",
        "![routing heatmap](routing_heatmap.png)" if heatmap else "(no heatmap was drawn)",
        "",
    ]
    if shares:
        for layer, per_modality in zip(shares["layers"], shares["shares"]):
            cells = "; ".join(f"{NAMES[m]}: {per_modality[m]}" for m in range(len(per_modality)))
            lines.append(f"- layer {layer}: {cells}")
        lines.append("")
    lines += ["## Examples", "", *_examples(out), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report, summary_line(results, minutes, report)
