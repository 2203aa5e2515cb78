"""`moe-train export --to hf` and `moe-train import --from hf` (arguments and dispatch)."""

from __future__ import annotations

import argparse

from moe_train.interop.hf_mapping import EXPERT_LAYOUTS, MOE_ARCHS


def add_interop_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers model")
    p.add_argument("--to", required=True, choices=["hf"], help="target format")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out_dir", help="new directory for config.json + safetensors (must not exist)")
    p.add_argument("--arch", choices=MOE_ARCHS, default=None, help="default: the one matching the config")
    p.add_argument(
        "--expert-layout",
        choices=EXPERT_LAYOUTS,
        default="per_expert",
        help="per_expert: published-checkpoint layout, loads in transformers 4.x and 5.x (default); "
        "fused: transformers 5.x's gate_up_proj / down_proj",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p = sub.add_parser("import", help="write a Hugging Face model as a checkpoint training can start from")
    p.add_argument("--from", dest="source", required=True, choices=["hf"], help="source format")
    p.add_argument("hf_dir", help="directory with config.json and *.safetensors (or pytorch_model*.bin)")
    p.add_argument("out_checkpoint", help="new checkpoint directory (train with checkpoint.resume=OUT_CHECKPOINT)")
    p.add_argument("--upcycle-experts", type=int, default=None, help="upcycle a dense Qwen3 / Llama into N experts")
    p.add_argument("--top-k", type=int, default=2, help="experts per token of an upcycled model (default 2)")
    p.add_argument("--seed", type=int, default=1234, help="seed of an upcycled model's new routers")


def run_interop(args: argparse.Namespace) -> int:
    from moe_train.interop.hf import export_hf, import_hf

    if args.command == "export":
        result = export_hf(args.checkpoint, args.out_dir, args.arch, args.expert_layout, args.dtype)
        print(result.describe())
        return 0
    upcycle = None if args.upcycle_experts is None else (args.upcycle_experts, args.top_k)
    cfg = import_hf(args.hf_dir, args.out_checkpoint, upcycle, args.seed)
    m, moe = cfg.model, cfg.moe
    print(
        f"wrote {args.out_checkpoint}: {m.num_layers} layers, hidden {m.hidden_size}, {moe.num_experts} experts "
        f"top-{moe.top_k}; train from it with: moe-train train --config {args.out_checkpoint}/config.yaml "
        f"checkpoint.resume={args.out_checkpoint} run.dir=runs/NAME"
    )
    return 0
