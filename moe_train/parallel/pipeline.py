"""Pipeline parallelism: model chunks per pipeline rank, 1F1B and interleaved 1F1B schedules, a runner.

Legend: B micro-batch size, S sequence, H hidden, M micro-batches, L MoE layers of the whole model,
E experts, C virtual stages (pp * vpp; chunk c lives on pp rank c % pp as its local chunk c // pp).

How a step runs (`PipelineSchedule.forward_backward`):

1. Every pp rank holds an *order* of actions F(chunk, micro) / B(chunk, micro): Megatron's 1F1B
   (warm-up forwards, then one forward one backward, then cool-down backwards) or its interleaved
   variant over vpp chunks per rank (`schedule_1f1b`, `schedule_interleaved_1f1b`).
2. `assign_slots` places every rank's order on one shared clock: an action runs in the first slot
   after the actions it depends on (the previous chunk's forward, the next chunk's backward). Every
   rank computes the same timeline from (pp, vpp, M), so it knows who sends what and when.
3. After slot t every rank exchanges the activations / gradients produced in slot t, with one
   `batch_isend_irecv` holding all its sends and receives of that slot. Every batch of slot t is
   matched only by batches of slot t, and a rank sends at most one tensor per slot, so the exchange
   cannot deadlock and messages cannot be matched out of order, also with NCCL (which ignores tags
   and matches point-to-point messages by posting order). Neighbours are coupled at each exchange,
   as in Megatron's paired send/recv. (Written here rather than on torch.distributed.pipelining so
   that the op order, the loss / aux-loss semantics and the statistics stay explicit and testable.)

Losses: the last chunk computes the per-token loss; backward starts from `mean(token_loss) * scale`.
Every MoE layer, whatever its stage, attaches its aux loss with gradient `scale` (set_aux_loss_scale),
so the gradients equal the single-device gradient-accumulated step. The MoE statistics of each layer
are recorded after each micro-batch forward and summed over the pp group, so every rank reports the
step statistics of the whole model.

Autocast: wrap `forward_backward` in `torch.autocast` (backward inside autocast is allowed); the
activations crossing stages must keep the dtype given to `PipelineSchedule` (the parameters' dtype).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.distributed as dist
from torch import nn

from moe_train.config import Config, ParallelConfig
from moe_train.model.transformer import MoETransformer, collect_moe_stats, set_aux_loss_scale
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.layout import check_layer_split
from moe_train.parallel.params import virtual_stage_layers

if TYPE_CHECKING:
    from moe_train.data import Batch

logger = logging.getLogger(__name__)

SCHEDULES = ("1f1b", "interleaved_1f1b")

# ---------------------------------------------------------------------------------------------
# Stages and model chunks


def stage_layers(num_layers: int, pp: int, vpp: int = 1, split: list[int] | None = None) -> list[list[int]]:
    """Layer ids of each virtual stage, in pipeline order (chunk c = v * pp + p is chunk v of pp rank p).

    `split` gives the layers per virtual stage (parallel.pp_layer_split); None splits evenly.
    Raises ConfigError when the split does not fit.
    """
    cfg = Config()
    cfg.model.num_layers = num_layers
    cfg.parallel = ParallelConfig(pp=pp, vpp=vpp, pp_layer_split=split)
    check_layer_split(cfg)
    return virtual_stage_layers(num_layers, cfg.parallel)


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A new module object sharing children, parameters, buffers and hooks with `module`, with its
    own registries (so pruning the clone leaves the original intact)."""
    clone = module.__class__.__new__(module.__class__)
    for key, value in module.__dict__.items():
        if isinstance(value, dict | set):
            value = value.copy()
        clone.__dict__[key] = value
    return clone


def prune_to_chunk(model: MoETransformer, layer_ids: list[int], first: bool, last: bool) -> MoETransformer:
    """A chunk of `model` holding only `layer_ids` (plus the embedding if `first`, norm + output if
    `last`). Shares parameter objects with `model` (no copy; ParamMeta stays attached); local names
    keep the single-device FQNs, e.g. 'layers.5.attention.wq.weight'."""
    chunk = _shallow_clone(model)
    assert isinstance(chunk, MoETransformer)
    chunk.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
    if not first:
        chunk.tok_embeddings = None
    if not last:
        chunk.norm = None
        chunk.output = None
    return chunk


def build_stage_modules(model: MoETransformer, groups: ProcessGroups, cfg: Config) -> list[MoETransformer]:
    """This pp rank's vpp model chunks (local chunk v = virtual stage v * pp + pp_rank) of the full
    model (already TP/EP-applied). The first chunk overall keeps tok_embeddings, the last norm + output."""
    p = cfg.parallel
    pp, vpp = groups.pp_size, groups.vpp_size
    if (pp, vpp) != (p.pp, p.vpp):
        raise ValueError(f"groups have pp {pp} vpp {vpp} but parallel.pp is {p.pp} and parallel.vpp {p.vpp}")
    if cfg.model.tie_embeddings and pp > 1:
        raise NotImplementedError(f"model.tie_embeddings with parallel.pp ({pp}) > 1 is not supported yet")
    stages = stage_layers(cfg.model.num_layers, pp, vpp, p.pp_layer_split)
    chunks = []
    for v in range(vpp):
        c = v * pp + groups.pp_rank
        chunks.append(prune_to_chunk(model, stages[c], first=c == 0, last=c == len(stages) - 1))
    return chunks


# ---------------------------------------------------------------------------------------------
# Schedules: per-rank action orders, and the shared clock


@dataclass(frozen=True, order=True)
class Action:
    """Forward or backward of local chunk `chunk` on micro-batch `micro`."""

    backward: bool
    chunk: int
    micro: int

    def __repr__(self) -> str:
        return f"{'B' if self.backward else 'F'}{self.chunk}.{self.micro}"


def schedule_1f1b(pp: int, pp_rank: int, num_micro: int) -> list[Action]:
    """Megatron's 1F1B: pp - rank - 1 warm-up forwards, then alternate F / B, then the last backwards."""
    warmup = min(pp - pp_rank - 1, num_micro)
    order = [Action(False, 0, m) for m in range(warmup)]
    for i in range(num_micro - warmup):
        order += [Action(False, 0, warmup + i), Action(True, 0, i)]
    order += [Action(True, 0, m) for m in range(num_micro - warmup, num_micro)]
    return order


def schedule_interleaved_1f1b(pp: int, vpp: int, pp_rank: int, num_micro: int) -> list[Action]:
    """Megatron's interleaved 1F1B: micro-batches in groups of pp, each group through chunk 0, 1, ..
    (forward) or vpp-1, .., 0 (backward); needs num_micro % pp == 0."""
    if num_micro % pp:
        raise ValueError(f"interleaved 1F1B needs micro-batches ({num_micro}) divisible by parallel.pp ({pp})")
    total = num_micro * vpp
    # M == pp: every forward first (Megatron's rule); otherwise 2 per later stage + one round per extra chunk
    warmup = total if num_micro == pp else min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp, total)

    def unit(k: int, backward: bool) -> Action:
        v = (k % (pp * vpp)) // pp
        return Action(backward, vpp - 1 - v if backward else v, (k // (pp * vpp)) * pp + k % pp)

    order = [unit(k, False) for k in range(warmup)]
    for i in range(total - warmup):
        order += [unit(warmup + i, False), unit(i, True)]
    order += [unit(k, True) for k in range(total - warmup, total)]
    return order


def rank_orders(schedule: str, pp: int, vpp: int, num_micro: int) -> list[list[Action]]:
    """The action order of every pp rank."""
    if num_micro < 1:
        raise ValueError(f"a pipeline step needs at least one micro-batch (got {num_micro})")
    if schedule == "1f1b":
        if vpp != 1:
            raise ValueError(f"pipeline schedule '1f1b' needs parallel.vpp 1 (got {vpp})")
        return [schedule_1f1b(pp, p, num_micro) for p in range(pp)]
    if schedule == "interleaved_1f1b":
        return [schedule_interleaved_1f1b(pp, vpp, p, num_micro) for p in range(pp)]
    raise ValueError(f"unknown parallel.pp_schedule '{schedule}' (known: {', '.join(SCHEDULES)})")


@dataclass(frozen=True)
class Message:
    """A tensor produced in some slot by pp rank `src` for pp rank `dst`: the activation entering
    global chunk `chunk` (grad False) or the gradient of chunk `chunk`'s output (grad True)."""

    src: int
    dst: int
    grad: bool
    chunk: int
    micro: int


@dataclass
class Timeline:
    """All ranks' actions on the shared clock, and the messages exchanged after each slot."""

    actions: list[dict[int, Action]]
    """Per pp rank: slot -> action run in that slot."""
    messages: list[list[Message]]
    """Per slot: messages produced in it (exchanged right after it)."""

    @property
    def num_slots(self) -> int:
        return len(self.messages)


def _key(a: Action, pp: int, pp_rank: int) -> tuple[bool, int, int]:
    """(backward, global chunk, micro) of rank `pp_rank`'s action."""
    return a.backward, a.chunk * pp + pp_rank, a.micro


def _deps(backward: bool, c: int, m: int, num_chunks: int) -> list[tuple[bool, int, int]]:
    """Actions (backward, global chunk, micro) that must run in an earlier slot."""
    if not backward:
        return [(False, c - 1, m)] if c > 0 else []
    return [(False, c, m)] + ([(True, c + 1, m)] if c < num_chunks - 1 else [])


def _message(backward: bool, c: int, m: int, pp: int, num_chunks: int) -> Message | None:
    """What an action sends: its output activation forward, or its input gradient backward."""
    if not backward and c < num_chunks - 1:
        return Message(c % pp, (c + 1) % pp, False, c + 1, m)
    if backward and c > 0:
        return Message(c % pp, (c - 1) % pp, True, c - 1, m)
    return None


def assign_slots(orders: list[list[Action]], vpp: int) -> Timeline:
    """Run every rank's order on one clock: each action in the first slot after its dependencies'
    slots. Raises RuntimeError if the orders deadlock (no rank can proceed)."""
    pp = len(orders)
    num_chunks = pp * vpp
    done: dict[tuple[bool, int, int], int] = {}
    nxt = [0] * pp
    timeline = Timeline([{} for _ in range(pp)], [])
    while any(nxt[p] < len(orders[p]) for p in range(pp)):
        t = timeline.num_slots
        ready = []
        for p in range(pp):
            if nxt[p] < len(orders[p]):
                key = _key(orders[p][nxt[p]], pp, p)
                if all(done.get(d, t) < t for d in _deps(*key, num_chunks)):
                    ready.append((p, key))
        if not ready:
            stuck = {p: orders[p][nxt[p]] for p in range(pp) if nxt[p] < len(orders[p])}
            raise RuntimeError(f"pipeline schedule deadlocks at slot {t}: waiting actions per rank {stuck}")
        slot_messages = []
        for p, key in ready:
            done[key] = t
            timeline.actions[p][t] = orders[p][nxt[p]]
            nxt[p] += 1
            msg = _message(*key, pp, num_chunks)
            if msg is not None:
                slot_messages.append(msg)
        timeline.messages.append(slot_messages)
    return timeline


# ---------------------------------------------------------------------------------------------
# The runner

MicroBatch = Union["Batch", tuple[torch.Tensor, torch.Tensor]]
"""A micro-batch: a data Batch (tokens_BS, labels_BS, domain_B) or a (tokens_BS, labels_BS) pair."""


@dataclass
class PipelineStepResult:
    """One step's losses and MoE statistics; every field but `micro_losses` is equal on all pp ranks.

    The trainer turns it into the device totals of a single-stage step (moe_train.train.step) and reduces
    it over DP replicas in the same way.
    """

    micro_losses: list[torch.Tensor] | None
    """Mean token loss of each micro-batch (detached), on the last stage; None on the other stages."""
    lm_loss_M: torch.Tensor
    """Mean token loss of each micro-batch (fp32), gathered from the last stage."""
    lbl_LM: torch.Tensor
    """Load-balancing loss of every MoE layer of the model (in layer order) and micro-batch."""
    zloss_LM: torch.Tensor
    """Router z-loss of every MoE layer and micro-batch."""
    tokens_per_expert_LE: torch.Tensor
    """Assignments per expert of every MoE layer, summed over the micro-batches (int64)."""
    domain_sum: torch.Tensor
    """Per domain: sum of per-sequence mean losses (float64, CPU; empty without domains)."""
    domain_count: torch.Tensor
    """Per domain: number of sequences (float64, CPU)."""

    @property
    def lm_loss(self) -> float:
        """Mean over micro-batches of the lm loss (the single-device trainer's `lm_loss`)."""
        return float(self.lm_loss_M.mean())

    @property
    def lbl(self) -> float:
        """Mean over MoE layers and micro-batches of the load-balancing loss (0 without MoE layers)."""
        return float(self.lbl_LM.mean()) if self.lbl_LM.numel() else 0.0

    @property
    def zloss(self) -> float:
        """Mean over MoE layers and micro-batches of the router z-loss (0 without MoE layers)."""
        return float(self.zloss_LM.mean()) if self.zloss_LM.numel() else 0.0


@dataclass
class _StepState:
    """What one step keeps between actions (statistics tensors on the model's device)."""

    lbl_LM: torch.Tensor
    zloss_LM: torch.Tensor
    counts_LE: torch.Tensor
    domain_sum: torch.Tensor
    domain_count: torch.Tensor
    received: dict[tuple[bool, int, int], torch.Tensor] = field(default_factory=dict)
    """(grad, global chunk, micro) -> tensor received for that chunk."""
    saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)
    """(local chunk, micro) -> (input that needs its gradient, output to start backward from)."""
    losses: dict[int, torch.Tensor] = field(default_factory=dict)


def _unpack(batch: MicroBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens_BS, labels_BS, domain_B or None) on `device`."""
    if isinstance(batch, tuple):
        tokens_BS, labels_BS = batch
        return tokens_BS.to(device), labels_BS.to(device), None
    return batch.tokens_BS.to(device), batch.labels_BS.to(device), batch.domain_B.to(device)


class PipelineSchedule:
    """Runs forward + backward of a step's micro-batches over this pp rank's chunks (1F1B / interleaved).

    `chunks` come from `build_stage_modules` (local chunk v is virtual stage v * pp + pp_rank).
    Gradients accumulate into the chunks' `.grad` (zero them between steps). Construct it on every
    rank of the pp group (one all-reduce). 1F1B takes any number of micro-batches (fewer than pp is
    exact, only mostly bubble); interleaved 1F1B needs a multiple of pp.

    `reducer`: set it to the data-parallel GradReducer (anything with `set_sync(bool)`); the runner
    turns sync on exactly for the last backward of each chunk, so each gradient is reduced once,
    after its last accumulation.
    """

    def __init__(
        self, chunks: list[MoETransformer], groups: ProcessGroups, cfg: Config, dtype: torch.dtype | None = None
    ) -> None:
        if len(chunks) != groups.vpp_size:
            raise ValueError(f"got {len(chunks)} model chunks for parallel.vpp ({groups.vpp_size})")
        self.chunks = chunks
        self.groups = groups
        self.schedule = cfg.parallel.pp_schedule
        self.hidden_size = cfg.model.hidden_size
        self.num_experts = cfg.moe.num_experts
        self.moe_index = {layer: i for i, layer in enumerate(range(cfg.moe.first_k_dense, cfg.model.num_layers))}
        first = next(p for chunk in chunks for p in chunk.parameters())
        self.dtype = dtype or first.dtype
        self.reducer: Any = None
        self._timelines: dict[int, Timeline] = {}
        if not first.is_meta:  # a meta model calls it once materialised (moe_train.parallel.materialize)
            self.warm_up()

    @property
    def device(self) -> torch.device:
        """The chunks' device (read each time: the chunks may be materialised after the schedule is built)."""
        return next(p for chunk in self.chunks for p in chunk.parameters()).device

    def warm_up(self) -> None:
        """NCCL wants every rank of a group in its first call; later p2p batches involve only neighbours."""
        self.groups.all_reduce(torch.zeros(1, device=self.device), "pp")

    @property
    def num_chunks(self) -> int:
        """Virtual stages of the whole pipeline (pp * vpp)."""
        return self.groups.pp_size * len(self.chunks)

    def timeline(self, num_micro: int) -> Timeline:
        """The step's shared clock for `num_micro` micro-batches (cached)."""
        if num_micro not in self._timelines:
            orders = rank_orders(self.schedule, self.groups.pp_size, len(self.chunks), num_micro)
            self._timelines[num_micro] = assign_slots(orders, len(self.chunks))
        return self._timelines[num_micro]

    def forward_backward(
        self,
        micro_batches: Sequence[MicroBatch],
        loss_scale: float,
        device: torch.device | None = None,
        autocast: AbstractContextManager | None = None,
        num_domains: int = 0,
    ) -> PipelineStepResult:
        """Forward and backward of every micro-batch; the lm loss of each is multiplied by `loss_scale`
        before backward and every MoE aux loss gets gradient `loss_scale`.

        Micro-batches are moved to `device` (default: the parameters'); forwards run under `autocast`
        when given; with `num_domains` and Batch inputs, per-domain loss sums are collected."""
        device = device or self.device
        batches = [_unpack(mb, device) for mb in micro_batches]
        timeline = self.timeline(len(batches))
        for chunk in self.chunks:
            set_aux_loss_scale(chunk, loss_scale)
        state = self._new_state(len(batches), num_domains)
        me = self.groups.pp_rank
        for t in range(timeline.num_slots):
            action = timeline.actions[me].get(t)
            out = None
            if action is not None and action.backward:
                out = self._backward(action, len(batches), state)
            elif action is not None:
                with autocast if autocast is not None else contextlib.nullcontext():
                    out = self._forward(action, batches[action.micro], loss_scale, state)
            self._exchange(timeline.messages[t], out, batches, state)
        if state.received or state.saved:
            raise RuntimeError(f"pipeline step left tensors behind on pp rank {me}: {list(state.received)}")
        return self._result(len(batches), state)

    @torch.no_grad()
    def forward_only(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """Mean token loss of one batch, passed through the virtual stages in order (no overlap: for
        validation). Every pp rank returns the same value."""
        me, pp = self.groups.pp_rank, self.groups.pp_size
        tokens_BS, labels_BS = tokens_BS.to(self.device), labels_BS.to(self.device)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for c in range(me, self.num_chunks, pp):
            chunk = self.chunks[c // pp]
            x = tokens_BS
            if c > 0:
                x = torch.empty(self._activation_shape(tokens_BS), dtype=self.dtype, device=self.device)
                dist.recv(x, self.groups.ranks["pp"][(c - 1) % pp], group=self.groups.pp)
            if c == self.num_chunks - 1:
                token_loss_BS = chunk(x, labels_BS).token_loss_BS
                assert token_loss_BS is not None
                loss += token_loss_BS.double().mean()
            else:
                h_BSH = chunk(x).logits_BSV
                assert h_BSH is not None
                dist.send(
                    h_BSH.to(self.dtype).contiguous(), self.groups.ranks["pp"][(c + 1) % pp], group=self.groups.pp
                )
        dist.all_reduce(loss, group=self.groups.pp)
        return loss

    @torch.no_grad()
    def forward_layers(
        self,
        micro_batches: Sequence[MicroBatch],
        device: torch.device | None = None,
        autocast: AbstractContextManager | None = None,
    ) -> None:
        """No-grad forward of every micro-batch through every transformer block, pipelined, without the
        head (for what the blocks record, e.g. the global LBL's counting pass). Each rank runs its
        (micro-batch, chunk) pairs in micro-batch-major order with blocking send / recv: that order is a
        topological order of the data dependencies, so no rank waits on one that waits on it."""
        device = device or self.device
        me, pp = self.groups.pp_rank, self.groups.pp_size
        ranks = self.groups.ranks["pp"]
        for mb in micro_batches:
            tokens_BS = _unpack(mb, device)[0]
            for c in range(me, self.num_chunks, pp):
                x = tokens_BS
                if c > 0:
                    x = torch.empty(self._activation_shape(tokens_BS), dtype=self.dtype, device=self.device)
                    dist.recv(x, ranks[(c - 1) % pp], group=self.groups.pp)
                chunk = self.chunks[c // pp]
                with autocast if autocast is not None else contextlib.nullcontext():
                    h_BSH = chunk.run_layers(chunk.embed(x))
                if c < self.num_chunks - 1:
                    dist.send(h_BSH.to(self.dtype).contiguous(), ranks[(c + 1) % pp], group=self.groups.pp)

    def _new_state(self, num_micro: int, num_domains: int) -> _StepState:
        num_moe = len(self.moe_index)
        lbl_LM = torch.zeros(num_moe, num_micro, dtype=torch.float32, device=self.device)
        counts_LE = torch.zeros(num_moe, self.num_experts, dtype=torch.long, device=self.device)
        domain_sum = torch.zeros(num_domains, dtype=torch.float64, device=self.device)
        return _StepState(lbl_LM, lbl_LM.clone(), counts_LE, domain_sum, domain_sum.clone())

    def _forward(
        self,
        a: Action,
        batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        scale: float,
        state: _StepState,
    ) -> torch.Tensor | None:
        """Forward of local chunk a.chunk; returns the activation to send (None on the last chunk)."""
        c = a.chunk * self.groups.pp_size + self.groups.pp_rank
        chunk = self.chunks[a.chunk]
        tokens_BS, labels_BS, domain_B = batch
        x_in = None if c == 0 else state.received.pop((False, c, a.micro)).requires_grad_()
        x = tokens_BS if x_in is None else x_in
        out = None
        if c == self.num_chunks - 1:
            token_loss_BS = chunk(x, labels_BS).token_loss_BS
            assert token_loss_BS is not None
            loss = token_loss_BS.mean()
            state.saved[(a.chunk, a.micro)] = (x_in, loss * scale)
            state.losses[a.micro] = loss.detach()
            if domain_B is not None and state.domain_sum.numel():
                per_seq_B = token_loss_BS.detach().double().mean(dim=1)
                state.domain_sum.index_add_(0, domain_B, per_seq_B)
                state.domain_count.index_add_(0, domain_B, torch.ones_like(per_seq_B))
        else:
            h_BSH = chunk(x).logits_BSV
            assert h_BSH is not None
            self._check_activation(h_BSH, tokens_BS, c)
            state.saved[(a.chunk, a.micro)] = (x_in, h_BSH)
            out = h_BSH.detach().contiguous()
        self._record_stats(chunk, a.micro, state)
        return out

    def _backward(self, a: Action, num_micro: int, state: _StepState) -> torch.Tensor | None:
        """Backward of local chunk a.chunk; returns the gradient of its input to send (None on chunk 0)."""
        c = a.chunk * self.groups.pp_size + self.groups.pp_rank
        x_in, y = state.saved.pop((a.chunk, a.micro))
        if self.reducer is not None:  # each chunk's backwards run in micro-batch order
            self.reducer.set_sync(a.micro == num_micro - 1)
        if c == self.num_chunks - 1:
            y.backward()
        else:
            torch.autograd.backward(y, state.received.pop((True, c, a.micro)))
        if x_in is None:
            return None
        if x_in.grad is None:
            raise RuntimeError(f"virtual stage {c} produced no gradient for its input (micro-batch {a.micro})")
        return x_in.grad

    def _activation_shape(self, tokens_BS: torch.Tensor) -> tuple[int, int, int]:
        """[B, S / (cp * tp), H]: the context- and sequence-parallel shard of the hidden state between stages."""
        batch, seq = tokens_BS.shape
        return batch, seq // (self.groups.cp_size * self.groups.tp_size), self.hidden_size

    def _check_activation(self, h_BSH: torch.Tensor, tokens_BS: torch.Tensor, c: int) -> None:
        shape = self._activation_shape(tokens_BS)
        if tuple(h_BSH.shape) != shape or h_BSH.dtype != self.dtype:
            raise RuntimeError(
                f"virtual stage {c} output is {tuple(h_BSH.shape)} {h_BSH.dtype}, expected {shape} {self.dtype}"
            )

    def _exchange(
        self,
        messages: list[Message],
        out: torch.Tensor | None,
        batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
        state: _StepState,
    ) -> None:
        """Send this slot's output and receive what neighbours produced in it, in one batch."""
        me, ops = self.groups.pp_rank, []
        for msg in messages:
            key = (msg.grad, msg.chunk, msg.micro)
            if msg.src == me:
                assert out is not None
                if msg.dst == me:  # pp == 1: the next chunk is local
                    state.received[key] = out.detach()
                    continue
                ops.append(dist.P2POp(dist.isend, out, self.groups.ranks["pp"][msg.dst], self.groups.pp))
            elif msg.dst == me:
                shape = self._activation_shape(batches[msg.micro][0])
                buf = torch.empty(shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, self.groups.ranks["pp"][msg.src], self.groups.pp))
                state.received[key] = buf
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    def _record_stats(self, chunk: nn.Module, micro: int, state: _StepState) -> None:
        """Store the MoE statistics of the forward that just ran on `chunk`."""
        for layer_id, stats in collect_moe_stats(chunk).items():
            i = self.moe_index[layer_id]
            state.lbl_LM[i, micro] = stats.lbl
            state.zloss_LM[i, micro] = stats.zloss
            state.counts_LE[i] += stats.tokens_per_expert_E.to(state.counts_LE.device)

    def _result(self, num_micro: int, state: _StepState) -> PipelineStepResult:
        """Combine every stage's statistics over the pp group in one float64 all-reduce (each MoE layer
        lives on one pp rank; losses and domain sums on the last; fp32 values and counts stay exact)."""
        loss_M = torch.zeros(num_micro, dtype=torch.float32, device=self.device)
        micro_losses = None
        if self.groups.is_last_stage:
            micro_losses = [state.losses[m] for m in range(num_micro)]
            loss_M = torch.stack(micro_losses).float()
        parts = [state.lbl_LM, state.zloss_LM, loss_M, state.domain_sum, state.domain_count, state.counts_LE]
        packed = torch.cat([t.double().flatten() for t in parts])
        self.groups.all_reduce(packed, "pp")
        lbl, zloss, loss, dsum, dcount, counts = packed.split([t.numel() for t in parts])
        return PipelineStepResult(
            micro_losses=micro_losses,
            lm_loss_M=loss.float(),
            lbl_LM=lbl.float().view_as(state.lbl_LM),
            zloss_LM=zloss.float().view_as(state.zloss_LM),
            tokens_per_expert_LE=counts.round().long().view_as(state.counts_LE),
            domain_sum=dsum.cpu(),
            domain_count=dcount.cpu(),
        )


def build_pipeline(
    model: MoETransformer, groups: ProcessGroups, cfg: Config
) -> tuple[list[MoETransformer], PipelineSchedule]:
    """This rank's model chunks and the schedule that runs them (for `parallelize`)."""
    chunks = build_stage_modules(model, groups, cfg)
    schedule = PipelineSchedule(chunks, groups, cfg)
    layers = [list(chunk.layers.keys()) for chunk in chunks]
    logger.info("pipeline rank %d/%d: chunks with layers %s", groups.pp_rank, groups.pp_size, layers)
    return chunks, schedule
