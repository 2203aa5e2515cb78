#!/usr/bin/env bash
# Launch `moe-train train` with the deepspeed launcher and a hostfile.
#
#   launch/deepspeed.sh --hostfile hostfile [launcher options] -- --config my.yaml \
#       engine.name=deepspeed engine.deepspeed_config=ds.json [section.key=value ...]
#
# The hostfile has one line per node, `HOST slots=N` (N processes there, usually its GPUs); `#` starts
# a comment. One host: a local launch (no ssh). Several: DeepSpeed's default multi-node launcher (pdsh
# over passwordless ssh) starts every node. Each process gets RANK / WORLD_SIZE / LOCAL_RANK /
# MASTER_ADDR / MASTER_PORT and --local_rank, which moe-train reads. The launcher and the engine are
# independent: engine.name=deepspeed (ZeRO 1/2 from a ds_config) or the native engine both work.
#
# Launcher options (environment variable in brackets):
#   --hostfile FILE       the hostfile [HOSTFILE]; required
#   --master-addr ADDR    rendezvous address [MASTER_ADDR; default: the first host, 127.0.0.1 for localhost]
#   --master-port PORT    rendezvous port [MASTER_PORT; default 29500]
#   --dry-run             print the deepspeed command and the layout report for the hostfile's slots; exit
#   -h, --help            this text
#
# Before launching, the hostfile is checked and the layout validated for its total slots: a problem
# is one line on stderr and exit status 2, before any process starts.
set -euo pipefail

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }
die() { echo "deepspeed.sh: $*" >&2; exit 2; }

hostfile=${HOSTFILE:-}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
dry_run=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --hostfile) hostfile=${2:?--hostfile needs a value}; shift 2 ;;
    --master-addr) master_addr=${2:?--master-addr needs a value}; shift 2 ;;
    --master-port) master_port=${2:?--master-port needs a value}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (moe-train arguments go after --; see --help)" ;;
  esac
done
[[ -n $hostfile ]] || die "--hostfile FILE is required (lines 'HOST slots=N')"
[[ -f $hostfile ]] || die "hostfile $hostfile does not exist"

hosts=()
world=0
lineno=0
while IFS= read -r line || [[ -n $line ]]; do
  lineno=$((lineno + 1))
  line=${line%%#*}
  [[ $line =~ ^[[:space:]]*$ ]] && continue
  [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]] ||
    die "hostfile $hostfile line $lineno ('$line') must look like 'HOST slots=N'"
  hosts+=("${BASH_REMATCH[1]}")
  world=$((world + BASH_REMATCH[2]))
done < "$hostfile"
[[ ${#hosts[@]} -gt 0 ]] || die "hostfile $hostfile lists no host"

if [[ -z $master_addr ]]; then
  master_addr=${hosts[0]}
  [[ $master_addr == localhost ]] && master_addr=127.0.0.1
fi
cmd=(deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port")
[[ ${#hosts[@]} -eq 1 ]] && cmd+=(--no_ssh_check)  # one host: local launch, nothing to ssh into
cmd+=(--module moe_train.cli train "$@")

if [[ $dry_run -eq 1 ]]; then
  echo "${cmd[*]}"
  exec moe-train train --dry-run --world-size "$world" "$@"
fi
moe-train train --dry-run --world-size "$world" "$@" >/dev/null || exit 2
exec "${cmd[@]}"
