// The CPU kernels' tiers (customlayers/_cpu.py builds one library of them per tier) and the choice of the
// one to load: a pure function of what was asked, what the CPU runs and what was built, so that it is
// tested on any machine (tests/cpp/test_cpu_tier.cpp).
#pragma once

#include <string>

namespace customlayers::tiers {

// Lowest first; a tier's CPUs run every tier below it.
enum Tier : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kCount = 3 };

inline const char* name(int tier) {
  static const char* const kNames[kCount] = {"default", "avx2", "avx512"};
  return tier >= 0 && tier < kCount ? kNames[tier] : "none";
}

struct Choice {
  int tier;            // the tier to load, or -1 when none can be (then the references serve)
  std::string reason;  // why, in words
};

// requested: the highest tier torch's CPU capability allows (ATEN_CPU_CAPABILITY lowers it); supported:
// the highest this CPU runs (CPUID); built: bit t set when tier t's library is there. The choice is the
// highest built tier within both.
inline Choice choose(int requested, int supported, unsigned built) {
  const int limit = requested < supported ? requested : supported;
  int tier = limit;
  while (tier >= 0 && !(built & (1u << tier))) --tier;
  std::string why;
  if (requested > supported)
    why = std::string("torch's CPU capability allows ") + name(requested) + " but this CPU (CPUID) runs " +
          name(supported) + " at most";
  else if (requested < supported)
    why = std::string("torch's CPU capability (ATEN_CPU_CAPABILITY or torch's build) allows ") + name(requested) +
          "; this CPU (CPUID) runs " + name(supported);
  else
    why = std::string("the best tier this CPU (CPUID) runs: ") + name(supported);
  if (tier < 0) return {-1, why + ", and no tier at or below " + name(limit) + " was built"};
  if (tier < limit) why += std::string(", and ") + name(limit) + " was not built";
  return {tier, why};
}

}  // namespace customlayers::tiers
