// Autocast for the customlayers ops, registered in C++ (AutocastCPU, AutocastCUDA) so that they behave
// under torch.autocast as the native layers they replace, from Python, torch.compile and libtorch alike:
// - linear_act and linear_glu run in the autocast dtype, like nn.Linear (at::linear is on autocast's lower-precision
//   list): their floating inputs, float64 excepted, are cast first, so float32 weights take a bfloat16 or
//   float16 activation. The casts run above autograd, which records them: gradients reach the float32
//   parameters in float32.
// - centered (x - x.mean()) and masked_uniform_ keep their input's dtype, as mean, sub and uniform_ do:
//   they have no autocast kernel (autocast falls through for them).
#include "customlayers/customlayers.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace customlayers {
namespace {

template <c10::DeviceType kDevice>
at::Tensor linear_act_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::string_view act, bool weight_t) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return linear_act(at::autocast::cached_cast(dtype, x, kDevice), at::autocast::cached_cast(dtype, weight, kDevice),
                    at::autocast::cached_cast(dtype, bias, kDevice), act, weight_t);
}

template <c10::DeviceType kDevice>
at::Tensor linear_glu_autocast(const at::Tensor& x, const at::Tensor& weight_gate, const at::Tensor& weight_up,
                               const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up,
                               c10::string_view act, bool weight_t) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  const auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  return linear_glu(cast(x), cast(weight_gate), cast(weight_up), cast(bias_gate), cast(bias_up), act, weight_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, AutocastCPU, m) {
  m.impl("linear_act", &linear_act_autocast<c10::DeviceType::CPU>);
  m.impl("linear_glu", &linear_glu_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(customlayers, AutocastCUDA, m) {
  m.impl("linear_act", &linear_act_autocast<c10::DeviceType::CUDA>);
  m.impl("linear_glu", &linear_glu_autocast<c10::DeviceType::CUDA>);
}

}  // namespace customlayers
