// CPU kernels of customlayers::linear_act (y = act(x @ W + b)) and linear_act_backward.
//
// Small weights (in_features <= 64 and in * out <= 64K: the layers of small MLPs such as the book's
// 20 -> 256) run entirely on one hand-written register-blocked GEMM kernel (tile_product), where BLAS's
// GEMMs with a short inner dimension or few output columns run far below peak and per-call costs
// dominate:
//  * forward: one parallel pass over rows, bias + activation applied to each tile in registers;
//  * backward: one parallel pass over fixed blocks of rows; per 64-row chunk it makes the masked
//    gradient g' = grad * (out > 0), its bias-gradient column sums, dX = g' W^T and the block's share of
//    dW = X^T g', all while the chunk is in cache; the blocks' dW partials are then added in order.
// Larger weights use BLAS (at::cpu::mm_out: MKL/OpenBLAS, any operand strides, so weight may be the
// transposed view nn.Linear.weight.t() without a copy) with everything around it hand-written here,
// vectorized with at::vec and fused with the GEMMs by rows:
//  * forward: when the weight is small enough to stay in cache, the rows are cut into blocks of 64-512;
//    each task computes its block's GEMM (single-threaded BLAS) and applies bias + activation to the
//    block at once, while it is still in cache. Large weights (or a single block) get one multithreaded
//    GEMM and then one parallel epilogue pass (re-reading a large weight per block would cost more than
//    the pass).
//  * backward: one pass over grad computes the masked gradient g' and the bias gradient together; in
//    the blocked mode each block's dX = g' W^T follows immediately. dW = X^T g' is one multithreaded
//    GEMM over all rows, written in the weight's layout.
// float16/bfloat16 BLAS GEMMs run in float32 on CPUs without fast native ones (blas_in_float).
// Column sums are kept per fixed 64-row chunk and combined in order in double: the bias gradient does
// not depend on the thread count or the block size. With small weights neither does anything else
// (the dW blocks depend on the number of rows alone).
#include "common/checks.h"
#include "common/cpu_alloc.h"
#include "common/cpu_vec.h"
#include "common/linear_act.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <memory>
#include <tuple>
#include <vector>

namespace customlayers::cpu {
namespace {

constexpr const char* kOp = "linear_act";
constexpr int64_t kChunkRows = 64;                 // rows per bias-gradient partial sum (kColFlush)
constexpr int64_t kMaxBlockRows = 512;             // rows per block in the blocked mode
constexpr int64_t kCachedWeightBytes = 4 << 20;    // weights up to this size use the blocked mode
constexpr int64_t kTaskFlops = 1 << 18;            // at least this much GEMM work per task
constexpr int64_t kSmallMacs = 1 << 22;            // GEMMs up to this many multiply-adds are never blocked
constexpr int64_t kTaskElems = 1 << 16;            // at least this many elements per task of the elementwise-only passes

static_assert(kChunkRows == kColFlush, "bias-gradient chunks are add_column_sums' flush interval");

// How the rows are split: blocks of `rows` rows (a multiple of kChunkRows), `blocked` when each block
// runs its own GEMM; otherwise one GEMM covers all rows and the blocks only split the elementwise work.
struct RowPlan {
  bool blocked;
  int64_t rows;
  int64_t count;
  int64_t grain;  // blocks per task, for at::parallel_for
};

RowPlan plan_rows(int64_t M, int64_t K, int64_t N, int64_t element_size) {
  RowPlan plan;
  // Small GEMMs are not split: one BLAS call (with BLAS's own choice of threads) costs less than
  // per-block calls and a parallel region around them.
  plan.blocked = K * N * element_size <= kCachedWeightBytes && M * K * N > kSmallMacs;
  const int64_t threads = at::get_num_threads();
  // Enough blocks for every thread, each as tall as possible up to kMaxBlockRows.
  const int64_t per_thread = (M + threads - 1) / threads;
  plan.rows = std::clamp<int64_t>((per_thread + kChunkRows - 1) / kChunkRows * kChunkRows, kChunkRows,
                                  plan.blocked ? kMaxBlockRows : kMaxBlockRows * 4);
  plan.count = (M + plan.rows - 1) / plan.rows;
  // One block is one GEMM: called outside a parallel region, BLAS threads it itself.
  plan.blocked = plan.blocked && plan.count > 1;
  const int64_t block_work = plan.blocked ? 2 * plan.rows * std::max<int64_t>(K, 1) * N : plan.rows * N;
  plan.grain = std::max<int64_t>(1, (plan.blocked ? kTaskFlops : kTaskElems) / std::max<int64_t>(block_work, 1));
  return plan;
}

// out[r0:r1] = a[r0:r1] @ b, with BLAS on one thread when called inside a parallel region.
void mm_rows(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t r0, int64_t r1) {
  at::Tensor dst = out.narrow(0, r0, r1 - r0);
  at::cpu::mm_out(dst, a.narrow(0, r0, r1 - r0), b);
}

// act(v + bias[0..width)) for one vector of outputs (bias null: no bias). NaN stays NaN, like torch.relu.
template <typename A>
inline Vectorized<A> bias_act(Vectorized<A> v, const A* bias, Activation act) {
  if (bias != nullptr) v = v + Vectorized<A>::loadu(bias);
  return act == Activation::kRelu ? at::vec::maximum(v, Vectorized<A>(0)) : v;
}

// y[r, :] = act(y[r, :] + bias) for rows [r0, r1) of a contiguous [M, N] block.
template <typename T>
void epilogue_rows(T* y, int64_t r0, int64_t r1, int64_t N, const acc_t<T>* bias, Activation act) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  constexpr int64_t kW = Vec::size();
  for (int64_t r = r0; r < r1; ++r) {
    T* row = y + r * N;
    Vec v[L::kVecs];
    int64_t c = 0;
    for (; c + L::kStep <= N; c += L::kStep) {
      L::load(row + c, v);
      for (int j = 0; j < L::kVecs; ++j) v[j] = bias_act(v[j], bias != nullptr ? bias + c + j * kW : nullptr, act);
      L::store(row + c, v);
    }
    for (; c < N; ++c) {
      acc_t<T> s = static_cast<acc_t<T>>(row[c]) + (bias != nullptr ? bias[c] : acc_t<T>(0));
      if (act == Activation::kRelu) s = s > 0 || s != s ? s : acc_t<T>(0);
      row[c] = static_cast<T>(s);
    }
  }
}

// The masked gradient s = o ? g * (o > 0) : g (o null: no ReLU) of `rows` rows, stored to `gp` (T, row
// stride ldgp) and `buf` (acc_t, row stride ldb) where they are set, and added to the bias-gradient
// column sums `sums` where set. Rows are taken four at a time, summed in registers and then added to
// `sums`: one read-modify-write of the sums per four rows, in an order fixed by the row index alone.
template <typename T>
inline void mask_rows(const T* g, int64_t ldg, const T* o, int64_t ldo, int64_t rows, T* gp, int64_t ldgp,
                      acc_t<T>* buf, int64_t ldb, acc_t<T>* sums, int64_t N) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  using A = acc_t<T>;
  constexpr int64_t kW = Vec::size();
  constexpr int64_t kGroup = 4;
  const Vec zero(0);
  for (int64_t r0 = 0; r0 < rows; r0 += kGroup) {
    const int64_t nr = std::min(kGroup, rows - r0);
    int64_t c = 0;
    for (; c + L::kStep <= N; c += L::kStep) {
      Vec s[L::kVecs];
      for (auto& v : s) v = zero;
      for (int64_t r = r0; r < r0 + nr; ++r) {
        Vec v[L::kVecs], m[L::kVecs];
        L::load(g + r * ldg + c, v);
        if (o != nullptr) {
          L::load(o + r * ldo + c, m);
          for (int j = 0; j < L::kVecs; ++j) v[j] = v[j] & (m[j] > zero);  // exact g or +0
        }
        if (gp != nullptr) L::store(gp + r * ldgp + c, v);
        if (buf != nullptr)
          for (int j = 0; j < L::kVecs; ++j) v[j].store(buf + r * ldb + c + j * kW);
        for (int j = 0; j < L::kVecs; ++j) s[j] = s[j] + v[j];
      }
      if (sums != nullptr)
        for (int j = 0; j < L::kVecs; ++j) (Vec::loadu(sums + c + j * kW) + s[j]).store(sums + c + j * kW);
    }
    for (; c < N; ++c) {
      A sum = 0;
      for (int64_t r = r0; r < r0 + nr; ++r) {
        A v = static_cast<A>(g[r * ldg + c]);
        if (o != nullptr) v = static_cast<A>(o[r * ldo + c]) > 0 ? v : A(0);
        if (gp != nullptr) gp[r * ldgp + c] = static_cast<T>(v);
        if (buf != nullptr) buf[r * ldb + c] = v;
        sum += v;
      }
      if (sums != nullptr) sums[c] += sum;
    }
  }
}

// Chunk-wise bias-gradient partial sums: zero the chunk's acc_t column sums before its rows, store them
// in double to partial[chunk * N ...] after. (partial null: nothing.)
template <typename A>
inline void begin_chunk(A* scratch, const double* partial, int64_t N) {
  if (partial != nullptr) std::fill(scratch, scratch + N, A(0));
}
template <typename A>
inline void end_chunk(const A* scratch, double* partial, int64_t chunk, int64_t N) {
  if (partial == nullptr) return;
  double* dst = partial + chunk * N;
  for (int64_t c = 0; c < N; ++c) dst[c] = static_cast<double>(scratch[c]);
}

// For rows [r0, r1) (r0 a multiple of kChunkRows): the masked gradient of mask_rows into gp (when set),
// and, when `partial` is set, each 64-row chunk's column sums of it into partial[chunk * N ...].
template <typename T>
void mask_and_sum_rows(const T* g, int64_t ldg, const T* o, int64_t ldo, T* gp, int64_t r0, int64_t r1, int64_t N,
                       double* partial, acc_t<T>* scratch) {
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t c1 = std::min(r1, c0 + kChunkRows);
    begin_chunk(scratch, partial, N);
    mask_rows(g + c0 * ldg, ldg, o != nullptr ? o + c0 * ldo : nullptr, ldo, c1 - c0,
              gp != nullptr ? gp + c0 * N : nullptr, N, static_cast<acc_t<T>*>(nullptr), 0,
              partial != nullptr ? scratch : nullptr, N);
    end_chunk(scratch, partial, c0 / kChunkRows, N);
  }
}

// ------------------------------------------------------------- float16/bfloat16 GEMMs in float32
// BLAS's float16/bfloat16 GEMMs are fast only where the CPU has dot products for them (AVX512-BF16 or
// AMX-BF16, AVX512-FP16); elsewhere ATen runs them in a generic GEMM about 10x slower than float32 BLAS.
// There the BLAS path runs in float32 instead: operands widened once (exactly), the GEMMs and the
// epilogue in float32 (as the reduced-precision GEMMs accumulate), each output rounded once.
template <typename T>
bool blas_in_float() {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  static const bool native = std::is_same_v<T, at::BFloat16>
                                 ? __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16")
                                 : __builtin_cpu_supports("avx512fp16");
  return !native;
#else
  return false;  // other compilers and CPUs: BLAS's own float16/bfloat16 GEMMs
#endif
}

// dst[i] = float(src[i]) or dst[i] = T(src[i]) for i < n (T float16/bfloat16), vectorized, in parallel.
template <typename T, typename S, typename D>
void convert_span(const S* src, D* dst, int64_t n) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  constexpr int64_t kW = Vec::size();
  at::parallel_for(0, n, kTaskElems, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += L::kStep) {
      const int64_t m = std::min(L::kStep, end - i);
      Vec v[L::kVecs];
      if constexpr (std::is_same_v<S, T>) {
        L::load(src + i, m, v);
        for (int j = 0; j < L::kVecs; ++j)
          if (m > j * kW) v[j].store(dst + i + j * kW, std::min(kW, m - j * kW));
      } else {
        for (int j = 0; j < L::kVecs; ++j) v[j] = m > j * kW ? Vec::loadu(src + i + j * kW, std::min(kW, m - j * kW)) : Vec(0);
        L::store(dst + i, m, v);
      }
    }
  });
}

// A float32 copy of t (float16/bfloat16): with t's strides when t is dense, else row-major.
template <typename T>
at::Tensor widened(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return widened<T>(t.contiguous());
  at::Tensor f = cpu::empty_strided(t.sizes(), t.strides(), at::kFloat);
  convert_span<T>(t.const_data_ptr<T>(), f.mutable_data_ptr<float>(), t.numel());
  return f;
}

// dst = src rounded to T, both dense with the same strides.
template <typename T>
void narrowed_into(const at::Tensor& src, at::Tensor& dst) {
  convert_span<T>(src.const_data_ptr<float>(), dst.mutable_data_ptr<T>(), dst.numel());
}

// ------------------------------------------------------------------------------ small weights
// Weights with few inputs (K <= kSmallK, K * N <= kSmallWeight: the MLP layers of small models) get
// all three GEMMs from one register-blocked kernel here instead of BLAS, whose GEMMs with a short inner
// dimension or few output columns run far below peak and whose per-call overhead dominates at these
// sizes. The kernel (tile_product) computes a kTileRows x (kTileVecs vectors) tile of C = A @ B in
// registers, B being an acc_t panel with its columns zero-padded to whole tiles:
//  * forward: A = rows of x (acc_t copies), B = W packed as [K, Np]; bias + activation applied to the
//    tile before it is stored;
//  * dX: A = rows of a 64-row chunk of g' (made by the mask pass), B = W^T packed as [N, Kp];
//  * dW: A = X^T of the chunk (rows are x's columns), B = the chunk of g' [64, Np], added to its row
//    block's dW partial; the partials are added in block order, and blocks depend on M alone, so dW
//    does not depend on the thread count, like the bias gradient.
constexpr int64_t kSmallK = 64;
constexpr int64_t kSmallWeight = 1 << 16;
constexpr int64_t kTileRows = 4;
constexpr int kTileVecs = 3;

bool small_weight(int64_t K, int64_t N) { return K > 0 && N > 0 && K <= kSmallK && K * N <= kSmallWeight; }

template <typename T>
constexpr int64_t tile_cols() {
  return kTileVecs * Vectorized<acc_t<T>>::size();
}

template <typename T>
int64_t padded_cols(int64_t cols) {
  return (cols + tile_cols<T>() - 1) / tile_cols<T>() * tile_cols<T>();
}

// An uninitialized acc_t buffer of n values (the extension's CPU allocator: no zero fill, recycled).
template <typename T>
at::Tensor acc_buffer(int64_t n) {
  return cpu::empty({n}, c10::CppTypeToScalarType<acc_t<T>>::value);
}

// dst[r * sr + c * sc] = src[r * ld + c] for r < rows, c < cols: a row-major block stored in any layout
// (a transposing copy when the destination's columns are its contiguous dimension).
template <typename S, typename D>
void copy_block(const S* src, int64_t ld, int64_t rows, int64_t cols, D* dst, int64_t sr, int64_t sc) {
  if (sc == 1 || cols == 1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * sr + c] = static_cast<D>(src[r * ld + c]);
  } else if (sr == 1 || rows == 1) {
    transpose_copy(src, ld, rows, cols, dst, sc);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * sr + c * sc] = static_cast<D>(src[r * ld + c]);
  }
}

// b[i * ld + c] = src[i * si + c * sc] for i < inner, c < cols: acc_t rows of ld >= cols values, zero
// padded. Each parallel task packs its own copy of a panel: packed once and read by every thread, it
// would move from core to core on every call, which costs more than packing it again.
template <typename T>
void pack_panel(const T* src, int64_t inner, int64_t cols, int64_t si, int64_t sc, int64_t ld, acc_t<T>* b) {
  // src seen as the row-major [cols, inner] block with rows of sc values when its inner dimension is
  // contiguous (B is then its transpose); else as [inner, cols] with any strides.
  if (si == 1 && sc != 1) copy_block(src, sc, cols, inner, b, 1, ld);
  else
    for (int64_t i = 0; i < inner; ++i)
      for (int64_t c = 0; c < cols; ++c) b[i * ld + c] = static_cast<acc_t<T>>(src[i * si + c * sc]);
  for (int64_t i = 0; i < inner; ++i) std::fill(b + i * ld + cols, b + (i + 1) * ld, acc_t<T>(0));
}

template <typename A>
struct Tile {
  Vectorized<A> v[kTileRows][kTileVecs];
};

// acc[r][j] = sum over i in [i0, i1) of a[r * sr + i * si] * b[i * ldb + c0 + j * width]; rows r >= nrows
// repeat row nrows - 1 (read, never stored). All arguments by value: the loop keeps them in registers.
template <typename A>
inline Tile<A> tile_product(const A* a, int64_t sr, int64_t si, int64_t nrows, const A* b, int64_t ldb, int64_t c0,
                            int64_t i0, int64_t i1) {
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  const A* row[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) row[r] = a + std::min(r, nrows - 1) * sr;
  // Accumulated in locals and copied out once: kept in registers (accumulating into the returned
  // object directly makes GCC store it to memory on every iteration).
  Vec acc[kTileRows][kTileVecs];
  for (auto& rr : acc)
    for (auto& v : rr) v = Vec(0);
  for (int64_t i = i0; i < i1; ++i) {
    Vec w[kTileVecs];
    for (int j = 0; j < kTileVecs; ++j) w[j] = Vec::loadu(b + i * ldb + c0 + j * kW);
    for (int64_t r = 0; r < kTileRows; ++r) {
      const Vec av(row[r][i * si]);
      for (int j = 0; j < kTileVecs; ++j) acc[r][j] = at::vec::fmadd(av, w[j], acc[r][j]);
    }
  }
  Tile<A> t;
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int j = 0; j < kTileVecs; ++j) t.v[r][j] = acc[r][j];
  return t;
}

// dst[c] = v[c] for the first n values of a tile row.
template <typename T, typename A>
inline void store_tile_row(const Vectorized<A>* v, int64_t n, T* dst) {
  constexpr int64_t kW = Vectorized<A>::size();
  if constexpr (std::is_same_v<T, A>) {
    if (n == kTileVecs * kW) {
      for (int j = 0; j < kTileVecs; ++j) v[j].store(dst + j * kW);
      return;
    }
  }
  A tmp[kTileVecs * kW];
  for (int j = 0; j < kTileVecs; ++j) v[j].store(tmp + j * kW);
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(tmp[c]);
}

// Forward rows [r0, r1): y = act(x @ W + b) with W packed as [K, Np] and the bias padded to Np (or null).
template <typename T>
void small_forward_rows(const T* x, int64_t sxr, int64_t sxc, const acc_t<T>* wp, const acc_t<T>* bias, T* y,
                        int64_t r0, int64_t r1, int64_t K, int64_t N, Activation act) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  const int64_t ld = padded_cols<T>(N);
  A xs[kTileRows * kSmallK];
  for (int64_t q0 = r0; q0 < r1; q0 += kTileRows) {
    const int64_t nq = std::min(kTileRows, r1 - q0);
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t k = 0; k < K; ++k) xs[i * K + k] = static_cast<A>(x[(q0 + i) * sxr + k * sxc]);
    for (int64_t c0 = 0; c0 < N; c0 += tile_cols<T>()) {
      Tile<A> t = tile_product(xs, K, 1, nq, wp, ld, c0, 0, K);
      for (int64_t i = 0; i < nq; ++i) {
        for (int j = 0; j < kTileVecs; ++j)
          t.v[i][j] = bias_act(t.v[i][j], bias != nullptr ? bias + c0 + j * kW : nullptr, act);
        store_tile_row(t.v[i], std::min(tile_cols<T>(), N - c0), y + (q0 + i) * N + c0);
      }
    }
  }
}

// The small-weight forward; `bias` (acc_t, null: none) is padded with zeros to padded_cols(N).
template <typename T>
void small_forward(const at::Tensor& x2, const at::Tensor& weight, const acc_t<T>* bptr, at::Tensor& out,
                   Activation act) {
  const int64_t M = x2.size(0), K = x2.size(1), N = out.size(1);
  const T* w = weight.const_data_ptr<T>();
  const int64_t swk = weight.stride(0), swn = weight.stride(1);
  const T* x = x2.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  const int64_t sxr = x2.stride(0), sxc = x2.stride(1);
  const int64_t grain = std::max<int64_t>(kTileRows, kTaskFlops / (2 * K * N));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    const at::Tensor wp = acc_buffer<T>(K * padded_cols<T>(N));  // W as [K, Np]
    acc_t<T>* wpp = wp.template mutable_data_ptr<acc_t<T>>();
    pack_panel(w, K, N, swk, swn, padded_cols<T>(N), wpp);
    small_forward_rows(x, sxr, sxc, wpp, bptr, y, begin, end, K, N, act);
  });
}

// The small-weight backward, for one block of rows [r0, r1) (r0 a multiple of kChunkRows), a 64-row
// chunk at a time: the chunk's masked gradient g' (acc_t, into the chunk buffer `gp`, rows of ldp) and
// its bias-gradient column sums (into `partial`, when set); then dX = g' W^T for it (W^T packed as
// [N, Kp]; when dx is set) and X^T g' added to the block's dW partial `dwp` ([K, ldp] acc_t; when set).
// X is read as acc_t: directly (xa, row stride ldx) when it is, else converted per chunk into `xbuf`.
template <typename T>
void small_backward_block(const T* g, int64_t ldg, const T* o, int64_t ldo, const T* x, int64_t sxr, int64_t sxc,
                          bool x_direct, const acc_t<T>* wt, T* dx, acc_t<T>* dwp, double* partial, int64_t r0,
                          int64_t r1, int64_t N, int64_t K, acc_t<T>* gp, acc_t<T>* xbuf, acc_t<T>* scratch) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  const int64_t ldp = padded_cols<T>(N), ldk = padded_cols<T>(K);
  if (dwp != nullptr) std::fill(dwp, dwp + K * ldp, A(0));
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t rows = std::min(r1, c0 + kChunkRows) - c0;
    begin_chunk(scratch, partial, N);
    mask_rows(g + c0 * ldg, ldg, o != nullptr ? o + c0 * ldo : nullptr, ldo, rows, static_cast<T*>(nullptr), 0, gp,
              ldp, partial != nullptr ? scratch : nullptr, N);
    end_chunk(scratch, partial, c0 / kChunkRows, N);
    if (dwp != nullptr)  // g' is dW's B panel: its padding columns are read
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = N; c < ldp; ++c) gp[i * ldp + c] = A(0);
    if (dx != nullptr) {
      for (int64_t q = 0; q < rows; q += kTileRows) {
        const int64_t nq = std::min(kTileRows, rows - q);
        for (int64_t kb = 0; kb < K; kb += tile_cols<T>()) {
          const Tile<A> t = tile_product(gp + q * ldp, ldp, 1, nq, wt, ldk, kb, 0, N);
          for (int64_t i = 0; i < nq; ++i)
            store_tile_row(t.v[i], std::min(tile_cols<T>(), K - kb), dx + (c0 + q + i) * K + kb);
        }
      }
    }
    if (dwp == nullptr) continue;
    const A* xa;
    int64_t ldx;
    if (x_direct) {
      xa = reinterpret_cast<const A*>(x) + c0 * sxr;
      ldx = sxr;
    } else {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t k = 0; k < K; ++k) xbuf[i * K + k] = static_cast<A>(x[(c0 + i) * sxr + k * sxc]);
      xa = xbuf;
      ldx = K;
    }
    // The block's dW += X_chunk^T g'_chunk: rows of the tile are x's columns k0..k0+3.
    for (int64_t k0 = 0; k0 < K; k0 += kTileRows) {
      const int64_t nk = std::min(kTileRows, K - k0);
      for (int64_t n0 = 0; n0 < ldp; n0 += tile_cols<T>()) {
        const Tile<A> t = tile_product(xa + k0, 1, ldx, nk, gp, ldp, n0, 0, rows);
        for (int64_t r = 0; r < nk; ++r) {
          A* dst = dwp + (k0 + r) * ldp + n0;
          for (int j = 0; j < kTileVecs; ++j) (Vec::loadu(dst + j * kW) + t.v[r][j]).store(dst + j * kW);
        }
      }
    }
  }
}

// Rows [k0, k1) of dW: the blocks' partials (block b's row k at parts[b * stride + k * ldp], rows padded
// to ldp, a whole number of vectors) added in block order in acc_t into block 0's, then stored to dst
// (strides sk, sn).
template <typename T>
void finish_dw_rows(acc_t<T>* parts, int64_t stride, int64_t blocks, int64_t ldp, int64_t k0, int64_t k1, T* dst,
                    int64_t sk, int64_t sn, int64_t N) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  for (int64_t k = k0; k < k1 && blocks > 1; ++k) {
    A* row = parts + k * ldp;
    for (int64_t n0 = 0; n0 < ldp; n0 += kW) {
      Vec acc = Vec::loadu(row + n0);
      for (int64_t b = 1; b < blocks; ++b) acc = acc + Vec::loadu(row + b * stride + n0);
      acc.store(row + n0);
    }
  }
  copy_block(parts + k0 * ldp, ldp, k1 - k0, N, dst + k0 * sk, sk, sn);
}

// Rows per dW block: a whole number of chunks (at least kMinDwBlockRows), at most kDwBlocks blocks. It
// depends on M alone, so the order of dW's additions (rows within a block, then blocks in order) does too.
constexpr int64_t kDwBlocks = 16;
constexpr int64_t kMinDwBlockRows = 2 * kChunkRows;
int64_t dw_block_rows(int64_t M) {
  const int64_t per_block = (M + kDwBlocks - 1) / kDwBlocks;
  return std::max<int64_t>(kMinDwBlockRows, (per_block + kChunkRows - 1) / kChunkRows * kChunkRows);
}

// The whole small-weight backward in one parallel pass over blocks of rows (small_backward_block), then
// the blocks' dW partials summed in order.
template <typename T>
void small_backward(const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& o2,
                    at::Tensor& dx, at::Tensor& dw, double* partial) {
  using A = acc_t<T>;
  const int64_t M = g2.size(0), N = g2.size(1), K = x2.size(1);
  const int64_t ldp = padded_cols<T>(N), ldk = padded_cols<T>(K);
  const T* w = weight.const_data_ptr<T>();
  const int64_t swk = weight.stride(0), swn = weight.stride(1);
  const int64_t block_rows = dw_block_rows(M);
  const int64_t blocks = (M + block_rows - 1) / block_rows;
  const at::Tensor dw_parts = dw.defined() ? acc_buffer<T>(blocks * K * ldp) : at::Tensor();
  A* parts = dw.defined() ? dw_parts.template mutable_data_ptr<A>() : nullptr;
  const T* g = g2.const_data_ptr<T>();
  const T* o = o2.defined() ? o2.const_data_ptr<T>() : nullptr;
  const T* x = x2.const_data_ptr<T>();
  T* dxp = dx.defined() ? dx.mutable_data_ptr<T>() : nullptr;
  const int64_t ldg = g2.stride(0), ldo = o2.defined() ? o2.stride(0) : 0;
  const int64_t sxr = x2.stride(0), sxc = x2.stride(1);
  const bool x_direct = std::is_same_v<T, A> && sxc == 1;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // The chunk buffers, then W^T packed as [N, Kp] when dX is wanted.
    const at::Tensor buf = acc_buffer<T>(kChunkRows * (ldp + K) + N + (dxp != nullptr ? N * ldk : 0));
    A* gp = buf.template mutable_data_ptr<A>();
    A* wtp = dxp != nullptr ? gp + kChunkRows * (ldp + K) + N : nullptr;
    if (wtp != nullptr) pack_panel(w, N, K, swn, swk, ldk, wtp);
    for (int64_t blk = begin; blk < end; ++blk)
      small_backward_block(g, ldg, o, ldo, x, sxr, sxc, x_direct, wtp, dxp,
                           parts != nullptr ? parts + blk * K * ldp : nullptr, partial, blk * block_rows,
                           std::min(M, (blk + 1) * block_rows), N, K, gp, gp + kChunkRows * ldp,
                           gp + kChunkRows * (ldp + K));
  });
  if (!dw.defined()) return;
  if (blocks == 0) {  // no rows: an empty sum
    dw.zero_();
    return;
  }
  // dW = the blocks' partials added in block order (in acc_t: at most kDwBlocks terms).
  T* dwo = dw.mutable_data_ptr<T>();
  const int64_t sk = dw.stride(0), sn = dw.stride(1);
  at::parallel_for(0, K, std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, blocks * ldp)), [&](int64_t k0, int64_t k1) {
    finish_dw_rows(parts, K * ldp, blocks, ldp, k0, k1, dwo, sk, sn, N);
  });
}

// The BLAS forward (bias: acc_t, null for none): one GEMM and one epilogue pass, or per row block a GEMM
// and its epilogue while the block is in cache (plan_rows).
template <typename T>
void blas_forward(const at::Tensor& x2, const at::Tensor& weight, const acc_t<T>* bias, at::Tensor& out,
                  Activation act) {
  const int64_t M = x2.size(0), K = x2.size(1), N = out.size(1);
  if (K == 0) out.zero_();  // an empty sum; BLAS is not asked about zero-length inner dimensions
  const RowPlan plan = plan_rows(M, K, N, out.element_size());
  if (!plan.blocked && K > 0) at::cpu::mm_out(out, x2, weight);
  T* y = out.mutable_data_ptr<T>();
  if (bias == nullptr && act == Activation::kNone && (!plan.blocked || K == 0)) return;
  at::parallel_for(0, plan.count, plan.grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * plan.rows, r1 = std::min(M, r0 + plan.rows);
      if (plan.blocked && K > 0) mm_rows(out, x2, weight, r0, r1);
      epilogue_rows(y, r0, r1, N, bias, act);
    }
  });
}

template <typename T>
void forward_impl(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
                  Activation act) {
  using A = acc_t<T>;
  const int64_t K = x2.size(1), N = out.size(1);
  const bool small = small_weight(K, N);
  // The bias in the accumulation type, once (loads of float16/bfloat16 need widening otherwise); zero
  // padded to whole tiles for the small-weight kernel.
  std::vector<A> bias_acc;
  if (bias.defined()) {
    const T* b = bias.const_data_ptr<T>();
    bias_acc.assign(small ? padded_cols<T>(N) : N, A(0));
    std::copy(b, b + N, bias_acc.begin());
  }
  const A* bias_ptr = bias.defined() ? bias_acc.data() : nullptr;
  if (small) return small_forward<T>(x2, weight, bias_ptr, out, act);
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    if (blas_in_float<T>()) {
      at::Tensor out_f = cpu::empty_strided(out.sizes(), out.strides(), at::kFloat);
      blas_forward<float>(widened<T>(x2), widened<T>(weight), bias_ptr, out_f, act);
      return narrowed_into<T>(out_f, out);
    }
  }
  blas_forward<T>(x2, weight, bias_ptr, out, act);
}

at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      c10::string_view act_name) {
  check_linear_inputs(kOp, x, weight, bias);
  const Activation act = parse_activation(act_name, kOp);
  const int64_t K = weight.size(0), N = weight.size(1);
  const at::Tensor x2 = as_matrix(x, linear_rows(x), K);
  at::Tensor out = cpu::empty({x2.size(0), N}, x.scalar_type());
  if (out.numel() > 0) {
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_cpu",
                                    [&] { forward_impl<scalar_t>(x2, weight, b, out, act); });
  }
  return as_leading_shape(out, x, weight);
}

// The BLAS backward: the mask pass (with the bias-gradient partials; in the blocked mode each block's
// dX GEMM follows it while the block is in cache), then the remaining GEMMs over all rows.
template <typename T>
void blas_backward(const at::Tensor& g2, const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& o2,
                   at::Tensor& dx, at::Tensor& dw, double* partial) {
  const int64_t M = g2.size(0), N = g2.size(1), K = x2.size(1);
  const bool relu = o2.defined(), grads = dx.defined() || dw.defined();
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    if (grads && blas_in_float<T>()) {  // the same in float32 (the bias-gradient sums are unchanged)
      at::Tensor dx_f = dx.defined() ? cpu::empty_strided(dx.sizes(), dx.strides(), at::kFloat) : at::Tensor();
      at::Tensor dw_f = dw.defined() ? cpu::empty_strided(dw.sizes(), dw.strides(), at::kFloat) : at::Tensor();
      // x is read only for dW and the weight only for dX (else only their sizes): widened when read.
      blas_backward<float>(widened<T>(g2), dw.defined() ? widened<T>(x2) : x2,
                           dx.defined() ? widened<T>(weight) : weight, relu ? widened<T>(o2) : at::Tensor(), dx_f,
                           dw_f, partial);
      if (dx.defined()) narrowed_into<T>(dx_f, dx);
      if (dw.defined()) narrowed_into<T>(dw_f, dw);
      return;
    }
  }
  // g' = g * (out > 0): its own buffer for relu, g itself otherwise.
  const at::Tensor gp = relu && grads ? cpu::empty({M, N}, g2.scalar_type()) : g2;
  const RowPlan plan = plan_rows(M, N, K, g2.element_size());  // dX = g' @ W^T: [M, N] x [N, K]
  const bool fused_dx = dx.defined() && plan.blocked && N > 0;
  if ((relu && grads) || partial != nullptr || fused_dx) {
    const T* g = g2.const_data_ptr<T>();
    const T* o = relu ? o2.const_data_ptr<T>() : nullptr;
    T* gpp = gp.is_same(g2) ? nullptr : gp.mutable_data_ptr<T>();
    const int64_t ldg = g2.stride(0), ldo = relu ? o2.stride(0) : 0;
    const at::Tensor wt = fused_dx ? weight.t() : at::Tensor();
    at::parallel_for(0, plan.count, plan.grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t<T>> scratch(partial != nullptr ? N : 0);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * plan.rows, r1 = std::min(M, r0 + plan.rows);
        mask_and_sum_rows(g, ldg, o, ldo, gpp, r0, r1, N, partial, scratch.data());
        if (fused_dx) mm_rows(dx, gp, wt, r0, r1);
      }
    });
  }
  if (dx.defined() && !fused_dx) {
    if (N > 0) at::cpu::mm_out(dx, gp, weight.t());
    else dx.zero_();
  }
  if (dw.defined()) {
    if (M > 0) at::cpu::mm_out(dw, x2.t(), gp);
    else dw.zero_();
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& g2, const at::Tensor& x2,
                                                             const at::Tensor& weight, const at::Tensor& o2,
                                                             std::array<bool, 3> mask) {
  const int64_t M = g2.size(0), N = g2.size(1), K = x2.size(1);
  const auto dtype = g2.scalar_type();
  at::Tensor dx = mask[0] ? cpu::empty({M, K}, dtype) : at::Tensor();
  at::Tensor dw = mask[1] ? cpu::empty_strided({K, N}, weight_grad_strides(weight), dtype) : at::Tensor();
  at::Tensor db = mask[2] ? cpu::empty({N}, dtype) : at::Tensor();
  if (!mask[0] && !mask[1] && !mask[2]) return {dx, dw, db};

  const int64_t chunks = (M + kChunkRows - 1) / kChunkRows;
  // Every chunk's row of bias-gradient partial sums is written by the mask pass.
  const auto partial = std::make_unique_for_overwrite<double[]>(mask[2] ? chunks * N : 0);
  double* partial_ptr = mask[2] ? partial.get() : nullptr;
  if (small_weight(K, N) && (mask[0] || mask[1])) small_backward<T>(g2, x2, weight, o2, dx, dw, partial_ptr);
  else blas_backward<T>(g2, x2, weight, o2, dx, dw, partial_ptr);
  if (mask[2]) {
    // Chunks added in order, in double.
    T* dbp = db.mutable_data_ptr<T>();
    at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(end - begin, 0.0);
      for (int64_t k = 0; k < chunks; ++k) {
        const double* src = partial_ptr + k * N;
        for (int64_t c = begin; c < end; ++c) acc[c - begin] += src[c];
      }
      for (int64_t c = begin; c < end; ++c) dbp[c] = static_cast<T>(acc[c - begin]);
    });
  }
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& out,
                                                                   c10::string_view act_name,
                                                                   std::array<bool, 3> mask) {
  const Activation act = check_linear_backward_inputs(grad, x, weight, out, act_name);
  const at::Tensor o = out.has_value() ? *out : at::Tensor();
  const int64_t K = weight.size(0), N = weight.size(1);
  const int64_t M = linear_rows(x);
  const at::Tensor x2 = as_matrix(x, M, K);
  const at::Tensor g2 = unit_column_stride(as_matrix(grad, M, N));
  // Defined only for act='relu'.
  const at::Tensor o2 = act == Activation::kRelu ? unit_column_stride(as_matrix(o, M, N)) : at::Tensor();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_backward_cpu",
                                  [&] { result = backward_impl<scalar_t>(g2, x2, weight, o2, mask); });
  auto& dx = std::get<0>(result);
  if (dx.defined() && x.dim() != 2) dx = dx.view(x.sizes());
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CPU, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace customlayers::cpu
