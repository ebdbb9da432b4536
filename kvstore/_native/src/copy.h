// Block copies between two local memory ranges, or between local memory and
// another process's (process_vm_readv/writev), with the xxh3-64 of every
// block computed on the way while its bytes are still in cache. The daemon's
// co-located fast paths: it copies between a client's shared memory, or the
// memory a co-located client registered, and its arena with these, instead
// of RMA.
//
// No UCX and no Python in here.
#pragma once

#include <sys/types.h>

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

// One block between local memory and an address in another process.
struct ProcessRange {
  std::byte* local;
  std::uint64_t remote;
  std::size_t size;
};

// What a copy to or from another process did: the xxh3-64 of each block's
// bytes, or, when one could not be copied, the lowest such block's index and
// the errno of its system call (EFAULT when the process's memory there is
// not mapped, EPERM when this process may not access it, ESRCH when it is
// gone); blocks after a failure may not have been copied.
struct ProcessCopy {
  std::vector<std::uint64_t> checksums;
  std::ptrdiff_t failed = -1;
  int error = 0;
};

// Bytes moved per system call: each piece is hashed right after it lands
// (reads) or right before it leaves (writes), while it is in cache.
inline constexpr std::size_t kProcessCopyPiece = 256 << 10;

// Reads every range of process `pid` into local memory (process_vm_readv),
// hashing as it goes; threads as for copy_and_hash.
ProcessCopy read_process_and_hash(pid_t pid, std::span<const ProcessRange> ranges, unsigned threads);

// Writes local memory into every range of process `pid` (process_vm_writev),
// hashing the local bytes as they go; threads as for copy_and_hash.
ProcessCopy write_process_and_hash(pid_t pid, std::span<const ProcessRange> ranges, unsigned threads);

}  // namespace kvstore::native
