#include "common/checks.h"

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

namespace customlayers {

void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, ": expected ", arg, " to be a floating-point tensor (float32, float64, float16 or bfloat16), "
              "but got dtype ", dt);
  TORCH_CHECK_NOT_IMPLEMENTED(t.layout() == at::kStrided, op, ": expected ", arg,
                              " to be a strided (dense) tensor, but got layout ", t.layout());
}

void check_writable(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": cannot update ", arg,
              " in place: it is an inference tensor and InferenceMode is off (as for torch's in-place ops); "
              "call it under torch.inference_mode(), or on a clone");
}

void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const std::pair<const char*, const at::Tensor*>* first = nullptr;
  for (const auto& entry : tensors) {
    if (entry.second == nullptr || !entry.second->defined()) continue;
    if (first == nullptr) {
      first = &entry;
      continue;
    }
    TORCH_CHECK(entry.second->device() == first->second->device(), op,
                ": expected all tensors on one device, but ", first->first, " is on ", first->second->device(),
                " and ", entry.first, " is on ", entry.second->device());
  }
}

std::vector<bool> reduced_dims_mask(const at::Tensor& x, at::OptionalIntArrayRef dim, const char* op) {
  const int64_t ndim = x.dim();
  if (!dim.has_value() || dim->empty()) return std::vector<bool>(ndim, true);
  // A 0-dim tensor accepts dim 0 and -1 (once), like torch.mean.
  const int64_t wrap = std::max<int64_t>(ndim, 1);
  std::vector<bool> mask(wrap, false);
  for (int64_t d : *dim) {
    TORCH_CHECK_INDEX(d >= -wrap && d < wrap, op, ": dim ", d, " is out of range for a tensor with ", ndim,
                " dimension(s) (expected a value in [", -wrap, ", ", wrap - 1, "])");
    const int64_t w = d < 0 ? d + wrap : d;
    TORCH_CHECK(!mask[w], op, ": dim ", w, " appears more than once in dim=", *dim);
    mask[w] = true;
  }
  mask.resize(ndim);
  return mask;
}

}  // namespace customlayers
