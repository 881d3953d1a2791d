"""MoST checkpoints through the converter: the remote-code export and --verify with audio inputs.

- A tiny MoSTModel (MAMoE, 32 unit tokens, 16-d audio features, every tensor random) saved by
  Megatron is exported by `megatron-to-hf` (auto format -> MoST remote code, --tokenizer,
  --verify); AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True) gives MoSTModel's
  logits (< 1e-4, fp32) on text with unit runs and <boa> <feat>... <eoa> spans with features.
  config.json: auto_map, padded vocabulary, bos/eos from the tokenizer; the whole embedding
  table and the audio projection are exported as is.
- bos/eos: --bos-id contradicting the tokenizer, or DeepSeek's default 100000 outside a tiny
  vocabulary, fail with exit status 2 naming the field, the value and the fix.
- hf-to-megatron --verify with the tiny MAMoE preset runs the text check (vs transformers'
  DeepseekV2ForCausalLM) and the text+audio check (vs the remote-code MoST model), both PASS.
- A corrupted mapping rule (gate/up halves of the routed experts swapped, patched in-process)
  makes --verify FAIL in both directions: exit status 1, FAIL printed, nothing written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
import torch

from tests.multiproc import run_distributed
from tests.test_convert_to_hf import _tool

TOLERANCE = 1e-4
SEED = 0


def _run(tool, argv) -> tuple[int, str]:
    """Exit status and everything printed (stdout + stderr)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rc = tool.main([str(a) for a in argv])
    return rc, printed.getvalue()


def _save_tokenizer(directory: Path) -> None:
    """Word-level tokenizer with <s> (id 1) and </s> (id 2) as bos/eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_most.convert.verify import SAMPLE_TEXT

    words = sorted(set(SAMPLE_TEXT.replace(".", " . ").replace(",", " , ").replace(":", " : ").split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(directory)
    )


@contextlib.contextmanager
def _swapped_expert_halves():
    """mapping.RULES with gate_proj/up_proj of the routed experts' fc1 swapped (a wrong table)."""
    from megatron_most.convert import mapping

    original = mapping.RULES
    mapping.RULES = tuple(
        dataclasses.replace(r, hf=r.hf[::-1]) if r.megatron.endswith("local_experts.{expert}.linear_fc1.weight") else r
        for r in original
    )
    try:
        yield
    finally:
        mapping.RULES = original


def _diffs(printed: str) -> dict:
    return {
        m[0]: (float(m[1]), m[2])
        for m in re.findall(r"verify \(([\w+]+)\): max abs logit diff (\S+) .* (PASS|FAIL)", printed)
    }


def _body(root: str) -> dict:
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_most.convert.common import load_most_config, write_most_config
    from megatron_most.convert.hf_most import AUTO_MAP
    from megatron_most.model.checkpoint import load_values
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize
    from tests import hf_deepseek
    from tests.test_hf_most_model import _inputs, _most
    from tests.test_most_hf_equivalence import tiny_text_config

    root = Path(root)
    tool = _tool()
    out: dict = {}

    # a MoST checkpoint saved by Megatron, every tensor random
    most = _most("zero_after_softmax")
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    model = build_model(most, most.transformer_config(), use_te=False).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    ids, features = _inputs(most.tokens)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=None, attention_mask=None, audio_features=features)
    (root / "most").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(root / "most"))
    write_most_config(root / "most", most)
    _save_tokenizer(root / "tok")

    # export (auto format: MoST remote code) with --verify, load with trust_remote_code
    export = root / "export"
    out["rc"], out["printed"] = _run(
        tool,
        [
            "megatron-to-hf",
            "--megatron",
            root / "most",
            "--out",
            export,
            "--tokenizer",
            root / "tok",
            "--max-shard-size",
            "200KB",
            "--verify",
        ],
    )
    config = json.loads((export / "config.json").read_text())
    out["config"] = {
        k: config.get(k)
        for k in (
            "auto_map",
            "model_type",
            "vocab_size",
            "text_vocab_size",
            "num_units",
            "audio_feature_dim",
            "bos_token_id",
            "eos_token_id",
            "masking",
            "torch_dtype",
        )
    }
    out["auto_map_ok"] = config["auto_map"] == AUTO_MAP
    out["files"] = sorted(p.name for p in export.iterdir())
    tensors = {}
    for f in export.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    state = model.state_dict()
    out["tables_exact"] = torch.equal(
        tensors["model.embed_tokens.weight"], state["embedding.word_embeddings.weight"]
    ) and torch.equal(tensors["lm_head.weight"], state["output_layer.weight"])
    out["projection_exact"] = torch.equal(
        tensors["model.audio_projection.weight"], state["audio_projection.weight"]
    ) and torch.equal(tensors["model.audio_projection.bias"], state["audio_projection.bias"])
    loaded = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    out["class"] = (type(loaded).__name__, type(loaded).__module__)
    with torch.no_grad():
        got = loaded(input_ids=ids, audio_features=features).logits
    out["shape"] = (tuple(got.shape), tuple(expected.shape))
    out["diff"] = (got - expected).abs().max().item()
    out["max_logit"] = expected.abs().max().item()
    out["audio_positions"] = int((ids >= most.tokens.boa).sum())

    # bos/eos refusals
    out["bos_conflict"] = _run(
        tool,
        [
            "megatron-to-hf",
            "--megatron",
            root / "most",
            "--out",
            root / "e1",
            "--tokenizer",
            root / "tok",
            "--bos-id",
            "5",
        ],
    )
    out["bos_default"] = _run(tool, ["megatron-to-hf", "--megatron", root / "most", "--out", root / "e2"])

    # a corrupted table: the export's --verify fails
    with _swapped_expert_halves():
        out["m2h_corrupt"] = _run(
            tool,
            [
                "megatron-to-hf",
                "--megatron",
                root / "most",
                "--out",
                root / "bad_export",
                "--bos-id",
                "1",
                "--eos-id",
                "2",
                "--verify",
            ],
        )

    # hf-to-megatron with the MAMoE preset: text and text+audio checks, then a corrupted table
    hf = hf_deepseek.hf_model(tiny_text_config().replace(seq_length=32), seed=SEED)
    hf.save_pretrained(root / "hf", max_shard_size="100KB")
    out["h2m"] = _run(
        tool, ["hf-to-megatron", "--hf", root / "hf", "--out", root / "mamoe", "--preset", "tiny", "--verify"]
    )
    # the source's special ids and generation config survive both directions with no flags given
    source_config = json.loads((root / "hf" / "config.json").read_text())
    ids_config = {"bos_token_id": 3, "eos_token_id": 5, "pad_token_id": 4}
    (root / "hf" / "config.json").write_text(json.dumps({**source_config, **ids_config}))
    (root / "hf" / "generation_config.json").write_text(json.dumps({**ids_config, "temperature": 0.7}))
    out["ids_h2m"] = _run(tool, ["hf-to-megatron", "--hf", root / "hf", "--out", root / "ids_mg", "--preset", "tiny"])
    out["ids_m2h"] = _run(tool, ["megatron-to-hf", "--megatron", root / "ids_mg", "--out", root / "ids_hf"])
    exported = json.loads((root / "ids_hf" / "config.json").read_text())
    out["ids"] = {k: exported.get(k) for k in ids_config}
    out["generation"] = json.loads((root / "ids_hf" / "generation_config.json").read_text())
    (root / "hf" / "config.json").write_text(json.dumps(source_config))
    (root / "hf" / "generation_config.json").unlink()

    # the MoST export converts back (any preset: its config.json holds the MoST settings), bit-identical
    out["most_back"] = _run(
        tool,
        ["hf-to-megatron", "--hf", export, "--out", root / "most_back", "--preset", "deepseek_v2_lite", "--verify"],
    )
    original, back = load_values(model, root / "most"), load_values(model, root / "most_back")
    out["most_back_exact"] = sorted(n for n in original if not torch.equal(original[n], back[n]))
    back_config = load_most_config(root / "most_back")  # seq_length is the preset's
    out["most_back_config"] = back_config.mamoe.groups() == most.mamoe.groups() and back_config.replace(
        mamoe=most.mamoe
    ) == most.replace(seq_length=4096)

    with _swapped_expert_halves():
        out["h2m_corrupt"] = _run(
            tool, ["hf-to-megatron", "--hf", root / "hf", "--out", root / "bad_mamoe", "--preset", "tiny", "--verify"]
        )
    out["left"] = sorted(
        p.name for p in root.iterdir() if p.name.startswith(("bad", "e1", "e2")) or ".partial" in p.name
    )
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_distributed(_body, 1, args=(str(tmp_path_factory.mktemp("convert_most")),), timeout_s=400)[0]


def test_remote_code_export_matches_megatron_logits(result):
    r = result
    assert r["rc"] == 0, r["printed"]
    print(
        f"AutoModelForCausalLM(trust_remote_code) vs MoSTModel: max |diff| {r['diff']:.3g} (max |logit| {r['max_logit']:.3f})"
    )
    assert r["class"][0] == "MoSTForCausalLM" and "megatron_most" not in r["class"][1], r["class"]
    assert r["shape"][0] == r["shape"][1] and r["audio_positions"] > 20, r
    assert r["max_logit"] > 0.5 and r["diff"] < TOLERANCE, r
    assert r["tables_exact"] and r["projection_exact"], r


def test_remote_code_export_files_and_config(result):
    r = result
    assert r["auto_map_ok"], r["config"]
    c = r["config"]
    assert c["model_type"] == "most" and c["vocab_size"] == 384 and c["text_vocab_size"] == 256, (
        c
    )  # 256 + 3 + 32 -> 384
    assert (c["num_units"], c["audio_feature_dim"], c["masking"], c["torch_dtype"]) == (
        32,
        16,
        "zero_after_softmax",
        "float32",
    ), c
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2), c  # the tokenizer's
    assert {
        "configuration_most.py",
        "modeling_most.py",
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(r["files"]), r["files"]
    assert sum(f.endswith(".safetensors") for f in r["files"]) >= 2, r["files"]


def test_export_verify_checks_text_and_audio(result):
    d = _diffs(result["printed"])
    assert set(d) == {"text+audio"} and d["text+audio"][1] == "PASS" and d["text+audio"][0] < TOLERANCE, result[
        "printed"
    ]
    assert "tokens of sample text" in result["printed"], result["printed"]


def test_bos_eos_errors_name_field_value_and_fix(result):
    rc, printed = result["bos_conflict"]
    assert rc == 2 and "bos_token_id=5" in printed and "differs from the tokenizer's 1" in printed, printed
    rc, printed = result["bos_default"]
    assert (
        rc == 2 and "bos_token_id=100000" in printed and "text_vocab_size=256" in printed and "--bos-id" in printed
    ), printed


def test_hf_to_megatron_verify_checks_text_and_audio(result):
    rc, printed = result["h2m"]
    d = _diffs(printed)
    assert rc == 0 and set(d) == {"text", "text+audio"}, printed
    assert all(status == "PASS" and diff < TOLERANCE for diff, status in d.values()), d


def test_corrupted_conversion_fails_verify(result):
    for name, checks in (("m2h_corrupt", {"text+audio"}), ("h2m_corrupt", {"text", "text+audio"})):
        rc, printed = result[name]
        d = _diffs(printed)
        assert rc == 1 and "verify: FAIL" in printed and "--verify FAILED" in printed, (name, printed)
        assert set(d) == checks and all(status == "FAIL" and diff > 1e-2 for diff, status in d.values()), (name, d)
    assert result["left"] == [], result["left"]  # nothing written on FAIL or error


def test_source_special_ids_and_generation_config_carry_through(result):
    for step in ("ids_h2m", "ids_m2h"):
        assert result[step][0] == 0, result[step][1]
    assert result["ids"] == {"bos_token_id": 3, "eos_token_id": 5, "pad_token_id": 4}, result["ids"]
    generation = result["generation"]
    assert generation["temperature"] == 0.7 and (generation["bos_token_id"], generation["eos_token_id"]) == (3, 5)


def test_most_export_converts_back_bit_identical(result):
    rc, printed = result["most_back"]
    d = _diffs(printed)
    assert rc == 0 and set(d) == {"text", "text+audio"}, printed
    assert all(status == "PASS" and diff < TOLERANCE for diff, status in d.values()), d
    assert result["most_back_exact"] == [], result["most_back_exact"]
    assert result["most_back_config"]
