// Runs an AOTInductor package (torch._inductor.aoti_compile_and_package) of a model that calls the
// customlayers ops, e.g. a customlayers.convert()ed MLP (docs/deploy.md makes one):
//
//   aoti_mlp <package.pt2> <batch> <in_features>
//
// It feeds linspace(-1, 1) of shape (batch, in_features), float32 on the CPU, and prints the outputs, one
// row a line. The program calls no customlayers function: linking customlayers::customlayers is what
// registers the ops the compiled model calls (without it: "Could not find schema for customlayers::...").
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <iomanip>
#include <iostream>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " <package.pt2> <batch> <in_features>\n";
    return 2;
  }
  const int64_t batch = std::atoll(argv[2]), features = std::atoll(argv[3]);
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  const at::Tensor x = at::linspace(-1, 1, batch * features, at::kFloat).reshape({batch, features});
  const at::Tensor y = loader.run({x}).at(0).contiguous();
  std::cout << std::setprecision(9);
  for (int64_t i = 0; i < y.size(0); ++i) {
    for (int64_t j = 0; j < y.size(1); ++j) std::cout << (j ? " " : "") << y[i][j].item<float>();
    std::cout << "\n";
  }
  return 0;
}
