"""Load-balancing scopes, the aux-loss-free expert bias and routing analytics, in one process.

Hand-computed values for every scope (sequences / micro-batches of different lengths, a share that
routes no token to some expert), the streaming modes' estimates, the bias update, split invariance of
the exact global LBL over micro-batch sizes (and its twin: micro-batch scope is not invariant), the
counting-pass check, resumes that keep the expert bias and the streaming state, and the
specialisation score on planted routers. The parallel layouts are in test_global_lbl_parallel.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from parity import layout_config, reference_run

from moe_train.analysis.routing import domain_expert_counts, load_imbalance, specialisation, write_report
from moe_train.config import ConfigError, load_config
from moe_train.data import Batch
from moe_train.model import build_model
from moe_train.model.moe import (
    LayerBalance,
    Routing,
    TopKRouter,
    global_lbl_share,
    load_balancing_loss,
    sequence_load_balancing_loss,
    update_expert_bias,
)
from moe_train.parallel import load_balance
from moe_train.parallel.dist_checkpoint import load_canonical_tensors
from moe_train.train import checkpoint as ckpt
from moe_train.train.trainer import Trainer

GLOBAL = ["moe.lbl.scope=global", "train.eval_every=0"]

# Two token groups of different lengths, E = 3 experts, top-1 (see the hand computations below).
PROBS_A = [[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]]  # 2 tokens routed to experts 0, 1
PROBS_B = [[0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.6, 0.2, 0.2]]  # 3 tokens routed to 2, 2, 0


def _group(probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    probs_TE = torch.tensor(probs, requires_grad=True)
    counts_E = torch.bincount(probs_TE.argmax(-1), minlength=3)
    return counts_E, probs_TE


def test_sequence_scope_hand_values_with_unequal_lengths() -> None:
    (ca, pa), (cb, pb) = _group(PROBS_A), _group(PROBS_B)
    prob_sum_BE = torch.cat([pa.sum(0, keepdim=True), pb.sum(0, keepdim=True)])
    loss = sequence_load_balancing_loss(torch.stack([ca, cb]), prob_sum_BE, torch.tensor([2, 3]), top_k=1)
    # A: f = [1/2, 1/2, 0], p = [.35, .45, .2] -> 3 * .4 = 1.2
    # B: f = [1/3, 0, 2/3], p = [1/3, .2, 1.4/3] -> 3 * 3.8/9
    assert loss.item() == pytest.approx((1.2 + 3 * 3.8 / 9) / 2, rel=1e-6)
    loss.backward()
    # d/dprob_a = 3 * f_a / T_a / 2, d/dprob_b = 3 * f_b / T_b / 2 (row by row)
    torch.testing.assert_close(pa.grad, torch.tensor([[0.375, 0.375, 0.0]] * 2))
    torch.testing.assert_close(pb.grad, torch.tensor([[1 / 6, 0.0, 1 / 3]] * 3))


def test_global_shares_equal_whole_batch_lbl_with_unequal_micro_batches() -> None:
    """Share A (2 tokens) routes nothing to expert 2, yet gets that expert's whole-batch gradient."""
    (ca, pa), (cb, pb) = _group(PROBS_A), _group(PROBS_B)
    counts_E, tokens = ca + cb, 5
    assert counts_E.tolist() == [2, 1, 2] and ca[2] == 0
    terms = [global_lbl_share(counts_E, tokens, p.sum(0), tokens / 2, top_k=1) for p in (pa, pb)]
    # f = [.4, .2, .4]; A: 3 * (.28 + .18 + .16) / 2.5 = .744; B: 3 * (.4 + .12 + .56) / 2.5 = 1.296
    assert [t.item() for t in terms] == pytest.approx([0.744, 1.296], rel=1e-6)
    mean = (terms[0] + terms[1]) / 2
    assert mean.item() == pytest.approx(1.02, rel=1e-6)  # 3 * (.4*.34 + .2*.3 + .4*.36)
    mean.backward()
    whole = torch.cat([pa, pb]).detach().requires_grad_()
    load_balancing_loss(counts_E, whole.sum(0), tokens, top_k=1).backward()
    torch.testing.assert_close(torch.cat([pa.grad, pb.grad]), whole.grad)
    assert pa.grad[0, 2].item() == pytest.approx(3 * 0.4 / 5)  # 0.24 although A sent no token to expert 2
    micro = [load_balancing_loss(c, p.sum(0), len(p), 1).item() for c, p in ((ca, pa), (cb, pb))]
    assert sum(micro) / 2 == pytest.approx((1.2 + 3 * 3.8 / 9) / 2)  # the micro-batch scope differs


def _routing(counts: list[int], prob_sum: list[float]) -> Routing:
    counts_E = torch.tensor(counts)
    idx = torch.repeat_interleave(torch.arange(len(counts)), counts_E).view(-1, 1)
    return Routing(
        topk_idx_TK=idx,
        topk_weight_TK=torch.ones(idx.shape),
        topk_score_TK=torch.ones(idx.shape),
        tokens_per_expert_E=counts_E,
        prob_sum_E=torch.tensor(prob_sum),
        num_tokens=int(counts_E.sum()),
        z_loss=torch.zeros(()),
    )


@pytest.mark.parametrize(("mode", "expected"), [("running_mean", [1.2, 1.0]), ("streaming", [1.1, 1.0])])
def test_streaming_modes_hand_values(mode: str, expected: list[float]) -> None:
    balance = LayerBalance(2, 1, "global", mode)
    if balance.last_f_E is not None:
        balance.last_f_E.copy_(torch.tensor([0.5, 0.5]))  # last step: balanced
    balance.start_step(global_tokens=4, share_tokens=2)
    got = []
    for routing in (_routing([2, 0], [1.2, 0.8]), _routing([1, 1], [1.0, 1.0])):
        routing = balance.observe(routing, batch_size=1)
        got.append(balance.loss(routing, routing).item())
    # running mean: f = [1, 0] then [3/4, 1/4]; streaming: [2, 0] + 2 tokens at last f = [3/4, 1/4] both times
    assert got == pytest.approx(expected, rel=1e-6)
    balance.end_step(torch.tensor([3, 1]))
    if balance.last_f_E is not None:
        assert balance.last_f_E.tolist() == [0.75, 0.25]


def test_expert_bias_update_hand_values() -> None:
    bias_E = torch.zeros(4)
    update_expert_bias(bias_E, torch.tensor([5, 1, 3, 3]), 0.1)  # mean 3: over, under, equal, equal
    torch.testing.assert_close(bias_E, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    update_expert_bias(bias_E, torch.tensor([0, 4, 4, 4]), 0.1)
    torch.testing.assert_close(bias_E, torch.tensor([0.0, 0.0, -0.1, -0.1]))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_expert_bias_selects_but_does_not_weight(score_func: str) -> None:
    router = TopKRouter(3, 3, top_k=1, score_func=score_func, norm_topk_prob=False, expert_bias=True)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(3))
    x = torch.tensor([[2.0, 1.0, 0.0]])
    plain = router(x)
    assert router.expert_bias_E is not None
    router.expert_bias_E.copy_(torch.tensor([0.0, 0.5, 0.0]))
    biased = router(x)
    scores = x.softmax(-1) if score_func == "softmax" else x.sigmoid()
    assert plain.topk_idx_TK.tolist() == [[0]] and biased.topk_idx_TK.tolist() == [[1]]
    torch.testing.assert_close(biased.topk_weight_TK, scores[:, 1:2])  # the unbiased score of expert 1
    torch.testing.assert_close(biased.prob_sum_E, plain.prob_sum_E)  # LBL probabilities untouched
    assert biased.tokens_per_expert_E.tolist() == [0, 1, 0]


def test_config_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"moe\.lbl\.scope"):
        load_config(None, ["moe.lbl.scope=batch"])
    with pytest.raises(ConfigError, match=r"moe\.lbl\.global_mode"):
        load_config(None, ["moe.lbl.global_mode=approximate"])
    with pytest.raises(ConfigError, match=r"moe\.bias_update_rate"):
        load_config(None, ["moe.bias_update_rate=-1"])


# -- split invariance over micro-batch sizes (one process; the layouts are in the parallel test) -----


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("runs")
    cases = {
        "global_mbs8": [*GLOBAL, "train.micro_batch_size=8"],
        "global_mbs1": [*GLOBAL, "train.micro_batch_size=1"],
        "micro_mbs8": ["train.eval_every=0", "train.micro_batch_size=8"],
        "micro_mbs1": ["train.eval_every=0", "train.micro_batch_size=1"],
    }
    return {name: reference_run(overrides, root / name) for name, overrides in cases.items()}


def _differences(a: dict, b: dict) -> list[str]:
    """Steps whose LBL, and parameters that, differ beyond rtol 1e-5 (atol 1e-6 for parameters)."""
    out = [
        f"step {i} lbl {x['lbl']} != {y['lbl']}"
        for i, (x, y) in enumerate(zip(a["records"], b["records"], strict=True), start=1)
        if abs(x["lbl"] - y["lbl"]) > 1e-5 * abs(y["lbl"])
    ]
    for name, want in b["params"].items():
        if not torch.allclose(a["params"][name], want, rtol=1e-5, atol=1e-6):
            out.append(f"{name}: max abs diff {(a['params'][name] - want).abs().max().item():.2e}")
    return out


def test_exact_global_lbl_is_invariant_to_the_micro_batch_size(runs: dict[str, dict]) -> None:
    assert len(runs["global_mbs8"]["records"]) == 5
    assert not _differences(runs["global_mbs1"], runs["global_mbs8"])  # 8 micro-batches vs 1


def test_twin_micro_batch_lbl_depends_on_the_micro_batch_size(runs: dict[str, dict]) -> None:
    differences = _differences(runs["micro_mbs1"], runs["micro_mbs8"])
    assert sum(d.startswith("step") for d in differences) == 5 and len(differences) > 5
    assert not _differences(runs["micro_mbs8"], runs["global_mbs8"])  # one micro-batch: the same loss


def test_counting_pass_check_and_its_twin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(layout_config([*GLOBAL, "train.micro_batch_size=2", "train.max_steps=1"], tmp_path / "ok"))
    trainer.fit()
    assert trainer.balancer.count_mismatch == 0
    original = load_balance.counting_pass
    monkeypatch.setattr(load_balance, "counting_pass", lambda pm, batches, *a: original(pm, batches[:-1], *a))
    sabotaged = Trainer(layout_config([*GLOBAL, "train.micro_batch_size=2", "train.max_steps=1"], tmp_path / "bad"))
    sabotaged.fit()
    assert sabotaged.balancer.count_mismatch > 0  # a counting pass that missed a micro-batch is noticed


# -- state in checkpoints ----------------------------------------------------------------------

STATEFUL = [
    "moe.lbl.scope=global",
    "moe.lbl.global_mode=streaming",
    "moe.bias_update_rate=0.01",
    "moe.score_func=sigmoid",
    "train.eval_every=0",
    "train.max_steps=6",
    "checkpoint.every=3",
    "checkpoint.keep_last=3",
]


def _buffers(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items() if k.endswith(("_bias_E", "last_f_E"))}


def _resume(full_dir: Path, tmp_path: Path) -> Trainer:
    run_dir = tmp_path / "resumed"
    shutil.copytree(full_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    return Trainer(layout_config([*STATEFUL, "checkpoint.resume=latest"], run_dir))


@pytest.fixture(scope="module")
def stateful_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], dict[str, torch.Tensor]]:
    run_dir = tmp_path_factory.mktemp("stateful") / "run"
    trainer = Trainer(layout_config(STATEFUL, run_dir))
    return run_dir, trainer.fit(), _buffers(trainer)


def test_bias_and_streaming_state_are_checkpointed_and_resume_bitwise(stateful_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    full_dir, records, buffers = stateful_run
    assert set(buffers) == {
        f"layers.{i}.moe.{k}" for i in (1, 2, 3) for k in ("router.expert_bias_E", "balance.last_f_E")
    }
    assert all(b.abs().sum() > 0 for b in buffers.values())
    stored = load_canonical_tensors(ckpt.list_checkpoints(full_dir)[-1])
    assert all(torch.equal(stored[k], v) for k, v in buffers.items())
    trainer = _resume(full_dir, tmp_path)
    resumed = trainer.fit()
    keys = ("loss", "lm_loss", "lbl", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in records[3:]]  # bitwise
    assert all(torch.equal(v, _buffers(trainer)[k]) for k, v in buffers.items())


def test_load_model_and_export_see_the_buffers(stateful_run) -> None:  # type: ignore[no-untyped-def]
    """load_model restores the expert bias and streaming state; HF export refuses a biased router."""
    from moe_train import load_model
    from moe_train.interop.hf_mapping import InteropError, check_exportable

    full_dir, _, buffers = stateful_run
    model = load_model(full_dir)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    check_exportable(load_config(None, []), "mixtral")
    with pytest.raises(InteropError, match=r"^moe.bias_update_rate \(0.01\) has no Hugging Face equivalent"):
        check_exportable(load_config(None, ["moe.bias_update_rate=0.01"]), "mixtral")


def test_twin_resume_without_the_buffers_differs(stateful_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    full_dir, records, _ = stateful_run
    trainer = _resume(full_dir, tmp_path)
    for name, buf in trainer.model.named_buffers():
        if name.endswith(("_bias_E", "last_f_E")):
            buf.zero_()
    resumed = trainer.fit()
    assert [r["loss"] for r in resumed] != [r["loss"] for r in records[3:]]


# -- analytics on planted routers ----------------------------------------------------------------


class PlantedRouter(TopKRouter):
    """Routes by token id, expert = id * E // V (domain d uses the ids of block d), or at random."""

    token_ids: torch.Tensor
    random = False
    vocab_size = 64

    def forward(self, x_TH: torch.Tensor) -> Routing:
        routing = super().forward(x_TH)
        num_experts = self.gate.weight.shape[0]
        idx = self.token_ids.reshape(-1, 1) * num_experts // self.vocab_size
        if self.random:
            idx = torch.randint(0, num_experts, idx.shape)
        routing.topk_idx_TK = idx.contiguous()
        routing.tokens_per_expert_E = torch.bincount(idx.flatten(), minlength=num_experts)
        return routing


def _analytics_model(router: str) -> tuple[torch.nn.Module, dict[str, list[Batch]]]:
    cfg = load_config(
        None,
        ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
         "model.head_dim=16", "model.ffn_hidden_size=64", "model.vocab_size=64", "moe.num_experts=4",
         "moe.top_k=1", "moe.expert_ffn_hidden_size=16", "data.mock=true"],
    )  # fmt: skip
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = {}
    for d, name in enumerate(["code", "prose", "dialogue", "legal"]):
        tokens_BS = torch.randint(16 * d, 16 * (d + 1), (4, 32), generator=gen)
        batches[name] = [Batch(tokens_BS, tokens_BS, torch.full((4,), d))]
    torch.manual_seed(0)
    for block in model.layers.values():
        if router in ("planted", "random"):
            planted = PlantedRouter(32, 4, 1)
            planted.random = router == "random"
            block.moe.router = planted
            model.register_forward_pre_hook(lambda m, args, r=planted: setattr(r, "token_ids", args[0]))
        else:  # equal scores for every expert
            torch.nn.init.zeros_(block.moe.router.gate.weight)
    return model, batches


@pytest.mark.parametrize(
    ("router", "lo", "hi"), [("planted", 0.999, 1.0), ("uniform", 0.0, 1e-9), ("random", 0.0, 0.05)]
)
def test_specialisation_on_planted_routers(router: str, lo: float, hi: float, tmp_path: Path) -> None:
    model, batches = _analytics_model(router)
    counts_LDE, layer_ids = domain_expert_counts(model, batches)
    assert layer_ids == [0, 1] and counts_LDE.shape == (2, 4, 4)
    assert counts_LDE.sum(-1).tolist() == [[128] * 4] * 2  # every token of every domain, k = 1
    scores = [specialisation(c) for c in counts_LDE]
    assert all(lo <= s <= hi for s in scores), scores
    report = write_report(counts_LDE, list(batches), layer_ids, tmp_path)
    assert (tmp_path / "layer_00.png").stat().st_size > 1000 and (tmp_path / "routing.json").is_file()
    assert report["layers"][0]["specialisation"] == pytest.approx(scores[0])
    if router == "planted":
        assert load_imbalance(counts_LDE[0].sum(0)) == pytest.approx(1.0)  # each expert one domain's 128 tokens
    if router == "uniform":  # equal scores: every token takes expert 0
        assert load_imbalance(counts_LDE[0].sum(0)) == pytest.approx(4.0)
