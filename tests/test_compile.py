"""train.compile: the regionally compiled step trains to the same numbers as the eager one (1 process).

The compiled regions are each block's attention half and dense MLP half, the MoE layers' input norms and
the final norm + head + cross entropy; the MoE dispatch stays eager.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from parity import train_steps

from moe_train.config import ConfigError, load_config
from moe_train.model.transformer import TransformerBlock

STEPS = 3


def _train(tmp_path: Path, overrides: list[str]) -> dict[str, Any]:
    """STEPS real trainer steps: per-step (lm loss, lbl, z-loss, grad norm), routing counts, final params,
    and how many graphs dynamo compiled meanwhile."""
    from torch._dynamo.utils import counters

    counters.clear()
    out = train_steps(tmp_path, overrides, STEPS)
    blocks = [m for m in out["trainer"].model.modules() if isinstance(m, TransformerBlock)]
    compiled = sum(b.attend != b._attend for b in blocks)
    graphs = int(counters["stats"]["unique_graphs"])
    return {**out, "compiled": compiled, "graphs": graphs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("compile")
    torch._dynamo.reset()
    return {
        "eager": _train(root / "eager", []),
        "compiled": _train(root / "compiled", ["train.compile=true"]),
        "eager_lr": _train(root / "eager_lr", ["optim.lr=0.00101"]),  # the twin: a 1% different lr
    }


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for step, (a, b) in enumerate(zip(got["records"], want["records"], strict=True)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), f"step {step}"
    for step, (a, b) in enumerate(zip(got["counts"], want["counts"], strict=True)):
        assert torch.equal(a, b), f"routing counts differ at step {step}"
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_training_matches_eager(runs: dict[str, dict[str, Any]]) -> None:
    """Losses, LBL, z-loss, grad norm, routing counts of every step and the final parameters."""
    _assert_same(runs["compiled"], runs["eager"])
    assert runs["compiled"]["compiled"] == 4  # every block runs its compiled attention half
    assert runs["compiled"]["graphs"] > 0  # ... and dynamo really compiled graphs


def test_twin_the_comparison_sees_a_small_change(runs: dict[str, dict[str, Any]]) -> None:
    """The same comparison fails for an eager run whose lr differs by 1%; the eager run compiles nothing."""
    assert runs["eager"]["compiled"] == 0 and runs["eager"]["graphs"] == 0
    with pytest.raises(AssertionError):
        _assert_same(runs["eager_lr"], runs["eager"])


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_compiled_training_with_recompute_matches_eager(tmp_path: Path, mode: str) -> None:
    """Recompute around and inside the compiled regions (selective: the attention core and SwiGLU bodies
    inside the compiled halves; full: whole blocks, compiled halves included, replayed in backward) trains
    to the eager run's numbers with the same recompute; the regions really compiled."""
    torch._dynamo.reset()
    eager = _train(tmp_path / "eager", [f"train.recompute={mode}"])
    compiled = _train(tmp_path / "compiled", [f"train.recompute={mode}", "train.compile=true"])
    _assert_same(compiled, eager)
    assert compiled["compiled"] == 4 and compiled["graphs"] > 0 and eager["graphs"] == 0


def test_config_takes_compile_with_recompute_tp_and_cp() -> None:
    cfg = load_config(None, ["train.compile=true", "train.recompute=full", "parallel.tp=2", "parallel.cp=2"])
    assert cfg.train.compile and cfg.parallel.tp == cfg.parallel.cp == 2
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=maybe"])


def test_compiled_2_rank_layouts_match_the_eager_single_process(tmp_path: Path) -> None:
    """The compiled regions under every 2-rank layout kind: dp, ep, pp, and tp and cp, whose collectives
    (sequence-parallel gathers, vocab-parallel loss, the K/V all-gather) sit inside the compiled regions;
    dynamo compiled graphs in each. The harness's own twin (test_parallel_parity: a wrong reduction is
    caught) covers the comparison."""
    from distributed import run_distributed
    from parity import parity_errors, reference_run, run_layouts

    layouts = {
        "dp2_compile": ["train.compile=true"],
        "ep2_compile": ["parallel.ep=2", "train.compile=true"],
        "pp2_compile": ["parallel.pp=2", "train.compile=true"],
        "tp2_compile": ["parallel.tp=2", "train.compile=true"],
        "cp2_compile": ["parallel.cp=2", "train.compile=true"],
    }
    results = dict(run_distributed(run_layouts, 2, layouts, tmp_path / "world2", {}, timeout=600)[0])
    reference = reference_run([], tmp_path / "reference")
    assert sorted(results) == sorted(layouts)
    failures = {name: parity_errors(result, reference)[:5] for name, result in results.items()}
    assert not any(failures.values()), failures
    assert all(result["graphs"] > 0 for result in results.values()), {n: r["graphs"] for n, r in results.items()}
