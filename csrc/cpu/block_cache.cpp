// Keeps the large CPU blocks that torch_secorder's own calls allocate, for the next call to reuse.
//
// Why: glibc hands big freed blocks back to the kernel (munmap, heap trimming), so every call
// pays page faults to touch fresh memory again: measured, most of a per-sample diagonal's time
// and a third of a CNN's. PyTorch's CUDA allocator caches blocks; its CPU allocator does not.
//
// How: at the first enter() this allocator wraps torch's CPU allocator. Allocations of at least
// kSmallestBlock bytes made on a thread inside enter()/leave() come from per-size free lists;
// everything else goes to the wrapped allocator unchanged. A block goes back to its free list
// when its tensor dies, whichever thread frees it. Two bounds keep memory honest:
//   * free bytes never exceed the limit (set_limit; 0 turns caching off), and
//   * free + live cached bytes never exceed 3/2 of the most the cache ever had live at once:
//     a miss first releases free blocks (largest first) until the new block fits under that.
// A request takes the smallest free block that fits, up to twice its size.
// empty() releases every free block and resets that peak.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace torch_secorder {
namespace {

constexpr size_t kSmallestBlock = size_t(1) << 20;
constexpr int64_t kDefaultLimit = int64_t(1) << 30;
// Free + live cached bytes stay within 3/2 of the most ever live at once: measured on the CNN benchmark, 1x
// left half the allocations missing (each call's sizes differ), 3/2 with the fit below missed none.
constexpr size_t kFootprintHalves = 3;
// A request may take a free block up to twice its size.
constexpr size_t kLargestFit = 2;

thread_local int64_t scope_depth = 0;

// Rounds up to a sixteenth of the next power of two: reuse across nearby sizes (a last, smaller
// chunk) at most 1/16 wasted.
size_t size_class(size_t nbytes) {
  size_t power = kSmallestBlock;
  while (power < nbytes) power <<= 1;
  const size_t step = power / 16;
  return (nbytes + step - 1) / step * step;
}

class BlockCache final : public c10::Allocator {
 public:
  explicit BlockCache(c10::Allocator* wrapped) : wrapped_(wrapped), wrapped_deleter_(wrapped->raw_deleter()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (scope_depth == 0 || nbytes < kSmallestBlock) return wrapped_->allocate(nbytes);
    const size_t bytes = size_class(nbytes);
    void* data = take(bytes);
    if (data == nullptr) data = make(bytes);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees `data` into its free list if the cache made it; hands anything else to the wrapped deleter
  // (raw_deallocate of blocks the wrapped allocator made comes here too).
  void give_back(void* data) {
    bool ours = false, keep = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = sizes_.find(data);
      if (found != sizes_.end()) {
        ours = true;
        const size_t bytes = found->second;
        live_ -= bytes;
        keep = free_bytes_ + bytes <= static_cast<size_t>(limit_);
        if (keep) {
          free_[bytes].push_back(data);
          free_bytes_ += bytes;
        } else {
          sizes_.erase(found);
        }
      }
    }
    if (!ours) return wrapped_deleter_(data);
    if (!keep) c10::free_cpu(data);
  }

  void empty() {
    release_free_blocks(0);
    std::lock_guard<std::mutex> lock(mutex_);
    live_peak_ = live_;
  }

  void set_limit(int64_t limit) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit;
    }
    release_free_blocks(static_cast<size_t>(limit));
  }

  // [free bytes, live bytes, live peak, limit, hits, misses]
  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(free_bytes_), static_cast<int64_t>(live_), static_cast<int64_t>(live_peak_),
            limit_, hits_, misses_};
  }

  static void release(void* data);

 private:
  // A new block of `bytes` (counted live by take); when the system refuses, the free blocks are handed back
  // and it is asked once more.
  void* make(size_t bytes) {
    void* data = nullptr;
    try {
      data = c10::alloc_cpu(bytes);
    } catch (const c10::Error&) {
      release_free_blocks(0);
      try {
        data = c10::alloc_cpu(bytes);
      } catch (const c10::Error&) {
        std::lock_guard<std::mutex> lock(mutex_);
        live_ -= bytes;
        throw;
      }
    }
    std::lock_guard<std::mutex> lock(mutex_);
    sizes_[data] = bytes;
    return data;
  }

  // Hands free blocks back to the system, largest first, until at most `keep` free bytes remain.
  void release_free_blocks(size_t keep) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_until(keep, to_free);
    }
    for (void* block : to_free) c10::free_cpu(block);
  }

  // A free block of `bytes` to twice that (counted live), or nullptr after making room for a new one.
  void* take(size_t bytes) {
    std::vector<void*> to_free;
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // the smallest free block that fits, if at most kLargestFit times the request
      auto bucket = free_.lower_bound(bytes);
      while (bucket != free_.end() && bucket->second.empty()) ++bucket;
      if (bucket != free_.end() && bucket->first <= kLargestFit * bytes) {
        data = bucket->second.back();
        bucket->second.pop_back();
        free_bytes_ -= bucket->first;
        live_ += bucket->first;
        ++hits_;
      } else {
        ++misses_;
        live_ += bytes;
        live_peak_ = std::max(live_peak_, live_);
        evict_until(kFootprintHalves * live_peak_ / 2 - live_, to_free);
      }
    }
    for (void* block : to_free) c10::free_cpu(block);
    return data;
  }

  // Releases free blocks, largest first, until at most `keep` free bytes remain (mutex held).
  void evict_until(size_t keep, std::vector<void*>& to_free) {
    for (auto bucket = free_.rbegin(); bucket != free_.rend() && free_bytes_ > keep; ++bucket) {
      while (!bucket->second.empty() && free_bytes_ > keep) {
        void* block = bucket->second.back();
        bucket->second.pop_back();
        sizes_.erase(block);
        free_bytes_ -= bucket->first;
        to_free.push_back(block);
      }
    }
  }

  c10::Allocator* wrapped_;
  c10::DeleterFnPtr wrapped_deleter_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> sizes_;      // every block the cache made that is live or free
  std::map<size_t, std::vector<void*>> free_;    // size class -> free blocks
  size_t free_bytes_ = 0, live_ = 0, live_peak_ = 0;
  int64_t limit_ = kDefaultLimit, hits_ = 0, misses_ = 0;
};

BlockCache* cache = nullptr;  // made once, never destroyed: blocks may be freed at interpreter exit
std::once_flag installed;

void BlockCache::release(void* data) { cache->give_back(data); }

// Wraps torch's CPU allocator once (not when it has no raw deleter to forward to).
void install() {
  std::call_once(installed, [] {
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current->raw_deleter() == nullptr) return;
    cache = new BlockCache(current);
    c10::SetCPUAllocator(cache, /*priority=*/0);
  });
}

void block_cache_enter() {
  install();
  ++scope_depth;
}

void block_cache_leave() { scope_depth = std::max<int64_t>(scope_depth - 1, 0); }

void block_cache_empty() {
  if (cache != nullptr) cache->empty();
}

void block_cache_set_limit(int64_t limit) {
  TORCH_CHECK(limit >= 0, "limit must be a number of bytes >= 0, got ", limit);
  install();
  if (cache != nullptr) cache->set_limit(limit);
}

std::vector<int64_t> block_cache_info() {
  if (cache == nullptr) return {0, 0, 0, kDefaultLimit, 0, 0};
  return cache->info();
}

}  // namespace

// No tensor arguments, so no backend dispatch: the kernels are registered with the schemas.
TORCH_LIBRARY_FRAGMENT(torch_secorder, m) {
  m.def("block_cache_enter() -> ()", &block_cache_enter);
  m.def("block_cache_leave() -> ()", &block_cache_leave);
  m.def("block_cache_empty() -> ()", &block_cache_empty);
  m.def("block_cache_set_limit(int limit) -> ()", &block_cache_set_limit);
  m.def("block_cache_info() -> int[]", &block_cache_info);
}

}  // namespace torch_secorder
