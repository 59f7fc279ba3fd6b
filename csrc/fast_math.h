// Branch-free float32 exp and log1p for the row epilogues: loops calling them can vectorize on the CPU (the C
// library's expf and log1pf cannot, without -ffast-math), and the CUDA JSD kernel runs the same arithmetic
// (jsd_terms.h), so the CPU tests check it. float64 takes the C library's functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace are_fast {

ARE_FAST_HOST_DEVICE uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

ARE_FAST_HOST_DEVICE float float_of(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// exp(x) for x <= 0 (every caller passes a logit minus an upper bound of its row), branch-free so that loops
// calling it vectorize: x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial (relative
// error below 2e-7), 2^k written into the exponent bits. Below -87.3 (under the smallest normal float) it
// returns 0; NaN stays NaN.
ARE_FAST_HOST_DEVICE float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 = kLn2Hi - kLn2Lo, kLn2Hi exact in a few bits so k * kLn2Hi is exact
  constexpr float kLn2Lo = 2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  constexpr uint32_t kRoundBits = 0x4B400000u;
  const float xc = x < -87.3f ? -87.3f : x;
  const float y = xc * kLog2e + kRound;
  const float k = y - kRound;
  const float r = (xc - k * kLn2Hi) + k * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float pow2 = float_of((bits_of(y) - kRoundBits + 127u) << 23);  // biased exponent of 2^k, k in [-126, 0]
  return x < -87.3f ? 0.0f : p * pow2;
}

ARE_FAST_HOST_DEVICE double exp_nonpositive(double x) { return exp(x); }

// log1p(x) for x in [0, 1] as 2 atanh(z), z = x / (2 + x) <= 1/3, by its odd series to z^15 (truncation below 2e-9
// relative): a few ulp, full relative precision for small x (where log(1 + x) would lose it); NaN stays NaN.
ARE_FAST_HOST_DEVICE float log1p_unit(float x) {
  const float z = x / (2.0f + x);
  const float z2 = z * z;
  float p = 1.0f / 15.0f;
  p = p * z2 + 1.0f / 13.0f;
  p = p * z2 + 1.0f / 11.0f;
  p = p * z2 + 1.0f / 9.0f;
  p = p * z2 + 1.0f / 7.0f;
  p = p * z2 + 1.0f / 5.0f;
  p = p * z2 + 1.0f / 3.0f;
  p = p * z2 + 1.0f;
  return 2.0f * z * p;
}

ARE_FAST_HOST_DEVICE double log1p_unit(double x) { return log1p(x); }

}  // namespace are_fast
