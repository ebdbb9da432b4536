// An endpoint to a peer worker, created from its packed worker address, with
// peer-failure handling: when the peer dies or the link breaks, UCX calls the
// error callback, every operation in flight on the endpoint completes with
// an error, and the endpoint is force-closed.
#pragma once

#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "worker.h"

namespace kvstore::native {

class RemoteKey;

class Endpoint : public std::enable_shared_from_this<Endpoint> {
 public:
  static std::shared_ptr<Endpoint> create(std::shared_ptr<Worker> worker,
                                          const std::string& address);
  ~Endpoint();

  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  const std::shared_ptr<Worker>& worker() const noexcept { return worker_; }
  // Set once the error callback has fired.
  bool failed() const noexcept { return failed_.load(); }
  // The status the error callback reported, or UCS_OK.
  ucs_status_t failure() const noexcept { return static_cast<ucs_status_t>(failure_.load()); }
  bool closed() const;
  // (transport, device) per lane, e.g. {"cma", "memory"}, {"tcp", "lo"}:
  // what UCX selected for this endpoint so far (wireup may still add lanes
  // until the first transfer). Empty once closed.
  std::vector<std::pair<std::string, std::string>> transports() const;

  // Force-closes the endpoint: operations in flight complete with
  // UCS_ERR_CANCELED. Idempotent; never blocks on the peer.
  void close();
  // Waits up to `grace` for the transfers in flight to complete, then
  // force-closes. Waiting lets a peer deliver everything it owes before it
  // sees the connection drop (see Worker::close). No wait on the progress
  // thread itself, which would have to progress while waiting.
  void close(std::chrono::milliseconds grace);

  // Batches posted on the endpoint that have not completed yet.
  void begin_transfer() noexcept { transfers_.fetch_add(1); }
  void end_transfer() noexcept { transfers_.fetch_sub(1); }

  // Exclusive use of the open endpoint while posting operations.
  class Use {
   public:
    ucp_ep_h handle() const noexcept { return ep_; }

   private:
    friend class Endpoint;
    Use(std::unique_lock<std::mutex> lock, ucp_ep_h ep) : lock_(std::move(lock)), ep_(ep) {}
    std::unique_lock<std::mutex> lock_;
    ucp_ep_h ep_;
  };
  // Throws EndpointClosedError if the endpoint is closed or has failed.
  Use use();

 private:
  friend class RemoteKey;
  friend class Worker;

  explicit Endpoint(std::shared_ptr<Worker> worker) : worker_(std::move(worker)) {}
  void track(const std::shared_ptr<RemoteKey>& rkey);
  void destroy_remote_keys();
  static void on_error(void* arg, ucp_ep_h ep, ucs_status_t status);
  static void on_closed(void* request, ucs_status_t status, void* user_data);

  std::shared_ptr<Worker> worker_;
  mutable std::mutex mu_;
  ucp_ep_h ep_ = nullptr;
  std::atomic<bool> failed_{false};
  std::atomic<int> failure_{UCS_OK};
  std::atomic<std::int64_t> transfers_{0};

  std::mutex rkeys_mu_;
  std::vector<std::weak_ptr<RemoteKey>> rkeys_;
};

}  // namespace kvstore::native
