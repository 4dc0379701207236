// The schemas of torch_secorder's curvature ops: one declaration here, kernels per backend with
// TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda, the composite ones in csrc/loss_curvature.cpp.
// CPU-only utility ops (the block cache, the thread probe) are declared next to their one
// implementation with TORCH_LIBRARY_FRAGMENT (csrc/cpu/block_cache.cpp, csrc/cpu/parallel_probe.cpp).
// Adding an op: CONTRIBUTING.md, "Adding a compiled op".
#include <torch/library.h>

TORCH_LIBRARY(torch_secorder, m) {
  // Backend kernels (csrc/cpu, csrc/cuda).
  // scale[n] * (diag(p_n) - p_n p_n^T) with p_n = softmax(logits[n]): its diagonal (N, C) ...
  m.def("softmax_hessian_diag(Tensor logits, Tensor scale) -> Tensor");
  // ... and a square-root factor S (N, C, C) with S[n] S[n]^T equal to it ...
  m.def("softmax_hessian_sqrt(Tensor logits, Tensor scale) -> Tensor");
  // ... and its rank: C - 1 columns (N, C - 1, C) whose outer products sum to it (Householder, see
  // common/curvature_math.h); scale >= 0.
  m.def("softmax_hessian_columns(Tensor logits, Tensor scale) -> Tensor");
  // ... and Monte-Carlo columns of it: per draw m a class y ~ softmax(logits[n]) by inverse CDF of
  // uniforms[n, m], column sqrt(scale[n] / M) (p_n - e_y) -> (N, M, C); their outer products average to it.
  m.def("softmax_sampled_columns(Tensor logits, Tensor scale, Tensor uniforms) -> Tensor");
  // scale * sigmoid(logits) * (1 - sigmoid(logits)), elementwise.
  m.def("sigmoid_hessian_diag(Tensor logits, Tensor scale) -> Tensor");

  // Hessian-backprop contractions (csrc/cpu, csrc/cuda), curvature H_n = S_n^T diag(signs_n) S_n:
  // diag(H_n) from factors (N, V, D) and signs (N, V) -> (N, D) ...
  m.def("factor_diagonal(Tensor factors, Tensor? signs=None) -> Tensor");
  // ... and the diagonal of a weight W (O, K) shared over P positions, z[n, o, p] = W[o] . inputs[n, :, p]:
  // sum_n sum_v signs[n, v] (factors[n, v] @ inputs[n]^T)^2 with factors (N, V, O, P), inputs (N, K, P) -> (O, K),
  // without materialising the N x V x O x K products.
  m.def("affine_weight_diagonal(Tensor factors, Tensor? signs, Tensor inputs) -> Tensor");
  m.def("channel_weight_diagonal(Tensor factors, Tensor? signs, Tensor values) -> Tensor");
  // The same when the factors live on max-pooling selections: output channel o of sample n uses only
  // positions indices[n, o, :]. factors (N, V, O, Q), indices (N, O, Q) int64, inputs (N, K, P) -> (O, K),
  // or (N, O, K) without the sum over samples when per_sample.
  m.def(
      "selected_weight_diagonal(Tensor factors, Tensor? signs, Tensor indices, Tensor inputs, bool per_sample=False) "
      "-> Tensor");

  // Per-sample Hessians of losses with respect to the model output (loss_curvature.cpp).
  // *_diag has the shape of `input`; *_sqrt is (N, K, K) with K = input[0].numel().
  m.def("mse_loss_hessian_diag(Tensor input, str reduction='mean') -> Tensor");
  m.def("mse_loss_hessian_sqrt(Tensor input, str reduction='mean') -> Tensor");
  // The per-sample factor s_n of cross-entropy, Hessian_n = s_n (diag(p_n) - p_n p_n^T); may be negative.
  m.def(
      "cross_entropy_sample_scale(Tensor input, Tensor target, Tensor? weight=None, int ignore_index=-100, "
      "float label_smoothing=0.0, str reduction='mean') -> Tensor");
  m.def(
      "cross_entropy_hessian_diag(Tensor input, Tensor target, Tensor? weight=None, int ignore_index=-100, "
      "float label_smoothing=0.0, str reduction='mean') -> Tensor");
  m.def(
      "cross_entropy_hessian_sqrt(Tensor input, Tensor target, Tensor? weight=None, int ignore_index=-100, "
      "float label_smoothing=0.0, str reduction='mean') -> Tensor");
  m.def(
      "bce_with_logits_hessian_diag(Tensor input, Tensor target, Tensor? weight=None, Tensor? pos_weight=None, "
      "str reduction='mean') -> Tensor");
  m.def(
      "bce_with_logits_hessian_sqrt(Tensor input, Tensor target, Tensor? weight=None, Tensor? pos_weight=None, "
      "str reduction='mean') -> Tensor");
}

#ifdef TORCH_SECORDER_PYTHON_MODULE
// Importing torch_secorder._C loads this library, which registers the ops above.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "torch_secorder compiled ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
