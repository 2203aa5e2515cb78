"""The README's shell recipes, run as written and in order, in a copy of the repository.

Every ```bash block of README.md runs, in README order, in one bash shell (so `source
.venv/bin/activate` carries over to the next block), except a block right after a
`<!-- readme-test: skip (REASON) -->` line. Only two things change, to keep it cheap: step counts are
divided by 300 (`train.max_steps=600` runs 2 steps; a training command without one runs the demo's
300 / 300 = 1), and training commands validate on one batch per domain (`train.eval_batches=1`).
The copy reuses this checkout's .venv (launch/setup.sh finds its stamp and installs nothing) and the
demo's download cache (~/.cache/moe_train/downloads, filled on first use); the CPU peak-FLOPs cache
is a temporary file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moe_train.train.peak import PEAK_CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
README_TEXT = " ".join((ROOT / "README.md").read_text().split())
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->")
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
TRAINING = ("launch/demo.sh", "moe-train train")
STEP_DIVISOR = 300
STEP_KEYS = re.compile(r"\b(train\.max_steps|optim\.decay_steps)=(\d+)")
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", "data_cache", "runs", "build", "__pycache__", "*_cache", "*.egg-info", "*.so"
)


def readme_recipes(text: str) -> list[str]:
    """The bash blocks of the README that are meant to run, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        if before and SKIP.fullmatch(before[-1].strip()):
            continue
        blocks.append(match.group(1))
    return blocks


def _scaled(match: re.Match) -> str:
    steps = int(match.group(2))
    assert steps % STEP_DIVISOR == 0, f"README step count {match.group(0)} is not a multiple of {STEP_DIVISOR}"
    return f"{match.group(1)}={steps // STEP_DIVISOR}"


def cheap(block: str) -> str:
    """The block with step counts / 300 and one validation batch per domain in training commands."""
    lines = []
    for line in block.replace("\\\n", " ").splitlines():
        command = line.split(" #", 1)[0].rstrip()
        if any(word in command for word in TRAINING):
            command = STEP_KEYS.sub(_scaled, command)
            if "train.max_steps=" not in command:
                command += " train.max_steps=1"
            line = command + " train.eval_batches=1"
        lines.append(line)
    return "\n".join(lines)


def test_recipes_are_found() -> None:
    """The selection itself: the demo, the commands after it, your own data; the skips have reasons."""
    text = (ROOT / "README.md").read_text()
    script = "\n".join(readme_recipes(text))
    for command in ("bash launch/demo.sh", "--resume", "moe-train data build --out data_cache/mine"):
        assert command in script, command
    assert "launch/test.sh" not in script
    assert cheap("moe-train train --resume train.max_steps=600 optim.decay_steps=300  # note") == (
        "moe-train train --resume train.max_steps=2 optim.decay_steps=1 train.eval_batches=1"
    )


def _check_install_stamp() -> None:
    """The copy shares this checkout's .venv; if its install stamp is stale (the extension rebuilt by hand),
    the copy's launch/setup.sh would reinstall the package from the copy and leave the shared venv
    pointing at a temporary directory. Refuse instead, saying how to refresh it."""
    want = subprocess.run(
        ["bash", "-c", "cat setup.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stamp = ROOT / ".venv" / ".moe_train-installed"
    if not stamp.is_file() or stamp.read_text().strip() != want:
        pytest.fail(f"{stamp} is stale for this checkout's setup.py/csrc: run `bash launch/setup.sh` first")


def _copy_repo(dest: Path) -> Path:
    _check_install_stamp()
    repo = dest / "repo"
    shutil.copytree(ROOT, repo, ignore=NOT_COPIED)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    return repo


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_readme_recipes_run_in_order(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    script = "set -euo pipefail\n" + "\n".join(cheap(b) for b in readme_recipes((repo / "README.md").read_text()))
    venv_bin = str(ROOT / ".venv" / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {**os.environ, "PATH": path, PEAK_CACHE_ENV: str(tmp_path / "peak_flops.json")}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script}\n---\n{out[-4000:]}"
    assert "[demo] training configs/tiny_cpu.yaml" in proc.stdout
    assert "parameters: total 17,574,144" in proc.stdout  # `moe-train inspect` agrees with the README's 17.6M
    demo = _records(repo / "runs" / "tiny_cpu")
    assert [r["step"] for r in demo if "loss" in r] == [1, 2]  # the demo, then --resume to 2
    assert [r["step"] for r in demo if "val_loss" in r] == [0, 1, 2]  # validation of the init first
    init_figure = re.search(r"validation loss \(all domains\) goes from ([\d.]+) at the initial model", README_TEXT)
    assert init_figure is not None
    # the README's step-0 figure is the demo's (here on 1 validation batch per domain instead of 4)
    assert abs(demo[0]["val_loss"]["all"] - float(init_figure.group(1))) < 0.05
    assert "LR schedule now ends" not in out  # optim.decay_steps kept the demo's schedule
    for name in ("tiny_cpu", "e16", "mine"):
        records = [r for r in _records(repo / "runs" / name) if "mfu" in r]
        assert records and all(0 < r["mfu"] <= 1 for r in records), name
    assert set(json.loads((repo / "data_cache" / "mine" / "manifest.json").read_text())["domains"]) == {
        "code",
        "tests",
    }


def test_stale_install_stamp_is_refused_before_copying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard of `_copy_repo`: a checkout whose .venv stamp does not match setup.py + csrc is refused
    with the fix named; a matching one passes."""
    import sys

    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "k.cpp").write_text("int k;\n")
    (tmp_path / "setup.py").write_text("# setup\n")
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / ".venv" / ".moe_train-installed"
    stamp.write_text("stale\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="run `bash launch/setup.sh` first"):
        _check_install_stamp()
    digest = subprocess.run(
        ["bash", "-c", "cat setup.py csrc/k.cpp | sha256sum | cut -d' ' -f1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    stamp.write_text(digest.stdout)
    _check_install_stamp()
