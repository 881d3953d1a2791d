"""AudioTextDataset: packing, masks, features and blending against plain-Python references.

Samples are generated here and kept in memory as ground truth; the expected item fields are
rebuilt from them with plain loops, never from the dataset's own arrays.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from megatron_most.data.blend import MicroBatchSampler, build_datasets, collate, data_loader
from megatron_most.data.dataset import AudioTextDatasetConfig
from megatron_most.options import ConfigError
from tests.multiproc import run_distributed
from tests.packed_data import BOS, DIM, EOS, LAYOUT, SEQ, K, T, _asr, _text, _tts, _write  # noqa: F401


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio_text")
    rng = np.random.default_rng(0)
    sets = {
        "asr": [_asr(rng) for _ in range(80)],
        "tts": [_tts(rng) for _ in range(80)],
        "text": [_text(rng) for _ in range(120)],
    }
    sets["tts"][5] = (sets["tts"][5][0] + [EOS] * 80, sets["tts"][5][1] + [0] * 80, None, [])  # too long: skipped
    _write(root / "asr", sets["asr"], feature_dim=DIM)
    _write(root / "tts", sets["tts"], feature_dim=0)
    _write(root / "text", sets["text"], feature_dim=0, num_units=0)  # no units: fits any model
    return {name: (str(root / name), samples) for name, samples in sets.items()}


def _config(prefixes, weights=None, **kw):
    kw.setdefault("random_seed", 7)
    kw.setdefault("split", "80,10,10")
    kw.setdefault("create_attention_mask", True)  # the dense mask is checked against the reference
    return AudioTextDatasetConfig(
        sequence_length=SEQ, blend=(prefixes, weights), text_vocab_size=T, num_units=K, feature_dim=DIM, **kw
    )


def _single(data, name, sizes=(None, None, None), **kw):
    prefix, samples = data[name]
    return build_datasets(_config([prefix], **kw), list(sizes)), samples


def _reference_packing(order, lengths, capacity):
    items, current, used = [], [], 0
    for s in order:
        if used + lengths[s] > capacity:
            items.append(current)
            current, used = [], 0
        current.append(int(s))
        used += lengths[s]
    return items + [current]


def _reference_item(samples, ids):
    """Expected fields of one packed item from raw samples, element by element."""
    tokens, stored, segment = [], [], []
    for k, s in enumerate(ids):
        tokens += list(samples[s][0])
        stored += list(samples[s][1])
        segment += [k] * len(samples[s][0])
    n = len(tokens)
    tokens += [0] * (SEQ + 1 - n)
    segment += [len(ids)] * (SEQ + 1 - n)
    out = {key: [] for key in ("tokens", "labels", "loss_mask", "position_ids", "padding_mask")}
    for i in range(SEQ):
        out["tokens"].append(tokens[i])
        out["labels"].append(tokens[i + 1])
        same_sample = i + 1 < n and segment[i + 1] == segment[i]
        target = same_sample and stored[i + 1] == 1 and tokens[i + 1] != LAYOUT.feature
        out["loss_mask"].append(1.0 if target else 0.0)
        out["position_ids"].append(i - segment.index(segment[i]))
        out["padding_mask"].append(i >= n)
    mask = [[not (j <= i and segment[i] == segment[j]) for j in range(SEQ)] for i in range(SEQ)]
    out["attention_mask"] = [mask]
    out = {key: torch.tensor(v) for key, v in out.items()}
    feats = [samples[s][2] for s in ids if samples[s][2] is not None]
    out["audio_features"] = torch.from_numpy(np.concatenate(feats).astype(np.float32)) if feats else torch.zeros(0, DIM)
    out["audio_lengths"] = torch.tensor([f for s in ids for f in samples[s][3]], dtype=torch.int64)
    return out


def test_packing_and_fields_match_reference(data):
    (train, valid, _), samples = _single(data, "asr", sizes=(300, None, None))
    lengths = [len(s[0]) for s in samples]
    fits = sorted(i for i in range(64) if lengths[i] <= SEQ + 1)  # train = first 80% of 80 samples
    epoch = len(fits)
    assert train.epochs > 1 and len(train) >= 300 and len(train.order) == epoch * train.epochs
    expected = []
    for e in range(train.epochs):
        order = train.order[e * epoch : (e + 1) * epoch]
        assert sorted(order.tolist()) == fits  # each epoch: a reshuffled permutation
        expected += _reference_packing(order, lengths, SEQ + 1)
    assert not np.array_equal(train.order[:epoch], train.order[epoch : 2 * epoch])
    assert [train.samples(i).tolist() for i in range(len(train))] == expected
    assert sorted(set(valid.order.tolist())) == list(range(64, 72))
    _check_items(train, samples, [0, 1, len(train) // 2, len(train) - 1])


@pytest.mark.parametrize("name", ["tts", "text"])
def test_units_and_text_items_match_reference(data, name):
    (train, _, test), samples = _single(data, name)
    assert max(len(train.samples(i)) for i in range(len(train))) > 1
    _check_items(train, samples, range(0, len(train), 3))
    _check_items(test, samples, range(len(test)))


def _check_items(ds, samples, indices):
    for idx in indices:
        item, want = ds[idx], _reference_item(samples, ds.samples(idx).tolist())
        for key, value in want.items():
            assert torch.equal(item[key], value.to(item[key].dtype)), (idx, key)
        assert torch.equal(item["modality"], LAYOUT.modality(item["tokens"]))
        frames = int((item["tokens"] == LAYOUT.feature).sum())
        assert item["audio_features"].shape == (frames, DIM) and int(item["audio_lengths"].sum()) == frames


def test_attention_mask_blocks(data):
    (train, _, _), samples = _single(data, "text")
    item = train[3]
    ids = train.samples(3).tolist()
    mask = item["attention_mask"][0]
    start = 0
    for s in ids:
        end = min(start + len(samples[s][0]), SEQ)
        block = mask[start:end, start:end]
        assert torch.equal(block, ~torch.ones_like(block).tril())  # causal inside the sample
        assert mask[start:end, :start].all() and mask[start:end, end:].all()  # nothing across samples
        start = end
    assert len(ids) > 1 and start <= SEQ


def test_skipped_and_nothing_fits(data):
    (train, valid, test), _ = _single(data, "tts")
    assert train.skipped == 1 and valid.skipped == 0  # sample 5 (> SEQ + 1 tokens) is in the train split
    assert 5 not in train.order
    with pytest.raises(ConfigError, match=r"no sample fits sequence_length \+ 1 = 9 tokens"):
        build_datasets(
            AudioTextDatasetConfig(
                random_seed=1,
                sequence_length=8,
                blend=([data["tts"][0]], None),
                split="1,0,0",
                text_vocab_size=T,
                num_units=K,
            ),
            [None, None, None],
        )


def test_empty_split_of_small_dataset(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path / "small", [_text(rng) for _ in range(4)], feature_dim=0)
    config = AudioTextDatasetConfig(
        random_seed=1,
        sequence_length=SEQ,
        blend=([str(tmp_path / "small")], None),
        split="98,1,1",
        text_vocab_size=T,
        num_units=K,
    )
    train, valid, test = build_datasets(config, [None, None, None])
    assert len(train) == 1 and len(valid) == 0 and len(test) == 0
    with pytest.raises(ConfigError, match=r"small \(valid split\): 10 items requested but the split holds none"):
        build_datasets(config, [None, 10, None])


def test_pack_false_one_sample_per_item(data):
    (train, _, _), samples = _single(data, "text", pack=False, create_attention_mask=False)
    assert len(train) == 96 and "attention_mask" not in train[0]
    for idx in range(5):
        (s,) = train.samples(idx).tolist()
        assert int((~train[idx]["padding_mask"]).sum()) == min(len(samples[s][0]), SEQ)


def test_blend_weights_honoured(data):
    prefixes = [data[name][0] for name in ("asr", "tts", "text")]
    config = _config(prefixes, [0.4, 0.4, 0.2], split="100,0,0", create_attention_mask=False)
    train, valid, test = build_datasets(config, [10000, 0, 0])
    assert valid is None and test is None and len(train) == 10000
    assert build_datasets(config, [10000, None, None])[1:] == [None, None]  # empty splits need no size
    with pytest.raises(ConfigError, match=r"sizes\[1\] \(valid\) is None but the blend has weights"):
        build_datasets(_config(prefixes, [0.4, 0.4, 0.2], split="90,10,0"), [10000, None, None])
    counts = np.bincount([int(train[i]["dataset_id"]) for i in range(len(train))], minlength=3)
    assert np.allclose(counts / 10000, [0.4, 0.4, 0.2], atol=0.01), counts
    for source, name in enumerate(("asr", "tts", "text")):  # each source's items hold its own samples
        item = train[int(np.flatnonzero(train.dataset_index == source)[0])]
        assert (item["tokens"] == LAYOUT.feature).any() == (name == "asr")


def _digest(datasets) -> str:
    h = hashlib.sha256()
    for ds in datasets:
        for i in range(0, len(ds), 7):
            item = ds[i]
            for key in ("tokens", "loss_mask", "position_ids", "audio_features"):
                h.update(item[key].numpy().tobytes())
    return h.hexdigest()


def _blend_config(data, seed):
    prefixes = [data[name][0] for name in ("asr", "tts", "text")]
    return _config(prefixes, [0.4, 0.4, 0.2], random_seed=seed, split="80,10,10", create_attention_mask=False)


def _digest_on_rank(data):
    torch.distributed.init_process_group("gloo")  # the builder's barriers need a process group
    return _digest([d for d in build_datasets(_blend_config(data, 3), [500, 50, 50]) if d is not None])


def test_deterministic_by_seed_and_identical_across_processes(data):
    first = _digest(build_datasets(_blend_config(data, 3), [500, 50, 50]))
    assert first == _digest(build_datasets(_blend_config(data, 3), [500, 50, 50]))
    assert first != _digest(build_datasets(_blend_config(data, 4), [500, 50, 50]))
    assert run_distributed(_digest_on_rank, 2, args=(data,), timeout_s=120) == [first, first]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("text_vocab_size", T + 1, rf"asr.json: text_vocab_size={T} but the model has text_vocab_size={T + 1}"),
        ("num_units", K * 2, rf"asr.json: num_units={K} but the model has num_units={2 * K}"),
        ("feature_dim", DIM * 2, rf"asr.json: feature_dim={DIM} but the model has audio_feature_dim={2 * DIM}"),
        ("feature_dim", 0, rf"asr.json: feature_dim={DIM} but the model has audio_feature_dim=0"),
    ],
)
def test_header_mismatch_refused(data, field, value, message):
    kw = {"text_vocab_size": T, "num_units": K, "feature_dim": DIM, field: value}
    config = AudioTextDatasetConfig(
        random_seed=1, sequence_length=SEQ, blend=([data["asr"][0]], None), split="1,0,0", **kw
    )
    with pytest.raises(ConfigError, match=message):
        build_datasets(config, [None, None, None])


def test_collate_order_and_model_contract(data):
    (train, _, _), samples = _single(data, "asr")
    items = [train[i] for i in (4, 0, 2)]
    batch = collate(items)
    assert batch["tokens"].shape == (3, SEQ) and batch["attention_mask"].shape == (3, 1, SEQ, SEQ)
    for key in ("labels", "loss_mask", "position_ids", "modality", "padding_mask"):
        assert batch[key].shape == (3, SEQ) and torch.equal(batch[key][1], items[1][key])
    want = [_reference_item(samples, train.samples(i).tolist()) for i in (4, 0, 2)]
    assert torch.equal(batch["audio_features"], torch.cat([w["audio_features"] for w in want]))
    assert torch.equal(batch["audio_lengths"], torch.cat([w["audio_lengths"] for w in want]))
    LAYOUT.validate(batch["tokens"], SEQ, batch["audio_lengths"])  # spans line up with <feat> runs
    units = collate([_single(data, "tts")[0][0][i] for i in range(2)])
    assert units["audio_features"] is None and units["audio_lengths"] is None


def test_data_loader_splits_micro_batches_over_dp(data):
    (train, _, _), _ = _single(data, "text", create_attention_mask=False)
    ranks = [list(MicroBatchSampler(len(train), 2, rank=r, size=2, consumed=4)) for r in range(2)]
    assert ranks[0][:2] == [[4, 5], [8, 9]] and ranks[1][:2] == [[6, 7], [10, 11]]
    batches = list(data_loader(train, 2, data_parallel_rank=1, data_parallel_size=2))
    assert len(batches) == len(train) // 4
    assert torch.equal(batches[1]["tokens"], torch.stack([train[6]["tokens"], train[7]["tokens"]]))


def _packed_vs_alone(prefix, dense_mask):
    """Logits of a packed item and of each of its samples run alone through model.config.tiny()."""
    from megatron_most.model.config import tiny
    from megatron_most.model.most import build_model
    from megatron_most.platform import ParallelLayout, initialize

    most = tiny()
    initialize(ParallelLayout(), num_experts=most.mamoe.num_experts)
    model = build_model(most, most.transformer_config()).eval()
    config = AudioTextDatasetConfig.for_model(
        most,
        sequence_length=SEQ,
        random_seed=7,
        blend=([prefix], None),
        split="1,0,0",
        create_attention_mask=dense_mask,
    )
    train = build_datasets(config, [None, None, None])[0]
    idx = next(i for i in range(len(train)) if len(train.samples(i)) >= 2 and train[i]["padding_mask"].any())
    batch = collate([train[idx]])
    tokens = batch["tokens"]
    with torch.no_grad():
        mask = batch["attention_mask"] if dense_mask else None  # None: MoSTModel derives it from position_ids
        packed = model(
            tokens,
            batch["position_ids"],
            mask,
            padding_mask=batch["padding_mask"],
            audio_features=batch["audio_features"],
            audio_lengths=batch["audio_lengths"],
        )
        alone, start, frame = [], 0, 0
        for length in train.dataset.lengths[train.samples(idx)].tolist():
            ids = tokens[:, start : start + length]
            frames = int((ids == LAYOUT.feature).sum())
            feats = batch["audio_features"][frame : frame + frames] if frames else None
            alone.append(model(ids, torch.arange(length)[None], None, audio_features=feats))
            start, frame = start + length, frame + frames
        # On the TE path packed rows become THD PackedSeqParams (model/packing.py), which reach the
        # core attention (the local SDPA one refuses them by name), and a dense mask is refused
        # (TE's causal kernel would ignore it and let the samples see each other).
        model.uses_te = True
        try:
            model(tokens, batch["position_ids"], mask, audio_features=batch["audio_features"])
            raise AssertionError("packed rows on the TE path ran without THD packing")
        except (NotImplementedError, ConfigError) as err:
            expected = "create_attention_mask=False" if dense_mask else "packed sequences"
            assert expected in str(err), err
    return packed[0, :start], torch.cat(alone, dim=1)[0]


@pytest.mark.parametrize("dense_mask", [True, False])
def test_packed_item_equals_samples_run_alone(data, dense_mask):
    """Through the real model: the mask (the dataset's, or derived by MoSTModel from the reset
    position ids), reset positions and feature order isolate packed samples."""
    packed, alone = run_distributed(_packed_vs_alone, 1, args=(data["asr"][0], dense_mask), timeout_s=120)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_model_mask_from_positions_equals_dataset_mask(data):
    from megatron_most.model.packing import segment_mask

    (train, _, _), _ = _single(data, "asr")
    batch = collate([train[i] for i in range(6)])
    assert torch.equal(segment_mask(batch["position_ids"]), batch["attention_mask"])
    assert segment_mask(torch.arange(SEQ)[None]) is None  # one sample per row: plain causal


def test_blend_of_incompatible_datasets_refused(data, tmp_path):
    """A mixture must share tokenizer and codebook; modes may differ (features ASR + units TTS)."""
    from megatron_most.data.indexed import DatasetFormatError, merge_datasets

    rng = np.random.default_rng(3)
    for name, field in (("tok", "tokenizer_sha256"), ("code", "codebook_sha256")):
        _write(tmp_path / name, [_tts(rng) for _ in range(20)], feature_dim=0)
        header = json.loads((tmp_path / f"{name}.json").read_text())
        (tmp_path / f"{name}.json").write_text(json.dumps({**header, field: "another"}))
        config = _config([data["asr"][0], data["tts"][0], str(tmp_path / name)], [0.4, 0.4, 0.2], split="100,0,0")
        with pytest.raises(DatasetFormatError, match=rf"cannot blend .*{name}.*: {field} is 'another'"):
            build_datasets(config, [100, 0, 0])
    mixed = _config([data["asr"][0], data["tts"][0]], [0.5, 0.5], split="100,0,0")  # features + units modes
    assert len(build_datasets(mixed, [100, 0, 0])[0]) == 100
    with pytest.raises(DatasetFormatError, match="cannot merge .*: mode is 'units'"):
        merge_datasets([data["asr"][0], data["tts"][0]], str(tmp_path / "merged"))
    spelled = os.path.join(os.path.dirname(data["tts"][0]), ".", "tts")  # the input under another spelling
    with pytest.raises(ConfigError, match="is also an input"):
        merge_datasets([data["tts"][0], data["text"][0]], spelled, overwrite=True)
    assert os.path.exists(data["tts"][0] + ".bin")
