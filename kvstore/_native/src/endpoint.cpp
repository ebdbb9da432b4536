#include "endpoint.h"

#include <thread>
#include <utility>

#include "remote_key.h"
#include "status.h"

namespace kvstore::native {

std::shared_ptr<Endpoint> Endpoint::create(std::shared_ptr<Worker> worker,
                                           const std::string& address) {
  if (address.empty()) {
    throw InvalidArgumentError("the worker address is empty");
  }
  std::shared_ptr<Endpoint> endpoint(new Endpoint(worker));

  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = &Endpoint::on_error;
  // UCX stops calling the handler once the endpoint is closed, and the
  // endpoint is closed before this object is destroyed.
  params.err_handler.arg = endpoint.get();
  {
    std::lock_guard<std::mutex> lock(worker->handle_mu_);
    if (worker->closing_.load()) {
      throw EndpointClosedError(UCS_ERR_NOT_CONNECTED, "the worker is closed");
    }
    const ucs_status_t status = ucp_ep_create(worker->worker_, &params, &endpoint->ep_);
    if (status != UCS_OK) {
      endpoint->ep_ = nullptr;
      throw_status(status, "cannot create an endpoint");
    }
    worker->register_endpoint(endpoint);
    // Wireup needs progress. Under handle_mu_: the worker cannot be
    // destroyed meanwhile.
    worker->wake();
  }
  return endpoint;
}

Endpoint::~Endpoint() { close(); }

bool Endpoint::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return ep_ == nullptr;
}

std::vector<std::pair<std::string, std::string>> Endpoint::transports() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::pair<std::string, std::string>> result;
  if (ep_ == nullptr) {
    return result;
  }
  std::vector<ucp_transport_entry_t> entries(64);  // UCX has at most 64 lanes
  ucp_ep_attr_t attr{};
  attr.field_mask = UCP_EP_ATTR_FIELD_TRANSPORTS;
  attr.transports.entries = entries.data();
  attr.transports.num_entries = static_cast<unsigned>(entries.size());
  attr.transports.entry_size = sizeof(ucp_transport_entry_t);
  const ucs_status_t status = ucp_ep_query(ep_, &attr);
  if (status != UCS_OK) {
    throw_status(status, "cannot query the endpoint");
  }
  for (unsigned i = 0; i < attr.transports.num_entries; ++i) {
    result.emplace_back(entries[i].transport_name, entries[i].device_name);
  }
  return result;
}

Endpoint::Use Endpoint::use() {
  std::unique_lock<std::mutex> lock(mu_);
  if (failed_.load()) {
    const auto status = failure();
    throw EndpointClosedError(status, describe(status, "the endpoint has failed"));
  }
  if (ep_ == nullptr) {
    throw EndpointClosedError(UCS_ERR_NOT_CONNECTED, "the endpoint is closed");
  }
  return Use(std::move(lock), ep_);
}

void Endpoint::close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (ep_ == nullptr) {
    return;
  }
  ucp_ep_h ep = std::exchange(ep_, nullptr);
  std::lock_guard<std::mutex> handle_lock(worker_->handle_mu_);
  if (worker_->worker_ == nullptr) {
    return;  // the worker destroyed it along with itself
  }
  ucp_request_param_t params{};
  params.op_attr_mask =
      UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  // Force: never wait for a peer that may be dead; with peer error handling
  // this is the mode UCX asks for.
  params.flags = UCP_EP_CLOSE_FLAG_FORCE;
  params.cb.send = &Endpoint::on_closed;
  params.user_data = worker_.get();
  worker_->begin_operation();
  const ucs_status_ptr_t request = ucp_ep_close_nbx(ep, &params);
  if (!UCS_PTR_IS_PTR(request)) {
    worker_->end_operation();  // closed at once
  }
  worker_->wake();
}

void Endpoint::close(std::chrono::milliseconds grace) {
  if (grace.count() > 0 && !worker_->on_progress_thread()) {
    const auto deadline = std::chrono::steady_clock::now() + grace;
    while (transfers_.load() > 0 && !worker_->closed() &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  close();
}

void Endpoint::on_closed(void* request, ucs_status_t, void* user_data) {
  ucp_request_free(request);
  static_cast<Worker*>(user_data)->end_operation();
}

void Endpoint::on_error(void* arg, ucp_ep_h, ucs_status_t status) {
  // Runs inside ucp_worker_progress: record the failure (posting checks it)
  // and leave the close to the progress thread once UCX's lock is released.
  auto* self = static_cast<Endpoint*>(arg);
  self->failure_.store(status);
  self->failed_.store(true);
  self->worker_->defer([weak = self->weak_from_this()] {
    if (auto endpoint = weak.lock()) {
      endpoint->close();
    }
  });
}

void Endpoint::track(const std::shared_ptr<RemoteKey>& rkey) {
  std::lock_guard<std::mutex> lock(rkeys_mu_);
  std::erase_if(rkeys_, [](const std::weak_ptr<RemoteKey>& key) { return key.expired(); });
  rkeys_.push_back(rkey);
}

void Endpoint::destroy_remote_keys() {
  std::vector<std::shared_ptr<RemoteKey>> keys;
  {
    std::lock_guard<std::mutex> lock(rkeys_mu_);
    for (auto& weak : rkeys_) {
      if (auto key = weak.lock()) {
        keys.push_back(std::move(key));
      }
    }
    rkeys_.clear();
  }
  for (auto& key : keys) {
    key->destroy();
  }
}

}  // namespace kvstore::native
