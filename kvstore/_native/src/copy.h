// Block copies between two local memory ranges, with the xxh3-64 of every
// block computed on the way while its bytes are still in cache. The daemon's
// co-located fast path: it copies between a client's shared memory and its
// arena with this, instead of RMA.
//
// No UCX and no Python in here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace kvstore::native {

struct CopyRange {
  const std::byte* source;
  std::byte* destination;
  std::size_t size;
};

// A batch smaller than this is copied by the calling thread alone.
inline constexpr std::size_t kParallelCopyMin = 4 << 20;
// A batch this large is written with streaming stores (where the CPU has them).
inline constexpr std::size_t kStreamingCopyMin = 4 << 20;

// Copies every range and returns the xxh3-64 of each one's bytes, hashed in
// the same pass as the copy (copy_hash.cpp). Runs on the
// calling thread, helped by up to `threads - 1` threads of a process-wide
// pool when the batch is large enough (one range is never split). The ranges
// must not overlap. Returns once every range is copied; never throws after
// it started copying.
std::vector<std::uint64_t> copy_and_hash(std::span<const CopyRange> ranges, unsigned threads);

}  // namespace kvstore::native
