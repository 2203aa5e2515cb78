"""Data-parallel gradient reduction: bucketed, overlapped with backward, driven by ParamMeta.

Rule (moe_train.parallel.param_meta): each gradient is summed over its `grad_sum_kinds` groups, in the
order listed, then divided by the attention-side dp size (each DP replica's loss is a mean over its own
tokens). `GradReducer` does exactly that, but on flat buckets instead of one collective per parameter:

* parameters are grouped by (grad_sum_kinds, dtype, device) into buckets of about `bucket_mb`, filled in
  reverse registration order (gradients arrive roughly in that order during backward, as in DDP);
* on the last micro-batch of a step (sync on), a post-accumulate-grad hook counts each parameter in;
  when a bucket is complete it is copied into its flat buffer and its first all-reduce is launched
  asynchronously, overlapping the rest of backward. Buckets launch strictly in index order, so every
  rank of a group issues the same collectives in the same order even when gradients arrive in a
  different order (or not at all) on different ranks;
* `finish()` launches the buckets that never completed (a parameter without a gradient this step,
  e.g. an expert that received no tokens, counts as zeros and gets a zero gradient), waits for every
  handle, runs the remaining kinds of multi-kind buckets (("dp", "tp") for sequence-parallel
  replicated parameters) in order, divides by dp and copies the results back into `param.grad`.

The second and later kinds of a bucket run in `finish()` rather than chained in the hook: on NCCL two
communicators run on different streams, and chaining them on one buffer would need a stream wait.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.param_meta import ParamMeta, ensure_meta, get_meta, set_meta

NamedParam = tuple[str, nn.Parameter, ParamMeta]
ParamsLike = nn.Module | Sequence[nn.Module] | Iterable[nn.Parameter] | Iterable[tuple[str, nn.Parameter]]


def named_params_with_meta(params: ParamsLike, trainable_only: bool = True) -> list[NamedParam]:
    """(local name, parameter, meta) for a module, a list of modules (pipeline chunks), parameters or
    (name, parameter) pairs; parameters without metadata get the dense default (named by position)."""
    items: list[Any] = [params] if isinstance(params, nn.Module) else list(params)
    pairs: list[tuple[str, nn.Parameter]] = []
    for i, item in enumerate(items):
        if isinstance(item, nn.Module):
            ensure_meta(item)
            pairs += list(item.named_parameters())
        else:
            pairs.append(item if isinstance(item, tuple) else (f"param{i}", item))
    out = []
    for name, param in pairs:
        if trainable_only and not param.requires_grad:
            continue
        meta = get_meta(param)
        if meta is None:
            meta = ParamMeta(canonical_name=name, canonical_shape=tuple(param.shape))
            set_meta(param, meta)
        out.append((name, param, meta))
    return out


@dataclass
class _Bucket:
    """A flat buffer holding the gradients of parameters with the same grad_sum_kinds."""

    kinds: tuple[str, ...]
    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    ready: set[int] = field(default_factory=set)
    handle: dist.Work | None = None
    launched: bool = False


class GradReducer:
    """Bucketed, backward-overlapped gradient reduction per ParamMeta (see the module docstring).

    Usage per step: earlier micro-batches under `with reducer.no_sync():`, the last one with sync on,
    then `reducer.finish()` before clipping and the optimizer step.
    """

    def __init__(self, params: ParamsLike, groups: ProcessGroups, bucket_mb: float = 25.0) -> None:
        self.groups = groups
        self.entries = named_params_with_meta(params)
        self.buckets = self._make_buckets(bucket_mb)
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, position)
        for b, bucket in enumerate(self.buckets):
            for pos, param in enumerate(bucket.params):
                self._where[id(param)] = (b, pos)
        self._next = 0
        self._sync = True
        self._hooks: list[RemovableHandle] = [
            param.register_post_accumulate_grad_hook(self._on_grad_ready) for _, param, _ in self.entries
        ]

    def _make_buckets(self, bucket_mb: float) -> list[_Bucket]:
        """Buckets in reverse registration order, one open bucket per (kinds, dtype, device)."""
        cap = max(1, int(bucket_mb * 2**20))
        open_: dict[tuple, list[nn.Parameter]] = {}
        filled: dict[tuple, int] = {}
        order: list[list[nn.Parameter]] = []
        keys: list[tuple[str, ...]] = []
        for _, param, meta in reversed(self.entries):
            key = (meta.grad_sum_kinds, param.dtype, param.device)
            nbytes = param.numel() * param.element_size()
            if key not in open_ or filled[key] + nbytes > cap:
                open_[key], filled[key] = [], 0
                order.append(open_[key])
                keys.append(meta.grad_sum_kinds)
            open_[key].append(param)
            filled[key] += nbytes
        buckets = []
        for kinds, members in zip(keys, order, strict=True):
            offsets = [0]
            for p in members:
                offsets.append(offsets[-1] + p.numel())
            buffer = torch.zeros(offsets[-1], dtype=members[0].dtype, device=members[0].device)
            buckets.append(_Bucket(kinds, members, offsets, buffer))
        return buckets

    # -- sync control ---------------------------------------------------------------------------

    def set_sync(self, sync: bool) -> None:
        """Whether backward launches reductions (True only for the last micro-batch of a step)."""
        self._sync = sync

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (earlier micro-batches of a step)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def remove_hooks(self) -> None:
        """Detach the backward hooks (the reducer then only reduces in finish())."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- reduction ------------------------------------------------------------------------------

    def _active_kinds(self, bucket: _Bucket) -> list[str]:
        return [kind for kind in bucket.kinds if self.groups.size(kind) > 1]

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self._sync:
            return
        b, pos = self._where[id(param)]
        bucket = self.buckets[b]
        if bucket.launched:
            name = get_meta(param).canonical_name  # type: ignore[union-attr]
            raise RuntimeError(
                f"gradient of {name} accumulated after its bucket was reduced; run earlier micro-batches"
                " under reducer.no_sync() and call reducer.finish() once per step"
            )
        self._adopt(param, bucket, pos)  # the separate gradient is freed now, not after the whole backward
        bucket.ready.add(pos)
        while self._next < len(self.buckets) and len(self.buckets[self._next].ready) == len(
            self.buckets[self._next].params
        ):
            self._launch(self.buckets[self._next])
            self._next += 1

    @staticmethod
    @torch.no_grad()
    def _adopt(param: torch.Tensor, bucket: _Bucket, pos: int) -> None:
        """Copy the grad (zeros where None) into its slot of the flat buffer and make the grad that view
        (as DDP's gradient_as_bucket_view): the separately allocated gradient is freed, so a rank holds
        one gradient-sized copy, not two."""
        view = bucket.buffer[bucket.offsets[pos] : bucket.offsets[pos + 1]]
        if param.grad is None:
            view.zero_()
        elif param.grad.data_ptr() != view.data_ptr():
            view.copy_(param.grad.reshape(-1))
        param.grad = view.view_as(param)

    @torch.no_grad()
    def _launch(self, bucket: _Bucket) -> None:
        """Move the grads not yet adopted into the flat buffer; start the first all-reduce asynchronously."""
        for pos, param in enumerate(bucket.params):
            if pos not in bucket.ready:
                self._adopt(param, bucket, pos)
        kinds = self._active_kinds(bucket)
        if kinds:
            bucket.handle = dist.all_reduce(bucket.buffer, group=self.groups.group(kinds[0]), async_op=True)
        bucket.launched = True

    @torch.no_grad()
    def finish(self) -> None:
        """Reduce every bucket not yet launched, wait for all, divide by dp, write back into param.grad."""
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            for kind in self._active_kinds(bucket)[1:]:
                dist.all_reduce(bucket.buffer, group=self.groups.group(kind))
            if self.groups.dp_size > 1:
                bucket.buffer.div_(self.groups.dp_size)
            for param, lo, hi in zip(bucket.params, bucket.offsets, bucket.offsets[1:], strict=False):
                reduced = bucket.buffer[lo:hi].view_as(param)
                if param.grad is None or param.grad.data_ptr() != reduced.data_ptr():
                    param.grad = reduced  # the grad is the bucket's view (see _launch)
            bucket.ready.clear()
            bucket.handle = None
            bucket.launched = False
        self._next = 0


def reduce_gradients_naive(params: ParamsLike, groups: ProcessGroups) -> None:
    """Reference: one blocking all-reduce per parameter and kind (None grads count as zeros)."""
    for _, param, meta in named_params_with_meta(params):
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        for kind in meta.grad_sum_kinds:
            groups.all_reduce(param.grad, kind)
        if groups.dp_size > 1:
            param.grad.div_(groups.dp_size)
