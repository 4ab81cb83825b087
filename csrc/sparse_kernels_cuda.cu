// The CUDA table of sparse_kernels.h: plain, deterministic kernels (no float atomics; every
// output element is summed by one thread in a fixed order, warp/block reductions use a fixed
// tree). The CSR by latent comes from a stable sort instead of the CPU's counting sort: the
// same segments, the same entry order.
//
// Memory access is latent-major: W_enc [d, n] holds a latent's weights in a column (stride n),
// so the kernels that read or write per-latent columns (the gathered W_enc columns for dx, the
// dense-shaped dW_enc) go through a 32 x 32 shared-memory tile: reads along latents, writes
// along d, both coalesced. The per-latent segment sums write rows [u, d] (coalesced) and are
// launched heaviest segment first (blocks start roughly in index order), so a latent hit by
// many rows starts at once instead of setting the tail of the kernel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "sparse_kernels.h"

namespace fastsae {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t d) { return static_cast<unsigned>((d + kThreads - 1) / kThreads); }

#define FASTSAE_DISPATCH(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (T).scalar_type(), NAME, __VA_ARGS__)

template <typename T>
inline T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------------ kernels
template <typename scalar_t>
__global__ void dvalues_kernel(const scalar_t* grad, const int64_t* idx, const scalar_t* W, scalar_t* out,
                               int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t e = blockIdx.x, b = e / k;  // one warp per (row, slot)
  const scalar_t* g = grad + b * d;
  const scalar_t* w = W + idx[e] * d;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < d; i += 32) s += static_cast<acc_t>(g[i]) * static_cast<acc_t>(w[i]);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (threadIdx.x == 0) out[e] = static_cast<scalar_t>(s);
}

// Block (j, column tile): thread i sums column i of segment g = by_size[j] (heaviest first).
// dW_dec and dW_enc rows are written at row r (contiguous rows of d); dW_enc_rows may be a
// scratch [u, d] that transpose_rows_kernel then scatters into the dense [d, n] gradient.
template <typename scalar_t>
__global__ void segment_sums_kernel(const int64_t* lat, const int64_t* off, const int64_t* ord,
                                    const int64_t* by_size, int64_t k, int64_t d, bool dense_rows,
                                    bool enc_dense_rows, const scalar_t* values, const scalar_t* grad,
                                    const scalar_t* dvalues, const scalar_t* xin, scalar_t* dW_dec,
                                    scalar_t* dW_enc_rows, scalar_t* db_enc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t g = by_size[blockIdx.x];
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t r = dense_rows ? lat[g] : g;
  const int64_t re = enc_dense_rows ? lat[g] : g;
  const bool in_row = i < d;
  acc_t ad = 0, ae = 0, ab = 0;
  for (int64_t p = off[g]; p < off[g + 1]; ++p) {
    const int64_t e = ord[p], b = e / k;
    if (dW_dec && in_row) ad += static_cast<acc_t>(values[e]) * static_cast<acc_t>(grad[b * d + i]);
    if (dvalues) {
      const acc_t dp = static_cast<acc_t>(values[e]) > acc_t(0) ? static_cast<acc_t>(dvalues[e]) : acc_t(0);
      ab += dp;
      if (dW_enc_rows && in_row) ae += dp * static_cast<acc_t>(xin[b * d + i]);
    }
  }
  if (in_row) {
    if (dW_dec) dW_dec[r * d + i] = static_cast<scalar_t>(ad);
    if (dW_enc_rows) dW_enc_rows[re * d + i] = static_cast<scalar_t>(ae);
  }
  if (db_enc && blockIdx.y == 0 && threadIdx.x == 0) db_enc[r] = static_cast<scalar_t>(ab);
}

// Tiles of 32 latents x 32 dims, block (32, 8). gather: out[g, i] = W[i, lat[g]] (W [d, n]
// read along latents); scatter: W[i, lat[g]] = rows[g, i] (the transposed write). Latent ids
// are ascending, so neighbouring threads touch neighbouring columns when the latents are dense.
constexpr int kTile = 32;
constexpr int kTileRows = 8;

template <typename scalar_t>
__global__ void gather_columns_kernel(const scalar_t* W, int64_t n, int64_t d, const int64_t* lat, int64_t u,
                                      scalar_t* out) {
  __shared__ scalar_t tile[kTile][kTile + 1];  // +1: no bank conflicts on the transposed read
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * kTile, i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t g = g0 + threadIdx.x;
  const int64_t col = g < u ? lat[g] : 0;
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t i = i0 + r;
    if (g < u && i < d) tile[r][threadIdx.x] = W[i * n + col];
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t gg = g0 + r, i = i0 + threadIdx.x;
    if (gg < u && i < d) out[gg * d + i] = tile[threadIdx.x][r];
  }
}

template <typename scalar_t>
__global__ void scatter_columns_kernel(const scalar_t* rows, int64_t n, int64_t d, const int64_t* lat, int64_t u,
                                       scalar_t* W) {
  __shared__ scalar_t tile[kTile][kTile + 1];
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * kTile, i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t g = g0 + r, i = i0 + threadIdx.x;
    if (g < u && i < d) tile[r][threadIdx.x] = rows[g * d + i];
  }
  __syncthreads();
  const int64_t g = g0 + threadIdx.x;
  const int64_t col = g < u ? lat[g] : 0;
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t i = i0 + r;
    if (g < u && i < d) W[i * n + col] = tile[threadIdx.x][r];
  }
}

template <typename scalar_t>
__global__ void dx_kernel(const scalar_t* values, const scalar_t* dvalues, const int64_t* slot,
                          const scalar_t* cols, scalar_t* dx, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  acc_t s = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = b * k + j;
    if (static_cast<acc_t>(values[e]) > acc_t(0))
      s += static_cast<acc_t>(dvalues[e]) * static_cast<acc_t>(cols[slot[e] * d + i]);
  }
  dx[b * d + i] = static_cast<scalar_t>(s);
}

// One block per row i of W_enc: strided partial sums, then a fixed shared-memory tree.
template <typename scalar_t>
__global__ void neg_row_dots_kernel(const scalar_t* W, const scalar_t* db_enc, int64_t n, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part[kThreads];
  const scalar_t* row = W + static_cast<int64_t>(blockIdx.x) * n;
  acc_t s = 0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) s += static_cast<acc_t>(row[j]) * static_cast<acc_t>(db_enc[j]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<scalar_t>(-part[0]);
}

template <typename scalar_t>
__global__ void decode_kernel(const at::opmath_type<scalar_t>* values, const int64_t* idx, const scalar_t* W,
                              at::opmath_type<scalar_t>* out, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  acc_t s = out[b * d + i];
  for (int64_t j = 0; j < k; ++j) s += values[b * k + j] * static_cast<acc_t>(W[idx[b * k + j] * d + i]);
  out[b * d + i] = s;
}

// ------------------------------------------------------------------ tensor-level wrappers
LatentCSR csr_by_latent_cuda(const at::Tensor& indices, int64_t /*n*/) {
  c10::cuda::CUDAGuard guard(indices.device());
  auto flat = indices.reshape({-1});
  auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  LatentCSR csr;
  csr.order = std::get<1>(sorted);
  auto runs = at::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/true, /*return_counts=*/true);
  csr.latents = std::get<0>(runs);
  const at::Tensor& counts = std::get<2>(runs);
  csr.offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  csr.slot = at::empty_like(flat).scatter_(0, csr.order, std::get<1>(runs));
  const int64_t k = indices.dim() == 2 ? indices.size(1) : 1;
  csr.row = k > 0 ? at::div(csr.order, k, "floor") : csr.order.clone();
  return csr;
}

void dvalues_cuda(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& W_dec, const at::Tensor& out) {
  const int64_t E = indices.numel(), k = indices.size(1), d = W_dec.size(1);
  if (E == 0) return;
  c10::cuda::CUDAGuard guard(W_dec.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTSAE_DISPATCH(W_dec, "dvalues_cuda", [&] {
    dvalues_kernel<scalar_t><<<static_cast<unsigned>(E), 32, 0, stream>>>(
        grad.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), W_dec.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), k, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

inline dim3 tile_grid(int64_t u, int64_t d) {
  return dim3(static_cast<unsigned>((u + kTile - 1) / kTile), static_cast<unsigned>((d + kTile - 1) / kTile));
}

void segment_sums_cuda(const LatentCSR& csr, const SegmentSums& a) {
  const int64_t u = csr.latents.numel();
  const int64_t d = a.grad.defined() ? a.grad.size(1) : a.xin.size(1);
  if (u == 0 || d == 0) return;
  c10::cuda::CUDAGuard guard(a.values.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Heaviest segment first (stable: equal sizes keep latent order, so the launch is the same
  // from run to run; the order of blocks never changes a sum, each output has one thread).
  auto sizes = csr.offsets.slice(0, 1) - csr.offsets.slice(0, 0, u);
  auto by_size = std::get<1>(at::sort(sizes, /*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  // A dense-shaped dW_enc [d, n] takes its latents as columns: rows [u, d] first, then one
  // tiled transpose into the columns (coalesced both ways).
  const bool transposed = a.enc_transposed && a.dW_enc.defined();
  at::Tensor enc_rows = transposed ? at::empty({u, d}, a.dW_enc.options()) : a.dW_enc;
  FASTSAE_DISPATCH(a.values, "segment_sums_cuda", [&] {
    dim3 grid(static_cast<unsigned>(u), blocks_for(d));
    segment_sums_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        csr.latents.data_ptr<int64_t>(), csr.offsets.data_ptr<int64_t>(), csr.order.data_ptr<int64_t>(),
        by_size.data_ptr<int64_t>(), a.k, d, a.dense_rows, a.dense_rows && !transposed,
        a.values.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.grad), ptr_or_null<scalar_t>(a.dvalues),
        ptr_or_null<scalar_t>(a.xin), ptr_or_null<scalar_t>(a.dW_dec), ptr_or_null<scalar_t>(enc_rows),
        ptr_or_null<scalar_t>(a.db_enc));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (transposed) {
      scatter_columns_kernel<scalar_t><<<tile_grid(u, d), dim3(kTile, kTileRows), 0, stream>>>(
          enc_rows.data_ptr<scalar_t>(), a.dW_enc.size(1), d, csr.latents.data_ptr<int64_t>(), u,
          a.dW_enc.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void gather_columns_cuda(const at::Tensor& W_enc, const at::Tensor& latents, const at::Tensor& out) {
  const int64_t u = latents.numel(), d = W_enc.size(0);
  if (u == 0 || d == 0) return;
  c10::cuda::CUDAGuard guard(W_enc.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTSAE_DISPATCH(W_enc, "gather_columns_cuda", [&] {
    gather_columns_kernel<scalar_t><<<tile_grid(u, d), dim3(kTile, kTileRows), 0, stream>>>(
        W_enc.data_ptr<scalar_t>(), W_enc.size(1), d, latents.data_ptr<int64_t>(), u, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dx_cuda(const at::Tensor& values, const at::Tensor& dvalues, const at::Tensor& slot, const at::Tensor& cols,
             const at::Tensor& out) {
  const int64_t B = values.size(0), k = values.size(1), d = out.size(1);
  if (B == 0 || d == 0) return;
  c10::cuda::CUDAGuard guard(values.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTSAE_DISPATCH(values, "dx_cuda", [&] {
    dim3 grid(static_cast<unsigned>(B), blocks_for(d));
    dx_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(values.data_ptr<scalar_t>(), dvalues.data_ptr<scalar_t>(),
                                                       slot.data_ptr<int64_t>(), cols.data_ptr<scalar_t>(),
                                                       out.data_ptr<scalar_t>(), k, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void neg_row_dots_cuda(const at::Tensor& W_enc, const at::Tensor& db_enc, const at::Tensor& out) {
  const int64_t d = W_enc.size(0);
  if (d == 0) return;
  c10::cuda::CUDAGuard guard(W_enc.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTSAE_DISPATCH(W_enc, "neg_row_dots_cuda", [&] {
    neg_row_dots_kernel<scalar_t><<<static_cast<unsigned>(d), kThreads, 0, stream>>>(
        W_enc.data_ptr<scalar_t>(), db_enc.data_ptr<scalar_t>(), W_enc.size(1), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void decode_cuda(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec, const at::Tensor& out) {
  const int64_t B = indices.size(0), k = indices.size(1), d = W_dec.size(1);
  if (B == 0 || d == 0) return;
  c10::cuda::CUDAGuard guard(W_dec.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  FASTSAE_DISPATCH(W_dec, "sparse_decode_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dim3 grid(static_cast<unsigned>(B), blocks_for(d));
    decode_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(values.data_ptr<acc_t>(), indices.data_ptr<int64_t>(),
                                                           W_dec.data_ptr<scalar_t>(), out.data_ptr<acc_t>(), k, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

const SparseKernels& cuda_kernels() {
  static const SparseKernels table{&csr_by_latent_cuda, &dvalues_cuda, &segment_sums_cuda, &gather_columns_cuda,
                                   &dx_cuda, &neg_row_dots_cuda, &decode_cuda};
  return table;
}

}  // namespace fastsae
