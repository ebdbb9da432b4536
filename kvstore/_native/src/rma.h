// Batched one-sided transfers: one RMA operation per descriptor, then a flush
// of the endpoint, and a single completion for the whole batch.
#pragma once

#include <ucs/type/status.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "endpoint.h"
#include "memory_handle.h"
#include "remote_key.h"

namespace kvstore::native {

enum class Direction {
  kGet,  // remote -> local
  kPut,  // local -> remote
};

// Called once per batch on the progress thread (through the worker's
// runner): UCS_OK, or the first failure with a message saying what failed.
using Completion = std::function<void(ucs_status_t status, const std::string& message)>;

// Validates every descriptor (list lengths, local bounds, remote bounds when
// the key has them) and throws InvalidArgumentError before posting anything;
// otherwise posts the batch and returns at once. The completion runs after
// every posted operation has settled, so the local memory is free to reuse
// when it is called, whatever the status. The batch keeps the endpoint, the
// local handle and the remote key alive until then.
void post(Direction direction, const std::shared_ptr<Endpoint>& endpoint,
          const std::shared_ptr<MemoryHandle>& local, std::span<const std::int64_t> local_offsets,
          std::span<const std::uint64_t> remote_addresses, std::span<const std::int64_t> sizes,
          const std::shared_ptr<RemoteKey>& rkey, Completion completion);

}  // namespace kvstore::native
