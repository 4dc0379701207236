// CPU kernels of the loss-curvature ops: rows in parallel (at::parallel_for,
// OpenMP), plain inner loops the compiler can vectorise.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/curvature_math.h"
#include "../common/kernel_checks.h"

namespace torch_secorder {
namespace {

// Writes the softmax probabilities of one row into probs: one exp per entry, kept for the normalisation.
template <typename scalar_t, typename acc_t>
void softmax_row(const scalar_t* row, int64_t classes, acc_t* probs) {
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < classes; ++c) row_max = std::max(row_max, static_cast<acc_t>(row[c]));
  acc_t sum = 0;
  for (int64_t c = 0; c < classes; ++c) {
    probs[c] = std::exp(static_cast<acc_t>(row[c]) - row_max);
    sum += probs[c];
  }
  const acc_t inv_sum = acc_t(1) / sum;
  for (int64_t c = 0; c < classes; ++c) probs[c] *= inv_sum;
}

at::Tensor softmax_hessian_diag_cpu(const at::Tensor& logits, const at::Tensor& scale) {
  check_softmax_kernel_args("softmax_hessian_diag", logits, scale);
  const auto x = logits.contiguous();
  const auto s = scale.contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = x.size(0), classes = x.size(1);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_hessian_diag_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / classes);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> probs(classes);
      for (int64_t n = begin; n < end; ++n) {
        softmax_row(xp + n * classes, classes, probs.data());
        const acc_t sn = sp[n];
        scalar_t* out_row = op + n * classes;
        for (int64_t c = 0; c < classes; ++c) out_row[c] = softmax_hessian_diag_entry(probs[c], sn);
      }
    });
  });
  return out;
}

at::Tensor softmax_hessian_sqrt_cpu(const at::Tensor& logits, const at::Tensor& scale) {
  check_softmax_kernel_args("softmax_hessian_sqrt", logits, scale);
  const auto x = logits.contiguous();
  const auto s = scale.contiguous();
  const int64_t rows = x.size(0), classes = x.size(1);
  auto out = at::empty({rows, classes, classes}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_hessian_sqrt_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // Parallel over (sample, row of S) so that a few samples with many classes
    // still use every thread; probabilities are recomputed once per sample and chunk.
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / classes);
    at::parallel_for(0, rows * classes, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> probs(classes);
      int64_t cached_sample = -1;
      acc_t root_scale = 0;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / classes, i = r % classes;
        if (n != cached_sample) {
          softmax_row(xp + n * classes, classes, probs.data());
          root_scale = std::sqrt(static_cast<acc_t>(sp[n]));
          cached_sample = n;
        }
        scalar_t* out_row = op + r * classes;
        const acc_t p_i = probs[i];
        for (int64_t j = 0; j < classes; ++j)
          out_row[j] = softmax_hessian_sqrt_entry(p_i, probs[j], i == j, root_scale);
      }
    });
  });
  return out;
}

at::Tensor softmax_hessian_columns_cpu(const at::Tensor& logits, const at::Tensor& scale) {
  check_softmax_kernel_args("softmax_hessian_columns", logits, scale);
  const auto x = logits.contiguous();
  const auto s = scale.contiguous();
  const int64_t rows = x.size(0), classes = x.size(1), width = std::max<int64_t>(classes - 1, 0);
  auto out = at::empty({rows, width, classes}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_hessian_columns_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (classes * classes));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> roots(classes);
      for (int64_t n = begin; n < end; ++n) {
        softmax_row(xp + n * classes, classes, roots.data());
        int64_t top = 0;
        for (int64_t c = 0; c < classes; ++c) {
          roots[c] = std::sqrt(roots[c]);
          if (roots[c] > roots[top]) top = c;
        }
        const acc_t root_scale = std::sqrt(static_cast<acc_t>(sp[n]));
        scalar_t* out_sample = op + n * width * classes;
        for (int64_t r = 0; r < width; ++r) {
          const int64_t j = r + (r >= top ? 1 : 0);
          for (int64_t i = 0; i < classes; ++i)
            out_sample[r * classes + i] =
                softmax_hessian_column_entry(roots[i], roots[j], roots[top], i == top, i == j, root_scale);
        }
      }
    });
  });
  return out;
}

at::Tensor softmax_sampled_columns_cpu(const at::Tensor& logits, const at::Tensor& scale, const at::Tensor& uniforms) {
  check_sampled_columns_args("softmax_sampled_columns", logits, scale, uniforms);
  const auto x = logits.contiguous();
  const auto s = scale.contiguous();
  const auto u = uniforms.contiguous();
  const int64_t rows = x.size(0), classes = x.size(1), draws = u.size(1);
  auto out = at::empty({rows, draws, classes}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_sampled_columns_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (classes * (draws + 2)));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> exact(classes);
      std::vector<scalar_t> probs(classes);  // stored as the CUDA kernel and the reference store them
      for (int64_t n = begin; n < end; ++n) {
        softmax_row(xp + n * classes, classes, exact.data());
        for (int64_t c = 0; c < classes; ++c) probs[c] = static_cast<scalar_t>(exact[c]);
        const acc_t total = probability_total<scalar_t, acc_t>(probs.data(), classes);
        const acc_t root = std::sqrt(static_cast<acc_t>(sp[n]) / static_cast<acc_t>(draws));
        for (int64_t m = 0; m < draws; ++m) {
          const int64_t drawn = inverse_cdf_class(probs.data(), classes, total, static_cast<acc_t>(up[n * draws + m]));
          scalar_t* column = op + (n * draws + m) * classes;
          for (int64_t c = 0; c < classes; ++c)
            column[c] = sampled_column_entry(static_cast<acc_t>(probs[c]), c == drawn, root);
        }
      }
    });
  });
  return out;
}

at::Tensor sigmoid_hessian_diag_cpu(const at::Tensor& logits, const at::Tensor& scale) {
  check_elementwise_kernel_args("sigmoid_hessian_diag", logits, scale);
  const auto x = logits.contiguous();
  const auto s = scale.contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sigmoid_hessian_diag_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        op[k] = sigmoid_hessian_entry(static_cast<acc_t>(xp[k]), static_cast<acc_t>(sp[k]));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_secorder, CPU, m) {
  m.impl("softmax_hessian_diag", &softmax_hessian_diag_cpu);
  m.impl("softmax_hessian_columns", &softmax_hessian_columns_cpu);
  m.impl("softmax_hessian_sqrt", &softmax_hessian_sqrt_cpu);
  m.impl("softmax_sampled_columns", &softmax_sampled_columns_cpu);
  m.impl("sigmoid_hessian_diag", &sigmoid_hessian_diag_cpu);
}

}  // namespace torch_secorder
