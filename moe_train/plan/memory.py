"""Per-rank memory model: model state, stored activations of the in-flight micro-batches, transient buffers.

Every term is bytes on one rank. The peak over pipeline ranks is reported (a stage holding the
embedding or the head, or pp rank 0 with the most in-flight micro-batches, is usually the largest).

* State (`StateRecipe`): weights, gradients (+ a flat bucket copy in moe_train's engine), fp32 master
  copy, Adam moments; ZeRO-1 / distributed optimizer divide moments and master by dp (dense) and edp
  (experts), ZeRO-2 the gradients too; optimizer offload moves moments and master to the host.
* Activations saved for backward per layer and micro-batch (Korthikanti et al., arXiv 2205.05198,
  adapted to RMSNorm, SwiGLU, GQA, fused attention that saves no scores, and a dropless MoE):
  `layer_activation_bytes`. Recompute 'full' keeps only each layer's input; 'selective' recomputes
  the attention core and the expert MLPs (issue 9's definition), dropping their outputs / intermediates.
* In flight: the pipeline schedule's own action order (`moe_train.parallel.pipeline.rank_orders`) gives,
  per pp rank, the largest set of chunk forwards whose backward has not run yet.
* Transient (one at a time): the logits and loss of one micro-batch on the last stage (chunked by
  loss_chunk_tokens), the receive buffer of one MoE layer beyond the balanced rows (dropless worst
  case, capacity bound, or options.expert_load), and under full recompute one layer's activations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from moe_train.parallel.params import RankParams
from moe_train.parallel.pipeline import Action, rank_orders
from moe_train.plan.space import StateRecipe
from moe_train.plan.workload import Workload, payload_bytes_per_row


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on the most loaded rank, by term."""

    pp_rank: int
    weights: float
    grads: float
    master: float
    optimizer: float
    activations: float
    """Saved activations of the in-flight micro-batches (peak over the schedule)."""
    logits: float
    """Logits / loss buffers of one micro-batch (last stage)."""
    dispatch: float
    """Receive buffers of one MoE layer beyond the balanced rows, and its payload copy."""
    recompute: float
    """One layer's activations rebuilt during full recompute."""
    in_flight: int
    """Chunk forwards held at the peak."""

    @property
    def state(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer

    @property
    def total(self) -> float:
        return self.state + self.activations + self.logits + self.dispatch + self.recompute

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


# ---------------------------------------------------------------------------------------------
# Model state


def state_bytes(rp: RankParams, recipe: StateRecipe, dp: int, edp: int) -> tuple[float, float, float, float]:
    """(weights, grads, master, optimizer) bytes of one rank with parameters `rp`."""
    dense, expert = float(rp.total - rp.expert), float(rp.expert)
    total = dense + expert

    def sharded(n_dense: float, n_expert: float, on: bool) -> float:
        return n_dense / dp + n_expert / edp if on else n_dense + n_expert

    weights = recipe.param_bytes * total
    replicas = (dense if dp > 1 else 0.0) + (expert if edp > 1 else 0.0)
    grads = recipe.grad_bytes * sharded(dense, expert, recipe.shard_grads) + recipe.grad_buffer_bytes * replicas
    on_gpu = 0.0 if recipe.offload_optimizer else 1.0
    master = on_gpu * recipe.master_bytes * sharded(dense, expert, recipe.shard_optimizer)
    optimizer = on_gpu * recipe.optim_bytes * sharded(dense, expert, recipe.shard_optimizer)
    return weights, grads, master, optimizer


# ---------------------------------------------------------------------------------------------
# Activations


def attention_activation_bytes(w: Workload, mode: str) -> float:
    """Saved bytes of one attention block (norm + projections + core) for one micro-batch."""
    a, tp, h = w.options.activation_bytes, w.layout.tp, w.hidden
    T, Ts = w.tokens, w.shard_tokens
    if mode == "full":
        return Ts * h * a  # the layer input only
    gathered = Ts if (w.options.features.sp_save_sharded or tp == 1) else T
    norm_in = Ts * h * a
    proj_in = gathered * h * a
    qk_norm = T * (w.q_dim + w.kv_dim) / tp * a if w.cfg.model.qk_norm else 0.0
    qkv = T * (w.q_dim + 2 * w.kv_dim) / tp * a
    core_out = T * w.q_dim / tp * a + T * w.cfg.model.num_heads / tp * 4  # output + fp32 log-sum-exp
    if mode == "selective":
        core_out = 0.0  # recomputed from q, k, v in backward
    cp = w.layout.cp
    gathered_kv = 0.0  # cp all-gather: the other ranks' K/V of the whole sequence are saved for backward
    if cp > 1 and w.options.cp_comm == "allgather":
        gathered_kv = (cp - 1) * T * 2 * w.kv_dim / tp * a
    return norm_in + proj_in + qk_norm + qkv + core_out + gathered_kv


def ffn_activation_bytes(w: Workload, moe: bool, mode: str) -> float:
    """Saved bytes of one FFN block (dense MLP, or router + routed + shared experts) for one micro-batch."""
    a, tp, h = w.options.activation_bytes, w.layout.tp, w.hidden
    T, Ts = w.tokens, w.shard_tokens
    if mode == "full":
        return 0.0  # counted once per layer in attention_activation_bytes
    gathered = Ts if (w.options.features.sp_save_sharded or tp == 1) else T
    norm_in = Ts * h * a
    if not moe:  # selective recomputes every SwiGLU body (train.recompute), the dense MLP's too
        mid = 0.0 if mode == "selective" else T * 3 * w.cfg.model.ffn_hidden_size / tp * a
        return norm_in + gathered * h * a + mid
    moe_cfg = w.cfg.moe
    router = Ts * h * a + Ts * moe_cfg.num_experts * 4 * 2  # gate input, fp32 logits and probabilities
    rows = w.copies  # balanced received rows per rank; x etp after the ETP gather, each ffn / etp wide
    expert_in = rows * w.layout.etp * h * a
    expert_mid = rows * 3 * moe_cfg.expert_ffn_hidden_size * a
    combine = rows * h * a
    shared_in = gathered * h * a if w.shared_ffn else 0.0
    shared_mid = T * 3 * w.shared_ffn / tp * a
    if mode == "selective":
        expert_mid = shared_mid = 0.0  # expert MLPs recomputed from their inputs
    return norm_in + router + expert_in + expert_mid + combine + shared_in + shared_mid


def layer_activation_bytes(w: Workload, layer: int, mode: str) -> float:
    """Saved activations of transformer layer `layer` for one micro-batch under recompute `mode`."""
    return attention_activation_bytes(w, mode) + ffn_activation_bytes(w, w.is_moe(layer), mode)


def kind_activation_bytes(w: Workload, mode: str) -> tuple[float, float]:
    """(dense layer, MoE layer) saved activations: every layer of a kind saves the same."""
    dense = layer_activation_bytes(w, 0, mode) if w.cfg.moe.first_k_dense > 0 else 0.0
    moe = layer_activation_bytes(w, w.cfg.moe.first_k_dense, mode) if w.is_moe(w.cfg.model.num_layers - 1) else 0.0
    return dense, moe


def chunk_activation_bytes(
    w: Workload, pp_rank: int, chunk: int, mode: str, per_kind: tuple[float, float] | None = None
) -> float:
    """Saved activations of one local chunk (its layers, + the head input on the last stage)."""
    dense, moe = per_kind or kind_activation_bytes(w, mode)
    layers = w.chunk_layers(pp_rank, chunk)
    moe_layers = sum(1 for layer in layers if w.is_moe(layer))
    total = moe_layers * moe + (len(layers) - moe_layers) * dense
    is_last = chunk * w.layout.pp + pp_rank == len(w.stages) - 1
    if is_last:
        a, h = w.options.activation_bytes, w.hidden
        gathered = w.shard_tokens if w.options.features.sp_save_sharded else w.tokens
        total += w.shard_tokens * h * a + gathered * h * a  # final norm input, head input
    return total


def peak_in_flight(
    w: Workload, pp_rank: int, mode: str, per_kind: tuple[float, float] | None = None
) -> tuple[float, int]:
    """(bytes, chunk forwards) of the largest set of saved chunk activations over the schedule's order."""
    pp, vpp, m = w.layout.pp, w.layout.vpp, w.num_micro
    schedule = "interleaved_1f1b" if vpp > 1 else "1f1b"
    m_sim = min(m, 2 * pp)  # the warm-up and the steady state repeat after 2 * pp micro-batches
    order = _orders(schedule, pp, vpp, m_sim)[pp_rank]
    per_kind = per_kind or kind_activation_bytes(w, mode)
    sizes = [chunk_activation_bytes(w, pp_rank, c, mode, per_kind) for c in range(vpp)]
    held = best = 0.0
    count = best_count = 0
    for action in order:
        held += -sizes[action.chunk] if action.backward else sizes[action.chunk]
        count += -1 if action.backward else 1
        if held > best:
            best, best_count = held, count
    return best, best_count


@lru_cache(maxsize=256)
def _orders(schedule: str, pp: int, vpp: int, num_micro: int) -> tuple[tuple[Action, ...], ...]:
    """The trainer's action order per pp rank (ValueError when the schedule cannot run)."""
    return tuple(tuple(order) for order in rank_orders(schedule, pp, vpp, num_micro))


# ---------------------------------------------------------------------------------------------
# Transient buffers


def logits_bytes(w: Workload) -> float:
    """Logits of one micro-batch in the compute dtype, the fp32 log-softmax saved by the loss and its
    fp32 gradient; all of [T, V / tp] unless the loss runs in chunks of loss_chunk_tokens."""
    tokens = w.tokens
    if w.options.loss_chunk_tokens > 0:
        tokens = min(tokens, w.options.loss_chunk_tokens)
    return tokens * w.cfg.model.vocab_size / w.layout.tp * (w.options.activation_bytes + 8)


def dispatch_bytes(w: Workload) -> float:
    """One MoE layer's receive side beyond the balanced rows: the payload buffer of every received row,
    and for the extra rows their dequantized input, expert intermediates and outputs."""
    if w.cfg.moe.num_experts == 0 or w.cfg.moe.first_k_dense >= w.cfg.model.num_layers:
        return 0.0
    a, h, etp = w.options.activation_bytes, w.hidden, w.layout.etp
    received = w.received_rows_max()
    extra = max(0.0, received - w.copies) * etp
    payload = received * payload_bytes_per_row(h, w.options.dispatch_dtype)
    per_row = h * a + 3 * w.cfg.moe.expert_ffn_hidden_size / etp * a + h * a
    return payload + extra * per_row


def rank_memory(
    w: Workload, recipe: StateRecipe, pp_rank: int, per_kind: tuple[float, float] | None = None
) -> MemoryBreakdown:
    """Memory of one rank of pipeline rank `pp_rank`."""
    mode = w.layout.recompute
    weights, grads, master, optimizer = state_bytes(w.ranks[pp_rank], recipe, w.dp * w.layout.cp, w.edp)
    activations, in_flight = peak_in_flight(w, pp_rank, mode, per_kind)
    is_last = pp_rank == w.layout.pp - 1
    layers = w.rank_layers(pp_rank)
    has_moe = any(w.is_moe(layer) for layer in layers)
    recompute = 0.0
    if mode == "full" and layers:  # one layer rebuilt at a time: the largest kind held here
        dense, moe = kind_activation_bytes(w, "none")
        has_dense = any(not w.is_moe(layer) for layer in layers)
        recompute = max(moe if has_moe else 0.0, dense if has_dense else 0.0)
    return MemoryBreakdown(
        pp_rank=pp_rank,
        weights=weights,
        grads=grads,
        master=master,
        optimizer=optimizer,
        activations=activations,
        logits=logits_bytes(w) if is_last else 0.0,
        dispatch=dispatch_bytes(w) if has_moe else 0.0,
        recompute=recompute,
        in_flight=in_flight,
    )


def peak_memory(w: Workload, recipe: StateRecipe) -> MemoryBreakdown:
    """The breakdown of the pipeline rank with the largest total."""
    per_kind = kind_activation_bytes(w, w.layout.recompute)
    return max((rank_memory(w, recipe, r, per_kind) for r in range(w.layout.pp)), key=lambda m: m.total)
