// Per-entry formulas of loss curvature, shared by the CPU and CUDA kernels so
// that the two backends cannot drift apart.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TS_HOST_DEVICE inline
#endif

namespace torch_secorder {

// Softmax probability of one logit, given the row maximum and 1 / sum(exp(x - max)).
template <typename acc_t>
TS_HOST_DEVICE acc_t softmax_probability(acc_t logit, acc_t row_max, acc_t inv_sum) {
  return std::exp(logit - row_max) * inv_sum;
}

// Diagonal of scale * (diag(p) - p p^T).
template <typename acc_t>
TS_HOST_DEVICE acc_t softmax_hessian_diag_entry(acc_t p, acc_t scale) {
  return scale * p * (acc_t(1) - p);
}

// Entry (i, j) of sqrt(scale) * (diag(sqrt p) - p sqrt(p)^T); S S^T equals
// scale * (diag(p) - p p^T) because the probabilities sum to one.
template <typename acc_t>
TS_HOST_DEVICE acc_t softmax_hessian_sqrt_entry(acc_t p_i, acc_t p_j, bool same_class, acc_t root_scale) {
  return root_scale * std::sqrt(p_j) * ((same_class ? acc_t(1) : acc_t(0)) - p_i);
}

// Entry (r, i) of the C - 1 columns whose outer products sum to scale * (diag(p) - p p^T). With q = sqrt(p),
// diag(p) - p p^T = diag(q) (I - q q^T) diag(q), and I - q q^T is the sum of u u^T over the columns u of the
// Householder reflection H = I - w w^T / (1 + q_k), w = q + e_k, other than column k (H maps q to -e_k; k, the
// most likely class, keeps 1 + q_k >= 1). Column r is H's column j = r + (r >= k), times q_i sqrt(scale).
template <typename acc_t>
TS_HOST_DEVICE acc_t softmax_hessian_column_entry(acc_t q_i, acc_t q_j, acc_t q_top, bool i_is_top, bool same_class,
                                                  acc_t root_scale) {
  const acc_t w_i = q_i + (i_is_top ? acc_t(1) : acc_t(0));  // w_j = q_j: column j is never the top class
  return ((same_class ? acc_t(1) : acc_t(0)) - w_i * q_j / (acc_t(1) + q_top)) * q_i * root_scale;
}

// Sum of a row's stored probabilities (about 1), accumulated in class order as inverse_cdf_class walks them,
// so that a uniform number below 1 always finds its class.
template <typename scalar_t, typename acc_t>
TS_HOST_DEVICE acc_t probability_total(const scalar_t* probs, int64_t classes) {
  acc_t total = 0;
  for (int64_t c = 0; c < classes; ++c) total += static_cast<acc_t>(probs[c]);
  return total;
}

// The class a uniform number u in [0, 1) draws from a row's stored probabilities by inverse CDF: the first class
// whose cumulative probability exceeds u * total. A class of probability 0 never adds to the sum, so it is never
// the first to exceed; the fallback (the last class of positive probability) is for rounding that cannot happen.
template <typename scalar_t, typename acc_t>
TS_HOST_DEVICE int64_t inverse_cdf_class(const scalar_t* probs, int64_t classes, acc_t total, acc_t u) {
  const acc_t threshold = u * total;
  acc_t cumulative = 0;
  int64_t last_positive = 0;
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t p = static_cast<acc_t>(probs[c]);
    cumulative += p;
    if (p > acc_t(0)) last_positive = c;
    if (cumulative > threshold) return c;
  }
  return last_positive;
}

// Entry c of a Monte-Carlo Fisher column root * (p - e_y) for the drawn class y.
template <typename acc_t>
TS_HOST_DEVICE acc_t sampled_column_entry(acc_t p, bool drawn, acc_t root) {
  return root * (p - (drawn ? acc_t(1) : acc_t(0)));
}

// scale * sigmoid(x) * (1 - sigmoid(x)), written as e / (1 + e)^2 with
// e = exp(-|x|) so that it neither overflows nor loses digits for large |x|.
template <typename acc_t>
TS_HOST_DEVICE acc_t sigmoid_hessian_entry(acc_t logit, acc_t scale) {
  const acc_t e = std::exp(-std::abs(logit));
  const acc_t denom = acc_t(1) + e;
  return scale * e / (denom * denom);
}

}  // namespace torch_secorder
