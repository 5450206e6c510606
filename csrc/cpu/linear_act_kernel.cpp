// CPU kernels of customlayers::linear_act (y = act(x @ W + b)) and linear_act_backward.
//
// The GEMMs are BLAS (at::cpu::mm_out: MKL/OpenBLAS, any operand strides, so weight may be the
// transposed view nn.Linear.weight.t() without a copy). Everything around them is hand-written here,
// vectorized with at::vec and fused with the GEMMs by rows:
//  * forward: when the weight is small enough to stay in cache, the rows are cut into blocks of 64-512;
//    each task computes its block's GEMM (single-threaded BLAS) and applies bias + activation to the
//    block at once, while it is still in cache. Large weights get one multithreaded GEMM and then one
//    parallel epilogue pass (re-reading a large weight per block would cost more than the pass).
//  * backward: one pass over grad computes the masked gradient g' = grad * (out > 0) and the bias
//    gradient (column sums of g') together; in the blocked mode each block's dX = g' W^T follows
//    immediately. dW = X^T g' is one multithreaded GEMM over all rows. Small weights (few inputs)
//    skip BLAS for dX: each group of rows computes its dX from g' held in registers/L1.
// Column sums are kept per fixed 64-row chunk and combined in order in double: the bias gradient
// does not depend on the thread count or the block size.
#include "common/checks.h"
#include "common/cpu_alloc.h"
#include "common/cpu_vec.h"
#include "common/linear.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

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
  const int64_t block_work = plan.blocked ? 2 * plan.rows * std::max<int64_t>(K, 1) * N : plan.rows * N;
  plan.grain = std::max<int64_t>(1, (plan.blocked ? kTaskFlops : kTaskElems) / std::max<int64_t>(block_work, 1));
  return plan;
}

// out[r0:r1] = a[r0:r1] @ b, with BLAS on one thread when called inside a parallel region.
void mm_rows(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t r0, int64_t r1) {
  at::Tensor dst = out.narrow(0, r0, r1 - r0);
  at::cpu::mm_out(dst, a.narrow(0, r0, r1 - r0), b);
}

// y[r, :] = act(y[r, :] + bias) for rows [r0, r1) of a contiguous [M, N] block.
template <typename T>
void epilogue_rows(T* y, int64_t r0, int64_t r1, int64_t N, const acc_t<T>* bias, Activation act) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  constexpr int64_t kW = Vec::size();
  const Vec zero(0);
  auto apply = [&](Vec* v, int64_t c) {
    for (int j = 0; j < L::kVecs; ++j) {
      if (bias != nullptr) v[j] = v[j] + Vec::loadu(bias + c + j * kW);
      if (act == Activation::kRelu) v[j] = at::vec::maximum(v[j], zero);  // NaN stays NaN, like torch.relu
    }
  };
  for (int64_t r = r0; r < r1; ++r) {
    T* row = y + r * N;
    Vec v[L::kVecs];
    int64_t c = 0;
    for (; c + L::kStep <= N; c += L::kStep) {
      L::load(row + c, v);
      apply(v, c);
      L::store(row + c, v);
    }
    for (; c < N; ++c) {
      acc_t<T> s = static_cast<acc_t<T>>(row[c]) + (bias != nullptr ? bias[c] : acc_t<T>(0));
      if (act == Activation::kRelu) s = s > 0 || s != s ? s : acc_t<T>(0);
      row[c] = static_cast<T>(s);
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
                  Activation act) {
  using A = acc_t<T>;
  const int64_t M = x2.size(0), K = x2.size(1), N = out.size(1);
  // The bias in the accumulation type, once (loads of float16/bfloat16 need widening otherwise).
  std::vector<A> bias_acc;
  if (bias.defined()) {
    const T* b = bias.const_data_ptr<T>();
    bias_acc.assign(b, b + N);
  }
  const A* bias_ptr = bias.defined() ? bias_acc.data() : nullptr;
  if (K == 0) out.zero_();  // an empty sum; BLAS is not asked about zero-length inner dimensions
  const RowPlan plan = plan_rows(M, K, N, out.element_size());
  if (!plan.blocked && K > 0) at::cpu::mm_out(out, x2, weight);
  T* y = out.mutable_data_ptr<T>();
  if (!bias.defined() && act == Activation::kNone && (!plan.blocked || K == 0)) return;
  at::parallel_for(0, plan.count, plan.grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * plan.rows, r1 = std::min(M, r0 + plan.rows);
      if (plan.blocked && K > 0) mm_rows(out, x2, weight, r0, r1);
      epilogue_rows(y, r0, r1, N, bias_ptr, act);
    }
  });
}

at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      c10::string_view act_name) {
  check_linear_inputs(kOp, x, weight, bias);
  const Activation act = parse_activation(act_name, kOp);
  const int64_t K = weight.size(0), N = weight.size(1);
  const at::Tensor x2 = x.reshape({linear_rows(x), K});
  at::Tensor out = cpu::empty({x2.size(0), N}, x.scalar_type());
  if (out.numel() > 0) {
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_cpu",
                                    [&] { forward_impl<scalar_t>(x2, weight, b, out, act); });
  }
  return out.view(linear_output_shape(x, weight));
}

// One row of the masked gradient s = o ? g * (o > 0) : g (o null: no ReLU), stored to `gp` (T) and `buf`
// (acc_t) where they are set, and added to the bias-gradient column sums `sums` where set.
template <typename T>
inline void mask_row(const T* g, const T* o, T* gp, acc_t<T>* buf, acc_t<T>* sums, int64_t N) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  using A = acc_t<T>;
  constexpr int64_t kW = Vec::size();
  const Vec zero(0);
  Vec v[L::kVecs], m[L::kVecs];
  int64_t c = 0;
  for (; c + L::kStep <= N; c += L::kStep) {
    L::load(g + c, v);
    if (o != nullptr) {
      L::load(o + c, m);
      for (int j = 0; j < L::kVecs; ++j) v[j] = v[j] & (m[j] > zero);  // exact g or +0
    }
    if (gp != nullptr) L::store(gp + c, v);
    if (buf != nullptr)
      for (int j = 0; j < L::kVecs; ++j) v[j].store(buf + c + j * kW);
    if (sums != nullptr)
      for (int j = 0; j < L::kVecs; ++j) (Vec::loadu(sums + c + j * kW) + v[j]).store(sums + c + j * kW);
  }
  for (; c < N; ++c) {
    A s = static_cast<A>(g[c]);
    if (o != nullptr) s = static_cast<A>(o[c]) > 0 ? s : A(0);
    if (gp != nullptr) gp[c] = static_cast<T>(s);
    if (buf != nullptr) buf[c] = s;
    if (sums != nullptr) sums[c] += s;
  }
}

// For rows [r0, r1) (r0 a multiple of kChunkRows): gp = relu ? g * (o > 0) : g (written only for relu),
// and, when `partial` is set, each 64-row chunk's column sums of gp into partial[chunk * N ...].
template <typename T>
void mask_and_sum_rows(const T* g, int64_t ldg, const T* o, int64_t ldo, T* gp, int64_t r0, int64_t r1, int64_t N,
                       Activation act, double* partial, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const bool relu = act == Activation::kRelu;
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t c1 = std::min(r1, c0 + kChunkRows);
    if (partial != nullptr) std::fill(scratch, scratch + N, A(0));
    for (int64_t r = c0; r < c1; ++r) {
      const T* gr = g + r * ldg;
      mask_row(gr, relu ? o + r * ldo : nullptr, relu ? gp + r * N : nullptr, nullptr,
               partial != nullptr ? scratch : nullptr, N);
    }
    if (partial != nullptr) {
      double* dst = partial + (c0 / kChunkRows) * N;
      for (int64_t c = 0; c < N; ++c) dst[c] = static_cast<double>(scratch[c]);
    }
  }
}

// The small-weight backward (K <= kSmallK inputs, K * N <= kSmallWeight): dX = g' W^T is computed here
// rather than by BLAS, whose GEMM with few output columns is slow. Rows are taken kDxRows at a time:
// their masked gradient is made once in acc_t (also written to gp for dW when `gp` is set, and added
// to the chunk's bias-gradient column sums like mask_and_sum_rows), then each dX element is a dot
// accumulated as broadcast(g'[r, n]) * W^T[n, :] against an acc_t copy of W^T ([N, Kp], zero-padded).
constexpr int64_t kSmallK = 64;
constexpr int64_t kSmallWeight = 1 << 16;
constexpr int64_t kDxRows = 4;
constexpr int kDxCols = 3;  // output vectors per pass: kDxRows * kDxCols accumulators

template <typename T>
void small_backward_rows(const T* g, int64_t ldg, const T* o, int64_t ldo, T* gp, T* dx, const acc_t<T>* wt,
                         int64_t r0, int64_t r1, int64_t N, int64_t K, int64_t Kp, Activation act, double* partial,
                         acc_t<T>* scratch, acc_t<T>* rows_buf) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  using A = acc_t<T>;
  constexpr int64_t kW = Vec::size();
  const Vec zero(0);
  const bool relu = act == Activation::kRelu;
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t c1 = std::min(r1, c0 + kChunkRows);
    if (partial != nullptr) std::fill(scratch, scratch + N, A(0));
    for (int64_t q0 = c0; q0 < c1; q0 += kDxRows) {
      const int64_t nq = std::min(kDxRows, c1 - q0);
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t r = q0 + i;
        const T* gr = g + r * ldg;
        mask_row(gr, relu ? o + r * ldo : nullptr, gp != nullptr ? gp + r * N : nullptr, rows_buf + i * N,
                 partial != nullptr ? scratch : nullptr, N);
      }
      if (dx == nullptr) continue;
      for (int64_t i = nq; i < kDxRows; ++i) std::fill(rows_buf + i * N, rows_buf + (i + 1) * N, A(0));
      // dX rows += g'[r, n] * W^T[n, :], kDxCols vectors of outputs at a time (all in registers).
      for (int64_t kb = 0; kb < Kp; kb += kDxCols * kW) {
        Vec acc[kDxRows][kDxCols];
        for (auto& row : acc)
          for (auto& a : row) a = zero;
        for (int64_t n = 0; n < N; ++n) {
          Vec w[kDxCols];
          for (int j = 0; j < kDxCols; ++j) w[j] = Vec::loadu(wt + n * Kp + kb + j * kW);
          for (int64_t i = 0; i < kDxRows; ++i) {
            const Vec gv(rows_buf[i * N + n]);
            for (int j = 0; j < kDxCols; ++j) acc[i][j] = at::vec::fmadd(gv, w[j], acc[i][j]);
          }
        }
        const int64_t nk = std::min<int64_t>(K - kb, kDxCols * kW);
        for (int64_t i = 0; i < nq; ++i) {
          A out[kDxCols * kW];
          for (int j = 0; j < kDxCols; ++j) acc[i][j].store(out + j * kW);
          T* dst = dx + (q0 + i) * K + kb;
          for (int64_t k = 0; k < nk; ++k) dst[k] = static_cast<T>(out[k]);
        }
      }
    }
    if (partial != nullptr) {
      double* dst = partial + (c0 / kChunkRows) * N;
      for (int64_t c = 0; c < N; ++c) dst[c] = static_cast<double>(scratch[c]);
    }
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& g2, const at::Tensor& x2,
                                                             const at::Tensor& weight, const at::Tensor& o2,
                                                             Activation act, std::array<bool, 3> mask) {
  using A = acc_t<T>;
  const int64_t M = g2.size(0), N = g2.size(1), K = x2.size(1);
  const auto dtype = g2.scalar_type();
  const bool relu = act == Activation::kRelu;
  at::Tensor dx = mask[0] ? cpu::empty({M, K}, dtype) : at::Tensor();
  // dW in weight's layout (nn.Linear.weight.t() gets a gradient whose .t() is contiguous).
  at::Tensor dw;
  if (mask[1])
    dw = weight.stride(0) == 1 && weight.stride(1) != 1 ? cpu::empty({N, K}, dtype).t() : cpu::empty({K, N}, dtype);
  at::Tensor db = mask[2] ? cpu::empty({N}, dtype) : at::Tensor();
  if (!mask[0] && !mask[1] && !mask[2]) return {dx, dw, db};

  // g' = g * (out > 0): its own buffer for relu, g itself otherwise.
  at::Tensor gp = relu ? cpu::empty({M, N}, dtype) : g2;
  RowPlan plan = plan_rows(M, N, K, g2.element_size());  // dX = g' @ W^T: [M, N] x [N, K]
  const bool small = mask[0] && K > 0 && N > 0 && K <= kSmallK && K * N <= kSmallWeight;
  const bool fused_dx = mask[0] && (plan.blocked || small) && N > 0;
  std::vector<double> partial(mask[2] ? ((M + kChunkRows - 1) / kChunkRows) * N : 0);
  if (small) {
    using Vec = typename Lanes<T>::Vec;
    constexpr int64_t kOutStep = kDxCols * Vec::size();
    const int64_t Kp = (K + kOutStep - 1) / kOutStep * kOutStep;
    std::vector<A> wt(N * Kp, A(0));  // W^T as acc_t, rows zero-padded to whole output passes
    const T* w = weight.const_data_ptr<T>();
    const int64_t sk = weight.stride(0), sn = weight.stride(1);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) wt[n * Kp + k] = static_cast<A>(w[k * sk + n * sn]);
    const T* g = g2.const_data_ptr<T>();
    const T* o = relu ? o2.const_data_ptr<T>() : nullptr;
    T* gpp = relu && mask[1] ? gp.mutable_data_ptr<T>() : nullptr;
    T* dxp = dx.mutable_data_ptr<T>();
    const int64_t ldg = g2.stride(0), ldo = relu ? o2.stride(0) : 0;
    plan.grain = std::max<int64_t>(1, kTaskFlops / (2 * plan.rows * K * N));
    at::parallel_for(0, plan.count, plan.grain, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(mask[2] ? N : 0), rows_buf(kDxRows * N);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * plan.rows, r1 = std::min(M, r0 + plan.rows);
        small_backward_rows(g, ldg, o, ldo, gpp, dxp, wt.data(), r0, r1, N, K, Kp, act,
                            mask[2] ? partial.data() : nullptr, scratch.data(), rows_buf.data());
      }
    });
  } else if (relu || mask[2] || fused_dx) {
    const T* g = g2.const_data_ptr<T>();
    const T* o = relu ? o2.const_data_ptr<T>() : nullptr;
    T* gpp = relu ? gp.mutable_data_ptr<T>() : nullptr;
    const int64_t ldg = g2.stride(0), ldo = relu ? o2.stride(0) : 0;
    const at::Tensor wt = weight.t();
    at::parallel_for(0, plan.count, plan.grain, [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(mask[2] ? N : 0);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t r0 = blk * plan.rows, r1 = std::min(M, r0 + plan.rows);
        if (relu || mask[2])
          mask_and_sum_rows(g, ldg, o, ldo, gpp, r0, r1, N, act, mask[2] ? partial.data() : nullptr, scratch.data());
        if (fused_dx) mm_rows(dx, gp, wt, r0, r1);
      }
    });
  }
  if (mask[0] && !fused_dx) {
    if (N > 0) at::cpu::mm_out(dx, gp, weight.t());
    else dx.zero_();
  }
  if (mask[1]) {
    if (M > 0) at::cpu::mm_out(dw, x2.t(), gp);
    else dw.zero_();
  }
  if (mask[2]) {
    // Chunks added in order, in double.
    const int64_t chunks = (M + kChunkRows - 1) / kChunkRows;
    T* dbp = db.mutable_data_ptr<T>();
    at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(end - begin, 0.0);
      for (int64_t k = 0; k < chunks; ++k) {
        const double* src = partial.data() + k * N;
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
  const at::Tensor x2 = x.reshape({M, K});
  const at::Tensor g2 = unit_column_stride(grad.reshape({M, N}));
  const at::Tensor o2 = act == Activation::kRelu ? unit_column_stride(o.reshape({M, N})) : at::Tensor();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_backward_cpu",
                                  [&] { result = backward_impl<scalar_t>(g2, x2, weight, o2, act, mask); });
  auto& dx = std::get<0>(result);
  if (dx.defined()) dx = dx.view(x.sizes());
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CPU, m) {
  m.impl("linear_act", &linear_act);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace customlayers::cpu
