"""Compatibility re-exports: checkpoint file helpers live in moe_train.parallel.checkpoint_files."""

from moe_train.parallel.checkpoint_files import (
    STEP_DIR,
    TMP_PREFIX,
    CheckpointError,
    TrainState,
    checkpoint_root,
    fsync_dir,
    list_checkpoints,
    load_file,
    prune,
    resolve_resume,
    rng_state,
    saved_config,
    set_rng_state,
    verify_checkpoint,
)

__all__ = [
    "STEP_DIR",
    "TMP_PREFIX",
    "CheckpointError",
    "TrainState",
    "checkpoint_root",
    "fsync_dir",
    "list_checkpoints",
    "load_file",
    "prune",
    "resolve_resume",
    "rng_state",
    "saved_config",
    "set_rng_state",
    "verify_checkpoint",
]
