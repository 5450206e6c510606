// Autograd for the customlayers ops, registered in C++ (DispatchKey::Autograd) so the ops are
// differentiable from Python, torch.compile, torch.export and libtorch alike, with no Python overhead.
// Each backward calls ops through the dispatcher, so it is itself differentiable (double backward).
#include "customlayers/customlayers.h"

#include "common/linear_act.h"

#include <ATen/Parallel.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/where.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

// The autograd Functions are at global scope: torch prints a C++ node's name from the last "::" of
// "torch::autograd::CppNode<T>", so a tensor shows grad_fn=<CppNode<CustomlayersLinearActBackward>>, where a
// namespaced T would print as a truncated "LinearActFunction>".

// y = x - mean(x, dim) is a symmetric projection: dx = centered(dy, dim).
struct CustomlayersCenteredBackward : torch::autograd::Function<CustomlayersCenteredBackward> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::OptionalIntArrayRef dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    using namespace customlayers;
    if (dim.has_value()) ctx->saved_data["dim"] = dim->vec();
    return centered(x, dim);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    using namespace customlayers;
    const auto it = ctx->saved_data.find("dim");
    if (it == ctx->saved_data.end()) return {centered(grads[0], std::nullopt), at::Tensor()};
    const std::vector<int64_t> dim = it->second.toIntVector();
    return {centered(grads[0], dim), at::Tensor()};
  }
};

namespace customlayers {
namespace {

at::Tensor centered_autograd(const at::Tensor& x, at::OptionalIntArrayRef dim) {
  return ::CustomlayersCenteredBackward::apply(x, dim);
}

// masked_uniform_ is an initializer with no derivative: filling a tensor that autograd tracks would cut
// it from the graph without a trace, so that is refused (as torch refuses in-place ops on leaves that
// require grad); under torch.no_grad() (customlayers.init.masked_uniform_) it runs below autograd and
// bumps the tensor's version counter like any in-place op.
void masked_uniform_autograd(at::Tensor& self, double low, double high, double threshold, std::optional<int64_t> seed,
                             int64_t offset) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && self.requires_grad()),
              "masked_uniform_: the op is not differentiable and cannot fill a tensor that requires grad while "
              "grad mode is enabled; call it under torch.no_grad() (customlayers.init.masked_uniform_ does)");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    masked_uniform_(self, low, high, threshold, seed, offset);
  }
  torch::autograd::increment_version(self);
}

// out = act(x @ W + b). First-order gradients come from the fused linear_act_backward kernel, which reads
// what the activation's derivative needs (common/activation.h's act_saved): the output for relu, tanh and
// sigmoid, the pre-activation z = x @ W + b for gelu, gelu_tanh and silu. For those the forward, when a
// gradient may be asked for, is z = linear_act(act='none') (the GEMM with the bias fused) and then torch's
// own activation of z, so z is saved (as F.gelu and F.silu save their input); otherwise (inference, no input
// requiring grad) it is the fused kernel. When a graph of the backward is wanted (create_graph=True, double
// backward) the gradients are built from differentiable ops instead: g' = act_backward(g, .) (relu:
// where(out <= 0, 0, g), torch.relu's, a NaN output passes g; the pre-activation recomputed with a graph for
// gelu/silu), dX = linear_act(g', W^T, act='none'), dW = linear_act(X^T, g', act='none'), db = g'.sum(rows).
// With weight_t (weight (out, in), nn.Linear's), W is weight's transposed view and the weight's gradient
// is dW's: one autograd node, where weight.t() would add a view's node and its backward.
// torch's activation of z (gelu, gelu_tanh, silu: the pre-activation ones), into `out` when given.
at::Tensor apply_activation(const at::Tensor& z, Activation act, at::Tensor* out = nullptr) {
  switch (act) {
    case Activation::kGelu:
    case Activation::kGeluTanh: {
      const char* approximate = act == Activation::kGelu ? "none" : "tanh";
      return out != nullptr ? at::gelu_out(*out, z, approximate) : at::gelu(z, approximate);
    }
    case Activation::kSilu: return out != nullptr ? at::silu_out(*out, z) : at::silu(z);
    default: TORCH_INTERNAL_ASSERT(false, "apply_activation: not a pre-activation activation");
  }
}

// torch's activation of z from differentiable ops, for any activation.
at::Tensor differentiable_activation(const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::kNone: return z;
    case Activation::kRelu: return at::relu(z);
    case Activation::kTanh: return at::tanh(z);
    case Activation::kSigmoid: return at::sigmoid(z);
    default: return apply_activation(z, act);
  }
}

// torch's activation of z, with bits that do not depend on the thread count. Its CPU kernels take a scalar
// path on each parallel chunk's tail, whose bits differ from their vector path's; here the chunks are fixed
// blocks of kActivationBlock elements (a multiple of every vector width; the last block takes the rest, so
// the tail is the whole tensor's), each one call run serially inside a parallel region (where ATen's loops
// are serial) with the caller's thread-local state: every element but the tensor's last few takes the
// vector path, whatever the thread count. Tensors that are not plain (fake, functional, traced; dispatch
// modes) get the one call: their ops stay on the calling thread.
constexpr int64_t kActivationBlock = int64_t{1} << 18;

at::Tensor apply_activation_fixed(const at::Tensor& z, Activation act) {
  if (!z.is_cpu() || at::isTensorSubclassLike(z) || z.unsafeGetTensorImpl()->has_symbolic_sizes_strides() ||
      !z.is_contiguous() || at::get_num_threads() == 1 || at::in_parallel_region())
    return apply_activation(z, act);
  at::Tensor out = at::empty_like(z);
  const int64_t n = z.numel();
  const int64_t blocks = std::max<int64_t>(1, n / kActivationBlock);
  const at::Tensor flat = z.view(-1), flat_out = out.view(-1);
  const at::ThreadLocalState state;
  // At least two tasks, so that one block too runs inside a parallel region.
  at::parallel_for(0, std::max<int64_t>(blocks, 2), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t block = begin; block < std::min(end, blocks); ++block) {
      const int64_t start = block * kActivationBlock;
      const int64_t length = block + 1 == blocks ? n - start : kActivationBlock;
      at::Tensor dst = flat_out.narrow(0, start, length);
      apply_activation(flat.narrow(0, start, length), act, &dst);
    }
  });
  return out;
}

// g * act'(.) from differentiable ops, `saved` being what act_saved(act) names.
at::Tensor activation_backward(const at::Tensor& g, const at::Tensor& saved, Activation act) {
  switch (act) {
    case Activation::kNone: return g;
    case Activation::kRelu: return at::where(saved.le(0), 0, g);
    case Activation::kGelu: return at::gelu_backward(g, saved);
    case Activation::kGeluTanh: return at::gelu_backward(g, saved, "tanh");
    case Activation::kSilu: {  // silu_backward has no derivative of its own: its formula, from differentiable ops
      const at::Tensor sig = at::sigmoid(saved);
      return g.mul(sig).mul(saved.mul(sig.neg().add(1)).add(1));
    }
    case Activation::kTanh: return at::tanh_backward(g, saved);
    case Activation::kSigmoid: return at::sigmoid_backward(g, saved);
  }
  TORCH_INTERNAL_ASSERT(false, "activation_backward: unknown activation");
}

}  // namespace
}  // namespace customlayers

struct CustomlayersLinearActBackward : torch::autograd::Function<CustomlayersLinearActBackward> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::string_view act, bool weight_t,
                            bool grad_wanted) {
    using namespace customlayers;
    // An unknown act: the op raises, after its checks of the other arguments (the reference's order).
    if (!find_activation(act).has_value()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      linear_act(x, weight, bias, act, weight_t);
    }
    const Activation activation = activation_of(act, "linear_act");
    const bool has_bias = bias.has_value() && bias->defined();
    const ActSaved needs = act_saved(activation);
    at::Tensor out, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (needs == ActSaved::kPreActivation && grad_wanted) {
        saved = linear_act(x, weight, bias, "none", weight_t);
        out = apply_activation_fixed(saved, activation);
      } else {
        out = linear_act(x, weight, bias, act, weight_t);
        if (needs == ActSaved::kOutput) saved = out;
      }
    }
    ctx->saved_data["act"] = static_cast<int64_t>(activation);
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["weight_t"] = weight_t;
    // The bias only for a double backward's pre-activation (gelu/silu); the output is saved as an output.
    const bool pre = needs == ActSaved::kPreActivation;
    ctx->save_for_backward({x, weight, needs == ActSaved::kOutput ? out : at::Tensor(), pre ? saved : at::Tensor(),
                            pre && has_bias ? *bias : at::Tensor()});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    using namespace customlayers;
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const bool weight_t = ctx->saved_data["weight_t"].toBool();
    const at::Tensor weight = weight_t ? saved[1].t() : saved[1];  // W, (in, out)
    const Activation act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const bool pre = act_saved(act) == ActSaved::kPreActivation;
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    const at::Tensor& g = grads[0];
    if (!at::GradMode::is_enabled()) {
      // No graph of the backward is recorded: straight to the kernel, past autograd's fallback for the op.
      at::AutoDispatchBelowADInplaceOrView guard;
      const at::Tensor& s = pre ? saved[3] : saved[2];
      auto [dx, dw, db] = linear_act_backward(g, x, weight, s.defined() ? std::optional<at::Tensor>(s) : std::nullopt,
                                              activation_name(act), mask);
      return {dx, weight_t && dw.defined() ? dw.t() : dw, db, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // The pre-activation with a graph (its derivative is part of g''s), recomputed: saved[3] has none.
    const at::Tensor s =
        pre ? linear_act(x, saved[1], saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt, "none",
                         weight_t)
            : saved[2];
    const int64_t K = weight.size(0), N = weight.size(1), M = linear_rows(x);
    const at::Tensor gp = activation_backward(g, s, act);
    const at::Tensor gp2 = gp.reshape({M, N});
    at::Tensor dx, dw, db;
    // W^T is saved[1] itself with weight_t, else its transposed view: one linear_act call either way.
    if (mask[0]) dx = linear_act(gp, saved[1], std::nullopt, "none", !weight_t);
    if (mask[1])  // in the weight's own layout: (in, out) = X^T g', or with weight_t (out, in) = g'^T X
      dw = weight_t ? linear_act(gp2.t(), x.reshape({M, K}), std::nullopt, "none")
                    : linear_act(x.reshape({M, K}).t(), gp2, std::nullopt, "none");
    if (mask[2]) db = gp2.sum(0);
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// out = act(gate) * up, gate = x @ Wg + bg and up = x @ Wu + bu. With a gradient wanted the forward is
// linear_glu_forward, which also writes gate and up, saved (with x and the weights) where the gated MLP's
// native code saves them and act(gate); otherwise (inference) linear_glu. First-order
// gradients come from the linear_glu_backward kernel; when a graph of the backward is wanted the gradients
// are built from differentiable ops, with gate and up recomputed with a graph (as for linear_act):
// dgate = act_backward(g * up, .), dup = g * act(gate), dX = dgate Wg^T + dup Wu^T, dW* = X^T d*,
// db* = d*.sum(rows). With weight_t the weights are (out, in), nn.Linear's: one autograd node for both.
struct CustomlayersLinearGluBackward : torch::autograd::Function<CustomlayersLinearGluBackward> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight_gate,
                            const at::Tensor& weight_up, const std::optional<at::Tensor>& bias_gate,
                            const std::optional<at::Tensor>& bias_up, c10::string_view act, bool weight_t,
                            bool grad_wanted) {
    using namespace customlayers;
    at::Tensor out, gate, up;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (grad_wanted) std::tie(out, gate, up) = linear_glu_forward(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t);
      else out = linear_glu(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t);
    }
    const Activation activation = activation_of(act, "linear_glu");  // checked by the op
    const auto defined = [](const std::optional<at::Tensor>& b) { return b.has_value() && b->defined(); };
    ctx->saved_data["act"] = static_cast<int64_t>(activation);
    ctx->saved_data["has_bias_gate"] = defined(bias_gate);
    ctx->saved_data["has_bias_up"] = defined(bias_up);
    ctx->saved_data["weight_t"] = weight_t;
    // The biases only for a double backward's recomputed pre-activations.
    ctx->save_for_backward({x, weight_gate, weight_up, gate, up, defined(bias_gate) ? *bias_gate : at::Tensor(),
                            defined(bias_up) ? *bias_up : at::Tensor()});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    using namespace customlayers;
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const bool weight_t = ctx->saved_data["weight_t"].toBool();
    const at::Tensor wg = weight_t ? saved[1].t() : saved[1], wu = weight_t ? saved[2].t() : saved[2];  // (in, out)
    const Activation act = static_cast<Activation>(ctx->saved_data["act"].toInt());
    const std::array<bool, 5> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                      ctx->saved_data["has_bias_gate"].toBool() && ctx->needs_input_grad(3),
                                      ctx->saved_data["has_bias_up"].toBool() && ctx->needs_input_grad(4)};
    const at::Tensor& g = grads[0];
    const auto in_layout = [&](const at::Tensor& dw) { return weight_t && dw.defined() ? dw.t() : dw; };
    if (!at::GradMode::is_enabled()) {
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [dx, dwg, dwu, dbg, dbu] =
          linear_glu_backward(g, x, wg, wu, saved[3], saved[4], activation_name(act), mask);
      return {dx, in_layout(dwg), in_layout(dwu), dbg, dbu, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const auto bias = [](const at::Tensor& b) { return b.defined() ? std::optional<at::Tensor>(b) : std::nullopt; };
    const at::Tensor gate = linear_act(x, saved[1], bias(saved[5]), "none", weight_t);
    const at::Tensor up = linear_act(x, saved[2], bias(saved[6]), "none", weight_t);
    const at::Tensor a = differentiable_activation(gate, act);
    const at::Tensor dgate = activation_backward(g.mul(up), act_saved(act) == ActSaved::kOutput ? a : gate, act);
    const at::Tensor dup = g.mul(a);
    const int64_t K = wg.size(0), N = wg.size(1), M = linear_rows(x);
    const at::Tensor dgate2 = dgate.reshape({M, N}), dup2 = dup.reshape({M, N}), x2 = x.reshape({M, K});
    at::Tensor dx, dwg, dwu, dbg, dbu;
    if (mask[0])
      dx = linear_act(dgate, saved[1], std::nullopt, "none", !weight_t)
               .add(linear_act(dup, saved[2], std::nullopt, "none", !weight_t));
    const auto dw = [&](const at::Tensor& d2) {  // in the weight's own layout
      return weight_t ? linear_act(d2.t(), x2, std::nullopt, "none") : linear_act(x2.t(), d2, std::nullopt, "none");
    };
    if (mask[1]) dwg = dw(dgate2);
    if (mask[2]) dwu = dw(dup2);
    if (mask[3]) dbg = dgate2.sum(0);
    if (mask[4]) dbu = dup2.sum(0);
    return {dx, dwg, dwu, dbg, dbu, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace customlayers {
namespace {

at::Tensor linear_act_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::string_view act, bool weight_t) {
  // Whether a gradient may be asked for, known here (forward runs with grad mode off).
  const bool grad_wanted = at::GradMode::is_enabled() &&
                           (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->defined() && bias->requires_grad()));
  return ::CustomlayersLinearActBackward::apply(x, weight, bias, act, weight_t, grad_wanted);
}

at::Tensor linear_glu_autograd(const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
                               const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up,
                               c10::string_view act, bool weight_t) {
  const auto tracked = [](const std::optional<at::Tensor>& b) { return b.has_value() && b->defined() && b->requires_grad(); };
  const bool grad_wanted = at::GradMode::is_enabled() && (x.requires_grad() || weight_gate.requires_grad() ||
                                                          weight_up.requires_grad() || tracked(bias_gate) ||
                                                          tracked(bias_up));
  return ::CustomlayersLinearGluBackward::apply(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t,
                                                grad_wanted);
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, Autograd, m) {
  m.impl("centered", &centered_autograd);
  m.impl("masked_uniform_", &masked_uniform_autograd);
  m.impl("linear_act", &linear_act_autograd);
  m.impl("linear_glu", &linear_glu_autograd);
}

}  // namespace customlayers
