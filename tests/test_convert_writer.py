"""The streaming torch_dist writer (megatron_most.convert.writer) against dist_checkpointing.save.

A single-rank model's weights are written twice: by Megatron's `dist_checkpointing.save` and by
`write_torch_dist` from a meta-device template with one loader per entry. Both must hold the
same DCP tensor metadata and load to bit-identical weights at TP1 and, resharded, at TP2+SP
and EP2 (mamoe) and TP2xEP2 (MoST). A synthetic template with large tensors checks the memory bound: the loaders'
tensors are tracked until their storage is freed, and no two are ever alive at once.
"""

from __future__ import annotations

import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_most.model.checkpoint import load_values
from megatron_most.platform.layout import ParallelLayout
from megatron_most.training import selfcheck
from tests.multiproc import run_distributed

KINDS = ("mamoe", "most")  # GPT + SwiGLU experts; the tiny MoST preset (MLA, audio inputs)


def _loader_keys(template) -> list[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.strategies.torch import flatten_state_dict

    flat, _ = flatten_state_dict(template)
    return [k for k, v in flat.items() if isinstance(v, (ShardedTensor, ShardedTensorFactory))]


def _tensor_metadata(path: Path) -> dict:
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f).state_dict_metadata


def _write_both(root: str) -> dict:
    """Rank body (1 rank): Megatron's save and the streaming writer of the same TP1 model."""
    from megatron.core import dist_checkpointing

    from megatron_most.convert import write_torch_dist

    layout = ParallelLayout()
    out = {}
    for kind in KINDS:
        selfcheck.initialize(layout, num_experts=selfcheck.num_experts(kind))
        model = selfcheck.build_model(layout, kind)
        ref, ours = Path(root) / kind / "megatron", Path(root) / kind / "streamed"
        ref.mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(ref))

        with torch.device("meta"):  # the template holds no data
            template = selfcheck.build_model(layout, kind).sharded_state_dict()
        state = model.state_dict(keep_vars=True)
        loaders = {k: (lambda k=k, state=state: state[k].detach().clone()) for k in _loader_keys(template)}
        stats = write_torch_dist(template, loaders, ours)

        from_ref, from_ours = load_values(model, ref), load_values(model, ours)
        out[kind] = dict(
            stats=stats,
            same_metadata=_tensor_metadata(ref) == _tensor_metadata(ours),
            same_files={f: (ref / f).read_bytes() == (ours / f).read_bytes() for f in ("metadata.json", "common.pt")},
            mismatched=[
                n
                for n, p in model.named_parameters()
                if not (torch.equal(from_ref[n], p) and torch.equal(from_ours[n], p))
            ],
            params=len(from_ours),
        )
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("convert_writer")
    return root, run_distributed(_write_both, 1, args=(str(root),), timeout_s=300)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_checkpoint_matches_megatron_save_at_tp1(written, kind):
    _, results = written
    r = results[kind]
    assert r["same_metadata"]  # same keys, global shapes, dtypes and chunk lists
    assert all(r["same_files"].values()), r["same_files"]
    assert r["params"] > 20 and r["mismatched"] == []
    stats = r["stats"]
    assert stats.loads == stats.entries  # each entry loaded once (factory chunks back to back)
    assert stats.chunks > stats.entries  # SwiGLU fc1 entries are two chunks each


def _load_both(root: str) -> dict:
    """Rank body (2 ranks): both checkpoints loaded at other layouts must agree bit for bit."""
    compared = {}
    for kind, name, layout in (
        ("mamoe", "TP2+SP", ParallelLayout(tp=2, sp=True)),  # experts at ETP2 too
        ("mamoe", "EP2", ParallelLayout(ep=2)),
        ("most", "TP2xEP2", ParallelLayout(tp=2, ep=2, etp=1, sp=True)),
    ):
        selfcheck.initialize(layout, num_experts=selfcheck.num_experts(kind))
        model = selfcheck.build_model(layout, kind)
        ref = load_values(model, Path(root) / kind / "megatron")
        ours = load_values(model, Path(root) / kind / "streamed")
        bad = [n for n in ref if not torch.equal(ref[n], ours[n])]
        assert not bad, f"{kind} at {name}: {bad}"
        compared[f"{kind} {name}"] = len(ref)
    return compared


def test_streamed_checkpoint_reshards_like_megatron_save(written):
    root, _ = written
    for compared in run_distributed(_load_both, 2, args=(str(root),), timeout_s=300):
        assert len(compared) == 3 and min(compared.values()) > 20, compared


class _LiveBytes:
    """Bytes of loader-made tensors whose storage is still alive (numpy-backed, so the
    finalizer runs when the last view of the storage is gone), and the peak of that sum."""

    def __init__(self):
        self.live = self.peak = 0

    def make(self, shape, value: float) -> torch.Tensor:
        array = np.full(shape, value, dtype=np.float32)
        self.live += array.nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(array, self._free, array.nbytes)
        return torch.from_numpy(array)

    def _free(self, nbytes):
        self.live -= nbytes


def _synthetic_template(hidden: int, experts: int, layers: int):
    """Entries of every kind the writer handles, on the meta device: plain tensors, a SwiGLU
    factory (two chunks), experts stacked on a prepended axis, an object and a common value."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    template = {
        "embedding.weight": ShardedTensor.from_rank_offsets("embedding.weight", meta(4 * hidden, hidden)),
        "fc1.weight": apply_swiglu_sharded_factory(
            ShardedTensor.from_rank_offsets("fc1.weight", meta(2 * hidden, hidden)), ()
        ),
        "extra": ShardedObject("extra", {"note": 1}, (1,), (0,)),
        "iteration": 7,
    }
    for i in range(layers):
        template[f"layers.{i}.weight"] = ShardedTensor.from_rank_offsets(f"layers.{i}.weight", meta(hidden, hidden))
    for e in range(experts):
        template[f"experts.{e}.fc2.weight"] = ShardedTensor.from_rank_offsets(
            "experts.fc2.weight", meta(hidden // 2, hidden), (0, e, experts), prepend_axis_num=1
        )
    return template


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _write_tracked(out: str, hidden: int, experts: int, layers: int) -> dict:
    """Rank body (1 rank): stream the synthetic template, tracking loader memory and RSS."""
    from megatron.core import dist_checkpointing

    from megatron_most.convert import write_torch_dist

    selfcheck.initialize(ParallelLayout())
    template = _synthetic_template(hidden, experts, layers)
    tracker = _LiveBytes()
    shapes = {
        "embedding.weight": (4 * hidden, hidden),
        "fc1.weight": (2 * hidden, hidden),
        **{f"experts.{e}.fc2.weight": (hidden // 2, hidden) for e in range(experts)},
        **{f"layers.{i}.weight": (hidden, hidden) for i in range(layers)},
    }
    values = {key: float(i + 1) for i, key in enumerate(shapes)}
    loaders = {key: (lambda key=key: tracker.make(shapes[key], values[key])) for key in shapes}
    half = (hidden, hidden)  # the factory entry given as its chunks: SwiGLU [w, v] halves
    loaders["fc1.weight"] = lambda: [tracker.make(half, values["fc1.weight"]) for _ in range(2)]

    errors = {}
    for name, bad in (
        ("missing", {k: v for k, v in loaders.items() if k != "fc1.weight"}),
        ("unknown", {**loaders, "typo.weight": loaders["fc1.weight"]}),
        ("shape", {**loaders, "fc1.weight": lambda: torch.zeros(3)}),
        ("chunk shape", {**loaders, "fc1.weight": lambda: [torch.zeros(half)] * 3}),
    ):
        try:
            write_torch_dist(template, bad, Path(out) / name)
        except (KeyError, ValueError) as e:
            errors[name] = type(e).__name__

    try:  # the kernel's peak-RSS counter is reset by writing 5 to clear_refs (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        baseline_kib = _rss_kib("VmRSS")
    except OSError:
        baseline_kib = None
    stats = write_torch_dist(template, loaders, Path(out) / "ok")
    rss_growth = (_rss_kib("VmHWM") - baseline_kib) * 1024 if baseline_kib is not None else None

    # Read back: every entry holds its loader's value, the object and the common value survive.
    target = _synthetic_template(hidden, experts, layers)
    for _key, value in list(target.items()):
        if hasattr(value, "data") and isinstance(value.data, torch.Tensor):
            value.data = torch.empty(value.data.shape)
    target["extra"].data = None
    loaded = dist_checkpointing.load(target, str(Path(out) / "ok"))
    wrong = [k for k in shapes if not torch.equal(loaded[k], torch.full(shapes[k], values[k]))]
    return dict(
        peak=tracker.peak,
        live_after=tracker.live,
        largest=max(np.prod(s) * 4 for s in shapes.values()),
        stats=stats,
        rss_growth=rss_growth,
        errors=errors,
        wrong=wrong,
        extra=loaded["extra"],
        iteration=loaded["iteration"],
    )


def test_writer_holds_one_loaded_tensor_at_a_time(tmp_path):
    hidden, experts, layers = 1024, 8, 16  # entries of 16, 8, 8 x 2 and 16 x 4 MiB: 104 MiB
    r = run_distributed(_write_tracked, 1, args=(str(tmp_path), hidden, experts, layers), timeout_s=300)[0]
    assert r["errors"] == {
        "missing": "KeyError",
        "unknown": "KeyError",
        "shape": "ValueError",
        "chunk shape": "ValueError",
    }
    assert r["wrong"] == [] and r["extra"] == {"note": 1} and r["iteration"] == 7
    assert r["stats"].bytes == (16 + 8 + 2 * experts + 4 * layers) * 2**20
    assert r["stats"].loads == r["stats"].entries == 2 + experts + layers
    assert r["peak"] == r["largest"] == 16 * 2**20  # never two loaded tensors alive at once
    assert r["live_after"] == 0
    if r["rss_growth"] is not None:  # one loaded tensor and allocator slack, far below 104 MiB
        assert r["rss_growth"] < 2 * r["largest"] + 16 * 2**20, r["rss_growth"]
