// The logit transforms of the row epilogues, shared by the CPU (epilogues.cpp) and CUDA (epilogues_cuda.cu)
// code, so the CPU tests exercise the arithmetic the CUDA kernels run: z' = softcap * tanh(z * scale / softcap)
// with a softcap, else z * scale (scale 1 and no softcap: the identity). The statistics are over z'; the
// gradient written is the one over z, times dz'/dz = scale / cosh^2(z * scale / softcap) (or scale), taken from
// the raw logit before it is overwritten: 1 / cosh^2 keeps its relative precision where tanh rounds to 1 (1 -
// tanh^2 would give 0 a few caps out) and is 0 where cosh overflows.
#pragma once

#include <cmath>
#include <optional>

#include <c10/util/Exception.h>

#include "host_device.h"

namespace are_fast {

ARE_FAST_HOST_DEVICE float tanh_of(float x) { return tanhf(x); }
ARE_FAST_HOST_DEVICE double tanh_of(double x) { return tanh(x); }
ARE_FAST_HOST_DEVICE float cosh_of(float x) { return coshf(x); }
ARE_FAST_HOST_DEVICE double cosh_of(double x) { return cosh(x); }

template <typename T>
struct LogitTransform {
  bool capped;
  T softcap;        // 1 without a softcap (unused)
  T scale;          // 1 without a logit scale
  T scale_over_cap;  // scale / softcap: the argument of tanh is z * scale_over_cap

  ARE_FAST_HOST_DEVICE bool identity() const { return !capped && scale == T(1); }

  ARE_FAST_HOST_DEVICE T operator()(T z) const { return capped ? softcap * tanh_of(z * scale_over_cap) : z * scale; }

  ARE_FAST_HOST_DEVICE T derivative(T z) const {
    if (!capped) {
      return scale;
    }
    const T c = cosh_of(z * scale_over_cap);
    return scale / (c * c);
  }
};

// The ops' optional softcap / logit_scale arguments (None: no transform), checked: positive and finite.
template <typename T>
inline LogitTransform<T> make_transform(const std::optional<double>& softcap, const std::optional<double>& logit_scale) {
  for (const auto& [name, value] : {std::pair{"softcap", softcap}, std::pair{"logit_scale", logit_scale}}) {
    TORCH_CHECK_VALUE(!value.has_value() || (std::isfinite(*value) && *value > 0), name,
                      ": expected None or a positive finite float, got ", value.value_or(0.0));
  }
  const T cap = static_cast<T>(softcap.value_or(1.0));
  const T scale = static_cast<T>(logit_scale.value_or(1.0));
  return {softcap.has_value(), cap, scale, static_cast<T>(logit_scale.value_or(1.0) / softcap.value_or(1.0))};
}

}  // namespace are_fast
