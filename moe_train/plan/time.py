"""Step-time model: compute from FLOPs at the cluster's achieved efficiency, every collective from its bytes,
the pipeline bubble from the schedule, and what the engine overlaps (`Features`).

Per micro-batch and pipeline rank, each layer costs (forward, backward):

* GEMMs: 2 * rows * in * out FLOPs (backward 2x) at peak(gemm_precision) * eff(rows), where
  eff(m) = gemm * m / (m + gemm_half_rows) models small per-expert GEMMs; attention core 2 * T * S * q_dim / tp
  forward (causal), backward 2.5x (flash-attention), at the attention efficiencies;
* element-wise kernels (norms, residuals, RoPE, SwiGLU, permute / unpermute, FP8 casts, cross entropy)
  as bytes read + written at hbm bandwidth * efficiency;
* TP/SP: all-gather + reduce-scatter around attention and each tensor-parallel MLP, forward and backward;
* EP: dispatch (payload of the dispatch dtype) and combine all-to-all forward, both again in backward
  (activation dtype); ETP all-gather / reduce-scatter of the received rows;
* CP: K/V ring exchange (overlapped with the attention core) or all-gather / reduce-scatter.

Collectives: ring all-gather / reduce-scatter move (n - 1) / n of the gathered bytes per rank, all-to-all
(n - 1) / n of its buffer split between NVLink-domain peers and remote ones; a group is inside one
NVLink domain when its rank span fits (domains taken as aligned power-of-two segments, e.g. 64 of a
72-GPU NVL72 rack, as the Slurm segment allocation does). Step: m micro-batches on the slowest stage
plus the bubble (pp - 1) / vpp of it (`moe_train.parallel.layout.bubble_fraction`), exposed pipeline
send / receive, the data-parallel gradient reduction not hidden behind the last backward, the ZeRO
all-gather, and the optimizer step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from moe_train.model.counting import flops_per_token
from moe_train.parallel.layout import bubble_fraction
from moe_train.plan.cluster import Cluster
from moe_train.plan.space import StateRecipe
from moe_train.plan.workload import Workload, payload_bytes_per_row


@dataclass
class Cost:
    """Seconds of one micro-batch on one rank, by kind (forward + backward)."""

    gemm: float = 0.0
    attention: float = 0.0
    elementwise: float = 0.0
    recompute: float = 0.0
    tp_comm: float = 0.0
    ep_comm: float = 0.0
    cp_comm: float = 0.0
    fwd: float = 0.0
    """Forward compute (for overlap windows)."""
    bwd: float = 0.0
    """Backward compute (for overlap windows)."""

    def add(self, other: Cost, times: float = 1.0) -> None:
        """self += times * other, term by term."""
        for key in _COST_FIELDS:
            setattr(self, key, getattr(self, key) + times * getattr(other, key))

    @property
    def compute(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.recompute

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.ep_comm + self.cp_comm


_COST_FIELDS = tuple(f.name for f in fields(Cost))


@dataclass(frozen=True)
class TimeBreakdown:
    """Seconds per optimizer step on the slowest pipeline rank, by term, and the derived rates."""

    compute: float
    recompute: float
    tp_comm: float
    ep_comm: float
    cp_comm: float
    pp_p2p: float
    bubble: float
    dp_comm: float
    optimizer: float
    step: float
    tokens_per_s: float
    mfu: float
    """Model FLOPs (moe_train.model.flops_per_token) / (step * world * peak): bf16 peak, fp32 on fp32 runs."""
    tflops_per_gpu: float
    terms: dict[str, float] = field(default_factory=dict)
    """Un-overlapped seconds per step of each communication (before hiding), for the report."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Collectives


@dataclass(frozen=True)
class Span:
    """How a group of `size` ranks, `stride` apart in rank order, sits on the NVLink domains."""

    size: int
    stride: int
    domain: int

    @property
    def local(self) -> int:
        """Members sharing one domain (including self)."""
        if self.stride >= self.domain:
            return 1
        return max(1, min(self.size, self.domain // self.stride))

    @property
    def intra(self) -> bool:
        return self.local >= self.size


def domain_size(cluster: Cluster) -> int:
    """The NVLink domain as an aligned power-of-two segment (64 of an NVL72 rack)."""
    size = 1
    while size * 2 <= cluster.nvlink_domain:
        size *= 2
    return size


def ring_time(bytes_moved: float, span: Span, cluster: Cluster) -> float:
    """A ring all-gather / reduce-scatter in which each rank receives `bytes_moved`."""
    if span.size <= 1:
        return 0.0
    eff = cluster.efficiency.network
    if span.intra:
        return bytes_moved / (cluster.intra_bandwidth * eff) + (span.size - 1) * cluster.intra_latency
    return bytes_moved / (cluster.inter_bandwidth * eff) + (span.size - 1) * cluster.inter_latency


def all_to_all_time(buffer: float, span: Span, cluster: Cluster) -> float:
    """An all-to-all of a `buffer`-byte send buffer split evenly over the group."""
    n = span.size
    if n <= 1:
        return 0.0
    eff = cluster.efficiency.network
    local_peers, remote_peers = span.local - 1, n - span.local
    t_local = buffer * local_peers / n / (cluster.intra_bandwidth * eff)
    t_remote = buffer * remote_peers / n / (cluster.inter_bandwidth * eff)
    latency = cluster.inter_latency if remote_peers else cluster.intra_latency
    return max(t_local, t_remote) + latency


# ---------------------------------------------------------------------------------------------
# One layer


def gemm_time(flops: float, rows: float, w: Workload, cluster: Cluster, precision: str | None = None) -> float:
    """Seconds of GEMMs of `flops` whose row count (tokens per GEMM) is `rows`, in `precision`
    (default: options.gemm_precision)."""
    e, precision = cluster.efficiency, precision or w.options.gemm_precision
    top = e.gemm_fp8 if precision == "fp8" else e.gemm
    eff = top * rows / (rows + e.gemm_half_rows) if rows > 0 else top
    return flops / (cluster.peak(precision) * eff)


def _attention_precision(w: Workload) -> str:
    """Fused attention and the output head stay in bf16 under FP8 recipes (fp32 in fp32 runs)."""
    return "fp32" if w.options.gemm_precision == "fp32" else "bf16"


def hbm_time(nbytes: float, cluster: Cluster) -> float:
    return nbytes / (cluster.hbm_bandwidth * cluster.efficiency.hbm)


def attention_cost(w: Workload, cluster: Cluster) -> Cost:
    """Attention block of one layer (norm, q/k/v/o projections, core, TP and CP collectives)."""
    o, lay, h, a = w.options, w.layout, w.hidden, w.options.activation_bytes
    T, Ts, tp = w.tokens, w.shard_tokens, lay.tp
    proj = 2 * T * (2 * h * w.q_dim + 2 * h * w.kv_dim) / tp
    core = 2 * T * o.seq_len * w.q_dim / tp
    e = cluster.efficiency
    peak = cluster.peak(_attention_precision(w))
    t_proj = gemm_time(proj, T, w, cluster)
    t_core_f, t_core_b = core / (peak * e.attention_fwd), 2.5 * core / (peak * e.attention_bwd)
    # element-wise: norm (r+w), residual add (2r+w), RoPE on q and k (r+w), fp8 casts of the GEMM inputs
    elem = Ts * h * a * 2 + Ts * h * a * 3 + T * (w.q_dim + w.kv_dim) / tp * a * 2
    if o.gemm_precision == "fp8":
        elem += (T * h + T * w.q_dim / tp) * (a + 1)
    cost = Cost(gemm=3 * t_proj, attention=t_core_f + t_core_b, elementwise=hbm_time(2.5 * elem, cluster))
    cost.fwd, cost.bwd = (
        t_proj + t_core_f + hbm_time(elem, cluster),
        2 * t_proj + t_core_b + hbm_time(1.5 * elem, cluster),
    )
    cost.tp_comm = _tp_comm(w, cluster, t_proj)
    cost.cp_comm = _cp_comm(w, cluster, t_core_f, t_core_b)
    return cost


def _tp_comm(w: Workload, cluster: Cluster, overlap_window: float) -> float:
    """All-gather + reduce-scatter forward and backward (+ re-gather of saved shards) of one TP region."""
    tp = w.layout.tp
    if tp == 1:
        return 0.0
    span = Span(tp, 1, domain_size(cluster))
    per = ring_time((tp - 1) / tp * w.tokens * w.hidden * w.options.activation_bytes, span, cluster)
    count = 4 + (1 if w.options.features.sp_save_sharded else 0)
    t = count * per
    if w.options.features.tp_comm_overlap:
        t = max(0.0, t - 3 * overlap_window)
    return t


def _cp_comm(w: Workload, cluster: Cluster, core_fwd: float, core_bwd: float) -> float:
    """K/V exchange over the cp group: ring P2P (hidden behind the attention core) or all-gather."""
    cp = w.layout.cp
    if cp == 1:
        return 0.0
    span = Span(cp, w.layout.tp, domain_size(cluster))
    kv = w.tokens * 2 * w.kv_dim / w.layout.tp * w.options.activation_bytes
    if w.options.cp_comm == "ring":
        fwd = (cp - 1) * ring_time(kv, Span(2, w.layout.tp, span.domain), cluster)
        bwd = 2 * fwd
        return max(0.0, fwd - core_fwd) + max(0.0, bwd - core_bwd)
    per = ring_time((cp - 1) * kv, span, cluster)
    return 3 * per  # all-gather forward; all-gather + reduce-scatter backward


def mlp_cost(w: Workload, ffn: float, cluster: Cluster) -> Cost:
    """A tensor-parallel SwiGLU MLP of hidden size `ffn` on the gathered tokens (dense MLP, shared experts)."""
    if ffn == 0:
        return Cost()
    T, tp, a = w.tokens, w.layout.tp, w.options.activation_bytes
    flops = 2 * T * 3 * w.hidden * ffn / tp
    t = gemm_time(flops, T, w, cluster)
    elem = T * ffn / tp * a * 3
    if w.options.gemm_precision == "fp8":
        elem += (T * w.hidden + T * ffn / tp) * (a + 1)
    cost = Cost(gemm=3 * t, elementwise=hbm_time(2.7 * elem, cluster), fwd=t + hbm_time(elem, cluster))
    cost.bwd = 2 * t + hbm_time(1.7 * elem, cluster)
    cost.tp_comm = _tp_comm(w, cluster, t)
    return cost


def moe_cost(w: Workload, cluster: Cluster) -> Cost:
    """Router, dispatch, routed experts, combine of one MoE layer (shared experts: `mlp_cost`)."""
    moe, lay, h, a = w.cfg.moe, w.layout, w.hidden, w.options.activation_bytes
    load = w.options.expert_load or 1.0
    Ts, R = w.shard_tokens, w.copies
    router = gemm_time(2 * Ts * h * moe.num_experts, Ts, w, cluster)
    rows_per_expert = R * lay.ep * lay.etp / moe.num_experts
    expert_flops = 2 * R * load * 3 * h * moe.expert_ffn_hidden_size
    t_exp = gemm_time(expert_flops, rows_per_expert, w, cluster)
    f = moe.expert_ffn_hidden_size / lay.etp
    # norm + residual, permute + unpermute copies (r+w each), SwiGLU on the received rows, fp8 casts
    elem = Ts * h * a * 5 + 4 * R * h * a + R * load * lay.etp * f * a * 3
    if w.options.gemm_precision == "fp8":
        elem += R * load * lay.etp * (h + f) * (a + 1)
    cost = Cost(gemm=3 * (router + t_exp), elementwise=hbm_time(2.7 * elem, cluster))
    cost.fwd = router + t_exp + hbm_time(elem, cluster)
    cost.bwd = 2 * (router + t_exp) + hbm_time(1.7 * elem, cluster)
    cost.ep_comm = _ep_comm(w, cluster, load)
    if w.options.features.ep_comm_overlap:
        cost.ep_comm = max(0.0, cost.ep_comm - (cost.fwd + cost.bwd))
    cost.add(mlp_cost(w, w.shared_ffn, cluster))
    return cost


def _ep_comm(w: Workload, cluster: Cluster, load: float) -> float:
    """Dispatch + combine all-to-alls forward and backward, and the ETP gather / scatter of received rows."""
    lay, h, a = w.layout, w.hidden, w.options.activation_bytes
    dom = domain_size(cluster)
    rows = w.copies * load
    t = 0.0
    if lay.ep > 1:
        span = Span(lay.ep, lay.etp, dom)
        payload = payload_bytes_per_row(h, w.options.dispatch_dtype)
        t += all_to_all_time(rows * payload, span, cluster) + 3 * all_to_all_time(rows * h * a, span, cluster)
    if lay.etp > 1:
        span = Span(lay.etp, 1, dom)
        t += 4 * ring_time((lay.etp - 1) * rows * h * a, span, cluster)
    return t


def layer_cost(w: Workload, layer: int, cluster: Cluster) -> Cost:
    """One transformer layer, one micro-batch, forward + backward, with its recompute."""
    cost = attention_cost(w, cluster)
    ffn = moe_cost(w, cluster) if w.is_moe(layer) else mlp_cost(w, w.cfg.model.ffn_hidden_size, cluster)
    cost.add(ffn)
    mode = w.layout.recompute
    if mode == "full":  # the whole forward again, collectives included
        cost.recompute = cost.fwd + ffn.ep_comm / 4 + (cost.tp_comm + cost.cp_comm) / 2
    elif mode == "selective":  # attention core and expert MLP forwards again
        core = 2 * w.tokens * w.options.seq_len * w.q_dim / w.layout.tp
        moe_cfg = w.cfg.moe
        expert = 2 * w.copies * 3 * w.hidden * moe_cfg.expert_ffn_hidden_size if w.is_moe(layer) else 0.0
        shared = 2 * w.tokens * 3 * w.hidden * w.shared_ffn / w.layout.tp if w.is_moe(layer) else 0.0
        e = cluster.efficiency
        cost.recompute = core / (cluster.peak(_attention_precision(w)) * e.attention_fwd)
        cost.recompute += gemm_time(expert + shared, w.copies * w.layout.ep / max(1, moe_cfg.num_experts), w, cluster)
    cost.bwd += cost.recompute
    return cost


def head_cost(w: Workload, cluster: Cluster) -> Cost:
    """Final norm, output projection and cross entropy of one micro-batch (last stage)."""
    T, tp, h, a = w.tokens, w.layout.tp, w.hidden, w.options.activation_bytes
    vocab = w.cfg.model.vocab_size / tp
    t = gemm_time(2 * T * h * vocab, T, w, cluster, _attention_precision(w))
    elem = T * vocab * (a + 4 + 4) + w.shard_tokens * h * a * 2
    cost = Cost(gemm=3 * t, elementwise=hbm_time(2 * elem, cluster), fwd=t + hbm_time(elem, cluster))
    cost.bwd = 2 * t + hbm_time(elem, cluster)
    if tp > 1:
        span = Span(tp, 1, domain_size(cluster))
        cost.tp_comm = 2 * ring_time((tp - 1) / tp * T * h * a, span, cluster)
    return cost


def stage_cost(w: Workload, pp_rank: int, cluster: Cluster) -> Cost:
    """All layers (and embedding / head) of `pp_rank` for one micro-batch."""
    total = Cost()
    layers = w.rank_layers(pp_rank)
    moe_layers = sum(1 for layer in layers if w.is_moe(layer))
    for count, layer in ((moe_layers, w.cfg.moe.first_k_dense), (len(layers) - moe_layers, 0)):
        if count:  # every MoE layer costs the same, and every dense one
            total.add(layer_cost(w, layer, cluster), count)
    if pp_rank == w.layout.pp - 1:
        total.add(head_cost(w, cluster))
    if pp_rank == 0 and w.layout.tp > 1:  # vocab-parallel embedding: reduce-scatter forward, all-gather backward
        span = Span(w.layout.tp, 1, domain_size(cluster))
        total.tp_comm += 2 * ring_time((w.layout.tp - 1) / w.layout.tp * w.tokens * w.hidden * 2, span, cluster)
    return total


# ---------------------------------------------------------------------------------------------
# The step


def p2p_time(w: Workload, cluster: Cluster) -> float:
    """Pipeline send + receive of one micro-batch on one rank (all its chunk boundaries, both passes)."""
    if w.layout.pp == 1:
        return 0.0
    stride = w.world // w.layout.pp
    span = Span(2, stride, domain_size(cluster))
    nbytes = w.shard_tokens * w.hidden * w.options.activation_bytes
    return 2 * w.layout.vpp * ring_time(nbytes, span, cluster)


def dp_times(w: Workload, recipe: StateRecipe, pp_rank: int, cluster: Cluster) -> tuple[float, float]:
    """(gradient reduction, post-step parameter all-gather) seconds of one rank, un-overlapped."""
    rp, lay, dom = w.ranks[pp_rank], w.layout, domain_size(cluster)
    groups = [
        (float(rp.total - rp.expert), Span(w.dp * lay.cp, lay.tp, dom)),
        (float(rp.expert), Span(w.edp, lay.ep * lay.etp, dom)),
    ]
    grad = gather = 0.0
    for params, span in groups:
        n = span.size
        if n <= 1 or params == 0:
            continue
        share = (n - 1) / n * params
        if recipe.grad_sync == "allreduce":
            grad += 2 * ring_time(share * recipe.grad_bytes, span, cluster)
        else:
            grad += ring_time(share * recipe.grad_bytes, span, cluster)
        if recipe.shard_optimizer or recipe.grad_sync == "reduce_scatter":
            gather += ring_time(share * recipe.gather_bytes, span, cluster)
    return grad, gather


def optimizer_time(w: Workload, recipe: StateRecipe, pp_rank: int, cluster: Cluster) -> float:
    """Adam over this rank's (sharded) parameters: memory bound on the GPU, or the host transfers when offloaded."""
    rp = w.ranks[pp_rank]
    dense, expert = float(rp.total - rp.expert), float(rp.expert)
    if recipe.shard_optimizer:
        dense, expert = dense / (w.dp * w.layout.cp), expert / w.edp
    params = dense + expert
    if recipe.offload_optimizer:
        return params * (recipe.grad_bytes + recipe.param_bytes) / cluster.host_bandwidth
    per_param = 2 * recipe.param_bytes + recipe.grad_bytes + 2 * recipe.optim_bytes + 2 * recipe.master_bytes
    return hbm_time(params * per_param, cluster)


def step_time(w: Workload, recipe: StateRecipe, cluster: Cluster) -> TimeBreakdown:
    """Predicted seconds per optimizer step and its breakdown."""
    lay, f = w.layout, w.options.features
    costs = [stage_cost(w, r, cluster) for r in range(lay.pp)]
    p2p = 0.0 if (f.pp_p2p_overlap and lay.vpp > 1) else p2p_time(w, cluster)
    per_mb = [c.total + p2p for c in costs]
    slow = max(range(lay.pp), key=lambda r: per_mb[r])
    c, m = costs[slow], w.num_micro
    pipe = m * per_mb[slow] / (1.0 - bubble_fraction(lay.pp, m, lay.vpp))
    grad, gather = dp_times(w, recipe, slow, cluster)
    dp_exposed = max(0.0, grad - c.bwd) if f.dp_grad_overlap else grad
    dp_exposed += max(0.0, gather - c.fwd) if f.dp_param_overlap else gather
    opt = optimizer_time(w, recipe, slow, cluster)
    step = pipe + dp_exposed + opt
    tokens = w.options.global_batch_size * w.options.seq_len
    flops = flops_per_token(w.cfg.model, w.cfg.moe, w.options.seq_len) * tokens
    mfu_peak = cluster.peak("fp32" if w.options.gemm_precision == "fp32" else "bf16")
    return TimeBreakdown(
        compute=m * (c.compute - c.recompute),
        recompute=m * c.recompute,
        tp_comm=m * c.tp_comm,
        ep_comm=m * c.ep_comm,
        cp_comm=m * c.cp_comm,
        pp_p2p=m * p2p,
        bubble=pipe - m * per_mb[slow],
        dp_comm=dp_exposed,
        optimizer=opt,
        step=step,
        tokens_per_s=tokens / step,
        mfu=flops / (step * w.world * mfu_peak),
        tflops_per_gpu=flops / (step * w.world) / 1e12,
        terms={"dp_grad": grad, "dp_gather": gather, "slowest_pp_rank": float(slow)},
    )
