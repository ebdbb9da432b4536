#include "rma.h"

#include <atomic>
#include <string>

#include "status.h"

namespace kvstore::native {

namespace {

const char* name_of(Direction direction) { return direction == Direction::kGet ? "get" : "put"; }

// One posted batch. UCX holds raw pointers to it (request user_data) while
// operations are in flight, so it holds a reference to itself until the
// last one settles; the completion task then owns it.
class Batch {
 public:
  Batch(Direction direction, std::shared_ptr<Endpoint> endpoint,
        std::shared_ptr<MemoryHandle> local, std::shared_ptr<RemoteKey> rkey, std::size_t count,
        Completion completion)
      : direction_(direction),
        endpoint_(std::move(endpoint)),
        local_(std::move(local)),
        rkey_(std::move(rkey)),
        count_(count),
        completion_(std::move(completion)) {}

  // outstanding_ starts at 1, the poster's own count, released once every
  // operation is posted, so that operations completing while others are
  // still being posted cannot finish the batch early.
  void start(std::shared_ptr<Batch> self) {
    self_ = std::move(self);
    endpoint_->worker()->begin_operation();
    endpoint_->begin_transfer();
  }

  void hold() noexcept { outstanding_.fetch_add(1); }

  // Accounts for the result of one ucp_*_nbx call.
  void settle(ucs_status_ptr_t request) noexcept {
    if (request == nullptr) {
      done(UCS_OK);
    } else if (UCS_PTR_IS_ERR(request)) {
      done(UCS_PTR_STATUS(request));
    }
    // Otherwise on_done will be called for it.
  }

  bool failed() const noexcept { return first_error_.load() != UCS_OK; }

  void done(ucs_status_t status) noexcept {
    if (status != UCS_OK) {
      ucs_status_t expected = UCS_OK;
      first_error_.compare_exchange_strong(expected, status);
    }
    if (outstanding_.fetch_sub(1) == 1) {
      finish();
    }
  }

  static void on_done(void* request, ucs_status_t status, void* user_data) {
    ucp_request_free(request);
    static_cast<Batch*>(user_data)->done(status);
  }

 private:
  void finish() noexcept {
    ucs_status_t status = first_error_.load();
    // Operations canceled by the forced close that follows a peer failure
    // report the failure itself.
    if (status == UCS_ERR_CANCELED && endpoint_->failed()) {
      status = endpoint_->failure();
    }
    std::string message;
    if (status != UCS_OK) {
      message = describe(status, std::string(name_of(direction_)) + " of " +
                                     std::to_string(count_) + " descriptors failed");
    }
    auto worker = endpoint_->worker();
    auto self = std::move(self_);
    endpoint_->end_transfer();
    // Queued before the worker's count drops so that Worker::close, which
    // waits for that count to reach zero, runs it.
    worker->complete([self = std::move(self), status, message = std::move(message)] {
      self->completion_(status, message);
    });
    worker->end_operation();
  }

  Direction direction_;
  std::shared_ptr<Endpoint> endpoint_;
  std::shared_ptr<MemoryHandle> local_;
  std::shared_ptr<RemoteKey> rkey_;
  std::size_t count_;
  Completion completion_;
  std::shared_ptr<Batch> self_;
  std::atomic<std::size_t> outstanding_{1};
  std::atomic<ucs_status_t> first_error_{UCS_OK};
};

void validate(const std::shared_ptr<Endpoint>& endpoint, const std::shared_ptr<MemoryHandle>& local,
              std::span<const std::int64_t> local_offsets,
              std::span<const std::uint64_t> remote_addresses, std::span<const std::int64_t> sizes,
              const std::shared_ptr<RemoteKey>& rkey) {
  if (!endpoint || !local || !rkey) {
    throw InvalidArgumentError("the endpoint, memory handle and remote key are required");
  }
  if (local_offsets.size() != sizes.size() || remote_addresses.size() != sizes.size()) {
    throw InvalidArgumentError("local_offsets, remote_addresses and sizes differ in length (" +
                               std::to_string(local_offsets.size()) + ", " +
                               std::to_string(remote_addresses.size()) + ", " +
                               std::to_string(sizes.size()) + ")");
  }
  if (rkey->endpoint() != endpoint.get()) {
    throw InvalidArgumentError("the remote key was unpacked on another endpoint");
  }
  if (local->context() != endpoint->worker()->context()) {
    throw InvalidArgumentError("the memory handle belongs to another context");
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const int index = static_cast<int>(i);
    if (local_offsets[i] < 0 || sizes[i] < 0) {
      throw InvalidArgumentError("descriptor " + std::to_string(i) + ": negative offset or size",
                                 index);
    }
    const auto offset = static_cast<std::uint64_t>(local_offsets[i]);
    const auto size = static_cast<std::uint64_t>(sizes[i]);
    if (!local->contains(offset, size)) {
      throw InvalidArgumentError("descriptor " + std::to_string(i) + ": local range [" +
                                     std::to_string(offset) + ", +" + std::to_string(size) +
                                     ") exceeds the memory handle of " +
                                     std::to_string(local->length()) + " bytes",
                                 index);
    }
    if (!rkey->covers(remote_addresses[i], size)) {
      throw InvalidArgumentError("descriptor " + std::to_string(i) +
                                     ": remote range is outside the remote key's region",
                                 index);
    }
  }
}

}  // namespace

void post(Direction direction, const std::shared_ptr<Endpoint>& endpoint,
          const std::shared_ptr<MemoryHandle>& local, std::span<const std::int64_t> local_offsets,
          std::span<const std::uint64_t> remote_addresses, std::span<const std::int64_t> sizes,
          const std::shared_ptr<RemoteKey>& rkey, Completion completion) {
  validate(endpoint, local, local_offsets, remote_addresses, sizes, rkey);

  auto use = endpoint->use();  // throws if closed or failed: nothing posted yet
  auto batch = std::make_shared<Batch>(direction, endpoint, local, rkey, sizes.size(),
                                       std::move(completion));
  batch->start(batch);

  ucp_request_param_t params{};
  params.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                        UCP_OP_ATTR_FIELD_MEMH | UCP_OP_ATTR_FLAG_MULTI_SEND;
  params.cb.send = &Batch::on_done;
  params.user_data = batch.get();
  params.memh = local->handle();  // spares UCX a registration-cache lookup per operation

  const ucp_ep_h ep = use.handle();
  const ucp_rkey_h remote = rkey->handle();
  auto* base = reinterpret_cast<char*>(local->address());
  for (std::size_t i = 0; i < sizes.size() && !batch->failed(); ++i) {
    if (sizes[i] == 0) {
      continue;
    }
    char* buffer = base + local_offsets[i];
    const auto size = static_cast<std::size_t>(sizes[i]);
    batch->hold();
    batch->settle(direction == Direction::kGet
                      ? ucp_get_nbx(ep, buffer, size, remote_addresses[i], remote, &params)
                      : ucp_put_nbx(ep, buffer, size, remote_addresses[i], remote, &params));
  }
  if (!batch->failed()) {
    // Gets are complete when their requests are; puts only once the flush
    // has made them visible at the target.
    ucp_request_param_t flush{};
    flush.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    flush.cb.send = &Batch::on_done;
    flush.user_data = batch.get();
    batch->hold();
    batch->settle(ucp_ep_flush_nbx(ep, &flush));
  }
  batch->done(UCS_OK);  // the poster's reference
  endpoint->worker()->wake();
}

}  // namespace kvstore::native
