// Multi-versioned row primitives (see row_math.h). No torch headers: this file compiles fast.
#include "row_math.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSAE_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#define FASTSAE_AVX2_SCAN 1
#include <immintrin.h>
#else
#define FASTSAE_CLONES
#endif

namespace fastsae {
namespace {

template <typename T>
inline void axpy_impl(T* __restrict__ y, T a, const T* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Independent lanes let the compiler vectorise without reassociating a float sum.
template <typename T, int kLanes>
inline T dot_impl(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Whole blocks are tested with one vector compare; only a block with a hit is searched.
template <typename T, int kLanes>
inline int64_t find_above_impl(const T* __restrict__ x, int64_t n, T t) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    int hit = 0;
    for (int l = 0; l < kLanes; ++l) hit |= !(x[i + l] <= t);
    if (hit) break;
  }
  for (; i < n; ++i)
    if (!(x[i] <= t)) return i;
  return n;
}

#ifdef FASTSAE_AVX2_SCAN
// find_above with AVX2 compares: the compiler does not vectorise the early exit of the
// portable loop (it compares one float at a time), and a top-k scan is mostly this search.
// "Not less-or-equal, unordered" is true for x > t and for NaN.
__attribute__((target("avx2"))) int64_t find_above_avx2(const float* x, int64_t n, float t) {
  const __m256 tv = _mm256_set1_ps(t);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 a = _mm256_cmp_ps(_mm256_loadu_ps(x + i), tv, _CMP_NLE_UQ);
    const __m256 b = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), tv, _CMP_NLE_UQ);
    const __m256 c = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 16), tv, _CMP_NLE_UQ);
    const __m256 e = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 24), tv, _CMP_NLE_UQ);
    if (_mm256_movemask_ps(_mm256_or_ps(_mm256_or_ps(a, b), _mm256_or_ps(c, e)))) break;
  }
  for (; i + 8 <= n; i += 8) {
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), tv, _CMP_NLE_UQ));
    if (m) return i + __builtin_ctz(static_cast<unsigned>(m));
  }
  for (; i < n; ++i)
    if (!(x[i] <= t)) return i;
  return n;
}

__attribute__((target("avx2"))) int64_t find_above_avx2(const double* x, int64_t n, double t) {
  const __m256d tv = _mm256_set1_pd(t);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256d a = _mm256_cmp_pd(_mm256_loadu_pd(x + i), tv, _CMP_NLE_UQ);
    const __m256d b = _mm256_cmp_pd(_mm256_loadu_pd(x + i + 4), tv, _CMP_NLE_UQ);
    const __m256d c = _mm256_cmp_pd(_mm256_loadu_pd(x + i + 8), tv, _CMP_NLE_UQ);
    const __m256d e = _mm256_cmp_pd(_mm256_loadu_pd(x + i + 12), tv, _CMP_NLE_UQ);
    if (_mm256_movemask_pd(_mm256_or_pd(_mm256_or_pd(a, b), _mm256_or_pd(c, e)))) break;
  }
  for (; i + 4 <= n; i += 4) {
    const int m = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x + i), tv, _CMP_NLE_UQ));
    if (m) return i + __builtin_ctz(static_cast<unsigned>(m));
  }
  for (; i < n; ++i)
    if (!(x[i] <= t)) return i;
  return n;
}

// x + bias (or x) at i, the scan's value: the same single add as the scalar tail's.
template <bool kBias>
__attribute__((target("avx2"))) inline __m256 row_values(const float* x, const float* bias, int64_t i) {
  const __m256 v = _mm256_loadu_ps(x + i);
  return kBias ? _mm256_add_ps(v, _mm256_loadu_ps(bias + i)) : v;
}

// kCompress8.lanes[mask]: the lanes set in an 8-bit mask, packed first (the AVX2 stand-in for
// a compress instruction: one table load and one lane permutation).
struct Compress8 {
  alignas(32) int32_t lanes[256][8];
};
constexpr Compress8 make_compress8() {
  Compress8 t{};
  for (int mask = 0; mask < 256; ++mask)
    for (int lane = 0, packed = 0; lane < 8; ++lane)
      if ((mask >> lane) & 1) t.lanes[mask][packed++] = lane;
  return t;
}
constexpr Compress8 kCompress8 = make_compress8();

// 32 entries per test, one branch per block (most blocks have no hit once a row's bar is set);
// a block with hits stores each vector's hit positions packed, without a branch per hit.
template <bool kBias>
__attribute__((target("avx2"))) int64_t collect_at_least_avx2(const float* x, const float* bias, int64_t n, float t,
                                                             int32_t* out) {
  const __m256 tv = _mm256_set1_ps(t);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t m = 0, i = 0;
  for (; i + 32 <= n; i += 32) {
    int hits[4], any = 0;
    for (int b = 0; b < 4; ++b) {
      hits[b] = _mm256_movemask_ps(_mm256_cmp_ps(row_values<kBias>(x, bias, i + 8 * b), tv, _CMP_NLT_UQ));
      any |= hits[b];
    }
    if (!any) continue;
    for (int b = 0; b < 4; ++b) {  // m <= i + 8b: the 8-slot store stays within out[0, n)
      const __m256i pos = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(i + 8 * b)));
      const __m256i pack = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress8.lanes[hits[b]]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m), _mm256_permutevar8x32_epi32(pos, pack));
      m += __builtin_popcount(static_cast<unsigned>(hits[b]));
    }
  }
  for (; i < n; ++i) {
    const float v = kBias ? x[i] + bias[i] : x[i];
    if (!(v < t)) out[m++] = static_cast<int32_t>(i);
  }
  return m;
}

// The same with AVX-512, without even the block test: each 16-entry vector's hit positions
// are packed (a register compress) and stored whole, the count advanced by the mask's
// popcount. A branch per hit (the loop this replaced) mispredicted on about every block of a
// row's first tiles, where hits are frequent; this costs the same whatever the hit rate.
template <bool kBias>
__attribute__((target("avx512f"))) int64_t collect_at_least_avx512(const float* x, const float* bias, int64_t n,
                                                                  float t, int32_t* out) {
  const __m512 tv = _mm512_set1_ps(t);
  __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t m = 0, i = 0;
  for (; i + 16 <= n; i += 16) {  // m <= i: the 16-slot store stays within out[0, n)
    __m512 v = _mm512_loadu_ps(x + i);
    if (kBias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + i));
    const __mmask16 hit = _mm512_cmp_ps_mask(v, tv, _CMP_NLT_UQ);
    _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi32(hit, pos));
    m += __builtin_popcount(hit);
    pos = _mm512_add_epi32(pos, step);
  }
  for (; i < n; ++i) {
    const float v = kBias ? x[i] + bias[i] : x[i];
    if (!(v < t)) out[m++] = static_cast<int32_t>(i);
  }
  return m;
}

template <bool kBias>
__attribute__((target("avx2"))) float kth_lower_bound_avx2(const float* x, const float* bias, int64_t n, int64_t k) {
  const int64_t sets = (k + 7) / 8, vecs = n / 8;
  const float inf = std::numeric_limits<float>::infinity();
  if (k <= 0 || vecs < sets) return -inf;
  __m256 lo = _mm256_set1_ps(inf);
  for (int64_t s = 0; s < sets; ++s) {
    __m256 mx = _mm256_set1_ps(-inf);
    // max_ps returns its second operand when the first is NaN: NaN entries are skipped
    for (int64_t v = s * vecs / sets; v < (s + 1) * vecs / sets; ++v)
      mx = _mm256_max_ps(row_values<kBias>(x, bias, 8 * v), mx);
    lo = _mm256_min_ps(lo, mx);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, lo);
  return *std::min_element(lanes, lanes + 8);
}

// What the CPU has, capped by FASTSAE_CPU_ISA ("avx2": no AVX-512 paths; "baseline": no
// AVX2 either), so that the tests can run the narrower paths on a wider CPU.
bool cpu_has(const std::string& what) {
  __builtin_cpu_init();  // this runs in a static initialiser, possibly before libgcc's
  const char* env = std::getenv("FASTSAE_CPU_ISA");
  const std::string cap = env ? env : "";
  if (cap == "baseline" || (cap == "avx2" && what == "avx512f")) return false;
  if (what == "fma") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (what == "avx512f") return __builtin_cpu_supports("avx512f");
  return __builtin_cpu_supports("avx2");
}
const bool kHasAvx2 = cpu_has("avx2");
const bool kHasFma = cpu_has("fma");
const bool kHasAvx512 = cpu_has("avx512f");

// adam_update's vector bodies: one fused multiply-add where torch's kernel has one (m', and
// the compiler's contraction in v'), separate roundings everywhere else.
__attribute__((target("avx512f"))) void adam_update_avx512(float* p, float* m, float* v, const float* g, int64_t n,
                                                            const AdamScalars& s) {
  const __m512 coeff = _mm512_set1_ps(s.coeff), beta2 = _mm512_set1_ps(s.beta2), c2 = _mm512_set1_ps(s.sq_coeff),
               bc2 = _mm512_set1_ps(s.bc2_sqrt), step = _mm512_set1_ps(s.neg_step), eps = _mm512_set1_ps(s.eps);
  const bool base_g = s.base_is_grad;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 gv = g ? _mm512_maskz_loadu_ps(k, g + i) : _mm512_setzero_ps();
    const __m512 mv = _mm512_maskz_loadu_ps(k, m + i), vv = _mm512_maskz_loadu_ps(k, v + i);
    const __m512 m1 = _mm512_fmadd_ps(coeff, _mm512_sub_ps(gv, mv), base_g ? gv : mv);
    const __m512 v1 = _mm512_fmadd_ps(_mm512_mul_ps(c2, gv), gv, _mm512_mul_ps(vv, beta2));
    const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v1), bc2), eps);
    const __m512 p1 = _mm512_add_ps(_mm512_maskz_loadu_ps(k, p + i), _mm512_div_ps(_mm512_mul_ps(step, m1), den));
    _mm512_mask_storeu_ps(m + i, k, m1);
    _mm512_mask_storeu_ps(v + i, k, v1);
    _mm512_mask_storeu_ps(p + i, k, p1);
  }
}

__attribute__((target("avx2,fma"))) int64_t adam_update_avx2(float* p, float* m, float* v, const float* g, int64_t n,
                                                              const AdamScalars& s) {
  const __m256 coeff = _mm256_set1_ps(s.coeff), beta2 = _mm256_set1_ps(s.beta2), c2 = _mm256_set1_ps(s.sq_coeff),
               bc2 = _mm256_set1_ps(s.bc2_sqrt), step = _mm256_set1_ps(s.neg_step), eps = _mm256_set1_ps(s.eps);
  const bool base_g = s.base_is_grad;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = g ? _mm256_loadu_ps(g + i) : _mm256_setzero_ps();
    const __m256 mv = _mm256_loadu_ps(m + i), vv = _mm256_loadu_ps(v + i);
    const __m256 m1 = _mm256_fmadd_ps(coeff, _mm256_sub_ps(gv, mv), base_g ? gv : mv);
    const __m256 v1 = _mm256_fmadd_ps(_mm256_mul_ps(c2, gv), gv, _mm256_mul_ps(vv, beta2));
    const __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v1), bc2), eps);
    const __m256 p1 = _mm256_add_ps(_mm256_loadu_ps(p + i), _mm256_div_ps(_mm256_mul_ps(step, m1), den));
    _mm256_storeu_ps(m + i, m1);
    _mm256_storeu_ps(v + i, v1);
    _mm256_storeu_ps(p + i, p1);
  }
  return i;
}

// d[c * ld + r] = s[r * ls + c] for r, c < 8: unpack pairs, shuffle quads, swap 128-bit halves.
__attribute__((target("avx2"))) void transpose8x8_avx2(const float* s, int64_t ls, float* d, int64_t ld) {
  __m256 r[8], t[8], u[8];
  for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(s + q * ls);
  for (int q = 0; q < 8; q += 2) {
    t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
    t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
  }
  for (int q = 0; q < 8; q += 4) {
    u[q] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(d + q * ld, _mm256_permute2f128_ps(u[q], u[q + 4], 0x20));
    _mm256_storeu_ps(d + (q + 4) * ld, _mm256_permute2f128_ps(u[q], u[q + 4], 0x31));
  }
}
#endif

// select_largest's partition of a[lo, hi) by key > pivot: the keys above go to above[0..),
// the others are compacted to a[lo..); returns how many are above. Called on keys i.. of it
// with na above and the others up to a[nb) placed already: (a, lo, hi, pivot, above, 0, lo)
// for the whole range, and the vector path's tail.
int64_t partition_from(uint64_t* a, int64_t i, int64_t hi, uint64_t pivot, uint64_t* above, int64_t na,
                       int64_t nb) {
  for (; i < hi; ++i) {  // both writes, one advance: no branch to mispredict
    const uint64_t v = a[i];
    above[na] = v;
    a[nb] = v;
    na += v > pivot;
    nb += !(v > pivot);
  }
  return na;
}

#ifdef FASTSAE_AVX2_SCAN
// Four keys a step: an unsigned compare (signed, on keys with the top bit flipped), then each
// side packed by kCompress8 (a 64-bit lane's compare sets both its 32-bit halves) and stored
// whole (the next store overwrites the spare lanes).
__attribute__((target("avx2"))) int64_t partition_above_avx2(uint64_t* a, int64_t lo, int64_t hi, uint64_t pivot,
                                                              uint64_t* above) {
  const __m256i flip = _mm256_set1_epi64x(static_cast<long long>(0x8000000000000000ull));
  const __m256i pv = _mm256_xor_si256(_mm256_set1_epi64x(static_cast<long long>(pivot)), flip);
  int64_t na = 0, nb = lo, i = lo;
  for (; i + 4 <= hi; i += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i));
    const __m256i gt = _mm256_cmpgt_epi64(_mm256_xor_si256(v, flip), pv);
    const int gt8 = _mm256_movemask_ps(_mm256_castsi256_ps(gt)), le8 = ~gt8 & 0xFF;
    const __m256i pack_gt = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress8.lanes[gt8]));
    const __m256i pack_le = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress8.lanes[le8]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(above + na), _mm256_permutevar8x32_epi32(v, pack_gt));
    na += __builtin_popcount(static_cast<unsigned>(gt8)) / 2;
    // nb <= i: the store stays within keys already read
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + nb), _mm256_permutevar8x32_epi32(v, pack_le));
    nb += __builtin_popcount(static_cast<unsigned>(le8)) / 2;
  }
  return partition_from(a, i, hi, pivot, above, na, nb);
}
#endif

// dst[c * ld + r] = src[r * ls + c] for r < rows, c < cols: 8 x 8 blocks where there are whole ones.
void transpose_block(const float* src, int64_t ls, int64_t rows, int64_t cols, float* dst, int64_t ld) {
  int64_t r = 0;
#ifdef FASTSAE_AVX2_SCAN
  if (kHasAvx2) {
    for (; r + 8 <= rows; r += 8) {
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8) transpose8x8_avx2(src + r * ls + c, ls, dst + c * ld + r, ld);
      for (; c < cols; ++c)
        for (int64_t q = 0; q < 8; ++q) dst[c * ld + r + q] = src[(r + q) * ls + c];
    }
  }
#endif
  for (int64_t c = 0; c < cols; ++c)  // the rows left, a short contiguous run of each dst row at a time
    for (int64_t q = r; q < rows; ++q) dst[c * ld + q] = src[q * ls + c];
}

}  // namespace

void select_largest(uint64_t* a, int64_t n, int64_t k) {
  thread_local std::vector<uint64_t> above;
  if (static_cast<int64_t>(above.size()) < n + 4) above.resize(n + 4);
  int64_t lo = 0, hi = n, need = k;  // [0, lo) outrank [lo, hi), which holds the k-th
  // Median-of-three pivots; past 2 log2(n) + 8 rounds (an adversarial order) nth_element,
  // whose introselect bounds the work, finishes.
  for (int round = 0, rounds = 2 * (64 - __builtin_clzll(static_cast<uint64_t>(n) | 1)) + 8;
       hi - lo > 16 && round < rounds; ++round) {
    const uint64_t p0 = a[lo], p1 = a[lo + (hi - lo) / 2], p2 = a[hi - 1];
    const uint64_t pivot = std::max(std::min(p0, p1), std::min(std::max(p0, p1), p2));  // < the max: na >= 1
#ifdef FASTSAE_AVX2_SCAN
    const int64_t na = kHasAvx2 ? partition_above_avx2(a, lo, hi, pivot, above.data())
                                : partition_from(a, lo, hi, pivot, above.data(), 0, lo);
#else
    const int64_t na = partition_from(a, lo, hi, pivot, above.data(), 0, lo);
#endif
    if (na >= need) {  // the k-th is above the pivot: keep those only
      std::copy(above.data(), above.data() + na, a + lo);
      hi = lo + na;
    } else {  // all above are kept: look among the rest (the pivot among them)
      std::copy_backward(a + lo, a + hi - na, a + hi);
      std::copy(above.data(), above.data() + na, a + lo);
      lo += na;
      need -= na;
    }
  }
  std::nth_element(a + lo, a + lo + need - 1, a + hi, std::greater<uint64_t>());
}

void rows_to_columns(const float* src, int64_t ls, int64_t m, int64_t h, const int64_t* cols, int64_t col0,
                     float* dst, int64_t ld) {
  thread_local std::vector<int64_t> rest;  // rows outside whole 8-row groups of a run
  rest.clear();
  for (int64_t r = 0; r < m;) {
    int64_t run = 1;
    while (r + run < m && cols[r + run] == cols[r] + run) ++run;
    const int64_t whole = run & ~int64_t(7);
    if (whole > 0) transpose_block(src + r * ls, ls, whole, h, dst + (cols[r] - col0), ld);
    for (int64_t q = whole; q < run; ++q) rest.push_back(r + q);
    r += run;
  }
  if (rest.empty()) return;
  for (int64_t i = 0; i < h; ++i) {  // one dst row at a time: its few touched lines stay in cache
    float* o = dst + i * ld - col0;
    for (const int64_t r : rest) o[cols[r]] = src[r * ls + i];
  }
}

FASTSAE_CLONES void axpy(float* y, float a, const float* x, int64_t n) { axpy_impl(y, a, x, n); }
FASTSAE_CLONES void axpy(double* y, double a, const double* x, int64_t n) { axpy_impl(y, a, x, n); }
FASTSAE_CLONES void divide(float* __restrict__ x, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] /= s;
}
FASTSAE_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_impl<float, 16>(a, b, n); }
FASTSAE_CLONES double dot(const double* a, const double* b, int64_t n) { return dot_impl<double, 8>(a, b, n); }

// The helpers below pass vectors by value between inlined functions only: no ABI crosses.
#pragma GCC diagnostic ignored "-Wpsabi"
namespace {
// 16 floats as one value: 1 zmm, 2 ymm or 4 xmm in the clones. Loads and stores are unaligned.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
inline v16 load16(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store16(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
constexpr int64_t kBlock = 64;  // floats per register block: four v16 accumulators

inline float fold16(const float* x) {  // 16 lanes, pairwise, in a fixed order
  float t[16];
  for (int l = 0; l < 16; ++l) t[l] = x[l];
  for (int half = 8; half > 0; half /= 2)
    for (int l = 0; l < half; ++l) t[l] += t[l + half];
  return t[0];
}
}  // namespace

FASTSAE_CLONES void weighted_row_sum(const float* const* rows, const float* v, int64_t m, int64_t d, float* out) {
  int64_t c = 0;
  for (; c + kBlock <= d; c += kBlock) {
    v16 a0 = load16(out + c), a1 = load16(out + c + 16), a2 = load16(out + c + 32), a3 = load16(out + c + 48);
    for (int64_t p = 0; p < m; ++p) {
      const float* r = rows[p] + c;
      const float s = v[p];
      a0 += s * load16(r);
      a1 += s * load16(r + 16);
      a2 += s * load16(r + 32);
      a3 += s * load16(r + 48);
    }
    store16(out + c, a0);
    store16(out + c + 16, a1);
    store16(out + c + 32, a2);
    store16(out + c + 48, a3);
  }
  for (; c + 16 <= d; c += 16) {
    v16 a = load16(out + c);
    for (int64_t p = 0; p < m; ++p) a += v[p] * load16(rows[p] + c);
    store16(out + c, a);
  }
  for (; c < d; ++c) {
    float a = out[c];
    for (int64_t p = 0; p < m; ++p) a += v[p] * rows[p][c];
    out[c] = a;
  }
}

FASTSAE_CLONES void dots_and_weighted_sum(const float* const* rows, const float* v, int64_t m, const float* w,
                                          int64_t d, float* dv, float* out, float* scratch) {
  for (int64_t p = 0; p < m; ++p) store16(scratch + 16 * p, v16{});
  int64_t c = 0;
  for (; c + kBlock <= d; c += kBlock) {
    const v16 w0 = load16(w + c), w1 = load16(w + c + 16), w2 = load16(w + c + 32), w3 = load16(w + c + 48);
    v16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t p = 0; p < m; ++p) {
      const float* r = rows[p] + c;
      const float s = v[p];
      const v16 g0 = load16(r), g1 = load16(r + 16), g2 = load16(r + 32), g3 = load16(r + 48);
      a0 += s * g0;
      a1 += s * g1;
      a2 += s * g2;
      a3 += s * g3;
      store16(scratch + 16 * p, load16(scratch + 16 * p) + ((g0 * w0 + g1 * w1) + (g2 * w2 + g3 * w3)));
    }
    store16(out + c, a0);
    store16(out + c + 16, a1);
    store16(out + c + 32, a2);
    store16(out + c + 48, a3);
  }
  for (; c + 16 <= d; c += 16) {
    const v16 w0 = load16(w + c);
    v16 a = {};
    for (int64_t p = 0; p < m; ++p) {
      const v16 g = load16(rows[p] + c);
      a += v[p] * g;
      store16(scratch + 16 * p, load16(scratch + 16 * p) + g * w0);
    }
    store16(out + c, a);
  }
  const int64_t tail = c;
  for (; c < d; ++c) {
    float a = 0;
    for (int64_t p = 0; p < m; ++p) a += v[p] * rows[p][c];
    out[c] = a;
  }
  for (int64_t p = 0; p < m; ++p) {
    float s = fold16(scratch + 16 * p);
    for (int64_t i = tail; i < d; ++i) s += rows[p][i] * w[i];
    dv[p] = s;
  }
}

AdamScalars adam_scalars(double lr, double beta1, double beta2, double eps, double step) {
  const float w = static_cast<float>(1 - beta1);
  const bool small = std::abs(w) < 0.5f;
  return AdamScalars{small ? w : w - 1.0f,
                     static_cast<float>(beta2),
                     static_cast<float>(1 - beta2),
                     static_cast<float>(std::sqrt(1 - std::pow(beta2, step))),
                     static_cast<float>(-(lr / (1 - std::pow(beta1, step)))),
                     static_cast<float>(eps),
                     !small};
}

void adam_update(float* p, float* m, float* v, const float* g, int64_t n, const AdamScalars& s) {
  int64_t i = 0;
#ifdef FASTSAE_AVX2_SCAN
  if (kHasAvx512) return adam_update_avx512(p, m, v, g, n, s);
  if (kHasFma) i = adam_update_avx2(p, m, v, g, n, s);
#endif
  for (; i < n; ++i) {  // the same roundings one entry at a time (std::fma rounds once)
    const float gi = g ? g[i] : 0.0f;
    const float m1 = std::fma(s.coeff, gi - m[i], s.base_is_grad ? gi : m[i]);
    const float prod = v[i] * s.beta2;
    const float v1 = std::fma(s.sq_coeff * gi, gi, prod);
    const float den = std::sqrt(v1) / s.bc2_sqrt + s.eps;
    const float step = s.neg_step * m1;
    p[i] = p[i] + step / den;
    m[i] = m1;
    v[i] = v1;
  }
}

#ifdef FASTSAE_AVX2_SCAN
int64_t find_above(const float* x, int64_t n, float t) {
  return kHasAvx2 ? find_above_avx2(x, n, t) : find_above_impl<float, 16>(x, n, t);
}
int64_t find_above(const double* x, int64_t n, double t) {
  return kHasAvx2 ? find_above_avx2(x, n, t) : find_above_impl<double, 8>(x, n, t);
}
int64_t collect_at_least(const float* x, const float* bias, int64_t n, float t, int32_t* out) {
  if (!kHasAvx2) return collect_at_least_portable(x, bias, n, t, out);
  if (kHasAvx512)
    return bias ? collect_at_least_avx512<true>(x, bias, n, t, out) : collect_at_least_avx512<false>(x, bias, n, t, out);
  return bias ? collect_at_least_avx2<true>(x, bias, n, t, out) : collect_at_least_avx2<false>(x, bias, n, t, out);
}
float kth_lower_bound(const float* x, const float* bias, int64_t n, int64_t k) {
  if (!kHasAvx2) return kth_lower_bound_portable(x, bias, n, k);
  return bias ? kth_lower_bound_avx2<true>(x, bias, n, k) : kth_lower_bound_avx2<false>(x, bias, n, k);
}
#else
int64_t find_above(const float* x, int64_t n, float t) { return find_above_impl<float, 16>(x, n, t); }
int64_t find_above(const double* x, int64_t n, double t) { return find_above_impl<double, 8>(x, n, t); }
int64_t collect_at_least(const float* x, const float* bias, int64_t n, float t, int32_t* out) {
  return collect_at_least_portable(x, bias, n, t, out);
}
float kth_lower_bound(const float* x, const float* bias, int64_t n, int64_t k) {
  return kth_lower_bound_portable(x, bias, n, k);
}
#endif

}  // namespace fastsae
