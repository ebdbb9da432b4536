// A peer's remote key unpacked on one endpoint, optionally with the bounds
// of the remote region it covers so that transfers can be checked against it.
#pragma once

#include <ucp/api/ucp.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string_view>

#include "endpoint.h"

namespace kvstore::native {

class RemoteKey : public std::enable_shared_from_this<RemoteKey> {
 public:
  // `packed` is UCX's packed rkey (the framing and its checksum are checked
  // by the caller). A zero `region_length` means the bounds are unknown.
  static std::shared_ptr<RemoteKey> unpack(const std::shared_ptr<Endpoint>& endpoint,
                                           std::string_view packed,
                                           std::uint64_t region_address = 0,
                                           std::uint64_t region_length = 0);
  ~RemoteKey();

  RemoteKey(const RemoteKey&) = delete;
  RemoteKey& operator=(const RemoteKey&) = delete;

  const Endpoint* endpoint() const noexcept { return endpoint_.get(); }
  // Valid while the endpoint is open (the worker destroys its keys on close).
  ucp_rkey_h handle() const noexcept { return rkey_; }
  bool bounded() const noexcept { return region_length_ != 0; }
  // Whether [address, address + size) lies within the region (when bounded).
  bool covers(std::uint64_t address, std::uint64_t size) const noexcept {
    return !bounded() ||
           (address >= region_address_ && address - region_address_ <= region_length_ &&
            size <= region_length_ - (address - region_address_));
  }

 private:
  friend class Endpoint;

  RemoteKey(std::shared_ptr<Endpoint> endpoint, ucp_rkey_h rkey, std::uint64_t region_address,
            std::uint64_t region_length)
      : endpoint_(std::move(endpoint)),
        rkey_(rkey),
        region_address_(region_address),
        region_length_(region_length) {}
  void destroy() noexcept;

  // Keeps the endpoint (and its worker) alive while the key exists.
  std::shared_ptr<Endpoint> endpoint_;
  std::mutex mu_;
  ucp_rkey_h rkey_;
  std::uint64_t region_address_;
  std::uint64_t region_length_;
};

}  // namespace kvstore::native
