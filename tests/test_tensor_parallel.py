"""Tensor + sequence parallelism (tp2) against the single-device model: one spawn of world 2.

Legend: B batch, S sequence, s = S/tp, H hidden, V vocabulary, v = V/tp.

Every check runs the single-device model and its tp2 shard on the same batch and compares the
per-token loss (rtol 1e-5, atol 1e-6) and every local gradient, reduced by its ParamMeta rule (sum over
grad_sum_kinds, / dp) against the matching slice (by canonical name and shards) of the single-device
gradient. The TP-only MoE checks set moe.lbl.coeff = moe.zloss_coeff = 0: the micro-batch LBL under
sequence parallelism needs the router statistics summed over tp, which expert_parallel.py installs;
the `check_with_ep_*` checks apply TP then EP (as parallelize.py does) with both losses on and also
compare lbl / z-loss / tokens per expert.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from distributed import run_distributed  # tests/distributed.py

from moe_train.config import Config, LBLConfig, ModelConfig, MoEConfig, ParallelConfig
from moe_train.model import build_model
from moe_train.model.transformer import IGNORE_INDEX, MoETransformer, TransformerBlock, token_cross_entropy
from moe_train.parallel.groups import ProcessGroups, groups_from_layout
from moe_train.parallel.layout import rank_layout
from moe_train.parallel.param_meta import get_meta, shard_slice
from moe_train.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_cross_entropy

WORLD = 2
B, S, V = 2, 16, 128
RTOL, ATOL = 1e-5, 1e-6
Errors = list[str]


def _config(*, qk_norm: bool = True, dense_only: bool = False, tie: bool = False) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn_hidden_size=64,
        vocab_size=V,
        qk_norm=qk_norm,
        tie_embeddings=tie,
    )
    cfg.moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_ffn_hidden_size=16,
        num_shared_experts=1,
        first_k_dense=3 if dense_only else 1,
        lbl=LBLConfig(coeff=0.0),
        zloss_coeff=0.0,
    )
    cfg.train.seq_len = S // 2  # RoPE tables start shorter than S: both paths must grow them to S
    cfg.parallel = ParallelConfig(tp=WORLD)
    return cfg


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens_BS = torch.randint(0, V, (B, S), generator=gen)
    labels_BS = torch.roll(tokens_BS, -1, dims=1)
    labels_BS[0, :3] = IGNORE_INDEX
    labels_BS[1, -1] = IGNORE_INDEX
    return tokens_BS, labels_BS


def _close(errors: Errors, what: str, actual: torch.Tensor, expected: torch.Tensor, **tol: float) -> None:
    """Record a mismatch instead of raising, so one run reports every failing item."""
    try:
        torch.testing.assert_close(actual, expected, rtol=tol.get("rtol", RTOL), atol=tol.get("atol", ATOL))
    except AssertionError as err:
        errors.append(f"{what}: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()))


def _reduced_grad(param: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    """The gradient rule of param_meta: sum over grad_sum_kinds, then divide by dp."""
    meta = get_meta(param)
    assert meta is not None and param.grad is not None
    grad = param.grad.detach().clone()
    for kind in meta.grad_sum_kinds:
        groups.all_reduce(grad, kind)
    return grad / groups.dp_size


def _expected_slice(full: torch.Tensor, param: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
    meta = get_meta(param)
    assert meta is not None
    for kind, dim in meta.shards:
        full = shard_slice(full, dim, getattr(groups, f"{kind}_rank"), groups.size(kind))
    return full


def _compare_grads(errors: Errors, model: torch.nn.Module, ref: torch.nn.Module, groups: ProcessGroups) -> None:
    ref_grads = {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}
    seen = set()
    for name, param in model.named_parameters():
        meta = get_meta(param)
        if meta is None:
            errors.append(f"{name}: no ParamMeta")
            continue
        seen.add(meta.canonical_name)
        if param.grad is None:
            errors.append(f"{name}: no grad")
            continue
        expected = _expected_slice(ref_grads[meta.canonical_name], param, groups)
        _close(errors, f"grad {name}", _reduced_grad(param, groups), expected)
    if seen != set(ref_grads):
        errors.append(f"canonical names differ: {sorted(seen ^ set(ref_grads))}")


def _reference_and_tp(cfg: Config, groups: ProcessGroups) -> tuple[MoETransformer, MoETransformer]:
    ref = build_model(cfg)
    model = build_model(cfg)
    apply_tensor_parallel(model, groups)
    return ref, model


def _step(model: torch.nn.Module, tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    out = model(tokens_BS, labels_BS)
    assert out.token_loss_BS is not None
    out.token_loss_BS.mean().backward()
    return out.token_loss_BS.detach()


# ---------------------------------------------------------------------------------------------
# Checks (each returns the list of mismatches on this rank)


def check_vocab_parallel_ce(groups: ProcessGroups) -> Errors:
    """Vocab-parallel CE == F.cross_entropy (loss and logits grad, incl. ignore_index); twin without comm."""
    errors: Errors = []
    gen = torch.Generator().manual_seed(1)
    logits_BSV = 3 * torch.randn(B, S, V, generator=gen)
    weight_BS = torch.rand(B, S, generator=gen)
    _, labels_BS = _batch()
    ref_BSV = logits_BSV.clone().requires_grad_(True)
    ref_loss_BS = token_cross_entropy(ref_BSV, labels_BS)
    (ref_loss_BS * weight_BS).sum().backward()
    assert ref_BSV.grad is not None
    v = V // groups.tp_size
    vocab_start = groups.tp_rank * v
    local_BSv = logits_BSV[..., vocab_start : vocab_start + v].clone().requires_grad_(True)
    loss_BS = vocab_parallel_cross_entropy(local_BSv, labels_BS, vocab_start, groups.tp)
    (loss_BS * weight_BS).sum().backward()
    assert local_BSv.grad is not None
    _close(errors, "ce loss", loss_BS, ref_loss_BS)
    _close(errors, "ce grad", local_BSv.grad, ref_BSV.grad[..., vocab_start : vocab_start + v])
    if not bool((loss_BS[labels_BS == IGNORE_INDEX] == 0).all()):
        errors.append("ignored labels do not give loss 0")
    twin_BS = vocab_parallel_cross_entropy(local_BSv.detach(), labels_BS, vocab_start, None)  # no all-reduces
    if torch.allclose(twin_BS, ref_loss_BS, rtol=1e-2, atol=1e-2):
        errors.append("twin: the cross entropy without max/sum-exp/target all-reduces matched the reference")
    bf16_BS = vocab_parallel_cross_entropy(local_BSv.detach().bfloat16(), labels_BS, vocab_start, groups.tp)
    if bf16_BS.dtype != torch.float32:
        errors.append(f"bf16 logits give a {bf16_BS.dtype} loss, expected float32")
    return errors


def _model_parity(cfg: Config, groups: ProcessGroups) -> Errors:
    """Loss and every gradient of the full model, single device vs tp; shapes entering the blocks."""
    errors: Errors = []
    tokens_BS, labels_BS = _batch()
    ref, model = _reference_and_tp(cfg, groups)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(key: str) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(_: torch.nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(key, tuple(args[0].shape))

        return hook

    block, ref_block = model.layers["0"], ref.layers["0"]
    assert isinstance(block, TransformerBlock) and isinstance(ref_block, TransformerBlock)
    block.register_forward_pre_hook(record("block_in"))
    block.attention.register_forward_pre_hook(record("attention_in"))  # runs after the TP gather
    ref_loss_BS = _step(ref, tokens_BS, labels_BS)
    loss_BS = _step(model, tokens_BS, labels_BS)
    _close(errors, "token_loss_BS", loss_BS, ref_loss_BS)
    H = cfg.model.hidden_size
    if shapes != {"block_in": (B, S // WORLD, H), "attention_in": (B, S, H)}:
        errors.append(f"sequence-parallel shapes {shapes}: blocks should see [B, S/tp, H], attention [B, S, H]")
    _compare_grads(errors, model, ref, groups)
    # twin: without the sum over tp, a sequence-replicated parameter's grad is wrong
    local, full = block.attention_norm.weight.grad, ref_block.attention_norm.weight.grad
    assert local is not None and full is not None
    if torch.allclose(local, full, rtol=1e-3, atol=1e-6):
        errors.append("twin: attention_norm grad matched without the sum over tp")
    return errors


def check_moe_qk_norm(groups: ProcessGroups) -> Errors:
    """Dense first layer + MoE layers with shared experts, GQA (kv 2 over tp2), qk-norm on."""
    return _model_parity(_config(qk_norm=True), groups)


def check_moe_no_qk_norm(groups: ProcessGroups) -> Errors:
    """Same without qk-norm."""
    return _model_parity(_config(qk_norm=False), groups)


def check_dense_tied(groups: ProcessGroups) -> Errors:
    """All-dense model with tied embeddings (one vocab shard for embedding and head); deepcopy works."""
    cfg = _config(dense_only=True, tie=True)
    errors = _model_parity(cfg, groups)
    ref, model = _reference_and_tp(cfg, groups)
    tokens_BS, labels_BS = _batch(seed=3)
    with torch.no_grad():
        ref_loss_BS = ref(tokens_BS, labels_BS).token_loss_BS
        copied = copy.deepcopy(model)  # pipeline chunks are deep copies: hooks and groups must survive
        _close(errors, "deepcopy loss", copied(tokens_BS, labels_BS).token_loss_BS, ref_loss_BS)
    if copied.output is None or copied.output.weight is not copied.tok_embeddings.weight:  # type: ignore[union-attr]
        errors.append("deepcopy lost the embedding tie")
    return errors


def _prune(model: MoETransformer, first: bool) -> MoETransformer:
    """Stage 0 keeps the embedding and layer 0; stage 1 keeps layers 1-2, norm and output."""
    if first:
        model.norm, model.output = None, None
        del model.layers["1"], model.layers["2"]
    else:
        model.tok_embeddings = None
        del model.layers["0"]
    return model


def check_pruned_stages(groups: ProcessGroups) -> Errors:
    """TP applied after pruning: stage 0 emits this rank's sequence chunk; stage 1's loss and grads match."""
    errors: Errors = []
    cfg = _config()
    tokens_BS, labels_BS = _batch(seed=5)
    ref0, ref1 = _prune(build_model(cfg), True), _prune(build_model(cfg), False)
    tp0, tp1 = _prune(build_model(cfg), True), _prune(build_model(cfg), False)
    apply_tensor_parallel(tp0, groups)
    apply_tensor_parallel(tp1, groups)
    with torch.no_grad():
        h_BSH = ref0(tokens_BS).logits_BSV
        h_BsH = tp0(tokens_BS).logits_BSV
    assert h_BSH is not None and h_BsH is not None
    _close(errors, "stage 0 output", h_BsH, h_BSH.chunk(WORLD, dim=1)[groups.tp_rank])
    ref_loss_BS = _step(ref1, h_BSH, labels_BS)
    loss_BS = _step(tp1, h_BSH.chunk(WORLD, dim=1)[groups.tp_rank].contiguous(), labels_BS)
    _close(errors, "stage 1 loss", loss_BS, ref_loss_BS)
    _compare_grads(errors, tp1, ref1, groups)
    return errors


def check_bf16_autocast(groups: ProcessGroups) -> Errors:
    """Forward and backward under bf16 autocast run and stay close to the single-device bf16 run."""
    errors: Errors = []
    ref, model = _reference_and_tp(_config(), groups)
    tokens_BS, labels_BS = _batch(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss_BS = _step(ref, tokens_BS, labels_BS)
        loss_BS = _step(model, tokens_BS, labels_BS)
    if loss_BS.dtype != torch.float32:
        errors.append(f"bf16 loss dtype {loss_BS.dtype}")
    _close(errors, "bf16 loss", loss_BS, ref_loss_BS, rtol=2e-2, atol=2e-2)
    bad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.isfinite().all())]
    if bad:
        errors.append(f"bf16: missing or non-finite grads {bad}")
    return errors


def _with_expert_parallel(groups: ProcessGroups) -> Errors:
    """TP then EP (as parallelize.py does) with LBL and z-loss on: loss, MoE stats and grads match."""
    from moe_train.parallel.expert_parallel import apply_expert_parallel

    errors: Errors = []
    cfg = _config()
    cfg.moe.lbl.coeff, cfg.moe.zloss_coeff = 0.01, 0.001
    ref, model = _reference_and_tp(cfg, groups)
    apply_expert_parallel(model, groups)
    tokens_BS, labels_BS = _batch(seed=9)
    ref_out, out = ref(tokens_BS, labels_BS), model(tokens_BS, labels_BS)
    _close(errors, "loss", out.token_loss_BS, ref_out.token_loss_BS)
    _close(errors, "lbl", out.lbl, ref_out.lbl)
    _close(errors, "zloss", out.zloss, ref_out.zloss)
    _close(errors, "tokens_per_expert", out.tokens_per_expert_LE, ref_out.tokens_per_expert_LE)
    ref_out.token_loss_BS.mean().backward()
    out.token_loss_BS.mean().backward()
    _compare_grads(errors, model, ref, groups)
    return errors


def check_with_ep_tp2(groups: ProcessGroups) -> Errors:
    """tp2 (ep 1): the router statistics are summed over the tp sequence shards."""
    return _with_expert_parallel(groups)


def check_with_ep_tp2_ep2(groups: ProcessGroups) -> Errors:
    """tp2·ep2 folded onto the same two ranks (all-to-all over the tp ranks)."""
    ep_groups = groups_from_layout(rank_layout(WORLD, ParallelConfig(tp=WORLD, ep=WORLD)), groups.rank)
    return _with_expert_parallel(ep_groups)


CHECKS: list[Callable[[ProcessGroups], Errors]] = [
    check_vocab_parallel_ce,
    check_moe_qk_norm,
    check_moe_no_qk_norm,
    check_dense_tied,
    check_pruned_stages,
    check_bf16_autocast,
    check_with_ep_tp2,
    check_with_ep_tp2_ep2,
]


def _run_all(rank: int, world_size: int) -> dict[str, Any]:
    groups = groups_from_layout(rank_layout(world_size, ParallelConfig(tp=world_size)), rank)
    return {check.__name__: check(groups) for check in CHECKS}


@pytest.fixture(scope="module")
def results() -> list[dict[str, Errors]]:
    return run_distributed(_run_all, WORLD)


@pytest.mark.parametrize("name", [c.__name__ for c in CHECKS])
def test_tp2_matches_single_device(results: list[dict[str, Errors]], name: str) -> None:
    failures = [f"rank {rank}: {err}" for rank, res in enumerate(results) for err in res[name]]
    assert not failures, "\n".join(failures)


def test_noop_without_tp() -> None:
    """tp == 1 leaves the model untouched (same forward, no metadata)."""
    cfg = _config()
    model = build_model(cfg)
    apply_tensor_parallel(model, ProcessGroups.single())
    assert all(get_meta(p) is None for p in model.parameters())
    assert "forward" not in vars(model)


def test_uneven_heads_rejected() -> None:
    """kv heads that do not split over tp raise a one-line error naming them (no process group needed)."""
    cfg = _config()
    cfg.model.num_kv_heads = 1
    model = build_model(cfg)
    groups = ProcessGroups(tp_size=2)
    with pytest.raises(ValueError, match=r"num_kv_heads \(1\) is not divisible by tp \(2\)"):
        apply_tensor_parallel(model, groups)
