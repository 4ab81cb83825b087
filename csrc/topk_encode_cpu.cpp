// Fused, chunked TopK encoder on CPU: values/indices of the k largest pre-activations per row,
// pre = (x - b_dec) @ W_enc + b_enc, without ever holding the [B, d_sae] pre-activations.
//
// The work is cut into tasks (a block of rows x a range of latents). A task computes one
// cache-sized tile pre[rows, chunk] at a time with a BLAS call on sub-matrices, then merges
// the tile into each row's running top-k (a buffer cut to the k best when full): one vector
// pass per row adds b_enc and lists the entries at or above the row's threshold (its bar, or
// a bound from group maxima before the first cut), and only those are offered. When the
// latents are split across several tasks (few rows, many threads), their partial top-k lists
// are merged at the end. Ties are broken toward the smaller latent id; NaN ranks highest, as
// in torch.topk.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "row_math.h"

namespace fastsae {
namespace {

constexpr int64_t kRowBlock = 512;   // rows per task: MKL packs a tile's W_enc panel once per 512 rows
constexpr int64_t kChunk = 256;      // latents per tile: 512 x 256 fp32 = 512 KiB

// An entry (value, latent id) of a running top-k, ranked "a before b": larger value first, NaN
// above everything, then smaller id (as torch.topk ranks, with ties broken toward smaller ids).
template <typename acc_t>
struct Entry {
  acc_t v;
  int64_t id;
  static Entry make(acc_t value, int64_t index) { return {value, index}; }
  acc_t value() const { return v; }
  int64_t index() const { return id; }
};

template <typename acc_t>
inline bool ranks_before(const Entry<acc_t>& a, const Entry<acc_t>& b) {
  const bool an = std::isnan(a.v), bn = std::isnan(b.v);
  if (an != bn) return an;
  if (!an && a.v != b.v) return a.v > b.v;
  return a.id < b.id;
}

// The same ranking for fp32 sums and ids below 2^32, as one unsigned 64-bit key: the value's
// bits mapped to an order-preserving uint32 (NaN on top, -0 as +0) above the id's complement.
// One integer compare instead of the NaN-aware comparator, and a selection on plain integers:
// the cuts are most of a top-k's selection once k reaches AuxK's hundreds.
struct Key32 {
  uint64_t key;
  Key32() {}  // left unset: a running top-k's buffer grows by the entries written next
  explicit Key32(uint64_t k) : key(k) {}
  static uint32_t order_bits(float v) {  // without branches: they mispredict on random values
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    u = u == 0x80000000u ? 0u : u;  // -0 as +0 (by its bits: no float op a denormal mode could change)
    const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;
    return std::isnan(v) ? 0xFFFFFFFFu : u ^ flip;  // +inf maps to 0xFF800000
  }
  static Key32 make(float value, int64_t index) {
    return Key32((static_cast<uint64_t>(order_bits(value)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index)));
  }
  float value() const {
    const uint32_t o = static_cast<uint32_t>(key >> 32);
    if (o == 0xFFFFFFFFu) return std::numeric_limits<float>::quiet_NaN();
    const uint32_t u = (o & 0x80000000u) ? (o & 0x7FFFFFFFu) : ~o;
    float v;
    std::memcpy(&v, &u, sizeof v);
    return v;
  }
  int64_t index() const { return 0xFFFFFFFFu - static_cast<uint32_t>(key); }
};

inline bool ranks_before(const Key32& a, const Key32& b) { return a.key > b.key; }

// The entry a per-row top-k over latent ids uses: the packed key for fp32 sums (fp32, fp16
// and bf16 weights), the pair for fp64.
template <typename acc_t>
using RowEntry = std::conditional_t<std::is_same_v<acc_t, float>, Key32, Entry<acc_t>>;
constexpr int64_t kMaxPackedId = int64_t(1) << 32;

template <typename E>
struct RankFirst {
  bool operator()(const E& a, const E& b) const { return ranks_before(a, b); }
};

// The k best of a[0..n) (n > k >= 1) moved to the front in no particular order, the k-th best
// at a[k-1]: row_math's select_largest on the packed keys; nth_element for fp64's pairs.
template <typename E>
void select_best(E* a, int64_t n, int64_t k) {
  if constexpr (std::is_same_v<E, Key32>) {
    static_assert(sizeof(Key32) == sizeof(uint64_t));
    select_largest(reinterpret_cast<uint64_t*>(a), n, k);
  } else {
    std::nth_element(a, a + (k - 1), a + n, RankFirst<E>{});
  }
}

// A row's running top-k: a buffer that holds a superset of the k best entries offered so far.
// Once it holds 2k + 16 entries or more it is cut to the k best (select_best), whose worst
// becomes the bar a new entry must clear. Amortised O(1) per accepted entry, where a heap pays
// O(log k): AuxK's k_aux (hundreds) made the heap the larger part of the selection.
template <typename E>
struct RunningTopK {
  using value_t = decltype(std::declval<E>().value());
  std::vector<E> best;
  E bar = E::make(0, 0);  // the k-th best at the last cut (meaningful once `cut`)
  value_t bar_v = 0;    // its value: what a scan compares against
  bool cut = false;
  // A value the k best are known to reach (kth_lower_bound of a tile already seen): entries
  // below it need no look, even before the first cut.
  value_t floor = -std::numeric_limits<value_t>::infinity();

  void offer(const E& e, int64_t k) {
    if (cut && !ranks_before(e, bar)) return;
    best.push_back(e);
    cut_if_full(k);
  }

  // offer() of make(0..m-1), with one check for a full buffer at the end: the entries that
  // clear the bar are appended without a branch each. The k best come out the same (a cut
  // between them would only have dropped entries that k others outrank).
  template <typename Make>
  void offer_many(int64_t m, const Make& make, int64_t k) {
    const size_t n0 = best.size();
    best.resize(n0 + m);
    E* out = best.data() + n0;
    int64_t kept = m;
    if (cut) {
      kept = 0;
      for (int64_t i = 0; i < m; ++i) {
        const E e = make(i);
        out[kept] = e;
        kept += ranks_before(e, bar);
      }
    } else {
      for (int64_t i = 0; i < m; ++i) out[i] = make(i);
    }
    best.resize(n0 + kept);
    cut_if_full(k);
  }

  void cut_if_full(int64_t k) {
    if (static_cast<int64_t>(best.size()) < 2 * k + 16) return;
    select_best(best.data(), static_cast<int64_t>(best.size()), k);
    best.resize(k);
    bar = best[k - 1];
    bar_v = bar.value();
    cut = true;
  }

  // The least value an entry of a larger id than those offered may have and still enter: one
  // equal to the bar ranks below it. NaN (a NaN bar) lets every entry through to offer_many().
  value_t threshold() const {
    if (!cut) return floor;
    const value_t above = std::nextafter(bar_v, std::numeric_limits<value_t>::infinity());
    return above < floor ? floor : above;
  }
};

// Merge one row of pre-activations (latent ids id_of(0..width-1), ascending) into its top-k.
// bias (the row's b_enc, or null when the row holds it already) is added here, in the scan.
// Until the first cut, the row's group-maxima bound raises the floor; one vector pass lists
// the entries at or above the threshold, and only those are offered (offer_many() checks
// them against the bar again: the threshold passes every entry when the bar is NaN).
template <typename scalar_t, typename E, typename Ids>
void merge_row(const scalar_t* row, const typename RunningTopK<E>::value_t* bias, int64_t width, const Ids& id_of,
               int64_t k, RunningTopK<E>& st, int32_t* candidates) {
  using acc_t = typename RunningTopK<E>::value_t;
  if (!st.cut) {  // after a cut the bar is the k-th of many tiles: one tile's bound is below it
    const acc_t bound = kth_lower_bound_acc<acc_t>(row, bias, width, k);
    if (bound > st.floor) st.floor = bound;
  }
  const int64_t m = collect_at_least_acc<acc_t>(row, bias, width, st.threshold(), candidates);
  st.offer_many(
      m,
      [&](int64_t i) {
        const int64_t c = candidates[i];
        const acc_t v = bias ? static_cast<acc_t>(row[c]) + bias[c] : static_cast<acc_t>(row[c]);
        return E::make(v, id_of(c));
      },
      k);
}

// Merge one tile pre[rows, width] (latent ids first_id..first_id+width-1) into the rows' top-k.
template <typename scalar_t, typename E>
void merge_tile(const scalar_t* tile, const typename RunningTopK<E>::value_t* bias, int64_t rows, int64_t width,
                int64_t first_id, int64_t k, RunningTopK<E>* state, int32_t* candidates) {
  const auto id_of = [first_id](int64_t c) { return first_id + c; };
  for (int64_t r = 0; r < rows; ++r) merge_row(tile + r * width, bias, width, id_of, k, state[r], candidates);
}

// Checks shared by the encoders; returns xin = x - b_dec (or x), detached and contiguous.
at::Tensor checked_encoder_input(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                                 const std::optional<at::Tensor>& b_dec, const char* op) {
  check_float_matrix(x, "x", op);
  check_float_matrix(W_enc, "W_enc", op);
  const int64_t d = W_enc.size(0), n = W_enc.size(1);
  check_shape2(x, -1, d, "x (its last dimension must be W_enc.shape[0])", op);
  check_vector(b_enc, n, "b_enc", op);
  check_same_dtype(x, W_enc, "x", "W_enc", op);
  check_same_dtype(b_enc, W_enc, "b_enc", "W_enc", op);
  check_same_device(x, W_enc, "x", "W_enc", op);
  check_same_device(b_enc, W_enc, "b_enc", "W_enc", op);
  check_b_dec(b_dec, d, W_enc, op);
  // Worker threads do not inherit this thread's dispatch state: detach what they use.
  return encoder_input(x, b_dec).detach();
}

// Computes pre = xin @ W + bias tile by tile and calls visit(tile, r0, rows, c0, width, part)
// for each: rows r0.. and latents c0.. of latent part `part`. Tasks (row block, part) run in
// parallel; a task owns its rows within its part, so per-(part, row) state needs no locks.
struct TilePlan {
  int64_t B, n, row_blocks, parts, chunks_per_part;
  TilePlan(int64_t B_, int64_t n_) : B(B_), n(n_) {
    row_blocks = (B + kRowBlock - 1) / kRowBlock;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    // Split the latents too when there are fewer row blocks than threads.
    const int64_t blocks = std::max<int64_t>(row_blocks, 1);  // B = 0 is a valid, empty batch
    parts = std::max<int64_t>(1, std::min(chunks, (at::get_num_threads() + blocks - 1) / blocks));
    chunks_per_part = (chunks + parts - 1) / parts;
  }
};

// An undefined bias: the tiles hold xin @ W alone (the visitor adds the bias).
template <typename scalar_t, typename Visit>
void for_each_tile(const TilePlan& plan, const at::Tensor& xin, const at::Tensor& W, const at::Tensor& bias,
                   const Visit& visit) {
  const bool with_bias = bias.defined();
  const at::Tensor Wd = W.contiguous().detach(), bd = with_bias ? bias.contiguous().detach() : bias;
  at::parallel_for(0, plan.row_blocks * plan.parts, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView worker_below_autograd;
    auto tile = at::empty({kRowBlock * kChunk}, Wd.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = t / plan.parts, p = t % plan.parts;
      const int64_t r0 = rb * kRowBlock, rows = std::min(kRowBlock, plan.B - r0);
      const int64_t c_begin = p * plan.chunks_per_part * kChunk;
      const int64_t c_end = std::min(plan.n, (p + 1) * plan.chunks_per_part * kChunk);
      auto xrows = xin.narrow(0, r0, rows);
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kChunk) {
        const int64_t width = std::min(kChunk, c_end - c0);
        auto out = tile.narrow(0, 0, rows * width).view({rows, width});
        if (with_bias)
          at::addmm_out(out, bd.narrow(0, c0, width), xrows, Wd.narrow(1, c0, width));
        else
          at::mm_out(out, xrows, Wd.narrow(1, c0, width));
        visit(static_cast<const scalar_t*>(out.data_ptr<scalar_t>()), r0, rows, c0, width, p);
      }
    }
  });
}

#define FASTSAE_DISPATCH(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (T).scalar_type(), NAME, __VA_ARGS__)

// Per-row lists of (value, latent) as a padded [B, m] pair, m = the longest list; padding
// is value 0 at latent 0, which adds nothing when decoded or differentiated.
template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> pack_rows(const std::vector<std::vector<Entry<acc_t>>>& rows,
                                             const at::TensorOptions& opts) {
  const int64_t B = static_cast<int64_t>(rows.size());
  int64_t m = 0;
  for (const auto& r : rows) m = std::max<int64_t>(m, static_cast<int64_t>(r.size()));
  auto values = at::zeros({B, m}, opts);
  auto indices = at::zeros({B, m}, opts.dtype(at::kLong));
  scalar_t* vo = values.data_ptr<scalar_t>();
  int64_t* io = indices.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (size_t s = 0; s < rows[b].size(); ++s) {
      vo[b * m + s] = static_cast<scalar_t>(rows[b][s].v);
      io[b * m + s] = rows[b][s].id;
    }
  return {values, indices};
}

}  // namespace

namespace {

// Row b's k best of the parts' partial lists, ReLU'd, into vo/io [B, k]: best first when
// `ranked`, else in the (deterministic) order the selection leaves them.
template <typename scalar_t, typename E>
void write_best(const std::vector<std::vector<RunningTopK<E>>>& partial, int64_t B, int64_t k, bool ranked,
                scalar_t* vo, int64_t* io) {
  using acc_t = typename RunningTopK<E>::value_t;
  if (k == 0) return;
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    std::vector<E> all;
    for (int64_t b = b0; b < b1; ++b) {
      all.clear();
      for (const auto& part : partial) all.insert(all.end(), part[b].best.begin(), part[b].best.end());
      if (static_cast<int64_t>(all.size()) > k)
        select_best(all.data(), static_cast<int64_t>(all.size()), k);
      if (ranked) std::sort(all.begin(), all.begin() + k, RankFirst<E>{});
      for (int64_t s = 0; s < k; ++s) {
        const acc_t v = all[s].value();
        vo[b * k + s] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);  // ReLU, NaN kept
        io[b * k + s] = all[s].index();
      }
    }
  });
}

// Merge the tile's columns listed in dead[lo, hi) (ascending latent ids) into the rows' top-k:
// each row's dead entries gathered (b_enc added) into `gathered`, then merged as a row.
template <typename scalar_t, typename E>
void merge_dead(const scalar_t* tile, const typename RunningTopK<E>::value_t* bias, int64_t rows, int64_t width,
                int64_t first_id, const int64_t* dead, int64_t lo, int64_t hi, int64_t k, RunningTopK<E>* state,
                typename RunningTopK<E>::value_t* gathered, int32_t* candidates) {
  using acc_t = typename RunningTopK<E>::value_t;
  const auto id_of = [dead, lo](int64_t i) { return dead[lo + i]; };
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = tile + r * width;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t c = dead[i] - first_id;
      gathered[i - lo] = bias ? static_cast<acc_t>(row[c]) + bias[c] : static_cast<acc_t>(row[c]);
    }
    merge_row(static_cast<const acc_t*>(gathered), static_cast<const acc_t*>(nullptr), hi - lo, id_of, k, state[r],
              candidates);
  }
}

// topk_encode, and with dead ids (ascending) also each row's k_aux best among those latents.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> encode_with_dead(
    const char* op, const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
    const std::optional<at::Tensor>& b_dec, int64_t k, const at::Tensor& dead, int64_t k_aux) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the gradient is registered separately
  auto xin = checked_encoder_input(x, W_enc, b_enc, b_dec, op);
  const int64_t B = x.size(0), n = W_enc.size(1), m = dead.numel();
  TORCH_CHECK(k >= 0 && k <= n, op, ": k must lie in [0, d_sae=", n, "], got k=", k);
  TORCH_CHECK(k_aux >= 0, op, ": k_aux must be >= 0, got k_aux=", k_aux);
  TORCH_CHECK(n <= kMaxPackedId, op, ": d_sae must be at most 2^32, got ", n);
  const int64_t ka = std::min(k_aux, m);
  auto values = at::empty({B, k}, x.options());
  auto indices = at::empty({B, k}, x.options().dtype(at::kLong));
  auto dvalues = at::empty({B, ka}, x.options());
  auto dindices = at::empty({B, ka}, x.options().dtype(at::kLong));
  if (B == 0 || (k == 0 && ka == 0)) return {values, indices, dvalues, dindices};
  const TilePlan plan(B, n);
  const int64_t* dd = dead.data_ptr<int64_t>();
  // dead[chunk_lo[c] : chunk_lo[c+1]] are the dead ids of column chunk c
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> chunk_lo(chunks + 1, m);
  for (int64_t c = 0, i = 0; c < chunks; ++c) {
    while (i < m && dd[i] < c * kChunk) ++i;
    chunk_lo[c] = i;
  }

  FASTSAE_DISPATCH(W_enc, "topk_encode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Top = RunningTopK<RowEntry<acc_t>>;
    // partial[p][b]: row b's top-k among the latents of part p (aux: among its dead latents).
    std::vector<std::vector<Top>> partial(plan.parts, std::vector<Top>(k ? B : 0));
    std::vector<std::vector<Top>> aux(plan.parts, std::vector<Top>(ka ? B : 0));
    // Where the sums are kept at the weights' precision, the scan adds b_enc itself (one add,
    // as mm then + b_enc rounds); fp16/bf16 tiles take it in the GEMM, rounded there.
    constexpr bool scan_adds_bias = std::is_same_v<scalar_t, acc_t>;
    const at::Tensor bias = b_enc.detach().contiguous();
    const acc_t* bias_all = scan_adds_bias ? reinterpret_cast<const acc_t*>(bias.data_ptr<scalar_t>()) : nullptr;
    std::vector<std::vector<int32_t>> candidates(at::get_num_threads(), std::vector<int32_t>(kChunk));
    std::vector<std::vector<acc_t>> gathered(ka ? at::get_num_threads() : 0, std::vector<acc_t>(kChunk));
    for_each_tile<scalar_t>(
        plan, xin, W_enc, scan_adds_bias ? at::Tensor() : b_enc,
        [&](const scalar_t* tile, int64_t r0, int64_t rows, int64_t c0, int64_t width, int64_t p) {
          const acc_t* b = bias_all ? bias_all + c0 : nullptr;
          if (k)
            merge_tile(tile, b, rows, width, c0, k, partial[p].data() + r0,
                       candidates[at::get_thread_num()].data());
          const int64_t c = c0 / kChunk;
          if (ka && chunk_lo[c] < chunk_lo[c + 1])
            merge_dead(tile, b, rows, width, c0, dd, chunk_lo[c], chunk_lo[c + 1], ka, aux[p].data() + r0,
                       gathered[at::get_thread_num()].data(), candidates[at::get_thread_num()].data());
        });
    write_best(partial, B, k, true, values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
    // AuxK's selection is summed (decoded, differentiated), never read in rank order
    write_best(aux, B, ka, false, dvalues.data_ptr<scalar_t>(), dindices.data_ptr<int64_t>());
  });
  return {values, indices, dvalues, dindices};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                   const at::Tensor& b_enc,
                                                   const std::optional<at::Tensor>& b_dec, int64_t k) {
  auto none = at::empty({0}, W_enc.options().dtype(at::kLong));
  auto [values, indices, dv, di] = encode_with_dead("topk_encode", x, W_enc, b_enc, b_dec, k, none, 0);
  return {values, indices};
}

// topk_encode plus AuxK's selection in the same pass over the pre-activations: each row's
// k_aux largest ReLU'd pre-activations among the `dead` latent ids (ascending, unique), as
// (values, latent ids) [B, min(k_aux, #dead)], chosen as topk_encode ranks (ties toward the
// smaller id, NaN highest) but in no particular order within a row.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_dead_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const std::optional<at::Tensor>& b_dec,
    int64_t k, const at::Tensor& dead, int64_t k_aux) {
  const char* op = "topk_encode_dead";
  TORCH_CHECK(dead.dim() == 1 && dead.scalar_type() == at::kLong && dead.device() == W_enc.device(), op,
              ": dead must be a 1-D int64 tensor of latent ids on ", W_enc.device(), ", got ", dead.scalar_type(),
              " of shape ", dead.sizes(), " on ", dead.device());
  const auto ids = dead.contiguous();
  const int64_t* dd = ids.data_ptr<int64_t>();
  const int64_t n = W_enc.size(1);
  for (int64_t i = 0; i < ids.numel(); ++i)
    TORCH_CHECK(dd[i] >= 0 && dd[i] < n && (i == 0 || dd[i] > dd[i - 1]), op,
                ": dead must hold ascending, unique latent ids in [0, d_sae=", n, "); entry ", i, " is ", dd[i]);
  return encode_with_dead(op, x, W_enc, b_enc, b_dec, k, ids, k_aux);
}

// BatchTopK: the B*k largest ReLU'd pre-activations of the whole batch, as padded per-row lists.
// Each thread keeps one running top-(B*k) over the tiles it computes (ids b*n + j); they are
// merged at the end. (value, id) is a strict order, so the kept set does not depend
// on how the work was split.
std::tuple<at::Tensor, at::Tensor> batchtopk_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                        const at::Tensor& b_enc,
                                                        const std::optional<at::Tensor>& b_dec, int64_t k) {
  const char* op = "batchtopk_encode";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto xin = checked_encoder_input(x, W_enc, b_enc, b_dec, op);
  const int64_t B = x.size(0), n = W_enc.size(1);
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got k=", k);
  const int64_t keep = std::min(B * k, B * n);
  const TilePlan plan(B, n);
  std::tuple<at::Tensor, at::Tensor> out;

  FASTSAE_DISPATCH(W_enc, "batchtopk_encode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<RunningTopK<Entry<acc_t>>> tops(at::get_num_threads());
    if (keep > 0)
      for_each_tile<scalar_t>(plan, xin, W_enc, b_enc,
                              [&](const scalar_t* tile, int64_t r0, int64_t rows, int64_t c0, int64_t width, int64_t) {
                                RunningTopK<Entry<acc_t>>& h = tops[at::get_thread_num()];
                                for (int64_t r = 0; r < rows; ++r) {
                                  const scalar_t* row = tile + r * width;
                                  const int64_t base = (r0 + r) * n + c0;
                                  // Only positive entries can be kept (ReLU, then > 0). An entry
                                  // equal to a positive bar is offered too: the ids of a thread's
                                  // stream do not ascend (rows interleave with chunks), so a tie
                                  // may rank first, and offer() decides by id.
                                  for (int64_t c = 0; c < width; ++c) {
                                    const acc_t bar = h.cut && h.bar_v > acc_t(0)
                                                          ? std::nextafter(h.bar_v, -std::numeric_limits<acc_t>::infinity())
                                                          : acc_t(0);
                                    c += find_above_acc<acc_t>(row + c, width - c, bar);
                                    if (c == width) break;
                                    h.offer(Entry<acc_t>::make(static_cast<acc_t>(row[c]), base + c), keep);
                                  }
                                }
                              });
    std::vector<Entry<acc_t>> all;
    for (const auto& h : tops) all.insert(all.end(), h.best.begin(), h.best.end());
    if (static_cast<int64_t>(all.size()) > keep) {
      std::nth_element(all.begin(), all.begin() + keep, all.end(), RankFirst<Entry<acc_t>>{});
      all.resize(keep);
    }
    std::sort(all.begin(), all.end(), RankFirst<Entry<acc_t>>{});
    std::vector<std::vector<Entry<acc_t>>> rows(B);
    for (const auto& e : all)
      if (e.v > acc_t(0)) rows[e.id / n].push_back({e.v, e.id % n});  // NaN and 0 are dropped, as relu()>0 does
    out = pack_rows<scalar_t, acc_t>(rows, x.options());
  });
  return out;
}

// Entries with pre > threshold (a scalar or one per latent), as padded per-row lists of pre.
std::tuple<at::Tensor, at::Tensor> threshold_encode_cpu(const at::Tensor& x, const at::Tensor& W_enc,
                                                        const at::Tensor& b_enc,
                                                        const std::optional<at::Tensor>& b_dec,
                                                        const at::Tensor& threshold) {
  const char* op = "threshold_encode";
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto xin = checked_encoder_input(x, W_enc, b_enc, b_dec, op);
  const int64_t B = x.size(0), n = W_enc.size(1);
  TORCH_CHECK(threshold.numel() == 1 || (threshold.dim() == 1 && threshold.size(0) == n), op,
              ": threshold must be a scalar or have shape [", n, "], got ", threshold.sizes());
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()), op, ": threshold must be a floating dtype, got ",
              threshold.scalar_type());
  check_same_device(threshold, W_enc, "threshold", "W_enc", op);
  const TilePlan plan(B, n);
  std::tuple<at::Tensor, at::Tensor> out;

  FASTSAE_DISPATCH(W_enc, "threshold_encode", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto th = threshold.detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous().reshape({-1});
    const acc_t* t = th.data_ptr<acc_t>();
    const bool scalar = th.numel() == 1;
    std::vector<std::vector<std::vector<Entry<acc_t>>>> kept(plan.parts, std::vector<std::vector<Entry<acc_t>>>(B));
    for_each_tile<scalar_t>(plan, xin, W_enc, b_enc,
                            [&](const scalar_t* tile, int64_t r0, int64_t rows, int64_t c0, int64_t width, int64_t p) {
                              for (int64_t r = 0; r < rows; ++r) {
                                const scalar_t* row = tile + r * width;
                                auto& list = kept[p][r0 + r];
                                for (int64_t c = 0; c < width; ++c) {
                                  const acc_t v = static_cast<acc_t>(row[c]);
                                  if (v > t[scalar ? 0 : c0 + c]) list.push_back({v, c0 + c});
                                }
                              }
                            });
    std::vector<std::vector<Entry<acc_t>>> rows(B);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = 0; p < plan.parts; ++p) rows[b].insert(rows[b].end(), kept[p][b].begin(), kept[p][b].end());
    out = pack_rows<scalar_t, acc_t>(rows, x.options());
  });
  return out;
}

}  // namespace fastsae

TORCH_LIBRARY_FRAGMENT(fastsae, m) {
  m.def("topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor? b_dec, int k) -> (Tensor, Tensor)");
  m.def(
      "topk_encode_dead(Tensor x, Tensor W_enc, Tensor b_enc, Tensor? b_dec, int k, Tensor dead, int k_aux) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def("batchtopk_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor? b_dec, int k) -> (Tensor, Tensor)");
  m.def(
      "threshold_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor? b_dec, Tensor threshold) -> (Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(fastsae, CPU, m) {
  m.impl("topk_encode", &fastsae::topk_encode_cpu);
  m.impl("topk_encode_dead", &fastsae::topk_encode_dead_cpu);
  m.impl("batchtopk_encode", &fastsae::batchtopk_encode_cpu);
  m.impl("threshold_encode", &fastsae::threshold_encode_cpu);
}
