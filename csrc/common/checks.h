// Input validation shared by every op: one place for the error messages users see.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <vector>

namespace customlayers {

// float32, float64, float16 or bfloat16; anything else (integers, bool, complex, float8) is rejected
// with a message naming the op, the argument and the dtype it got (TypeError), and so is a layout other
// than strided (NotImplementedError, as the dispatcher raises for the sparse ones).
void check_floating(const at::Tensor& t, const char* op, const char* arg);

// A tensor an op writes in place: refused, like torch's in-place ops refuse it, when it is an inference
// tensor used outside torch.inference_mode().
void check_writable(const at::Tensor& t, const char* op, const char* arg);

// All tensors on one device: "op: expected all tensors on one device, but x is on cuda:0 and weight on cpu".
void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors);

// Which of x's dims a reduction over `dim` covers. None (or an empty list, as for torch.mean)
// means every dim. Negative dims wrap; out-of-range (IndexError) and repeated dims (RuntimeError) are
// rejected, for a 0-dim tensor too (dim 0 and -1 name its one dim), as torch.mean rejects them.
std::vector<bool> reduced_dims_mask(const at::Tensor& x, at::OptionalIntArrayRef dim, const char* op);

}  // namespace customlayers
