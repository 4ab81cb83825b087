// The dense optimizer's bookkeeping around torch's fused Adam, on CPU:
//   dense_grads_from_rows_: the dense fp32 gradient buffers of W_enc [d,n], b_enc [n] and
//       W_dec [n,d] from a row-sparse gradient (latents [u] ascending, rows [u,d] / [u]) in one
//       pass: untouched latents get zeros, touched ones their row, and, given the fp32 decoder
//       master, the decoder rows minus their component along the master row,
//       g - (<g,w> / max(<w,w>, 1e-24)) w   (constraints.remove_parallel_component_).
//   remove_parallel_component_: the same projection for a dense fp32 gradient [m,d] and its
//       rows [m,d] (a dense step()).
//   normalize_rows_: w /= max(||w||, 1e-12) for every row of a contiguous fp32 [n,d] matrix
//       (constraints.normalize_rows_).
//   adam_rows_step_: dense Adam on W_enc, b_enc, W_dec, b_dec fed that row-sparse gradient
//       directly, bit for bit what dense_grads_from_rows_, torch's fused Adam kernel and
//       normalize_rows_ (unit_norm) give, without the gradient buffers: each column block's
//       or row's gradient is built in a small local buffer and stepped at once.
// As separate torch ops (zero, scatter, gather, projection, norm) these cost several times
// the Adam step itself. Every row (and column block) is written by one worker, summing in a
// fixed order: the results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "row_math.h"

namespace fastsae {
namespace {

// The encoder buffer [d, n] is written kCols columns (one 256-byte run per buffer row) at a
// time, from tiles of kPiece buffer rows (for_each_encoder_block).
constexpr int64_t kCols = 64;
constexpr int64_t kPiece = 128;
// Decoder rows per parallel chunk at the least.
constexpr int64_t kRows = 64;

// g -= (<g,w> / max(<w,w>, 1e-24)) w: the one definition of the C++ projection, shared by
// both ops below, so a dense step() and step_row_sparse give the same bits.
inline void remove_parallel(float* g, const float* w, int64_t d) {
  const float inv_sq = 1.0f / std::max(dot(w, w, d), 1e-24f);
  axpy(g, -(dot(g, w, d) * inv_sq), w, d);
}

// w /= max(||w||, 1e-12), a division as torch's normalize does.
inline void normalize_row(float* w, int64_t d) { divide(w, std::max(std::sqrt(dot(w, w, d)), 1e-12f), d); }

template <typename scalar_t>
inline void to_float(float* out, const scalar_t* in, int64_t d) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(out, in, d * sizeof(float));
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(in[i]);
  }
}

// first[c]: the first slot g with lat[g] >= c * width (latents ascend), c = 0..chunks.
std::vector<int64_t> chunk_starts(const int64_t* lat, int64_t u, int64_t chunks, int64_t width) {
  std::vector<int64_t> first(chunks + 1);
  for (int64_t c = 0, g = 0; c <= chunks; ++c) {
    while (g < u && lat[g] < c * width) ++g;
    first[c] = g;
  }
  return first;
}

// The encoder's gradient [d, n] from the rows [u, d] of the latents lat (ascending), in tiles
// of Piece gradient rows by Cols columns (the tiles in parallel): visit(j0, w, i0, h, tile,
// pitch) gets rows i0..i0+h-1 of columns j0..j0+w-1 in tile (rows padded to pitch, zeros
// where no latent fired), or tile = nullptr where none of those latents fired. The source
// rows are read sequentially into the tile: reading a source column instead (one value per
// row) misses the cache on nearly every value. The pitch is no power of two: that would
// crowd a source row's values into a few cache sets.
template <int64_t Cols, int64_t Piece, typename scalar_t, typename Visit>
void for_each_encoder_block(int64_t n, int64_t d, const int64_t* lat, int64_t u, const scalar_t* rows,
                            const Visit& visit) {
  constexpr int64_t Pitch = Cols + 16;
  const int64_t chunks = (n + Cols - 1) / Cols, pieces = (d + Piece - 1) / Piece;
  const std::vector<int64_t> first = chunk_starts(lat, u, chunks, Cols);
  at::parallel_for(0, chunks * pieces, grain_for(Cols * Piece), [&](int64_t t0, int64_t t1) {
    std::vector<float> tile(Piece * Pitch);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / pieces, j0 = c * Cols, w = std::min(n, j0 + Cols) - j0;
      const int64_t i0 = (t % pieces) * Piece, h = std::min(d, i0 + Piece) - i0;
      if (first[c] == first[c + 1]) {
        visit(j0, w, i0, h, static_cast<const float*>(nullptr), Pitch);
        continue;
      }
      for (int64_t i = 0; i < h; ++i) std::fill_n(tile.data() + i * Pitch, w, 0.0f);  // the part visit reads
      for (int64_t g = first[c]; g < first[c + 1]; ++g) {
        const scalar_t* src = rows + g * d + i0;
        prefetch(src + 2 * d, h);  // two rows ahead: a row's piece is too short to train the prefetcher
        float* dst = tile.data() + (lat[g] - j0);
        for (int64_t i = 0; i < h; ++i) dst[i * Pitch] = static_cast<float>(src[i]);
      }
      visit(j0, w, i0, h, static_cast<const float*>(tile.data()), Pitch);
    }
  });
}

template <typename scalar_t>
void encoder_columns(float* gW_enc, int64_t n, int64_t d, const int64_t* lat, int64_t u, const scalar_t* rows) {
  for_each_encoder_block<kCols, kPiece>(n, d, lat, u, rows, [&](int64_t j0, int64_t w, int64_t i0, int64_t h,
                                                                const float* tile, int64_t pitch) {
    for (int64_t i = 0; i < h; ++i) {
      float* out = gW_enc + (i0 + i) * n + j0;
      if (tile)
        std::memcpy(out, tile + i * pitch, w * sizeof(float));
      else
        std::memset(out, 0, w * sizeof(float));
    }
  });
}

template <typename scalar_t>
void decoder_rows(float* gb_enc, float* gW_dec, int64_t n, int64_t d, const int64_t* lat, int64_t u,
                  const scalar_t* rb_enc, const scalar_t* rW_dec, const float* master) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  const std::vector<int64_t> first = chunk_starts(lat, u, blocks, kRows);
  at::parallel_for(0, blocks, grain_for(kRows * d), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRows, r1 = std::min(n, r0 + kRows);
      int64_t g = first[b];
      for (int64_t j = r0; j < r1; ++j) {
        float* out = gW_dec + j * d;
        if (g == first[b + 1] || lat[g] != j) {
          gb_enc[j] = 0.0f;
          std::memset(out, 0, d * sizeof(float));
          continue;
        }
        gb_enc[j] = static_cast<float>(rb_enc[g]);
        if (g + 1 < first[b + 1]) {
          prefetch(rW_dec + (g + 1) * d, d);
          if (master != nullptr) prefetch(master + lat[g + 1] * d, d);
        }
        to_float(out, rW_dec + g * d, d);
        ++g;
        if (master != nullptr) remove_parallel(out, master + j * d, d);
      }
    }
  });
}

// adam_rows_step_'s passes. The encoder [d, n]: each gradient tile steps its block of W_enc in
// place. The tiles are much wider and shorter than encoder_columns' (kAdamCols x kAdamPiece,
// 260 KB): the step reads and writes three [d, n] tensors, which then stream in runs of up
// to 16 KB (measured at 384 x 4096: 3.5 ms a step against 4.4 ms with 512-column tiles).
constexpr int64_t kAdamCols = 4096, kAdamPiece = 16;

template <typename scalar_t>
void adam_encoder(float* W, float* m, float* v, int64_t n, int64_t d, const int64_t* lat, int64_t u,
                  const scalar_t* rows, const AdamScalars& s) {
  for_each_encoder_block<kAdamCols, kAdamPiece>(n, d, lat, u, rows, [&](int64_t j0, int64_t w, int64_t i0,
                                                                        int64_t h, const float* tile, int64_t pitch) {
    for (int64_t i = i0; i < i0 + h; ++i)
      adam_update(W + i * n + j0, m + i * n + j0, v + i * n + j0, tile ? tile + (i - i0) * pitch : nullptr, w, s);
  });
}

// The decoder [n, d] row by row (a fired row's gradient projected against its pre-step row
// when unit_norm, and the row normalised after the step), and b_enc [n] kRows at a time.
template <typename scalar_t>
void adam_decoder(float* W, float* m, float* v, float* b, float* mb, float* vb, int64_t n, int64_t d,
                  const int64_t* lat, int64_t u, const scalar_t* rb_enc, const scalar_t* rW_dec, bool unit_norm,
                  const AdamScalars& s_dec, const AdamScalars& s_b) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  const std::vector<int64_t> first = chunk_starts(lat, u, blocks, kRows);
  at::parallel_for(0, blocks, grain_for(kRows * d), [&](int64_t b0, int64_t b1) {
    std::vector<float> grad(d), gb(kRows);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRows, r1 = std::min(n, r0 + kRows);
      int64_t g = first[blk];
      for (int64_t j = r0; j < r1; ++j) {
        float* w = W + j * d;
        const bool fired = g < first[blk + 1] && lat[g] == j;
        gb[j - r0] = fired ? static_cast<float>(rb_enc[g]) : 0.0f;
        if (fired) {
          if (g + 1 < first[blk + 1]) prefetch(rW_dec + (g + 1) * d, d);
          to_float(grad.data(), rW_dec + g * d, d);
          ++g;
          if (unit_norm) remove_parallel(grad.data(), w, d);
        }
        adam_update(w, m + j * d, v + j * d, fired ? grad.data() : nullptr, d, s_dec);
        if (unit_norm) normalize_row(w, d);
      }
      adam_update(b + r0, mb + r0, vb + r0, gb.data(), r1 - r0, s_b);
    }
  });
}

void check_buffer(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

// latents: 1-D int64, strictly ascending, in [0, n): one serial scan.
void check_ascending_latents(const at::Tensor& latents, int64_t n, const char* op) {
  TORCH_CHECK(latents.dim() == 1 && latents.scalar_type() == at::kLong, op,
              ": latents must be a 1-D int64 tensor, got ", latents.scalar_type(), " of shape ", latents.sizes());
  TORCH_CHECK(latents.is_cpu(), op, ": latents must be a CPU tensor, got one on ", latents.device());
  const at::Tensor c = latents.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t g = 0, u = c.numel(); g < u; ++g) {
    TORCH_CHECK(p[g] >= 0 && p[g] < n, op, ": latent index out of range [0, ", n, "): got ", p[g], " at ", g);
    TORCH_CHECK(g == 0 || p[g] > p[g - 1], op, ": latents must be strictly ascending, got ", p[g - 1],
                " then ", p[g], " at ", g);
  }
}

// A row-sparse gradient of an [n, d] dictionary: latents strictly ascending in [0, n), rows
// [u, d] / [u] of one floating dtype, on the CPU. Returns u.
int64_t check_row_sparse(const at::Tensor& latents, const at::Tensor& rW_enc, const at::Tensor& rb_enc,
                         const at::Tensor& rW_dec, int64_t n, int64_t d, const char* op) {
  check_ascending_latents(latents, n, op);
  const int64_t u = latents.size(0);
  check_float_matrix(rW_dec, "rW_dec", op);
  check_shape2(rW_dec, u, d, "rW_dec", op);
  check_shape2(rW_enc, u, d, "rW_enc", op);
  check_vector(rb_enc, u, "rb_enc", op);
  check_same_dtype(rW_enc, rW_dec, "rW_enc", "rW_dec", op);
  check_same_dtype(rb_enc, rW_dec, "rb_enc", "rW_dec", op);
  for (auto& [t, name] : {std::pair{&rW_enc, "rW_enc"}, {&rb_enc, "rb_enc"}, {&rW_dec, "rW_dec"}})
    TORCH_CHECK(t->is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t->device());
  return u;
}

}  // namespace

void dense_grads_from_rows_(const at::Tensor& gW_enc, const at::Tensor& gb_enc, const at::Tensor& gW_dec,
                            const at::Tensor& latents, const at::Tensor& rW_enc, const at::Tensor& rb_enc,
                            const at::Tensor& rW_dec, const std::optional<at::Tensor>& W_dec_master) {
  const char* op = "dense_grads_from_rows_";
  TORCH_CHECK(gW_dec.dim() == 2, op, ": gW_dec must be 2-D [n, d], got shape ", gW_dec.sizes());
  const int64_t n = gW_dec.size(0), d = gW_dec.size(1);
  check_shape2(gW_enc, d, n, "gW_enc (gW_dec's transposed shape)", op);
  check_vector(gb_enc, n, "gb_enc", op);
  for (auto& [t, name] : {std::pair{&gW_enc, "gW_enc"}, {&gb_enc, "gb_enc"}, {&gW_dec, "gW_dec"}})
    check_buffer(*t, name, op);
  const int64_t u = check_row_sparse(latents, rW_enc, rb_enc, rW_dec, n, d, op);
  at::Tensor master;
  if (W_dec_master.has_value()) {
    master = W_dec_master->contiguous();
    check_shape2(master, n, d, "W_dec_master", op);
    TORCH_CHECK(master.scalar_type() == at::kFloat, op, ": W_dec_master must be float32, got ",
                master.scalar_type());
    TORCH_CHECK(master.is_cpu(), op, ": W_dec_master must be a CPU tensor, got one on ", master.device());
  }
  const at::Tensor lat = latents.contiguous(), e = rW_enc.contiguous(), b = rb_enc.contiguous(),
                   w = rW_dec.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dense_grads_from_rows_", [&] {
    const int64_t* l = lat.data_ptr<int64_t>();
    encoder_columns<scalar_t>(gW_enc.data_ptr<float>(), n, d, l, u, e.data_ptr<scalar_t>());
    decoder_rows<scalar_t>(gb_enc.data_ptr<float>(), gW_dec.data_ptr<float>(), n, d, l, u, b.data_ptr<scalar_t>(),
                           w.data_ptr<scalar_t>(), master.defined() ? master.data_ptr<float>() : nullptr);
  });
}

void adam_rows_step_(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     const at::Tensor& latents, const at::Tensor& rW_enc, const at::Tensor& rb_enc,
                     const at::Tensor& rW_dec, const at::Tensor& db_dec, at::ArrayRef<double> steps, double lr,
                     double beta1, double beta2, double eps, bool unit_norm) {
  const char* op = "adam_rows_step_";
  const char* names[] = {"W_enc", "b_enc", "W_dec", "b_dec"};
  TORCH_CHECK(params.size() == 4 && exp_avgs.size() == 4 && exp_avg_sqs.size() == 4 && steps.size() == 4, op,
              ": params, exp_avgs, exp_avg_sqs and steps must each hold W_enc, b_enc, W_dec, b_dec (4 entries)");
  TORCH_CHECK(params[2].dim() == 2, op, ": W_dec must be 2-D [n, d], got shape ", params[2].sizes());
  const int64_t n = params[2].size(0), d = params[2].size(1);
  for (int i = 0; i < 4; ++i) {
    const std::vector<int64_t> shape = i == 0 ? std::vector<int64_t>{d, n} : i == 1 ? std::vector<int64_t>{n}
                                       : i == 2 ? std::vector<int64_t>{n, d} : std::vector<int64_t>{d};
    for (const at::Tensor* t : {&params[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), op, ": ", names[i], "'s tensors must have shape ",
                  at::IntArrayRef(shape), ", got ", t->sizes());
      check_buffer(*t, names[i], op);
    }
  }
  const int64_t u = check_row_sparse(latents, rW_enc, rb_enc, rW_dec, n, d, op);
  check_vector(db_dec, d, "db_dec", op);
  check_buffer(db_dec, "db_dec", op);
  AdamScalars s[4];
  for (int i = 0; i < 4; ++i) s[i] = adam_scalars(lr, beta1, beta2, eps, steps[i]);
  auto ptr = [](const at::Tensor& t) { return t.data_ptr<float>(); };
  const at::Tensor lat = latents.contiguous(), e = rW_enc.contiguous(), b = rb_enc.contiguous(),
                   w = rW_dec.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "adam_rows_step_", [&] {
    const int64_t* l = lat.data_ptr<int64_t>();
    adam_encoder<scalar_t>(ptr(params[0]), ptr(exp_avgs[0]), ptr(exp_avg_sqs[0]), n, d, l, u,
                           e.data_ptr<scalar_t>(), s[0]);
    adam_decoder<scalar_t>(ptr(params[2]), ptr(exp_avgs[2]), ptr(exp_avg_sqs[2]), ptr(params[1]), ptr(exp_avgs[1]),
                           ptr(exp_avg_sqs[1]), n, d, l, u, b.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                           unit_norm, s[2], s[1]);
  });
  adam_update(ptr(params[3]), ptr(exp_avgs[3]), ptr(exp_avg_sqs[3]), db_dec.data_ptr<float>(), d, s[3]);
}

void remove_parallel_component_(const at::Tensor& grad, const at::Tensor& rows) {
  const char* op = "remove_parallel_component_";
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D [m, d], got shape ", grad.sizes());
  check_shape2(rows, grad.size(0), grad.size(1), "rows (grad's shape)", op);
  check_buffer(grad, "grad", op);
  check_buffer(rows, "rows", op);
  const int64_t m = grad.size(0), d = grad.size(1);
  float* g = grad.data_ptr<float>();
  const float* w = rows.data_ptr<float>();
  at::parallel_for(0, m, grain_for(3 * d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) remove_parallel(g + r * d, w + r * d, d);
  });
}

void normalize_rows_(const at::Tensor& weight) {
  const char* op = "normalize_rows_";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [n, d], got shape ", weight.sizes());
  check_buffer(weight, "weight", op);
  const int64_t n = weight.size(0), d = weight.size(1);
  float* p = weight.data_ptr<float>();
  at::parallel_for(0, n, grain_for(2 * d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) normalize_row(p + r * d, d);
  });
}

}  // namespace fastsae

TORCH_LIBRARY_FRAGMENT(fastsae, m) {
  m.def(
      "dense_grads_from_rows_(Tensor(a!) gW_enc, Tensor(b!) gb_enc, Tensor(c!) gW_dec, Tensor latents, "
      "Tensor rW_enc, Tensor rb_enc, Tensor rW_dec, Tensor? W_dec_master) -> ()");
  m.def(
      "adam_rows_step_(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor latents, "
      "Tensor rW_enc, Tensor rb_enc, Tensor rW_dec, Tensor db_dec, float[] steps, float lr, float beta1, "
      "float beta2, float eps, bool unit_norm) -> ()");
  m.def("remove_parallel_component_(Tensor(a!) grad, Tensor rows) -> ()");
  m.def("normalize_rows_(Tensor(a!) weight) -> ()");
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("dense_grads_from_rows_", &fastsae::dense_grads_from_rows_);
  m.impl("adam_rows_step_", &fastsae::adam_rows_step_);
  m.impl("remove_parallel_component_", &fastsae::remove_parallel_component_);
  m.impl("normalize_rows_", &fastsae::normalize_rows_);
}
