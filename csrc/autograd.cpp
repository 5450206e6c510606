// Autograd for the customlayers ops, registered in C++ (DispatchKey::Autograd) so the ops are
// differentiable from Python, torch.compile, torch.export and libtorch alike, with no Python overhead.
// Each backward calls ops through the dispatcher, so it is itself differentiable (double backward).
#include "customlayers/customlayers.h"

#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

namespace customlayers {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y = x - mean(x, dim) is a symmetric projection: dx = centered(dy, dim).
struct CenteredFunction : torch::autograd::Function<CenteredFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::OptionalIntArrayRef dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (dim.has_value()) ctx->saved_data["dim"] = dim->vec();
    return centered(x, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto it = ctx->saved_data.find("dim");
    if (it == ctx->saved_data.end()) return {centered(grads[0], std::nullopt), at::Tensor()};
    const std::vector<int64_t> dim = it->second.toIntVector();
    return {centered(grads[0], dim), at::Tensor()};
  }
};

at::Tensor centered_autograd(const at::Tensor& x, at::OptionalIntArrayRef dim) {
  return CenteredFunction::apply(x, dim);
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

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, Autograd, m) {
  m.impl("centered", &centered_autograd);
  m.impl("masked_uniform_", &masked_uniform_autograd);
}

}  // namespace customlayers
