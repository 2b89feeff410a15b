// Short vectors for the norm kernels: one 32-byte register of the accumulation type (8 floats or
// 4 doubles), loaded from and stored to every storage type the kernels take.
//
// GCC's vector extensions give the arithmetic for any instruction set the build targets (AVX2 here:
// the flags come from layernorm/native/build.py, which keys the cached build by them). bfloat16 is
// widened and rounded with integer operations; float16 uses the F16C conversions when the target
// has them, else c10::Half's scalar conversion.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace layernorm {
namespace simd {

typedef float F32x8 __attribute__((vector_size(32)));
typedef double F64x4 __attribute__((vector_size(32)));

template <typename A>
struct VecOf;
template <>
struct VecOf<float> { using type = F32x8; };
template <>
struct VecOf<double> { using type = F64x4; };

// (The vector attribute cannot be applied to a template parameter directly: gcc ignores it there.)
template <typename A>
using Vec = typename VecOf<A>::type;

template <typename A>
constexpr int kLanes = 32 / sizeof(A);

using U16x8 = uint16_t __attribute__((vector_size(16)));
using U32x8 = uint32_t __attribute__((vector_size(32)));
using I32x8 = int32_t __attribute__((vector_size(32)));

template <typename A>
inline Vec<A> splat(A v) {
  // Scalar-vector arithmetic broadcasts the scalar: one vbroadcastss. (Filling the lanes one by one
  // compiled to a chain of vinsertps that gcc did not hoist out of the backward's inner loop.)
  return Vec<A>{} + v;
}

template <typename A>
inline A hsum(Vec<A> v) {
  // Pairwise, in a fixed order: the same bits on every run.
  if constexpr (kLanes<A> == 8) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
  } else {
    return (v[0] + v[2]) + (v[1] + v[3]);
  }
}

// ---- scalar conversions -------------------------------------------------------------------------

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

template <typename T>
inline typename Acc<T>::type to_acc(T v) { return static_cast<typename Acc<T>::type>(v); }

template <typename T>
inline T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }  // round to nearest even

// ---- vector loads and stores of L = kLanes<A> consecutive elements --------------------------------

template <typename T>
inline Vec<typename Acc<T>::type> load(const T* p);

template <>
inline Vec<float> load<float>(const float* p) {
  Vec<float> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <>
inline Vec<double> load<double>(const double* p) {
  Vec<double> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <>
inline Vec<float> load<c10::BFloat16>(const c10::BFloat16* p) {
  U16x8 h;
  std::memcpy(&h, p, sizeof(h));
  U32x8 u = __builtin_convertvector(h, U32x8) << 16;  // bfloat16 is the top half of a float
  Vec<float> v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

template <>
inline Vec<float> load<c10::Half>(const c10::Half* p) {
#if defined(__F16C__)
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<Vec<float>>(_mm256_cvtph_ps(h));
#else
  Vec<float> v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

template <typename T>
inline void store(T* p, Vec<typename Acc<T>::type> v);

template <>
inline void store<float>(float* p, Vec<float> v) { std::memcpy(p, &v, sizeof(v)); }

template <>
inline void store<double>(double* p, Vec<double> v) { std::memcpy(p, &v, sizeof(v)); }

inline U16x8 round_to_bf16_bits(Vec<float> v) {
  // Round to nearest even, as c10::BFloat16's constructor; NaN stays a (quiet) NaN.
  U32x8 u;
  std::memcpy(&u, &v, sizeof(u));
  U32x8 lsb = (u >> 16) & 1u;
  U32x8 rounded = (u + 0x7fffu + lsb) >> 16;
  I32x8 is_nan = (u & 0x7fffffffu) > 0x7f800000u;  // lanes: -1 where NaN
  U32x8 nan_bits = (u & 0u) | 0x7fc0u;
  rounded = is_nan ? nan_bits : rounded;
#if defined(__AVX2__)
  // Every lane is below 2^16, so the saturating pack is exact; GCC's generic narrowing is much slower.
  __m256i r = reinterpret_cast<__m256i>(rounded);
  return reinterpret_cast<U16x8>(_mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
#else
  return __builtin_convertvector(rounded, U16x8);
#endif
}

template <>
inline void store<c10::BFloat16>(c10::BFloat16* p, Vec<float> v) {
  U16x8 h = round_to_bf16_bits(v);
  std::memcpy(p, &h, sizeof(h));
}

template <>
inline void store<c10::Half>(c10::Half* p, Vec<float> v) {
#if defined(__F16C__)
  __m128i h = _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#else
  for (int i = 0; i < 8; ++i) p[i] = static_cast<c10::Half>(v[i]);
#endif
}

// Non-temporal (streaming) stores: the write goes to memory without reading the line into the caches
// first. For outputs far larger than the caches this saves the read-for-ownership a plain store costs.
// p must be aligned to the stored size (32 bytes for float/double, 16 for bfloat16/float16).
template <typename T>
inline void store_stream(T* p, Vec<typename Acc<T>::type> v) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m256>(v));
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m256d>(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i>(round_to_bf16_bits(v)));
  } else {
#if defined(__F16C__)
    __m128i h = _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
#else
    store<T>(p, v);
#endif
  }
#else
  store<T>(p, v);
#endif
}

// Orders this thread's streaming stores before anything it does next (another thread may read them).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// The value v would have after a store to T and a load back (Llama's "cast to the input dtype").
template <typename T>
inline Vec<typename Acc<T>::type> round_to(Vec<typename Acc<T>::type> v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    U32x8 u = __builtin_convertvector(round_to_bf16_bits(v), U32x8) << 16;
    Vec<float> out;
    std::memcpy(&out, &u, sizeof(out));
    return out;
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#if defined(__F16C__)
    return reinterpret_cast<Vec<float>>(
        _mm256_cvtph_ps(_mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT)));
#else
    for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(static_cast<c10::Half>(v[i]));
    return v;
#endif
  } else {
    return v;  // float32/float64 storage: nothing to round
  }
}

template <typename T>
inline typename Acc<T>::type round_scalar_to(typename Acc<T>::type v) {
  return to_acc<T>(from_acc<T>(v));
}

}  // namespace simd
}  // namespace layernorm
