// A cache of freed host buffers for the large tensors the CPU kernels allocate.
//
// A fresh multi-megabyte allocation is served by the kernel as new zeroed pages, and touching
// them costs as much as a pass over the data (measured: 12 ms to allocate and fill 32 MiB,
// 3 ms to fill a reused buffer). A training loop asks for the same shapes every step, so the
// kernels' large outputs and temporaries come from buffers freed by the previous step. The
// cache holds at most COORDGATE_CPU_CACHE_MB (default 1024) MiB of free buffers; when a
// freed buffer would take it over, the buffers freed longest ago are released to make room
// (so a process that moves on to other shapes does not keep stale sizes instead of the new
// ones). coordgate_ext.empty_cpu_cache() releases them all.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace coordgate {

// at::empty with the cache's allocator for tensors of at least 1 MiB, plain at::empty below.
at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format);

// Frees every cached buffer.
void empty_output_cache();

// Bytes held in free cached buffers.
size_t output_cache_bytes();

}  // namespace coordgate
