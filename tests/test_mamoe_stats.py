"""MAMoE routing statistics against counts computed here from the routing rule in plain PyTorch
(and, on a hand-built router, by hand): per modality and expert, padding excluded, counted once
under selective activation recompute; `stats.collect` over a model; `stats.heatmap` PNG."""

import pytest
import torch

from tests.multiproc import run_distributed

GROUPS = ((0, 1, 2, 5), (3, 4, 6, 7))  # deliberately not contiguous
EXPERTS, TOPK, SEQ, BATCH, HIDDEN = 8, 2, 8, 3, 16
MASKINGS = ("zero_after_softmax", "renormalize_in_group")


def make_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    modality = torch.randint(0, 2, (BATCH, SEQ), generator=gen)
    modality[1] = 1  # one all-audio sequence
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[0, -3:] = True  # right padding, under audio and text ids alike
    padding[2, -1] = True
    modality[0, -3:] = torch.tensor([1, 0, 1])
    grad = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    return h, modality, padding, grad


def reference_counts(h, modality, padding, router_weight, masking, vanilla=False):
    """Token-by-token: which experts each non-padding token reaches, and with which weight."""
    tokens = torch.zeros(2, EXPERTS, dtype=torch.float64)
    weight = torch.zeros(2, EXPERTS, dtype=torch.float64)
    for s in range(SEQ):
        for b in range(BATCH):
            if padding[b, s]:
                continue
            m = int(modality[b, s])
            logits = h[s, b].float() @ router_weight.float().t()
            group = list(range(EXPERTS)) if vanilla else list(GROUPS[m])
            scores = torch.zeros(EXPERTS)
            if vanilla:
                scores = torch.softmax(logits, -1)
            elif masking == "zero_after_softmax":
                scores[group] = torch.softmax(logits, -1)[group]
            else:
                scores[group] = torch.softmax(logits[group], -1)
            values, experts = scores.topk(TOPK)
            for v, e in zip(values.tolist(), experts.tolist()):
                tokens[m, e] += 1
                weight[m, e] += v
    return tokens, weight


# ---------------------------------------------------------------------------- rank body


def build_layer(mamoe, layer_number=1, num_layers=3, **overrides):
    # num_layers=3 everywhere: Megatron sizes its global aux-loss log by the first layer it sees.
    from tests import mamoe_layers

    config = mamoe_layers.layer_config(mamoe, hidden=HIDDEN, moe_ffn=8, ffn=32, num_layers=num_layers, **overrides)
    layer = mamoe_layers.build_layer(config, mamoe, layer_number)
    layer.set_layer_number(layer_number)  # what TransformerLayer does; the router logs per layer
    return layer


def forward(layer, seed, backward=False):
    from megatron_most.moe import pack_routing_info

    h, modality, padding, grad = make_inputs(seed)
    h = h.clone().requires_grad_(backward)
    out, _ = layer(h, padding_mask=pack_routing_info(modality, padding))
    if backward:
        (out * grad).sum().backward()


def snapshot(layer):
    return {
        "router": layer.router.weight.detach().clone(),
        "tokens": layer.router.stats.tokens.clone(),
        "weight": layer.router.stats.weight.clone(),
    }


def hand_built_router_weight():
    """Router weight row e = unit vector e, so a token's logits are its first 8 hidden values."""
    w = torch.zeros(EXPERTS, HIDDEN)
    w[torch.arange(EXPERTS), torch.arange(EXPERTS)] = 1.0
    return w


HAND_TOKENS = [  # (modality, padded, logits over experts 0..7 = hidden[0:8])
    (0, False, {0: 5.0, 2: 4.0}),  # text -> 0, 2
    (1, False, {3: 5.0, 7: 4.0}),  # audio -> 3, 7
    (0, False, {3: 9.0, 4: 8.0, 5: 2.0, 1: 1.0}),  # text preferring audio experts -> 5, 1
    (1, False, {0: 9.0, 6: 3.0, 4: 2.0}),  # audio preferring a text expert -> 6, 4
    (1, True, {3: 5.0, 4: 4.0}),  # padding: not counted
    (0, True, {0: 5.0, 1: 4.0}),  # padding: not counted
]
HAND_EXPECTED = {(0, 0): 1, (0, 2): 1, (0, 5): 1, (0, 1): 1, (1, 3): 1, (1, 7): 1, (1, 6): 1, (1, 4): 1}


def _stats_body():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_most.moe import MAMoEConfig, pack_routing_info
    from megatron_most.moe.stats import collect
    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout(), num_experts=EXPERTS)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    results = {}

    def config(**kw):
        return MAMoEConfig(
            num_experts=EXPERTS,
            text_experts=GROUPS[0],
            audio_experts=GROUPS[1],
            topk=TOPK,
            shared_expert_size=16,
            balance_coeff=0.01,
            **kw,
        )

    # Forward only, two batches accumulated, for each masking rule and the vanilla variant.
    for name, kw in [(m, dict(masking=m)) for m in MASKINGS] + [("vanilla", dict(variant="vanilla"))]:
        torch.manual_seed(0)
        layer = build_layer(config(**kw))
        forward(layer, seed=0)
        forward(layer, seed=1)
        results[name] = snapshot(layer)

    # Hand-built router: known experts per token.
    layer = build_layer(config())
    layer.router.weight.data.copy_(hand_built_router_weight())
    h = torch.full((len(HAND_TOKENS), 1, HIDDEN), -1.0)  # logits -1 wherever not set
    modality = torch.zeros(1, len(HAND_TOKENS), dtype=torch.long)
    padding = torch.zeros(1, len(HAND_TOKENS), dtype=torch.bool)
    for t, (m, pad, logits) in enumerate(HAND_TOKENS):
        modality[0, t], padding[0, t] = m, pad
        for e, value in logits.items():
            h[t, 0, e] = value
    layer(h, padding_mask=pack_routing_info(modality, padding))
    results["hand"] = snapshot(layer)

    # Selective recompute of the MoE layer: forward + backward routes twice, counts once.
    torch.manual_seed(0)
    layer = build_layer(config(), recompute_granularity="selective", recompute_modules=["moe"])
    calls = []
    routing = layer.router.routing
    layer.router.routing = lambda *a, **k: (calls.append(torch.is_grad_enabled()), routing(*a, **k))[1]
    forward(layer, seed=0, backward=True)
    results["recompute"] = {**snapshot(layer), "recompute": layer.moe_layer_recompute, "router_calls": len(calls)}
    # Without recompute, for comparison: forward + backward routes once.
    torch.manual_seed(0)
    layer = build_layer(config())
    forward(layer, seed=0, backward=True)
    results["no_recompute"] = snapshot(layer)

    # collect(): a 3-layer model whose layers 1 and 3 are MAMoE, layer 2 dense.
    torch.manual_seed(0)
    model = torch.nn.ModuleList(
        [
            build_layer(config(), layer_number=1, num_layers=3),
            torch.nn.Linear(HIDDEN, HIDDEN),
            build_layer(config(), layer_number=3, num_layers=3),
        ]
    )
    forward(model[0], seed=0)
    forward(model[2], seed=2)
    forward(model[2], seed=3)
    results["model"] = {"layer1": snapshot(model[0]), "layer3": snapshot(model[2])}
    results["collect"] = collect(model)  # resets by default
    results["after_reset"] = collect(model, reset=False)
    return results


@pytest.fixture(scope="module")
def stats():
    return run_distributed(_stats_body, 1, timeout_s=300)[0]


# ---------------------------------------------------------------------------- tests


def _expected(router_weight, seeds, masking, vanilla=False):
    tokens = torch.zeros(2, EXPERTS, dtype=torch.float64)
    weight = torch.zeros(2, EXPERTS, dtype=torch.float64)
    for seed in seeds:
        h, modality, padding, _ = make_inputs(seed)
        t, w = reference_counts(h, modality, padding, router_weight, masking, vanilla)
        tokens, weight = tokens + t, weight + w
    return tokens, weight


def _valid_tokens(seeds):
    counts = torch.zeros(2, dtype=torch.float64)
    for seed in seeds:
        _, modality, padding, _ = make_inputs(seed)
        for m in (0, 1):
            counts[m] += ((modality == m) & ~padding).sum()
    return counts


@pytest.mark.parametrize("case", [*MASKINGS, "vanilla"])
def test_counts_match_plain_pytorch_routing(stats, case):
    got = stats[case]
    masking = case if case != "vanilla" else "zero_after_softmax"
    tokens, weight = _expected(got["router"], seeds=(0, 1), masking=masking, vanilla=case == "vanilla")
    torch.testing.assert_close(got["tokens"], tokens, rtol=0, atol=0)
    torch.testing.assert_close(got["weight"], weight, rtol=1e-5, atol=1e-6)
    # every non-padding token counted topk times, under its own modality; padding never
    torch.testing.assert_close(got["tokens"].sum(-1), TOPK * _valid_tokens((0, 1)), rtol=0, atol=0)
    if case != "vanilla":  # no token of one modality reaches the other group's experts
        assert got["tokens"][0, list(GROUPS[1])].sum() == 0 and got["tokens"][1, list(GROUPS[0])].sum() == 0


def test_counts_on_a_hand_built_router(stats):
    expected = torch.zeros(2, EXPERTS, dtype=torch.float64)
    for (m, e), n in HAND_EXPECTED.items():
        expected[m, e] = n
    torch.testing.assert_close(stats["hand"]["tokens"], expected, rtol=0, atol=0)
    # Weight of the first text token's top expert under zero_after_softmax: softmax over all 8 logits.
    logits = torch.full((EXPERTS,), -1.0)
    logits[0], logits[2] = 5.0, 4.0
    top = torch.exp(logits[0]) / torch.exp(logits).sum()
    assert abs(stats["hand"]["weight"][0, 0].item() - top.item()) < 1e-6


def test_selective_recompute_counts_tokens_once(stats):
    got = stats["recompute"]
    assert got["recompute"], "the layer did not enable MoE recompute"
    assert got["router_calls"] == 2, "recompute should route again inside backward"
    tokens, weight = _expected(got["router"], seeds=(0,), masking="zero_after_softmax")
    torch.testing.assert_close(got["tokens"], tokens, rtol=0, atol=0)
    torch.testing.assert_close(got["weight"], weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["no_recompute"]["tokens"], tokens, rtol=0, atol=0)


def test_collect_gathers_moe_layers(stats):
    got = stats["collect"]
    assert got["layers"] == [1, 3]
    assert tuple(got["tokens"].shape) == (2, 2, EXPERTS)
    assert tuple(got["mean_weight"].shape) == (2, 2, EXPERTS)
    model = stats["model"]
    for i, (name, seeds) in enumerate([("layer1", (0,)), ("layer3", (2, 3))]):
        tokens, weight = _expected(model[name]["router"], seeds=seeds, masking="zero_after_softmax")
        torch.testing.assert_close(got["tokens"][i], tokens, rtol=0, atol=0)
        mean = torch.where(tokens > 0, weight / tokens.clamp(min=1), torch.zeros_like(weight))
        torch.testing.assert_close(got["mean_weight"][i], mean, rtol=1e-5, atol=1e-6)
    assert float(stats["after_reset"]["tokens"].abs().sum()) == 0  # collect(reset=True) zeroed the counters
    assert stats["after_reset"]["layers"] == [1, 3]


def test_heatmap_writes_png(stats, tmp_path):
    from megatron_most.moe.stats import heatmap

    path = heatmap(stats["collect"], tmp_path / "routing.png", title="test routing")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000, f"suspiciously small PNG: {len(data)} bytes"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not a blank canvas
