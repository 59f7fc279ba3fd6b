// Argument checks shared by the CPU and CUDA row epilogues (see epilogues.cpp for the contract). A wrong dtype
// raises TypeError in Python (TORCH_CHECK_TYPE), a wrong shape, device or layout ValueError (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

namespace are_fast {

// logits: [C, V] float32 or float64 on `device`, each row contiguous (the row stride may exceed V).
inline void check_logits(const at::Tensor& logits, const char* name, c10::DeviceType device) {
  TORCH_CHECK_VALUE(logits.dim() == 2, name, ": expected a 2-D [C, V] tensor, got ", logits.dim(), " dimensions");
  TORCH_CHECK_VALUE(logits.device().type() == device, name, ": expected a ", device, " tensor, got ",
                    logits.device());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, name,
                   ": expected float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) > 0, name, ": the vocabulary size V must be at least 1");
  TORCH_CHECK_VALUE(logits.stride(1) == 1, name, ": rows must be contiguous (stride(1) == 1)");
}

// A per-row tensor [C] of `dtype` on the device of `logits`.
inline void check_rows(const at::Tensor& t, const at::Tensor& logits, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(0), name, ": expected shape [", logits.size(0),
                    "] (one entry per logits row), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, ": expected a tensor on ", logits.device(), ", got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
}

// grad_scale: optional [C] floating tensor; returned contiguous in the logits' dtype.
inline std::optional<at::Tensor> checked_scale(const std::optional<at::Tensor>& grad_scale, const at::Tensor& logits) {
  if (!grad_scale.has_value()) {
    return std::nullopt;
  }
  TORCH_CHECK_TYPE(at::isFloatingType(grad_scale->scalar_type()), "grad_scale: expected a floating tensor, got ",
                   grad_scale->scalar_type());
  const at::Tensor scale = grad_scale->to(logits.scalar_type()).contiguous();
  check_rows(scale, logits, "grad_scale", logits.scalar_type());
  return scale;
}

inline void check_logprob_args(const at::Tensor& logits, const at::Tensor& targets, c10::DeviceType device) {
  check_logits(logits, "logits", device);
  check_rows(targets, logits, "targets", at::kLong);
}

inline void check_kl_args(const at::Tensor& logits_p, const at::Tensor& logits_q, const at::Tensor& valid,
                          c10::DeviceType device) {
  check_logits(logits_p, "logits_p", device);
  check_logits(logits_q, "logits_q", device);
  TORCH_CHECK_VALUE(logits_q.sizes() == logits_p.sizes(), "logits_q: expected the shape of logits_p ",
                    logits_p.sizes(), ", got ", logits_q.sizes());
  TORCH_CHECK_TYPE(logits_q.scalar_type() == logits_p.scalar_type(), "logits_q: expected the dtype of logits_p (",
                   logits_p.scalar_type(), "), got ", logits_q.scalar_type());
  check_rows(valid, logits_p, "valid", at::kBool);
}

// The KL's arguments, and the mixture weight beta in the open interval (0, 1).
inline void check_jsd_args(const at::Tensor& logits_p, const at::Tensor& logits_q, const at::Tensor& valid,
                           double beta, c10::DeviceType device) {
  check_kl_args(logits_p, logits_q, valid, device);
  TORCH_CHECK_VALUE(beta > 0 && beta < 1, "beta: expected a real number in (0, 1), got ", beta);
}

}  // namespace are_fast
