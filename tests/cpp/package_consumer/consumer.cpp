// Uses the installed customlayers: the header, the ops, their kernels and autograd.
#include <ATen/ATen.h>
#include <customlayers/customlayers.h>

#include <iostream>

int main() {
  at::manual_seed(0);
  const at::Tensor x = at::randn({4, 3}).set_requires_grad(true);
  const at::Tensor weight = at::randn({3, 5});
  const at::Tensor bias = at::randn({5});
  const at::Tensor y = customlayers::linear_act(x, weight, bias, "relu");
  const at::Tensor expected = at::relu(x.matmul(weight) + bias);
  const at::Tensor c = customlayers::centered(y);
  c.sum().backward();
  const bool ok = at::allclose(y, expected) && c.mean().abs().item<double>() < 1e-6 && x.grad().defined();
  std::cout << (ok ? "customlayers package OK" : "customlayers package gave wrong results") << "\n";
  return ok ? 0 : 1;
}
