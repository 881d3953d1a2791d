"""The ablation's figures from a run folder and its table over seeds (known answers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_most.eval.ablation import markdown, plot, run_figures, summarise


def test_run_figures_read_valid_losses_and_own_group_shares(tmp_path):
    records = [{"iteration": 10, "lm loss": 2.0}, {"iteration": 10, "valid loss/asr": 1.5, "valid loss/tts": 3.0,
                                                     "valid loss/lm": 2.5}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokens = np.zeros((3, 2, 8))  # [layers, modality, experts]: small preset groups text 0-3, audio 4-7
    tokens[:, 0, :4] = 3.0
    tokens[:, 0, 4:] = 1.0  # text: 12 of 16 per layer on text experts -> 75%
    tokens[:, 1, 4:] = 2.0  # audio: all on audio experts
    (tmp_path / "routing").mkdir()
    np.savez(tmp_path / "routing" / "routing_0000010.npz", tokens=tokens, layers=np.array([1, 2, 3]))
    figures = run_figures(tmp_path)
    assert figures["valid_asr"] == 1.5 and figures["valid_tts"] == 3.0 and figures["valid_lm"] == 2.5
    assert figures["text_own_group"] == pytest.approx(75.0) and figures["audio_own_group"] == pytest.approx(100.0)


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    rows = {"MAMoE": [{"valid_asr": 1.0, "wer_heldout": 90.0}, {"valid_asr": 3.0, "wer_heldout": None}],
            "VanillaMoE": [{"valid_asr": 2.0}]}  # fmt: skip
    table = summarise(rows)
    assert table["MAMoE"]["valid_asr"] == pytest.approx((2.0, np.sqrt(2.0)))
    assert table["MAMoE"]["wer_heldout"] == (90.0, 0.0) and table["VanillaMoE"]["valid_asr"] == (2.0, 0.0)
    text = markdown(table, seeds=2, iters=5)
    assert "| MAMoE | 90 ± 0 | 2 ± 1.4 |" in text and "—" in text
    assert plot(table, tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
