// Argument checks shared by the ops: each failure names the argument, what was
// expected and what came, so a Python user sees a clear RuntimeError, never a crash.
#pragma once
#include <ATen/ATen.h>

namespace fastsae {

inline void check_float_matrix(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating dtype, got ", t.scalar_type());
}

inline void check_sparse_pair(const at::Tensor& values, const at::Tensor& indices, const char* op) {
  TORCH_CHECK(values.dim() == 2, op, ": values must be [batch, k], got shape ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes(), op, ": indices ", indices.sizes(),
              " and values ", values.sizes(), " must have the same shape");
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), op,
              ": values must be a floating dtype, got ", values.scalar_type());
}

inline void check_indices_in_range(const at::Tensor& indices, int64_t n, const char* op) {
  if (indices.numel() == 0) return;
  const int64_t lo = indices.min().item<int64_t>();
  const int64_t hi = indices.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n, op, ": latent index out of range [0, ", n, "): got min ", lo,
              ", max ", hi);
}

}  // namespace fastsae
