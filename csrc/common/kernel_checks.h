// Argument checks of the backend kernels, shared by CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace torch_secorder {

// Floating logits and a scale of the same dtype on the same device.
inline void check_logits_and_scale(const char* op, const at::Tensor& logits, const at::Tensor& scale) {
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(scale.scalar_type() == logits.scalar_type(), op, ": scale has dtype ", scale.scalar_type(),
              " but logits have dtype ", logits.scalar_type());
  TORCH_CHECK(scale.device() == logits.device(), op, ": scale is on ", scale.device(), " but logits are on ",
              logits.device());
}

// logits (N, C) and a per-sample scale (N,).
inline void check_softmax_kernel_args(const char* op, const at::Tensor& logits, const at::Tensor& scale) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, C), got ", logits.dim(), "-D");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == logits.size(0), op,
              ": scale must have shape (N,) = (", logits.size(0), ",), got ", scale.sizes());
  check_logits_and_scale(op, logits, scale);
}

// logits (N, C), a per-sample scale (N,) and uniform numbers (N, M), one per draw.
inline void check_sampled_columns_args(const char* op, const at::Tensor& logits, const at::Tensor& scale,
                                       const at::Tensor& uniforms) {
  check_softmax_kernel_args(op, logits, scale);
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.size(0) == logits.size(0), op, ": uniforms must have shape (N, M) ",
              "with N = ", logits.size(0), ", got ", uniforms.sizes());
  TORCH_CHECK(uniforms.scalar_type() == logits.scalar_type() && uniforms.device() == logits.device(), op,
              ": uniforms must have the dtype and device of logits (", logits.scalar_type(), ", ", logits.device(),
              "), got ", uniforms.scalar_type(), ", ", uniforms.device());
}

// logits of any shape and a scale of the same shape.
inline void check_elementwise_kernel_args(const char* op, const at::Tensor& logits, const at::Tensor& scale) {
  TORCH_CHECK(scale.sizes() == logits.sizes(), op, ": scale must have the shape of logits ", logits.sizes(),
              ", got ", scale.sizes());
  check_logits_and_scale(op, logits, scale);
}

}  // namespace torch_secorder
