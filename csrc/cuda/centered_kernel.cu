// CUDA kernel of customlayers::centered: y = x - mean(x, dim). The kernels are in cuda/centered.cuh; this
// file plans the input as a dense [outer, reduce, inner] block (common/layout.h, as on CPU) and
// allocates their workspace.
#include "common/checks.h"
#include "common/layout.h"
#include "cuda/centered.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace customlayers::cuda {
namespace {

at::Tensor centered(const at::Tensor& x, at::OptionalIntArrayRef dim) {
  check_floating(x, "centered", "x");
  const std::vector<bool> mask = reduced_dims_mask(x, dim, "centered");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor result = at::empty_strided(x.sizes(), empty_like_strides(x), x.options());
  if (x.numel() == 0) return result;
  ReduceLayout plan = plan_reduce(x, mask, result);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "centered_cuda", [&] {
    // Rows that fit on chip need none: no allocation on that path.
    const size_t bytes = centered_workspace_bytes<scalar_t>(plan.outer, plan.reduce, plan.inner);
    const at::Tensor workspace =
        bytes > 0 ? at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte)) : at::Tensor();
    centered_block(plan.input.const_data_ptr<scalar_t>(), plan.output.mutable_data_ptr<scalar_t>(), plan.outer,
                   plan.reduce, plan.inner, bytes > 0 ? workspace.data_ptr() : nullptr,
                   at::cuda::getCurrentCUDAStream());
  });
  plan.finish();
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(customlayers, CUDA, m) { m.impl("centered", &centered); }

}  // namespace customlayers::cuda
