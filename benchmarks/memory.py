"""Activation memory of one training micro-batch under train.recompute and train.loss_chunk_tokens.

For each (shape, recompute, chunk) the script starts a fresh Python process that builds the model
(fp32, CPU), runs one forward + backward of one micro-batch and reports two numbers:

* **saved**: bytes of the tensors autograd keeps for backward at the end of the forward
  (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once; exact and noise-free).
  This is the activation memory that recompute trades for compute; it excludes the head's logits
  when they are freed before backward (they are not: the log-softmax keeps them).
* **peak RSS delta**: the process's resident-set high-water mark (`ru_maxrss`) after the forward +
  backward minus the one before it, minus the gradients' bytes (allocated in backward, the same for
  every mode). It includes the transient buffers (the [B, S, V] logits, their softmax and gradient,
  attention scores) that `saved` does not see. glibc returns large blocks to the OS on free, so the
  high-water mark tracks the true peak of live tensors to within allocator slack (~1 MiB).

    .venv/bin/python benchmarks/memory.py                       # demo shape + 32k vocab, all modes
    .venv/bin/python benchmarks/memory.py --shapes tiny_cpu --chunks 0,1024

Legend: B micro-batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"
SHAPES = {"tiny_cpu": [], "vocab32k": ["model.vocab_size=32768"]}
MIB = 2**20


def measure(overrides: list[str]) -> dict[str, float]:
    """One forward + backward of one micro-batch in this process -> {'saved_mib', 'peak_delta_mib'}."""
    import torch

    from moe_train.config import load_config
    from moe_train.model import build_model
    from moe_train.model.transformer import set_loss_chunking, set_recompute

    torch.set_num_threads(1)
    cfg = load_config(str(DEMO_CONFIG), ["data.mock=true", *overrides])
    model = build_model(cfg)
    set_recompute(model, cfg.train.recompute)
    set_loss_chunking(model, cfg.train.loss_chunk_tokens)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.train.seq_len)
    tokens_BS = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    labels_BS = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved += storage.nbytes()
        return t

    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens_BS, labels_BS)
    assert out.token_loss_BS is not None
    out.token_loss_BS.mean().backward()
    after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"saved_mib": saved / MIB, "peak_delta_mib": ((after_kib - before_kib) * 1024 - grad_bytes) / MIB}


def run_isolated(overrides: list[str]) -> dict[str, float]:
    """`measure` in a fresh interpreter, so each high-water mark is its own."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import memory; "
    code += f"print(json.dumps(memory.measure({overrides!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--modes", default="none,selective,full", help="train.recompute values")
    parser.add_argument("--chunks", default="0,1024", help="train.loss_chunk_tokens values (0 = off)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    print("| shape | recompute | loss_chunk_tokens | saved for backward (MiB) | peak RSS delta (MiB) |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            for chunk in args.chunks.split(","):
                overrides = [*SHAPES[shape], f"train.recompute={mode}", f"train.loss_chunk_tokens={chunk}"]
                r = run_isolated(overrides)
                rows.append({"shape": shape, "recompute": mode, "loss_chunk_tokens": int(chunk), **r})
                print(f"| {shape} | {mode} | {chunk} | {r['saved_mib']:.1f} | {r['peak_delta_mib']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
