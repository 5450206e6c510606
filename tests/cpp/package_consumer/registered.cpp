// Links customlayers::customlayers but calls none of its functions, as a program that only loads
// models does: loading the library must still have registered the ops.
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  for (const char* name : {"customlayers::linear_act", "customlayers::centered", "customlayers::masked_uniform_"}) {
    if (!c10::Dispatcher::singleton().findSchema({name, ""}).has_value()) {
      std::cout << name << " is not registered\n";
      return 1;
    }
  }
  std::cout << "customlayers ops registered\n";
  return 0;
}
