// A range of local memory registered with a context (ucp_mem_map of memory
// the caller already owns) and its packed remote key.
#pragma once

#include <ucp/api/ucp.h>

#include <cstdint>
#include <memory>
#include <string>

#include "context.h"

namespace kvstore::native {

class MemoryHandle : public std::enable_shared_from_this<MemoryHandle> {
 public:
  // Registers [address, address + length). `owner`, if given, keeps the
  // memory alive; it is released only after the range is unmapped, so
  // whoever exported the memory cannot free it while UCX may touch it.
  static std::shared_ptr<MemoryHandle> map(std::shared_ptr<Context> context, void* address,
                                           std::size_t length,
                                           std::shared_ptr<void> owner = nullptr);
  ~MemoryHandle();

  MemoryHandle(const MemoryHandle&) = delete;
  MemoryHandle& operator=(const MemoryHandle&) = delete;

  const std::shared_ptr<Context>& context() const noexcept { return context_; }
  std::uintptr_t address() const noexcept { return reinterpret_cast<std::uintptr_t>(address_); }
  std::size_t length() const noexcept { return length_; }
  ucp_mem_h handle() const noexcept { return memh_; }
  // UCX's packed remote key for this range, packed once at registration.
  const std::string& packed_rkey() const noexcept { return packed_rkey_; }

  // Whether [offset, offset + size) lies within the range (overflow-safe).
  bool contains(std::uint64_t offset, std::uint64_t size) const noexcept {
    return offset <= length_ && size <= length_ - offset;
  }

 private:
  MemoryHandle(std::shared_ptr<Context> context, void* address, std::size_t length,
               std::shared_ptr<void> owner);

  // Declared first so it is destroyed last, after the unmap.
  std::shared_ptr<void> owner_;
  std::shared_ptr<Context> context_;
  void* address_;
  std::size_t length_;
  ucp_mem_h memh_ = nullptr;
  std::string packed_rkey_;
};

}  // namespace kvstore::native
