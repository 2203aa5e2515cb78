#!/usr/bin/env bash
# Launch `moe-train train` with torchrun on one node, or on several with a c10d rendezvous.
#
#   launch/torchrun.sh [launcher options] -- --config my.yaml [section.key=value ...]
#
# Everything after `--` goes to `moe-train train` unchanged. Run the same line on every node of a
# multi-node job; torchrun assigns the node ranks at the rendezvous.
#
# Launcher options (environment variable in brackets):
#   --nproc-per-node N    processes per node [NPROC_PER_NODE; default: the GPUs of this node, else 1]
#   --nnodes N            nodes [NNODES; default 1]; with N > 1 also:
#   --rdzv-endpoint H:P   rendezvous address, e.g. the first node and a free port [RDZV_ENDPOINT]
#   --rdzv-id ID          identifier shared by the nodes of one job [RDZV_ID; default moe-train]
#   --dry-run             print the torchrun command and the layout report for nnodes x nproc ranks; exit
#   -h, --help            this text
#
# Before launching, the layout is validated for nnodes x nproc ranks (`moe-train train --dry-run`): a
# layout that does not fit is one line on stderr and exit status 2, before any process starts.
set -euo pipefail

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }
die() { echo "torchrun.sh: $*" >&2; exit 2; }

gpus_here() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1; else echo 1; fi
}

nproc=${NPROC_PER_NODE:-}
nnodes=${NNODES:-1}
endpoint=${RDZV_ENDPOINT:-}
rdzv_id=${RDZV_ID:-moe-train}
dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --nproc-per-node) nproc=${2:?--nproc-per-node needs a value}; shift 2 ;;
    --nnodes) nnodes=${2:?--nnodes needs a value}; shift 2 ;;
    --rdzv-endpoint) endpoint=${2:?--rdzv-endpoint needs a value}; shift 2 ;;
    --rdzv-id) rdzv_id=${2:?--rdzv-id needs a value}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (moe-train arguments go after --; see --help)" ;;
  esac
done
nproc=${nproc:-$(gpus_here)}
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node ($nproc) must be a positive integer"
[[ $nnodes =~ ^[1-9][0-9]*$ ]] || die "--nnodes ($nnodes) must be a positive integer"

cmd=(torchrun --nproc-per-node "$nproc")
if [[ $nnodes -eq 1 ]]; then
  cmd+=(--standalone)
else
  [[ -n $endpoint ]] || die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (the first node)"
  cmd+=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id")
fi
cmd+=(-m moe_train.cli train "$@")

world=$((nnodes * nproc))
if [[ $dry_run -eq 1 ]]; then
  echo "${cmd[*]}"
  exec moe-train train --dry-run --world-size "$world" "$@"
fi
moe-train train --dry-run --world-size "$world" "$@" >/dev/null || exit 2
exec "${cmd[@]}"
