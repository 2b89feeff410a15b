#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace layernorm {
namespace {

constexpr size_t kMinBytes = size_t(32) << 20;  // glibc's largest mmap threshold: below it, malloc reuses memory
constexpr size_t kHugePage = size_t(2) << 20;

size_t physical_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? size_t(pages) * size_t(page) : size_t(8) << 30;
}

struct Block {
  void* ptr;
  size_t bytes;  // rounded up to whole huge pages
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : cap_(std::min<size_t>(size_t(1) << 30, physical_memory() / 8)) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = take(bytes);
    if (block == nullptr) {
      void* ptr = nullptr;
      TORCH_CHECK(posix_memalign(&ptr, kHugePage, bytes) == 0, "layernorm: out of memory allocating ", bytes,
                  " bytes");
      madvise(ptr, bytes, MADV_HUGEPAGE);  // 512x fewer page faults on first touch, where THP is on
      block = new Block{ptr, bytes};
    }
    return {block->ptr, block, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_bytes_, free_.size(), cap_, kMinBytes};
  }

  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& entry : free_) {
      std::free(entry.second->ptr);
      delete entry.second;
    }
    free_.clear();
    cached_bytes_ = 0;
  }

 public:
  static OutputCache& instance();

 private:

  static void give_back(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    OutputCache& cache = instance();
    std::lock_guard<std::mutex> lock(cache.mu_);
    if (cache.cached_bytes_ + block->bytes <= cache.cap_) {
      cache.free_.emplace(block->bytes, block);
      cache.cached_bytes_ += block->bytes;
      return;
    }
    std::free(block->ptr);
    delete block;
  }

  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    Block* block = it->second;
    free_.erase(it);
    cached_bytes_ -= block->bytes;
    return block;
  }

  std::mutex mu_;
  std::multimap<size_t, Block*> free_;
  size_t cached_bytes_ = 0;
  const size_t cap_;
};

OutputCache& OutputCache::instance() {
  static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive static destructors
  return *cache;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const at::ScalarType dtype = c10::typeMetaToScalarType(options.dtype());
  size_t nbytes = c10::elementSize(dtype);
  for (int64_t s : sizes) nbytes *= static_cast<size_t>(s);
  if (nbytes < kMinBytes) return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  return at::Tensor(at::detail::empty_generic(sizes, &OutputCache::instance(),
                                              c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                              at::MemoryFormat::Contiguous));
}

OutputCacheStats output_cache_stats() { return OutputCache::instance().stats(); }

void release_output_cache() { OutputCache::instance().release(); }

}  // namespace layernorm
