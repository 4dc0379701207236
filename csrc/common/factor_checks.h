// Argument checks of the Hessian-backprop contraction kernels, shared by CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace torch_secorder {

inline void check_same_kind(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& factors) {
  TORCH_CHECK(tensor.scalar_type() == factors.scalar_type(), op, ": ", name, " has dtype ", tensor.scalar_type(),
              " but factors have dtype ", factors.scalar_type());
  TORCH_CHECK(tensor.device() == factors.device(), op, ": ", name, " is on ", tensor.device(),
              " but factors are on ", factors.device());
}

// signs, when given, are (N, V) for factors whose first two axes are (N, V).
inline void check_signs(const char* op, const c10::optional<at::Tensor>& signs, const at::Tensor& factors) {
  if (!signs.has_value() || !signs->defined()) return;
  TORCH_CHECK(signs->dim() == 2 && signs->size(0) == factors.size(0) && signs->size(1) == factors.size(1), op,
              ": signs must have shape (N, V) = (", factors.size(0), ", ", factors.size(1), "), got ", signs->sizes());
  check_same_kind(op, "signs", *signs, factors);
}

inline void check_factor_diagonal_args(const at::Tensor& factors, const c10::optional<at::Tensor>& signs) {
  TORCH_CHECK(factors.dim() == 3, "factor_diagonal: factors must be (N, V, D), got ", factors.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(factors.scalar_type()), "factor_diagonal: factors must be floating point");
  check_signs("factor_diagonal", signs, factors);
}

inline void check_affine_weight_diagonal_args(const at::Tensor& factors, const c10::optional<at::Tensor>& signs,
                                              const at::Tensor& inputs) {
  const char* op = "affine_weight_diagonal";
  TORCH_CHECK(factors.dim() == 4, op, ": factors must be (N, V, O, P), got ", factors.dim(), "-D");
  TORCH_CHECK(inputs.dim() == 3, op, ": inputs must be (N, K, P), got ", inputs.dim(), "-D");
  TORCH_CHECK(inputs.size(0) == factors.size(0) && inputs.size(2) == factors.size(3), op,
              ": inputs (N, K, P) must match factors (N, V, O, P) in N and P, got ", inputs.sizes(), " and ",
              factors.sizes());
  TORCH_CHECK(at::isFloatingType(factors.scalar_type()), op, ": factors must be floating point");
  check_same_kind(op, "inputs", inputs, factors);
  check_signs(op, signs, factors);
}

inline void check_selected_weight_diagonal_args(const at::Tensor& factors, const c10::optional<at::Tensor>& signs,
                                                const at::Tensor& indices, const at::Tensor& inputs) {
  const char* op = "selected_weight_diagonal";
  TORCH_CHECK(factors.dim() == 4, op, ": factors must be (N, V, O, Q), got ", factors.dim(), "-D");
  TORCH_CHECK(inputs.dim() == 3 && inputs.size(0) == factors.size(0), op,
              ": inputs must be (N, K, P) with the N of factors, got ", inputs.sizes());
  TORCH_CHECK(indices.dim() == 3 && indices.size(0) == factors.size(0) && indices.size(1) == factors.size(2) &&
                  indices.size(2) == factors.size(3),
              op, ": indices must be (N, O, Q) = (", factors.size(0), ", ", factors.size(2), ", ", factors.size(3),
              "), got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == factors.device(), op, ": indices are on ", indices.device(), " but factors are on ",
              factors.device());
  TORCH_CHECK(at::isFloatingType(factors.scalar_type()), op, ": factors must be floating point");
  check_same_kind(op, "inputs", inputs, factors);
  check_signs(op, signs, factors);
}

inline void check_channel_weight_diagonal_args(const at::Tensor& factors, const c10::optional<at::Tensor>& signs,
                                              const at::Tensor& values) {
  const char* op = "channel_weight_diagonal";
  TORCH_CHECK(factors.dim() == 4, op, ": factors must be (N, V, C, P), got ", factors.dim(), "-D");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == factors.size(0) && values.size(1) == factors.size(2) &&
                  values.size(2) == factors.size(3),
              op, ": values must be (N, C, P) = (", factors.size(0), ", ", factors.size(2), ", ", factors.size(3),
              "), got ", values.sizes());
  TORCH_CHECK(at::isFloatingType(factors.scalar_type()), op, ": factors must be floating point");
  check_same_kind(op, "values", values, factors);
  check_signs(op, signs, factors);
}

}  // namespace torch_secorder
