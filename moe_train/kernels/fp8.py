"""FP8 E4M3 block quantisation: the pure-PyTorch reference of csrc/common/fp8.h.

One fp32 scale per row per block of 128 channels (the last block may be shorter), q = e4m3(x / scale):

* amax = max |x| over the block;
* a block holding a NaN or an Inf is non-finite: scale NaN and every byte 0x7F (NaN), so it
  dequantises to NaN everywhere;
* otherwise scale = amax / 448 in fp32, and 1 when that is 0 (all-zero blocks, or amax below
  448 * 2^-150): the bytes are then signed zeros;
* x / scale rounds to nearest even into E4M3 (denormals included, sign of zero kept) and saturates
  to +-448 (reachable only through the rounding of the scale); nothing is flushed to zero.

torch's own float32 -> float8_e4m3fn cast (checked on torch 2.13) rounds to nearest even and saturates
finite overflow and Inf to +-448, but keeps the sign of NaN (0xFF); older torch releases turned values
from 480 up into NaN. The reference therefore clamps to +-448 before the cast and writes NaN blocks as
0x7F itself. Legend: R rows, H hidden, G = ceil(H / 128) blocks.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
NAN_BYTE = 0x7F


def num_blocks(hidden: int) -> int:
    """Scale blocks per row: ceil(hidden / 128)."""
    return -(-hidden // BLOCK)


def _blocks(x_RH: torch.Tensor) -> torch.Tensor:
    """x as fp32 [R, G, 128] (a view when H is a multiple of 128, else a zero-padded copy)."""
    R, H = x_RH.shape
    G = num_blocks(H)
    if H == G * BLOCK:
        return x_RH.float().view(R, G, BLOCK)
    padded = torch.zeros(R, G * BLOCK, dtype=torch.float32, device=x_RH.device)
    padded[:, :H] = x_RH.float()
    return padded.view(R, G, BLOCK)


def quantize_fp8_reference(x_RH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_RH (any float dtype) -> (q_RH float8_e4m3fn, scales_RG fp32)."""
    R, H = x_RH.shape
    x_RGB = _blocks(x_RH)
    amax_RG = x_RGB.abs().amax(dim=-1)  # NaN if the block holds one, Inf if it holds an Inf
    nonfinite_RG = ~torch.isfinite(amax_RG)
    scale_RG = amax_RG / FP8_MAX
    scale_RG = torch.where(scale_RG == 0, torch.ones_like(scale_RG), scale_RG)
    scale_RG = torch.where(nonfinite_RG, torch.full_like(scale_RG, float("nan")), scale_RG)
    q_RGB = (x_RGB / scale_RG.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)
    q_RGB.masked_fill_(nonfinite_RG.unsqueeze(-1), NAN_BYTE)
    q_RH = q_RGB.view(R, x_RGB.shape[1] * BLOCK)[:, :H].contiguous()
    return q_RH.view(FP8_DTYPE), scale_RG


def dequantize_reference(q_RH: torch.Tensor, scales_RG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale of its block, as dtype; every NaN is the canonical quiet NaN."""
    H = q_RH.shape[1]
    scale_RH = scales_RG.float().repeat_interleave(BLOCK, dim=1)[:, :H]
    value_RH = q_RH.view(FP8_DTYPE).float() * scale_RH
    value_RH = torch.where(torch.isnan(value_RH), torch.full_like(value_RH, float("nan")), value_RH)
    return value_RH.to(dtype)
