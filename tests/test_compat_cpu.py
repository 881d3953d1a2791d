"""Each CUDA assumption of Megatron-Core 0.16.1 that compat_cpu handles, checked against a
plain-PyTorch reference or a known answer, in spawned processes (the compat layer changes
process-wide state, so the pytest process itself stays untouched)."""

import math

import pytest
import torch

from megatron_most.model.norm import Norm
from tests.multiproc import run_distributed


def _init(tp=1, ep=1, sp=False, seed=1234):
    from megatron_most.platform import ParallelLayout, initialize

    initialize(ParallelLayout(tp=tp, ep=ep, sp=sp), num_experts=ep if ep > 1 else None, seed=seed)


def _device_arguments_mean_cpu():
    from megatron_most.platform import prepare_process

    prepare_process()
    assert not torch.cuda.is_available()  # code that picks CPU paths still does
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x
    for moved in (x.to("cuda"), x.to(torch.device("cuda", 0)), x.to(device=torch.cuda.current_device())):
        assert moved.device.type == "cpu" and torch.equal(moved, x)
    assert torch.tensor([1, 2], device="cuda", pin_memory=True).tolist() == [1, 2]
    assert x.type() == "torch.cuda.FloatTensor" and x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64  # conversions are untouched
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    stream = torch.cuda.Stream(device=torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = x * 2
    assert y.tolist() == [2.0, 2.0, 2.0]

    class AllocatesInBackward(torch.autograd.Function):  # like the all-to-all / gather mappings
        @staticmethod
        def forward(ctx, inp):
            return inp * 3

        @staticmethod
        def backward(ctx, grad):
            out = torch.empty(grad.shape, device=torch.cuda.current_device())
            out.copy_(grad * 3)
            return out

    class LiteralInBackward(torch.autograd.Function):  # like recomputed layers (causal mask)
        @staticmethod
        def forward(ctx, inp):
            return inp * 1

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.ones(1, device="cuda")

    z = torch.ones(2, requires_grad=True)
    LiteralInBackward.apply(AllocatesInBackward.apply(z)).sum().backward()
    return z.grad.tolist()


def test_cuda_device_arguments_mean_cpu():
    assert run_distributed(_device_arguments_mean_cpu, 1) == [[3.0, 3.0]]


def _suspended_lifts_only_the_device_mapping():
    from megatron_most.platform import compat_cpu

    _init()
    outside = torch.zeros(1, device="cuda").device.type
    with compat_cpu.suspended():
        try:
            torch.zeros(1, device="cuda")
            inside = "mapped"
        except (RuntimeError, AssertionError) as err:  # this CPU build has no CUDA
            inside = type(err).__name__
        plain = (torch.ones(2) * 2).tolist()
    after = torch.zeros(1, device="cuda").device.type
    return outside, inside, plain, after


def test_suspended_lifts_the_device_mapping_for_a_block():
    outside, inside, plain, after = run_distributed(_suspended_lifts_only_the_device_mapping, 1)[0]
    assert (outside, plain, after) == ("cpu", [2.0, 2.0], "cpu")
    assert inside != "mapped"  # inside the block a CUDA device fails loudly, as the docstring says


def _rng_tracker_forks_cpu_generator():
    from megatron.core import tensor_parallel

    _init(seed=123)
    torch.manual_seed(7)
    expected_outside = torch.rand(4, generator=torch.Generator().manual_seed(7))
    first = torch.rand(2)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    second = torch.rand(2)
    tp_seed = 123 + 2718  # megatron: tensor-parallel seed = seed + 2718 + tp_rank
    expected_inside = torch.rand(4, generator=torch.Generator().manual_seed(tp_seed))
    return inside.tolist(), expected_inside.tolist(), torch.cat([first, second]).tolist(), expected_outside.tolist()


def test_rng_tracker_forks_the_cpu_generator():
    inside, expected_inside, outside, expected_outside = run_distributed(_rng_tracker_forks_cpu_generator, 1)[0]
    assert inside == expected_inside  # dropout in TP regions draws from the tracker's seed
    assert outside == expected_outside  # and the default stream continues as if no fork happened


def _sequence_parallel_mappings_and_buffer():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    _init(tp=2, sp=True)
    rank = torch.distributed.get_rank()
    buf = parallel_state.get_global_memory_buffer().get_tensor((4, 2), torch.float32, "test")
    local = (torch.arange(6.0).view(3, 2) + 10 * rank).requires_grad_()  # [seq/tp, hidden]
    full = mappings.gather_from_sequence_parallel_region(local, tensor_parallel_output_grad=True)
    (full * torch.arange(12.0).view(6, 2)).sum().backward()
    scattered = mappings.reduce_scatter_to_sequence_parallel_region(torch.ones(6, 2) * (rank + 1))
    return buf.device.type, full.tolist(), local.grad.tolist(), scattered.tolist()


def test_sequence_parallel_mappings_on_gloo():
    results = run_distributed(_sequence_parallel_mappings_and_buffer, 2)
    weights = torch.arange(12.0).view(6, 2)
    expected_full = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(6.0).view(3, 2) + 10]).tolist()
    for rank, (device, full, grad, scattered) in enumerate(results):
        assert device == "cpu"
        assert full == expected_full
        # backward of the gather is a reduce-scatter: both ranks' upstream grads summed, own slice
        assert grad == (2 * weights[3 * rank : 3 * rank + 3]).tolist()
        assert scattered == (torch.ones(3, 2) * 3).tolist()


def _all_to_all_with_host_split_sizes():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import all_to_all

    _init(ep=2)
    from megatron.core.transformer.moe.moe_utils import maybe_move_tensor_to_cpu  # the patched one

    rank = torch.distributed.get_rank()
    group = parallel_state.get_expert_model_parallel_group()
    # rank 0 sends 1 row to rank 0 and 2 to rank 1; rank 1 sends 3 rows to rank 0 and 1 to rank 1
    send = [[1, 2], [3, 1]][rank]
    recv = [[1, 3], [2, 1]][rank]
    input_splits = maybe_move_tensor_to_cpu(torch.tensor(send), as_numpy=True)  # as the dispatcher does
    output_splits = maybe_move_tensor_to_cpu(torch.tensor(recv), as_numpy=True)
    rows = (torch.arange(float(sum(send))) + 100 * rank).unsqueeze(1).requires_grad_()
    out = all_to_all(group, rows, output_splits, input_splits)
    (out * (torch.arange(float(sum(recv))).unsqueeze(1) + 1)).sum().backward()
    return out.squeeze(1).tolist(), rows.grad.squeeze(1).tolist()


def test_all_to_all_with_split_sizes_on_gloo():
    (out0, grad0), (out1, grad1) = run_distributed(_all_to_all_with_host_split_sizes, 2)
    assert out0 == [0.0, 100.0, 101.0, 102.0] and out1 == [1.0, 2.0, 103.0]
    # each sent row gets back the weight (position + 1) it had on the receiving rank
    assert grad0 == [1.0, 1.0, 2.0] and grad1 == [2.0, 3.0, 4.0, 3.0]


def _rotary_embeddings():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    _init()
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0)(8)
    yarn = YarnRotaryEmbedding(kv_channels=16, scaling_factor=1.0, original_max_position_embeddings=8)(8)
    yarn = yarn[0] if isinstance(yarn, tuple) else yarn
    return rope.device.type, yarn.device.type, rope.squeeze().tolist(), yarn.squeeze().tolist()


def test_rotary_and_yarn_embeddings_on_cpu():
    rope_dev, yarn_dev, rope, yarn = run_distributed(_rotary_embeddings, 1)[0]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    freqs = torch.outer(torch.arange(8, dtype=torch.float32), inv_freq)
    expected = torch.cat([freqs, freqs], dim=-1)  # [seq, dim]
    assert rope_dev == yarn_dev == "cpu"
    torch.testing.assert_close(torch.tensor(rope), expected)
    torch.testing.assert_close(torch.tensor(yarn), expected)  # YaRN with factor 1 is plain RoPE


def _router_gating_without_te():
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    _init()
    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_router_dtype="fp32",
        use_cpu_initialization=True,
        add_bias_linear=False,
        activation_func=F.silu,
    )
    router = TopKRouter(config, pg_collection=get_default_pg_collection())
    x = torch.randn(5, 8)
    return router.gating(x).detach(), (x @ router.weight.t()).detach(), router.weight.device.type


def test_router_gating_without_transformer_engine():
    logits, expected, device = run_distributed(_router_gating_without_te, 1)[0]
    assert device == "cpu"
    torch.testing.assert_close(logits, expected)


def _grad_norm_and_clipping():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    _init()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    reference = [p.grad.clone() for p in params]
    norm = get_grad_norm_fp32([p.grad for p in params])
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    return norm, [p.grad for p in params], reference


def test_grad_norm_and_clipping_match_torch():
    norm, clipped, reference = run_distributed(_grad_norm_and_clipping, 1)[0]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in reference]
    for p, g in zip(params, reference):
        p.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
    assert math.isclose(norm, expected_norm.item(), rel_tol=1e-6)
    for got, p in zip(clipped, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_norm_matches_torch(kind, zero_centered):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        normalization=kind,
        sequence_parallel=True,
        tensor_model_parallel_size=2,
        layernorm_zero_centered_gamma=zero_centered,
        activation_func=F.silu,
    )
    norm = Norm(config, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-1, 1, 8))
    reference = (torch.nn.RMSNorm if kind == "RMSNorm" else torch.nn.LayerNorm)(8, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(norm.weight + (1 if zero_centered else 0))
    x = torch.randn(4, 2, 8)
    torch.testing.assert_close(norm(x), reference(x))
    assert all(p.sequence_parallel for p in norm.parameters())  # grads all-reduced over TP
