// A small persistent thread pool for the CPU kernels (host only).
//
// The kernels split their chunk table into contiguous ranges, one per worker; the
// calling thread is worker 0. Threads are created once and reused, because a batch
// of tiny tensors finishes in microseconds, less than starting a thread costs.
// After fork() the child gets a fresh pool (the parent's threads do not exist there).
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fastmerge {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(w) for w in [0, n) on n threads (capped at num_threads()) and waits.
  void run(int n, const std::function<void(int)>& fn);

 private:
  void worker_loop(int index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::mutex run_mutex_;  // one parallel region at a time
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int)>* task_ = nullptr;
  int64_t generation_ = 0;
  int active_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

// The process-wide pool; created on first use with default_num_threads() threads.
ThreadPool& global_pool();
// FASTMERGE_NUM_THREADS if set, else the number of hardware threads.
int default_num_threads();
void set_num_threads(int n);
int get_num_threads();

// Splits [0, total) into at most get_num_threads() ranges of about equal weight and
// runs body(begin, end) on each. `weight_prefix` has total + 1 entries (an exclusive
// prefix sum of the items' weights); ranges are cut where the weight crosses w/T.
void parallel_ranges(int64_t total, const std::vector<int64_t>& weight_prefix,
                     int64_t min_weight_per_thread,
                     const std::function<void(int64_t, int64_t)>& body);

}  // namespace fastmerge
