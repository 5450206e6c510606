// The hand-written tiled GEMM of customlayers::linear_act (no cuBLAS):
//   C[M, N] = act(A[M, K] @ B[K, N] + bias), bias + activation fused into the epilogue.
// Operands are read through their strides, so transposed views (nn.Linear.weight.t(), X^T, W^T in the
// backward) need no copy; a template flag per operand picks which dimension consecutive threads walk, so
// global loads stay coalesced for either layout. Tiles are staged in shared memory, double buffered (the
// next K tile is fetched into registers while the current one is multiplied), with 16-byte vector loads
// when the operands are aligned for them.
//  - float32 / float64: CUDA cores. Large tiles 128x128x8 with an 8x8 register block per thread (256
//    threads; each thread's rows and columns are two groups of 4, 64 apart, read from shared memory as
//    16-byte vectors), small tiles 64x64x16 with 4x4 per thread. float64 (gradcheck) uses the small ones.
//  - float16 / bfloat16: tensor cores (WMMA 16x16x16 fragments, float32 accumulation). Large tiles
//    128x128x32 (8 warps of 64x32), small 64x64x32 (4 warps of 32x32). Each warp's accumulators go
//    through a small shared-memory scratch for the bias + activation epilogue.
// Large tiles are used once they alone give every SM a block, small ones before that (more blocks); when
// even those leave SMs idle and K is long, K is split into slices whose sums are added in a fixed order.
// Gated (linear_glu): C = act(A @ Bg + bias) * (A @ Bu + bias_up). A block's BN columns of B are
// segments of the two operands in turn, so each thread (CUDA cores) or warp (tensor cores) holds the gate
// and up sums of the same outputs, and the epilogue combines them: BN / 2 outputs per block, with the
// arithmetic of an ungated tile. It can also write both pre-activations (the backward reads them).
// Written against common/cuda_device.cuh and cuda_utils.cuh only, so the CUDA emulator of the C++ tests
// can run it on CPU.
#pragma once

#include "common/activation.h"
#include "common/cuda_utils.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace customlayers::cuda {

constexpr int kBytesPerVector = 16;

// kBytesPerVector bytes of T: the unit of the operands' vector loads.
template <typename T>
using Pack = Vector<T, kBytesPerVector / sizeof(T)>;

// Four consecutive values, read from shared memory as one vector (16 bytes for float32).
template <typename T>
using Quad = Vector<T, 4>;

// A matrix operand seen as K x X (K the reduction dimension): element (k, x) at p[k * sk + x * sx].
template <typename T>
struct Operand {
  const T* p;
  int64_t sk, sx;
};

template <typename T>
struct GemmArgs {
  Operand<T> a;        // K x M (A^T): the left operand
  Operand<T> b;        // K x N
  T* c;                // M x N, element (m, n) at c[m * scm + n * scn]
  int64_t scm, scn;
  const T* bias;       // N values or nullptr
  int64_t M, N, K;
  Activation act = Activation::kNone;
  const char* op = "linear_act";  // named by the errors
  // Gated GEMMs (gemm<true>) only: b is the gate's operand and b_up the up one (K x N each), bias and
  // bias_up theirs (N values or nullptr); gate_out and up_out (nullptr, or M x N with C's strides) get
  // the pre-activations, bias added.
  Operand<T> b_up{};
  const T* bias_up = nullptr;
  T* gate_out = nullptr;
  T* up_out = nullptr;
  // Set by gemm():
  bool vec = false;              // both operands can be read in whole Packs
  int64_t k_slice = 0;           // the K range of grid slice z is [z * k_slice, (z + 1) * k_slice)
  acc_t<T>* partial = nullptr;   // split K: slice z's raw sums at partial[(z * M + m) * N + n] (gated: the
                                 // gate's at [(z * M + m) * 2N + n], up's N further); else C
};

// Moves a kRows x kCols tile (rows along K) of an Operand from global memory into shared memory, in two
// steps so that the global loads of the next tile overlap the math on the current one: fetch() into
// registers, store() into shared memory. Elements outside [0, K) x [0, X) are zero.
// kContigX: consecutive threads walk X (the operand's unit-stride dimension when it is X), else K.
// kKX: shared memory holds the tile as smem[k * kLd + x] whatever the walk (the CUDA-core kernel reads
// rows of K); otherwise the walked dimension stays contiguous there too, smem[x * kLd + k] when walking K
// (the tensor-core kernel reads either layout), so every store is a 16-byte vector.
// vec (run time): the walked dimension has unit stride, the other a multiple of Pack<T>::kSize, and p is
// aligned, so whole Packs are loaded where they lie inside the matrix.
// kSeg > 0 (a gated GEMM's B): the tile's columns are kSeg-wide segments of two operands in turn, the
// first's columns [x0, x0 + kSeg), the second's same columns, the first's next kSeg, ...
template <typename T, int kRows, int kCols, int kThreads, bool kContigX, bool kKX, int kPad, int kSeg = 0>
struct TileLoader {
  static constexpr int kV = Pack<T>::kSize;
  static constexpr bool kXMajor = !kKX && !kContigX;  // smem[x][k]
  static constexpr int kLd = kXMajor ? kRows + kPad : kCols + kPad;
  static constexpr int kSize = (kXMajor ? kCols : kRows) * kLd;
  static constexpr int kWalked = kContigX ? kCols : kRows;
  static constexpr int kGroups = kRows * kCols / kV;
  static_assert(kWalked % kV == 0 && kGroups % kThreads == 0, "tile must split into whole Packs per thread");
  static_assert((kLd * sizeof(T)) % kBytesPerVector == 0, "shared rows must keep Packs aligned");
  static constexpr bool segments_hold_packs() {
    if constexpr (kSeg == 0) return true;
    else return kCols % (2 * kSeg) == 0 && kSeg % kV == 0;
  }
  static_assert(segments_hold_packs(), "segments must hold whole Packs");
  static constexpr int kPerThread = kGroups / kThreads;

  Pack<T> regs[kPerThread];

  // Tile coordinates (k, x) of the first element of group g.
  __device__ __forceinline__ static void coords(int g, int& k, int& x) {
    if constexpr (kContigX) {
      k = g / (kCols / kV);
      x = (g % (kCols / kV)) * kV;
    } else {
      x = g / (kRows / kV);
      k = (g % (kRows / kV)) * kV;
    }
  }

  // The tile at (k0, x0) of op (and, with kSeg, of op2: x0 counts each operand's own columns).
  __device__ __forceinline__ void fetch(const Operand<T>& op1, const Operand<T>& op2, bool vec, int64_t K, int64_t X,
                                        int64_t k0, int64_t x0) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      int k, x;
      coords(threadIdx.x + i * kThreads, k, x);
      const Operand<T>* op = &op1;
      int64_t gx = x0 + x;
      if constexpr (kSeg > 0) {
        if (x / kSeg % 2 == 1) op = &op2;
        gx = x0 + x / (2 * kSeg) * kSeg + x % kSeg;
      }
      const int64_t gk = k0 + k;
      const int64_t start = kContigX ? gx : gk, limit = kContigX ? X : K;  // along the group
      const bool inside = kContigX ? gk < K : gx < X;                      // across it
      const int64_t step = kContigX ? op->sx : op->sk;
      if (!inside) {
#pragma unroll
        for (int e = 0; e < kV; ++e) regs[i].v[e] = T(0.0f);
        continue;
      }
      const T* src = op->p + gk * op->sk + gx * op->sx;
      if (vec && start + kV <= limit) {
        regs[i] = *reinterpret_cast<const Pack<T>*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < kV; ++e) regs[i].v[e] = start + e < limit ? src[e * step] : T(0.0f);
      }
    }
  }

  __device__ __forceinline__ void store(T* smem) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      int k, x;
      coords(threadIdx.x + i * kThreads, k, x);
      if constexpr (kContigX) {
        *reinterpret_cast<Pack<T>*>(smem + k * kLd + x) = regs[i];
      } else if constexpr (kXMajor) {
        *reinterpret_cast<Pack<T>*>(smem + x * kLd + k) = regs[i];
      } else {
#pragma unroll
        for (int e = 0; e < kV; ++e) smem[(k + e) * kLd + x] = regs[i].v[e];
      }
    }
  }
};

// act(v + bias[n]) in the accumulation type (common/activation.h: NaN and inf as in torch's activations).
template <typename A, typename T>
__device__ __forceinline__ A bias_act(A v, const T* bias, int64_t n, Activation act) {
  if (bias != nullptr) v += static_cast<A>(bias[n]);
  return activate(act, v);
}

// Element (m, n) of the block's result: act(v + bias) into C, or, with split K, the raw sum v of this
// grid slice into the partial sums.
template <typename T, typename A>
__device__ __forceinline__ void store_result(const GemmArgs<T>& args, int64_t m, int64_t n, A v) {
  if (args.partial != nullptr) args.partial[(int64_t(blockIdx.z) * args.M + m) * args.N + n] = v;
  else args.c[m * args.scm + n * args.scn] = static_cast<T>(bias_act(v, args.bias, n, args.act));
}

// Gated output (m, n) from the gate and up sums g and u: act(g + bias) * (u + bias_up) into C (computed
// in A, rounded once), the pre-activations into gate_out and up_out when set.
template <typename T, typename A>
__device__ __forceinline__ void gated_result(const GemmArgs<T>& args, int64_t m, int64_t n, A g, A u) {
  if (args.bias != nullptr) g += static_cast<A>(args.bias[n]);
  if (args.bias_up != nullptr) u += static_cast<A>(args.bias_up[n]);
  const int64_t at = m * args.scm + n * args.scn;
  if (args.gate_out != nullptr) {
    args.gate_out[at] = static_cast<T>(g);
    args.up_out[at] = static_cast<T>(u);
  }
  args.c[at] = static_cast<T>(activate(args.act, g) * u);
}

// store_result of a gated GEMM: the output, or with split K both raw sums into the partial sums.
template <typename T, typename A>
__device__ __forceinline__ void store_gated(const GemmArgs<T>& args, int64_t m, int64_t n, A g, A u) {
  if (args.partial != nullptr) {
    A* row = args.partial + (int64_t(blockIdx.z) * args.M + m) * 2 * args.N;
    row[n] = g;
    row[args.N + n] = u;
  } else {
    gated_result(args, m, n, g, u);
  }
}

// The K loop of both GEMM kernels over this grid slice's K range: BK-deep tiles of A and B, double-
// buffered through registers and the shared arrays As/Bs ([2][ALoader::kSize] and [2][BLoader::kSize]);
// compute(as, bs) consumes one tile pair while the next one is being fetched from global memory. n0 is
// the first column of B's tile (of each operand's, gated).
template <int BK, typename T, typename ALoader, typename BLoader, typename Compute>
__device__ __forceinline__ void gemm_k_loop(const GemmArgs<T>& args, int64_t m0, int64_t n0, ALoader& a_tile,
                                            BLoader& b_tile, T (*As)[ALoader::kSize], T (*Bs)[BLoader::kSize],
                                            Compute compute) {
  const int64_t k_lo = int64_t(blockIdx.z) * args.k_slice;
  const int64_t k_hi = args.K - k_lo < args.k_slice ? args.K : k_lo + args.k_slice;  // elements past it read as 0
  const int64_t tiles = (k_hi - k_lo + BK - 1) / BK;
  a_tile.fetch(args.a, args.a, args.vec, k_hi, args.M, k_lo, m0);
  b_tile.fetch(args.b, args.b_up, args.vec, k_hi, args.N, k_lo, n0);
  a_tile.store(As[0]);
  b_tile.store(Bs[0]);
  __syncthreads();
  for (int64_t t = 0; t < tiles; ++t) {
    const int cur = t & 1;
    const bool more = t + 1 < tiles;
    if (more) {
      a_tile.fetch(args.a, args.a, args.vec, k_hi, args.M, k_lo + (t + 1) * BK, m0);
      b_tile.fetch(args.b, args.b_up, args.vec, k_hi, args.N, k_lo + (t + 1) * BK, n0);
    }
    compute(As[cur], Bs[cur]);
    // The other buffer was last read before the previous barrier: safe to overwrite now.
    if (more) {
      a_tile.store(As[cur ^ 1]);
      b_tile.store(Bs[cur ^ 1]);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// float32 / float64 on CUDA cores: a BM x BN block tile, a TM x TN register block per thread.
template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct SimtTile {
  static constexpr bool kTensorCores = false;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
  static constexpr int kThreads = (BM / TM) * (BN / TN);
  static constexpr int kPad = 4;  // keeps rows 16-byte aligned, staggers banks
  // A thread's TM rows are TM / 4 groups of 4 consecutive rows, kRowGap apart (columns alike), so that a
  // warp's shared-memory reads of one group are consecutive 4-value vectors.
  static constexpr int kRowGap = BM / (TM / 4), kColGap = BN / (TN / 4);
  static_assert(TM % 4 == 0 && TN % 4 == 0, "register blocks are groups of 4");
  // Gated: B's tile is the gate's BN / 2 columns, then up's; a thread's column groups g and g + TN / 8
  // are the same outputs' gate and up sums.
  static constexpr int kGateSeg = BN / 2;
  static constexpr bool kCanGate = TN % 8 == 0;
};
using SimtSmall = SimtTile<64, 64, 16, 4, 4>;
using SimtSmallGated = SimtTile<64, 64, 16, 4, 8>;  // 128 threads: two column groups each
using SimtLarge = SimtTile<128, 128, 8, 8, 8>;

// The first output column of this block: BN per block, BN / 2 gated.
template <typename Tile, bool kGated>
__device__ __forceinline__ int64_t first_column() {
  return int64_t(blockIdx.y) * (kGated ? Tile::BN / 2 : Tile::BN);
}

template <typename Tile, typename T, bool kAContigM, bool kBContigN, bool kGated>
__global__ void __launch_bounds__(Tile::kThreads) gemm_simt_kernel(const GemmArgs<T> args) {
  using A = acc_t<T>;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, TM = Tile::TM, TN = Tile::TN;
  static_assert(!kGated || Tile::kCanGate, "a gated tile pairs column groups");
  using ALoader = TileLoader<T, BK, BM, Tile::kThreads, kAContigM, true, Tile::kPad>;
  using BLoader = TileLoader<T, BK, BN, Tile::kThreads, kBContigN, true, Tile::kPad, kGated ? Tile::kGateSeg : 0>;
  constexpr int LDA = ALoader::kLd, LDB = BLoader::kLd;
  __shared__ __align__(32) T As[2][ALoader::kSize];
  __shared__ __align__(32) T Bs[2][BLoader::kSize];

  const int64_t m0 = int64_t(blockIdx.x) * BM, n0 = first_column<Tile, kGated>();
  const int tx = threadIdx.x % (BN / TN), ty = threadIdx.x / (BN / TN);
  ALoader a_tile;
  BLoader b_tile;
  A acc[TM][TN] = {};

  gemm_k_loop<BK>(args, m0, n0, a_tile, b_tile, As, Bs, [&](const T* as, const T* bs) {
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      A av[TM], bv[TN];
#pragma unroll
      for (int g = 0; g < TM / 4; ++g) {
        const Quad<T> q = *reinterpret_cast<const Quad<T>*>(as + k * LDA + g * Tile::kRowGap + ty * 4);
#pragma unroll
        for (int e = 0; e < 4; ++e) av[g * 4 + e] = static_cast<A>(q.v[e]);
      }
#pragma unroll
      for (int g = 0; g < TN / 4; ++g) {
        const Quad<T> q = *reinterpret_cast<const Quad<T>*>(bs + k * LDB + g * Tile::kColGap + tx * 4);
#pragma unroll
        for (int e = 0; e < 4; ++e) bv[g * 4 + e] = static_cast<A>(q.v[e]);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
  });

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + (i / 4) * Tile::kRowGap + ty * 4 + i % 4;
    if (m >= args.M) continue;
#pragma unroll
    for (int j = 0; j < (kGated ? TN / 2 : TN); ++j) {
      const int64_t n = n0 + (j / 4) * Tile::kColGap + tx * 4 + j % 4;
      if (n >= args.N) continue;
      if constexpr (kGated) store_gated(args, m, n, acc[i][j], acc[i][j + TN / 2]);
      else store_result(args, m, n, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// float16 / bfloat16 on tensor cores: a BM x BN block tile, kWarpsM x kWarpsN warps, each a grid of
// 16 x 16 WMMA accumulators.
template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

template <int BM_, int BN_, int kWarpsM_, int kWarpsN_>
struct TcTile {
  static constexpr bool kTensorCores = true;
  static constexpr int BM = BM_, BN = BN_, BK = 32, kFrag = 16;
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, kThreads = kWarpsM * kWarpsN * kWarp;
  static constexpr int kWarpM = BM / kWarpsM, kWarpN = BN / kWarpsN;  // one warp's tile
  static constexpr int FM = kWarpM / kFrag, FN = kWarpN / kFrag;       // its fragments
  static constexpr int kPad = 8;          // 16 bytes of 16-bit values: WMMA's ldm must be a multiple of 8
  static constexpr int kScratchLd = kFrag + 4;  // float scratch: ldm a multiple of 4
  // Gated: each warp's kWarpN columns of B are the gate's kWarpN / 2, then up's; its fragments j and
  // j + FN / 2 are the same outputs' gate and up sums.
  static constexpr int kGateSeg = kWarpN / 2;
  static constexpr bool kCanGate = FN % 2 == 0;
};
using TcSmall = TcTile<64, 64, 2, 2>;   // 4 warps of 32 x 32
using TcLarge = TcTile<128, 128, 2, 4>; // 8 warps of 64 x 32

template <typename Tile, typename T, bool kAContigM, bool kBContigN, bool kGated>
__global__ void __launch_bounds__(Tile::kThreads) gemm_wmma_kernel(const GemmArgs<T> args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using W = typename WmmaType<T>::type;
  constexpr int BM = Tile::BM, BN = Tile::BN, BK = Tile::BK, kFrag = Tile::kFrag, FM = Tile::FM, FN = Tile::FN;
  // Shared tiles keep the operands' own layouts: A as As[k][m] (a column-major fragment source) when M
  // is its unit-stride dimension, As[m][k] (row-major) otherwise; B as Bs[k][n] (row-major) or Bs[n][k].
  using ALoader = TileLoader<T, BK, BM, Tile::kThreads, kAContigM, false, Tile::kPad>;
  using BLoader = TileLoader<T, BK, BN, Tile::kThreads, kBContigN, false, Tile::kPad, kGated ? Tile::kGateSeg : 0>;
  static_assert(!kGated || Tile::kCanGate, "a gated tile pairs fragments");
  using ALayout = std::conditional_t<kAContigM, wmma::col_major, wmma::row_major>;
  using BLayout = std::conditional_t<kBContigN, wmma::row_major, wmma::col_major>;
  constexpr int LDA = ALoader::kLd, LDB = BLoader::kLd, LDS = Tile::kScratchLd;
  // Fragment pointers must be 32-byte aligned: every offset below is a multiple of 32 bytes.
  static_assert((LDA * sizeof(T) * kFrag) % 32 == 0 && (LDB * sizeof(T) * kFrag) % 32 == 0, "fragment alignment");
  static_assert((kFrag * LDS * sizeof(float)) % 32 == 0, "scratch alignment");
  __shared__ __align__(128) T As[2][ALoader::kSize];
  __shared__ __align__(128) T Bs[2][BLoader::kSize];
  // After the K loop (which ends with a barrier) As is free: it becomes each warp's epilogue scratch (and
  // Bs the second one of a gated GEMM, for the up sums).
  static_assert(sizeof(As) >= sizeof(float) * Tile::kWarpsM * Tile::kWarpsN * kFrag * LDS, "scratch fits in As");
  static_assert(!kGated || sizeof(Bs) >= sizeof(float) * Tile::kWarpsM * Tile::kWarpsN * kFrag * LDS,
                "scratch fits in Bs");

  const int64_t m0 = int64_t(blockIdx.x) * BM, n0 = first_column<Tile, kGated>();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp / Tile::kWarpsN, wn = warp % Tile::kWarpsN;
  ALoader a_tile;
  BLoader b_tile;
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  gemm_k_loop<BK>(args, m0, n0, a_tile, b_tile, As, Bs, [&](const T* a_smem, const T* b_smem) {
    const W* as = reinterpret_cast<const W*>(a_smem);
    const W* bs = reinterpret_cast<const W*>(b_smem);
#pragma unroll
    for (int kk = 0; kk < BK; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, W, ALayout> af[FM];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, W, BLayout> bf[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = wm * Tile::kWarpM + i * kFrag;
        wmma::load_matrix_sync(af[i], as + (kAContigM ? kk * LDA + m : m * LDA + kk), LDA);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = wn * Tile::kWarpN + j * kFrag;
        wmma::load_matrix_sync(bf[j], bs + (kBContigN ? kk * LDB + n : n * LDB + kk), LDB);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
  });

  // Each accumulator -> the warp's scratch -> bias + activation -> global: lane l takes 8 values of row
  // l / 2 of the 16 x 16 fragment. Gated: fragment j's gate sums in one scratch, j + FN / 2's up sums in
  // the other.
  float* mine = reinterpret_cast<float*>(&As[0][0]) + warp * kFrag * LDS;
  float* mine_up = reinterpret_cast<float*>(&Bs[0][0]) + warp * kFrag * LDS;
  const int r = lane / 2, c0 = (lane % 2) * (kFrag / 2);
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < (kGated ? FN / 2 : FN); ++j) {
      wmma::store_matrix_sync(mine, acc[i][j], LDS, wmma::mem_row_major);
      if constexpr (kGated) wmma::store_matrix_sync(mine_up, acc[i][j + FN / 2], LDS, wmma::mem_row_major);
      __syncwarp();
      const int64_t m = m0 + wm * Tile::kWarpM + i * kFrag + r;
      const int64_t n_base = n0 + wn * (kGated ? Tile::kGateSeg : Tile::kWarpN) + j * kFrag + c0;
      if (m < args.M) {
#pragma unroll
        for (int e = 0; e < kFrag / 2; ++e) {
          const int64_t n = n_base + e;
          if (n >= args.N) continue;
          if constexpr (kGated) store_gated(args, m, n, mine[r * LDS + c0 + e], mine_up[r * LDS + c0 + e]);
          else store_result(args, m, n, mine[r * LDS + c0 + e]);
        }
      }
      __syncwarp();  // the scratch is rewritten by the next fragment
    }
  }
#else
  __trap();  // float16 / bfloat16 tensor-core GEMMs need sm_80 or newer
#endif
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// Whether a K x X operand's X dimension is the one to walk (unit stride along X), and whether it can
// be read in whole Packs. Strides of size-1 dimensions do not matter.
struct OperandLayout {
  bool contig_x;
  bool vec;
};

template <typename T>
OperandLayout operand_layout(const Operand<T>& op, int64_t K, int64_t X) {
  constexpr int kV = Pack<T>::kSize;
  const bool x_unit = X <= 1 || op.sx == 1;
  const bool k_unit = K <= 1 || op.sk == 1;
  const bool contig_x = x_unit && !(k_unit && X <= 1);  // a single column is walked along K
  const int64_t other = contig_x ? op.sk : op.sx;
  const int64_t other_size = contig_x ? K : X;
  const bool vec = (contig_x ? x_unit : k_unit) && (other_size <= 1 || other % kV == 0) &&
                   reinterpret_cast<uintptr_t>(op.p) % kBytesPerVector == 0;
  return {contig_x, vec};
}

// Output tiles for M x N outputs (gated: BN / 2 outputs per tile, so N counts twice).
template <typename Tile, bool kGated = false>
int64_t tile_count(int64_t M, int64_t N) {
  const int64_t cols = kGated ? 2 * N : N;
  return ((M + Tile::BM - 1) / Tile::BM) * ((cols + Tile::BN - 1) / Tile::BN);
}

// Split K: when the output tiles alone leave SMs idle (few rows or columns, long K, as in dX = g' W^T of
// a small batch), the K range is cut into slices, one grid z-index each; every slice writes its raw sums
// to a float workspace, and split_k_reduce_kernel adds them in slice order (bit-reproducible) and applies
// the epilogue. A slice is at least kMinSliceDepth deep and a multiple of every K tile.
constexpr int64_t kMinSliceDepth = 256;
constexpr int64_t kMaxSlices = 16;
constexpr int64_t kSliceAlign = 32;
constexpr int kReduceThreads = 256;

// The K depth of a slice for a grid of `tiles` output tiles (K itself: no split).
inline int64_t k_slice_for(int64_t tiles, int64_t K) {
  const int64_t sms = sm_count();
  if (tiles >= sms || K < 2 * kMinSliceDepth) return K;
  const int64_t slices = std::min(std::min((sms + tiles - 1) / tiles, K / kMinSliceDepth), kMaxSlices);
  if (slices <= 1) return K;
  return ((K + slices - 1) / slices + kSliceAlign - 1) / kSliceAlign * kSliceAlign;
}

template <typename T, bool kGated>
__global__ void __launch_bounds__(kReduceThreads) split_k_reduce_kernel(const GemmArgs<T> args, int64_t slices) {
  using A = acc_t<T>;
  const int64_t total = args.M * args.N, step = int64_t(gridDim.x) * kReduceThreads;
  for (int64_t i = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x; i < total; i += step) {
    const int64_t m = i / args.N, n = i % args.N;
    if constexpr (kGated) {
      A g = 0, u = 0;
      for (int64_t z = 0; z < slices; ++z) {
        const A* row = args.partial + (z * args.M + m) * 2 * args.N;
        g += row[n];
        u += row[args.N + n];
      }
      gated_result(args, m, n, g, u);
    } else {
      A s = 0;
      for (int64_t z = 0; z < slices; ++z) s += args.partial[z * total + i];
      args.c[m * args.scm + n * args.scn] = static_cast<T>(bias_act(s, args.bias, n, args.act));
    }
  }
}

template <typename Tile, typename T, bool kAContigM, bool kBContigN, bool kGated>
constexpr auto kernel_for() {
  if constexpr (Tile::kTensorCores) return &gemm_wmma_kernel<Tile, T, kAContigM, kBContigN, kGated>;
  else return &gemm_simt_kernel<Tile, T, kAContigM, kBContigN, kGated>;
}

// The Tile's kernel for the operands' layouts (4 combinations, chosen at run time), over `slices` K slices.
template <typename Tile, bool kGated, typename T>
void launch_tiles(const GemmArgs<T>& args, int64_t slices, bool a_contig_m, bool b_contig_n, cudaStream_t stream) {
  const int64_t cols = kGated ? 2 * args.N : args.N;
  const int64_t m_tiles = (args.M + Tile::BM - 1) / Tile::BM, n_tiles = (cols + Tile::BN - 1) / Tile::BN;
  TORCH_CHECK(n_tiles <= 65535, args.op, ": ", cols, " output columns", kGated ? " (gate and up)" : "",
              " are too many for the CUDA GEMM");
  TORCH_CHECK(m_tiles <= 0x7fffffff, args.op, ": ", args.M, " output rows are too many for the CUDA GEMM");
  using Kernel = void (*)(const GemmArgs<T>);
  static constexpr Kernel kTable[4] = {
      kernel_for<Tile, T, false, false, kGated>(), kernel_for<Tile, T, false, true, kGated>(),
      kernel_for<Tile, T, true, false, kGated>(), kernel_for<Tile, T, true, true, kGated>()};
  launch_kernel(kTable[(a_contig_m ? 2 : 0) + (b_contig_n ? 1 : 0)],
                dim3(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles), static_cast<unsigned>(slices)),
                dim3(Tile::kThreads), stream, args);
}

// C = act(A @ B + bias) for A (M x K) given as its K x M transpose view `a`, B (K x N); gemm<true>: the
// gated C = act(A @ B + bias) * (A @ B_up + bias_up), B and B_up of one layout (operand_layout's contig_x).
// workspace(bytes) returns device memory for split-K partial sums (8-byte aligned), valid for the kernels
// queued on `stream` by this call.
template <bool kGated = false, typename T, typename Workspace>
void gemm(GemmArgs<T> args, cudaStream_t stream, Workspace&& workspace) {
  using A = acc_t<T>;
  if (args.M == 0 || args.N == 0) return;
  const OperandLayout la = operand_layout(args.a, args.K, args.M);
  const OperandLayout lb = operand_layout(args.b, args.K, args.N);
  args.vec = la.vec && lb.vec;
  if constexpr (kGated) {
    const OperandLayout lu = operand_layout(args.b_up, args.K, args.N);
    TORCH_CHECK(lu.contig_x == lb.contig_x, args.op, ": the gated CUDA GEMM takes both weights in one layout");
    args.vec = args.vec && lu.vec;
  }
  auto run = [&](auto tile) {
    using Tile = decltype(tile);
    args.k_slice = k_slice_for(tile_count<Tile, kGated>(args.M, args.N), args.K);
    const int64_t slices = args.K > args.k_slice ? (args.K + args.k_slice - 1) / args.k_slice : 1;
    const int64_t cols = kGated ? 2 * args.N : args.N;
    if (slices > 1) args.partial = static_cast<A*>(workspace(sizeof(A) * slices * args.M * cols));
    launch_tiles<Tile, kGated>(args, slices, la.contig_x, lb.contig_x, stream);
    if (slices > 1)
      launch_kernel(split_k_reduce_kernel<T, kGated>, dim3(grid_for(args.M * args.N, kReduceThreads)),
                    dim3(kReduceThreads), stream, args, slices);
  };
  // Large tiles once they alone give every SM a block; small ones (more blocks) before that.
  auto sized = [&](auto large, auto small) {
    if (tile_count<decltype(large), kGated>(args.M, args.N) >= sm_count()) run(large);
    else run(small);
  };
  using SimtSmallOrGated = std::conditional_t<kGated, SimtSmallGated, SimtSmall>;
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) sized(TcLarge{}, TcSmall{});
  else if constexpr (std::is_same_v<T, float>) sized(SimtLarge{}, SimtSmallOrGated{});
  else run(SimtSmallOrGated{});  // float64: gradcheck sizes
}

}  // namespace customlayers::cuda
