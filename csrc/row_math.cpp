// Multi-versioned row primitives (see row_math.h). No torch headers: this file compiles fast.
#include "row_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSAE_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
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

}  // namespace

FASTSAE_CLONES void axpy(float* y, float a, const float* x, int64_t n) { axpy_impl(y, a, x, n); }
FASTSAE_CLONES void axpy(double* y, double a, const double* x, int64_t n) { axpy_impl(y, a, x, n); }
FASTSAE_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_impl<float, 16>(a, b, n); }
FASTSAE_CLONES double dot(const double* a, const double* b, int64_t n) { return dot_impl<double, 8>(a, b, n); }
FASTSAE_CLONES int64_t find_above(const float* x, int64_t n, float t) { return find_above_impl<float, 16>(x, n, t); }
FASTSAE_CLONES int64_t find_above(const double* x, int64_t n, double t) { return find_above_impl<double, 8>(x, n, t); }

}  // namespace fastsae
