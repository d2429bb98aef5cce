// ParallelFor for tljax's XLA FFI CPU kernels: fixed work items shared between the calling
// thread and XLA's intra-op thread pool.
#ifndef TLJAX_NATIVE_PARALLEL_FOR_H_
#define TLJAX_NATIVE_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace tljax {

// Runs body(i) for i in [0, count): the caller and up to num_threads pool tasks claim indices
// from one counter. The caller waits only for indices already claimed, so a pool task that
// starts late (or never, while its threads are busy) cannot hold it up; the shared state
// outlives the call for such a task.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count,
                        const std::function<void(int64_t)>& body) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
    int64_t count;
    const std::function<void(int64_t)>* body;
  };
  auto state = std::make_shared<State>();
  state->count = count;
  state->body = &body;
  auto work = [](State& st) {
    int64_t finished = 0;
    for (int64_t i; (i = st.next.fetch_add(1)) < st.count;) {
      (*st.body)(i);
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(st.mu);
      st.done += finished;
      if (st.done == st.count) st.cv.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, work] { work(*state); });
  }
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->count; });
}

}  // namespace tljax

#endif  // TLJAX_NATIVE_PARALLEL_FOR_H_
