// The inner loop of copy.cpp: one range copied and hashed in a single pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace kvstore::native::detail {

// Copies `n` bytes and returns their xxh3-64 (XXH3_64bits, seed 0). With
// `streaming`, the destination is written with non-temporal stores (x86-64;
// elsewhere plain stores), visible to other threads once this returns.
std::uint64_t copy_hash(std::byte* destination, const std::byte* source, std::size_t n,
                        bool streaming) noexcept;

// The xxh3-64 of a range fed piece by piece (as XXH3_64bits_update), each
// piece hashed with the widest vector code the CPU has: the same result as
// hashing the whole range at once, whatever the pieces.
class StreamingHash {
 public:
  StreamingHash();
  ~StreamingHash();
  StreamingHash(const StreamingHash&) = delete;
  StreamingHash& operator=(const StreamingHash&) = delete;

  void update(const std::byte* data, std::size_t n) noexcept;
  std::uint64_t digest() const noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace kvstore::native::detail
