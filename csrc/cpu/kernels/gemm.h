// Single-precision GEMM of our own: C (m x n, row-major) = A (m x k) . B (k x n), or C += A . B,
// with A and B of any strides. Compiled once per instruction set; included only from
// csrc/cpu/capability/kernels_impl.h, inside namespace torch_ext::cpu::CPU_CAPABILITY.
//
// Why a GEMM of our own: on the development machine (AMD EPYC, 2 cores, AVX-512) ATen's float32
// GEMM (MKL's sgemm) runs the dense layer's GEMMs well below the cores' measured FMA peak, and the
// dense layer's goal asks for more than ATen's three GEMMs leave. This one runs them faster
// (benchmarks/bench_cpu_gemm.py; docs/cpu.md has the figures; csrc/cpu/runtime/gemm.h says where it is
// used, on which CPUs, and how to turn it off).
//
// Layout (BLIS-like, simplified):
//   - B is packed per block of KC rows x NC columns into micro-panels of NR columns (for each k,
//     NR consecutive values; zero-padded).
//   - A is read in place when its rows are contiguous: the micro-kernel broadcasts A(i, p)
//     straight from memory, so A costs no packing pass. A tile's MR rows x KC values stay in L1
//     while the tile sweeps the block's micro-panels (the loop over tiles is row-major). A is
//     packed instead, MC rows at a time, when its rows are not contiguous in k (A = g.T of
//     grad_W = g.T @ x) or sit a multiple of 4 KiB apart (gemm_packs_a).
//   - The micro-kernel holds an MR x NR tile of C in registers: 12 x 32 in 24 of AVX-512's 32
//     registers, 6 x 16 in 12 of AVX2's 16.
//   - Threads each compute a band of C, or of the sum over k (see gemm_f32), and prefetch the
//     next block's operands into L2 while computing the current one.
// Block sizes were tuned on the development machine (1 MiB L2 per core).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/runtime/kernel_table.h"

namespace torch_ext::cpu::CPU_CAPABILITY {

using FloatVec = at::vec::Vectorized<float>;
constexpr int64_t kGemmNR = 2 * FloatVec::size();
constexpr int64_t kGemmMR = FloatVec::size() == 16 ? 12 : 6;
constexpr int64_t kGemmKC = 256;               // rows of a packed B block: 32 KiB micro-panels
constexpr int64_t kGemmDepthKC = 64;           // the same when threads split k (smaller: C is summed in L2)
constexpr int64_t kGemmDepthMaxC = 64 * 1024;  // values of C, at most, for threads to split k
constexpr int64_t kGemmNC = 512;               // columns of a packed B block: 512 KiB
constexpr int64_t kGemmMC = 240;               // rows of A packed at a time (a multiple of MR and of the vector width)

// C tile (rows x cols of at most MR x NR) = or += A tile . packed B micro-panel, over kc.
// a points at A(tile row 0, block column 0); a_rs, a_cs are A's strides.
// Always inlined into gemm_band: outlined (GCC decides by its own size heuristics) it ran at half
// speed, its accumulators spilled through the call.
C10_ALWAYS_INLINE void gemm_micro_kernel(int64_t kc, const float* a, int64_t a_rs, int64_t a_cs, const float* packed_b,
                                         float* c, int64_t ldc, int64_t rows, int64_t cols, bool accumulate) {
  constexpr int64_t kVec = FloatVec::size();
  FloatVec acc[kGemmMR][2];
  // Every loop over the tile's rows is unrolled: with constant indices the accumulators live in
  // registers (a loop bound only known at run time would keep them in memory).
#pragma GCC unroll 12
  for (int64_t i = 0; i < kGemmMR; ++i) acc[i][0] = acc[i][1] = FloatVec(0.f);
  for (int64_t p = 0; p < kc; ++p) {
    const FloatVec b0 = FloatVec::loadu(packed_b + p * kGemmNR);
    const FloatVec b1 = FloatVec::loadu(packed_b + p * kGemmNR + kVec);
    const float* a_p = a + p * a_cs;
#pragma GCC unroll 12
    for (int64_t i = 0; i < kGemmMR; ++i) {
      const FloatVec a_ip(a_p[i * a_rs]);
      acc[i][0] = at::vec::fmadd(a_ip, b0, acc[i][0]);
      acc[i][1] = at::vec::fmadd(a_ip, b1, acc[i][1]);
    }
  }
  const int64_t cols0 = std::min(cols, kVec), cols1 = cols - cols0;
#pragma GCC unroll 12
  for (int64_t i = 0; i < kGemmMR; ++i) {
    if (i == rows) break;
    float* c_i = c + i * ldc;
    FloatVec v0 = acc[i][0], v1 = acc[i][1];
    if (cols == kGemmNR) {
      if (accumulate) {
        v0 = v0 + FloatVec::loadu(c_i);
        v1 = v1 + FloatVec::loadu(c_i + kVec);
      }
      v0.store(c_i);
      v1.store(c_i + kVec);
    } else {
      if (accumulate) v0 = v0 + FloatVec::loadu(c_i, cols0);
      v0.store(c_i, cols0);
      if (cols1 > 0) {
        if (accumulate) v1 = v1 + FloatVec::loadu(c_i + kVec, cols1);
        v1.store(c_i + kVec, cols1);
      }
    }
  }
}

// dst[k * ld_dst + r] = src[r * ld_src + k] for a square block of one vector's width: the
// transposition that packing B = W.T needs, in registers.
inline void gemm_transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {  // within 128-bit lanes: pairs of rows
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // within lanes: u[g + c] lane L = column 4L + c of rows g..g+3
    r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
    r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
    r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
    r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
  }
  for (int c = 0; c < 4; ++c) {  // across lanes
    const __m512 v02 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88),
                 w02 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 v13 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd),
                 w13 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    _mm512_storeu_ps(dst + c * ld_dst, _mm512_shuffle_f32x4(v02, w02, 0x88));
    _mm512_storeu_ps(dst + (8 + c) * ld_dst, _mm512_shuffle_f32x4(v02, w02, 0xdd));
    _mm512_storeu_ps(dst + (4 + c) * ld_dst, _mm512_shuffle_f32x4(v13, w13, 0x88));
    _mm512_storeu_ps(dst + (12 + c) * ld_dst, _mm512_shuffle_f32x4(v13, w13, 0xdd));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 8; g += 4) {  // u[g + c] lane L = column 4L + c of rows g..g+3
    r[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    r[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xee);
    r[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    r[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ld_dst, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
    _mm256_storeu_ps(dst + (4 + c) * ld_dst, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
  }
#else
  constexpr int64_t kVec = FloatVec::size();
  for (int64_t i = 0; i < kVec; ++i)
    for (int64_t k = 0; k < kVec; ++k) dst[k * ld_dst + i] = src[i * ld_src + k];
#endif
}

// Packs B rows [p0, p0 + kc) x columns [first, first + cols) (cols <= NR) into one micro-panel
// (kc x NR values, columns past cols zero).
inline void gemm_pack_b_panel(const GemmF32Args& g, int64_t p0, int64_t kc, int64_t first, int64_t cols, float* dst) {
  const float* src = g.b + p0 * g.b_rs + first * g.b_cs;
  if (cols < kGemmNR) std::fill_n(dst, kc * kGemmNR, 0.f);
  constexpr int64_t kVec = FloatVec::size();
  if (g.b_cs == 1 && cols == kGemmNR) {  // rows of B contiguous (B = W of g @ W, x of g.T @ x)
    for (int64_t p = 0; p < kc; ++p) {
      FloatVec::loadu(src + p * g.b_rs).store(dst + p * kGemmNR);
      FloatVec::loadu(src + p * g.b_rs + kVec).store(dst + p * kGemmNR + kVec);
    }
  } else if (g.b_cs == 1) {
    for (int64_t p = 0; p < kc; ++p) std::memcpy(dst + p * kGemmNR, src + p * g.b_rs, sizeof(float) * cols);
  } else {  // e.g. B = W.T of x @ W.T, whose columns are contiguous
    int64_t p_done = 0;
    if (g.b_rs == 1 && cols == kGemmNR) {
      for (; p_done + kVec <= kc; p_done += kVec) {
        gemm_transpose_block(src + p_done, g.b_cs, dst + p_done * kGemmNR, kGemmNR);
        gemm_transpose_block(src + p_done + kVec * g.b_cs, g.b_cs, dst + p_done * kGemmNR + kVec, kGemmNR);
      }
    }
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t p = p_done; p < kc; ++p) dst[p * kGemmNR + j] = src[p * g.b_rs + j * g.b_cs];
  }
}

// Copies the last tile of an A read in place, when it has fewer than MR rows, into packed (kc x
// MR, missing rows zero), so that the micro-kernel never reads past A.
inline void gemm_pack_a_tail(const float* a, int64_t a_rs, int64_t a_cs, int64_t rows, int64_t kc, float* packed) {
  std::fill_n(packed, kGemmMR * kc, 0.f);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t p = 0; p < kc; ++p) packed[p * kGemmMR + i] = a[i * a_rs + p * a_cs];
}

// Packs A rows [0, rows) x kc (rows <= kGemmMC) transposed, k-major: packed[p * kGemmMC + i] =
// A(i, p), rows from `rows` up to a whole tile zero. The micro-kernel then reads a tile's MR
// values of one k contiguously, and consecutive k kGemmMC values apart (not a power of two).
inline void gemm_pack_a_block(const float* a, int64_t a_rs, int64_t a_cs, int64_t rows, int64_t kc, float* packed) {
  constexpr int64_t kVec = FloatVec::size();
  const int64_t padded = (rows + kGemmMR - 1) / kGemmMR * kGemmMR;
  int64_t rows_done = 0, p_done = 0;  // the part copied by the fast paths
  if (a_rs == 1) {                    // columns of A contiguous (A = g.T of grad_W = g.T @ x): one run per k
    for (int64_t p = 0; p < kc; ++p) std::memcpy(packed + p * kGemmMC, a + p * a_cs, sizeof(float) * rows);
    rows_done = rows;
    p_done = kc;
  } else if (a_cs == 1) {  // rows contiguous: square blocks transposed in registers
    rows_done = rows / kVec * kVec;
    p_done = kc / kVec * kVec;
    for (int64_t i = 0; i < rows_done; i += kVec)
      for (int64_t p = 0; p < p_done; p += kVec)
        gemm_transpose_block(a + i * a_rs + p, a_rs, packed + p * kGemmMC + i, kGemmMC);
  }
  for (int64_t p = 0; p < kc; ++p) {
    float* dst = packed + p * kGemmMC;
    for (int64_t i = p < p_done ? rows_done : 0; i < rows; ++i) dst[i] = a[i * a_rs + p * a_cs];
    std::fill(dst + rows, dst + padded, 0.f);
  }
}

// Whether A is packed (gemm_pack_a_block) rather than read in place by the micro-kernel: when its
// rows are not contiguous in k, and when they are kGemmAliasFloats (4 KiB) apart or a multiple:
// then the MR rows of a tile fall into the same L1 sets, more of them than the cache has ways,
// and evict each other (measured: read in place, such an A made ours slower than ATen's GEMM).
inline bool gemm_packs_a(const GemmF32Args& g) {
  constexpr int64_t kGemmAliasFloats = 1024;
  return g.a_cs != 1 || (g.m > 1 && g.a_rs % kGemmAliasFloats == 0);
}

// The product over k in [p_begin, p_end) for C rows [i_begin, i_end) x columns [j_begin, j_end),
// on one thread, into c (row stride ldc; = or += as accumulate says). Column bounds are multiples
// of NR (or n), row bounds multiples of MR (or m).
struct GemmBand {
  int64_t i_begin, i_end, j_begin, j_end, p_begin, p_end;
  float* c;
  int64_t ldc;
  bool accumulate;
  int64_t kc_block;  // rows of B per packed block
};

// The cache lines of a strided set of rows (row r at first + r * stride, `floats` long), prefetched
// into L2 a few at a time while the current block computes, so that packing the next block reads
// from cache.
struct PrefetchRows {
  const char* base = nullptr;
  int64_t stride = 0, rows = 0, lines_per_row = 0;
  PrefetchRows() = default;
  PrefetchRows(const float* first, int64_t stride_floats, int64_t rows_, int64_t floats)
      : base(reinterpret_cast<const char*>(first)),
        stride(stride_floats * 4),
        rows(rows_),
        lines_per_row((floats * 4 + 63) / 64 + 1) {}
  int64_t lines() const { return rows * lines_per_row; }
  void fetch(int64_t begin, int64_t end) const {
    for (int64_t l = begin; l < end; ++l)
      __builtin_prefetch(base + (l / lines_per_row) * stride + (l % lines_per_row) * 64, 0, 2);  // locality 2: into L2
  }
};

inline void gemm_band(const GemmF32Args& g, const GemmBand& band) {
  const int64_t max_panels = (std::min(band.j_end - band.j_begin, kGemmNC) + kGemmNR - 1) / kGemmNR;
  // Per-thread buffers, kept between calls: a fresh 0.5 MiB block per call would be mapped anew,
  // page by page (malloc serves such sizes with mmap).
  thread_local std::vector<float> packed_b_buffer, packed_a_buffer;
  const int64_t kc_max = std::min(band.p_end - band.p_begin, band.kc_block);
  packed_b_buffer.resize(std::max<size_t>(packed_b_buffer.size(), max_panels * kc_max * kGemmNR));
  float* packed_b = packed_b_buffer.data();
  alignas(64) float tail_a[kGemmMR * kGemmKC];
  const bool pack_a = gemm_packs_a(g);
  if (pack_a) packed_a_buffer.resize(std::max<size_t>(packed_a_buffer.size(), kGemmMC * kc_max));
  float* packed_a = packed_a_buffer.data();
  for (int64_t j0 = band.j_begin; j0 < band.j_end; j0 += kGemmNC) {
    const int64_t j_end = std::min(j0 + kGemmNC, band.j_end);
    const int64_t panels = (j_end - j0 + kGemmNR - 1) / kGemmNR;
    for (int64_t p0 = band.p_begin; p0 < band.p_end; p0 += band.kc_block) {
      const int64_t kc = std::min(band.kc_block, band.p_end - p0);
      const bool accumulate = band.accumulate || p0 > band.p_begin;
      for (int64_t q = 0; q < panels; ++q) {
        const int64_t j = j0 + q * kGemmNR;
        gemm_pack_b_panel(g, p0, kc, j, std::min(kGemmNR, j_end - j), packed_b + q * kc * kGemmNR);
      }
      PrefetchRows next_b, next_a;
      const int64_t p_next = p0 + band.kc_block;
      if (p_next < band.p_end) {
        const int64_t kc_next = std::min(band.kc_block, band.p_end - p_next);
        if (g.b_cs == 1)
          next_b = PrefetchRows(g.b + p_next * g.b_rs + j0, g.b_rs, kc_next, j_end - j0);
        else if (g.b_rs == 1)
          next_b = PrefetchRows(g.b + p_next + j0 * g.b_cs, g.b_cs, j_end - j0, kc_next);
        if (g.a_rs == 1 && g.a_cs != 1)
          next_a = PrefetchRows(g.a + band.i_begin + p_next * g.a_cs, g.a_cs, kc_next, band.i_end - band.i_begin);
      }
      const int64_t calls = ((band.i_end - band.i_begin + kGemmMR - 1) / kGemmMR) * panels;
      int64_t call = 0;
      // Each A tile (in L1) sweeps the block's micro-panels (in L2).
      for (int64_t ic = band.i_begin; ic < band.i_end; ic += kGemmMC) {
        const int64_t ic_end = std::min(ic + kGemmMC, band.i_end);
        if (pack_a) gemm_pack_a_block(g.a + ic * g.a_rs + p0 * g.a_cs, g.a_rs, g.a_cs, ic_end - ic, kc, packed_a);
        for (int64_t i0 = ic; i0 < ic_end; i0 += kGemmMR) {
          const int64_t rows = std::min(kGemmMR, ic_end - i0);
          const float* a = g.a + i0 * g.a_rs + p0 * g.a_cs;
          int64_t a_rs = g.a_rs, a_cs = g.a_cs;
          if (pack_a) {
            a = packed_a + (i0 - ic);
            a_rs = 1;
            a_cs = kGemmMC;
          } else if (rows < kGemmMR) {
            gemm_pack_a_tail(a, a_rs, a_cs, rows, kc, tail_a);
            a = tail_a;
            a_rs = 1;
            a_cs = kGemmMR;
          }
          for (int64_t q = 0; q < panels; ++q, ++call) {
            next_b.fetch(next_b.lines() * call / calls, next_b.lines() * (call + 1) / calls);
            next_a.fetch(next_a.lines() * call / calls, next_a.lines() * (call + 1) / calls);
            const int64_t j = j0 + q * kGemmNR;
            gemm_micro_kernel(kc, a, a_rs, a_cs, packed_b + q * kc * kGemmNR, band.c + i0 * band.ldc + j, band.ldc,
                              rows, std::min(kGemmNR, j_end - j), accumulate);
          }
        }
      }
    }
  }
}

// One parallel region, in which each thread computes a band of the product and threads share
// nothing, so the K loop needs no barrier (a region per K block would cost a wake-up of the
// other threads per block, each one slow under OMP_WAIT_POLICY=PASSIVE). The band is whichever
// split duplicates the least memory traffic, for T threads:
//   - whole row tiles of C: each thread packs all of B itself, (T - 1) k n values again;
//   - whole column panels of C: each thread reads (or packs) all of A, (T - 1) m k again;
//   - a range of k (grad_W = g.T @ x, where k is the batch): each thread's partial product
//     goes to a buffer of its own, m n values, summed into C after the region (thread 0
//     writes C itself). Its results, like those of ATen's GEMM, depend on the thread count.
inline void gemm_f32(const GemmF32Args& g) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    if (!g.accumulate)
      for (int64_t i = 0; i < g.m; ++i) std::fill_n(g.c + i * g.ldc, g.n, 0.f);
    return;
  }
  enum class Split { Rows, Columns, Depth };
  const double row_cost = double(g.k) * g.n, column_cost = double(g.m) * g.k, depth_cost = double(g.m) * g.n;
  // Depth only while C fits in L2 next to the blocks (it is reloaded every kGemmDepthKC values
  // of k): with a C as large as L2 it measured slower than either band.
  const bool small_c = g.m * g.n <= kGemmDepthMaxC;
  const Split split = small_c && depth_cost < std::min(row_cost, column_cost) && g.k >= 2 * kGemmKC ? Split::Depth
                      : row_cost <= column_cost                                                     ? Split::Rows
                                                                                                    : Split::Columns;
  const int64_t unit = split == Split::Rows ? kGemmMR : split == Split::Columns ? kGemmNR : kGemmKC;
  const int64_t extent = split == Split::Rows ? g.m : split == Split::Columns ? g.n : g.k;
  const int64_t units = (extent + unit - 1) / unit;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), units);
  std::unique_ptr<float[]> partials;
  if (split == Split::Depth && workers > 1) partials.reset(new float[(workers - 1) * g.m * g.n]);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t lo = std::min(extent, units * w / workers * unit);
      const int64_t hi = std::min(extent, units * (w + 1) / workers * unit);
      GemmBand band{0, g.m, 0, g.n, 0, g.k, g.c, g.ldc, g.accumulate, split == Split::Depth ? kGemmDepthKC : kGemmKC};
      if (split == Split::Rows) {
        band.i_begin = lo, band.i_end = hi;
      } else if (split == Split::Columns) {
        band.j_begin = lo, band.j_end = hi;
      } else {
        band.p_begin = lo, band.p_end = hi;
        if (w > 0) band.c = partials.get() + (w - 1) * g.m * g.n, band.ldc = g.n, band.accumulate = false;
      }
      gemm_band(g, band);
    }
  });
  for (int64_t w = 1; split == Split::Depth && w < workers; ++w) {
    const float* part = partials.get() + (w - 1) * g.m * g.n;
    for (int64_t i = 0; i < g.m; ++i) {
      float* c_i = g.c + i * g.ldc;
      const float* p_i = part + i * g.n;
      int64_t j = 0;
      for (; j + FloatVec::size() <= g.n; j += FloatVec::size())
        (FloatVec::loadu(c_i + j) + FloatVec::loadu(p_i + j)).store(c_i + j);
      for (; j < g.n; ++j) c_i[j] += p_i[j];
    }
  }
}

}  // namespace torch_ext::cpu::CPU_CAPABILITY
