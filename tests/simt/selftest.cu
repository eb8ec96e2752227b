// selftest.cu — small kernels that exercise the SIMT runtime itself (tests/test_kernels_simt.py).
// Plain CUDA: nvcc compiles this file too (nvcc -cubin -arch=sm_80 -I cuda tests/simt/selftest.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kivi_ptx.cuh"

typedef unsigned int u32;

// Warp collectives, four results per thread.
extern "C" __global__ void st_collectives(int* out) {
  const int tid = threadIdx.x, lane = tid & 31;
  out[4 * tid + 0] = __shfl_xor_sync(0xffffffffu, tid * 10, 5);
  out[4 * tid + 1] = __shfl_sync(0xffffffffu, tid, (lane * 7) & 31);
  out[4 * tid + 2] = (int)__match_any_sync(0xffffffffu, lane / 3);
  out[4 * tid + 3] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
}

// mma.sync m16n8k16, D = A B + C: A (16 x 16, row-major), B^T (8 x 16, row-major), C and D (16 x 8,
// row-major). The lanes gather their fragments with CuTe's thread-value layouts of SM80_16x8x16
// (cute/atom/mma_traits_sm80.hpp), a statement of the PTX ISA's fragment tables independent of
// the one the emulation (kivi_ptx.cuh) is written from:
//   A: ((4,8),(2,2,2)) : ((32,1),(16,8,128)) -> m + 16 k     B: ((4,8),(2,2)) : ((16,1),(8,64)) -> n + 8 k
//   C: ((4,8),(2,2)) : ((32,1),(16,8)) -> m + 16 n           value v of a register pair: 2 r + half
template <typename T, bool BF16>
__device__ void st_mma(const T* A, const T* Bt, const float* C, float* D) {
  const int t = threadIdx.x, t0 = t % 4, t1 = t / 4;
  u32 a[4], b[2];
  float c[4];
  for (int r = 0; r < 4; ++r) {
    unsigned short h[2];
    for (int half = 0; half < 2; ++half) {
      const int v = 2 * r + half, idx = 32 * t0 + t1 + 16 * (v & 1) + 8 * ((v >> 1) & 1) + 128 * (v >> 2);
      const T x = A[(idx % 16) * 16 + idx / 16];
      h[half] = *reinterpret_cast<const unsigned short*>(&x);
    }
    a[r] = h[0] | ((u32)h[1] << 16);
  }
  for (int r = 0; r < 2; ++r) {
    unsigned short h[2];
    for (int half = 0; half < 2; ++half) {
      const int v = 2 * r + half, idx = 16 * t0 + t1 + 8 * (v & 1) + 64 * (v >> 1);
      const T x = Bt[(idx % 8) * 16 + idx / 8];
      h[half] = *reinterpret_cast<const unsigned short*>(&x);
    }
    b[r] = h[0] | ((u32)h[1] << 16);
  }
  for (int v = 0; v < 4; ++v) {
    const int idx = 32 * t0 + t1 + 16 * (v & 1) + 8 * (v >> 1);
    c[v] = C[(idx % 16) * 8 + idx / 16];
  }
  if constexpr (BF16) {
    kivi::ptx::mma_m16n8k16_bf16(c, a, b[0], b[1]);
  } else {
    kivi::ptx::mma_m16n8k16_f16(c, a, b[0], b[1]);
  }
  for (int v = 0; v < 4; ++v) {
    const int idx = 32 * t0 + t1 + 16 * (v & 1) + 8 * (v >> 1);
    D[(idx % 16) * 8 + idx / 16] = c[v];
  }
}
extern "C" __global__ void st_mma_bf16(const __nv_bfloat16* A, const __nv_bfloat16* Bt, const float* C, float* D) {
  st_mma<__nv_bfloat16, true>(A, Bt, C, D);
}
extern "C" __global__ void st_mma_f16(const __half* A, const __half* Bt, const float* C, float* D) {
  st_mma<__half, false>(A, Bt, C, D);
}

// movmatrix.m8n8.trans.b16 on an 8 x 8 matrix of 16-bit values M (row-major): lane t holds elements
// (t / 4, 2 (t % 4) + h), h = 0, 1 (the rows 0..7 of CuTe's C layout above), before and after.
extern "C" __global__ void st_movmatrix(const unsigned short* M, unsigned short* out) {
  const int t = threadIdx.x, i = (t / 4) * 8 + 2 * (t % 4);
  const u32 r = kivi::ptx::movmatrix_trans(M[i] | ((u32)M[i + 1] << 16));
  out[i] = (unsigned short)(r & 0xffffu);
  out[i + 1] = (unsigned short)(r >> 16);
}

// Threads at two different __syncthreads (mode 0), or half of them returning before one (mode 1).
extern "C" __global__ void st_divergent_barrier(int mode, int* out) {
  if (mode == 0) {
    if (threadIdx.x % 2) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else {
    if (threadIdx.x >= 16) return;
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lane 0 waits at __syncthreads while its warp waits for it in a shuffle.
extern "C" __global__ void st_deadlock(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// cp.async of 16 bytes per thread into dynamic shared memory; out[2 t] is read before wait_group
// (sees the poison), out[2 t + 1] after.
extern "C" __global__ void st_cp_async(const float4* src, float* out) {
  extern __shared__ __align__(16) float4 st_smem[];
  const int t = threadIdx.x;
  kivi::ptx::cp_async16(&st_smem[t], &src[t]);
  kivi::ptx::cp_async_commit();
  out[2 * t] = st_smem[t].x;
  kivi::ptx::cp_async_wait<0>();
  out[2 * t + 1] = st_smem[t].x;
}

// Thread 0 writes byte n of dynamic shared memory.
extern "C" __global__ void st_smem_write(int n) {
  extern __shared__ __align__(16) float4 st_smem[];
  if (threadIdx.x == 0) reinterpret_cast<unsigned char*>(st_smem)[n] = 1;
}

// Thread 0 reads byte n of dynamic shared memory (after thread 0 wrote the first n bytes).
extern "C" __global__ void st_smem_read(int n, int* out) {
  extern __shared__ __align__(16) float4 st_smem[];
  unsigned char* b = reinterpret_cast<unsigned char*>(st_smem);
  if (threadIdx.x == 0) {
    for (int i = 0; i < n; ++i) b[i] = 0;
    out[0] = b[n];
  }
}

extern "C" __global__ void st_store(int* p) { p[threadIdx.x] = 1; }

extern "C" __global__ void st_trap() {
  if (threadIdx.x == 7) __trap();
}

extern "C" __global__ void st_spin(const volatile int* flag) {
  while (flag[0] == 0) {
  }
}

// Every thread writes its slot of a static __shared__ array, then reads its neighbour's: with a
// __syncthreads (sync 1), a __syncwarp (sync 2, neighbours in the warp), or nothing (sync 0: a race).
extern "C" __global__ void st_race(int sync, int* out) {
  __shared__ int x[64];
  const int t = threadIdx.x;
  x[t] = t * 3;
  if (sync == 1) __syncthreads();
  if (sync == 2) __syncwarp();
  out[t] = x[(t & ~31) | ((t + 1) & 31)];
}

// Arguments of every emulated type.
extern "C" __global__ void st_args(int a, long long b, float c, double d, unsigned e, const int* p, double* out) {
  if (threadIdx.x == 0) out[0] = a + (double)b + c + d + e + p[0];
}
