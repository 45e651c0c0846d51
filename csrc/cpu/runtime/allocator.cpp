// See allocator.h.
#include "cpu/runtime/allocator.h"

#include "runtime_config.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace torch_ext::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

// The bound on cached bytes: the config's cpu_cache_bytes, read at each release.
size_t cache_limit() { return size_t(runtime_config().get(Switch::CpuCacheBytes)); }

struct Block {
  void* ptr;
  size_t capacity;  // bytes, a multiple of kHugePage
};

size_t whole_huge_pages(size_t nbytes) { return (nbytes + kHugePage - 1) / kHugePage * kHugePage; }

// Huge pages for the whole 2 MiB pages that the first `nbytes` of a new block fill, 4 KiB pages
// past them: a last, partly filled huge page would be resident whole once touched (up to 2 MiB
// more than the tensor), where PyTorch's allocator maps only the pages its tensor touches.
// Advice only: without THP the pages stay 4 KiB.
void advise_pages(void* ptr, size_t capacity, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t huge = nbytes / kHugePage * kHugePage;
  if (huge > 0) madvise(ptr, huge, MADV_HUGEPAGE);
  if (capacity > huge) madvise(static_cast<char*>(ptr) + huge, capacity - huge, MADV_NOHUGEPAGE);
#endif
}

// A block of whole huge pages for nbytes.
Block allocate_huge(size_t nbytes) {
  const size_t capacity = whole_huge_pages(nbytes);
  void* ptr = nullptr;
  TORCH_CHECK(posix_memalign(&ptr, kHugePage, capacity) == 0 && ptr != nullptr, "torch_ext: out of memory allocating ",
              capacity, " bytes");
  advise_pages(ptr, capacity, nbytes);
  return {ptr, capacity};
}

// Freed large blocks, most recent last. Leaked on purpose (never destroyed), so tensors that
// outlive static destruction at exit can still return their blocks.
class BlockCache {
 public:
  Block take(size_t nbytes) {
    const size_t capacity = whole_huge_pages(nbytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest cached block that fits without wasting more than a quarter of it.
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->capacity >= capacity && it->capacity - capacity <= it->capacity / 4 &&
            (best == free_.end() || it->capacity < best->capacity))
          best = it;
      }
      if (best != free_.end()) {
        Block block = *best;
        free_.erase(best);
        cached_ -= block.capacity;
        return block;
      }
    }
    return allocate_huge(nbytes);
  }

  void give_back(Block block) {
    std::deque<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const size_t limit = cache_limit();
      if (block.capacity > limit) {
        evicted.push_back(block);
      } else {
        free_.push_back(block);
        cached_ += block.capacity;
        evict_beyond(limit, evicted);
      }
    }
    for (const Block& b : evicted) std::free(b.ptr);
  }

  // Frees the blocks beyond the current limit (after the config lowered it); returns their bytes.
  size_t trim() {
    std::deque<Block> evicted;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const size_t before = cached_;
      evict_beyond(cache_limit(), evicted);
      bytes = before - cached_;
    }
    for (const Block& b : evicted) std::free(b.ptr);
    return bytes;
  }

  size_t clear() {
    std::deque<Block> all;
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (const Block& b : all) std::free(b.ptr);
    return bytes;
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  // With mutex_ held: moves the least recently freed blocks to `evicted` until cached_ <= limit.
  void evict_beyond(size_t limit, std::deque<Block>& evicted) {
    while (cached_ > limit) {
      cached_ -= free_.front().capacity;
      evicted.push_back(free_.front());
      free_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<Block> free_;
  size_t cached_ = 0;
};

BlockCache& cache() {
  static BlockCache* instance = new BlockCache();
  return *instance;
}

// Both allocators below: requests under `min_bytes` (e.g. a storage resized to small) go to
// PyTorch's CPU allocator, larger ones get a block of whole huge pages from `acquire(nbytes)`,
// handed back through `release`. Each DataPtr carries its own deleter, so the kinds mix freely.
class HugePageAllocator final : public c10::Allocator {
 public:
  HugePageAllocator(size_t min_bytes, Block (*acquire)(size_t nbytes), c10::DeleterFnPtr release)
      : min_bytes_(min_bytes), acquire_(acquire), release_(release) {}

  size_t min_bytes() const { return min_bytes_; }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < min_bytes_) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    Block* block = new Block(acquire_(nbytes));
    return {block->ptr, block, release_, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  size_t min_bytes_;
  Block (*acquire_)(size_t);
  c10::DeleterFnPtr release_;
};

// Outputs: from the cache, back to it when freed.
Block take_cached(size_t nbytes) { return cache().take(nbytes); }

void release_to_cache(void* ctx) {
  Block* block = static_cast<Block*>(ctx);
  cache().give_back(*block);
  delete block;
}

#if defined(__linux__)
// Scratch: mapped on its own (2 MiB-aligned inside a slightly larger mapping) and unmapped when
// freed, so the memory goes back to the system at once whatever malloc's thresholds are.
Block map_block(size_t nbytes) {
  const size_t capacity = whole_huge_pages(nbytes);
  const size_t mapped = capacity + kHugePage;
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(base != MAP_FAILED, "torch_ext: out of memory allocating ", capacity, " bytes");
  const uintptr_t start = reinterpret_cast<uintptr_t>(base);
  const uintptr_t aligned = whole_huge_pages(start);
  if (aligned > start) munmap(base, aligned - start);
  const uintptr_t end = start + mapped;
  if (end > aligned + capacity) munmap(reinterpret_cast<void*>(aligned + capacity), end - aligned - capacity);
  void* ptr = reinterpret_cast<void*>(aligned);
  advise_pages(ptr, capacity, nbytes);
  return {ptr, capacity};
}

void unmap_block(void* ctx) {
  Block* block = static_cast<Block*>(ctx);
  munmap(block->ptr, block->capacity);
  delete block;
}
#endif

// at::empty(sizes, options), from `allocator` when it is given and the tensor is a CPU one of its
// min_bytes or more.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options, HugePageAllocator* allocator) {
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (allocator != nullptr && options.device().is_cpu() && nbytes >= allocator->min_bytes())
    return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  return at::empty(sizes, options);
}

}  // namespace

at::Tensor empty_cpu_scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  static HugePageAllocator allocator(kScratchMinBytes, &map_block, &unmap_block);
  return empty_large(sizes, options, &allocator);
#else
  return empty_large(sizes, options, nullptr);
#endif
}

at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static HugePageAllocator allocator(kCachedOutputMinBytes, &take_cached, &release_to_cache);
  return empty_large(sizes, options, &allocator);
}

size_t empty_cache() { return cache().clear(); }

size_t cached_bytes() { return cache().cached(); }

size_t trim_cache() { return cache().trim(); }

}  // namespace torch_ext::cpu
