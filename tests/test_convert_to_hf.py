"""MoST torch_dist -> HF DeepSeek-V2 safetensors (megatron_most.convert.megatron_to_hf).

A tiny DeepseekV2ForCausalLM (tests/hf_deepseek.py, fp32, every tensor random) is saved with
save_pretrained in several shards, converted HF -> Megatron (text-only preset) and back with the
megatron-to-hf command (--verify, small shards, tokenizer files), and:
- every tensor of the export equals the original's: same names, shapes, dtypes, values;
- config.json loads with AutoConfig, maps back to the same MoSTConfig, and
  DeepseekV2ForCausalLM.from_pretrained(out) gives the original model's logits;
- shards respect --max-shard-size and the index names every tensor once;
- an existing non-empty --out is refused (left untouched), and a MoST model (MAMoE routing,
  audio) is refused for the plain format (--format deepseek_v2) with a message naming the
  remote-code export;
  neither leaves a partial directory behind; nor does a read error half way through;
- checkpoints re-saved by Megatron at TP2+SP and EP2 (2 ranks) export (bf16) to the same tensors,
  one Megatron tensor in memory at a time.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.multiproc import run_distributed

BATCH, SEQ, SEED = 2, 16, 0
SHARD = 150_000


def _tool():
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", Path(__file__).parent.parent / "tools" / "convert_checkpoint.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _read_all(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            assert name not in out, name
            out[name] = t
    return out


def _save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer of the verify sample text (ids < the tiny text vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_most.convert.verify import SAMPLE_TEXT

    words = sorted(set(SAMPLE_TEXT.replace(".", " . ").replace(",", " , ").replace(":", " : ").split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(directory))


def _body(root: str) -> dict:
    import contextlib
    import io

    from transformers import AutoConfig, DeepseekV2ForCausalLM

    from megatron_most.convert import hf_config
    from megatron_most.convert.common import load_most_config
    from tests import hf_deepseek
    from tests.test_most_hf_equivalence import tiny_text_config

    root = Path(root)
    most = tiny_text_config().replace(seq_length=SEQ)
    hf = hf_deepseek.hf_model(most, seed=SEED)
    hf_dir = root / "hf"
    hf.save_pretrained(hf_dir, max_shard_size="100KB")
    _save_tokenizer(root / "tok")
    (root / "tok" / "model.safetensors").write_text("not a tokenizer file")
    tool = _tool()
    out: dict = {}
    out["h2m_rc"] = tool.main(
        ["hf-to-megatron", "--hf", str(hf_dir), "--out", str(root / "text"), "--preset", "deepseek_v2_lite"]
    )
    out["h2m_mamoe_rc"] = tool.main(
        ["hf-to-megatron", "--hf", str(hf_dir), "--out", str(root / "mamoe"), "--preset", "tiny"]
    )

    export = root / "export"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out["rc"] = tool.main(
            [
                "megatron-to-hf",
                "--megatron",
                str(root / "text"),
                "--out",
                str(export),
                "--tokenizer",
                str(root / "tok"),
                "--max-shard-size",
                str(SHARD),
                "--verify",
                "--bos-id",
                "1",
                "--eos-id",
                "2",
            ]
        )
    out["printed"] = printed.getvalue()

    # tensors: names, shapes, dtypes, values
    original, exported = _read_all(hf_dir), _read_all(export)
    out["names_equal"] = sorted(original) == sorted(exported)
    out["missing"] = sorted(set(original) - set(exported))[:5]
    out["extra"] = sorted(set(exported) - set(original))[:5]
    out["mismatched"] = [
        n
        for n in original
        if n in exported
        and not (
            original[n].dtype == exported[n].dtype
            and original[n].shape == exported[n].shape
            and torch.equal(original[n], exported[n])
        )
    ]
    out["count"] = len(original)

    index = json.loads((export / "model.safetensors.index.json").read_text())
    shard_files = sorted(p.name for p in export.glob("*.safetensors"))
    out["index_names"] = sorted(index["weight_map"]) == sorted(exported)
    out["index_files"] = sorted(set(index["weight_map"].values())) == shard_files
    out["shards"] = len(shard_files)
    out["shard_bytes"] = [
        sum(t.numel() * t.element_size() for n, t in _read_all_file(export / f).items()) for f in shard_files
    ]
    out["total_size"] = index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in exported.values())
    out["files"] = sorted(p.name for p in export.iterdir())

    # config.json: transformers and back to the MoSTConfig
    cfg = AutoConfig.from_pretrained(export)
    out["model_type"] = cfg.model_type
    out["special_ids"] = (cfg.bos_token_id, cfg.eos_token_id)
    written = json.loads((export / "config.json").read_text())
    out["config_round_trip"] = hf_config.config_from_hf(written, load_most_config(root / "text")) == load_most_config(
        root / "text"
    )
    ids = torch.randint(0, most.text_vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED + 1))
    reloaded = DeepseekV2ForCausalLM.from_pretrained(export, attn_implementation="eager").float().eval()
    with torch.no_grad():
        expected, got = hf(input_ids=ids).logits, reloaded(input_ids=ids).logits
    out["logit_diff"] = (got - expected).abs().max().item()
    out["max_logit"] = expected.abs().max().item()

    # refusals
    before = sorted(p.name for p in export.iterdir())
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        out["again_rc"] = tool.main(["megatron-to-hf", "--megatron", str(root / "text"), "--out", str(export)])
        (root / "busy").mkdir()
        (root / "busy" / "notes.txt").write_text("mine")
        out["busy_rc"] = tool.main(["megatron-to-hf", "--megatron", str(root / "text"), "--out", str(root / "busy")])
        out["most_rc"] = tool.main(
            [
                "megatron-to-hf",
                "--megatron",
                str(root / "mamoe"),
                "--out",
                str(root / "most_out"),
                "--format",
                "deepseek_v2",
            ]
        )
        out["no_config_rc"] = tool.main(["megatron-to-hf", "--megatron", str(hf_dir), "--out", str(root / "most_out")])
    out["errors"] = errors.getvalue()
    out["untouched"] = (
        before == sorted(p.name for p in export.iterdir()) and (root / "busy" / "notes.txt").read_text() == "mine"
    )
    out["left_behind"] = sorted(p.name for p in root.iterdir() if ".partial" in p.name or p.name == "most_out")
    return out


def _read_all_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save_resharded(root: str) -> None:
    """Rank body (2 ranks): the converted text checkpoint saved again by Megatron at TP2+SP and
    at EP2 (as training would), with its most_config.json."""
    import shutil

    import torch.distributed
    from megatron.core import dist_checkpointing

    from megatron_most.convert.common import load_into, load_most_config
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize

    root = Path(root)
    most = load_most_config(root / "text")
    for name, layout in (("tp2", ParallelLayout(tp=2, sp=True)), ("ep2", ParallelLayout(ep=2))):
        initialize(layout, num_experts=most.mamoe.num_experts)
        model = build_model(most, most.transformer_config(layout), use_te=False)
        load_into(model, root / "text")
        if torch.distributed.get_rank() == 0:
            (root / name).mkdir()
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), str(root / name))
        if torch.distributed.get_rank() == 0:
            shutil.copy(root / "text" / "most_config.json", root / name / "most_config.json")
        torch.distributed.barrier()


def _export_resharded(root: str) -> dict:
    """Rank body (1 rank): export the TP2 / EP2 checkpoints (bf16) and compare with the original."""
    from megatron_most.convert.megatron_to_hf import export
    from megatron_most.platform import ParallelLayout, initialize

    root = Path(root)
    initialize(ParallelLayout())
    original = _read_all(root / "hf")
    out = {}
    for name in ("tp2", "ep2"):
        _, stats = export(
            root / name,
            root / f"{name}_hf",
            dtype=torch.bfloat16,
            max_shard_size="1MB",
            bos_token_id=1,
            eos_token_id=2,
            log=lambda *_: None,
        )
        got = _read_all(root / f"{name}_hf")
        out[name] = dict(
            names=sorted(got) == sorted(original),
            bad=[
                n
                for n in original
                if not (got[n].dtype == torch.bfloat16 and torch.equal(got[n], original[n].to(torch.bfloat16)))
            ],
            torch_dtype=json.loads((root / f"{name}_hf" / "config.json").read_text())["torch_dtype"],
            largest=stats.largest_megatron_tensor_bytes,
        )
    from megatron_most.convert.reader import TorchDistReader

    real_get, calls = TorchDistReader.get, []

    def failing_get(self, key):  # a read error half way through the export
        calls.append(key)
        if len(calls) > 30:
            raise OSError(f"simulated read error at {key}")
        return real_get(self, key)

    TorchDistReader.get = failing_get
    try:
        export(root / "tp2", root / "midway", bos_token_id=1, eos_token_id=2, log=lambda *_: None)
        out["midway"] = "NO ERROR"
    except OSError as e:
        out["midway"] = str(e)
    finally:
        TorchDistReader.get = real_get
    out["midway_left"] = sorted(p.name for p in root.iterdir() if "midway" in p.name)
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_to_hf")
    r = run_distributed(_body, 1, args=(str(root),), timeout_s=300)[0]
    run_distributed(_save_resharded, 2, args=(str(root),), timeout_s=300)
    r["resharded"] = run_distributed(_export_resharded, 1, args=(str(root),), timeout_s=300)[0]
    return r


def test_export_from_resharded_checkpoints_in_bf16(result):
    for name in ("tp2", "ep2"):
        r = result["resharded"][name]
        assert r["names"] and r["bad"] == [] and r["torch_dtype"] == "bfloat16", (name, r)
        assert r["largest"] <= 256 * 64 * 4, (
            name,
            r,
        )  # one Megatron tensor at a time: at most [256, 64] fp32 (vocab, dense fc1)


def test_round_trip_and_verify_cli(result):
    r = result
    assert r["h2m_rc"] == 0 and r["h2m_mamoe_rc"] == 0, r
    assert r["rc"] == 0, r  # --verify printed PASS
    assert "PASS" in r["printed"] and "max abs logit diff" in r["printed"], r["printed"]
    assert "tokens of sample text" in r["printed"], r["printed"]  # the copied tokenizer is used


def test_every_tensor_bit_identical(result):
    r = result
    assert r["names_equal"], (r["missing"], r["extra"])
    assert r["mismatched"] == [] and r["count"] > 50, r["mismatched"][:5]


def test_shards_and_index(result):
    r = result
    assert r["index_names"] and r["index_files"] and r["total_size"], r
    assert r["shards"] >= 3, r
    big = [b for b in r["shard_bytes"] if b > SHARD]
    assert len(big) <= 1, r["shard_bytes"]  # only a shard holding one oversized tensor may exceed
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        r["files"]
    ), r["files"]
    assert "model.safetensors" not in r["files"]  # only tokenizer files are copied


def test_config_loads_in_transformers_and_logits_match(result):
    r = result
    assert r["model_type"] == "deepseek_v2" and r["config_round_trip"] and r["special_ids"] == (1, 2), r
    assert r["max_logit"] > 0.5 and r["logit_diff"] < 1e-5, r  # same weights; eager attention like the original


def test_existing_output_refused(result):
    r = result
    assert r["again_rc"] == 2 and r["busy_rc"] == 2 and r["untouched"], r
    assert "not empty" in r["errors"], r["errors"]


def test_most_model_refused_for_plain_format(result):
    r = result
    assert r["most_rc"] == 2, r
    assert "remote-code export" in r["errors"] and "MAMoE routing" in r["errors"], r["errors"]
    assert r["left_behind"] == [], r["left_behind"]


def test_failed_export_leaves_nothing(result):
    r = result["resharded"]
    assert r["midway"].startswith("simulated read error") and r["midway_left"] == [], r


def test_checkpoint_without_most_config_refused(result):
    assert result["no_config_rc"] == 2 and "most_config.json" in result["errors"], result


def test_size_parsing():
    from megatron_most.convert.hf_writer import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 100_000 and parse_size("1GiB") == 2**30
    assert parse_size(123) == 123 and parse_size("2.5MB") == 2_500_000
    with pytest.raises(ValueError):
        parse_size("lots")
