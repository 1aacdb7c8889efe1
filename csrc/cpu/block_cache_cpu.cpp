// A cache of large CPU blocks for training steps: torch's CPU allocator, with every
// allocation of kMinBlock bytes or more served from blocks this cache maps itself and keeps
// when they are freed, for the next allocation of the same size class.
//
// Why: a training step frees and re-allocates the same activation sizes every step, and
// glibc serves them from its heap (its mmap threshold rises to 32 MB once a model is
// loaded), where they fragment it: on SmolLM2-135M at 1x1024 tokens in float32 the heap
// grew to 1.76 GiB with at most 0.98 GiB in use (benchmarks/README.md). Mapping each large
// block instead (a fixed mmap threshold) ends the fragmentation but pays fresh pages' faults
// on every allocation (14% of the step). Cached blocks are reused without either.
//
// Bound: blocks are kept only while everything mapped (in use and cached) stays within the
// most ever in use at once; a miss first unmaps cached blocks of other sizes until the new
// block fits under that bound, so a change of shapes (another sequence length, evaluation)
// cannot grow the cache beyond the peak the process already needed.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace qlora_kernels::cpu {
namespace {

constexpr size_t kMinBlock = size_t(1) << 20;  // smaller ones: the previous allocator
constexpr size_t kPage = 4096;

// Size classes: 16 per power of two (at most 1/16 = 6.25% of a block unused), so that
// nearby sizes (sequence lengths of one batch to the next) share blocks.
size_t size_class(size_t n) {
  size_t pow2 = kMinBlock;
  while (pow2 < n) pow2 <<= 1;
  const size_t step = std::max(pow2 / 32, kPage);  // n is in (pow2 / 2, pow2]
  return (n + step - 1) / step * step;
}

class BlockCache final : public c10::Allocator {
 public:
  explicit BlockCache(c10::Allocator* previous) : previous_(previous) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBlock || !enabled_.load()) return previous_->allocate(n);
    const size_t size = size_class(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        ++hits_;
      } else {
        evict_for(size);
        ++misses_;
      }
      if (p != nullptr) note_live(p, size);
    }
    if (p == nullptr) {
      p = map_block(size);
      std::lock_guard<std::mutex> lock(mutex_);
      mapped_ += size;
      note_live(p, size);
    }
    c10::profiledCPUMemoryReporter().New(p, n);
    return {p, p, &delete_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &delete_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // in use, cached, most in use at once, hits, misses (bytes and counts)
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(live_bytes_), int64_t(cached_), int64_t(peak_live_), int64_t(hits_),
            int64_t(misses_)};
  }

  // Unmaps every cached block (the blocks in use stay valid).
  void release_cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [size, blocks] : free_) {
      for (void* b : blocks) unmap_block(b, size);
      blocks.clear();
    }
    cached_ = 0;
  }

  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

 private:
  static void delete_block(void* p);

  void free_block(void* p) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(p);
      if (it != live_.end()) {
        const size_t size = it->second;
        live_.erase(it);
        live_bytes_ -= size;
        if (enabled_.load()) {
          free_[size].push_back(p);
          cached_ += size;
        } else {
          unmap_block(p, size);
        }
        c10::profiledCPUMemoryReporter().Delete(p);
        return;
      }
    }
    // Not one of ours: torch's raw_deallocate() frees through the allocator installed now,
    // and oneDNN's buffers allocated before this cache was (by the previous allocator's
    // raw_allocate) come back here. The previous allocator's own deleter frees them.
    c10::DeleterFnPtr previous_deleter = previous_->raw_deleter();
    TORCH_INTERNAL_ASSERT(previous_deleter != nullptr,
                          "block cache: a raw pointer it did not give out, and the previous "
                          "CPU allocator has no raw deleter");
    previous_deleter(p);
  }

  void note_live(void* p, size_t size) {
    live_[p] = size;
    live_bytes_ += size;
    peak_live_ = std::max(peak_live_, live_bytes_);
  }

  // Unmaps cached blocks (the size class holding the most bytes first) until a new block of
  // `size` keeps everything mapped within the peak in use (or nothing is cached).
  void evict_for(size_t size) {
    const size_t bound = std::max(peak_live_, live_bytes_ + size);
    while (cached_ > 0 && mapped_ + size > bound) {
      auto victim = free_.end();
      size_t most = 0;
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        const size_t bytes = it->first * it->second.size();
        if (bytes > most) most = bytes, victim = it;
      }
      unmap_block(victim->second.back(), victim->first);
      victim->second.pop_back();
      cached_ -= victim->first;
    }
  }

  static void* map_block(size_t size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "block cache: out of memory mapping ", size, " bytes");
    return p;
  }

  void unmap_block(void* p, size_t size) {
    munmap(p, size);
    mapped_ -= size;
  }

  c10::Allocator* previous_;
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
  size_t live_bytes_ = 0, cached_ = 0, mapped_ = 0, peak_live_ = 0, hits_ = 0, misses_ = 0;

 public:
  std::atomic<bool> enabled_{false};  // false: freed blocks are unmapped (after disable)
};

// Never destroyed: tensors it gave out may be freed at any time, even at exit.
BlockCache* the_cache = nullptr;
std::mutex install_mutex;

void BlockCache::delete_block(void* p) { the_cache->free_block(p); }

// A child forked while another thread held the cache's lock would wait for it forever (a
// DataLoader worker's first large tensor): hold it across fork(), as glibc does its arenas'.
void lock_for_fork() { the_cache->lock(); }
void unlock_after_fork() { the_cache->unlock(); }

// Turns the cache on or off. It stays torch's CPU allocator once installed, passing every
// allocation to the previous one while off: raw_deallocate() frees through whichever
// allocator is installed at the time, so uninstalling it would hand its blocks to the C
// library's free() (and the previous allocator's raw pointers keep coming back here).
void cpu_block_cache_enable(bool enable) {
  std::lock_guard<std::mutex> lock(install_mutex);
  if (the_cache == nullptr) {
    if (!enable) return;
    the_cache = new BlockCache(c10::GetCPUAllocator());
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
    c10::SetCPUAllocator(the_cache, /*priority=*/0);
  }
  the_cache->enabled_ = enable;
  if (!enable) the_cache->release_cached();
}

std::vector<int64_t> cpu_block_cache_stats() {
  std::lock_guard<std::mutex> lock(install_mutex);
  const bool on = the_cache != nullptr && the_cache->enabled_.load();
  std::vector<int64_t> out{int64_t(on)};
  const std::vector<int64_t> s =
      the_cache ? the_cache->stats() : std::vector<int64_t>(5, 0);
  out.insert(out.end(), s.begin(), s.end());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora_kernels, CompositeExplicitAutograd, m) {
  m.impl("cpu_block_cache_enable", &cpu_block_cache_enable);
  m.impl("cpu_block_cache_stats", &cpu_block_cache_stats);
}

}  // namespace qlora_kernels::cpu
