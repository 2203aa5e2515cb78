// Per-row copy of the token permute, shared by the CPU and CUDA paths.
#pragma once
#include <cstdint>

#include "common/numerics.h"

namespace moe_train {

// Copy row `src_row` of a row-major [rows, hidden] matrix into row `dst_row` of another.
template <typename T>
MOE_HD inline void copy_row(const T* src, T* dst, int64_t src_row, int64_t dst_row, int64_t hidden) {
  const T* s = src + src_row * hidden;
  T* d = dst + dst_row * hidden;
  for (int64_t h = 0; h < hidden; ++h) d[h] = s[h];
}

}  // namespace moe_train
