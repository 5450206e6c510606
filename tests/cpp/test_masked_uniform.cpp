// customlayers::masked_uniform_ through the public C++ API: the book's distribution and exactness,
// reproducibility with a seed, layouts, autograd refusal, errors.
#include <customlayers/customlayers.h>

#include "testing.h"

namespace {

using customlayers::testing::expect_throws;
using customlayers::testing::float_dtypes;
using customlayers::testing::for_each_device;

TEST(MaskedUniform, ValuesAreZeroOrKeptInRange) {
  for_each_device([](at::Device device) {
    for (auto dtype : float_dtypes()) {
      at::Tensor w = at::empty({300, 333}, at::TensorOptions().dtype(dtype).device(device));
      customlayers::masked_uniform_(w, -10, 10, 5, /*seed=*/1);
      const at::Tensor d = w.to(at::kDouble);
      const at::Tensor kept = d.ne(0);
      EXPECT_TRUE(d.masked_select(kept).abs().ge(5).all().item<bool>()) << dtype;
      EXPECT_TRUE(d.abs().le(10).all().item<bool>()) << dtype;
      const double zeros = 1.0 - kept.to(at::kDouble).mean().item<double>();
      EXPECT_NEAR(zeros, 0.5, 0.01) << dtype;  // 5 sigma for 99,900 values is 0.008
    }
  });
}

TEST(MaskedUniform, SeedIsReproducibleAndLayoutIndependent) {
  at::Tensor a = at::empty({64, 48}), b = at::empty({64, 48});
  customlayers::masked_uniform_(a, -10, 10, 5, 42);
  customlayers::masked_uniform_(b, -10, 10, 5, 42);
  EXPECT_TRUE(at::equal(a, b));
  at::Tensor t = at::zeros({48, 64}).t();  // a (64, 48) view with transposed strides
  customlayers::masked_uniform_(t, -10, 10, 5, 42);
  EXPECT_TRUE(at::equal(t, a));
  customlayers::masked_uniform_(b, -10, 10, 5, 43);
  EXPECT_FALSE(at::equal(a, b));
}

TEST(MaskedUniform, UnseededFollowsManualSeed) {
  at::Tensor a = at::empty({1000}), b = at::empty({1000}), c = at::empty({1000});
  torch::manual_seed(3);
  customlayers::masked_uniform_(a);
  customlayers::masked_uniform_(c);
  torch::manual_seed(3);
  customlayers::masked_uniform_(b);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_FALSE(at::equal(a, c));
}

TEST(MaskedUniform, RefusesTrackedTensorOutsideNoGrad) {
  at::Tensor w = at::empty({4, 4}).requires_grad_();
  expect_throws<c10::Error>([&] { customlayers::masked_uniform_(w); }, "not differentiable");
  torch::NoGradGuard no_grad;
  customlayers::masked_uniform_(w);
  EXPECT_TRUE(w.ne(0).any().item<bool>());
}

TEST(MaskedUniform, RejectsBadArguments) {
  at::Tensor w = at::empty({8});
  expect_throws<c10::ValueError>([&] { customlayers::masked_uniform_(w, 10, -10, 5); }, "low < high");
  expect_throws<c10::ValueError>([&] { customlayers::masked_uniform_(w, -10, 10, -1); }, "threshold >= 0");
  expect_throws<c10::ValueError>([&] { customlayers::masked_uniform_(w, -10, 10, 20); }, "masks every value");
  at::Tensor ints = at::empty({8}, at::kLong);
  expect_throws<c10::TypeError>([&] { customlayers::masked_uniform_(ints); }, "floating-point");
}

}  // namespace
