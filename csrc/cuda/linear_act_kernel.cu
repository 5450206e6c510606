// CUDA kernels of customlayers::linear_act (y = act(x @ W + b)) and linear_act_backward. No cuBLAS:
//
//  * One tiled GEMM, C[M, N] = act(A[M, K] @ B[K, N] + bias), with bias + activation fused into the
//    epilogue. Operands are read through their strides, so transposed views (nn.Linear.weight.t(), X^T,
//    W^T in the backward) need no copy; a template flag per operand picks which dimension consecutive
//    threads walk, so global loads stay coalesced for either layout. Tiles are staged in shared memory,
//    double buffered (the next K tile is fetched into registers while the current one is multiplied),
//    with 16-byte vector loads when the operands are aligned for them.
//      - float32 / float64: CUDA cores, 64x64x16 tiles, 256 threads, a 4x4 register block per thread.
//      - float16 / bfloat16: tensor cores (nvcuda::wmma 16x16x16 fragments, float32 accumulation),
//        64x64x32 tiles, 4 warps with a 32x32 warp tile each; the accumulators go through shared memory
//        for the bias + activation epilogue.
//  * Backward: one kernel computes the masked gradient g' = g * (out > 0) and per-64-row-chunk column
//    sums of g' (one thread per column and chunk, no atomics); a second adds the chunks in a fixed
//    order in double for the bias gradient, so results are bit-reproducible. dX = g' W^T and
//    dW = X^T g' are the same GEMM kernel on strided views, dW written in the weight's own layout.
#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/linear.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace customlayers::cuda {
namespace {

constexpr const char* kOp = "linear_act";
constexpr int kBytesPerVector = 16;

// kBytesPerVector bytes of T, loaded and stored as one vector instruction.
template <typename T>
struct alignas(kBytesPerVector) Pack {
  static constexpr int kSize = kBytesPerVector / sizeof(T);
  T v[kSize];
};

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
  bool relu;
};

// Moves a kRows x kCols tile (rows along K) of an Operand from global memory into shared memory as
// smem[k * ld + x], in two steps so that the global loads of the next tile overlap the math on the
// current one: fetch() into registers, store() into shared memory. Elements outside [0, K) x [0, X) are
// zero. kContigX: consecutive threads walk X (the operand's unit-stride dimension when it is X), else K.
// kVec: the walked dimension has unit stride, the other a multiple of Pack<T>::kSize, and p is aligned,
// so whole Packs are loaded where they lie inside the matrix.
template <typename T, int kRows, int kCols, int kThreads, bool kContigX, bool kVec>
struct TileLoader {
  static constexpr int kV = Pack<T>::kSize;
  static constexpr int kWalked = kContigX ? kCols : kRows;
  static constexpr int kGroups = kRows * kCols / kV;
  static_assert(kWalked % kV == 0 && kGroups % kThreads == 0, "tile must split into whole Packs per thread");
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

  __device__ __forceinline__ void fetch(const Operand<T>& op, int64_t K, int64_t X, int64_t k0, int64_t x0) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      int k, x;
      coords(threadIdx.x + i * kThreads, k, x);
      const int64_t gk = k0 + k, gx = x0 + x;
      const int64_t start = kContigX ? gx : gk, limit = kContigX ? X : K;  // along the group
      const bool inside = kContigX ? gk < K : gx < X;                      // across it
      const int64_t step = kContigX ? op.sx : op.sk;
      if (!inside) {
#pragma unroll
        for (int e = 0; e < kV; ++e) regs[i].v[e] = T(0.0f);
        continue;
      }
      const T* src = op.p + gk * op.sk + gx * op.sx;
      if (kVec && start + kV <= limit) {
        regs[i] = *reinterpret_cast<const Pack<T>*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < kV; ++e) regs[i].v[e] = start + e < limit ? src[e * step] : T(0.0f);
      }
    }
  }

  __device__ __forceinline__ void store(T* smem, int ld) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      int k, x;
      coords(threadIdx.x + i * kThreads, k, x);
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        if constexpr (kContigX) smem[k * ld + x + e] = regs[i].v[e];
        else smem[(k + e) * ld + x] = regs[i].v[e];
      }
    }
  }
};

// act(v + bias[n]) in the accumulation type; NaN stays NaN under ReLU, like torch.relu.
template <typename A, typename T>
__device__ __forceinline__ A bias_act(A v, const T* bias, int64_t n, bool relu) {
  if (bias != nullptr) v += static_cast<A>(bias[n]);
  return relu && v <= A(0) ? A(0) : v;
}

// The K loop of both GEMM kernels: BK-deep tiles of A and B, double-buffered through registers and the
// shared arrays As/Bs ([2][BK * LDA] and [2][BK * LDB]); compute(as, bs) consumes one tile pair while the
// next one is being fetched from global memory.
template <int BK, int LDA, int LDB, typename T, typename ALoader, typename BLoader, typename Compute>
__device__ __forceinline__ void gemm_k_loop(const GemmArgs<T>& args, int64_t m0, int64_t n0, ALoader& a_tile,
                                            BLoader& b_tile, T (*As)[BK * LDA], T (*Bs)[BK * LDB], Compute compute) {
  const int64_t tiles = (args.K + BK - 1) / BK;
  a_tile.fetch(args.a, args.K, args.M, 0, m0);
  b_tile.fetch(args.b, args.K, args.N, 0, n0);
  a_tile.store(As[0], LDA);
  b_tile.store(Bs[0], LDB);
  __syncthreads();
  for (int64_t t = 0; t < tiles; ++t) {
    const int cur = t & 1;
    const bool more = t + 1 < tiles;
    if (more) {
      a_tile.fetch(args.a, args.K, args.M, (t + 1) * BK, m0);
      b_tile.fetch(args.b, args.K, args.N, (t + 1) * BK, n0);
    }
    compute(As[cur], Bs[cur]);
    // The other buffer was last read before the previous barrier: safe to overwrite now.
    if (more) {
      a_tile.store(As[cur ^ 1], LDA);
      b_tile.store(Bs[cur ^ 1], LDB);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// float32 / float64 on CUDA cores.
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtTM = 4, kSimtTN = 4;
constexpr int kSimtThreads = (kSimtBM / kSimtTM) * (kSimtBN / kSimtTN);  // 256
constexpr int kSimtPad = 4;  // keeps rows 16-byte aligned, staggers banks

template <typename T, bool kAContigM, bool kBContigN, bool kVec>
__global__ void __launch_bounds__(kSimtThreads) gemm_simt_kernel(const GemmArgs<T> args) {
  using A = acc_t<T>;
  constexpr int BM = kSimtBM, BN = kSimtBN, BK = kSimtBK, TM = kSimtTM, TN = kSimtTN;
  constexpr int LDA = BM + kSimtPad, LDB = BN + kSimtPad;
  __shared__ __align__(16) T As[2][BK * LDA];
  __shared__ __align__(16) T Bs[2][BK * LDB];

  const int64_t m0 = int64_t(blockIdx.x) * BM, n0 = int64_t(blockIdx.y) * BN;
  const int tx = threadIdx.x % (BN / TN), ty = threadIdx.x / (BN / TN);
  TileLoader<T, BK, BM, kSimtThreads, kAContigM, kVec> a_tile;
  TileLoader<T, BK, BN, kSimtThreads, kBContigN, kVec> b_tile;
  A acc[TM][TN] = {};

  gemm_k_loop<BK, LDA, LDB>(args, m0, n0, a_tile, b_tile, As, Bs, [&](const T* as, const T* bs) {
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      A av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = static_cast<A>(as[k * LDA + ty * TM + i]);
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = static_cast<A>(bs[k * LDB + tx * TN + j]);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
  });

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty * TM + i;
    if (m >= args.M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + tx * TN + j;
      if (n < args.N) args.c[m * args.scm + n * args.scn] = static_cast<T>(bias_act(acc[i][j], args.bias, n, args.relu));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// float16 / bfloat16 on tensor cores.
template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int kTcBM = 64, kTcBN = 64, kTcBK = 32, kFrag = 16;
constexpr int kTcWarpsM = 2, kTcWarpsN = 2;
constexpr int kTcThreads = kTcWarpsM * kTcWarpsN * kWarp;           // 128
constexpr int kTcWarpM = kTcBM / kTcWarpsM, kTcWarpN = kTcBN / kTcWarpsN;  // 32 x 32 per warp
constexpr int kTcPad = 8;   // 16 bytes of 16-bit values: wmma's ldm must be a multiple of 8 elements
constexpr int kTcCPad = 4;  // float accumulator tile: ldm a multiple of 4

template <typename T, bool kAContigM, bool kBContigN, bool kVec>
__global__ void __launch_bounds__(kTcThreads) gemm_wmma_kernel(const GemmArgs<T> args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using W = typename WmmaType<T>::type;
  constexpr int BM = kTcBM, BN = kTcBN, BK = kTcBK;
  constexpr int LDA = BM + kTcPad, LDB = BN + kTcPad, LDC = BN + kTcCPad;
  constexpr int FM = kTcWarpM / kFrag, FN = kTcWarpN / kFrag;  // 2 x 2 fragments per warp
  // Fragment pointers must be 32-byte aligned: every row offset below is a multiple of 32 bytes.
  static_assert((LDA * sizeof(T) * kFrag) % 32 == 0 && (LDB * sizeof(T) * kFrag) % 32 == 0, "fragment alignment");
  __shared__ __align__(128) T As[2][BK * LDA];   // As[k][m]: A as a column-major fragment source
  __shared__ __align__(128) T Bs[2][BK * LDB];   // Bs[k][n]: B row-major
  __shared__ __align__(128) float Cs[BM * LDC];

  const int64_t m0 = int64_t(blockIdx.x) * BM, n0 = int64_t(blockIdx.y) * BN;
  const int warp = threadIdx.x / kWarp;
  const int wm = warp / kTcWarpsN, wn = warp % kTcWarpsN;
  TileLoader<T, BK, BM, kTcThreads, kAContigM, kVec> a_tile;
  TileLoader<T, BK, BN, kTcThreads, kBContigN, kVec> b_tile;
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  gemm_k_loop<BK, LDA, LDB>(args, m0, n0, a_tile, b_tile, As, Bs, [&](const T* a_smem, const T* b_smem) {
    const W* as = reinterpret_cast<const W*>(a_smem);
    const W* bs = reinterpret_cast<const W*>(b_smem);
#pragma unroll
    for (int kk = 0; kk < BK; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, W, wmma::col_major> af[FM];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, W, wmma::row_major> bf[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(af[i], as + kk * LDA + wm * kTcWarpM + i * kFrag, LDA);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(bf[j], bs + kk * LDB + wn * kTcWarpN + j * kFrag, LDB);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
  });

  // Accumulators -> shared memory -> bias + activation -> global, one row segment per warp pass.
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(Cs + (wm * kTcWarpM + i * kFrag) * LDC + wn * kTcWarpN + j * kFrag, acc[i][j], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < BM * BN; idx += kTcThreads) {
    const int r = idx / BN, col = idx % BN;
    const int64_t m = m0 + r, n = n0 + col;
    if (m < args.M && n < args.N)
      args.c[m * args.scm + n * args.scn] = static_cast<T>(bias_act(Cs[r * LDC + col], args.bias, n, args.relu));
  }
#else
  __trap();  // float16 / bfloat16 tensor-core GEMMs need sm_80 or newer
#endif
}

// ---------------------------------------------------------------------------------------------------
// Host side of the GEMM.

// Whether a K x X operand's X dimension is the one to walk (unit stride along X), and whether it can
// be read in whole Packs. Strides of size-1 dimensions do not matter.
template <typename T>
struct OperandLayout {
  bool contig_x;
  bool vec;
};

template <typename T>
OperandLayout<T> operand_layout(const Operand<T>& op, int64_t K, int64_t X) {
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

template <typename T, bool kTensorCores, bool kAContigM, bool kBContigN, bool kVec>
void launch_kernel(const GemmArgs<T>& args, cudaStream_t stream) {
  constexpr int64_t BM = kTensorCores ? kTcBM : kSimtBM, BN = kTensorCores ? kTcBN : kSimtBN;
  const int64_t n_tiles = (args.N + BN - 1) / BN;
  TORCH_CHECK(n_tiles <= 65535, kOp, ": out_features ", args.N, " is too large for the CUDA kernel");
  const dim3 grid(static_cast<unsigned>((args.M + BM - 1) / BM), static_cast<unsigned>(n_tiles));
  if constexpr (kTensorCores)
    gemm_wmma_kernel<T, kAContigM, kBContigN, kVec><<<grid, kTcThreads, 0, stream>>>(args);
  else
    gemm_simt_kernel<T, kAContigM, kBContigN, kVec><<<grid, kSimtThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernel for the operands' layouts (8 combinations, chosen at run time).
template <typename T, bool kTc>
void launch(const GemmArgs<T>& args, bool a_contig_m, bool b_contig_n, bool vec, cudaStream_t stream) {
  using Launcher = void (*)(const GemmArgs<T>&, cudaStream_t);
  static constexpr Launcher kTable[8] = {
      launch_kernel<T, kTc, false, false, false>, launch_kernel<T, kTc, false, false, true>,
      launch_kernel<T, kTc, false, true, false>,  launch_kernel<T, kTc, false, true, true>,
      launch_kernel<T, kTc, true, false, false>,  launch_kernel<T, kTc, true, false, true>,
      launch_kernel<T, kTc, true, true, false>,   launch_kernel<T, kTc, true, true, true>};
  kTable[(a_contig_m ? 4 : 0) + (b_contig_n ? 2 : 0) + (vec ? 1 : 0)](args, stream);
}

// C = act(A @ B + bias) for A (M x K) given as its K x M transpose view `a`, B (K x N).
template <typename T>
void gemm(const GemmArgs<T>& args, cudaStream_t stream) {
  if (args.M == 0 || args.N == 0) return;
  const OperandLayout<T> la = operand_layout(args.a, args.K, args.M);
  const OperandLayout<T> lb = operand_layout(args.b, args.K, args.N);
  const bool vec = la.vec && lb.vec;
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
    launch<T, true>(args, la.contig_x, lb.contig_x, vec, stream);
  } else {
    launch<T, false>(args, la.contig_x, lb.contig_x, vec, stream);
  }
}

// The K x M view of a row-major-indexed (M x K) tensor x2 (x2[m][k]).
template <typename T>
Operand<T> left(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(1), t.stride(0)};
}

// The K x N view of a (K x N) tensor.
template <typename T>
Operand<T> right(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      c10::string_view act_name) {
  check_linear_inputs(kOp, x, weight, bias);
  const Activation act = parse_activation(act_name, kOp);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = linear_rows(x), K = weight.size(0), N = weight.size(1);
  const at::Tensor x2 = as_matrix(x, M, K);
  at::Tensor out = at::empty({M, N}, x.options());
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_cuda", [&] {
    GemmArgs<scalar_t> args{left<scalar_t>(x2), right<scalar_t>(weight), out.mutable_data_ptr<scalar_t>(), N, 1,
                            b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, M, N, K,
                            act == Activation::kRelu};
    gemm(args, at::cuda::getCurrentCUDAStream());
  });
  return as_leading_shape(out, x, weight);
}

// ---------------------------------------------------------------------------------------------------
// Backward: masked gradient and bias gradient.
constexpr int kColThreads = 256;
constexpr int64_t kChunkRows = 64;
constexpr int64_t kMaxGridY = 65535;

// For column n and each chunk of kChunkRows rows: gp = relu ? g * (out > 0) : g, written when gp is
// set, and the chunk's sum of gp into partial[chunk * N + n] when partial is set.
template <typename T, bool kRelu>
__global__ void __launch_bounds__(kColThreads) mask_and_sum_kernel(const T* __restrict__ g, int64_t ldg,
                                                                   const T* __restrict__ out, int64_t ldo,
                                                                   T* __restrict__ gp, acc_t<T>* __restrict__ partial,
                                                                   int64_t M, int64_t N) {
  using A = acc_t<T>;
  const int64_t n = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t chunks = (M + kChunkRows - 1) / kChunkRows;
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t r0 = chunk * kChunkRows, r1 = min(M, r0 + kChunkRows);
    A sum = 0;
    for (int64_t r = r0; r < r1; ++r) {
      A v = static_cast<A>(g[r * ldg + n]);
      if constexpr (kRelu) {
        v = static_cast<A>(out[r * ldo + n]) > A(0) ? v : A(0);
        if (gp != nullptr) gp[r * N + n] = static_cast<T>(v);
      }
      sum += v;
    }
    if (partial != nullptr) partial[chunk * N + n] = sum;
  }
}

// db[n] = sum over chunks of partial[chunk * N + n], in chunk order, in double.
template <typename T>
__global__ void __launch_bounds__(kColThreads) bias_grad_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ db,
                                                                int64_t chunks, int64_t N) {
  const int64_t n = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (n >= N) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += static_cast<double>(partial[c * N + n]);
  db[n] = static_cast<T>(s);
}

// gp (when defined) = g2 masked by o2 > 0 (relu) and db (when defined) = column sums of the masked g2.
template <typename T>
void mask_and_sum(const at::Tensor& g2, const at::Tensor& o2, at::Tensor& gp, at::Tensor& db, bool relu,
                  cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t M = g2.size(0), N = g2.size(1);
  if (N == 0) return;
  const int64_t chunks = (M + kChunkRows - 1) / kChunkRows;
  at::Tensor partial;
  if (db.defined()) partial = at::empty({chunks, N}, g2.options().dtype(c10::CppTypeToScalarType<A>::value));
  A* partial_ptr = db.defined() ? partial.mutable_data_ptr<A>() : nullptr;
  T* gp_ptr = gp.defined() ? gp.mutable_data_ptr<T>() : nullptr;
  if (chunks > 0 && (gp_ptr != nullptr || partial_ptr != nullptr)) {
    const dim3 grid(static_cast<unsigned>((N + kColThreads - 1) / kColThreads),
                    static_cast<unsigned>(std::min(chunks, kMaxGridY)));
    if (relu)
      mask_and_sum_kernel<T, true><<<grid, kColThreads, 0, stream>>>(g2.const_data_ptr<T>(), g2.stride(0),
                                                                     o2.const_data_ptr<T>(), o2.stride(0),
                                                                     gp_ptr, partial_ptr, M, N);
    else
      mask_and_sum_kernel<T, false><<<grid, kColThreads, 0, stream>>>(g2.const_data_ptr<T>(), g2.stride(0), nullptr,
                                                                      0, nullptr, partial_ptr, M, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (db.defined()) {
    bias_grad_kernel<T><<<static_cast<unsigned>((N + kColThreads - 1) / kColThreads), kColThreads, 0, stream>>>(
        partial_ptr, db.mutable_data_ptr<T>(), chunks, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& out,
                                                                   c10::string_view act_name,
                                                                   std::array<bool, 3> mask) {
  const Activation act = check_linear_backward_inputs(grad, x, weight, out, act_name);
  const at::Tensor o = out.has_value() ? *out : at::Tensor();
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool relu = act == Activation::kRelu;
  const int64_t M = linear_rows(x), K = weight.size(0), N = weight.size(1);
  const at::Tensor x2 = as_matrix(x, M, K);
  const at::Tensor g2 = unit_column_stride(as_matrix(grad, M, N));
  const at::Tensor o2 = relu ? unit_column_stride(as_matrix(o, M, N)) : at::Tensor();
  const auto opts = x.options();
  at::Tensor dx = mask[0] ? at::empty({M, K}, opts) : at::Tensor();
  at::Tensor dw = mask[1] ? at::empty_strided({K, N}, weight_grad_strides(weight), opts) : at::Tensor();
  at::Tensor db = mask[2] ? at::empty({N}, opts) : at::Tensor();
  if (!mask[0] && !mask[1] && !mask[2]) return {dx, dw, db};

  // g' = g * (out > 0): its own buffer for relu when a GEMM needs it, g itself otherwise.
  const bool gemms = mask[0] || mask[1];
  at::Tensor gp = relu && gemms ? at::empty({M, N}, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_backward_cuda", [&] {
    using T = scalar_t;
    mask_and_sum<T>(g2, o2, gp, db, relu, stream);
    if (!gemms) return;
    if (!gp.defined()) gp = g2;
    if (mask[0]) {  // dX = g' @ W^T: [M, N] x [N, K]
      GemmArgs<T> args{left<T>(gp), {weight.const_data_ptr<T>(), weight.stride(1), weight.stride(0)},
                       dx.mutable_data_ptr<T>(), K, 1, nullptr, M, K, N, false};
      gemm(args, stream);
    }
    if (mask[1]) {  // dW = X^T @ g': [K, M] x [M, N]
      GemmArgs<T> args{{x2.const_data_ptr<T>(), x2.stride(0), x2.stride(1)}, right<T>(gp), dw.mutable_data_ptr<T>(),
                       dw.stride(0), dw.stride(1), nullptr, K, N, M, false};
      gemm(args, stream);
    }
  });
  if (dx.defined() && x.dim() != 2) dx = dx.view(x.sizes());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CUDA, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace customlayers::cuda
