#include "copy.h"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
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
  std::size_t count = 0;
  std::function<void(std::size_t)> task;  // does range i; never throws
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> finished{0};
  std::mutex mu;
  std::condition_variable all_done;

  void work() noexcept {
    for (std::size_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      task(i);
      if (finished.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }

  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    all_done.wait(lock, [this] { return finished.load() == count; });
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

// Runs task(i) for every i < count: on the calling thread alone, or helped by
// up to `threads - 1` pool threads when `total` bytes are worth it.
void run(std::size_t count, std::size_t total, unsigned threads, std::function<void(std::size_t)> task) {
  const unsigned helpers =
      total < kParallelCopyMin || count == 0
          ? 0
          : static_cast<unsigned>(std::min<std::size_t>(threads > 0 ? threads - 1 : 0, count - 1));
  if (helpers == 0) {
    for (std::size_t i = 0; i < count; ++i) {
      task(i);
    }
    return;
  }
  auto job = std::make_shared<Job>();
  job->count = count;
  job->task = std::move(task);
  HelperPool::instance().post(job, helpers);
  job->work();
  job->wait();
}

template <typename Range>
std::size_t total_of(std::span<const Range> ranges) {
  std::size_t total = 0;
  for (const auto& range : ranges) {
    total += range.size;
  }
  return total;
}

// One block to or from process `pid`, piece by piece; 0 or the errno.
int process_copy(pid_t pid, const ProcessRange& range, bool read, std::uint64_t& checksum) noexcept {
  detail::StreamingHash hash;
  std::size_t done = 0;
  while (done < range.size) {
    const std::size_t piece = std::min(kProcessCopyPiece, range.size - done);
    std::byte* local_piece = range.local + done;
    if (!read) {
      hash.update(local_piece, piece);
    }
    std::size_t moved = 0;
    while (moved < piece) {
      iovec local{local_piece + moved, piece - moved};
      iovec remote{reinterpret_cast<void*>(static_cast<std::uintptr_t>(range.remote + done + moved)), piece - moved};
      const ssize_t n = read ? ::process_vm_readv(pid, &local, 1, &remote, 1, 0)
                             : ::process_vm_writev(pid, &local, 1, &remote, 1, 0);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n <= 0) {
        return n < 0 ? errno : EFAULT;  // nothing moved: the rest of the range is not mapped
      }
      moved += static_cast<std::size_t>(n);
    }
    if (read) {
      hash.update(local_piece, piece);
    }
    done += piece;
  }
  checksum = hash.digest();
  return 0;
}

ProcessCopy process_copies(pid_t pid, std::span<const ProcessRange> ranges, unsigned threads, bool read) {
  ProcessCopy result;
  result.checksums.assign(ranges.size(), 0);
  std::vector<int> errors(ranges.size(), 0);
  std::atomic<bool> failed{false};
  run(ranges.size(), total_of(ranges), threads, [&](std::size_t i) {
    if (failed.load(std::memory_order_relaxed)) {
      errors[i] = ECANCELED;  // a block before it failed: the request fails anyway
      return;
    }
    errors[i] = process_copy(pid, ranges[i], read, result.checksums[i]);
    if (errors[i] != 0) {
      failed.store(true, std::memory_order_relaxed);
    }
  });
  for (std::size_t i = 0; i < errors.size(); ++i) {
    if (errors[i] != 0 && errors[i] != ECANCELED) {
      result.failed = static_cast<std::ptrdiff_t>(i);
      result.error = errors[i];
      break;
    }
  }
  return result;
}

}  // namespace

std::vector<std::uint64_t> copy_and_hash(std::span<const CopyRange> ranges, unsigned threads) {
  std::vector<std::uint64_t> checksums(ranges.size());
  // Streaming stores pay off once a batch is too large to stay in the cache anyway.
  const std::size_t total = total_of(ranges);
  const bool streaming = total >= kStreamingCopyMin;
  run(ranges.size(), total, threads, [&](std::size_t i) {
    checksums[i] = detail::copy_hash(ranges[i].destination, ranges[i].source, ranges[i].size, streaming);
  });
  return checksums;
}

ProcessCopy read_process_and_hash(pid_t pid, std::span<const ProcessRange> ranges, unsigned threads) {
  return process_copies(pid, ranges, threads, true);
}

ProcessCopy write_process_and_hash(pid_t pid, std::span<const ProcessRange> ranges, unsigned threads) {
  return process_copies(pid, ranges, threads, false);
}

}  // namespace kvstore::native
