// Row-map indexing of the token permute, shared by the CPU and CUDA kernels.
//
// Legend: T tokens, K choices per token, E experts, A = T*K assignments (flattened in (t, k) order),
// R dispatched rows, C chunks of kChunk assignments.
//
// A routing topk_idx_TK holds expert ids in [0, E), or -1 for an assignment that capacity dropping
// removed. The permute puts the kept assignments into rows grouped by expert (expert 0 first) and,
// within an expert, in assignment order: a stable counting sort, the order of Megatron-Core's
// moe_utils.permute for the equivalent routing map. row_map_TK[t, k] is the row of assignment (t, k)
// (-1 when dropped):
//     row = offset[e] + (assignments to e in chunks before this one) + (earlier ones in this chunk).
// Both backends compute it in four phases over fixed chunks: per-chunk histograms hist[e][c],
// per-expert exclusive scans over chunks, an exclusive scan over experts (the offsets), and the
// final ranks. The unpermute sums a token's rows in ascending row order (next_row), the order in
// which Megatron-Core's scatter_add visits them, so fp32 results agree bit for bit.
#pragma once
#include <cstdint>

#include "common/numerics.h"

namespace moe_train {

constexpr int64_t kChunk = 256;  // assignments per histogram chunk

MOE_HD inline int64_t num_chunks(int64_t assignments) { return (assignments + kChunk - 1) / kChunk; }

// 0: kept (an expert id), 1: dropped (-1), 2: invalid.
MOE_HD inline int expert_status(int64_t e, int64_t num_experts) {
  if (e >= 0 && e < num_experts) return 0;
  return e == -1 ? 1 : 2;
}

// Index of expert e, chunk c in the [E, C] histogram / scanned-base array.
MOE_HD inline int64_t hist_index(int64_t e, int64_t c, int64_t chunks) { return e * chunks + c; }

// The row of an assignment: expert offset + scanned chunk base + rank within the chunk.
MOE_HD inline int64_t row_of(int64_t expert_offset, int64_t chunk_base, int64_t rank_in_chunk) {
  return expert_offset + chunk_base + rank_in_chunk;
}

// Among a token's K rows (-1 = dropped), the index k of the smallest row greater than `prev`
// (pass -1 to start), or -1 when there is none. Rows of distinct assignments are distinct.
MOE_HD inline int next_row(const int64_t* rows_K, int K, int64_t prev) {
  int best = -1;
  for (int k = 0; k < K; ++k) {
    const int64_t r = rows_K[k];
    if (r > prev && (best < 0 || r < rows_K[best])) best = k;
  }
  return best;
}

// Whether a row index read from a row map addresses one of `rows` rows.
MOE_HD inline bool row_in_range(int64_t r, int64_t rows) { return r >= 0 && r < rows; }

}  // namespace moe_train
