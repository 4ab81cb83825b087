// Sparse backward of a TopK-family SAE step on CPU (the formulas of DESIGN.md):
//   dvalues[b,s] = <e_b, W_dec[idx[b,s]]>          dpre = dvalues * 1[values > 0]
//   dW_dec[j]    = sum_{idx[b,s]=j} values[b,s] * e_b
//   dW_enc[:,j]  = sum_{idx[b,s]=j} dpre[b,s] * xin_b      db_enc[j] = sum dpre
//   dxin_b       = sum_s dpre[b,s] * W_enc[:, idx[b,s]]
// Per-latent sums walk the CSR segments of csr_by_latent.h, one worker per segment, so there
// are no float atomics and the results are bit-identical from run to run. Sums are taken in
// the op-math type (fp32 for fp16/bf16/fp32, fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "csr_by_latent.h"
#include "row_math.h"

namespace fastsae {
namespace {

// Where the per-latent rows go: row r of the output starts at base + r*s0 and steps by s1,
// with r = the latent id (dense-shaped gradient) or the segment number (row-sparse).
template <typename T>
struct RowsOut {
  T* base = nullptr;
  int64_t s0 = 0, s1 = 0;
};

template <typename scalar_t>
void dvalues_kernel(const scalar_t* grad, const int64_t* idx, const scalar_t* W_dec, scalar_t* out,
                    int64_t B, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* g = grad + b * d;
      for (int64_t s = 0; s < k; ++s) {
        const scalar_t* w = W_dec + idx[b * k + s] * d;
        out[b * k + s] = static_cast<scalar_t>(dot_acc<acc_t>(g, w, d));
      }
    }
  });
}

// Write the accumulated rows of segments g0..g1-1 (acc is [g1-g0, d]). A transposed output
// (s1 != 1, the dense dW_enc [d, n]) is written column block by column block, so consecutive
// latents fill whole cache lines instead of touching one line per element.
template <typename scalar_t, typename acc_t>
void write_rows(const RowsOut<scalar_t>& out, const acc_t* acc, int64_t g0, int64_t g1, const int64_t* lat,
                bool dense_rows, int64_t d) {
  if (out.s1 == 1) {
    for (int64_t g = g0; g < g1; ++g) {
      scalar_t* o = out.base + (dense_rows ? lat[g] : g) * out.s0;
      const acc_t* a = acc + (g - g0) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(a[i]);
    }
    return;
  }
  for (int64_t i = 0; i < d; ++i) {
    scalar_t* o = out.base + i * out.s1;
    for (int64_t g = g0; g < g1; ++g)
      o[(dense_rows ? lat[g] : g) * out.s0] = static_cast<scalar_t>(acc[(g - g0) * d + i]);
  }
}

// For every touched latent (segment g of csr): the decoder row sum_e values[e]*grad[b(e)],
// the encoder row sum_e dpre[e]*xin[b(e)] and the bias sum_e dpre[e]. A null output is skipped.
// Segments are taken kSegBlock at a time so that the transposed writes can be blocked.
constexpr int64_t kSegBlock = 16;

template <typename scalar_t>
void segment_sums_kernel(const LatentCSR& csr, int64_t k, int64_t d, bool dense_rows,
                         const scalar_t* values, const scalar_t* grad,      // for dW_dec
                         const scalar_t* dvalues, const scalar_t* xin,      // for dW_enc, db_enc
                         RowsOut<scalar_t> dW_dec, RowsOut<scalar_t> dW_enc, scalar_t* db_enc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t u = csr.latents.numel();
  const int64_t* lat = csr.latents.data_ptr<int64_t>();
  const int64_t* off = csr.offsets.data_ptr<int64_t>();
  const int64_t* ord = csr.order.data_ptr<int64_t>();
  const int64_t blocks = (u + kSegBlock - 1) / kSegBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> acc_dec(dW_dec.base ? kSegBlock * d : 0), acc_enc(dW_enc.base ? kSegBlock * d : 0);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = c * kSegBlock, g1 = std::min(u, g0 + kSegBlock);
      std::fill(acc_dec.begin(), acc_dec.end(), acc_t(0));
      std::fill(acc_enc.begin(), acc_enc.end(), acc_t(0));
      for (int64_t g = g0; g < g1; ++g) {
        acc_t* ad = acc_dec.data() + (g - g0) * d;
        acc_t* ae = acc_enc.data() + (g - g0) * d;
        acc_t acc_b = 0;
        for (int64_t p = off[g]; p < off[g + 1]; ++p) {
          const int64_t e = ord[p], b = e / k;
          if (dW_dec.base) axpy_acc<acc_t>(ad, static_cast<acc_t>(values[e]), grad + b * d, d);
          if (dvalues) {
            const acc_t dp = values[e] > scalar_t(0) ? static_cast<acc_t>(dvalues[e]) : acc_t(0);
            acc_b += dp;
            if (dW_enc.base) axpy_acc<acc_t>(ae, dp, xin + b * d, d);
          }
        }
        if (db_enc) db_enc[dense_rows ? lat[g] : g] = static_cast<scalar_t>(acc_b);
      }
      if (dW_dec.base) write_rows(dW_dec, acc_dec.data(), g0, g1, lat, dense_rows, d);
      if (dW_enc.base) write_rows(dW_enc, acc_enc.data(), g0, g1, lat, dense_rows, d);
    }
  });
}

// The touched columns of W_enc [d, n] as rows: out[g, i] = W_enc[i, latents[g]].
// Blocks of latents keep the strided writes within a few cache lines.
template <typename scalar_t>
void gather_columns_kernel(const scalar_t* W_enc, int64_t n, int64_t d, const int64_t* lat, int64_t u,
                           scalar_t* out) {
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (u + kBlock - 1) / kBlock, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = c * kBlock, g1 = std::min(u, g0 + kBlock);
      for (int64_t i = 0; i < d; ++i) {
        const scalar_t* wrow = W_enc + i * n;
        for (int64_t g = g0; g < g1; ++g) out[g * d + i] = wrow[lat[g]];
      }
    }
  });
}

// dxin[b] = sum_s dpre[b,s] * cols[slot[b*k+s]], cols = gather_columns_kernel's rows.
template <typename scalar_t>
void dx_kernel(const scalar_t* values, const scalar_t* dvalues, const int64_t* slot,
               const scalar_t* cols, scalar_t* dx, int64_t B, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> acc(d);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t s = 0; s < k; ++s) {
        const int64_t e = b * k + s;
        if (!(values[e] > scalar_t(0))) continue;
        axpy_acc<acc_t>(acc.data(), static_cast<acc_t>(dvalues[e]), cols + slot[e] * d, d);
      }
      for (int64_t i = 0; i < d; ++i) dx[b * d + i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

// out[i] = -<W_enc[i, :], db_enc>: the encoder's share of db_dec, -sum_b dxin_b, without dx.
// Row dots over the dense db_enc read W_enc once, d*n work: 1/(2B) of the encoder GEMM.
template <typename scalar_t>
void neg_row_dots_kernel(const scalar_t* W_enc, const scalar_t* db_enc, int64_t d, int64_t n, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, d, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = static_cast<scalar_t>(-dot_acc<acc_t>(W_enc + i * n, db_enc, n));
  });
}

// ------------------------------------------------------------------ argument checks
void check_pair_against(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W,
                        int64_t n, const char* op) {
  check_sparse_pair(values, indices, op);
  check_same_dtype(values, W, "values", "the weights", op);
  check_same_device(values, W, "values", "the weights", op);
  check_same_device(indices, W, "indices", "the weights", op);
  check_indices_in_range(indices, n, op);
}

void check_rows(const at::Tensor& t, int64_t B, int64_t d, const at::Tensor& W, const char* name,
                const char* op) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating dtype, got ",
              t.scalar_type());
  check_shape2(t, B, d, name, op);
  check_same_dtype(t, W, name, "the weights", op);
  check_same_device(t, W, name, "the weights", op);
}

void check_b_dec(const std::optional<at::Tensor>& b_dec, int64_t d, const at::Tensor& W, const char* op) {
  if (!b_dec.has_value()) return;
  check_vector(*b_dec, d, "b_dec", op);
  check_same_dtype(*b_dec, W, "b_dec", "the weights", op);
  check_same_device(*b_dec, W, "b_dec", "the weights", op);
}

at::Tensor input_rows(const at::Tensor& x, const std::optional<at::Tensor>& b_dec) {
  return (b_dec.has_value() ? x - *b_dec : x).contiguous();
}

}  // namespace

// ------------------------------------------------------------------ ops
// Backward of sparse_decode: (dvalues [B,k], dW_dec [n,d] dense-shaped, zero off the touched rows).
std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cpu(const at::Tensor& grad,
                                                              const at::Tensor& values,
                                                              const at::Tensor& indices,
                                                              const at::Tensor& W_dec) {
  const char* op = "sparse_decode_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // these are gradients: no graph of their own
  check_float_matrix(W_dec, "W_dec", op);
  const int64_t n = W_dec.size(0), d = W_dec.size(1);
  check_pair_against(values, indices, W_dec, n, op);
  const int64_t B = values.size(0), k = values.size(1);
  check_rows(grad, B, d, W_dec, "grad", op);

  auto W = W_dec.contiguous();
  auto idx = indices.contiguous();
  auto vals = values.contiguous();
  auto g = grad.contiguous();
  auto dvalues = at::empty({B, k}, values.options());
  auto dW_dec = at::zeros({n, d}, W_dec.options());
  const LatentCSR csr = csr_by_latent(idx, n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "sparse_decode_backward", [&] {
    dvalues_kernel<scalar_t>(g.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), W.data_ptr<scalar_t>(),
                             dvalues.data_ptr<scalar_t>(), B, k, d);
    segment_sums_kernel<scalar_t>(csr, k, d, /*dense_rows=*/true, vals.data_ptr<scalar_t>(),
                                  g.data_ptr<scalar_t>(), nullptr, nullptr,
                                  {dW_dec.data_ptr<scalar_t>(), d, 1}, {}, nullptr);
  });
  return {dvalues, dW_dec};
}

// Backward of topk_encode given dvalues = dL/dvalues: (dx [B,d] or [0,d] when !need_dx,
// dW_enc [d,n], db_enc [n], db_dec [d] = -sum_b dxin_b, zeros when b_dec is None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_backward_cpu(
    const at::Tensor& dvalues, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& x, const at::Tensor& W_enc, const std::optional<at::Tensor>& b_dec,
    bool need_dx) {
  const char* op = "topk_encode_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // these are gradients: no graph of their own
  check_float_matrix(W_enc, "W_enc", op);
  const int64_t d = W_enc.size(0), n = W_enc.size(1);
  check_pair_against(values, indices, W_enc, n, op);
  const int64_t B = values.size(0), k = values.size(1);
  check_rows(dvalues, B, k, W_enc, "dvalues", op);
  check_rows(x, B, d, W_enc, "x", op);
  check_b_dec(b_dec, d, W_enc, op);

  auto W = W_enc.contiguous();
  auto idx = indices.contiguous();
  auto vals = values.contiguous();
  auto dv = dvalues.contiguous();
  auto xin = input_rows(x, b_dec);
  auto dW_enc = at::zeros({d, n}, W_enc.options());
  auto db_enc = at::zeros({n}, W_enc.options());
  auto dx = at::empty({need_dx ? B : 0, d}, W_enc.options());
  auto db_dec = at::zeros({d}, W_enc.options());
  const LatentCSR csr = csr_by_latent(idx, n);
  const int64_t u = csr.latents.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "topk_encode_backward", [&] {
    segment_sums_kernel<scalar_t>(csr, k, d, /*dense_rows=*/true, vals.data_ptr<scalar_t>(), nullptr,
                                  dv.data_ptr<scalar_t>(), xin.data_ptr<scalar_t>(), {},
                                  {dW_enc.data_ptr<scalar_t>(), 1, n}, db_enc.data_ptr<scalar_t>());
    if (b_dec.has_value())
      neg_row_dots_kernel<scalar_t>(W.data_ptr<scalar_t>(), db_enc.data_ptr<scalar_t>(), d, n,
                                    db_dec.data_ptr<scalar_t>());
    if (!need_dx) return;
    auto cols = at::empty({u, d}, W_enc.options());
    gather_columns_kernel<scalar_t>(W.data_ptr<scalar_t>(), n, d, csr.latents.data_ptr<int64_t>(), u,
                                    cols.data_ptr<scalar_t>());
    dx_kernel<scalar_t>(vals.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), csr.slot.data_ptr<int64_t>(),
                        cols.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), B, k, d);
  });
  return {dx, dW_enc, db_enc, db_dec};
}

// The whole sparse backward of a TopK-family step (reference.topk_sae_backward).
// Returns (dvalues [B,k], latents [u], dW_enc, db_enc, dW_dec, dx [B,d], db_dec [d]) where
// dense-shaped: dW_enc [d,n], db_enc [n], dW_dec [n,d];
// row_sparse:   dW_enc [u,d] (the gradient's columns, transposed), db_enc [u], dW_dec [u,d].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
topk_sae_backward_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                      const at::Tensor& grad_out, const at::Tensor& W_enc, const at::Tensor& W_dec,
                      const std::optional<at::Tensor>& b_dec, bool row_sparse) {
  const char* op = "topk_sae_backward";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // these are gradients: no graph of their own
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

  auto We = W_enc.contiguous();
  auto Wd = W_dec.contiguous();
  auto idx = indices.contiguous();
  auto vals = values.contiguous();
  auto g = grad_out.contiguous();
  auto xin = input_rows(x, b_dec);
  const LatentCSR csr = csr_by_latent(idx, n);
  const int64_t u = csr.latents.numel();
  const int64_t rows = row_sparse ? u : n;
  auto opts = W_dec.options();
  auto dvalues = at::empty({B, k}, opts);
  auto dW_dec = row_sparse ? at::empty({u, d}, opts) : at::zeros({n, d}, opts);
  auto dW_enc = row_sparse ? at::empty({u, d}, opts) : at::zeros({d, n}, opts);
  auto db_enc = row_sparse ? at::empty({u}, opts) : at::zeros({n}, opts);
  auto dx = at::empty({B, d}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Wd.scalar_type(), "topk_sae_backward", [&] {
    dvalues_kernel<scalar_t>(g.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), Wd.data_ptr<scalar_t>(),
                             dvalues.data_ptr<scalar_t>(), B, k, d);
    const RowsOut<scalar_t> enc_out =
        row_sparse ? RowsOut<scalar_t>{dW_enc.data_ptr<scalar_t>(), d, 1}
                   : RowsOut<scalar_t>{dW_enc.data_ptr<scalar_t>(), 1, rows};
    segment_sums_kernel<scalar_t>(csr, k, d, !row_sparse, vals.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                  dvalues.data_ptr<scalar_t>(), xin.data_ptr<scalar_t>(),
                                  {dW_dec.data_ptr<scalar_t>(), d, 1}, enc_out, db_enc.data_ptr<scalar_t>());
    auto cols = at::empty({u, d}, opts);
    gather_columns_kernel<scalar_t>(We.data_ptr<scalar_t>(), n, d, csr.latents.data_ptr<int64_t>(), u,
                                    cols.data_ptr<scalar_t>());
    dx_kernel<scalar_t>(vals.data_ptr<scalar_t>(), dvalues.data_ptr<scalar_t>(), csr.slot.data_ptr<int64_t>(),
                        cols.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), B, k, d);
  });
  auto db_dec = g.sum(0);
  if (b_dec.has_value()) db_dec = db_dec - dx.sum(0);
  return {dvalues, csr.latents, dW_enc, db_enc, dW_dec, dx, db_dec};
}

}  // namespace fastsae

TORCH_LIBRARY_FRAGMENT(fastsae, m) {
  m.def("sparse_decode_backward(Tensor grad, Tensor values, Tensor indices, Tensor W_dec) -> (Tensor, Tensor)");
  m.def(
      "topk_encode_backward(Tensor dvalues, Tensor values, Tensor indices, Tensor x, Tensor W_enc, "
      "Tensor? b_dec, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "topk_sae_backward(Tensor x, Tensor values, Tensor indices, Tensor grad_out, Tensor W_enc, "
      "Tensor W_dec, Tensor? b_dec, bool row_sparse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("sparse_decode_backward", &fastsae::sparse_decode_backward_cpu);
  m.impl("topk_encode_backward", &fastsae::topk_encode_backward_cpu);
  m.impl("topk_sae_backward", &fastsae::topk_sae_backward_cpu);
}
