#include "copy.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "copy_hash.h"

namespace kvstore::native {

namespace {

// Ranges are claimed one at a time by whichever thread comes first: the
// caller always works too, so a batch completes even when every helper is
// busy with another batch (or, after fork(), does not exist).
struct Job {
  std::span<const CopyRange> ranges;
  std::uint64_t* out;
  bool streaming;
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> finished{0};
  std::mutex mu;
  std::condition_variable all_done;

  void work() noexcept {
    const std::size_t count = ranges.size();
    for (std::size_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      out[i] = detail::copy_hash(ranges[i].destination, ranges[i].source, ranges[i].size, streaming);
      if (finished.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }

  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    all_done.wait(lock, [this] { return finished.load() == ranges.size(); });
  }
};

// A few threads for the whole process, started on first use and never
// stopped (so nothing is torn down under them at exit). Leaked on purpose.
class HelperPool {
 public:
  static HelperPool& instance() {
    static std::mutex mu;
    static HelperPool* pool = nullptr;
    std::lock_guard<std::mutex> lock(mu);
    // A forked child inherits the pool but not its threads: start another.
    if (pool == nullptr || pool->pid_ != ::getpid()) {
      pool = new HelperPool();
    }
    return *pool;
  }

  // Runs `task` on `copies` helper threads, starting threads up to that many.
  void post(const std::shared_ptr<Job>& job, unsigned copies) {
    std::lock_guard<std::mutex> lock(mu_);
    while (threads_ < copies && threads_ < kMaxThreads) {
      std::thread([this] { run(); }).detach();
      ++threads_;
    }
    for (unsigned i = 0; i < copies; ++i) {
      queue_.push_back(job);
    }
    ready_.notify_all();
  }

 private:
  static constexpr unsigned kMaxThreads = 7;

  HelperPool() : pid_(::getpid()) {}

  void run() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [this] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job->work();  // nothing left to claim when the caller already finished it
    }
  }

  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<Job>> queue_;
  unsigned threads_ = 0;
};

}  // namespace

std::vector<std::uint64_t> copy_and_hash(std::span<const CopyRange> ranges, unsigned threads) {
  std::vector<std::uint64_t> checksums(ranges.size());
  std::size_t total = 0;
  for (const auto& range : ranges) {
    total += range.size;
  }
  const unsigned helpers =
      total < kParallelCopyMin
          ? 0
          : static_cast<unsigned>(std::min<std::size_t>(threads > 0 ? threads - 1 : 0, ranges.size() - 1));
  // Streaming stores pay off once a batch is too large to stay in the cache anyway.
  const bool streaming = total >= kStreamingCopyMin;
  if (helpers == 0) {
    for (std::size_t i = 0; i < ranges.size(); ++i) {
      checksums[i] = detail::copy_hash(ranges[i].destination, ranges[i].source, ranges[i].size, streaming);
    }
    return checksums;
  }
  auto job = std::make_shared<Job>();
  job->ranges = ranges;
  job->out = checksums.data();
  job->streaming = streaming;
  HelperPool::instance().post(job, helpers);
  job->work();
  job->wait();
  return checksums;
}

}  // namespace kvstore::native
