"""Mixture sampler and policies: exact batch composition, determinism, exhaustion, schedules, each online
policy's update against hand-computed numbers, and exact resume of the sample ledger across DP sizes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_distributed
from parity import SyncCounter

import moe_train.train.trainer as trainer_module
from moe_train.cli import main
from moe_train.config import ConfigError, DataMixtureConfig, load_config
from moe_train.data import BuildOptions, DataError, build_dataset, input_source
from moe_train.data.loader import TrainData
from moe_train.data.policies import (
    AioliPolicy,
    DoReMiPolicy,
    ODMPolicy,
    SchedulePolicy,
    floor_weights,
    read_reference_losses,
)
from moe_train.data.sampler import MixtureSampler, batch_counts
from moe_train.parallel.groups import build_process_groups
from moe_train.train.checkpoint import TrainState
from moe_train.train.trainer import Trainer

# ---------------------------------------------------------------------------------------------
# Composition


def _random_weights(rng: np.random.Generator, d: int) -> np.ndarray:
    w = rng.random(d) ** 3
    w[rng.random(d) < 0.2] = 0.0
    w[0] += 1e-3
    return w / w.sum()


def _largest_remainder(w: np.ndarray, size: int) -> np.ndarray:
    return batch_counts(w, size, np.zeros(len(w)))


def test_every_batch_is_exact_and_cumulative_counts_track_the_target() -> None:
    rng = np.random.default_rng(0)
    for size in (7, 16, 33):
        sampler = MixtureSampler([f"d{i}" for i in range(5)], [None] * 5, seed=3)
        total_target, total = np.zeros(5), np.zeros(5)
        for _ in range(300):
            w = _random_weights(rng, 5)
            counts = sampler.plan(w, size).counts(5)
            assert counts.sum() == size and np.all(np.abs(counts - size * w) < 1)  # exact to one sequence
            total_target += size * w
            total += counts
            assert np.all(np.abs(total - total_target) < 2.0)
    # twin: without the deficit, a fixed mix whose remainders tie always favours the same domain
    w = np.full(3, 1 / 3)
    drift = sum(_largest_remainder(w, 16) for _ in range(30)) - 30 * 16 * w
    assert np.abs(drift).max() > 5


def test_plan_is_deterministic_and_depends_on_the_seed() -> None:
    def plans(seed: int) -> list[np.ndarray]:
        sampler = MixtureSampler(["a", "b", "c"], [50, 7, 300], seed=seed)
        rng = np.random.default_rng(5)
        return [sampler.plan(_random_weights(rng, 3), 12).sample_G for _ in range(20)]

    assert all(np.array_equal(x, y) for x, y in zip(plans(1), plans(1), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(plans(1), plans(2), strict=True))


def test_draws_within_a_domain_are_epochs_without_replacement() -> None:
    sampler = MixtureSampler(["a", "b"], [13, 40], seed=0)
    seen: dict[tuple[int, int], list[int]] = {}
    for _ in range(30):
        plan = sampler.plan([0.5, 0.5], 8)
        for d, s, e in zip(plan.domain_G, plan.sample_G, plan.epoch_G, strict=True):
            seen.setdefault((int(d), int(e)), []).append(int(s))
    for (d, epoch), samples in seen.items():
        assert len(samples) == len(set(samples))  # no sample twice in an epoch
        if (d, epoch + 1) in seen:
            assert sorted(samples) == list(range([13, 40][d]))  # a finished epoch saw every sample
    assert seen[(0, 0)] != seen[(0, 1)]  # a fresh permutation per epoch


def test_state_round_trip_through_json_continues_the_same_plans() -> None:
    rng = np.random.default_rng(9)
    weights = [_random_weights(rng, 3) for _ in range(12)]
    full = MixtureSampler(["a", "b", "c"], [30, 30, 30], seed=4)
    expected = [full.plan(w, 10) for w in weights]
    first = MixtureSampler(["a", "b", "c"], [30, 30, 30], seed=4)
    for w in weights[:5]:
        first.plan(w, 10)
    second = MixtureSampler(["a", "b", "c"], [30, 30, 30], seed=4)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for w, want in zip(weights[5:], expected[5:], strict=True):
        got = second.plan(w, 10)
        assert np.array_equal(got.domain_G, want.domain_G) and np.array_equal(got.sample_G, want.sample_G)
    with pytest.raises(DataError, match="same data.domains"):
        MixtureSampler(["a", "c", "b"], [30, 30, 30], seed=4).load_state_dict(first.state_dict())


def test_exhaustion_error_drop_and_all_exhausted(caplog: pytest.LogCaptureFixture) -> None:
    sampler = MixtureSampler(["small", "big"], [5, 100], seed=0, max_epochs=1, on_exhausted="error")
    sampler.plan([0.5, 0.5], 4)
    sampler.plan([0.5, 0.5], 4)
    with pytest.raises(DataError, match=r"domain 'small' is exhausted at step 2.*max_epochs=1"):
        sampler.plan([0.5, 0.5], 4)
    sampler = MixtureSampler(["small", "big"], [5, 100], seed=0, max_epochs=1, on_exhausted="drop")
    with caplog.at_level(logging.WARNING):
        counts = [sampler.plan([0.5, 0.5], 4).counts(2).tolist() for _ in range(5)]
    assert counts == [[2, 2], [2, 2], [0, 4], [0, 4], [0, 4]]
    assert "domain 'small' exhausted" in caplog.text
    with pytest.raises(DataError, match="every domain with weight > 0 is exhausted"):
        for _ in range(30):
            sampler.plan([0.5, 0.5], 4)


def test_schedule_policy_boundaries() -> None:
    cfg = DataMixtureConfig(policy="schedule", schedule=[[0, 1, 0], [10, 1, 0], [20, 0, 3]])
    policy = SchedulePolicy(["a", "b"], np.ones(2), cfg, 0)
    for step, want in [(0, [1, 0]), (10, [1, 0]), (15, [0.5, 0.5]), (20, [0, 1]), (99, [0, 1])]:
        np.testing.assert_allclose(policy.weights_for(step), want)
    sampler = MixtureSampler(["a", "b"], [None, None], seed=0)
    assert [sampler.plan(policy.weights_for(s), 8).counts(2).tolist() for s in (9, 10, 15, 20)] == [
        [8, 0],
        [8, 0],
        [4, 4],
        [0, 8],
    ]
    with pytest.raises(DataError, match=r"schedule\[0\] has 2 weights for 3 domains"):
        SchedulePolicy(["a", "b", "c"], np.ones(3), cfg, 0)


# ---------------------------------------------------------------------------------------------
# Policies: updates against numbers worked out by hand from each paper's formula


def _mix(**kw: object) -> DataMixtureConfig:
    cfg = DataMixtureConfig(update_every=1)
    for key, value in kw.items():
        section, _, name = key.partition("__")
        setattr(getattr(cfg, section), name, value) if name else setattr(cfg, key, value)
    return cfg


def test_doremi_update_matches_hand_computed(tmp_path: Path) -> None:
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"a": 2.0, "b": 2.5}))
    policy = DoReMiPolicy(["a", "b"], np.ones(2), _mix(doremi__reference=str(ref), doremi__smoothing=0.1), 0)
    policy.observe(0, np.array([6.0, 4.0]), np.array([2.0, 2.0]))  # mean losses 3.0 and 2.0
    # excess = max(L - ref, 0) = [1, 0]; alpha' = 0.5 e^[1, 0]; 0.9 alpha'/sum + 0.05
    np.testing.assert_allclose(policy.weights_D, [0.7079527207670044, 0.2920472792329956], rtol=1e-12)


def test_doremi_reference_from_a_run_metrics(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    train = [{"step": s, "domain_loss": {"a": 4.0 - 0.1 * s, "b": 3.0}} for s in range(1, 21)]
    val = {"step": 20, "val_loss": {"a": 2.25, "b": 2.75, "all": 2.5}}
    metrics.write_text("\n".join(json.dumps(r) for r in [*train[:10], val, *train[10:]]))
    np.testing.assert_allclose(read_reference_losses(str(metrics), ["a", "b"]), [2.25, 2.75])  # last validation
    metrics.write_text("\n".join(json.dumps(r) for r in train))  # no validation: last 10 train steps' mean
    np.testing.assert_allclose(read_reference_losses(str(metrics), ["a", "b"]), [4.0 - 0.1 * 15.5, 3.0])
    with pytest.raises(DataError, match="no loss for domain"):
        read_reference_losses(str(metrics), ["a", "c"])


def test_odm_update_matches_hand_computed() -> None:
    policy = ODMPolicy(["a", "b"], np.ones(2), _mix(odm__alpha=0.9), 0)
    policy.observe(0, np.array([4.0, 2.0]), np.array([1.0, 1.0]))
    # R = 0.1 * L / 0.5 = [0.8, 0.4]; eps_1 = min(1/2, sqrt(ln 2 / 2)) = 0.5, eps_2 = sqrt(ln 2 / 4)
    # pi = (1 - 2 eps_2) softmax(0.5 R) + eps_2
    np.testing.assert_allclose(policy.reward_D, [0.8, 0.4], rtol=1e-12)
    np.testing.assert_allclose(policy.weights_D, [0.5083444730575541, 0.4916555269424459], rtol=1e-12)


def _aioli(one_hot: float, **kw: object) -> AioliPolicy:
    cfg = _mix(update_every=4, aioli__probe_steps=1, aioli__one_hot=one_hot, aioli__eta=1.0, aioli__ema=0.0, **kw)
    return AioliPolicy(["a", "b"], np.ones(2), cfg, 0)


def test_aioli_probes_and_update_match_hand_computed() -> None:
    policy = _aioli(1.0)
    order = [int(j) for j in policy.probe_order(0)]
    assert sorted(order) == [0, 1]
    assert [int(np.argmax(policy.weights_for(s))) for s in (0, 1)] == order and policy.weights_for(2)[0] == 0.5
    drop = {0: np.array([0.5, 0.1]), 1: np.array([0.1, 0.2])}  # beta[:, j]: loss decrease from probing j
    assert [policy.eval_due(c) for c in range(5)] == [True, True, True, False, True]
    losses = np.array([3.0, 3.0])
    policy.observe_eval(0, losses)
    for c, j in enumerate(order, start=1):
        losses = losses - drop[j]
        policy.observe_eval(c, losses)
    # A = beta (one_hot 1) = [[.5, .1], [.1, .2]] / 0.9; column sums [2/3, 1/3]; p = 0.5 e^{colsum} normalised
    np.testing.assert_allclose(policy.weights_D, [0.5825702064623147, 1 - 0.5825702064623147], rtol=1e-12)
    assert not policy.eval_due(2)  # resumed at an evaluated step: not evaluated twice


def test_aioli_mixing_matrix_solves_the_probe_mixtures() -> None:
    policy = _aioli(0.75)
    policy.beta_DD = np.array([[0.4, 0.2], [0.1, 0.3]])
    w = np.array([[0.75, 0.25], [0.25, 0.75]])
    a = np.linalg.solve(w, policy.beta_DD.T).T  # beta_i = W a_i
    np.testing.assert_allclose(w @ a[0], [0.4, 0.2])
    np.testing.assert_allclose(policy.mixing_matrix(), (a - min(a.min(), 0)) / (a - min(a.min(), 0)).sum())
    with pytest.raises(DataError, match=r"one_hot \(0.5\) must be > 1 / 2"):
        _aioli(0.5)


def _simulate(policy_name: str, loss_D: np.ndarray, steps: int = 60) -> np.ndarray:
    domains = [f"d{i}" for i in range(len(loss_D))]
    if policy_name == "odm":
        odm = ODMPolicy(domains, np.ones(len(domains)), _mix(), 0)
        for s in range(steps):
            odm.observe(s, loss_D * 4, np.full(len(domains), 4.0))
        return odm.weights_D
    aioli = AioliPolicy(
        domains, np.ones(len(domains)), _mix(update_every=4, aioli__probe_steps=1, aioli__one_hot=0.8), 0
    )
    losses = loss_D.copy()
    for c in range(steps):
        if aioli.eval_due(c):
            aioli.observe_eval(c, losses)
        j = int(np.argmax(aioli.weights_for(c))) if c % 4 < len(domains) else -1
        if j >= 0:  # training on a domain lowers its own loss in proportion to how high it is
            losses = losses - 0.01 * np.where(np.arange(len(losses)) == j, losses, 0.1 * losses)
    return aioli.weights_D


def test_a_domain_whose_loss_stays_high_gains_weight(tmp_path: Path) -> None:
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"d0": 2.0, "d1": 2.0, "d2": 2.0}))
    high, flat = np.array([5.0, 2.5, 2.5]), np.array([2.5, 2.5, 2.5])
    doremi = DoReMiPolicy(["d0", "d1", "d2"], np.ones(3), _mix(doremi__reference=str(ref), update_every=5), 0)
    flat_doremi = DoReMiPolicy(["d0", "d1", "d2"], np.ones(3), _mix(doremi__reference=str(ref), update_every=5), 0)
    for s in range(20):
        doremi.observe(s, high, np.ones(3))
        flat_doremi.observe(s, flat, np.ones(3))
    assert doremi.weights_D[0] > 0.6 and np.argmax(doremi.weights_D) == 0
    np.testing.assert_allclose(flat_doremi.weights_D, 1 / 3)  # twin: equal excess, no change
    odm = _simulate("odm", high)
    assert odm[0] > odm[1] + 0.01 and odm[0] > 1 / 3
    np.testing.assert_allclose(_simulate("odm", flat), 1 / 3)
    aioli = _simulate("aioli", high)
    assert aioli[0] > 1 / 3 + 0.01 and np.argmax(aioli) == 0
    np.testing.assert_allclose(_simulate("aioli", flat), 1 / 3, atol=1e-3)  # twin: symmetric losses, ~uniform


def test_floor_weights() -> None:
    np.testing.assert_allclose(floor_weights(np.array([0.9, 0.05, 0.05]), 0.1), [0.8, 0.1, 0.1])
    w = floor_weights(np.array([0.97, 0.02, 0.01, 0.0]), 0.05)
    assert math.isclose(w.sum(), 1.0) and w.min() >= 0.05 - 1e-12 and w[0] == w.max()
    with pytest.raises(DataError, match="min_weight"):
        floor_weights(np.ones(4), 0.25)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["data.mixture.policy=magic"], "data.mixture.policy ('magic')"),
        (["data.mixture.policy=schedule"], "needs data.mixture.schedule"),
        (["data.mixture.schedule=[[0, 1, 1], [0, 1, 1]]"], "steps must increase"),
        (["data.mixture.schedule=[[0, -1, 1]]"], "weights must be >= 0"),
        (["data.mixture.policy=doremi"], "data.mixture.doremi.reference"),
        (["data.domains=[a, b]", "data.domain_weights=[0, 0]"], "positive sum"),
        (["data.domains=[a, b]", "data.domain_weights=[1, -1]"], "must be >= 0"),
        (["data.mixture.policy=odm", "data.mock=true"], "needs real domains"),
        (["data.mixture.on_exhausted=skip"], "data.mixture.on_exhausted"),
    ],
)
def test_config_errors(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert words in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Training: data-parallel slices, metrics, and the ledger across a resume on another DP size

VOCAB = 512
TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=8",
    "model.ffn_hidden_size=64",
    f"model.vocab_size={VOCAB}",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.seq_len=16",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.log_every=100",
    "log.tensorboard=false",
    "data.ledger=true",
    "data.verify_checksums=false",
]
ODM = ["data.mixture.policy=odm", "data.mixture.update_every=2", "data.mixture.odm.alpha=0.5"]
AIOLI = ["data.mixture.policy=aioli", "data.mixture.update_every=4", "data.mixture.aioli.probe_steps=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(1)
    words = {
        "alpha": ["the", "cat", "sat", "on", "mat", "a", "dog"],
        "beta": ["def", "return", "x", "(", ")", ":", "if"],
        "gamma": ["1", "2", "+", "=", "3", "7", "*"],
    }
    sources = []
    for name, vocab in words.items():
        path = root / f"{name}.txt"
        docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 120))) for _ in range(80)]
        path.write_text("\n\n".join(docs))
        sources.append(input_source(f"{name}={path}"))
    out = root / "data"
    build_dataset(BuildOptions(out=out, sources=sources, vocab_size=VOCAB, max_bytes=0, val_min_bytes=2000, seed=3))
    return out


def _cfg(corpus: Path, run_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(None, [*TINY, f"data.dir={corpus}", f"run.dir={run_dir}", *extra])


def _ledger(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def test_dp_slices_are_the_single_process_batch(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus, tmp_path / "r", "data.prefetch=false")
    single = TrainData(cfg)
    single.start(0, 0, None, None)
    whole = torch.cat([b.tokens_BS for b in single.micro_batches(0, 0)])
    halves = []
    for rank in range(2):
        data = TrainData(cfg, dp_rank=rank, dp_size=2)
        data.start(0, 0, None, None)
        halves += [b.tokens_BS for b in data.micro_batches(0, 0)]
    assert torch.equal(whole, torch.cat(halves))
    assert not torch.equal(whole, torch.cat(halves[2:] + halves[:2]))  # twin: the slice order matters


def _hand_out(cfg, steps: int) -> tuple[list[torch.Tensor], list[np.ndarray], set[str]]:  # type: ignore[no-untyped-def]
    """Tokens and domains of `steps` global batches under an online policy fed a fixed loss per domain;
    also the names of the threads that read tokens."""
    data = TrainData(cfg)
    threads: set[str] = set()
    read = data.source.batch

    def batch(pairs):  # type: ignore[no-untyped-def]
        threads.add(threading.current_thread().name)
        return read(pairs)

    data.source.batch = batch  # type: ignore[method-assign]
    data.start(0, 0, None, None)
    tokens, domains = [], []
    size = cfg.train.global_batch_size
    for step in range(steps):
        tokens.append(torch.cat([b.tokens_BS for b in data.micro_batches(step, step * size)]))
        assert data.current is not None
        domains.append(data.current.domain_G.copy())
        data.observe(step, np.array([3.0, 1.0, 2.0]) * data.current.counts(3), data.current.counts(3))
    data.close()
    return tokens, domains, threads


def test_prefetch_reads_in_the_background_and_hands_out_the_same_batches(corpus: Path, tmp_path: Path) -> None:
    on = _hand_out(_cfg(corpus, tmp_path / "a", *ODM, "data.prefetch=true"), 6)
    off = _hand_out(_cfg(corpus, tmp_path / "b", *ODM, "data.prefetch=false"), 6)
    assert all(torch.equal(x, y) for x, y in zip(on[0], off[0], strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(on[1], off[1], strict=True))
    assert not all(np.array_equal(on[1][0], d) for d in on[1])  # the policy moved the mixture meanwhile
    assert on[2] == {"moe-data_0"} and off[2] == {threading.current_thread().name}  # where tokens were read


def _train(rank: int, world_size: int, overrides: list[str], run_dir: Path) -> list[dict]:
    cfg = load_config(None, [*TINY, f"run.dir={run_dir}", *overrides])
    groups = build_process_groups(cfg, world_size, rank) if world_size > 1 else None
    return Trainer(cfg, groups).fit()


def _run(corpus: Path, run_dir: Path, *extra: str) -> list[dict]:
    return _train(0, 1, [f"data.dir={corpus}", *extra], run_dir)


def test_ledger_resume_on_another_dp_size_equals_the_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    data = f"data.dir={corpus}"
    full = _run(corpus, tmp_path / "full", *ODM, "train.max_steps=8", "checkpoint.every=0")
    want = _ledger(tmp_path / "full")
    assert [line["index"] for line in want] == list(range(64))
    assert [line["step"] for line in want] == [s for s in range(1, 9) for _ in range(8)]
    targets = [r["mixture_target"] for r in full]
    assert targets[0] != targets[-1]  # the policy moved the weights
    for r in full:  # realised ratios are the target to within one sequence of 8
        assert all(abs(r["mixture_realised"][d] - r["mixture_target"][d]) < 1 / 8 for d in r["mixture_target"])
    run_dir = tmp_path / "resumed"
    _run(corpus, run_dir, *ODM, "train.max_steps=4", "checkpoint.every=4")
    overrides = [data, *ODM, "train.max_steps=8", "checkpoint.every=4", "checkpoint.resume=latest"]
    per_rank = run_distributed(_train, 2, overrides, run_dir, timeout=300)
    assert _ledger(run_dir) == want
    targets = [[r["mixture_target"] for r in records] for records in per_rank]
    assert len(targets[0]) == 4 and targets[0] == targets[1]  # every rank computed the same weights, bitwise
    for got, ref in zip(targets[0], [r["mixture_target"] for r in full[4:]], strict=True):  # losses: fp rounding
        assert got == pytest.approx(ref, rel=1e-6)
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "data_state.json").read_text())
    assert state["sampler"]["next_index"] == 64 and state["policy"]["policy"] == "odm"
    # twin: a resume that does not continue with the weights the checkpoint recorded diverges
    twin = tmp_path / "twin"
    _run(corpus, twin, *ODM, "train.max_steps=4", "checkpoint.every=4")
    path = twin / "checkpoints" / "step_00000004" / "data_state.json"
    state = json.loads(path.read_text())
    state["policy"]["weights"] = state["pending_weights"] = [0.6, 0.2, 0.2]
    path.write_text(json.dumps(state))
    (path.parent / "manifest.json").unlink()  # an edited checkpoint fails its checksums: load it unverified
    _run(corpus, twin, *ODM, "train.max_steps=8", "checkpoint.every=4", "checkpoint.resume=latest")
    assert _ledger(twin)[:32] == want[:32] and _ledger(twin) != want


def test_aioli_resume_mid_round_continues_the_same_ledger(corpus: Path, tmp_path: Path) -> None:
    extra = [*AIOLI, "train.max_steps=9", "checkpoint.every=4"]
    _run(corpus, tmp_path / "full", *extra)
    run_dir = tmp_path / "resumed"
    _run(corpus, run_dir, *extra[:-2], "train.max_steps=4", "checkpoint.every=4")
    shutil.rmtree(tmp_path / "full" / "checkpoints")
    _run(corpus, run_dir, *extra, "checkpoint.resume=latest")
    got, want = _ledger(run_dir), _ledger(tmp_path / "full")
    assert got == want and len(want) == 72
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "lm_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 10))
    probe = max(train[0]["mixture_target"].values())
    assert probe == pytest.approx(0.5)  # step 1 trains on a probe mixture (one_hot 0.5 of 3 domains)
    assert main(["inspect", str(run_dir)]) == 0
    assert (run_dir / "mixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_policy_inputs_fail_before_anything_is_written(corpus: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"alpha": 2.0, "beta": 2.0}))
    cases = [
        (["data.mixture.policy=doremi", f"data.mixture.doremi.reference={ref}"], "no loss for domain(s) gamma"),
        (["data.mixture.policy=doremi", f"data.mixture.doremi.reference={tmp_path / 'no.json'}"], "does not exist"),
        (["data.mixture.policy=schedule", "data.mixture.schedule=[[0, 1, 1]]"], "2 weights for 3 domains"),
        (["data.mixture.policy=aioli", "data.mixture.update_every=3"], "must be < data.mixture.update_every"),
    ]
    for extra, words in cases:
        run_dir = tmp_path / "run"
        with pytest.raises(DataError, match=re.escape(words)):
            Trainer(_cfg(corpus, run_dir, *extra))
        assert not run_dir.exists()


def test_deepspeed_engine_feeds_the_online_policy(corpus: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    steps = [*ODM, "data.mixture.update_every=1", "train.max_steps=7", "checkpoint.every=0"]
    native = _run(corpus, tmp_path / "native", *steps)
    ds = _run(
        corpus,
        tmp_path / "ds",
        *steps,
        "engine.name=deepspeed",
        "engine.deepspeed_config={zero_optimization: {stage: 1}}",
    )
    targets = [r["mixture_target"] for r in ds]
    assert targets[0] != targets[-1]  # the policy saw DeepSpeed's losses (EXP3 explores uniformly for 3 updates)
    for got, ref in zip(targets, [r["mixture_target"] for r in native], strict=True):
        assert got == pytest.approx(ref, rel=1e-5)
    assert _ledger(tmp_path / "ds") == _ledger(tmp_path / "native")


def test_online_policy_step_has_one_host_sync(corpus: Path, tmp_path: Path) -> None:
    """With ODM the step's per-domain losses reach the policy in the step's one device-to-host copy (the
    packed statistics), not in a read of their own; the policy gets the step's numbers."""
    cfg = _cfg(corpus, tmp_path / "r", *ODM, "data.mixture.update_every=1", "data.prefetch=false")
    trainer = Trainer(cfg)
    trainer.train_step()
    trainer.state = TrainState(1, cfg.train.global_batch_size)
    seen: list[tuple[int, np.ndarray, np.ndarray]] = []
    observe = trainer.data.observe
    trainer.data.observe = lambda step, loss_sum, count: (
        seen.append((step, loss_sum, count))
        or observe(  # type: ignore[method-assign]
            step, loss_sum, count
        )
    )
    with SyncCounter(host_tensors=(trainer_module, "read_back")) as counter:
        result = trainer.train_step()
    assert counter.calls == {"cpu": 1}, counter.calls
    ((step, loss_sum, count),) = seen
    assert step == 1 and count.sum() == cfg.train.global_batch_size
    mean = {d: loss_sum[i] / count[i] for i, d in enumerate(trainer.data.domains) if count[i] > 0}
    assert mean == pytest.approx(result.domain_loss, rel=1e-12)  # the same numbers the step logs
