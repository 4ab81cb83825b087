// Sparse decoder on CPU: x_hat[b] = sum_s values[b,s] * W_dec[indices[b,s]] + b_dec.
// Accumulates in fp32 for fp16/bf16/fp32 storage and in fp64 for fp64; rows are independent, so the loop
// over rows is split across threads and the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "row_math.h"

namespace fastsae {

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& W_dec, const std::optional<at::Tensor>& b_dec) {
  check_sparse_pair(values, indices, "sparse_decode");
  check_float_matrix(W_dec, "W_dec", "sparse_decode");
  TORCH_CHECK(values.scalar_type() == W_dec.scalar_type(),
              "sparse_decode: values are ", values.scalar_type(), " but W_dec is ",
              W_dec.scalar_type(), "; cast one to the other's dtype");
  const int64_t n = W_dec.size(0), d = W_dec.size(1);
  check_indices_in_range(indices, n, "sparse_decode");
  if (b_dec.has_value()) {
    TORCH_CHECK(b_dec->dim() == 1 && b_dec->size(0) == d, "sparse_decode: b_dec must have shape [",
                d, "], got ", b_dec->sizes());
  }

  auto W = W_dec.contiguous();
  auto idx = indices.contiguous();
  const int64_t B = values.size(0), k = values.size(1);
  at::Tensor out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "sparse_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto vals = values.contiguous().to(acc_dtype);
    out = b_dec.has_value() ? b_dec->to(acc_dtype).expand({B, d}).contiguous()
                            : at::zeros({B, d}, vals.options());
    const scalar_t* w = W.data_ptr<scalar_t>();
    const acc_t* v = vals.data_ptr<acc_t>();
    const int64_t* ix = idx.data_ptr<int64_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* orow = o + b * d;
        for (int64_t s = 0; s < k; ++s) {
          const acc_t c = v[b * k + s];
          if (c == acc_t(0)) continue;
          axpy_acc<acc_t>(orow, c, w + ix[b * k + s] * d, d);
        }
      }
    });
  });
  return out.to(W_dec.scalar_type());
}

}  // namespace fastsae

TORCH_LIBRARY_FRAGMENT(fastsae, m) {
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("sparse_decode", &fastsae::sparse_decode_cpu);
}
