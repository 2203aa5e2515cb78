"""The layout planner: each memory and time term against hand-computed values, the published runs it is
validated against (docs/planner.md), the search's use of the trainer's validity rules, and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moe_train.cli import main
from moe_train.config import ConfigError, load_config
from moe_train.model import flops_per_token
from moe_train.parallel.layout import validate_layout
from moe_train.parallel.params import RankParams
from moe_train.plan.cluster import GB, Efficiency, cpu_local, get_cluster
from moe_train.plan.memory import (
    attention_activation_bytes,
    dispatch_bytes,
    ffn_activation_bytes,
    logits_bytes,
    peak_in_flight,
    peak_memory,
    state_bytes,
)
from moe_train.plan.published import PRESETS, PUBLISHED_RUNS, validate_run
from moe_train.plan.search import PlanError, evaluate, search
from moe_train.plan.space import (
    PlanLayout,
    PlanOptions,
    balanced_split,
    layout_config,
    native_recipe,
    tail_split,
    validate_plan_layout,
)
from moe_train.plan.time import Span, all_to_all_time, gemm_time, ring_time, step_time
from moe_train.plan.workload import build_workload

# h 64, 4 heads of 16 (q_dim 64), 2 kv heads (kv_dim 32), 4 layers (the first dense, ffn 128),
# 8 experts top-2 of ffn 32, vocab 256.
SMALL = [
    "model.hidden_size=64",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=16",
    "model.ffn_hidden_size=128",
    "model.vocab_size=256",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=32",
    "moe.first_k_dense=1",
    "train.seq_len=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=16",
]
OPTS = PlanOptions(seq_len=128, global_batch_size=16, activation_bytes=2.0)


def _cfg():
    return load_config(None, SMALL)


def _work(world: int = 1, **layout):
    return build_workload(_cfg(), PlanLayout(**{"micro_batch_size": 2, **layout}), OPTS, world)


IDEAL = Efficiency(
    gemm=1.0, gemm_fp8=1.0, gemm_half_rows=0.0, attention_fwd=1.0, attention_bwd=1.25, hbm=1.0, network=1.0
)


def _ideal(peak: float = 1e12, bandwidth: float = 1e30):
    """All GEMMs at peak, attention backward at 2x forward FLOPs, memory and network free."""
    base = cpu_local(matmul_flops=peak)
    return dataclasses.replace(
        base,
        peak_flops_fp32=peak,
        peak_flops_bf16=peak,
        hbm_bandwidth=1e30,
        intra_bandwidth=bandwidth,
        inter_bandwidth=bandwidth,
        intra_latency=0.0,
        inter_latency=0.0,
        efficiency=IDEAL,
    )


# ---------------------------------------------------------------------------------------------
# Memory terms


def test_state_bytes_native_and_zero1():
    rp = RankParams(0, [0], (), tp_sharded=1000, replicated=24, expert=600, tied_copy=0)
    dense, expert = 1024, 600
    w, g, m, o = state_bytes(rp, native_recipe(False), dp=4, edp=2)
    assert (w, g, m, o) == (4 * 1624, 4 * 1624 + 4 * 1624, 0, 8 * 1624)  # grads + flat bucket copy
    w, g, m, o = state_bytes(rp, native_recipe(True), dp=4, edp=2)
    assert o == 8 * (dense / 4 + expert / 2) and g == 8 * 1624
    _, g1, _, _ = state_bytes(rp, native_recipe(False), dp=1, edp=1)
    assert g1 == 4 * 1624  # no replicas, no bucket copy


def test_deepspeed_zero2_and_offload_state():
    from moe_train.plan.space import deepspeed_recipe

    rp = RankParams(0, [0], (), tp_sharded=1000, replicated=24, expert=600, tied_copy=0)
    w, g, m, o = state_bytes(rp, deepspeed_recipe(1, False), dp=4, edp=2)
    shard = 1024 / 4 + 600 / 2
    assert (w, g, m, o) == (4 * 1624, 4 * 1624, 4 * shard, 8 * shard)  # fixed-size buckets, not counted
    _, g2, _, _ = state_bytes(rp, deepspeed_recipe(2, False), dp=4, edp=2)
    assert g2 == 4 * shard  # ZeRO-2: gradients sharded too
    _, _, m3, o3 = state_bytes(rp, deepspeed_recipe(2, True), dp=4, edp=2)
    assert m3 == o3 == 0  # optimizer offload: master copy and moments in host memory


def test_capacity_factor_bounds_the_receive_buffer():
    cfg = load_config(None, [*SMALL, "moe.capacity_factor=1.5"])
    w = build_workload(cfg, PlanLayout(ep=4, micro_batch_size=2), OPTS, 4)
    assert w.received_rows_max() == 1.5 * 256 * 2  # capacity x balanced copies, below the dropless 4 x 512
    assert _work(world=4, ep=4).received_rows_max() == 4 * 256 * 2


def test_attention_and_ffn_activations_by_hand():
    w = _work()  # T = 2 * 128 = 256 tokens, tp 1
    T, a = 256, 2
    core = T * 64 * a + T * 4 * 4
    assert attention_activation_bytes(w, "none") == T * 64 * a * 2 + T * (64 + 64) * a + core
    assert attention_activation_bytes(w, "selective") == T * 64 * a * 2 + T * (64 + 64) * a
    assert attention_activation_bytes(w, "full") == T * 64 * a
    dense = T * 64 * a * 2 + T * 3 * 128 * a
    assert ffn_activation_bytes(w, False, "none") == dense
    R = T * 2  # token copies
    router = T * 64 * a + T * 8 * 8
    moe = T * 64 * a + router + R * 64 * a + R * 3 * 32 * a + R * 64 * a
    assert ffn_activation_bytes(w, True, "none") == moe
    assert ffn_activation_bytes(w, True, "selective") == moe - R * 3 * 32 * a
    assert ffn_activation_bytes(w, True, "full") == 0


def test_tensor_and_context_parallel_shrink_activations():
    base = attention_activation_bytes(_work(), "none")
    tp2 = attention_activation_bytes(_work(world=2, tp=2), "none")
    cp2 = attention_activation_bytes(_work(world=2, cp=2), "none")
    assert cp2 == pytest.approx(base / 2)
    assert base / 2 < tp2 < base  # the gathered projection input is saved whole (moe_train's engine)


def test_pipeline_in_flight_follows_the_schedule():
    w = _work(world=2, pp=2)  # 8 micro-batches, 2 layers per stage
    per_layer = [
        attention_activation_bytes(w, "none") + ffn_activation_bytes(w, layer >= 1, "none") for layer in range(4)
    ]
    held0, n0 = peak_in_flight(w, 0, "none")
    held1, n1 = peak_in_flight(w, 1, "none")
    assert (n0, n1) == (2, 1)  # 1F1B: pp - rank forwards in flight
    assert held0 == pytest.approx(2 * (per_layer[0] + per_layer[1]))
    head = 256 * 64 * 2 * 2  # final norm input + head input
    assert held1 == pytest.approx(per_layer[2] + per_layer[3] + head)
    wi = _work(world=2, pp=2, vpp=2)  # interleaved: rank 0 warms up (pp-1)*2 + (vpp-1)*pp = 4 chunk forwards
    assert peak_in_flight(wi, 0, "none")[1] == 5


def test_logits_and_dispatch_buffers():
    w = _work()
    assert logits_bytes(w) == 256 * 256 * (2 + 8)
    chunked = build_workload(_cfg(), PlanLayout(micro_batch_size=2), dataclasses.replace(OPTS, loss_chunk_tokens=64), 1)
    assert logits_bytes(chunked) == 64 * 256 * (2 + 8)
    w4 = _work(world=4, ep=4)  # dropless worst case: all ep * Ts tokens send min(k, E/ep) = 2 copies here
    received = 4 * 256 * 2
    extra = received - 256 * 2
    assert dispatch_bytes(w4) == received * 64 * 2 + extra * (64 * 2 + 3 * 32 * 2 + 64 * 2)
    balanced = build_workload(
        _cfg(), PlanLayout(ep=4, micro_batch_size=2), dataclasses.replace(OPTS, expert_load=1.0), 4
    )
    assert dispatch_bytes(balanced) == 256 * 2 * 64 * 2  # only the payload buffer
    fp8 = build_workload(
        _cfg(),
        PlanLayout(ep=4, micro_batch_size=2),
        dataclasses.replace(OPTS, expert_load=1.0, dispatch_dtype="fp8"),
        4,
    )
    assert dispatch_bytes(fp8) == 256 * 2 * (64 + 4)  # one byte per value + an fp32 scale per 128


def test_zero1_and_recompute_lower_peak_memory():
    cfg = _cfg()
    w = build_workload(cfg, PlanLayout(ep=2, micro_batch_size=2), OPTS, 2)
    plain = peak_memory(w, native_recipe(False)).total
    assert peak_memory(w, native_recipe(True)).total < plain
    full = build_workload(cfg, PlanLayout(ep=2, micro_batch_size=2, recompute="full"), OPTS, 2)
    assert peak_memory(full, native_recipe(False)).activations < peak_memory(w, native_recipe(False)).activations


# ---------------------------------------------------------------------------------------------
# Time terms


def test_collective_times_by_hand():
    h100 = get_cluster("h100-ib")
    bw = 0.75 * 450e9
    assert ring_time(1e9, Span(8, 1, 8), h100) == pytest.approx(1e9 / bw + 7 * 5e-6)
    assert ring_time(1e9, Span(2, 8, 8), h100) == pytest.approx(1e9 / (0.75 * 50e9) + 10e-6)
    assert Span(16, 1, 8).local == 8 and Span(4, 2, 8).intra and not Span(8, 2, 8).intra
    # 16-way all-to-all over two nodes: 7/16 of the buffer on NVLink, 8/16 over InfiniBand (the slower)
    t = all_to_all_time(1.6e9, Span(16, 1, 8), h100)
    assert t == pytest.approx(max(0.7e9 / bw, 0.8e9 / (0.75 * 50e9)) + 10e-6)


def test_context_parallel_exchange():
    """cp 2 on one node: all-gather moves the other rank's K/V forward and backward, and reduce-scatters
    their gradients (3 transfers); the ring hides its K/V exchange behind the attention core."""
    h100 = get_cluster("h100-ib")
    opts = dataclasses.replace(OPTS, cp_comm="allgather")
    w = build_workload(_cfg(), PlanLayout(cp=2, micro_batch_size=2), opts, 2)
    kv = 128 * 2 * 32 * 2  # T = 2 * 128 / 2 tokens, K and V of kv_dim 32, bf16
    layers = 4
    t = step_time(w, native_recipe(False), h100)
    per_layer = 3 * ring_time(kv, Span(2, 1, 8), h100)
    assert t.cp_comm == pytest.approx(w.num_micro * layers * per_layer)
    ring = step_time(build_workload(_cfg(), PlanLayout(cp=2, micro_batch_size=2), OPTS, 2), native_recipe(False), h100)
    assert 0 <= ring.cp_comm < t.cp_comm


def test_gemm_efficiency_curve():
    h100, w = get_cluster("h100-ib"), _work()
    assert gemm_time(1e12, 128, w, h100) == pytest.approx(1e12 / (989e12 * 0.70 * 0.5))
    assert gemm_time(1e12, 1e9, w, h100) == pytest.approx(1e12 / (989e12 * 0.70), rel=1e-6)
    assert gemm_time(1e12, 1e9, w, h100, "fp8") == pytest.approx(1e12 / (1979e12 * 0.45), rel=1e-6)


def test_ideal_cluster_reaches_the_flop_count():
    """On a cluster where every kernel runs at peak and bytes are free, the modelled compute equals
    moe_train's own FLOP count (MFU 1): every GEMM and attention term is counted exactly once."""
    cfg, cluster = _cfg(), _ideal()
    w = build_workload(cfg, PlanLayout(micro_batch_size=2), OPTS, 1)
    t = step_time(w, native_recipe(False), cluster)
    flops = flops_per_token(cfg.model, cfg.moe, 128) * 16 * 128
    router_flops = 6 * 16 * 128 * 64 * 8 * 3  # counted by both, to show what is compared
    assert t.compute * 1e12 == pytest.approx(flops, rel=1e-3)
    assert t.mfu == pytest.approx(1.0, rel=1e-3) and router_flops < flops
    # twin: a real network makes tensor parallelism cost time, so MFU drops below 1
    slow = _ideal(bandwidth=1e9)
    t2 = step_time(build_workload(cfg, PlanLayout(tp=2, micro_batch_size=2), OPTS, 2), native_recipe(False), slow)
    assert t2.tp_comm > 0 and t2.mfu < 0.99


def test_pipeline_bubble_and_recompute_terms():
    cfg, cluster = _cfg(), _ideal()
    w = build_workload(cfg, PlanLayout(pp=2, micro_batch_size=2), OPTS, 2)  # 8 micro-batches
    t = step_time(w, native_recipe(False), cluster)
    per_mb = (t.compute + t.pp_p2p) / 8
    assert t.bubble == pytest.approx(per_mb * (2 - 1))  # (pp - 1) / vpp micro-batch times
    wi = build_workload(cfg, PlanLayout(pp=2, vpp=2, micro_batch_size=2), OPTS, 2)
    ti = step_time(wi, native_recipe(False), cluster)
    assert ti.bubble == pytest.approx((ti.compute + ti.pp_p2p) / 8 / 2)
    full = step_time(
        build_workload(cfg, PlanLayout(recompute="full", micro_batch_size=2), OPTS, 1), native_recipe(False), cluster
    )
    none = step_time(build_workload(cfg, PlanLayout(micro_batch_size=2), OPTS, 1), native_recipe(False), cluster)
    head = 6 * 16 * 128 * 64 * 256 / 1e12  # the output layer is not recomputed
    assert full.recompute == pytest.approx((none.compute - head) / 3)  # the layers' forward once more


# ---------------------------------------------------------------------------------------------
# Space, validity, search


def test_splits():
    assert balanced_split(61, 16) == (3, *[4] * 13, 3, 3)
    assert tail_split(61, 16) == (*[4] * 15, 1)  # DeepSeek-V3's published split
    assert balanced_split(94, 24) == (3, *[4] * 22, 3)  # Qwen3-235B's published split
    assert tail_split(56, 8) is None and balanced_split(56, 8) is None


def test_validity_is_the_trainers():
    cfg = _cfg()
    bad = PlanLayout(tp=8, micro_batch_size=2)  # 4 heads do not split over 8
    with pytest.raises(ConfigError):
        validate_plan_layout(cfg, bad, OPTS, 8)
    with pytest.raises(ConfigError):
        validate_layout(layout_config(cfg, bad, OPTS), 8)
    with pytest.raises(ConfigError, match="cp"):
        validate_plan_layout(cfg, PlanLayout(cp=3, micro_batch_size=2), OPTS, 3)
    best, evaluated = search(cfg, 4, get_cluster("h100-ib"), dataclasses.replace(OPTS, cp_sizes=(1, 2)), top=50)
    assert evaluated > len(best) > 10
    for cand in best:
        validate_plan_layout(cfg, cand.layout, OPTS, 4)
        if cand.layout.cp == 1:
            validate_layout(layout_config(cfg, cand.layout, OPTS), 4)
    steps = [c.time.step for c in best if c.time]
    assert steps == sorted(steps)


# ---------------------------------------------------------------------------------------------
# Published runs (docs/planner.md)


@pytest.mark.parametrize("run", PUBLISHED_RUNS, ids=[r.preset for r in PUBLISHED_RUNS])
def test_published_mfu_within_15_percent(run):
    v = validate_run(run, search_choice=False)
    assert abs(v.relative_error) <= 0.15, (run.name, v.predicted_mfu, run.published_mfu)


@pytest.mark.parametrize("index", [0, 1])
def test_planner_choice_at_least_published(index):
    """The search's best layout is at least as fast as the published one under the same model (the
    GB200 runs take ~1 min each; their results are in docs/planner.md)."""
    v = validate_run(PUBLISHED_RUNS[index])
    assert v.choice is not None and v.choice.time is not None
    assert v.choice.time.step <= v.predicted.time.step * (1 + 1e-9)


def test_published_memory_fit():
    fits = {r.preset: validate_run(r, search_choice=False).predicted.fits for r in PUBLISHED_RUNS}
    # Qwen3-235B's run offloads expert activations to the host, which the model does not have
    assert fits == {
        "mixtral_8x22b": True,
        "qwen2_57b_a14b": True,
        "deepseek_v3_standin": True,
        "qwen3_235b_a22b": False,
    }


# ---------------------------------------------------------------------------------------------
# CLI


OLMOE = str(PRESETS / "olmoe_1b_7b.yaml")


def test_cli_json_and_config_overlay(tmp_path, capsys):
    out, png = tmp_path / "plan.yaml", tmp_path / "plan.png"
    assert main(["plan", "--config", OLMOE, "--gpus", "8", "--top", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpus"] == 8 and len(doc["candidates"]) == 2
    first = doc["candidates"][0]
    assert first["fits"] and first["memory_bytes"]["total"] <= 76 * GB
    assert (
        main(["plan", "--config", OLMOE, "--gpus", "8", "--top", "2", "--write-config", str(out), "--png", str(png)])
        == 0
    )
    table = capsys.readouterr().out
    assert first["layout"]["label"] in table and "train it: moe-train train" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = load_config(out)  # what `moe-train train --config` loads
    validate_layout(written, 8)
    assert written.parallel.pp == first["layout"]["pp"] and written.model == load_config(OLMOE).model
    assert written.parallel.cp == first["layout"]["cp"] and written.train.recompute == first["layout"]["recompute"]


def test_cli_searches_the_trainers_cp_and_recompute_by_default(capsys):
    """parallel.cp and train.recompute are trainer keys, so the default search spans them; --cp 1 and
    --recompute none narrow it (the twin: without the defaults only cp 1 / 'none' would appear)."""
    assert main(["plan", "--config", OLMOE, "--gpus", "16", "--top", "400", "--json"]) == 0
    layouts = [c["layout"] for c in json.loads(capsys.readouterr().out)["candidates"]]
    assert {lay["recompute"] for lay in layouts} >= {"none", "selective"}
    assert {lay["cp"] for lay in layouts} >= {1, 2}
    assert (
        main(["plan", "--config", OLMOE, "--gpus", "16", "--top", "400", "--json", "--cp", "1", "--recompute", "none"])
        == 0
    )
    narrow = [c["layout"] for c in json.loads(capsys.readouterr().out)["candidates"]]
    assert {(lay["cp"], lay["recompute"]) for lay in narrow} == {(1, "none")}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["plan", "--config", OLMOE, "--gpus", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the smallest GPU count that fits is 2" in err
    existing = tmp_path / "keep.yaml"
    existing.write_text("x")
    assert main(["plan", "--config", OLMOE, "--gpus", "8", "--write-config", str(existing)]) == 2
    assert existing.read_text() == "x" and "already exists" in capsys.readouterr().err
    assert main(["plan", "--config", OLMOE, "--gpus", "8", "--cluster", "tpu"]) == 2
    assert "unknown cluster 'tpu'" in capsys.readouterr().err
    with pytest.raises(PlanError, match="smallest GPU count"):
        from moe_train.plan.search import plan

        plan(load_config(OLMOE), 1, get_cluster("h100-ib"), PlanOptions(seq_len=4096, global_batch_size=1024))


def test_evaluate_without_fit_is_timed():
    cfg = load_config(OLMOE)
    cand = evaluate(cfg, PlanLayout(), PlanOptions(seq_len=4096, global_batch_size=1024), 1, get_cluster("h100-ib"))
    assert not cand.fits and cand.time is not None and cand.time.step > 0


@pytest.mark.parametrize(
    "preset,total,active",
    [  # published totals / active: Mixtral (Mistral AI), Qwen2 (arXiv 2407.10671), Qwen3 (arXiv 2505.09388), DeepSeek-V3 671B / 37B
        ("mixtral_8x22b", 140.6e9, 39.2e9),
        ("qwen2_57b_a14b", 57.4e9, 14.2e9),
        ("qwen3_235b_a22b", 235e9, 22e9),
        ("deepseek_v3_standin", 671e9, 37e9),
    ],
)
def test_validation_presets_match_published_sizes(preset, total, active):
    """The planner's validation models have their published sizes. DeepSeek-V3's stand-in attention is
    FLOP-matched MHA, not MLA (see the preset): +0.4% total and +9% active parameters."""
    from moe_train.model import count_parameters

    cfg = load_config(PRESETS / f"{preset}.yaml")
    counts = count_parameters(cfg.model, cfg.moe)
    assert counts.total == pytest.approx(total, rel=0.01)
    assert counts.active == pytest.approx(active, rel=0.02 if preset != "deepseek_v3_standin" else 0.10)
