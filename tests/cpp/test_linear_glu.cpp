// customlayers::linear_glu / linear_glu_backward through the public C++ API: values against libtorch's
// act(x @ Wg + bg) * (x @ Wu + bu) for the gated activations, both weight layouts and every dtype;
// gradients (first and second order) against libtorch autograd; the backward op's mask; errors. Each on the
// CPU, and on CUDA when a device is present.
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

const std::vector<std::string> kActs{"silu", "gelu", "gelu_tanh", "relu"};

at::Tensor activate(const at::Tensor& y, const std::string& act) {
  if (act == "relu") return y.relu();
  if (act == "gelu") return at::gelu(y);
  if (act == "gelu_tanh") return at::gelu(y, "tanh");
  return at::silu(y);
}

// In float64; the weights (in, hidden).
at::Tensor reference(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& bg,
                     const at::Tensor& bu, const std::string& act) {
  const at::Tensor xd = x.to(at::kDouble);
  return activate(at::matmul(xd, wg.to(at::kDouble)) + bg.to(at::kDouble), act) *
         (at::matmul(xd, wu.to(at::kDouble)) + bu.to(at::kDouble));
}

double glu_tol(at::ScalarType dtype, int64_t k) {
  const double eps = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-5 : dtype == at::kHalf ? 4e-3 : 3e-2;
  return eps * std::max<double>(1.0, std::sqrt(double(k))) * 8;
}

TEST(LinearGlu, MatchesLibtorchBothLayouts) {
  for_each_device([](at::Device device) {
    for (auto dtype : float_dtypes()) {
      for (auto [m, k, n] : std::vector<std::array<int64_t, 3>>{{1, 1, 1}, {7, 13, 5}, {65, 33, 129}, {200, 100, 70}}) {
        const auto o = at::TensorOptions().dtype(dtype).device(device);
        const at::Tensor x = at::randn({m, k}, o);
        const at::Tensor bg = at::randn({n}, o), bu = at::randn({n}, o);
        const at::Tensor wg = at::randn({n, k}, o) / std::sqrt(double(k)), wu = at::randn({n, k}, o) / std::sqrt(double(k));
        for (const std::string& act : kActs) {
          const at::Tensor expected = reference(x, wg.t(), wu.t(), bg, bu, act);
          const double scale = std::max(1.0, expected.abs().max().item<double>());
          at::NoGradGuard no_grad;
          for (bool weight_t : {true, false}) {
            const at::Tensor y = weight_t ? customlayers::linear_glu(x, wg, wu, bg, bu, act, true)
                                          : customlayers::linear_glu(x, wg.t(), wu.t(), bg, bu, act);
            ASSERT_EQ(y.scalar_type(), dtype);
            const double err = (y.to(at::kDouble) - expected).abs().max().item<double>();
            EXPECT_LE(err, glu_tol(dtype, k) * scale) << device << " " << m << "x" << k << "x" << n << " " << dtype << " " << act;
          }
        }
      }
    }
  });
}

TEST(LinearGluAutograd, GradientsMatchLibtorch) {
  for_each_device([](at::Device device) {
    const auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
    const at::Tensor x = at::randn({2, 9, 7}, opts).requires_grad_();
    const at::Tensor wg = at::randn({4, 7}, opts).requires_grad_(), wu = at::randn({4, 7}, opts).requires_grad_();
    const at::Tensor bg = at::randn({4}, opts).requires_grad_(), bu = at::randn({4}, opts).requires_grad_();
    const at::Tensor g = at::randn({2, 9, 4}, opts);
    for (const std::string& act : kActs) {
      const at::Tensor y = customlayers::linear_glu(x, wg, wu, bg, bu, act, /*weight_t=*/true);
      const auto ours = torch::autograd::grad({y}, {x, wg, wu, bg, bu}, {g});
      const at::Tensor native = activate(at::matmul(x, wg.t()) + bg, act) * (at::matmul(x, wu.t()) + bu);
      const auto ref = torch::autograd::grad({native}, {x, wg, wu, bg, bu}, {g});
      for (size_t i = 0; i < 5; ++i)
        EXPECT_TRUE(at::allclose(ours[i], ref[i], 1e-10, 1e-10)) << device << " " << act << " gradient " << i;
      EXPECT_TRUE(ours[1].is_contiguous());  // torch::nn::Linear's layout
    }
  });
}

TEST(LinearGluAutograd, DoubleBackward) {
  for_each_device([](at::Device device) {
    const auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
    const at::Tensor x = at::randn({5, 4}, opts).requires_grad_();
    const at::Tensor wg = at::randn({4, 3}, opts).requires_grad_(), wu = at::randn({4, 3}, opts).requires_grad_();
    auto second = [&](auto fn) {
      const auto gx = torch::autograd::grad({fn().square().sum()}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true);
      return torch::autograd::grad({gx[0].sum()}, {wg, wu});
    };
    for (const std::string& act : kActs) {
      const auto ours = second([&] { return customlayers::linear_glu(x, wg, wu, std::nullopt, std::nullopt, act); });
      const auto ref = second([&] { return activate(at::matmul(x, wg), act) * at::matmul(x, wu); });
      for (size_t i = 0; i < 2; ++i) EXPECT_TRUE(at::allclose(ours[i], ref[i], 1e-10, 1e-10)) << device << " " << act << " " << i;
    }
  });
}

TEST(LinearGluBackward, FusedKernelRespectsOutputMask) {
  for_each_device([](at::Device device) {
    const auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
    const at::Tensor x = at::randn({6, 4}, opts);
    const at::Tensor wg = at::randn({4, 3}, opts), wu = at::randn({4, 3}, opts);
    const at::Tensor gate = at::matmul(x, wg), up = at::matmul(x, wu);
    const at::Tensor g = at::randn({6, 3}, opts);
    auto [dx, dwg, dwu, dbg, dbu] =
        customlayers::linear_glu_backward(g, x, wg, wu, gate, up, "relu", {false, false, true, true, false});
    const at::Tensor dgate = g * up * gate.gt(0), dup = g * gate.relu();
    EXPECT_FALSE(dx.defined());
    EXPECT_FALSE(dwg.defined());
    EXPECT_TRUE(at::allclose(dwu, at::matmul(x.t(), dup))) << device;
    EXPECT_TRUE(at::allclose(dbg, dgate.sum(0))) << device;
    EXPECT_FALSE(dbu.defined());
  });
}

TEST(LinearGlu, RejectsBadInputs) {
  const at::Tensor x = at::randn({4, 3}), w = at::randn({3, 2});
  expect_throws<c10::TypeError>([&] { customlayers::linear_glu(x, w, w.to(at::kDouble)); },
                                "expected x and weight_up to have the same dtype");
  expect_throws<c10::Error>([&] { customlayers::linear_glu(x, w, at::randn({3, 5})); },
                            "expected weight_gate and weight_up to have the same shape");
  expect_throws<c10::Error>([&] { customlayers::linear_glu(x, w, w, at::randn({3})); }, "bias_gate");
  expect_throws<c10::ValueError>([&] { customlayers::linear_glu(x, w, w, std::nullopt, std::nullopt, "swish"); },
                                 "linear_glu: act must be one of");
  expect_throws<c10::Error>(
      [&] { customlayers::linear_glu_backward(at::randn({4, 2}), x, w, w, at::randn({4, 3}), at::randn({4, 2}), "silu",
                                              {true, true, true, true, true}); },
      "expected gate of shape [4, 2]");
}

}  // namespace
