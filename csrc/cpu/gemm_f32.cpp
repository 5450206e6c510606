// The float32 GEMM of gemm_f32.h, in the usual blocking: b's (kc, nc) block is packed into panels of kNR
// columns ([kc][kNR] each, the columns past N zero), a's (mc, kc) block into panels of kMR rows ([kc][kMR]
// each, the rows past M zero); the micro-kernel keeps a kMR x kNR block of sums in registers over one
// kc slice (the panels of b and a in L1 and L2), then adds it to out (the first slice: to the bias, or to
// nothing). kc splits K into equal slices of at most kMaxKc; the sums
// are taken in one order for given shapes, whatever the thread.
#include "cpu/gemm_f32.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

namespace customlayers::cpu {

// The kernel needs fused multiply-adds (the avx2 and avx512 tiers): at::vec's default tier multiplies and
// adds apart, rounding twice, which would make its sums less accurate than BLAS's.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kHasKernel = true;

namespace {

using Vec = Vectorized<float>;
constexpr int64_t kW = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kMR = 12;  // 24 sums, 2 vectors of b and a broadcast of the 32 vector registers
#else  // avx2
constexpr int64_t kMR = 6;   // 12 + 2 + 1 of 16
#endif
constexpr int kNV = 2;
constexpr int64_t kNR = kNV * kW;
// Reduction slices of at most 64: each output is the sum of its slices' sums, each slice's a chain of
// FMAs, so rounding errors grow with 64 + K / 64 rather than K (measured: at most, and mostly under, BLAS's
// error against float64), at no cost in speed against slices of 256.
constexpr int64_t kMaxKc = 64;
constexpr int64_t kMc = 10 * kMR;  // a's mc x kc block: 30 KiB (avx512)
constexpr int64_t kNc = 1024;    // b's kc x nc block: 256 KiB

// Panels of b's block [k0, k0 + kc) x [n0, n0 + nc): panel p holds columns n0 + p kNR .. as [kc][kNR].
void pack_b(const Strided<const float>& b, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* dst) {
  for (int64_t p = 0; p * kNR < nc; ++p, dst += kc * kNR) {
    const int64_t cols = std::min(kNR, nc - p * kNR);
    const Strided<const float> src = b.from(k0, n0 + p * kNR);
    if (src.cs == 1 && cols == kNR) {
      for (int64_t k = 0; k < kc; ++k)
        for (int j = 0; j < kNV; ++j) Vec::loadu(src.data + k * src.rs + j * kW).store(dst + k * kNR + j * kW);
      continue;
    }
    if (src.rs == 1) {  // columns contiguous (a transposed weight): each one read in order
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t k = 0; k < kc; ++k) dst[k * kNR + j] = src.data[k + j * src.cs];
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < cols; ++j) dst[k * kNR + j] = src.data[k * src.rs + j * src.cs];
    }
    for (int64_t k = 0; k < kc; ++k) std::fill(dst + k * kNR + cols, dst + (k + 1) * kNR, 0.0f);
  }
}

// Panels of a's block [m0, m0 + mc) x [k0, k0 + kc): panel q holds rows m0 + q kMR .. as [kc][kMR].
void pack_a(const Strided<const float>& a, int64_t m0, int64_t mc, int64_t k0, int64_t kc, float* dst) {
  for (int64_t q = 0; q * kMR < mc; ++q, dst += kc * kMR) {
    const int64_t rows = std::min(kMR, mc - q * kMR);
    const Strided<const float> src = a.from(m0 + q * kMR, k0);
    if (src.rs == 1) {  // rows contiguous (x^T): kMR values of a column at a time
      for (int64_t k = 0; k < kc; ++k) {
        const float* s = src.data + k * src.cs;
        float* d = dst + k * kMR;
        for (int64_t r = 0; r < rows; ++r) d[r] = s[r];
        for (int64_t r = rows; r < kMR; ++r) d[r] = 0.0f;
      }
      continue;
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < kc; ++k) dst[k * kMR + r] = src.data[r * src.rs + k * src.cs];
    for (int64_t r = rows; r < kMR; ++r)
      for (int64_t k = 0; k < kc; ++k) dst[k * kMR + r] = 0.0f;
  }
}

// The out block at (m0, n0) of rows x cols (at most kMR x kNR) += the panels' product over kc, or = it
// (plus the bias) when `first` (the first slice, out not accumulated into). Small arguments by value: the
// loop keeps them in registers.
void micro_kernel(const float* ap, const float* bp, int64_t kc, Strided<float> out, int64_t rows, int64_t cols,
                  const float* bias, bool first) {
  Vec acc[kMR][kNV];
  for (auto& r : acc)
    for (auto& v : r) v = Vec(0);
  for (int64_t k = 0; k < kc; ++k, ap += kMR, bp += kNR) {
    Vec b[kNV];
    for (int j = 0; j < kNV; ++j) b[j] = Vec::loadu(bp + j * kW);
    for (int64_t r = 0; r < kMR; ++r) {
      const Vec av(ap[r]);
      for (int j = 0; j < kNV; ++j) acc[r][j] = at::vec::fmadd(av, b[j], acc[r][j]);
    }
  }
  if (out.cs == 1 && rows == kMR && cols == kNR) {
    for (int64_t r = 0; r < kMR; ++r)
      for (int j = 0; j < kNV; ++j) {
        float* c = out.data + r * out.rs + j * kW;
        const Vec base = !first ? Vec::loadu(c) : bias != nullptr ? Vec::loadu(bias + j * kW) : Vec(0);
        (base + acc[r][j]).store(c);
      }
    return;
  }
  alignas(64) float sums[kMR][kNR];
  for (int64_t r = 0; r < kMR; ++r)
    for (int j = 0; j < kNV; ++j) acc[r][j].store(&sums[r][j * kW]);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      float& o = out.data[r * out.rs + c * out.cs];
      o = (!first ? o : bias != nullptr ? bias[c] : 0.0f) + sums[r][c];
    }
}

// The packing buffers of the calling thread, kept between calls.
float* thread_buffer(int which, int64_t size) {
  thread_local std::unique_ptr<float[]> buffers[2];
  thread_local int64_t sizes[2] = {0, 0};
  if (sizes[which] < size) {
    buffers[which] = std::make_unique_for_overwrite<float[]>(size);
    sizes[which] = size;
  }
  return buffers[which].get();
}

}  // namespace

void gemm_f32(const GemmF32& g) {
  const int64_t M = g.M, N = g.N, K = g.K;
  if (M == 0 || N == 0) return;
  if (g.out.cs != 1 && g.out.rs == 1 && g.bias == nullptr && N > 1) {
    // A column-major out (a dW in nn.Linear's layout) is the row-major out^T = b^T a^T: whole vectors stored.
    return gemm_f32({g.out.t(), g.b.t(), g.a.t(), nullptr, N, M, K, g.accumulate});
  }
  if (K == 0) {
    if (g.accumulate) return;
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < N; ++c) g.out.data[r * g.out.rs + c * g.out.cs] = g.bias != nullptr ? g.bias[c] : 0.0f;
    return;
  }
  const int64_t slices = (K + kMaxKc - 1) / kMaxKc, kc_max = (K + slices - 1) / slices;
  const int64_t nc_max = std::min(kNc, (N + kNR - 1) / kNR * kNR), mc_max = std::min(kMc, (M + kMR - 1) / kMR * kMR);
  float* const bp = thread_buffer(0, kc_max * nc_max);
  float* const ap = thread_buffer(1, kc_max * mc_max);
  for (int64_t n0 = 0; n0 < N; n0 += nc_max) {
    const int64_t nc = std::min(nc_max, N - n0);
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
      const int64_t kc = std::min(kc_max, K - k0);
      pack_b(g.b, k0, kc, n0, nc, bp);
      for (int64_t m0 = 0; m0 < M; m0 += mc_max) {
        const int64_t mc = std::min(mc_max, M - m0);
        pack_a(g.a, m0, mc, k0, kc, ap);
        for (int64_t p = 0; p * kNR < nc; ++p)
          for (int64_t q = 0; q * kMR < mc; ++q)
            micro_kernel(ap + q * kc * kMR, bp + p * kc * kNR, kc, g.out.from(m0 + q * kMR, n0 + p * kNR),
                         std::min(kMR, mc - q * kMR), std::min(kNR, nc - p * kNR),
                         g.bias != nullptr ? g.bias + n0 + p * kNR : nullptr, k0 == 0 && !g.accumulate);
      }
    }
  }
}

#else
constexpr bool kHasKernel = false;

void gemm_f32(const GemmF32&) { TORCH_INTERNAL_ASSERT(false, "gemm_f32: only the avx2 and avx512 tiers have it"); }
#endif

// BLAS's float32 GEMMs are the faster ones but where they run narrower vectors than this tier: MKL (torch's
// BLAS on x86; others are not assumed to) runs its AVX-512 code on Intel CPUs only, AVX2 on AMD's; from
// Zen 5 on (family 26), whose FMA units are 512 bits wide, this tier's kernel has about twice their
// throughput (measured on one thread: 210-235 against 105-115 GFLOP/s). Zen 4 splits 512-bit FMAs in two:
// not measured, BLAS there.
const GemmF32Choice& gemm_f32_choice() {
  static const GemmF32Choice choice = [] {
    const char* env = std::getenv("CUSTOMLAYERS_CPU_BLAS32");
    const std::string_view forced = env != nullptr ? env : "";
    if (forced == "native") return GemmF32Choice{false, "BLAS (CUSTOMLAYERS_CPU_BLAS32=native)"};
    if (forced == "own") {
      TORCH_CHECK_VALUE(kHasKernel, "linear_act: CUSTOMLAYERS_CPU_BLAS32=own needs a CPU with FMA and the avx2 or "
                        "avx512 CPU tier (customlayers.backend_report() says which runs)");
      return GemmF32Choice{true, "gemm_f32, hand-written (CUSTOMLAYERS_CPU_BLAS32=own)"};
    }
    TORCH_CHECK_VALUE(forced.empty(), "linear_act: CUSTOMLAYERS_CPU_BLAS32 must be 'native' or 'own' (or unset), "
                      "but got '", std::string(forced), "'");
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
    const unsigned base = (eax >> 8) & 0xf, family = base + (base == 0xf ? (eax >> 20) & 0xff : 0);
    if (at::hasMKL() && __builtin_cpu_is("amd") && family >= 0x1a)
      return GemmF32Choice{true, "gemm_f32, hand-written: 512-bit FMAs, where MKL runs AVX2 on AMD CPUs"};
#endif
    return GemmF32Choice{false, "BLAS"};
  }();
  return choice;
}

}  // namespace customlayers::cpu
