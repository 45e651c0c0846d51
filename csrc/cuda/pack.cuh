// Packs of consecutive elements loaded and stored as one aligned vector (16-byte loads for
// 16-bit types), shared by the CUDA kernels whose rows allow them.
#pragma once

#include <cstdint>

namespace torch_ext {

template <typename S, int kVec>
struct alignas(sizeof(S) * kVec) Pack {
  S v[kVec];
};

// Whether rows of `ld` elements starting at `p` (nullptr: absent, fine) can be read as packs of
// kVec elements of S: the base aligned to the pack and ld a multiple of kVec.
template <typename S, int kVec>
bool rows_fit_packs(const void* p, int64_t ld) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % sizeof(Pack<S, kVec>) == 0 && ld % kVec == 0);
}

// `count` (<= kVec) consecutive elements at p, the rest of the pack zero; with kWhole, all kVec
// of them in one aligned vector load (p must then be aligned to the pack).
template <bool kWhole, typename S, int kVec>
__device__ __forceinline__ Pack<S, kVec> load_pack(const S* p, int count) {
  Pack<S, kVec> pack;
  if constexpr (kWhole) {
    pack = *reinterpret_cast<const Pack<S, kVec>*>(p);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) pack.v[j] = j < count ? p[j] : S(0.0f);
  }
  return pack;
}

template <bool kWhole, typename S, int kVec>
__device__ __forceinline__ void store_pack(S* p, const Pack<S, kVec>& pack, int count) {
  if constexpr (kWhole) {
    *reinterpret_cast<Pack<S, kVec>*>(p) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j < count) p[j] = pack.v[j];
  }
}

}  // namespace torch_ext
