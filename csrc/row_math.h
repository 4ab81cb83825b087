// Row primitives of the CPU kernels, y += a*x, x /= s, <a, b> and "first entry above t", for
// fp32 and fp64, and two inline helpers (prefetch, grain_for). row_math.cpp compiles the
// primitives for AVX-512, AVX2 and baseline x86-64 (the search with AVX2 intrinsics) and picks
// the best the CPU has at load time, so the build stays portable. Sums use fixed lanes combined
// in a fixed order: the same inputs give the same bits on a given machine.
#pragma once
#include <cstdint>
#include <type_traits>

namespace fastsae {

void axpy(float* y, float a, const float* x, int64_t n);
void axpy(double* y, double a, const double* x, int64_t n);
void divide(float* x, float s, int64_t n);  // x /= s (a division, not a multiply by 1/s)
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);
// The first i with x[i] > t or x[i] NaN, n if none.
int64_t find_above(const float* x, int64_t n, float t);
int64_t find_above(const double* x, int64_t n, double t);

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
