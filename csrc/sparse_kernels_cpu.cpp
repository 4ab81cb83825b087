// The CPU table of sparse_kernels.h: at::parallel_for over rows or over blocks of latent
// segments, inner loops on the vectorised row primitives of row_math.h. Every output element
// is written by one worker that sums in a fixed order, so results are bit-identical from run
// to run (and independent of the number of threads). Sums are taken in the op-math type
// (fp32 for fp16/bf16/fp32 storage, fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "row_math.h"
#include "sparse_kernels.h"

namespace fastsae {
namespace {

// Where the per-latent rows go: row r of the output starts at base + r*s0 and steps by s1,
// with r = the latent id (dense-shaped gradient) or the segment number (row-sparse).
template <typename T>
struct RowsOut {
  T* base = nullptr;
  int64_t s0 = 0, s1 = 0;
};

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
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (dense_rows && out.s0 == 1) {  // the dense dW_enc [d, n]: 8 x 8 blocks where latents run
      rows_to_columns(acc, d, g1 - g0, d, lat + g0, 0, out.base, out.s1);
      return;
    }
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

// Given W_dec, dvalues is written here first, entry by entry: <grad[b(e)], W_dec[latent]>.
template <typename scalar_t>
void segment_sums_kernel(const LatentCSR& csr, int64_t d, bool dense_rows,
                         const scalar_t* values, const scalar_t* grad,      // for dW_dec
                         scalar_t* dvalues, const scalar_t* xin,            // for dW_enc, db_enc
                         RowsOut<scalar_t> dW_dec, RowsOut<scalar_t> dW_enc, scalar_t* db_enc,
                         const scalar_t* W_dec) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t u = csr.latents.numel();
  const int64_t* lat = csr.latents.data_ptr<int64_t>();
  const int64_t* off = csr.offsets.data_ptr<int64_t>();
  const int64_t* ord = csr.order.data_ptr<int64_t>();
  const int64_t* row_of = csr.row.data_ptr<int64_t>();  // the row of ord[p]
  const int64_t blocks = (u + kSegBlock - 1) / kSegBlock;
  const int64_t entries = csr.order.numel();
  // fp32/fp64 rows that are contiguous in the output are summed in place; a transposed or
  // low-precision output goes through an fp32 block that is then written out.
  constexpr bool kInPlace = std::is_same_v<acc_t, scalar_t>;
  const bool dec_direct = kInPlace && dW_dec.s1 == 1, enc_direct = kInPlace && dW_enc.s1 == 1;
  auto direct_row = [&](const RowsOut<scalar_t>& out, int64_t g) {
    return reinterpret_cast<acc_t*>(out.base + (dense_rows ? lat[g] : g) * out.s0);
  };
  // fp32 (unless dvalues is wanted without dW_dec): each segment's sums as register-blocked
  // passes over its gathered rows (row_math's weighted sums), the decoder's and dvalues' in one.
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const bool blocked = kFloat && (!W_dec || dW_dec.base);
  at::parallel_for(0, blocks, grain_for(kSegBlock * d * (entries / std::max<int64_t>(u, 1) + 1)),
                   [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> acc_dec(dW_dec.base && !dec_direct ? kSegBlock * d : 0),
        acc_enc(dW_enc.base && !enc_direct ? kSegBlock * d : 0);
    std::vector<const float*> rows;  // the blocked path's gathered rows, weights and scratch
    std::vector<float> weights, dots, scratch;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = c * kSegBlock, g1 = std::min(u, g0 + kSegBlock);
      std::fill(acc_dec.begin(), acc_dec.end(), acc_t(0));
      std::fill(acc_enc.begin(), acc_enc.end(), acc_t(0));
      for (int64_t g = g0; g < g1; ++g) {
        acc_t* ad = dW_dec.base && dec_direct ? direct_row(dW_dec, g) : acc_dec.data() + (g - g0) * d;
        acc_t* ae = dW_enc.base && enc_direct ? direct_row(dW_enc, g) : acc_enc.data() + (g - g0) * d;
        if constexpr (kFloat) {
          const int64_t m = off[g + 1] - off[g];
          if (blocked && m > 1) {  // one entry: the per-entry loop below (measured no slower)
            const int64_t *seg = ord + off[g], *seg_row = row_of + off[g];
            if (g + 1 < u) {  // the next segment's decoder row and first rows: short segments wait on them
              const int64_t nb = row_of[off[g + 1]];
              if (W_dec) prefetch(W_dec + lat[g + 1] * d, d);
              if (dW_dec.base) prefetch(grad + nb * d, d);
              if (dW_enc.base) prefetch(xin + nb * d, d);
            }
            rows.resize(m);
            weights.resize(m);
            dots.resize(m);
            scratch.resize(16 * m);
            if (dW_dec.base) {  // sum_e values[e]*grad[b(e)], and with W_dec each <grad[b(e)], w>
              for (int64_t p = 0; p < m; ++p) {
                rows[p] = grad + seg_row[p] * d;
                weights[p] = values[seg[p]];
              }
              if (W_dec) {
                dots_and_weighted_sum(rows.data(), weights.data(), m, W_dec + lat[g] * d, d, dots.data(), ad,
                                      scratch.data());
                for (int64_t p = 0; p < m; ++p) dvalues[seg[p]] = dots[p];
              } else {
                std::fill(ad, ad + d, 0.0f);
                weighted_row_sum(rows.data(), weights.data(), m, d, ad);
              }
            }
            if (dvalues) {  // dpre = dvalues where the value is positive: db_enc and the encoder row
              float acc_b = 0;
              for (int64_t p = 0; p < m; ++p) {
                weights[p] = values[seg[p]] > 0.0f ? dvalues[seg[p]] : 0.0f;
                acc_b += weights[p];
                rows[p] = xin ? xin + seg_row[p] * d : nullptr;
              }
              if (dW_enc.base) {
                std::fill(ae, ae + d, 0.0f);
                weighted_row_sum(rows.data(), weights.data(), m, d, ae);
              }
              if (db_enc) db_enc[dense_rows ? lat[g] : g] = acc_b;
            }
            continue;
          }
        }
        if (dW_dec.base && dec_direct) std::fill(ad, ad + d, acc_t(0));
        if (dW_enc.base && enc_direct) std::fill(ae, ae + d, acc_t(0));
        acc_t acc_b = 0;
        const scalar_t* w = W_dec ? W_dec + lat[g] * d : nullptr;
        if (W_dec && g + 1 < u) prefetch(W_dec + lat[g + 1] * d, d);
        for (int64_t p = off[g]; p < off[g + 1]; ++p) {
          const int64_t e = ord[p], b = row_of[p];
          if (p + 1 < entries) {  // the next entry's rows (its segment's, or the next segment's first)
            const int64_t nb = row_of[p + 1];
            if (dW_dec.base || W_dec) prefetch(grad + nb * d, d);
            if (dW_enc.base) prefetch(xin + nb * d, d);
          }
          if (w) dvalues[e] = static_cast<scalar_t>(dot_acc<acc_t>(grad + b * d, w, d));
          if (dW_dec.base) axpy_acc<acc_t>(ad, static_cast<acc_t>(values[e]), grad + b * d, d);
          if (dvalues) {
            const acc_t dp = values[e] > scalar_t(0) ? static_cast<acc_t>(dvalues[e]) : acc_t(0);
            acc_b += dp;
            if (dW_enc.base) axpy_acc<acc_t>(ae, dp, xin + b * d, d);
          }
        }
        if (db_enc) db_enc[dense_rows ? lat[g] : g] = static_cast<scalar_t>(acc_b);
      }
      if (dW_dec.base && !dec_direct) write_rows(dW_dec, acc_dec.data(), g0, g1, lat, dense_rows, d);
      if (dW_enc.base && !enc_direct) write_rows(dW_enc, acc_enc.data(), g0, g1, lat, dense_rows, d);
    }
  });
}

// The touched columns of W_enc [d, n] as rows: out[g, i] = W_enc[i, latents[g]].
// Blocks of latents keep the strided writes within a few cache lines.
template <typename scalar_t>
void gather_columns_kernel(const scalar_t* W_enc, int64_t n, int64_t d, const int64_t* lat, int64_t u,
                           scalar_t* out) {
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (u + kBlock - 1) / kBlock, grain_for(kBlock * d), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = c * kBlock, g1 = std::min(u, g0 + kBlock);
      for (int64_t i = 0; i < d; ++i) {
        const scalar_t* wrow = W_enc + i * n;
        for (int64_t g = g0; g < g1; ++g) out[g * d + i] = wrow[lat[g]];
      }
    }
  });
}

// The inverse of gather_columns_kernel: W[i, lat[g]] = rows[g * d + i]. A block of latents
// reads its rows' cache lines once while the writes stay within a few lines per W row.
template <typename scalar_t>
void scatter_columns_kernel(scalar_t* W, int64_t n, int64_t d, const int64_t* lat, int64_t u, const scalar_t* rows) {
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (u + kBlock - 1) / kBlock, grain_for(kBlock * d), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = c * kBlock, g1 = std::min(u, g0 + kBlock);
      for (int64_t i = 0; i < d; ++i) {
        scalar_t* wrow = W + i * n;
        for (int64_t g = g0; g < g1; ++g) wrow[lat[g]] = rows[g * d + i];
      }
    }
  });
}

// dxin[b] = sum_s dpre[b,s] * cols[slot[b*k+s]], cols = gather_columns_kernel's rows.
template <typename scalar_t>
void dx_kernel(const scalar_t* values, const scalar_t* dvalues, const int64_t* slot,
               const scalar_t* cols, scalar_t* dx, int64_t B, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B, grain_for(k * d), [&](int64_t b0, int64_t b1) {
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
  at::parallel_for(0, d, grain_for(n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = static_cast<scalar_t>(-dot_acc<acc_t>(W_enc + i * n, db_enc, n));
  });
}

// ------------------------------------------------------------------ tensor-level wrappers
#define FASTSAE_DISPATCH(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (T).scalar_type(), NAME, __VA_ARGS__)

void segment_sums_cpu(const LatentCSR& csr, const SegmentSums& a) {
  const int64_t d = a.grad.defined() ? a.grad.size(1) : a.xin.size(1);
  FASTSAE_DISPATCH(a.values, "segment_sums", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    RowsOut<scalar_t> dec{ptr(a.dW_dec), d, 1};
    RowsOut<scalar_t> enc = a.enc_transposed && a.dW_enc.defined()
                                ? RowsOut<scalar_t>{ptr(a.dW_enc), 1, a.dW_enc.size(1)}
                                : RowsOut<scalar_t>{ptr(a.dW_enc), d, 1};
    segment_sums_kernel<scalar_t>(csr, d, a.dense_rows, a.values.data_ptr<scalar_t>(), ptr(a.grad),
                                  ptr(a.dvalues), ptr(a.xin), dec, enc, ptr(a.db_enc), ptr(a.W_dec));
  });
}

void gather_columns_cpu(const at::Tensor& W_enc, const at::Tensor& latents, const at::Tensor& out) {
  FASTSAE_DISPATCH(W_enc, "gather_columns", [&] {
    gather_columns_kernel<scalar_t>(W_enc.data_ptr<scalar_t>(), W_enc.size(1), W_enc.size(0),
                                    latents.data_ptr<int64_t>(), latents.numel(), out.data_ptr<scalar_t>());
  });
}

void dx_cpu(const at::Tensor& values, const at::Tensor& dvalues, const at::Tensor& slot, const at::Tensor& cols,
            const at::Tensor& out) {
  FASTSAE_DISPATCH(values, "dx", [&] {
    dx_kernel<scalar_t>(values.data_ptr<scalar_t>(), dvalues.data_ptr<scalar_t>(), slot.data_ptr<int64_t>(),
                        cols.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), values.size(0), values.size(1),
                        out.size(1));
  });
}

void neg_row_dots_cpu(const at::Tensor& W_enc, const at::Tensor& db_enc, const at::Tensor& out) {
  FASTSAE_DISPATCH(W_enc, "neg_row_dots", [&] {
    neg_row_dots_kernel<scalar_t>(W_enc.data_ptr<scalar_t>(), db_enc.data_ptr<scalar_t>(), W_enc.size(0),
                                  W_enc.size(1), out.data_ptr<scalar_t>());
  });
}

// out[b] += sum_s values[b,s] * W_dec[indices[b,s]] over the nonzero slots, in slot order.
template <typename scalar_t, typename acc_t>
void decode_kernel(const scalar_t* w, const acc_t* v, const int64_t* ix, int64_t B, int64_t k, int64_t d, acc_t* o) {
  at::parallel_for(0, B, grain_for(k * d), [&](int64_t b0, int64_t b1) {
    if constexpr (std::is_same_v<scalar_t, float>) {  // the row's nonzero slots, register-blocked
      std::vector<const float*> rows(k);
      std::vector<float> vals(k);
      for (int64_t b = b0; b < b1; ++b) {
        int64_t m = 0;
        for (int64_t s = 0; s < k; ++s)
          if (v[b * k + s] != 0.0f) {
            rows[m] = w + ix[b * k + s] * d;
            vals[m++] = v[b * k + s];
          }
        weighted_row_sum(rows.data(), vals.data(), m, d, o + b * d);
      }
    } else {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t s = 0; s < k; ++s) {
          const acc_t c = v[b * k + s];
          if (b * k + s + 1 < B * k) prefetch(w + ix[b * k + s + 1] * d, d);
          if (c != acc_t(0)) axpy_acc<acc_t>(o + b * d, c, w + ix[b * k + s] * d, d);
        }
    }
  });
}

void decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                const at::Tensor& out) {
  FASTSAE_DISPATCH(W_dec, "sparse_decode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    decode_kernel<scalar_t, acc_t>(W_dec.data_ptr<scalar_t>(), values.data_ptr<acc_t>(), indices.data_ptr<int64_t>(),
                                   indices.size(0), indices.size(1), W_dec.size(1), out.data_ptr<acc_t>());
  });
}

}  // namespace

void scatter_columns_cpu(const at::Tensor& dst, const at::Tensor& latents, const at::Tensor& rows) {
  FASTSAE_DISPATCH(dst, "scatter_columns", [&] {
    scatter_columns_kernel<scalar_t>(dst.data_ptr<scalar_t>(), dst.size(1), dst.size(0), latents.data_ptr<int64_t>(),
                                     latents.numel(), rows.data_ptr<scalar_t>());
  });
}

const SparseKernels& cpu_kernels() {
  // no dvalues kernel: segment_sums computes dvalues in its walk (SegmentSums::W_dec)
  static const SparseKernels table{&csr_by_latent, nullptr, &segment_sums_cpu, &gather_columns_cpu,
                                   &dx_cpu, &neg_row_dots_cpu, &decode_cpu};
  return table;
}

}  // namespace fastsae
