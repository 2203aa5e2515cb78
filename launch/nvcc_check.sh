#!/usr/bin/env bash
# Compile every CUDA source in csrc/ with nvcc for sm_80 and sm_90a (no GPU needed), then syntax-check the
# CUDA torch binding (csrc/cuda/*.cpp) against the installed torch's headers. Skipped, with the reason
# printed, when nvcc is not on PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc_check: SKIPPED, nvcc is not on PATH (the CUDA sources were not compiled)" >&2
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for cu in $(find csrc -name '*.cu' | sort); do
  for arch in sm_80 sm_90a; do
    if nvcc -std=c++17 -arch="$arch" -I csrc -c "$cu" -o "$out/$(basename "$cu").$arch.o"; then
      echo "nvcc_check: $cu ($arch) compiled"
    else
      echo "nvcc_check: $cu ($arch) FAILED" >&2
      status=1
    fi
  done
done
# The binding needs a CUDA build of torch to link; here only its syntax is checked. CPU torch wheels ship
# c10/cuda headers without the generated cuda_cmake_macros.h, which a stub replaces.
torch_inc=$(.venv/bin/python -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))" 2>/dev/null)
py_inc=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null)
cuda_top=$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
cuda_inc=$(readlink -f "${cuda_top:-/usr/local/cuda}/include")
if [[ -n $torch_inc && -d $cuda_inc ]]; then
  mkdir -p "$out/stub/c10/cuda/impl" && echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  inc=(-I csrc -I "$out/stub" -I "$cuda_inc" -I "$py_inc")
  for dir in $torch_inc; do inc+=(-I "$dir"); done
  for cpp in $(find csrc/cuda -name '*.cpp' | sort); do
    if g++ -std=c++17 -fsyntax-only -w "${inc[@]}" -DTORCH_EXTENSION_NAME=_C_cuda "$cpp"; then
      echo "nvcc_check: $cpp syntax ok (torch CUDA binding, not linked)"
    else
      echo "nvcc_check: $cpp FAILED the syntax check" >&2
      status=1
    fi
  done
else
  echo "nvcc_check: torch headers or CUDA includes not found; the CUDA binding was not syntax-checked" >&2
fi
exit $status
