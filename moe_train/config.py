"""Typed run configuration: YAML + dotted overrides → validated dataclasses.

Every field carries a docstring (the string literal under it); `config_reference()` turns those into
the table in README.md, and a test keeps the two in sync. Errors name the dotted key path and value:
``moe.top_k (9) must be <= moe.num_experts (8)``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key path."""


@dataclass
class ModelConfig:
    """Decoder-only transformer shape."""

    hidden_size: int = 256
    """Width of the residual stream (H)."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide num_heads."""
    head_dim: int = 64
    """Dimension of one attention head."""
    ffn_hidden_size: int = 1024
    """Hidden size of the dense SwiGLU MLP (used by the first moe.first_k_dense layers)."""
    vocab_size: int = 8192
    """Vocabulary size of the embedding and output layer; must be >= the tokenizer's vocabulary."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """Epsilon of RMSNorm."""
    qk_norm: bool = False
    """Apply RMSNorm to queries and keys before RoPE (see model.qk_norm_scope)."""
    qk_norm_scope: str = "head"
    """With model.qk_norm: 'head' normalises each head over head_dim (Qwen3), 'full' the whole q / k
    projection over num_heads * head_dim (OLMoE)."""
    tie_embeddings: bool = False
    """Share the input embedding and output projection weights."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""


@dataclass
class LBLConfig:
    """Load-balancing loss LBL = N_E * sum_i f_i * p_i (Switch Transformer, arXiv 2101.03961)."""

    coeff: float = 0.01
    """Weight of the load-balancing loss (averaged over MoE layers) in the total loss; 0 disables it."""
    scope: str = "micro_batch"
    """Over which tokens f_i and p_i are counted: 'micro_batch' (one forward of one DP replica, all its
    sequence-parallel shards), 'sequence' (per sequence, averaged over sequences; DeepSeek-V2/V3) or
    'global' (f_i over the optimizer step's whole global batch; arXiv 2501.11873). See docs/load_balancing.md."""
    global_mode: str = "exact"
    """How scope 'global' learns the step's counts: 'exact' (a no-grad counting pass over the step's
    micro-batches first; gradients equal the one-process whole-batch LBL), 'streaming' (counts of this
    step so far plus last step's for the rest; no extra pass) or 'running_mean' (Megatron-Core's
    global_aux_loss: counts of this step so far)."""


@dataclass
class MoEDispatchConfig:
    """Token dispatch (permute -> [all-to-all] -> experts -> [all-to-all] -> combine) kernels and wire format."""

    backend: str = "auto"
    """Dispatch kernels: 'auto' (the C++/CUDA extension for the tensors' device when built, else PyTorch),
    'cuda', 'cpu' (the extension, an error when it is not built) or 'torch' (the pure-PyTorch reference)."""
    dtype: str = "fp32"
    """Dtype of the dispatched token rows on the wire: 'fp32', 'bf16' or 'fp8' (E4M3 with one fp32 scale per
    token per 128 channels; a hidden size that is not a multiple of 128 gets a shorter last block). Experts
    receive them back in the activation dtype; the combine and all gradients travel unquantised."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers."""

    num_experts: int = 8
    """Routed experts per MoE layer (N_E)."""
    top_k: int = 2
    """Experts each token is routed to."""
    expert_ffn_hidden_size: int = 512
    """Hidden size of one routed expert's SwiGLU MLP."""
    num_shared_experts: int = 0
    """Always-active shared experts (DeepSeekMoE, arXiv 2401.06066); 0 disables them."""
    shared_expert_ffn_hidden_size: int | None = None
    """Hidden size of each shared expert; null means moe.expert_ffn_hidden_size."""
    score_func: str = "softmax"
    """Router score function: 'softmax' or 'sigmoid'."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights of each token to sum to 1."""
    capacity_factor: float | None = None
    """Expert capacity = ceil(capacity_factor * tokens * top_k / num_experts); null means dropless."""
    drop_policy: str = "probs"
    """Which tokens an over-full expert keeps: 'probs' (highest router score) or 'position' (earliest)."""
    first_k_dense: int = 0
    """The first k layers use a dense MLP instead of an MoE layer."""
    lbl: LBLConfig = field(default_factory=LBLConfig)
    """Load-balancing loss settings."""
    zloss_coeff: float = 0.0
    """Weight of the router z-loss (ST-MoE, arXiv 2202.08906), averaged over MoE layers; 0 disables it."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3, arXiv 2412.19437): > 0 adds a per-expert bias to the scores
    used for top-k selection only, updated after each optimizer step by rate * sign(mean load - load_i)
    from the step's global counts; 0 disables it. Combinable with any moe.lbl scope (or moe.lbl.coeff 0)."""
    dispatch: MoEDispatchConfig = field(default_factory=MoEDispatchConfig)
    """Token dispatch kernels and wire dtype."""


@dataclass
class ParallelConfig:
    """Parallel layout; data parallel size is derived as world / (tp * cp * pp)."""

    tp: int = 1
    """Tensor-parallel size (attention, dense MLP, embeddings); sequence parallel is on when tp > 1."""
    cp: int = 1
    """Context-parallel size: each sequence is split over cp ranks (load-balanced causal chunks); K/V
    are all-gathered over cp inside attention. train.seq_len must be divisible by 2 * cp."""
    pp: int = 1
    """Pipeline-parallel stages."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (interleaved schedule when > 1)."""
    ep: int = 1
    """Expert-parallel size."""
    etp: int = 1
    """Expert tensor-parallel size."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule: '1f1b' or 'interleaved_1f1b' (requires vpp > 1)."""
    pp_layer_split: list[int] | None = None
    """Explicit layers per virtual stage (uneven splits); null means an even split."""
    zero1: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on GPU, gloo on CPU), 'nccl' or 'gloo'."""
    collective_timeout_s: float = 600.0
    """Timeout of every collective (init_process_group's timeout): a rank waiting longer fails instead of
    hanging."""


@dataclass
class DoReMiConfig:
    """DoReMi (arXiv 2305.10429): exponentiated gradient on clipped excess loss over a reference."""

    reference: str | None = None
    """Per-domain reference losses: a JSON file {domain: loss} or a reference run's metrics.jsonl."""
    eta: float = 1.0
    """Step size of the exponentiated-gradient update."""
    smoothing: float = 1.0e-3
    """Mix of the uniform distribution into every update (the paper's c)."""


@dataclass
class ODMConfig:
    """Online Data Mixing (arXiv 2312.02406): EXP3 bandit with the domain's LM loss as reward."""

    alpha: float = 0.9
    """Moving-average factor of the importance-weighted reward estimate."""


@dataclass
class AioliConfig:
    """Aioli (arXiv 2411.05735): online estimate of the mixing-law matrix A, then exponentiated gradient."""

    rounds: int = 1
    """Sweeps over the domains per update (LearnParams' rounds); each probe is one domain."""
    probe_steps: int = 2
    """Training steps per probe mixture (at the start of every update interval)."""
    one_hot: float = 0.5
    """Share of the probed domain in a probe mixture; the rest is split evenly."""
    eta: float = 0.1
    """Step size of the exponentiated-gradient update."""
    ema: float = 0.5
    """Weight of the previous estimate of A in its moving average (0: no averaging)."""


@dataclass
class DataMixtureConfig:
    """How the domain mixture of every global batch is chosen (see docs/data.md)."""

    policy: str = "static"
    """static (data.domain_weights), schedule (piecewise-linear), doremi, odm or aioli."""
    update_every: int = 10
    """Steps between updates of an online policy (Aioli: the length of one probe-and-update round)."""
    min_weight: float = 0.0
    """Floor of every domain's weight under an online policy (must be < 1 / number of domains)."""
    schedule: list[list[float]] | None = None
    """schedule policy: rows [step, w_1, ..., w_D], weights interpolated linearly between rows."""
    max_epochs: int = 0
    """Passes over a domain's packed samples before it counts as exhausted; 0 means unlimited."""
    on_exhausted: str = "error"
    """When a domain is exhausted: error (stop with a clear message) or drop (warn, sample the others)."""
    doremi: DoReMiConfig = field(default_factory=DoReMiConfig)
    """DoReMi settings."""
    odm: ODMConfig = field(default_factory=ODMConfig)
    """ODM settings."""
    aioli: AioliConfig = field(default_factory=AioliConfig)
    """Aioli settings."""


@dataclass
class DataConfig:
    """Training data."""

    mock: bool = False
    """Random tokens; each sample is a pure function of (train.seed, global sample index)."""
    dir: str = "data_cache/demo"
    """Directory with tokenizer.json, per-domain token shards and their index (from `moe-train data`)."""
    domains: list[str] | None = None
    """Domains to train on; null means every domain in data.dir."""
    domain_weights: list[float] | None = None
    """Sampling weight per domain (same order as data.domains); null means uniform."""
    tokenizer: str | None = None
    """Path of a tokenizer.json to use instead of <data.dir>/tokenizer.json."""
    verify_checksums: bool = True
    """Check every shard's sha256 against its index before training (reads each shard once)."""
    mixture: DataMixtureConfig = field(default_factory=DataMixtureConfig)
    """Mixture policy and sampler."""
    ledger: bool = False
    """Write <run.dir>/ledger.jsonl: one line per sample of every global batch (rank 0)."""
    prefetch: bool = True
    """Read the next global batch in a background thread while the current step runs."""


@dataclass
class OptimConfig:
    """AdamW optimizer and learning-rate schedule."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    schedule: str = "cosine"
    """Learning-rate schedule: 'cosine' (warmup + cosine), 'wsd' (warmup-stable-decay) or 'constant'."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """For 'wsd': fraction of the schedule length (optim.decay_steps) spent in the final linear decay."""
    decay_steps: int | None = None
    """Length of the schedule: the LR reaches its floor here and stays there (Megatron's lr-decay-iters);
    null means train.max_steps. Set it to keep a run's schedule when resuming with a larger max_steps."""
    fused: bool = True
    """Use a fused AdamW kernel: apex FusedAdam on CUDA when installed, else torch's fused AdamW (CUDA, CPU)."""
    foreach: bool = True
    """Without a fused kernel, torch AdamW's multi-tensor (foreach) path; false updates one parameter
    at a time, whose temporaries are one parameter's size instead of a copy of all of Adam's v (for
    memory-bound runs such as configs/scale_proof_cpu.yaml)."""


@dataclass
class AnomalyConfig:
    """NaN/Inf and loss-spike handling (moe_train/train/anomaly.py; docs/fault_tolerance.md)."""

    on_nan: str = "skip"
    """A step whose loss or gradient norm is NaN/Inf: 'skip' (no update; the batch is dropped and logged) or
    'stop' (end the run with one line naming the step and its samples)."""
    spike_zscore: float = 0.0
    """Skip a step whose loss is more than this many standard deviations above the mean of the last
    train.anomaly.window clean steps; 0 disables spike detection."""
    window: int = 50
    """Clean steps in the spike-detection window (detection starts once it is full)."""
    on_spike: str = "skip"
    """What a spike does: 'skip' (the step trains nothing), 'rollback' (reload the newest checkpoint and never
    train on the samples from it through the spiking batch) or 'stop'."""
    max_consecutive: int = 5
    """More consecutive anomalous steps than this stop the run (one line naming the step and its samples)."""


@dataclass
class WatchdogConfig:
    """Hang watchdog (moe_train/train/watchdog.py): fail fast so the launcher restarts the job."""

    multiple: float = 10.0
    """A step running longer than this multiple of the median step time (and longer than floor_s) fails the
    process after logging its rank and phase; 0 disables the watchdog."""
    floor_s: float = 300.0
    """Never fire on a step shorter than this many seconds."""
    warmup_steps: int = 5
    """Steps measured before steps are watched (the first steps are slow: allocation, compilation)."""
    checkpoint_s: float = 3600.0
    """Limit for one checkpoint save, in seconds."""
    poll_s: float = 1.0
    """How often the watchdog thread looks, in seconds."""
    exit_code: int = 17
    """Exit status of a process the watchdog ends."""


@dataclass
class TrainConfig:
    """Training loop."""

    max_steps: int = 200
    """Optimizer steps to run."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Sequences per rank per forward/backward (gradient accumulation fills the global batch)."""
    seq_len: int = 128
    """Tokens per sequence."""
    seed: int = 1234
    """Seed for initialisation and data order."""
    precision: str = "fp32"
    """'fp32', or 'bf16' (autocast with fp32 master weights)."""
    eval_every: int = 50
    """Validate every this many steps (and at the end); 0 disables validation."""
    eval_at_start: bool = True
    """Also validate the initial model (step 0) of a fresh run, so validation curves start at the init."""
    eval_batches: int = 4
    """Micro-batches per domain in one validation."""
    log_every: int = 10
    """Print a console line every this many steps."""
    save_on_signal: bool = True
    """On SIGTERM / SIGUSR1 (preemption), finish the step, save a checkpoint and exit 0 for a requeue."""
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    """NaN and loss-spike handling."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """Hang watchdog."""
    recompute: str = "none"
    """Activation recompute: 'none'; 'selective' (attention core and every SwiGLU MLP's intermediates
    recomputed in backward); 'full' (each transformer block keeps only its input and runs again in
    backward). Router statistics and LBL counts are counted once either way."""
    loss_chunk_tokens: int = 0
    """> 0: output projection + cross entropy over chunks of this many tokens, never holding the
    [B, S, V] logits (recomputed per chunk in backward); 0 = off."""
    compile: bool = False
    """Regional torch.compile of each block's dense parts (norm + attention + RoPE + residual; the dense
    SwiGLU MLP; the final norm + head + cross entropy), the MoE dispatch left eager. Works with every
    train.recompute and parallel layout; the first steps pay the compile time."""


@dataclass
class CheckpointConfig:
    """Checkpointing."""

    every: int = 100
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    resume: str | None = None
    """'latest' (newest checkpoint in <run.dir>/checkpoints), 'auto' (the newest if there is one, else a fresh
    run: for requeued jobs), a checkpoint path, or null for a fresh run."""
    verify: str = "sha256"
    """Checkpoint manifests: 'sha256' (saves record, and resumes check, the size and sha256 of every file) or
    'size' (sizes only: no file is read back on save or resume; catches truncation but not bit flips)."""


@dataclass
class LogConfig:
    """Logging outputs."""

    tensorboard: bool = True
    """Write TensorBoard event files to <run.dir>/tb."""
    level: str = "INFO"
    """Python logging level."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, MFU's denominator; null means a table for known GPUs or, on CPU, a
    matmul probe cached per machine in ~/.cache/moe_train/peak_flops.json."""
    routing_every: int = 0
    """Write domain x expert routing heatmaps of the training batches to TensorBoard every this many
    steps (counts are reduced every step and logged as scalars); 0 disables the images."""
    progress_bar: str = "auto"
    """Progress bar with ETA on rank 0: 'auto' (when stderr is a terminal), 'always' or 'never'."""


@dataclass
class EngineConfig:
    """Which engine runs the optimizer step (moe_train/train/deepspeed_engine.py for DeepSpeed)."""

    name: str = "native"
    """'native' (moe_train's gradient reduction, ZeRO-1 and clipping) or 'deepspeed' (deepspeed.initialize
    with ZeRO stage 1/2 from engine.deepspeed_config; data x expert parallel layouts only)."""
    deepspeed_config: str | dict[str, Any] | None = None
    """For engine.name=deepspeed: a ds_config as a path (.json / .yaml) or an inline mapping. Batch sizes and
    gradient_clipping are filled in from train.* / optim.*; values that contradict them are errors."""


@dataclass
class RunConfig:
    """Where the run lives."""

    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints."""
    name: str = "moe"
    """Human-readable run name."""


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE layers."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Training engine."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory."""


# ---------------------------------------------------------------------------------------------
# Building from nested dicts, with strict type checks


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path} ({value!r}) must be {_type_name(tp)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} ({value!r}) must be a mapping")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path} ({value!r}) must be a list")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} ({value!r}) must be a mapping of {tp.__name__} fields")
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} ({value!r}) must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} ({value!r}) must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value):  # YAML 1.1 reads 3e-4 as a string
            return float(value)
        raise ConfigError(f"{path} ({value!r}) must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} ({value!r}) must be a string")
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict."""
    cfg = _build(Config, values)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict form of a config (what is written to the run directory)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# YAML + dotted overrides


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key path")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        parts, value = _parse_override(item)
        node = values
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return values


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {_yaml_error_text(p, exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def _yaml_error_text(path: Path, exc: yaml.YAMLError) -> str:
    """'PATH:LINE:COLUMN is not valid YAML: PROBLEM (CONTEXT)', lines and columns counted from 1."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        context += f" started at {start.line + 1}:{start.column + 1}"
    return f"{where} is not valid YAML: {problem}" + (f" ({context})" if context else "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or defaults when path is None), apply dotted overrides, validate."""
    values = load_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(values, list(overrides or [])))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Validation of values (types are already checked)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg: Config, *paths: str) -> None:
    for path in paths:
        value = get_path(cfg, path)
        _require(value > 0, f"{path} ({value}) must be > 0")


def _one_of(cfg: Config, path: str, allowed: tuple[str, ...]) -> None:
    value = get_path(cfg, path)
    _require(value in allowed, f"{path} ({value!r}) must be one of {', '.join(allowed)}")


def get_path(cfg: Any, path: str) -> Any:
    """Value at a dotted key path, e.g. get_path(cfg, 'moe.lbl.coeff')."""
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _validate_model(cfg: Config) -> None:
    m, moe = cfg.model, cfg.moe
    _positive(cfg, "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads")
    _positive(cfg, "model.head_dim", "model.ffn_hidden_size", "model.vocab_size", "model.rope_theta")
    _positive(cfg, "model.norm_eps", "model.init_std")
    _require(m.head_dim % 2 == 0, f"model.head_dim ({m.head_dim}) must be even for RoPE")
    _require(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_heads ({m.num_heads}) is not divisible by model.num_kv_heads ({m.num_kv_heads})",
    )
    _positive(cfg, "moe.num_experts", "moe.top_k", "moe.expert_ffn_hidden_size")
    _require(
        moe.top_k <= moe.num_experts,
        f"moe.top_k ({moe.top_k}) must be <= moe.num_experts ({moe.num_experts})",
    )
    _require(moe.num_shared_experts >= 0, f"moe.num_shared_experts ({moe.num_shared_experts}) must be >= 0")
    if moe.shared_expert_ffn_hidden_size is not None:
        _positive(cfg, "moe.shared_expert_ffn_hidden_size")
    _one_of(cfg, "model.qk_norm_scope", ("head", "full"))
    _one_of(cfg, "moe.score_func", ("softmax", "sigmoid"))
    _one_of(cfg, "moe.drop_policy", ("probs", "position"))
    _one_of(cfg, "moe.dispatch.backend", ("auto", "cuda", "cpu", "torch"))
    _one_of(cfg, "moe.dispatch.dtype", ("fp32", "bf16", "fp8"))
    if moe.capacity_factor is not None:
        _positive(cfg, "moe.capacity_factor")
    _require(
        0 <= moe.first_k_dense <= m.num_layers,
        f"moe.first_k_dense ({moe.first_k_dense}) must be in [0, model.num_layers ({m.num_layers})]",
    )
    _require(moe.lbl.coeff >= 0, f"moe.lbl.coeff ({moe.lbl.coeff}) must be >= 0")
    _one_of(cfg, "moe.lbl.scope", LBL_SCOPES)
    _one_of(cfg, "moe.lbl.global_mode", LBL_GLOBAL_MODES)
    _require(moe.bias_update_rate >= 0, f"moe.bias_update_rate ({moe.bias_update_rate}) must be >= 0")
    _require(moe.zloss_coeff >= 0, f"moe.zloss_coeff ({moe.zloss_coeff}) must be >= 0")


LBL_SCOPES: tuple[str, ...] = ("micro_batch", "sequence", "global")
LBL_GLOBAL_MODES: tuple[str, ...] = ("exact", "streaming", "running_mean")


def _validate_train(cfg: Config) -> None:
    t, o = cfg.train, cfg.optim
    _positive(cfg, "train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.seq_len")
    _require(t.seed >= 0, f"train.seed ({t.seed}) must be >= 0")
    _one_of(cfg, "train.precision", ("fp32", "bf16"))
    _require(t.eval_every >= 0, f"train.eval_every ({t.eval_every}) must be >= 0")
    _positive(cfg, "train.eval_batches", "train.log_every")
    _one_of(cfg, "train.recompute", ("none", "selective", "full"))
    _require(t.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens ({t.loss_chunk_tokens}) must be >= 0 (0 = off)")
    _positive(cfg, "optim.lr", "optim.eps")
    _require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio ({o.min_lr_ratio}) must be in [0, 1]")
    _require(o.weight_decay >= 0, f"optim.weight_decay ({o.weight_decay}) must be >= 0")
    for key in ("beta1", "beta2"):
        beta = getattr(o, key)
        _require(0 <= beta < 1, f"optim.{key} ({beta}) must be in [0, 1)")
    _require(o.grad_clip >= 0, f"optim.grad_clip ({o.grad_clip}) must be >= 0")
    _one_of(cfg, "optim.schedule", ("cosine", "wsd", "constant"))
    _require(o.warmup_steps >= 0, f"optim.warmup_steps ({o.warmup_steps}) must be >= 0")
    _require(0 < o.decay_fraction <= 1, f"optim.decay_fraction ({o.decay_fraction}) must be in (0, 1]")
    if o.decay_steps is not None:
        _positive(cfg, "optim.decay_steps")
    c = cfg.checkpoint
    _require(c.every >= 0, f"checkpoint.every ({c.every}) must be >= 0")
    _require(c.keep_last >= 1, f"checkpoint.keep_last ({c.keep_last}) must be >= 1")
    _one_of(cfg, "checkpoint.verify", ("sha256", "size"))
    _validate_fault_tolerance(cfg)
    _one_of(cfg, "log.level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    if cfg.log.peak_tflops is not None:
        _positive(cfg, "log.peak_tflops")
    _require(cfg.log.routing_every >= 0, f"log.routing_every ({cfg.log.routing_every}) must be >= 0")
    _one_of(cfg, "log.progress_bar", ("auto", "always", "never"))
    _require(bool(cfg.run.dir), "run.dir must not be empty")


def _validate_fault_tolerance(cfg: Config) -> None:
    a, w = cfg.train.anomaly, cfg.train.watchdog
    _one_of(cfg, "train.anomaly.on_nan", ("skip", "stop"))
    _one_of(cfg, "train.anomaly.on_spike", ("skip", "rollback", "stop"))
    _require(a.spike_zscore >= 0, f"train.anomaly.spike_zscore ({a.spike_zscore}) must be >= 0 (0 disables)")
    _positive(cfg, "train.anomaly.window", "train.watchdog.floor_s", "train.watchdog.checkpoint_s")
    _positive(cfg, "train.watchdog.poll_s", "train.watchdog.exit_code", "parallel.collective_timeout_s")
    _require(a.max_consecutive >= 0, f"train.anomaly.max_consecutive ({a.max_consecutive}) must be >= 0")
    _require(w.multiple >= 0, f"train.watchdog.multiple ({w.multiple}) must be >= 0 (0 disables)")
    _require(w.warmup_steps >= 1, f"train.watchdog.warmup_steps ({w.warmup_steps}) must be >= 1")
    _require(w.exit_code < 256, f"train.watchdog.exit_code ({w.exit_code}) must be in [1, 255]")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.domains is not None:
        _require(len(d.domains) > 0, "data.domains must not be an empty list (use null for all domains)")
        _require(len(set(d.domains)) == len(d.domains), f"data.domains ({d.domains}) has duplicates")
    if d.domain_weights is not None:
        _require(
            d.domains is not None and len(d.domain_weights) == len(d.domains),
            f"data.domain_weights ({d.domain_weights}) needs data.domains of the same length",
        )
        _require(
            all(w >= 0 for w in d.domain_weights) and sum(d.domain_weights) > 0,
            f"data.domain_weights ({d.domain_weights}) must be >= 0 with a positive sum",
        )


MIXTURE_POLICIES: tuple[str, ...] = ("static", "schedule", "doremi", "odm", "aioli")


def _validate_mixture(cfg: Config) -> None:
    m = cfg.data.mixture
    _one_of(cfg, "data.mixture.policy", MIXTURE_POLICIES)
    _one_of(cfg, "data.mixture.on_exhausted", ("error", "drop"))
    _positive(cfg, "data.mixture.update_every")
    _require(0 <= m.min_weight < 1, f"data.mixture.min_weight ({m.min_weight}) must be in [0, 1)")
    _require(m.max_epochs >= 0, f"data.mixture.max_epochs ({m.max_epochs}) must be >= 0")
    if m.policy == "schedule":
        _require(bool(m.schedule), "data.mixture.policy=schedule needs data.mixture.schedule rows [step, w_1, ...]")
    rows = m.schedule or []
    for i, row in enumerate(rows):
        where = f"data.mixture.schedule[{i}] ({row})"
        _require(len(row) >= 2 and row[0] >= 0, f"{where} must be [step >= 0, w_1, ..., w_D]")
        _require(all(w >= 0 for w in row[1:]) and sum(row[1:]) > 0, f"{where}: weights must be >= 0, sum > 0")
        _require(len(row) == len(rows[0]), f"{where} has {len(row)} entries, row 0 has {len(rows[0])}")
        _require(i == 0 or row[0] > rows[i - 1][0], f"{where}: steps must increase")
    if m.policy == "doremi":
        _require(m.doremi.reference is not None, "data.mixture.policy=doremi needs data.mixture.doremi.reference")
    _positive(cfg, "data.mixture.doremi.eta", "data.mixture.aioli.eta")
    _require(0 <= m.doremi.smoothing < 1, f"data.mixture.doremi.smoothing ({m.doremi.smoothing}) must be in [0, 1)")
    _require(0 <= m.odm.alpha < 1, f"data.mixture.odm.alpha ({m.odm.alpha}) must be in [0, 1)")
    _positive(cfg, "data.mixture.aioli.rounds", "data.mixture.aioli.probe_steps")
    _require(0 < m.aioli.one_hot <= 1, f"data.mixture.aioli.one_hot ({m.aioli.one_hot}) must be in (0, 1]")
    _require(0 <= m.aioli.ema < 1, f"data.mixture.aioli.ema ({m.aioli.ema}) must be in [0, 1)")
    if m.policy != "static" and cfg.data.mock:
        raise ConfigError(f"data.mixture.policy={m.policy} needs real domains; data.mock has one")


def _validate_parallel_single(cfg: Config) -> None:
    """Checks of the layout that do not need the world size (the rest: moe_train.parallel)."""
    p = cfg.parallel
    _positive(cfg, "parallel.tp", "parallel.pp", "parallel.vpp", "parallel.ep", "parallel.etp")
    _one_of(cfg, "parallel.pp_schedule", ("1f1b", "interleaved_1f1b"))
    _one_of(cfg, "parallel.backend", ("auto", "nccl", "gloo"))
    _require(
        not (cfg.model.qk_norm and cfg.model.qk_norm_scope == "full" and p.tp > 1),
        f"model.qk_norm_scope ('full') cannot be combined with parallel.tp ({p.tp}) > 1 (the norm spans every head)",
    )
    _require(
        cfg.moe.num_experts % p.ep == 0,
        f"moe.num_experts ({cfg.moe.num_experts}) is not divisible by parallel.ep ({p.ep})",
    )


def validate(cfg: Config) -> None:
    """Check values and cross-field constraints; raises ConfigError with one line naming the key."""
    _validate_model(cfg)
    _validate_train(cfg)
    _validate_data(cfg)
    _validate_mixture(cfg)
    _validate_parallel_single(cfg)
    _validate_engine(cfg)


def _validate_engine(cfg: Config) -> None:
    _one_of(cfg, "engine.name", ("native", "deepspeed"))
    if cfg.engine.name == "deepspeed":
        from moe_train.engine_config import check_deepspeed_config

        check_deepspeed_config(cfg)
    elif cfg.engine.deepspeed_config is not None:
        raise ConfigError("engine.deepspeed_config is set but engine.name is 'native'; set engine.name=deepspeed")


# ---------------------------------------------------------------------------------------------
# Documentation


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields (the string literal placed under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _reference_rows(cls: type, prefix: str, default: Any) -> list[str]:
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _reference_rows(hints[f.name], path + ".", value)
            continue
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{path}` | `{_type_name(hints[f.name])}` | `{shown}` | {docs.get(f.name, '')} |")
    return rows


def config_reference() -> str:
    """Markdown table of every config key, its type, default and docstring."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    default = Config()
    for f in dataclasses.fields(Config):
        section = typing.get_type_hints(Config)[f.name]
        lines += _reference_rows(section, f"{f.name}.", getattr(default, f.name))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(config_reference() + "\n")
