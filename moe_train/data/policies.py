"""Mixture policies: the target domain weights of every global batch (data.mixture.policy).

Shape suffix: D domains.

* static: data.domain_weights (uniform when null), for the whole run.
* schedule: piecewise-linear in the step between rows [step, w_1, ..., w_D] (constant outside them).
* doremi (arXiv 2305.10429, Alg. 1): every update, the per-domain excess loss over a reference,
  clipped at 0, lambda_d = max(L_d - ref_d, 0), drives alpha' = alpha * exp(eta * lambda);
  alpha = (1 - c) alpha' / sum(alpha') + c / D. Online form: the paper trains a proxy on uniform data
  with importance weights and samples a final run with the averaged alpha; here alpha is the sampling
  mixture itself, and the excess is per domain (mean loss) rather than per token (no reference model
  runs; references are per-domain losses from a file or a reference run's metrics.jsonl).
* odm (arXiv 2312.02406, Alg. 1): EXP3 with the loss as reward. After update t the reward estimate of
  every domain seen in the window is R_d = a R_d + (1 - a) L_d / pi_d (importance weighted, moving
  average), eps_t = min(1/D, sqrt(ln D / (D t))) and pi = (1 - D eps_{t+1}) softmax(eps_t R) + eps_{t+1}.
  Domains of a batch are mixed (the paper's "mixed minibatch" variant), so every domain present
  reports its loss.
* aioli (arXiv 2411.05735, Alg. 1-2): each update interval of U steps starts with LearnParams: for
  R rounds and every domain j (seeded order) train `probe_steps` steps on a mixture with share f on j
  (the rest even) and record beta[:, j] += L_before - L_after from validation losses; beta /= R; A is
  the solution of beta_i = W a_i (W the probe mixtures; A = beta when f = 1); A is shifted to >= 0 and
  normalised, averaged with the previous A (ema), and p <- p * exp(eta * sum_i A_i) normalised.

Online policies see per-domain LM-loss sums and counts (float64, identical on every rank) after
every step; their weights are detached numbers, floored at data.mixture.min_weight, and their whole
state (weights, estimates, windows) is JSON-able and saved with checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from moe_train.config import DataMixtureConfig
from moe_train.data.errors import DataError
from moe_train.data.sampler import normalize

log = logging.getLogger(__name__)

_AIOLI_STREAM = 4


def floor_weights(w_D: np.ndarray, floor: float) -> np.ndarray:
    """Normalised weights with every entry >= floor (water-filling: raised entries take from the rest)."""
    w = normalize(w_D, "floor_weights")
    if floor <= 0:
        return w
    if floor * len(w) >= 1:
        raise DataError(f"data.mixture.min_weight ({floor}) must be < 1 / {len(w)} domains")
    low = np.zeros(len(w), dtype=bool)
    while True:
        rest = w[~low]
        scaled = np.where(low, floor, w * (1 - floor * low.sum()) / rest.sum())
        new_low = low | (scaled < floor)
        if new_low.sum() == low.sum():
            return scaled
        low = new_low


def _arr(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


class MixturePolicy:
    """Static weights; the base of every policy (weights_for, observe, evaluations, state)."""

    name = "static"
    uses_losses = False
    """Whether the trainer must gather per-domain losses for observe()."""

    def __init__(self, domains: list[str], initial_D: np.ndarray, cfg: DataMixtureConfig, seed: int) -> None:
        self.domains = domains
        self.cfg = cfg
        self.seed = seed
        self.weights_D = normalize(initial_D, "data.domain_weights")

    def weights_for(self, step: int) -> np.ndarray:
        """Target weights of the global batch at `step` (optimizer steps taken before it)."""
        return self.weights_D

    def observe(self, step: int, loss_sum_D: np.ndarray, count_D: np.ndarray) -> None:
        """Per-domain LM-loss sums and sequence counts of the batch at `step` (after it trained)."""

    def eval_due(self, completed: int) -> bool:
        """Whether the policy wants validation losses after `completed` steps."""
        return False

    def observe_eval(self, completed: int, losses_D: np.ndarray) -> None:
        """Validation loss per domain after `completed` steps (when eval_due said so)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state."""
        return {"policy": self.name, "weights": self.weights_D.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict(); a checkpoint of another policy cannot be continued."""
        if state.get("policy") != self.name:
            raise DataError(
                f"the checkpoint's mixture policy is {state.get('policy')!r}, this run's data.mixture.policy is "
                f"{self.name!r}; resume with the same policy"
            )
        self.weights_D = _arr(state["weights"])


class SchedulePolicy(MixturePolicy):
    """Piecewise-linear weights in the step; rows [step, w_1, ..., w_D]."""

    name = "schedule"

    def __init__(self, domains: list[str], initial_D: np.ndarray, cfg: DataMixtureConfig, seed: int) -> None:
        super().__init__(domains, initial_D, cfg, seed)
        rows = cfg.schedule or []
        for i, row in enumerate(rows):
            if len(row) != len(domains) + 1:
                raise DataError(
                    f"data.mixture.schedule[{i}] has {len(row) - 1} weights for {len(domains)} domains "
                    f"({', '.join(domains)})"
                )
        self.steps = np.asarray([row[0] for row in rows], dtype=np.float64)
        self.table = np.asarray([normalize(row[1:], f"data.mixture.schedule[{i}]") for i, row in enumerate(rows)])

    def weights_for(self, step: int) -> np.ndarray:
        """Linear interpolation between the rows around `step`; the first/last row outside them."""
        w = np.array([np.interp(step, self.steps, self.table[:, d]) for d in range(len(self.domains))])
        return w / w.sum()


class OnlinePolicy(MixturePolicy):
    """Collects per-domain losses over update_every steps, then calls update() with their means."""

    uses_losses = True

    def __init__(self, domains: list[str], initial_D: np.ndarray, cfg: DataMixtureConfig, seed: int) -> None:
        super().__init__(domains, initial_D, cfg, seed)
        self.weights_D = floor_weights(self.weights_D, cfg.min_weight)
        self.window_sum_D = np.zeros(len(domains))
        self.window_count_D = np.zeros(len(domains))
        self.updates = 0

    def observe(self, step: int, loss_sum_D: np.ndarray, count_D: np.ndarray) -> None:
        """Add the batch's losses to the window; update the weights at the end of every window."""
        self.window_sum_D += loss_sum_D
        self.window_count_D += count_D
        if (step + 1) % self.cfg.update_every:
            return
        seen_D = self.window_count_D > 0
        loss_D = np.where(seen_D, self.window_sum_D / np.maximum(self.window_count_D, 1), 0.0)
        self.updates += 1
        self.weights_D = floor_weights(self.update(loss_D, seen_D), self.cfg.min_weight)
        self.window_sum_D[:] = 0
        self.window_count_D[:] = 0

    def update(self, loss_D: np.ndarray, seen_D: np.ndarray) -> np.ndarray:
        """New weights from the window's mean loss per domain (seen_D: domains with samples)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Weights, window and update count (subclasses add their estimates)."""
        return super().state_dict() | {
            "window_sum": self.window_sum_D.tolist(),
            "window_count": self.window_count_D.tolist(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict()."""
        super().load_state_dict(state)
        self.window_sum_D = _arr(state["window_sum"])
        self.window_count_D = _arr(state["window_count"])
        self.updates = int(state["updates"])


def read_reference_losses(path: str, domains: list[str]) -> np.ndarray:
    """Per-domain reference losses from {domain: loss} JSON, or a run's metrics.jsonl (its last
    validation record, else the mean train domain_loss of its last 10 steps)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.mixture.doremi.reference {p} does not exist")
    try:
        if p.suffix == ".jsonl":
            records = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            vals = [r["val_loss"] for r in records if "val_loss" in r]
            train = [r["domain_loss"] for r in records if "domain_loss" in r][-10:]
            means = {d: float(np.mean([t[d] for t in train if d in t])) for d in domains if any(d in t for t in train)}
            table = vals[-1] if vals else means
        else:
            table = json.loads(p.read_text())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"data.mixture.doremi.reference {p} cannot be read ({exc.__class__.__name__})") from None
    missing = [d for d in domains if not isinstance(table.get(d), (int, float)) or not math.isfinite(table[d])]
    if missing:
        raise DataError(f"data.mixture.doremi.reference {p} has no loss for domain(s) {', '.join(missing)}")
    return _arr([table[d] for d in domains])


class DoReMiPolicy(OnlinePolicy):
    """Exponentiated gradient on the clipped excess loss over per-domain reference losses."""

    name = "doremi"

    def __init__(self, domains: list[str], initial_D: np.ndarray, cfg: DataMixtureConfig, seed: int) -> None:
        super().__init__(domains, initial_D, cfg, seed)
        assert cfg.doremi.reference is not None  # checked by config validation
        self.reference_D = read_reference_losses(cfg.doremi.reference, domains)

    def update(self, loss_D: np.ndarray, seen_D: np.ndarray) -> np.ndarray:
        """alpha' = alpha exp(eta max(L - ref, 0)); alpha = (1 - c) alpha' / sum + c / D."""
        excess_D = np.where(seen_D, np.maximum(loss_D - self.reference_D, 0.0), 0.0)
        logits_D = np.log(self.weights_D) + self.cfg.doremi.eta * excess_D
        scaled_D = np.exp(logits_D - logits_D.max())
        c = self.cfg.doremi.smoothing
        return (1 - c) * scaled_D / scaled_D.sum() + c / len(self.domains)


class ODMPolicy(OnlinePolicy):
    """EXP3 over domains with the (importance-weighted, smoothed) LM loss as reward."""

    name = "odm"

    def __init__(self, domains: list[str], initial_D: np.ndarray, cfg: DataMixtureConfig, seed: int) -> None:
        super().__init__(domains, initial_D, cfg, seed)
        self.reward_D = np.zeros(len(domains))

    def exploration(self, t: int) -> float:
        """eps_t = min(1/D, sqrt(ln D / (D t))); eps_0 = 1/D."""
        d = len(self.domains)
        return 1.0 / d if t == 0 else min(1.0 / d, math.sqrt(math.log(d) / (d * t)))

    def update(self, loss_D: np.ndarray, seen_D: np.ndarray) -> np.ndarray:
        """R_d = a R_d + (1 - a) L_d / pi_d for seen d; pi = (1 - D eps_{t+1}) softmax(eps_t R) + eps_{t+1}."""
        a = self.cfg.odm.alpha
        self.reward_D = np.where(seen_D, a * self.reward_D + (1 - a) * loss_D / self.weights_D, self.reward_D)
        t = self.updates
        eps_t, eps_next = self.exploration(t), self.exploration(t + 1)
        logits_D = eps_t * self.reward_D
        soft_D = np.exp(logits_D - logits_D.max())
        return (1 - len(self.domains) * eps_next) * soft_D / soft_D.sum() + eps_next

    def state_dict(self) -> dict[str, Any]:
        """Adds the reward estimates."""
        return super().state_dict() | {"reward": self.reward_D.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict()."""
        super().load_state_dict(state)
        self.reward_D = _arr(state["reward"])


class AioliPolicy(MixturePolicy):
    """LearnParams probes at the start of every interval, then exponentiated gradient on A's column sums."""

    name = "aioli"

    def __init__(self, domains: list[str], initial_D: np.ndarray, cfg: DataMixtureConfig, seed: int) -> None:
        super().__init__(domains, initial_D, cfg, seed)
        self.weights_D = floor_weights(self.weights_D, cfg.min_weight)
        a, d = cfg.aioli, len(domains)
        self.probes = d * a.rounds
        if d > 1 and a.one_hot <= 1.0 / d:
            raise DataError(f"data.mixture.aioli.one_hot ({a.one_hot}) must be > 1 / {d} domains")
        if self.probes * a.probe_steps >= cfg.update_every:
            raise DataError(
                f"data.mixture.aioli: {d} domains x rounds ({a.rounds}) x probe_steps ({a.probe_steps}) = "
                f"{self.probes * a.probe_steps} probe steps must be < data.mixture.update_every ({cfg.update_every})"
            )
        self.beta_DD = np.zeros((d, d))
        self.ema_A_DD: np.ndarray | None = None
        self.loss_before_D: np.ndarray | None = None
        self.last_eval = -1
        self.updates = 0

    def probe_order(self, interval: int) -> np.ndarray:
        """Domains probed in an interval: `rounds` seeded permutations, concatenated."""
        rng = np.random.default_rng([self.seed, _AIOLI_STREAM, interval])
        return np.concatenate([rng.permutation(len(self.domains)) for _ in range(self.cfg.aioli.rounds)])

    def probe_mixture(self, j: int) -> np.ndarray:
        """Share `one_hot` on domain j, the rest split evenly."""
        d, f = len(self.domains), self.cfg.aioli.one_hot
        w = np.full(d, (1 - f) / (d - 1)) if d > 1 else np.zeros(d)
        w[j] = f if d > 1 else 1.0
        return w

    def weights_for(self, step: int) -> np.ndarray:
        """The probe mixture during LearnParams, else the current weights."""
        interval, pos = divmod(step, self.cfg.update_every)
        m = pos // self.cfg.aioli.probe_steps
        if m < self.probes:
            return self.probe_mixture(int(self.probe_order(interval)[m]))
        return self.weights_D

    def eval_due(self, completed: int) -> bool:
        """Before the first probe of an interval and after each probe."""
        pos = completed % self.cfg.update_every
        steps = self.cfg.aioli.probe_steps
        return completed != self.last_eval and pos % steps == 0 and pos // steps <= self.probes

    def observe_eval(self, completed: int, losses_D: np.ndarray) -> None:
        """Accumulate beta[:, j] += L_before - L_after; after the last probe, update the weights."""
        interval, pos = divmod(completed, self.cfg.update_every)
        m = pos // self.cfg.aioli.probe_steps
        self.last_eval = completed
        if m > 0 and self.loss_before_D is not None:
            j = int(self.probe_order(interval)[m - 1])
            self.beta_DD[:, j] += self.loss_before_D - losses_D
        if m == 0:
            self.beta_DD[:] = 0
        self.loss_before_D = _arr(losses_D)
        if m == self.probes:
            self.weights_D = floor_weights(self.update(), self.cfg.min_weight)

    def mixing_matrix(self) -> np.ndarray:
        """A from beta: beta_i = W a_i with W the probe mixtures (symmetric), then >= 0 and sum 1."""
        d = len(self.domains)
        beta = self.beta_DD / self.cfg.aioli.rounds
        mix_DD = np.stack([self.probe_mixture(j) for j in range(d)])
        a_DD = beta if self.cfg.aioli.one_hot == 1 else np.linalg.solve(mix_DD, beta.T).T
        a_DD = a_DD - min(a_DD.min(), 0.0)
        total = a_DD.sum()
        return a_DD / total if total > 0 else np.full((d, d), 1.0 / d**2)

    def update(self) -> np.ndarray:
        """p <- p * exp(eta * column sums of the (averaged) A), normalised."""
        a_DD = self.mixing_matrix()
        g = self.cfg.aioli.ema
        self.ema_A_DD = a_DD if self.ema_A_DD is None else (1 - g) * a_DD + g * self.ema_A_DD
        self.updates += 1
        logits_D = np.log(self.weights_D) + self.cfg.aioli.eta * self.ema_A_DD.sum(axis=0)
        p_D = np.exp(logits_D - logits_D.max())
        return p_D / p_D.sum()

    def state_dict(self) -> dict[str, Any]:
        """Weights, the interval's beta and last losses, the averaged A."""
        return super().state_dict() | {
            "beta": self.beta_DD.tolist(),
            "ema_A": None if self.ema_A_DD is None else self.ema_A_DD.tolist(),
            "loss_before": None if self.loss_before_D is None else self.loss_before_D.tolist(),
            "last_eval": self.last_eval,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict()."""
        super().load_state_dict(state)
        self.beta_DD = _arr(state["beta"])
        self.ema_A_DD = None if state["ema_A"] is None else _arr(state["ema_A"])
        self.loss_before_D = None if state["loss_before"] is None else _arr(state["loss_before"])
        self.last_eval = int(state["last_eval"])
        self.updates = int(state["updates"])


POLICIES: dict[str, type[MixturePolicy]] = {
    p.name: p for p in (MixturePolicy, SchedulePolicy, DoReMiPolicy, ODMPolicy, AioliPolicy)
}


def build_policy(domains: list[str], initial: list[float] | None, cfg: DataMixtureConfig, seed: int) -> MixturePolicy:
    """The policy of data.mixture.policy; initial weights data.domain_weights (uniform when None)."""
    initial_D = np.ones(len(domains)) if initial is None else _arr(initial)
    if len(initial_D) != len(domains):
        raise DataError(f"data.domain_weights has {len(initial_D)} entries for {len(domains)} domains")
    return POLICIES[cfg.policy](domains, initial_D, cfg, seed)
