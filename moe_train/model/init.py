"""Layout-independent initialisation: every element of every canonical tensor from a counter-based stream.

Each canonical parameter (its name in the single-device model) gets its own Philox4x64-10 stream
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), keyed by
sha256("moe_train.init/<seed>/<canonical name>")[:16]. Element i of the row-major flattened
canonical tensor takes the raw 64-bit outputs 2i and 2i+1 of that stream, i.e. lanes 2(i % 2) and
2(i % 2) + 1 of Philox block i // 2 (one block is four 64-bit words; numpy's `Philox.advance(n)`
skips n blocks). The pair becomes one standard normal by the Box–Muller cosine branch
(u1 = (r0 >> 11 + 1) / 2^53 in (0, 1], u2 = (r1 >> 11) / 2^53, z = sqrt(-2 ln u1) cos(2 pi u2)),
in float64, scaled by the spec's std and rounded once to the parameter's dtype.

So a value depends only on (seed, canonical name, canonical element index): a shard computes its box
by entering the stream at each contiguous run's own offset, and every layout (and one process)
starts from bit-identical parameters. Working memory is bounded: runs are generated in pieces of at
most `INIT_BLOCK_ELEMS` elements (2^18: the raw words and float64 temporaries are about 10 MB),
written straight into the destination shard, so a rank never holds more than its shards plus that.

Distributions (unchanged from `init_weights`): normal(0, init_std) for embeddings, wq/wk/wv, w1/w3
(dense, shared and routed experts), router gates and an untied output head; normal(0, init_std /
sqrt(2 * num_layers)) for wo, w2 and w2_EFH; ones for RMSNorm weights; zeros for persistent buffers
(expert bias, streaming balance state). RoPE tables are recomputed.

Legend: N elements of one working block.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moe_train.model.attention import Attention
from moe_train.model.mlp import FeedForward
from moe_train.model.moe.experts import GroupedExperts
from moe_train.model.moe.router import TopKRouter
from moe_train.model.norms import RMSNorm
from moe_train.model.rope import RotaryEmbedding

INIT_BLOCK_ELEMS = 1 << 18
"""Most elements generated at once (bounds the working buffer of the initialiser)."""


@dataclass(frozen=True)
class InitSpec:
    """How one canonical tensor is initialised."""

    kind: str
    """'normal', 'ones' or 'zeros'."""
    std: float = 0.0
    """Standard deviation of 'normal'."""


Placement = tuple[str, tuple[int, ...], list[int]]
"""(canonical name, canonical shape, offsets of the local tensor's box inside it)."""


# -- the stream -----------------------------------------------------------------------------------


def stream_key(seed: int, name: str) -> np.ndarray:
    """The 128-bit Philox key of canonical tensor `name` under `seed` (two uint64 words)."""
    digest = hashlib.sha256(f"moe_train.init/{seed}/{name}".encode()).digest()
    return np.frombuffer(digest[:16], dtype="<u8").astype(np.uint64)


def _raw_pairs(key: np.ndarray, start: int, count: int) -> np.ndarray:
    """Raw words of canonical elements [start, start + count) -> uint64 [count, 2]."""
    gen = np.random.Philox(key=key)
    gen.advance(start // 2)  # block start // 2 holds elements 2b and 2b + 1
    skip = 2 * (start % 2)
    raw = gen.random_raw(skip + 2 * count)
    return raw[skip:].reshape(count, 2)


def normal_from_pairs(raw_N2: np.ndarray) -> np.ndarray:
    """Box–Muller (cosine branch) on raw 64-bit pairs -> float64 standard normals [N] (in place where
    possible: two float64 temporaries of N)."""
    scale = 2.0**-53
    u1 = ((raw_N2[:, 0] >> np.uint64(11)) + np.uint64(1)).astype(np.float64)
    u1 *= scale  # (0, 1]
    u2 = (raw_N2[:, 1] >> np.uint64(11)).astype(np.float64)
    u2 *= scale  # [0, 1)
    np.log(u1, out=u1)
    u1 *= -2.0
    np.sqrt(u1, out=u1)
    u2 *= 2.0 * math.pi
    np.cos(u2, out=u2)
    u1 *= u2
    return u1


def box_runs(shape: tuple[int, ...], offsets: list[int], lengths: list[int]) -> Iterator[tuple[int, int]]:
    """(canonical flat start, length) of the contiguous runs of a box, in the box's row-major order."""
    if not shape:
        yield 0, 1
        return
    k = len(shape) - 1  # the trailing dims the box covers fully merge into one run
    while k > 0 and offsets[k] == 0 and lengths[k] == shape[k]:
        k -= 1
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    run = lengths[k] * strides[k]
    if run == 0 or any(n == 0 for n in lengths[:k]):
        return
    for outer in np.ndindex(*lengths[:k]):
        start = sum((o + t) * s for o, t, s in zip(offsets[:k], outer, strides[:k], strict=True))
        yield start + offsets[k] * strides[k], run


def _pieces(runs: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Runs cut into pieces of at most INIT_BLOCK_ELEMS elements."""
    for start, length in runs:
        for lo in range(0, length, INIT_BLOCK_ELEMS):
            yield start + lo, min(INIT_BLOCK_ELEMS, length - lo)


@torch.no_grad()
def fill_normal_box(
    out: torch.Tensor, seed: int, name: str, shape: tuple[int, ...], offsets: list[int], std: float
) -> None:
    """Fill `out` (contiguous, shaped like the box) with its box of canonical tensor `name` ~ N(0, std)."""
    if not out.is_contiguous():
        raise ValueError(f"{name}: the destination of the initialiser must be contiguous")
    key, flat, pos = stream_key(seed, name), out.view(-1), 0
    pending: list[np.ndarray] = []
    pending_n = 0

    def flush() -> None:
        nonlocal pos, pending, pending_n
        if pending_n:
            values_N = normal_from_pairs(np.concatenate(pending) if len(pending) > 1 else pending[0])
            values_N *= std
            flat[pos : pos + pending_n].copy_(torch.from_numpy(values_N))
            pos, pending, pending_n = pos + pending_n, [], 0

    for start, length in _pieces(box_runs(shape, offsets, list(out.shape))):
        if pending_n + length > INIT_BLOCK_ELEMS:
            flush()
        pending.append(_raw_pairs(key, start, length))
        pending_n += length
    flush()
    if pos != out.numel():
        raise RuntimeError(f"{name}: initialised {pos} of {out.numel()} elements of the box at {offsets}")


def fill_box(out: torch.Tensor, spec: InitSpec, seed: int, placement: Placement) -> None:
    """Initialise `out`, the box of a canonical tensor at `placement`, as `spec` says."""
    name, shape, offsets = placement
    if spec.kind == "normal":
        fill_normal_box(out, seed, name, shape, offsets, spec.std)
    elif spec.kind == "ones":
        out.fill_(1.0)
    elif spec.kind == "zeros":
        out.zero_()
    else:
        raise ValueError(f"{name}: unknown init kind {spec.kind!r}")


# -- what each tensor gets -----------------------------------------------------------------------


def _module_specs(module: nn.Module, std: float, out_std: float) -> dict[str, InitSpec]:
    """Specs of one module's own parameters (by attribute name), as `init_weights` draws them."""
    normal, out = InitSpec("normal", std), InitSpec("normal", out_std)
    if isinstance(module, RMSNorm):
        return {"weight": InitSpec("ones")}
    if isinstance(module, nn.Embedding):
        return {"weight": normal}
    if isinstance(module, GroupedExperts):
        return {"w1_EHF": normal, "w3_EHF": normal, "w2_EFH": out}
    return {}


def init_specs(model: nn.Module, std: float, num_layers: int) -> dict[str, InitSpec]:
    """{canonical name: InitSpec} of every parameter and persistent buffer of the single-device model
    (real or on the meta device). Raises for a parameter no rule covers (teach this module)."""
    out_std = std / math.sqrt(2 * num_layers)
    by_id: dict[int, InitSpec] = {}
    for module in model.modules():
        linears: dict[nn.Module, InitSpec] = {}
        if isinstance(module, Attention):
            linears = {lin: InitSpec("normal", std) for lin in (module.wq, module.wk, module.wv)}
            linears[module.wo] = InitSpec("normal", out_std)
        elif isinstance(module, FeedForward):
            linears = {module.w1: InitSpec("normal", std), module.w3: InitSpec("normal", std)}
            linears[module.w2] = InitSpec("normal", out_std)
        elif isinstance(module, TopKRouter):
            linears = {module.gate: InitSpec("normal", std)}
        for lin, spec in linears.items():
            by_id.setdefault(id(lin.weight), spec)
        for attr, spec in _module_specs(module, std, out_std).items():
            by_id.setdefault(id(getattr(module, attr)), spec)
    output = getattr(model, "output", None)
    if isinstance(output, nn.Linear):
        by_id.setdefault(id(output.weight), InitSpec("normal", std))
    specs: dict[str, InitSpec] = {}
    for name, param in model.named_parameters():
        if id(param) not in by_id:
            raise RuntimeError(f"init: no rule for parameter {name} (teach moe_train/model/init.py)")
        specs[name] = by_id[id(param)]
    for prefix, sub in model.named_modules():
        for key, buf in sub._buffers.items():
            if buf is not None and key not in sub._non_persistent_buffers_set:
                specs[f"{prefix}.{key}" if prefix else key] = InitSpec("zeros")
    return specs


# -- materialising a module ----------------------------------------------------------------------


def _swap_in(old: torch.Tensor, new: torch.Tensor) -> None:
    """Make the object `old` (e.g. a meta parameter held by several modules) hold `new`'s storage,
    keeping its Python attributes (placement metadata) and every reference to it."""
    new.__dict__.update(old.__dict__)
    torch.utils.swap_tensors(old, new)


@torch.no_grad()
def materialize_module(
    module: nn.Module,
    specs: dict[str, InitSpec],
    seed: int,
    device: torch.device | str,
    placement: Callable[[str, torch.Tensor], Placement] | None = None,
    initialise: bool = True,
) -> None:
    """Give every meta parameter and buffer of `module` real storage on `device`, initialised in place.

    `placement(local name, tensor)` says which box of which canonical tensor the local tensor is
    (default: the whole tensor under its local name, i.e. the single-device model). Tied parameters
    are materialised once. Only one local tensor plus the bounded working block is allocated at a time.
    With `initialise` False the storage is left uninitialised (a checkpoint is about to fill it).
    """
    place = placement or (lambda name, t: (name, tuple(t.shape), [0] * t.dim()))
    seen: set[int] = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        tensors = [(k, t, True) for k, t in sub._parameters.items()]
        tensors += [(k, t, False) for k, t in sub._buffers.items()]
        for key, tensor, is_param in tensors:
            if tensor is None or id(tensor) in seen or not tensor.is_meta:
                continue
            seen.add(id(tensor))
            new = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            name = f"{prefix}.{key}" if prefix else key
            if initialise and (is_param or key not in sub._non_persistent_buffers_set):
                canonical = place(name, tensor)
                if is_param and canonical[0] not in specs:
                    raise RuntimeError(f"init: no spec for parameter {canonical[0]} (local name {name})")
                fill_box(new, specs.get(canonical[0], InitSpec("zeros")), seed, canonical)
            _swap_in(tensor, nn.Parameter(new, requires_grad=tensor.requires_grad) if is_param else new)
    for sub in module.modules():
        if isinstance(sub, RotaryEmbedding):
            sub.reset()
