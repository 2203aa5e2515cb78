"""Context parallelism (cp): each sequence is split over the cp ranks; attention all-gathers K/V.

Legend: B batch, S full sequence, s = S / cp (this rank's tokens), c = S / (2 cp) (one chunk),
L (or K) keys a query chunk attends to, N query heads, G key/value heads, D head_dim, V vocabulary
(or this rank's shard).

Load balancing (as Megatron-Core and Llama 3, arXiv 2407.21783): the sequence is cut into 2 * cp
chunks of c tokens and cp rank i holds chunks i and 2cp-1-i, concatenated. Under a causal mask the
work of a query chunk grows with its index, so pairing an early and a late chunk gives every rank
the same attention work.

What changes, applied by `apply_context_parallel` (from `parallelize`, after TP and EP):

* the input embedding keeps only this rank's chunks of the token ids (a forward pre-hook; every cp
  rank of a data-parallel replica reads the same batch);
* RoPE stays global: the tables are asked for the full S and indexed at this rank's positions;
* attention (`Attention.core_attention`): K and V are all-gathered over cp (backward: reduce-scatter
  of dK / dV) and put in sequence order; each local query chunk g attends to keys [0, (g+1) c) with a
  lower-right causal mask (on the CPU as two flash-kernel blocks merged by log-sum-exp, no mask
  materialised). All-gather rather than a ring: with grouped-query attention K/V are G/N of
  the activations, one collective per layer is simple and exact, and the softmax never waits on
  a transfer (a ring merges cp partial blocks as they arrive; see docs/parallelism.md);
* the loss: labels are sliced like the tokens, the per-token losses of the chunks are all-gathered
  back into sequence order (backward: each rank keeps its own chunks' gradient), so every cp rank holds
  the full-sequence `token_loss_BS` and the training loop, validation and per-domain losses are
  unchanged;
* everything else is token-wise and runs on the local tokens: the MoE layers sum router statistics
  over ``tp_cp`` (all token shards of one micro-batch), dense gradients are summed over ``dp_cp``
  (every "dp" in the parameters' metadata becomes "dp_cp") and still divided by dp, since every cp
  rank's loss is the full-sequence mean.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_train.model.attention import Attention
from moe_train.model.transformer import MoETransformer
from moe_train.parallel.collectives import Group, all_gather_dim, gather_from_sequence, group_rank, group_size
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.param_meta import ParamMeta, ensure_meta, named_buffers_with_meta

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The load-balanced split


def local_chunks(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of 2 * cp) that cp rank `cp_rank` holds, in its local order."""
    return cp_rank, 2 * cp - 1 - cp_rank


def gathered_chunk_order(cp: int) -> list[int]:
    """Global chunk index of each chunk of an all-gather in rank order: [0, 2cp-1, 1, 2cp-2, ...]."""
    return [g for r in range(cp) for g in local_chunks(cp, r)]


def local_positions(seq_len: int, cp: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """Global positions (int64) of this rank's s = seq_len / cp tokens."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(g * c, (g + 1) * c, device=device) for g in local_chunks(cp, cp_rank)])


def shard_sequence(x: torch.Tensor, dim: int, cp: int, cp_rank: int) -> torch.Tensor:
    """This rank's two chunks of `x` along `dim` (full sequence), concatenated."""
    if x.shape[dim] % (2 * cp):
        raise ValueError(f"sequence length ({x.shape[dim]}) is not divisible by 2 * cp ({2 * cp})")
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[g] for g in local_chunks(cp, cp_rank)], dim=dim)


def to_sequence_order(gathered: torch.Tensor, dim: int, cp: int) -> torch.Tensor:
    """Chunks all-gathered in rank order -> the full sequence in order (differentiable)."""
    chunks = gathered.chunk(2 * cp, dim=dim)
    slot_of = {g: slot for slot, g in enumerate(gathered_chunk_order(cp))}
    return torch.cat([chunks[slot_of[g]] for g in range(2 * cp)], dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather of a per-token tensor into sequence order; backward keeps this rank's chunks only
    (the result feeds a computation that every cp rank repeats identically, e.g. the mean loss)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return to_sequence_order(all_gather_dim(x, dim, group), dim, group_size(group))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return shard_sequence(grad, ctx.dim, group_size(ctx.group), group_rank(ctx.group)), None, None


def gather_sequence(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's chunks of a per-token tensor -> the full sequence on every cp rank."""
    if group_size(group) == 1:
        return x
    out: torch.Tensor = _GatherSequence.apply(x, dim, group)
    return out


# ---------------------------------------------------------------------------------------------
# Attention


def document_causal_attention(
    q_BSND: torch.Tensor, k_BSGD: torch.Tensor, v_BSGD: torch.Tensor, doc_BS: torch.Tensor | None = None
) -> torch.Tensor:
    """Single-device reference: causal GQA attention, restricted to the same document when `doc_BS`
    (a document id per token) is given."""
    S = q_BSND.shape[1]
    mask_BSS = torch.ones(S, S, dtype=torch.bool, device=q_BSND.device).tril().unsqueeze(0)
    if doc_BS is not None:
        mask_BSS = mask_BSS & (doc_BS[:, :, None] == doc_BS[:, None, :])
    return _masked_attention(q_BSND, k_BSGD, v_BSGD, mask_BSS)


def _masked_attention(
    q_BLND: torch.Tensor, k_BKGD: torch.Tensor, v_BKGD: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """SDPA with a boolean mask [B or 1, L, K] (True = attend) -> out_BLND."""
    q_BNLD, k_BGKD, v_BGKD = (t.transpose(1, 2) for t in (q_BLND, k_BKGD, v_BKGD))
    gqa = q_BNLD.shape[1] != k_BGKD.shape[1]
    out_BNLD = F.scaled_dot_product_attention(q_BNLD, k_BGKD, v_BGKD, attn_mask=mask.unsqueeze(1), enable_gqa=gqa)
    return out_BNLD.transpose(1, 2)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixCausalAttentionCPU(torch.autograd.Function):
    """Query chunk at offset p = g * c against keys [0, p + c) with a lower-right causal mask, without
    materialising a mask: a non-causal block over keys [0, p) and a causal c x c block over the
    diagonal keys, each through the CPU flash kernel, merged by their log-sum-exps. Backward runs the
    kernel's backward per block with the merged output and log-sum-exp, which gives exactly the
    gradients of the whole softmax (as ring attention does). Memory O(c + L) per head, no c x L mask."""

    @staticmethod
    def forward(ctx: Any, q_BNcD: torch.Tensor, k_BGLD: torch.Tensor, v_BGLD: torch.Tensor, prefix: int) -> Any:
        out_BNcD, lse_BNc = _FLASH_CPU(q_BNcD, k_BGLD[:, :, prefix:], v_BGLD[:, :, prefix:], 0.0, True)
        if prefix > 0:
            out_p, lse_p = _FLASH_CPU(q_BNcD, k_BGLD[:, :, :prefix], v_BGLD[:, :, :prefix], 0.0, False)
            lse = torch.logaddexp(lse_p, lse_BNc)
            out_BNcD = (lse_p - lse).exp().unsqueeze(-1) * out_p + (lse_BNc - lse).exp().unsqueeze(-1) * out_BNcD
            lse_BNc = lse
        out_BNcD = out_BNcD.to(q_BNcD.dtype)
        ctx.save_for_backward(q_BNcD, k_BGLD, v_BGLD, out_BNcD, lse_BNc)
        ctx.prefix = prefix
        return out_BNcD

    @staticmethod
    def backward(ctx: Any, grad_BNcD: torch.Tensor) -> Any:
        q, k, v, out, lse = ctx.saved_tensors
        p = ctx.prefix
        grad = grad_BNcD.contiguous()
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dq, dk[:, :, p:], dv[:, :, p:] = _FLASH_CPU_BACKWARD(
            grad, q, k[:, :, p:].contiguous(), v[:, :, p:].contiguous(), out, lse, 0.0, True
        )
        if p > 0:
            dq_p, dk[:, :, :p], dv[:, :, :p] = _FLASH_CPU_BACKWARD(
                grad, q, k[:, :, :p].contiguous(), v[:, :, :p].contiguous(), out, lse, 0.0, False
            )
            dq = dq + dq_p
        return dq, dk, dv, None


def prefix_causal_attention(q_BcND: torch.Tensor, k_BLGD: torch.Tensor, v_BLGD: torch.Tensor) -> torch.Tensor:
    """The last c = q length positions of a causal attention over L keys (lower-right causal) -> out_BcND.

    CPU: the mask-free flash-kernel blocks of `_PrefixCausalAttentionCPU`; elsewhere SDPA with an
    explicit c x L mask (exact, but O(c L) memory per layer)."""
    c, L = q_BcND.shape[1], k_BLGD.shape[1]
    if q_BcND.device.type != "cpu":
        mask_1cL = torch.ones(c, L, dtype=torch.bool, device=q_BcND.device).tril(L - c).unsqueeze(0)
        return _masked_attention(q_BcND, k_BLGD, v_BLGD, mask_1cL)
    q_BNcD, k_BGLD, v_BGLD = (t.transpose(1, 2) for t in (q_BcND, k_BLGD, v_BLGD))
    # the CPU flash kernel takes fewer KV heads (grouped-query attention) forward and backward
    out_BNcD: torch.Tensor = _PrefixCausalAttentionCPU.apply(q_BNcD, k_BGLD, v_BGLD, L - c)
    return out_BNcD.transpose(1, 2)


def context_parallel_attention(
    q_BsND: torch.Tensor,
    k_BsGD: torch.Tensor,
    v_BsGD: torch.Tensor,
    group: Group,
    doc_BsS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact causal attention of this rank's query chunks against the whole sequence's K/V.

    K/V (and the document ids, when given: one per local token, masking attention to the same
    document) are all-gathered over `group` and put in sequence order; local query chunk g attends
    to keys [0, (g+1) c) with a lower-right causal mask, so chunks straddling document boundaries see
    exactly the keys the single-device attention gives them.
    """
    cp, cp_rank = group_size(group), group_rank(group)
    s = q_BsND.shape[1]
    c = s // 2
    k_BSGD = to_sequence_order(gather_from_sequence(k_BsGD, 1, group), 1, cp)
    v_BSGD = to_sequence_order(gather_from_sequence(v_BsGD, 1, group), 1, cp)
    doc_BS = None if doc_BsS is None else to_sequence_order(all_gather_dim(doc_BsS, 1, group), 1, cp)
    outs = []
    for j, g in enumerate(local_chunks(cp, cp_rank)):
        q_BcND = q_BsND[:, j * c : (j + 1) * c]
        kv = (g + 1) * c
        if doc_BS is None or doc_BsS is None:
            outs.append(prefix_causal_attention(q_BcND, k_BSGD[:, :kv], v_BSGD[:, :kv]))
            continue
        q_pos_c = torch.arange(g * c, kv, device=q_BsND.device)
        mask_BcK = torch.arange(kv, device=q_BsND.device)[None, None, :] <= q_pos_c[None, :, None]
        mask_BcK = mask_BcK & (doc_BsS[:, j * c : (j + 1) * c, None] == doc_BS[:, None, :kv])
        outs.append(_masked_attention(q_BcND, k_BSGD[:, :kv], v_BSGD[:, :kv], mask_BcK))
    return torch.cat(outs, dim=1)


class ContextParallelAttention:
    """`Attention.core_attention` under cp (shared, not copied, by deep copies of the model)."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def __call__(self, q_BsND: torch.Tensor, k_BsGD: torch.Tensor, v_BsGD: torch.Tensor) -> torch.Tensor:
        return context_parallel_attention(q_BsND, k_BsGD, v_BsGD, self.group)

    def __deepcopy__(self, memo: dict[int, Any]) -> ContextParallelAttention:
        return self


class ContextParallelLoss:
    """`MoETransformer.token_loss` under cp: the inner loss on this rank's chunks of the labels, the
    per-token losses all-gathered back to the full sequence (every cp rank holds the same values)."""

    def __init__(self, inner: Any, group: Group) -> None:
        self.inner = inner
        self.group = group

    def __call__(self, logits_BsV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        cp = group_size(self.group)
        if labels_BS.shape[1] != logits_BsV.shape[1] * cp:
            raise ValueError(
                f"context parallel loss: labels have {labels_BS.shape[1]} positions, expected the full sequence"
                f" ({logits_BsV.shape[1]} local x cp {cp})"
            )
        return gather_sequence(self.inner(logits_BsV, self.local_labels(labels_BS)), 1, self.group)

    def local_labels(self, labels_BS: torch.Tensor) -> torch.Tensor:
        """This rank's chunks of the full-sequence labels."""
        return shard_sequence(labels_BS, 1, group_size(self.group), group_rank(self.group))

    def __deepcopy__(self, memo: dict[int, Any]) -> ContextParallelLoss:
        return self


class ContextParallelHeadLoss(ContextParallelLoss):
    """`MoETransformer.chunked_loss` (train.loss_chunk_tokens) under cp: the chunked head + loss on this
    rank's hidden states and label chunks, the per-token losses all-gathered to the full sequence."""

    def __call__(  # type: ignore[override]
        self, h_BsH: torch.Tensor, weight_VH: torch.Tensor, labels_BS: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        # h_BsH may also be split over tp (sequence parallel): the vocab-parallel inner loss gathers it
        local_BS = self.local_labels(labels_BS)
        return gather_sequence(self.inner(h_BsH, weight_VH, local_BS, chunk_tokens), 1, self.group)


# ---------------------------------------------------------------------------------------------
# Applying it to the model


def _shard_token_ids(module: nn.Module, cp: int, cp_rank: int) -> None:
    """The embedding sees only this rank's chunks of the token ids (runs before any other pre-hook)."""

    def shard(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (shard_sequence(args[0], 1, cp, cp_rank), *args[1:])

    module.register_forward_pre_hook(shard, prepend=True)


def _rope_global_positions(rope: nn.Module, cp: int, cp_rank: int) -> None:
    """Ask the tables for the full sequence (s * cp; TP's hook already turned S/(cp tp) into s) and
    return their rows at this rank's global positions, so that `apply_rope` rotates by global position."""

    def full_length(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * cp, *args[1:])

    def at_positions(_: nn.Module, args: tuple[Any, ...], out: tuple[torch.Tensor, torch.Tensor]) -> Any:
        positions_s = local_positions(args[0], cp, cp_rank, out[0].device)
        return tuple(t[positions_s] for t in out)

    rope.register_forward_pre_hook(full_length)
    rope.register_forward_hook(at_positions)


def _dp_to_dp_cp(kinds: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("dp_cp" if kind == "dp" else kind for kind in kinds)


def _fold_cp_into_metas(model: nn.Module) -> None:
    """Dense parameters and buffers: summed over / replicated over dp x cp instead of dp."""
    metas: list[ParamMeta] = list(ensure_meta(model).values())
    metas += [meta for _, _, meta in named_buffers_with_meta(model)]
    for meta in metas:
        meta.grad_sum_kinds = _dp_to_dp_cp(meta.grad_sum_kinds)
        meta.replicated_kinds = _dp_to_dp_cp(meta.replicated_kinds)


def apply_context_parallel(model: nn.Module, groups: ProcessGroups) -> None:
    """Split sequences over groups.cp (see the module docstring); no-op when cp == 1. In place."""
    cp, cp_rank = groups.cp_size, groups.cp_rank
    if cp == 1:
        return
    if not isinstance(model, MoETransformer):
        raise TypeError(f"apply_context_parallel expects a MoETransformer, got {type(model).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(f"context parallelism (cp {cp}) needs torch.distributed")
    core = ContextParallelAttention(groups.cp)
    for module in model.modules():
        if isinstance(module, Attention):
            module.core_attention = core
    if model.tok_embeddings is not None:
        _shard_token_ids(model.tok_embeddings, cp, cp_rank)
    _rope_global_positions(model.rope, cp, cp_rank)
    model.token_loss = ContextParallelLoss(model.token_loss, groups.cp)
    model.chunked_loss = ContextParallelHeadLoss(model.chunked_loss, groups.cp)
    _fold_cp_into_metas(model)
    logger.info("context parallel applied: cp rank %d/%d holds chunks %s", cp_rank, cp, local_chunks(cp, cp_rank))
