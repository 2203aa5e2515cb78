"""Dispatch kernels (csrc/) against their pure-PyTorch references.

Bitwise where the math allows: permutes move bytes, FP8 bytes and scales follow one rounding rule, the
unpermute sums in one fixed order (ascending rows, fp32) in both; only the probs gradient (a dot
product) is compared within fp32 tolerance. Hypothesis draws shapes including T = 0, experts with no
tokens, K = 1..8, H not a multiple of 128 and capacity-dropped assignments.

Legend: T tokens, H hidden, K choices per token, E experts, R rows, G = ceil(H / 128).
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_train.kernels import (
    HAS_EXTENSION,
    build_row_map,
    dequantize,
    dequantize_reference,
    dispatch_rows,
    permute,
    permute_rows,
    permute_rows_reference,
    quantize_fp8_reference,
    silu_mul,
    silu_mul_reference,
    unpermute,
)
from moe_train.kernels import reference as ref
from moe_train.kernels.fp8 import FP8_DTYPE

needs_ext = pytest.mark.skipif(
    not HAS_EXTENSION and os.environ.get("MOE_TRAIN_REQUIRE_EXT") != "1",
    reason="C++ extension not built",
)
DTYPES = [torch.float32, torch.bfloat16]


def _C():  # type: ignore[no-untyped-def]
    assert HAS_EXTENSION, "MOE_TRAIN_REQUIRE_EXT=1 but moe_train._C is not importable"
    from moe_train import _C

    return _C


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bitwise comparison (NaN payloads included)."""
    return x.contiguous().view(torch.uint8)


def _routing(T: int, K: int, E: int, seed: int, drop: float = 0.0) -> torch.Tensor:
    """topk_idx_TK: K distinct experts per token, a `drop` fraction replaced by -1."""
    gen = torch.Generator().manual_seed(seed)
    idx_TK = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    if drop > 0:
        idx_TK = idx_TK.masked_fill(torch.rand(T, K, generator=gen) < drop, -1)
    return idx_TK


def _special_rows(H: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows that hit every FP8 rule: zeros (+-0), fp32/bf16 denormals, huge and tiny blocks, NaN, +-Inf."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, H, generator=gen)
    x[0] = 0.0
    x[1] = -0.0
    x[2] = torch.randn(H, generator=gen) * 1e-39  # fp32 denormals (bf16 keeps some of them too)
    x[3] = torch.randn(H, generator=gen) * 1e30
    x[4, 0] = float("nan")
    x[5, -1] = float("inf")
    x[6, H // 2] = -float("inf")
    x[7] = torch.randn(H, generator=gen) * 1e-44  # amax / 448 underflows: scale 1, signed zeros
    x[8, : min(H, 128)] = 0.0  # a zero first block next to normal ones
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# E4M3 conversion and the quantisation rules


@needs_ext
def test_e4m3_conversion_equals_torch_cast() -> None:
    """The shared header's conversion == torch's cast (RNE, saturating; NaN -> 0x7F) on 2^21 fp32 patterns
    that include every rounding boundary's neighbourhood, fp32 denormals and both signs."""
    high = torch.arange(0, 1 << 20, dtype=torch.int64) << 12
    for low in (0, 0x7FF, 0x800, 0x801):  # below, at, above half of the 20 dropped mantissa bits
        bits = high | low
        x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
        want = x.to(FP8_DTYPE).view(torch.uint8)  # torch 2.13 saturates finite overflow and Inf
        want = torch.where(torch.isnan(x), torch.full_like(want, 0x7F), want)
        assert torch.equal(_C().cast_e4m3(x), want)


def test_torch_cast_facts() -> None:
    """What the reference relies on (and documents): RNE, saturation to 448, NaN keeps its sign."""
    x = torch.tensor([464.0, 470.0, 1e9, float("inf"), -float("inf"), -float("nan"), 2.0**-10, 1.5 * 2.0**-9, -0.0])
    got = x.to(FP8_DTYPE).view(torch.uint8).tolist()
    assert got == [0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFF, 0x00, 0x02, 0x80]


def test_quantize_reference_rules() -> None:
    H = 200  # a full block and a 72-channel one
    x = torch.zeros(5, H)
    x[1, 0] = -0.0
    x[1, 1:128] = torch.linspace(-3.0, 3.0, 127)
    x[1, 128:] = 0.5  # last block: its own amax
    x[2, 5] = float("nan")
    x[3, 130] = float("inf")
    x[4, :] = 1e-44
    q, s = quantize_fp8_reference(x)
    b = q.view(torch.uint8)
    assert s.shape == (5, 2) and s.dtype == torch.float32
    assert s[0].tolist() == [1.0, 1.0] and bool((b[0] == 0).all())  # all-zero blocks: scale 1, zero bytes
    assert s[1, 0].item() == pytest.approx(3.0 / 448) and s[1, 1].item() == pytest.approx(0.5 / 448)
    assert b[1, 0].item() == 0x80  # -0.0 keeps its sign
    assert [int(b[1, 1]), int(b[1, 127]), int(b[1, 128])] == [0xFE, 0x7E, 0x7E]  # +-amax maps to +-448
    assert torch.isnan(s[2, 0]) and bool((b[2, :128] == 0x7F).all()) and s[2, 1].item() == 1.0
    assert torch.isnan(s[3, 1]) and bool((b[3, 128:] == 0x7F).all()) and bool((b[3, :128] == 0).all())
    assert s[4].tolist() == [1.0, 1.0] and bool((b[4] == 0).all())  # amax / 448 underflows
    back = dequantize_reference(q, s, torch.float32)
    assert torch.isnan(back[2, :128]).all() and not torch.isnan(back[2, 128:]).any()
    torch.testing.assert_close(back[1], x[1], rtol=0.07, atol=3.0 / 448 * 2**-9)  # 3 mantissa bits, denormal step


# ---------------------------------------------------------------------------------------------
# C++ kernels against the references


def _check_all_ops(x_TH: torch.Tensor, idx_TK: torch.Tensor, E: int, seed: int) -> None:
    """Every CPU kernel against its reference on one routing."""
    C = _C()
    row_map, counts = C.build_row_map(idx_TK, E)
    want_map, want_counts = ref.build_row_map_reference(idx_TK, E)
    assert torch.equal(row_map, want_map) and torch.equal(counts, want_counts)
    R = int(counts.sum())
    gen = torch.Generator().manual_seed(seed)
    probs_TK = torch.rand(idx_TK.shape, generator=gen)
    rows = C.permute(x_TH, row_map, R)
    assert torch.equal(_bits(rows), _bits(ref.permute_reference(x_TH, row_map, R)))
    scaled = C.permute(x_TH, row_map, R, probs_TK)
    torch.testing.assert_close(scaled, ref.permute_reference(x_TH, row_map, R, probs_TK), rtol=0, atol=0)
    q, s = C.permute_fp8(x_TH, row_map, R)
    want_q, want_s = ref.permute_fp8_reference(x_TH, row_map, R)
    assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(_bits(s), _bits(want_s))
    out = C.unpermute(rows, row_map, probs_TK)
    torch.testing.assert_close(out, ref.unpermute_reference(rows, row_map, probs_TK), rtol=0, atol=0, equal_nan=True)
    grad_TH = torch.randn(x_TH.shape, generator=gen).to(x_TH.dtype)
    grad_rows, grad_probs = C.unpermute_backward(grad_TH, rows, row_map, probs_TK)
    want_rows, want_probs = ref.unpermute_backward_reference(grad_TH, rows, row_map, probs_TK)
    torch.testing.assert_close(grad_rows, want_rows, rtol=0, atol=0)
    torch.testing.assert_close(grad_probs, want_probs, rtol=1e-5, atol=1e-5, equal_nan=True)
    for dtype in DTYPES:
        got, want = C.dequantize(q, s, dtype), dequantize_reference(q, s, dtype)
        assert torch.equal(_bits(got), _bits(want))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [256, 200, 7])
def test_cpu_kernels_match_reference(dtype: torch.dtype, H: int) -> None:
    x_TH = torch.randn(64, H).to(dtype)
    _check_all_ops(x_TH, _routing(64, 4, 8, seed=H, drop=0.2), 8, seed=H)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_fp8_special_values_match_reference(dtype: torch.dtype) -> None:
    """Zeros, denormals, saturation, NaN/Inf: bytes and scales bitwise, through the fused permute."""
    for H in (256, 300):
        x_TH = _special_rows(H, dtype)
        idx_TK = _routing(x_TH.shape[0], 2, 3, seed=H)
        row_map, counts = build_row_map(idx_TK, 3, backend="cpu")
        R = int(counts.sum())
        q, s = _C().permute_fp8(x_TH, row_map, R)
        want_q, want_s = ref.permute_fp8_reference(x_TH, row_map, R)
        assert torch.equal(_bits(q), _bits(want_q)) and torch.equal(_bits(s), _bits(want_s))
        assert bool(torch.isnan(s).any()) and bool((s == 1.0).any())  # the cases really occur


@needs_ext
@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 40),
    K=st.integers(1, 8),
    extra_experts=st.integers(0, 12),
    H=st.integers(1, 300),
    drop=st.sampled_from([0.0, 0.3]),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_cpu_kernels(T: int, K: int, extra_experts: int, H: int, drop: float, bf16: bool, seed: int) -> None:
    E = K + extra_experts
    idx_TK = _routing(T, K, E, seed, drop)
    x_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(
        torch.bfloat16 if bf16 else torch.float32
    )
    _check_all_ops(x_TH, idx_TK, E, seed)
    result = permute(x_TH, idx_TK, E, backend="cpu")
    # grouped by expert, token order within an expert, every kept assignment exactly once
    kept = [(int(e), t) for t in range(T) for e in idx_TK[t].tolist() if e >= 0]
    order = sorted(kept)
    assert result.tokens_per_expert.tolist() == [sum(1 for e, _ in kept if e == x) for x in range(E)]
    for row, (e, t) in enumerate(order):
        k = idx_TK[t].tolist().index(e)
        assert int(result.row_map[t, k]) == row
        assert torch.equal(_bits(result.rows[row]), _bits(x_TH[t]))
    assert int((result.row_map >= 0).sum()) == len(kept) == result.rows.shape[0]


@needs_ext
def test_cpu_kernels_reject_bad_input() -> None:
    C = _C()
    with pytest.raises(RuntimeError, match="expert id 8 out of range"):
        C.build_row_map(torch.tensor([[0, 8]]), 8)
    with pytest.raises(RuntimeError, match="row_map entry 5 out of range"):
        C.permute(torch.zeros(1, 4), torch.tensor([[0, 5]]), 2)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        C.permute(torch.zeros(1, 4, dtype=torch.float16), torch.tensor([[0]]), 1)
    with pytest.raises(RuntimeError, match="one per 128 channels"):
        C.dequantize(torch.zeros(2, 130, dtype=torch.uint8), torch.ones(2, 1), torch.float32)
    with pytest.raises(ValueError, match="expert id -2 out of range"):
        ref.build_row_map_reference(torch.tensor([[-2]]), 4)


# ---------------------------------------------------------------------------------------------
# Autograd


@pytest.mark.filterwarnings("ignore:Input #")  # fp32 inputs: the kernels have no fp64; eps and tolerances fit
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_gradcheck(backend: str) -> None:
    """permute, unpermute (rows and probs) and the fp32 dispatch: analytic == numerical gradients."""
    T, K, E, H = 6, 3, 5, 9
    idx_TK = _routing(T, K, E, seed=1, drop=0.2)
    row_map, counts = build_row_map(idx_TK, E, backend=backend)
    R = int(counts.sum())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    rows = torch.randn(R, H, generator=gen, requires_grad=True)
    probs = torch.rand(T, K, generator=gen, requires_grad=True)
    tol = dict(eps=1e-2, atol=2e-3, rtol=2e-3, nondet_tol=0.0)
    assert torch.autograd.gradcheck(lambda a: permute(a, idx_TK, E, backend=backend).rows, (x,), **tol)
    assert torch.autograd.gradcheck(lambda a, p: unpermute(a, row_map, p, backend=backend), (rows, probs), **tol)
    assert torch.autograd.gradcheck(lambda a: unpermute(a, row_map, backend=backend), (rows,), **tol)
    assert torch.autograd.gradcheck(lambda a: dispatch_rows(a, row_map, R, backend=backend), (x,), **tol)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_quantised_dispatch_is_straight_through(backend: str) -> None:
    """bf16/fp8 wires change the forward (visibly) but not the backward: the gradient is the fp32 one."""
    T, K, E, H = 16, 2, 4, 256
    idx_TK = _routing(T, K, E, seed=3)
    row_map, counts = build_row_map(idx_TK, E, backend=backend)
    x = torch.randn(T, H, requires_grad=True)
    w = torch.randn(T * K, H)
    grads, outs = {}, {}
    for wire in ("fp32", "bf16", "fp8"):
        x.grad = None
        out = dispatch_rows(x, row_map, T * K, wire=wire, backend=backend)
        (out * w).sum().backward()
        assert out.dtype == torch.float32 and x.grad is not None
        grads[wire], outs[wire] = x.grad.clone(), out.detach()
    q, s = quantize_fp8_reference(permute(x.detach(), idx_TK, E, backend="torch").rows)
    assert torch.equal(outs["fp8"], dequantize(q, s, torch.float32, backend=backend))
    assert not torch.equal(outs["fp8"], outs["fp32"]) and not torch.equal(outs["bf16"], outs["fp32"])
    assert torch.equal(grads["fp8"], grads["fp32"]) and torch.equal(grads["bf16"], grads["fp32"])


# ---------------------------------------------------------------------------------------------
# The older row gather


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_permute_rows_matches_reference_bitwise(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x_TH = torch.randn(37, 24, generator=gen).to(dtype)
    index_N = torch.randint(0, 37, (74,), generator=gen)
    out = permute_rows(x_TH, index_N)
    assert torch.equal(_bits(out), _bits(permute_rows_reference(x_TH, index_N)))


@needs_ext
def test_permute_rows_rejects_bad_index() -> None:
    with pytest.raises(RuntimeError, match="out of range"):
        _C().permute_rows(torch.zeros(3, 2), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="1-D int64"):
        _C().permute_rows(torch.zeros(3, 2), torch.tensor([0, 1], dtype=torch.int32))


def test_reference_is_a_gather() -> None:
    x_TH = torch.arange(12.0).view(4, 3)
    out = permute_rows_reference(x_TH, torch.tensor([3, 0, 0]))
    assert out.tolist() == [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]


# ---------------------------------------------------------------------------------------------
# Used in training: the MoE layer's dispatcher goes through the extension


class _CallCounter:
    """Stands in for moe_train._C and counts the kernel calls that pass through it."""

    def __init__(self, module: object) -> None:
        self.module, self.calls = module, collections.Counter[str]()

    def __getattr__(self, name: str) -> object:
        fn = getattr(self.module, name)

        def counted(*args: object) -> object:
            self.calls[name] += 1
            return fn(*args)

        return counted


def _moe_layer_step(backend: str, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward + backward of one MoE layer with capacity dropping -> (output, input gradient)."""
    from moe_train.config import LBLConfig, MoEConfig, MoEDispatchConfig
    from moe_train.model import MoELayer

    torch.manual_seed(0)
    moe_cfg = MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=32, capacity_factor=1.0, lbl=LBLConfig())
    moe_cfg.dispatch = MoEDispatchConfig(backend=backend, dtype=dtype)
    layer = MoELayer(64, moe_cfg, num_moe_layers=1)
    x_BSH = torch.randn(2, 24, 64, requires_grad=True)
    y_BSH = layer(x_BSH)
    y_BSH.square().sum().backward()
    assert x_BSH.grad is not None
    return y_BSH.detach(), x_BSH.grad


@needs_ext
@pytest.mark.parametrize("dtype", ["fp32", "fp8"])
def test_moe_layer_trains_through_the_extension(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """backend auto / cpu: the layer's forward and backward call the C++ kernels (build_row_map, the
    permute or fused FP8 permute, dequantize, unpermute and its backward, the experts' silu(gate) * up and
    its backward); 'torch' (the twin) calls none.
    Outputs and input gradients agree to fp32 rounding (the kernels' exp in silu and the probs gradient's
    dot product round differently from torch's)."""
    from moe_train.kernels import _ext

    results, calls = {}, {}
    for backend in ("auto", "cpu", "torch"):
        counter = _CallCounter(_C())
        monkeypatch.setattr(_ext, "_C", counter)
        results[backend] = _moe_layer_step(backend, dtype)
        calls[backend] = set(counter.calls)
    permute_op = {"permute_fp8", "dequantize"} if dtype == "fp8" else {"permute"}
    want = {"build_row_map", "unpermute", "unpermute_backward", "swiglu", "swiglu_backward"} | permute_op
    assert calls["auto"] == calls["cpu"] == want, calls
    assert calls["torch"] == set()
    for backend in ("auto", "cpu"):
        (y, grad), (want_y, want_grad) = results[backend], results["torch"]
        torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-6 * float(want_y.abs().max()))
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6 * float(want_grad.abs().max()))


# ---------------------------------------------------------------------------------------------
# The fused silu(gate) * up (csrc/cpu/swiglu.cpp)


def _silu_mul_operands(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, grad): gate spans silu's whole range (|g| up to ~40, the exp clamp, exact zeros)."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(n, generator=gen) * 8
    special = torch.tensor([0.0, -0.0, 40.0, -40.0, 88.5, -95.0, 1e-30])
    gate[: min(n, 7)] = special[: min(n, 7)]
    return gate, torch.randn(n, generator=gen), torch.randn(n, generator=gen)


@needs_ext
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 70_001])  # scalar tails, one SIMD width, threaded size
def test_silu_mul_kernel_matches_reference(n: int) -> None:
    """Forward and both input gradients equal the reference to a few fp32 ulps, at every size (the SIMD
    body, its scalar tail, the threaded chunks); NaN propagates like torch's."""
    C = _C()
    gate, up, grad = _silu_mul_operands(n, seed=n)
    g = gate.clone().requires_grad_()
    u = up.clone().requires_grad_()
    want = silu_mul_reference(g, u)
    want.backward(grad)
    tol = dict(rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(C.swiglu(gate, up), want.detach(), **tol)
    grad_gate, grad_up = C.swiglu_backward(grad, gate, up)
    torch.testing.assert_close(grad_gate, g.grad, **tol)
    torch.testing.assert_close(grad_up, u.grad, **tol)
    nan_gate = gate.clone()
    nan_gate[0] = float("nan")
    assert torch.isnan(C.swiglu(nan_gate, up)[0]) and torch.isnan(C.swiglu_backward(grad, nan_gate, up)[0][0])


@needs_ext
def test_silu_mul_kernel_is_elementwise_deterministic() -> None:
    """An element's value does not depend on its position, the thread count or the tensor's size: the
    property that keeps tensor-parallel shards bitwise equal to one process."""
    C = _C()
    gate, up, grad = _silu_mul_operands(70_001, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.swiglu(gate, up), *C.swiglu_backward(grad, gate, up)
        torch.set_num_threads(2)
        two = C.swiglu(gate, up), *C.swiglu_backward(grad, gate, up)
    finally:
        torch.set_num_threads(threads)
    part = slice(12_345, 12_350)  # an unaligned piece: the scalar tail instead of the SIMD body
    piece = C.swiglu(gate[part], up[part]), *C.swiglu_backward(grad[part], gate[part], up[part])
    for a, b, c in zip(one, two, piece, strict=True):
        assert torch.equal(_bits(a), _bits(b)) and torch.equal(_bits(a[part]), _bits(c))


@needs_ext
def test_silu_mul_kernel_rejects_bad_input() -> None:
    C = _C()
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="up shape"):
        C.swiglu(x, torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="gate must be float32"):
        C.swiglu(x.double(), x.double())
    with pytest.raises(RuntimeError, match="grad shape"):
        C.swiglu_backward(torch.randn(3), x, x)


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_silu_mul_gradcheck_and_fallbacks(backend: str) -> None:
    """silu_mul's autograd (kernel or reference) passes gradcheck on a non-contiguous input; float64 and
    bf16 operands take the reference (the kernel is float32 only)."""
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(9, 8, generator=gen)[:, ::2].requires_grad_()  # a strided view
    up = torch.randn(9, 4, generator=gen, requires_grad=True)
    tol = dict(eps=1e-2, atol=2e-3, rtol=2e-3, nondet_tol=0.0)
    assert torch.autograd.gradcheck(lambda g, u: silu_mul(g, u, backend=backend), (gate, up), **tol)
    for dtype in (torch.float64, torch.bfloat16):
        g, u = gate.detach().to(dtype), up.detach().to(dtype)
        assert torch.equal(silu_mul(g, u, backend=backend), silu_mul_reference(g, u))
