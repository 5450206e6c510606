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

}  // namespace customlayers
