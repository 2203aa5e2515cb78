"""CUDA kernels (moe_train._C_cuda) against the CPU kernels (moe_train._C), bit for bit.

Both share csrc/common/ (E4M3 conversion, block scale, bf16 rounding, row-map indexing), and both sum a
token's rows in ascending row order with unfused fp32 operations, so every output is bitwise equal,
NaN payloads included (both canonicalise computed NaNs); only the probs gradient (a dot product, a tree
sum on the GPU) is compared within fp32 tolerance. Shapes cover the 16-byte vector path (H * element
size a multiple of 16), the element path (H = 7, 130, or a misaligned row view) and partial FP8 blocks.
Runs only where a CUDA GPU exists (tests/conftest.py).

Legend: T tokens, H hidden, K choices per token, E experts, R rows.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

CASES = [  # T, K, E, H, drop
    (0, 2, 4, 256, 0.0),
    (1, 1, 1, 128, 0.0),
    (300, 8, 64, 1024, 0.0),
    (257, 2, 8, 130, 0.3),
    (64, 4, 8, 7, 0.2),
    (1000, 6, 16, 4096, 0.1),
]


def _modules():  # type: ignore[no-untyped-def]
    from moe_train import _C, _C_cuda

    return _C, _C_cuda


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().contiguous().view(torch.uint8)


def _routing(T: int, K: int, E: int, drop: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    idx_TK = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    return idx_TK.masked_fill(torch.rand(T, K, generator=gen) < drop, -1)


def _tokens(T: int, H: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows; rows 1..8 (when T allows) hit the FP8 special cases."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    scaled = {1: 0.0, 2: -0.0, 3: 1e-39, 4: 1e-44, 5: 1e30}  # zeros, denormals, underflowing scale, huge
    for row, factor in scaled.items():
        if row < T:
            x[row] *= factor
    for row, value in {6: float("nan"), 7: float("inf"), 8: -float("inf")}.items():
        if row < T:
            x[row, (row * 37) % H] = value
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-K{c[1]}-E{c[2]}-H{c[3]}" for c in CASES])
def test_cuda_equals_cpu(dtype: torch.dtype, case: tuple[int, int, int, int, float]) -> None:
    cpu, gpu = _modules()
    T, K, E, H, drop = case
    idx_TK = _routing(T, K, E, drop, seed=H)
    row_map, counts = cpu.build_row_map(idx_TK, E)
    g_map, g_counts = gpu.build_row_map(idx_TK.cuda(), E)
    assert torch.equal(g_map.cpu(), row_map) and torch.equal(g_counts.cpu(), counts)
    R = int(counts.sum())
    x = _tokens(T, H, dtype, seed=T)
    probs = torch.rand(T, K, generator=torch.Generator().manual_seed(1))
    gx, gprobs = x.cuda(), probs.cuda()
    rows = cpu.permute(x, row_map, R)
    assert torch.equal(_bits(gpu.permute(gx, g_map, R)), _bits(rows))
    assert torch.equal(_bits(gpu.permute(gx, g_map, R, gprobs)), _bits(cpu.permute(x, row_map, R, probs)))
    q, s = cpu.permute_fp8(x, row_map, R)
    gq, gs = gpu.permute_fp8(gx, g_map, R)
    assert torch.equal(_bits(gq), _bits(q)) and torch.equal(_bits(gs), _bits(s))
    for p, gp in ((probs, gprobs), (None, None)):
        assert torch.equal(_bits(gpu.unpermute(rows.cuda(), g_map, gp)), _bits(cpu.unpermute(rows, row_map, p)))
    grad = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    grad_rows, grad_probs = cpu.unpermute_backward(grad, rows, row_map, probs)
    g_rows, g_probs = gpu.unpermute_backward(grad.cuda(), rows.cuda(), g_map, gprobs)
    assert torch.equal(_bits(g_rows), _bits(grad_rows))
    torch.testing.assert_close(g_probs.cpu(), grad_probs, rtol=1e-4, atol=1e-4, equal_nan=True)
    for out_dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_bits(gpu.dequantize(gq, gs, out_dtype)), _bits(cpu.dequantize(q, s, out_dtype)))


def test_cuda_misaligned_rows_take_the_element_path() -> None:
    """Rows whose start is not 16-byte aligned (a view one element into a flat buffer; H * 4 is a multiple
    of 16, so only the alignment check keeps the kernel off the vector path) give the same bytes."""
    cpu, gpu = _modules()
    T, K, E, H = 33, 2, 4, 8
    idx_TK = _routing(T, K, E, 0.0, seed=3)
    x = torch.randn(T, H)
    gbuf = torch.zeros(T * H + 1, device="cuda")
    gx = gbuf[1:].view(T, H)
    gx.copy_(x.cuda())
    assert gx.data_ptr() % 16 != 0
    row_map, counts = cpu.build_row_map(idx_TK, E)
    g_map, _ = gpu.build_row_map(idx_TK.cuda(), E)
    R = int(counts.sum())
    assert torch.equal(_bits(gpu.permute(gx, g_map, R)), _bits(cpu.permute(x, row_map, R)))
    q, s = cpu.permute_fp8(x, row_map, R)
    gq, gs = gpu.permute_fp8(gx, g_map, R)
    assert torch.equal(_bits(gq), _bits(q)) and torch.equal(_bits(gs), _bits(s))


def test_cuda_dispatch_autograd_matches_cpu() -> None:
    """The training path (dispatch_rows + unpermute) on the 'cuda' backend equals the 'cpu' backend."""
    from moe_train.kernels import build_row_map, dispatch_rows, unpermute

    T, K, E, H = 128, 4, 8, 256
    idx_TK = _routing(T, K, E, 0.0, seed=4)
    results = {}
    for backend, device in (("cpu", "cpu"), ("cuda", "cuda")):
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(5)).to(device).requires_grad_(True)
        probs = torch.rand(T, K, generator=torch.Generator().manual_seed(6)).to(device).requires_grad_(True)
        row_map, _ = build_row_map(idx_TK.to(device), E, backend=backend)
        rows = dispatch_rows(x, row_map, T * K, wire="fp8", backend=backend)
        y = unpermute(rows * 2.0, row_map, probs, backend=backend)
        y.square().sum().backward()
        assert x.grad is not None and probs.grad is not None
        results[backend] = (y.detach().cpu(), x.grad.cpu(), probs.grad.cpu())
    assert torch.equal(results["cuda"][0], results["cpu"][0])
    assert torch.equal(results["cuda"][1], results["cpu"][1])
    torch.testing.assert_close(results["cuda"][2], results["cpu"][2], rtol=1e-4, atol=1e-4)


def test_cuda_rejects_invalid_expert_ids() -> None:
    _, gpu = _modules()
    with pytest.raises(RuntimeError, match="expert ids out of range"):
        gpu.build_row_map(torch.tensor([[0, 9]], device="cuda"), 8)
