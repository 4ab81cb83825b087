// The sparse ops of a TopK-family SAE, registered under torch.ops.fastsae (formulas of docs/design.md):
//   sparse_decode:          x_hat[b] = sum_s values[b,s] * W_dec[idx[b,s]] + b_dec
//   sparse_decode_backward: dvalues[b,s] = <e_b, W_dec[idx[b,s]]>,
//                           dW_dec[j] = sum_{idx[b,s]=j} values[b,s] * e_b
//   topk_encode_backward:   dpre = dvalues * 1[values > 0], dW_enc[:,j] = sum_{idx[b,s]=j} dpre * xin_b,
//                           db_enc[j] = sum dpre, dxin_b = sum_s dpre[b,s] * W_enc[:, idx[b,s]]
//   topk_sae_backward:      all of the above in one call, dense-shaped or row-sparse.
// Per-latent sums walk the CSR segments of csr_by_latent.h, one worker per segment: no float
// atomics, bit-identical results from run to run. This file checks arguments, allocates and
// registers; the kernels are in the per-device tables of sparse_kernels.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "checks.h"
#include "sparse_kernels.h"

namespace fastsae {

at::Tensor sparse_decode(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                         const std::optional<at::Tensor>& b_dec) {
  const char* op = "sparse_decode";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // autograd is registered in Python
  check_float_matrix(W_dec, "W_dec", op);
  const int64_t n = W_dec.size(0), d = W_dec.size(1);
  check_pair_against(values, indices, W_dec, n, op);
  check_b_dec(b_dec, d, W_dec, op);
  const int64_t B = values.size(0);
  // Accumulate in the op-math dtype (fp32 for half types), round once at the end.
  const auto acc = at::toOpMathType(W_dec.scalar_type());
  auto vals = values.contiguous().to(acc);
  // A fresh buffer, always: b_dec->expand({1, d}).contiguous() would be b_dec itself, and the
  // decode accumulates into `out`.
  auto out = at::empty({B, d}, vals.options());
  if (b_dec.has_value())
    out.copy_(b_dec->expand({B, d}));
  else
    out.zero_();
  kernels_for(W_dec).decode(vals, indices.contiguous(), W_dec.contiguous(), out);
  return out.to(W_dec.scalar_type());
}

// Backward of sparse_decode: (dvalues [B,k], dW_dec [n,d] dense-shaped, zero off the touched rows).
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward(const at::Tensor& grad, const at::Tensor& values,
                                                          const at::Tensor& indices, const at::Tensor& W_dec) {
  const char* op = "sparse_decode_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // these are gradients: no graph of their own
  check_float_matrix(W_dec, "W_dec", op);
  const int64_t n = W_dec.size(0), d = W_dec.size(1);
  check_pair_against(values, indices, W_dec, n, op);
  const int64_t B = values.size(0), k = values.size(1);
  check_rows(grad, B, d, W_dec, "grad", op);

  const SparseKernels& K = kernels_for(W_dec);
  auto W = W_dec.contiguous();
  auto idx = indices.contiguous();
  auto g = grad.contiguous();
  auto dvalues = at::empty({B, k}, values.options());
  SegmentSums a;
  a.k = k;
  a.values = values.contiguous();
  a.grad = g;
  a.dW_dec = at::zeros({n, d}, W_dec.options());
  if (K.dvalues) {
    K.dvalues(g, idx, W, dvalues);
  } else {
    a.W_dec = W;
    a.dvalues = dvalues;  // written by the walk
  }
  K.segment_sums(K.csr_by_latent(idx, n), a);
  return {dvalues, a.dW_dec};
}

// Backward of topk_encode given dvalues = dL/dvalues: (dx [B,d], or [0,d] when !need_dx;
// dW_enc [d,n]; db_enc [n]; db_dec [d] = -sum_b dxin_b, zeros when b_dec is None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_backward(
    const at::Tensor& dvalues, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& x,
    const at::Tensor& W_enc, const std::optional<at::Tensor>& b_dec, bool need_dx) {
  const char* op = "topk_encode_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_float_matrix(W_enc, "W_enc", op);
  const int64_t d = W_enc.size(0), n = W_enc.size(1);
  check_pair_against(values, indices, W_enc, n, op);
  const int64_t B = values.size(0), k = values.size(1);
  check_rows(dvalues, B, k, W_enc, "dvalues", op);
  check_rows(x, B, d, W_enc, "x", op);
  check_b_dec(b_dec, d, W_enc, op);

  const SparseKernels& K = kernels_for(W_enc);
  auto W = W_enc.contiguous();
  const LatentCSR csr = K.csr_by_latent(indices.contiguous(), n);
  SegmentSums a;
  a.k = k;
  a.enc_transposed = true;
  a.values = values.contiguous();
  a.dvalues = dvalues.contiguous();
  a.xin = encoder_input(x, b_dec);
  a.dW_enc = at::zeros({d, n}, W_enc.options());
  a.db_enc = at::zeros({n}, W_enc.options());
  K.segment_sums(csr, a);
  auto db_dec = at::zeros({d}, W_enc.options());
  if (b_dec.has_value()) K.neg_row_dots(W, a.db_enc, db_dec);  // sum_b dxin_b = W_enc @ db_enc
  auto dx = at::empty({need_dx ? B : 0, d}, W_enc.options());
  if (need_dx) {
    auto cols = at::empty({csr.latents.numel(), d}, W_enc.options());
    K.gather_columns(W, csr.latents, cols);
    K.dx(a.values, a.dvalues, csr.slot, cols, dx);
  }
  return {dx, a.dW_enc, a.db_enc, db_dec};
}

// The whole sparse backward of a TopK-family step (reference.topk_sae_backward).
// Returns (dvalues [B,k], latents [u], dW_enc, db_enc, dW_dec, dx [B,d], db_dec [d]) where
// dense-shaped: dW_enc [d,n], db_enc [n], dW_dec [n,d];
// row_sparse:   dW_enc [u,d] (the gradient's columns, transposed), db_enc [u], dW_dec [u,d];
// need_dx=false: dx is [0,d] (not computed), db_dec's encoder part comes from db_enc instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
topk_sae_backward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                  const at::Tensor& grad_out, const at::Tensor& W_enc, const at::Tensor& W_dec,
                  const std::optional<at::Tensor>& b_dec, bool row_sparse, bool need_dx) {
  const char* op = "topk_sae_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_float_matrix(W_dec, "W_dec", op);
  check_float_matrix(W_enc, "W_enc", op);
  const int64_t n = W_dec.size(0), d = W_dec.size(1);
  check_shape2(W_enc, d, n, "W_enc (the transpose of W_dec's shape)", op);
  check_same_dtype(W_enc, W_dec, "W_enc", "W_dec", op);
  check_same_device(W_enc, W_dec, "W_enc", "W_dec", op);
  check_pair_against(values, indices, W_dec, n, op);
  const int64_t B = values.size(0), k = values.size(1);
  check_rows(x, B, d, W_dec, "x", op);
  check_rows(grad_out, B, d, W_dec, "grad_out", op);
  check_b_dec(b_dec, d, W_dec, op);

  const SparseKernels& K = kernels_for(W_dec);
  auto idx = indices.contiguous();
  const LatentCSR csr = K.csr_by_latent(idx, n);
  const int64_t u = csr.latents.numel();
  auto opts = W_dec.options();
  SegmentSums a;
  a.k = k;
  a.dense_rows = !row_sparse;
  a.enc_transposed = !row_sparse;
  a.values = values.contiguous();
  a.grad = grad_out.contiguous();
  a.xin = encoder_input(x, b_dec);
  a.dvalues = at::empty({B, k}, opts);
  a.dW_dec = row_sparse ? at::empty({u, d}, opts) : at::zeros({n, d}, opts);
  a.dW_enc = row_sparse ? at::empty({u, d}, opts) : at::zeros({d, n}, opts);
  a.db_enc = row_sparse ? at::empty({u}, opts) : at::zeros({n}, opts);
  if (K.dvalues)
    K.dvalues(a.grad, idx, W_dec.contiguous(), a.dvalues);
  else
    a.W_dec = W_dec.contiguous();
  K.segment_sums(csr, a);
  auto db_dec = a.grad.sum(0);
  if (!need_dx) {
    // the encoder part of db_dec without dx: Σ_b dx_b = Σ_j W_enc[:, j] · db_enc[j] over the
    // latents that fired (a trainer needs db_dec, not dx: this skips the B·k·d product)
    if (b_dec.has_value()) {
      if (!row_sparse) {
        db_dec = db_dec - at::mv(W_enc, a.db_enc);
      } else if (8 * u >= n) {
        // many latents fired: one streaming pass over W_enc beats gathering its columns
        auto dense = at::zeros({n}, opts).index_copy_(0, csr.latents, a.db_enc);
        auto part = at::empty({d}, opts);
        K.neg_row_dots(W_enc.contiguous(), dense, part);
        db_dec = db_dec + part;
      } else {
        auto cols = at::empty({u, d}, opts);
        K.gather_columns(W_enc.contiguous(), csr.latents, cols);
        db_dec = db_dec - at::mv(cols.t(), a.db_enc);
      }
    }
    return {a.dvalues, csr.latents, a.dW_enc, a.db_enc, a.dW_dec, at::empty({0, d}, opts), db_dec};
  }
  auto cols = at::empty({u, d}, opts);
  K.gather_columns(W_enc.contiguous(), csr.latents, cols);
  auto dx = at::empty({B, d}, opts);
  K.dx(a.values, a.dvalues, csr.slot, cols, dx);
  if (b_dec.has_value()) db_dec = db_dec - dx.sum(0);
  return {a.dvalues, csr.latents, a.dW_enc, a.db_enc, a.dW_dec, dx, db_dec};
}

// dst[:, latents[g]] = rows[g], in place: a dense [d, n] buffer (an optimizer's gradient)
// filled from row-sparse encoder gradients [u, d] without a transposed copy. CPU only: CUDA's
// index_copy_ does not pay for the strided writes.
void scatter_columns_(const at::Tensor& dst, const at::Tensor& latents, const at::Tensor& rows) {
  const char* op = "scatter_columns_";
  check_float_matrix(dst, "dst", op);
  TORCH_CHECK(dst.is_contiguous(), op, ": dst must be contiguous");
  TORCH_CHECK(latents.dim() == 1 && latents.scalar_type() == at::kLong, op,
              ": latents must be a 1-D int64 tensor, got ", latents.scalar_type(), " of shape ", latents.sizes());
  check_shape2(rows, latents.size(0), dst.size(0), "rows ([latents, dst.shape[0]])", op);
  check_same_dtype(rows, dst, "rows", "dst", op);
  check_indices_in_range(latents, dst.size(1), op);
  scatter_columns_cpu(dst, latents.contiguous(), rows.contiguous());
}

}  // namespace fastsae

TORCH_LIBRARY_FRAGMENT(fastsae, m) {
  m.def("scatter_columns_(Tensor(a!) dst, Tensor latents, Tensor rows) -> ()");
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor? b_dec) -> Tensor");
  m.def("sparse_decode_backward(Tensor grad, Tensor values, Tensor indices, Tensor W_dec) -> (Tensor, Tensor)");
  m.def(
      "topk_encode_backward(Tensor dvalues, Tensor values, Tensor indices, Tensor x, Tensor W_enc, "
      "Tensor? b_dec, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "topk_sae_backward(Tensor x, Tensor values, Tensor indices, Tensor grad_out, Tensor W_enc, "
      "Tensor W_dec, Tensor? b_dec, bool row_sparse, bool need_dx=True) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, "
      "Tensor)");
}

// The same functions serve every device: they pick the kernel table of their tensors.
#define FASTSAE_REGISTER_SPARSE_OPS(m)                              \
  m.impl("sparse_decode", &fastsae::sparse_decode);                 \
  m.impl("sparse_decode_backward", &fastsae::sparse_decode_backward); \
  m.impl("topk_encode_backward", &fastsae::topk_encode_backward);   \
  m.impl("topk_sae_backward", &fastsae::topk_sae_backward)

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  FASTSAE_REGISTER_SPARSE_OPS(m);
  m.impl("scatter_columns_", &fastsae::scatter_columns_);
}

#ifdef FASTSAE_WITH_CUDA
TORCH_LIBRARY_IMPL(fastsae, CUDA, m) { FASTSAE_REGISTER_SPARSE_OPS(m); }
#endif
