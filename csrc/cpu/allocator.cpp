// See allocator.h.
#include "cpu/allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace torch_ext::cpu {
namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
constexpr size_t kHugePage = size_t(2) << 20;

void free_huge(void* ptr) { std::free(ptr); }

// Huge-page-aligned blocks with MADV_HUGEPAGE; smaller requests (e.g. a resize to small) go to
// PyTorch's CPU allocator. Each DataPtr carries its own deleter, so the two kinds mix freely.
struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kHugePageMinBytes) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, kHugePage, rounded) == 0 && ptr != nullptr,
                "torch_ext: out of memory allocating ", nbytes, " bytes");
    madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
    return {ptr, ptr, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
#endif

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().is_cpu() && nbytes >= kHugePageMinBytes) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace torch_ext::cpu
