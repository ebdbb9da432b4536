#include "remote_key.h"

#include <ucs/memory/memory_type.h>

#include <cstring>

#include "status.h"

namespace kvstore::native {

namespace {

// ucp_ep_rkey_unpack takes no length and trusts the buffer. Check that it
// holds the layout UCX parses - u64 map of memory domains, u8 memory type,
// then per domain a u8 size and that many bytes (trailing device info is
// not read) - so that a short or garbled key is refused instead of making
// UCX read past its end.
void check_layout(std::string_view packed) {
  std::uint64_t md_map = 0;
  if (packed.size() < sizeof(md_map) + 1) {
    throw InvalidRemoteKeyError(UCS_ERR_INVALID_PARAM, "the remote key is too short");
  }
  std::memcpy(&md_map, packed.data(), sizeof(md_map));
  const auto memory_type = static_cast<std::uint8_t>(packed[sizeof(md_map)]);
  if (memory_type >= UCS_MEMORY_TYPE_LAST) {
    throw InvalidRemoteKeyError(UCS_ERR_INVALID_PARAM, "the remote key names an unknown memory type");
  }
  std::size_t offset = sizeof(md_map) + 1;
  for (; md_map != 0; md_map &= md_map - 1) {
    if (offset >= packed.size()) {
      throw InvalidRemoteKeyError(UCS_ERR_INVALID_PARAM, "the remote key is truncated");
    }
    offset += 1 + static_cast<std::uint8_t>(packed[offset]);
    if (offset > packed.size()) {
      throw InvalidRemoteKeyError(UCS_ERR_INVALID_PARAM, "the remote key is truncated");
    }
  }
}

}  // namespace

std::shared_ptr<RemoteKey> RemoteKey::unpack(const std::shared_ptr<Endpoint>& endpoint,
                                             std::string_view packed,
                                             std::uint64_t region_address,
                                             std::uint64_t region_length) {
  check_layout(packed);
  if (region_length != 0 && region_address + region_length < region_address) {
    throw InvalidArgumentError("the remote region wraps around the address space");
  }
  ucp_rkey_h rkey = nullptr;
  {
    auto use = endpoint->use();
    const ucs_status_t status = ucp_ep_rkey_unpack(use.handle(), packed.data(), &rkey);
    if (status != UCS_OK) {
      throw_status(status, "cannot unpack the remote key", Operation::kUnpackRemoteKey);
    }
  }
  std::shared_ptr<RemoteKey> key(new RemoteKey(endpoint, rkey, region_address, region_length));
  endpoint->track(key);
  return key;
}

RemoteKey::~RemoteKey() { destroy(); }

void RemoteKey::destroy() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  if (rkey_ == nullptr) {
    return;
  }
  const auto& worker = endpoint_->worker();
  std::lock_guard<std::mutex> handle_lock(worker->handle_mu_);
  // The key lives in the worker's memory pool: only destroy it while the
  // worker exists (Worker::close destroys every live key before itself).
  if (worker->worker_ != nullptr) {
    ucp_rkey_destroy(rkey_);
  }
  rkey_ = nullptr;
}

}  // namespace kvstore::native
