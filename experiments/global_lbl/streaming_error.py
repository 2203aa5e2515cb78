"""Gradient error of the cheap global-LBL modes against the exact one, on the demo model and corpus.

At chosen steps of a run trained with the exact global LBL, the same parameters and the same global
batch give the LBL's gradient under each mode: g = grad(total loss, lbl coeff 1) - grad(lm + z-loss
only), over every parameter. Reported per mode, relative to exact:

* `grad_err`: ||g_mode - g_exact|| / ||g_exact|| (the load-balancing gradient itself);
* `total_err`: the same difference at the run's coefficient (moe.lbl.coeff) relative to the norm of
  the whole step gradient, i.e. how far the optimizer's input moves;
* `lbl_err`: relative error of the reported LBL value.

Modes: 'streaming' (this step's counts so far + last step's for the rest), 'running_mean'
(Megatron-Core's global_aux_loss: this step's counts so far) and 'micro_batch' (each micro-batch's own
counts), all against 'exact'.

    python experiments/global_lbl/streaming_error.py --data data_cache/demo --micro 2 --at 1 2 3 4 5 96 97 98 99 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from moe_train.config import load_config
from moe_train.parallel.load_balance import moe_layers
from moe_train.train.step import forward_backward
from moe_train.train.trainer import Trainer

MODES = {"exact": ("global", "exact"), "streaming": ("global", "streaming"),
         "running_mean": ("global", "running_mean"), "micro_batch": ("micro_batch", "exact")}  # fmt: skip


def _grads(trainer: Trainer, batches: list, mode: str, coeff: float, last_f: dict[int, torch.Tensor]) -> tuple:
    """(flat gradient, reported lbl) of one forward/backward of the step under `mode` (no update)."""
    scope, global_mode = MODES[mode]
    layers = moe_layers(trainer.pmodel.chunks)
    for layer_id, layer in layers.items():
        layer.balance.scope, layer.balance.global_mode = scope, global_mode
        layer.balance.last_f_E = last_f.get(layer_id) if mode == "streaming" else None
        layer.lbl_coeff = coeff / len(layers)
    trainer.balancer.exact = mode == "exact"
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.balancer.begin_step(batches, trainer.device, trainer._autocast())
    stats = forward_backward(trainer.pmodel, batches, trainer.device, trainer._autocast(), 4)
    for layer in layers.values():
        layer.balance.recording = False
    grad = torch.cat([p.grad.flatten() for p in trainer.pmodel.parameters() if p.grad is not None])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grad, stats.lbl


def measure(trainer: Trainer, coeff: float, last_f: dict[int, torch.Tensor]) -> dict[str, dict[str, float]]:
    batches = trainer.micro_batches(trainer.state.consumed_samples)
    base, _ = _grads(trainer, batches, "exact", 0.0, last_f)
    exact, exact_lbl = _grads(trainer, batches, "exact", 1.0, last_f)
    g_exact = exact - base
    total = (base + coeff * g_exact).norm()
    out = {}
    for mode in ("streaming", "running_mean", "micro_batch"):
        g, lbl = _grads(trainer, batches, mode, 1.0, last_f)
        diff = (g - base) - g_exact
        out[mode] = {
            "grad_err": float(diff.norm() / g_exact.norm()),
            "total_err": float(coeff * diff.norm() / total),
            "lbl_err": abs(lbl - exact_lbl) / exact_lbl,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--data", default="data_cache/demo")
    parser.add_argument("--micro", type=int, default=2, help="micro-batch size (global batch 16)")
    parser.add_argument("--at", type=int, nargs="+", default=[1, 2, 3, 4, 5, 46, 47, 48, 49, 50])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"data.dir={args.data}", f"train.micro_batch_size={args.micro}", "moe.lbl.scope=global",
                 "train.eval_every=0", "checkpoint.every=0", "log.tensorboard=false", "log.level=WARNING",
                 f"train.max_steps={max(args.at)}", f"run.dir={tempfile.mkdtemp(prefix='lbl_err_')}", *args.overrides]  # fmt: skip
    trainer = Trainer(load_config(args.config or None, overrides))
    coeff = trainer.cfg.moe.lbl.coeff
    last_f: dict[int, torch.Tensor] = {}
    rows = []
    for step in range(1, max(args.at) + 1):
        if step in args.at:
            rows.append({"step": step, **measure(trainer, coeff, last_f)})
            print(json.dumps(rows[-1]), flush=True)
        for layer in moe_layers(trainer.pmodel.chunks).values():  # train the step with the exact mode
            layer.balance.scope, layer.balance.global_mode, layer.balance.last_f_E = "global", "exact", None
            layer.lbl_coeff = coeff / len(trainer.balancer.layers)
        trainer.balancer.exact = True
        result = trainer.train_step()
        trainer.state.step += 1
        trainer.state.consumed_samples += trainer.cfg.train.global_batch_size
        assert result.routing_counts_LDE is not None
        for i, layer_id in enumerate(trainer.balancer.layers):
            counts_E = result.routing_counts_LDE[i].sum(0).double()
            last_f[layer_id] = (counts_E / counts_E.sum()).float()
    summary = {
        mode: {key: sum(r[mode][key] for r in rows) / len(rows) for key in ("grad_err", "total_err", "lbl_err")}
        for mode in ("streaming", "running_mean", "micro_batch")
    }
    print(json.dumps({"mean": summary}))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
