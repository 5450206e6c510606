// Implementation of the public C++ API (include/customlayers/customlayers.h): dispatcher calls.
#include "customlayers/customlayers.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace customlayers {

at::Tensor centered(const at::Tensor& x, at::OptionalIntArrayRef dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("customlayers::centered", "")
                             .typed<at::Tensor(const at::Tensor&, at::OptionalIntArrayRef)>();
  return op.call(x, dim);
}

at::Tensor& masked_uniform_(at::Tensor& self, double low, double high, double threshold, std::optional<int64_t> seed,
                            int64_t offset) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("customlayers::masked_uniform_", "")
          .typed<void(at::Tensor&, double, double, double, std::optional<int64_t>, int64_t)>();
  op.call(self, low, high, threshold, seed, offset);
  return self;
}

at::Tensor linear_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      c10::string_view act, bool weight_t) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("customlayers::linear_act", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::string_view, bool)>();
  return op.call(x, weight, bias, act, weight_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight,
                                                                   const std::optional<at::Tensor>& out,
                                                                   c10::string_view act,
                                                                   std::array<bool, 3> output_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("customlayers::linear_act_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const std::optional<at::Tensor>&, c10::string_view,
                                                                std::array<bool, 3>)>();
  return op.call(grad, x, weight, out, act, output_mask);
}

at::Tensor linear_glu(const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
                      const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up,
                      c10::string_view act, bool weight_t) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("customlayers::linear_glu", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                               c10::string_view, bool)>();
  return op.call(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_glu_forward(const at::Tensor& x, const at::Tensor& weight_gate,
                                                                  const at::Tensor& weight_up,
                                                                  const std::optional<at::Tensor>& bias_gate,
                                                                  const std::optional<at::Tensor>& bias_up,
                                                                  c10::string_view act, bool weight_t) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("customlayers::linear_glu_forward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view,
                                 bool)>();
  return op.call(x, weight_gate, weight_up, bias_gate, bias_up, act, weight_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_glu_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
    const at::Tensor& gate, const at::Tensor& up, c10::string_view act, std::array<bool, 5> output_mask) {
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("customlayers::linear_glu_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, c10::string_view, std::array<bool, 5>)>();
  return op.call(grad, x, weight_gate, weight_up, gate, up, act, output_mask);
}

}  // namespace customlayers
