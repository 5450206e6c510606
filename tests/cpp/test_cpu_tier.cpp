// The choice of the CPU kernels' tier (common/cpu_tier.h), on any CPU, and what the library reports.
#include "common/cpu_tier.h"
#include "customlayers/customlayers.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace tiers = customlayers::tiers;

namespace {
constexpr unsigned kAll = 0b111;
}

TEST(CpuTier, TheBestTierTheCpuRunsAndTorchAllows) {
  EXPECT_EQ(tiers::choose(tiers::kAvx512, tiers::kAvx512, kAll).tier, tiers::kAvx512);
  EXPECT_EQ(tiers::choose(tiers::kAvx2, tiers::kAvx2, kAll).tier, tiers::kAvx2);
  EXPECT_EQ(tiers::choose(tiers::kDefault, tiers::kDefault, kAll).tier, tiers::kDefault);
}

TEST(CpuTier, AtenCpuCapabilityLowersIt) {
  const auto c = tiers::choose(tiers::kAvx2, tiers::kAvx512, kAll);
  EXPECT_EQ(c.tier, tiers::kAvx2);
  EXPECT_NE(c.reason.find("allows avx2"), std::string::npos) << c.reason;
  EXPECT_EQ(tiers::choose(tiers::kDefault, tiers::kAvx512, kAll).tier, tiers::kDefault);
}

TEST(CpuTier, NeverAboveWhatTheCpuRuns) {
  // ATEN_CPU_CAPABILITY=avx512 on an AVX2 CPU: torch believes it, the tier does not.
  const auto c = tiers::choose(tiers::kAvx512, tiers::kAvx2, kAll);
  EXPECT_EQ(c.tier, tiers::kAvx2);
  EXPECT_NE(c.reason.find("runs avx2 at most"), std::string::npos) << c.reason;
  EXPECT_EQ(tiers::choose(tiers::kAvx512, tiers::kDefault, kAll).tier, tiers::kDefault);
}

TEST(CpuTier, ATierNotBuiltGivesWayToTheNextOneDown) {
  const auto c = tiers::choose(tiers::kAvx512, tiers::kAvx512, 0b011);
  EXPECT_EQ(c.tier, tiers::kAvx2);
  EXPECT_NE(c.reason.find("avx512 was not built"), std::string::npos) << c.reason;
  EXPECT_EQ(tiers::choose(tiers::kAvx512, tiers::kAvx512, 0b001).tier, tiers::kDefault);
}

TEST(CpuTier, NoneWhenNothingAtOrBelowWasBuilt) {
  const auto c = tiers::choose(tiers::kAvx2, tiers::kAvx2, 0b100);
  EXPECT_EQ(c.tier, -1);
  EXPECT_NE(c.reason.find("no tier at or below avx2 was built"), std::string::npos) << c.reason;
}

TEST(CpuTier, TheLibraryLoadedOneOfItsBuiltTiers) {
  const customlayers::CpuTierInfo info = customlayers::cpu_tier();
  ASSERT_FALSE(info.tier.empty()) << info.reason;
  EXPECT_NE(std::find(info.built.begin(), info.built.end(), info.tier), info.built.end());
  EXPECT_FALSE(info.reason.empty());
}
