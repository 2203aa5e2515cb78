"""The training loop: global batch → micro-batches with gradient accumulation → clip → AdamW step.

The data of one step travels one way: the mixture sampler's plan of global batch `step` (samples
[consumed_samples, consumed_samples + G)) → this rank's slice → micro-batches → model forward (router
→ dispatch → experts → combine) → lm loss (+ aux losses attached in backward) → backward → clip →
optimizer → metrics → per-domain losses back to the mixture policy (moe_train.data.loader,
moe_train.train.data_hooks). The data position (consumed_samples plus the sampler and policy state
saved with each checkpoint) makes a resumed run continue bit for bit under any layout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from moe_train.analysis.routing import routing_summary
from moe_train.config import Config, save_config, to_dict
from moe_train.data import Batch, build_val_batches, validate_data
from moe_train.data.loader import TrainData
from moe_train.model import build_model, flops_per_token
from moe_train.parallel.clip import clip_grad_norm_
from moe_train.parallel.dist_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.layout import validate_layout
from moe_train.parallel.load_balance import StepBalancer
from moe_train.parallel.materialize import build_parallel_model
from moe_train.train import checkpoint as ckpt
from moe_train.train import data_hooks
from moe_train.train.anomaly import ANOMALY_STATE, AnomalyGuard, screen_step
from moe_train.train.faults import FaultInjector
from moe_train.train.memory import peak_mem_gb
from moe_train.train.metrics import EtaEstimator, MetricsWriter, format_progress
from moe_train.train.optim import build_optimizer, set_lr
from moe_train.train.peak import MfuMeter, device_peak
from moe_train.train.preemption import PreemptionHandler
from moe_train.train.progress import ProgressBar
from moe_train.train.rollback import roll_back
from moe_train.train.schedule import lr_at, schedule_change_warning
from moe_train.train.step import (
    StepStats,
    StepTotals,
    forward_backward,
    read_back,
    reduce_step_totals,
    unpack_step_stats,
)
from moe_train.train.watchdog import Watchdog
from moe_train.utils.logging import get_logger
from moe_train.utils.phases import phase

log = get_logger(__name__)


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it already holds a run)."""


@dataclass
class StepResult:
    """What one optimizer step measured (all ranks agree on these values)."""

    loss: float
    lm_loss: float
    lbl: float
    zloss: float
    grad_norm: float
    domain_loss: dict[str, float] = field(default_factory=dict)
    expert_counts_LE: torch.Tensor | None = None
    routing_counts_LDE: torch.Tensor | None = None
    """Routed assignments per MoE layer, domain and expert of the step's global batch."""
    skipped: bool = False
    """The step was an anomaly (moe_train.train.anomaly) and trained nothing."""
    rolled_back: bool = False
    """The step spiked and the run went back to its last checkpoint (moe_train.train.rollback)."""


class StepReadBack(NamedTuple):
    """What `Trainer._read_back` brought to the host in the step's one device-to-host copy."""

    stats: StepStats
    grad_norm: float
    routing_LDE: torch.Tensor
    """Routed assignments per MoE layer, domain and expert (host, int64)."""
    routing_device_LDE: torch.Tensor
    """The same counts left on the device (for the balancer's end of step)."""
    domain_losses: torch.Tensor | None
    """[loss sums | sequence counts] per domain for an online mixture policy (host), else None."""


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def prepare_run_dir(cfg: Config) -> Path:
    """Create run.dir; refuse to start a fresh run over an existing one (nothing is overwritten)."""
    run_dir = Path(cfg.run.dir)
    if cfg.checkpoint.resume is None and ckpt.list_checkpoints(run_dir):
        raise RunDirError(
            f"run.dir ({run_dir}) already holds checkpoints; continue it with --resume "
            "(checkpoint.resume=latest) or start a new run with run.dir=<another directory>"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Trainer:
    """Training of one config on this rank: single process, or one rank of a parallel layout."""

    def __init__(self, cfg: Config, groups: ProcessGroups | None = None) -> None:
        self.groups = groups or ProcessGroups.single()
        validate_layout(cfg, self.groups.world_size)
        validate_data(cfg)
        self.data = TrainData(cfg, self.groups.dp_rank, self.groups.dp_size)  # may raise: before run.dir exists
        resume_path = ckpt.resolve_resume(
            cfg.run.dir, cfg.checkpoint.resume, cfg.checkpoint.verify, self.groups.rank, self.groups.world_size
        )
        self.cfg = cfg
        self.is_main = self.groups.rank == 0
        self.run_dir = prepare_run_dir(cfg)
        self.device = _device()
        self.source = self.data.source
        needs_val = cfg.train.eval_every > 0 or data_hooks.needs_validation(cfg)
        self.val_batches = build_val_batches(cfg) if needs_val else {}
        self.deepspeed = cfg.engine.name == "deepspeed"
        if self.deepspeed:  # reduction, clipping and the update run inside DeepSpeed's engine
            from moe_train.train.deepspeed_engine import build_deepspeed

            meta_model = build_model(cfg, device="meta")  # materialised per shard after sharding
            self.pmodel, self.optimizer = build_deepspeed(meta_model, self.groups, cfg, self.device)
        else:  # built on the meta device; each rank materialises and initialises only its shards
            self.pmodel = build_parallel_model(cfg, self.groups, self.device, initialise=resume_path is None)
            self.optimizer = build_optimizer(self.pmodel, cfg.optim, self.groups, cfg.parallel.zero1)
        self.balancer = StepBalancer(self.pmodel, cfg, len(self.source.domains))
        self.state = ckpt.TrainState(step=0, consumed_samples=0)
        self._data_state: dict[str, Any] | None = None
        self.faults = FaultInjector(self.groups.rank)  # test-only, from $MOE_TRAIN_FAULTS
        self.anomaly = AnomalyGuard(cfg.train.anomaly)
        self.watchdog = Watchdog(cfg.train.watchdog, self.groups.rank)
        self._saved_step = -1
        if resume_path is not None:
            self._restore(resume_path)
        self.data.start(
            self.state.step, self.state.consumed_samples, self._data_state, self.run_dir if self.is_main else None
        )
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        kept_step = self.state.step if resume_path is not None else -1  # a fresh run keeps no old lines
        self.metrics = MetricsWriter(self.run_dir, cfg.log.tensorboard, resume_step=kept_step, enabled=self.is_main)
        self.flops_per_token = flops_per_token(cfg.model, cfg.moe, cfg.train.seq_len)
        self.mfu = MfuMeter(device_peak(self.device, cfg.log.peak_tflops), self.groups.world_size, self.is_main)
        self.eta = EtaEstimator()

    @property
    def model(self) -> torch.nn.Module:
        """The model of a single-chunk run (the whole model in a single process)."""
        (chunk,) = self.pmodel.chunks
        return chunk

    # -- checkpoints --------------------------------------------------------------------------

    def _restore(self, path: Path) -> None:
        try:
            self.state, rng = load_distributed_checkpoint(path, self.pmodel.chunks, self.optimizer, self.groups)
        except ckpt.CheckpointError as exc:  # e.g. a checkpoint of another model config
            raise ckpt.CheckpointError(f"cannot resume from {path}: {exc}") from None
        ckpt.set_rng_state(rng)
        self._data_state = data_hooks.load_data_state(path)
        anomaly_state = data_hooks.load_json_state(path, ANOMALY_STATE)
        if anomaly_state is not None:
            self.anomaly.load_state_dict(anomaly_state)
        log.info("resumed from %s at step %d", path, self.state.step)
        saved = ckpt.saved_config(path)
        if saved is not None and self.is_main:
            warning = schedule_change_warning(saved, self.cfg.optim, self.cfg.train.max_steps, self.state.step)
            if warning:
                log.warning(warning)

    def save(self) -> Path:
        """Layout-independent checkpoint (every rank writes its unique shards; atomic; with a manifest)."""
        self.watchdog.checkpoint_started()
        with phase("checkpoint"):
            path = save_distributed_checkpoint(
                self.run_dir,
                self.state,
                self.pmodel.chunks,
                self.optimizer,
                self.groups,
                to_dict(self.cfg),
                self.cfg.checkpoint.keep_last,
                extra_json={data_hooks.DATA_STATE: self.data.state_dict(), ANOMALY_STATE: self.anomaly.state_dict()},
                checksums=self.cfg.checkpoint.verify == "sha256",
            )
        self.watchdog.checkpoint_finished()
        self._saved_step = self.state.step
        return path

    # -- one step -----------------------------------------------------------------------------

    def micro_batches(self, first_sample: int) -> list[Batch]:
        """This rank's micro-batches of the global batch starting at global sample `first_sample`:
        DP replica d takes slice d. The data position is consumed_samples, so a resumed run continues
        exactly where it stopped even with another layout or global batch size."""
        return self.data.micro_batches(self.state.step, first_sample)

    def _autocast(self) -> Any:
        enabled = self.cfg.train.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> StepResult:
        """Forward/backward over this rank's micro-batches, reduce grads, clip, one optimizer step; an
        anomalous step (NaN, spike; moe_train.train.anomaly) updates nothing."""
        step = self.state.step
        self.pmodel.train()
        with phase("data"):
            batches = self.micro_batches(self.state.consumed_samples)
        if self.anomaly.drops(self.state.consumed_samples):  # rolled back: handed out, never trained
            return StepResult(math.nan, math.nan, math.nan, math.nan, math.nan, skipped=True)
        with phase("forward"):
            self.balancer.begin_step(batches, self.device, self._autocast())  # global LBL: the counting pass
        if self.deepspeed:  # the engine updates on the last micro-batch's backward: lr first
            set_lr(self.optimizer, lr_at(step, self.cfg.optim, self.cfg.train.max_steps))
        totals = forward_backward(self.pmodel, batches, self.device, self._autocast(), len(self.source.domains))
        self.faults.during_step(step)
        if self.deepspeed:
            grad_norm_t = torch.tensor(self.optimizer.grad_norm(), dtype=torch.float64)  # the engine's float
        else:
            with phase("grad reduce"):
                self.faults.in_grad_reduce(step)
                if self.pmodel.reducer is not None:
                    self.pmodel.reducer.finish()
                totals.sums_3[0] *= self.faults.corrupt(step, list(self.pmodel.parameters()))
                grad_norm_t = self._clip()
        back = self._read_back(batches, totals, grad_norm_t)
        result = self._result(back.stats, back.grad_norm)
        action = screen_step(self, step, result)  # identical on every rank
        if action is not None and not self.deepspeed:
            self.optimizer.zero_grad(set_to_none=True)
            result.skipped = True
            result.rolled_back = action == "rollback" and roll_back(self, step)
            return result
        if not self.deepspeed:
            with phase("optimizer"):
                set_lr(self.optimizer, lr_at(step, self.cfg.optim, self.cfg.train.max_steps))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.balancer.end_step(back.routing_device_LDE)  # streaming LBL state; expert-bias update
        result.routing_counts_LDE = back.routing_LDE
        if back.domain_losses is not None:
            data_hooks.observe_step(self, step, back.domain_losses)
        return result

    def _read_back(self, batches: list[Batch], totals: StepTotals, grad_norm_t: torch.Tensor) -> StepReadBack:
        """Reduce the step's statistics over ranks on the device and copy everything the host needs (losses,
        domain and expert counts, grad norm, routing counts, the mixture policy's domain losses) in the
        step's one device-to-host copy."""
        packed = reduce_step_totals(totals, self.groups)
        routing_LDE, mismatch_L = self.balancer.step_counts(batches)
        device_values = [packed, grad_norm_t.to(self.device).reshape(1), routing_LDE, mismatch_L]
        if self.data.policy.uses_losses:
            device_values.append(data_hooks.gather_domain_losses(totals, self.groups))
        host = read_back(device_values)
        self.balancer.report_mismatch([round(x) for x in host[3].tolist()])
        return StepReadBack(
            stats=unpack_step_stats(host[0], totals),
            grad_norm=host[1].tolist()[0],
            routing_LDE=host[2].round().long(),
            routing_device_LDE=routing_LDE,
            domain_losses=host[4] if len(host) > 4 else None,
        )

    def _clip(self) -> torch.Tensor:
        """Global grad-norm clipping; each parameter counted once across every parallel group. Returns the
        norm on the device (read back with the step's statistics)."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        return clip_grad_norm_(self.pmodel.parameters(), max_norm, self.groups)

    def _result(self, stats: StepStats, grad_norm: float) -> StepResult:
        moe = self.cfg.moe
        loss = stats.lm_loss + moe.lbl.coeff * stats.lbl + moe.zloss_coeff * stats.zloss
        dsum, dcount = stats.domain_sum.tolist(), stats.domain_count.tolist()
        domain_loss = {name: dsum[i] / dcount[i] for i, name in enumerate(self.source.domains) if dcount[i] > 0}
        return StepResult(loss, stats.lm_loss, stats.lbl, stats.zloss, grad_norm, domain_loss, stats.expert_counts_LE)

    # -- validation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean token loss per validation domain, and their mean as 'all' (equal on every rank)."""
        self.pmodel.train(False)
        losses = {}
        for domain, batches in self.val_batches.items():
            total = sum(self._eval_loss(batch) for batch in batches)
            losses[domain] = total / len(batches)
        if losses:
            losses["all"] = sum(losses.values()) / len(losses)
        return losses

    def _eval_loss(self, batch: Batch) -> float:
        """Mean token loss of one validation batch (every DP replica evaluates the same batches)."""
        tokens, labels = batch.tokens_BS.to(self.device), batch.labels_BS.to(self.device)
        with self._autocast():
            if self.pmodel.schedule is not None:
                return float(self.pmodel.schedule.forward_only(tokens, labels))
            out = self.model(tokens, labels)
        assert out.token_loss_BS is not None
        return out.token_loss_BS.float().mean().item()

    # -- the loop -----------------------------------------------------------------------------

    def _record(self, step: int, result: StepResult, elapsed: float) -> dict[str, Any]:
        t = self.cfg.train
        tokens = t.global_batch_size * t.seq_len
        tokens_per_s = tokens / max(elapsed, 1e-9)
        return {
            "step": step,
            "loss": result.loss,
            "lm_loss": result.lm_loss,
            "lbl": result.lbl,
            "zloss": result.zloss,
            "lr": lr_at(step - 1, self.cfg.optim, t.max_steps),
            "grad_norm": result.grad_norm,
            "tokens": step * tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s * self.flops_per_token),
            "step_time_s": elapsed,
            "peak_mem_gb": peak_mem_gb(self.groups, self.device),  # max over ranks (collective)
            "domain_loss": result.domain_loss,
        }

    def _should(self, every: int, step: int) -> bool:
        return step == self.cfg.train.max_steps or (every > 0 and step % every == 0)

    def fit(self) -> list[dict[str, Any]]:
        """Train until train.max_steps (or a preemption signal: save and return); returns the per-step
        metric records of this call."""
        t = self.cfg.train
        records: list[dict[str, Any]] = []
        self.progress = ProgressBar(t.max_steps, self.state.step, self.cfg.log.progress_bar, self.is_main)
        try:
            with PreemptionHandler(t.save_on_signal) as preemption:
                self.watchdog.start()
                if self.val_batches and t.eval_at_start and t.eval_every > 0 and self.state.step == 0:
                    self._validate()
                data_hooks.maybe_evaluate(self)
                while self.state.step < t.max_steps:
                    record = self._one_step()
                    if record is None:  # rolled back: drop the records of the undone steps
                        records = [r for r in records if r["step"] <= self.state.step]
                        continue
                    records.append(record)
                    if preemption.should_stop(self.groups, self.device):
                        self._preempted(preemption.signal_name())
                        break
        finally:
            self.watchdog.stop()
            self.progress.close()
            self.metrics.close()
            self.data.close()
        return records

    def _one_step(self) -> dict[str, Any] | None:
        """Train one step, record it, then validation and checkpoints as due; returns its record (None
        after a rollback)."""
        t = self.cfg.train
        start = time.perf_counter()
        self.watchdog.step_started(self.state.step)
        result = self.train_step()
        if result.rolled_back:
            self.watchdog.step_finished(time.perf_counter() - start)
            return None
        self.state = ckpt.TrainState(self.state.step + 1, self.state.consumed_samples + t.global_batch_size)
        elapsed = time.perf_counter() - start
        self.watchdog.step_finished(elapsed)
        self.eta.add_step(elapsed)
        record = self._record(self.state.step, result, elapsed) | self.data.record()
        record.update(routing_summary(result.routing_counts_LDE))
        record.update(self.anomaly.metrics(result.skipped))
        self.metrics.write_step(record, result.expert_counts_LE)
        every = self.cfg.log.routing_every
        images = every > 0 and self.state.step % every == 0
        self.metrics.write_routing(self.state.step, result.routing_counts_LDE, self.source.domains, images)
        self._after_step(record)
        return record

    def _preempted(self, signal_name: str) -> None:
        """A preemption signal: checkpoint the completed step (unless just saved) for the requeued job."""
        if self._saved_step != self.state.step:
            self.save()
        log.warning(
            "%s received: saved step %d, exiting for a requeue (resume with checkpoint.resume=auto)",
            signal_name,
            self.state.step,
        )

    def _validate(self) -> None:
        """Validate at the current step: metrics.jsonl, TensorBoard, one console line."""
        start = time.perf_counter()
        losses = self.evaluate()
        self.eta.add_eval(time.perf_counter() - start)
        self.metrics.write_eval(self.state.step, losses)
        log.info("step %d validation: %s", self.state.step, " ".join(f"{k}={v:.4f}" for k, v in losses.items()))

    def _evals_left(self, step: int) -> int:
        """Validations still to come after `step` (every train.eval_every steps and at the end)."""
        t = self.cfg.train
        if not self.val_batches or step >= t.max_steps:
            return 0
        if t.eval_every == 0:  # only the final validation
            return 1
        return t.max_steps // t.eval_every - step // t.eval_every + (1 if t.max_steps % t.eval_every else 0)

    def _after_step(self, record: dict[str, Any]) -> None:
        """Console progress, periodic validation and checkpoints."""
        t, step = self.cfg.train, self.state.step
        eta = self.eta.eta(t.max_steps - step, self._evals_left(step))
        self.progress.update(record, eta)
        if step % t.log_every == 0 or step == t.max_steps or step == 1:
            log.info(format_progress(record, t.max_steps, eta))
        if self.val_batches and self._should(t.eval_every, step):
            self._validate()
        data_hooks.maybe_evaluate(self)
        if self._should(self.cfg.checkpoint.every, step):
            self.save()
