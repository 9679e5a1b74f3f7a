// Large outputs (y, dx) from a cache of already-mapped buffers.
//
// A fresh large buffer is fresh memory: glibc maps every allocation of more than 32 MiB (and
// smaller ones once its heap is trimmed) straight from the operating system and unmaps it on
// free, so the first write to each page faults into the operating system, which zeroes the page
// before these kernels write it. From 64 MiB that was a fifth to a quarter of a forward+backward's time
// (bench/RESULTS.md), paid again every training step, since every step frees and allocates the
// same outputs. PyTorch's CPU allocator does the same (its own native batch norm pays it too);
// the CUDA caching allocator is the usual remedy on GPUs, and this is a small one of the same
// kind for the outputs of these kernels only:
//
// - an output of kCachedOutputBytes or more takes a held buffer of at least its size (and at
//   most a quarter more) when one is free, else a new one: 2 MiB-aligned, its size rounded up to
//   2 MiB, and advised to be backed by transparent huge pages (madvise(MADV_HUGEPAGE)), so that
//   its first faults map 2 MiB at a time (where transparent huge pages are off, nothing changes);
// - a freed output's buffer is held for the next output, up to a limit of held bytes (1 GiB
//   unless set; torch_bn.cpp.set_output_cache_limit), the least recently freed going back to
//   the system first. Held buffers are only ever memory these outputs had in use before.
// - smaller outputs are PyTorch's own CPU allocations.
//
// Values are the same either way: an output is written whole before it is returned.

#include "outputs.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace torch_bn_cpp {
namespace {

constexpr size_t kHugePage = size_t(1) << 21;
constexpr int64_t kDefaultLimitBytes = int64_t(1) << 30;

struct Buffer {
  void* ptr;
  size_t bytes;
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() {
#if defined(__linux__)
    // A process forked while another thread holds the lock (a DataLoader worker, say) would
    // inherit it held: take it around fork, so the child starts with it free.
    pthread_atfork([] { instance().lock_.lock(); }, [] { instance().lock_.unlock(); },
                   [] { instance().lock_.unlock(); });
#endif
  }

  // Never destroyed: tensors freed while the process exits still return their buffers here.
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < size_t(kCachedOutputBytes)) return c10::GetCPUAllocator()->allocate(n);  // e.g. a resize_
    const size_t bytes = (n + kHugePage - 1) & ~(kHugePage - 1);
    Buffer* buffer = take(bytes);
    if (buffer == nullptr) buffer = fresh(bytes, n);
    report(buffer, static_cast<int64_t>(buffer->bytes));
    return {buffer->ptr, buffer, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputCacheInfo info() {
    std::lock_guard<std::mutex> guard(lock_);
    return {cached_bytes_, limit_bytes_, hits_, misses_};
  }

  // Sets the limit and gives held buffers back down to it; returns the bytes given back.
  int64_t set_limit(int64_t bytes) {
    std::vector<Buffer*> freed;
    {
      std::lock_guard<std::mutex> guard(lock_);
      limit_bytes_ = bytes;
      evict_down_to(bytes, freed);
    }
    return free_all(freed);
  }

  // Gives held buffers back to the system, least recently freed first, until at most `keep`
  // bytes are held; returns the bytes given back.
  int64_t evict(int64_t keep) {
    std::vector<Buffer*> freed;
    {
      std::lock_guard<std::mutex> guard(lock_);
      evict_down_to(keep, freed);
    }
    return free_all(freed);
  }

 private:
  // The smallest held buffer that fits `bytes` and wastes at most a quarter of them, taken out.
  Buffer* take(size_t bytes) {
    std::lock_guard<std::mutex> guard(lock_);
    auto best = held_.end();
    for (auto it = held_.begin(); it != held_.end(); ++it) {
      if ((*it)->bytes >= bytes && (*it)->bytes <= bytes + bytes / 4 &&
          (best == held_.end() || (*it)->bytes < (*best)->bytes)) {
        best = it;
      }
    }
    if (best == held_.end()) {
      ++misses_;
      return nullptr;
    }
    Buffer* buffer = *best;
    held_.erase(best);
    cached_bytes_ -= static_cast<int64_t>(buffer->bytes);
    in_use_bytes_ += static_cast<int64_t>(buffer->bytes);
    ++hits_;
    return buffer;
  }

  // A new buffer of `bytes` (2 MiB-aligned); when memory is short, the held buffers go back
  // to the system first.
  Buffer* fresh(size_t bytes, size_t requested) {
    void* ptr = std::aligned_alloc(kHugePage, bytes);
    if (ptr == nullptr) {
      evict(0);
      ptr = std::aligned_alloc(kHugePage, bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, ptr != nullptr, "torch_bn: out of memory: could not allocate ", requested,
                     " bytes for a batch-norm output");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, bytes, MADV_HUGEPAGE);  // advice: a failure changes nothing but speed
#endif
    std::lock_guard<std::mutex> guard(lock_);
    in_use_bytes_ += static_cast<int64_t>(bytes);
    return new Buffer{ptr, bytes};
  }

  static void release(void* context) {
    auto* buffer = static_cast<Buffer*>(context);
    OutputCache& cache = instance();
    cache.report(buffer, -static_cast<int64_t>(buffer->bytes));
    std::vector<Buffer*> freed;
    {
      std::lock_guard<std::mutex> guard(cache.lock_);
      cache.in_use_bytes_ -= static_cast<int64_t>(buffer->bytes);
      cache.held_.push_back(buffer);  // the most recently freed last
      cache.cached_bytes_ += static_cast<int64_t>(buffer->bytes);
      cache.evict_down_to(cache.limit_bytes_, freed);
    }
    free_all(freed);
  }

  // Called with the lock held: moves the least recently freed buffers into `freed` until at
  // most `keep` bytes are held.
  void evict_down_to(int64_t keep, std::vector<Buffer*>& freed) {
    size_t first_kept = 0;
    while (cached_bytes_ > keep && first_kept < held_.size()) {
      cached_bytes_ -= static_cast<int64_t>(held_[first_kept]->bytes);
      freed.push_back(held_[first_kept++]);
    }
    held_.erase(held_.begin(), held_.begin() + static_cast<std::ptrdiff_t>(first_kept));
  }

  // Returns the buffers to the system, outside the lock; returns their bytes.
  static int64_t free_all(const std::vector<Buffer*>& buffers) {
    int64_t bytes = 0;
    for (Buffer* buffer : buffers) {
      bytes += static_cast<int64_t>(buffer->bytes);
      std::free(buffer->ptr);
      delete buffer;
    }
    return bytes;
  }

  // torch.profiler's memory view (profile_memory=True) sees these outputs as PyTorch's own.
  void report(const Buffer* buffer, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    int64_t in_use = 0, cached = 0;
    {
      std::lock_guard<std::mutex> guard(lock_);
      in_use = in_use_bytes_;
      cached = cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(buffer->ptr, delta, static_cast<size_t>(in_use),
                                     static_cast<size_t>(in_use + cached), c10::Device(c10::DeviceType::CPU));
  }

  std::mutex lock_;
  std::vector<Buffer*> held_;  // free buffers, least recently freed first
  int64_t cached_bytes_ = 0, in_use_bytes_ = 0, limit_bytes_ = kDefaultLimitBytes, hits_ = 0, misses_ = 0;
};

}  // namespace

at::TensorBase empty_output(const at::TensorBase& x, at::MemoryFormat format) {
  if (static_cast<int64_t>(x.nbytes()) < kCachedOutputBytes) {
    return at::detail::empty_cpu(x.sizes(), x.scalar_type(), /*pin_memory=*/false, format);
  }
  return at::detail::empty_generic(x.sizes(), &OutputCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   x.scalar_type(), format);
}

OutputCacheInfo output_cache_info() { return OutputCache::instance().info(); }

int64_t set_output_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "torch_bn: the output cache's limit is a number of bytes >= 0, got ", bytes);
  return OutputCache::instance().set_limit(bytes);
}

int64_t empty_output_cache() { return OutputCache::instance().evict(0); }

}  // namespace torch_bn_cpp
