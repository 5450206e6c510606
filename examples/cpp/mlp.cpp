// A small MLP with libtorch's Linear layers and customlayers::centered in between (the book's
// CenteredLayer), trained with SGD on a toy regression; forward and backward run through the ops'
// C++ kernels and autograd.
#include <customlayers/customlayers.h>
#include <torch/torch.h>

#include <iostream>

struct CenteredMLPImpl : torch::nn::Module {
  CenteredMLPImpl(int64_t in, int64_t hidden, int64_t out)
      : fc1(register_module("fc1", torch::nn::Linear(in, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, out))) {}

  torch::Tensor forward(const torch::Tensor& x) {
    // Center each sample's hidden features (dim 1), then the layer's output over the whole batch.
    const torch::Tensor h = customlayers::centered(torch::relu(fc1(x)), std::vector<int64_t>{1});
    return customlayers::centered(fc2(h));
  }

  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(CenteredMLP);

int main() {
  torch::manual_seed(0);
  const torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  CenteredMLP net(16, 64, 1);
  net->to(device);
  const torch::Tensor x = torch::randn({256, 16}, device);
  const torch::Tensor w = torch::randn({16, 1}, device);
  const torch::Tensor y = customlayers::centered(x.matmul(w).tanh());  // zero-mean targets

  torch::optim::SGD optimizer(net->parameters(), torch::optim::SGDOptions(0.1));
  double first = 0, last = 0;
  for (int step = 0; step < 200; ++step) {
    optimizer.zero_grad();
    const torch::Tensor loss = torch::mse_loss(net->forward(x), y);
    loss.backward();
    optimizer.step();
    last = loss.item<double>();
    if (step == 0) first = last;
    if (step % 50 == 0) std::cout << "step " << step << "  loss " << last << "\n";
  }
  std::cout << "device " << device << ": loss went from " << first << " to " << last << "\n";
  std::cout << "centered([1, 2, 3, 4, 5]) = " << customlayers::centered(torch::arange(1, 6, torch::kFloat)) << "\n";
  return last < first ? 0 : 1;
}
