// Reports how many threads at::parallel_for really used in this library.
// at::parallel_for is a header template: without -fopenmp at *our* compile
// time its OpenMP pragma is dropped and every kernel silently runs on one
// thread. Tests call this to make sure the build flags are right.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <thread>

namespace torch_secorder {
namespace {

int64_t parallel_threads_used(int64_t work_items) {
  std::mutex mutex;
  std::set<std::thread::id> seen;
  at::parallel_for(0, work_items, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    // Keep each chunk busy a little so that all threads get a share.
    volatile double sink = 0;
    for (int64_t i = begin; i < end; ++i)
      for (int k = 0; k < 200000; ++k) sink = sink + 1.0;
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torch_secorder, m) {
  m.def("parallel_threads_used(int work_items) -> int", &parallel_threads_used);
}

}  // namespace torch_secorder
