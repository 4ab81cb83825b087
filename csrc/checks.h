// Argument checks shared by the ops: each failure names the argument, what was
// expected and what came, so a Python user sees a clear RuntimeError, never a crash.
#pragma once
#include <ATen/ATen.h>

#include <string>

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

// indices: int64 (checked before). On CPU one serial scan: B*k entries take microseconds,
// less than waking the thread pool for a parallel min and max.
inline void check_indices_in_range(const at::Tensor& indices, int64_t n, const char* op) {
  if (indices.numel() == 0) return;
  int64_t lo, hi;
  if (indices.is_cpu()) {
    const at::Tensor c = indices.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    lo = hi = p[0];
    for (int64_t i = 1, e = c.numel(); i < e; ++i) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
  } else {
    const auto mm = at::aminmax(indices);
    lo = std::get<0>(mm).item<int64_t>();
    hi = std::get<1>(mm).item<int64_t>();
  }
  TORCH_CHECK(lo >= 0 && hi < n, op, ": latent index out of range [0, ", n, "): got min ", lo,
              ", max ", hi);
}

}  // namespace fastsae

namespace fastsae {

// t must be [rows, cols] (a negative size means "any").
inline void check_shape2(const at::Tensor& t, int64_t rows, int64_t cols, const char* name,
                         const char* op) {
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols),
              op, ": ", name, " must have shape [", rows < 0 ? std::string("*") : std::to_string(rows),
              ", ", cols < 0 ? std::string("*") : std::to_string(cols), "], got ", t.sizes());
}

inline void check_vector(const at::Tensor& t, int64_t n, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
              t.sizes());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name, const char* op) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but ",
              ref_name, " is ", ref.scalar_type(), "; cast them to one dtype");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move them to one device");
}

}  // namespace fastsae

namespace fastsae {

// values/indices [B, k] with indices in [0, n), values of W's dtype and device.
inline void check_pair_against(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W,
                               int64_t n, const char* op) {
  check_sparse_pair(values, indices, op);
  check_same_dtype(values, W, "values", "the weights", op);
  check_same_device(values, W, "values", "the weights", op);
  check_same_device(indices, W, "indices", "the weights", op);
  check_indices_in_range(indices, n, op);
}

// t [B, d] of W's dtype and device.
inline void check_rows(const at::Tensor& t, int64_t B, int64_t d, const at::Tensor& W, const char* name,
                       const char* op) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating dtype, got ",
              t.scalar_type());
  check_shape2(t, B, d, name, op);
  check_same_dtype(t, W, name, "the weights", op);
  check_same_device(t, W, name, "the weights", op);
}

// x - b_dec (or x) as a contiguous tensor; on CPU a plain loop for the same reason as above.
inline at::Tensor encoder_input(const at::Tensor& x, const std::optional<at::Tensor>& b_dec) {
  if (!b_dec.has_value()) return x.contiguous();
  if (!x.is_cpu() || x.numel() > (1 << 22)) return (x - *b_dec).contiguous();
  auto xc = x.contiguous();
  auto bc = b_dec->contiguous();
  auto out = at::empty_like(xc);
  const int64_t d = xc.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "encoder_input", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    const scalar_t* pb = bc.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    for (int64_t r = 0, rows = xc.size(0); r < rows; ++r)
      for (int64_t i = 0; i < d; ++i) po[r * d + i] = px[r * d + i] - pb[i];
  });
  return out;
}

inline void check_b_dec(const std::optional<at::Tensor>& b_dec, int64_t d, const at::Tensor& W, const char* op) {
  if (!b_dec.has_value()) return;
  check_vector(*b_dec, d, "b_dec", op);
  check_same_dtype(*b_dec, W, "b_dec", "W", op);
  check_same_device(*b_dec, W, "b_dec", "W", op);
}

}  // namespace fastsae
