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

}  // namespace customlayers
