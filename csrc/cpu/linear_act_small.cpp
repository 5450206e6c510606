// The small-weight CPU kernels of linear_act (see linear_act_small.h). One register-blocked kernel,
// tile_product, computes a kTileRows x (V vectors) tile of C = A @ B in registers, B being an acc_t panel
// with its columns zero-padded to whole vectors: kTileVecs vectors per tile, the last tile of a row only
// as many as its columns need (for_col_tiles; 20 columns: 2 vectors of 16, not 3):
//  * forward: one parallel pass over rows; A = rows of x (acc_t copies), B = W packed as [K, Np]; bias +
//    activation applied to the tile before it is stored; an output that is not finite is recomputed in
//    double (dot_recomputed), so a sum overflowing on the way is not taken for the answer;
//  * backward: one parallel pass over fixed blocks of rows; per 64-row chunk it makes the masked gradient
//    g', its bias-gradient column sums, dX = g' W^T (A = rows of the chunk of g', B = W^T packed as
//    [N, Kp]) and the block's share of dW = X^T g' (A = X^T of the chunk, B = the chunk of g'), all while
//    the chunk is in cache. The blocks' dW partials are then added in block order; blocks depend on M
//    alone, so dW does not depend on the thread count, like the bias gradient.
// Narrow outputs (few columns, long rows: an output layer such as 256 -> 10) would waste most of a tile's
// columns on padding, so there:
//  * forward: dot_tile, kDotRows x kDotCols dot products of rows of x with rows of W^T (packed [N, K]),
//    vectorized along K, each reduced once at the end; a result that is not finite is recomputed in double
//    (dot_recomputed), so lanes overflowing to +inf and -inf never give NaN;
//  * backward: dX as above (its inner dimension is N); dW is computed transposed, dW^T = g'^T X: tile rows
//    are g''s columns (broadcast), tile columns x's (rows of the chunk of x), so no column is padding
//    but the last partial tile's.
// dX's and dW's entries that are not finite (partial sums reaching ±inf on the way, or +inf and -inf
// meeting) are recomputed in double.
#include "cpu/linear_act_small.h"

#include "common/cpu_alloc.h"
#include "cpu/linear_act_rows.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace customlayers::cpu {
namespace {

constexpr int64_t kSmallK = 64;
constexpr int64_t kSmallWeight = 1 << 16;
constexpr int64_t kTileRows = 4;
constexpr int kTileVecs = 3;
constexpr int64_t kNarrowMaxCols = 16;  // narrow outputs: at most this many columns,
constexpr int64_t kNarrowMinK = 32;     // and rows long enough for dot products (shorter: small weights)
constexpr int64_t kNarrowMaxK = 8192;   // and short enough for a tile's rows of x to stay in cache
constexpr int kDotRows = 4;
constexpr int kDotCols = 2;

// f(c0, std::integral_constant<int, V>{}) for the column tiles of `cols` columns, V vectors from c0 each
// (the last ones read zero padding up to whole vectors): kTileVecs vectors, then the 1 or 2 that cover the
// rest; a rest of one vector after whole tiles is taken as 2 + 2 instead of 3 + 1, since a tile of one
// vector has too few independent sums to keep the FMA units busy.
template <typename A, typename F>
inline void for_col_tiles(int64_t cols, const F& f) {
  static_assert(kTileVecs == 3, "the tail tiles below are 1 and 2 vectors");
  constexpr int64_t kW = Vectorized<A>::size();
  const int64_t vecs = (cols + kW - 1) / kW;
  const int64_t whole = vecs % kTileVecs == 1 && vecs > kTileVecs ? vecs / kTileVecs - 1 : vecs / kTileVecs;
  for (int64_t t = 0; t < whole; ++t) f(t * kTileVecs * kW, std::integral_constant<int, kTileVecs>{});
  int64_t c0 = whole * kTileVecs * kW;
  for (int64_t rest = vecs - whole * kTileVecs; rest > 0; rest -= 2, c0 += 2 * kW) {
    if (rest == 1) f(c0, std::integral_constant<int, 1>{});
    else f(c0, std::integral_constant<int, 2>{});
  }
}

// An uninitialized acc_t buffer of n values (the extension's CPU allocator: no zero fill, recycled).
template <typename T>
at::Tensor acc_buffer(int64_t n) {
  return cpu::empty({n}, c10::CppTypeToScalarType<acc_t<T>>::value);
}

// dst(r, c) = src(r, c) for r < rows, c < cols: a row-major block stored in any layout (a transposing
// copy when the destination's columns are its contiguous dimension).
template <typename S, typename D>
void copy_block(Rows<const S> src, int64_t rows, int64_t cols, Strided<D> dst) {
  if (dst.cs == 1 || cols == 1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst.data[r * dst.rs + c] = static_cast<D>(src.row(r)[c]);
  } else if (dst.rs == 1 || rows == 1) {
    transpose_copy(src.data, src.ld, rows, cols, dst.data, dst.cs);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst.data[r * dst.rs + c * dst.cs] = static_cast<D>(src.row(r)[c]);
  }
}

// dst.row(i)[c] = src(i, c) for i < inner, c < cols, as acc_t, each row zero padded to dst.ld: a weight
// panel, or rows of x in the accumulation type. Each parallel task packs its own copy of a weight panel:
// packed once and read by every thread, it would move from core to core on every call, which costs more
// than packing it again.
template <typename T>
void pack_panel(Strided<const T> src, int64_t inner, int64_t cols, Rows<acc_t<T>> dst) {
  // src read as the row-major [cols, inner] block with rows of src.cs values when its inner dimension
  // is contiguous (the panel is then its transpose); else element by element.
  if (src.rs == 1 && src.cs != 1)
    copy_block(Rows<const T>{src.data, src.cs}, cols, inner, Strided<acc_t<T>>{dst.data, 1, dst.ld});
  else
    for (int64_t i = 0; i < inner; ++i)
      for (int64_t c = 0; c < cols; ++c) dst.row(i)[c] = static_cast<acc_t<T>>(src.data[i * src.rs + c * src.cs]);
  for (int64_t i = 0; i < inner; ++i) std::fill(dst.row(i) + cols, dst.row(i + 1), acc_t<T>(0));
}

template <typename A, int V>
struct Tile {
  Vectorized<A> v[kTileRows][V];
};

// t.v[r][j] = sum over i in [i0, i1) of a(r, i) * b.row(i)[c0 + j * width] for r < nrows, j < V; rows
// r >= nrows repeat row nrows - 1 (read, never stored). Small arguments by value: the loop keeps them in
// registers.
template <int V, typename A>
inline Tile<A, V> tile_product(Strided<const A> a, int64_t nrows, Rows<const A> b, int64_t c0, int64_t i0, int64_t i1) {
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  const A* row[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) row[r] = a.data + std::min(r, nrows - 1) * a.rs;
  const int64_t si = a.cs;
  // Accumulated in locals and copied out once: kept in registers (accumulating into the returned
  // object directly makes GCC store it to memory on every iteration).
  Vec acc[kTileRows][V];
  for (auto& rr : acc)
    for (auto& v : rr) v = Vec(0);
  for (int64_t i = i0; i < i1; ++i) {
    Vec w[V];
    for (int j = 0; j < V; ++j) w[j] = Vec::loadu(b.row(i) + c0 + j * kW);
    for (int64_t r = 0; r < kTileRows; ++r) {
      const Vec av(row[r][i * si]);
      for (int j = 0; j < V; ++j) acc[r][j] = at::vec::fmadd(av, w[j], acc[r][j]);
    }
  }
  Tile<A, V> t;
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int j = 0; j < V; ++j) t.v[r][j] = acc[r][j];
  return t;
}

// Whether any of the first `rows` rows of tile t holds a value that is not finite: v - v is NaN exactly
// there, and their sum then too; one vector compare per tile.
template <typename A, int V>
inline bool any_nonfinite(const Tile<A, V>& t, int64_t rows) {
  Vectorized<A> d(0);
  for (int64_t i = 0; i < rows; ++i)
    for (int j = 0; j < V; ++j) d = d + (t.v[i][j] - t.v[i][j]);
  return d.zero_mask() != (1 << Vectorized<A>::size()) - 1;
}

// dst[r * ld + c] += tile t's value (r, c) for its first `rows` rows (V vectors each): a dW partial.
template <typename A, int V>
inline void add_tile(const Tile<A, V>& t, int64_t rows, A* dst, int64_t ld) {
  constexpr int64_t kW = Vectorized<A>::size();
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < V; ++j) {
      A* d = dst + r * ld + j * kW;
      (Vectorized<A>::loadu(d) + t.v[r][j]).store(d);
    }
}

// dst[c] = v[c] for the first n values of a tile row of V vectors.
template <int V, typename T, typename A>
inline void store_tile_row(const Vectorized<A>* v, int64_t n, T* dst) {
  constexpr int64_t kW = Vectorized<A>::size();
  if constexpr (std::is_same_v<T, A>) {
    if (n == V * kW) {
      for (int j = 0; j < V; ++j) v[j].store(dst + j * kW);
      return;
    }
  }
  A tmp[V * kW];
  for (int j = 0; j < V; ++j) v[j].store(tmp + j * kW);
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(tmp[c]);
}

// The forward's operands: y (M, N) contiguous = act(x @ W + bias), the packed weight (small weights: W as
// [K, Np]; narrow outputs: W^T as [N, K]), the bias in acc_t (or null); narrow outputs read x's rows as
// acc_t directly when x_direct.
template <typename T>
struct ForwardTask {
  Strided<const T> x;
  bool x_direct;
  const acc_t<T>* wp;
  const acc_t<T>* bias;
  T* y;
  int64_t K, N;
  Activation act;
};

// act(x . w + bias) for one row of x and a column w of W (K values, w's with stride ws; bias: one value
// or null), recomputed where the kernels' float result is not finite: dot_tile's lanes may overflow to
// +inf and -inf where the exact sum is finite or of one sign (inf + -inf = NaN), a sequential sum
// (tile_product) to ±inf where the exact one is finite or of the other sign. float (float32, bfloat16 and float16 inputs):
// products of finite floats never overflow a double, so they are summed in double and rounded once;
// double: a sequential fused sum, which stays finite or one infinity while the inputs are finite. Either
// way NaN or inf appear as a sequential sum gives them: from NaN or inf inputs, or a result beyond the dtype.
template <typename A>
A dot_recomputed(const A* x, const A* w, int64_t ws, int64_t K, const A* bias, Activation act) {
  double s = 0.0;
  if constexpr (std::is_same_v<A, double>) {
    for (int64_t k = 0; k < K; ++k) s = std::fma(x[k], w[k * ws], s);
  } else {
    for (int64_t k = 0; k < K; ++k) s += static_cast<double>(x[k]) * static_cast<double>(w[k * ws]);
  }
  if (bias != nullptr) s += static_cast<double>(*bias);
  return static_cast<A>(activate(act, s));
}

// Forward rows [r0, r1).
template <typename T>
void forward_rows(const ForwardTask<T>& f, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  constexpr int64_t kW = Vectorized<A>::size();
  const int64_t K = f.K, N = f.N;
  const Rows<const A> w{f.wp, small_padded_cols<T>(N)};
  A xs[kTileRows * kSmallK];
  for (int64_t q0 = r0; q0 < r1; q0 += kTileRows) {
    const int64_t nq = std::min(kTileRows, r1 - q0);
    pack_panel(f.x.from(q0), nq, K, Rows<A>{xs, K});
    for_col_tiles<A>(N, [&](int64_t c0, auto vecs) {
      constexpr int V = decltype(vecs)::value;
      Tile<A, V> t = tile_product<V>(Strided<const A>{xs, K, 1}, nq, w, c0, 0, K);
      // A sum that may have overflowed on the way (an activation may hide a -inf): its raw value kept,
      // recomputed once its row is stored.
      const bool overflow = any_nonfinite(t, nq);
      A raw[kTileRows][V * kW];
      const int64_t nc = std::min<int64_t>(V * kW, N - c0);
      for (int64_t i = 0; i < nq; ++i) {
        if (overflow)
          for (int j = 0; j < V; ++j) t.v[i][j].store(raw[i] + j * kW);
        for (int j = 0; j < V; ++j)
          t.v[i][j] = bias_act(t.v[i][j], f.bias != nullptr ? f.bias + c0 + j * kW : nullptr, f.act);
        T* yr = f.y + (q0 + i) * N + c0;
        store_tile_row<V>(t.v[i], nc, yr);
        if (!overflow) continue;
        for (int64_t c = 0; c < nc; ++c)
          if (!std::isfinite(raw[i][c]))
            yr[c] = static_cast<T>(dot_recomputed(xs + i * K, w.data + c0 + c, w.ld, K,
                                                  f.bias != nullptr ? f.bias + c0 + c : nullptr, f.act));
      }
    });
  }
}

// out[r][c] = sum over k < K of x[r][k] * w[c * ldw + k] for r < R, c < C (C <= kDotCols), vectorized
// along k; each lane sum reduced once at the end (the order depends on K alone).
template <int R, int C, typename A>
inline void dot_tile(const A* const (&xr)[R], const A* w, int64_t ldw, int64_t K, A (&out)[R][kDotCols]) {
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  const A* x[R];
  for (int r = 0; r < R; ++r) x[r] = xr[r];
  Vec acc[R][C];
  for (auto& rr : acc)
    for (auto& v : rr) v = Vec(0);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Vec::loadu(w + c * ldw + k);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  if (k < K) {  // the tail, zero-filled to a whole vector
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = Vec::loadu(w + c * ldw + k, K - k);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x[r] + k, K - k);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, acc[r][c]);
}

// Narrow forward rows [r0, r1); xs: kDotRows * K acc_t values of scratch (x converted a tile of rows at a
// time unless x_direct).
template <typename T>
void narrow_rows(const ForwardTask<T>& f, acc_t<T>* xs, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const int64_t K = f.K, N = f.N;
  for (int64_t q0 = r0; q0 < r1; q0 += kDotRows) {
    const int64_t nq = std::min<int64_t>(kDotRows, r1 - q0);
    if (!f.x_direct) pack_panel(f.x.from(q0), nq, K, Rows<A>{xs, K});
    const A* xr[kDotRows];  // rows past nq repeat the last one (computed, never stored)
    for (int64_t r = 0; r < kDotRows; ++r) {
      const int64_t q = std::min(r, nq - 1);
      xr[r] = f.x_direct ? reinterpret_cast<const A*>(f.x.data + (q0 + q) * f.x.rs) : xs + q * K;
    }
    for (int64_t n0 = 0; n0 < N; n0 += kDotCols) {
      const int64_t nc = std::min<int64_t>(kDotCols, N - n0);
      A s[kDotRows][kDotCols];
      if (nc == kDotCols) dot_tile<kDotRows, kDotCols>(xr, f.wp + n0 * K, K, K, s);
      else dot_tile<kDotRows, 1>(xr, f.wp + n0 * K, K, K, s);
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t c = 0; c < nc; ++c) {
          A v = s[r][c] + (f.bias != nullptr ? f.bias[n0 + c] : A(0));
          if (!std::isfinite(v))
            v = dot_recomputed(xr[r], f.wp + (n0 + c) * K, 1, K, f.bias != nullptr ? f.bias + n0 + c : nullptr,
                               f.act);
          else v = activate(f.act, v);
          f.y[(q0 + r) * N + n0 + c] = static_cast<T>(v);
        }
    }
  }
}

// The backward's operands, shared by every block: the masked-gradient source, x (read as acc_t directly
// when x_direct, else converted per chunk), W^T packed as [N, Kp] (null: no dX), dx (M, K) contiguous
// (null: none), the bias-gradient partial sums (null: none); narrow: dW computed transposed.
template <typename T>
struct SmallBackward {
  MaskedGrad<T> src;
  Strided<const T> x;
  bool x_direct;
  const acc_t<T>* wt;
  T* dx;
  double* partial;
  int64_t K, N;
  bool narrow;
};

// One task's chunk buffers: the chunk's masked gradient (kChunkRows rows of Np), x's chunk in acc_t
// (kChunkRows rows of Kp).
template <typename A>
struct ChunkBuffers {
  A* gp;
  A* xbuf;
};

// The narrow block's dW^T ([N, Kp] acc_t at dwp) += g'_chunk^T X_chunk for the chunk of `rows` rows from
// row c0 (g' in gp): tile rows are g''s columns n0..n0+3, tile columns x's. x's rows are read directly
// when they can be, the leading tiles that lie wholly within its K columns; the rest (or all of x, when it
// needs converting) is copied into buf.xbuf, zero padded to whole vectors.
template <typename T>
void narrow_dw_chunk(const SmallBackward<T>& p, const ChunkBuffers<acc_t<T>>& buf, Rows<const acc_t<T>> gp,
                     acc_t<T>* dwp, int64_t c0, int64_t rows) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  const int64_t K = p.K, N = p.N, ldk = small_padded_cols<T>(K);
  int64_t direct_cols = 0;  // columns read from x itself: where the tiles within x's row end
  if (p.x_direct)
    for_col_tiles<A>(ldk, [&](int64_t k0, auto vecs) {
      if (k0 == direct_cols && k0 + decltype(vecs)::value * kW <= K) direct_cols = k0 + decltype(vecs)::value * kW;
    });
  const int64_t ldb = ldk - direct_cols;  // the copy's row length
  pack_panel(p.x.from(c0, direct_cols), rows, K - direct_cols, Rows<A>{buf.xbuf, ldb});
  const Rows<const A> direct =  // x's own rows (only when x_direct: x is then acc_t with unit column stride)
      p.x_direct ? Rows<const A>{reinterpret_cast<const A*>(p.x.data) + c0 * p.x.rs, p.x.rs} : Rows<const A>{};
  const Rows<const A> copied{buf.xbuf, ldb};
  for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
    const int64_t nn = std::min(kTileRows, N - n0);
    for_col_tiles<A>(ldk, [&](int64_t k0, auto vecs) {
      constexpr int V = decltype(vecs)::value;
      const bool from_x = k0 < direct_cols;
      add_tile(tile_product<V>(Strided<const A>{gp.data + n0, 1, gp.ld}, nn, from_x ? direct : copied,
                               from_x ? k0 : k0 - direct_cols, 0, rows),
               nn, dwp + n0 * ldk + k0, ldk);
    });
  }
}

// The size of a block's dW partial: [K, Np], or [N, Kp] for narrow outputs (dW^T), acc_t.
template <typename T>
int64_t dw_part_size(int64_t K, int64_t N, bool narrow) {
  return narrow ? N * small_padded_cols<T>(K) : K * small_padded_cols<T>(N);
}

// Rows [r0, r1) of the backward (r0 a multiple of kChunkRows), a 64-row chunk at a time, adding X^T g' to
// the block's dW partial dwp (dw_part_size; null: no dW).
template <typename T>
void backward_block(const SmallBackward<T>& p, const ChunkBuffers<acc_t<T>>& buf, acc_t<T>* dwp, int64_t r0,
                    int64_t r1) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  const int64_t K = p.K, N = p.N;
  const int64_t ldp = small_padded_cols<T>(N), ldk = small_padded_cols<T>(K);
  const Rows<A> gp{buf.gp, ldp};
  const ChunkSums sums{p.partial, N};
  if (dwp != nullptr) std::fill(dwp, dwp + dw_part_size<T>(K, N, p.narrow), A(0));
  for (int64_t c0 = r0; c0 < r1; c0 += kChunkRows) {
    const int64_t rows = std::min(r1, c0 + kChunkRows) - c0;
    mask_rows(p.src, c0, rows, MaskSinks<T>{{}, gp, sums.begin(c0 / kChunkRows)});
    if (dwp != nullptr && !p.narrow)  // g' is dW's B panel: its padding columns are read
      for (int64_t i = 0; i < rows; ++i) std::fill(gp.row(i) + N, gp.row(i + 1), A(0));
    if (p.dx != nullptr) {
      for (int64_t q = 0; q < rows; q += kTileRows) {
        const int64_t nq = std::min(kTileRows, rows - q);
        for_col_tiles<A>(K, [&](int64_t kb, auto vecs) {
          constexpr int V = decltype(vecs)::value;
          const Tile<A, V> t =
              tile_product<V>(Strided<const A>{gp.row(q), ldp, 1}, nq, Rows<const A>{p.wt, ldk}, kb, 0, N);
          const bool overflow = any_nonfinite(t, nq);
          const int64_t nk = std::min<int64_t>(V * kW, K - kb);
          for (int64_t i = 0; i < nq; ++i) {
            T* dxr = p.dx + (c0 + q + i) * K + kb;
            store_tile_row<V>(t.v[i], nk, dxr);
            if (!overflow) continue;
            for (int64_t c = 0; c < nk; ++c)  // a sum that overflowed on the way: recomputed in double
              if (!std::isfinite(static_cast<A>(dxr[c])))
                dxr[c] = static_cast<T>(dot_recomputed(gp.row(q + i), p.wt + kb + c, ldk, N,
                                                       static_cast<const A*>(nullptr), Activation::kNone));
          }
        });
      }
    }
    if (dwp == nullptr) continue;
    if (p.narrow) {
      narrow_dw_chunk(p, buf, Rows<const A>{gp.data, ldp}, dwp, c0, rows);
      continue;
    }
    Rows<const A> xa;  // the chunk of x as acc_t rows
    if (p.x_direct) {
      xa = {reinterpret_cast<const A*>(p.x.data) + c0 * p.x.rs, p.x.rs};
    } else {
      pack_panel(p.x.from(c0), rows, K, Rows<A>{buf.xbuf, K});
      xa = {buf.xbuf, K};
    }
    // The block's dW += X_chunk^T g'_chunk: rows of the tile are x's columns k0..k0+3.
    for (int64_t k0 = 0; k0 < K; k0 += kTileRows) {
      const int64_t nk = std::min(kTileRows, K - k0);
      for_col_tiles<A>(ldp, [&](int64_t n0, auto vecs) {
        constexpr int V = decltype(vecs)::value;
        add_tile(tile_product<V>(Strided<const A>{xa.data + k0, 1, xa.ld}, nk, Rows<const A>{gp.data, ldp}, n0, 0, rows),
                 nk, dwp + k0 * ldp + n0, ldp);
      });
    }
  }
}

// The blocks' dW partials: block b's row k at data[b * stride + k * ld], rows padded to ld (whole vectors).
template <typename A>
struct DwPartials {
  A* data;
  int64_t stride, blocks, ld;
};

// Rows [k0, k1) of the dW partials ([rows, N], or dW^T for narrow outputs, dst transposed to match): added
// in block order in acc_t into block 0's, then stored to dst.
template <typename T>
void finish_dw_rows(const DwPartials<acc_t<T>>& parts, int64_t k0, int64_t k1, int64_t N, Strided<T> dst) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t kW = Vec::size();
  for (int64_t k = k0; k < k1 && parts.blocks > 1; ++k) {
    A* row = parts.data + k * parts.ld;
    for (int64_t n0 = 0; n0 < parts.ld; n0 += kW) {
      Vec acc = Vec::loadu(row + n0);
      for (int64_t b = 1; b < parts.blocks; ++b) acc = acc + Vec::loadu(row + b * parts.stride + n0);
      acc.store(row + n0);
    }
  }
  copy_block(Rows<const A>{parts.data + k0 * parts.ld, parts.ld}, k1 - k0, N,
             Strided<T>{dst.data + k0 * dst.rs, dst.rs, dst.cs});
}

// Rows per dW block: a whole number of chunks (at least kMinDwBlockRows), at most kDwBlocks blocks. It
// depends on M alone, so the order of dW's additions (rows within a block, then blocks in order) does too.
constexpr int64_t kDwBlocks = 16;
constexpr int64_t kMinDwBlockRows = 2 * kChunkRows;
int64_t dw_block_rows(int64_t M) {
  const int64_t per_block = (M + kDwBlocks - 1) / kDwBlocks;
  return std::max<int64_t>(kMinDwBlockRows, (per_block + kChunkRows - 1) / kChunkRows * kChunkRows);
}

// dW's entries that are not finite, recomputed in double from x and the masked gradient g' (as the main pass
// computes it, in acc_t: NaN exactly where dx's and db's are): the chunk, block and partial sums (each
// sequential in acc_t) may reach +inf and -inf where the exact sum is finite or of one sign, and
// inf + -inf = NaN. As in dot_recomputed, float products are summed in double (double: a sequential fused
// sum), so NaN stays only where an input or gradient is NaN or inf.
template <typename T>
void recompute_nonfinite_dw(const MaskedGrad<T>& src, Strided<const T> x, int64_t M, int64_t K, Strided<T> dw) {
  const int64_t N = src.N;
  at::parallel_for(0, K, std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, N)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t n = 0; n < N; ++n) {
        T& d = dw.data[k * dw.rs + n * dw.cs];
        if (std::isfinite(static_cast<double>(d))) continue;
        double s = 0.0;
        for (int64_t m = 0; m < M; ++m) {
          // g' as the main pass has it (in acc_t: where act' overflows there, it is NaN here too).
          acc_t<T> g = static_cast<acc_t<T>>(src.g.row(m)[n]);
          if (src.saved) g = activation_grad(src.act, g, static_cast<acc_t<T>>(src.saved.row(m)[n]));
          const double gv = static_cast<double>(g);
          const double xv = static_cast<double>(x.data[m * x.rs + k * x.cs]);
          if constexpr (std::is_same_v<T, double>) s = std::fma(xv, gv, s);
          else s += xv * gv;
        }
        d = static_cast<T>(s);
      }
  });
}

}  // namespace

bool small_weight(int64_t K, int64_t N) { return K > 0 && N > 0 && K <= kSmallK && K * N <= kSmallWeight; }

bool narrow_weight(int64_t K, int64_t N) {
  return N > 0 && N <= kNarrowMaxCols && K >= kNarrowMinK && K <= kNarrowMaxK;
}

template <typename T>
int64_t small_padded_cols(int64_t cols) {
  constexpr int64_t kW = Vectorized<acc_t<T>>::size();
  return (cols + kW - 1) / kW * kW;
}

template <typename T>
void small_forward(const LinearForward& args, const acc_t<T>* bias, at::Tensor& out) {
  const int64_t K = args.K, N = args.N;
  const ForwardTask<T> f{strided_of<T>(args.x2), false, nullptr, bias, out.mutable_data_ptr<T>(), K, N, args.act};
  const Strided<const T> w = strided_of<T>(args.weight);
  const int64_t grain = std::max<int64_t>(kTileRows, kTaskFlops / (2 * K * N));
  at::parallel_for(0, args.M, grain, [&](int64_t begin, int64_t end) {
    const at::Tensor wp = acc_buffer<T>(K * small_padded_cols<T>(N));  // W as [K, Np]
    ForwardTask<T> task = f;
    task.wp = wp.template mutable_data_ptr<acc_t<T>>();
    pack_panel(w, K, N, Rows<acc_t<T>>{wp.template mutable_data_ptr<acc_t<T>>(), small_padded_cols<T>(N)});
    forward_rows(task, begin, end);
  });
}

template <typename T>
void narrow_forward(const LinearForward& args, const acc_t<T>* bias, at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t K = args.K, N = args.N;
  const at::Tensor& x2 = args.x2;
  const ForwardTask<T> f{strided_of<T>(x2), std::is_same_v<T, A> && x2.stride(1) == 1, nullptr, bias,
                           out.mutable_data_ptr<T>(), K, N, args.act};
  const Strided<const T> w = strided_of<T>(args.weight);
  const int64_t grain = std::max<int64_t>(kDotRows, kTaskFlops / (2 * K * N));
  at::parallel_for(0, args.M, grain, [&](int64_t begin, int64_t end) {
    // W^T packed as [N, K], then the scratch rows of x.
    const at::Tensor buf = acc_buffer<T>(N * K + (f.x_direct ? 0 : kDotRows * K));
    A* wt = buf.template mutable_data_ptr<A>();
    pack_panel(w.t(), N, K, Rows<A>{wt, K});
    ForwardTask<T> task = f;
    task.wp = wt;
    narrow_rows(task, wt + N * K, begin, end);
  });
}

template <typename T>
void small_backward(const LinearBackward& args, LinearGrads& grads, double* partial) {
  using A = acc_t<T>;
  const int64_t M = args.M, N = args.N, K = args.K;
  const int64_t ldp = small_padded_cols<T>(N), ldk = small_padded_cols<T>(K);
  const at::Tensor& x2 = args.x2;
  const bool want_dx = grads.dx.defined(), want_dw = grads.dw.defined();
  const int64_t block_rows = dw_block_rows(M);
  const int64_t blocks = (M + block_rows - 1) / block_rows;
  const bool narrow = narrow_weight(K, N);
  const int64_t part_size = dw_part_size<T>(K, N, narrow);
  const at::Tensor dw_parts = want_dw ? acc_buffer<T>(blocks * part_size) : at::Tensor();
  const DwPartials<A> parts{want_dw ? dw_parts.template mutable_data_ptr<A>() : nullptr, part_size, blocks,
                            narrow ? ldk : ldp};
  const SmallBackward<T> p{{rows_of<T>(args.g2), rows_of<T>(args.saved), N, args.act}, strided_of<T>(x2),
                           std::is_same_v<T, A> && x2.stride(1) == 1, nullptr,
                           want_dx ? grads.dx.mutable_data_ptr<T>() : nullptr, partial, K, N, narrow};
  const int64_t ldx = narrow ? ldk : K;  // the chunk's copy of x: its rows
  const Strided<const T> w = strided_of<T>(args.weight);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // The chunk buffers, then W^T packed as [N, Kp] when dX is wanted.
    const at::Tensor buf = acc_buffer<T>(kChunkRows * (ldp + ldx) + (want_dx ? N * ldk : 0));
    A* base = buf.template mutable_data_ptr<A>();
    const ChunkBuffers<A> chunk{base, base + kChunkRows * ldp};
    SmallBackward<T> task = p;
    if (want_dx) {
      A* wt = base + kChunkRows * (ldp + ldx);
      pack_panel(w.t(), N, K, Rows<A>{wt, ldk});  // W^T
      task.wt = wt;
    }
    for (int64_t blk = begin; blk < end; ++blk)
      backward_block(task, chunk, want_dw ? parts.data + blk * parts.stride : nullptr, blk * block_rows,
                     std::min(M, (blk + 1) * block_rows));
  });
  if (!want_dw) return;
  if (blocks == 0) {  // no rows: an empty sum
    grads.dw.zero_();
    return;
  }
  // dW = the blocks' partials added in block order (in acc_t: at most kDwBlocks terms); narrow outputs'
  // are dW^T, stored through dW's transposed view.
  const Strided<T> dw = mutable_strided_of<T>(grads.dw);
  const Strided<T> dst = narrow ? dw.t() : dw;
  const int64_t rows = narrow ? N : K;
  at::parallel_for(0, rows, std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, blocks * parts.ld)),
                   [&](int64_t k0, int64_t k1) { finish_dw_rows(parts, k0, k1, narrow ? K : N, dst); });
  recompute_nonfinite_dw(p.src, p.x, M, K, dw);
}

#define CUSTOMLAYERS_INSTANTIATE_SMALL(T)                                                        \
  template int64_t small_padded_cols<T>(int64_t);                                              \
  template void small_forward<T>(const LinearForward&, const acc_t<T>*, at::Tensor&);          \
  template void narrow_forward<T>(const LinearForward&, const acc_t<T>*, at::Tensor&);         \
  template void small_backward<T>(const LinearBackward&, LinearGrads&, double*);
CUSTOMLAYERS_FOR_FLOATING_TYPES(CUSTOMLAYERS_INSTANTIATE_SMALL)

}  // namespace customlayers::cpu
