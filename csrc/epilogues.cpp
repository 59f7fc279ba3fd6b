// Row epilogues of are_fast on CPU, with the contract of are_fast/torch_epilogues.py:
//
//   logprob_epilogue(logits [C, V], targets [C] int64, ignore_index, grad_scale [C] or None) -> [C]
//       log softmax(logits)[target] per row; 0 where target == ignore_index, NaN where it is otherwise outside
//       [0, V). With grad_scale g, logits becomes g * (onehot(target) - softmax(logits)), zero on those rows.
//   kl_epilogue(logits_p [C, V], logits_q [C, V], valid [C] bool, grad_scale [C] or None) -> [C]
//       KL(softmax(a) || softmax(b)) per row (a = logits_p, b = logits_q), 0 where valid is false. With
//       grad_scale g, logits_p becomes g * p * ((a - b) - sum_v p_v (a_v - b_v)) and logits_q becomes g * (q - p).
//   jsd_epilogue(logits_p, logits_q, valid, grad_scale, beta) -> [C]
//       as kl_epilogue, for the generalized JSD beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q,
//       0 < beta < 1; its per-entry arithmetic and gradients are those of jsd_terms.h.
//
// logits are float32 or float64 (grad_scale is converted to their dtype). Each row's statistics take one pass
// over memory: the row is read tile by tile (a tile fits in L1), taking the tile's max and then its sum of
// exponentials relative to the running max (online log-sum-exp). The gradient is a second pass, made while
// the row is still in L2 (the JSD takes a second pass for its sums, then the gradient's). Rows are spread over threads; inner loops are written to vectorize (omp simd, a
// branch-free float32 exp) and, on x86-64 with GCC, compiled for AVX-512, AVX2 and a baseline, picked at load.
// A +inf logit gives an infinite log-sum-exp (log-probs -inf or NaN) and a NaN KL; -inf logits (a masked
// vocabulary) have probability 0 and add nothing to a KL (kl_terms.h).
//
// Both take optional softcap and logit_scale (logit_transform.h): the statistics are over the transformed
// logits, which the first pass forms tile by tile in a stack buffer (the logits stay untouched without a
// gradient); the gradient pass transforms each logit again and chains its gradient through dz'/dz.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "epilogue_checks.h"
#include "fast_math.h"
#include "jsd_terms.h"
#include "kl_terms.h"
#include "logit_transform.h"

#if defined(__GNUC__)
#define ARE_FAST_INLINE inline __attribute__((always_inline))
#else
#define ARE_FAST_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ARE_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ARE_FAST_CLONES
#endif

namespace are_fast {
namespace {

constexpr int64_t kTile = 1024;  // elements per tile: 4 KiB of float32, read from memory once, then from L1

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

template <typename T>
ARE_FAST_INLINE T tile_max(const T* x, int64_t n) {
  T m = -kInf<T>;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
  }
  return m;
}

// Raises the running max m to cover a tile whose max is tile_max; returns exp(old m - new m), the factor that
// rescales sums taken relative to the old max (1 while the max stays -inf: nothing finite seen yet).
template <typename T>
ARE_FAST_INLINE T raise_max(T& m, T tile_max) {
  const T old = m;
  m = std::max(m, tile_max);
  return m == old ? T(1) : std::exp(old - m);
}

// What is subtracted before exponentiating: the running max, or 0 while it is -inf (so an element that is
// -inf or NaN contributes 0 or NaN, never exp(-inf - -inf)).
template <typename T>
ARE_FAST_INLINE T shift_of(T m) {
  return m == -kInf<T> ? T(0) : m;
}

// log-sum-exp of a row as max + log_sum. Callers form x - lse as (x - max) - log_sum: with logits of magnitude
// 1e4, rounding lse itself to float32 would cost 1e-3 in every probability.
template <typename T>
struct Lse {
  T max;
  T log_sum;

  ARE_FAST_INLINE T log_prob(T x) const { return (x - max) - log_sum; }
};

// The tile the statistics read: the logits themselves, or their transform written into `scratch` [kTile].
template <typename T>
ARE_FAST_INLINE const T* transformed_tile(const T* x, int64_t len, const LogitTransform<T>& f, T* scratch) {
  if (f.identity()) {
    return x;
  }
  for (int64_t i = 0; i < len; ++i) {
    scratch[i] = f(x[i]);
  }
  return scratch;
}

template <typename T>
ARE_FAST_INLINE Lse<T> row_logsumexp(const T* x, int64_t n, const LogitTransform<T>& f) {
  T m = -kInf<T>;
  T s = 0;  // sum of exp(x - shift_of(m)) over the tiles so far
  T scratch[kTile];
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    const T* tile = transformed_tile(x + start, len, f, scratch);
    const T factor = raise_max(m, tile_max(tile, len));
    if (m == kInf<T>) {
      return {m, T(0)};
    }
    const T shift = shift_of(m);
    T tile_sum = 0;
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t i = 0; i < len; ++i) {
      tile_sum += exp_nonpositive(tile[i] - shift);
    }
    s = s * factor + tile_sum;
  }
  return {m, std::log(s)};
}

template <typename T>
struct LogprobArgs {
  T* logits;
  int64_t stride;
  int64_t vocab;
  const int64_t* targets;
  int64_t ignore_index;
  const T* scale;  // nullptr: values only
  T* out;
  LogitTransform<T> f;
};

template <typename T>
ARE_FAST_INLINE void logprob_rows(const LogprobArgs<T>& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    T* x = a.logits + row * a.stride;
    const int64_t target = a.targets[row];
    if (target == a.ignore_index || target < 0 || target >= a.vocab) {
      a.out[row] = target == a.ignore_index ? T(0) : std::numeric_limits<T>::quiet_NaN();
      if (a.scale != nullptr) {
        std::fill(x, x + a.vocab, T(0));
      }
      continue;
    }
    const LogitTransform<T>& f = a.f;
    const Lse<T> lse = row_logsumexp(x, a.vocab, f);
    a.out[row] = (f(x[target]) - lse.max) - lse.log_sum;
    if (a.scale != nullptr) {
      const T g = a.scale[row];
      if (f.identity()) {
#pragma omp simd
        for (int64_t i = 0; i < a.vocab; ++i) {
          x[i] = -g * exp_nonpositive((x[i] - lse.max) - lse.log_sum);
        }
        x[target] += g;
      } else {
        const T target_derivative = f.derivative(x[target]);  // before the raw logit is overwritten
        for (int64_t i = 0; i < a.vocab; ++i) {
          x[i] = -g * exp_nonpositive((f(x[i]) - lse.max) - lse.log_sum) * f.derivative(x[i]);
        }
        x[target] += g * target_derivative;
      }
    }
  }
}

template <typename T>
struct KlArgs {
  T* logits_p;
  T* logits_q;
  int64_t stride_p;
  int64_t stride_q;
  int64_t vocab;
  const bool* valid;
  const T* scale;  // nullptr: values only
  T* out;
  LogitTransform<T> f;
};

template <typename T>
struct KlStats {
  Lse<T> p;
  Lse<T> q;
  T cross;  // sum_v p_v (a_v - b_v)
};

// Online over tiles: running maxes of a and b, s = sum exp(a - max a), t = sum exp(a - max a) (a - b) and the
// sum for b; then cross = t / s.
template <typename T>
ARE_FAST_INLINE KlStats<T> row_kl_stats(const T* a, const T* b, int64_t n, const LogitTransform<T>& f) {
  T max_a = -kInf<T>, max_b = -kInf<T>;
  T s = 0, t = 0, s_b = 0;
  T scratch_a[kTile], scratch_b[kTile];
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    const T* ta = transformed_tile(a + start, len, f, scratch_a);
    const T* tb = transformed_tile(b + start, len, f, scratch_b);
    const T factor_a = raise_max(max_a, tile_max(ta, len));
    const T factor_b = raise_max(max_b, tile_max(tb, len));
    if (max_a == kInf<T> || max_b == kInf<T>) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      return {{nan, nan}, {nan, nan}, nan};
    }
    const T shift_a = shift_of(max_a), shift_b = shift_of(max_b);
    T tile_s = 0, tile_t = 0, tile_s_b = 0;
#pragma omp simd reduction(+ : tile_s, tile_t, tile_s_b)
    for (int64_t i = 0; i < len; ++i) {
      const T e = exp_nonpositive(ta[i] - shift_a);
      tile_s += e;
      tile_t += kl_term(e, ta[i] - tb[i]);
      tile_s_b += exp_nonpositive(tb[i] - shift_b);
    }
    s = s * factor_a + tile_s;
    t = t * factor_a + tile_t;
    s_b = s_b * factor_b + tile_s_b;
  }
  return {{max_a, std::log(s)}, {max_b, std::log(s_b)}, t / s};
}

// A row whose valid flag is false gives 0 and zero gradients: true when `row` is one (then done).
template <typename T>
ARE_FAST_INLINE bool skipped_row(const KlArgs<T>& k, int64_t row, T* a, T* b) {
  if (k.valid[row]) {
    return false;
  }
  k.out[row] = 0;
  if (k.scale != nullptr) {
    std::fill(a, a + k.vocab, T(0));
    std::fill(b, b + k.vocab, T(0));
  }
  return true;
}

template <typename T>
ARE_FAST_INLINE void kl_rows(const KlArgs<T>& k, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    T* a = k.logits_p + row * k.stride_p;
    T* b = k.logits_q + row * k.stride_q;
    if (skipped_row(k, row, a, b)) {
      continue;
    }
    const LogitTransform<T>& f = k.f;
    const KlStats<T> st = row_kl_stats(a, b, k.vocab, f);
    k.out[row] = st.cross - (st.p.max - st.q.max) - (st.p.log_sum - st.q.log_sum);
    if (k.scale != nullptr) {
      const T g = k.scale[row];
      if (f.identity()) {
#pragma omp simd
        for (int64_t i = 0; i < k.vocab; ++i) {
          const T p = exp_nonpositive((a[i] - st.p.max) - st.p.log_sum);
          const T q = exp_nonpositive((b[i] - st.q.max) - st.q.log_sum);
          const T diff = a[i] - b[i];
          a[i] = g * kl_term(p, diff - st.cross);
          b[i] = g * (q - p);
        }
      } else {
        for (int64_t i = 0; i < k.vocab; ++i) {
          const T za = f(a[i]), zb = f(b[i]);
          const T derivative_a = f.derivative(a[i]), derivative_b = f.derivative(b[i]);
          const T p = exp_nonpositive((za - st.p.max) - st.p.log_sum);
          const T q = exp_nonpositive((zb - st.q.max) - st.q.log_sum);
          a[i] = g * kl_term(p, (za - zb) - st.cross) * derivative_a;
          b[i] = g * (q - p) * derivative_b;
        }
      }
    }
  }
}

// The JSD: the KL's arguments and the mixture's constants.
template <typename T>
struct JsdArgs {
  KlArgs<T> pair;
  JsdMixture<T> mixture;
};

// (sum p s, sum q t) of a row, tile by tile, given its two log-sum-exps; summed in double (jsd_terms.h says why),
// each tile in T over the vector lanes first: GCC does not vectorize a float loop with a double reduction.
template <typename T>
ARE_FAST_INLINE JsdPair<double> row_jsd_sums(const T* a, const T* b, int64_t n, const LogitTransform<T>& f,
                                             Lse<T> lp, Lse<T> lq, T log_odds) {
  double sum_ps = 0, sum_qt = 0;
  T scratch_a[kTile], scratch_b[kTile];
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    const T* ta = transformed_tile(a + start, len, f, scratch_a);
    const T* tb = transformed_tile(b + start, len, f, scratch_b);
    T tile_ps = 0, tile_qt = 0;
#pragma omp simd reduction(+ : tile_ps, tile_qt)
    for (int64_t i = 0; i < len; ++i) {
      const T log_p = lp.log_prob(ta[i]), log_q = lq.log_prob(tb[i]);
      const T d = mixture_log_ratio(log_p, log_q, log_odds);
      const T tail = softplus_tail(d);
      tile_ps += kl_term(exp_nonpositive(log_p), softplus_of(d, tail));
      tile_qt += kl_term(exp_nonpositive(log_q), softplus_of(-d, tail));
    }
    sum_ps += tile_ps;
    sum_qt += tile_qt;
  }
  return {sum_ps, sum_qt};
}

// A row's gradients over its logits a, b [n], in place. kTransformed: f is applied to each logit read and its
// derivative chained (the loop then calls tanh and cosh, and stays scalar); else f is the identity, not called.
template <bool kTransformed, typename T>
ARE_FAST_INLINE void row_jsd_gradients(T* a, T* b, int64_t n, const LogitTransform<T>& f, Lse<T> lp, Lse<T> lq,
                                       T log_odds, JsdRowGradient<T> row) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T log_p = lp.log_prob(kTransformed ? f(a[i]) : a[i]), log_q = lq.log_prob(kTransformed ? f(b[i]) : b[i]);
    const T d = mixture_log_ratio(log_p, log_q, log_odds);
    const T tail = softplus_tail(d);
    const T grad_a = jsd_gradient(row.scale.p, exp_nonpositive(log_p), row.sums.p, softplus_of(d, tail));
    const T grad_b = jsd_gradient(row.scale.q, exp_nonpositive(log_q), row.sums.q, softplus_of(-d, tail));
    a[i] = kTransformed ? grad_a * f.derivative(a[i]) : grad_a;
    b[i] = kTransformed ? grad_b * f.derivative(b[i]) : grad_b;
  }
}

// Three passes per row: the log-sum-exps of both streams, the sums (sum p s, sum q t), then (with a gradient
// scale) the gradients, over the logits in place.
template <typename T>
ARE_FAST_INLINE void jsd_rows(const JsdArgs<T>& j, int64_t begin, int64_t end) {
  const KlArgs<T>& k = j.pair;
  const LogitTransform<T>& f = k.f;
  const JsdMixture<T>& mixture = j.mixture;
  for (int64_t row = begin; row < end; ++row) {
    T* a = k.logits_p + row * k.stride_p;
    T* b = k.logits_q + row * k.stride_q;
    if (skipped_row(k, row, a, b)) {
      continue;
    }
    const Lse<T> lp = row_logsumexp(a, k.vocab, f), lq = row_logsumexp(b, k.vocab, f);
    const JsdPair<double> sums = row_jsd_sums(a, b, k.vocab, f, lp, lq, mixture.log_odds);
    k.out[row] = jsd_value(mixture, sums);
    if (k.scale == nullptr) {
      continue;
    }
    const JsdRowGradient<T> gradient = JsdRowGradient<T>::of(mixture, sums, k.scale[row]);
    if (f.identity()) {
      row_jsd_gradients<false>(a, b, k.vocab, f, lp, lq, mixture.log_odds, gradient);
    } else {
      row_jsd_gradients<true>(a, b, k.vocab, f, lp, lq, mixture.log_odds, gradient);
    }
  }
}

// Non-template entry points, so that each can be cloned per instruction set.
ARE_FAST_CLONES void logprob_range(const LogprobArgs<float>& a, int64_t begin, int64_t end) {
  logprob_rows(a, begin, end);
}
ARE_FAST_CLONES void logprob_range(const LogprobArgs<double>& a, int64_t begin, int64_t end) {
  logprob_rows(a, begin, end);
}
ARE_FAST_CLONES void pair_range(const KlArgs<float>& k, int64_t begin, int64_t end) { kl_rows(k, begin, end); }
ARE_FAST_CLONES void pair_range(const KlArgs<double>& k, int64_t begin, int64_t end) { kl_rows(k, begin, end); }
ARE_FAST_CLONES void pair_range(const JsdArgs<float>& j, int64_t begin, int64_t end) { jsd_rows(j, begin, end); }
ARE_FAST_CLONES void pair_range(const JsdArgs<double>& j, int64_t begin, int64_t end) { jsd_rows(j, begin, end); }

at::Tensor logprob_epilogue_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                const std::optional<at::Tensor>& grad_scale, std::optional<double> softcap,
                                std::optional<double> logit_scale) {
  check_logprob_args(logits, targets, c10::DeviceType::CPU);
  const std::optional<at::Tensor> scale = checked_scale(grad_scale, logits);
  const at::Tensor targets_c = targets.contiguous();
  at::Tensor out = at::empty({logits.size(0)}, logits.options());
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "logprob_epilogue", [&] {
    const LogprobArgs<scalar_t> args{logits.mutable_data_ptr<scalar_t>(),
                                     logits.stride(0),
                                     logits.size(1),
                                     targets_c.const_data_ptr<int64_t>(),
                                     ignore_index,
                                     scale ? scale->const_data_ptr<scalar_t>() : nullptr,
                                     out.mutable_data_ptr<scalar_t>(),
                                     make_transform<scalar_t>(softcap, logit_scale)};
    at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) { logprob_range(args, begin, end); });
  });
  return out;
}

// Runs a two-stream epilogue (pair_range) over the rows of a checked (logits_p, logits_q) pair, with the KL's
// arguments as they are or as `extend` completes them (the JSD's mixture); returns the per-row values.
template <typename Extend>
at::Tensor pair_epilogue_cpu(const at::Tensor& logits_p, const at::Tensor& logits_q, const at::Tensor& valid,
                             const std::optional<at::Tensor>& grad_scale, std::optional<double> softcap,
                             std::optional<double> logit_scale, const Extend& extend) {
  const std::optional<at::Tensor> scale = checked_scale(grad_scale, logits_p);
  const at::Tensor valid_c = valid.contiguous();
  at::Tensor out = at::empty({logits_p.size(0)}, logits_p.options());
  AT_DISPATCH_FLOATING_TYPES(logits_p.scalar_type(), "pair_epilogue", [&] {
    const KlArgs<scalar_t> pair{logits_p.mutable_data_ptr<scalar_t>(),
                                logits_q.mutable_data_ptr<scalar_t>(),
                                logits_p.stride(0),
                                logits_q.stride(0),
                                logits_p.size(1),
                                valid_c.const_data_ptr<bool>(),
                                scale ? scale->const_data_ptr<scalar_t>() : nullptr,
                                out.mutable_data_ptr<scalar_t>(),
                                make_transform<scalar_t>(softcap, logit_scale)};
    const auto args = extend(pair);
    at::parallel_for(0, logits_p.size(0), 1, [&](int64_t begin, int64_t end) { pair_range(args, begin, end); });
  });
  return out;
}

template <typename T>
JsdArgs<T> with_mixture(const KlArgs<T>& pair, double beta) {
  return {pair, JsdMixture<T>::of(beta)};
}

at::Tensor kl_epilogue_cpu(const at::Tensor& logits_p, const at::Tensor& logits_q, const at::Tensor& valid,
                           const std::optional<at::Tensor>& grad_scale, std::optional<double> softcap,
                           std::optional<double> logit_scale) {
  check_kl_args(logits_p, logits_q, valid, c10::DeviceType::CPU);
  return pair_epilogue_cpu(logits_p, logits_q, valid, grad_scale, softcap, logit_scale,
                           [](const auto& pair) { return pair; });
}

at::Tensor jsd_epilogue_cpu(const at::Tensor& logits_p, const at::Tensor& logits_q, const at::Tensor& valid,
                            const std::optional<at::Tensor>& grad_scale, double beta, std::optional<double> softcap,
                            std::optional<double> logit_scale) {
  check_jsd_args(logits_p, logits_q, valid, beta, c10::DeviceType::CPU);
  return pair_epilogue_cpu(logits_p, logits_q, valid, grad_scale, softcap, logit_scale,
                           [beta](const auto& pair) { return with_mixture(pair, beta); });
}

// Shape-only versions for fake/meta tensors (torch.compile tracing).
at::Tensor logprob_epilogue_meta(const at::Tensor& logits, const at::Tensor&, int64_t,
                                 const std::optional<at::Tensor>&, std::optional<double>, std::optional<double>) {
  return at::empty({logits.size(0)}, logits.options());
}

at::Tensor kl_epilogue_meta(const at::Tensor& logits_p, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, std::optional<double>, std::optional<double>) {
  return at::empty({logits_p.size(0)}, logits_p.options());
}

at::Tensor jsd_epilogue_meta(const at::Tensor& logits_p, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, double, std::optional<double>, std::optional<double>) {
  return at::empty({logits_p.size(0)}, logits_p.options());
}

}  // namespace
}  // namespace are_fast

TORCH_LIBRARY(are_fast, m) {
  m.def(
      "logprob_epilogue(Tensor(a!) logits, Tensor targets, int ignore_index, Tensor? grad_scale, float? softcap=None, "
      "float? logit_scale=None) -> Tensor");
  m.def(
      "kl_epilogue(Tensor(a!) logits_p, Tensor(b!) logits_q, Tensor valid, Tensor? grad_scale, float? softcap=None, "
      "float? logit_scale=None) -> Tensor");
  m.def(
      "jsd_epilogue(Tensor(a!) logits_p, Tensor(b!) logits_q, Tensor valid, Tensor? grad_scale, float beta, "
      "float? softcap=None, float? logit_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(are_fast, CPU, m) {
  m.impl("logprob_epilogue", &are_fast::logprob_epilogue_cpu);
  m.impl("kl_epilogue", &are_fast::kl_epilogue_cpu);
  m.impl("jsd_epilogue", &are_fast::jsd_epilogue_cpu);
}

TORCH_LIBRARY_IMPL(are_fast, Meta, m) {
  m.impl("logprob_epilogue", &are_fast::logprob_epilogue_meta);
  m.impl("kl_epilogue", &are_fast::kl_epilogue_meta);
  m.impl("jsd_epilogue", &are_fast::jsd_epilogue_meta);
}
