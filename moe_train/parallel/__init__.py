"""Parallelism layer: rank layout (MoE Parallel Folding), explicit process groups, launch, dry run."""

from moe_train.parallel.groups import ProcessGroups, build_process_groups, groups_from_layout
from moe_train.parallel.launch import destroy_distributed, init_distributed, read_launch_env, resolve_backend
from moe_train.parallel.layout import GROUP_KINDS, Layout, RankCoords, dry_run_report, rank_layout, validate_layout
from moe_train.parallel.params import component_parameters, rank_parameters, total_parameters

__all__ = [
    "GROUP_KINDS",
    "Layout",
    "ProcessGroups",
    "RankCoords",
    "build_process_groups",
    "component_parameters",
    "destroy_distributed",
    "dry_run_report",
    "groups_from_layout",
    "init_distributed",
    "rank_layout",
    "rank_parameters",
    "read_launch_env",
    "resolve_backend",
    "total_parameters",
    "validate_layout",
]
