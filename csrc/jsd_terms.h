// The per-entry arithmetic of the generalized JSD row epilogue, shared by the CPU (epilogues.cpp) and CUDA
// (epilogues_cuda.cu) code so that the CPU tests check what the GPU runs. For one vocabulary entry with
// log-probabilities log p, log q and d = log q - log p + log((1 - beta) / beta): s = softplus(d) = log(m / (beta p))
// and t = softplus(-d) = log(m / ((1 - beta) q)), m = beta p + (1 - beta) q. The row's JSD is
// H(beta) - beta sum p s - (1 - beta) sum q t, and its gradients over the transformed logits a and b are
// g beta p (sum p s - s) and g (1 - beta) q (sum q t - t). softplus keeps the small s and t of streams far apart to
// full relative precision (are_fast/ops/torch_epilogues.py: jsd_epilogue says why); a zero probability's terms are
// 0 (kl_terms.h), as s is +inf there (NaN where p and q are both 0).
//
// The per-entry functions take and return plain values (no structs): under `omp simd`, GCC turns a struct
// temporary in the loop body into a per-lane array and gives up vectorizing the loop (scatter stores).
//
// The row sums and the JSD formed from them are in double whatever the logits' dtype: for close streams the JSD is
// a small difference H(beta) - ..., so the sums' rounding counts H(beta) / JSD times over (a float32 running sum
// over 1000 entries costs ~2e-5 of a JSD of 0.02); the per-entry terms and the gradients stay in the dtype. (The
// CPU code sums each 1024-entry tile in the dtype over its vector lanes, then adds the tile's sum in double.)
#pragma once

#include <cmath>

#include "fast_math.h"
#include "host_device.h"
#include "kl_terms.h"

namespace are_fast {

// The mixture's constants for a beta in (0, 1) (check_jsd_args checks it), formed in double.
template <typename T>
struct JsdMixture {
  double beta;
  T log_odds;      // log((1 - beta) / beta)
  double entropy;  // H(beta) = -beta log beta - (1 - beta) log(1 - beta): the JSD of disjoint P and Q

  static JsdMixture of(double beta) {
    return {beta, static_cast<T>(std::log1p(-beta) - std::log(beta)),
            -beta * std::log(beta) - (1 - beta) * std::log1p(-beta)};
  }
};

// One value per stream: p's (over a) and q's (over b).
template <typename T>
struct JsdPair {
  T p;
  T q;
};

// d = log q - log p + log_odds: s = softplus(d), t = softplus(-d). +inf where p = 0, -inf where q = 0, NaN where
// both are (or a logit is NaN).
template <typename T>
ARE_FAST_HOST_DEVICE T mixture_log_ratio(T log_p, T log_q, T log_odds) {
  return (log_q - log_p) + log_odds;
}

// log1p(e^-|d|), the part softplus(d) and softplus(-d) share (one exp and one log1p, fast_math.h's, for both):
// 0 at d = +-inf, NaN at NaN.
template <typename T>
ARE_FAST_HOST_DEVICE T softplus_tail(T d) {
  const T magnitude = d < T(0) ? -d : d;
  return log1p_unit(exp_nonpositive(-magnitude));
}

// softplus(x) = max(x, 0) + log1p(e^-|x|), given the tail: s = softplus_of(d, tail), t = softplus_of(-d, tail).
template <typename T>
ARE_FAST_HOST_DEVICE T softplus_of(T x, T tail) {
  return (x > T(0) ? x : T(0)) + tail;
}

// A row's constants for its gradients, formed once per row: the sums (sum p s, sum q t) rounded to the dtype and
// the streams' scales (g beta, g (1 - beta)), g the row's gradient scale.
template <typename T>
struct JsdRowGradient {
  JsdPair<T> sums;
  JsdPair<T> scale;

  ARE_FAST_HOST_DEVICE static JsdRowGradient of(const JsdMixture<T>& mixture, JsdPair<double> sums, T g) {
    const T beta = static_cast<T>(mixture.beta);
    return {{static_cast<T>(sums.p), static_cast<T>(sums.q)}, {g * beta, g * (T(1) - beta)}};
  }
};

// One stream's gradient at one entry: scale prob (sum - softplus), 0 where prob is 0; for a, (g beta, p, sum p s,
// s), for b, (g (1 - beta), q, sum q t, t). A row's term of its sum is kl_term(prob, softplus) (kl_terms.h).
template <typename T>
ARE_FAST_HOST_DEVICE T jsd_gradient(T scale, T prob, T sum, T softplus) {
  return scale * kl_term(prob, sum - softplus);
}

// The row's JSD from its sums (sum p s, sum q t).
template <typename T>
ARE_FAST_HOST_DEVICE T jsd_value(const JsdMixture<T>& mixture, JsdPair<double> sums) {
  return static_cast<T>(mixture.entropy - mixture.beta * sums.p - (1 - mixture.beta) * sums.q);
}

}  // namespace are_fast
