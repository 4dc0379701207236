// CUDA kernels of the Hessian-backprop contractions. Launches go on the current
// stream and are checked; float and double; factors and inputs are read through their
// strides. The weight-diagonal kernels accumulate with atomicAdd and say so to
// torch.use_deterministic_algorithms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/factor_checks.h"

namespace torch_secorder {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 16;

// One thread per (sample, feature): sum over the columns, reads coalesced along the features.
template <typename scalar_t>
__global__ void factor_diagonal_kernel(const scalar_t* factors, const scalar_t* signs, scalar_t* out, int64_t samples,
                                       int64_t columns, int64_t features, int64_t sample_stride,
                                       int64_t column_stride, int64_t feature_stride) {
  const int64_t total = samples * features;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = index / features, d = index % features;
    const scalar_t* base = factors + n * sample_stride + d * feature_stride;
    scalar_t sum = 0;
    for (int64_t v = 0; v < columns; ++v) {
      const scalar_t value = base[v * column_stride];
      sum += (signs ? signs[n * columns + v] : scalar_t(1)) * value * value;
    }
    out[index] = sum;
  }
}

// Strides of a 4-D factor tensor (N, V, O, P) and a 3-D input tensor (N, K, P): the kernels read any
// layout, so the largest tensor the engine holds is never copied just to be contiguous.
struct FactorStrides {
  int64_t sample, column, out, position;
};
struct InputStrides {
  int64_t sample, channel, position;
};

FactorStrides factor_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }
InputStrides input_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// out[o, k] += sum over the (n, v) pairs of block z of sign * (sum_p factors[n, v, o, p] inputs[n, k, p])^2.
// A 16 x 16 tile of (o, k) per block: each product is a small tiled matrix multiply through
// shared memory, squared in registers; partial sums of the blocks along z meet in atomicAdd.
template <typename scalar_t>
__global__ void affine_weight_diagonal_kernel(const scalar_t* factors, FactorStrides fs, const scalar_t* signs,
                                              const scalar_t* inputs, InputStrides is, scalar_t* out, int64_t samples,
                                              int64_t columns, int64_t outs, int64_t ins, int64_t positions) {
  __shared__ scalar_t factor_tile[kTile][kTile + 1];
  __shared__ scalar_t input_tile[kTile][kTile + 1];
  const int64_t o = blockIdx.y * kTile + threadIdx.y;
  const int64_t k = blockIdx.x * kTile + threadIdx.x;
  scalar_t accumulated = 0;
  for (int64_t pair = blockIdx.z; pair < samples * columns; pair += gridDim.z) {
    const int64_t n = pair / columns, v = pair % columns;
    const scalar_t* factor_block = factors + n * fs.sample + v * fs.column;  // (O, P) of column v of sample n
    const scalar_t* input_block = inputs + n * is.sample;                    // (K, P) of sample n
    scalar_t product = 0;
    for (int64_t p0 = 0; p0 < positions; p0 += kTile) {
      const int64_t o_load = blockIdx.y * kTile + threadIdx.y, p_load = p0 + threadIdx.x;
      factor_tile[threadIdx.y][threadIdx.x] = (o_load < outs && p_load < positions)
                                                  ? factor_block[o_load * fs.out + p_load * fs.position]
                                                  : scalar_t(0);
      const int64_t k_load = blockIdx.x * kTile + threadIdx.y;
      input_tile[threadIdx.y][threadIdx.x] = (k_load < ins && p_load < positions)
                                                 ? input_block[k_load * is.channel + p_load * is.position]
                                                 : scalar_t(0);
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kTile; ++i) product += factor_tile[threadIdx.y][i] * input_tile[threadIdx.x][i];
      __syncthreads();
    }
    accumulated += (signs ? signs[pair] : scalar_t(1)) * product * product;
  }
  if (o < outs && k < ins) atomicAdd(out + o * ins + k, accumulated);
}

// One thread per (o, k) and a share of the (n, v) pairs along blockIdx.y; the selected input
// positions are read through the index (checked on the device, as the CPU kernel checks them),
// partial sums meet in atomicAdd: one per thread, or per pair into out[n] when per_sample.
template <typename scalar_t>
__global__ void selected_weight_diagonal_kernel(const scalar_t* factors, FactorStrides fs, const scalar_t* signs,
                                                const int64_t* indices, const scalar_t* inputs, InputStrides is,
                                                scalar_t* out, int64_t samples, int64_t columns, int64_t outs,
                                                int64_t selected, int64_t ins, int64_t positions, bool per_sample) {
  const int64_t entry = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (entry >= outs * ins) return;
  const int64_t o = entry / ins, k = entry % ins;
  scalar_t accumulated = 0;
  for (int64_t pair = blockIdx.y; pair < samples * columns; pair += gridDim.y) {
    const int64_t n = pair / columns, v = pair % columns;
    const scalar_t* column = factors + n * fs.sample + v * fs.column + o * fs.out;
    const int64_t* picked = indices + (n * outs + o) * selected;
    const scalar_t* input_row = inputs + n * is.sample + k * is.channel;
    scalar_t product = 0;
    for (int64_t q = 0; q < selected; ++q) {
      const int64_t position = picked[q];
      CUDA_KERNEL_ASSERT(position >= 0 && position < positions);
      product += column[q * fs.position] * input_row[position * is.position];
    }
    const scalar_t square = (signs ? signs[pair] : scalar_t(1)) * product * product;
    if (per_sample) {
      atomicAdd(out + n * outs * ins + entry, square);
    } else {
      accumulated += square;
    }
  }
  if (!per_sample) atomicAdd(out + entry, accumulated);
}

// One block per channel: its threads share the (n, v) pairs, each a dot product over the positions,
// squared; a block reduction writes out[c] (deterministic: no atomics).
template <typename scalar_t>
__global__ void channel_weight_diagonal_kernel(const scalar_t* factors, FactorStrides fs, const scalar_t* signs,
                                               const scalar_t* values, InputStrides vs, scalar_t* out,
                                               int64_t samples, int64_t columns, int64_t positions) {
  __shared__ scalar_t partial[kThreads];
  const int64_t c = blockIdx.x;
  scalar_t accumulated = 0;
  for (int64_t pair = threadIdx.x; pair < samples * columns; pair += blockDim.x) {
    const int64_t n = pair / columns, v = pair % columns;
    const scalar_t* column = factors + n * fs.sample + v * fs.column + c * fs.out;
    const scalar_t* value = values + n * vs.sample + c * vs.channel;
    scalar_t product = 0;
    for (int64_t p = 0; p < positions; ++p) product += column[p * fs.position] * value[p * vs.position];
    accumulated += (signs ? signs[pair] : scalar_t(1)) * product * product;
  }
  partial[threadIdx.x] = accumulated;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[c] = partial[0];
}

at::Tensor factor_diagonal_cuda(const at::Tensor& factors, const c10::optional<at::Tensor>& signs) {
  check_factor_diagonal_args(factors, signs);
  const c10::cuda::CUDAGuard guard(factors.device());
  const auto& s = factors;
  const bool has_signs = signs.has_value() && signs->defined();
  const auto g = has_signs ? signs->contiguous() : at::Tensor();
  const int64_t samples = s.size(0), columns = s.size(1), features = s.size(2);
  auto out = at::empty({samples, features}, s.options());
  if (out.numel() == 0) return out;
  const int64_t blocks = std::min<int64_t>((out.numel() + kThreads - 1) / kThreads, 65535 * 32);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "factor_diagonal_cuda", [&] {
    factor_diagonal_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.const_data_ptr<scalar_t>(), has_signs ? g.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), samples, columns, features, s.stride(0), s.stride(1), s.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor affine_weight_diagonal_cuda(const at::Tensor& factors, const c10::optional<at::Tensor>& signs,
                                       const at::Tensor& inputs) {
  check_affine_weight_diagonal_args(factors, signs, inputs);
  // float atomics add the partial sums in whatever order the blocks finish
  at::globalContext().alertNotDeterministic("affine_weight_diagonal_cuda");
  const c10::cuda::CUDAGuard guard(factors.device());
  const auto& s = factors;
  const auto& x = inputs;
  const bool has_signs = signs.has_value() && signs->defined();
  const auto g = has_signs ? signs->contiguous() : at::Tensor();
  const int64_t samples = s.size(0), columns = s.size(1), outs = s.size(2), positions = s.size(3);
  const int64_t ins = x.size(1);
  auto out = at::zeros({outs, ins}, s.options());
  if (out.numel() == 0 || samples * columns == 0) return out;
  const int64_t tiles = ((outs + kTile - 1) / kTile) * ((ins + kTile - 1) / kTile);
  // enough blocks along z to fill the device several times over, never more than there are pairs
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({samples * columns, 65535, (4096 + tiles - 1) / tiles}));
  const dim3 grid(static_cast<unsigned>((ins + kTile - 1) / kTile), static_cast<unsigned>((outs + kTile - 1) / kTile),
                  static_cast<unsigned>(splits));
  const dim3 block(kTile, kTile);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "affine_weight_diagonal_cuda", [&] {
    affine_weight_diagonal_kernel<scalar_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.const_data_ptr<scalar_t>(), factor_strides(s), has_signs ? g.const_data_ptr<scalar_t>() : nullptr,
        x.const_data_ptr<scalar_t>(), input_strides(x), out.mutable_data_ptr<scalar_t>(), samples, columns, outs, ins,
        positions);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor selected_weight_diagonal_cuda(const at::Tensor& factors, const c10::optional<at::Tensor>& signs,
                                         const at::Tensor& indices, const at::Tensor& inputs, bool per_sample) {
  check_selected_weight_diagonal_args(factors, signs, indices, inputs);
  at::globalContext().alertNotDeterministic("selected_weight_diagonal_cuda");  // float atomics, as above
  const c10::cuda::CUDAGuard guard(factors.device());
  const auto& s = factors;
  const auto idx = indices.contiguous();  // int64 (N, O, Q): small next to the factors
  const auto& x = inputs;
  const bool has_signs = signs.has_value() && signs->defined();
  const auto g = has_signs ? signs->contiguous() : at::Tensor();
  const int64_t samples = s.size(0), columns = s.size(1), outs = s.size(2), selected = s.size(3);
  const int64_t ins = x.size(1), positions = x.size(2);
  auto out = per_sample ? at::zeros({samples, outs, ins}, s.options()) : at::zeros({outs, ins}, s.options());
  if (out.numel() == 0 || samples * columns == 0) return out;
  const int64_t blocks = (outs * ins + kThreads - 1) / kThreads;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({samples * columns, 65535, (4096 + blocks - 1) / blocks}));
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "selected_weight_diagonal_cuda", [&] {
    selected_weight_diagonal_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.const_data_ptr<scalar_t>(), factor_strides(s), has_signs ? g.const_data_ptr<scalar_t>() : nullptr,
        idx.const_data_ptr<int64_t>(), x.const_data_ptr<scalar_t>(), input_strides(x),
        out.mutable_data_ptr<scalar_t>(), samples, columns, outs, selected, ins, positions, per_sample);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

at::Tensor channel_weight_diagonal_cuda(const at::Tensor& factors, const c10::optional<at::Tensor>& signs,
                                        const at::Tensor& values) {
  check_channel_weight_diagonal_args(factors, signs, values);
  const c10::cuda::CUDAGuard guard(factors.device());
  const bool has_signs = signs.has_value() && signs->defined();
  const auto g = has_signs ? signs->contiguous() : at::Tensor();
  const int64_t samples = factors.size(0), columns = factors.size(1), channels = factors.size(2);
  auto out = at::zeros({channels}, factors.options());
  if (samples == 0 || columns == 0 || channels == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(factors.scalar_type(), "channel_weight_diagonal_cuda", [&] {
    channel_weight_diagonal_kernel<scalar_t><<<channels, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        factors.const_data_ptr<scalar_t>(), factor_strides(factors), has_signs ? g.const_data_ptr<scalar_t>() : nullptr,
        values.const_data_ptr<scalar_t>(), input_strides(values), out.mutable_data_ptr<scalar_t>(), samples, columns,
        factors.size(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(torch_secorder, CUDA, m) {
  m.impl("selected_weight_diagonal", &selected_weight_diagonal_cuda);
  m.impl("factor_diagonal", &factor_diagonal_cuda);
  m.impl("affine_weight_diagonal", &affine_weight_diagonal_cuda);
  m.impl("channel_weight_diagonal", &channel_weight_diagonal_cuda);
}

}  // namespace torch_secorder
