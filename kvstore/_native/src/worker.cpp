#include "worker.h"

#include <poll.h>

#include <cstdio>
#include <exception>

#include "endpoint.h"
#include "status.h"

namespace kvstore::native {

namespace {

// How long close() keeps progressing for the operations its endpoint closes
// cancel. UCX completes canceled requests within a few progress calls; the
// bound only matters if a transport misbehaves.
constexpr std::chrono::seconds kCloseDrainTimeout{10};
// How long close() lets the worker deliver what it still owes its peers.
constexpr std::chrono::seconds kCloseFlushTimeout{2};

void report_task_failure(const char* what) noexcept {
  std::fprintf(stderr, "kvstore._native: a progress-thread task failed: %s\n", what);
}

void run_tasks(std::vector<Worker::Task>& tasks) noexcept {
  for (auto& task : tasks) {
    try {
      task();
    } catch (const std::exception& e) {
      report_task_failure(e.what());
    } catch (...) {
      report_task_failure("unknown exception");
    }
  }
  tasks.clear();
}

}  // namespace

std::shared_ptr<Worker> Worker::create(std::shared_ptr<Context> context, Options options,
                                       Runner runner) {
  std::shared_ptr<Worker> worker(new Worker(std::move(context), options, std::move(runner)));
  // The thread owns a reference so the worker cannot be destroyed under it;
  // close() ends the thread and with it that reference.
  worker->thread_ = std::thread([self = worker] { self->progress_loop(); });
  worker->progress_thread_id_.store(worker->thread_.get_id());
  return worker;
}

Worker::Worker(std::shared_ptr<Context> context, Options options, Runner runner)
    : context_(std::move(context)), options_(options), runner_(std::move(runner)) {
  ucp_worker_params_t params{};
  params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  params.thread_mode = UCS_THREAD_MODE_MULTI;
  ucs_status_t status = ucp_worker_create(context_->handle(), &params, &worker_);
  if (status != UCS_OK) {
    worker_ = nullptr;
    throw_status(status, "cannot create a UCX worker");
  }

  try {
    ucp_worker_attr_t attr{};
    attr.field_mask = UCP_WORKER_ATTR_FIELD_THREAD_MODE | UCP_WORKER_ATTR_FIELD_ADDRESS;
    status = ucp_worker_query(worker_, &attr);
    if (status != UCS_OK) {
      throw_status(status, "cannot query the UCX worker");
    }
    address_.assign(reinterpret_cast<const char*>(attr.address), attr.address_length);
    ucp_worker_release_address(worker_, attr.address);
    // Operations are posted from Python threads while the progress thread
    // runs; a UCX built without multi-thread support cannot do that safely.
    if (attr.thread_mode != UCS_THREAD_MODE_MULTI) {
      throw TransportError(UCS_ERR_UNSUPPORTED,
                           "this UCX build does not support UCS_THREAD_MODE_MULTI");
    }
    status = ucp_worker_get_efd(worker_, &efd_);
    if (status != UCS_OK) {
      throw_status(status, "cannot get the UCX worker's event fd");
    }
  } catch (...) {
    ucp_worker_destroy(worker_);
    worker_ = nullptr;
    throw;
  }
}

Worker::~Worker() {
  // Reached only once the progress thread has ended (it holds a reference),
  // that is after close(); this covers a worker whose thread never started.
  try {
    close();
  } catch (const std::exception& e) {
    report_task_failure(e.what());
  }
}

bool Worker::on_progress_thread() const noexcept {
  return progress_thread_id_.load() == std::this_thread::get_id();
}

void Worker::wake() noexcept {
  wakeups_.fetch_add(1);
  if (sleeping_.load()) {
    ucp_worker_signal(worker_);
  }
}

void Worker::complete(Task task) {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    completions_.push_back(std::move(task));
  }
  if (!on_progress_thread()) {
    wake();
  }
}

void Worker::defer(Task task) {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    tasks_.push_back(std::move(task));
  }
  if (!on_progress_thread()) {
    wake();
  }
}

bool Worker::run_queued() {
  std::vector<Task> tasks;
  std::vector<Task> completions;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (tasks_.empty() && completions_.empty()) {
      return false;
    }
    tasks.swap(tasks_);
    completions.swap(completions_);
  }
  run_tasks(tasks);
  if (!completions.empty()) {
    if (runner_) {
      runner_(completions);
    }
    run_tasks(completions);  // no-op if the runner already ran and cleared them
  }
  return true;
}

void Worker::progress_loop() {
  using Clock = std::chrono::steady_clock;
  auto last_active = Clock::now();
  while (!stop_.load()) {
    const std::uint64_t seen = wakeups_.load();
    bool active = ucp_worker_progress(worker_) != 0;
    active = run_queued() || active;
    if (stop_.load()) {
      break;  // close() may have run inside a completion and destroyed worker_
    }
    const auto now = Clock::now();
    if (active) {
      last_active = now;
      continue;
    }
    if (now - last_active < options_.busy_poll) {
      continue;
    }
    sleeping_.store(true);
    // Sleep only if nothing was posted since the progress call above;
    // otherwise the poster may have missed sleeping_ and not signaled.
    if (wakeups_.load() == seen) {
      const ucs_status_t status = ucp_worker_arm(worker_);
      if (status == UCS_OK) {
        pollfd fd{efd_, POLLIN, 0};
        ::poll(&fd, 1, options_.wait_timeout_ms);
      } else if (status != UCS_ERR_BUSY) {
        // Cannot arm: fall back to a bounded sleep rather than spinning.
        std::this_thread::sleep_for(std::chrono::milliseconds(options_.wait_timeout_ms));
      }
      // UCS_ERR_BUSY: events are already pending, progress again.
    }
    sleeping_.store(false);
  }
}

void Worker::register_endpoint(const std::shared_ptr<Endpoint>& endpoint) {
  std::lock_guard<std::mutex> lock(endpoints_mu_);
  std::erase_if(endpoints_, [](const std::weak_ptr<Endpoint>& ep) { return ep.expired(); });
  endpoints_.push_back(endpoint);
}

void Worker::flush_before_destroy() {
  // Peers may still be owed replies: over TCP, UCX emulates their reads of
  // our memory with messages this worker answers. UCX (1.22) crashes when it
  // destroys an endpoint whose queue still holds such a reply, so give them
  // a bounded chance to go out first. A dead peer fails its endpoint instead.
  //
  // The state outlives this call if the flush does not finish in time (UCX
  // may then complete it while destroying the worker, or never): whichever
  // of the callback and this function finishes second frees it.
  enum : int { kPending, kFlushed, kAbandoned };
  auto* state = new std::atomic<int>(kPending);
  ucp_request_param_t params{};
  params.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  params.cb.send = [](void* request, ucs_status_t, void* user_data) {
    ucp_request_free(request);
    auto* flush_state = static_cast<std::atomic<int>*>(user_data);
    if (flush_state->exchange(kFlushed) == kAbandoned) {
      delete flush_state;
    }
  };
  params.user_data = state;
  const ucs_status_ptr_t request = ucp_worker_flush_nbx(worker_, &params);
  if (!UCS_PTR_IS_PTR(request)) {
    delete state;
    return;
  }
  const auto deadline = std::chrono::steady_clock::now() + kCloseFlushTimeout;
  while (state->load() == kPending && std::chrono::steady_clock::now() < deadline) {
    ucp_worker_progress(worker_);
    run_queued();
  }
  if (state->exchange(kAbandoned) == kFlushed) {
    delete state;
  }
}

void Worker::close(std::chrono::milliseconds grace) {
  std::lock_guard<std::recursive_mutex> guard(close_mu_);
  if (worker_ == nullptr || closing_.load()) {
    return;  // closed, or being closed further up this thread's stack
  }
  if (grace.count() > 0 && !on_progress_thread()) {
    const auto deadline = std::chrono::steady_clock::now() + grace;
    while (inflight_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  {
    // Under handle_mu_ so that an endpoint being created either finishes
    // first (and is closed below) or sees closing_ and fails.
    std::lock_guard<std::mutex> lock(handle_mu_);
    closing_.store(true);
  }

  stop_.store(true);
  if (thread_.joinable()) {
    if (thread_.get_id() == std::this_thread::get_id()) {
      // Called from a completion: the loop exits once it returns.
      thread_.detach();
    } else {
      ucp_worker_signal(worker_);
      thread_.join();
    }
  }
  // From here on this thread alone progresses the worker.
  progress_thread_id_.store(std::this_thread::get_id());

  std::vector<std::shared_ptr<Endpoint>> endpoints;
  {
    std::lock_guard<std::mutex> lock(endpoints_mu_);
    for (auto& weak : endpoints_) {
      if (auto endpoint = weak.lock()) {
        endpoints.push_back(std::move(endpoint));
      }
    }
    endpoints_.clear();
  }
  for (auto& endpoint : endpoints) {
    endpoint->close();
  }
  const auto deadline = std::chrono::steady_clock::now() + kCloseDrainTimeout;
  while (inflight_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    ucp_worker_progress(worker_);
    run_queued();
  }
  if (inflight_.load() > 0) {
    std::fprintf(stderr,
                 "kvstore._native: %lld operations still pending when the worker was destroyed\n",
                 static_cast<long long>(inflight_.load()));
  }
  run_queued();
  flush_before_destroy();
  // Remote keys come from the worker's memory pool: destroy them first.
  for (auto& endpoint : endpoints) {
    endpoint->destroy_remote_keys();
  }
  endpoints.clear();
  {
    std::lock_guard<std::mutex> lock(handle_mu_);
    ucp_worker_destroy(worker_);
    worker_ = nullptr;
  }
  closed_.store(true);
}

}  // namespace kvstore::native
