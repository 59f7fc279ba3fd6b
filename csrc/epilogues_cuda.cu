// CUDA versions of the row epilogues of epilogues.cpp (same contract and schemas, registered for the CUDA
// dispatch key): one thread block per row. Each thread folds its strided share of the row into a running
// (max, sum of exp(x - max)) pair, the block merges the pairs with warp shuffles, and a second sweep writes
// the gradient over the logits. Arithmetic runs in the logits' dtype (float32 or float64). The logit transforms
// (softcap, logit_scale) are those of logit_transform.h, applied to each logit as it is read. The JSD takes one
// more sweep, for its sums; its per-entry arithmetic is jsd_terms.h's, which the CPU code runs too.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "epilogue_checks.h"
#include "jsd_terms.h"
#include "kl_terms.h"
#include "logit_transform.h"

namespace are_fast {
namespace {

constexpr int kThreads = 512;  // per block; a multiple of the warp size
constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -T(INFINITY);
}

// Running max, sum of exp(x - max) and a weighted sum of exp(x - max) * w over a set of elements.
template <typename T>
struct Stat {
  T max;
  T sum;
  T weighted;
};

// A single element x with weight w; -inf contributes nothing (not even 0 * an infinite w).
template <typename T>
__device__ __forceinline__ Stat<T> element(T x, T w) {
  const T one = x == neg_inf<T>() ? T(0) : T(1);
  return {x, one, kl_term(one, w)};
}

// Merges two statistics (associative). fmax ignores NaN in the maxes; a NaN element still poisons the sums.
template <typename T>
__device__ __forceinline__ Stat<T> merge(const Stat<T>& a, const Stat<T>& b) {
  const T m = fmax(a.max, b.max);
  const T fa = a.max == m ? T(1) : exp(a.max - m);
  const T fb = b.max == m ? T(1) : exp(b.max - m);
  return {m, a.sum * fa + b.sum * fb, a.weighted * fa + b.weighted * fb};
}

// The merge of every thread's statistic, returned to all threads. shared: kThreads / kWarp entries.
template <typename T>
__device__ Stat<T> block_merge(Stat<T> s, Stat<T>* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const Stat<T> other{__shfl_down_sync(0xffffffffu, s.max, offset), __shfl_down_sync(0xffffffffu, s.sum, offset),
                        __shfl_down_sync(0xffffffffu, s.weighted, offset)};
    s = merge(s, other);
  }
  __syncthreads();  // shared may still be read from a previous call
  if (lane == 0) {
    shared[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < kThreads / kWarp ? shared[lane] : Stat<T>{neg_inf<T>(), T(0), T(0)};
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const Stat<T> other{__shfl_down_sync(0xffffffffu, s.max, offset),
                          __shfl_down_sync(0xffffffffu, s.sum, offset),
                          __shfl_down_sync(0xffffffffu, s.weighted, offset)};
      s = merge(s, other);
    }
    if (lane == 0) {
      shared[0] = s;
    }
  }
  __syncthreads();
  return shared[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_kernel(T* logits, int64_t stride, int64_t vocab,
                                                           const int64_t* targets, int64_t ignore_index,
                                                           const T* scale, T* out, LogitTransform<T> f) {
  __shared__ Stat<T> shared[kThreads / kWarp];
  const int64_t row = blockIdx.x;
  T* x = logits + row * stride;
  const int64_t target = targets[row];
  if (target == ignore_index || target < 0 || target >= vocab) {
    if (threadIdx.x == 0) {
      out[row] = target == ignore_index ? T(0) : T(NAN);
    }
    if (scale != nullptr) {
      for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
        x[i] = T(0);
      }
    }
    return;
  }
  const T target_logit = f(x[target]);  // read by every thread before block_merge's barrier, so before any write
  Stat<T> s{neg_inf<T>(), T(0), T(0)};
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    s = merge(s, element(f(x[i]), T(0)));
  }
  s = block_merge(s, shared);
  const T log_sum = log(s.sum);  // x - lse is formed as (x - max) - log_sum, exact for large logits
  if (threadIdx.x == 0) {
    out[row] = (target_logit - s.max) - log_sum;
  }
  if (scale != nullptr) {
    const T g = scale[row];
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const T z = x[i];
      x[i] = ((i == target ? g : T(0)) - g * exp((f(z) - s.max) - log_sum)) * f.derivative(z);
    }
  }
}

// The arguments of a two-stream (KL, JSD) kernel: rows of logits_p and logits_q, [C] valid flags and gradient
// scales (nullptr: values only), [C] values out.
template <typename T>
struct PairArgs {
  T* logits_p;
  T* logits_q;
  int64_t stride_p;
  int64_t stride_q;
  int64_t vocab;
  const bool* valid;
  const T* scale;
  T* out;
  LogitTransform<T> f;
};

// Gives a row whose valid flag is false 0 and zero gradients; true when `row` is one (the block is then done).
template <typename T>
__device__ __forceinline__ bool skipped_row(const PairArgs<T>& k, int64_t row, T* a, T* b) {
  if (k.valid[row]) {
    return false;
  }
  if (threadIdx.x == 0) {
    k.out[row] = T(0);
  }
  if (k.scale != nullptr) {
    for (int64_t i = threadIdx.x; i < k.vocab; i += kThreads) {
      a[i] = T(0);
      b[i] = T(0);
    }
  }
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kl_kernel(PairArgs<T> k) {
  __shared__ Stat<T> shared[kThreads / kWarp];
  const int64_t row = blockIdx.x;
  T* a = k.logits_p + row * k.stride_p;
  T* b = k.logits_q + row * k.stride_q;
  if (skipped_row(k, row, a, b)) {
    return;
  }
  const LogitTransform<T>& f = k.f;
  Stat<T> sa{neg_inf<T>(), T(0), T(0)};  // weighted: sum exp(a - max a) (a - b)
  Stat<T> sb{neg_inf<T>(), T(0), T(0)};
  for (int64_t i = threadIdx.x; i < k.vocab; i += kThreads) {
    const T za = f(a[i]), zb = f(b[i]);
    sa = merge(sa, element(za, za - zb));
    sb = merge(sb, element(zb, T(0)));
  }
  sa = block_merge(sa, shared);
  sb = block_merge(sb, shared);
  const T log_sum_p = log(sa.sum);
  const T log_sum_q = log(sb.sum);
  const T cross = sa.weighted / sa.sum;  // sum_v p_v (a_v - b_v)
  if (threadIdx.x == 0) {
    k.out[row] = cross - (sa.max - sb.max) - (log_sum_p - log_sum_q);
  }
  if (k.scale != nullptr) {
    const T g = k.scale[row];
    for (int64_t i = threadIdx.x; i < k.vocab; i += kThreads) {
      const T raw_a = a[i], raw_b = b[i];
      const T za = f(raw_a), zb = f(raw_b);
      const T p = exp((za - sa.max) - log_sum_p);
      const T q = exp((zb - sb.max) - log_sum_q);
      a[i] = g * kl_term(p, (za - zb) - cross) * f.derivative(raw_a);
      b[i] = g * (q - p) * f.derivative(raw_b);
    }
  }
}

// A stream's log-sum-exp as max + log_sum (x - lse is formed as (x - max) - log_sum).
template <typename T>
struct RowLse {
  T max;
  T log_sum;

  __device__ __forceinline__ T log_prob(T z) const { return (z - max) - log_sum; }
};

// One entry's log-probabilities, d (jsd_terms.h's mixture_log_ratio) and softplus tail from its transformed
// logits za, zb.
template <typename T>
struct JsdEntry {
  T log_p;
  T log_q;
  T d;
  T tail;

  __device__ __forceinline__ static JsdEntry of(T za, T zb, const RowLse<T>& lp, const RowLse<T>& lq, T log_odds) {
    const T log_p = lp.log_prob(za), log_q = lq.log_prob(zb);
    const T d = mixture_log_ratio(log_p, log_q, log_odds);
    return {log_p, log_q, d, softplus_tail(d)};
  }
};

// Three sweeps per row: the log-sum-exps of both streams, the sums (sum p s, sum q t), then (with a gradient
// scale) the gradients over the logits in place.
template <typename T>
__global__ void __launch_bounds__(kThreads) jsd_kernel(PairArgs<T> k, JsdMixture<T> mixture) {
  __shared__ Stat<T> shared[kThreads / kWarp];
  __shared__ Stat<double> shared_sums[kThreads / kWarp];
  const int64_t row = blockIdx.x;
  T* a = k.logits_p + row * k.stride_p;
  T* b = k.logits_q + row * k.stride_q;
  if (skipped_row(k, row, a, b)) {
    return;
  }
  const LogitTransform<T>& f = k.f;
  Stat<T> sa{neg_inf<T>(), T(0), T(0)};
  Stat<T> sb{neg_inf<T>(), T(0), T(0)};
  for (int64_t i = threadIdx.x; i < k.vocab; i += kThreads) {
    sa = merge(sa, element(f(a[i]), T(0)));
    sb = merge(sb, element(f(b[i]), T(0)));
  }
  sa = block_merge(sa, shared);
  sb = block_merge(sb, shared);
  const RowLse<T> lp{sa.max, log(sa.sum)}, lq{sb.max, log(sb.sum)};
  JsdPair<double> part{0.0, 0.0};  // double: see jsd_terms.h
  for (int64_t i = threadIdx.x; i < k.vocab; i += kThreads) {
    const JsdEntry<T> e = JsdEntry<T>::of(f(a[i]), f(b[i]), lp, lq, mixture.log_odds);
    part.p += kl_term(exp(e.log_p), softplus_of(e.d, e.tail));
    part.q += kl_term(exp(e.log_q), softplus_of(-e.d, e.tail));
  }
  // Statistics with a common max of 0 merge by adding their sum and weighted fields: the block's two sums.
  const Stat<double> total = block_merge(Stat<double>{0.0, part.p, part.q}, shared_sums);
  const JsdPair<double> sums{total.sum, total.weighted};
  if (threadIdx.x == 0) {
    k.out[row] = jsd_value(mixture, sums);
  }
  if (k.scale != nullptr) {
    const JsdRowGradient<T> row_gradient = JsdRowGradient<T>::of(mixture, sums, k.scale[row]);
    for (int64_t i = threadIdx.x; i < k.vocab; i += kThreads) {
      const T raw_a = a[i], raw_b = b[i];
      const JsdEntry<T> e = JsdEntry<T>::of(f(raw_a), f(raw_b), lp, lq, mixture.log_odds);
      const T grad_a = jsd_gradient(row_gradient.scale.p, exp(e.log_p), row_gradient.sums.p, softplus_of(e.d, e.tail));
      const T grad_b = jsd_gradient(row_gradient.scale.q, exp(e.log_q), row_gradient.sums.q, softplus_of(-e.d, e.tail));
      a[i] = grad_a * f.derivative(raw_a);
      b[i] = grad_b * f.derivative(raw_b);
    }
  }
}

at::Tensor logprob_epilogue_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                 const std::optional<at::Tensor>& grad_scale, std::optional<double> softcap,
                                 std::optional<double> logit_scale) {
  check_logprob_args(logits, targets, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits.device());
  const std::optional<at::Tensor> scale = checked_scale(grad_scale, logits);
  const at::Tensor targets_c = targets.contiguous();
  TORCH_CHECK_VALUE(logits.size(0) <= std::numeric_limits<int32_t>::max(),
                    "logits: at most 2^31 - 1 rows per call (one block per row)");
  at::Tensor out = at::empty({logits.size(0)}, logits.options());
  if (logits.size(0) == 0) {
    return out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "logprob_epilogue", [&] {
    logprob_kernel<scalar_t><<<logits.size(0), kThreads, 0, stream>>>(
        logits.mutable_data_ptr<scalar_t>(), logits.stride(0), logits.size(1), targets_c.const_data_ptr<int64_t>(),
        ignore_index, scale ? scale->const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
        make_transform<scalar_t>(softcap, logit_scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Launches a two-stream kernel one block per row of a checked (logits_p, logits_q) pair:
// launch(PairArgs<scalar_t>, grid, stream) for the rows' dtype. Returns the per-row values.
template <typename Launch>
at::Tensor pair_epilogue_cuda(const at::Tensor& logits_p, const at::Tensor& logits_q, const at::Tensor& valid,
                              const std::optional<at::Tensor>& grad_scale, std::optional<double> softcap,
                              std::optional<double> logit_scale, const Launch& launch) {
  const c10::cuda::CUDAGuard guard(logits_p.device());
  const std::optional<at::Tensor> scale = checked_scale(grad_scale, logits_p);
  const at::Tensor valid_c = valid.contiguous();
  TORCH_CHECK_VALUE(logits_p.size(0) <= std::numeric_limits<int32_t>::max(),
                    "logits_p: at most 2^31 - 1 rows per call (one block per row)");
  at::Tensor out = at::empty({logits_p.size(0)}, logits_p.options());
  if (logits_p.size(0) == 0) {
    return out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits_p.scalar_type(), "pair_epilogue", [&] {
    const PairArgs<scalar_t> args{logits_p.mutable_data_ptr<scalar_t>(),
                                  logits_q.mutable_data_ptr<scalar_t>(),
                                  logits_p.stride(0),
                                  logits_q.stride(0),
                                  logits_p.size(1),
                                  valid_c.const_data_ptr<bool>(),
                                  scale ? scale->const_data_ptr<scalar_t>() : nullptr,
                                  out.mutable_data_ptr<scalar_t>(),
                                  make_transform<scalar_t>(softcap, logit_scale)};
    launch(args, static_cast<unsigned>(logits_p.size(0)), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor kl_epilogue_cuda(const at::Tensor& logits_p, const at::Tensor& logits_q, const at::Tensor& valid,
                            const std::optional<at::Tensor>& grad_scale, std::optional<double> softcap,
                            std::optional<double> logit_scale) {
  check_kl_args(logits_p, logits_q, valid, c10::DeviceType::CUDA);
  return pair_epilogue_cuda(logits_p, logits_q, valid, grad_scale, softcap, logit_scale,
                            [](const auto& args, unsigned rows, cudaStream_t stream) {
                              kl_kernel<<<rows, kThreads, 0, stream>>>(args);
                            });
}

at::Tensor jsd_epilogue_cuda(const at::Tensor& logits_p, const at::Tensor& logits_q, const at::Tensor& valid,
                             const std::optional<at::Tensor>& grad_scale, double beta, std::optional<double> softcap,
                             std::optional<double> logit_scale) {
  check_jsd_args(logits_p, logits_q, valid, beta, c10::DeviceType::CUDA);
  return pair_epilogue_cuda(logits_p, logits_q, valid, grad_scale, softcap, logit_scale,
                            [beta](const auto& args, unsigned rows, cudaStream_t stream) {
                              using T = std::decay_t<decltype(*args.out)>;
                              jsd_kernel<<<rows, kThreads, 0, stream>>>(args, JsdMixture<T>::of(beta));
                            });
}

}  // namespace
}  // namespace are_fast

TORCH_LIBRARY_IMPL(are_fast, CUDA, m) {
  m.impl("logprob_epilogue", &are_fast::logprob_epilogue_cuda);
  m.impl("kl_epilogue", &are_fast::kl_epilogue_cuda);
  m.impl("jsd_epilogue", &are_fast::jsd_epilogue_cuda);
}
