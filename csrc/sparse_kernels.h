// The kernels behind the sparse ops, at the tensor level: one table per device. The op
// functions (argument checks, allocation, registration) are written once, in
// sparse_backward.cpp and sparse_decode.cpp, and pick the table of their tensors' device.
// All tensors passed in are contiguous; an undefined tensor means "not wanted".
#pragma once
#include <ATen/ATen.h>

#include "csr_by_latent.h"

namespace fastsae {

// Per touched latent g (segment g of the CSR), with row r = latents[g] (dense_rows) or g:
//   dW_dec[r]    = sum_e values[e] * grad[b(e)]                       (when dW_dec is defined)
//   dW_enc row r = sum_e dpre[e] * xin[b(e)],  db_enc[r] = sum_e dpre[e]  (when dvalues is)
// with dpre = dvalues * 1[values > 0]. enc_transposed: dW_enc is [d, n] and row r is its column r.
// W_dec, for a table without a dvalues kernel: then dvalues is an output of this walk,
// dvalues[e] = <grad[b(e)], W_dec[latent]>, each latent's decoder row read once for its segment.
struct SegmentSums {
  int64_t k = 0;
  bool dense_rows = true;
  bool enc_transposed = false;
  at::Tensor values, grad, dW_dec, dvalues, xin, dW_enc, db_enc, W_dec;
};

struct SparseKernels {
  LatentCSR (*csr_by_latent)(const at::Tensor& indices, int64_t n);
  // out[b,s] = <grad[b], W_dec[indices[b,s]]>; null where segment_sums computes it (SegmentSums::W_dec)
  void (*dvalues)(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& W_dec,
                  const at::Tensor& out);
  void (*segment_sums)(const LatentCSR& csr, const SegmentSums& a);
  // out[g, i] = W_enc[i, latents[g]]
  void (*gather_columns)(const at::Tensor& W_enc, const at::Tensor& latents, const at::Tensor& out);
  // out[b] = sum_s dpre[b,s] * cols[slot[b*k+s]]
  void (*dx)(const at::Tensor& values, const at::Tensor& dvalues, const at::Tensor& slot,
             const at::Tensor& cols, const at::Tensor& out);
  // out[i] = -<W_enc[i, :], db_enc>
  void (*neg_row_dots)(const at::Tensor& W_enc, const at::Tensor& db_enc, const at::Tensor& out);
  // out[b] += sum_s values[b,s] * W_dec[indices[b,s]]; values and out in the op-math dtype
  void (*decode)(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                 const at::Tensor& out);
};

const SparseKernels& cpu_kernels();
// dst[:, latents[g]] = rows[g] for dst [d, n] and rows [u, d] (CPU; an optimizer's dense
// gradient buffer filled from row-sparse encoder gradients)
void scatter_columns_cpu(const at::Tensor& dst, const at::Tensor& latents, const at::Tensor& rows);
#ifdef FASTSAE_WITH_CUDA
const SparseKernels& cuda_kernels();
#endif

inline const SparseKernels& kernels_for(const at::Tensor& t) {
#ifdef FASTSAE_WITH_CUDA
  if (t.is_cuda()) return cuda_kernels();
#endif
  TORCH_CHECK(t.is_cpu(), "fastsae: no kernels for tensors on ", t.device(),
              " in this build; use the 'reference' backend there");
  return cpu_kernels();
}

}  // namespace fastsae
