"""hf-to-megatron at a target layout (--tp/--pp/--ep/--etp).

A tiny DeepseekV2ForCausalLM (tests/hf_deepseek.py, fp32, 3 layers, 4 heads, 8 experts) is
converted with the tiny MoST preset by the command line tool:
- layouts that do not divide the model (heads by --tp, experts by --ep, --pp above the layer
  count, expert FFN by --etp, TP with MoE but --no-sp) exit 2 with a message naming the flag,
  before any shard is read (the same error with a shard missing) and with nothing written;
- --tp 2 --ep 2 --etp 1 --verify runs MoSTModel on 2 gloo ranks (TP2+SP, EP2) against the HF
  reference (text and text+audio) and passes; conversion.json records source, dtype, layout and
  the verify figures next to most_config.json;
- a verify FAIL at that layout (tolerance 0) raises VerifyError and leaves nothing behind;
- (slow) --tp 2 --pp 2 --ep 2 --etp 1 --verify passes on 4 ranks: hidden states handed between
  pipeline stages by hand, sequence-parallel, audio features on the first stage only.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from tests.multiproc import run_distributed

SEQ = 16
BAD_LAYOUTS = {  # flags -> fragments the message must hold
    "heads by tp": (["--tp", "8"], ["num_attention_heads=4", "tp=8", "--tp"]),
    "experts by ep": (["--ep", "3"], ["ep=3", "num_experts=8", "choose ep among [1, 2, 4, 8]"]),
    "pp above layers": (["--pp", "4"], ["pipeline-parallel size 4", "3 decoder layers", "--pp"]),
    "expert ffn by etp": (["--etp", "3"], ["moe_ffn_size=32", "etp=3", "--etp"]),
    "moe with tp needs sp": (["--tp", "2", "--no-sp"], ["sp=False", "add --sp"]),
}


def _run_tool(tool, argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        rc = tool.main(argv)
    return rc, out.getvalue() + err.getvalue()


def _body(root: str) -> dict:
    """Rank body (1 rank; --verify spawns its own ranks)."""
    from megatron_most.convert.hf_to_megatron import convert
    from megatron_most.convert.verify import VerifyError
    from megatron_most.model.config import preset
    from megatron_most.platform import ParallelLayout
    from tests import hf_deepseek
    from tests.test_convert_to_hf import _tool
    from tests.test_most_hf_equivalence import tiny_text_config

    root = Path(root)
    hf_dir = root / "hf"
    hf_deepseek.hf_model(tiny_text_config().replace(seq_length=SEQ), seed=0).save_pretrained(
        hf_dir, max_shard_size="100KB"
    )
    broken = root / "hf_missing_shard"  # a layout error must come before any shard is opened
    shutil.copytree(hf_dir, broken)
    next(iter(sorted(broken.glob("model-*.safetensors")))).unlink()
    tool = _tool()
    out: dict = {"bad": {}}
    for name, (flags, _) in BAD_LAYOUTS.items():
        for source in (hf_dir, broken):
            rc, text = _run_tool(
                tool, ["hf-to-megatron", "--hf", str(source), "--out", str(root / "bad"), "--preset", "tiny", *flags]
            )
            out["bad"][f"{name} ({source.name})"] = (rc, text)

    rc, text = _run_tool(
        tool,
        [
            "hf-to-megatron",
            "--hf",
            str(hf_dir),
            "--out",
            str(root / "tp2ep2"),
            "--preset",
            "tiny",
            "--tp",
            "2",
            "--ep",
            "2",
            "--etp",
            "1",
            "--verify",
        ],
    )
    out["good"] = (rc, text)

    layout = ParallelLayout(tp=2, ep=2, etp=1, sp=True)
    try:
        convert(hf_dir, root / "failed", preset("tiny"), layout=layout, verify=True, tolerance=0.0, log=lambda *_: None)
        out["fail"] = "NO ERROR"
    except VerifyError as e:
        out["fail"] = str(e)
    out["left_behind"] = sorted(p.name for p in root.iterdir() if p.name not in ("hf", "hf_missing_shard", "tp2ep2"))
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_layout")
    return root, run_distributed(_body, 1, args=(str(root),), timeout_s=300)[0]


def test_layouts_that_do_not_divide_the_model_are_refused(result):
    _, r = result
    for name, (_, fragments) in BAD_LAYOUTS.items():
        for source in ("hf", "hf_missing_shard"):
            rc, text = r["bad"][f"{name} ({source})"]
            assert rc == 2, (name, source, text)
            assert "does not fit" in text and all(f in text for f in fragments), (name, source, text)
            assert "are missing" not in text, (name, source, text)  # refused before the shards are read
    assert r["left_behind"] == [], r["left_behind"]


def test_verify_at_tp2_ep2_passes_and_the_layout_is_recorded(result):
    root, r = result
    rc, text = r["good"]
    print(text)
    assert rc == 0, text
    assert "MoSTModel at TP2 PP1 EP2 ETP1 SP on 2 gloo ranks" in text, text
    assert "verify (text, MoSTModel at TP2 PP1 EP2 ETP1 SP, worst of 2 rank(s))" in text, text
    assert "verify (text+audio, MoSTModel at TP2 PP1 EP2 ETP1 SP, worst of 2 rank(s))" in text, text
    assert "verify: PASS" in text, text
    record = json.loads((root / "tp2ep2" / "conversion.json").read_text())
    assert (root / "tp2ep2" / "most_config.json").exists()
    assert record["source"] == str((root / "hf").resolve()) and record["dtype"] == "fp32", record
    assert record["layout"] == dict(tp=2, pp=1, ep=2, etp=1, sp=True, smallest_world_size=2), record
    verify = record["verify"]
    assert verify["passed"] and set(verify["max_abs_logit_diff"]) == {"text", "text+audio"}, record
    assert max(verify["max_abs_logit_diff"].values()) < 1e-4, record


def test_verify_fail_at_a_layout_writes_nothing(result):
    _, r = result
    assert "--verify FAILED" in r["fail"] and "nothing was written" in r["fail"], r["fail"]
    assert r["left_behind"] == [], r["left_behind"]


def _pipelined(root: str) -> tuple[int, str]:
    """Rank body (1 rank; --verify spawns 4): convert at TP2 PP2 EP2 ETP1 with --verify."""
    from tests import hf_deepseek
    from tests.test_convert_to_hf import _tool
    from tests.test_most_hf_equivalence import tiny_text_config

    root = Path(root)
    hf_deepseek.hf_model(tiny_text_config().replace(seq_length=SEQ), seed=1).save_pretrained(root / "hf")
    return _run_tool(
        _tool(),
        [
            "hf-to-megatron",
            "--hf",
            str(root / "hf"),
            "--out",
            str(root / "pp2"),
            "--preset",
            "tiny",
            "--tp",
            "2",
            "--pp",
            "2",
            "--ep",
            "2",
            "--etp",
            "1",
            "--verify",
        ],
    )


@pytest.mark.slow
def test_verify_at_tp2_pp2_ep2_passes(tmp_path):
    rc, text = run_distributed(_pipelined, 1, args=(str(tmp_path),), timeout_s=300)[0]
    print(text)
    assert rc == 0 and "on 4 gloo ranks" in text and "verify: PASS" in text, text
    assert "worst of 2 rank(s)" in text, text  # both last-stage ranks (the TP pair) compared
    assert json.loads((tmp_path / "pp2" / "conversion.json").read_text())["verify"]["passed"]
