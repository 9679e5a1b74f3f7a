// The compiled kernels' outputs (y, dx): where their memory comes from. Large outputs come from a
// small cache of buffers that earlier outputs freed, already mapped, so that filling one does
// not first fault every page of it in from the operating system (see outputs.cpp).
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>

namespace torch_bn_cpp {

// An uninitialized tensor with x's sizes, dtype and device in `format` (contiguous or channels
// last). From kCachedOutputBytes up its memory is a cached, huge-page-backed buffer; below, it is
// PyTorch's own CPU allocation.
at::TensorBase empty_output(const at::TensorBase& x, at::MemoryFormat format);

// Outputs from this size up come from the cache: 4 MiB, where a fresh buffer's page faults
// start to cost a visible part of a call.
constexpr int64_t kCachedOutputBytes = int64_t(4) << 20;

// What the cache holds and has done: bytes held in free buffers, the most it may hold, and the
// outputs it served from a held buffer (hits) or from new memory (misses).
struct OutputCacheInfo {
  int64_t cached_bytes, limit_bytes, hits, misses;
};
OutputCacheInfo output_cache_info();

// Sets the most the cache may hold (0: hold nothing, every freed buffer goes back to the
// system) and frees held buffers down to it. Returns the bytes freed.
int64_t set_output_cache_limit(int64_t bytes);

// Gives every held buffer back to the system, keeping the limit. Returns the bytes freed.
int64_t empty_output_cache();

}  // namespace torch_bn_cpp
