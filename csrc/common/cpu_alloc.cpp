#include "common/cpu_alloc.h"

#include "common/layout.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace customlayers::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Below this, glibc's malloc recycles freed blocks from its heap (its mmap threshold adapts up to
// 32 MiB), so repeated allocations are already free of page faults.
constexpr size_t kHugeMin = size_t(32) << 20;

void free_huge(void* p) { std::free(p); }

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kHugeMin) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, rounded) != 0 || p == nullptr)
      return c10::GetDefaultCPUAllocator()->allocate(nbytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
#endif
    return {p, p, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator g_allocator;

}  // namespace

at::Tensor empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  return at::detail::empty_strided_generic(sizes, strides, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           dtype);
}

at::Tensor empty_like(const at::Tensor& x) { return empty_strided(x.sizes(), empty_like_strides(x), x.scalar_type()); }

at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &g_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

}  // namespace customlayers::cpu
