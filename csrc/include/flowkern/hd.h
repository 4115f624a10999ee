// Portable definitions shared by g++ (CPU kernels, the CUDA grid simulator)
// and nvcc (CUDA kernels). No torch or CUDA runtime headers: this file must
// compile in both worlds (docs/design.md §5, docs/design.md §9 "No torch headers in .cu files").
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FK_HD __host__ __device__ __forceinline__
#else
#define FK_HD inline
#endif

#if defined(__CUDACC__)
#define FK_UNROLL _Pragma("unroll")
#else
#define FK_UNROLL
#endif

// An element loop whose iterations are independent (the CPU engine's,
// lincomb.h): every output is either disjoint from every input or that input
// exactly (out=x: element i read, then written, by iteration i alone), which
// the ops check before any kernel runs (check_no_overlap). The compiler
// cannot know that, and with more than ~10 pointer pairs to compare at run
// time (g++'s vect-max-version-for-alias-checks) it keeps the loop scalar:
// a 5-input, 2-output lms_step on 4M elements took 2.05-2.22 ms scalar,
// 1.71-1.75 ms vectorised (docs/build.md "Vectorised element loops").
#if defined(__CUDACC__)
#define FK_IVDEP
#elif defined(__clang__)
#define FK_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define FK_IVDEP _Pragma("GCC ivdep")
#else
#define FK_IVDEP
#endif

namespace fk {

using i64 = int64_t;

// 16-bit float storage types. The bit layout is IEEE binary16 / bfloat16, the
// same as at::Half / at::BFloat16 and __half / __nv_bfloat16, so a tensor's
// data pointer can be reinterpreted as these on either side.
struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

FK_HD uint32_t float_bits(float f) {
  union { float f; uint32_t u; } c; c.f = f; return c.u;
}
FK_HD float bits_float(uint32_t u) {
  union { float f; uint32_t u; } c; c.u = u; return c.f;
}

// bfloat16 is the top half of a float; round to nearest even, keep NaN quiet.
FK_HD float to_float(bf16 h) { return bits_float(uint32_t(h.bits) << 16); }
FK_HD bf16 bf16_from_float(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

// binary16 <-> binary32 with subnormals, round to nearest even.
FK_HD float to_float(f16 h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t man = h.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    // subnormal: man * 2^-24, exact in float
    float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}
FK_HD f16 f16_from_float(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};       // NaN
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};      // rounds to inf
  if (a < 0x38800000u) {                                           // subnormal or zero
    if (a < 0x33000000u) return f16{sign};                         // below half the min subnormal
    uint32_t exp = a >> 23;
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp;                                   // 14..24
    uint32_t half_man = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return f16{uint16_t(sign | half_man)};
  }
  uint32_t r = a - 0x38000000u;                                    // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return f16{uint16_t(sign | (r >> 13))};
}

FK_HD float to_float(float v) { return v; }
FK_HD double to_float(double v) { return v; }

// Storage type -> accumulation type: fp32 for 16- and 32-bit inputs, fp64 for
// fp64 (docs/design.md §6).
template <class T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <class T> using acc_t = typename acc<T>::type;

template <class T> FK_HD acc_t<T> load(const T* p, i64 i) { return to_float(p[i]); }

template <class T> FK_HD T from_acc(acc_t<T> v);
template <> FK_HD float from_acc<float>(float v) { return v; }
template <> FK_HD double from_acc<double>(double v) { return v; }
template <> FK_HD f16 from_acc<f16>(float v) { return f16_from_float(v); }
template <> FK_HD bf16 from_acc<bf16>(float v) { return bf16_from_float(v); }

template <class T> FK_HD void store(T* p, i64 i, acc_t<T> v) { p[i] = from_acc<T>(v); }

// Real numbers the host hands a kernel by pointer in any float storage type
// (code: 0 float, 1 double, 2 f16, 3 bf16, the launchers' dtype codes), read
// as double: value i is p[i * step] (step 0: one value for every i). A null p
// reads 1 (a missing weight). The loss kernels read the caller's weight and
// the loss's gradient this way, where they lie: no conversion launch first.
struct Reals {
  const void* p = nullptr;
  int code = 1;
  i64 step = 0;
  FK_HD double at(i64 i) const {
    if (p == nullptr) return 1.0;
    const i64 k = i * step;
    if (code == 0) return double(static_cast<const float*>(p)[k]);
    if (code == 2) return double(to_float(static_cast<const f16*>(p)[k]));
    if (code == 3) return double(to_float(static_cast<const bf16*>(p)[k]));
    return static_cast<const double*>(p)[k];
  }
};

}  // namespace fk
