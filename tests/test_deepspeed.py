"""engine.name=deepspeed: real `deepspeed.initialize` (ZeRO 1/2, CPU offload) on CPU with gloo.

One 4-rank spawn trains every layout for 5 steps and must reproduce the single-process native run
(losses, grad norms, final parameters). A DeepSpeed checkpoint resumes under DeepSpeed and under the
native engine with the same losses. Twin: without DeepSpeed's expert groups (experts treated as dense
parameters, their gradients averaged with other ranks' different experts) the run diverges.
Bad ds_configs are rejected at config time in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

from distributed import run_distributed  # noqa: E402
from parity import RECORD_KEYS, canonical_parameters, layout_config, parity_errors, reference_run  # noqa: E402

from moe_train.config import ConfigError, load_config  # noqa: E402
from moe_train.parallel.groups import build_process_groups  # noqa: E402

WORLD = 4
ZERO1 = {"zero_optimization": {"stage": 1}}
ZERO2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5000}}
OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
LAYOUTS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "zero1_dp4_ep2": (["parallel.ep=2"], ZERO1),
    "zero2_dp4_ep4": (["parallel.ep=4"], ZERO2),
    "zero2_offload_dp4_ep2": (["parallel.ep=2"], OFFLOAD),
    "zero2_dp4_ep1": ([], ZERO2),
}


def _overrides(extra: list[str], ds: dict[str, Any]) -> list[str]:
    return [*extra, "engine.name=deepspeed", f"engine.deepspeed_config={json.dumps(ds)}"]


def _train(rank: int, overrides: list[str], run_dir: Path, steps: int, resume: bool = False) -> dict[str, Any]:
    from moe_train.train.trainer import Trainer

    more = [f"train.max_steps={steps}", "checkpoint.every=3", "checkpoint.keep_last=3"]
    cfg = layout_config([*overrides, *more, *(["checkpoint.resume=latest"] if resume else [])], run_dir)
    groups = build_process_groups(cfg, WORLD, rank)
    trainer = Trainer(cfg, groups)
    records = trainer.fit()
    params = canonical_parameters(trainer.pmodel, groups)
    val = trainer.evaluate()
    return {"records": [{k: r[k] for k in RECORD_KEYS} for r in records], "params": params, "val": val}


def _without_expert_groups() -> None:
    """Sabotage: DeepSpeed sees no MoE, so expert parameters are treated as replicated dense ones."""
    from moe_train.train import deepspeed_engine

    original = deepspeed_engine.param_groups
    deepspeed_engine._expert_groups_module = lambda num_experts, groups: None  # type: ignore[assignment]
    deepspeed_engine.param_groups = lambda model, wd, ep: original(model, wd, 1)  # type: ignore[assignment]


def worker(rank: int, world_size: int, root: Path) -> dict[str, Any]:
    import torch.distributed as dist

    out: dict[str, Any] = {}
    for name, (extra, ds) in LAYOUTS.items():
        out[name] = _train(rank, _overrides(extra, ds), root / name, 5)
        dist.barrier()
    # the step-3 checkpoint of the ZeRO-2 ep4 run, resumed under ZeRO-1 ep2
    if rank == 0:
        step3 = root / "zero2_dp4_ep4" / "checkpoints" / "step_00000003"
        shutil.copytree(step3, root / "resumed" / "checkpoints" / step3.name)
    dist.barrier()
    out["resumed"] = _train(rank, _overrides(["parallel.ep=2"], ZERO1), root / "resumed", 5, resume=True)
    dist.barrier()
    _without_expert_groups()
    out["twin"] = _train(rank, _overrides(["parallel.ep=2"], ZERO2), root / "twin", 5)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("deepspeed")
    results = run_distributed(worker, WORLD, root, timeout=600.0)
    reference = reference_run(["train.max_steps=5", "checkpoint.every=3", "checkpoint.keep_last=3"], root / "ref")
    return results[0], reference, root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_deepspeed_matches_native(runs: tuple[dict, dict, Path], name: str) -> None:
    got, reference, _ = runs
    assert len(got[name]["records"]) == 5
    assert parity_errors(got[name], reference) == []


def test_deepspeed_checkpoint_resumes_under_deepspeed(runs: tuple[dict, dict, Path]) -> None:
    """ZeRO-2 ep4 saved at step 3 (Adam state read out of ZeRO's partitions); ZeRO-1 ep2 resumes it
    (state written into other partitions) and finishes like the uninterrupted run."""
    got, reference, _ = runs
    assert len(got["resumed"]["records"]) == 2
    resumed = {**got["resumed"], "records": reference["records"][:3] + got["resumed"]["records"]}
    assert parity_errors(resumed, reference) == []


def test_deepspeed_checkpoint_resumes_under_native_engine(runs: tuple[dict, dict, Path]) -> None:
    """The step-3 checkpoint of a DeepSpeed run (ZeRO-2 with CPU offload) continues in one native process
    with the losses of the uninterrupted run."""
    from moe_train.train.trainer import Trainer

    _, reference, root = runs
    run_dir = root / "native_resume"
    step3 = root / "zero2_offload_dp4_ep2" / "checkpoints" / "step_00000003"
    shutil.copytree(step3, run_dir / "checkpoints" / step3.name)
    cfg = layout_config(["train.max_steps=5", "checkpoint.every=0", "checkpoint.resume=latest"], run_dir)
    records = Trainer(cfg).fit()
    want = reference["records"][3:]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in want], rel=1e-5, abs=1e-6)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in want], rel=1e-5, abs=1e-6)


def test_twin_without_expert_groups_diverges(runs: tuple[dict, dict, Path]) -> None:
    got, reference, _ = runs
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(got["twin"]["records"], reference["records"], strict=True)]
    # DeepSpeed broadcasts "dense" parameters from rank 0 at start, so even the first forward runs
    # other experts, and the updates average different experts' gradients
    assert min(diffs) > 1e-5
    assert any(
        not torch.allclose(got["twin"]["params"][k], reference["params"][k], rtol=1e-3, atol=1e-4)
        for k in reference["params"]
    )


BAD = [
    (["parallel.tp=2"], ZERO1, "parallel.tp (2) must be 1 with engine.name=deepspeed"),
    (["parallel.zero1=true"], ZERO1, "parallel.zero1 cannot be combined with engine.name=deepspeed"),
    ([], {"zero_optimization": {"stage": 3}}, "zero_optimization.stage (3) is not supported"),
    ([], {"zero_optimization": {"stage": 0}}, "zero_optimization.stage (0) must be 1 or 2"),
    ([], {**ZERO1, "train_batch_size": 32}, "train_batch_size (32) contradicts train.global_batch_size (8)"),
    ([], {**ZERO1, "train_micro_batch_size_per_gpu": 4}, "contradicts train.micro_batch_size (2)"),
    ([], {**ZERO1, "gradient_clipping": 1.0}, "gradient_clipping (1.0) contradicts optim.grad_clip (0.05)"),
    ([], {**ZERO1, "gradient_accumulation_steps": 3}, "gradient_accumulation_steps (3) does not divide"),
    ([], {**ZERO1, "optimizer": {"type": "Adam"}}, "section 'optimizer' is not supported"),
    ([], {**ZERO1, "bf16": {"enabled": True}}, "section 'bf16' is not supported"),
]


@pytest.mark.parametrize("extra,ds,message", BAD, ids=[b[2].split(" ")[0] for b in BAD])
def test_bad_deepspeed_configs_rejected_in_one_line(extra: list[str], ds: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        layout_config(_overrides(extra, ds), Path("unused"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_deepspeed_config_from_file_and_world_size(tmp_path: Path) -> None:
    """A ds_config file is read at load time; gradient_accumulation_steps is checked against the world."""
    from moe_train.parallel.layout import validate_layout

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**ZERO2, "gradient_accumulation_steps": 2, "train_batch_size": "auto"}))
    ds = ["engine.name=deepspeed", f"engine.deepspeed_config={path}"]
    cfg = load_config(None, [*ds, "train.micro_batch_size=2", "train.global_batch_size=8"])
    validate_layout(cfg, 2)  # 8 / (2 * 2) = 2 micro-batches per step: agrees
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps \(2\) contradicts .*data-parallel size 4"):
        validate_layout(cfg, 4)
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(None, ["engine.name=deepspeed", f"engine.deepspeed_config={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match="engine.name is 'native'"):
        load_config(None, [f"engine.deepspeed_config={path}"])


def test_contradicting_ds_config_is_one_line_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moe_train.cli import main

    args = ["train", "data.mock=true", "engine.name=deepspeed", f"run.dir={tmp_path / 'run'}"]
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}
    assert main([*args, f"engine.deepspeed_config={json.dumps(ds)}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "moe-train: error: engine.deepspeed_config train_micro_batch_size_per_gpu (8) contradicts "
        "train.micro_batch_size (4)\n"
    )
    assert not (tmp_path / "run").exists()
