// Quantized tensors (QuantizedCPU, QuantizedCUDA) reaching a customlayers op: a clear error naming the op and
// the argument, instead of the dispatcher's "Could not run ... with arguments from the 'QuantizedCPU' backend".
// They get there when a static quantization flow leaves a float layer behind a QuantStub; the quantized flows
// that work are in docs/deploy.md (Quantization).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <sstream>

namespace customlayers {
namespace {

void refuse_quantized(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::ostringstream which;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor() && value.toTensor().is_quantized()) {
      which << arguments[i].name() << " is a quantized tensor (" << value.toTensor().scalar_type() << " on "
            << value.toTensor().device() << ")";
      break;
    }
  }
  TORCH_CHECK(false, op.schema().name(), ": ", which.str(), ", but its kernels take floating-point tensors. "
              "A statically quantized model runs the native quantized modules: quantize LinearReLU and "
              "FusedLinear with torch.ao.quantization (import customlayers first: it adds them to the default "
              "mappings) or torchao, as docs/deploy.md (Quantization) says.");
}

void register_refusals(torch::Library& m) {
  for (const char* name : {"centered", "masked_uniform_", "linear_act", "linear_act_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_quantized>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, QuantizedCPU, m) { register_refusals(m); }
TORCH_LIBRARY_IMPL(customlayers, QuantizedCUDA, m) { register_refusals(m); }

}  // namespace customlayers
