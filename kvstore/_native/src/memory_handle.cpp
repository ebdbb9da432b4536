#include "memory_handle.h"

#include "status.h"

namespace kvstore::native {

std::shared_ptr<MemoryHandle> MemoryHandle::map(std::shared_ptr<Context> context, void* address,
                                                std::size_t length, std::shared_ptr<void> owner) {
  return std::shared_ptr<MemoryHandle>(
      new MemoryHandle(std::move(context), address, length, std::move(owner)));
}

MemoryHandle::MemoryHandle(std::shared_ptr<Context> context, void* address, std::size_t length,
                           std::shared_ptr<void> owner)
    : owner_(std::move(owner)), context_(std::move(context)), address_(address), length_(length) {
  if (address == nullptr || length == 0) {
    throw InvalidArgumentError("cannot register an empty memory range");
  }
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  params.address = address;
  params.length = length;
  ucs_status_t status = ucp_mem_map(context_->handle(), &params, &memh_);
  if (status != UCS_OK) {
    memh_ = nullptr;
    throw_status(status, "cannot register " + std::to_string(length) + " bytes",
                 Operation::kRegister);
  }

  void* buffer = nullptr;
  std::size_t size = 0;
  status = ucp_rkey_pack(context_->handle(), memh_, &buffer, &size);
  if (status != UCS_OK) {
    ucp_mem_unmap(context_->handle(), memh_);
    memh_ = nullptr;
    throw_status(status, "cannot pack the remote key", Operation::kRegister);
  }
  packed_rkey_.assign(static_cast<const char*>(buffer), size);
  ucp_rkey_buffer_release(buffer);
}

MemoryHandle::~MemoryHandle() {
  if (memh_ != nullptr) {
    ucp_mem_unmap(context_->handle(), memh_);
  }
  // owner_ (the exporter's reference) is released after this body returns.
}

}  // namespace kvstore::native
