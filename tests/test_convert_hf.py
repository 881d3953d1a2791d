"""HF DeepSeek-V2 safetensors -> MoST torch_dist (megatron_most.convert.hf_to_megatron).

A tiny DeepseekV2ForCausalLM (tests/hf_deepseek.py, fp32, every tensor random) is saved with
save_pretrained in several shards (per-expert tensor names, as on the hub), converted with the
text-only preset and with the tiny MAMoE preset, and:
- at TP1 the converted MoSTModel's logits match the HF model's (< 1e-4); the MAMoE conversion
  copies experts by index, the router as is, and seeds the new vocabulary rows / projection;
- a bf16 source is written in bf16 (fp32 with --dtype fp32), and --verify passes for both;
- at TP2+SP, EP2 and PP2 (2 ranks) the checkpoint reshards and the logits still match;
- the table's Megatron keys are exactly the model's; both rope config forms give one MoSTConfig;
- bad input fails with a clear error and leaves no checkpoint: missing shard, truncated shard,
  index naming an absent tensor, wrong expert count / hidden size in config.json, existing --out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.multiproc import run_distributed

BATCH, SEQ, SEED = 2, 16, 0
TOLERANCE = 1e-4


def _tiny():
    from tests.test_most_hf_equivalence import tiny_text_config

    return tiny_text_config().replace(seq_length=SEQ)


def _hf_logits(hf, vocab):
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        return ids, hf(input_ids=ids).logits


def _expect_error(fn, *fragments) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        message = f"{type(e).__name__}: {e}"
        missing = [f for f in fragments if f not in message]
        return message if not missing else f"MESSAGE LACKS {missing}: {message}"
    return "NO ERROR"


def _single(root: str) -> dict:
    """Rank body (1 rank): save, convert (CLI + API), compare at TP1, bad inputs."""
    from megatron_most.convert import hf_config, mapping
    from megatron_most.convert.common import load_into
    from megatron_most.convert.hf_to_megatron import convert
    from megatron_most.model.config import preset
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize
    from tests import hf_deepseek

    root = Path(root)
    most = _tiny()
    hf = hf_deepseek.hf_model(most, seed=SEED)
    hf_dir = root / "hf"
    hf.save_pretrained(hf_dir, max_shard_size="100KB")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    ids, expected = _hf_logits(hf, most.text_vocab_size)
    out: dict = {
        "shards": len(shards),
        "per_expert": "model.layers.1.mlp.experts.3.gate_proj.weight" in index["weight_map"],
    }

    # the command line tool, with --verify
    from tests.test_convert_to_hf import _tool

    tool = _tool()
    out["cli_rc"] = tool.main(
        ["hf-to-megatron", "--hf", str(hf_dir), "--out", str(root / "text"), "--preset", "deepseek_v2_lite", "--verify"]
    )
    out["cli_again"] = tool.main(
        ["hf-to-megatron", "--hf", str(hf_dir), "--out", str(root / "text"), "--preset", "deepseek_v2_lite"]
    )

    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    converted = hf_config.config_from_hf(json.loads((hf_dir / "config.json").read_text()), preset("deepseek_v2_lite"))
    out["config_matches"] = converted == most.replace(seq_length=converted.seq_length, init_std=converted.init_std)

    # hub form of config.json: rope_scaling (type yarn) + top-level rope_theta
    hub = json.loads((hf_dir / "config.json").read_text())
    rope = hub.pop("rope_parameters")
    hub["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    hub["rope_scaling"] = rope
    out["hub_config_matches"] = hf_config.config_from_hf(hub, preset("deepseek_v2_lite")) == converted

    # TP1 logits of the converted text-only checkpoint
    torch.manual_seed(SEED)
    model = build_model(converted, converted.transformer_config(), use_te=False).eval()
    load_into(model, root / "text")
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=None, attention_mask=None)
    out["tp1_diff"] = (got[..., : most.text_vocab_size] - expected).abs().max().item()
    out["max_logit"] = expected.abs().max().item()

    # table keys == model keys
    from megatron_most.convert.common import build_template
    from megatron_most.convert.hf_to_megatron import _template_entries

    out["keys_match"] = set(mapping.megatron_keys(converted)) == set(_template_entries(build_template(converted)))

    # MAMoE conversion (tiny preset: text experts 0..3, audio 4..7, 32 units, 16-d features)
    mamoe, stats = convert(hf_dir, root / "mamoe", preset("tiny"), seed=7, log=lambda *_: None)
    out["mamoe_stats_loads"] = (stats.loads, stats.entries)
    m = build_model(mamoe, mamoe.transformer_config(), use_te=False)
    load_into(m, root / "mamoe")
    state, src = m.state_dict(), hf.state_dict()
    layer, e = 2, 5
    fc1 = state[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1.weight"]
    gate_up = src[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e]
    table = state["embedding.word_embeddings.weight"]
    new_rows = table[most.text_vocab_size :]
    out["mamoe"] = dict(
        expert_by_index=torch.equal(fc1, gate_up),
        router=torch.equal(
            state[f"decoder.layers.{layer}.mlp.router.weight"], src[f"model.layers.{layer}.mlp.gate.weight"]
        ),
        text_rows=torch.equal(table[: most.text_vocab_size], src["model.embed_tokens.weight"]),
        new_rows_std=new_rows.std().item(),
        init_std=mamoe.init_std,
        projection_std=state["audio_projection.weight"].std().item(),
        bias_zero=bool((state["audio_projection.bias"] == 0).all()),
        groups=mamoe.mamoe.groups(),
        units=mamoe.num_units,
    )

    # transformers' in-memory layout (fused experts: gate_up_proj[E], down_proj[E]) in ONE bf16
    # model.safetensors without an index: the table's stacked alternatives, read row by row
    import copy as copy_module

    from safetensors.torch import save_file

    fused_dir = root / "fused"
    fused_dir.mkdir()
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in hf.state_dict().items()}, str(fused_dir / "model.safetensors")
    )
    shutil.copy(hf_dir / "config.json", fused_dir / "config.json")
    fused, _ = convert(fused_dir, root / "fused_out", preset("deepseek_v2_lite"), log=lambda *_: None)
    rounded = copy_module.deepcopy(hf)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    _, expected_bf16 = _hf_logits(rounded, most.text_vocab_size)
    model = build_model(fused, fused.transformer_config(), use_te=False).eval()
    load_into(model, root / "fused_out")
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=None, attention_mask=None)
    out["fused_bf16_diff"] = (got[..., : most.text_vocab_size] - expected_bf16).abs().max().item()
    out["bf16_rounding_visible"] = (expected_bf16 - expected).abs().max().item()
    # written in the source's bf16 by default, fp32 on request; --verify passes for both
    out["fused_dtypes"] = _stored_dtypes(root / "fused_out")
    for name, extra in (("bf16", []), ("fp32", ["--dtype", "fp32"])):
        rc = tool.main(
            [
                "hf-to-megatron",
                "--hf",
                str(fused_dir),
                "--out",
                str(root / f"fused_{name}"),
                "--preset",
                "deepseek_v2_lite",
                "--verify",
                *extra,
            ]
        )
        out[f"fused_{name}_cli"] = (rc, _stored_dtypes(root / f"fused_{name}"))

    # bad input: each on a copy of the HF directory; none may leave a checkpoint behind
    def copy(name):
        d = root / name
        shutil.copytree(hf_dir, d)
        return d

    errors = {}
    d = copy("missing_shard")
    (d / shards[1]).unlink()
    errors["missing shard"] = _expect_error(
        lambda: convert(d, root / "o1", preset("deepseek_v2_lite")), shards[1], "missing"
    )
    d = copy("truncated")
    data = (d / shards[2]).read_bytes()
    (d / shards[2]).write_bytes(data[: len(data) - 100])
    errors["truncated shard"] = _expect_error(
        lambda: convert(d, root / "o2", preset("deepseek_v2_lite")), shards[2], "truncated"
    )
    d = copy("absent")
    bad = json.loads((d / "model.safetensors.index.json").read_text())
    bad["weight_map"]["model.layers.1.mlp.experts.9.gate_proj.weight"] = shards[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(bad))
    errors["index names absent tensor"] = _expect_error(
        lambda: convert(d, root / "o3", preset("deepseek_v2_lite")),
        "model.layers.1.mlp.experts.9.gate_proj.weight",
        "absent",
    )
    for name, field, value, fragment in (
        ("experts", "n_routed_experts", 16, "model.layers.1.mlp.gate.weight"),
        ("experts_fewer", "n_routed_experts", 4, "not used"),
        ("hidden", "hidden_size", 128, "model.embed_tokens.weight"),
    ):
        d = copy(name)
        cfg = json.loads((d / "config.json").read_text())
        cfg[field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        errors[f"config {field}={value}"] = _expect_error(
            lambda d=d, name=name: convert(d, root / f"o_{name}", preset("deepseek_v2_lite")), fragment
        )
    from megatron_most.convert.hf_reader import HFCheckpoint

    real_get, calls = HFCheckpoint.get, []

    def failing_get(self, name):  # a read error half way through the write
        calls.append(name)
        if len(calls) > 20:
            raise OSError(f"simulated read error at {name}")
        return real_get(self, name)

    HFCheckpoint.get = failing_get
    try:
        errors["read error mid-write"] = _expect_error(
            lambda: convert(hf_dir, root / "o_midway", preset("deepseek_v2_lite")), "simulated"
        )
    finally:
        HFCheckpoint.get = real_get
    errors["existing output"] = _expect_error(
        lambda: convert(hf_dir, root / "text", preset("deepseek_v2_lite")), "already holds a checkpoint"
    )
    out["errors"] = errors
    out["left_behind"] = sorted(p.name for p in root.iterdir() if p.name.startswith("o") or ".partial" in p.name)
    return out


def _stored_dtypes(directory: Path) -> set[str]:
    """dtypes of the tensors stored in a torch_dist checkpoint (from its DCP metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {str(v.properties.dtype) for v in metadata.values() if hasattr(v, "properties")}


def _resharded(root: str) -> dict:
    """Rank body (2 ranks): the text checkpoint at TP2+SP and EP2 gives the HF logits."""
    from megatron_most.convert.common import load_into
    from megatron_most.model.config import MoSTConfig
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize
    from tests import hf_deepseek

    most = _tiny()
    hf = hf_deepseek.hf_model(most, seed=SEED)
    ids, expected = _hf_logits(hf, most.text_vocab_size)
    cfg = json.loads((Path(root) / "text" / "most_config.json").read_text())
    converted = _tiny().replace(seq_length=cfg["seq_length"], init_std=cfg["init_std"])
    assert isinstance(converted, MoSTConfig)
    diffs = {}
    layouts = (("TP2+SP", ParallelLayout(tp=2, sp=True)), ("EP2", ParallelLayout(ep=2)), ("PP2", ParallelLayout(pp=2)))
    for name, layout in layouts:
        initialize(layout, num_experts=most.mamoe.num_experts)
        torch.manual_seed(SEED)
        model = build_model(converted, converted.transformer_config(layout), use_te=False).eval()
        load_into(model, Path(root) / "text")
        from megatron.core import parallel_state

        with torch.no_grad():
            if layout.pp == 1:
                got = model(input_ids=ids, position_ids=None, attention_mask=None)  # [b, s, padded vocab / tp]
            else:
                got = _pipelined_forward(model, ids, converted.hidden_size)
        if got is None:  # a pipeline stage without logits
            continue
        tp, rank = layout.tp, parallel_state.get_tensor_model_parallel_rank()
        width = converted.tokens.padded_size // tp
        columns = torch.arange(rank * width, (rank + 1) * width)
        keep = columns < most.text_vocab_size
        diffs[name] = (got[..., keep] - expected[..., columns[keep]]).abs().max().item()
    return diffs


def _pipelined_forward(model, ids, hidden):
    """Forward through a 2-stage pipeline by hand: stage 0 sends its hidden states [s, b, h] to
    stage 1, which returns the logits; stage 0 returns None."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    first, last = (
        parallel_state.get_pipeline_model_parallel_first_rank(),
        parallel_state.get_pipeline_model_parallel_last_rank(),
    )
    if parallel_state.is_pipeline_first_stage():
        out = model(input_ids=ids, position_ids=None, attention_mask=None)
        torch.distributed.send(out.contiguous(), dst=last, group=group)
        return None
    received = torch.empty(ids.shape[1], ids.shape[0], hidden)
    torch.distributed.recv(received, src=first, group=group)
    model.set_input_tensor(received)
    return model(input_ids=ids, position_ids=None, attention_mask=None)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_hf")
    return root, run_distributed(_single, 1, args=(str(root),), timeout_s=300)[0]


def test_hf_checkpoint_is_sharded_per_expert(single):
    _, r = single
    assert r["shards"] >= 3 and r["per_expert"], r


def test_cli_converts_and_verifies(single):
    _, r = single
    assert r["cli_rc"] == 0, r  # --verify printed PASS
    assert r["cli_again"] == 2, r  # existing checkpoint refused


def test_config_from_both_rope_forms(single):
    _, r = single
    assert r["config_matches"] and r["hub_config_matches"], r


def test_table_keys_are_the_model_keys(single):
    _, r = single
    assert r["keys_match"]


def test_converted_logits_match_hf_at_tp1(single):
    _, r = single
    assert r["max_logit"] > 0.5, r
    assert r["tp1_diff"] < TOLERANCE, r


def test_fused_bf16_single_file_layout(single):
    _, r = single
    assert r["fused_bf16_diff"] < TOLERANCE < r["bf16_rounding_visible"], r


def test_output_dtype_follows_source_or_option(single):
    _, r = single
    assert r["fused_dtypes"] == {"torch.bfloat16"}, r
    assert r["fused_bf16_cli"] == (0, {"torch.bfloat16"}), r  # --verify PASS (compared in fp32)
    assert r["fused_fp32_cli"] == (0, {"torch.float32"}), r


HUB_CONFIG = {  # deepseek-ai/DeepSeek-V2-Lite config.json (the fields the converter reads)
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "aux_loss_alpha": 0.001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.006,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 102400,
}


def test_hub_config_gives_the_presets():
    from megatron_most.convert.hf_config import config_from_hf
    from megatron_most.model.config import preset
    from megatron_most.options import ConfigError

    for name in ("deepseek_v2_lite_most", "deepseek_v2_lite"):
        base = preset(name)
        assert config_from_hf(HUB_CONFIG, base) == base, name
    for change, fragment in (
        ({"q_lora_rank": 1536}, "q_lora_rank"),
        ({"norm_topk_prob": True}, "norm_topk_prob"),
        ({"rope_scaling": {"type": "linear", "factor": 4}}, "yarn"),
        ({"num_experts_per_tok": 40}, "n_routed_experts"),
    ):
        with pytest.raises(ConfigError, match=fragment):
            config_from_hf({**HUB_CONFIG, **change}, preset("deepseek_v2_lite_most"))


def test_mamoe_conversion_copies_experts_and_seeds_new_tensors(single):
    _, r = single
    m = r["mamoe"]
    assert r["mamoe_stats_loads"][0] == r["mamoe_stats_loads"][1]
    assert m["expert_by_index"] and m["router"] and m["text_rows"] and m["bias_zero"], m
    assert m["groups"] == ((0, 1, 2, 3), (4, 5, 6, 7)) and m["units"] == 32, m
    assert abs(m["new_rows_std"] - m["init_std"]) < 0.2 * m["init_std"], m
    assert abs(m["projection_std"] - m["init_std"]) < 0.3 * m["init_std"], m


def test_bad_input_fails_clearly_without_a_checkpoint(single):
    _, r = single
    for name, message in r["errors"].items():
        assert not message.startswith(("NO ERROR", "MESSAGE LACKS")), (name, message)
    assert r["left_behind"] == [], r["left_behind"]


def test_converted_checkpoint_reshards(single):
    root, _ = single
    ranks = run_distributed(_resharded, 2, args=(str(root),), timeout_s=300)
    print("max |HF - Megatron| per layout and rank:", ranks)
    assert set(ranks[0]) == {"TP2+SP", "EP2"} and set(ranks[1]) == {"TP2+SP", "EP2", "PP2"}, ranks  # PP2: last stage
    assert max(max(d.values()) for d in ranks) < TOLERANCE, ranks
