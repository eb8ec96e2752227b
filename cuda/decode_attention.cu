// decode_attention.cu — paged split-KV decode attention over kivi-serve's 2-bit pages.
//
// Spec: kivi_serve/kernels/reference.py `paged_attention` for decode batches (one new token per
// sequence): the query at position seq_len - 1 attends to the ctx = seq_len - 1 cached tokens as
// the cache holds them after this step's append (full pages quantized, the partial last page from
// its staging slot unless it was finalised early) and to its own key/value exactly.
// Page format: cuda/kivi_layout.cuh. Built by kivi_serve/kernels/loader.py with these defines
// (defaults let `nvcc -cubin -I cuda` build it by hand):
//   KIVI_HEAD_DIM (64|128|256)  KIVI_PAGE (64|128|256)  KIVI_EXACT (0|1)  KIVI_OUTLIERS (0|1)
//   KIVI_V_ROTATE (0|1: values coded rotated; KIVI_V_PIN_ENDS changes nothing here)
//   KIVI_HI (wide K channels per page: a multiple of 4 < D, 0 if none; default 3 * D / 16)
//   KIVI_DTYPE (0: fp16, 1: bf16 — query/key/value/staging dtype)
//   KIVI_ROWS16 (0: up to 8 query heads per KV head in one MMA tile, 1: up to 16)
//   KIVI_STAGES (cp.async stages per warp, default 2)
//
// Kernels (extern "C"):
//   kivi_decode          grid (num_splits, Hkv * m_tiles, B), 128 threads (4 warps; 2 for the
//                        largest pages and for 16-row tiles at D = 256). CTA s takes an even share of the sequence's quantized pages
//                        over eff = min(num_splits, pages / min_split_pages) splits (at least 1; CTAs
//                        past eff report empty) and writes partial s; CTA min(eff, num_splits - 1)
//                        then also takes the staging tail and the new token: partial num_splits.
//                        Each partial is a normalised output and its log2-sum-exp.
//                        window > 0: a sliding window (the query sees keys seq_len - window ..):
//                        pages wholly before it are never read, the first page it reaches and the
//                        staging tail are masked per token.
//   kivi_decode_combine  grid (Hq, B), D threads: log-sum-exp merge of the partials → output, with
//                        each query head's sink logit (optional) as one more partial without value.
//
// The quantized-page path (one warp per page, pages of a CTA round-robin over its warps):
//   * each warp streams its pages global → shared with cp.async (KIVI_STAGES-deep ring per warp);
//   * the query heads of one KV head are the M rows of mma.m16n8k16 (GQA packing);
//   * folding (layout.py): q'[d] = q[d] * k_scale[d] is the A operand (rounded to the model dtype),
//     sum_d q[d] * k_lo[d] is one scalar per page and row; p'[t] = p[t] * v_scale[t] is the A
//     operand of P.V, sum_t p[t] * v_lo[t] is added to every output channel. The B operands are
//     then just cb[code]: a 4-entry per-page LUT, dequantized in registers with a quarter mask, one
//     integer multiply and one byte permute per half2 (no shared-memory table, no conversion, no FMA);
//   * codes are stored in B-fragment order, so a lane's B fragments for four k-tiles are one u32
//     (paired across k-tiles, see dequant2: the other operand is gathered to match);
//   * K outliers: score[t_d] += q[d] * (kout_val[d] - k_hat[t_d, d]) — accumulated per page in a
//     per-warp shared buffer in a fixed order (lanes with the same token are grouped with
//     __match_any_sync and summed by the lowest lane), so results are bit-reproducible;
//   * wide K channels (HI > 0): the MMA uses k_cb[code & 3] for every channel; each wide channel
//     d = wide_idx[i] then adds q[d] * k_scale[d] * wide_cb[full code] - q'[d] * k_cb[code & 3] to
//     score[t], as three extra MMAs per 8 tokens over the wide channels (split-precision operands:
//     the wide channels — the ones q . k feels most — keep ~16 bits of q' and of the codebook
//     difference; see attend_page);
//   * 8-row tiles put the tokens on the MMA's M side instead: S^T = K . Q'^T (16 tokens x the 8 query
//     rows per MMA, also for the wide-channel correction) and O^T = V^T . P^T (16 channels x 8 rows),
//     so no MMA row is a padding row; the lane's tokens of an S^T tile are chosen (st_token) so that
//     one movmatrix (8 x 8 transpose) per register turns P^T's C fragments into P.V's B fragments;
//   * 16-row tiles at D = 256 (kPair): the CTA's two warps take pages in lockstep and split O's channels
//     (each computes its own page's P, both multiply both pages' P by their half of V), sharing one running
//     max per chunk through shared memory;
//   * the K offset q . k_lo and the exact token's score q . exact_k: one fp16 MMA per k-tile (exact
//     products, fp32 sums; q's fragments made once per CTA); the exact token's value contribution
//     p * exact_v in fp32 (16-row tiles: one split-precision m16n8k8 per channel tile);
//   * online softmax in the log2 domain, per page where registers allow (two 64-token chunks), else per
//     chunk;
//   * rotated values (KIVI_V_ROTATE): P.V of the coded values (and the v_lo term) accumulates in the
//     rotated space; the exact token's value (stored unrotated) is rotated into it once per page
//     (rotate_exact, one warp butterfly), and the CTA's merged output rows are rotated back once per
//     split (unrotate_rows), before the staging tail and the new token (unrotated) join in the combine.
//
// Measured speed (NVIDIA H200, 2026-11-30, docs/performance.md): 1.1-1.6x bf16 flash attention at 32K-128K,
// 0.4-1.05x at 2K, 21-27 % of copy bandwidth — bound by the latency of the page loop's integer unpacking
// (SHF/PRMT/LOP3: 56 % of its instructions), not by bytes. `kivi-serve bench kernels` measures it.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "kivi_layout.cuh"
#include "kivi_ptx.cuh"  // (kivi_layout.cuh: the defaults of the KIVI_* page-format defines)

#ifndef KIVI_ROWS16
#define KIVI_ROWS16 0
#endif
#ifndef KIVI_STAGES
#define KIVI_STAGES 2
#endif
// KIVI_COUNT_BUILD=1: the static cost model's build (kivi_serve/kernels/static_model.py). Every loop
// inside the per-page loop is unrolled, so the page loop's SASS is straight-line and its size is the
// number of instructions a warp issues per page. Same results; never launched.
#ifndef KIVI_COUNT_BUILD
#define KIVI_COUNT_BUILD 0
#endif
#if KIVI_COUNT_BUILD
#define KIVI_IN_PAGE_LOOP _Pragma("unroll")
#else
#define KIVI_IN_PAGE_LOOP _Pragma("unroll 1")
#endif
#if KIVI_K_BITS != 2
#error "the decode kernel reads 2-bit K codes only"
#endif
#if KIVI_V_BITS != 2
#error "the decode kernel reads 2-bit V codes only"
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

namespace {

constexpr int D = KIVI_HEAD_DIM;
constexpr int P = KIVI_PAGE;
constexpr bool EXACT = KIVI_EXACT != 0;
constexpr bool OUTLIERS = KIVI_OUTLIERS != 0;
constexpr bool ROWS16 = KIVI_ROWS16 != 0;
constexpr int kStages = KIVI_STAGES;
constexpr int HI = KIVI_HI;  // wide K channels per page (3-bit codes: 2 in the K plane + 1 in wide_plane)
constexpr bool V_ROTATE = KIVI_V_ROTATE != 0;
using Layout = kivi::KiviLayout<D, P, 2, 2, EXACT, OUTLIERS, HI>;
static_assert(P == 64 || P == 128 || P == 256, "the decode kernel supports pages of 64, 128 or 256 tokens");
static_assert(kStages >= 1 && kStages <= 4, "KIVI_STAGES must be 1..4");

constexpr int kRows = ROWS16 ? 16 : 8;        // query heads per CTA (MMA rows used)
// 16-row tiles at D = 256 (kPair): the two warps of the CTA take pages in lockstep and split P.V's output
// channels — each makes its own page's scores and probabilities, the two share one running max per chunk
// and exchange their P fragments through shared memory, and each multiplies both pages' P by its half of V's
// channels. 64 accumulator registers per lane instead of 128 (which spilled), about the same instructions
// per page and warp (attend_page).
constexpr bool kPair = ROWS16 && D == 256;
constexpr int kWarps = (kPair || D * P >= 256 * 128) ? 2 : 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kCopyBytes = kivi::align_up(Layout::kContentBytes);  // bytes of a page we read
constexpr int kCopyIters = (kCopyBytes + 32 * 16 - 1) / (32 * 16);   // 16-byte cp.async per lane
constexpr int kChunks = P / 64;               // 64-token chunks per page (one V code word each)
constexpr int kKTiles = D / 16;               // k-tiles of Q.K^T
constexpr int kCTiles = D / 8;                // channel tiles of P.V
// P.V accumulator tiles. 16-row tiles: O (rows x channels), m16n8 C fragments per 8 channels. 8-row
// tiles: O^T (channels x rows) = V^T . P^T, m16n8 C fragments per 16 channels, so no MMA row is a
// padding row: half the MMAs and half the accumulator registers (D = 256 no longer spills for them).
// The V codes of channels 16 mt + g and 16 mt + 8 + g give V^T's A fragment: the same words and LUT
// dequant as the 16-row tiles' B fragments.
constexpr int kOTiles = ROWS16 ? (kPair ? D / 16 : D / 8) : D / 16;  // kPair: the warp's half of the channels
constexpr int kKWords = D / 64;               // u32 code words per lane per K row
// Chunks whose softmax bookkeeping (max, rescale of O, exact token) is done once (attend_page). Two chunks
// (the whole page at P = 128) up to D = 128; one chunk at D = 256, where 16 more score registers would spill,
// and for 16-row tiles at P = 256 (their 32 more score registers spilled 396 bytes at D = 128).
constexpr int kGroup = kPair || D > 128 || (ROWS16 && P > 128) ? 1 : (kChunks < 2 ? kChunks : 2);

// Shared memory (bytes): q (fp32, kRows x D) | work area | corrections | outlier buffers | wide-channel tables.
constexpr int kQBytes = kRows * D * 4;
constexpr int kRingBytes = kWarps * kStages * kCopyBytes;
constexpr int kMergeBytes = kWarps * kRows * (D + (kPair ? 3 : 2)) * 4;  // O, m, l (kPair: and the v_lo term)
constexpr int kTailBytes = kRows * (P + 1) * 4 + 2 * kRows * 4;
constexpr int kWorkBytes = kivi::align_up(
    kRingBytes > kMergeBytes ? (kRingBytes > kTailBytes ? kRingBytes : kTailBytes)
                             : (kMergeBytes > kTailBytes ? kMergeBytes : kTailBytes));
constexpr bool kCorr = OUTLIERS;  // per-token score corrections (K outliers)
constexpr int kCorrBytes = kCorr ? kWarps * kRows * P * 4 : 0;
constexpr int kScratchBytes = OUTLIERS ? kWarps * kRows * 32 * 4 : 0;
// Per-page wide-channel tables of each warp (attend_page): wtab [3][8] u16 (the correction's three operand
// tables), wmeta [16 * ceil(HI / 16)] u32 (each wide slot's K-plane position and wide-plane row); with K
// outliers also the tables as fp32, dtab [3][8], and each channel's wide slot (0xff: not wide), wslot [D] u8.
constexpr int kWTiles = (HI + 15) / 16;  // k-tiles of the wide-channel correction MMA
// Correction tiles from kHalfTile on hold 8 wide slots only (D = 128: the second tile): slots 16 wt2 + 8
// + 2j + {0, 1} are past HI in every lane, so those operand registers are 0 and a selector holds the codes
// of slots 16 wt2 + 2j, + 1 for two tokens instead.
constexpr int kHalfTile = (HI - 8 + 15) / 16;
constexpr int kWideTab = 0, kWideMeta = 48, kWideDtab = kWideMeta + 16 * kWTiles * 4,
              kWideSlot = kWideDtab + (OUTLIERS ? 24 * 4 : 0), kWideWarpBytes = kWideSlot + (OUTLIERS ? D : 0);
constexpr int kWideBytes = HI > 0 ? kWarps * kivi::align_up(kWideWarpBytes) : 0;
// kPair: each warp's exchange words per lane (lane-major): its chunk max and exact-token score for rows g,
// g + 8 (4) and its P.V A fragments (16).
constexpr int kXWords = 20;
constexpr int kXBytes = kPair ? kWarps * kXWords * 32 * 4 : 0;
// KIVI_V_ROTATE with the exact token: each warp's page's exact value, rotated (fp32 [D]).
constexpr int kRotBytes = V_ROTATE && EXACT ? kWarps * D * 4 : 0;
// The K offset MMA's q side (attend_page): fp16 fragments of q, per k-tile and lane (16-row tiles: Q's A fragment,
// four words; 8-row tiles: Q^T's B fragment, two), each row scaled by a power of two 2^-e_r so that a bf16 query
// is exact in fp16; then per row the factor scale_log2 * 2^e_r that undoes it (qf) and 2^-e_r (qi).
constexpr int kQhWords = ROWS16 ? 4 : 2;
constexpr int kQhBytes = kivi::align_up(kKTiles * 32 * kQhWords * 4 + 2 * kRows * 4);
// Each warp's fp32 copies of its page's metadata (stage_f32): {v_lo, v_scale} per token, k_scale and the exact
// value per channel. kPair (16-row tiles at D = 256) reads them from the page as before: their shared memory
// would cost a CTA per SM there.
constexpr bool kStage = !kPair;
// kQFold (fold_q's q and k_scale in fold order, fold_pair): 16-row tiles up to D = 128 (8-row tiles gain ~8
// instructions per page from it, and without its 4 KB the default page's 8-row kernel stays within 99 KiB).
constexpr bool kQFold = ROWS16 && D <= 128;
constexpr int kF32Words = kStage ? 2 * P + 2 * D + (kQFold ? D : 0) : 0;  // (kQFold: k_scale in fold order)
constexpr int kQFoldBytes = kQFold ? kRows * D * 4 : 0;  // the CTA's q (fp32) in fold order
constexpr int kF32Bytes = kWarps * kF32Words * 4;
constexpr int kSmemBytes =
    kQBytes + kWorkBytes + kCorrBytes + kScratchBytes + kWideBytes + kXBytes + kRotBytes + kQhBytes + kF32Bytes +
    kQFoldBytes;
static_assert(kSmemBytes <= 227 * 1024, "shared memory budget");
// __launch_bounds__'s minimum CTAs per SM (0: no directive). Left alone, ptxas trades spills for
// occupancy by itself, and with the 8-row S^T tiles it spilled cold values to reach one more CTA
// (D = 128, P = 128: 40 bytes for 168 registers, although shared memory allows only 2 CTAs; D = 64,
// P = 64: 48 bytes; D = 128, P = 64: 28). The values below are where ptxas spills nothing or least
// (static model, nvcc 13.0, sm_90a): 2 where shared memory allows no more CTAs than that (for these
// block sizes 2 leaves ptxas all 255 registers), for 8-row tiles from D = 128 (3 spilled 24 bytes at
// D = 128, P = 64) and for 16-row tiles from 64 x 128 (ptxas's own choice spilled 128 bytes at D = 64,
// P = 128); 3 for the other 8-row tiles (also at D = 64, P = 64 since the seventh pass of
// docs/performance.md: with 2, ptxas took 179 registers there, one CTA fewer); none for 16-row tiles at
// D = 256 (kPair: ptxas's own choice, 232-234 registers, spills nothing) and at D = 64, P = 64.
constexpr int kSmemCtas = (228 * 1024) / (kSmemBytes + 1024);
#ifdef KIVI_MIN_CTAS  // an explicit choice (KernelSpec.min_ctas), for measuring other trade-offs
constexpr int kMinCtas = KIVI_MIN_CTAS;
#else
constexpr int kMinCtas = ROWS16 ? (D == 256 || D * P < 64 * 128 ? 0 : 2)
                                : (kSmemCtas <= 2 || D >= 128 ? 2 : 3);
#endif

__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }

#if KIVI_DTYPE == 1
typedef __nv_bfloat16 T;
__device__ __forceinline__ float to_f32(T x) { return __bfloat162float(x); }
__device__ __forceinline__ T from_f32(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}
__device__ __forceinline__ float round_t(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
// the two values of a pack2 word, as fp32 (exact)
__device__ __forceinline__ float2 unpack2(u32 w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  kivi::ptx::mma_m16n8k16_bf16(c, a, b0, b1);
}
__device__ __forceinline__ void mma1688(float (&c)[4], const u32 (&a)[2], u32 b0) {
  kivi::ptx::mma_m16n8k8_bf16(c, a, b0);
}
#else
typedef __half T;
// fp16 MMA operands saturate at +-65504 (NaN stays NaN): q * k_scale of an fp16 model with a large
// q/k range would otherwise round to inf, and inf * 0 (a zero codebook entry) is NaN in the MMA.
// round_t rounds the same way, so the wide-channel correction still cancels what the MMA used.
__device__ __forceinline__ float sat_f16(float x) {
  constexpr float kMax = 65504.f;
  return x < -kMax ? -kMax : (x > kMax ? kMax : x);
}
__device__ __forceinline__ float to_f32(T x) { return __half2float(x); }
__device__ __forceinline__ T from_f32(float x) { return __float2half_rn(x); }
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  __half2 v = __floats2half2_rn(sat_f16(lo), sat_f16(hi));
  return *reinterpret_cast<u32*>(&v);
}
__device__ __forceinline__ float round_t(float x) { return __half2float(__float2half_rn(sat_f16(x))); }
__device__ __forceinline__ float2 unpack2(u32 w) { return __half22float2(*reinterpret_cast<const __half2*>(&w)); }
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  kivi::ptx::mma_m16n8k16_f16(c, a, b0, b1);
}
__device__ __forceinline__ void mma1688(float (&c)[4], const u32 (&a)[2], u32 b0) {
  kivi::ptx::mma_m16n8k8_f16(c, a, b0);
}
#endif

// P.V's operands with rotated values (KIVI_V_ROTATE): fp16 whatever the model dtype. A rotated value's
// P.V error that is common to every channel (from rounding p * v_scale or a codebook entry) comes back
// from the rotation concentrated in one channel, sqrt(D) times larger; fp16 holds the page's fp16
// codebook exactly and p * v_scale (<= 65504: v_scale is fp16) with 3 more bits than bf16.
__device__ __forceinline__ u32 pack2_f16(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<u32*>(&v);
}
__device__ __forceinline__ u32 pack2v(float lo, float hi) {
  if constexpr (V_ROTATE) return pack2_f16(lo, hi);
  return pack2(lo, hi);
}
__device__ __forceinline__ void mma_v(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if constexpr (V_ROTATE) kivi::ptx::mma_m16n8k16_f16(c, a, b0, b1); else mma16816(c, a, b0, b1);
}

// ------------------------------------------------------------------------------ inline PTX (kivi_ptx.cuh)
using kivi::ptx::cp_async16;
using kivi::ptx::cp_async_commit;
using kivi::ptx::cp_async_wait;
using kivi::ptx::dynamic_smem_size;

// ------------------------------------------------------------------------------ 2-bit LUT dequant
// A code word x holds 16 codes (layout.py, B-fragment order): position p = 4 kt + e in bits 2p, 2p + 1
// is the lane's fragment element e of k-tile kt. MMA e of a word takes the codes at positions e,
// e + 4 (b0) and e + 8, e + 12 (b1): element e of k-tiles 0..3. The MMA sums over k in any order, so
// this pairing only asks the other operand to be gathered the same way (fold_q; P's fragments).
// Selectors: y = x & (0x03030303 << 2e) holds those four codes, one per byte at bit 2e; y * 0x22
// puts code c's selector (nibbles 2c, 2c + 1: the bytes of cb[c] in the LUT {t01, t23}) in its
// byte, and the high words of y * (0x22 << (32 - 2e)) and y * (0x22 << (16 - 2e)) are that product
// shifted so b0's and b1's pairs land in the low half, which is all prmt reads (the parts below
// 2^32 never carry). Per B register: half a mask, one multiply, one prmt.
// (e: a compile-time constant once the callers' loops are unrolled)
__device__ __forceinline__ void dequant2(u32 x, int e, u32 t01, u32 t23, u32& b0, u32& b1) {
  using kivi::ptx::prmt;
  const u32 sel = ((x >> (2 * e)) & 0x03030303u) * 0x22u + 0x10101010u;
  b0 = prmt(t01, t23, sel);
  b1 = prmt(t01, t23, sel >> 16);
}
// The page codebook (fp16 in the page) as a LUT of the model dtype.
__device__ __forceinline__ void make_lut(const __half* cb, u32& t01, u32& t23, float (&cbf)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) cbf[i] = round_t(__half2float(cb[i]));
  t01 = pack2(cbf[0], cbf[1]);
  t23 = pack2(cbf[2], cbf[3]);
}

// The V codebook as P.V's LUT: the model dtype's, or (KIVI_V_ROTATE) the page's fp16 values exactly.
__device__ __forceinline__ void make_vlut(const __half* cb, u32& t01, u32& t23) {
  if constexpr (V_ROTATE) {
    t01 = pack2_f16(__half2float(cb[0]), __half2float(cb[1]));
    t23 = pack2_f16(__half2float(cb[2]), __half2float(cb[3]));
  } else {
    float cbf[4];
    make_lut(cb, t01, t23, cbf);
  }
}

// 0, through an asm the compiler cannot see into: an address offset by it inside a loop makes the
// loads loop-variant, so they are not hoisted out and kept live across the loop (kFoldPerWord).
__device__ __forceinline__ int opaque_zero() {
  int z = 0;
  asm volatile("" : "+r"(z));
  return z;
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
// Over the 8 lanes of the same j (lane % 4): the tokens of an 8-row tile's S^T fragments.
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int o = 4; o < 32; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float2 h2f(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
// v[c] for a 2-bit code without dynamic register indexing (which would go to local memory).
__device__ __forceinline__ float sel4(const float (&v)[4], int c) {
  return c == 0 ? v[0] : (c == 1 ? v[1] : (c == 2 ? v[2] : v[3]));
}

// K code of (token t, channel d) in a page's K plane.
__device__ __forceinline__ int k_code(const u32* kpl, int t, int d) {
  int w, p;
  kivi::packed_pos(D, d, w, p);
  return (kpl[t * (D / 16) + w] >> (2 * p)) & 3;
}

template <int N>
struct Words {
  u32 w[N];
};
template <int N>
__device__ __forceinline__ Words<N> load_words(const u32* p) {
  Words<N> r;
  if constexpr (N == 1) {
    r.w[0] = p[0];
  } else if constexpr (N == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    r.w[0] = v.x; r.w[1] = v.y;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    r.w[0] = v.x; r.w[1] = v.y; r.w[2] = v.z; r.w[3] = v.w;
  }
  return r;
}

// k_scale at a channel (pair) from the page's fp32 copy (stage_f32) or, kPair, from the page itself.
__device__ __forceinline__ float2 ks_pair(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 ks_pair(const __half* p) { return h2f(p); }
__device__ __forceinline__ float ks_one(const float* p) { return *p; }
__device__ __forceinline__ float ks_one(const __half* p) { return __half2float(*p); }
template <bool B, class X, class Y> struct Pick { using type = X; };
template <class X, class Y> struct Pick<false, X, Y> { using type = Y; };
using KsT = typename Pick<kStage, float, __half>::type;

// Fold order (kQFold): channel pair i (channels 2i, 2i + 1) = 64 w + 16 kt + 8 eh + 2 j goes to pair
// ((2 w + eh) * 4 + j) * 4 + kt, so that the four pairs fold_q reads for (w, eh = e / 2, j) are adjacent.
__device__ __forceinline__ int fold_pair(int i) {
  return (((i >> 5) * 2 + ((i >> 2) & 1)) * 4 + (i & 3)) * 4 + ((i >> 3) & 3);
}

// A fragment of MMA e of code word w in Q.K^T (dequant2's pairing): q' = T(q * k_scale) (the
// per-channel K scale folded into q) for rows g (a0, a2) and g + 8 (a1, a3; 16-row tiles only) at
// channels 64 w + 16 kt + f, kt = 0, 1 (a0, a1) and 2, 3 (a2, a3), f = fragment element e's column.
// 8-row tiles (S^T = K . Q'^T) use {a0, a2} as the B fragment of Q'^T: the same channels at k = 2j,
// 2j + 1 and 2j + 8, 2j + 9 of row g (n), which is how dequant2 pairs the K codes of their A fragment.
// MMAs e and e + 1 (e even) of a word take adjacent channels (f and f + 1): both made at once, the
// k_scale pairs (fp32: the page's staged copy, ksf) and the q pairs as float2 loads. kQFold: q (qs) and k_scale
// (ksf) in fold order (fold_pair), so that the four pairs of a call are two float4 loads.
template <class KS>
__device__ __forceinline__ void fold_q(u32 (&a0)[4], u32 (&a1)[4], const float* qs, const KS* ksf, int w, int e,
                                       int g, int j) {
  const int c = 64 * w + 2 * j + 8 * (e >> 1), o = 2 * fold_pair(c / 2);
  float2 sc[4];
  if constexpr (kQFold) {
    const float4 s01 = *reinterpret_cast<const float4*>(ksf + o);
    const float4 s23 = *reinterpret_cast<const float4*>(ksf + o + 4);
    sc[0] = make_float2(s01.x, s01.y), sc[1] = make_float2(s01.z, s01.w);
    sc[2] = make_float2(s23.x, s23.y), sc[3] = make_float2(s23.z, s23.w);
  } else {
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) sc[kt] = ks_pair(ksf + c + 16 * kt);
  }
#pragma unroll
  for (int h = 0; h < (ROWS16 ? 2 : 1); ++h) {
    float2 q[4];
    if constexpr (kQFold) {
      const float* qr = qs + (g + 8 * h) * D + o;
      const float4 q01 = *reinterpret_cast<const float4*>(qr), q23 = *reinterpret_cast<const float4*>(qr + 4);
      q[0] = make_float2(q01.x, q01.y), q[1] = make_float2(q01.z, q01.w);
      q[2] = make_float2(q23.x, q23.y), q[3] = make_float2(q23.z, q23.w);
    } else {
#pragma unroll
      for (int kt = 0; kt < 4; ++kt) q[kt] = *reinterpret_cast<const float2*>(qs + (g + 8 * h) * D + c + 16 * kt);
    }
    a0[h] = pack2(q[0].x * sc[0].x, q[1].x * sc[1].x);
    a0[2 + h] = pack2(q[2].x * sc[2].x, q[3].x * sc[3].x);
    a1[h] = pack2(q[0].y * sc[0].y, q[1].y * sc[1].y);
    a1[2 + h] = pack2(q[2].y * sc[2].y, q[3].y * sc[3].y);
  }
  if (!ROWS16) a0[1] = a0[3] = a1[1] = a1[3] = 0u;  // never read (8-row tiles use a0, a2)
}
// c += A . cb[codes] over the 16 codes of one code word x as B (a: the word's four A fragments in dequant2's
// pairing): 16-row tiles' S += q' . cb[K codes]^T per K word, and O += p' . cb[V codes] per V word.
// (IS_V: P.V's MMA, mma_v.)
template <bool IS_V = false>
__device__ __forceinline__ void mma_word(float (&s)[4], u32 x, const u32 (*a)[4], u32 t01, u32 t23) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    u32 b0, b1;
    dequant2(x, e, t01, t23, b0, b1);
    if (IS_V) mma_v(s, a[e], b0, b1); else mma16816(s, a[e], b0, b1);
  }
}
// 8-row tiles: s^T += cb[codes] . q'^T over one K code word of the lane's two tokens (xa: row g of
// the m-tile, xb: row g + 8); b[e]: fold_q's fragment of MMA e, of which {b[e][0], b[e][2]} is B.
__device__ __forceinline__ void qk_word8(float (&s)[4], u32 xa, u32 xb, const u32 (*b)[4], u32 t01, u32 t23) {
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    u32 a[4];
    dequant2(xa, e, t01, t23, a[0], a[2]);
    dequant2(xb, e, t01, t23, a[1], a[3]);
    mma16816(s, a, b[e][0], b[e][2]);
  }
}
// 8-row tiles: the page-relative token of row r (< 8) of S^T m-tile e in a 64-token chunk (row
// r + 8: 32 more). Chosen so that the packed C fragments of m-tile e, transposed (movmatrix), are
// the B fragments of P^T for P.V's MMA e in dequant2's pairing: row 2i <-> token f + 2i, row 2i + 1
// <-> token f + 2i + 16, with f = (e & 1) + 8 (e >> 1) the column of fragment element e.
__device__ __forceinline__ int st_token(int e, int r) { return (e & 1) + 8 * (e >> 1) + 2 * (r >> 1) + 16 * (r & 1); }

// The q side of the wide-channel correction's tile wt2 (attend_page): w1 = wb = T(wa), wa = q * k_scale in
// fp32 (exactly the main MMA's q' of the channel), and w2 = T(wa - wb) for rows g ([0], [2]) and g + 8
// ([1], [3]; 16-row tiles only) at wide slots 16 wt2 + 2j, + 1 ([0], [1]) and + 8, + 9 ([2], [3]). Slots
// past HI are padding with 0. 16-row tiles use them as A (rows x slots); 8-row tiles use [0], [2] as B
// (slots x rows).
// (ksf: the page's k_scale in fp32, stage_f32.) wb is pack2's rounding of wa, as round_t would give it.
template <class KS>
__device__ __forceinline__ void wide_a(u32 (&w1)[4], u32 (&w2)[4], int wt2, const float* qs, const KS* ksf,
                                       const u8* wide_idx, int g, int j) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int r = g + ((q & 1) ? 8 : 0), i0 = 16 * wt2 + 2 * j + ((q & 2) ? 8 : 0);
    float wa[2] = {0.f, 0.f};
    if (((q & 1) == 0 || ROWS16) && !((q & 2) && wt2 >= kHalfTile)) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (i0 + u < HI) {
          const int d = wide_idx[i0 + u] & (D - 1);
          wa[u] = qs[r * D + d] * ks_one(ksf + d);
        }
      }
    }
    w1[q] = pack2(wa[0], wa[1]);
    const float2 wb = unpack2(w1[q]);
    w2[q] = pack2(wa[0] - wb.x, wa[1] - wb.y);
  }
}

// Online-softmax state of one warp: rows g (lo) and g + 8 (hi) of its lane (16-row tiles), rows 2j
// (lo) and 2j + 1 (hi) (8-row tiles).
struct State {
  // P.V accumulators, relative to m (kOTiles). 16 rows: o[ct] = rows g (0, 1), g + 8 (2, 3) x channels
  // 8 ct + 2j, + 1 (kPair: channels D / 2 (warp & 1) + 8 ct + 2j, + 1). 8 rows: o[mt] = channels 16 mt + g (0, 1), + 8 (2, 3) x rows 2j (0, 2), 2j + 1 (1, 3).
  float o[kOTiles][4];
  float m_lo, m_hi;     // running max (log2 domain)
  float l_lo, l_hi;     // lane partial row sums
  float pl_lo, pl_hi;   // lane partial sum_t p[t] * v_lo[t]
};
// A chunk's max mx of a row: the running max m becomes max(m, mx); mu is the offset of the chunk's
// probabilities (0 while the row has seen masked tokens only); returns the factor for what the row
// has accumulated so far.
__device__ __forceinline__ float rescale(float& m, float mx, float& mu) {
  const float mn = fmaxf(m, mx);
  mu = mn == -inf_f() ? 0.f : mn;
  const float al = kivi::ptx::ex2(m - mu);
  m = mn;
  return al;
}
__device__ __forceinline__ void accumulate(State& st, float al_lo, float al_hi, float ls_lo, float ls_hi, float pv_lo,
                                           float pv_hi) {
  st.l_lo = st.l_lo * al_lo + ls_lo;
  st.pl_lo = st.pl_lo * al_lo + pv_lo;
  st.l_hi = st.l_hi * al_hi + ls_hi;
  st.pl_hi = st.pl_hi * al_hi + pv_hi;
}
// One raw score: q' . k (+ the outlier correction), -inf outside tokens lo .. valid - 1 of the page and for
// the exact token te (whose score, qex, joins the page's softmax apart: exact_term). Its log2-domain score is
// s * scale + qlo (qlo = q . k_lo * scale); scale > 0 (the wrapper checks), so a row's largest score is its
// largest raw score, scaled (row_max), and prob scales each raw score and subtracts the max in one FFMA.
__device__ __forceinline__ float score(float s, const float* corr, int row, int tok, int te, int lo, int valid) {
  if (OUTLIERS) s += corr[row * P + tok];
  return tok < valid && tok >= lo && (!EXACT || tok != te) ? s : -inf_f();
}
// A row's largest raw score in the log2 domain (-inf stays -inf).
__device__ __forceinline__ float row_max(float mx, float qlo, float scale_log2) { return fmaf(mx, scale_log2, qlo); }
// One probability: p = 2^(s * scale + off), off = qlo - mu (mu: the running max), joins the row sum ls;
// pv += p * v_lo[tok]; returns P.V's operand p * v_scale[tok].
__device__ __forceinline__ float prob(float s, float scale_log2, float off, float vl, float vs, float& ls, float& pv) {
  // ex2.approx.ftz: scores are <= the running max, so p is in [0, 1] (to an ulp); a p below 2^-126 flushed
  // to 0 changes nothing a bf16/fp16 output can show
  const float p = kivi::ptx::ex2(fmaf(s, scale_log2, off));
  ls += p;
  pv += p * vl;
  return p * vs;
}
// The exact token of a page as one more score of its first chunk (qx: its score there, -inf in the other
// chunks and when the page masks it): px = 2^(qx - mu) joins the row sum in one lane of the row's
// group (own: the lanes' partial sums are summed over the group later) and pex, the weight of its fp32
// value, which every lane of the group keeps alike (same max, same factors) until the page's end.
__device__ __forceinline__ void exact_term(float qx, float mu, float al, bool own, float& ls, float& pex) {
  const float px = kivi::ptx::ex2(qx - mu);
  ls = own ? px : 0.f;
  pex = pex * al + px;
}
// An operand table of the wide-channel correction as a register LUT (attend_page): 8 entries of 16 bits
// by 3-bit code (c = low 2 bits | top bit << 2); l0/l1 hold the low bytes of entries 0..3 / 4..7, h0/h1
// the high bytes, so that one prmt per byte plane looks up four codes.
struct WideLut {
  u32 l0, l1, h0, h1;
};
__device__ __forceinline__ WideLut wide_lut(const u16* wtab) {
  using kivi::ptx::prmt;
  const uint4 t = *reinterpret_cast<const uint4*>(wtab);  // {e0, e1}, {e2, e3}, {e4, e5}, {e6, e7}
  return {prmt(t.x, t.y, 0x6420u), prmt(t.z, t.w, 0x6420u), prmt(t.x, t.y, 0x7531u), prmt(t.z, t.w, 0x7531u)};
}
// Nibble k (0..3) of a LUT selector: the 3-bit code of one (token, wide slot). kw: the token's K-plane
// word holding the slot's channel, whose 2-bit code sits at bit 2p — rot = (4k - 2p) & 31 (per page)
// turns it to bits 4k, 4k + 1; xh: the slot's wide-plane word shifted right by a per-lane amount, the
// token's top bit at bit fb (a constant once unrolled) — rotated to bit 4k + 2. Bit 4k + 3 stays 0 (prmt's
// sign mode); nothing else of the nibble is set.
__device__ __forceinline__ u32 code_nibble(u32 kw, u32 rot, u32 xh, int fb, int k) {
  using kivi::ptx::rotl;
  return (rotl(kw, rot) & (3u << (4 * k))) | (rotl(xh, (u32)(4 * k + 2 - fb) & 31u) & (4u << (4 * k)));
}
// The two low bits of nibble k of a selector (code_nibble without the top bit).
__device__ __forceinline__ u32 code_low(u32 kw, u32 rot, int k) { return kivi::ptx::rotl(kw, rot) & (3u << (4 * k)); }
// Two operand registers from a selector of four codes c0..c3 (nibbles 0..3): r0 = {T[c0], T[c1]},
// r1 = {T[c2], T[c3]} (low half first). Four prmt for four codes.
__device__ __forceinline__ void lut_codes(u32 sel, const WideLut& t, u32& r0, u32& r1) {
  using kivi::ptx::prmt;
  const u32 lo = prmt(t.l0, t.l1, sel), hi = prmt(t.h0, t.h1, sel);
  r0 = prmt(lo, hi, 0x5140u);
  r1 = prmt(lo, hi, 0x7362u);
}
// A lane's view of one wide slot for a page (attend_page): the word of its channel in a K-plane row, the
// rotation of its code for selector nibbles k and k + 2 (only 16-row and half tiles use the second),
// and its row of the wide plane.
struct WideSlot {
  u32 word, rot0, rot2, row;
};
__device__ __forceinline__ WideSlot wide_slot(u32 meta, int k) {
  const u32 sh = (meta >> 8) & 0xffu;  // (rotl takes its amount mod 32)
  return {meta & 0xffu, (u32)(4 * k) - sh, (u32)(4 * k + 8) - sh, meta >> 16};
}
// The lane's wide slots of correction tile wt2 (16 wt2 + 2j + {0, 1, 8, 9}; the first two in a half tile)
// and, for the 64-token chunk at tb, each slot's two wide-plane words tb / 32, tb / 32 + 1 shifted right by
// `shift` (the lane's first token of the chunk within its word).
__device__ __forceinline__ void wide_slots(WideSlot (&ws)[4], u32 (&xh)[4][2], const u32* wmeta, const u8* pg, int wt2,
                                           int j, int tb, int shift) {
#pragma unroll
  for (int u = 0; u < (wt2 >= kHalfTile ? 2 : 4); ++u) {
    ws[u] = wide_slot(wmeta[16 * wt2 + 2 * j + (u & 1) + 8 * (u >> 1)], u);
    const u32* wrow =
        reinterpret_cast<const u32*>(pg + (HI > 0 ? Layout::kWidePlane : 0)) + ws[u].row * (P / 32) + tb / 32;
    xh[u][0] = wrow[0] >> shift;
    xh[u][1] = wrow[1] >> shift;
  }
}

// KIVI_V_ROTATE: the page's exact value (fp16, unrotated) rotated like the coded values, into the warp's
// xr[D] (fp32): hadamard(v * s) * c, lane l holding channels l * D / 32 + c.
__device__ __forceinline__ void rotate_exact(const u8* pg, float* xr, int lane) {
  constexpr int E = D / 32;
  const __half* ev = reinterpret_cast<const __half*>(pg + (EXACT ? Layout::kExactV : 0));
  float x[E];
#pragma unroll
  for (int c = 0; c < E; ++c) x[c] = __half2float(ev[lane * E + c]) * kivi::value_sign(lane * E + c);
  kivi::ptx::hadamard_row(x, lane);
#pragma unroll
  for (int c = 0; c < E; ++c) xr[lane * E + c] = x[c] * kivi::rotation_scale(D);
  __syncwarp();
}
// The exact value of a page at channels d, d + 1 (fp32) as P.V accumulates it: the page's, or
// (KIVI_V_ROTATE) rotated into xr by rotate_exact.
__device__ __forceinline__ float2 exact_v2(const u8* pg, const float* xr, int d) {
  if constexpr (V_ROTATE) return make_float2(xr[d], xr[d + 1]);
  return h2f(reinterpret_cast<const __half*>(pg + (EXACT ? Layout::kExactV : 0)) + d);
}

// A warp's fp32 copies of its page's per-token and per-channel fp16 metadata (kF32Words, attend_page):
// {v_lo, v_scale} per token (interleaved: a token pair is one float4), k_scale and the exact value per
// channel. Each value is converted once per page instead of by every lane that reads it (up to 8 lanes).
// 16-row tiles (kExactMma) keep the exact value as the B operand of its MMA (attend_page's end) instead: per
// channel one word {T(ev), T(ev - T(ev))} (exact: an fp16 value is two bf16 values).
constexpr int kFVl = 0, kFKs = 2 * P, kFEv = 2 * P + D, kFKp = 2 * P + 2 * D;  // kFKp: k_scale in fold order
constexpr bool kExactMma = ROWS16 && !kPair && !V_ROTATE;
__device__ __forceinline__ void stage_f32(const u8* pg, float* f, int lane) {
  if constexpr (!kStage) return;
  const __half* v_lo = reinterpret_cast<const __half*>(pg + Layout::kVLo);
  const __half* v_sc = reinterpret_cast<const __half*>(pg + Layout::kVScale);
  const __half* k_sc = reinterpret_cast<const __half*>(pg + Layout::kKScale);
#pragma unroll
  for (int i = lane; i < P / 2; i += 32) {
    const float2 a = h2f(v_lo + 2 * i), b = h2f(v_sc + 2 * i);
    *reinterpret_cast<float4*>(f + kFVl + 4 * i) = make_float4(a.x, b.x, a.y, b.y);
  }
  const int fl = fold_pair(lane);  // fold_pair(lane + 32 k) = fl + 32 k
#pragma unroll
  for (int i = lane; i < D / 2; i += 32) {
    const float2 ks = h2f(k_sc + 2 * i);
    *reinterpret_cast<float2*>(f + kFKs + 2 * i) = ks;
    if constexpr (kQFold) *reinterpret_cast<float2*>(f + kFKp + 2 * (fl + (i - lane))) = ks;
    if constexpr (EXACT && kExactMma) {
      const float2 e = exact_v2(pg, nullptr, 2 * i), h = unpack2(pack2(e.x, e.y));
      *reinterpret_cast<uint2*>(f + kFEv + 2 * i) = make_uint2(pack2(h.x, e.x - h.x), pack2(h.y, e.y - h.y));
    } else if constexpr (EXACT && !V_ROTATE) {
      *reinterpret_cast<float2*>(f + kFEv + 2 * i) = exact_v2(pg, nullptr, 2 * i);
    }
  }
}
// {v_lo, v_scale} of tokens t, t + 1 (t even) from the staged copy, or (kPair) from the page.
__device__ __forceinline__ float4 vlo_vsc(const float* f, const u8* pg, int t) {
  if constexpr (kStage) return *reinterpret_cast<const float4*>(f + kFVl + 2 * t);
  const float2 a = h2f(reinterpret_cast<const __half*>(pg + Layout::kVLo) + t);
  const float2 b = h2f(reinterpret_cast<const __half*>(pg + Layout::kVScale) + t);
  return make_float4(a.x, b.x, a.y, b.y);
}
// The exact value at channels d, d + 1 / d (fp32) from the staged copy, or (KIVI_V_ROTATE) xr.
__device__ __forceinline__ float2 exact_f2(const float* f, const float* xr, int d) {
  if constexpr (V_ROTATE) return make_float2(xr[d], xr[d + 1]);
  return *reinterpret_cast<const float2*>(f + kFEv + d);
}
__device__ __forceinline__ float exact_f1(const float* f, const float* xr, int d) {
  if constexpr (V_ROTATE) return xr[d];
  return f[kFEv + d];
}

// One quantized page (in shared memory) for one warp. Tokens lo .. valid - 1 of the page are
// attended (lo > 0: the first page a sliding window reaches; valid < P: the context's last page).
// kPair: pg_p is the partner warp's page (a warp without a page of its own takes its partner's with
// valid = 0: every score masked, P = 0), vmax the larger of the two valid counts (the chunk loop and its
// barriers are the pair's), xbuf the CTA's exchange words (kXWords per lane and warp). Every warp of the CTA
// (kWarps = 2) calls it the same number of times. xrot: the CTA's rotated exact values (kRotBytes; kPair
// reads the partner's after the chunk's first barrier).
__device__ __forceinline__ void attend_page(State& st, const u8* pg, int lo, int valid, const float* qs, float* corr,
                                            float* scratch, float* wide, float scale_log2, const u8* pg_p, int vmax,
                                            u32* xbuf, float* xrot, const u32* qh, float* f32, const float* qfo) {
  const int lane = threadIdx.x & 31, g = lane >> 2, j = lane & 3;
  const u32* kpl = reinterpret_cast<const u32*>(pg + Layout::kKPlane0);
  const u32* vpl = reinterpret_cast<const u32*>(pg + Layout::kVPlane0);
  const __half* k_lo = reinterpret_cast<const __half*>(pg + Layout::kKLo);
  const __half* k_sc = reinterpret_cast<const __half*>(pg + Layout::kKScale);
  const int te = EXACT ? *reinterpret_cast<const short*>(pg + Layout::kExactIdx) : -1;
  // fp32 copies of v_lo / v_scale, k_scale and the exact value (read after the next __syncwarp: the wide
  // tables', the outlier pass's, or this one's)
  stage_f32(pg, f32, lane);
  if constexpr (HI == 0 && !OUTLIERS) __syncwarp();
  [[maybe_unused]] float* xr = xrot + (threadIdx.x >> 5) * D;
  [[maybe_unused]] const float* xr_p = xrot + ((threadIdx.x >> 5) ^ 1) * D;
  if constexpr (V_ROTATE && EXACT) rotate_exact(pg, xr, lane);

  u32 kt01, kt23, vt01, vt23;
  float kcb[4];
  make_lut(reinterpret_cast<const __half*>(pg + Layout::kKCb), kt01, kt23, kcb);
  make_vlut(reinterpret_cast<const __half*>(pg + Layout::kVCb), vt01, vt23);
  // kPair: the partner's page's V plane and codebook (P.V multiplies both pages' P)
  [[maybe_unused]] const u32* vpl_p = reinterpret_cast<const u32*>(pg_p + Layout::kVPlane0);
  [[maybe_unused]] u32 vp01 = 0u, vp23 = 0u;
  if constexpr (kPair) {
    make_vlut(reinterpret_cast<const __half*>(pg_p + Layout::kVCb), vp01, vp23);
  }

  // ---- wide K channels (HI > 0): three extra small MMAs per n-tile and 16 wide channels (8-row tiles: per
  // S^T m-tile of 16 tokens, with the table entries as A and the q side as B), into the score fragments.
  // The main MMA adds q'[r, d] * kcb[code & 3] for every channel, q' = wb = round_t(q * k_scale) and kcb
  // the codebook rounded to T; the page says k = k_lo + k_scale * wide_cb[full code]. So each wide channel
  // d = wide_idx[i] adds, per token t, wb[r][i] * T(hk(t, i) - kh(t, i)) (hk = wide_cb[3-bit code], kh =
  // kcb[code & 3]): a matrix product over the wide channels (K = HI slots, padded to 16s with wb = 0)
  // whose code side depends on the token's 3-bit code c only, through a per-page 8-entry table
  // Bh = T(wide_cb[c] - kcb[c & 3]). Two more MMAs carry the wide channels — the ones q . k feels most —
  // to ~16 bits on both sides: wb * Bl, Bl = T(hk - kh - Bh), and T(wa - wb) * Bk, Bk = T(hk), with wa =
  // q * k_scale in fp32:  wb * (T(kh) + Bh + Bl) + T(wa - wb) * Bk = wa * hk to a few fp32 ulps.
  // (Measured, emulated on CPU, against fp64: with the Bh MMA alone the decode cases' errors grew from
  // 0.6-0.8x to up to 2.1x those of attention in the query dtype; without Bl, to up to 1.24x in fp16.)
  // The tables are register LUTs (WideLut: four prmt per four codes) and the codes are gathered once into
  // LUT selectors for all three (code_nibble: the K-plane word's low bits and the wide plane's top bit
  // rotated into place): a code costs its K-plane load, two rotates, two masks and three prmt, no table load.
  // wmeta[slot] = K-plane word | 2p << 8 | wide-plane row << 16 (k_code's position of the channel; slots
  // past HI repeat the last wide channel: their wb is 0).
  // 16-row tiles at D = 256 (the register-bound configuration: 64 accumulator registers with kPair, 32 score
  // registers) make the fragments of Q.K^T and the q side of this correction where they are used, a few at a
  // time (kFoldPerWord), instead of once per page (which still spilled with kPair: 168 and 64 bytes at P = 64,
  // 128). 8-row tiles (32 accumulator registers at D = 256) make them once per page.
  constexpr bool kFoldPerWord = D == 256 && ROWS16;
  u32 wa1[kWTiles > 0 && !kFoldPerWord ? kWTiles : 1][4], wa2[kWTiles > 0 && !kFoldPerWord ? kWTiles : 1][4];
  u8* wbytes = reinterpret_cast<u8*>(wide);
  const u32* wmeta = reinterpret_cast<const u32*>(wbytes + kWideMeta);
  [[maybe_unused]] const float* dtab = reinterpret_cast<const float*>(wbytes + kWideDtab);
  [[maybe_unused]] const u8* wslot = wbytes + kWideSlot;
  WideLut lut{}, lut2{}, lut3{};  // Bh, Bk, Bl
  if constexpr (HI > 0) {
    const __half* wide_cb = reinterpret_cast<const __half*>(pg + Layout::kWideCb);
    const u8* wide_idx = pg + Layout::kWideIdx;
    u32* wm = reinterpret_cast<u32*>(wbytes + kWideMeta);
    if constexpr (OUTLIERS) {  // each channel's wide slot, for the outlier pass (0xff: not wide)
      for (int i = lane; i < D / 4; i += 32) reinterpret_cast<u32*>(wbytes + kWideSlot)[i] = 0xffffffffu;
      __syncwarp();
      for (int i = lane; i < HI; i += 32) wbytes[kWideSlot + (wide_idx[i] & (D - 1))] = (u8)i;
    }
    if (lane < 24) {  // entry lane & 7 of Bh (lanes 0..7), Bk (8..15), Bl (16..23)
      const float hk = __half2float(wide_cb[lane & 7]), dk = hk - sel4(kcb, lane & 3), bh = round_t(dk);
      const float dd = lane < 8 ? bh : round_t(lane < 16 ? hk : dk - bh);
      reinterpret_cast<u16*>(wbytes + kWideTab)[lane] = (u16)(pack2(dd, 0.f) & 0xffffu);
      if constexpr (OUTLIERS) reinterpret_cast<float*>(wbytes + kWideDtab)[lane] = dd;
    }
#pragma unroll
    for (int s0 = 0; s0 < 16 * kWTiles; s0 += 32) {
      const int i = s0 + lane;
      if (i < 16 * kWTiles) {
        const int ii = i < HI ? i : HI - 1;
        int w, p;
        kivi::packed_pos(D, wide_idx[ii] & (D - 1), w, p);
        wm[i] = (u32)w | ((u32)(2 * p) << 8) | ((u32)ii << 16);
      }
    }
    // the tables are read after a __syncwarp: here for the outlier pass, else just before the shuffles of
    // the K offsets below, so that the warp's collectives sit together (a compiler's fall-back path for a
    // diverged warp, see docs/performance.md, then replays no arithmetic between them)
    if constexpr (OUTLIERS) __syncwarp();
  }
  // K outliers: corr[r][t] = sum over channels d with kout_idx[d] = t of q[r,d] * (kout - k_hat),
  // k_hat = what the MMAs used for the element (a wide channel's: kcb plus its correction's table entry).
  if (OUTLIERS) {
    const __half* kout_val = reinterpret_cast<const __half*>(pg + Layout::kKoutVal);
    const u8* kout_idx = pg + Layout::kKoutIdx;
    for (int i = lane; i < kRows * P; i += 32) corr[i] = 0.f;
    __syncwarp();
KIVI_IN_PAGE_LOOP
    for (int pass = 0; pass < D / 32; ++pass) {
      const int d = pass * 32 + lane;
      const int t = kout_idx[d];
      const bool live = t < valid && (!EXACT || t != te);
      if (live) {
        const int code = k_code(kpl, t, d);
        float kh = sel4(kcb, code), hk = 0.f;  // hk: a wide channel's T(wide_cb[code]) (its second MMA)
        if constexpr (HI > 0) {
          const u32 sl = wslot[d];
          if (sl != 0xffu) {
            const u32* wpl = reinterpret_cast<const u32*>(pg + (HI > 0 ? Layout::kWidePlane : 0));
            const u32 c3 = code | (((wpl[sl * (P / 32) + t / 32] >> (t & 31)) & 1u) << 2);
            kh += dtab[c3] + dtab[16 + c3];
            hk = dtab[8 + c3];
          }
        }
        const float sc = __half2float(k_sc[d]);
        const float dv = __half2float(kout_val[d]) - __half2float(k_lo[d]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float qv = qs[r * D + d], wa = qv * sc, wb = round_t(wa);
          scratch[r * 32 + lane] = qv * dv - wb * kh - round_t(wa - wb) * hk;
        }
      }
      const u32 peers = __match_any_sync(0xffffffffu, live ? t : 256 + lane);
      __syncwarp();
      if (live && lane == __ffs(peers) - 1) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float sum = 0.f;
          for (u32 m = peers; m; m &= m - 1) sum += scratch[r * 32 + __ffs(m) - 1];
          corr[r * P + t] += sum;
        }
      }
      __syncwarp();
    }
  }

  // ---- the K offset folded into one scalar per row (and the exact token's score), times the softmax scale
  // (log2 domain): q . k_lo and q . exact_k as one m16n8k16 MMA per k-tile in fp16, the page's fp16 values as
  // they are (no conversion) and q from qh (fp16, exact: see kQhBytes), products exact, summed in fp32.
  // 16-row tiles: Q (A) times B = {k_lo, exact_k} as columns g even, g odd (n), so that lane 4g holds rows g,
  // g + 8 of both. 8-row tiles: A = {k_lo, exact_k} as rows g even, g odd (m) times Q^T (B), so that lanes j and
  // 4 + j hold rows 2j, 2j + 1 of k_lo and exact_k. (Columns / rows past the first two repeat them, unread.)
  float qlo_lo, qlo_hi, qex_lo, qex_hi;
  {
    const __half* ksrc = reinterpret_cast<const __half*>(pg + (EXACT && (g & 1) ? Layout::kExactK : Layout::kKLo));
    const float* qf = reinterpret_cast<const float*>(qh + kKTiles * 32 * kQhWords);
    float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int kt = 0; kt < kKTiles; ++kt) {
      // k = 2j, 2j + 1 are channels 16 kt + 4j, + 1 and k = 2j + 8, 2j + 9 channels 16 kt + 4j + 2, + 3 (the
      // MMA sums over k in any order; qh is made in the same order): one 8-byte load
      const uint2 kw = *reinterpret_cast<const uint2*>(ksrc + 16 * kt + 4 * j);
      if constexpr (ROWS16) {
        const uint4 q4 = *reinterpret_cast<const uint4*>(qh + (kt * 32 + lane) * 4);
        const u32 a[4] = {q4.x, q4.y, q4.z, q4.w};
        kivi::ptx::mma_m16n8k16_f16(c, a, kw.x, kw.y);
      } else {
        const uint2 q2 = *reinterpret_cast<const uint2*>(qh + (kt * 32 + lane) * 2);
        const u32 a[4] = {kw.x, kw.x, kw.y, kw.y};
        kivi::ptx::mma_m16n8k16_f16(c, a, q2.x, q2.y);
      }
    }
    if constexpr (HI > 0 && !OUTLIERS) __syncwarp();
    if constexpr (ROWS16) {
      const int src = lane & ~3;
      qlo_lo = __shfl_sync(0xffffffffu, c[0], src) * qf[g];
      qex_lo = __shfl_sync(0xffffffffu, c[1], src) * qf[g];
      qlo_hi = __shfl_sync(0xffffffffu, c[2], src) * qf[g + 8];
      qex_hi = __shfl_sync(0xffffffffu, c[3], src) * qf[g + 8];
    } else {
      qlo_lo = __shfl_sync(0xffffffffu, c[0], j) * qf[2 * j];
      qlo_hi = __shfl_sync(0xffffffffu, c[1], j) * qf[2 * j + 1];
      qex_lo = __shfl_sync(0xffffffffu, c[0], 4 + j) * qf[2 * j];
      qex_hi = __shfl_sync(0xffffffffu, c[1], 4 + j) * qf[2 * j + 1];
    }
  }
  if constexpr (HI > 0 && !kFoldPerWord) {
    // the correction's q side (kFoldPerWord: made per chunk and tile instead, to keep them live for one tile)
#pragma unroll
    for (int wt2 = 0; wt2 < kWTiles; ++wt2)
      wide_a(wa1[wt2], wa2[wt2], wt2, qs, f32 + kFKs, pg + Layout::kWideIdx, g, j);
    lut = wide_lut(reinterpret_cast<const u16*>(wbytes + kWideTab));
    lut2 = wide_lut(reinterpret_cast<const u16*>(wbytes + kWideTab) + 8);
    lut3 = wide_lut(reinterpret_cast<const u16*>(wbytes + kWideTab) + 16);
  }
  // ---- the per-channel K scale folded into q: the A fragments of Q.K^T (8-row tiles: their a0, a2 are
  // the B fragments of Q'^T). kFoldPerWord (16 rows at D = 256): made per chunk for the four k-tiles of
  // one code word at a time, so 16 registers are live instead of 4 * D / 16 (64, which spilled).
  u32 aq[kFoldPerWord ? 1 : kKTiles][4];
  if constexpr (!kFoldPerWord) {
#pragma unroll
    for (int kt = 0; kt < kKTiles; kt += 2)
      fold_q(aq[kt], aq[kt + 1], qfo, f32 + (kQFold ? kFKp : kFKs), kt / 4, kt % 4, g, j);
  }

  // the exact token's weight (exact_term; its value is added once per page, after the chunks), and whether
  // the page shows it
  float pex_lo = 0.f, pex_hi = 0.f;
  const bool ex_on = EXACT && te >= lo && te < valid;
KIVI_IN_PAGE_LOOP
  for (int ch = 0; ch < kChunks; ch += kGroup) {
    const int tb = 64 * ch;
    if (tb >= (kPair ? vmax : valid)) break;  // kPair: the pair's chunks (a warp past its own valid: all masked)
    // kFoldPerWord: the A fragments below are made from these, per chunk (not hoisted: opaque_zero)
    const int z = kFoldPerWord ? opaque_zero() : 0;
    const float* qsc = qs + z;
    const KsT* ksf = (kStage ? reinterpret_cast<const KsT*>(f32 + kFKs) : reinterpret_cast<const KsT*>(k_sc)) + z;
    [[maybe_unused]] const u8* wide_idx = HI > 0 ? pg + Layout::kWideIdx : nullptr;
    if constexpr (ROWS16) {
      // ---- S = q' . cb[K codes]^T for kGroup chunks of 64 tokens: 8 n-tiles of 8 tokens each.
      float s[kGroup][8][4];
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
        const int tbc = tb + 64 * c;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) s[c][nt][0] = s[c][nt][1] = s[c][nt][2] = s[c][nt][3] = 0.f;
        if constexpr (kFoldPerWord) {
#pragma unroll
          for (int w = 0; w < kKWords; ++w) {
            u32 aw[4][4];
#pragma unroll
            for (int e = 0; e < 4; e += 2) fold_q(aw[e], aw[e + 1], qsc, ksf, w, e, g, j);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
              mma_word(s[c][nt], kpl[(tbc + 8 * nt + g) * (D / 16) + j * kKWords + w], aw, kt01, kt23);
          }
        } else {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const Words<kKWords> x = load_words<kKWords>(kpl + (tbc + 8 * nt + g) * (D / 16) + j * kKWords);
#pragma unroll
            for (int w = 0; w < kKWords; ++w) mma_word(s[c][nt], x.w[w], aq + 4 * w, kt01, kt23);
          }
        }
        // ---- the wide channels' correction (HI > 0): three MMAs per n-tile and 16 wide channels, the q side
        // (w1, w2) as A (rows x slots) and the table entries as B (slots x tokens): the lane's token g of the
        // n-tile, slots 2j, 2j + 1 (b0) and 2j + 8, 2j + 9 (b1).
        if constexpr (HI > 0) {
          const int zw = kFoldPerWord ? opaque_zero() : 0;
          const u32* wm = wmeta + zw;
          // kFoldPerWord (register-bound): the LUTs made here, per chunk, not kept across the page
          const WideLut tb1 = kFoldPerWord ? wide_lut(reinterpret_cast<const u16*>(wbytes + kWideTab + zw)) : lut;
          const WideLut tb2 = kFoldPerWord ? wide_lut(reinterpret_cast<const u16*>(wbytes + kWideTab + zw) + 8) : lut2;
          const WideLut tb3 = kFoldPerWord ? wide_lut(reinterpret_cast<const u16*>(wbytes + kWideTab + zw) + 16) : lut3;
#pragma unroll
          for (int wt2 = 0; wt2 < kWTiles; ++wt2) {
            u32 w1[4], w2[4];
            if constexpr (kFoldPerWord) {
              wide_a(w1, w2, wt2, qsc, ksf, wide_idx, g, j);
            } else {
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                w1[q] = wa1[wt2][q];
                w2[q] = wa2[wt2][q];
              }
            }
            // a half tile (kHalfTile): b1 = 0, and the selector holds two n-tiles' codes
            const bool half = wt2 >= kHalfTile;
            WideSlot ws[4];
            u32 xh[4][2];  // token tb + 8 nt + g's top bit: bit 8 (nt % 4) of xh[slot][nt / 4]
            wide_slots(ws, xh, wm, pg, wt2, j, tbc, g);
            // The selectors' top bits (bit 2 of each nibble), made for four selectors at a time: rotating a slot's
            // word puts its bits for n-tiles 4h + q (bit 8q) at 4u + 2 + 8q - (the rotation's offset), so one word
            // holds the top bits of two selectors 16 bits apart (the lower one is read as it is: prmt reads bits
            // 0..15 of a selector). Full tile: top[h][q & 1] holds n-tiles 4h + q, q = 0, 1 and (>> 16) q + 2, all
            // four slots (nibble u: slot u). Half tile: top[h][0] holds n-tiles 4h, 4h + 1 and (>> 16) 4h + 2, 4h + 3,
            // slots 0, 1 (nibbles 0, 1: n-tile nt; 2, 3: nt + 1).
            u32 top[2][2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if (half) {
                top[h][0] =
                    (kivi::ptx::rotl(xh[0][h], 2u) & 0x04040404u) | (kivi::ptx::rotl(xh[1][h], 6u) & 0x40404040u);
                top[h][1] = 0u;
              } else {
#pragma unroll
                for (int par = 0; par < 2; ++par) {
                  u32 t = 0u;
#pragma unroll
                  for (int u = 0; u < 4; ++u)
                    t |= kivi::ptx::rotl(xh[u][h], (u32)(4 * u + 2 - 8 * par)) & (0x00040004u << (4 * u));
                  top[h][par] = t;
                }
              }
            }
#pragma unroll
            for (int nt = 0; nt < 8; nt += (half ? 2 : 1)) {
              const u32 tw = top[nt >> 2][half ? 0 : nt & 1];
              u32 sel = (nt & 2) ? tw >> 16 : tw;
#pragma unroll
              for (int u = 0; u < 4; ++u) {
                const int n = half ? nt + (u >> 1) : nt, us = half ? (u & 1) : u;
                const u32 kw = kpl[(tbc + 8 * n + g) * (D / 16) + ws[us].word];
                sel |= code_low(kw, half && u >= 2 ? ws[us].rot2 : ws[us].rot0, u);
              }
              u32 r0, r1, k0, k1, l0, l1;
              lut_codes(sel, tb1, r0, r1);
              lut_codes(sel, tb2, k0, k1);
              lut_codes(sel, tb3, l0, l1);
              if (half) {  // k = 8 slots: m16n8k8, A = {w[0], w[1]}
                const u32 h1[2] = {w1[0], w1[1]}, h2[2] = {w2[0], w2[1]};
                mma1688(s[c][nt], h1, r0);
                mma1688(s[c][nt], h1, l0);
                mma1688(s[c][nt], h2, k0);
                mma1688(s[c][nt + 1], h1, r1);
                mma1688(s[c][nt + 1], h1, l1);
                mma1688(s[c][nt + 1], h2, k1);
              } else {
                mma16816(s[c][nt], w1, r0, r1);
                mma16816(s[c][nt], w1, l0, l1);
                mma16816(s[c][nt], w2, k0, k1);
              }
            }
          }
        }
      }
      // ---- scores: offsets, outliers, exact token, scale, mask; chunk max.
      float mx_lo = -inf_f(), mx_hi = -inf_f();
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool hi = e >= 2;
            const int tok = tb + 64 * c + 8 * nt + 2 * j + (e & 1);
            const float v = score(s[c][nt][e], corr, g + (hi ? 8 : 0), tok, te, lo, valid);
            s[c][nt][e] = v;
            if (hi) mx_hi = fmaxf(mx_hi, v); else mx_lo = fmaxf(mx_lo, v);
          }
        }
      }
      mx_lo = row_max(mx_lo, qlo_lo, scale_log2);
      mx_hi = row_max(mx_hi, qlo_hi, scale_log2);
      const float qx_lo = ex_on && ch == 0 ? qex_lo : -inf_f(), qx_hi = ex_on && ch == 0 ? qex_hi : -inf_f();
      mx_lo = quad_max(fmaxf(mx_lo, qx_lo));
      mx_hi = quad_max(fmaxf(mx_hi, qx_hi));
      // kPair: the partner's chunk max and exact-token scores (the same lane holds the same rows there), so
      // that both warps keep one running max, and the partner's exact token can be weighted here
      float qp_lo = -inf_f(), qp_hi = -inf_f();
      [[maybe_unused]] u32* xme = xbuf + (threadIdx.x >> 5) * kXWords * 32 + lane;
      [[maybe_unused]] const u32* xpa = xbuf + ((threadIdx.x >> 5) ^ 1) * kXWords * 32 + lane;
      if constexpr (kPair) {
        xme[0] = __float_as_uint(mx_lo);
        xme[32] = __float_as_uint(mx_hi);
        xme[64] = __float_as_uint(qx_lo);
        xme[96] = __float_as_uint(qx_hi);
        __syncthreads();
        mx_lo = fmaxf(mx_lo, __uint_as_float(xpa[0]));
        mx_hi = fmaxf(mx_hi, __uint_as_float(xpa[32]));
        qp_lo = __uint_as_float(xpa[64]);
        qp_hi = __uint_as_float(xpa[96]);
      }
      float mu_lo, mu_hi;
      const float al_lo = rescale(st.m_lo, mx_lo, mu_lo), al_hi = rescale(st.m_hi, mx_hi, mu_hi);
      // ---- probabilities; v_lo term; the exact token's; P.V A fragments (p * v_scale).
      float ls_lo, ls_hi, pv_lo = 0.f, pv_hi = 0.f;
      exact_term(qx_lo, mu_lo, al_lo, j == 0, ls_lo, pex_lo);
      exact_term(qx_hi, mu_hi, al_hi, j == 0, ls_hi, pex_hi);
      const float off_lo = qlo_lo - mu_lo, off_hi = qlo_hi - mu_hi;
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int tok0 = tb + 64 * c + 8 * nt + 2 * j;  // even: v_lo, v_scale of tok0, tok0 + 1 as one float4
          const float4 vv = vlo_vsc(f32, pg, tok0);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool hi = e >= 2;
            s[c][nt][e] = prob(s[c][nt][e], scale_log2, hi ? off_hi : off_lo, (e & 1) ? vv.z : vv.x,
                               (e & 1) ? vv.w : vv.y, hi ? ls_hi : ls_lo, hi ? pv_hi : pv_lo);
          }
        }
      }
      accumulate(st, al_lo, al_hi, ls_lo, ls_hi, pv_lo, pv_hi);
#pragma unroll
      for (int ot = 0; ot < kOTiles; ++ot) {
        st.o[ot][0] *= al_lo;
        st.o[ot][1] *= al_lo;
        st.o[ot][2] *= al_hi;
        st.o[ot][3] *= al_hi;
      }
      // kPair: both pages' exact tokens (weights 2^(qx - mu), zero where a page masks it) on the warp's half
      // of the channels, in fp32, once per page (in the first chunk: O's later rescales apply to them too)
      if constexpr (kPair && EXACT) {
        if (ch == 0) {
          const float e_lo = kivi::ptx::ex2(qx_lo - mu_lo), e_hi = kivi::ptx::ex2(qx_hi - mu_hi);
          const float f_lo = kivi::ptx::ex2(qp_lo - mu_lo), f_hi = kivi::ptx::ex2(qp_hi - mu_hi);
          const int d0 = (threadIdx.x >> 5 & 1) * (D / 2);
#pragma unroll
          for (int ct = 0; ct < kOTiles; ++ct) {
            const float2 a = exact_v2(pg, xr, d0 + 8 * ct + 2 * j), b = exact_v2(pg_p, xr_p, d0 + 8 * ct + 2 * j);
            st.o[ct][0] += e_lo * a.x + f_lo * b.x;
            st.o[ct][1] += e_lo * a.y + f_lo * b.y;
            st.o[ct][2] += e_hi * a.x + f_hi * b.x;
            st.o[ct][3] += e_hi * a.y + f_hi * b.y;
          }
        }
      }
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
        // P's A fragments in dequant2's pairing: MMA e takes the tokens 16 kt + f (f: element e's
        // column; kt = 0, 1 in a0/a1, 2, 3 in a2/a3), i.e. n-tile 2 kt + (e >> 1), element e & 1.
        u32 pa[4][4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = e >> 1, k0 = e & 1;
          pa[e][0] = pack2v(s[c][n][k0], s[c][2 + n][k0]);
          pa[e][1] = pack2v(s[c][n][2 + k0], s[c][2 + n][2 + k0]);
          pa[e][2] = pack2v(s[c][4 + n][k0], s[c][6 + n][k0]);
          pa[e][3] = pack2v(s[c][4 + n][2 + k0], s[c][6 + n][2 + k0]);
        }
        // kPair: the partner's fragments (its page's P, same lane layout)
        u32 pp[kPair ? 4 : 1][4];
        if constexpr (kPair) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int k = 0; k < 4; ++k) xme[(4 + 4 * e + k) * 32] = pa[e][k];
          __syncthreads();
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int k = 0; k < 4; ++k) pp[e][k] = xpa[(4 + 4 * e + k) * 32];
        }
        // ---- O += p' . cb[V codes]: channel tile ct, lane's channel 8 ct + g, tokens of this chunk (kPair: the
        // warp's channel tiles kOTiles (warp & 1) + ot, for its own page and its partner's, each with its codebook).
#pragma unroll
        for (int ot = 0; ot < kOTiles; ++ot) {
          const int ct = kPair ? kOTiles * (threadIdx.x >> 5 & 1) + ot : ot;
          mma_word<true>(st.o[ot], vpl[(8 * ct + g) * (P / 16) + j * kChunks + ch + c], pa, vt01, vt23);
          if constexpr (kPair) mma_word<true>(st.o[ot], vpl_p[(8 * ct + g) * (P / 16) + j * kChunks + ch + c], pp, vp01, vp23);
        }
      }
    } else {
      // ---- 8-row tiles: S^T = cb[K codes] . q'^T for 64 tokens, 4 m-tiles of 16 tokens (st_token:
      // the lane's tokens are t0 = tb + st_token(e, g) and t0 + 32) x the 8 query rows (n), so no MMA
      // row is a padding row. C fragment: tokens t0 (0, 1), t0 + 32 (2, 3) x rows 2j (0, 2), 2j + 1 (1, 3).
      // kGroup chunks (the whole page where registers allow) share one max, one rescale of O
      // and one exact-token term: their scores are all made before the softmax.
      static_assert(ROWS16 || !kFoldPerWord, "8-row tiles make the fragments once per page");
      const int tg = st_token(0, g);  // st_token(e, g) = tg + the column f of fragment element e
      float s[kGroup][4][4];
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
        const int tbc = tb + 64 * c;
#pragma unroll
        for (int e = 0; e < 4; ++e) s[c][e][0] = s[c][e][1] = s[c][e][2] = s[c][e][3] = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const u32* row = kpl + (tbc + st_token(e, g)) * (D / 16) + j * kKWords;
          const Words<kKWords> xa = load_words<kKWords>(row), xb = load_words<kKWords>(row + 32 * (D / 16));
#pragma unroll
          for (int w = 0; w < kKWords; ++w) qk_word8(s[c][e], xa.w[w], xb.w[w], aq + 4 * w, kt01, kt23);
        }
        // ---- the wide channels' correction (HI > 0): three MMAs per m-tile and 16 wide channels, with the
        // table entries as A (tokens x wide slots: the lane's tokens t0 (a0, a2) and t0 + 32 (a1, a3), slots
        // 2j, 2j + 1 (a0, a1) and 2j + 8, 2j + 9 (a2, a3)) and w1 / w2 [0], [2] as B (slots x rows).
        if constexpr (HI > 0) {
          const u32* kpl_t = kpl + tg * (D / 16);  // token tg of each 8 x 8 block: t0 = tb + f + 32 h from there
#pragma unroll
          for (int wt2 = 0; wt2 < kWTiles; ++wt2) {
            // a half tile (kHalfTile): a2 = a3 = 0, and the selector holds both tokens' codes (t0, t0 + 32)
            const bool half = wt2 >= kHalfTile;
            WideSlot ws[4];
            u32 xh[4][2];  // token t0 + 32 h's top bit: bit f of xh[slot][h]
            wide_slots(ws, xh, wmeta, pg, wt2, j, tbc, tg);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int f = st_token(e, 0);  // t0 = tb + tg + f
              u32 a[4], k[4], l[4];
              if (!half) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  u32 sel = 0u;
#pragma unroll
                  for (int u = 0; u < 4; ++u)
                    sel |= code_nibble(kpl_t[(tbc + f + 32 * h) * (D / 16) + ws[u].word], ws[u].rot0, xh[u][h], f, u);
                  lut_codes(sel, lut, a[h], a[2 + h]);
                  lut_codes(sel, lut2, k[h], k[2 + h]);
                  lut_codes(sel, lut3, l[h], l[2 + h]);
                }
              } else {
                u32 sel = 0u;
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                  const int h = u >> 1, us = u & 1;
                  sel |= code_nibble(kpl_t[(tbc + f + 32 * h) * (D / 16) + ws[us].word], h ? ws[us].rot2 : ws[us].rot0,
                                     xh[us][h], f, u);
                }
                // k = 8 slots: m16n8k8, A = {a0, a1}, B = {b0}
                u32 ah[2], kh[2], lh[2];
                lut_codes(sel, lut, ah[0], ah[1]);
                lut_codes(sel, lut2, kh[0], kh[1]);
                lut_codes(sel, lut3, lh[0], lh[1]);
                mma1688(s[c][e], ah, wa1[wt2][0]);
                mma1688(s[c][e], lh, wa1[wt2][0]);
                mma1688(s[c][e], kh, wa2[wt2][0]);
                continue;
              }
              mma16816(s[c][e], a, wa1[wt2][0], wa1[wt2][2]);
              mma16816(s[c][e], l, wa1[wt2][0], wa1[wt2][2]);
              mma16816(s[c][e], k, wa2[wt2][0], wa2[wt2][2]);
            }
          }
        }
      }
      // ---- scores (rows 2j: elements 0, 2; 2j + 1: 1, 3); the group's max over the 8 lanes of each j.
      float mx_lo = -inf_f(), mx_hi = -inf_f();
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const bool hi = x & 1;
            const int tok = tb + 64 * c + st_token(e, g) + 32 * (x >> 1);
            const float v = score(s[c][e][x], corr, 2 * j + (x & 1), tok, te, lo, valid);
            s[c][e][x] = v;
            if (hi) mx_hi = fmaxf(mx_hi, v); else mx_lo = fmaxf(mx_lo, v);
          }
        }
      }
      const float qx_lo = ex_on && ch == 0 ? qex_lo : -inf_f(), qx_hi = ex_on && ch == 0 ? qex_hi : -inf_f();
      mx_lo = fmaxf(row_max(mx_lo, qlo_lo, scale_log2), qx_lo);
      mx_hi = fmaxf(row_max(mx_hi, qlo_hi, scale_log2), qx_hi);
      float mu_lo, mu_hi;
      const float al_lo = rescale(st.m_lo, group_max(mx_lo), mu_lo), al_hi = rescale(st.m_hi, group_max(mx_hi), mu_hi);
      // ---- probabilities; v_lo term; the exact token's; P^T's B fragments (p * v_scale).
      float ls_lo, ls_hi, pv_lo = 0.f, pv_hi = 0.f;
      exact_term(qx_lo, mu_lo, al_lo, g == 0, ls_lo, pex_lo);
      exact_term(qx_hi, mu_hi, al_hi, g == 0, ls_hi, pex_hi);
      const float off_lo = qlo_lo - mu_lo, off_hi = qlo_hi - mu_hi;
      u32 pb[kGroup][4][2];
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // the lane's tokens of m-tiles e, e + 1 are adjacent (st_token: columns f, f + 1, f even):
            // their v_lo, v_scale as one half2 each
            const int tok = tb + 64 * c + st_token(e, g) + 32 * h;
            const float4 vv = vlo_vsc(f32, pg, tok);
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              const float vl = u ? vv.z : vv.x, vs = u ? vv.w : vv.y;
              const float p0 = prob(s[c][e + u][2 * h], scale_log2, off_lo, vl, vs, ls_lo, pv_lo);
              const float p1 = prob(s[c][e + u][2 * h + 1], scale_log2, off_hi, vl, vs, ls_hi, pv_hi);
              pb[c][e + u][h] = pack2v(p0, p1);
            }
          }
        }
      }
      // rows 2j, 2j + 1 of a token, transposed: the lane gets row g at the tokens of rows 2j, 2j + 1 of
      // each 8 x 8 block, which st_token made P.V's pairing (see dequant2). All after the probabilities,
      // so that the collectives sit together.
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pb[c][e][0] = kivi::ptx::movmatrix_trans(pb[c][e][0]);
          pb[c][e][1] = kivi::ptx::movmatrix_trans(pb[c][e][1]);
        }
      }
      accumulate(st, al_lo, al_hi, ls_lo, ls_hi, pv_lo, pv_hi);
#pragma unroll
      for (int ot = 0; ot < kOTiles; ++ot) {
        st.o[ot][0] *= al_lo;
        st.o[ot][1] *= al_hi;
        st.o[ot][2] *= al_lo;
        st.o[ot][3] *= al_hi;
      }
      // ---- O^T += cb[V codes]^T . p'^T: channel tile mt (channels 16 mt + g and 16 mt + 8 + g).
#pragma unroll
      for (int c = 0; c < kGroup; ++c) {
#pragma unroll
        for (int mt = 0; mt < kOTiles; ++mt) {
          const u32 x0 = vpl[(16 * mt + g) * (P / 16) + j * kChunks + ch + c];
          const u32 x1 = vpl[(16 * mt + 8 + g) * (P / 16) + j * kChunks + ch + c];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            u32 a[4];
            dequant2(x0, e, vt01, vt23, a[0], a[2]);
            dequant2(x1, e, vt01, vt23, a[1], a[3]);
            mma_v(st.o[mt], a, pb[c][e][0], pb[c][e][1]);
          }
        }
      }
    }
  }
  // ---- the exact token's value, in fp32, once per page (its weight pex: zero if the page masked it).
  if constexpr (EXACT && !kPair) {  // (kPair: in the first chunk)
    const float pe_lo = pex_lo, pe_hi = pex_hi;
    if constexpr (kExactMma) {
      // O += pe (rows) x ev (channels) as one m16n8k8 per channel tile, both sides split in two: k = 0, 1 hold
      // T(pe) (A, lanes j = 0) times ev's two parts (B: stage_f32's word of channel 8 ct + g, in every lane),
      // k = 2, 3 the rest T(pe - T(pe)) (lanes j = 1); k >= 4 is 0 in A. So pe * ev to ~16 bits of pe (bf16)
      // and every bit of ev, summed in fp32 — instead of 4 FFMA per channel tile and lane.
      const float2 h = unpack2(pack2(pe_lo, pe_hi));  // T(pe) of rows g, g + 8
      const float x_lo = j == 0 ? h.x : (j == 1 ? pe_lo - h.x : 0.f), x_hi = j == 0 ? h.y : (j == 1 ? pe_hi - h.y : 0.f);
      const u32 a[2] = {pack2(x_lo, x_lo), pack2(x_hi, x_hi)};
      const u32* evw = reinterpret_cast<const u32*>(f32 + kFEv);
#pragma unroll
      for (int ct = 0; ct < kCTiles; ++ct) mma1688(st.o[ct], a, evw[8 * ct + g]);
    } else if constexpr (ROWS16) {
#pragma unroll
      for (int ct = 0; ct < kCTiles; ++ct) {
        const float2 e2 = exact_f2(f32, xr, 8 * ct + 2 * j);
        st.o[ct][0] += pe_lo * e2.x;
        st.o[ct][1] += pe_lo * e2.y;
        st.o[ct][2] += pe_hi * e2.x;
        st.o[ct][3] += pe_hi * e2.y;
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < kOTiles; ++mt) {
        const float ea = exact_f1(f32, xr, 16 * mt + g), eb = exact_f1(f32, xr, 16 * mt + 8 + g);
        st.o[mt][0] += pe_lo * ea;
        st.o[mt][1] += pe_hi * ea;
        st.o[mt][2] += pe_lo * eb;
        st.o[mt][3] += pe_hi * eb;
      }
    }
  }
}

// KIVI_V_ROTATE: page.hadamard of rows 0 .. rows - 1 of x ([rows][D] fp32, shared memory) by the CTA,
// one barrier per stage (the caller scales by c * s).
__device__ __forceinline__ void unrotate_rows(float* x, int rows) {
  __syncthreads();
  for (int h = 1; h < D; h <<= 1) {
    for (int i = threadIdx.x; i < rows * (D / 2); i += kThreads) {
      const int q = i % (D / 2), a = (i / (D / 2)) * D + (q / h) * 2 * h + q % h;
      const float u = x[a], v = x[a + h];
      x[a] = u + v;
      x[a + h] = u - v;
    }
    __syncthreads();
  }
}

// Write one CTA's partial result for `rows` query heads: part_o = O / l, part_lse = m + log2(l).
__device__ __forceinline__ void write_partial(float* part_o, float* part_lse, size_t row0, int ns, int r, int d,
                                              float o, float m, float l) {
  const size_t idx = (row0 + (size_t)r * ns);
  const bool empty = !(l > 0.f) || m == -inf_f();
  part_o[idx * D + d] = empty ? 0.f : o / l;
  if (d == 0) part_lse[idx] = empty ? -inf_f() : m + log2f(l);
}

// The staging tail and the new token, in fp32 (at most P tokens): the CTA's partial num_splits.
// Everything is derived again from the launch, so the page loop keeps none of it live.
__device__ __forceinline__ void attend_tail(u8* smem, const T* __restrict__ key, const T* __restrict__ value,
                                            const T* __restrict__ staging, const int* __restrict__ seq_lens,
                                            const int* __restrict__ query_start_loc, const int* __restrict__ tail_slots,
                                            float* __restrict__ part_o, float* __restrict__ part_lse, int num_splits,
                                            int num_kv_heads, int group, int m_tiles, float scale_log2, int window) {
  const float* qs = reinterpret_cast<const float*>(smem);
  u8* work = smem + kQBytes;
  const int b = blockIdx.z, h = blockIdx.y / m_tiles, m0 = (blockIdx.y % m_tiles) * kRows;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rows = min(kRows, group - m0), num_q_heads = num_kv_heads * group, ns = num_splits + 1;
  const int seq_len = seq_lens[b], ctx = seq_len - 1, qrow = query_start_loc[b];
  const int n_pages = ctx > 0 ? (ctx + P - 1) / P : 0;
  const int tail_slot = tail_slots[b];
  const bool staged = tail_slot >= 0 && n_pages * P > seq_len;
  const int w_first = window > 0 ? max(0, seq_len - window) : 0;
  const size_t row_t = ((size_t)b * num_q_heads + h * group + m0) * ns + num_splits;
  const int tail0 = staged ? (n_pages - 1) * P : ctx;
  const int n_tail = ctx - tail0 > 0 ? ctx - tail0 : 0;
  const int n = n_tail + (seq_len > 0 ? 1 : 0);
  float* sc = reinterpret_cast<float*>(work);  // [kRows][P + 1]
  float* row_m = sc + kRows * (P + 1);
  float* row_l = row_m + kRows;
  // Staged rows (kivi_serve/quant/staging.py): KIVI_STAGING 0: D values of T; 1: D int8 codes and
  // the row's fp32 scale, read as T(code * scale).
  constexpr size_t kRowBytes = KIVI_STAGING ? D + 4 : D * sizeof(T);
  const size_t hstride = (size_t)P * kRowBytes;
  const u8* k_slot = staged ? reinterpret_cast<const u8*>(staging) + ((size_t)tail_slot * 2 * num_kv_heads + h) * hstride : nullptr;
  const u8* v_slot = staged ? k_slot + (size_t)num_kv_heads * hstride : nullptr;
  const T* k_new = key + ((size_t)qrow * num_kv_heads + h) * D;
  const T* v_new = value + ((size_t)qrow * num_kv_heads + h) * D;
  auto row_at = [&](const u8* slot, const T* fresh, int t, int d) -> float {
    if (t >= n_tail) return to_f32(fresh[d]);
    const u8* row = slot + (size_t)t * kRowBytes;
    if (!KIVI_STAGING) return to_f32(reinterpret_cast<const T*>(row)[d]);
    return to_f32(from_f32(__fmul_rn((float)(signed char)row[d], *reinterpret_cast<const float*>(row + D))));
  };
  constexpr int E = D / 32;  // channels per lane
  // (unrolled: a warp's next tokens' loads are in flight while it reduces this one's scores; the tail
  // was latency-bound: ~30 us for 64 staged tokens on an H200, docs/performance.md, ninth session)
#pragma unroll 4
  for (int i = warp; i < n; i += kWarps) {
    float kv[E];
#pragma unroll
    for (int c = 0; c < E; ++c) kv[c] = row_at(k_slot, k_new, i, lane * E + c);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float part = 0.f;
#pragma unroll
      for (int c = 0; c < E; ++c) part += qs[r * D + lane * E + c] * kv[c];
      for (int o = 16; o; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (lane == 0) sc[r * (P + 1) + i] = i < n_tail && tail0 + i < w_first ? -inf_f() : part * scale_log2;
    }
  }
  __syncthreads();
  for (int r = warp; r < kRows; r += kWarps) {
    float mx = -inf_f();
    for (int i = lane; i < n; i += 32) mx = fmaxf(mx, sc[r * (P + 1) + i]);
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int i = lane; i < n; i += 32) {
      const float p = exp2f(sc[r * (P + 1) + i] - mx);
      sc[r * (P + 1) + i] = p;
      sum += p;
    }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) { row_m[r] = n > 0 ? mx : -inf_f(); row_l[r] = sum; }
  }
  __syncthreads();
  // P.V: a thread owns one channel of kRowGroups-strided rows, so each value element is loaded once (not
  // once per row) and the unrolled token loop keeps several loads in flight. Same sums, same order (token
  // 0 first) as one thread per (row, channel).
  // At most 8 accumulators a thread (16 spilled in the 16-row tile at D = 128, P = 128): rows in chunks.
  constexpr int kRowGroups = kThreads >= D ? kThreads / D : 1;
  constexpr int kRowsPerThread = (kRows + kRowGroups - 1) / kRowGroups;
  constexpr int kChunk = kRowsPerThread < 8 ? kRowsPerThread : 8;
  for (int i = tid; i < kRowGroups * D; i += kThreads) {
    const int d = i % D, rg = i / D;
#pragma unroll 1
    for (int k0 = 0; k0 < kRowsPerThread; k0 += kChunk) {
      float acc[kChunk];
#pragma unroll
      for (int k = 0; k < kChunk; ++k) acc[k] = 0.f;
#pragma unroll 4
      for (int t = 0; t < n; ++t) {
        const float v = row_at(v_slot, v_new, t, d);
#pragma unroll
        for (int k = 0; k < kChunk; ++k) {
          const int r = rg + (k0 + k) * kRowGroups;
          if (r < kRows) acc[k] += sc[r * (P + 1) + t] * v;
        }
      }
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const int r = rg + (k0 + k) * kRowGroups;
        if (r < rows) write_partial(part_o, part_lse, row_t, ns, r, d, acc[k], row_m[r], row_l[r]);
      }
    }
  }
}


}  // namespace

// ================================================================================== kernels
//   query [T, Hq, D] (row query_start_loc[b] is sequence b's token; a sequence whose
//   query_start_loc[b + 1] - query_start_loc[b] is not 1 is skipped) · key, value [T, Hkv, D]
//   pages [NB, Hkv, page_bytes] · staging [S, 2, Hkv, P, D] · block_tables [B, bt_stride] int32
//   seq_lens, tail_slots [B] · query_start_loc [B + 1] · part_o [B, Hq, NS, D] · part_lse [B, Hq, NS]
//   with NS = num_splits + 1 and Hq = num_kv_heads * group; scale_log2 = softmax scale * log2(e).
extern "C" __global__ void __launch_bounds__(kThreads, kMinCtas) kivi_decode(
    const T* __restrict__ query, const T* __restrict__ key, const T* __restrict__ value,
    const u8* __restrict__ pages, const T* __restrict__ staging, const int* __restrict__ block_tables,
    int bt_stride, const int* __restrict__ seq_lens, const int* __restrict__ query_start_loc,
    const int* __restrict__ tail_slots, float* __restrict__ part_o, float* __restrict__ part_lse,
    int num_splits, int min_split_pages, int num_kv_heads, int group, int m_tiles, float scale_log2,
    int window) {
  extern __shared__ __align__(16) u8 smem[];
  if (dynamic_smem_size() < (u32)kSmemBytes) __trap();
  const int b = blockIdx.z;
  // A row whose length is not 1 (CUDA-graph padding repeats the last query_start_loc value) has no
  // token to attend for, and its query_start_loc[b] is another row's: leave every output alone.
  if (query_start_loc[b + 1] - query_start_loc[b] != 1) return;
  float* qs = reinterpret_cast<float*>(smem);
  u8* work = smem + kQBytes;
  float* corr_all = reinterpret_cast<float*>(smem + kQBytes + kWorkBytes);
  float* scratch_all = reinterpret_cast<float*>(smem + kQBytes + kWorkBytes + kCorrBytes);
  float* wide_all = reinterpret_cast<float*>(smem + kQBytes + kWorkBytes + kCorrBytes + kScratchBytes);
  u32* xbuf = reinterpret_cast<u32*>(smem + kQBytes + kWorkBytes + kCorrBytes + kScratchBytes + kWideBytes);
  float* xrot = reinterpret_cast<float*>(smem + kQBytes + kWorkBytes + kCorrBytes + kScratchBytes + kWideBytes + kXBytes);
  u32* qh = reinterpret_cast<u32*>(smem + kQBytes + kWorkBytes + kCorrBytes + kScratchBytes + kWideBytes + kXBytes + kRotBytes);
  float* f32_all = reinterpret_cast<float*>(reinterpret_cast<u8*>(qh) + kQhBytes);
  float* qfo = f32_all + kWarps * kF32Words;

  const int split = blockIdx.x, h = blockIdx.y / m_tiles, mt = blockIdx.y % m_tiles;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = mt * kRows, rows = min(kRows, group - m0);
  const int hq0 = h * group + m0, num_q_heads = num_kv_heads * group, ns = num_splits + 1;
  const int seq_len = seq_lens[b], ctx = seq_len - 1, qrow = query_start_loc[b];
  const int n_pages = ctx > 0 ? (ctx + P - 1) / P : 0;
  const int tail_slot = tail_slots[b];
  const bool staged = tail_slot >= 0 && n_pages * P > seq_len;
  const int n_quant = n_pages - (staged ? 1 : 0);
  // Sliding window (window > 0): the query at position ctx sees keys w_first .. ctx; the pages wholly
  // before `w_first` are never read (vLLM may have freed them: null block ids).
  const int w_first = window > 0 ? max(0, seq_len - window) : 0;
  const int p_first = min(w_first / P, n_quant);
  const size_t row0 = ((size_t)b * num_q_heads + hq0) * ns + split;  // partial row of head hq0

  for (int i = tid; i < kRows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    qs[i] = r < rows && seq_len > 0 ? to_f32(query[((size_t)qrow * num_q_heads + hq0 + r) * D + d]) : 0.f;
  }
  __syncthreads();
  // the K offset MMA's q side (kQhBytes): row r scaled by 2^-e_r, e_r = 0 for an fp16 query (already exact in
  // fp16), else such that the row's largest |q| is below 2^15 (a bf16 value in range is then exact in fp16)
  {
    float* qf = reinterpret_cast<float*>(qh + kKTiles * 32 * kQhWords);
    for (int r = warp; r < kRows; r += kWarps) {
      float m = 0.f;
      for (int d = lane; d < D; d += 32) m = fmaxf(m, fabsf(qs[r * D + d]));
#pragma unroll
      for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      int e = KIVI_DTYPE == 1 && m > 0.f ? (int)((__float_as_uint(m) >> 23) & 0xffu) - 127 - 14 : 0;
      e = e < -100 ? -100 : (e > 100 ? 100 : e);
      if (lane == 0) {
        qf[r] = scale_log2 * __uint_as_float((u32)(127 + e) << 23);
        qf[kRows + r] = __uint_as_float((u32)(127 - e) << 23);
      }
    }
    __syncthreads();
    for (int i = tid; i < kKTiles * 32 * kQhWords; i += kThreads) {
      const int w = i % kQhWords, l = (i / kQhWords) % 32, kt = i / (kQhWords * 32), g = l >> 2, j = l & 3;
      // 16 rows: a0 (row g, channels 4j, 4j + 1), a1 (row g + 8), a2 (row g, channels 4j + 2, + 3), a3 (row
      // g + 8); 8 rows: b0 (row g, channels 4j, 4j + 1), b1 (channels 4j + 2, + 3) — of k-tile kt (attend_page's
      // order of the channels over k)
      const int r = ROWS16 ? g + 8 * (w & 1) : g, c = 16 * kt + 4 * j + 2 * (ROWS16 ? w >> 1 : w);
      const float sc = qf[kRows + r];
      qh[i] = pack2_f16(qs[r * D + c] * sc, qs[r * D + c + 1] * sc);
    }
    if constexpr (kQFold) {  // q in fold order (fold_q)
      for (int i = tid; i < kRows * D / 2; i += kThreads) {
        const int r = i / (D / 2), pi = i % (D / 2);
        *reinterpret_cast<float2*>(qfo + r * D + 2 * fold_pair(pi)) = *reinterpret_cast<const float2*>(qs + r * D + 2 * pi);
      }
    }
    __syncthreads();
  }

  // ================= quantized pages: an even share of this sequence's pages, round-robin over warps.
  // The sequence uses eff <= num_splits splits, each with at least min_split_pages pages when it has
  // that many (the wrapper passes warps x KIVI_STAGES: every warp's cp.async ring then has pages to
  // overlap). Decided here from the sequence's own length, so a CUDA graph's fixed grid adapts at
  // replay; the splits past eff report an empty partial (-inf), which the combine skips.
  const int n_seen = n_quant - p_first;  // quantized pages the window reaches
  const int eff = max(1, min(num_splits, n_seen / max(1, min_split_pages)));
  // The staging tail and the new token (partial num_splits) go to one of these CTAs — one without
  // pages if there is one, else the last — rather than to a CTA of their own that would hold the
  // pages' shared memory for ~P tokens of work.
  const int tail_cta = min(eff, num_splits - 1);
  if (split >= eff) {
    for (int i = tid; i < rows * D; i += kThreads)
      write_partial(part_o, part_lse, row0, ns, i / D, i % D, 0.f, -inf_f(), 0.f);
    if (split == tail_cta)
      attend_tail(smem, key, value, staging, seq_lens, query_start_loc, tail_slots, part_o, part_lse, num_splits,
                  num_kv_heads, group, m_tiles, scale_log2, window);
    return;
  }
  const int per_cta = (n_seen + eff - 1) / eff;
  const int p_begin = p_first + split * per_cta, p_end = min(n_quant, p_begin + per_cta);
  const int* bt = block_tables + (size_t)b * bt_stride;
  u8* ring = work + warp * kStages * kCopyBytes;
  float* corr = corr_all + warp * kRows * P;
  float* scratch = scratch_all + warp * kRows * 32;
  float* wide = wide_all + warp * (kWideBytes / kWarps / 4);
  const int first = p_begin + warp;
  const int n_mine = first < p_end ? (p_end - first + kWarps - 1) / kWarps : 0;
  // kPair: both warps run warp 0's count of pages (warp 1 has as many or one fewer: then it takes warp 0's
  // page with nothing valid), with a barrier before each page (the partner's copy is read) and after it
  // (the partner's ring slot is refilled next)
  const int n_iter = kPair ? (p_begin < p_end ? (p_end - p_begin + 1) / 2 : 0) : n_mine;

  State st;
#pragma unroll
  for (int ot = 0; ot < kOTiles; ++ot) st.o[ot][0] = st.o[ot][1] = st.o[ot][2] = st.o[ot][3] = 0.f;
  st.m_lo = st.m_hi = -inf_f();
  st.l_lo = st.l_hi = st.pl_lo = st.pl_hi = 0.f;

  auto issue = [&](int i) {
    if (i < n_mine) {
      const int pi = first + i * kWarps;
      // the lane's first 16 bytes; then constant offsets, which the copies take as immediates (no 64-bit
      // address arithmetic per copy)
      const u8* src = pages + ((size_t)bt[pi] * num_kv_heads + h) * Layout::kPageBytes + lane * 16;
      u8* dst = ring + (i % kStages) * kCopyBytes + lane * 16;
#pragma unroll
      for (int k = 0; k < kCopyIters; ++k) {
        if (lane * 16 + k * 32 * 16 < kCopyBytes) cp_async16(dst + k * 32 * 16, src + k * 32 * 16);
      }
    }
    cp_async_commit();  // always: keeps the group count uniform
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
#pragma unroll 1
  for (int i = 0; i < n_iter; ++i) {
    issue(i + kStages - 1);
    cp_async_wait<kStages - 1>();
    if (kPair) __syncthreads(); else __syncwarp();
    const int pi = first + i * kWarps;
    const bool mine = !kPair || i < n_mine;
    const int valid = mine ? min(P, ctx - pi * P) : 0, lo = mine ? max(0, w_first - pi * P) : 0;
    u8* slot = ring + (i % kStages) * kCopyBytes;
    u8* slot_p = kPair ? work + (warp ^ 1) * kStages * kCopyBytes + (i % kStages) * kCopyBytes : slot;
    const int pp = pi + (warp & 1 ? -1 : 1);  // kPair: the partner's page
    const int valid_p = kPair && pp < p_end ? min(P, ctx - pp * P) : 0;
    attend_page(st, mine ? slot : slot_p, lo, valid, qs, corr, scratch, wide, scale_log2, valid_p > 0 ? slot_p : slot,
                max(valid, valid_p), xbuf, xrot, qh, f32_all + warp * kF32Words, kQFold ? qfo : qs);
    if (kPair) __syncthreads(); else __syncwarp();
  }
  cp_async_wait<0>();

  // ---- merge the warps: O (+ the v_lo term), m, l per row, through shared memory.
  // (16-row tiles: row sums over the lanes of a quad; 8-row tiles: over the 8 lanes of each j)
  st.l_lo = ROWS16 ? quad_sum(st.l_lo) : group_sum(st.l_lo);
  st.pl_lo = ROWS16 ? quad_sum(st.pl_lo) : group_sum(st.pl_lo);
  st.l_hi = ROWS16 ? quad_sum(st.l_hi) : group_sum(st.l_hi);
  st.pl_hi = ROWS16 ? quad_sum(st.pl_hi) : group_sum(st.pl_hi);
  __syncthreads();  // every warp is done with the ring
  float* mo = reinterpret_cast<float*>(work);        // [kWarps][kRows][D]
  float* mm = mo + kWarps * kRows * D;                // [kWarps][kRows]
  float* ml = mm + kWarps * kRows;                    // [kWarps][kRows]
  float* mp = ml + kWarps * kRows;                    // kPair: [kWarps][kRows], each warp's v_lo term
  {
    const int g = lane >> 2, j = lane & 3;
    if constexpr (ROWS16) {
      // kPair: the pair's O in warp 0's rows (each warp its half of the channels, without the v_lo term: the
      // pair's is the sum of both warps', added in the merge), m alike in both warps, l and the v_lo term per warp
      const int wo = kPair ? 0 : warp, d0 = kPair ? warp * (D / 2) : 0;
      const float pl_lo = kPair ? 0.f : st.pl_lo, pl_hi = kPair ? 0.f : st.pl_hi;
#pragma unroll
      for (int ct = 0; ct < kOTiles; ++ct) {
        const int d = d0 + 8 * ct + 2 * j;
        mo[(wo * kRows + g) * D + d] = st.o[ct][0] + pl_lo;
        mo[(wo * kRows + g) * D + d + 1] = st.o[ct][1] + pl_lo;
        mo[(wo * kRows + g + 8) * D + d] = st.o[ct][2] + pl_hi;
        mo[(wo * kRows + g + 8) * D + d + 1] = st.o[ct][3] + pl_hi;
      }
      if (kPair && j == 0) {
        mp[warp * kRows + g] = st.pl_lo;
        mp[warp * kRows + g + 8] = st.pl_hi;
      }
    } else {  // O^T fragments: rows 2j (lo), 2j + 1 (hi) x channels 16 mt + g, + 8
      float* r0 = mo + (warp * kRows + 2 * j) * D;
#pragma unroll
      for (int mt = 0; mt < kOTiles; ++mt) {
        const int d = 16 * mt + g;
        r0[d] = st.o[mt][0] + st.pl_lo;
        r0[D + d] = st.o[mt][1] + st.pl_hi;
        r0[d + 8] = st.o[mt][2] + st.pl_lo;
        r0[D + d + 8] = st.o[mt][3] + st.pl_hi;
      }
    }
    // the row of the lane's lo and hi state: g, g + 8 (16 rows; written by j == 0), 2j, 2j + 1 (8 rows; g == 0)
    if (ROWS16 ? j == 0 : g == 0) {
      const int r_lo = ROWS16 ? g : 2 * j, r_hi = ROWS16 ? g + 8 : 2 * j + 1;
      mm[warp * kRows + r_lo] = st.m_lo;
      ml[warp * kRows + r_lo] = st.l_lo;
      mm[warp * kRows + r_hi] = st.m_hi;
      ml[warp * kRows + r_hi] = st.l_hi;
    }
  }
  __syncthreads();
  // row r's merged max m and sum l, and its O at channel d (reads warp 0's slot of (r, d) last written by
  // this thread, and other warps' slots: the V_ROTATE pass stores the merged O in place)
  auto merge = [&](int r, int d, float& m, float& l) -> float {
    m = -inf_f();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, mm[w * kRows + r]);
    float o = 0.f;
    l = 0.f;
    if constexpr (kPair) {  // one pair: one running max, O in warp 0's rows, l and the v_lo term in two parts
      l = ml[r] + ml[kRows + r];
      o = mo[r * D + d] + mp[r] + mp[kRows + r];
    } else if (m != -inf_f()) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float lw = ml[w * kRows + r];
        if (lw > 0.f) {
          const float a = exp2f(mm[w * kRows + r] - m);
          o += a * mo[(w * kRows + r) * D + d];
          l += a * lw;
        }
      }
    }
    return o;
  };
  for (int i = tid; i < rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    float m, l;
    const float o = merge(r, d, m, l);
    if constexpr (V_ROTATE) mo[r * D + d] = o; else write_partial(part_o, part_lse, row0, ns, r, d, o, m, l);
  }
  if constexpr (V_ROTATE) {  // the merged rows rotated back (once per split): hadamard(o) * c * s
    unrotate_rows(mo, rows);
    for (int i = tid; i < rows * D; i += kThreads) {
      const int r = i / D, d = i % D;
      float m, l;
      merge(r, d, m, l);
      write_partial(part_o, part_lse, row0, ns, r, d, mo[r * D + d] * kivi::rotation_scale(D) * kivi::value_sign(d), m, l);
    }
  }
  if (split == tail_cta) {
    __syncthreads();  // the merge above is done with the work area
    attend_tail(smem, key, value, staging, seq_lens, query_start_loc, tail_slots, part_o, part_lse, num_splits,
                num_kv_heads, group, m_tiles, scale_log2, window);
  }
}

// Log-sum-exp merge of the NS partials of each (sequence, query head); grid (Hq, B), D threads.
// sinks_log2 [Hq] fp32 or null: each query head's sink logit times log2(e) joins the denominator
// as one more partial that carries no value (gpt-oss's attention sinks).
extern "C" __global__ void __launch_bounds__(256) kivi_decode_combine(
    const float* __restrict__ part_o, const float* __restrict__ part_lse, T* __restrict__ out,
    const int* __restrict__ query_start_loc, int num_q_heads, int ns, const float* __restrict__ sinks_log2) {
  const int hq = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  if (query_start_loc[b + 1] - query_start_loc[b] != 1) return;  // padding: see kivi_decode
  const size_t row = ((size_t)b * num_q_heads + hq) * ns;
  const float sink = sinks_log2 ? sinks_log2[hq] : -inf_f();
  float m = sink;
  for (int s = 0; s < ns; ++s) m = fmaxf(m, part_lse[row + s]);
  float o = 0.f, l = sink == -inf_f() ? 0.f : exp2f(sink - m);
  if (m != -inf_f()) {
    for (int s = 0; s < ns; ++s) {
      const float lse = part_lse[row + s];
      if (lse == -inf_f()) continue;
      const float w = exp2f(lse - m);
      o += w * part_o[(row + s) * D + d];
      l += w;
    }
  }
  out[((size_t)query_start_loc[b] * num_q_heads + hq) * D + d] = from_f32(l > 0.f ? o / l : 0.f);
}

// The dynamic shared memory kivi_decode needs, for the loader (launched once at load time).
extern "C" __global__ void kivi_decode_smem_bytes(int* out) {
  out[0] = kSmemBytes;
  out[1] = kThreads;
}
// The same two facts as data in the cubin, for the static cost model (which reads the ELF symbol).
extern "C" __device__ const int kivi_decode_launch_info[2] = {kSmemBytes, kThreads};
