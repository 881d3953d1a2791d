"""The Megatron MAMoE layer against a plain-PyTorch reference (tests/mamoe_reference.py):
outputs and input/weight gradients, with the balance loss, for every masking rule, balance
loss and variant; padding contributes nothing; recompute re-routes identically."""

import itertools

import pytest
import torch

from tests import mamoe_reference as ref
from tests.multiproc import run_distributed

GROUPS = ((0, 1, 2, 5), (3, 4, 6, 7))  # deliberately not contiguous
SEQ, BATCH, HIDDEN = 6, 3, 16
CASES = [
    dict(masking=m, balance_loss=b, variant=v)
    for m, b, v in itertools.product(
        ("zero_after_softmax", "renormalize_in_group"), ("global", "per_group"), ("mamoe", "vanilla", "no_shared")
    )
]


def build_layer(mamoe, **config_overrides):
    from tests import mamoe_layers

    config = mamoe_layers.layer_config(mamoe, hidden=HIDDEN, moe_ffn=8, ffn=32, **config_overrides)
    return mamoe_layers.build_layer(config, mamoe)


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    modality = torch.randint(0, 2, (BATCH, SEQ), generator=gen)
    modality[1] = 1  # one all-audio sequence
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[0, -2:] = True
    grad = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    return h, modality, padding, grad


def layer_weights(layer):
    experts = [None] * len(layer.experts.logical_ids) * 1
    for local, logical in enumerate(layer.experts.logical_ids):
        e = layer.experts.local_experts[local]
        experts[logical] = (e.linear_fc1.weight, e.linear_fc2.weight)
    weights = {"router": layer.router.weight, "experts": experts}
    if layer.use_shared_expert:
        weights["shared"] = (layer.shared_experts.linear_fc1.weight, layer.shared_experts.linear_fc2.weight)
    return weights


def run_layer(layer, h, modality, padding, grad):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_most.moe import pack_routing_info

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    h = h.clone().requires_grad_()
    out, _ = layer(h, padding_mask=pack_routing_info(modality, padding))
    (out * grad).sum().backward()
    grads = {"input": h.grad}
    for name, p in layer.named_parameters():
        grads[name] = p.grad.clone()
        p.grad = None
    return out.detach(), grads


def _megatron_cases(cases):
    from megatron_most.moe import MAMoEConfig
    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout(), num_experts=8)
    results = []
    for case in cases:
        torch.manual_seed(0)
        mamoe = MAMoEConfig(
            num_experts=8,
            text_experts=GROUPS[0],
            audio_experts=GROUPS[1],
            topk=2,
            shared_expert_size=16,
            balance_coeff=0.01,
            **case,
        )
        layer = build_layer(mamoe)
        out, grads = run_layer(layer, *make_inputs())
        weights = {k: v for k, v in layer_weights(layer).items()}
        detached = {
            "router": weights["router"].detach().clone(),
            "experts": [(a.detach().clone(), b.detach().clone()) for a, b in weights["experts"]],
        }
        if "shared" in weights:
            detached["shared"] = tuple(w.detach().clone() for w in weights["shared"])
        named = {id(p): n for n, p in layer.named_parameters()}
        names = {
            "router": named[id(weights["router"])],
            "experts": [(named[id(a)], named[id(b)]) for a, b in weights["experts"]],
            "shared": tuple(named[id(w)] for w in weights.get("shared", ())),
        }
        results.append((out, grads, detached, names))
    return results


@pytest.fixture(scope="module")
def megatron_results():
    return run_distributed(_megatron_cases, 1, args=(CASES,))[0]


@pytest.mark.parametrize(
    "index", range(len(CASES)), ids=[f"{c['masking']}-{c['balance_loss']}-{c['variant']}" for c in CASES]
)
def test_layer_matches_plain_pytorch_reference(index, megatron_results):
    case = CASES[index]
    out, grads, weights, names = megatron_results[index]
    h, modality, padding, grad = make_inputs()
    h = h.clone().requires_grad_()
    params = {
        "router": weights["router"].clone().requires_grad_(),
        "experts": [(a.clone().requires_grad_(), b.clone().requires_grad_()) for a, b in weights["experts"]],
    }
    if "shared" in weights:
        params["shared"] = tuple(w.clone().requires_grad_() for w in weights["shared"])
    expected, aux, idx = ref.mamoe_forward(
        h,
        params,
        modality,
        padding,
        GROUPS,
        topk=2,
        masking=case["masking"],
        vanilla=case["variant"] == "vanilla",
        shared=case["variant"] != "no_shared",
        coeff=0.01,
        per_group=case["balance_loss"] == "per_group",
    )
    ((expected * grad).sum() + aux).backward()

    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["input"], h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[names["router"]], params["router"].grad, atol=1e-5, rtol=1e-5)
    for (n1, n2), (p1, p2) in zip(names["experts"], params["experts"]):
        torch.testing.assert_close(grads[n1], p1.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[n2], p2.grad, atol=1e-5, rtol=1e-5)
    for n, p in zip(names["shared"], params.get("shared", ())):
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5)
    if case["variant"] != "vanilla":  # no token reaches an expert of the other group
        mod = modality.t().reshape(-1)
        for t in range(len(mod)):
            assert set(idx[t].tolist()) <= set(GROUPS[int(mod[t])])
    pad_rows = padding.t().reshape(-1).nonzero().view(-1)
    shared_only = 0 if case["variant"] == "no_shared" else None
    if shared_only == 0:  # padding contributes nothing: no routed output at all
        assert out.view(-1, HIDDEN)[pad_rows].abs().max() == 0


def _recompute_modes():
    from megatron_most.moe import stats
    from megatron_most.platform import ParallelLayout, initialize
    from megatron_most.training import selfcheck

    initialize(ParallelLayout(), num_experts=selfcheck.NUM_EXPERTS)
    weights = None
    results = {}
    for mode in (None, "selective", "full"):
        model = selfcheck.build_model(ParallelLayout(), "mamoe", recompute=mode)
        if weights is None:
            weights = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        model.load_state_dict(weights, strict=False)
        ddp, loss = selfcheck._backward_once(model, "mamoe")
        grads = {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}
        results[str(mode)] = (loss, grads, stats.collect(model)["tokens"])
    return results


def test_recompute_reroutes_with_the_same_modality_ids():
    results = run_distributed(_recompute_modes, 1)[0]
    loss, grads, tokens = results["None"]
    assert tokens.sum() > 0
    for mode in ("selective", "full"):
        other_loss, other_grads, other_tokens = results[mode]
        assert other_loss == loss
        for name, grad in grads.items():
            assert torch.equal(other_grads[name], grad), (mode, name)
        assert torch.equal(other_tokens, tokens), mode  # a recomputed forward is not counted twice
