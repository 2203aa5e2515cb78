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
    """Over which tokens f_i and p_i are counted: 'micro_batch' (the tokens of one forward on one rank)."""


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
    dispatch: MoEDispatchConfig = field(default_factory=MoEDispatchConfig)
    """Token dispatch kernels and wire dtype."""


@dataclass
class ParallelConfig:
    """Parallel layout; data parallel size is derived as world / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel size (attention, dense MLP, embeddings); sequence parallel is on when tp > 1."""
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
    """For 'wsd': fraction of train.max_steps spent in the final linear decay."""
    fused: bool = True
    """Use a fused AdamW kernel where one is available (apex FusedAdam or torch fused on CUDA)."""


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
    eval_batches: int = 4
    """Micro-batches per domain in one validation."""
    log_every: int = 10
    """Print a console line every this many steps."""


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


@dataclass
class LogConfig:
    """Logging outputs."""

    tensorboard: bool = True
    """Write TensorBoard event files to <run.dir>/tb."""
    level: str = "INFO"
    """Python logging level."""
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
        raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


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
    _require(moe.zloss_coeff >= 0, f"moe.zloss_coeff ({moe.zloss_coeff}) must be >= 0")


LBL_SCOPES: tuple[str, ...] = ("micro_batch",)


def _validate_train(cfg: Config) -> None:
    t, o = cfg.train, cfg.optim
    _positive(cfg, "train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.seq_len")
    _require(t.seed >= 0, f"train.seed ({t.seed}) must be >= 0")
    _one_of(cfg, "train.precision", ("fp32", "bf16"))
    _require(t.eval_every >= 0, f"train.eval_every ({t.eval_every}) must be >= 0")
    _positive(cfg, "train.eval_batches", "train.log_every")
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
    c = cfg.checkpoint
    _require(c.every >= 0, f"checkpoint.every ({c.every}) must be >= 0")
    _require(c.keep_last >= 1, f"checkpoint.keep_last ({c.keep_last}) must be >= 1")
    _one_of(cfg, "log.level", ("DEBUG", "INFO", "WARNING", "ERROR"))
    _one_of(cfg, "log.progress_bar", ("auto", "always", "never"))
    _require(bool(cfg.run.dir), "run.dir must not be empty")


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
