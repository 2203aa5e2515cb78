"""Hugging Face transformers <-> moe_train: which architecture matches a config, config.json both ways, and
the tensor names and layouts.

Architectures (decoder-only, RMSNorm, RoPE rotate-half, SwiGLU experts, softmax top-k router, dropless):

* ``qwen3_moe`` (Qwen3MoeForCausalLM): per-head qk-norm; dense first layers through ``mlp_only_layers``.
* ``mixtral`` (MixtralForCausalLM): no qk-norm, every layer MoE, top-k weights renormalised.
* ``olmoe`` (OlmoeForCausalLM): qk-norm over the full q / k projection, every layer MoE.
* ``qwen2_moe``: only as a tensor mapping for benchmarks (its shared expert has a sigmoid gate that
  moe_train does not have, so it is never exported).
* dense ``qwen3`` / ``llama``: import only, for upcycling (moe_train.interop.hf).

Expert tensors come in two layouts. ``per_expert`` is the layout of published checkpoints
(``mlp.experts.<e>.gate_proj.weight``, Mixtral ``block_sparse_moe.experts.<e>.w1.weight``): transformers
4.x loads it as is and 5.x converts it on load. ``fused`` is transformers 5.x's in-memory layout
(``mlp.experts.gate_up_proj`` E x 2F x H and ``mlp.experts.down_proj`` E x H x F), loadable by 5.x only.

Legend: E experts, H hidden, F expert ffn hidden.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_train.config import Config, from_dict

MOE_ARCHS = ("qwen3_moe", "mixtral", "olmoe")
DENSE_ARCHS = ("qwen3", "llama")
ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
EXPERT_LAYOUTS = ("per_expert", "fused")
_ATTN = (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
_MLP = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


class InteropError(ValueError):
    """A model or checkpoint that has no counterpart on the other side; one line naming the key."""


# -- which architecture ------------------------------------------------------------------------


def _refuse(key: str, value: Any, why: str) -> None:
    raise InteropError(f"{key} ({value}) has no Hugging Face equivalent: {why}")


def check_exportable(cfg: Config, arch: str) -> None:
    """Raise InteropError naming the first config key that `arch` cannot express."""
    m, moe = cfg.model, cfg.moe
    if arch not in MOE_ARCHS:
        raise InteropError(f"--arch ({arch}) must be one of {', '.join(MOE_ARCHS)}")
    if moe.num_shared_experts:
        _refuse("moe.num_shared_experts", moe.num_shared_experts, "Qwen3-MoE, Mixtral and OLMoE have no shared experts")
    if moe.score_func != "softmax":
        _refuse("moe.score_func", moe.score_func, "their routers use softmax")
    if moe.capacity_factor is not None:
        _refuse("moe.capacity_factor", moe.capacity_factor, "their MoE layers are dropless")
    want_norm = {"qwen3_moe": "head", "mixtral": None, "olmoe": "full"}[arch]
    have_norm = m.qk_norm_scope if m.qk_norm else None
    if have_norm != want_norm:
        key, value = (
            ("model.qk_norm_scope", have_norm) if have_norm and want_norm else ("model.qk_norm", str(m.qk_norm).lower())
        )
        need = {"head": "per-head qk-norm", "full": "full-width qk-norm", None: "no qk-norm"}[want_norm]
        _refuse(key, value, f"{ARCHITECTURES[arch]} has {need}")
    if arch != "qwen3_moe" and moe.first_k_dense:
        _refuse("moe.first_k_dense", moe.first_k_dense, f"every layer of {ARCHITECTURES[arch]} is MoE")
    if arch == "mixtral" and not moe.norm_topk_prob:
        _refuse("moe.norm_topk_prob", "false", "Mixtral always renormalises its top-k weights")
    if arch == "olmoe" and m.num_heads * m.head_dim != m.hidden_size:
        _refuse("model.head_dim", m.head_dim, "OLMoE needs num_heads * head_dim == hidden_size")


def pick_arch(cfg: Config) -> str:
    """The architecture matching the config: qk-norm per head -> Qwen3-MoE, full -> OLMoE, none -> Mixtral."""
    arch = {None: "mixtral", "head": "qwen3_moe", "full": "olmoe"}[
        cfg.model.qk_norm_scope if cfg.model.qk_norm else None
    ]
    check_exportable(cfg, arch)
    return arch


# -- config.json --------------------------------------------------------------------------------


def hf_config(cfg: Config, arch: str, dtype: str = "float32") -> dict[str, Any]:
    """config.json of `arch` for this model (readable by transformers 4.x and 5.x)."""
    m, moe = cfg.model, cfg.moe
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "max_position_embeddings": max(cfg.train.seq_len, 4096),
        "initializer_range": m.init_std,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.lbl.coeff,
        "output_router_logits": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if arch == "mixtral":
        out |= {"intermediate_size": moe.expert_ffn_hidden_size, "num_local_experts": moe.num_experts}
        out |= {"sliding_window": None, "router_jitter_noise": 0.0}
        return out
    out |= {"num_experts": moe.num_experts, "norm_topk_prob": moe.norm_topk_prob}
    if arch == "olmoe":
        return out | {"intermediate_size": moe.expert_ffn_hidden_size, "clip_qkv": None}
    return out | {
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": moe.expert_ffn_hidden_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(moe.first_k_dense)),
        "use_sliding_window": False,
        "sliding_window": None,
    }


def _get(hf: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` present (transformers versions name some fields differently)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise InteropError(f"config.json has no '{keys[0]}' (needed for a {hf.get('model_type')} model)")


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise InteropError(f"config.json rope type ({rope_type}) has no moe_train equivalent (plain RoPE only)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_hf_supported(hf: dict[str, Any]) -> None:
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("qkv_bias", False)):
        if hf.get(key, ok) != ok:
            raise InteropError(f"config.json {key} ({hf[key]}) has no moe_train equivalent (bias-free layers)")
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"config.json hidden_act ({hf['hidden_act']}) has no moe_train equivalent (SwiGLU)")
    if hf.get("use_sliding_window") or (hf.get("model_type") == "mixtral" and hf.get("sliding_window")):
        raise InteropError("config.json sliding_window attention has no moe_train equivalent (full causal attention)")


def config_from_hf(hf: dict[str, Any], upcycle: tuple[int, int] | None = None) -> Config:
    """moe_train Config of an HF config.json; `upcycle=(num_experts, top_k)` for a dense qwen3 / llama."""
    arch = hf.get("model_type")
    known = (*MOE_ARCHS, *DENSE_ARCHS)
    if arch not in known:
        raise InteropError(f"config.json model_type ({arch!r}) is not supported; expected one of {', '.join(known)}")
    if arch in DENSE_ARCHS and upcycle is None:
        raise InteropError(
            f"config.json model_type ({arch!r}) is a dense model: pass --upcycle-experts N to upcycle it"
        )
    if arch in MOE_ARCHS and upcycle is not None:
        raise InteropError(
            f"config.json model_type ({arch!r}) is already an MoE; --upcycle-experts is for dense models"
        )
    _check_hf_supported(hf)
    hidden, heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    model = {
        "hidden_size": hidden,
        "num_layers": int(_get(hf, "num_hidden_layers")),
        "num_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or hidden // heads),
        "vocab_size": int(_get(hf, "vocab_size")),
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "qk_norm": arch in ("qwen3_moe", "olmoe", "qwen3"),
        "qk_norm_scope": "full" if arch == "olmoe" else "head",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "ffn_hidden_size": int(_get(hf, "intermediate_size")),
    }
    return from_dict({"model": model, "moe": _moe_from_hf(hf, arch, upcycle)})


def _moe_from_hf(hf: dict[str, Any], arch: str, upcycle: tuple[int, int] | None) -> dict[str, Any]:
    if upcycle is not None:
        experts, top_k = upcycle
        return {"num_experts": experts, "top_k": top_k, "expert_ffn_hidden_size": int(hf["intermediate_size"])}
    lbl = {"coeff": float(hf.get("router_aux_loss_coef", 0.01))}
    num_experts = int(_get(hf, "num_experts", "num_local_experts"))
    if arch == "mixtral":
        return {
            "num_experts": num_experts,
            "top_k": int(_get(hf, "num_experts_per_tok")),
            "expert_ffn_hidden_size": int(_get(hf, "intermediate_size")),
            "lbl": lbl,
        }
    out = {
        "num_experts": num_experts,
        "top_k": int(_get(hf, "num_experts_per_tok")),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", arch == "qwen3_moe")),
        "lbl": lbl,
    }
    if arch == "olmoe":
        return out | {"expert_ffn_hidden_size": int(_get(hf, "intermediate_size"))}
    sparse = _qwen3_moe_layers(hf)
    dense = [i for i, is_moe in enumerate(sparse) if not is_moe]
    if dense != list(range(len(dense))):
        raise InteropError(f"config.json dense layers {dense} are not the first ones (moe.first_k_dense)")
    return out | {"expert_ffn_hidden_size": int(_get(hf, "moe_intermediate_size")), "first_k_dense": len(dense)}


def _qwen3_moe_layers(hf: dict[str, Any]) -> list[bool]:
    """Whether each layer of a Qwen3-MoE config is sparse (transformers' own rule)."""
    step, only = int(hf.get("decoder_sparse_step", 1)), set(hf.get("mlp_only_layers") or [])
    return [i not in only and step > 0 and (i + 1) % step == 0 for i in range(int(hf["num_hidden_layers"]))]


# -- tensor names -------------------------------------------------------------------------------


def _moe_prefix(arch: str) -> str:
    return "block_sparse_moe" if arch == "mixtral" else "mlp"


def _expert_names(arch: str) -> tuple[str, str, str]:
    """HF names of an expert's gate, up and down projections."""
    return ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def _block_map(arch: str, i: int, moe_layer: bool, qk_norm: bool) -> list[tuple[str, str]]:
    """(our canonical name, HF name) of the non-expert tensors of block i (all Linear weights: same layout)."""
    p, q = f"layers.{i}.", f"model.layers.{i}."
    out = [(f"{p}attention_norm.weight", f"{q}input_layernorm.weight")]
    out.append((f"{p}ffn_norm.weight", f"{q}post_attention_layernorm.weight"))
    out += [(f"{p}attention.{ours}.weight", f"{q}self_attn.{hf}.weight") for ours, hf in _ATTN]
    if qk_norm:
        out += [(f"{p}attention.{n}.weight", f"{q}self_attn.{n}.weight") for n in ("q_norm", "k_norm")]
    if moe_layer:
        out.append((f"{p}moe.router.gate.weight", f"{q}{_moe_prefix(arch)}.gate.weight"))
        if arch == "qwen2_moe":
            out += [(f"{p}moe.shared_experts.{o}.weight", f"{q}mlp.shared_expert.{h}.weight") for o, h in _MLP]
    else:
        out += [(f"{p}feed_forward.{ours}.weight", f"{q}mlp.{hf}.weight") for ours, hf in _MLP]
    return out


def to_hf_tensors(ours: dict[str, torch.Tensor], cfg: Config, arch: str, layout: str) -> dict[str, torch.Tensor]:
    """Our canonical tensors (single-device names) -> HF state dict of `arch` in `layout` (contiguous copies)."""
    if layout not in EXPERT_LAYOUTS:
        raise InteropError(f"expert layout ({layout}) must be one of {', '.join(EXPERT_LAYOUTS)}")
    out = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "model.norm.weight": ours["norm.weight"]}
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = ours["output.weight"]
    for i in range(cfg.model.num_layers):
        moe_layer = i >= cfg.moe.first_k_dense
        for our_name, hf_name in _block_map(arch, i, moe_layer, cfg.model.qk_norm):
            out[hf_name] = ours[our_name]
        if moe_layer:
            out.update(_experts_to_hf(ours, arch, i, layout))
    return {name: tensor.detach().contiguous().clone() for name, tensor in out.items()}


def _experts_to_hf(ours: dict[str, torch.Tensor], arch: str, i: int, layout: str) -> dict[str, torch.Tensor]:
    p = f"layers.{i}.moe.experts."
    w1_EHF, w3_EHF, w2_EFH = ours[f"{p}w1_EHF"], ours[f"{p}w3_EHF"], ours[f"{p}w2_EFH"]
    q = f"model.layers.{i}.{_moe_prefix(arch)}.experts."
    if layout == "fused":
        q = f"model.layers.{i}.mlp.experts."  # transformers 5 names Mixtral's block 'mlp' too
        return {
            f"{q}gate_up_proj": torch.cat([w1_EHF, w3_EHF], dim=2).transpose(1, 2),
            f"{q}down_proj": w2_EFH.transpose(1, 2),
        }
    gate, up, down = _expert_names(arch)
    out = {}
    for e in range(w1_EHF.shape[0]):
        out[f"{q}{e}.{gate}.weight"] = w1_EHF[e].t()
        out[f"{q}{e}.{up}.weight"] = w3_EHF[e].t()
        out[f"{q}{e}.{down}.weight"] = w2_EFH[e].t()
    return out


def from_hf_tensors(hf: dict[str, torch.Tensor], cfg: Config, arch: str) -> dict[str, torch.Tensor]:
    """HF state dict (either expert layout) -> our canonical tensors for `cfg` (fp32)."""
    take = _Taker(hf)
    ours = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not cfg.model.tie_embeddings:
        ours["output.weight"] = take("lm_head.weight")
    for i in range(cfg.model.num_layers):
        moe_layer = i >= cfg.moe.first_k_dense
        for our_name, hf_name in _block_map(arch, i, moe_layer, cfg.model.qk_norm):
            ours[our_name] = take(hf_name)
        if moe_layer:
            ours.update(_experts_from_hf(take, arch, i, cfg.moe.num_experts))
    return {name: tensor.float().contiguous() for name, tensor in ours.items()}


class _Taker:
    """Reads tensors by name, with a one-line error naming a missing one."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise InteropError(f"the Hugging Face checkpoint has no tensor '{name}'")
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors


def _experts_from_hf(take: _Taker, arch: str, i: int, num_experts: int) -> dict[str, torch.Tensor]:
    p = f"layers.{i}.moe.experts."
    fused = f"model.layers.{i}.mlp.experts."
    if take.has(f"{fused}gate_up_proj"):
        gate_up_E2FH, down_EHF = take(f"{fused}gate_up_proj"), take(f"{fused}down_proj")
        w1_EFH, w3_EFH = gate_up_E2FH.chunk(2, dim=1)
        return {
            f"{p}w1_EHF": w1_EFH.transpose(1, 2),
            f"{p}w3_EHF": w3_EFH.transpose(1, 2),
            f"{p}w2_EFH": down_EHF.transpose(1, 2),
        }
    q = f"model.layers.{i}.{_moe_prefix(arch)}.experts."
    gate, up, down = _expert_names(arch)
    return {
        f"{p}w1_EHF": torch.stack([take(f"{q}{e}.{gate}.weight").t() for e in range(num_experts)]),
        f"{p}w3_EHF": torch.stack([take(f"{q}{e}.{up}.weight").t() for e in range(num_experts)]),
        f"{p}w2_EFH": torch.stack([take(f"{q}{e}.{down}.weight").t() for e in range(num_experts)]),
    }


def upcycle_tensors(dense: dict[str, torch.Tensor], cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """Sparse upcycling (arXiv 2212.05055): each MoE layer's experts are copies of the dense MLP of that
    layer; routers start at normal(0, model.init_std) from `seed`. With top-k weights renormalised
    (moe.norm_topk_prob) the first forward equals the dense model's."""
    take = _Taker(dense)
    ours = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not cfg.model.tie_embeddings:
        ours["output.weight"] = take("lm_head.weight")
    generator = torch.Generator().manual_seed(seed)
    E, H = cfg.moe.num_experts, cfg.model.hidden_size
    for i in range(cfg.model.num_layers):
        block = _block_map("qwen3_moe", i, True, cfg.model.qk_norm)
        for our_name, hf_name in block[:-1]:  # everything but the router (the last entry), which is new
            ours[our_name] = take(hf_name)
        q, p = f"model.layers.{i}.mlp.", f"layers.{i}.moe."
        gate_FH, up_FH, down_HF = (take(f"{q}{n}.weight") for n in ("gate_proj", "up_proj", "down_proj"))
        ours[f"{p}experts.w1_EHF"] = gate_FH.t().unsqueeze(0).repeat(E, 1, 1)
        ours[f"{p}experts.w3_EHF"] = up_FH.t().unsqueeze(0).repeat(E, 1, 1)
        ours[f"{p}experts.w2_EFH"] = down_HF.t().unsqueeze(0).repeat(E, 1, 1)
        ours[f"{p}router.gate.weight"] = torch.randn(E, H, generator=generator) * cfg.model.init_std
    return {name: tensor.float().contiguous() for name, tensor in ours.items()}
