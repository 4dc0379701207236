// Per-sample Hessians of common losses with respect to the model output.
//
// Each loss reduces to a per-sample (or per-element) scale times a fixed
// curvature shape, so these functions only compute the scale with ATen ops and
// hand the heavy part to the backend kernels through the dispatcher. They are
// registered as CompositeImplicitAutograd: one implementation for every device.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace torch_secorder {
namespace {

bool is_mean_reduction(c10::string_view reduction) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum", "reduction must be 'mean' or 'sum', got '", reduction,
              "'");
  return reduction == "mean";
}

// (N, *) -> (N, K): one row per sample.
at::Tensor per_sample_rows(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() >= 1, op, ": input must have a batch dimension, got a 0-D tensor");
  return input.dim() == 1 ? input.unsqueeze(1) : input.flatten(1);
}

// (N, K) diagonal -> (N, K, K) factor diag(sqrt(h)); valid because h >= 0.
at::Tensor diagonal_sqrt_factor(const at::Tensor& diag, const char* op) {
  return at::diag_embed(at::sqrt(per_sample_rows(diag, op)));
}

// The backend kernels all take (logits, scale) and return one tensor.
at::Tensor call_curvature_kernel(const char* name, const at::Tensor& logits, const at::Tensor& scale) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(logits, scale);
}

// ---------------------------------------------------------------- MSE
// d^2/dx^2 of mean((x - y)^2) is 2 / numel; of sum((x - y)^2) it is 2.
at::Tensor mse_loss_hessian_diag(const at::Tensor& input, c10::string_view reduction) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "mse_loss_hessian_diag: input must be floating point");
  auto diag = at::full_like(input, 2.0, at::MemoryFormat::Contiguous);
  if (is_mean_reduction(reduction)) {
    diag.div_(c10::Scalar(input.sym_numel()));
  }
  return diag;
}

at::Tensor mse_loss_hessian_sqrt(const at::Tensor& input, c10::string_view reduction) {
  return diagonal_sqrt_factor(mse_loss_hessian_diag(input, reduction), "mse_loss_hessian_sqrt");
}

// ---------------------------------------------------------------- cross-entropy
// Every term of the cross-entropy is a_c * (-log p_c), whose Hessian in the
// logits is a_c * (diag(p) - p p^T); a sample's Hessian is therefore
// (sum_c a_c) * (diag(p) - p p^T). This returns sum_c a_c per sample, divided
// by what PyTorch divides the mean by.
at::Tensor cross_entropy_sample_scale(const at::Tensor& input, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                      double label_smoothing, c10::string_view reduction) {
  const bool mean = is_mean_reduction(reduction);
  TORCH_CHECK(input.dim() == 2, "cross_entropy_hessian: input must be (N, C) logits, got ", input.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "cross_entropy_hessian: input must be floating point");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "cross_entropy_hessian: label_smoothing must be in [0, 1], got ", label_smoothing);
  const bool has_weight = weight.has_value() && weight->defined();
  if (has_weight) {
    TORCH_CHECK(weight->dim() == 1 && weight->sym_size(0) == input.sym_size(1),
                "cross_entropy_hessian: weight must have shape (C,) = (", input.sym_size(1), ",), got ",
                weight->sym_sizes());
  }
  const auto opts = input.options();
  // Mean class weight: the smoothing term eps/C * sum_c w_c * (-log p_c) adds eps * mean(w).
  const at::Tensor mean_weight = has_weight ? weight->to(opts).mean() : at::ones({}, opts);

  if (at::isFloatingType(target.scalar_type())) {
    // Class probabilities: a_c = w_c * ((1 - eps) t_c + eps / C); the mean divides by N.
    TORCH_CHECK(target.sym_sizes() == input.sym_sizes(), "cross_entropy_hessian: probability target must have the "
                "shape of input ", input.sym_sizes(), ", got ", target.sym_sizes());
    const at::Tensor t = target.to(opts);
    const at::Tensor weighted = has_weight ? (t * weight->to(opts)).sum(1) : t.sum(1);
    at::Tensor scale = weighted * (1.0 - label_smoothing) + mean_weight * label_smoothing;
    return mean ? scale / at::ones_like(scale).sum() : scale;
  }

  // Class indices: ignored samples contribute nothing; the mean divides by the
  // summed weight of the targets that are not ignored.
  TORCH_CHECK(target.dim() == 1 && target.sym_size(0) == input.sym_size(0),
              "cross_entropy_hessian: class-index target must have shape (N,) = (", input.sym_size(0), ",), got ",
              target.sym_sizes());
  const at::Tensor valid = target.ne(ignore_index);
  // As F.cross_entropy: an index outside [0, C) that is not ignore_index is an error (checked on the
  // device, without a host sync where the device allows it).
  at::_assert_async(valid.logical_and(target.lt(0).logical_or(target.ge(input.sym_size(1)))).any().logical_not(),
                    "cross_entropy_hessian: target holds a class index outside [0, C) that is not ignore_index");
  const at::Tensor valid_f = valid.to(opts);
  if (!has_weight) {
    // every class weighs 1, so a kept sample's a_c add up to (1 - eps) + eps = 1: a few ops instead
    // of a dozen, which matters when the whole Hessian takes a millisecond. When every target is
    // ignored the loss is 0/0 but its gradient is 0 (as PyTorch's): the count is clamped to 1.
    return mean ? valid_f / valid_f.sum().clamp_min(1) : valid_f;
  }
  const at::Tensor safe_target = at::where(valid, target, at::zeros_like(target));
  const at::Tensor target_weight = weight->to(opts).index_select(0, safe_target) * valid_f;
  at::Tensor scale = target_weight * (1.0 - label_smoothing) + mean_weight * label_smoothing * valid_f;
  if (!mean) return scale;
  // Samples that contribute nothing stay exactly 0, also when no target weight is left to divide by.
  return at::where(scale.eq(0), at::zeros_like(scale), scale / target_weight.sum());
}

// sqrt factors exist only for positive semi-definite Hessians: scale >= 0 (not for negative class
// weights or target probabilities, which PyTorch accepts; the engine uses signed columns for those).
void check_nonnegative_scale(const at::Tensor& scale, const char* op) {
  at::_assert_async(scale.ge(0).all(), std::string(op) + ": a negative per-sample scale (negative weight, pos_weight " +
                                           "or target probability) has no real square-root factor; use the _diag op");
}

at::Tensor cross_entropy_hessian_diag(const at::Tensor& input, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                      double label_smoothing, c10::string_view reduction) {
  auto scale = cross_entropy_sample_scale(input, target, weight, ignore_index, label_smoothing, reduction);
  return call_curvature_kernel("torch_secorder::softmax_hessian_diag", input, scale);
}

at::Tensor cross_entropy_hessian_sqrt(const at::Tensor& input, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                      double label_smoothing, c10::string_view reduction) {
  auto scale = cross_entropy_sample_scale(input, target, weight, ignore_index, label_smoothing, reduction);
  if (weight.has_value() || at::isFloatingType(target.scalar_type())) {  // otherwise scale >= 0 by construction
    check_nonnegative_scale(scale, "cross_entropy_hessian_sqrt");
  }
  return call_curvature_kernel("torch_secorder::softmax_hessian_sqrt", input, scale);
}

// ---------------------------------------------------------------- BCE with logits
// loss = -w [pw y log s(x) + (1 - y) log(1 - s(x))] has second derivative
// w (1 + (pw - 1) y) s(x) (1 - s(x)) in x; pos_weight broadcasts over the last axis.
at::Tensor bce_with_logits_hessian_diag(const at::Tensor& input, const at::Tensor& target,
                                        const c10::optional<at::Tensor>& weight,
                                        const c10::optional<at::Tensor>& pos_weight, c10::string_view reduction) {
  const bool mean = is_mean_reduction(reduction);
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "bce_with_logits_hessian: input must be floating point");
  TORCH_CHECK(target.sym_sizes() == input.sym_sizes(), "bce_with_logits_hessian: target must have the shape of input ",
              input.sym_sizes(), ", got ", target.sym_sizes());
  const auto opts = input.options();
  at::Tensor scale = at::ones_like(input, at::MemoryFormat::Contiguous);
  if (pos_weight.has_value() && pos_weight->defined()) {
    scale = scale + (pos_weight->to(opts) - 1.0) * target.to(opts);
  }
  if (weight.has_value() && weight->defined()) {
    scale = scale * weight->to(opts);
  }
  if (mean) {
    scale = scale / c10::Scalar(input.sym_numel());
  }
  scale = scale.expand_as(input).contiguous();
  return call_curvature_kernel("torch_secorder::sigmoid_hessian_diag", input, scale);
}

at::Tensor bce_with_logits_hessian_sqrt(const at::Tensor& input, const at::Tensor& target,
                                        const c10::optional<at::Tensor>& weight,
                                        const c10::optional<at::Tensor>& pos_weight, c10::string_view reduction) {
  auto diag = bce_with_logits_hessian_diag(input, target, weight, pos_weight, reduction);
  if (weight.has_value() || pos_weight.has_value()) {  // otherwise diag >= 0 by construction
    check_nonnegative_scale(diag, "bce_with_logits_hessian_sqrt");
  }
  return diagonal_sqrt_factor(diag, "bce_with_logits_hessian_sqrt");
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_secorder, CompositeImplicitAutograd, m) {
  m.impl("mse_loss_hessian_diag", &mse_loss_hessian_diag);
  m.impl("mse_loss_hessian_sqrt", &mse_loss_hessian_sqrt);
  m.impl("cross_entropy_sample_scale", &cross_entropy_sample_scale);
  m.impl("cross_entropy_hessian_diag", &cross_entropy_hessian_diag);
  m.impl("cross_entropy_hessian_sqrt", &cross_entropy_hessian_sqrt);
  m.impl("bce_with_logits_hessian_diag", &bce_with_logits_hessian_diag);
  m.impl("bce_with_logits_hessian_sqrt", &bce_with_logits_hessian_sqrt);
}

}  // namespace torch_secorder
