"""What a new user reads first: MFU and its peak, ETA, validation of the init, schedule on resume, messages.

The README's recipes themselves run in tests/test_readme.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from moe_train.config import ConfigError, OptimConfig, load_config
from moe_train.data.build import BuildOptions, build_dataset
from moe_train.data.inputs import input_source
from moe_train.model import count_parameters
from moe_train.train import peak as peak_module
from moe_train.train.metrics import EtaEstimator
from moe_train.train.peak import PEAK_CACHE_ENV, MfuMeter, Peak, cpu_peak, device_peak, machine_key
from moe_train.train.schedule import lr_at, schedule_change_warning
from moe_train.train.trainer import RunDirError, Trainer
from moe_train.utils.logging import USER_ERROR_MARKER, first_to_report_error

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=8",
    "model.ffn_hidden_size=64",
    "model.vocab_size=128",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=32",
    "data.mock=true",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.seq_len=16",
    "train.eval_batches=1",
    "train.log_every=1",
    "optim.warmup_steps=1",
    "log.tensorboard=false",
]


@pytest.fixture
def moe_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """Records of the moe_train logger (setup_logging stops it from propagating to caplog's root handler)."""
    monkeypatch.setattr(logging.getLogger("moe_train"), "propagate", True)
    caplog.set_level(logging.INFO, logger="moe_train")
    return caplog


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- MFU's denominator ------------------------------------------------------------------------


def test_cpu_peak_probed_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_probe = peak_module.measure_cpu_peak_flops

    def counting_probe(*args: float) -> float:
        calls.append(args)
        return real_probe(256, 2, 0.0)

    monkeypatch.setattr(peak_module, "measure_cpu_peak_flops", counting_probe)
    path = tmp_path / "cache" / "peak_flops.json"
    monkeypatch.setenv(PEAK_CACHE_ENV, str(path))
    first = device_peak(torch.device("cpu"))
    assert len(calls) == 1 and calls[0][2] >= 1.0  # the probe runs for at least a second
    assert json.loads(path.read_text())[machine_key()]["flops"] == first.flops > 0
    second = device_peak(torch.device("cpu"))
    assert len(calls) == 1 and second == first  # the second call reads the cache
    other_threads = torch.get_num_threads() + 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: other_threads)
    cpu_peak()
    assert len(calls) == 2  # another thread count is another machine key
    assert len(json.loads(path.read_text())) == 2


def test_peak_override_skips_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PEAK_CACHE_ENV, str(tmp_path / "peak_flops.json"))
    monkeypatch.setattr(peak_module, "measure_cpu_peak_flops", lambda *a: pytest.fail("probed despite override"))
    cfg = load_config(None, [*TINY, f"run.dir={tmp_path / 'run'}", "log.peak_tflops=0.5", "train.max_steps=1"])
    trainer = Trainer(cfg)
    assert trainer.mfu.peak.flops == 0.5e12
    (record,) = trainer.fit()
    assert record["mfu"] == pytest.approx(record["tokens_per_s"] * trainer.flops_per_token / 0.5e12)
    assert not (tmp_path / "peak_flops.json").exists()
    with pytest.raises(ConfigError, match=r"log.peak_tflops \(0.0\) must be > 0"):
        load_config(None, ["log.peak_tflops=0"])


def test_mfu_above_peak_is_clamped_with_one_warning(moe_log: pytest.LogCaptureFixture) -> None:
    meter = MfuMeter(Peak(1e9, "CPU probe cached in /x/peak_flops.json"), devices=2)
    assert meter(1e9) == pytest.approx(0.5)  # twin: below the peak nothing changes
    assert _warnings(moe_log) == []
    assert [meter(f) for f in (4e9, 3e9, 2.5e9)] == [1.0, 1.0, 1.0]
    (warning,) = _warnings(moe_log)
    assert "MFU would be 200%" in warning and "disturbed" in warning
    assert "log.peak_tflops" in warning and "delete the cache file" in warning
    quiet = MfuMeter(Peak(1e9, "x"), warn=False)
    assert quiet(5e9) == 1.0 and len(_warnings(moe_log)) == 1  # non-zero ranks stay quiet


def _hog(stop: threading.Event) -> None:
    """A busy Python thread: holds the GIL between switches, so every timed matmul waits for it."""
    while not stop.is_set():
        sum(range(1000))


def test_disturbed_probe_still_gives_mfu_in_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PEAK_CACHE_ENV, str(tmp_path / "peak_flops.json"))
    stop = threading.Event()
    hog = threading.Thread(target=_hog, args=(stop,))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.05)
    hog.start()
    try:
        disturbed = cpu_peak()  # the trainer below reads this cached, disturbed value
    finally:
        stop.set()
        hog.join()
        sys.setswitchinterval(interval)
    overrides = [f"run.dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=0"]
    overrides += ["model.hidden_size=256", "model.head_dim=64", "model.ffn_hidden_size=512"]
    overrides += ["moe.expert_ffn_hidden_size=512", "train.seq_len=128", "model.vocab_size=512"]
    trainer = Trainer(load_config(None, [*TINY, *overrides]))
    assert trainer.mfu.peak == disturbed
    records = trainer.fit()
    assert all(0 < r["mfu"] <= 1 for r in records), [r["mfu"] for r in records]
    raw = [r["tokens_per_s"] * trainer.flops_per_token / disturbed.flops for r in records]
    assert [r["mfu"] for r in records] == [pytest.approx(min(x, 1.0)) for x in raw]  # clamped, not rescaled


# -- ETA --------------------------------------------------------------------------------------


def test_eta_skips_warmup_and_ignores_outliers() -> None:
    eta = EtaEstimator(warmup=2, window=5)
    assert eta.eta(100) is None and eta.eta(0) == 0.0  # nothing left: done, even before any rate
    for seconds in (40.0, 9.0):  # first steps: allocation, caches
        eta.add_step(seconds)
    assert eta.eta(100) is None  # nothing but warm-up seen yet
    for seconds in (1.0, 1.2, 30.0, 0.9, 1.1):  # one step slowed by a checkpoint or another process
        eta.add_step(seconds)
    assert eta.eta(100) == pytest.approx(100 * 1.1)  # median of the last 5
    eta.add_eval(6.0)
    assert eta.eta(100, evals_left=2) == pytest.approx(100 * 1.1 + 12.0)
    for _ in range(3):
        eta.add_step(2.0)  # the window moves: the rate is recent
    assert eta.eta(10) == pytest.approx(20.0)


# -- validation at step 0 ---------------------------------------------------------------------


def test_validation_of_the_initial_model(tmp_path: Path) -> None:
    base = [*TINY, "train.max_steps=2", "train.eval_every=2", "checkpoint.every=1"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 0, "val_loss": {"all": 1.0}}\n')  # an aborted run's
    trainer = Trainer(load_config(None, [*base, f"run.dir={tmp_path / 'a'}"]))
    init_val = trainer.evaluate()
    trainer.fit()
    evals = [r for r in _records(tmp_path / "a") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["val_loss"] == pytest.approx(init_val)
    assert evals[0]["val_loss"] != evals[1]["val_loss"]
    Trainer(load_config(None, [*base, f"run.dir={tmp_path / 'b'}", "train.eval_at_start=false"])).fit()
    assert [r["step"] for r in _records(tmp_path / "b") if "val_loss" in r] == [2]  # twin: switched off
    trained = [[r[k] for k in ("loss", "grad_norm")] for r in _records(tmp_path / "a") if "loss" in r]
    assert trained == [[r[k] for k in ("loss", "grad_norm")] for r in _records(tmp_path / "b") if "loss" in r]
    assert (
        evals[1] == [r for r in _records(tmp_path / "b") if "val_loss" in r][0]
    )  # validating the init changes nothing
    resumed = load_config(None, [*base, f"run.dir={tmp_path / 'a'}", "train.max_steps=3", "checkpoint.resume=latest"])
    Trainer(resumed).fit()
    assert [r["step"] for r in _records(tmp_path / "a") if "val_loss" in r] == [0, 2, 3]  # no re-validation


# -- the schedule's own length ----------------------------------------------------------------


def test_decay_steps_fixes_the_schedule_length() -> None:
    for schedule in ("cosine", "wsd"):
        old = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=5, schedule=schedule)
        kept = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=5, schedule=schedule, decay_steps=100)
        assert [lr_at(s, kept, 200) for s in range(100)] == [lr_at(s, old, 100) for s in range(100)]
        assert [lr_at(s, kept, 200) for s in range(100, 200)] == [pytest.approx(0.1)] * 100
        assert lr_at(99, old, 200) > lr_at(99, old, 100)  # twin: without decay_steps it stretches


def test_schedule_change_warning_text() -> None:
    saved = {"train": {"max_steps": 300}, "optim": {"decay_steps": None}}
    optim = OptimConfig(lr=3e-3, warmup_steps=20)
    text = schedule_change_warning(saved, optim, 320, 300)
    assert text is not None and "from 300 to 320" in text and "optim.decay_steps=300" in text
    assert f"lr at step 301: {lr_at(300, optim, 300):.2e} -> {lr_at(300, optim, 320):.2e}" in text
    assert schedule_change_warning(saved, optim, 300, 300) is None
    kept = OptimConfig(lr=3e-3, warmup_steps=20, decay_steps=300)
    assert schedule_change_warning(saved, kept, 320, 300) is None


def test_resume_with_longer_run_warns_unless_decay_steps_set(tmp_path: Path, moe_log: pytest.LogCaptureFixture) -> None:
    base = [*TINY, "train.eval_every=0", "checkpoint.every=2", "optim.warmup_steps=0"]
    first = load_config(None, [*base, f"run.dir={tmp_path / 'a'}", "train.max_steps=4"])
    Trainer(first).fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    floor = first.optim.lr * first.optim.min_lr_ratio
    longer = [*base, "train.max_steps=8", "checkpoint.resume=latest"]
    stretched = Trainer(load_config(None, [*longer, f"run.dir={tmp_path / 'a'}"]))
    (warning,) = [w for w in _warnings(moe_log) if "decay_steps" in w]
    assert "from 4 to 8" in warning and "optim.decay_steps=4" in warning
    assert stretched.fit()[0]["lr"] > floor  # twin: the schedule did stretch
    moe_log.clear()
    records = Trainer(load_config(None, [*longer, f"run.dir={tmp_path / 'b'}", "optim.decay_steps=4"])).fit()
    assert [w for w in _warnings(moe_log) if "decay_steps" in w] == []
    assert [r["lr"] for r in records] == [pytest.approx(floor)] * 4


# -- messages ---------------------------------------------------------------------------------


def test_yaml_error_names_file_line_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  hidden_size: 128\nmoe:\n  num_experts: [8, 16\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert re.search(rf"{re.escape(str(path))}:5:\d+ is not valid YAML", message), message
    assert "started at 4:16" in message and "\n" not in message


def test_taken_run_dir_error_names_resume_flag(tmp_path: Path) -> None:
    Trainer(load_config(None, [*TINY, f"run.dir={tmp_path}", "train.max_steps=1", "train.eval_every=0"])).fit()
    with pytest.raises(RunDirError) as info:
        Trainer(load_config(None, [*TINY, f"run.dir={tmp_path}"]))
    assert "--resume" in str(info.value) and "checkpoint.resume=latest" in str(info.value)
    assert "run.dir=" in str(info.value)


def test_first_failing_rank_reports_user_error(tmp_path: Path) -> None:
    attempt = tmp_path / "attempt_0"
    env = {"WORLD_SIZE": "4", "RANK": "2", "TORCHELASTIC_ERROR_FILE": str(attempt / "2" / "error.json")}
    (attempt / "2").mkdir(parents=True)
    assert first_to_report_error(env)  # the first rank to fail speaks, whichever it is
    assert (attempt / USER_ERROR_MARKER).exists()
    assert not first_to_report_error({**env, "RANK": "0", "TORCHELASTIC_ERROR_FILE": str(attempt / "0" / "e")})
    other_attempt = tmp_path / "attempt_1" / "0" / "error.json"
    other_attempt.parent.mkdir(parents=True)
    assert first_to_report_error({**env, "TORCHELASTIC_ERROR_FILE": str(other_attempt)})
    assert first_to_report_error({"WORLD_SIZE": "1"})  # a single process always reports
    assert first_to_report_error({"WORLD_SIZE": "2", "RANK": "0"})  # another launcher: rank 0 only
    assert not first_to_report_error({"WORLD_SIZE": "2", "RANK": "1"})


def test_short_vocabulary_reported_in_log_and_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"note {i}: the quick brown fox jumps over the lazy dog" for i in range(40)))
    out = tmp_path / "built"
    with caplog.at_level(logging.WARNING, logger="moe_train.data.build"):
        manifest = build_dataset(
            BuildOptions(out=out, sources=[input_source(f"notes={text}")], vocab_size=4096, val_min_bytes=200)
        )
    tok = manifest["tokenizer"]
    assert tok["requested_vocab_size"] == 4096 and tok["vocab_size"] < 4096
    assert f"{tok['vocab_size']:,} tokens, fewer than --vocab-size 4,096" in tok["vocab_note"]
    assert tok["vocab_note"] in caplog.text
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["vocab_note"] == tok["vocab_note"]
    assert tok["vocab_note"] in (out / "SOURCES.md").read_text()


def test_every_data_build_input_form_is_in_the_readme(capsys: pytest.CaptureFixture[str]) -> None:
    from moe_train.cli import main

    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    forms = re.findall(r"hf:NAME_OR_PATH\[#SPLIT\]|\.jsonl|\.txt", help_text)
    assert "hf:NAME_OR_PATH[#SPLIT]" in forms
    readme = (ROOT / "README.md").read_text()
    assert [f for f in forms if f not in readme] == []


# -- set-up says what it does -----------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python3 (`-m venv DIR` makes a fake venv) and for DIR/bin/python
if [[ "$1" == "-m" && "$2" == "venv" ]]; then
  mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; cp "$(dirname "$0")/pip" "$3/bin/pip"; exit 0
fi
[[ -f "$(dirname "$0")/../torch_installed" ]]   # `python -c "import torch"` works once pip installed it
"""
FAKE_PIP = """#!/usr/bin/env bash
echo "pip $*"
[[ "$*" == *torch==* ]] && touch "$(dirname "$0")/../torch_installed"
exit 0
"""


def test_setup_says_each_phase_before_it_runs(tmp_path: Path) -> None:
    """launch/setup.sh on a fresh checkout, with a fake python/pip that log what they are asked to do."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "setup.sh", repo / "launch")
    shutil.copy(ROOT / "setup.py", repo)
    shutil.copytree(ROOT / "csrc", repo / "csrc")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("pip", FAKE_PIP)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake / "python")}
    env.pop("TORCH_VERSION", None)

    def setup() -> list[str]:
        proc = subprocess.run(["bash", "launch/setup.sh"], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    lines = setup()
    phases = [i for i, line in enumerate(lines) if line.startswith("[setup] ")]
    said = [lines[i] for i in phases]
    assert [s.split(" (about ")[0] for s in said] == [
        f"[setup] creating the environment .venv with {fake / 'python'}",
        "[setup] installing torch==2.13.0",
        "[setup] installing moe_train with its dev tools and building the C++ extension",
    ]
    assert all(re.search(r"\(about \d[^)]*(s|minutes?)\)$", s) for s in said), said  # how long it usually takes
    assert lines[phases[1] + 1] == "pip install -q torch==2.13.0"  # each line comes before its work
    assert lines[phases[2] + 1 :] == [
        "pip install -q setuptools>=77 wheel",
        "pip install -q --no-build-isolation -e .[dev]",
    ]
    assert setup() == []  # set up already: nothing to do, nothing said


# -- small truths -----------------------------------------------------------------------------


def test_parameter_counts_in_readme_and_demo_config_are_true() -> None:
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    counts = count_parameters(cfg.model, cfg.moe)
    total, active = f"{counts.total / 1e6:.1f}M", f"{counts.active / 1e6:.1f}M"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"{total}-parameter MoE ({active} active)" in readme
    config_comment = (ROOT / "configs" / "tiny_cpu.yaml").read_text().splitlines()[0]
    assert f"{total}-parameter" in config_comment and "~" not in config_comment
