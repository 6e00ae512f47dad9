#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstdlib>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace coordgate {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;

size_t cache_limit_bytes() {
  const char* env = std::getenv("COORDGATE_CPU_CACHE_MB");
  const long long mb = env != nullptr ? std::atoll(env) : 1024;
  return mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  static CachingCpuAllocator& instance() {
    // Leaked on purpose: tensors may outlive static destruction at interpreter exit.
    static auto* allocator = new CachingCpuAllocator();
    return *allocator;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) return {nullptr, nullptr, &release, cpu};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(nbytes);
      if (it != free_.end()) {
        Block* block = it->second;
        forget(it);
        return {block->ptr, block, &release, cpu};
      }
    }
    void* ptr = c10::alloc_cpu(nbytes);
    return {ptr, new Block{ptr, nbytes, {}}, &release, cpu};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void empty() {
    std::list<Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(oldest_first_);
      free_.clear();
      cached_bytes_ = 0;
    }
    for (Block* block : blocks) destroy(block);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
    std::list<Block*>::iterator age;  // its place in oldest_first_ while it is free
  };
  using FreeMap = std::unordered_multimap<size_t, Block*>;

  static void release(void* ctx) {
    if (ctx != nullptr) instance().give_back(static_cast<Block*>(ctx));
  }

  static void destroy(Block* block) {
    c10::free_cpu(block->ptr);
    delete block;
  }

  // Removes a free block from the cache's books (the caller owns it again).
  void forget(FreeMap::iterator it) {
    Block* block = it->second;
    free_.erase(it);
    oldest_first_.erase(block->age);
    cached_bytes_ -= block->size;
  }

  // Keeps a freed block. When the cache would go over its limit, the blocks freed longest ago
  // make room (a training loop's current shapes are the ones asked for again); a block larger
  // than the whole limit is not kept.
  void give_back(Block* block) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block->size > limit_) {
        evicted.push_back(block);
      } else {
        while (cached_bytes_ + block->size > limit_) {
          Block* oldest = oldest_first_.front();
          auto [first, last] = free_.equal_range(oldest->size);
          forget(std::find_if(first, last, [&](const auto& kv) { return kv.second == oldest; }));
          evicted.push_back(oldest);
        }
        block->age = oldest_first_.insert(oldest_first_.end(), block);
        free_.emplace(block->size, block);
        cached_bytes_ += block->size;
      }
    }
    for (Block* b : evicted) destroy(b);
  }

  std::mutex mutex_;
  FreeMap free_;
  std::list<Block*> oldest_first_;  // the free blocks, in the order they were freed
  size_t cached_bytes_ = 0;
  const size_t limit_ = cache_limit_bytes();
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype, at::MemoryFormat format) {
  const size_t nbytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  c10::Allocator* allocator = nbytes >= kMinCachedBytes
                                  ? static_cast<c10::Allocator*>(&CachingCpuAllocator::instance())
                                  : c10::GetCPUAllocator();
  return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, format);
}

void empty_output_cache() { CachingCpuAllocator::instance().empty(); }

size_t output_cache_bytes() { return CachingCpuAllocator::instance().cached_bytes(); }

}  // namespace coordgate
