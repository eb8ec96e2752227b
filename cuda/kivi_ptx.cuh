// kivi_ptx.cuh — every piece of inline PTX the kernels use, in one place, with two implementations.
//
//   nvcc / NVRTC (default): the PTX itself, unchanged.
//   KIVI_SIMT (g++ with tests/simt/kivi_simt.h included first): an emulation on the CPU, written from
//   the PTX ISA, so that the same kernel source runs in `make test` (tests/support/simt.py).
//
// What is here:
//   dynamic_smem_size()          %dynamic_smem_size: the launch's dynamic shared memory, in bytes
//   mma_m16n8k16_bf16 / _f16     mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, D = A B + C
//   mma_m16n8k8_bf16 / _f16      mma.sync.aligned.m16n8k8 (the same, k = 8: A {a0, a1}, B {b0})
//   cp_async16 / cp_async_commit / cp_async_wait<N>   cp.async.cg.shared.global (16 bytes), commit_group,
//                                wait_group N
//   movmatrix_trans              movmatrix.sync.aligned.m8n8.trans.b16: the transpose of an 8 x 8 matrix
//                                of 16-bit elements (lane 4r + c / 2 holds row r, columns c, c + 1 for
//                                even c, low half first: an m16n8k16 C fragment's layout, packed)
//   prmt                         prmt.b32 (default mode): byte n of the result is byte c[4n+2:4n] of
//                                {b, a}, or its sign bit replicated when c[4n+3] is set; only c[15:0]
//                                is read. CUDA's __byte_perm ignores bit 3 of each selector nibble,
//                                so nvcc masks the selector (one LOP3 per call); the decode kernel's
//                                selectors never set it, and this saves the masks.
//   rotl                         x rotated left by n & 31 (CUDA's __funnelshift_l(x, x, n): one SHF.L.W)
//   hadamard_row                 (no PTX: warp shuffles) the butterfly of page.hadamard on a warp's row
//   ex2                          ex2.approx.ftz.f32: 2^x (max 2 ulp error; subnormal inputs and
//                                results flushed to +-0; -inf gives +0). exp2f adds a range fix-up
//                                of three instructions for subnormal results around each MUFU.EX2.
//
// The emulation of mma.sync follows the fragment layouts of the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type", section 9.7.14.5.8): with g = %laneid >> 2 (groupID) and
// j = %laneid % 4 (threadID_in_group),
//   A (16 x 16, row): four .b32 registers hold a0..a7, two elements each, low half first;
//                     row(ai) = g for i in {0,1,4,5}, g + 8 otherwise; col(ai) = 2j + (i & 1) + (i >= 4 ? 8 : 0)
//   B (16 x 8, col):  two .b32 registers hold b0..b3; row(bi) = 2j + (i & 1) + (i >= 2 ? 8 : 0); col(bi) = g
//   C, D (16 x 8, f32): c0..c3; row(ci) = g + (i >= 2 ? 8 : 0); col(ci) = 2j + (i & 1)
// The products of two bf16 (or fp16) values are exact in fp32; the emulation sums the 16 products of
// a dot product and the accumulator in double and rounds once to fp32. Tensor Cores sum in an
// unspecified order with at least fp32 precision, so results may differ in the last bits of fp32.
//
// cp.async is emulated asynchronously: a copy is recorded when issued and its destination is
// overwritten with a poison pattern (0xff bytes: NaN for fp16/fp32) at once; the bytes land only
// when the issuing thread's wait_group retires the copy's group. Reading the destination earlier
// sees the poison (and the race check of tests/simt reports it). Addresses must be 16-byte aligned,
// the destination in shared memory, the source not.
#pragma once

#if defined(KIVI_SIMT) && !defined(KIVI_SIMT_RUNTIME)
#error "KIVI_SIMT: include tests/simt/kivi_simt.h before the kernel source"
#endif

namespace kivi {
namespace ptx {

typedef unsigned int u32;

#ifndef KIVI_SIMT
// ------------------------------------------------------------------------------------------- PTX
__device__ __forceinline__ u32 dynamic_smem_size() {
  u32 r;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}

// One macro body for both input types (only the type suffix differs).
#define KIVI_MMA_M16N8K16(NAME, TYPE)                                                                   \
  __device__ __forceinline__ void NAME(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {              \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, "          \
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                                \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                        \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                        \
  }
KIVI_MMA_M16N8K16(mma_m16n8k16_bf16, "bf16")
KIVI_MMA_M16N8K16(mma_m16n8k16_f16, "f16")
#undef KIVI_MMA_M16N8K16
#define KIVI_MMA_M16N8K8(NAME, TYPE)                                                                    \
  __device__ __forceinline__ void NAME(float (&c)[4], const u32 (&a)[2], u32 b0) {                       \
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, "           \
                 "{%4,%5}, {%6}, {%0,%1,%2,%3};\n"                                                        \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                        \
                 : "r"(a[0]), "r"(a[1]), "r"(b0));                                                      \
  }
KIVI_MMA_M16N8K8(mma_m16n8k8_bf16, "bf16")
KIVI_MMA_M16N8K8(mma_m16n8k8_f16, "f16")
#undef KIVI_MMA_M16N8K8

__device__ __forceinline__ u32 movmatrix_trans(u32 a) {
  u32 r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(a));
  return r;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 c) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

__device__ __forceinline__ u32 rotl(u32 x, u32 n) { return __funnelshift_l(x, x, n); }

__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const u32 dst = (u32)__cvta_generic_to_shared(smem_dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#else
// ------------------------------------------------------------------------------ CPU emulation
inline u32 dynamic_smem_size() { return ::kivi_simt::dynamic_smem_bytes(); }

namespace detail {
// One lane's operands of an m16n8k16 MMA.
struct MmaIn {
  u32 a[4];
  u32 b[2];
  float c[4];
};
struct MmaOut {
  float d[4];
};
// 16-bit element `half` (0: low, 1: high) of a .b32 register, as fp32.
template <bool BF16>
inline float element(u32 reg, int half) {
  const unsigned short bits = (unsigned short)(half ? reg >> 16 : reg & 0xffffu);
  if constexpr (BF16) {
    __nv_bfloat16 x;
    __builtin_memcpy(&x, &bits, 2);
    return __bfloat162float(x);
  } else {
    __half x;
    __builtin_memcpy(&x, &bits, 2);
    return __half2float(x);
  }
}
// Completion of the warp-wide MMA: gather A, B, C from the 32 lanes' fragments (PTX ISA layouts,
// see the header comment), D = A B + C, scatter D back to the lanes.
template <bool BF16>
inline void mma_complete(const MmaIn* in, MmaOut* out, unsigned /*mask: all lanes*/, int /*warp*/) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, j = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = 2 * j + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = element<BF16>(in[lane].a[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) {
      const int row = 2 * j + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][g] = element<BF16>(in[lane].b[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * j + (i & 1)] = in[lane].c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, j = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * j + (i & 1);
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += (double)A[row][k] * (double)B[k][col];
      out[lane].d[i] = (float)acc;
    }
  }
}
template <bool BF16>
inline void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1, const std::source_location& loc) {
  const MmaIn in = {{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}};
  const MmaOut out = ::kivi_simt::warp_collective<MmaIn, MmaOut>(
      BF16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16", 0xffffffffu, in, &mma_complete<BF16>, loc);
  for (int i = 0; i < 4; ++i) c[i] = out.d[i];
}
}  // namespace detail

inline void mma_m16n8k16_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1,
                              std::source_location loc = std::source_location::current()) {
  detail::mma<true>(c, a, b0, b1, loc);
}
inline void mma_m16n8k16_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1,
                             std::source_location loc = std::source_location::current()) {
  detail::mma<false>(c, a, b0, b1, loc);
}
// m16n8k8: its A fragment {a0, a1} and B fragment {b0} sit where m16n8k16's a0, a1 and b0 do (PTX ISA,
// "Matrix Fragments for mma.m16n8k8"): m16n8k16 with k = 8 .. 15 zero.
inline void mma_m16n8k8_bf16(float (&c)[4], const u32 (&a)[2], u32 b0,
                             std::source_location loc = std::source_location::current()) {
  const u32 a4[4] = {a[0], a[1], 0u, 0u};
  detail::mma<true>(c, a4, b0, 0u, loc);
}
inline void mma_m16n8k8_f16(float (&c)[4], const u32 (&a)[2], u32 b0,
                            std::source_location loc = std::source_location::current()) {
  const u32 a4[4] = {a[0], a[1], 0u, 0u};
  detail::mma<false>(c, a4, b0, 0u, loc);
}

namespace detail {
// Lane 4r + c / 2 holds elements (r, c), (r, c + 1) of the source (c even, low half first); the
// result's element (r, c) is the source's (c, r).
inline void movmatrix_complete(const u32* in, u32* out, unsigned /*mask: all lanes*/, int /*warp*/) {
  for (int lane = 0; lane < 32; ++lane) {
    const int r = lane >> 2, c = 2 * (lane & 3);
    u32 v = 0;
    for (int h = 0; h < 2; ++h) {
      const u32 src = in[4 * (c + h) + r / 2];  // holds source row c + h, columns r & ~1, r | 1
      v |= ((src >> (16 * (r & 1))) & 0xffffu) << (16 * h);
    }
    out[lane] = v;
  }
}
}  // namespace detail

inline u32 movmatrix_trans(u32 a, std::source_location loc = std::source_location::current()) {
  return ::kivi_simt::warp_collective<u32, u32>("movmatrix.sync.m8n8.trans.b16", 0xffffffffu, a,
                                                &detail::movmatrix_complete, loc);
}

inline u32 prmt(u32 a, u32 b, u32 c) {
  const unsigned long long x = ((unsigned long long)b << 32) | a;
  u32 r = 0;
  for (int n = 0; n < 4; ++n) {
    const u32 sel = (c >> (4 * n)) & 0xfu;
    u32 byte = (u32)(x >> (8 * (sel & 7u))) & 0xffu;
    if (sel & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    r |= byte << (8 * n);
  }
  return r;
}

inline u32 rotl(u32 x, u32 n) { return (x << (n & 31u)) | (x >> ((32u - n) & 31u)); }

// exp2 correctly rounded-ish on the CPU; the PTX instruction's 2-ulp approximation is within the
// tolerance every decode check states. FTZ: subnormal inputs are 0 (2^0 = 1), subnormal results +0.
inline float ex2(float x) {
  constexpr float kMinNormal = 1.17549435e-38f;
  if (x != 0.f && x > -kMinNormal && x < kMinNormal) x = 0.f;
  const float r = ::exp2f(x);
  return r < kMinNormal ? 0.f : r;
}

inline void cp_async16(void* smem_dst, const void* gmem_src,
                       std::source_location loc = std::source_location::current()) {
  ::kivi_simt::cp_async(smem_dst, gmem_src, 16, loc);
}
inline void cp_async_commit() { ::kivi_simt::cp_async_commit(); }
template <int N>
inline void cp_async_wait(std::source_location loc = std::source_location::current()) {
  ::kivi_simt::cp_async_wait(N, loc);
}
#endif

// Not PTX, but shared by both kernels and built on the warp shuffle alone: page.hadamard on one row
// of D = 32 E values held by a warp, lane l holding elements l * E + c in x[c]. The reference's stages
// in its order: h = 1, 2, .. E / 2 within a lane, then h = E, 2E, .. D / 2 across lanes (partner lane
// l ^ (h / E)); each stage (a + b, a - b) with a the lower index, every addition one IEEE rounding
// (__fadd_rn: bit-equal to torch's fp32 butterfly).
template <int E>
__device__ __forceinline__ void hadamard_row(float (&x)[E], int lane) {
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
#pragma unroll
    for (int c = 0; c < E; ++c) {
      if (c & h) continue;
      const float a = x[c], b = x[c + h];
      x[c] = __fadd_rn(a, b);
      x[c + h] = __fsub_rn(a, b);
    }
  }
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
#pragma unroll
    for (int c = 0; c < E; ++c) {
      const float o = __shfl_xor_sync(0xffffffffu, x[c], m);
      x[c] = (lane & m) ? __fsub_rn(o, x[c]) : __fadd_rn(x[c], o);
    }
  }
}

}  // namespace ptx
}  // namespace kivi
