// Memory for large outputs that is reused instead of returned to the operating system.
//
// torch's CPU allocator hands every allocation above glibc's mmap threshold (32 MiB at most) fresh
// pages from the kernel: the first write to each 4 KiB page faults and the kernel zeroes it, which
// costs 3-4x a copy of the same bytes. A training or inference loop allocates the same output sizes
// call after call, so the kernels' outputs of at least kMinBytes come from here: freed blocks are kept
// (up to a cap) and handed to the next output of the same size, already mapped. Smaller outputs use
// torch's allocator.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstddef>

namespace layernorm {

// A contiguous tensor of `sizes` and `options` (CPU), from the cache when it is large.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// (bytes held by free blocks, blocks) and the cap on bytes held.
struct OutputCacheStats {
  size_t cached_bytes;
  size_t cached_blocks;
  size_t cap_bytes;
  size_t min_bytes;
};
OutputCacheStats output_cache_stats();

// Returns every free block to the operating system.
void release_output_cache();

}  // namespace layernorm
