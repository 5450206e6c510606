// Loads the CPU kernels of one tier when the library is loaded (common/cpu_tier.h chooses which). Each
// tier's kernels are a library of their own beside this one (customlayers/_cpu.py's tier_library names
// it), compiled with that tier's flags; loading it registers its CPU kernels with the dispatcher. Only one
// is ever loaded, so no code compiled for a CPU this one lacks can run, and no inline function of one
// tier's build can stand in for another's.
#include "common/cpu_tier.h"
#include "customlayers/customlayers.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <dlfcn.h>
#include <unistd.h>

#include <string>

namespace customlayers {
namespace {

using namespace tiers;

int requested_tier() {  // torch's CPU capability, which ATEN_CPU_CAPABILITY lowers
  const std::string capability = at::get_cpu_capability();
  if (capability.find("AVX512") != std::string::npos) return kAvx512;
  if (capability.find("AVX2") != std::string::npos) return kAvx2;
  return kDefault;
}

int supported_tier() {  // CPUID: what this CPU and its OS (XCR0: the vector registers' state) run
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return kDefault;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  return kAvx2;
#else
  return kDefault;
#endif
}

// Where this library was loaded from; empty when that is unknown (then no tier is loaded: never one from
// whatever the working directory holds).
std::string library_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&library_dir), &info) == 0 || info.dli_fname == nullptr) return "";
  const std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

std::string tier_path(const std::string& dir, int tier) {
  return dir + "/libcustomlayers_cpu_" + name(tier) + ".so";
}

CpuTierInfo load_tier() {
  const std::string dir = library_dir();
  CpuTierInfo info;
  if (dir.empty()) {
    info.reason = "the folder this library was loaded from is unknown (dladdr), so no CPU tier beside it is loaded";
    TORCH_WARN("customlayers: ", info.reason);
    return info;
  }
  unsigned built = 0;
  for (int t = 0; t < kCount; ++t) {
    if (access(tier_path(dir, t).c_str(), R_OK) == 0) {
      built |= 1u << t;
      info.built.emplace_back(name(t));
    }
  }
  Choice choice = choose(requested_tier(), supported_tier(), built);
  info.reason = choice.reason;
  while (choice.tier >= 0) {  // a tier that fails to load gives way to the next one down
    const std::string path = tier_path(dir, choice.tier);
    if (dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL) != nullptr) {
      info.tier = name(choice.tier);
      return info;
    }
    const char* error = dlerror();
    info.reason += std::string("; loading ") + path + " failed: " + (error ? error : "unknown error");
    built &= ~(1u << choice.tier);
    choice.tier = choose(choice.tier, choice.tier, built).tier;
  }
  info.reason += " (no CPU kernels are loaded: the ops have no CPU kernel, unless the Python package's "
                 "pure-PyTorch references serve the CPU)";
  TORCH_WARN("customlayers: ", info.reason);
  return info;
}

const CpuTierInfo& state() {
  static const CpuTierInfo info = load_tier();
  return info;
}

// Loaded with the library, so its CPU kernels are registered before anything can call the ops.
[[maybe_unused]] const bool kLoadedAtStart = (state(), true);

}  // namespace

CpuTierInfo cpu_tier() { return state(); }

}  // namespace customlayers

// For callers without the C++ ABI (customlayers/_ops.py, through ctypes): "tier\nreason\nbuilt,built,...",
// the tier empty when none is loaded.
extern "C" CUSTOMLAYERS_API const char* customlayers_cpu_tier_report() {
  static const std::string report = [] {
    const customlayers::CpuTierInfo& info = customlayers::state();
    std::string built;
    for (const auto& t : info.built) built += (built.empty() ? "" : ",") + t;
    return info.tier + "\n" + info.reason + "\n" + built;
  }();
  return report.c_str();
}
