// customlayers::linear_act / linear_act_backward through the public C++ API: values against libtorch's
// act(x @ W + b) for every activation and both weight layouts, gradients against libtorch autograd, errors.
#include <customlayers/customlayers.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "testing.h"

namespace {

using customlayers::testing::expect_throws;
using customlayers::testing::float_dtypes;
using customlayers::testing::for_each_device;

const std::vector<std::string> kActs{"none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"};

// libtorch's activation `act` of y.
at::Tensor activate(const at::Tensor& y, const std::string& act) {
  if (act == "relu") return y.relu();
  if (act == "gelu") return at::gelu(y);
  if (act == "gelu_tanh") return at::gelu(y, "tanh");
  if (act == "silu") return at::silu(y);
  if (act == "tanh") return y.tanh();
  if (act == "sigmoid") return y.sigmoid();
  return y;
}

at::Tensor reference(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                     const std::string& act) {
  at::Tensor y = at::matmul(x.to(at::kDouble), w.to(at::kDouble));
  if (b.has_value()) y = y + b->to(at::kDouble);
  return activate(y, act);
}

// Tolerance for a product over k terms of N(0,1) values in `dtype`, as an absolute error.
double linear_tol(at::ScalarType dtype, int64_t k) {
  const double eps = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-5 : dtype == at::kHalf ? 4e-3 : 3e-2;
  return eps * std::max<double>(1.0, std::sqrt(double(k))) * 4;
}

TEST(LinearAct, MatchesLibtorchBothLayouts) {
  for_each_device([](at::Device device) {
    for (auto dtype : float_dtypes()) {
      for (auto [m, k, n] : std::vector<std::array<int64_t, 3>>{{1, 1, 1}, {7, 13, 5}, {65, 33, 129}, {256, 20, 256}}) {
        const auto opts = at::TensorOptions().dtype(dtype).device(device);
        const at::Tensor x = at::randn({m, k}, opts);
        const at::Tensor b = at::randn({n}, opts);
        for (const at::Tensor& w : {at::randn({k, n}, opts), at::randn({n, k}, opts).t()}) {
          for (const std::string& act : kActs) {
            const at::Tensor y = customlayers::linear_act(x, w, b, act);
            ASSERT_EQ(y.scalar_type(), dtype);
            const double err = (y.to(at::kDouble) - reference(x, w, b, act)).abs().max().item<double>();
            EXPECT_LE(err, linear_tol(dtype, k)) << m << "x" << k << "x" << n << " " << dtype << " " << act;
          }
        }
      }
    }
  });
}

TEST(LinearAct, LeadingDimsAndNoBias) {
  const at::Tensor x = at::randn({2, 3, 4, 6}, at::kDouble);
  const at::Tensor w = at::randn({6, 5}, at::kDouble);
  const at::Tensor y = customlayers::linear_act(x, w, std::nullopt, "relu");
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 4, 5}));
  EXPECT_TRUE(at::allclose(y, reference(x, w, std::nullopt, "relu")));
}

TEST(LinearActAutograd, GradientsMatchLibtorch) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({9, 7}, opts).requires_grad_();
  const at::Tensor w = at::randn({7, 4}, opts).requires_grad_();
  const at::Tensor b = at::randn({4}, opts).requires_grad_();
  const at::Tensor g = at::randn({9, 4}, opts);
  for (const std::string& act : kActs) {
    const auto ours = torch::autograd::grad({customlayers::linear_act(x, w, b, act)}, {x, w, b}, {g});
    const auto ref = torch::autograd::grad({activate(at::matmul(x, w) + b, act)}, {x, w, b}, {g});
    for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(at::allclose(ours[i], ref[i], 1e-10, 1e-10)) << act << " gradient " << i;
  }
}

TEST(LinearActAutograd, WeightTIsTheTransposedView) {
  // weight_t: torch::nn::Linear's (out, in) weight as it is; the same values and gradients as its .t() view.
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({9, 7}, opts).requires_grad_();
  const at::Tensor w = at::randn({4, 7}, opts).requires_grad_();
  const at::Tensor b = at::randn({4}, opts).requires_grad_();
  const at::Tensor g = at::randn({9, 4}, opts);
  const at::Tensor y = customlayers::linear_act(x, w, b, "relu", /*weight_t=*/true);
  const auto ours = torch::autograd::grad({y}, {x, w, b}, {g});
  const auto ref = torch::autograd::grad({at::relu(at::matmul(x, w.t()) + b)}, {x, w, b}, {g});
  for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(at::allclose(ours[i], ref[i], 1e-10, 1e-10)) << "gradient " << i;
  EXPECT_TRUE(ours[1].is_contiguous());
  expect_throws<c10::Error>([&] { customlayers::linear_act(x, w.t(), b, "relu", true); }, "weight.shape[1]");
}

TEST(LinearActAutograd, DoubleBackward) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({5, 4}, opts).requires_grad_();
  const at::Tensor w = at::randn({4, 3}, opts).requires_grad_();
  auto first = [&](auto fn) {
    const auto gx = torch::autograd::grad({fn().square().sum()}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    return torch::autograd::grad({gx[0].sum()}, {w})[0];
  };
  for (const std::string& act : kActs) {
    const at::Tensor ours = first([&] { return customlayers::linear_act(x, w, std::nullopt, act); });
    const at::Tensor ref = first([&] { return activate(at::matmul(x, w), act); });
    EXPECT_TRUE(at::allclose(ours, ref, 1e-10, 1e-10)) << act;
  }
}

TEST(LinearActBackward, FusedKernelRespectsOutputMask) {
  const at::Tensor x = at::randn({6, 4}, at::kDouble), w = at::randn({4, 3}, at::kDouble);
  const at::Tensor out = customlayers::linear_act(x, w, std::nullopt, "relu");
  const at::Tensor g = at::randn({6, 3}, at::kDouble);
  auto [dx, dw, db] = customlayers::linear_act_backward(g, x, w, out, "relu", {true, false, true});
  const at::Tensor gp = g * out.gt(0);
  EXPECT_TRUE(at::allclose(dx, at::matmul(gp, w.t())));
  EXPECT_FALSE(dw.defined());
  EXPECT_TRUE(at::allclose(db, gp.sum(0)));
}

TEST(LinearAct, RejectsBadInputs) {
  const at::Tensor x = at::randn({4, 3}), w = at::randn({3, 2});
  expect_throws<c10::TypeError>([&] { customlayers::linear_act(x, w.to(at::kDouble), std::nullopt); }, "dtype");
  expect_throws<c10::TypeError>([&] { customlayers::linear_act(x.to(at::kLong), w.to(at::kLong), std::nullopt); },
                                "floating-point");
  expect_throws<c10::Error>([&] { customlayers::linear_act(x, at::randn({5, 2}), std::nullopt); }, "[4, 3]");
  expect_throws<c10::Error>([&] { customlayers::linear_act(x, w, at::randn({3})); }, "bias");
  expect_throws<c10::ValueError>([&] { customlayers::linear_act(x, w, std::nullopt, "swish"); },
                                 "linear_act: act must be one of 'none', 'relu', 'gelu', 'gelu_tanh', 'silu', 'tanh', "
                                 "'sigmoid', but got 'swish'");
  expect_throws<c10::Error>(
      [&] { customlayers::linear_act_backward(at::randn({4, 2}), x, w, std::nullopt, "silu", {true, true, true}); },
      "act='silu' needs `out`: the pre-activation");
}

}  // namespace
