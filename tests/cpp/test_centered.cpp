// customlayers::centered through the public C++ API: values against libtorch's x - x.mean(dim, keepdim),
// layouts, errors, autograd (first and second order).
#include <customlayers/customlayers.h>

#include <optional>
#include <tuple>

#include "testing.h"

namespace {

using customlayers::testing::expect_close;
using customlayers::testing::expect_throws;
using customlayers::testing::for_each_device;
using customlayers::testing::scale_of;

using Dims = std::optional<std::vector<int64_t>>;

at::Tensor reference(const at::Tensor& x, const Dims& dim) {
  const at::Tensor xd = x.to(at::kDouble);
  if (!dim.has_value() || dim->empty()) return xd - xd.mean();
  return xd - xd.mean(*dim, /*keepdim=*/true);
}

at::Tensor centered(const at::Tensor& x, const Dims& dim) {
  return dim.has_value() ? customlayers::centered(x, *dim) : customlayers::centered(x);
}

struct Case {
  std::vector<int64_t> shape;
  Dims dim;
};

std::string case_name(const Case& c) {
  std::string s = "shape";
  for (int64_t n : c.shape) s += "_" + std::to_string(n);
  if (!c.dim.has_value()) return s + "_all";
  s += "_dim";
  for (int64_t d : *c.dim) s += d < 0 ? "_m" + std::to_string(-d) : "_" + std::to_string(d);
  return s;
}

const std::vector<Case> kCases{
    {{}, std::nullopt}, {{}, std::vector<int64_t>{0}}, {{}, std::vector<int64_t>{-1}},
    {{0}, std::nullopt}, {{4, 0, 3}, std::vector<int64_t>{1}}, {{4, 0, 3}, std::vector<int64_t>{2}},
    {{1}, std::nullopt}, {{7}, std::vector<int64_t>{0}}, {{7}, std::vector<int64_t>{}},
    {{3, 5}, std::nullopt}, {{3, 5}, std::vector<int64_t>{0}}, {{3, 5}, std::vector<int64_t>{-1}},
    {{3, 5}, std::vector<int64_t>{0, 1}}, {{2, 3, 5, 7}, std::vector<int64_t>{1}},
    {{2, 3, 5, 7}, std::vector<int64_t>{2, 3}}, {{2, 3, 5, 7}, std::vector<int64_t>{0, 2}},
    {{2, 3, 5, 7}, std::vector<int64_t>{-1, 0}}, {{9, 4100}, std::vector<int64_t>{1}},
    {{4100, 9}, std::vector<int64_t>{0}}, {{3, 700, 37}, std::vector<int64_t>{1}}, {{70001}, std::nullopt},
};

class CenteredValues : public ::testing::TestWithParam<std::tuple<at::ScalarType, Case>> {};

TEST_P(CenteredValues, MatchesLibtorchReference) {
  const auto& [dtype, c] = GetParam();
  for_each_device([&, dtype = dtype, c = c](at::Device device) {
    torch::manual_seed(0);
    const at::Tensor x = (torch::randn(c.shape, at::kDouble) * 3 + 1.5).to(device, dtype);
    const at::Tensor y = centered(x, c.dim);
    EXPECT_EQ(y.device(), x.device());
    expect_close(y, reference(x, c.dim), dtype, scale_of(x));
  });
}

INSTANTIATE_TEST_SUITE_P(
    DtypesShapesDims, CenteredValues,
    ::testing::Combine(::testing::ValuesIn(customlayers::testing::float_dtypes()), ::testing::ValuesIn(kCases)),
    [](const auto& info) {
      return std::string(c10::toString(std::get<0>(info.param))) + "_" + case_name(std::get<1>(info.param));
    });

TEST(Centered, NonContiguousInputs) {
  for_each_device([](at::Device device) {
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      const at::Tensor base = torch::randn({6, 10, 12, 8}, torch::dtype(dtype).device(device));
      const std::vector<std::pair<const char*, at::Tensor>> layouts{
          {"channels_last", base.contiguous(at::MemoryFormat::ChannelsLast)},
          {"transposed", base.transpose(1, 3)},
          {"sliced", base.index({torch::indexing::Slice(), torch::indexing::Slice(torch::indexing::None, torch::indexing::None, 2),
                                 torch::indexing::Slice(1), torch::indexing::Slice(torch::indexing::None, torch::indexing::None, 3)})},
          {"expanded", torch::randn({6, 1, 12, 1}, base.options()).expand({6, 10, 12, 8})},
          {"permuted", base.permute({2, 0, 3, 1})},
      };
      for (const auto& [name, x] : layouts) {
        for (const Dims& dim : {Dims{}, Dims{{0}}, Dims{{1}}, Dims{{2, 3}}, Dims{{0, 2}}, Dims{{0, 1, 2}}}) {
          SCOPED_TRACE(std::string(name) + " " + c10::toString(dtype));
          const at::Tensor y = centered(x, dim);
          expect_close(y, reference(x, dim), dtype, scale_of(x));
          EXPECT_EQ(y.strides(), at::empty_like(x).strides());
        }
      }
    }
  });
}

TEST(Centered, BookExample) {
  const at::Tensor y = customlayers::centered(torch::tensor({1.0f, 2.0f, 3.0f, 4.0f, 5.0f}));
  EXPECT_TRUE(torch::equal(y, torch::tensor({-2.0f, -1.0f, 0.0f, 1.0f, 2.0f})));
}

TEST(Centered, RejectsNonFloatingDtypes) {
  for_each_device([](at::Device device) {
    for (auto dtype : {at::kLong, at::kInt, at::kBool, at::kComplexFloat}) {
      const at::Tensor x = torch::ones({3, 4}, torch::dtype(dtype).device(device));
      expect_throws<c10::TypeError>([&] { customlayers::centered(x); },
                                    "centered: expected x to be a floating-point tensor");
    }
  });
}

TEST(Centered, RejectsBadDims) {
  for_each_device([](at::Device device) {
    const at::Tensor x = torch::randn({2, 3}, torch::device(device));
    expect_throws<c10::IndexError>([&] { customlayers::centered(x, std::vector<int64_t>{2}); },
                                   "centered: dim 2 is out of range for a tensor with 2 dimension(s)");
    expect_throws<c10::IndexError>([&] { customlayers::centered(x, std::vector<int64_t>{-3}); }, "out of range");
    expect_throws<c10::Error>([&] { customlayers::centered(x, std::vector<int64_t>{1, -1}); },
                              "centered: dim 1 appears more than once");
  });
}

TEST(CenteredAutograd, BackwardIsCenteredOfGrad) {
  for_each_device([](at::Device device) {
    for (const Dims& dim : {Dims{}, Dims{{0}}, Dims{{1}}, Dims{{0, 2}}}) {
      const at::Tensor x = torch::randn({4, 5, 6}, torch::dtype(at::kDouble).device(device)).requires_grad_();
      const at::Tensor g = torch::randn_like(x);
      centered(x, dim).backward(g);
      expect_close(x.grad(), reference(g, dim), at::kDouble, scale_of(g));
      // The same gradient as autograd through libtorch's own ops.
      const at::Tensor x2 = x.detach().requires_grad_();
      reference(x2, dim).backward(g);
      expect_close(x.grad(), x2.grad(), at::kDouble, scale_of(g));
    }
  });
}

TEST(CenteredAutograd, DoubleBackward) {
  for_each_device([](at::Device device) {
    for (const Dims& dim : {Dims{}, Dims{{1}}}) {
      const auto opts = torch::dtype(at::kDouble).device(device);
      const at::Tensor x = torch::randn({3, 7}, opts).requires_grad_();
      const at::Tensor g = torch::randn({3, 7}, opts).requires_grad_();
      const at::Tensor gx = torch::autograd::grad({centered(x, dim)}, {x}, {g}, /*retain_graph=*/true,
                                                  /*create_graph=*/true)[0];
      ASSERT_TRUE(gx.requires_grad());
      // gx = centered(g): its derivative with respect to g, applied to v, is centered(v).
      const at::Tensor v = torch::randn({3, 7}, opts);
      const at::Tensor ggx = torch::autograd::grad({gx}, {g}, {v})[0];
      expect_close(ggx, reference(v, dim), at::kDouble, scale_of(v));
    }
  });
}

TEST(CenteredAutograd, MlpTrainsThroughCentered) {
  torch::manual_seed(0);
  torch::nn::Linear l1(8, 16), l2(16, 1);
  const at::Tensor x = torch::randn({32, 8});
  const at::Tensor target = x.sum(1, true);
  auto loss_fn = [&] { return (l2(customlayers::centered(l1(x).relu(), std::vector<int64_t>{1})) - target).square().mean(); };
  const double before = loss_fn().item<double>();
  torch::optim::SGD opt(std::vector<at::Tensor>{l1->parameters()[0], l1->parameters()[1], l2->parameters()[0],
                                                l2->parameters()[1]},
                        0.05);
  for (int step = 0; step < 50; ++step) {
    opt.zero_grad();
    loss_fn().backward();
    opt.step();
  }
  EXPECT_LT(loss_fn().item<double>(), before);
}

TEST(CenteredDispatch, RegisteredKernels) {
  const auto handle = c10::Dispatcher::singleton().findSchema({"customlayers::centered", ""});
  ASSERT_TRUE(handle.has_value());
  EXPECT_TRUE(handle->hasKernelForDispatchKey(c10::DispatchKey::CPU));
  EXPECT_TRUE(handle->hasKernelForDispatchKey(c10::DispatchKey::Autograd) ||
              handle->hasKernelForDispatchKey(c10::DispatchKey::AutogradCPU));
#ifdef CUSTOMLAYERS_TEST_EXPECT_CUDA
  EXPECT_TRUE(handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA));
#endif
}

TEST(CenteredDispatch, CudaDevice) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: the CUDA kernels are only compiled here, not run";
  const at::Tensor x = torch::randn({5, 300}, torch::device(at::kCUDA));
  expect_close(customlayers::centered(x, std::vector<int64_t>{1}), reference(x, Dims{{1}}), at::kFloat, scale_of(x));
}

}  // namespace
