// Philox4x32-10, the counter-based random number generator of Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3" (SC 2011; the Random123 library): four 32-bit words from a 128-bit counter and a
// 64-bit key, with no state to carry between calls. Compiled by g++ for the CPU kernels and by nvcc for
// the CUDA kernels, so both produce the same bits for the same (key, counter).
#pragma once

#include <cstdint>

#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>
#endif

#if defined(__CUDACC__)
#define CUSTOMLAYERS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CUSTOMLAYERS_HOST_DEVICE inline
#endif

namespace customlayers::philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule (Weyl sequence)
constexpr int kRounds = 10;

CUSTOMLAYERS_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

#if !defined(__CUDACC__)
// One multiplication per lane: the high and low halves of the 64-bit products m * a[j].
inline void mulhilo(uint32_t m, const at::vec::Vectorized<int32_t>& a, at::vec::Vectorized<int32_t>& hi,
                    at::vec::Vectorized<int32_t>& lo) {
  using V = at::vec::Vectorized<int32_t>;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i mv = _mm512_set1_epi32(static_cast<int32_t>(m));
  const __m512i even = _mm512_mul_epu32(a, mv);                          // even lanes
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), mv);    // odd lanes
  // lane 2i of hi: the high word of even's 64-bit lane i (its 32-bit lane 2i + 1), lane 2i + 1: odd's; lo
  // alike with the low words. One two-source permute each, cheaper than a shift and a blend (or mullo).
  const __m512i hi_words = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  const __m512i lo_words = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  hi = V(_mm512_permutex2var_epi32(even, hi_words, odd));
  lo = V(_mm512_permutex2var_epi32(even, lo_words, odd));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i mv = _mm256_set1_epi32(static_cast<int32_t>(m));
  const __m256i even = _mm256_mul_epu32(a, mv);                          // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mv);    // lanes 1, 3, 5, 7
  hi = V(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
  lo = V(_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA));  // cheaper than mullo
#else
  alignas(64) int32_t in[V::size()], h[V::size()], l[V::size()];
  a.store(in);
  for (int j = 0; j < V::size(); ++j) {
    uint32_t hj, lj;
    mulhilo(m, static_cast<uint32_t>(in[j]), hj, lj);
    h[j] = static_cast<int32_t>(hj);
    l[j] = static_cast<int32_t>(lj);
  }
  hi = V::loadu(h);
  lo = V::loadu(l);
#endif
}
#endif

// Philox4x32-10, in place: (c0, c1, c2, c3) becomes the four random words of that counter under key
// (k0, k1). U is uint32_t (one counter) or, in the CPU kernels, at::vec::Vectorized<int32_t> (one counter
// per lane): it needs ^ and a mulhilo overload.
template <typename U>
CUSTOMLAYERS_HOST_DEVICE void philox4x32_10(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    U hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ U(static_cast<int32_t>(k0));
    c1 = lo1;
    c2 = hi0 ^ c3 ^ U(static_cast<int32_t>(k1));
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
}

#if !defined(__CUDACC__)
// The same on N independent counters (vectors of them in the CPU kernels), round by round, so that the N
// dependency chains overlap.
template <int N, typename U>
inline void philox4x32_10(U (&c0)[N], U (&c1)[N], U (&c2)[N], U (&c3)[N], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kRounds; ++r) {
    for (int v = 0; v < N; ++v) {
      U hi0, lo0, hi1, lo1;
      mulhilo(kM0, c0[v], hi0, lo0);
      mulhilo(kM1, c2[v], hi1, lo1);
      c0[v] = hi1 ^ c1[v] ^ U(static_cast<int32_t>(k0));
      c1[v] = lo1;
      c2[v] = hi0 ^ c3[v] ^ U(static_cast<int32_t>(k1));
      c3[v] = lo0;
    }
    k0 += kW0;
    k1 += kW1;
  }
}
#endif

// Uniform floats in [0, 1) built exactly from random bits: 24 bits for float, 53 for double.
CUSTOMLAYERS_HOST_DEVICE float uniform_float(uint32_t x) { return static_cast<float>(x >> 8) * 0x1p-24f; }

CUSTOMLAYERS_HOST_DEVICE double uniform_double(uint32_t hi, uint32_t lo) {
  return static_cast<double>((static_cast<uint64_t>(hi) << 21) | (lo >> 11)) * 0x1p-53;
}

}  // namespace customlayers::philox
