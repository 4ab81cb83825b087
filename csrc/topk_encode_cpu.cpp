// Fused, chunked TopK encoder on CPU: values/indices of the k largest pre-activations per row,
// pre = (x - b_dec) @ W_enc + b_enc, without ever holding the [B, d_sae] pre-activations.
//
// The work is cut into tasks (a block of rows x a range of latents). A task computes one
// cache-sized tile pre[rows, chunk] at a time with a BLAS call on sub-matrices, then merges
// the tile into each row's running top-k (a heap): only entries above the row's current k-th
// best are looked at again, so after the first chunks the merge is a vector compare per 16 entries. When the
// latents are split across several tasks (few rows, many threads), their partial top-k lists
// are merged at the end. Ties are broken toward the smaller latent id; NaN ranks highest, as
// in torch.topk.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "row_math.h"

namespace fastsae {
namespace {

constexpr int64_t kRowBlock = 128;   // rows per task
constexpr int64_t kChunk = 512;      // latents per tile: 128 x 512 fp32 = 256 KiB, fits L2

template <typename acc_t>
struct Entry {
  acc_t v;
  int64_t id;
};

// Strict weak order "a ranks before b": larger value first, NaN above everything, then smaller id.
template <typename acc_t>
inline bool ranks_before(const Entry<acc_t>& a, const Entry<acc_t>& b) {
  const bool an = std::isnan(a.v), bn = std::isnan(b.v);
  if (an != bn) return an;
  if (!an && a.v != b.v) return a.v > b.v;
  return a.id < b.id;
}

// A row's running top-k: a heap of at most k entries whose front is the worst kept one, so
// the bar a new entry must clear is best.front() and an insertion costs O(log k).
template <typename acc_t>
struct RunningTopK {
  std::vector<Entry<acc_t>> best;

  bool full(int64_t k) const { return static_cast<int64_t>(best.size()) == k; }

  void offer(const Entry<acc_t>& e, int64_t k) {
    if (!full(k)) {
      best.push_back(e);
      std::push_heap(best.begin(), best.end(), ranks_before<acc_t>);
    } else if (ranks_before(e, best.front())) {
      std::pop_heap(best.begin(), best.end(), ranks_before<acc_t>);
      best.back() = e;
      std::push_heap(best.begin(), best.end(), ranks_before<acc_t>);
    }
  }
};

// Merge one tile pre[rows, width] (latent ids first_id..first_id+width-1) into the rows' top-k.
template <typename scalar_t, typename acc_t>
void merge_tile(const scalar_t* tile, int64_t rows, int64_t width, int64_t first_id, int64_t k,
                RunningTopK<acc_t>* state) {
  for (int64_t r = 0; r < rows; ++r) {
    RunningTopK<acc_t>& st = state[r];
    const scalar_t* row = tile + r * width;
    int64_t c = 0;
    for (; c < width && !st.full(k); ++c) st.offer({static_cast<acc_t>(row[c]), first_id + c}, k);
    // Then only entries above the k-th best (or NaN) need a look; offer() settles ties.
    while (c < width) {
      c += find_above_acc<acc_t>(row + c, width - c, st.best.front().v);
      if (c == width) break;
      st.offer({static_cast<acc_t>(row[c]), first_id + c}, k);
      ++c;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const at::Tensor& b_enc,
                                                   const std::optional<at::Tensor>& b_dec, int64_t k) {
  const char* op = "topk_encode";
  check_float_matrix(x, "x", op);
  check_float_matrix(W_enc, "W_enc", op);
  const int64_t B = x.size(0), d = W_enc.size(0), n = W_enc.size(1);
  check_shape2(x, -1, d, "x (its last dimension must be W_enc.shape[0])", op);
  check_vector(b_enc, n, "b_enc", op);
  check_same_dtype(x, W_enc, "x", "W_enc", op);
  check_same_dtype(b_enc, W_enc, "b_enc", "W_enc", op);
  check_same_device(x, W_enc, "x", "W_enc", op);
  check_same_device(b_enc, W_enc, "b_enc", "W_enc", op);
  check_b_dec(b_dec, d, W_enc, op);
  TORCH_CHECK(k >= 0 && k <= n, op, ": k must lie in [0, d_sae=", n, "], got k=", k);

  auto values = at::empty({B, k}, x.options());
  auto indices = at::empty({B, k}, x.options().dtype(at::kLong));
  if (B == 0 || k == 0) return {values, indices};

  // No autograd inside (the op's gradient is registered separately). Worker threads do not
  // inherit this thread's dispatch state, so the tensors they use are detached as well.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto xin = (b_dec.has_value() ? x - *b_dec : x).contiguous().detach();
  auto W = W_enc.contiguous().detach();
  auto bias = b_enc.contiguous().detach();

  const int64_t row_blocks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // Split the latents too when there are fewer row blocks than threads.
  const int64_t parts = std::min(chunks, std::max<int64_t>(1, (at::get_num_threads() + row_blocks - 1) / row_blocks));
  const int64_t chunks_per_part = (chunks + parts - 1) / parts;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "topk_encode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // partial[p][b]: row b's top-k among the latents of part p.
    std::vector<std::vector<RunningTopK<acc_t>>> partial(parts, std::vector<RunningTopK<acc_t>>(B));

    at::parallel_for(0, row_blocks * parts, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView worker_below_autograd;
      auto tile = at::empty({kRowBlock * kChunk}, W.options());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t rb = t / parts, p = t % parts;
        const int64_t r0 = rb * kRowBlock, rows = std::min(kRowBlock, B - r0);
        const int64_t c_begin = p * chunks_per_part * kChunk;
        const int64_t c_end = std::min(n, (p + 1) * chunks_per_part * kChunk);
        auto xrows = xin.narrow(0, r0, rows);
        for (int64_t c0 = c_begin; c0 < c_end; c0 += kChunk) {
          const int64_t width = std::min(kChunk, c_end - c0);
          auto out = tile.narrow(0, 0, rows * width).view({rows, width});
          at::addmm_out(out, bias.narrow(0, c0, width), xrows, W.narrow(1, c0, width));
          merge_tile<scalar_t, acc_t>(out.data_ptr<scalar_t>(), rows, width, c0, k,
                                      partial[p].data() + r0);
        }
      }
    });

    scalar_t* vo = values.data_ptr<scalar_t>();
    int64_t* io = indices.data_ptr<int64_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      std::vector<Entry<acc_t>> all;
      for (int64_t b = b0; b < b1; ++b) {
        all.clear();
        for (int64_t p = 0; p < parts; ++p)
          all.insert(all.end(), partial[p][b].best.begin(), partial[p][b].best.end());
        std::partial_sort(all.begin(), all.begin() + k, all.end(), ranks_before<acc_t>);
        for (int64_t s = 0; s < k; ++s) {
          const acc_t v = all[s].v;
          vo[b * k + s] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);  // ReLU, NaN kept
          io[b * k + s] = all[s].id;
        }
      }
    });
  });
  return {values, indices};
}

}  // namespace fastsae

TORCH_LIBRARY_FRAGMENT(fastsae, m) {
  m.def("topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor? b_dec, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("topk_encode", &fastsae::topk_encode_cpu);
}
