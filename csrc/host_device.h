// ARE_FAST_HOST_DEVICE: how the arithmetic shared by the CPU (epilogues.cpp) and CUDA (epilogues_cuda.cu) row
// epilogues is declared, so that one definition compiles for both and the CPU tests check what the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define ARE_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define ARE_FAST_HOST_DEVICE inline __attribute__((always_inline))  // inlined into the vectorized loops
#else
#define ARE_FAST_HOST_DEVICE inline
#endif
