"""Tensor parallelism with sequence parallelism (Megatron-LM, arXiv 1909.08053 and 2205.05198).

Legend: B batch, S full sequence, s = S/tp this rank's sequence chunk, H hidden, V vocabulary,
v = V/tp this rank's vocabulary shard, T tokens (B*s or B*S, flattened), N = B*S rows of the loss.

`apply_tensor_parallel(model, groups)` turns the single-device `MoETransformer` (or a pruned pipeline
stage of it) into its tensor-parallel shard, in place. Between blocks the hidden state is
sequence-parallel: [B, s, H] on every tp rank, chunk `tp_rank` of the sequence.

    tokens_BS (full, same on every tp rank)
      -> vocab-parallel embedding (rows [v0, v1), others 0) -> reduce-scatter over S -> h_BsH
    block: attention_norm (replicated) -> all-gather S -> wq/wk/wv (column: this rank's heads)
           -> RoPE on full positions -> attention -> wo (row, partial sums) -> reduce-scatter S
           ffn_norm (replicated) -> dense MLP: all-gather S -> w1/w3 column, w2 row -> reduce-scatter S
                                 -> MoE layer on the local tokens T = B*s (router, routed experts:
                                    expert_parallel.py); shared experts: all-gather T -> column/row
                                    MLP -> reduce-scatter T
    norm (replicated) -> all-gather S -> output (vocab rows [v0, v1)) -> logits_BSv
      -> vocab-parallel cross entropy -> token_loss_BS (full, identical on every tp rank)

How it is attached, and why: sharded layers stay the model's own `nn.Linear`s with a weight slice;
the sequence gather / reduce-scatter around a region are forward (pre-)hooks on the module. So every
parameter keeps its single-device FQN (checkpoints and `ensure_meta` defaults stay right) and no model
code changes. Hooks are closures: `copy.deepcopy` (pipeline chunks) shares them and their process
group instead of trying to copy the group (a ProcessGroup cannot be copied).

The loss: the model computes its per-token loss through its `token_loss` attribute; this module
sets it to `VocabParallelLoss`, the vocab-parallel cross entropy over the head's vocab-shard logits.

ParamMeta (see param_meta.py) is set on every parameter: column-parallel and vocab-parallel weights
shards [("tp", 0)], row-parallel [("tp", 1)]; parameters replicated inside the sequence-parallel
region (attention/ffn/final norms, q/k norms, router gates) grad_sum_kinds = replicated_kinds =
("dp", "tp"): each tp rank's gradient covers only its own sequence chunk (or, for q/k norm, its heads).
Routed experts without metadata get the expert default (summed and replicated over "edp", which with
ep == etp == 1 contains the tp ranks); expert parallelism replaces it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_train.model.attention import Attention
from moe_train.model.loss import chunked_linear_cross_entropy
from moe_train.model.mlp import FeedForward
from moe_train.model.moe.experts import GroupedExperts
from moe_train.model.moe.layer import MoELayer
from moe_train.model.transformer import IGNORE_INDEX, MoETransformer, TransformerBlock
from moe_train.parallel.collectives import (
    Group,
    all_reduce_max,
    all_reduce_sum,
    gather_from_sequence,
    group_size,
    reduce_scatter_to_sequence,
)
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.param_meta import ParamMeta, get_meta, set_meta, shard_slice

logger = logging.getLogger(__name__)

SEQUENCE_REPLICATED = ("dp", "tp")
"""grad_sum_kinds / replicated_kinds of parameters replicated inside the sequence-parallel region."""


class _SharedGroup:
    """Holds a process group for a module attribute; `copy.deepcopy` shares it instead of copying."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedGroup:
        return self


# ---------------------------------------------------------------------------------------------
# Vocab-parallel cross entropy


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross entropy over logits split by vocabulary across `group`, never gathering them.

    Forward: global max (all-reduce MAX), sum of exp (all-reduce SUM), target logit (all-reduce SUM,
    only the rank owning the label contributes). Backward: softmax_local - onehot_local, scaled by
    the incoming gradient; no communication (each rank owns its logits' full gradient).
    """

    @staticmethod
    def forward(
        ctx: Any, logits_Nv: torch.Tensor, labels_N: torch.Tensor, vocab_start: int, group: Group
    ) -> torch.Tensor:
        """-> loss_N (fp32), 0 where labels_N == IGNORE_INDEX."""
        x_Nv = logits_Nv.float()
        max_N = all_reduce_max(x_Nv.max(dim=-1).values, group)
        shifted_Nv = x_Nv - max_N.unsqueeze(-1)
        exp_Nv = shifted_Nv.exp()
        sum_exp_N = all_reduce_sum(exp_Nv.sum(dim=-1), group)
        local_N = labels_N - vocab_start
        owned_N = (local_N >= 0) & (local_N < x_Nv.shape[-1])
        index_N1 = local_N.clamp(0, x_Nv.shape[-1] - 1).unsqueeze(-1)
        target_N = shifted_Nv.gather(-1, index_N1).squeeze(-1).masked_fill(~owned_N, 0.0)
        target_N = all_reduce_sum(target_N, group)
        ignored_N = labels_N == IGNORE_INDEX
        loss_N = (sum_exp_N.log() - target_N).masked_fill(ignored_N, 0.0)
        softmax_Nv = exp_Nv.div_(sum_exp_N.unsqueeze(-1))
        ctx.save_for_backward(softmax_Nv, index_N1, owned_N, ignored_N)
        ctx.logits_dtype = logits_Nv.dtype
        return loss_N

    @staticmethod
    def backward(ctx: Any, grad_loss_N: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """d loss_n / d logits_nj = softmax_nj - [j == label_n]; ignored rows get 0."""
        softmax_Nv, index_N1, owned_N, ignored_N = ctx.saved_tensors
        onehot_N1 = owned_N.to(softmax_Nv.dtype).unsqueeze(-1)
        grad_Nv = softmax_Nv.scatter_add(-1, index_N1, -onehot_N1)
        grad_Nv = grad_Nv * grad_loss_N.float().masked_fill(ignored_N, 0.0).unsqueeze(-1)
        return grad_Nv.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits_BSv: torch.Tensor, labels_BS: torch.Tensor, vocab_start: int, group: Group
) -> torch.Tensor:
    """Per-token fp32 cross entropy of vocab-sharded logits -> loss_BS, identical on every rank of `group`.

    `logits_BSv` holds vocabulary entries [vocab_start, vocab_start + v) of every token; equals
    `token_cross_entropy` on the gathered logits (0 where labels == IGNORE_INDEX). With `group` None it
    is the cross entropy over the local entries only (which is wrong for a real shard: the twin test).
    """
    loss_N = _VocabParallelCrossEntropy.apply(logits_BSv.flatten(0, 1), labels_BS.flatten(), vocab_start, group)
    return loss_N.view(labels_BS.shape)


# ---------------------------------------------------------------------------------------------
# Modules and hooks


class VocabParallelEmbedding(nn.Embedding):
    """Embedding rows [vocab_start, vocab_start + v) of the table; other ids embed to 0, then the
    partial embeddings are summed over tp and scattered along the sequence -> h_BsH."""

    def __init__(self, weight_vH: torch.Tensor, vocab_start: int, group: Group) -> None:
        super().__init__(weight_vH.shape[0], weight_vH.shape[1], device="meta")
        self.weight = nn.Parameter(weight_vH)
        self.vocab_start = vocab_start
        self._group = _SharedGroup(group)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Full tokens_BS (same on every tp rank) -> this rank's sequence chunk h_BsH."""
        tp = group_size(self._group.group)
        if tokens_BS.shape[1] % tp:
            raise ValueError(f"sequence length ({tokens_BS.shape[1]}) is not divisible by tp ({tp})")
        local_BS = tokens_BS - self.vocab_start
        outside_BS = (local_BS < 0) | (local_BS >= self.num_embeddings)
        h_BSH = F.embedding(local_BS.masked_fill(outside_BS, 0), self.weight)
        h_BSH = h_BSH.masked_fill(outside_BS.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence(h_BSH, 1, self._group.group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vocab_start={self.vocab_start}"


def _sequence_parallel_region(module: nn.Module, seq_dim: int, group: Group) -> None:
    """Gather the module's first input along `seq_dim` before it runs; reduce-scatter its output."""

    def gather_input(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args:
            raise TypeError(f"{type(module).__name__} under sequence parallelism takes its input positionally")
        return (gather_from_sequence(args[0], seq_dim, group), *args[1:])

    def scatter_output(_: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return reduce_scatter_to_sequence(out, seq_dim, group)

    module.register_forward_pre_hook(gather_input)
    module.register_forward_hook(scatter_output)


def _gather_input_only(module: nn.Module, seq_dim: int, group: Group) -> None:
    """Gather the module's first input along `seq_dim` (the output head: logits stay full-sequence)."""

    def gather_input(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (gather_from_sequence(args[0], seq_dim, group), *args[1:])

    module.register_forward_pre_hook(gather_input)


def _rope_full_sequence(rope: nn.Module, tp: int) -> None:
    """Blocks see s = S/tp rows but attention runs on the gathered S: ask the tables for S positions."""

    def full_length(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * tp, *args[1:])

    rope.register_forward_pre_hook(full_length)


# ---------------------------------------------------------------------------------------------
# Parameter sharding and metadata


def _check_divisible(name: str, size: int, what: str, tp: int) -> None:
    if size % tp:
        raise ValueError(f"{name}: {what} ({size}) is not divisible by tp ({tp})")


def _shard_linear(lin: nn.Linear, name: str, dim: int, groups: ProcessGroups) -> None:
    """Keep this tp rank's chunk of `lin.weight` along `dim` (0 column-, 1 row-parallel) and record it."""
    full = lin.weight
    meta = get_meta(full)
    if meta is not None and any(kind == "tp" for kind, _ in meta.shards):
        raise RuntimeError(f"{name} is already tensor-parallel (apply_tensor_parallel called twice?)")
    _check_divisible(name, full.shape[dim], f"dim {dim}", groups.tp_size)
    with torch.no_grad():
        shard = shard_slice(full.detach(), dim, groups.tp_rank, groups.tp_size)
    lin.weight = nn.Parameter(shard, requires_grad=full.requires_grad)
    lin.out_features, lin.in_features = shard.shape
    set_meta(lin.weight, ParamMeta(name, tuple(full.shape), shards=[("tp", dim)]))


def _mark_sequence_replicated(param: torch.Tensor, name: str) -> None:
    """A replicated parameter whose per-rank gradient covers only this rank's sequence chunk (or heads)."""
    set_meta(param, ParamMeta(name, tuple(param.shape), [], SEQUENCE_REPLICATED, SEQUENCE_REPLICATED))


def _mark_expert_default(experts: GroupedExperts, prefix: str) -> None:
    """Routed experts see each rank's own tokens: grads summed over "edp" (set unless EP already did)."""
    for name, param in experts.named_parameters():
        if get_meta(param) is None:
            meta = ParamMeta(prefix + name, tuple(param.shape), [], ("edp",), ("edp",), is_expert=True)
            set_meta(param, meta)


def _parallelize_mlp(ffn: FeedForward, prefix: str, seq_dim: int, groups: ProcessGroups) -> None:
    """SwiGLU MLP: w1/w3 column-, w2 row-parallel, inside a sequence-parallel region along `seq_dim`."""
    _shard_linear(ffn.w1, prefix + "w1.weight", 0, groups)
    _shard_linear(ffn.w3, prefix + "w3.weight", 0, groups)
    _shard_linear(ffn.w2, prefix + "w2.weight", 1, groups)
    _sequence_parallel_region(ffn, seq_dim, groups.tp)


def _parallelize_attention(attn: Attention, prefix: str, groups: ProcessGroups) -> None:
    """Heads split contiguously over tp (q and kv alike, so GQA groups stay together); wo row-parallel."""
    num_heads, num_kv_heads = attn.wq.out_features // attn.head_dim, attn.wk.out_features // attn.head_dim
    _check_divisible(prefix + "wq", num_heads, "num_heads", groups.tp_size)
    _check_divisible(prefix + "wk", num_kv_heads, "num_kv_heads", groups.tp_size)
    for lin, key in ((attn.wq, "wq"), (attn.wk, "wk"), (attn.wv, "wv")):
        _shard_linear(lin, f"{prefix}{key}.weight", 0, groups)
    _shard_linear(attn.wo, prefix + "wo.weight", 1, groups)
    for norm, key in ((attn.q_norm, "q_norm"), (attn.k_norm, "k_norm")):
        if norm is not None:
            _mark_sequence_replicated(norm.weight, f"{prefix}{key}.weight")
    _sequence_parallel_region(attn, 1, groups.tp)


def _parallelize_block(block: TransformerBlock, prefix: str, groups: ProcessGroups) -> None:
    """Attention and FFN of one block; norms and the router gate are sequence-replicated."""
    _mark_sequence_replicated(block.attention_norm.weight, prefix + "attention_norm.weight")
    _mark_sequence_replicated(block.ffn_norm.weight, prefix + "ffn_norm.weight")
    _parallelize_attention(block.attention, prefix + "attention.", groups)
    if block.feed_forward is not None:
        _parallelize_mlp(block.feed_forward, prefix + "feed_forward.", 1, groups)
    if block.moe is not None:
        _parallelize_moe(block.moe, prefix + "moe.", groups)


def _parallelize_moe(moe: MoELayer, prefix: str, groups: ProcessGroups) -> None:
    """The MoE layer runs on the local SP tokens; only its shared experts are tensor-parallel (over T)."""
    _mark_sequence_replicated(moe.router.gate.weight, prefix + "router.gate.weight")
    if moe.shared_experts is not None:
        _parallelize_mlp(moe.shared_experts, prefix + "shared_experts.", 0, groups)
    _mark_expert_default(moe.experts, prefix + "experts.")


# ---------------------------------------------------------------------------------------------
# Embedding, head and loss


def _parallelize_embedding(model: MoETransformer, groups: ProcessGroups) -> None:
    """Vocab-parallel input embedding and/or output head (sharing one vocab shard when tied)."""
    emb, out = model.tok_embeddings, model.output
    tied = emb is not None and out is not None and out.weight is emb.weight
    full = emb.weight if emb is not None else (out.weight if out is not None else None)
    if full is None:
        return
    vocab_size, tp = full.shape[0], groups.tp_size
    _check_divisible("tok_embeddings/output", vocab_size, "vocab_size", tp)
    vocab_start = groups.tp_rank * (vocab_size // tp)
    if emb is not None:
        emb_shard = shard_slice(emb.weight.detach(), 0, groups.tp_rank, tp)
        model.tok_embeddings = VocabParallelEmbedding(emb_shard, vocab_start, groups.tp)
        set_meta(model.tok_embeddings.weight, ParamMeta("tok_embeddings.weight", tuple(full.shape), [("tp", 0)]))
    if out is not None:
        if tied:
            assert model.tok_embeddings is not None
            out.weight = model.tok_embeddings.weight
            out.out_features = out.weight.shape[0]
        else:
            name = "tok_embeddings.weight" if model.model_cfg.tie_embeddings else "output.weight"
            _shard_linear(out, name, 0, groups)
        _gather_input_only(out, 1, groups.tp)
        model.token_loss = VocabParallelLoss(vocab_start, groups.tp)
        model.chunked_loss = VocabParallelChunkedLoss(vocab_start, groups.tp)


class VocabParallelLoss:
    """`MoETransformer.token_loss` under TP: vocab-parallel cross entropy over this rank's logit shard.

    Shared, not copied, by deep copies of the model (a process group cannot be copied).
    """

    def __init__(self, vocab_start: int, group: Group) -> None:
        self.vocab_start = vocab_start
        self.group = group

    def __call__(self, logits_BSv: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits_BSv, labels_BS, self.vocab_start, self.group)

    def __deepcopy__(self, memo: dict[int, Any]) -> VocabParallelLoss:
        return self


class _GroupReduce:
    """`moe_train.model.loss.VocabReduce` over a process group (plain all-reduces, no autograd)."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def max(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelChunkedLoss:
    """`MoETransformer.chunked_loss` under TP: gather the sequence shards of the normed hidden state
    (the head's own input hook, done here since the chunked path bypasses the head module), then the
    chunked head + cross entropy over this rank's vocab rows with the max / sum-exp / target reduced
    over tp. The gather's backward reduce-scatters the partial grad_h of every vocab shard."""

    def __init__(self, vocab_start: int, group: Group) -> None:
        self.vocab_start = vocab_start
        self.group = group

    def __call__(
        self, h_BsH: torch.Tensor, weight_vH: torch.Tensor, labels_BS: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        h_BSH = gather_from_sequence(h_BsH, 1, self.group)
        return chunked_linear_cross_entropy(
            h_BSH, weight_vH, labels_BS, chunk_tokens, self.vocab_start, _GroupReduce(self.group)
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> VocabParallelChunkedLoss:
        return self


# ---------------------------------------------------------------------------------------------
# Entry point


def apply_tensor_parallel(model: nn.Module, groups: ProcessGroups) -> None:
    """Shard `model` (a full `MoETransformer` or a pruned stage of one) over groups.tp, in place.

    No-op when groups.tp_size == 1. Expects the single-device model (real, or on the meta device and
    materialised per shard afterwards, moe_train.parallel.materialize):
    each rank keeps its slice. Afterwards every parameter carries a ParamMeta; raises if a parameter
    has no known placement (a new module type would otherwise get silently wrong gradients).
    """
    if groups.tp_size == 1:
        return
    if not isinstance(model, MoETransformer):
        raise TypeError(f"apply_tensor_parallel expects a MoETransformer, got {type(model).__name__}")
    for key, block in model.layers.items():
        assert isinstance(block, TransformerBlock)
        _parallelize_block(block, f"layers.{key}.", groups)
    if model.norm is not None:
        _mark_sequence_replicated(model.norm.weight, "norm.weight")
    _parallelize_embedding(model, groups)
    _rope_full_sequence(model.rope, groups.tp_size)
    missing = [name for name, p in model.named_parameters() if get_meta(p) is None]
    if missing:
        raise RuntimeError(f"tensor parallel: no placement for parameters {missing} (teach tensor_parallel.py)")
    logger.info("tensor parallel applied: tp rank %d/%d, sequence parallel on", groups.tp_rank, groups.tp_size)
