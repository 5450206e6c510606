// The CPU linear_act kernels for small weights (in_features <= 64 and in * out <= 64K: the layers of
// small MLPs such as the book's 20 -> 256) and narrow outputs (out_features <= 16: output layers such as
// the book's 256 -> 10). BLAS's GEMMs with a short inner dimension or few output columns run far below
// peak there and per-call costs dominate, so all three GEMMs run on hand-written register-blocked
// kernels instead (linear_act_small.cpp).
#pragma once

#include "common/cpu_vec.h"
#include "common/linear_act.h"

namespace customlayers::cpu {

// Whether a (K, N) weight takes the small-weight kernels.
bool small_weight(int64_t K, int64_t N);

// Whether a (K, N) weight takes the narrow-output kernels (N <= 16 columns, 32 <= K <= 8192: output layers
// such as 256 -> 10), checked before small_weight.
bool narrow_weight(int64_t K, int64_t N);

// The padded row length of the small kernels' acc_t panels for `cols` columns (whole vectors).
template <typename T>
int64_t small_padded_cols(int64_t cols);

// out = act(x2 @ weight + bias); `bias` in acc_t padded with zeros to small_padded_cols<T>(N) (null: none).
template <typename T>
void small_forward(const LinearForward& args, const acc_t<T>* bias, at::Tensor& out);

// The same for narrow outputs (narrow_weight): dot products of rows of x and columns of W.
template <typename T>
void narrow_forward(const LinearForward& args, const acc_t<T>* bias, at::Tensor& out);

// The defined dx and dw of `grads` (db is not touched), and when `partial` is set the bias gradient's
// 64-row chunk column sums (partial[chunk * N ...]), in one parallel pass over fixed blocks of rows; for
// small or narrow weights.
template <typename T>
void small_backward(const LinearBackward& args, LinearGrads& grads, double* partial);

}  // namespace customlayers::cpu
