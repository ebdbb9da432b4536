// A UCP worker (UCS_THREAD_MODE_MULTI) and the native thread that progresses it.
//
// Threads: any thread may post operations; only the progress thread calls
// ucp_worker_progress (until close(), when the closing thread takes over).
// UCX invokes request and error callbacks inside ucp_worker_progress while it
// holds the worker's lock, so those callbacks never run user code: they queue
// a Task. The progress thread runs queued tasks after ucp_worker_progress has
// returned, through the Runner given at creation (the Python shim's runner
// takes the GIL once per round of completions).
#pragma once

#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "context.h"

namespace kvstore::native {

class Endpoint;

class Worker : public std::enable_shared_from_this<Worker> {
 public:
  using Task = std::function<void()>;
  // Runs a round of completion tasks, then destroys them (clears the vector).
  using Runner = std::function<void(std::vector<Task>&)>;

  struct Options {
    // How long the progress thread keeps polling after the last activity
    // before it sleeps on the event fd; trades a core for latency.
    std::chrono::microseconds busy_poll{50};
    // Upper bound of one sleep on the event fd. A safety net: a missed
    // wakeup costs at most this much latency instead of a hang.
    int wait_timeout_ms = 2;
  };

  // Creates the worker and starts its progress thread. The thread holds a
  // reference to the worker until close().
  static std::shared_ptr<Worker> create(std::shared_ptr<Context> context, Options options,
                                        Runner runner = nullptr);
  ~Worker();

  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  const std::shared_ptr<Context>& context() const noexcept { return context_; }
  // The packed worker address peers connect to.
  const std::string& address() const noexcept { return address_; }
  bool closed() const noexcept { return closed_.load(); }

  // Stops the progress thread, force-closes every endpoint (their pending
  // operations complete with an error and their callbacks run), destroys the
  // remote keys and the worker. Idempotent; callable from any thread,
  // including from a completion running on the progress thread.
  //
  // With a `grace` period it first waits (up to that long, not on the
  // progress thread) for the operations in flight to complete. Peers then
  // see the connection drop with nothing left to send: over TCP they answer
  // our reads with messages, and UCX (1.22) crashes a process that fails an
  // endpoint with such a reply still queued.
  void close(std::chrono::milliseconds grace = std::chrono::milliseconds(0));

  // Queues a completion to run on the progress thread through the runner.
  void complete(Task task);
  // Queues internal work (no user code) to run on the progress thread after
  // the current ucp_worker_progress call, outside UCX's lock.
  void defer(Task task);
  // Wakes the progress thread if it sleeps; call after posting operations.
  void wake() noexcept;
  bool on_progress_thread() const noexcept;

  // Counts operations UCX still owes a callback for (a batch, an endpoint
  // close); close() keeps progressing until they have all settled.
  void begin_operation() noexcept { inflight_.fetch_add(1); }
  void end_operation() noexcept { inflight_.fetch_sub(1); }

 private:
  friend class Endpoint;
  friend class RemoteKey;

  Worker(std::shared_ptr<Context> context, Options options, Runner runner);
  void progress_loop();
  // Runs queued internal tasks and completions; true if there were any.
  bool run_queued();
  void flush_before_destroy();
  void register_endpoint(const std::shared_ptr<Endpoint>& endpoint);

  std::shared_ptr<Context> context_;
  Options options_;
  Runner runner_;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
  std::string address_;

  // Guards worker_ against destruction while an endpoint or remote key is
  // being closed from another thread.
  std::mutex handle_mu_;
  std::recursive_mutex close_mu_;
  std::atomic<bool> closing_{false};
  std::atomic<bool> closed_{false};

  std::thread thread_;
  std::atomic<std::thread::id> progress_thread_id_{};
  std::atomic<bool> stop_{false};
  // Sleep/wake handshake: a poster bumps wakeups_ then signals if sleeping_;
  // the progress thread sets sleeping_ then re-checks wakeups_ before it
  // sleeps, so one of the two always sees the other.
  std::atomic<bool> sleeping_{false};
  std::atomic<std::uint64_t> wakeups_{0};

  std::mutex queue_mu_;
  std::vector<Task> tasks_;
  std::vector<Task> completions_;

  // See begin_operation().
  std::atomic<std::int64_t> inflight_{0};

  std::mutex endpoints_mu_;
  std::vector<std::weak_ptr<Endpoint>> endpoints_;
};

}  // namespace kvstore::native
