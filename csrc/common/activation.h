// The activations of linear_act, each defined once: its forward and its derivative, for every kernel that
// applies them (host C++, at::vec vectors in the CPU kernels, CUDA device code and the CUDA emulator).
// A value type V gets its math (exp, erf, tanh, relu, relu's mask and a select) from ActMath<V>: scalars (float,
// double) below, at::vec vectors in common/cpu_vec.h. Formulas and constants are those of torch's own
// kernels (F.gelu, F.gelu(approximate='tanh'), F.silu, torch.tanh, torch.sigmoid, torch.relu; gelu_tanh's
// rewritten through a sigmoid, the same function; 1 - sigmoid in the derivatives without cancellation), so
// NaN and inf behave as there. Plain C++: no ATen, so the CUDA code and its emulator include it as they are.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define CUSTOMLAYERS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CUSTOMLAYERS_HOST_DEVICE inline
#endif

// Device code calls CUDA's overloads of the math functions (::erf, ...), host code std's.
#if defined(__CUDA_ARCH__)
#define CUSTOMLAYERS_MATH(f) ::f
#else
#define CUSTOMLAYERS_MATH(f) std::f
#endif

namespace customlayers {

// The names (customlayers/_activations.py's table, in the same order) are parsed in common/linear_act.cpp.
enum class Activation : int8_t { kNone, kRelu, kGelu, kGeluTanh, kSilu, kTanh, kSigmoid };

// What linear_act_backward's `out` argument holds for act: the forward's output (relu, tanh, sigmoid,
// whose derivatives are functions of it), or the pre-activation x @ W + b (gelu, gelu_tanh, silu, whose
// derivatives need it). 'none' needs neither.
enum class ActSaved : int8_t { kNothing, kOutput, kPreActivation };

constexpr ActSaved act_saved(Activation act) {
  switch (act) {
    case Activation::kNone: return ActSaved::kNothing;
    case Activation::kRelu:
    case Activation::kTanh:
    case Activation::kSigmoid: return ActSaved::kOutput;
    default: return ActSaved::kPreActivation;
  }
}

// Scalar math (float, double). Specialized for at::vec vectors in common/cpu_vec.h.
template <typename V>
struct ActMath {
  static CUSTOMLAYERS_HOST_DEVICE V exp(V v) { return CUSTOMLAYERS_MATH(exp)(v); }
  static CUSTOMLAYERS_HOST_DEVICE V erf(V v) { return CUSTOMLAYERS_MATH(erf)(v); }
  static CUSTOMLAYERS_HOST_DEVICE V tanh(V v) { return CUSTOMLAYERS_MATH(tanh)(v); }
  // torch.relu: NaN stays NaN.
  static CUSTOMLAYERS_HOST_DEVICE V relu(V v) { return v <= V(0) ? V(0) : v; }
  // torch.relu's backward: g where !(out <= 0) (a NaN output passes g), else +0.
  static CUSTOMLAYERS_HOST_DEVICE V relu_mask(V g, V out) { return out <= V(0) ? V(0) : g; }
  // a < b ? x : y, lane by lane (a NaN a or b: y).
  static CUSTOMLAYERS_HOST_DEVICE V where_less(V a, V b, V x, V y) { return a < b ? x : y; }
};

namespace act_constants {
constexpr double kSqrtHalf = 0.70710678118654752440;       // M_SQRT1_2: gelu's erf(x / sqrt(2))
constexpr double kInvSqrt2Pi = 0.39894228040143267794;     // 1 / sqrt(2 pi): gelu's pdf
constexpr double kBeta = 0.79788456080286535588;           // sqrt(2 / pi): gelu_tanh's
constexpr double kKappa = 0.044715;
}  // namespace act_constants

// act(v).
template <typename V>
CUSTOMLAYERS_HOST_DEVICE V activate(Activation act, V v) {
  using M = ActMath<V>;
  using namespace act_constants;
  switch (act) {
    case Activation::kNone: return v;
    case Activation::kRelu: return M::relu(v);
    case Activation::kGelu: return V(0.5) * v * (V(1) + M::erf(v * V(kSqrtHalf)));
    // 0.5 v (1 + tanh(z)) written as v sigmoid(2 z), z = beta (v + kappa v^3): one exp, cheaper than
    // tanh, and the same at +-0, +-inf and NaN (and where z overflows) as torch's formula
    case Activation::kGeluTanh: return v / (V(1) + M::exp(V(0) - V(2 * kBeta) * (v + V(kKappa) * v * v * v)));
    case Activation::kSilu: return v / (V(1) + M::exp(V(0) - v));
    case Activation::kTanh: return M::tanh(v);
    case Activation::kSigmoid: return V(1) / (V(1) + M::exp(V(0) - v));
  }
  return v;
}

// g * act'(.) from `saved`, which is what act_saved(act) names (the output or the pre-activation; unused
// for 'none').
template <typename V>
CUSTOMLAYERS_HOST_DEVICE V activation_grad(Activation act, V g, V saved) {
  using M = ActMath<V>;
  using namespace act_constants;
  switch (act) {
    case Activation::kNone: return g;
    case Activation::kRelu: return M::relu_mask(g, saved);
    case Activation::kGelu: {
      const V cdf = V(0.5) * (V(1) + M::erf(saved * V(kSqrtHalf)));
      const V pdf = V(kInvSqrt2Pi) * M::exp(V(-0.5) * saved * saved);
      return g * (cdf + saved * pdf);
    }
    case Activation::kGeluTanh: {
      // with s = sigmoid(2 z) (activate's): 1 + tanh(z) = 2 s and 1 - tanh(z)^2 = 4 s (1 - s), so torch's
      // 0.5 (1 + t) + 0.5 v (1 - t^2) z' is s + v s (1 - s) 2 z', non-finite where torch's is. With
      // e = exp(-2 z), 1 - s is e s where s > 1/2 (1 - s would cancel there), else 1 - s.
      const V sq = saved * saved;
      const V e = M::exp(V(0) - V(2 * kBeta) * (saved + V(kKappa) * sq * saved));
      const V s = V(1) / (V(1) + e);
      const V one_minus_s = M::where_less(e, V(1), e * s, V(1) - s);
      const V two_z_derivative = V(2 * kBeta) * (V(1) + V(3 * kKappa) * sq);
      return g * (s + saved * (s * one_minus_s) * two_z_derivative);
    }
    case Activation::kSilu: {
      const V e = M::exp(V(0) - saved);  // 1 - s as gelu_tanh's
      const V s = V(1) / (V(1) + e);
      return g * s * (V(1) + saved * M::where_less(e, V(1), e * s, V(1) - s));
    }
    case Activation::kTanh: return g * (V(1) - saved * saved);
    case Activation::kSigmoid: return g * (V(1) - saved) * saved;
  }
  return g;
}

// f(std::integral_constant<Activation, act>{}): host loops that apply an activation are compiled once per
// activation, with activate's and activation_grad's switch folded away (a runtime switch inside the loop
// keeps the vector math from being scheduled and its registers from being kept across the calls).
template <typename F>
inline decltype(auto) with_activation(Activation act, F&& f) {
  using A = Activation;
  switch (act) {
    case A::kRelu: return f(std::integral_constant<A, A::kRelu>{});
    case A::kGelu: return f(std::integral_constant<A, A::kGelu>{});
    case A::kGeluTanh: return f(std::integral_constant<A, A::kGeluTanh>{});
    case A::kSilu: return f(std::integral_constant<A, A::kSilu>{});
    case A::kTanh: return f(std::integral_constant<A, A::kTanh>{});
    case A::kSigmoid: return f(std::integral_constant<A, A::kSigmoid>{});
    case A::kNone: break;
  }
  return f(std::integral_constant<A, A::kNone>{});
}

}  // namespace customlayers
