"""A generated corpus of invalid inputs (>= 100): configs with wrong types, values and unknown keys,
YAML files, corrupted data shards / indexes / tokenizers, vocabulary mismatches, impossible layouts and
damaged or incompatible checkpoints. Each goes through `moe-train train` and must end with one
`moe-train: error:` line, no traceback, a non-zero status, and the run directory unchanged (hashed before
and after). Most cases call the CLI entry point in-process (fast); a few run it as a subprocess to check
the real exit status and stderr end to end. The count is printed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_data import VOCAB, _options, _write_inputs
from test_train import TINY

from moe_train import cli
from moe_train.config import Config
from moe_train.data import build_dataset
from moe_train.parallel.checkpoint_files import list_checkpoints
from moe_train.train.trainer import Trainer

Case = tuple[str, list[str], Callable[[Path], None] | None]
"""(name, CLI arguments after `train`, a function that damages the fresh copies under the root first)."""


def _wrong_value(tp: Any) -> str:
    """An override value whose YAML parse has the wrong type for annotation `tp`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    if typing.get_origin(base) is list:
        return "7"
    if typing.get_origin(base) is dict or dataclasses.is_dataclass(base):
        return "[1, 2]" if typing.get_origin(tp) is not None else "7"
    return {bool: "maybe", int: "not_an_int", float: "fast", str: "[1, 2]"}.get(base, "[1, 2]")


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, f"{path}.")  # type: ignore[arg-type]
        else:
            out.append((path, tp))
    return out


def _sections(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = [prefix.rstrip(".")] if prefix else []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _sections(hints[f.name], f"{prefix}{f.name}.")
    return out


BAD_VALUES = [
    "model.hidden_size=0",
    "model.num_layers=-1",
    "model.num_heads=3",
    "model.head_dim=7",
    "model.vocab_size=0",
    "model.qk_norm_scope=none",
    "moe.top_k=9",
    "moe.num_experts=0",
    "moe.score_func=relu",
    "moe.drop_policy=random",
    "moe.first_k_dense=9",
    "moe.lbl.coeff=-1",
    "moe.lbl.scope=batch",
    "moe.dispatch.dtype=fp4",
    "moe.capacity_factor=-1",
    "train.max_steps=0",
    "train.precision=fp16",
    "train.seed=-3",
    "train.anomaly.on_nan=ignore",
    "train.anomaly.window=0",
    "train.anomaly.spike_zscore=-1",
    "train.watchdog.multiple=-2",
    "train.watchdog.exit_code=300",
    "optim.lr=0",
    "optim.beta1=1.5",
    "optim.schedule=linear",
    "optim.min_lr_ratio=2",
    "checkpoint.keep_last=0",
    "checkpoint.verify=md5",
    "log.level=LOUD",
    "parallel.backend=mpi",
    "parallel.collective_timeout_s=0",
    "data.domains=[]",
    "data.mixture.policy=magic",
    "data.mixture.policy=doremi",
    "engine.name=megatron",
    "run.dir=",
]
LAYOUTS = [
    "parallel.tp=2",
    "parallel.pp=2",
    "parallel.ep=2",
    "parallel.ep=3",
    "parallel.pp=4",
    "parallel.vpp=2",
    "parallel.etp=2",
    "train.global_batch_size=7",
    "train.micro_batch_size=3",
]


def _config_cases() -> list[Case]:
    cases: list[Case] = []
    for path, tp in _leaves(Config):
        cases.append((f"type {path}", [f"{path}={_wrong_value(tp)}"], None))
    for section in _sections(Config):
        cases.append((f"unknown key in {section}", [f"{section}.no_such_key=1"], None))
    cases.append(("unknown top-level key", ["bogus=1"], None))
    cases += [(f"value {item}", [item], None) for item in BAD_VALUES]
    cases += [(f"layout {item}", [item], None) for item in LAYOUTS]
    cases += [("malformed override", ["model.hidden_size"], None), ("empty key", ["model..x=1"], None)]
    return cases


def _yaml_cases(root: Path) -> list[Case]:
    texts = {
        "yaml syntax": "model: [1, 2\n",
        "yaml list": "- 1\n- 2\n",
        "yaml scalar section": "model: 5\n",
        "yaml unknown section": "modle:\n  hidden_size: 4\n",
        "yaml wrong type": "train:\n  eval_at_start: sometimes\n",
    }
    cases: list[Case] = []
    for name, text in texts.items():
        path = root / f"{name.replace(' ', '_')}.yaml"
        path.write_text(text)
        cases.append((name, ["--config", str(path)], None))
    cases.append(("yaml missing file", ["--config", str(root / "missing.yaml")], None))
    return cases


def _flip(path: Path, at: int = 10) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path: Path, by: int = 6) -> None:
    path.write_bytes(path.read_bytes()[:-by])


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        manifest = json.loads((data / "manifest.json").read_text())
        change(manifest)
        (data / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _data_cases(root: Path) -> list[Case]:
    """Cases on a damaged copy of a real built dataset at <root>/data (overrides use data.dir)."""
    damages: dict[str, Callable[[Path], None]] = {
        "truncated shard": lambda d: _truncate(d / "beta" / "train_00000.bin"),
        "flipped shard byte": lambda d: _flip(d / "gamma" / "val_00000.bin"),
        "garbage index": lambda d: (d / "alpha" / "train_00000.idx").write_text("{not an index"),
        "missing index": lambda d: (d / "alpha" / "train_00000.idx").unlink(),
        "truncated index": lambda d: _truncate(d / "code" / "train_00000.idx", 20),
        "missing shard": lambda d: (d / "code" / "train_00000.bin").unlink(),
        "missing tokenizer": lambda d: (d / "tokenizer.json").unlink(),
        "garbage tokenizer": lambda d: (d / "tokenizer.json").write_text("{"),
        "missing manifest": lambda d: (d / "manifest.json").unlink(),
        "garbage manifest": lambda d: (d / "manifest.json").write_text("[1"),
        "old manifest format": _edit_manifest(lambda m: m.update(format="moe_train.data/1")),
        "mixed tokenizers": _edit_manifest(lambda m: m["domains"]["beta"].update(tokenizer_sha256="0" * 64)),
        "shard checksum changed": _edit_manifest(
            lambda m: m["domains"]["alpha"]["train"]["shards"][0].update(sha256="0" * 64)
        ),
    }
    base = [f"data.dir={root / 'data'}", "data.mock=false", f"model.vocab_size={VOCAB}", "train.seq_len=16"]
    cases: list[Case] = [(f"data {name}", base, _under(damage, "data")) for name, damage in damages.items()]
    cases += [
        ("data dir missing", [*base[1:], f"data.dir={root / 'nope'}"], None),
        ("vocab smaller than tokenizer", [*base, "model.vocab_size=300"], None),
        ("other tokenizer file", [*base, f"data.tokenizer={root / 'no_tokenizer.json'}"], None),
        ("unknown domain", [*base, "data.domains=[alpha, nope]"], None),
        ("seq_len beyond a domain", [*base, "train.seq_len=100000"], None),
        ("weights without domains", [*base, "data.domain_weights=[1.0]"], None),
    ]
    return cases


def _under(damage: Callable[[Path], None], name: str) -> Callable[[Path], None]:
    """A damage of <root>/<name> as a damage of <root>."""
    return lambda root: damage(root / name)


def _checkpoint_cases(root: Path) -> list[Case]:
    """Cases on <root>/run, a copy of a finished run with checkpoints at steps 1 and 2."""
    run_dir = root / "run"
    newest = run_dir / "checkpoints" / "step_00000002"
    explicit = [f"checkpoint.resume={newest}"]
    cases: list[Case] = [
        ("ckpt truncated shard", explicit, lambda _: _truncate(newest / "shard_00000.pt", 50)),
        ("ckpt flipped byte", explicit, lambda _: _flip(newest / "shard_00000.pt", 4000)),
        ("ckpt missing trainer.pt", explicit, lambda _: (newest / "trainer.pt").unlink()),
        ("ckpt garbage manifest", explicit, lambda _: (newest / "manifest.json").write_text("{")),
        ("ckpt not a checkpoint", [f"checkpoint.resume={run_dir}"], None),
        ("ckpt missing path", [f"checkpoint.resume={run_dir / 'nope'}"], None),
        ("ckpt all damaged", ["checkpoint.resume=latest"], lambda _: _truncate_all(run_dir)),
        ("ckpt other hidden size", [*explicit, "model.hidden_size=48"], None),
        ("ckpt other expert count", [*explicit, "moe.num_experts=8"], None),
        ("ckpt other layer count", [*explicit, "model.num_layers=3"], None),
        ("ckpt other vocab", [*explicit, "model.vocab_size=256"], None),
        ("fresh run over checkpoints", ["checkpoint.resume=null"], None),
        ("world size flag without dry run", ["--world-size", "4"], None),
    ]
    return cases


def _truncate_all(run_dir: Path) -> None:
    for path in list_checkpoints(run_dir):
        _truncate(path / "trainer.pt", 30)


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/pristine_data (a built dataset), <root>/pristine_run (a finished tiny run with checkpoints)."""
    root = tmp_path_factory.mktemp("invalid")
    (root / "inputs").mkdir()
    build_dataset(_options(root / "pristine_data", _write_inputs(root / "inputs")))
    run_dir = root / "pristine_run"
    overrides = [*TINY, f"run.dir={run_dir}", "train.max_steps=2", "checkpoint.every=1"]
    from moe_train.config import load_config

    Trainer(load_config(None, overrides)).fit()
    return root


def _fresh(root: Path) -> tuple[Path, Path]:
    """A fresh copy of the pristine dataset and run directory for one case."""
    data, run = root / "data", root / "run"
    for copy, pristine in ((data, root / "pristine_data"), (run, root / "pristine_run")):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(pristine, copy)
    return data, run


def _one_line_error(stderr: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("moe-train: error: ")]
    return len(errors) == 1 and "Traceback" not in stderr


def test_invalid_inputs_are_rejected_cleanly(fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fixtures
    cases = _config_cases() + _yaml_cases(root) + _data_cases(root) + _checkpoint_cases(root)
    assert len(cases) >= 100
    failures, messages = [], {}
    for name, args, damage in cases:
        _, run = _fresh(root)
        if damage is not None:
            damage(root)
        before = _tree_hash(run)
        base = [*TINY, f"run.dir={run}", "train.max_steps=3", "checkpoint.resume=latest"]
        flags, overrides = _split_flags(args)
        argv = ["train", *flags, *base, *overrides]
        capsys.readouterr()
        try:
            status = cli.main(argv)
        except BaseException as exc:  # noqa: BLE001 - a raw exception is what this test must not see
            failures.append(f"{name}: raised {exc.__class__.__name__}: {str(exc)[:200]}")
            continue
        stderr = capsys.readouterr().err
        messages[name] = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        if status == 0 or not _one_line_error(stderr):
            failures.append(f"{name}: status {status}, stderr {stderr[-300:]!r}")
        elif _tree_hash(run) != before:
            failures.append(f"{name}: modified the run directory")
    with capsys.disabled():
        print(f"\ninvalid inputs: {len(cases)} cases, {len(cases) - len(failures)} rejected cleanly")
    assert not failures, "\n".join(failures)
    if os.environ.get("MOE_TRAIN_SHOW_ERRORS"):
        with capsys.disabled():
            print("\n".join(f"{name}: {message}" for name, message in messages.items()))


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, dotted overrides)."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        if args[i].startswith("--"):
            flags += args[i : i + 2]
            i += 2
        else:
            overrides.append(args[i])
            i += 1
    return flags, overrides


@pytest.mark.parametrize(
    "args",
    [["model.top_k=99"], ["parallel.tp=2"], ["checkpoint.resume=/nonexistent/ckpt"]],
    ids=["config", "layout", "checkpoint"],
)
def test_subprocess_one_line_and_exit_status(fixtures: Path, tmp_path: Path, args: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(fixtures / "pristine_run", run)
    before = _tree_hash(run)
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_train.cli", "train", *TINY, f"run.dir={run}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and _one_line_error(proc.stderr), proc.stderr
    assert proc.stdout == "" and _tree_hash(run) == before
