// The sums of the bfloat16 forward on AMX tiles (linear_act_bf16_kernels.h), hand-written:
//  * A block of 32 rows x two panels (32 columns, or a gate panel and its up panel) keeps its float32 sums
//    in four 16 x 16 tiles (2 x 2), one TDPBF16PS per tile per 32 elements of K: A's two 16-row tiles are
//    read from x in place, B's two tiles are 16 pair rows of the packed panels (the dot-product kernel's
//    layout, with K padded by zeros to a multiple of 32 and the panels to an even count).
//  * Parallel tasks of 128 rows x 256 columns; a task runs K in slices of 256 (a slice of its rows, 64 KB,
//    stays in L2 while the pairs of panels pass), its blocks' sums kept in memory between slices (exact:
//    float32 stored and loaded), then the shared epilogue on each block.
//  * K's last partial step reads A's last columns from a zero-padded copy of them; a block with fewer than
//    32 rows runs on a zero-padded copy of its rows. Either way an output's sums are the same sequence of
//    tile steps wherever it lies: its bits depend on neither the blocking nor the thread count.
//  * Each thread configures the tiles when it starts its tasks and restores what it found when done (none:
//    released), so that another AMX user of the thread that keeps its configuration loaded finds it.
// The tiles need the OS's permission (Linux 5.16+: arch_prctl ARCH_REQ_XCOMP_PERM), asked once.
#include "cpu/linear_act_bf16_kernels.h"

#if CUSTOMLAYERS_BF16_KERNELS

#include <ATen/Parallel.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace customlayers::cpu {
namespace {

constexpr int64_t kTileRows = 16;             // rows of a tile (and pair rows of a B tile)
constexpr int64_t kStep = 32;                 // bfloat16 elements of K per tile step (64 bytes a row)
constexpr int64_t kBlockRows = 2 * kTileRows; // rows per block
constexpr int64_t kBlockCols = 2 * kPanelWidth; // columns (two panels) per block
constexpr int64_t kPanelStep = kStep * kPanelWidth;  // bfloat16 elements of a panel per step
constexpr int64_t kTaskRows = 128;
constexpr int64_t kTaskPanels = 16;  // 256 columns
constexpr int64_t kSliceSteps = 8;   // K steps per slice: 256 elements
static_assert(kBlockRows <= kMaxBlockRows && kBlockCols <= kMaxBlockCols);

#define CUSTOMLAYERS_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

// The tile configuration (palette 1): tiles 0-3 the sums, 4-5 A, 6-7 B, each 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig make_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = kTileRows;
  }
  return c;
}

// In static memory: GCC 12 drops the stores of a local configuration that only LDTILECFG reads (its AMX
// intrinsics declare no memory operands; hence also the compiler barriers around the tile code below).
const TileConfig kTileConfig = make_config();

inline void memory_barrier() { asm volatile("" ::: "memory"); }

// A block's rows as the tiles read them: steps [0, steps) of K in place (row stride lda), then, unless tail
// is null, one more step from `tail` (32 x kStep, zero past K).
struct BlockRows {
  const uint16_t* a;
  int64_t lda, steps;
  const uint16_t* tail;
  int64_t all_steps() const { return steps + (tail != nullptr); }
};

// sums (32 x 32, row stride kBlockCols) += (load: else =) a's rows @ panels b0, b1 over steps [s0, s1).
CUSTOMLAYERS_AMX_TARGET void tile_steps(const BlockRows& a, int64_t s0, int64_t s1, const uint16_t* b0,
                                        const uint16_t* b1, bool load, float* sums) {
  constexpr int64_t kSumsStride = kBlockCols * sizeof(float);
  float* const lower = sums + kTileRows * kBlockCols;
  memory_barrier();  // the copies the A tiles read, and the sums, are written before
  if (load) {
    _tile_loadd(0, sums, kSumsStride);
    _tile_loadd(1, sums + kPanelWidth, kSumsStride);
    _tile_loadd(2, lower, kSumsStride);
    _tile_loadd(3, lower + kPanelWidth, kSumsStride);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t stride = a.lda * 2;
  for (int64_t s = s0; s < s1; ++s) {
    if (s < a.steps) {
      _tile_loadd(4, a.a + s * kStep, stride);
      _tile_loadd(5, a.a + kTileRows * a.lda + s * kStep, stride);
    } else {
      _tile_loadd(4, a.tail, 64);
      _tile_loadd(5, a.tail + kTileRows * kStep, 64);
    }
    _tile_loadd(6, b0 + s * kPanelStep, 64);
    _tile_loadd(7, b1 + s * kPanelStep, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, sums, kSumsStride);
  _tile_stored(1, sums + kPanelWidth, kSumsStride);
  _tile_stored(2, lower, kSumsStride);
  _tile_stored(3, lower + kPanelWidth, kSumsStride);
  memory_barrier();  // the sums are read after
}

// Per thread: a task's blocks of sums, and zero-padded copies of its partial row block and of its blocks'
// last K columns.
struct Scratch {
  std::unique_ptr<float[]> sums{new float[kTaskRows * kTaskPanels * kPanelWidth]};
  std::vector<uint16_t> rows, tails = std::vector<uint16_t>(kTaskRows * kStep);
};

// The rows of the task's block from r (`rows` of them) as the tiles read them, copies made in s.
BlockRows block_rows(const Bf16Forward& f, int64_t r, int64_t rows, int64_t block, Scratch& s) {
  const int64_t steps = f.K / kStep, rem = f.K % kStep;
  const uint16_t* a = f.a + r * f.lda;
  if (rows < kBlockRows) {  // all of K from a zero-padded copy
    const int64_t ld = (steps + (rem > 0)) * kStep;
    s.rows.assign(kBlockRows * ld, 0);
    for (int64_t i = 0; i < rows; ++i) std::memcpy(s.rows.data() + i * ld, a + i * f.lda, f.K * sizeof(uint16_t));
    return {s.rows.data(), ld, ld / kStep, nullptr};
  }
  if (rem == 0) return {a, f.lda, steps, nullptr};
  uint16_t* tail = s.tails.data() + block * kBlockRows * kStep;
  std::fill(tail, tail + kBlockRows * kStep, uint16_t{0});
  for (int64_t i = 0; i < kBlockRows; ++i) std::memcpy(tail + i * kStep, a + i * f.lda + steps * kStep, rem * sizeof(uint16_t));
  return {a, f.lda, steps, tail};
}

// A task's blocks of sums over K in slices of kSliceSteps steps, so that a slice of the task's rows stays in
// cache while the pairs of panels pass; then the epilogue of each block.
CUSTOMLAYERS_AMX_TARGET void run_task(const Bf16Forward& f, int64_t task, Scratch& s) {
  const int64_t task_cols = (f.b.panels + kTaskPanels - 1) / kTaskPanels;
  const int64_t r_begin = task / task_cols * kTaskRows, r_end = std::min(f.rows, r_begin + kTaskRows);
  const int64_t p_begin = task % task_cols * kTaskPanels, p_end = std::min(f.b.panels, p_begin + kTaskPanels);
  const int64_t row_blocks = (r_end - r_begin + kBlockRows - 1) / kBlockRows;
  BlockRows blocks[kTaskRows / kBlockRows];
  for (int64_t i = 0; i < row_blocks; ++i) {
    const int64_t r = r_begin + i * kBlockRows;
    blocks[i] = block_rows(f, r, std::min(kBlockRows, r_end - r), i, s);
  }
  constexpr int64_t kBlockSums = kBlockRows * kBlockCols;
  const auto block_sums = [&](int64_t p, int64_t i) { return s.sums.get() + ((p - p_begin) / 2 * row_blocks + i) * kBlockSums; };
  const int64_t all_steps = blocks[0].all_steps();
  for (int64_t s0 = 0; s0 < std::max<int64_t>(all_steps, 1); s0 += kSliceSteps) {
    const int64_t s1 = std::min(all_steps, s0 + kSliceSteps);
    for (int64_t p = p_begin; p < p_end; p += 2)
      for (int64_t i = 0; i < row_blocks; ++i) tile_steps(blocks[i], s0, s1, f.b.panel(p), f.b.panel(p + 1), s0 > 0, block_sums(p, i));
  }
  for (int64_t p = p_begin; p < p_end; p += 2) {
    for (int64_t i = 0; i < row_blocks; ++i) {
      const int64_t r = r_begin + i * kBlockRows, rows = std::min(kBlockRows, r_end - r);
      const float* sums = block_sums(p, i);
      if (f.gated) {
        const int64_t c0 = p / 2 * kPanelWidth;
        finish_gated_block(f, sums, sums + kPanelWidth, kBlockCols, r, rows, c0, std::min(kPanelWidth, f.N - c0));
      } else {
        const int64_t c0 = p * kPanelWidth;
        finish_block(f, sums, kBlockCols, r, rows, c0, std::min(kBlockCols, f.cols - c0));
      }
    }
  }
}

CUSTOMLAYERS_AMX_TARGET void run_tasks(const Bf16Forward& f, int64_t begin, int64_t end) {
  Scratch s;
  struct Restore {  // the thread's tile configuration as it was, when it leaves (errors included)
    TileConfig found;
    CUSTOMLAYERS_AMX_TARGET Restore() {
      _tile_storeconfig(&found);
      memory_barrier();
      _tile_loadconfig(&kTileConfig);
    }
    CUSTOMLAYERS_AMX_TARGET ~Restore() {
      if (found.palette == 0) _tile_release();
      else _tile_loadconfig(&found);
    }
  } restore;
  for (int64_t t = begin; t < end; ++t) run_task(f, t, s);
}

}  // namespace

int64_t amx_pairs(int64_t K) { return (K + kStep - 1) / kStep * (kStep / 2); }

bool amx_usable() {
  static const bool usable = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // Linux's ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return usable;
}

void run_amx(const Bf16Forward& f) {
  TORCH_INTERNAL_ASSERT(f.b.panels % 2 == 0 && f.b.pairs == amx_pairs(f.K));
  const int64_t tasks = (f.rows + kTaskRows - 1) / kTaskRows * ((f.b.panels + kTaskPanels - 1) / kTaskPanels);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { run_tasks(f, begin, end); });
}

}  // namespace customlayers::cpu

#endif
