"""Load balancing of one MoE layer: over which tokens the LBL counts f_i and p_i, and the expert bias.

Legend: B sequences, s tokens of each sequence on this rank, T = B*s tokens, E experts, K top_k.

Scopes (moe.lbl.scope), the LBL being N_E * sum_i f_i * p_i:

* ``micro_batch``: f and p over this forward's tokens (all sequence-parallel shards of the micro-batch,
  through the layer's `stats_reducer`).
* ``sequence``: f and p per sequence, averaged over the forward's sequences (DeepSeek-V2/V3).
* ``global``: f over the optimizer step's whole global batch, p over this forward's tokens
  (`global_lbl_share`; arXiv 2501.11873). Where the step's f comes from (moe.lbl.global_mode):

  - ``exact``: `set_global_counts` before the step's training forwards, from a no-grad counting pass
    over every micro-batch (moe_train.parallel.load_balance) summed over the ``lbl`` group;
  - ``streaming``: the counts of this step so far (summed over the ``lbl`` group after each forward by
    `count_reducer`) plus, for the tokens not seen yet, last step's share `last_f_E` (a buffer, so it
    is checkpointed); the first step of a run falls back to ``running_mean``;
  - ``running_mean``: the counts of this step so far, as Megatron-Core's global_aux_loss (normalised
    by the tokens seen so far, which fixes its issue #7213).

  Outside a training step (validation, a model used on its own), and in exact mode without the step's
  counts (the trainer skips the counting pass when moe.lbl.coeff is 0), a forward is its own global
  batch: the reported value is then the micro-batch LBL.

Step protocol, driven by moe_train.parallel.load_balance.StepBalancer: `start_step`, then (exact mode)
forwards with `counting` on and `set_global_counts`, then the training forwards (each records its local
per-sequence counts in `seq_counts`), then `end_step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from moe_train.model.moe.losses import global_lbl_share, load_balancing_loss, sequence_load_balancing_loss
from moe_train.model.moe.router import Routing
from moe_train.model.recompute import ReplayGuarded

CountReducer = Callable[[torch.Tensor], torch.Tensor]
"""Sums per-expert counts over every rank of the pipeline stage (the ``lbl`` group); installed by the
parallel code for the streaming modes (identity, i.e. None, in one process)."""


def per_sequence_counts(topk_idx_TK: torch.Tensor, batch_size: int, num_experts: int) -> torch.Tensor:
    """Assignments per sequence and expert, counts_BE (int64), from the top-k choices of B*s tokens."""
    idx_BN = topk_idx_TK.reshape(batch_size, -1)
    counts_BE = torch.zeros(batch_size, num_experts, dtype=torch.long, device=idx_BN.device)
    return counts_BE.scatter_add_(1, idx_BN, torch.ones_like(idx_BN))


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free update, in place: bias_i += rate * sign(mean load - load_i)."""
    load_E = counts_E.to(torch.float64)
    bias_E += (rate * torch.sign(load_E.mean() - load_E)).to(bias_E.dtype)


class LayerBalance(nn.Module, ReplayGuarded):
    """The LBL scope of one MoE layer and its per-step state (see the module docstring).

    Under activation recompute a forward may run twice; the per-step state changes once
    (`ReplayGuarded.once`, moe_train.model.recompute)."""

    last_f_E: torch.Tensor | None

    def __init__(self, num_experts: int, top_k: int, scope: str = "micro_batch", global_mode: str = "exact") -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.scope, self.global_mode = scope, global_mode
        self.count_reducer: CountReducer | None = None
        streaming = scope == "global" and global_mode == "streaming"
        self.register_buffer("last_f_E", torch.zeros(num_experts) if streaming else None)
        self.recording = False
        """Inside a training step: record each forward's local per-sequence counts."""
        self.counting = False
        """Counting pass: record counts only (no aux loss, no statistics)."""
        self.global_tokens = 0
        self.share_tokens = 0.0
        self.global_counts_E: torch.Tensor | None = None
        self.seen_counts_E: torch.Tensor | None = None
        self.counted_E: torch.Tensor | None = None
        self.seq_counts: list[torch.Tensor] = []

    # -- the step protocol --------------------------------------------------------------------

    def start_step(self, global_tokens: int, share_tokens: float) -> None:
        """A step over `global_tokens` tokens begins, cut into shares of `share_tokens` per forward."""
        self.global_tokens, self.share_tokens = global_tokens, share_tokens
        self.global_counts_E = self.seen_counts_E = self.counted_E = None
        self.seq_counts = []
        self.recording = True

    def set_global_counts(self, counts_E: torch.Tensor) -> None:
        """Exact mode: the step's per-expert counts over the whole global batch."""
        self.global_counts_E = counts_E

    def end_step(self, global_counts_E: torch.Tensor) -> None:
        """The step is over; `global_counts_E` are its counts over the global batch (streaming keeps them)."""
        if self.last_f_E is not None:
            total = global_counts_E.sum().clamp(min=1)
            self.last_f_E.copy_((global_counts_E.to(torch.float64) / total).to(self.last_f_E.dtype))
        self.recording = False
        self.global_counts_E = self.seen_counts_E = None

    # -- per forward ----------------------------------------------------------------------------

    def observe(self, routing: Routing, batch_size: int) -> Routing:
        """Record this forward's local counts; add per-sequence statistics for the sequence scope."""
        if self.counting:
            counts_E = routing.tokens_per_expert_E.detach()
            self.counted_E = counts_E.clone() if self.counted_E is None else self.counted_E + counts_E
            return routing
        if not (self.recording or self.scope == "sequence"):
            return routing
        counts_BE = per_sequence_counts(routing.topk_idx_TK, batch_size, self.num_experts)
        if self.recording:
            self.once(lambda: self.seq_counts.append(counts_BE))
        if self.scope != "sequence":
            return routing
        if routing.probs_TE is None:
            raise ValueError("moe.lbl.scope 'sequence' needs the router's per-token probabilities (Routing.probs_TE)")
        seq_len = routing.num_tokens // batch_size
        prob_sum_BE = routing.probs_TE.reshape(batch_size, seq_len, -1).sum(1)
        return dataclasses.replace(routing, seq_counts_BE=counts_BE, seq_prob_sum_BE=prob_sum_BE, seq_len=seq_len)

    def loss(self, local: Routing, routing: Routing) -> torch.Tensor:
        """The layer's LBL; `local` holds this rank's own counts, `routing` the statistics widened over
        the micro-batch's sequence-parallel shards."""
        k = self.top_k
        if self.scope == "sequence":
            assert routing.seq_counts_BE is not None and routing.seq_prob_sum_BE is not None
            return sequence_load_balancing_loss(routing.seq_counts_BE, routing.seq_prob_sum_BE, routing.seq_len, k)
        own_batch = not self.recording or (self.global_mode == "exact" and self.global_counts_E is None)
        if self.scope == "micro_batch" or own_batch:
            return load_balancing_loss(routing.tokens_per_expert_E, routing.prob_sum_E, routing.num_tokens, k)
        counts_E, tokens = self.once(lambda: self._global_counts(local.tokens_per_expert_E))
        return global_lbl_share(counts_E, tokens, routing.prob_sum_E, self.share_tokens, k)

    def _global_counts(self, local_counts_E: torch.Tensor) -> tuple[torch.Tensor, int | float | torch.Tensor]:
        """(per-expert counts, tokens) whose ratio / k is this forward's global f; on the device (no host
        sync per forward)."""
        if self.global_counts_E is not None:
            return self.global_counts_E, self.global_tokens
        counts_E = local_counts_E.detach().clone()
        if self.count_reducer is not None:
            counts_E = self.count_reducer(counts_E)
        seen = counts_E if self.seen_counts_E is None else self.seen_counts_E + counts_E
        self.seen_counts_E = seen
        seen_tokens = torch.div(seen.sum(), self.top_k, rounding_mode="floor")
        if self.last_f_E is None or self.global_tokens == 0:
            return seen, seen_tokens
        rest = (self.global_tokens - seen_tokens).clamp(min=0) * self.top_k
        last_f_E = self.last_f_E.to(device=seen.device, dtype=torch.float64)
        estimate_E = seen.to(torch.float64) + rest.to(torch.float64) * last_f_E
        first_step = last_f_E.sum() == 0  # no previous step (a fresh run): fall back to the running mean
        counts = torch.where(first_step, seen.to(torch.float64), estimate_E)
        tokens = torch.where(first_step, seen_tokens.to(torch.float64), float(self.global_tokens))
        return counts, tokens
