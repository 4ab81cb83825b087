// Row primitives of the CPU kernels, y += a*x, x /= s, <a, b>, "first entry above t" and one
// Adam update, for fp32 (and fp64), and two inline helpers (prefetch, grain_for). row_math.cpp compiles the
// primitives for AVX-512, AVX2 and baseline x86-64 (the search with AVX2 intrinsics) and picks
// the best the CPU has at load time, so the build stays portable. Sums use fixed lanes combined
// in a fixed order: the same inputs give the same bits on a given machine. The environment
// variable FASTSAE_CPU_ISA=avx2 (or baseline) caps the hand-dispatched paths, for tests.
#pragma once
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastsae {

void axpy(float* y, float a, const float* x, int64_t n);
void axpy(double* y, double a, const double* x, int64_t n);
void divide(float* x, float s, int64_t n);  // x /= s (a division, not a multiply by 1/s)
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);
// Sums over a list of m rows (pointers to d floats), summed in list order: a sparse kernel's
// rows gathered by index. Each 64-float block of the result is accumulated in registers over
// the whole list and stored once (no read-modify-write of out per row), and the list's rows
// are loaded block by block, several rows' misses in flight at a time.
//   weighted_row_sum:  out += sum_p v[p] * rows[p]  (added to out's values in list order)
//   dots_and_weighted_sum: dv[p] = <rows[p], w> and out = sum_p v[p] * rows[p] (overwritten); scratch holds
//   16*m floats (each row's partial dot lanes, folded pairwise at the end).
void weighted_row_sum(const float* const* rows, const float* v, int64_t m, int64_t d, float* out);
void dots_and_weighted_sum(const float* const* rows, const float* v, int64_t m, const float* w, int64_t d,
                           float* dv, float* out, float* scratch);
// Transposed writes of fp32 rows, 8 x 8 blocks at a time (AVX2 shuffles where the CPU has
// them) instead of one scalar store per value, each into another row of the output:
//   rows_to_columns: dst[i * ld + cols[r] - col0] = src[r * ls + i] for r < m, i < h (cols
//   ascending): rows summed in a small buffer written into the columns of a [d, n] matrix.
//   Runs of 8+ consecutive column ids go by 8 x 8 blocks; the other rows by one pass per dst
//   row (h passes over src, which is meant to be cache-resident).
void rows_to_columns(const float* src, int64_t ls, int64_t m, int64_t h, const int64_t* cols, int64_t col0,
                     float* dst, int64_t ld);
// One Adam step over n fp32 entries in place, with the arithmetic of torch's fused CPU
// kernel (aten::_fused_adam_, fp32, no weight decay, amsgrad or maximize) in its vector body:
//   m' = fma(coeff, g - m, base)   (exp_avg.lerp_(g, 1 - beta1): coeff = w, base = m when
//                                   |w| < 0.5, else coeff = w - 1, base = g; w = f(1 - beta1))
//   v' = fma(f(1 - beta2) * g, g, v * f(beta2))
//   p' = p + (f(-lr / bc1) * m') / (sqrt(v') / f(sqrt(bc2)) + f(eps))
// with bc = 1 - beta^step and the scalars computed in double, then rounded to fp32 (f), as
// the kernel does. Each entry's result does not depend on the vector width, so the same
// bits come out on every path here. g null: a zero gradient.
struct AdamScalars {
  float coeff, beta2, sq_coeff, bc2_sqrt, neg_step, eps;
  bool base_is_grad;
};
AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, double step);
void adam_update(float* p, float* m, float* v, const float* g, int64_t n, const AdamScalars& s);

// The first i with x[i] > t or x[i] NaN, n if none.
int64_t find_above(const float* x, int64_t n, float t);
int64_t find_above(const double* x, int64_t n, double t);
// A top-k scan's two passes over a row of pre-activations v[i] = x[i] + bias[i] (bias may be
// null: v = x). collect_at_least writes the positions i with v[i] >= t or NaN to out (n
// slots) and returns how many. kth_lower_bound returns a value the k-th largest v is at least
// (NaN counting as largest): the least of the maxima of >= k disjoint groups of entries
// (entry i is in group (i % 8, which eighth-block set its vector falls in)); -inf when the row
// is too short for k groups of whole 8-entry vectors.
int64_t collect_at_least(const float* x, const float* bias, int64_t n, float t, int32_t* out);
float kth_lower_bound(const float* x, const float* bias, int64_t n, int64_t k);
// The k largest of a[0..n) (distinct keys, 1 <= k <= n) moved to a[0..k) in no particular
// order, the k-th largest at a[k-1]; a[k..n) is left unspecified. A quickselect whose
// partitions are branch-free (AVX2 compress by shuffle where the CPU has it): a running
// top-k's cut, 2.5-4x faster than the 8-bit radix selection it replaced at 100-1000 keys.
void select_largest(uint64_t* a, int64_t n, int64_t k);

// The same for mixed storage (fp16/bf16 rows summed in fp32): plain loops.
template <typename acc_t, typename scalar_t>
inline void axpy_acc(acc_t* y, acc_t a, const scalar_t* x, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    axpy(y, a, x, n);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<acc_t>(x[i]);
  }
}

template <typename acc_t, typename scalar_t>
inline acc_t dot_acc(const scalar_t* a, const scalar_t* b, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return dot(a, b, n);
  } else {
    acc_t s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
    return s;
  }
}

// Ask for the cache lines of p[0..count) ahead of a read: the rows of a sparse gather are
// scattered, and the hardware prefetcher only follows a row once its first lines have missed.
template <typename T>
inline void prefetch(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0, e = count * static_cast<int64_t>(sizeof(T)); b < e; b += 64) __builtin_prefetch(c + b);
}

// Items per at::parallel_for chunk so that a chunk holds at least ~32k operations: small inputs
// then run on the calling thread instead of waking (and waiting for) the whole pool.
inline int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kMinWork = 1 << 15;
  const int64_t w = work_per_item > 1 ? work_per_item : 1;
  return kMinWork / w > 1 ? kMinWork / w : 1;
}

// The portable scans (any storage type, summed in acc_t): fp64, fp16 and bf16 rows, and fp32
// on a CPU without AVX2.
template <typename acc_t, typename scalar_t>
inline int64_t collect_at_least_portable(const scalar_t* x, const acc_t* bias, int64_t n, acc_t t, int32_t* out) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = bias ? static_cast<acc_t>(x[i]) + bias[i] : static_cast<acc_t>(x[i]);
    if (!(v < t)) out[m++] = static_cast<int32_t>(i);
  }
  return m;
}

template <typename acc_t, typename scalar_t>
inline acc_t kth_lower_bound_portable(const scalar_t* x, const acc_t* bias, int64_t n, int64_t k) {
  const int64_t sets = (k + 7) / 8, vecs = n / 8;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  if (k <= 0 || vecs < sets) return -inf;
  acc_t lo = inf;
  for (int64_t s = 0; s < sets; ++s)
    for (int64_t l = 0; l < 8; ++l) {
      acc_t mx = -inf;
      for (int64_t v = s * vecs / sets; v < (s + 1) * vecs / sets; ++v) {
        const int64_t i = 8 * v + l;
        const acc_t e = bias ? static_cast<acc_t>(x[i]) + bias[i] : static_cast<acc_t>(x[i]);
        if (e > mx) mx = e;  // NaN is skipped: a group's best is at least its largest number
      }
      if (mx < lo) lo = mx;
    }
  return lo;
}

template <typename acc_t, typename scalar_t>
inline int64_t collect_at_least_acc(const scalar_t* x, const acc_t* bias, int64_t n, acc_t t, int32_t* out) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    return collect_at_least(x, bias, n, t, out);
  } else {
    return collect_at_least_portable(x, bias, n, t, out);
  }
}

template <typename acc_t, typename scalar_t>
inline acc_t kth_lower_bound_acc(const scalar_t* x, const acc_t* bias, int64_t n, int64_t k) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    return kth_lower_bound(x, bias, n, k);
  } else {
    return kth_lower_bound_portable(x, bias, n, k);
  }
}

template <typename acc_t, typename scalar_t>
inline int64_t find_above_acc(const scalar_t* x, int64_t n, acc_t t) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return find_above(x, n, t);
  } else {
    for (int64_t i = 0; i < n; ++i)
      if (!(static_cast<acc_t>(x[i]) <= t)) return i;
    return n;
  }
}

}  // namespace fastsae
