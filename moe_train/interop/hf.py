"""Hugging Face transformers checkpoints: `moe-train export --to hf` and `moe-train import --from hf`.

Export writes a directory transformers loads with `AutoModelForCausalLM.from_pretrained`: config.json,
model.safetensors (sharded with an index above `max_shard_bytes`) and the run's tokenizer.json when it
can be found. Import reads config.json plus safetensors (or pytorch_model.bin) files and writes a
moe_train checkpoint (the layout-independent format of moe_train.parallel.dist_checkpoint) with a
config.yaml beside it, which training starts from with `checkpoint.resume=OUT_CHECKPOINT`. A dense
Qwen3 / Llama checkpoint can be upcycled into an MoE on the way in (moe_train.interop.hf_mapping).
Both write into a temporary directory renamed into place: nothing is overwritten, nothing is left
half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_train.config import Config, save_config, to_dict
from moe_train.interop.checkpoint_io import checkpoint_config, load_weights, resolve_checkpoint
from moe_train.interop.hf_mapping import (
    InteropError,
    check_exportable,
    config_from_hf,
    from_hf_tensors,
    hf_config,
    pick_arch,
    to_hf_tensors,
    upcycle_tensors,
)
from moe_train.model import build_model
from moe_train.parallel.dist_checkpoint import load_canonical_tensors, save_distributed_checkpoint
from moe_train.parallel.groups import ProcessGroups
from moe_train.train.checkpoint import TrainState, load_file
from moe_train.utils.logging import get_logger

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    """What `export_hf` wrote."""

    out_dir: Path
    arch: str
    expert_layout: str
    files: list[str]
    tokenizer: bool

    def describe(self) -> str:
        loads = "transformers 4.x and 5.x" if self.expert_layout == "per_expert" else "transformers 5.x"
        tok = ", tokenizer.json" if self.tokenizer else " (no tokenizer.json found)"
        return (
            f"wrote {self.arch} to {self.out_dir}: {len(self.files)} safetensors file(s), config.json{tok}; "
            f"experts in the {self.expert_layout} layout (loadable by {loads})"
        )


def _fresh_output(out: Path) -> Path:
    """A temporary sibling of `out`; `out` itself must not exist yet (nothing is overwritten)."""
    if out.exists():
        raise InteropError(f"{out} already exists; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))


def _save_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def _find_tokenizer(cfg: Config) -> Path | None:
    candidates = [cfg.data.tokenizer] if cfg.data.tokenizer else []
    candidates.append(str(Path(cfg.data.dir) / "tokenizer.json"))
    return next((Path(c) for c in candidates if Path(c).is_file()), None)


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    arch: str | None = None,
    expert_layout: str = "per_expert",
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30,
) -> ExportResult:
    """Write a checkpoint (or a run's newest) as a transformers model of `arch` (default: the one that
    matches the config); refuses configs with no HF equivalent, naming the key."""
    source = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(source)
    if arch is None:
        arch = pick_arch(cfg)
    check_exportable(cfg, arch)
    if dtype not in DTYPES:
        raise InteropError(f"--dtype ({dtype}) must be one of {', '.join(DTYPES)}")
    tensors = to_hf_tensors(load_canonical_tensors(source), cfg, arch, expert_layout)
    tensors = {name: t.to(DTYPES[dtype]) for name, t in tensors.items()}
    out = Path(out_dir)
    tmp = _fresh_output(out)
    try:
        files = _save_safetensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, arch, dtype), indent=2) + "\n")
        tokenizer = _find_tokenizer(cfg)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = ExportResult(out, arch, expert_layout, files, tokenizer is not None)
    log.info(result.describe())
    return result


# -- import --------------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise InteropError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise InteropError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path} must hold a JSON object")
    return data


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors / its shards (via the index), or of pytorch_model.bin files."""
    from safetensors.torch import load_file as load_safetensors

    files = sorted(hf_dir.glob("*.safetensors"))
    loader: Callable[[Path], dict[str, torch.Tensor]] = load_safetensors
    if not files:
        files = sorted(hf_dir.glob("pytorch_model*.bin"))
        loader = load_file  # torch.load with weights_only
    if not files:
        raise InteropError(f"{hf_dir} has no *.safetensors or pytorch_model*.bin weights")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(loader(path))
    return tensors


def import_hf(
    hf_dir: str | Path, out_checkpoint: str | Path, upcycle: tuple[int, int] | None = None, seed: int = 1234
) -> Config:
    """Write the HF model in `hf_dir` as a moe_train checkpoint at `out_checkpoint` (with config.yaml);
    `upcycle=(num_experts, top_k)` turns a dense Qwen3 / Llama into an MoE. Returns the model's config."""
    src = Path(hf_dir)
    hf_cfg = read_hf_config(src)
    cfg = config_from_hf(hf_cfg, upcycle)
    hf = read_hf_tensors(src)
    arch = hf_cfg["model_type"]
    tensors = upcycle_tensors(hf, cfg, seed) if upcycle is not None else from_hf_tensors(hf, cfg, arch)
    model = build_model(cfg, initialise=False)  # load_weights fills every tensor (or refuses)
    load_weights(model, tensors, src)
    out = Path(out_checkpoint)
    tmp = _fresh_output(out)
    try:
        state = TrainState(step=0, consumed_samples=0)
        saved = save_distributed_checkpoint(tmp, state, model, None, ProcessGroups.single(), to_dict(cfg), 1)
        save_config(cfg, saved / "config.yaml")
        saved.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("imported %s from %s into %s%s", arch, src, out, " (upcycled)" if upcycle else "")
    return cfg
