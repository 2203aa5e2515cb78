"""Layout-independent checkpoints: saved at world 4 under one sharding, resumed at world 2 under another
and in one process, with and without ZeRO-1; a crash during a save leaves the last checkpoint intact.

Uses the toy model of test_data_parallel (canonical parameters sliced by hand-written ParamMeta).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import run_distributed  # tests/distributed.py
from test_data_parallel import (
    HYPER,
    WEIGHT_DECAY,
    Toy,
    adamw,
    box_of,
    canonical_name,
    make_groups,
    meta_of,
    reference_run,
    set_local_grads,
)

from moe_train.parallel import dist_checkpoint as dcp
from moe_train.parallel.groups import ProcessGroups
from moe_train.parallel.zero import ZeroAdamW, optimizer_local_state
from moe_train.train.checkpoint import TrainState, list_checkpoints

SAVED_STEPS = 2
# run name -> (layout at world 4, ZeRO-1 at save, layout at world 2, ZeRO-1 at load)
RUNS: dict[str, tuple[dict[str, int], bool, dict[str, int], bool]] = {
    "plain_pp2_ep2": ({"pp": 2, "ep": 2}, False, {"ep": 2}, True),
    "zero_tp2_ep2": ({"tp": 2, "ep": 2}, True, {"tp": 2}, False),
    "zero_ep2_etp2": ({"ep": 2, "etp": 2}, True, {}, True),
}


def _real_config(**parallel: Any) -> Any:
    """A tiny MoETransformer config (real TP/EP code from tensor_parallel.py / expert_parallel.py)."""
    from moe_train.config import Config, LBLConfig, ModelConfig, MoEConfig, ParallelConfig

    cfg = Config()
    cfg.model = ModelConfig(
        hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, ffn_hidden_size=64, vocab_size=128
    )
    cfg.moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_ffn_hidden_size=16,
        num_shared_experts=1,
        first_k_dense=1,
        lbl=LBLConfig(coeff=0.0),
    )
    cfg.train.seq_len = 16
    cfg.train.seed = 0
    cfg.parallel = ParallelConfig(**parallel)
    return cfg


def _real_model(groups: ProcessGroups, seed: int = 0, **parallel: Any) -> torch.nn.Module:
    from moe_train.model import build_model
    from moe_train.parallel.expert_parallel import apply_expert_parallel
    from moe_train.parallel.tensor_parallel import apply_tensor_parallel

    cfg = _real_config(**parallel)
    cfg.train.seed = seed
    model = build_model(cfg)
    apply_tensor_parallel(model, groups)
    apply_expert_parallel(model, groups)
    return model


def _real_checks(root: str, groups: ProcessGroups, save: bool, **parallel: Any) -> float:
    """Real TP/EP model: save (world 4) or load (world 2); local params == boxes of the canonical model;
    global norm of 'grads = params' == the canonical parameter norm. Returns that norm."""
    from moe_train.model import build_model
    from moe_train.parallel.clip import global_grad_norm

    model = _real_model(groups, seed=0 if save else 1, **parallel)
    if save:
        dcp.save_distributed_checkpoint(Path(root) / "real", TrainState(1, 1), model, None, groups, {}, keep_last=1)
    else:
        dcp.load_distributed_checkpoint(list_checkpoints(Path(root) / "real")[-1], model, None, groups)
    canonical = dict(build_model(_real_config()).named_parameters())
    for p in model.parameters():
        expected = box_of(canonical[canonical_name(p)].detach(), meta_of(p), groups)
        assert torch.equal(p.detach(), expected), canonical_name(p)
        p.grad = p.detach().clone()
    norm = float(global_grad_norm(model, groups))
    want = float(torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in canonical.values()])))
    assert abs(norm - want) <= 1e-6 * want, (norm, want)
    return norm


def _optimizer(model: Toy, groups: ProcessGroups, zero: bool) -> torch.optim.Optimizer:
    if zero:
        return ZeroAdamW(model, groups, weight_decay=WEIGHT_DECAY, foreach=True, **HYPER)
    return adamw(list(model.parameters()))


def _train(model: Toy, opt: torch.optim.Optimizer, groups: ProcessGroups, steps: range) -> None:
    for step in steps:
        set_local_grads(model, groups, step)
        opt.step()
        opt.zero_grad()


def _assert_matches_reference(model: Toy, opt: torch.optim.Optimizer | None, groups: ProcessGroups, steps: int) -> None:
    """Local params (and optimizer state) == slices of the single-process run after `steps` steps."""
    ref_params, ref_opt, ref_named = reference_run(steps)
    for p in model.parameters():
        torch.testing.assert_close(
            p.detach(), box_of(ref_params[canonical_name(p)], meta_of(p), groups), rtol=1e-6, atol=0
        )
    if opt is None:
        return
    state = optimizer_local_state(opt)
    for p in model.parameters():
        name = canonical_name(p)
        ref_state = ref_opt.state[ref_named[name]]
        assert float(state[name]["step"]) == steps, (name, state[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            expected = box_of(ref_state[key], meta_of(p), groups)
            torch.testing.assert_close(state[name][key], expected, rtol=1e-6, atol=0)


def save_world4(rank: int, world_size: int, root: str) -> bool:
    for run, (layout, zero, _, _) in RUNS.items():
        groups = make_groups(world_size, **layout)
        model = Toy(groups)
        opt = _optimizer(model, groups, zero)
        for step in range(SAVED_STEPS):
            _train(model, opt, groups, range(step, step + 1))
            state = TrainState(step=step + 1, consumed_samples=8 * (step + 1))
            dcp.save_distributed_checkpoint(Path(root) / run, state, model, opt, groups, {"run": run}, keep_last=1)
        _assert_matches_reference(model, opt, groups, SAVED_STEPS)
    _real_checks(root, make_groups(world_size, tp=2, ep=2), save=True, tp=2, ep=2)
    return True


def load_world2(rank: int, world_size: int, root: str) -> bool:
    for run, (_, _, layout, zero) in RUNS.items():
        groups = make_groups(world_size, **layout)
        model = Toy(groups, seed=1)  # different init: everything must come from the checkpoint
        opt = _optimizer(model, groups, zero)
        path = list_checkpoints(Path(root) / run)[-1]
        state, _ = dcp.load_distributed_checkpoint(path, model, opt, groups)
        assert state.step == SAVED_STEPS, state
        _assert_matches_reference(model, opt, groups, SAVED_STEPS)
        _train(model, opt, groups, range(SAVED_STEPS, SAVED_STEPS + 2))
        _assert_matches_reference(model, opt, groups, SAVED_STEPS + 2)
    _real_checks(root, make_groups(world_size, tp=2), save=False, tp=2)
    return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist_ckpt")
    assert all(run_distributed(save_world4, 4, str(root)))
    return root


def test_saved_layout_keeps_last_and_is_complete(saved: Path) -> None:
    for run in RUNS:
        found = list_checkpoints(saved / run)
        assert [p.name for p in found] == [f"step_{SAVED_STEPS:08d}"], found  # keep_last=1 pruned step 1
        assert not [p for p in (saved / run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
        assert dcp.is_distributed_checkpoint(found[-1])


def test_real_model_checkpoint_is_canonical(saved: Path) -> None:
    """The tp2·ep2 save of the real MoETransformer holds exactly the single-device parameters."""
    from moe_train.model import build_model

    params = dcp.load_canonical_tensors(list_checkpoints(saved / "real")[-1])
    expected = dict(build_model(_real_config()).named_parameters())
    assert params.keys() == expected.keys()
    for name, tensor in params.items():
        assert torch.equal(tensor, expected[name].detach()), name


def test_canonical_tensors_equal_single_process_run(saved: Path) -> None:
    ref_params, ref_opt, ref_named = reference_run(SAVED_STEPS)
    for run in RUNS:
        path = list_checkpoints(saved / run)[-1]
        params = dcp.load_canonical_tensors(path)
        assert params.keys() == ref_params.keys()
        for name, tensor in params.items():
            torch.testing.assert_close(tensor, ref_params[name], rtol=1e-6, atol=0)
        exp_avg = dcp.load_canonical_tensors(path, prefix="optim/")
        for name, p in ref_named.items():
            torch.testing.assert_close(exp_avg[f"{name}/exp_avg_sq"], ref_opt.state[p]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_resume_at_world2_under_other_layouts(saved: Path) -> None:
    assert all(run_distributed(load_world2, 2, str(saved)))


@pytest.mark.parametrize("zero", [False, True])
def test_resume_in_single_process(saved: Path, zero: bool) -> None:
    groups = ProcessGroups.single()
    for run in RUNS:
        model = Toy(groups, seed=1)
        opt = _optimizer(model, groups, zero)
        state, rng = dcp.load_distributed_checkpoint(list_checkpoints(saved / run)[-1], model, opt, groups)
        assert state == TrainState(SAVED_STEPS, 8 * SAVED_STEPS) and "torch" in rng
        _assert_matches_reference(model, opt, groups, SAVED_STEPS)
        _train(model, opt, groups, range(SAVED_STEPS, SAVED_STEPS + 1))
        _assert_matches_reference(model, opt, groups, SAVED_STEPS + 1)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    groups = ProcessGroups.single()
    model = Toy(groups)
    opt = _optimizer(model, groups, zero=True)
    _train(model, opt, groups, range(1))
    dcp.save_distributed_checkpoint(tmp_path, TrainState(1, 8), model, opt, groups, {}, keep_last=3)
    _train(model, opt, groups, range(1, 2))

    def crash(obj: Any, path: Path) -> None:
        if path.name == "trainer.pt":  # shards already written, index not yet renamed into place
            raise OSError("disk full (simulated)")
        torch.save(obj, path)

    monkeypatch.setattr(dcp, "_save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        dcp.save_distributed_checkpoint(tmp_path, TrainState(2, 16), model, opt, groups, {}, keep_last=3)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    fresh = Toy(groups, seed=1)
    fresh_opt = _optimizer(fresh, groups, zero=False)
    state, _ = dcp.load_distributed_checkpoint(list_checkpoints(tmp_path)[-1], fresh, fresh_opt, groups)
    assert state.step == 1
    _assert_matches_reference(fresh, fresh_opt, groups, 1)
    # the next save succeeds and removes the stale temporary directory
    dcp.save_distributed_checkpoint(tmp_path, TrainState(2, 16), model, opt, groups, {}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_damaged_or_incomplete_checkpoint_errors(tmp_path: Path) -> None:
    groups = ProcessGroups.single()
    model = Toy(groups)
    path = dcp.save_distributed_checkpoint(tmp_path, TrainState(0, 0), model, None, groups, {}, keep_last=1)
    (path / "shard_00000.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(dcp.CheckpointError, match="shard_00000.pt cannot be read"):
        dcp.load_distributed_checkpoint(path, model, None, groups)
    with pytest.raises(dcp.CheckpointError, match="not a distributed checkpoint"):
        dcp.load_distributed_checkpoint(tmp_path, model, None, groups)
