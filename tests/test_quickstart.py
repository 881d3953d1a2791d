"""The README's main command on a tiny budget (`scripts/quickstart.sh --ci`): every stage runs
(corpus, units, packing, EP2 training under torchrun, evaluation, report), the report holds the
figures and both pictures, the last line has the issue's form, and a re-run reuses every stage."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^quickstart: seen-voice ASR WER [\d.]+%, held-out-voice ASR WER [\d.]+%, TTS self-ASR WER [\d.]+%, "
    r"\d+ min, report (\S+)$"
)
STAGES = ("setup", "corpus", "units", "pack", "train", "evaluate")


def _run(out: Path) -> list[str]:
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--ci", "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_quickstart_ci_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "qs"
    lines = _run(out)
    match = LINE.match(lines[-1])
    assert match, lines[-1]
    report = Path(match.group(1))
    assert report == out / "report.md"
    text = report.read_text()
    for needle in ("ASR WER, new sentences, held-out voices", "TTS unit accuracy", "Text perplexity",
                   "![loss curves](loss_curves.png)", "![routing heatmap](routing_heatmap.png)"):  # fmt: skip
        assert needle in text, needle
    for png in ("loss_curves.png", "routing_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "train" / "latest_checkpointed_iteration.txt").read_text().strip() == "12"
    metrics = (out / "train" / "metrics.jsonl").read_text()
    for task in ("asr", "asr_units", "tts", "lm"):  # ASR packed twice is reported per dataset
        assert f'"loss/{task}"' in metrics and f'"valid loss/{task}"' in metrics, task
    for name in ("asr_seen", "asr_heldout", "tts", "text"):
        assert (out / "eval" / name / "results.json").is_file()

    again = _run(out)  # a re-run reuses every finished stage
    for stage in STAGES:
        assert f"[quickstart] {stage}: done earlier, reused" in again
    assert LINE.match(again[-1])
