"""Layout validation, analytic parameter / memory counts and the dry-run report (no processes)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import pytest

from moe_train.config import Config, ConfigError, ModelConfig, MoEConfig, ParallelConfig
from moe_train.model import count_parameters
from moe_train.parallel import dry_run_report, rank_parameters, total_parameters, validate_layout
from moe_train.parallel.params import rank_memory_bytes, unique_parameters


def _config(**sections: Mapping[str, object]) -> Config:
    """Default config with train.micro_batch_size 1, then per-section field values, e.g. parallel={"tp": 2}."""
    cfg = Config()
    cfg.train.micro_batch_size = 1
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


# (world, config, expected message) — every message is one line naming keys and values
BAD_LAYOUTS = [
    (
        2,
        _config(model={"tie_embeddings": True}, parallel={"pp": 2}),
        r"model.tie_embeddings \(true\) is not supported with parallel.pp \(2\) > 1",
    ),
    (6, _config(parallel={"tp": 4}), r"world size \(6\) is not divisible by parallel.tp \(4\) \* parallel.pp \(1\)"),
    (12, _config(parallel={"ep": 8}), r"world size \(12\) is not divisible by parallel.etp \(1\) \* parallel.ep \(8\)"),
    (
        8,
        _config(moe={"num_experts": 6}, parallel={"ep": 4}),
        r"moe.num_experts \(6\) is not divisible by parallel.ep \(4\)",
    ),
    (
        8,
        _config(model={"num_heads": 6}, parallel={"tp": 4}),
        r"model.num_heads \(6\) is not divisible by parallel.tp \(4\)",
    ),
    (8, _config(model={"num_kv_heads": 1}, parallel={"tp": 2}), r"model.num_kv_heads \(1\) is not divisible by"),
    (
        8,
        _config(model={"num_heads": 8, "num_kv_heads": 4, "hidden_size": 250}, parallel={"tp": 4}),
        r"model.hidden_size \(250\) is not divisible by parallel.tp \(4\)",
    ),
    (
        8,
        _config(model={"num_kv_heads": 4, "ffn_hidden_size": 1022}, parallel={"tp": 4}),
        r"model.ffn_hidden_size \(1022\) is not divisible by parallel.tp \(4\)",
    ),
    (8, _config(model={"vocab_size": 8191}, parallel={"tp": 2}), r"model.vocab_size \(8191\) is not divisible by"),
    (
        8,
        _config(moe={"num_shared_experts": 1, "shared_expert_ffn_hidden_size": 511}, parallel={"tp": 2}),
        r"moe.num_shared_experts \(1\) \* shared expert ffn size \(511\) = 511 is not divisible by parallel.tp \(2\)",
    ),
    (
        8,
        _config(moe={"expert_ffn_hidden_size": 510}, parallel={"etp": 4}),
        r"moe.expert_ffn_hidden_size \(510\) is not divisible by parallel.etp \(4\)",
    ),
    (
        8,
        _config(train={"seq_len": 127}, parallel={"tp": 2}),
        r"train.seq_len \(sequence parallel\) \(127\) is not divisible",
    ),
    (
        4,
        _config(model={"num_layers": 6}, parallel={"pp": 4}),
        r"model.num_layers \(6\) is not divisible by parallel.pp \(4\)",
    ),
    (2, _config(parallel={"pp": 2, "pp_layer_split": [2, 1, 1]}), r"has 3 entries, expected parallel.pp \(2\)"),
    (2, _config(parallel={"pp": 2, "pp_layer_split": [3, 2]}), r"sums to 5, expected model.num_layers \(4\)"),
    (
        2,
        _config(parallel={"pp": 2, "vpp": 2, "pp_schedule": "interleaved_1f1b", "pp_layer_split": [0, 2, 1, 1]}),
        r"parallel.pp_layer_split \(\[0, 2, 1, 1\]\) has a stage with < 1 layer",
    ),
    (
        8,
        _config(train={"global_batch_size": 16, "micro_batch_size": 4}),
        r"train.global_batch_size \(16\) is not divisible by dp \(8\) \* train.micro_batch_size \(4\) = 32",
    ),
    (
        1,
        _config(parallel={"vpp": 2, "pp_schedule": "interleaved_1f1b"}),
        r"parallel.vpp \(2\) > 1 needs parallel.pp > 1",
    ),
    (2, _config(parallel={"pp": 2, "vpp": 2}), r"needs parallel.pp_schedule 'interleaved_1f1b' \(got '1f1b'\)"),
    (2, _config(parallel={"pp": 2, "pp_schedule": "interleaved_1f1b"}), r"'interleaved_1f1b' needs parallel.vpp > 1"),
    (
        4,
        _config(
            model={"num_layers": 8},
            train={"global_batch_size": 6},
            parallel={"pp": 4, "vpp": 2, "pp_schedule": "interleaved_1f1b"},
        ),
        r"micro-batches per step \(6 = .*\) must be a multiple of parallel.pp \(4\)",
    ),
    (0, _config(), r"world size \(0\) must be >= 1"),
    (2, _config(parallel={"etp": 0}), r"parallel.etp \(0\) must be >= 1"),
]


@pytest.mark.parametrize(("world", "cfg", "message"), BAD_LAYOUTS, ids=[f"bad{i}" for i in range(len(BAD_LAYOUTS))])
def test_bad_layouts_raise_one_line_errors(world: int, cfg: Config, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate_layout(cfg, world)
    assert "\n" not in str(info.value)


def test_good_layouts_pass() -> None:
    validate_layout(_config(parallel={"tp": 2, "ep": 4}), 8)
    validate_layout(_config(parallel={"pp": 2, "pp_layer_split": [3, 1]}), 2)
    layout = validate_layout(_config(parallel={"pp": 2, "vpp": 2, "pp_schedule": "interleaved_1f1b"}), 4)
    assert (layout.dp, layout.edp) == (2, 2)


def test_too_few_micro_batches_for_1f1b_warns(caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(train={"global_batch_size": 2}, parallel={"pp": 4})
    with caplog.at_level(logging.WARNING, logger="moe_train"):
        validate_layout(cfg, 4)
    assert "micro-batches per step (2) < parallel.pp (4)" in caplog.text


# ---------------------------------------------------------------------------------------------
# Parameter formulas

TINY_MODEL = ModelConfig(
    hidden_size=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=2,
    head_dim=4,
    ffn_hidden_size=16,
    vocab_size=32,
    qk_norm=True,
)
TINY_MOE = MoEConfig(
    num_experts=4,
    top_k=2,
    expert_ffn_hidden_size=8,
    num_shared_experts=1,
    shared_expert_ffn_hidden_size=4,
    first_k_dense=1,
)


def test_tiny_model_counts_by_hand() -> None:
    attention = 4 * 8 * 8  # wq, wk, wv, wo: 8 x 8 each (2 heads x 4, 2 kv heads x 4)
    norms = 2 * 8 + 2 * 4  # two RMSNorms + q/k norms
    dense, router, experts, shared = 3 * 8 * 16, 8 * 4, 4 * 3 * 8 * 8, 3 * 8 * 4
    embedding = head = 32 * 8
    expected = embedding + head + 8 + 2 * (attention + norms) + dense + router + experts + shared
    assert expected == 2360
    assert total_parameters(TINY_MODEL, TINY_MOE) == expected

    parallel = ParallelConfig(tp=2, pp=2, ep=2, etp=2)
    first, last = rank_parameters(TINY_MODEL, TINY_MOE, parallel)
    assert (first.layers, first.extras, last.layers, last.extras) == ([0], ("embedding",), [1], ("head",))
    assert (first.tp_sharded, first.replicated, first.expert) == ((attention + dense + embedding) // 2, norms, 0)
    assert (last.tp_sharded, last.replicated, last.expert) == (
        (attention + shared + head) // 2,
        norms + router + 8,
        experts // 4,
    )
    # world 8: dp = 8 / (tp 2 * pp 2) = 2, edp = 8 / (ep 2 * etp 2 * pp 2) = 1
    dense_last = last.tp_sharded + last.replicated
    assert rank_memory_bytes(last, 2, 1, zero1=False) == (8 * last.total, 8 * last.total)
    assert rank_memory_bytes(last, 2, 1, zero1=True) == (8 * last.total, 8 * (dense_last / 2 + last.expert))


@pytest.mark.parametrize(
    ("model", "moe", "parallel"),
    [
        (TINY_MODEL, TINY_MOE, ParallelConfig(tp=2, pp=2, ep=2, etp=2)),
        (
            ModelConfig(num_layers=8, tie_embeddings=True),
            MoEConfig(first_k_dense=1),
            ParallelConfig(pp=2, vpp=2, tp=2, ep=4, pp_schedule="interleaved_1f1b"),
        ),
        (
            ModelConfig(num_layers=6),
            MoEConfig(num_shared_experts=2),
            ParallelConfig(pp=3, pp_layer_split=[1, 3, 2], ep=8),
        ),
        (ModelConfig(tie_embeddings=True), MoEConfig(), ParallelConfig()),
    ],
)
def test_unique_shards_sum_to_model_count(model: ModelConfig, moe: MoEConfig, parallel: ParallelConfig) -> None:
    ranks = rank_parameters(model, moe, parallel)
    assert unique_parameters(ranks, parallel) == count_parameters(model, moe).total == total_parameters(model, moe)


# ---------------------------------------------------------------------------------------------
# Dry-run report


def _line(report: str, prefix: str) -> str:
    """The first report line that starts with `prefix` once stripped (stripped)."""
    return next(line.strip() for line in report.splitlines() if line.strip().startswith(prefix))


def _gib(line: str, what: str) -> float:
    """The 'what X GiB' number in a report line."""
    found = re.search(rf"{re.escape(what)} ([0-9.]+) GiB", line)
    assert found is not None, (what, line)
    return float(found.group(1))


def test_dry_run_8_ranks_folded() -> None:
    cfg = _config(train={"global_batch_size": 16}, parallel={"tp": 2, "ep": 4})
    report = dry_run_report(cfg, 8)
    assert "attention [pp 1, dp 4, tp 2] | experts [pp 1, edp 2, ep 4, etp 1]" in report
    assert _line(report, "tp ").endswith("4 x 2     [0, 1] [2, 3] [4, 5] [6, 7]")
    assert _line(report, "dp ").endswith("[0, 2, 4, 6] [1, 3, 5, 7]")
    assert _line(report, "ep ").endswith("[0, 1, 2, 3] [4, 5, 6, 7]")
    assert _line(report, "edp ").endswith("[0, 4] [1, 5] [2, 6] [3, 7]")
    assert _line(report, "lbl ").endswith("1 x 8     [0, 1, 2, 3, 4, 5, 6, 7]")
    assert "global 16 = dp 4 x micro 1 x 4 micro-batches" in report
    total = count_parameters(cfg.model, cfg.moe).total
    assert f"model parameters: {total / 1e6:.2f}M ({total})" in report
    assert "pp rank 0: layers 0-3 +embedding +head" in report


BIG = {
    "model": {
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 128,
        "ffn_hidden_size": 14336,
        "vocab_size": 128000,
    },
    "moe": {"num_experts": 64, "top_k": 8, "expert_ffn_hidden_size": 1408, "first_k_dense": 1},
    "train": {"global_batch_size": 1024, "seq_len": 4096},
}


def test_dry_run_1024_ranks() -> None:
    parallel = {"tp": 8, "pp": 4, "vpp": 2, "ep": 16, "pp_schedule": "interleaved_1f1b"}
    off = dry_run_report(_config(**BIG, parallel=parallel), 1024)
    on = dry_run_report(_config(**BIG, parallel={**parallel, "zero1": True}), 1024)
    assert "world 1024: attention [pp 4, dp 32, tp 8] | experts [pp 4, edp 16, ep 16, etp 1] | vpp 2" in on
    assert _line(on, "tp ").startswith("tp           128 x 8") and _line(on, "tp ").endswith("(+125 more)")
    assert "[0, 256, 512, 768]" in _line(on, "pp ")
    assert _line(on, "ep ").startswith("ep            64 x 16") and "[16, 17, 18, 19, ... 31]" in _line(on, "ep ")
    assert "[0, 768] [1, 769]" in _line(on, "embedding ")
    assert "pp rank 0: layers 0-3,16-19 +embedding" in on and "pp rank 3: layers 12-15,28-31 +head" in on
    total = count_parameters(ModelConfig(**BIG["model"]), MoEConfig(**BIG["moe"])).total  # type: ignore[arg-type]
    assert f"({total})" in on

    rank0_on, rank0_off = _line(on, "pp rank 0:"), _line(off, "pp rank 0:")
    assert _gib(rank0_on, "adam") < _gib(rank0_off, "adam") / 10, "ZeRO-1 shards Adam state over dp / edp"
    assert _gib(rank0_on, "params+grads") == _gib(rank0_off, "params+grads")
    assert _gib(_line(on, "most loaded rank"), ",") >= _gib(rank0_on, "total")
