// CPU buffer cache: large gradient buffers that outlive their tensors, so the next training step
// reuses resident pages instead of faulting fresh ones in (fastkd/_buffers.py is the Python side
// and says when it is used).
//
// Why: glibc serves allocations this large with mmap and returns them with munmap, so each step's
// N x V gradient is a fresh mapping whose first write faults in every 4 KiB page. At N = 4096,
// V = 32000, fp32 (500 MiB) the faults cost about twice the kd kernel itself. PyTorch's CUDA
// caching allocator avoids the same cost on GPU by keeping freed blocks; this is a small CPU
// version of it for fastkd's own buffers only.
//
// How: fastkd::cpu_cache_empty builds a tensor on CacheAllocator. Its DataPtr's deleter runs when
// the storage dies (the last tensor or view referencing it is gone: c10 refcounting), and hands
// the block back to the pool instead of freeing it; the next allocation of about that size gets
// it back. A block is therefore never handed out while any tensor still references it. The pool
// keeps idle blocks only, bounded by `limit` bytes (0 disables the cache), at most kMaxIdle of
// them and kPerSize of one size; when a returned block does not fit, the least recently returned
// idle blocks are freed first. Blocks come from c10::alloc_cpu (torch's CPU allocation, 64-byte
// aligned). cpu_cache_release frees every idle block. Thread-safe (one mutex); blocks are freed
// outside it, since unmapping hundreds of MiB takes milliseconds.

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastkd {
namespace {

constexpr size_t kMinBytes = size_t{1} << 22;  // below 4 MiB malloc keeps memory resident itself
constexpr size_t kRound = size_t{1} << 21;     // sizes are rounded up to 2 MiB
constexpr size_t kMaxIdle = 8;                 // idle blocks kept, all sizes together
constexpr size_t kPerSize = 2;                 // idle blocks kept of one rounded size

size_t rounded(size_t n) { return (n + kRound - 1) / kRound * kRound; }

class Pool {
 public:
  // A block of at least `bytes` (rounded): an idle one no more than 1/8 larger, else a new one.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      size_t best = idle_.size();
      for (size_t i = 0; i < idle_.size(); ++i) {
        const size_t b = idle_[i].bytes;
        if (b >= bytes && b <= bytes + bytes / 8 && (best == idle_.size() || b < idle_[best].bytes))
          best = i;
      }
      if (best < idle_.size()) {
        Block blk = idle_[best];
        idle_.erase(idle_.begin() + best);
        held_ -= blk.bytes;
        live_[blk.ptr] = blk.bytes;
        in_use_ += blk.bytes;
        ++hits_;
        return blk.ptr;
      }
      ++misses_;
    }
    void* p = c10::alloc_cpu(bytes);  // throws on failure
    std::lock_guard<std::mutex> g(mu_);
    live_[p] = bytes;
    in_use_ += bytes;
    return p;
  }

  // The storage using `p` died: keep it idle if the limits allow, else free it.
  void give(void* p) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(p);
      const size_t bytes = it->second;
      live_.erase(it);
      in_use_ -= bytes;
      size_t same = 0;
      for (const Block& b : idle_) same += b.bytes == bytes;
      if (bytes > limit_ || same >= kPerSize) {
        drop.push_back(p);
      } else {
        // evict the least recently returned (the front) until this one fits
        while (!idle_.empty() && (held_ + bytes > limit_ || idle_.size() >= kMaxIdle)) {
          held_ -= idle_.front().bytes;
          drop.push_back(idle_.front().ptr);
          idle_.erase(idle_.begin());
        }
        idle_.push_back({p, bytes});
        held_ += bytes;
      }
    }
    for (void* q : drop) c10::free_cpu(q);
  }

  int64_t release() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      drop.swap(idle_);
      held_ = 0;
    }
    int64_t freed = 0;
    for (const Block& b : drop) {
      c10::free_cpu(b.ptr);
      freed += static_cast<int64_t>(b.bytes);
    }
    return freed;
  }

  int64_t set_limit(int64_t limit) {
    int64_t old;
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      old = static_cast<int64_t>(limit_);
      limit_ = static_cast<size_t>(std::max<int64_t>(limit, 0));
      while (!idle_.empty() && held_ > limit_) {
        held_ -= idle_.front().bytes;
        drop.push_back(idle_.front().ptr);
        idle_.erase(idle_.begin());
      }
    }
    for (void* q : drop) c10::free_cpu(q);
    return old;
  }

  size_t limit() {
    std::lock_guard<std::mutex> g(mu_);
    return limit_;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(limit_), static_cast<int64_t>(held_),
            static_cast<int64_t>(idle_.size()), static_cast<int64_t>(in_use_),
            static_cast<int64_t>(live_.size()), hits_, misses_};
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  std::mutex mu_;
  std::vector<Block> idle_;                 // oldest first
  std::unordered_map<void*, size_t> live_;  // handed out, by pointer
  size_t limit_ = 0, held_ = 0, in_use_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may die after static destructors have run (interpreter shutdown).
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void give_back(void* p) { pool().give(p); }

struct CacheAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    void* p = pool().take(rounded(n));
    return {p, p, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

CacheAllocator cache_allocator;

at::Tensor cpu_cache_empty(at::IntArrayRef size, at::ScalarType dtype) {
  if (pool().limit() == 0) return at::empty(size, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(size, &cache_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

int64_t cpu_cache_release() { return pool().release(); }
int64_t cpu_cache_set_limit(int64_t limit_bytes) { return pool().set_limit(limit_bytes); }
std::vector<int64_t> cpu_cache_stats() { return pool().stats(); }

}  // namespace
}  // namespace fastkd

// No tensor arguments, so nothing to dispatch on: these run under CompositeExplicitAutograd.
TORCH_LIBRARY_IMPL(fastkd, CompositeExplicitAutograd, m) {
  m.impl("cpu_cache_empty", &fastkd::cpu_cache_empty);
  m.impl("cpu_cache_release", &fastkd::cpu_cache_release);
  m.impl("cpu_cache_set_limit", &fastkd::cpu_cache_set_limit);
  m.impl("cpu_cache_stats", &fastkd::cpu_cache_stats);
}
