// simt_device.h — the CUDA built-ins a kernel sees, for host compilation (g++ -DKIVI_SIMT).
//
// bf16 / fp16 types and conversions are CUDA's own (cuda_bf16.h, cuda_fp16.h: they have host
// implementations, so conversions round exactly as on the device). Everything else a kernel of
// cuda/ uses is here: the index variables, `__shared__` (thread_local: the blocks of a launch run
// one at a time on one OS thread, so a thread_local is the block's shared variable), barriers,
// warp collectives, atomics, and the arithmetic intrinsics (IEEE operations in the stated rounding;
// compile without -ffast-math and with -ffp-contract=off, as the loader does).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>

#undef __shared__
#define __shared__ thread_local
#define __launch_bounds__(...)
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif

#define threadIdx (static_cast<const uint3&>(::kivi_simt::g.cur->tid))
#define blockIdx (static_cast<const uint3&>(::kivi_simt::g.block_idx))
#define blockDim (static_cast<const dim3&>(::kivi_simt::g.block))
#define gridDim (static_cast<const dim3&>(::kivi_simt::g.grid))
#define warpSize 32

namespace kivi_simt {
template <class T>
struct ShflIn {
  T value;
  int src;
};
template <class T>
struct Value {
  T value;
};
template <class T>
KIVI_SIMT_RT void shfl_complete(const ShflIn<T>* in, Value<T>* out, unsigned mask, int) {
  for (unsigned m = mask; m; m &= m - 1) {
    const int lane = __builtin_ctz(m), src = in[lane].src;
    // reading a lane outside the mask is undefined in CUDA: here it is an error
    if (!(mask >> src & 1u)) {
      fail(format("shuffle: lane %d reads lane %d, which is not in mask 0x%08x", lane, src, mask));
    }
    out[lane].value = in[src].value;
  }
}
template <class T>
KIVI_SIMT_RT T shfl(unsigned mask, T var, int src_of_lane, int width, const char* what, const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a type the emulation does not support");
  if (width != 32) fail(format("%s at %s: width %d (only 32 is emulated)", what, where(loc).c_str(), width));
  return warp_collective<ShflIn<T>, Value<T>>(what, mask, ShflIn<T>{var, src_of_lane & 31}, &shfl_complete<T>, loc).value;
}
template <class T>
KIVI_SIMT_RT void match_any_complete(const Value<T>* in, Value<unsigned>* out, unsigned mask, int) {
  for (unsigned m = mask; m; m &= m - 1) {
    const int lane = __builtin_ctz(m);
    unsigned peers = 0;
    for (unsigned k = mask; k; k &= k - 1)
      if (memcmp(&in[__builtin_ctz(k)].value, &in[lane].value, sizeof(T)) == 0) peers |= 1u << __builtin_ctz(k);
    out[lane].value = peers;
  }
}
KIVI_SIMT_RT inline void ballot_complete(const Value<int>* in, Value<unsigned>* out, unsigned mask, int) {
  unsigned b = 0;
  for (unsigned m = mask; m; m &= m - 1)
    if (in[__builtin_ctz(m)].value) b |= 1u << __builtin_ctz(m);
  for (unsigned m = mask; m; m &= m - 1) out[__builtin_ctz(m)].value = b;
}
KIVI_SIMT_RT inline void syncwarp_complete(const Value<int>*, Value<int>*, unsigned mask, int warp) {
  if (mask == 0xffffffffu) ++g.warps[warp].epoch;  // orders the warp's shared-memory accesses (race check)
}
KIVI_SIMT_RT inline int lane_id() { return g.cur->lane; }
}  // namespace kivi_simt

// ------------------------------------------------------------------------------------- barriers
KIVI_SIMT_RT inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  kivi_simt::syncthreads(loc);
}
KIVI_SIMT_RT inline void __syncwarp(unsigned mask = 0xffffffffu,
                                    std::source_location loc = std::source_location::current()) {
  using namespace kivi_simt;
  warp_collective<Value<int>, Value<int>>("__syncwarp", mask, Value<int>{0}, &syncwarp_complete, loc);
}
[[noreturn]] KIVI_SIMT_RT inline void __trap(std::source_location loc = std::source_location::current()) {
  kivi_simt::fail("__trap() at " + kivi_simt::where(loc));
  __builtin_unreachable();
}

// ------------------------------------------------------------------------------------- warp collectives
template <class T>
KIVI_SIMT_RT T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                           std::source_location loc = std::source_location::current()) {
  return kivi_simt::shfl(mask, var, src_lane, width, "__shfl_sync", loc);
}
template <class T>
KIVI_SIMT_RT T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                               std::source_location loc = std::source_location::current()) {
  return kivi_simt::shfl(mask, var, kivi_simt::lane_id() ^ lane_mask, width, "__shfl_xor_sync", loc);
}
template <class T>
KIVI_SIMT_RT T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                                std::source_location loc = std::source_location::current()) {
  const int lane = kivi_simt::lane_id(), src = lane + (int)delta;
  return kivi_simt::shfl(mask, var, src < 32 ? src : lane, width, "__shfl_down_sync", loc);
}
template <class T>
KIVI_SIMT_RT T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                              std::source_location loc = std::source_location::current()) {
  const int lane = kivi_simt::lane_id(), src = lane - (int)delta;
  return kivi_simt::shfl(mask, var, src >= 0 ? src : lane, width, "__shfl_up_sync", loc);
}
template <class T>
KIVI_SIMT_RT unsigned __match_any_sync(unsigned mask, T value,
                                       std::source_location loc = std::source_location::current()) {
  using namespace kivi_simt;
  return warp_collective<Value<T>, Value<unsigned>>("__match_any_sync", mask, Value<T>{value},
                                                    &match_any_complete<T>, loc)
      .value;
}
KIVI_SIMT_RT inline unsigned __ballot_sync(unsigned mask, int pred,
                                           std::source_location loc = std::source_location::current()) {
  using namespace kivi_simt;
  return warp_collective<Value<int>, Value<unsigned>>("__ballot_sync", mask, Value<int>{pred != 0},
                                                      &ballot_complete, loc)
      .value;
}
KIVI_SIMT_RT inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return __ballot_sync(mask, pred, loc) != 0;
}
KIVI_SIMT_RT inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return __ballot_sync(mask, pred, loc) == mask;
}

// ------------------------------------------------------------------------------------- atomics
KIVI_SIMT_RT inline int atomicAdd(int* p, int v) { return kivi_simt::atomic_add(p, v); }
KIVI_SIMT_RT inline unsigned atomicAdd(unsigned* p, unsigned v) { return kivi_simt::atomic_add(p, v); }
KIVI_SIMT_RT inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return kivi_simt::atomic_add(p, v);
}
KIVI_SIMT_RT inline float atomicAdd(float* p, float v) { return kivi_simt::atomic_add(p, v); }
KIVI_SIMT_RT inline double atomicAdd(double* p, double v) { return kivi_simt::atomic_add(p, v); }

// ------------------------------------------------------------------------------------- integer intrinsics
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline unsigned __umulhi(unsigned x, unsigned y) { return (unsigned)(((unsigned long long)x * y) >> 32); }
// prmt (default mode): result byte n = byte s<4n+2:4n> of the 8 bytes {y, x} (x the low word).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xffu) << (8 * n);
  return r;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------- bit casts
inline float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
inline int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
inline float __uint_as_float(unsigned x) { return __builtin_bit_cast(float, x); }
inline unsigned __float_as_uint(float x) { return __builtin_bit_cast(unsigned, x); }
inline double __longlong_as_double(long long x) { return __builtin_bit_cast(double, x); }
inline long long __double_as_longlong(double x) { return __builtin_bit_cast(long long, x); }

// ------------------------------------------------------------------------------------- IEEE arithmetic
// Round-to-nearest-even operations: the host's SSE arithmetic (no contraction: -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __double2float_rn(double x) { return (float)x; }
