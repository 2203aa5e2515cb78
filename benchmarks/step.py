"""Training-step benchmark: moe_train's MoETransformer against HF transformers' Qwen3-MoE, same run.

A step is what Trainer.train_step does on one rank: forward + backward of every micro-batch of the
global batch (LM loss + load-balancing aux loss, gradients accumulated with scale 1/M), global-norm
clip, AdamW step. Both models get the same random-token batches (data.mock's MockSource), the same
shape, the same weights (ours copied into the peer, so routing and expert loads match; the initial
LM losses printed under the table show that the math is the same), the same torch AdamW settings,
and the same warmup and timed steps. Timed repetitions alternate (ours first on even repetitions,
the peer first on odd ones); tokens/s is the median over repetitions, `ours/peer` the median of
the per-repetition ratios of the pair that ran back to back, and `best` the ratio of the two
fastest repetitions (the least disturbed estimate when other work shares the machine).

    .venv/bin/python benchmarks/step.py                          # demo config + default shapes, fp32 CPU
    .venv/bin/python benchmarks/step.py --shapes none train.seq_len=128
    .venv/bin/python benchmarks/step.py --shapes 'e32:moe.num_experts=32;wide:model.hidden_size=512'
    .venv/bin/python benchmarks/step.py --device cuda --dtype bf16 --json out.json

    .venv/bin/python benchmarks/step.py --threads 1 --clock cpu --variants 'chunk:train.loss_chunk_tokens=1024;qkv:fuse_qkv=1'

`--variants` adds versions of our model to the same alternation (a dotted override, or a module switch:
fuse_qkv, fuse_gate_up, grouped_mm = 0/1), each reported against our baseline and the peer in the same
repetitions: the "change -> ratio" table. `--clock cpu` times this process's CPU time instead of wall
time: with one thread that is the step's own work, which a machine shared with other jobs inflates far
less than the wall clock.

Shapes are dotted overrides on top of --config (default configs/tiny_cpu.yaml); the command line's
overrides apply last, to every shape. Peers: Qwen3-MoE always has per-head qk-norm and no shared
experts, so our side runs with model.qk_norm=true; shapes with shared experts use Qwen2-MoE (no
qk-norm, qkv_bias off), which gates its shared expert with a sigmoid(Linear(H, 1)) that we do not
have: hidden_size extra parameters per MoE layer, shown in the params column. Our router z-loss
(moe.zloss_coeff) has no counterpart in the peers and is left on: a little extra work on our side.
Shapes the peers cannot express (sigmoid router, capacity dropping) are measured without a peer.
Needs HF transformers (`pip install transformers`, the `[bench]` extra).

Legend: B micro-batch, S sequence; tokens_BS / labels_BS are inputs and next-token targets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_train.config import Config, load_config
from moe_train.data.source import MockSource
from moe_train.interop.hf_mapping import to_hf_tensors
from moe_train.model import (
    MoETransformer,
    build_model,
    count_parameters,
    flops_per_token,
    set_aux_loss_scale,
)
from moe_train.model.moe import shared_ffn_size
from moe_train.model.transformer import set_compile, set_loss_chunking, set_recompute
from moe_train.train.metrics import GPU_PEAK_TFLOPS, measure_cpu_peak_flops

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"
DEMO_FALLBACK = [  # the demo shape, used when configs/tiny_cpu.yaml is absent
    "model.hidden_size=256",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=64",
    "model.vocab_size=8192",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_ffn_hidden_size=512",
    "train.seq_len=256",
    "train.micro_batch_size=8",
]
DEFAULT_SHAPES = [
    "e16k4-wide:model.hidden_size=512,model.num_heads=8,model.num_kv_heads=4,moe.num_experts=16,"
    "moe.top_k=4,moe.expert_ffn_hidden_size=256,train.micro_batch_size=4",
    "e16k2-shared:moe.num_experts=16,moe.top_k=2,moe.expert_ffn_hidden_size=256,moe.num_shared_experts=1",
    "e64k8-fine:moe.num_experts=64,moe.top_k=8,moe.expert_ffn_hidden_size=128",
]


@dataclass
class Contender:
    """One model under test with its optimizer and the loss of one micro-batch."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(tokens_BS, labels_BS) -> scalar training loss (aux losses included or attached)."""
    lm_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(tokens_BS, labels_BS) -> mean next-token cross entropy only (for the same-math check)."""
    params: int
    seconds: list[float] = field(default_factory=list)
    """Wall time of each timed repetition."""


@dataclass
class Row:
    """One line of the result table."""

    shape: str
    peer: str
    params_ours: int
    params_peer: int | None
    tokens_per_step: int
    micro_batches: int
    """Forward/backward passes per optimizer step (global_batch_size / micro_batch_size)."""
    flops_per_token: float
    tokens_per_s_ours: float
    tokens_per_s_peer: float | None
    ratio: float | None
    """Median over repetitions of peer seconds / our seconds (paired: the two ran back to back)."""
    ratio_range: tuple[float, float] | None
    """Smallest and largest per-repetition ratio."""
    ratio_best: float | None
    """Peer's fastest repetition / our fastest: the least disturbed estimate on a busy machine."""
    mfu_ours: float
    mfu_peer: float | None
    lm_loss_ours: float
    lm_loss_peer: float | None
    note: str = ""
    variants: list[dict[str, Any]] = field(default_factory=list)
    """--variants of our model timed in the same alternation: name, tokens/s, median ratio to the peer
    (with range) and to our baseline (with range), each per repetition."""


# ---------------------------------------------------------------------------------------------
# Configs


def _parse_shape(spec: str) -> tuple[str, list[str]]:
    """'name:key=value,key=value' -> (name, overrides)."""
    name, sep, rest = spec.strip().partition(":")
    if not sep or not name:
        raise SystemExit(f"--shapes entry {spec!r} must look like NAME:key.path=value,key.path=value")
    return name, [item for item in rest.split(",") if item]


def parse_variants(spec: str | None) -> list[tuple[str, list[str], dict[str, bool]]]:
    """'NAME:opt,opt;NAME:...' -> (name, config overrides, module toggles); an opt is a dotted config
    override or one of MODULE_TOGGLES set to 0/1."""
    out = []
    for entry in [] if not spec else [e for e in spec.split(";") if e.strip()]:
        name, opts = _parse_shape(entry)
        toggles = {}
        overrides = []
        for opt in opts:
            key, _, value = opt.partition("=")
            if key in MODULE_TOGGLES:
                if value not in ("0", "1"):
                    raise SystemExit(f"--variants {name}: {key} takes 0 or 1, got {value!r}")
                toggles[key] = value == "1"
            else:
                overrides.append(opt)
        out.append((name, overrides, toggles))
    return out


def shape_configs(args: argparse.Namespace) -> list[tuple[str, Config]]:
    """(name, config) of the demo config and of every --shapes entry (built on top of it)."""
    base_path = args.config
    first: list[str] = []
    if base_path is None and DEMO_CONFIG.is_file():
        base_path = str(DEMO_CONFIG)
    elif base_path is None:
        first = list(DEMO_FALLBACK)
    first.append("data.mock=true")
    shapes: list[tuple[str, list[str]]] = [(Path(base_path).stem if base_path else "tiny_cpu", [])]
    specs = [] if args.shapes == "none" else [spec for spec in args.shapes.split(";") if spec.strip()]
    shapes += [_parse_shape(spec) for spec in specs]
    out = []
    for name, own in shapes:
        overrides = own + list(args.overrides)  # the command line's overrides win over a shape's own
        cfg = load_config(base_path, first + overrides)
        if not any(o.startswith("model.qk_norm=") for o in overrides):  # match the peer: Qwen3 has qk-norm
            cfg = load_config(base_path, first + [f"model.qk_norm={shared_ffn_size(cfg.moe) == 0}"] + overrides)
        out.append((name, cfg))
    return out


# ---------------------------------------------------------------------------------------------
# The two models


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW, identical for both models: decay on matrices only, torch's fused kernel (as
    moe_train.train.optim with optim.fused, and HF Trainer's default optimizer, adamw_torch_fused)."""
    o = cfg.optim
    impl = {"fused": True}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **impl)


MODULE_TOGGLES = ("fuse_qkv", "fuse_gate_up", "grouped_mm")
"""Implementation switches of our modules a --variants entry may set (Attention.fuse_qkv,
FeedForward/GroupedExperts.fuse_gate_up, GroupedExperts.grouped_mm), e.g. 'fused:fuse_qkv=1'."""


def build_ours(
    cfg: Config, device: torch.device, toggles: dict[str, bool] | None = None, name: str = "moe_train"
) -> Contender:
    """moe_train's model; its aux losses reach the backward with the trainer's scale, 1/micro-batches.
    train.recompute and train.loss_chunk_tokens apply as in the trainer; `toggles` set module switches."""
    model = build_model(cfg, device)
    set_recompute(model, cfg.train.recompute)
    set_loss_chunking(model, cfg.train.loss_chunk_tokens)
    for key, value in (toggles or {}).items():
        for module in model.modules():
            if hasattr(module, key):
                setattr(module, key, value)
    set_compile(model, cfg.train.compile)
    set_aux_loss_scale(model, cfg.train.micro_batch_size / cfg.train.global_batch_size)
    params = sum(p.numel() for p in model.parameters())
    analytic = count_parameters(cfg.model, cfg.moe).total
    if params != analytic:
        raise SystemExit(f"count_parameters ({analytic}) disagrees with the built model ({params})")

    def loss_fn(tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        token_loss_BS = model(tokens_BS, labels_BS).token_loss_BS
        assert token_loss_BS is not None
        return token_loss_BS.mean()

    return Contender(name, model, make_optimizer(model, cfg, device), loss_fn, loss_fn, params)


def peer_unsupported(cfg: Config) -> str | None:
    """Why no HF peer can express this config (None when one can)."""
    moe = cfg.moe
    if moe.score_func != "softmax":
        return f"moe.score_func={moe.score_func} (HF Qwen MoE routers use softmax)"
    if moe.capacity_factor is not None:
        return "moe.capacity_factor set (HF Qwen MoE models are dropless)"
    shared = shared_ffn_size(moe) > 0
    if cfg.model.qk_norm == shared:
        peer = "Qwen2-MoE (shared experts) has no" if shared else "Qwen3-MoE always has"
        return f"model.qk_norm={str(cfg.model.qk_norm).lower()} ({peer} qk-norm)"
    return None


def _peer_config(cfg: Config, experts_impl: str | None) -> Any:
    """A Qwen3MoeConfig (or Qwen2MoeConfig when there are shared experts) of the same shape."""
    import transformers

    m, moe = cfg.model, cfg.moe
    kwargs: dict[str, Any] = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std,
        max_position_embeddings=max(cfg.train.seq_len, 2048),
        attention_dropout=0.0,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.norm_topk_prob,
        mlp_only_layers=list(range(moe.first_k_dense)),
        decoder_sparse_step=1,
        output_router_logits=True,
        router_aux_loss_coef=moe.lbl.coeff,
        use_cache=False,
        attn_implementation="sdpa",
    )
    if experts_impl is not None:
        kwargs["experts_implementation"] = experts_impl
    if shared_ffn_size(moe) > 0:
        return transformers.Qwen2MoeConfig(
            **kwargs, shared_expert_intermediate_size=shared_ffn_size(moe), qkv_bias=False
        ), transformers.Qwen2MoeForCausalLM
    return transformers.Qwen3MoeConfig(**kwargs), transformers.Qwen3MoeForCausalLM


def _copy_weights(ours: MoETransformer, peer: nn.Module, cfg: Config) -> list[str]:
    """Load our weights into the HF model (moe_train.interop's mapping, transformers 5's fused experts);
    returns the peer parameters left as initialised."""
    arch = "qwen2_moe" if shared_ffn_size(cfg.moe) > 0 else "qwen3_moe"
    state = to_hf_tensors({name: p.detach() for name, p in ours.named_parameters()}, cfg, arch, "fused")
    result = peer.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise SystemExit(f"peer has no parameters named {result.unexpected_keys[:3]}")
    return list(result.missing_keys)


def build_peer(
    cfg: Config, ours: MoETransformer, device: torch.device, experts_impl: str | None, compile_peer: bool = False
) -> Contender:
    """The HF model of the same shape and weights; its loss is LM + router_aux_loss_coef * LBL.
    compile_peer: torch.compile the whole HF model (dynamo splits it where it must)."""
    config, model_cls = _peer_config(cfg, experts_impl)
    model = model_cls(config).to(device)
    model.train()
    missing = _copy_weights(ours, model, cfg)
    if any("shared_expert_gate" not in k for k in missing):
        raise SystemExit(f"peer parameters not mapped from ours: {missing[:3]}")
    if compile_peer:
        model.compile()

    def loss_fn(tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens_BS, labels=labels_BS, shift_labels=labels_BS).loss

    def lm_loss_fn(tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=tokens_BS, labels=labels_BS, shift_labels=labels_BS)
        return out.loss - config.router_aux_loss_coef * out.aux_loss

    name = f"{model_cls.__name__.removesuffix('ForCausalLM')}[{model.config._experts_implementation}]"
    name += "+compile" if compile_peer else ""
    params = sum(p.numel() for p in model.parameters())
    return Contender(name, model, make_optimizer(model, cfg, device), loss_fn, lm_loss_fn, params)


# ---------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MicroBatch = tuple[torch.Tensor, torch.Tensor]
"""(tokens_BS, labels_BS)."""


def train_step(c: Contender, micro_batches: list[MicroBatch], cfg: Config, amp: Any) -> float:
    """One optimizer step as Trainer.train_step does it: forward + backward of every micro-batch
    (gradients accumulated with scale 1/M), global-norm clip, AdamW step. Returns the loss."""
    scale = 1.0 / len(micro_batches)
    total = torch.zeros(())
    for tokens_BS, labels_BS in micro_batches:
        with amp():
            loss = c.loss_fn(tokens_BS, labels_BS)
        (loss * scale).backward()
        total += loss.detach().cpu() * scale  # the host reads the loss every micro-batch, as the trainer logs it
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    torch.nn.utils.clip_grad_norm_([p for p in c.model.parameters() if p.grad is not None], max_norm, foreach=True)
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    return float(total)


def time_steps(
    c: Contender, steps: list[list[MicroBatch]], cfg: Config, amp: Any, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds for these optimizer steps, back to back (wall clock, or `clock`, e.g. process CPU time)."""
    device = steps[0][0][0].device
    _sync(device)
    start = clock()
    for micro_batches in steps:
        train_step(c, micro_batches, cfg, amp)
    _sync(device)
    return clock() - start


def mock_steps(cfg: Config, count: int, device: torch.device) -> list[list[MicroBatch]]:
    """The micro-batches of `count` optimizer steps: MockSource's random tokens (the data.mock=true
    path), global_batch_size samples per step in micro_batch_size slices, as the trainer reads them."""
    source = MockSource(cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    steps = []
    for step in range(count):
        starts = range(step * gbs, (step + 1) * gbs, mbs)
        batches = [source.get_batch(range(i, i + mbs)).to(device) for i in starts]
        steps.append([(b.tokens_BS, b.labels_BS) for b in batches])
    return steps


def run_contenders(
    contenders: list[Contender], cfg: Config, args: argparse.Namespace, device: torch.device, amp: Any
) -> None:
    """Warm every model up, then `repeats` timed repetitions of `steps` steps, alternating the order."""
    steps = mock_steps(cfg, args.warmup + args.steps, device)
    warm, timed = steps[: args.warmup], steps[args.warmup :]
    for c in contenders:
        if warm:
            time_steps(c, warm, cfg, amp)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for r in range(args.repeats):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            c.seconds.append(time_steps(c, timed, cfg, amp, clock))


@torch.no_grad()
def initial_lm_loss(c: Contender, tokens_BS: torch.Tensor, labels_BS: torch.Tensor, amp: Any) -> float:
    """LM loss of the untrained weights (the same in both models when the math is the same)."""
    with amp():
        return float(c.lm_loss_fn(tokens_BS, labels_BS))


def bench_shape(name: str, cfg: Config, args: argparse.Namespace, device: torch.device) -> Row:
    """Build both models for one shape, check they agree, time them; returns the row (MFU left 0)."""
    amp = make_amp(args.dtype, device)
    ours = build_ours(cfg, device)
    assert isinstance(ours.model, MoETransformer)
    reason = peer_unsupported(cfg)
    peer = None if reason else build_peer(cfg, ours.model, device, args.peer_experts, args.peer_compile)
    variants = [
        build_ours(apply_overrides(cfg, overrides), device, toggles, name)
        for name, overrides, toggles in parse_variants(args.variants)
    ]
    contenders = [ours, *variants] if peer is None else [ours, *variants, peer]
    tokens_BS, labels_BS = mock_steps(cfg, 1, device)[0][0]
    losses = [initial_lm_loss(c, tokens_BS, labels_BS, amp) for c in contenders]
    run_contenders(contenders, cfg, args, device, amp)
    tokens = cfg.train.global_batch_size * cfg.train.seq_len * args.steps
    tps = [tokens / statistics.median(c.seconds) for c in (ours, peer) if c is not None]
    fpt = flops_per_token(cfg.model, cfg.moe, cfg.train.seq_len)
    has_peer = peer is not None
    ratios = [p / o for o, p in zip(ours.seconds, peer.seconds, strict=True)] if peer is not None else []
    return Row(
        shape=name,
        peer=peer.name if peer is not None else "none",
        params_ours=ours.params,
        params_peer=peer.params if peer is not None else None,
        tokens_per_step=cfg.train.global_batch_size * cfg.train.seq_len,
        micro_batches=cfg.train.global_batch_size // cfg.train.micro_batch_size,
        flops_per_token=fpt,
        tokens_per_s_ours=tps[0],
        tokens_per_s_peer=tps[1] if has_peer else None,
        ratio=statistics.median(ratios) if has_peer else None,
        ratio_range=(min(ratios), max(ratios)) if has_peer else None,
        ratio_best=min(peer.seconds) / min(ours.seconds) if peer is not None else None,
        mfu_ours=0.0,
        mfu_peer=None,
        lm_loss_ours=losses[0],
        lm_loss_peer=losses[-1] if has_peer else None,
        note=f"no peer: {reason}" if reason else "",
        variants=[variant_summary(v, ours, peer, tokens) for v in variants],
    )


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """cfg with dotted overrides applied (validated like any config)."""
    if not overrides:
        return cfg
    from moe_train.config import apply_overrides as apply_to_dict
    from moe_train.config import from_dict, to_dict

    return from_dict(apply_to_dict(to_dict(cfg), overrides))


def variant_summary(v: Contender, ours: Contender, peer: Contender | None, tokens: int) -> dict[str, Any]:
    """Per-repetition ratios of a variant against the peer and against our baseline (same repetition)."""
    vs_ours = [o / t for o, t in zip(ours.seconds, v.seconds, strict=True)]
    out: dict[str, Any] = {"name": v.name, "tokens_per_s": tokens / statistics.median(v.seconds)}
    out["vs_ours"], out["vs_ours_range"] = statistics.median(vs_ours), (min(vs_ours), max(vs_ours))
    if peer is not None:
        vs_peer = [p / t for p, t in zip(peer.seconds, v.seconds, strict=True)]
        out["vs_peer"], out["vs_peer_range"] = statistics.median(vs_peer), (min(vs_peer), max(vs_peer))
        out["vs_peer_best"] = min(peer.seconds) / min(v.seconds)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def make_amp(dtype: str, device: torch.device) -> Callable[[], Any]:
    """Context factory: nothing for fp32, bf16 autocast (fp32 master weights) for bf16."""
    if dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def peak_flops(device: torch.device) -> tuple[float, str]:
    """MFU denominator and where it came from (on CPU: the best of several matmul probes)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: dense bf16 table value"
        return 312e12, f"{name}: unknown GPU, A100 bf16 value assumed"
    return measure_cpu_peak_flops(repeats=10), "best fp32 1024^3 matmul, probed before and after"


def with_mfu(row: Row, peak: float) -> Row:
    """The row with MFU = tokens/s * flops_per_token / peak filled in."""
    mfu_peer = None if row.tokens_per_s_peer is None else row.tokens_per_s_peer * row.flops_per_token / peak
    return replace(row, mfu_ours=row.tokens_per_s_ours * row.flops_per_token / peak, mfu_peer=mfu_peer)


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """CPU / GPU, cores, memory and library versions, for BENCHMARKS.md."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "load_average": os.getloadavg(),
        "memory_gib": round(mem_gib, 1),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    """The result table (markdown, so it pastes into BENCHMARKS.md)."""
    head = ["shape", "peer", "params ours / peer", "tok/s ours", "tok/s peer", "ours/peer (range)", "MFU ours"]
    head += ["MFU peer", "best ours/peer"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        params = f"{r.params_ours:,} / {_fmt(r.params_peer, ',')}"
        cells = [
            r.shape,
            r.peer,
            params,
            f"{r.tokens_per_s_ours:,.0f}",
            _fmt(r.tokens_per_s_peer, ",.0f"),
            "-" if r.ratio_range is None else f"{r.ratio:.2f}x ({r.ratio_range[0]:.2f}-{r.ratio_range[1]:.2f})",
            f"{100 * r.mfu_ours:.1f}%",
            _fmt(None if r.mfu_peer is None else 100 * r.mfu_peer, ".1f") + ("%" if r.mfu_peer is not None else ""),
            _fmt(r.ratio_best, ".2f") + ("x" if r.ratio_best is not None else ""),
        ]
        print("| " + " | ".join(cells) + " |")
    if any(r.variants for r in rows):
        print("\n| shape | variant | tok/s | vs our baseline (range) | vs peer (range) | best vs peer |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            for v in r.variants:
                lo, hi = v["vs_ours_range"]
                vs_peer = "-" if "vs_peer" not in v else f"{v['vs_peer']:.2f}x ({v['vs_peer_range'][0]:.2f}-"
                vs_peer += "" if "vs_peer" not in v else f"{v['vs_peer_range'][1]:.2f})"
                best = _fmt(v.get("vs_peer_best"), ".2f")
                print(
                    f"| {r.shape} | {v['name']} | {v['tokens_per_s']:,.0f} | {v['vs_ours']:.2f}x ({lo:.2f}-{hi:.2f}) "
                    f"| {vs_peer} | {best} |"
                )
    for r in rows:
        extra = "" if r.params_peer is None else f"; params differ by {r.params_peer - r.params_ours:+,}"
        loss = f"initial LM loss ours {r.lm_loss_ours:.6f}, peer {_fmt(r.lm_loss_peer, '.6f')}"
        step = f"{r.tokens_per_step} tokens/step in {r.micro_batches} micro-batch{'es' if r.micro_batches > 1 else ''}"
        print(f"  {r.shape}: {step}, {r.flops_per_token / 1e6:.1f} MFLOP/token; {loss}{extra}")
        if r.note:
            print(f"  {r.shape}: {r.note}")


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every shape, e.g. train.seq_len=128")
    p.add_argument("--config", default=None, help=f"base config (default {DEMO_CONFIG.name}, else the demo shape)")
    p.add_argument(
        "--shapes",
        default=";".join(DEFAULT_SHAPES),
        help="extra shapes 'NAME:key=value,key=value;NAME:...' on top of --config; 'none': the config only\n"
        "(default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast, fp32 master weights")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps per model before timing")
    p.add_argument("--steps", type=int, default=1, help="timed optimizer steps per repetition")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per model (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: this process's CPU time (CPU only; with --threads 1 it is the step's\n"
        "own work, which other jobs on a shared machine inflate far less than wall time)",
    )
    p.add_argument(
        "--peer-experts", default=None, help="HF experts_implementation (default: HF's own, grouped_mm if usable)"
    )
    p.add_argument("--peer-compile", action="store_true", help="torch.compile the HF peer (whole model)")
    p.add_argument(
        "--variants",
        default=None,
        help="extra versions of our model timed in the same alternation, 'NAME:opt,opt;NAME:...'; an opt is\n"
        f"a dotted override (train.loss_chunk_tokens=1024) or {'/'.join(MODULE_TOGGLES)}=0|1",
    )
    p.add_argument("--json", default=None, help="also write rows and machine info to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/step.py needs HF transformers: pip install transformers (the [bench] extra)")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    configs = shape_configs(args)
    peak, peak_source = peak_flops(device)
    info = machine_info(device, threads)
    print(
        f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({threads} threads), "
        f"transformers {info['transformers']}, {args.device} {args.dtype}, load average {info['load_average'][0]:.2f}"
    )
    print(
        f"# {args.warmup} warmup + {args.repeats} x {args.steps} timed steps per model, alternating, median;"
        f" {args.clock} clock"
    )
    rows = []
    for name, cfg in configs:
        rows.append(bench_shape(name, cfg, args, device))
        print(f"# {name}: ours/peer {_fmt(rows[-1].ratio, '.2f')}", flush=True)
    if device.type == "cpu":  # a busy machine lowers the probe: keep the best one
        peak = max(peak, peak_flops(device)[0])
    rows = [with_mfu(r, peak) for r in rows]
    print(f"# MFU peak {peak / 1e9:,.1f} GFLOP/s ({peak_source}); load average now {os.getloadavg()[0]:.2f}")
    print_table(rows)
    if args.json:
        payload = {"machine": info, "peak_flops": peak, "peak_source": peak_source, "args": vars(args)}
        payload["rows"] = [asdict(r) for r in rows]
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
