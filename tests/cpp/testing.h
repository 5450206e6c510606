// Helpers shared by the C++ tests: dtypes, devices, tolerances and comparison with a float64 reference.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

namespace customlayers::testing {

inline const std::vector<at::ScalarType>& float_dtypes() {
  static const std::vector<at::ScalarType> dtypes{at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  return dtypes;
}

// Absolute error allowed relative to max|x| (as in the Python tests).
inline double tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 1e-6;
    case at::kHalf: return 2e-3;
    default: return 1.6e-2;  // bfloat16
  }
}

// actual has the input's shape, dtype and device, and equals the float64 `expected` within the dtype's
// tolerance scaled by `scale` (max|x|, at least 1).
inline void expect_close(const at::Tensor& actual, const at::Tensor& expected, at::ScalarType dtype, double scale) {
  ASSERT_EQ(actual.sizes(), expected.sizes());
  ASSERT_EQ(actual.scalar_type(), dtype);
  if (actual.numel() == 0) return;
  const double tol = tolerance(dtype);
  const double err = (actual.to(at::kDouble).cpu() - expected.cpu()).abs().max().item<double>();
  EXPECT_LE(err, tol * scale + tol * expected.abs().max().item<double>()) << "max abs error " << err;
}

inline double scale_of(const at::Tensor& x) {
  return x.numel() ? std::max(x.to(at::kDouble).abs().max().item<double>(), 1.0) : 1.0;
}

// Runs `body(device)` on the CPU, and on CUDA when a device is present.
template <typename Body>
void for_each_device(Body&& body) {
  body(at::Device(at::kCPU));
  if (torch::cuda::is_available()) body(at::Device(at::kCUDA));
}

// `fn` throws an exception of type E whose message contains `needle`.
template <typename E, typename Fn>
void expect_throws(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one containing \"" << needle << "\"";
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace customlayers::testing
