// CPU kernels of customlayers::linear_glu (y = act(x @ Wg + bg) * (x @ Wu + bu)) and linear_glu_backward.
//  * forward: the output is cut into the fixed tiles of blas_tiles.h; each tile computes its gate and up
//    products (BLAS, the biases added to the accumulators) into a scratch pair (linear_glu: neither
//    pre-activation is written to memory) or into the gate and up outputs (linear_glu_forward, for the
//    backward), and combines them, act(gate) * up, while they are in cache;
//  * backward: one pass over grad, gate and up makes dgate = g * up * act'(gate) and dup = g * act(gate)
//    with the bias gradients' fixed 64-row chunk sums; then the tiles of dX = dgate Wg^T + dup Wu^T (both
//    products summed in the tile), dWg = X^T dgate and dWu = X^T dup (in their weights' layouts) in one
//    parallel region; the bias gradients are the chunks added in order, in double.
// float16/bfloat16: the forward rounds each output (and each saved pre-activation) once, from float32 sums
// (bfloat16 on the AMX or AVX512-BF16 kernel of linear_act_bf16.h where one runs, else operands widened to
// float32, exactly); the backward rounds the gated gradients once and runs the 16-bit GEMMs where the CPU has
// fast ones (each output rounded once), else all of it in float32. Results do not depend on the thread count:
// fixed tiles and chunks, each computed on one thread.
#include "common/cpu_alloc.h"
#include "common/linear_glu.h"
#include "cpu/blas_tiles.h"
#include "cpu/linear_act_bf16.h"
#include "cpu/linear_act_rows.h"
#include "cpu/linear_act_widen.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <torch/library.h>

#include <memory>
#include <vector>

namespace customlayers::cpu {
namespace {

at::Tensor empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::Tensor& like) {
  return cpu::empty_strided(sizes, strides, like.scalar_type());
}

// out[r, 0:cols) = act(gate[r, .]) * up[r, .] for `rows` rows (A float or double; gate and up with row
// stride ld, out with row stride ld_out).
template <typename A, Activation kAct>
void glu_rows(const A* gate, const A* up, int64_t ld, A* out, int64_t ld_out, int64_t rows, int64_t cols) {
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  for (int64_t r = 0; r < rows; ++r) {
    const A* g = gate + r * ld;
    const A* u = up + r * ld;
    A* y = out + r * ld_out;
    int64_t c = 0;
    for (; c + kW <= cols; c += kW) (activate(kAct, Vec::loadu(g + c)) * Vec::loadu(u + c)).store(y + c);
    if (c < cols) {
      const int64_t n = cols - c;
      (activate(kAct, Vec::loadu(g + c, n)) * Vec::loadu(u + c, n)).store(y + c, n);
    }
  }
}

// Each tile's gate and up products go into `gate` and `up` when given (the pre-activations the backward
// reads), else into a scratch pair; then act(gate) * up into out's tile.
template <typename A>  // float or double
void forward_in_type(const GluForward& args, at::Tensor& out, at::Tensor* gate_out, at::Tensor* up_out) {
  const int64_t M = args.M, K = args.K, N = args.N;
  const at::Tensor wg = K > 0 ? right_operand(args.weight_gate) : args.weight_gate;
  const at::Tensor wu = K > 0 ? right_operand(args.weight_up) : args.weight_up;
  const TilePlan plan = plan_tiles(M, N, K, out.element_size(), tile_macs<A>());
  A* const y = out.mutable_data_ptr<A>();
  run_tiles(plan.count(), [&](int64_t tile) {
    const int64_t r0 = tile / plan.col_tiles * plan.rows, c0 = tile % plan.col_tiles * plan.cols;
    const int64_t rows = std::min(plan.rows, M - r0), cols = std::min(plan.cols, N - c0);
    const at::Tensor x = args.x2.narrow(0, r0, rows);
    const auto bias = [&](const at::Tensor& b) { return b.defined() ? b.narrow(0, c0, cols) : at::Tensor(); };
    at::Tensor gate, up;
    if (gate_out != nullptr) {
      gate = gate_out->narrow(0, r0, rows).narrow(1, c0, cols);
      up = up_out->narrow(0, r0, rows).narrow(1, c0, cols);
    } else {
      const at::Tensor pair = cpu::empty({2, rows, cols}, out.scalar_type());
      gate = pair[0], up = pair[1];
    }
    tile_product(gate, x, wg.narrow(1, c0, cols), bias(args.bias_gate));
    tile_product(up, x, wu.narrow(1, c0, cols), bias(args.bias_up));
    with_activation(args.act, [&](auto act) {
      glu_rows<A, decltype(act)::value>(gate.const_data_ptr<A>(), up.const_data_ptr<A>(), gate.stride(0),
                                        y + r0 * N + c0, N, rows, cols);
    });
  });
}

template <typename T>
void forward_impl(const GluForward& args, at::Tensor& out, at::Tensor* gate, at::Tensor* up) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (args.K > 0) {
        if (const Bf16Kernel kernel = bf16_kernel("linear_glu"); kernel != Bf16Kernel::kNone)
          return bf16_glu_forward(args, out, gate, up, kernel);
      }
    }
    GluForward wide = args;
    wide.x2 = widened<T>(args.x2);
    wide.weight_gate = widened<T>(args.weight_gate);
    wide.weight_up = widened<T>(args.weight_up);
    if (args.bias_gate.defined()) wide.bias_gate = widened<T>(args.bias_gate);
    if (args.bias_up.defined()) wide.bias_up = widened<T>(args.bias_up);
    at::Tensor out_f = float_like(out);
    at::Tensor gate_f = gate != nullptr ? float_like(*gate) : at::Tensor(), up_f = up != nullptr ? float_like(*up) : at::Tensor();
    forward_in_type<float>(wide, out_f, gate != nullptr ? &gate_f : nullptr, up != nullptr ? &up_f : nullptr);
    narrowed_into<T>(out_f, out);
    if (gate != nullptr) {
      narrowed_into<T>(gate_f, *gate);
      narrowed_into<T>(up_f, *up);
    }
  } else {
    forward_in_type<T>(args, out, gate, up);
  }
}

void forward(const GluForward& args, at::Tensor& out, at::Tensor* gate, at::Tensor* up) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "linear_glu_cpu",
                                  [&] { forward_impl<scalar_t>(args, out, gate, up); });
}

// The gated gradients of rows [r0, r0 + rows): dgate = g * up * act'(gate) (act' from the output for
// relu, tanh and sigmoid, as act_saved says, else from gate) and dup = g * act(gate), computed in acc_t,
// into dst's rows 0.. (dgate in columns [0, N), dup in [N, 2N)) and added to the column sums (each null:
// not wanted). One row at a time, streamed.
template <typename T>
struct GluGradRows {
  Rows<const T> g, gate, up;
  int64_t N;
};

template <typename T, Activation kAct>
void glu_grad_rows(const GluGradRows<T>& src, int64_t r0, int64_t rows, Rows<T> dst, double* sums_gate,
                   double* sums_up) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  using A = acc_t<T>;
  constexpr int64_t kW = Vec::size();
  constexpr bool kFromOutput = act_saved(kAct) == ActSaved::kOutput;
  const int64_t N = src.N;
  const auto add = [](double* sums, const Vec* v) {
    if (sums != nullptr)
      for (int j = 0; j < L::kVecs; ++j) add_in_double(sums + j * kW, v[j]);
  };
  for (int64_t q = 0; q < rows; ++q) {
    const T* g = src.g.row(r0 + q);
    const T* gate = src.gate.row(r0 + q);
    const T* up = src.up.row(r0 + q);
    T* dgate = dst ? dst.row(q) : nullptr;
    int64_t c = 0;
    for (; c + L::kStep <= N; c += L::kStep) {
      Vec gv[L::kVecs], z[L::kVecs], u[L::kVecs], dg[L::kVecs], du[L::kVecs];
      L::load(g + c, gv);
      L::load(gate + c, z);
      L::load(up + c, u);
      for (int j = 0; j < L::kVecs; ++j) {
        const Vec a = activate(kAct, z[j]);
        dg[j] = activation_grad(kAct, gv[j] * u[j], kFromOutput ? a : z[j]);
        du[j] = gv[j] * a;
      }
      if (dgate != nullptr) {
        L::store(dgate + c, dg);
        L::store(dgate + N + c, du);
      }
      add(sums_gate != nullptr ? sums_gate + c : nullptr, dg);
      add(sums_up != nullptr ? sums_up + c : nullptr, du);
    }
    for (; c < N; ++c) {
      const A gv = static_cast<A>(g[c]), z = static_cast<A>(gate[c]), u = static_cast<A>(up[c]);
      const A a = activate(kAct, z);
      const A dg = activation_grad(kAct, gv * u, kFromOutput ? a : z), du = gv * a;
      if (dgate != nullptr) {
        dgate[c] = static_cast<T>(dg);
        dgate[N + c] = static_cast<T>(du);
      }
      if (sums_gate != nullptr) sums_gate[c] += dg;
      if (sums_up != nullptr) sums_up[c] += du;
    }
  }
}

// One GEMM cut into tiles: out (R, C) = a @ b [+ a2 @ b2, when a2 is defined].
struct Product {
  at::Tensor out, a, b, a2, b2;
  TilePlan plan;
};

template <typename T>
Product product(at::Tensor out, at::Tensor a, at::Tensor b, at::Tensor a2 = {}, at::Tensor b2 = {}) {
  const int64_t red = a.size(1) + (a2.defined() ? a2.size(1) : 0);
  const TilePlan plan = plan_tiles(out.size(0), out.size(1), red, out.element_size(), tile_macs<T>());
  return {std::move(out), std::move(a), std::move(b), std::move(a2), std::move(b2), plan};
}

void run_product_tile(const Product& p, int64_t tile) {
  const TilePlan& plan = p.plan;
  const int64_t r0 = tile / plan.col_tiles * plan.rows, c0 = tile % plan.col_tiles * plan.cols;
  const int64_t rows = std::min(plan.rows, p.out.size(0) - r0), cols = std::min(plan.cols, p.out.size(1) - c0);
  at::Tensor dst = p.out.narrow(0, r0, rows).narrow(1, c0, cols);
  tile_product(dst, p.a.narrow(0, r0, rows), p.b.narrow(1, c0, cols), at::Tensor());
  if (p.a2.defined()) tile_accumulate(dst, p.a2.narrow(0, r0, rows), p.b2.narrow(1, c0, cols));
}

// The backward in T's own GEMMs (T float or double, or float16/bfloat16 where the CPU has fast GEMMs for
// them): the gated gradients are rounded to T once, and so is each GEMM's output. dX = dgate Wg^T + dup Wu^T:
// in float32 and float64 the second product added to the first in each tile (as the native code sums two
// GEMMs); in 16 bits one GEMM, [dgate | dup] (M, 2N) @ [Wg^T; Wu^T] (2N, K), summed before its one rounding.
template <typename T>
void backward_in_type(const GluBackward& args, GluGrads& grads) {
  const int64_t M = args.M, N = args.N;
  const bool dx = grads.dx.defined(), dwg = grads.dw_gate.defined(), dwu = grads.dw_up.defined();
  const bool gemms = dx || dwg || dwu, dbg = grads.db_gate.defined(), dbu = grads.db_up.defined();
  const at::Tensor d = gemms ? cpu::empty({M, 2 * N}, args.g2.scalar_type()) : at::Tensor();  // [dgate | dup]
  const int64_t chunks = ceil_div(M, kChunkRows);
  const auto partial_gate = std::make_unique_for_overwrite<double[]>(dbg ? chunks * N : 0);
  const auto partial_up = std::make_unique_for_overwrite<double[]>(dbu ? chunks * N : 0);
  const GluGradRows<T> src{rows_of<T>(args.g2), rows_of<T>(args.gate), rows_of<T>(args.up), N};
  const int64_t grain = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(kChunkRows * N, 1));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    const ChunkSums sums_gate{dbg ? partial_gate.get() : nullptr, N};
    const ChunkSums sums_up{dbu ? partial_up.get() : nullptr, N};
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * kChunkRows, rows = std::min(kChunkRows, M - r0);
      const Rows<T> dst{gemms ? d.mutable_data_ptr<T>() + r0 * 2 * N : nullptr, 2 * N};
      double* sg = sums_gate.begin(chunk);
      double* su = sums_up.begin(chunk);
      with_activation(args.act, [&](auto act) { glu_grad_rows<T, decltype(act)::value>(src, r0, rows, dst, sg, su); });
    }
  });
  std::vector<Product> parts;  // dX: [M, 2N] x [2N, K]; dW = X^T d: [K, M] x [M, N]
  if (dx && at::vec::is_reduced_floating_point_v<T>)
    parts.push_back(product<T>(grads.dx, d, right_operand(at::cat({args.weight_gate.t(), args.weight_up.t()}, 0))));
  else if (dx)
    parts.push_back(product<T>(grads.dx, d.narrow(1, 0, N), right_operand(args.weight_gate.t()), d.narrow(1, N, N),
                               right_operand(args.weight_up.t())));
  if (dwg) parts.push_back(product<T>(grads.dw_gate, args.x2.t(), d.narrow(1, 0, N)));
  if (dwu) parts.push_back(product<T>(grads.dw_up, args.x2.t(), d.narrow(1, N, N)));
  int64_t total = 0;
  for (const Product& p : parts) total += p.plan.count();
  run_tiles(total, [&](int64_t i) {
    for (const Product& p : parts) {
      if (i < p.plan.count()) return run_product_tile(p, i);
      i -= p.plan.count();
    }
  });
  if (dbg) sum_chunks(partial_gate.get(), chunks, N, grads.db_gate);
  if (dbu) sum_chunks(partial_up.get(), chunks, N, grads.db_up);
}

template <typename T>
void backward_impl(const GluBackward& args, GluGrads& grads) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    if (!blas_in_float<T>()) return backward_in_type<T>(args, grads);
    // In float32; x is read only for the weights' gradients and the weights only for dX: widened when read.
    GluBackward wide = args;
    wide.g2 = widened<T>(args.g2);
    wide.gate = widened<T>(args.gate);
    wide.up = widened<T>(args.up);
    if (grads.dw_gate.defined() || grads.dw_up.defined()) wide.x2 = widened<T>(args.x2);
    if (grads.dx.defined()) {
      wide.weight_gate = widened<T>(args.weight_gate);
      wide.weight_up = widened<T>(args.weight_up);
    }
    // The bias gradients are rounded from their double sums straight to T.
    GluGrads wide_grads{float_like(grads.dx), float_like(grads.dw_gate), float_like(grads.dw_up), grads.db_gate,
                        grads.db_up};
    backward_in_type<float>(wide, wide_grads);
    for (auto [w, g] : {std::pair{&wide_grads.dx, &grads.dx}, std::pair{&wide_grads.dw_gate, &grads.dw_gate},
                        std::pair{&wide_grads.dw_up, &grads.dw_up}})
      if (g->defined()) narrowed_into<T>(*w, *g);
  } else {
    backward_in_type<T>(args, grads);
  }
}

void backward(const GluBackward& args, GluGrads& grads) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x2.scalar_type(), "linear_glu_backward_cpu",
                                  [&] { backward_impl<scalar_t>(args, grads); });
}

constexpr LinearGluKernels kKernels{&empty, &forward, &backward};

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CPU, m) {
  m.impl("linear_glu", &linear_glu_op<kKernels>);
  m.impl("linear_glu_forward", &linear_glu_forward_op<kKernels>);
  m.impl("linear_glu_backward", &linear_glu_backward_op<kKernels>);
}

}  // namespace customlayers::cpu
