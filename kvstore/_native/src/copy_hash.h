// The inner loop of copy.cpp: one range copied and hashed in a single pass.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvstore::native::detail {

// Copies `n` bytes and returns their xxh3-64 (XXH3_64bits, seed 0). With
// `streaming`, the destination is written with non-temporal stores (x86-64;
// elsewhere plain stores), visible to other threads once this returns.
std::uint64_t copy_hash(std::byte* destination, const std::byte* source, std::size_t n,
                        bool streaming) noexcept;

}  // namespace kvstore::native::detail
