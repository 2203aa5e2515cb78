"""Decoder-only MoE transformer, written for one device (parallelism is applied from outside).

Legend: B batch, S sequence, H hidden, V vocabulary, L MoE layers, E experts, R = head_dim/2.

Pipeline stages prune modules: `tok_embeddings`, `norm` and `output` may be set to None and
entries of `layers` deleted; `embed` / `head` then pass their input through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.attention import Attention
from moe_train.model.loss import IGNORE_INDEX, chunked_linear_cross_entropy
from moe_train.model.mlp import FeedForward
from moe_train.model.moe.experts import GroupedExperts
from moe_train.model.moe.layer import MoELayer, MoEStats
from moe_train.model.moe.router import TopKRouter
from moe_train.model.norms import RMSNorm
from moe_train.model.recompute import RECOMPUTE_MODES, checkpoint_guarded
from moe_train.model.rope import RotaryEmbedding

HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(normed h_BSH, output weight, labels_BS, chunk tokens) -> loss_BS, without the full logits."""


@dataclass
class ModelOutput:
    """Result of `MoETransformer.forward`."""

    token_loss_BS: torch.Tensor | None
    """fp32 per-token cross entropy, unreduced (0 where labels == IGNORE_INDEX); None without labels."""
    logits_BSV: torch.Tensor | None
    """Logits; None when labels are given unless return_logits=True."""
    lbl: torch.Tensor
    """Mean over MoE layers of the load-balancing loss (detached, unweighted)."""
    zloss: torch.Tensor
    """Mean over MoE layers of the router z-loss (detached, unweighted)."""
    tokens_per_expert_LE: torch.Tensor
    """Assignments per expert (before drops) of each MoE layer, in layer order (detached)."""


class TransformerBlock(nn.Module):
    """Pre-norm block: h + attention(norm(h)), then h + ffn(norm(h)) with a dense MLP or an MoE layer."""

    def __init__(self, layer_id: int, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        m = model_cfg
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.attention = Attention(
            m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.qk_norm, m.norm_eps, m.qk_norm_scope
        )
        self.ffn_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.moe_enabled = layer_id >= moe_cfg.first_k_dense
        self.moe: MoELayer | None = None
        self.feed_forward: FeedForward | None = None
        if self.moe_enabled:
            num_moe_layers = m.num_layers - moe_cfg.first_k_dense
            self.moe = MoELayer(m.hidden_size, moe_cfg, num_moe_layers, layer_id)
        else:
            self.feed_forward = FeedForward(m.hidden_size, m.ffn_hidden_size)
        self.recompute_full = False
        """train.recompute 'full': keep only the block's input, run the block again in backward."""
        self.attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = self._attend
        """h + attention(norm(h)); train.compile swaps in its compiled version."""
        self.ffn_residual: Callable[[torch.Tensor], torch.Tensor] = self._ffn_residual
        """h + ffn(norm(h)); train.compile swaps in one with the dense MLP (or the norm) compiled."""

    def forward(self, h_BSH: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        """h_BSH -> h_BSH."""
        if self.recompute_full and torch.is_grad_enabled():
            return checkpoint_guarded(self._block, self, h_BSH, cos_SR, sin_SR)
        return self._block(h_BSH, cos_SR, sin_SR)

    def _block(self, h_BSH: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        return self.ffn_residual(self.attend(h_BSH, cos_SR, sin_SR))

    def _attend(self, h_BSH: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        return h_BSH + self.attention(self.attention_norm(h_BSH), cos_SR, sin_SR)

    def _ffn_residual(self, h_BSH: torch.Tensor) -> torch.Tensor:
        ffn = self.moe if self.moe is not None else self.feed_forward
        assert ffn is not None
        return h_BSH + ffn(self.ffn_norm(h_BSH))

    def compile_dense_parts(self) -> None:
        """train.compile: torch.compile the attention half and the dense MLP half; an MoE layer (data
        dependent shapes) stays eager, only its input norm is compiled."""
        self.attend = torch.compile(self._attend)
        if self.moe is None:
            self.ffn_residual = torch.compile(self._ffn_residual)
        else:
            self.ffn_norm.compile()


class MoETransformer(nn.Module):
    """tok_embeddings -> layers["0".."L-1"] -> norm -> output (tied to tok_embeddings if configured)."""

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, max_seq_len: int = 0) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.moe_cfg = moe_cfg
        m = model_cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(m.vocab_size, m.hidden_size)
        self.rope = RotaryEmbedding(m.head_dim, m.rope_theta, max_seq_len)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, m, moe_cfg) for i in range(m.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(m.hidden_size, m.norm_eps)
        self.output: nn.Linear | None = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.token_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = token_cross_entropy
        """Per-token loss from (logits_BSV, labels_BS); tensor parallelism swaps in a vocab-parallel one."""
        self.loss_chunk_tokens = 0
        """train.loss_chunk_tokens: > 0 computes head + loss over chunks of tokens (moe_train.model.loss)."""
        self.chunked_loss: HeadLoss = chunked_linear_cross_entropy
        """The chunked head + loss; tensor parallelism swaps in the vocab-parallel one."""
        self.head_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._head_loss
        """(h_BSH, labels_BS) -> loss_BS via the full logits; train.compile swaps in its compiled version."""
        init_weights(self, m.init_std)

    def embed(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Token ids -> h_BSH (identity on a pipeline stage without embeddings)."""
        return self.tok_embeddings(tokens_BS) if self.tok_embeddings is not None else tokens_BS

    def run_layers(self, h_BSH: torch.Tensor) -> torch.Tensor:
        """Run the (remaining) transformer blocks in key order."""
        cos_SR, sin_SR = self.rope(h_BSH.shape[1], h_BSH.device)
        for layer in self.layers.values():
            h_BSH = layer(h_BSH, cos_SR, sin_SR)
        return h_BSH

    def head(self, h_BSH: torch.Tensor) -> torch.Tensor:
        """Final norm + output projection -> logits_BSV (identity where pruned)."""
        if self.norm is not None:
            h_BSH = self.norm(h_BSH)
        return self.output(h_BSH) if self.output is not None else h_BSH

    def forward(
        self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor | None = None, return_logits: bool = False
    ) -> ModelOutput:
        """Full forward on one device; per-token fp32 cross entropy when labels are given."""
        h_BSH = self.run_layers(self.embed(tokens_BS))
        token_loss_BS = logits_BSV = None
        if labels_BS is not None and self.loss_chunk_tokens > 0 and self.output is not None and not return_logits:
            normed_BSH = self.norm(h_BSH) if self.norm is not None else h_BSH
            token_loss_BS = self.chunked_loss(normed_BSH, self.output.weight, labels_BS, self.loss_chunk_tokens)
        elif labels_BS is not None and not return_logits:
            token_loss_BS = self.head_loss(h_BSH, labels_BS)
        else:
            logits_BSV = self.head(h_BSH)
            if labels_BS is not None:
                token_loss_BS = self.token_loss(logits_BSV, labels_BS)
        lbl, zloss, tokens_per_expert_LE = summarise_moe_stats(self, h_BSH.device)
        return ModelOutput(
            token_loss_BS=token_loss_BS,
            logits_BSV=logits_BSV if (labels_BS is None or return_logits) else None,
            lbl=lbl,
            zloss=zloss,
            tokens_per_expert_LE=tokens_per_expert_LE,
        )

    def _head_loss(self, h_BSH: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        return self.token_loss(self.head(h_BSH), labels_BS)


def set_compile(model: nn.Module, enabled: bool) -> None:
    """train.compile: regional torch.compile of every block's dense parts and of the final norm + head +
    cross entropy (after any sharding; the compiled code reads the modules' current parameters)."""
    if not enabled:
        return
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile_dense_parts()
        elif isinstance(module, MoETransformer):
            module.head_loss = torch.compile(module._head_loss)


def set_recompute(model: nn.Module, mode: str) -> None:
    """Activation recompute of every block in `model` (train.recompute; see moe_train.model.recompute)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"train.recompute ({mode!r}) must be one of {', '.join(RECOMPUTE_MODES)}")
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.recompute_full = mode == "full"
        elif isinstance(module, (Attention, FeedForward, GroupedExperts)):
            module.recompute = mode == "selective"


def set_loss_chunking(model: nn.Module, chunk_tokens: int) -> None:
    """train.loss_chunk_tokens on every (pipeline chunk of a) model: > 0 never holds [B, S, V] logits."""
    if chunk_tokens < 0:
        raise ValueError(f"train.loss_chunk_tokens ({chunk_tokens}) must be >= 0")
    for module in model.modules():
        if isinstance(module, MoETransformer):
            module.loss_chunk_tokens = chunk_tokens


def token_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Unreduced cross entropy per token, computed on fp32 logits -> loss_BS."""
    loss_N = F.cross_entropy(
        logits_BSV.float().flatten(0, 1), labels_BS.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    )
    return loss_N.view(labels_BS.shape)


def collect_moe_stats(model: nn.Module) -> dict[int, MoEStats]:
    """Last-forward stats of every MoE layer in `model` (e.g. one pipeline stage), keyed by layer id."""
    found = {m.layer_id: m.last_stats for m in model.modules() if isinstance(m, MoELayer)}
    return {i: s for i, s in sorted(found.items()) if s is not None}


def summarise_moe_stats(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean lbl, mean z-loss, tokens_per_expert_LE) over the MoE layers in `model`; zeros if none."""
    stats = list(collect_moe_stats(model).values())
    if not stats:
        zero = torch.zeros((), device=device)
        return zero, zero, torch.zeros(0, 0, dtype=torch.long, device=device)
    return (
        torch.stack([s.lbl for s in stats]).mean(),
        torch.stack([s.zloss for s in stats]).mean(),
        torch.stack([s.tokens_per_expert_E for s in stats]),
    )


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Gradient the aux losses receive in backward; use the factor the LM loss is multiplied by
    before backward (e.g. 1 / gradient-accumulation steps)."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.aux_loss_scale = scale


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """normal(0, std) everywhere; wo / w2 / w2_EFH use std / sqrt(2 * num_layers); norms ones.

    Deterministic given torch.manual_seed (modules are visited in registration order). Also
    recomputes the RoPE tables (needed after materialising from the meta device).
    """
    num_layers = model.model_cfg.num_layers if isinstance(model, MoETransformer) else 1
    out_std = std / math.sqrt(2 * num_layers)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, Attention):
            for lin in (module.wq, module.wk, module.wv):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(module.wo.weight, std=out_std)
        elif isinstance(module, FeedForward):
            nn.init.normal_(module.w1.weight, std=std)
            nn.init.normal_(module.w3.weight, std=std)
            nn.init.normal_(module.w2.weight, std=out_std)
        elif isinstance(module, GroupedExperts):
            module.reset_parameters(std, out_std)
        elif isinstance(module, TopKRouter):
            nn.init.normal_(module.gate.weight, std=std)
        elif isinstance(module, RotaryEmbedding):
            module.reset()
    if isinstance(model, MoETransformer) and model.output is not None and not model.model_cfg.tie_embeddings:
        nn.init.normal_(model.output.weight, std=std)
