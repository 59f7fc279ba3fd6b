// The per-entry KL term shared by the CPU (epilogues.cpp) and CUDA (epilogues_cuda.cu) row epilogues, so that
// the CPU tests check the arithmetic the GPU runs on masked (-inf) logits.
#pragma once

#include "host_device.h"

namespace are_fast {

// weight * log_ratio, where weight is p_v (or exp(a_v - max a), p_v unnormalized): 0 where the weight is 0, as
// p log(p / q) is 0 at p = 0. A -inf logit in p gives weight 0 and log_ratio -inf (or NaN, -inf - -inf, when q
// is masked there too): without this, 0 * -inf = NaN. A -inf in q where p > 0 gives +inf, the true KL.
template <typename T>
ARE_FAST_HOST_DEVICE T kl_term(T weight, T log_ratio) {
  return weight == T(0) ? T(0) : weight * log_ratio;
}

}  // namespace are_fast
