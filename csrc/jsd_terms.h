// The per-entry arithmetic of the generalized JSD row epilogue, shared by the CPU (epilogues.cpp) and CUDA
// (epilogues_cuda.cu) code so that the CPU tests check what the GPU runs. For one vocabulary entry with
// log-probabilities log p, log q and d = log q - log p + log((1 - beta) / beta): s = softplus(d) = log(m / (beta p))
// and t = softplus(-d) = log(m / ((1 - beta) q)), m = beta p + (1 - beta) q. The row's JSD is
// H(beta) - beta sum p s - (1 - beta) sum q t, and its gradients over the transformed logits a and b are
// g beta p (sum p s - s) and g (1 - beta) q (sum q t - t). softplus keeps the small s and t of streams far apart to
// full relative precision (are_fast/ops/torch_epilogues.py: jsd_epilogue says why); a zero probability's terms are
// 0 (kl_terms.h), as s is +inf there (NaN where p and q are both 0).
//
// The row sums and the JSD formed from them are in double whatever the logits' dtype: for close streams the JSD is
// a small difference H(beta) - ..., so the sums' rounding counts H(beta) / JSD times over (a float32 running sum
// over 1000 entries costs ~2e-5 of a JSD of 0.02); the per-entry terms and the gradients stay in the dtype.
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

// (s, t) = (softplus(d), softplus(-d)), d = log q - log p + log_odds, each as max(+-d, 0) + log1p(e^-|d|) (one
// log1p for both, fast_math.h's). d = +inf (p = 0) gives (+inf, 0), -inf gives (0, +inf), NaN (p = q = 0, or a NaN logit) NaN.
template <typename T>
ARE_FAST_HOST_DEVICE JsdPair<T> mixture_softplus(T log_p, T log_q, T log_odds) {
  const T d = (log_q - log_p) + log_odds;
  const T magnitude = d < T(0) ? -d : d;
  const T tail = log1p_unit(exp_nonpositive(-magnitude));
  return {(d > T(0) ? d : T(0)) + tail, (d < T(0) ? -d : T(0)) + tail};
}

// One entry's terms of the row sums: (p s, q t), each 0 where its probability is 0.
template <typename T>
ARE_FAST_HOST_DEVICE JsdPair<T> jsd_terms(JsdPair<T> prob, JsdPair<T> softplus) {
  return {kl_term(prob.p, softplus.p), kl_term(prob.q, softplus.q)};
}

// One entry's gradients over a and b for the row's sums (sum p s, sum q t) and gradient scale g:
// g beta p (sum p s - s) and g (1 - beta) q (sum q t - t), each 0 where its probability is 0.
template <typename T>
ARE_FAST_HOST_DEVICE JsdPair<T> jsd_gradients(JsdPair<T> prob, JsdPair<T> softplus, JsdPair<double> sums, T g,
                                              const JsdMixture<T>& mixture) {
  const T beta = static_cast<T>(mixture.beta);
  const T sum_ps = static_cast<T>(sums.p), sum_qt = static_cast<T>(sums.q);
  return {g * beta * kl_term(prob.p, sum_ps - softplus.p), g * (T(1) - beta) * kl_term(prob.q, sum_qt - softplus.q)};
}

// The row's JSD from its sums (sum p s, sum q t).
template <typename T>
ARE_FAST_HOST_DEVICE T jsd_value(const JsdMixture<T>& mixture, JsdPair<double> sums) {
  return static_cast<T>(mixture.entropy - mixture.beta * sums.p - (1 - mixture.beta) * sums.q);
}

}  // namespace are_fast
