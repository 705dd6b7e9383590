#include "fastmerge/parallel.h"

#include <pthread.h>

#include <cstdlib>
#include <memory>

namespace fastmerge {

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::worker_loop(int index) {
  int64_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    if (index >= active_) continue;  // this region needs fewer threads
    const auto* task = task_;
    lock.unlock();
    (*task)(index);
    lock.lock();
    if (--pending_ == 0) done_.notify_one();
  }
}

void ThreadPool::run(int n, const std::function<void(int)>& fn) {
  n = std::min(n, num_threads());
  if (n <= 1) {
    fn(0);
    return;
  }
  std::lock_guard<std::mutex> region(run_mutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    task_ = &fn;
    active_ = n;
    pending_ = n - 1;
    ++generation_;
  }
  wake_.notify_all();
  fn(0);
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return pending_ == 0; });
}

namespace {

std::mutex g_pool_mutex;
ThreadPool* g_pool = nullptr;  // leaked on purpose: workers must not be joined at exit
int g_requested_threads = 0;

void reset_after_fork() {
  // The child has only the forking thread; the parent's workers are gone.
  g_pool = nullptr;
}

}  // namespace

int default_num_threads() {
  if (const char* env = std::getenv("FASTMERGE_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  // Read once: glibc answers hardware_concurrency from sysfs on every call (microseconds),
  // which tiny ops would pay on each call before the pool exists.
  static const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

ThreadPool& global_pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool == nullptr) {
    static bool registered = (pthread_atfork(nullptr, nullptr, reset_after_fork), true);
    (void)registered;
    g_pool = new ThreadPool(g_requested_threads > 0 ? g_requested_threads : default_num_threads());
  }
  return *g_pool;
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_requested_threads = n > 0 ? n : default_num_threads();
  if (g_pool != nullptr && g_pool->num_threads() != g_requested_threads) {
    delete g_pool;
    g_pool = nullptr;
  }
}

int get_num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool != nullptr) return g_pool->num_threads();
  return g_requested_threads > 0 ? g_requested_threads : default_num_threads();
}

void parallel_ranges(int64_t total, const std::vector<int64_t>& weight_prefix,
                     int64_t min_weight_per_thread,
                     const std::function<void(int64_t, int64_t)>& body) {
  if (total <= 0) return;
  const int64_t weight = weight_prefix[total];
  int threads = get_num_threads();
  if (min_weight_per_thread > 0) {
    threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, weight / min_weight_per_thread)));
  }
  threads = static_cast<int>(std::min<int64_t>(threads, total));
  if (threads <= 1) {
    body(0, total);
    return;
  }
  // Cut points: the first item whose prefix weight reaches w * weight / threads.
  std::vector<int64_t> cuts(threads + 1, total);
  cuts[0] = 0;
  for (int w = 1; w < threads; ++w) {
    const int64_t target = weight * w / threads;
    cuts[w] = std::lower_bound(weight_prefix.begin(), weight_prefix.begin() + total + 1, target) -
              weight_prefix.begin();
  }
  global_pool().run(threads, [&](int w) {
    if (cuts[w] < cuts[w + 1]) body(cuts[w], cuts[w + 1]);
  });
}

}  // namespace fastmerge
