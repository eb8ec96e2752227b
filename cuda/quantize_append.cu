// quantize_append.cu — the fused append of kivi-serve: write new tokens to staging, quantize pages.
//
// Spec: kivi_serve/kernels/reference.py (`append_kv`, `quantize_pages`, `dequantize_pages`); the
// page format: cuda/kivi_layout.cuh. Built by kivi_serve/kernels/loader.py, one cubin per
// configuration, with these defines (defaults below let `nvcc -cubin -I cuda` build it by hand):
//   KIVI_HEAD_DIM (64|128|256)  KIVI_PAGE (64|128|256)  KIVI_K_BITS, KIVI_V_BITS (2|3|4)
//   KIVI_EXACT (0|1)  KIVI_OUTLIERS (0|1)  KIVI_HI (wide K channels: a multiple of 4 < D, 0 if none;
//   needs KIVI_K_BITS < 4)  KIVI_DTYPE (0: fp16, 1: bf16 — key/value dtype)
//   KIVI_STAGING (1: staging rows of D int8 codes + an fp32 scale, 0: rows of D model-dtype values;
//   kivi_serve/quant/staging.py)  KIVI_V_ROTATE (0|1: values quantized rotated, kivi_layout.cuh)
//   KIVI_V_PIN_ENDS (1|0: the V codebook's end levels pinned at 0 and 1, or fitted too)
// Compile WITHOUT fast math; the loader also passes -fmad=false: the quantizer must reproduce the
// PyTorch reference bit for bit, so every rounding step below is spelled out (__fadd_rn, ...).
//
// Kernels (extern "C"):
//   kivi_append      CTAs [0, write_ctas) copy this step's tokens into their staging slots; CTA
//                    write_ctas + i quantizes page-op i (blockIdx.y = KV head). An op's token t comes
//                    from its staging slot (t < prefix, slot >= 0), from its own early-finalised
//                    block dequantized (t < prefix, slot < 0), or from key/value row
//                    start + t - prefix (t >= prefix).
//   kivi_dequantize  pages → K, V in the model dtype (prefill over cached pages).
//   kivi_reopen      pages → staging rows (an early-finalised page re-opened into a slot).
// An AppendPlan (kivi_serve/backend/staging.py) is executed as up to three launches, in its order:
//   1. kivi_append: evict + finalize ops (both only read staging; they write distinct blocks)
//   2. kivi_reopen: reopen (writes slots the first launch may have read)
//   3. kivi_append with write CTAs only (writes slots after everything else read them)
// A decode step is launch 3 alone, plus launch 1 when a page fills.
//
// Quantization of one page (one CTA of 256 threads per (page, KV head)):
//   1. load the K tile (P x D) into shared memory
//   2. exact token: the sink (token 0) or argmax of the fp64 outlier score   [exact_token_score]
//   3. per-channel K outlier (drop the extreme that shrinks the range most)  [choose_k_outlier]
//   4. per-channel fp16 lo / scale over the kept elements                     [range_params]
//   5. wide channels (the HI largest fp16 scales, ties to the lower channel) and the integer
//      Lloyd weights rint(scale^2 / max scale^2 * 4096) of every K channel    [wide_and_weights]
//   6. fixed-point Lloyd-Max with pinned ends, integer cell sums, fallback to uniform [fit_codebook]:
//      K: 2^KB levels on the non-wide channels, 2^(KB+1) levels on the wide ones, both weighted
//   7. codes (fp32 thresholds) packed in mma B-fragment order, metadata       [pack_planes]; a wide
//      channel's low KB bits go to the K planes, its top bit to wide_plane
//   8. the same for V with per-token ranges (one codebook, unweighted); with KIVI_V_ROTATE of each
//      token's rotated value (rotate_row: the reference's butterfly, in its order), exact_v unrotated;
//      with KIVI_V_PIN_ENDS 0 all levels fitted.
// Each rule lives in one device function so that a change of the reference rule stays local.
//
// Measured speed: none yet (written without a GPU). `kivi-serve bench kernels` measures it.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "kivi_layout.cuh"
#include "kivi_ptx.cuh"  // (kivi_layout.cuh: the defaults of the KIVI_* page-format defines)

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

namespace {

constexpr int D = KIVI_HEAD_DIM;
constexpr int P = KIVI_PAGE;
constexpr int KB = KIVI_K_BITS;
constexpr int VB = KIVI_V_BITS;
constexpr bool EXACT = KIVI_EXACT != 0;
constexpr bool OUTLIERS = KIVI_OUTLIERS != 0;
constexpr int HI = KIVI_HI;  // wide K channels per page
constexpr bool V_ROTATE = KIVI_V_ROTATE != 0;
constexpr bool V_PIN = KIVI_V_PIN_ENDS != 0;
using Layout = kivi::KiviLayout<D, P, KB, VB, EXACT, OUTLIERS, HI>;
constexpr int LK = 1 << KB;       // K codebook levels
constexpr int LH = HI > 0 ? (2 << KB) : 2;  // wide-channel codebook levels (2: a placeholder when HI == 0)
constexpr u32 kLowMask = LK - 1;  // the code bits the K planes hold

#if KIVI_DTYPE == 1
typedef __nv_bfloat16 T;
__device__ __forceinline__ float to_f32(T x) { return __bfloat162float(x); }
__device__ __forceinline__ T from_f32(float x) { return __float2bfloat16_rn(x); }
#else
typedef __half T;
__device__ __forceinline__ float to_f32(T x) { return __half2float(x); }
__device__ __forceinline__ T from_f32(float x) { return __float2half_rn(x); }
#endif

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFixedPoint = 4096;  // codebook.FIXED_POINT
constexpr int kLloydSteps = 8;     // codebook.LLOYD_STEPS
constexpr int kMaxLevels = 16;
constexpr int kWeightOne = 4096;   // codebook.WEIGHT_ONE
constexpr float kFp16Max = 65504.0f;
__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double inf_d() { return __longlong_as_double(0x7ff0000000000000LL); }
static_assert(P == 64 || P == 128 || P == 256, "the CUDA kernels support pages of 64, 128 or 256 tokens");
static_assert(kThreads >= D && kThreads >= P, "one thread per channel and per token");
static_assert(HI == 0 || LH <= kMaxLevels, "wide channels need k_bits < 4");

// ------------------------------------------------------------------------------ staging rows
// kivi_serve/quant/staging.py. KIVI_STAGING 0: a row is D values of T. KIVI_STAGING 1: D int8 codes,
// then the row's fp32 scale = max|x| / 127; code = clamp(rint(x / scale), +-127) (0 when the scale
// is 0); read back as T(code * scale). Every step one IEEE-rounded operation: bit-equal to torch.
// (A NaN in a row: fmaxf drops it where torch.amax would propagate it; NaN keys are garbage anyway.)
constexpr int kRowBytes = KIVI_STAGING ? D + 4 : D * (int)sizeof(T);
static_assert(kRowBytes % 4 == 0, "staged rows keep their fp32 scale 4-byte aligned");

__device__ __forceinline__ T staged_value(const u8* row, int d) {
#if KIVI_STAGING
  const float scale = *reinterpret_cast<const float*>(row + D);
  return from_f32(__fmul_rn((float)(signed char)row[d], scale));
#else
  return reinterpret_cast<const T*>(row)[d];
#endif
}

// One warp stores one row: lane l holds x[c] = element l * E + c (E = D / 32), model-dtype values.
__device__ __forceinline__ void store_row_warp(const float* x, int lane, u8* row) {
  constexpr int E = D / 32;
#if KIVI_STAGING
  float amax = 0.0f;
#pragma unroll
  for (int c = 0; c < E; ++c) amax = fmaxf(amax, fabsf(x[c]));
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = __fdiv_rn(amax, 127.0f);
#pragma unroll
  for (int c = 0; c < E; ++c) {
    const float q = scale > 0.0f ? rintf(__fdiv_rn(x[c], scale)) : 0.0f;
    row[lane * E + c] = (u8)(signed char)(int)fminf(127.0f, fmaxf(-127.0f, q));
  }
  if (lane == 0) *reinterpret_cast<float*>(row + D) = scale;
#else
#pragma unroll
  for (int c = 0; c < E; ++c) reinterpret_cast<T*>(row)[lane * E + c] = from_f32(x[c]);
#endif
}

// ------------------------------------------------------------------------------ small helpers
// reference._fp16: clamp to +-65504 (NaN stays NaN), round to nearest even.
__device__ __forceinline__ __half fp16_sat(float x) {
  float c = x < -kFp16Max ? -kFp16Max : (x > kFp16Max ? kFp16Max : x);
  return __float2half_rn(c);
}
__device__ __forceinline__ float fp16_round(float x) { return __half2float(fp16_sat(x)); }
// torch.clamp(x, 0, 1): NaN propagates.
__device__ __forceinline__ float clamp01(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
__device__ __forceinline__ void store_half(u8* base, int offset, int i, __half v) {
  reinterpret_cast<__half*>(base + offset)[i] = v;
}
using kivi::ptx::dynamic_smem_size;
// max/min as torch.amax/amin: a NaN anywhere makes the result NaN (fmaxf/fminf would drop it and
// code the page from the other values; the reference's page is then all NaN metadata). On +-0 torch
// keeps whichever it meets first in its own (vectorised) order, which no fixed order reproduces;
// these keep the first argument, so a channel whose extreme is a signed zero may differ from the
// reference in the sign bit of k_lo/v_lo only (a zero either way).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a >= b) ? a : b; }
__device__ __forceinline__ float nan_min(float a, float b) { return (a != a || a <= b) ? a : b; }
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o; o >>= 1) v = nan_min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Column stored at (group w, position p) of a packed row, and its inverse.
using kivi::packed_col;
using kivi::packed_pos;


// ------------------------------------------------------------------------------ shared state
struct Smem {
  float ch_lo[D], ch_scale[D];   // K per-channel lo / scale (fp16 values held as fp32)
  float tk_lo[P], tk_scale[P];   // V per-token lo / scale
  // Scratch whose lifetimes do not overlap (shared memory is tight: every configuration but rotated
  // values at head_dim 256 x page 256 must fit the 163 KiB of an A100), in the order quantize_page uses
  // them, each phase ending in a __syncthreads:
  union {
    int old_hi_pos[D];  // build_hi_pos of the page's old bytes: load_tile of K only
    struct {
      double ch_mid[D], ch_half[D];  // outlier-token score statistics (fp64)
      double score[P];               // outlier-token score per token
    } ex;                            // exact_token only
    struct {
      u32 k_weight[D];  // K Lloyd weight of channel d (codebook.scale_weights)
      int hi_rank[D];   // rank of channel d by fp16 scale (descending, ties: lower d first)
    } w;                // from wide_and_weights to the end of the K codebook fits
  } u;
  int kout_idx[D];               // K outlier token per channel
  int kout_drop[D];              // 1: that element is excluded from the channel's range
  int hi_pos[D];                 // row of channel d in wide_idx / wide_plane; -1: not a wide channel
  int hi_list[HI > 0 ? HI : 1];  // wide_idx: the wide channels, ascending
  float levels[kMaxLevels];      // codebook (fp32 values)
  float hlevels[kMaxLevels];     // the wide channels' codebook
  u64 sum_w[kMaxLevels], sum_wu[kMaxLevels], dist[2];
  int exact_idx;
};
// Dynamic shared memory: the tile (P x D, model dtype; with rotated values P x D fp32: the V tile is
// loaded into its upper half and rotated into it row by row, rotate_tile), the fixed-point values
// (P x D u16) where they fit an A100's 163 KiB (else each is recomputed where it is read: the same
// function of the tile, so the same codebooks), then Smem. A page completed from its own block is read
// in place: its K sections before anything is written, its V sections (untouched by the K pass) while
// the V tile loads, with the old exact-token index kept aside (Source::old_exact).
constexpr int kSmemBudget = 163 * 1024;  // sharedMemPerBlockOptin of sm_80
constexpr int kTileBytes = V_ROTATE ? P * D * 4 : P * D * (int)sizeof(T);
constexpr int kStateBytes = (int)((sizeof(Smem) + 15) / 16 * 16);
constexpr bool kStoreFixed = kTileBytes + P * D * 2 + kStateBytes <= kSmemBudget;
constexpr int kFixedBytes = kStoreFixed ? P * D * 2 : 0;
constexpr int kSmemBytes = kTileBytes + kFixedBytes + kStateBytes;
static_assert(kSmemBytes <= 227 * 1024, "shared memory budget (rotated values at head_dim 256 x page 256 do not fit)");

__device__ __forceinline__ u16* smem_fixed(u8* smem) { return reinterpret_cast<u16*>(smem + kTileBytes); }
__device__ __forceinline__ Smem& smem_state(u8* smem) { return *reinterpret_cast<Smem*>(smem + kTileBytes + kFixedBytes); }

// ------------------------------------------------------------------------------ the rules (the spec)
// reference.outlier_token_score + argmax: the exact-token slot of a non-first page keeps the token
// whose key lies farthest from the page's per-channel mid-range (sum of squared half-range units,
// fp64, valid tokens only); first index on ties. A first page keeps the sink, token 0.
// Summation order: lane-strided partial sums over channels, then a fixed xor tree. It is fixed
// (identical rows score identically) but not torch's CPU order: the argmax agrees with the
// reference unless two different tokens' scores agree to ~1e-16 relative.
__device__ int exact_token(const T* tile, Smem& s, int fill, bool sink) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (!sink) {
    if (tid < D) {
      double hi = -1.0e308, lo = 1.0e308;
      for (int t = 0; t < fill; ++t) {
        const double x = (double)to_f32(tile[t * D + tid]);
        hi = x > hi ? x : hi;
        lo = x < lo ? x : lo;
      }
      s.u.ex.ch_mid[tid] = __dmul_rn(__dadd_rn(hi, lo), 0.5);
      s.u.ex.ch_half[tid] = __dmul_rn(__dsub_rn(hi, lo), 0.5);
    }
    __syncthreads();
    for (int t = warp; t < P; t += kWarps) {
      double acc = 0.0;
      for (int d = lane; d < D; d += 32) {
        const double half = s.u.ex.ch_half[d];
        double z = 0.0;
        if (half > 0.0) z = __ddiv_rn(__dsub_rn((double)to_f32(tile[t * D + d]), s.u.ex.ch_mid[d]), half);
        acc = __dadd_rn(acc, __dmul_rn(z, z));
      }
      for (int o = 16; o; o >>= 1) acc = __dadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, o));
      if (lane == 0) s.u.ex.score[t] = t < fill ? acc : -inf_d();
    }
    __syncthreads();
  }
  if (warp == 0) {
    double best = -inf_d();
    int idx = 0;
    if (!sink) {
      idx = P;
      for (int t = lane; t < P; t += 32) {  // ascending: the lane keeps its first maximum
        const double v = s.u.ex.score[t];
        if (idx == P || v > best) { best = v; idx = t; }
      }
    }
    // (score, index) max with the smaller index on ties: deterministic, first argmax like torch.
    for (int o = 16; o; o >>= 1) {
      const double ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
      if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
    }
    if (lane == 0) s.exact_idx = sink ? 0 : (idx >= P ? 0 : idx);
  }
  __syncthreads();
  return s.exact_idx;
}

__device__ __forceinline__ bool token_kept(int t, int fill, int exact) { return t < fill && (!EXACT || t != exact); }

// reference._choose_k_outliers: per channel, among the kept elements, drop whichever extreme
// shrinks the range more (ties drop the max); with fewer than 3 kept nothing is dropped and the
// minimum is stored; with none kept, token 0.
__device__ void choose_k_outlier(const T* tile, Smem& s, int fill, int exact) {
  const int d = threadIdx.x;
  if (d >= D) return;
  float max1 = -inf_f(), max2 = -inf_f(), min1 = inf_f(), min2 = inf_f();
  int imax = 0, imin = 0, count = 0;
  for (int t = 0; t < P; ++t) {
    if (!token_kept(t, fill, exact)) continue;
    const float x = to_f32(tile[t * D + d]);
    ++count;
    if (x > max1) { max2 = max1; max1 = x; imax = t; } else if (x > max2) { max2 = x; }
    if (x < min1) { min2 = min1; min1 = x; imin = t; } else if (x < min2) { min2 = x; }
  }
  const bool drop_hi = __fsub_rn(max1, max2) >= __fsub_rn(min2, min1);
  const bool drop = count >= 3;
  int idx = (drop && drop_hi) ? imax : imin;
  if (count == 0) idx = 0;
  s.kout_idx[d] = idx;
  s.kout_drop[d] = drop ? 1 : 0;
}

// reference._range_params: fp16 lo = fp16(min); fp16 scale = fp16(max - lo16) clamped at 0; both 0
// when nothing is kept.
__device__ __forceinline__ void range_params(bool any, float hi, float lo, float& lo16, float& scale16) {
  lo16 = fp16_round(any ? lo : 0.0f);
  float sc = fp16_round(any ? __fsub_rn(hi, lo16) : 0.0f);
  scale16 = sc < 0.0f ? 0.0f : sc;
}

__device__ void k_ranges(const T* tile, Smem& s, int fill, int exact) {
  const int d = threadIdx.x;
  if (d >= D) return;
  const int drop_t = (OUTLIERS && s.kout_drop[d]) ? s.kout_idx[d] : -1;
  float hi = -inf_f(), lo = inf_f();
  bool any = false;
  for (int t = 0; t < P; ++t) {
    if (!token_kept(t, fill, exact) || t == drop_t) continue;
    const float x = to_f32(tile[t * D + d]);
    hi = nan_max(hi, x);
    lo = nan_min(lo, x);
    any = true;
  }
  range_params(any, hi, lo, s.ch_lo[d], s.ch_scale[d]);
}

// v_at(t, d): what the V codes describe (the value, or the rotated value).
template <typename VAt>
__device__ void v_ranges(VAt v_at, Smem& s, int fill) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int t = warp; t < P; t += kWarps) {
    float hi = -inf_f(), lo = inf_f();
    for (int d = lane; d < D; d += 32) {
      const float x = v_at(t, d);
      hi = nan_max(hi, x);
      lo = nan_min(lo, x);
    }
    hi = warp_max(hi);
    lo = warp_min(lo);
    if (lane == 0) range_params(t < fill, hi, lo, s.tk_lo[t], s.tk_scale[t]);
  }
}

// page.pick_wide_channels + codebook.scale_weights, from the fp16 scales in s.ch_scale:
//   rank[d] = #{e : s[e] > s[d] or (s[e] == s[d] and e < d)} (a stable descending sort), wide iff
//   rank[d] < HI; wide_idx lists the wide channels ascending (hi_pos[d] = #{wide e < d});
//   w[d] = rint(double(s[d])^2 / max_e double(s[e])^2 * 4096) (0 for all when the max is 0):
//   exact fp64 squares of fp16 values, one IEEE division, an exact power-of-two product, round
//   half to even — what torch computes in fp64.
__device__ void wide_and_weights(Smem& s) {
  const int d = threadIdx.x;
  if (d < D) {
    const float sd = s.ch_scale[d];
    const double s2 = __dmul_rn((double)sd, (double)sd);
    double top = 0.0;  // squares are >= 0, so 0 is a neutral start for the max
    int rank = 0;
    for (int e = 0; e < D; ++e) {
      const float se = s.ch_scale[e];
      const double e2 = __dmul_rn((double)se, (double)se);
      top = e2 > top ? e2 : top;
      rank += (se > sd || (se == sd && e < d)) ? 1 : 0;
    }
    s.u.w.k_weight[d] = top > 0.0 ? (u32)rint(__dmul_rn(__ddiv_rn(s2, top), (double)kWeightOne)) : 0u;
    s.u.w.hi_rank[d] = rank;
  }
  __syncthreads();
  if (d < D) {
    int pos = -1;
    if (HI > 0 && s.u.w.hi_rank[d] < HI) {
      pos = 0;
      for (int e = 0; e < d; ++e) pos += s.u.w.hi_rank[e] < HI ? 1 : 0;
      s.hi_list[pos] = d;
    }
    s.hi_pos[d] = pos;
  }
  __syncthreads();
}

// reference._normalise: (x - lo) / scale clamped to [0, 1]; 0 where scale is not > 0.
__device__ __forceinline__ float normalise(float x, float lo, float scale) {
  if (!(scale > 0.0f)) return 0.0f;
  return clamp01(__fdiv_rn(__fsub_rn(x, lo), scale));
}

// codebook.assign: code = number of fp32 midpoints strictly below u (NaN -> 0).
template <int L>
__device__ __forceinline__ int assign(float u, const float (&th)[L - 1]) {
  int c = 0;
#pragma unroll
  for (int i = 0; i < L - 1; ++i) c += u > th[i] ? 1 : 0;
  return c;
}
template <int L>
__device__ __forceinline__ void thresholds(const float (&lv)[L], float (&th)[L - 1]) {
#pragma unroll
  for (int i = 0; i < L - 1; ++i) th[i] = __fmul_rn(__fadd_rn(lv[i + 1], lv[i]), 0.5f);
}
template <int L>
__device__ __forceinline__ void uniform_levels(float (&lv)[L]) {
#pragma unroll
  for (int i = 0; i < L; ++i) lv[i] = __half2float(__float2half_rn((float)((double)i / (double)(L - 1))));
}

// Which elements a codebook fit sees, and with which weight (codebook.fit_codebooks `mask`,
// `weight`), besides the kept-element mask already folded into uq (kMasked):
//   kFitV     every kept element, weight 1                       (V)
//   kFitK     kept elements of the non-wide channels, weight w[d] (K, 2^KB levels)
//   kFitKWide kept elements of the wide channels, weight w[d]     (K, 2^(KB+1) levels)
enum FitSel { kFitV = 0, kFitK = 1, kFitKWide = 2 };
constexpr u32 kNotInFit = 0xFFFFFFFFu;  // (weights are <= kWeightOne)
template <int SEL>
__device__ __forceinline__ u32 fit_weight(const Smem& s, int e) {
  if (SEL == kFitV) return 1u;
  const int d = e % D;
  const bool wide = s.hi_pos[d] >= 0;
  if (wide != (SEL == kFitKWide)) return kNotInFit;
  return s.u.w.k_weight[d];
}

// Fixed-point values of the page's elements (tile order t * D + d): uq = rint(u * 4096) for the
// elements in the fit mask, kMasked for the others.
constexpr u16 kMasked = 0xFFFFu;

// codebook.fit_codebooks ("fitted"): kLloydSteps Lloyd-Max steps from the uniform levels with both
// ends pinned; exact integer cell sums (u64 shared atomics: the result is order independent);
// level = float(double(sum_wu) / (double(sum_w) * 4096)); then fp16 rounding, cummax, and the
// uniform codebook wherever the fit's fixed-point distortion is larger. Leaves the final levels
// (fp16 values) in out[0, L) (shared memory). Elements of weight 0 take part with no effect, as
// in the reference (a cell whose weights sum to 0 keeps its level).
// fixed(e): element e's fixed-point value or kMasked. PIN: the end levels stay at 0 and 1 (codebook
// pin_ends; False: every level moves, same fp16 rounding, cummax and fallback).
template <int L, int SEL, bool PIN = true, typename Fixed>
__device__ void fit_codebook(Fixed fixed, Smem& s, bool uniform_mode, float* out_levels) {
  const int tid = threadIdx.x, lane = tid & 31;
  float uni[L], lv[L], th[L - 1];
  uniform_levels<L>(uni);
#pragma unroll
  for (int i = 0; i < L; ++i) lv[i] = uni[i];
  if (uniform_mode) {
    if (tid < L) out_levels[tid] = uni[tid];
    __syncthreads();
    return;
  }
  for (int step = 0; step < kLloydSteps; ++step) {
    thresholds<L>(lv, th);
    u64 sw[L], swu[L];
#pragma unroll
    for (int i = 0; i < L; ++i) sw[i] = swu[i] = 0;
    for (int e = tid; e < P * D; e += kThreads) {
      const u32 q = fixed(e);
      if (q == kMasked) continue;
      const u32 w = fit_weight<SEL>(s, e);
      if (w == kNotInFit) continue;
      const int c = assign<L>((float)q / (float)kFixedPoint, th);
#pragma unroll
      for (int i = 0; i < L; ++i) {
        if (c == i) { sw[i] += w; swu[i] += (u64)w * q; }
      }
    }
    if (tid < L) s.sum_w[tid] = s.sum_wu[tid] = 0;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < L; ++i) {
      const u64 a = warp_sum_u64(sw[i]), b = warp_sum_u64(swu[i]);
      if (lane == 0 && a) { atomicAdd(&s.sum_w[i], a); atomicAdd(&s.sum_wu[i], b); }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < L; ++i) {
      const u64 a = s.sum_w[i];
      if (a > 0) lv[i] = __double2float_rn(__ddiv_rn((double)s.sum_wu[i], __dmul_rn((double)a, (double)kFixedPoint)));
    }
    if (PIN) {
      lv[0] = 0.0f;
      lv[L - 1] = 1.0f;
    }
    __syncthreads();  // everyone has read the sums before they are cleared again
  }
  // fp16 rounding, then keep the levels non-decreasing.
  float fit[L];
#pragma unroll
  for (int i = 0; i < L; ++i) fit[i] = __half2float(__float2half_rn(lv[i]));
#pragma unroll
  for (int i = 1; i < L; ++i) fit[i] = fmaxf(fit[i], fit[i - 1]);
  // Fixed-point distortion of both codebooks (exact integers).
  float thf[L - 1], thu[L - 1];
  thresholds<L>(fit, thf);
  thresholds<L>(uni, thu);
  i64 lqf[L], lqu[L];
#pragma unroll
  for (int i = 0; i < L; ++i) {
    lqf[i] = (i64)rint(__dmul_rn((double)fit[i], (double)kFixedPoint));
    lqu[i] = (i64)rint(__dmul_rn((double)uni[i], (double)kFixedPoint));
  }
  u64 df = 0, du = 0;
  for (int e = tid; e < P * D; e += kThreads) {
    const u32 q = fixed(e);
    if (q == kMasked) continue;
    const u32 w32 = fit_weight<SEL>(s, e);
    if (w32 == kNotInFit) continue;
    const u64 w = w32;
    const float uf = (float)q / (float)kFixedPoint;
    const int cf = assign<L>(uf, thf), cu = assign<L>(uf, thu);
    i64 ef = 0, eu = 0;
#pragma unroll
    for (int i = 0; i < L; ++i) {
      if (cf == i) ef = (i64)q - lqf[i];
      if (cu == i) eu = (i64)q - lqu[i];
    }
    df += w * (u64)(ef * ef);
    du += w * (u64)(eu * eu);
  }
  if (tid < 2) s.dist[tid] = 0;
  __syncthreads();
  df = warp_sum_u64(df);
  du = warp_sum_u64(du);
  if (lane == 0) { atomicAdd(&s.dist[0], df); atomicAdd(&s.dist[1], du); }
  __syncthreads();
  const bool worse = s.dist[0] > s.dist[1];
  if (tid < L) {
    float out = uni[0];
#pragma unroll
    for (int i = 0; i < L; ++i) if (tid == i) out = worse ? uni[i] : fit[i];
    out_levels[tid] = out;
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------ page reader
// hi_pos[d] = row of channel d in the page's wide_idx, -1 if d is not wide (D entries, shared
// memory; every thread of the block calls this). A corrupt wide_idx entry >= D is ignored.
__device__ void build_hi_pos(const u8* page, int* hi_pos) {
  if constexpr (HI > 0) {
    for (int d = threadIdx.x; d < D; d += blockDim.x) hi_pos[d] = -1;
    __syncthreads();
    for (int i = threadIdx.x; i < HI; i += blockDim.x) {
      const int d = page[Layout::kWideIdx + i];
      if (d < D) hi_pos[d] = i;
    }
    __syncthreads();
  }
}

// The BITS-bit code at (row, col) of packed planes (plane0: low 2 bits; plane1: the rest) whose
// rows hold `cols` codes (layout.py: {2}, {2, 1}, {2, 2}).
template <int BITS>
__device__ __forceinline__ int plane_code(const u8* plane0, const u8* plane1, int cols, int row, int col) {
  int w, p;
  packed_pos(cols, col, w, p);
  const int i = row * (cols / 16) + w;
  int c = (reinterpret_cast<const u32*>(plane0)[i] >> (2 * p)) & 3;
  if (BITS == 3) c |= ((reinterpret_cast<const u16*>(plane1)[i] >> p) & 1) << 2;
  if (BITS == 4) c |= ((reinterpret_cast<const u32*>(plane1)[i] >> (2 * p)) & 3) << 2;
  return c;
}

// reference.dequantize_pages for one element: lo + scale * cb[code] in fp32 (product and sum
// rounded separately; a wide channel reads wide_cb with its full code: the K planes' low bits and
// wide_plane's top bit), then the K outlier, then the exact token. `page` may be global or shared;
// `hi_pos` is the page's build_hi_pos table (unused when HI == 0).
__device__ __forceinline__ float dequant_k(const u8* page, int t, int d, const int* hi_pos) {
  const int c = plane_code<KB>(page + Layout::kKPlane0, page + Layout::kKPlane1, D, t, d);
  const __half* h = reinterpret_cast<const __half*>(page);
  int cb_index = Layout::kKCb / 2 + c;
  if (HI > 0) {
    const int row = hi_pos[d];
    if (row >= 0) {
      const u32 top = (reinterpret_cast<const u32*>(page + Layout::kWidePlane)[row * (P / 32) + t / 32] >> (t % 32)) & 1u;
      cb_index = Layout::kWideCb / 2 + (c | (int)(top << KB));
    }
  }
  float k = __fadd_rn(__half2float(h[Layout::kKLo / 2 + d]),
                      __fmul_rn(__half2float(h[Layout::kKScale / 2 + d]), __half2float(h[cb_index])));
  if (OUTLIERS && page[Layout::kKoutIdx + d] == t) k = __half2float(h[Layout::kKoutVal / 2 + d]);
  if (EXACT && t == *reinterpret_cast<const short*>(page + Layout::kExactIdx)) k = __half2float(h[Layout::kExactK / 2 + d]);
  return k;
}
constexpr int kRowE = D / 32;
using kivi::ptx::hadamard_row;

// reference.dequantize_pages for token t's value row, by one warp (x[c]: channel lane * E + c):
// lo + scale * cb[code] in fp32, rotated back with KIVI_V_ROTATE (hadamard(v) * c * s), then the
// exact token (index `exact`: the page's, or its old one while the page is being rewritten).
__device__ __forceinline__ void dequant_v_row(const u8* page, int t, int lane, int exact, float (&x)[kRowE]) {
  const __half* h = reinterpret_cast<const __half*>(page);
  const float lo = __half2float(h[Layout::kVLo / 2 + t]), sc = __half2float(h[Layout::kVScale / 2 + t]);
#pragma unroll
  for (int c = 0; c < kRowE; ++c) {
    const int code = plane_code<VB>(page + Layout::kVPlane0, page + Layout::kVPlane1, P, lane * kRowE + c, t);
    x[c] = __fadd_rn(lo, __fmul_rn(sc, __half2float(h[Layout::kVCb / 2 + code])));
  }
  if constexpr (V_ROTATE) {
    hadamard_row(x, lane);
#pragma unroll
    for (int c = 0; c < kRowE; ++c)
      x[c] = __fmul_rn(__fmul_rn(x[c], kivi::rotation_scale(D)), kivi::value_sign(lane * kRowE + c));
  }
  if (EXACT && t == exact) {
#pragma unroll
    for (int c = 0; c < kRowE; ++c) x[c] = __half2float(h[Layout::kExactV / 2 + lane * kRowE + c]);
  }
}
__device__ __forceinline__ int page_exact(const u8* page) {
  return EXACT ? *reinterpret_cast<const short*>(page + Layout::kExactIdx) : -1;
}

// ------------------------------------------------------------------------------ page writer
// Zero every byte of the page that no section covers (alignment gaps and the slot padding): the
// reference writes whole pages, zeros included.
__device__ void zero_gaps(u8* page) {
  constexpr int E = P * D;
  constexpr int kN = 18;
  const int starts[kN] = {
      Layout::kKPlane0,  KB > 2 ? Layout::kKPlane1 : Layout::kVPlane0, Layout::kVPlane0,
      VB > 2 ? Layout::kVPlane1 : Layout::kKLo, Layout::kKLo, Layout::kKScale, Layout::kVLo, Layout::kVScale,
      Layout::kKCb, Layout::kVCb, EXACT ? Layout::kExactK : Layout::kMetaEnd, EXACT ? Layout::kExactV : Layout::kMetaEnd,
      EXACT ? Layout::kExactIdx : Layout::kMetaEnd, OUTLIERS ? Layout::kKoutVal : Layout::kExactEnd,
      OUTLIERS ? Layout::kKoutIdx : Layout::kExactEnd, HI ? Layout::kWidePlane : Layout::kKoutEnd,
      HI ? Layout::kWideCb : Layout::kKoutEnd, HI ? Layout::kWideIdx : Layout::kKoutEnd};
  const int sizes[kN] = {
      kivi::plane_bytes(2, E), KB > 2 ? kivi::plane_bytes(kivi::plane_width(KB, 1), E) : 0, kivi::plane_bytes(2, E),
      VB > 2 ? kivi::plane_bytes(kivi::plane_width(VB, 1), E) : 0, D * 2, D * 2, P * 2, P * 2,
      (1 << KB) * 2, (1 << VB) * 2, EXACT ? D * 2 : 0, EXACT ? D * 2 : 0, EXACT ? 2 : 0,
      OUTLIERS ? D * 2 : 0, OUTLIERS ? D : 0, HI * P / 8, HI ? LH * 2 : 0, HI};
  int prev = 0;
  for (int i = 0; i <= kN; ++i) {
    const int start = i < kN ? starts[i] : Layout::kPageBytes;
    for (int b = prev + (int)threadIdx.x; b < start; b += kThreads) page[b] = 0;
    if (i < kN && starts[i] + sizes[i] > prev) prev = starts[i] + sizes[i];
  }
}

// Codes of one matrix (rows x cols, cols = the MMA reduction dimension) packed into its planes.
// `code_of(row, col)` returns the element's code.
template <int BITS, int ROWS, int COLS, typename CodeOf>
__device__ void pack_planes(u8* page, int off0, int off1, CodeOf code_of) {
  constexpr int kWordsPerRow = COLS / 16;
  constexpr int kWords = ROWS * kWordsPerRow;
  for (int wi = threadIdx.x; wi < kWords; wi += kThreads) {
    const int row = wi / kWordsPerRow, w = wi % kWordsPerRow;
    u32 lo = 0, hi = 0;
#pragma unroll
    for (int p = 0; p < 16; ++p) {
      const u32 c = (u32)code_of(row, packed_col(COLS, w, p));
      lo |= (c & 3u) << (2 * p);
      if (BITS == 3) hi |= ((c >> 2) & 1u) << p;
      if (BITS == 4) hi |= ((c >> 2) & 3u) << (2 * p);
    }
    reinterpret_cast<u32*>(page + off0)[wi] = lo;
    if (BITS == 3) reinterpret_cast<u16*>(page + off1)[wi] = (u16)hi;
    if (BITS == 4) reinterpret_cast<u32*>(page + off1)[wi] = hi;
  }
}

// Where token t of the page being quantized comes from (see kivi_append).
struct Source {
  const u8* slot;   // K rows of the staging slot (V rows v_offset bytes later), or null
  const T* input;   // key row of token `prefix` (value rows at the same offset from `value`)
  const u8* old;    // the page itself (its old bytes) when slot is null and prefix > 0, else null
  const int* old_hi_pos;  // build_hi_pos of `old` (shared memory)
  int old_exact;    // the old page's exact-token index (the K pass overwrites it before V is read)
  size_t v_offset;  // bytes from the slot's K rows to its V rows
  size_t in_stride; // elements between consecutive input tokens
  int prefix;
};

// page.rotate_values of the V tile: row t of `vt` (model dtype) becomes row t of `out` (fp32),
// hadamard(v * s) * c, a warp per row. vt is the upper half of `out`'s bytes (quantize_page): a batch
// of kWarps rows is read, then written after a barrier; a batch's rows overwrite only rows already read.
__device__ void rotate_tile(const T* vt, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  static_assert(P % kWarps == 0, "whole batches of rows");
  for (int t0 = 0; t0 < P; t0 += kWarps) {
    const int t = t0 + warp;
    float x[kRowE];
#pragma unroll
    for (int c = 0; c < kRowE; ++c) x[c] = __fmul_rn(to_f32(vt[t * D + lane * kRowE + c]), kivi::value_sign(lane * kRowE + c));
    hadamard_row(x, lane);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kRowE; ++c) out[t * D + lane * kRowE + c] = __fmul_rn(x[c], kivi::rotation_scale(D));
  }
  __syncthreads();
}

// Copy one page's K (IS_V false) or V rows into the tile, 16 bytes per thread per step.
template <bool IS_V>
__device__ void load_tile(T* tile, const Source& src, const T* value_input) {
  constexpr int kChunksPerRow = D * (int)sizeof(T) / 16;
  constexpr int kPerChunk = 16 / (int)sizeof(T);
  for (int i = threadIdx.x; i < P * kChunksPerRow; i += kThreads) {
    const int t = i / kChunksPerRow, c = i % kChunksPerRow;
    uint4* dst = reinterpret_cast<uint4*>(tile + t * D) + c;
    if (t >= src.prefix) {
      const T* row = (IS_V ? value_input : src.input) + (size_t)(t - src.prefix) * src.in_stride;
      *dst = reinterpret_cast<const uint4*>(row)[c];
    } else if (src.slot) {
      const u8* row = src.slot + (IS_V ? src.v_offset : 0) + (size_t)t * kRowBytes;
      if (KIVI_STAGING) {
#pragma unroll
        for (int e = 0; e < kPerChunk; ++e) tile[t * D + c * kPerChunk + e] = staged_value(row, c * kPerChunk + e);
      } else {
        *dst = reinterpret_cast<const uint4*>(row)[c];
      }
    } else if (!IS_V) {
#pragma unroll
      for (int e = 0; e < kPerChunk; ++e) {
        const int d = c * kPerChunk + e;
        tile[t * D + d] = from_f32(dequant_k(src.old, t, d, src.old_hi_pos));
      }
    }
  }
  if (IS_V && !src.slot && src.old) {  // V rows from the old page: a warp per row (rotated back whole)
    const int lane = threadIdx.x & 31;
    for (int t = threadIdx.x >> 5; t < src.prefix; t += kWarps) {
      float x[kRowE];
      dequant_v_row(src.old, t, lane, src.old_exact, x);
#pragma unroll
      for (int c = 0; c < kRowE; ++c) tile[t * D + lane * kRowE + c] = from_f32(x[c]);
    }
  }
  __syncthreads();
}

// Quantize one page (one KV head): the whole of reference.quantize_pages for n = 1.
// `src`: where each token's key/value row comes from; `value_input`: value row of token `prefix`.
__device__ void quantize_page(u8* smem, u8* page, int fill, bool sink, bool uniform_mode, const Source& src,
                              const T* value_input) {
  T* tile = reinterpret_cast<T*>(smem);
  Smem& s = smem_state(smem);
  const int tid = threadIdx.x;
  if (src.old) build_hi_pos(src.old, s.u.old_hi_pos);  // the page's prefix is in the page itself
  zero_gaps(page);  // (gaps only: the old sections stay readable)

  // ---- K
  load_tile<false>(tile, src, value_input);
  const int exact = EXACT ? exact_token(tile, s, fill, sink) : -1;
  if (OUTLIERS) {
    choose_k_outlier(tile, s, fill, exact);
  } else if (tid < D) {
    s.kout_drop[tid] = 0;
    s.kout_idx[tid] = -1;
  }
  __syncthreads();
  k_ranges(tile, s, fill, exact);
  __syncthreads();
  wide_and_weights(s);
  u16* uq = smem_fixed(smem);
  auto k_fixed = [&](int e) -> u32 {
    const int t = e / D, d = e % D;
    const bool kept = token_kept(t, fill, exact) && !(OUTLIERS && s.kout_drop[d] && s.kout_idx[d] == t);
    return kept ? (u32)(u16)rintf(normalise(to_f32(tile[e]), s.ch_lo[d], s.ch_scale[d]) * (float)kFixedPoint) : kMasked;
  };
  auto k_stored = [&](int e) -> u32 { return uq[e]; };
  if constexpr (kStoreFixed) {
    for (int e = tid; e < P * D; e += kThreads) uq[e] = (u16)k_fixed(e);
    __syncthreads();
  }
  // reference: k_cb on (k_kept & ~wide), wide_cb on (k_kept & wide), both weighted by w[d].
  if constexpr (kStoreFixed) {
    fit_codebook<LK, kFitK>(k_stored, s, uniform_mode, s.levels);
    if constexpr (HI > 0) fit_codebook<LH, kFitKWide>(k_stored, s, uniform_mode, s.hlevels);
  } else {
    fit_codebook<LK, kFitK>(k_fixed, s, uniform_mode, s.levels);
    if constexpr (HI > 0) fit_codebook<LH, kFitKWide>(k_fixed, s, uniform_mode, s.hlevels);
  }
  {
    float cb[LK], th[LK - 1];
#pragma unroll
    for (int i = 0; i < LK; ++i) cb[i] = s.levels[i];
    thresholds<LK>(cb, th);
    float hcb[LH], hth[LH - 1];
    if constexpr (HI > 0) {
#pragma unroll
      for (int i = 0; i < LH; ++i) hcb[i] = s.hlevels[i];
      thresholds<LH>(hcb, hth);
    }
    // rows past the fill normalise to 0 (reference: torch.where(valid, normalise(...), 0))
    auto u_of = [&](int t, int d) {
      return t < fill ? normalise(to_f32(tile[t * D + d]), s.ch_lo[d], s.ch_scale[d]) : 0.0f;
    };
    pack_planes<KB, P, D>(page, Layout::kKPlane0, Layout::kKPlane1, [&](int t, int d) -> int {
      if constexpr (HI > 0) {
        if (s.hi_pos[d] >= 0) return assign<LH>(u_of(t, d), hth) & (int)kLowMask;  // top bit: wide_plane
      }
      return assign<LK>(u_of(t, d), th);
    });
    if constexpr (HI > 0) {
      // wide_plane: row i = channel wide_idx[i], bit t % 32 of word t / 32 = bit KB of token t's code.
      constexpr int kWordsPerRow = P / 32;
      for (int wi = tid; wi < HI * kWordsPerRow; wi += kThreads) {
        const int i = wi / kWordsPerRow, t0 = (wi % kWordsPerRow) * 32, d = s.hi_list[i];
        u32 word = 0;
#pragma unroll 4
        for (int b = 0; b < 32; ++b) word |= (u32)((assign<LH>(u_of(t0 + b, d), hth) >> KB) & 1) << b;
        reinterpret_cast<u32*>(page + Layout::kWidePlane)[wi] = word;
      }
      if (tid < HI) page[Layout::kWideIdx + tid] = (u8)s.hi_list[tid];
      if (tid < LH) store_half(page, Layout::kWideCb, tid, __float2half_rn(hcb[tid]));
    }
    if (tid < D) {
      store_half(page, Layout::kKLo, tid, __float2half_rn(s.ch_lo[tid]));
      store_half(page, Layout::kKScale, tid, __float2half_rn(s.ch_scale[tid]));
      if (EXACT) store_half(page, Layout::kExactK, tid, fp16_sat(to_f32(tile[exact * D + tid])));
      if (OUTLIERS) {
        const int t = s.kout_idx[tid];
        store_half(page, Layout::kKoutVal, tid, fp16_sat(to_f32(tile[t * D + tid])));
        page[Layout::kKoutIdx + tid] = (u8)t;
      }
    }
    if (tid < LK) store_half(page, Layout::kKCb, tid, __float2half_rn(cb[tid]));
    if (EXACT && tid == 0) *reinterpret_cast<short*>(page + Layout::kExactIdx) = (short)exact;
  }
  __syncthreads();  // the tile is reused for V

  // ---- V (KIVI_V_ROTATE: loaded into the tile's upper half, exact_v stored, then rotated into fp32 rows)
  T* vt = V_ROTATE ? reinterpret_cast<T*>(smem + P * D * 2) : tile;
  load_tile<true>(vt, src, value_input);
  if (EXACT && tid < D) store_half(page, Layout::kExactV, tid, fp16_sat(to_f32(vt[exact * D + tid])));
  if constexpr (V_ROTATE) rotate_tile(vt, reinterpret_cast<float*>(smem));
  // what the V codes describe: the value, or the rotated value (fp32)
  auto v_at = [&](int t, int d) -> float {
    if constexpr (V_ROTATE) return reinterpret_cast<const float*>(smem)[t * D + d];
    return to_f32(tile[t * D + d]);
  };
  v_ranges(v_at, s, fill);
  __syncthreads();
  auto v_fixed = [&](int e) -> u32 {
    const int t = e / D;
    return token_kept(t, fill, exact) ? (u32)(u16)rintf(normalise(v_at(t, e % D), s.tk_lo[t], s.tk_scale[t]) * (float)kFixedPoint)
                                      : kMasked;
  };
  if constexpr (kStoreFixed) {
    for (int e = tid; e < P * D; e += kThreads) uq[e] = (u16)v_fixed(e);
    __syncthreads();
    fit_codebook<(1 << VB), kFitV, V_PIN>(k_stored, s, uniform_mode, s.levels);
  } else {
    fit_codebook<(1 << VB), kFitV, V_PIN>(v_fixed, s, uniform_mode, s.levels);
  }
  {
    float cb[1 << VB], th[(1 << VB) - 1];
#pragma unroll
    for (int i = 0; i < (1 << VB); ++i) cb[i] = s.levels[i];
    thresholds<(1 << VB)>(cb, th);
    // V codes are stored channel-major: rows = channels, cols = tokens.
    pack_planes<VB, D, P>(page, Layout::kVPlane0, Layout::kVPlane1, [&](int d, int t) {
      return assign<(1 << VB)>(normalise(v_at(t, d), s.tk_lo[t], s.tk_scale[t]), th);
    });
    if (tid < P) {
      store_half(page, Layout::kVLo, tid, __float2half_rn(s.tk_lo[tid]));
      store_half(page, Layout::kVScale, tid, __float2half_rn(s.tk_scale[tid]));
    }
    if (tid < (1 << VB)) store_half(page, Layout::kVCb, tid, __float2half_rn(cb[tid]));
  }
  __syncthreads();
}

}  // namespace

// ================================================================================== kernels
// Grid: (write_ctas + n_a + n_b, num_kv_heads); block: 256 threads; dynamic smem: what
// kivi_append_smem_bytes reports when n_a + n_b > 0 (checked: less traps), 0 for writes only.
//   key, value   [T, Hkv, D]            staging  [S, 2, Hkv, P, kRowBytes] bytes   pages [NB, Hkv, page_bytes]
//   token_slots, token_offsets [T]       (slot -1: token not staged)
//   two op lists (a_*: evict, b_*: finalize), each: blocks, slots, fills, sinks, starts, prefix; null
//   starts/prefix mean prefix = P (the whole page from its slot). A block < 0 skips the op (lets a
//   caller pad the lists to a fixed size).
struct Ops {
  const int *blocks, *slots, *fills;
  const u8* sinks;
  const int *starts, *prefix;
};

extern "C" __global__ void __launch_bounds__(kThreads) kivi_append(
    const T* __restrict__ key, const T* __restrict__ value, u8* __restrict__ staging, u8* __restrict__ pages,
    const int* __restrict__ token_slots, const int* __restrict__ token_offsets, int n_tokens, int write_ctas,
    const int* a_blocks, const int* a_slots, const int* a_fills, const u8* a_sinks, const int* a_starts,
    const int* a_prefix, int n_a, const int* b_blocks, const int* b_slots, const int* b_fills, const u8* b_sinks,
    const int* b_starts, const int* b_prefix, int n_b, int num_kv_heads, int uniform_mode) {
  extern __shared__ __align__(16) u8 smem[];
  const int h = blockIdx.y, tid = threadIdx.x;
  const size_t head_bytes = (size_t)P * kRowBytes;                    // one head's rows of a slot
  const size_t slot_stride = 2 * (size_t)num_kv_heads * head_bytes;  // one staging slot, bytes

  if ((int)blockIdx.x < write_ctas) {  // ---- this step's tokens → staging (kStagingTokensPerCta each)
    const size_t kv_offset = (size_t)num_kv_heads * head_bytes;
    if (KIVI_STAGING) {  // one warp per token: K row, then V row
      constexpr int E = D / 32;
      const int i = blockIdx.x * kWarps + tid / 32, lane = tid % 32;
      if (i >= n_tokens) return;
      const int slot = token_slots[i];
      if (slot < 0) return;
      const size_t src = ((size_t)i * num_kv_heads + h) * D;
      u8* dst = staging + slot * slot_stride + (size_t)h * head_bytes + (size_t)token_offsets[i] * kRowBytes;
      float x[E];
#pragma unroll
      for (int c = 0; c < E; ++c) x[c] = to_f32(key[src + lane * E + c]);
      store_row_warp(x, lane, dst);
#pragma unroll
      for (int c = 0; c < E; ++c) x[c] = to_f32(value[src + lane * E + c]);
      store_row_warp(x, lane, dst + kv_offset);
      return;
    }
    constexpr int kChunksPerRow = D * (int)sizeof(T) / 16;
    constexpr int kTokensPerCta = kThreads / kChunksPerRow;
    const int i = blockIdx.x * kTokensPerCta + tid / kChunksPerRow, c = tid % kChunksPerRow;
    if (i >= n_tokens) return;
    const int slot = token_slots[i];
    if (slot < 0) return;
    const size_t src = ((size_t)i * num_kv_heads + h) * D;
    u8* dst = staging + slot * slot_stride + (size_t)h * head_bytes + (size_t)token_offsets[i] * kRowBytes;
    reinterpret_cast<uint4*>(dst)[c] = reinterpret_cast<const uint4*>(key + src)[c];
    reinterpret_cast<uint4*>(dst + kv_offset)[c] = reinterpret_cast<const uint4*>(value + src)[c];
    return;
  }
  if (dynamic_smem_size() < (u32)kSmemBytes) __trap();
  const Ops a = {a_blocks, a_slots, a_fills, a_sinks, a_starts, a_prefix};
  const Ops b = {b_blocks, b_slots, b_fills, b_sinks, b_starts, b_prefix};
  int op = blockIdx.x - write_ctas;
  const Ops* ops = &a;
  if (op >= n_a) {
    op -= n_a;
    ops = &b;
    if (op >= n_b) return;
  }
  const int block = ops->blocks[op];
  if (block < 0) return;
  const int slot = ops->slots[op];
  Source src;
  src.prefix = ops->prefix ? ops->prefix[op] : P;
  src.slot = slot >= 0 ? staging + slot * slot_stride + (size_t)h * head_bytes : nullptr;
  src.v_offset = (size_t)num_kv_heads * head_bytes;
  src.in_stride = (size_t)num_kv_heads * D;
  const size_t in_offset = ((size_t)(ops->starts ? ops->starts[op] : 0) * num_kv_heads + h) * D;
  src.input = key + in_offset;
  u8* page = pages + ((size_t)block * num_kv_heads + h) * Layout::kPageBytes;
  src.old = (slot < 0 && src.prefix > 0) ? page : nullptr;
  src.old_hi_pos = smem_state(smem).u.old_hi_pos;
  src.old_exact = src.old ? page_exact(page) : -1;  // read before any thread writes the page
  quantize_page(smem, page, ops->fills[op], ops->sinks[op] != 0, uniform_mode != 0, src, value + in_offset);
}

// Pages → K and V in the model dtype: reference.dequantize_pages (lo + scale * cb[code] in fp32,
// product and sum rounded separately, wide K channels through wide_cb; then the K outliers; then
// the exact token), rounded to T.
// Grid: (n_ops, num_kv_heads); block 256. Op i reads block `blocks[i]` (or i when blocks is null)
// and writes K to out + out_index[i] * op_stride + h * P * D (out_index null: i), V kv_stride
// elements after K. For reopen: out = staging, out_index = slots, op_stride = 2 * Hkv * P * D,
// kv_stride = Hkv * P * D. Ops whose block is < 0 are skipped.
constexpr int kDequantThreads = 256;
extern "C" __global__ void __launch_bounds__(kDequantThreads) kivi_dequantize(
    const u8* __restrict__ pages, const int* __restrict__ blocks, int num_kv_heads, T* __restrict__ out,
    const int* __restrict__ out_index, long long op_stride, long long kv_stride) {
  const int i = blockIdx.x, h = blockIdx.y;
  const int block = blocks ? blocks[i] : i;
  if (block < 0) return;
  const u8* page = pages + ((size_t)block * num_kv_heads + h) * Layout::kPageBytes;
  __shared__ int hi_pos[D];
  build_hi_pos(page, hi_pos);
  T* kout = out + (out_index ? (long long)out_index[i] : (long long)i) * op_stride + (long long)h * P * D;
  T* vout = kout + kv_stride;
  for (int e = threadIdx.x; e < P * D; e += kDequantThreads) kout[e] = from_f32(dequant_k(page, e / D, e % D, hi_pos));
  const int lane = threadIdx.x % 32, exact = page_exact(page);
  for (int t = threadIdx.x / 32; t < P; t += kDequantThreads / 32) {  // a warp per value row (rotated back whole)
    float x[kRowE];
    dequant_v_row(page, t, lane, exact, x);
#pragma unroll
    for (int c = 0; c < kRowE; ++c) vout[t * D + lane * kRowE + c] = from_f32(x[c]);
  }
}

// Early-finalised pages back into staging slots: reference.reopen_pages (decoded, rounded to T,
// then stored as staging rows). Grid: (n_ops, num_kv_heads); block 256 (a warp per token row). Op i
// reads block blocks[i] and writes slot slots[i]; ops whose block is < 0 are skipped.
extern "C" __global__ void __launch_bounds__(kDequantThreads) kivi_reopen(
    const u8* __restrict__ pages, const int* __restrict__ blocks, const int* __restrict__ slots, int num_kv_heads,
    u8* __restrict__ staging) {
  constexpr int E = D / 32;
  const int i = blockIdx.x, h = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int block = blocks[i];
  if (block < 0) return;
  const u8* page = pages + ((size_t)block * num_kv_heads + h) * Layout::kPageBytes;
  __shared__ int hi_pos[D];
  build_hi_pos(page, hi_pos);
  const size_t head_bytes = (size_t)P * kRowBytes;
  u8* k_rows = staging + ((size_t)slots[i] * 2 * num_kv_heads + h) * head_bytes;
  u8* v_rows = k_rows + (size_t)num_kv_heads * head_bytes;
  for (int t = warp; t < P; t += kDequantThreads / 32) {
    float x[E];
#pragma unroll
    for (int c = 0; c < E; ++c) x[c] = to_f32(from_f32(dequant_k(page, t, lane * E + c, hi_pos)));
    store_row_warp(x, lane, k_rows + (size_t)t * kRowBytes);
    dequant_v_row(page, t, lane, page_exact(page), x);
#pragma unroll
    for (int c = 0; c < E; ++c) x[c] = to_f32(from_f32(x[c]));
    store_row_warp(x, lane, v_rows + (size_t)t * kRowBytes);
  }
}

// The dynamic shared memory and block size of kivi_append, for the loader (launched once at load).
// A write CTA stores kThreads / 32 tokens with int8 staging (a warp per token), else
// kThreads / (16-byte chunks per row) (quantize_append.py computes the same).
extern "C" __global__ void kivi_append_smem_bytes(int* out) {
  out[0] = kSmemBytes;
  out[1] = kThreads;
}
