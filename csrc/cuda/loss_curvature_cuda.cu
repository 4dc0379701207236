// CUDA kernels of the loss-curvature ops. The per-entry math lives in
// common/curvature_math.h, shared with the CPU kernels; this file only maps
// work onto threads: one warp per row (or per tile of a row's factor), so that
// a 10-class row does not leave a 256-thread block idle. Every launch goes on
// the current stream and is checked.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/curvature_math.h"
#include "../common/kernel_checks.h"

namespace torch_secorder {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

// Warp-wide reduction (max or sum); every lane gets the result.
template <typename acc_t, bool kMax>
__device__ __forceinline__ acc_t warp_reduce(acc_t value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_xor_sync(kFullMask, value, offset);
    value = kMax ? max(value, other) : value + other;
  }
  return value;
}

// Row maximum and 1 / sum(exp(x - max)) of one row (stride `column_stride`), computed by one warp:
// a row of 10 classes keeps 10 of 32 lanes busy instead of 10 of 256 threads.
template <typename scalar_t, typename acc_t>
__device__ void warp_softmax_stats(const scalar_t* row, int64_t classes, int64_t column_stride, int lane,
                                   acc_t& row_max, acc_t& inv_sum) {
  acc_t local_max = -INFINITY;
  for (int64_t c = lane; c < classes; c += kWarp) local_max = max(local_max, static_cast<acc_t>(row[c * column_stride]));
  row_max = warp_reduce<acc_t, true>(local_max);
  acc_t local_sum = 0;
  for (int64_t c = lane; c < classes; c += kWarp) local_sum += exp(static_cast<acc_t>(row[c * column_stride]) - row_max);
  inv_sum = acc_t(1) / warp_reduce<acc_t, false>(local_sum);
}

// Logits are read through their strides: no contiguous() copy of a transposed or sliced input.
struct RowLayout {
  int64_t row_stride, column_stride;
};

// One warp per sample.
template <typename scalar_t, typename acc_t>
__global__ void softmax_hessian_diag_kernel(const scalar_t* logits, RowLayout layout, const scalar_t* scale,
                                            int64_t scale_stride, scalar_t* out, int64_t rows, int64_t classes) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= rows) return;  // whole warps leave together: the shuffles below see full warps
  const scalar_t* row = logits + n * layout.row_stride;
  acc_t row_max, inv_sum;
  warp_softmax_stats(row, classes, layout.column_stride, lane, row_max, inv_sum);
  const acc_t sn = scale[n * scale_stride];
  for (int64_t c = lane; c < classes; c += kWarp) {
    const acc_t p = softmax_probability(static_cast<acc_t>(row[c * layout.column_stride]), row_max, inv_sum);
    out[n * classes + c] = softmax_hessian_diag_entry(p, sn);
  }
}

// One warp per (sample, tile of a factor): the warp computes its sample's softmax statistics (C reads, from
// cache after the first tile) and writes `tile_entries` consecutive entries of the C x C square root or, with
// kHouseholder, of the (C - 1) x C columns, whose top class is the first that reaches the row maximum (the
// CPU kernel's choice), found by a warp-wide minimum over class indices.
template <typename scalar_t, typename acc_t, bool kHouseholder>
__global__ void softmax_factor_kernel(const scalar_t* logits, RowLayout layout, const scalar_t* scale,
                                      int64_t scale_stride, scalar_t* out, int64_t rows, int64_t classes,
                                      int64_t tiles, int64_t tile_entries) {
  const int64_t item = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= rows * tiles) return;
  const int64_t n = item / tiles, tile = item % tiles;
  const scalar_t* row = logits + n * layout.row_stride;
  acc_t row_max, inv_sum;
  warp_softmax_stats(row, classes, layout.column_stride, lane, row_max, inv_sum);
  const auto probability = [&](int64_t c) {
    return softmax_probability(static_cast<acc_t>(row[c * layout.column_stride]), row_max, inv_sum);
  };
  const acc_t root_scale = sqrt(static_cast<acc_t>(scale[n * scale_stride]));
  int64_t top = 0;
  if constexpr (kHouseholder) {
    long long first = classes;
    for (int64_t c = lane; c < classes && first == classes; c += kWarp)
      if (static_cast<acc_t>(row[c * layout.column_stride]) == row_max) first = c;
    const long long found = -warp_reduce<long long, true>(-first);
    top = found < classes ? found : 0;  // NaN logits match nothing: their columns are NaN anyway
  }
  const acc_t q_top = kHouseholder ? sqrt(probability(top)) : acc_t(0);
  const int64_t entries = (kHouseholder ? classes - 1 : classes) * classes;
  const int64_t stop = min(entries, (tile + 1) * tile_entries);
  scalar_t* out_sample = out + n * entries;
  for (int64_t e = tile * tile_entries + lane; e < stop; e += kWarp) {
    const int64_t r = e / classes, c = e % classes;  // row of the factor, class
    if constexpr (kHouseholder) {
      const int64_t j = r + (r >= top ? 1 : 0);
      out_sample[e] = softmax_hessian_column_entry(sqrt(probability(c)), sqrt(probability(j)), q_top, c == top,
                                                   c == j, root_scale);
    } else {
      out_sample[e] = softmax_hessian_sqrt_entry(probability(r), probability(c), r == c, root_scale);
    }
  }
}

// One warp per sample: the lanes store the row's probabilities in its first column, lane 0 walks their
// cumulative sum to each draw's class (inverse_cdf_class, the CPU kernel's walk) and the lanes write the
// columns, the last draw first, so that the first column still holds the probabilities until it is written.
template <typename scalar_t, typename acc_t>
__global__ void softmax_sampled_columns_kernel(const scalar_t* logits, RowLayout layout, const scalar_t* scale,
                                               int64_t scale_stride, const scalar_t* uniforms, RowLayout uniform_layout,
                                               scalar_t* out, int64_t rows, int64_t classes, int64_t draws) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= rows) return;
  const scalar_t* row = logits + n * layout.row_stride;
  acc_t row_max, inv_sum;
  warp_softmax_stats(row, classes, layout.column_stride, lane, row_max, inv_sum);
  scalar_t* probs = out + n * draws * classes;  // the first column, for now
  for (int64_t c = lane; c < classes; c += kWarp)
    probs[c] = softmax_probability(static_cast<acc_t>(row[c * layout.column_stride]), row_max, inv_sum);
  __syncwarp();
  const acc_t total = lane == 0 ? probability_total<scalar_t, acc_t>(probs, classes) : acc_t(0);
  const acc_t root = sqrt(static_cast<acc_t>(scale[n * scale_stride]) / static_cast<acc_t>(draws));
  for (int64_t m = draws - 1; m >= 0; --m) {
    long long drawn = 0;
    if (lane == 0) {
      const acc_t u = uniforms[n * uniform_layout.row_stride + m * uniform_layout.column_stride];
      drawn = inverse_cdf_class(probs, classes, total, u);
    }
    drawn = __shfl_sync(kFullMask, drawn, 0);
    scalar_t* column = probs + m * classes;
    for (int64_t c = lane; c < classes; c += kWarp)  // each lane reads and writes only its own classes
      column[c] = sampled_column_entry(static_cast<acc_t>(probs[c]), c == drawn, root);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sigmoid_hessian_diag_kernel(const scalar_t* logits, const scalar_t* scale, scalar_t* out,
                                            int64_t numel) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < numel;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[k] = sigmoid_hessian_entry(static_cast<acc_t>(logits[k]), static_cast<acc_t>(scale[k]));
  }
}

int64_t blocks_for_warps(int64_t warps) { return (warps + kWarpsPerBlock - 1) / kWarpsPerBlock; }

at::Tensor softmax_hessian_diag_cuda(const at::Tensor& logits, const at::Tensor& scale) {
  check_softmax_kernel_args("softmax_hessian_diag", logits, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), classes = logits.size(1);
  auto out = at::empty({rows, classes}, logits.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_hessian_diag_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    softmax_hessian_diag_kernel<scalar_t, acc_t><<<blocks_for_warps(rows), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), RowLayout{logits.stride(0), logits.stride(1)},
        scale.const_data_ptr<scalar_t>(), scale.stride(0), out.mutable_data_ptr<scalar_t>(), rows, classes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The two factor ops share their launch: one warp per (sample, tile of the (N, width, C) output).
at::Tensor softmax_factor_cuda(const char* op, const at::Tensor& logits, const at::Tensor& scale, bool householder) {
  check_softmax_kernel_args(op, logits, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), classes = logits.size(1);
  const int64_t width = householder ? std::max<int64_t>(classes - 1, 0) : classes;
  auto out = at::empty({rows, width, classes}, logits.options());
  if (out.numel() == 0) return out;
  // A tile writes at least 4 C entries, so re-reading the row for its statistics stays a small share.
  const int64_t tile_entries = std::max<int64_t>(8 * kWarp, (4 * classes + kWarp - 1) / kWarp * kWarp);
  const int64_t tiles = (width * classes + tile_entries - 1) / tile_entries;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_factor_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto kernel = householder ? softmax_factor_kernel<scalar_t, acc_t, true>
                                    : softmax_factor_kernel<scalar_t, acc_t, false>;
    kernel<<<blocks_for_warps(rows * tiles), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), RowLayout{logits.stride(0), logits.stride(1)},
        scale.const_data_ptr<scalar_t>(), scale.stride(0), out.mutable_data_ptr<scalar_t>(), rows, classes, tiles,
        tile_entries);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor softmax_hessian_sqrt_cuda(const at::Tensor& logits, const at::Tensor& scale) {
  return softmax_factor_cuda("softmax_hessian_sqrt", logits, scale, /*householder=*/false);
}

at::Tensor softmax_hessian_columns_cuda(const at::Tensor& logits, const at::Tensor& scale) {
  return softmax_factor_cuda("softmax_hessian_columns", logits, scale, /*householder=*/true);
}

at::Tensor softmax_sampled_columns_cuda(const at::Tensor& logits, const at::Tensor& scale, const at::Tensor& uniforms) {
  check_sampled_columns_args("softmax_sampled_columns", logits, scale, uniforms);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), classes = logits.size(1), draws = uniforms.size(1);
  auto out = at::empty({rows, draws, classes}, logits.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_sampled_columns_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    softmax_sampled_columns_kernel<scalar_t, acc_t><<<blocks_for_warps(rows), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), RowLayout{logits.stride(0), logits.stride(1)},
        scale.const_data_ptr<scalar_t>(), scale.stride(0), uniforms.const_data_ptr<scalar_t>(),
        RowLayout{uniforms.stride(0), uniforms.stride(1)}, out.mutable_data_ptr<scalar_t>(), rows, classes, draws);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sigmoid_hessian_diag_cuda(const at::Tensor& logits, const at::Tensor& scale) {
  check_elementwise_kernel_args("sigmoid_hessian_diag", logits, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  // elementwise over any shape: a copy only where the input is not dense already
  const auto x = logits.contiguous();
  const auto s = scale.contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535 * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sigmoid_hessian_diag_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    sigmoid_hessian_diag_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_secorder, CUDA, m) {
  m.impl("softmax_hessian_diag", &softmax_hessian_diag_cuda);
  m.impl("softmax_hessian_sqrt", &softmax_hessian_sqrt_cuda);
  m.impl("softmax_hessian_columns", &softmax_hessian_columns_cuda);
  m.impl("softmax_sampled_columns", &softmax_sampled_columns_cuda);
  m.impl("sigmoid_hessian_diag", &sigmoid_hessian_diag_cuda);
}

}  // namespace torch_secorder
