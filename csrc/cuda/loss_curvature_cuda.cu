// CUDA kernels of the loss-curvature ops. The per-entry math lives in
// common/curvature_math.h, shared with the CPU kernels; this file only maps
// work onto threads. Every launch goes on the current stream and is checked.
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
constexpr int64_t kMaxGridY = 65535;

// Block-wide reduction of one value per thread (max or sum); every thread gets the result.
template <typename acc_t, bool kMax>
__device__ acc_t block_reduce(acc_t value, acc_t* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const acc_t other = shared[threadIdx.x + stride];
      shared[threadIdx.x] = kMax ? max(shared[threadIdx.x], other) : shared[threadIdx.x] + other;
    }
    __syncthreads();
  }
  const acc_t result = shared[0];
  __syncthreads();
  return result;
}

// Row maximum and 1 / sum(exp(x - max)) of one row, computed by the whole block.
template <typename scalar_t, typename acc_t>
__device__ void block_softmax_stats(const scalar_t* row, int64_t classes, acc_t& row_max, acc_t& inv_sum) {
  __shared__ acc_t shared[kThreads];
  acc_t local_max = -INFINITY;
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) local_max = max(local_max, static_cast<acc_t>(row[c]));
  row_max = block_reduce<acc_t, true>(local_max, shared);
  acc_t local_sum = 0;
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) local_sum += exp(static_cast<acc_t>(row[c]) - row_max);
  inv_sum = acc_t(1) / block_reduce<acc_t, false>(local_sum, shared);
}

// One block per sample.
template <typename scalar_t, typename acc_t>
__global__ void softmax_hessian_diag_kernel(const scalar_t* logits, const scalar_t* scale, scalar_t* out,
                                            int64_t classes) {
  const int64_t n = blockIdx.x;
  const scalar_t* row = logits + n * classes;
  acc_t row_max, inv_sum;
  block_softmax_stats(row, classes, row_max, inv_sum);
  const acc_t sn = scale[n];
  for (int64_t c = threadIdx.x; c < classes; c += blockDim.x) {
    const acc_t p = softmax_probability(static_cast<acc_t>(row[c]), row_max, inv_sum);
    out[n * classes + c] = softmax_hessian_diag_entry(p, sn);
  }
}

// Blocks (sample, tile): each block recomputes its sample's softmax statistics
// (C reads) and then writes a strided share of the C x C factor.
template <typename scalar_t, typename acc_t>
__global__ void softmax_hessian_sqrt_kernel(const scalar_t* logits, const scalar_t* scale, scalar_t* out,
                                            int64_t classes) {
  const int64_t n = blockIdx.x;
  const scalar_t* row = logits + n * classes;
  acc_t row_max, inv_sum;
  block_softmax_stats(row, classes, row_max, inv_sum);
  const acc_t root_scale = sqrt(static_cast<acc_t>(scale[n]));
  const int64_t entries = classes * classes;
  scalar_t* out_sample = out + n * entries;
  for (int64_t e = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < entries;
       e += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const int64_t i = e / classes, j = e % classes;
    const acc_t p_i = softmax_probability(static_cast<acc_t>(row[i]), row_max, inv_sum);
    const acc_t p_j = softmax_probability(static_cast<acc_t>(row[j]), row_max, inv_sum);
    out_sample[e] = softmax_hessian_sqrt_entry(p_i, p_j, i == j, root_scale);
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

at::Tensor softmax_hessian_diag_cuda(const at::Tensor& logits, const at::Tensor& scale) {
  check_softmax_kernel_args("softmax_hessian_diag", logits, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  const auto s = scale.contiguous();
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const int64_t rows = x.size(0), classes = x.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_hessian_diag_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    softmax_hessian_diag_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), classes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor softmax_hessian_sqrt_cuda(const at::Tensor& logits, const at::Tensor& scale) {
  check_softmax_kernel_args("softmax_hessian_sqrt", logits, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto x = logits.contiguous();
  const auto s = scale.contiguous();
  const int64_t rows = x.size(0), classes = x.size(1);
  auto out = at::empty({rows, classes, classes}, x.options());
  if (out.numel() == 0) return out;
  const int64_t tiles = std::min<int64_t>(kMaxGridY, (classes * classes + kThreads - 1) / kThreads);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tiles));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_hessian_sqrt_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    softmax_hessian_sqrt_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), classes);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sigmoid_hessian_diag_cuda(const at::Tensor& logits, const at::Tensor& scale) {
  check_elementwise_kernel_args("sigmoid_hessian_diag", logits, scale);
  const c10::cuda::CUDAGuard guard(logits.device());
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
  m.impl("sigmoid_hessian_diag", &sigmoid_hessian_diag_cuda);
}

}  // namespace torch_secorder
