#include "common/layout.h"

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>

#include <algorithm>
#include <numeric>

namespace customlayers {

std::vector<int64_t> empty_like_strides(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x.strides().vec();
  return at::infer_dense_strides(x.sizes(), x.strides());
}

void ReduceLayout::finish() {
  if (permuted) result.permute(perm).copy_(output);
}

ReduceLayout plan_reduce(const at::Tensor& x, const std::vector<bool>& reduced, const at::Tensor& result) {
  ReduceLayout plan;
  plan.result = result;
  // A dense input in result's layout: x itself when possible, else one copy.
  plan.input = x.strides() == result.strides() && x.is_non_overlapping_and_dense()
                   ? x
                   : at::empty_strided(x.sizes(), result.strides(), x.options()).copy_(x);

  // Dims of size > 1 in memory order (outermost first). Size-1 dims change nothing.
  std::vector<int64_t> order;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) > 1) order.push_back(d);
  const auto strides = result.strides();
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return strides[a] > strides[b]; });

  int64_t runs = 0;
  for (size_t k = 0; k < order.size(); ++k)
    if (reduced[order[k]] && (k == 0 || !reduced[order[k - 1]])) ++runs;

  if (runs <= 1) {
    // [kept..., reduced..., kept...] in memory: view in place.
    size_t k = 0;
    for (; k < order.size() && !reduced[order[k]]; ++k) plan.outer *= x.size(order[k]);
    for (; k < order.size() && reduced[order[k]]; ++k) plan.reduce *= x.size(order[k]);
    for (; k < order.size(); ++k) plan.inner *= x.size(order[k]);
    plan.output = result;
    return plan;
  }

  // Reduced dims scattered through memory: gather them last in a contiguous copy.
  std::vector<int64_t> perm;
  for (int64_t d : order)
    if (!reduced[d]) perm.push_back(d);
  for (int64_t d : order)
    if (reduced[d]) perm.push_back(d);
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) <= 1) perm.insert(perm.begin(), d);
  for (int64_t d : perm) (reduced[d] ? plan.reduce : plan.outer) *= x.size(d);
  plan.input = plan.input.permute(perm).contiguous();
  plan.output = at::empty_like(plan.input, at::MemoryFormat::Contiguous);
  plan.permuted = true;
  plan.perm = std::move(perm);
  return plan;
}

}  // namespace customlayers
