"""Analyses of trained models and runs (expert specialisation, routing); used by the trainer's metrics
and by `moe-train inspect`. May import config, model, data, utils; `inspect` also reads checkpoints."""
