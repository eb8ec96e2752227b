// decode.cpp — paged decode attention straight from kivi-serve's 2-bit pages, on the CPU.
//
// Spec: kivi_serve/kernels/reference.py `paged_attention`, restricted to rows whose query length
// is 1 (other rows are not touched): the query at position seq_len - 1 attends to the
// ctx = seq_len - 1 cached tokens as the cache holds them after this step's append (full pages
// quantized; the partial last page from its staging slot unless it was finalised early, then
// from its block) and to its own key/value, exactly. Page format: kivi_serve/quant/layout.py
// (passed in as `Layout`); 2-bit K and V codes, with or without the exact token, K outliers and
// wide K channels.
//
// Work: items (sequence, KV head, split) in chunks under OpenMP (dynamic schedule, a chunk at a
// time). A (sequence, KV head)'s units are its quantized pages and then its staged tail with the
// new token; an item takes a range of them. Many (sequence, KV head)s: one item each. Few (batch 1):
// all their units cut into one equal chunk per thread, across KV heads (plan_work). Each item
// keeps, for the G query heads of its KV head, an online softmax (log2 domain) and a partial
// output; the last split of a (sequence, KV head) to finish merges them by log-sum-exp and writes
// the output dtype.
//
// Per page (the math of layout.py's docstring, in fp32):
//   q . k[t] = sum_d q[d] * lo[d]  +  sum_d (q[d] * scale[d]) * cb[code(t, d)]
//   (wide channels read wide_cb with their full 3-bit code; the exact token's score is q . exact_k;
//   a K outlier adds q[d] * (kout_val[d] - k_hat[t, d]))
//   sum_t p[t] v[t, d] = sum_t p[t] * v_lo[t]  +  sum_t (p[t] * v_scale[t]) * v_cb[code(t, d)]
//   (the exact token contributes p * exact_v instead)
// With rotated values (layout v_rotate: the V codes describe v[t] @ R, R orthonormal) the codes' part
// is summed in the rotated space, in a second accumulator, and rotated back once per head at the end
// of a work item (sum_t p[t] v[t] = (sum_t p[t] (v[t] R)) R.T); the exact token, the staged tail and
// the new token are plain values and go straight to the first.
// so the inner loops only look codes up in a codebook:
//   avx512  lanes = 16 tokens (scores) / 16 channels (P.V), one vector of 16 code words per group
//           of 16 codes (the page's planes regrouped word-major once per page by permutes,
//           plane_words, rather than a gather per vector). Codes are looked up two at a time: per page and query head, a 16-entry
//           table per pair of packed positions holds q'[a] * cb[i & 3] + q'[b] * cb[i >> 2] (keys;
//           p'[a], p'[b] and v_cb for values), so one shift of the code words, then per head one
//           vpermps into the pair's table and one add cover two codes. A pair with a wide channel
//           adds a table for its top bit 1 and looks both up at once (vpermt2ps, the top bit from
//           wide_plane as index bit 4); a pair of two wide channels blends two such lookups.
//           (The tables cost 2 ops per pair and head per page; the lookups then take 7 ops per pair
//           of codes for 3 heads where one lookup + one FMA per code and head takes 10.) At
//           head_dim 64 the P.V tables of a token pair stay in registers, used by every channel
//           block at once (pv_page_fused).
//   avx2    one code at a time: a shift, a vpermps over the codebook replicated in 8 lanes ("the
//           LUT"; wide channels: an 8-entry wide_cb table, the top bit ORed into the index), one
//           FMA per head (8 lanes cannot hold a pair's 16-entry table);
//   scalar  plain loops (the fallback, and the portable build for non-x86 CPUs).
// The three paths compute the same sums in different orders (tests check they agree).
//
// The staged tail (quant/staging.py rows: the model dtype, or int8 codes + an fp32 scale) and the
// new token are converted 16 rows at a time into fp32 (int8: code * scale rounded to the model
// dtype — the value the reference reads — by vector ops, or by AVX512-BF16 where the CPU has it),
// then four rows' dot products per horizontal reduction and P.V accumulators held in registers.
//
// The per-call cost matters at short context (a 1K-token SmolLM2 decode takes ~20 us on 2 threads):
// the step's metadata is checked once and packed into a Plan (kivi_decode_prepare) that every
// layer's call reuses (kivi_decode_run: one layer's pointers in one int64 block, the metadata only
// compared with the plan's copy), the column orders are built once per (D, P), the per-call buffers
// are reused thread-local ones, and a call with too little work to split stays on one thread.
//
// Measured speed: docs/performance.md ("Kernels (CPU, C++)").

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "kivi_cpu.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#elif defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace kivi_cpu {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define KIVI_AVX512 1
constexpr const char* kIsa = "avx512";
constexpr int kMaxGroup = 8;  // query heads per pass (accumulators in registers)
#elif defined(__AVX2__) && defined(__FMA__)
#define KIVI_AVX2 1
constexpr const char* kIsa = "avx2";
constexpr int kMaxGroup = 4;
#else
constexpr const char* kIsa = "scalar";
constexpr int kMaxGroup = 8;
#endif
#if KIVI_AVX512 || KIVI_AVX2
#define KIVI_SIMD 1
#endif

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Flush denormals to zero (FTZ + DAZ) in this thread while an object lives. Softmax weights of
// far-away tokens underflow into the denormal range, and every arithmetic operation on a denormal
// costs ~100 cycles of microcode: without this, a batch with a few such tokens runs many times
// slower. Values below 1.2e-38 becoming 0 is far below the tolerance of fp32 attention. (The
// quantizer never does this: it must match torch bit for bit.)
struct FlushDenormals {
#if defined(__SSE__)
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// ------------------------------------------------------------------------------ vector layer
// One vector type per build (vf: kVec floats, vi: kVec int32 lanes) and the few operations the
// kernels need, so every helper below is written once for AVX-512 and AVX2. Where the two ISAs
// name an intrinsic alike, KV(op) picks it (_mm512_op / _mm256_op); the rest is spelled per ISA.
#if KIVI_AVX512
constexpr int kVec = 16;
typedef __m512 vf;
typedef __m512i vi;
typedef __m256i vhalf;  // kVec 16-bit values
#define KV(op) _mm512_##op
#define KV_SI(op) _mm512_##op##_si512
inline vhalf vhalf_load(const u8* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i vquarter_load(const u8* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline vi vload_i(const int32_t* p) { return _mm512_loadu_si512(p); }
inline vf vcast_f(vi x) { return _mm512_castsi512_ps(x); }
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vldexp(vf y, vf n) { return _mm512_scalef_ps(y, n); }  // y * 2^n (n integral)
inline float hsum(vf v) {
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }
inline vi vlanes() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline vf vgather(const float* base, vi idx) { return _mm512_i32gather_ps(idx, base, 4); }
inline vi vgather_u32(const u8* base, vi idx) { return _mm512_i32gather_epi32(idx, base, 4); }
inline vf vnan_or(vf x, vf y, vf nan) { return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), nan); }
inline vf vlut(vf table, vi idx) { return _mm512_permutexvar_ps(idx, table); }  // table[idx & 15]
// {sum a0, sum a1, sum a2, sum a3}
inline __m128 reduce4(vf a0, vf a1, vf a2, vf a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));
  return _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, u));
}
#elif KIVI_AVX2
constexpr int kVec = 8;
typedef __m256 vf;
typedef __m256i vi;
typedef __m128i vhalf;
#define KV(op) _mm256_##op
#define KV_SI(op) _mm256_##op##_si256
inline vhalf vhalf_load(const u8* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m128i vquarter_load(const u8* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline vi vload_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vf vcast_f(vi x) { return _mm256_castsi256_ps(x); }
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vldexp(vf y, vf n) {  // y * 2^n for integral n in [-127, 0]
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
inline float hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(vf v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
inline vi vlanes() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline vf vgather(const float* base, vi idx) { return _mm256_i32gather_ps(base, idx, 4); }
inline vi vgather_u32(const u8* base, vi idx) {
  return _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), idx, 4);
}
inline vf vnan_or(vf x, vf y, vf nan) { return _mm256_blendv_ps(y, nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)); }
inline vf vlut(vf table, vi idx) { return _mm256_permutevar8x32_ps(table, idx); }  // table[idx & 7]
inline __m128 reduce4(vf a0, vf a1, vf a2, vf a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#endif
#if KIVI_SIMD
inline vf vload(const float* p) { return KV(loadu_ps)(p); }
inline vf vload_a(const float* p) { return KV(load_ps)(p); }
inline void vstore(float* p, vf x) { KV(storeu_ps)(p, x); }
inline vf vset1(float x) { return KV(set1_ps)(x); }
inline vf vzero() { return KV(setzero_ps)(); }
inline vf vadd(vf a, vf b) { return KV(add_ps)(a, b); }
inline vf vsub(vf a, vf b) { return KV(sub_ps)(a, b); }
inline vf vmul(vf a, vf b) { return KV(mul_ps)(a, b); }
inline vf vmax(vf a, vf b) { return KV(max_ps)(a, b); }
inline vf vfma(vf a, vf b, vf c) { return KV(fmadd_ps)(a, b, c); }
inline vi vset1_i(int x) { return KV(set1_epi32)(x); }
inline vi vadd_i(vi a, vi b) { return KV(add_epi32)(a, b); }
inline vi vand_i(vi a, vi b) { return KV_SI(and)(a, b); }
inline vi vcast_i(vf x) { return KV_SI(castps)(x); }
template <int N>
inline vi vsrl(vi a) { return KV(srli_epi32)(a, N); }
inline vi vsrl_n(vi a, int n) { return KV(srli_epi32)(a, n); }
inline vi vlanes_times(int k) { return KV(mullo_epi32)(vlanes(), vset1_i(k)); }  // lane * k
inline vf vf16(const u8* src) { return KV(cvtph_ps)(vhalf_load(src)); }  // kVec fp16 -> float
inline vf vbf16(const u8* src) { return vcast_f(KV(slli_epi32)(KV(cvtepu16_epi32)(vhalf_load(src)), 16)); }
inline vf vi8(const u8* src) { return KV(cvtepi32_ps)(KV(cvtepi8_epi32)(vquarter_load(src))); }  // kVec int8
inline vf vf16_round(vf x) {  // fp32 -> fp16 (round to nearest even) -> fp32
  return KV(cvtph_ps)(KV(cvtps_ph)(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
constexpr int kVec = 1;
#endif

// ------------------------------------------------------------------------------ helpers
#if KIVI_SIMD
// 2^x for x <= 0 (x < -126 gives ~0): 2^round(x) * Taylor polynomial of degree 7 on [-0.5, 0.5]
// (relative error < 1e-8 before rounding).
inline vf exp2v(vf x) {
  x = vmax(x, vset1(-127.0f));
  const vf n = vround(x);
  const vf f = vsub(x, n);
  vf y = vset1(1.525273380405984e-05f);
  y = vfma(y, f, vset1(1.5403530393381606e-04f));
  y = vfma(y, f, vset1(1.3333558146428443e-03f));
  y = vfma(y, f, vset1(9.618129107628477e-03f));
  y = vfma(y, f, vset1(5.550410866482158e-02f));
  y = vfma(y, f, vset1(2.402265069591007e-01f));
  y = vfma(y, f, vset1(6.931471805599453e-01f));
  y = vfma(y, f, vset1(1.0f));
  return vldexp(y, n);
}

// fp32 values rounded to the model `dtype` (what storing them in that dtype and reading back gives;
// bf16: round to nearest even, NaN -> 0x7fc0, as c10::BFloat16).
inline vf vround_to(int dtype, vf x) {
  if (dtype == kBF16) {
    const vi u = vcast_i(x);
    const vi r = vand_i(vadd_i(vadd_i(u, vset1_i(0x7fff)), vand_i(vsrl<16>(u), vset1_i(1))), vset1_i((int)0xffff0000u));
    return vnan_or(x, vcast_f(r), vcast_f(vset1_i(0x7fc00000)));
  }
  if (dtype == kF16) return vf16_round(x);
  return x;
}
#endif

// sum_d a[d] * b[d]
inline float dot(const float* a, const float* b, int n) {
#if KIVI_SIMD
  vf s = vzero();
  for (int i = 0; i < n; i += kVec) s = vfma(vload(a + i), vload(b + i), s);
  return hsum(s);
#else
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // four chains, like the SIMD paths' lanes
  int i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) s[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
#endif
}

// y[d] += a * x[d]
inline void axpy(float* y, float a, const float* x, int n) {
#if KIVI_SIMD
  const vf av = vset1(a);
  for (int i = 0; i < n; i += kVec) vstore(y + i, vfma(av, vload(x + i), vload(y + i)));
#else
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
#endif
}

// y[d] *= a
inline void scale_row(float* y, float a, int n) {
#if KIVI_SIMD
  const vf av = vset1(a);
  for (int i = 0; i < n; i += kVec) vstore(y + i, vmul(av, vload(y + i)));
#else
  for (int i = 0; i < n; ++i) y[i] *= a;
#endif
}

// max_t s[t] over n values (n a multiple of the vector width)
inline float vmax_of(const float* s, int n) {
#if KIVI_SIMD
  vf m = vset1(kNegInf);
  for (int i = 0; i < n; i += kVec) m = vmax(m, vload(s + i));
  return hmax(m);
#else
  float m = kNegInf;
  for (int i = 0; i < n; ++i) m = std::max(m, s[i]);
  return m;
#endif
}

// n fp16 values (a page field) -> fp32 (n a multiple of 8)
inline void f16_row(const u8* src, int n, float* dst) {
#if KIVI_AVX512
  int i = 0;
  for (; i + 16 <= n; i += 16) vstore(dst + i, vf16(src + 2 * i));
  for (; i < n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i))));
#elif KIVI_AVX2
  for (int i = 0; i < n; i += 8) vstore(dst + i, vf16(src + 2 * i));
#else
  for (int i = 0; i < n; ++i) dst[i] = page_f16(src, 0, i);
#endif
}

// n fp32 values -> `dtype` (round to nearest even; n a multiple of 16)
inline void store_row(const float* src, int dtype, int n, u8* dst) {
#if KIVI_AVX512
  if (dtype == kF16) {
    for (int i = 0; i < n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
#endif
  for (int i = 0; i < n; ++i) store_from_f32(dst, dtype, i, src[i]);
}

#if KIVI_AVX512
// AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4, ...) rounds fp32 to bf16 (nearest even) in one
// instruction, where the integer rounding of vround_to takes eight. It is not in the avx512
// build's baseline, so this one function is compiled for it and called only where the CPU has it
// (kHasBf16). It differs from vround_to only where nothing here depends on it: fp32 denormals
// (below 1.2e-38; the decode flushes them anyway) become 0, and a NaN keeps its payload.
const bool kHasBf16 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));  // (init: we run at load)

__attribute__((target("avx512bf16"))) void i8_row_bf16(const u8* src, int D, float scale, float* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < D; i += 16) {
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_mul_ps(vi8(src + i), s));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)b), 16)));
  }
}
#endif

// One row of D values in staging format `fmt` (a model dtype, or kI8: D int8 codes + the fp32
// scale) as fp32 — for kI8 code * scale rounded to the model `dtype`, the value the reference
// reads (quant/staging.py). Returns the values: `src` itself for fp32 rows, else `buf`.
inline const float* row_f32(const u8* src, int fmt, int dtype, int D, float* buf) {
  if (fmt == kF32) return reinterpret_cast<const float*>(src);
#if KIVI_AVX512
  if (fmt == kI8 && dtype == kBF16 && kHasBf16) {
    float scale;
    std::memcpy(&scale, src + D, 4);
    i8_row_bf16(src, D, scale, buf);
    return buf;
  }
#endif
#if KIVI_SIMD
  if (fmt == kI8) {
    float scale;
    std::memcpy(&scale, src + D, 4);
    const vf s = vset1(scale);
    for (int i = 0; i < D; i += kVec) vstore(buf + i, vround_to(dtype, vmul(vi8(src + i), s)));
  } else if (fmt == kBF16) {
    for (int i = 0; i < D; i += kVec) vstore(buf + i, vbf16(src + 2 * i));
  } else {
    for (int i = 0; i < D; i += kVec) vstore(buf + i, vf16(src + 2 * i));
  }
#else
  read_staged_rows(src, fmt, 1, D, buf, dtype);
#endif
  return buf;
}

// ------------------------------------------------------------------------------ one page
// Column order of packed rows (layout.group_permutation) for D channels and P tokens:
// k[i] is the channel at packed position i of a K row, v[i] the token of a V row.
struct Perm {
  alignas(64) int32_t k[256], v[256], k_inv[256];  // k_inv[d]: packed position of channel d
  Perm(int D, int P) {
    for (int i = 0; i < D; ++i) k[i] = packed_col(D, i / 16, i % 16);
    for (int i = 0; i < D; ++i) k_inv[k[i]] = i;
    for (int i = 0; i < P; ++i) v[i] = packed_col(P, i / 16, i % 16);
  }
};

// The Perm of (D, P): built once per supported shape (a Perm costs ~1 us to build: a tenth of a
// small decode call), else into `local`.
inline const Perm& perm_for(int D, int P, std::unique_ptr<Perm>& local) {
  static const std::vector<Perm> table = [] {
    std::vector<Perm> v;
    for (int d : {64, 128, 256})
      for (int p : {64, 128, 256}) v.emplace_back(d, p);
    return v;
  }();
  auto index = [](int n) { return n == 64 ? 0 : n == 128 ? 1 : n == 256 ? 2 : -1; };
  if (index(D) >= 0 && index(P) >= 0) return table[index(D) * 3 + index(P)];
  local.reset(new Perm(D, P));
  return *local;
}

// dst[i] = src[idx[i]] for n (a multiple of 16) entries
inline void gather(const float* src, const int32_t* idx, int n, float* dst) {
#if KIVI_SIMD
  for (int i = 0; i < n; i += kVec) vstore(dst + i, vgather(src, vload_i(idx + i)));
#else
  for (int i = 0; i < n; ++i) dst[i] = src[idx[i]];
#endif
}

inline void prefetch_lines(const u8* p, int bytes) {
#if KIVI_SIMD
  for (int i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
#else
  (void)p;
  (void)bytes;
#endif
}

// n fp16 offsets and scales (page fields) -> scale and the centre offset + scale / 2, fp32
// (n a multiple of 8)
inline void centred(const u8* off, const u8* scl, int n, float* centre, float* scale) {
#if KIVI_SIMD
  const vf half = vset1(0.5f);
  int i = 0;
  for (; i + kVec <= n; i += kVec) {
    const vf x = vf16(scl + 2 * i);
    vstore(scale + i, x);
    vstore(centre + i, vfma(half, x, vf16(off + 2 * i)));
  }
  if (i < n) {  // 8 left (avx512, n = 8 mod 16: not a supported head_dim / page size)
    f16_row(scl + 2 * i, n - i, scale + i);
    f16_row(off + 2 * i, n - i, centre + i);
    for (; i < n; ++i) centre[i] += 0.5f * scale[i];
  }
#else
  f16_row(off, n, centre);
  f16_row(scl, n, scale);
  for (int i = 0; i < n; ++i) centre[i] += 0.5f * scale[i];
#endif
}

// What the inner loops need of one page (one KV head), decoded once per page.
constexpr int kMaxDim = 256;  // layout.SUPPORTED_HEAD_DIMS / SUPPORTED_PAGE_SIZES
constexpr int kRowBlock = 16;  // tail rows converted at a time (kRowBlock x D fp32 in Scratch::rows)

struct PageInfo {
  const u8* page;
  int exact;                          // exact token index, -1 if none (or out of range)
  alignas(64) float lo[kMaxDim];      // K per-channel centre k_lo + k_scale / 2, natural order
  alignas(64) float sc[kMaxDim];      // K per-channel scale
  alignas(64) float vlo[kMaxDim];     // V per-token centre v_lo + v_scale / 2
  alignas(64) float vsc[kMaxDim];     // V per-token scale
  alignas(64) int hi_pos[kMaxDim];    // row of channel d in wide_plane, -1 if narrow (natural order;
                                      // filled only for pages with K outliers, which need it)
  alignas(64) int hrow[kMaxDim];      // wide_plane row of packed channel i (set where wide only)
  u32 wide[kMaxDim / 16];             // per K code group w: bit p set if packed channel (w, p) is wide
  alignas(64) float cb16[16];         // K codebook replicated and centred: cb16[i] = k_cb[i & 3] - 1/2
  alignas(64) float hcb16[16];        // wide channels' codebook (8 entries) - 1/2
  alignas(64) float vcb16[16];        // V codebook replicated, centred
#if KIVI_AVX512
  // Pairs of packed K positions (2j, 2j + 1) with a wide channel (kind = wide(2j) + 2 wide(2j+1),
  // bits 2k, 2k + 1 of wide[j / 8]) have more tables after the D / 2 pairs': from slot wslot[j] on,
  // 1 slot (kind 1, 2) or 3 (kind 3) of 16 floats per head.
  int16_t wslot[kMaxDim / 2];
  int wide_slots;
#endif

  void load(const Layout& L, const Perm& perm, const u8* p) {
    page = p;
    const int D = L.head_dim, P = L.page_size;
    // Centre every level on the middle of the range (cb - 1/2, exact for fp16 levels in [0, 1];
    // the offsets become lo + scale / 2): the two partial sums of a score (q . offset and
    // q' . level) then no longer cancel each other, which keeps fp32 rounding at the level of a
    // plain fp32 attention.
    centred(p + L.k_lo, p + L.k_scale, D, lo, sc);
    centred(p + L.v_lo, p + L.v_scale, P, vlo, vsc);
#if KIVI_AVX512
    // Codebooks: 4 (8) fp16 values at 16-byte aligned offsets, each section padded to 16 bytes,
    // so reading 8 values stays inside the page.
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i two_bits = _mm512_and_si512(lanes, _mm512_set1_epi32(3));
    const __m512 half = _mm512_set1_ps(0.5f);
    auto cb8 = [&](int offset) {
      return _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + offset))));
    };
    _mm512_store_ps(cb16, _mm512_sub_ps(_mm512_permutexvar_ps(two_bits, cb8(L.k_cb)), half));
    _mm512_store_ps(vcb16, _mm512_sub_ps(_mm512_permutexvar_ps(two_bits, cb8(L.v_cb)), half));
    _mm512_store_ps(hcb16, _mm512_sub_ps(L.hi ? _mm512_maskz_mov_ps(0x00ff, cb8(L.wide_cb)) : _mm512_setzero_ps(), half));
#else
    alignas(64) float k8[8], v8[8];
    f16_row(p + L.k_cb, 8, k8);
    f16_row(p + L.v_cb, 8, v8);
    if (L.hi) {
      f16_row(p + L.wide_cb, 8, hcb16);
    } else {
      std::fill(hcb16, hcb16 + 8, 0.0f);
    }
    std::fill(hcb16 + 8, hcb16 + 16, 0.0f);
    for (int i = 0; i < 16; ++i) {
      cb16[i] = k8[i & 3] - 0.5f;
      vcb16[i] = v8[i & 3] - 0.5f;
      hcb16[i] -= 0.5f;
    }
#endif
    // Wide channels: a flag byte per packed position (independent stores, no read-modify-write
    // chain on the masks), then the masks 16 flags at a time.
    alignas(16) u8 flag[kMaxDim];
    std::memset(flag, 0, D);
    if (L.outliers) std::fill(hi_pos, hi_pos + D, -1);
    for (int i = 0; i < L.hi; ++i) {
      const int d = p[L.wide_idx + i];
      if (d >= D) continue;
      const int pos = perm.k_inv[d];
      hrow[pos] = i;
      flag[pos] = 0x80;
      if (L.outliers) hi_pos[d] = i;
    }
    for (int w = 0; w < D / 16; ++w) {
#if defined(__SSE2__)
      wide[w] = (u32)_mm_movemask_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(flag + 16 * w)));
#else
      wide[w] = 0;
      for (int i = 0; i < 16; ++i) wide[w] |= (u32)(flag[16 * w + i] >> 7) << i;
#endif
    }
#if KIVI_AVX512
    wide_slots = 0;
    for (int w = 0; w < D / 16; ++w) {
      u32 pairs = (wide[w] | (wide[w] >> 1)) & 0x5555u;  // bit 2k: pair k of this group has a wide channel
      while (pairs) {
        const int k = __builtin_ctz(pairs) / 2;
        pairs &= pairs - 1;
        wslot[w * 8 + k] = (int16_t)wide_slots;
        wide_slots += ((wide[w] >> (2 * k)) & 3u) == 3u ? 3 : 1;
      }
    }
#endif
    exact = -1;
    if (L.exact) {
      int16_t e;
      std::memcpy(&e, p + L.exact_idx, 2);
      exact = e >= 0 && e < P ? e : -1;
    }
  }
};

// Top code bits of wide_plane row `row` for tokens t0 .. t0 + 15 (t0 a multiple of 16): the
// row's 16-bit half-word t0 / 16 (rows are little-endian uint32 words).
inline u32 top_bits(const u32* wplane, int P, int row, int t0) {
  u16 h;
  std::memcpy(&h, reinterpret_cast<const u8*>(wplane) + (size_t)row * (P / 8) + t0 / 8, 2);
  return h;
}

#if KIVI_AVX512
// The code words of a plane (rows of wpr uint32 words: the K plane's tokens, the V plane's
// channels) regrouped word-major, 16 rows at a time: dst[(blk * wpr + w) * 16 + i] = word w of row
// 16 blk + i, what the lookup loops take per (16 rows, word) with one row per lane. With 4 or 8
// words per row (16- or 32-byte rows: keys at D = 64; values at P = 64, 128) by two or three
// stages of two-source permutes, 2 or 3 per 16 words, where a 16-element gather per 16 words
// cost ~8 % of a SmolLM2 decode (docs/performance.md, sixth pass); else by those gathers.
inline void plane_words(const u8* plane, int wpr, int blocks, u32* dst) {
  auto perm2 = [](__m512i a, __m512i idx, __m512i b) { return _mm512_permutex2var_epi32(a, idx, b); };
  auto load = [](const u8* p) { return _mm512_loadu_si512(p); };
  auto store = [](u32* p, __m512i x) { _mm512_store_si512(p, x); };
  // the last stage: rows 0-7 of words (w, w + 1) in a (8 each), rows 8-15 in b -> word w + s
  const __m512i last0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i last1 = _mm512_add_epi32(last0, _mm512_set1_epi32(8));
  if (wpr == 4) {
    // rows 0-3 in a, 4-7 in b (4 words each) -> rows 0-7 of words (0, 1) (or (2, 3): + 2)
    const __m512i s0 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i s1 = _mm512_add_epi32(s0, _mm512_set1_epi32(2));
    for (int blk = 0; blk < blocks; ++blk) {
      const u8* src = plane + (size_t)blk * 256;
      const __m512i z0 = load(src), z1 = load(src + 64), z2 = load(src + 128), z3 = load(src + 192);
      const __m512i a0 = perm2(z0, s0, z1), b0 = perm2(z0, s1, z1), a1 = perm2(z2, s0, z3), b1 = perm2(z2, s1, z3);
      u32* o = dst + (size_t)blk * 64;
      store(o, perm2(a0, last0, a1));
      store(o + 16, perm2(a0, last1, a1));
      store(o + 32, perm2(b0, last0, b1));
      store(o + 48, perm2(b0, last1, b1));
    }
  } else if (wpr == 8) {
    // rows 0-1 in a, 2-3 in b (8 words each) -> rows 0-3 of words 0-3 (or 4-7: + 4), word-major
    const __m512i s0 = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
    const __m512i s1 = _mm512_add_epi32(s0, _mm512_set1_epi32(4));
    // rows 0-3 of 4 words in a, rows 4-7 in b -> rows 0-7 of words (0, 1) (or (2, 3): + 8)
    const __m512i m0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i m1 = _mm512_add_epi32(m0, _mm512_set1_epi32(8));
    for (int blk = 0; blk < blocks; ++blk) {
      const u8* src = plane + (size_t)blk * 512;
      __m512i lo[4], hi[4];  // rows 4g .. 4g + 3: words 0-3, 4-7
      for (int g = 0; g < 4; ++g) {
        const __m512i x = load(src + 128 * g), y = load(src + 128 * g + 64);
        lo[g] = perm2(x, s0, y);
        hi[g] = perm2(x, s1, y);
      }
      u32* o = dst + (size_t)blk * 128;
      for (int h = 0; h < 2; ++h) {  // words 4h .. 4h + 3
        const __m512i* q = h ? hi : lo;
        const __m512i r01a = perm2(q[0], m0, q[1]), r01b = perm2(q[0], m1, q[1]);  // rows 0-7
        const __m512i r23a = perm2(q[2], m0, q[3]), r23b = perm2(q[2], m1, q[3]);  // rows 8-15
        store(o + (4 * h) * 16, perm2(r01a, last0, r23a));
        store(o + (4 * h + 1) * 16, perm2(r01a, last1, r23a));
        store(o + (4 * h + 2) * 16, perm2(r01b, last0, r23b));
        store(o + (4 * h + 3) * 16, perm2(r01b, last1, r23b));
      }
    }
  } else {
    const __m512i vindex = vlanes_times(wpr);
    for (int blk = 0; blk < blocks; ++blk)
      for (int w = 0; w < wpr; ++w)
        store(dst + ((size_t)blk * wpr + w) * 16, vgather_u32(plane + 4 * ((size_t)blk * 16 * wpr + w), vindex));
  }
}
#endif

#if KIVI_AVX512
// Score tables of NG heads (pair tables, see the header), qs in packed channel order (stride D per
// head). For pair j and head g, at T + (j * NG + g) * 16: qs[2j] * a[i & 3] + qs[2j+1] * b[i >> 2],
// the levels of the pair's codes with every top bit 0 (a, b: k_cb, or wide_cb for a wide channel).
// A pair with a wide channel has more tables from W = T + (D / 2 + wslot[j]) * NG * 16 on: one wide
// channel  its top bit 1 (W + g * 16; the lookup takes both with index bit 4 = the top bit); two
// wide channels  tops (1, 0), (0, 1), (1, 1) (W + g * 48).
template <int NG, int D>
void build_score_tables(const PageInfo& pi, const float* qs, float* T) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo2 = _mm512_and_si512(lanes, _mm512_set1_epi32(3)), hi2 = _mm512_srli_epi32(lanes, 2);
  const __m512 cbv = _mm512_load_ps(pi.cb16), hcbv = _mm512_load_ps(pi.hcb16);
  const __m512i four = _mm512_set1_epi32(4);
  // levels of the first (a) and second (b) code of a pair: [0] narrow, [1] wide with top bit 0,
  // [2] wide with top bit 1
  const __m512 la[3] = {_mm512_permutexvar_ps(lo2, cbv), _mm512_permutexvar_ps(lo2, hcbv),
                        _mm512_permutexvar_ps(_mm512_or_si512(lo2, four), hcbv)};
  const __m512 lb[3] = {_mm512_permutexvar_ps(hi2, cbv), _mm512_permutexvar_ps(hi2, hcbv),
                        _mm512_permutexvar_ps(_mm512_or_si512(hi2, four), hcbv)};
  for (int w = 0; w < D / 16; ++w) {
    const u32 wm = pi.wide[w];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const int j = w * 8 + k;
      const __m512 a = la[(wm >> (2 * k)) & 1u], b = lb[(wm >> (2 * k + 1)) & 1u];
      float* t = T + (size_t)j * NG * 16;
      for (int g = 0; g < NG; ++g)
        _mm512_store_ps(t + g * 16,
                        _mm512_fmadd_ps(_mm512_set1_ps(qs[g * D + 2 * j]), a, _mm512_mul_ps(_mm512_set1_ps(qs[g * D + 2 * j + 1]), b)));
    }
  }
  float* W = T + (size_t)D / 2 * NG * 16;
  for (int w = 0; w < D / 16; ++w) {
    u32 pairs = (pi.wide[w] | (pi.wide[w] >> 1)) & 0x5555u;
    while (pairs) {
      const int k = __builtin_ctz(pairs) / 2, j = w * 8 + k;
      pairs &= pairs - 1;
      const int kind = (int)((pi.wide[w] >> (2 * k)) & 3u);
      float* t = W + (size_t)pi.wslot[j] * NG * 16;
      for (int g = 0; g < NG; ++g) {
        const __m512 qa = _mm512_set1_ps(qs[g * D + 2 * j]), qb = _mm512_set1_ps(qs[g * D + 2 * j + 1]);
        if (kind == 1) {
          _mm512_store_ps(t + g * 16, _mm512_fmadd_ps(qa, la[2], _mm512_mul_ps(qb, lb[0])));
        } else if (kind == 2) {
          _mm512_store_ps(t + g * 16, _mm512_fmadd_ps(qa, la[0], _mm512_mul_ps(qb, lb[2])));
        } else {
          _mm512_store_ps(t + g * 48, _mm512_fmadd_ps(qa, la[2], _mm512_mul_ps(qb, lb[1])));
          _mm512_store_ps(t + g * 48 + 16, _mm512_fmadd_ps(qa, la[1], _mm512_mul_ps(qb, lb[2])));
          _mm512_store_ps(t + g * 48 + 32, _mm512_fmadd_ps(qa, la[2], _mm512_mul_ps(qb, lb[2])));
        }
      }
    }
  }
}

// P.V tables of NG heads: for token pair j (packed positions 2j, 2j + 1), head g, at
// T + (j * NG + g) * 16: pp[g][a] * v_cb[i & 3] + pp[g][b] * v_cb[i >> 2] (pp natural token order,
// stride P per head).
template <int NG, int P>
void build_pv_tables(const PageInfo& pi, const Perm& perm, const float* pp, float* T) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 cbv = _mm512_load_ps(pi.vcb16);
  const __m512 na = _mm512_permutexvar_ps(_mm512_and_si512(lanes, _mm512_set1_epi32(3)), cbv);
  const __m512 nb = _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 2), cbv);
  for (int j = 0; j < P / 2; ++j) {
    const float* a = pp + perm.v[2 * j];
    const float* b = pp + perm.v[2 * j + 1];
    float* t = T + (size_t)j * NG * 16;
    for (int g = 0; g < NG; ++g)
      _mm512_store_ps(t + g * 16, _mm512_fmadd_ps(_mm512_set1_ps(a[g * P]), na, _mm512_mul_ps(_mm512_set1_ps(b[g * P]), nb)));
  }
}
#endif

#if KIVI_AVX512
// score_page's AVX-512 loop for NB consecutive blocks of 16 tokens from t0: per pair of packed
// positions, a shift of the code words, then per head one lookup in the pair's table and one add
// (T: build_score_tables; W: its wide pairs' part).
template <int NG, int NB>
inline void score_blocks(const PageInfo& pi, const u32* kw, const u32* wplane, int P, int wpr, const float* T,
                         const float* W, const float* base, float* s, int t0) {
  const __m512i fifteen = _mm512_set1_epi32(15), sixteen = _mm512_set1_epi32(16);
  // Even / odd pairs in two dependency chains per (block, head) where there are few of them; with
  // NB * NG >= 12 chains the adds already overlap, and a second set (24+ accumulators) would not fit
  // in the 32 registers: spilled, it cost a load and a store per add (SmolLM2's NG = 3, NB = 4).
  constexpr bool kTwoChains = NB * NG < 12;
  __m512 acc[NB][NG], acc2[NB][NG];  // (acc2 unused, and optimised away, with one chain)
  for (int b = 0; b < NB; ++b)
    for (int g = 0; g < NG; ++g) {
      acc[b][g] = _mm512_set1_ps(base[g]);
      if constexpr (kTwoChains) acc2[b][g] = _mm512_setzero_ps();
    }
  for (int w = 0; w < wpr; ++w) {
    __m512i words[NB];
    for (int b = 0; b < NB; ++b) words[b] = _mm512_load_si512(kw + ((size_t)(t0 / 16 + b) * wpr + w) * 16);
    const float* tw = T + (size_t)w * 8 * NG * 16;
    const u32 wm = pi.wide[w];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const int j = w * 8 + k;
      // this pair's codes in the low 4 bits; with one chain the words are shifted as they are used
      // (GCC shifted every pair's copy up front there, 8 x NB index vectors live, and spilled them)
      __m512i idx[NB];
      for (int b = 0; b < NB; ++b) {
        if constexpr (kTwoChains) {
          idx[b] = _mm512_srli_epi32(words[b], 4 * k);
        } else {
          idx[b] = words[b];
          words[b] = _mm512_srli_epi32(words[b], 4);
        }
      }
      auto& a = kTwoChains && (k & 1) ? acc2 : acc;
      const u32 kind = (wm >> (2 * k)) & 3u;
      if (kind == 0) {
        for (int g = 0; g < NG; ++g) {
          const __m512 tab = _mm512_load_ps(tw + (k * NG + g) * 16);
          for (int b = 0; b < NB; ++b) a[b][g] = _mm512_add_ps(a[b][g], _mm512_permutexvar_ps(idx[b], tab));
        }
        continue;
      }
      const float* t = W + (size_t)pi.wslot[j] * NG * 16;
      __m512i i5[NB];
      if (kind != 3) {
        const int row = pi.hrow[2 * j + (kind == 2)];
        for (int b = 0; b < NB; ++b)
          i5[b] = _mm512_mask_or_epi32(_mm512_and_si512(idx[b], fifteen),
                                       (__mmask16)top_bits(wplane, P, row, t0 + 16 * b), idx[b], sixteen);
        for (int g = 0; g < NG; ++g) {
          const __m512 lo = _mm512_load_ps(tw + (k * NG + g) * 16), hi = _mm512_load_ps(t + g * 16);
          for (int b = 0; b < NB; ++b) a[b][g] = _mm512_add_ps(a[b][g], _mm512_permutex2var_ps(lo, i5[b], hi));
        }
      } else {
        __mmask16 top_b[NB];
        for (int b = 0; b < NB; ++b) {
          top_b[b] = (__mmask16)top_bits(wplane, P, pi.hrow[2 * j + 1], t0 + 16 * b);
          i5[b] = _mm512_mask_or_epi32(_mm512_and_si512(idx[b], fifteen),
                                       (__mmask16)top_bits(wplane, P, pi.hrow[2 * j], t0 + 16 * b), idx[b], sixteen);
        }
        for (int g = 0; g < NG; ++g) {
          const __m512 t00 = _mm512_load_ps(tw + (k * NG + g) * 16), t10 = _mm512_load_ps(t + g * 48);
          const __m512 t01 = _mm512_load_ps(t + g * 48 + 16), t11 = _mm512_load_ps(t + g * 48 + 32);
          for (int b = 0; b < NB; ++b) {
            const __m512 v0 = _mm512_permutex2var_ps(t00, i5[b], t10), v1 = _mm512_permutex2var_ps(t01, i5[b], t11);
            a[b][g] = _mm512_add_ps(a[b][g], _mm512_mask_blend_ps(top_b[b], v0, v1));
          }
        }
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int g = 0; g < NG; ++g)
      _mm512_storeu_ps(s + g * P + t0 + 16 * b, kTwoChains ? _mm512_add_ps(acc[b][g], acc2[b][g]) : acc[b][g]);
}
#endif

// Scores of NG query heads over the page's first `cnt` tokens (cnt a multiple of the vector
// width; the caller masks tokens past the context): s[g * P + t] = base[g] + sum_i qs[g * D + i]
// * level(t, channel i), with qs in packed channel order (avx512: through the pair tables T).
// `next`: the next page to prefetch, or null.
template <int NG>
void score_page(const Layout& L, const PageInfo& pi, const float* qs, const float* T, const u32* kw, const float* base,
                float* s, int cnt, const u8* next) {
  const int D = L.head_dim, P = L.page_size, wpr = D / 16;
  const u8* kp = pi.page + L.k_plane0;
  const u32* wplane = reinterpret_cast<const u32*>(pi.page + (L.hi ? L.wide_plane : 0));
#if KIVI_AVX512
  (void)qs;
  const float* W = T + (size_t)D / 2 * NG * 16;  // the wide pairs' tables
  int t0 = 0;
  if constexpr (NG <= 3) {  // four blocks at a time (accumulators: 4 * NG * 2 <= 24 registers)
    for (; t0 + 64 <= cnt; t0 += 64) {
      if (next) prefetch_lines(next + L.k_plane0 + (size_t)t0 * wpr * 4, 64 * wpr * 4);
      score_blocks<NG, 4>(pi, kw, wplane, P, wpr, T, W, base, s, t0);
    }
  }
  if constexpr (NG <= 4) {  // two blocks at a time: one table load and pair test for both
    for (; t0 + 32 <= cnt; t0 += 32) {
      if (next) prefetch_lines(next + L.k_plane0 + (size_t)t0 * wpr * 4, 32 * wpr * 4);
      score_blocks<NG, 2>(pi, kw, wplane, P, wpr, T, W, base, s, t0);
    }
  }
  for (; t0 < cnt; t0 += 16) {
    if (next) prefetch_lines(next + L.k_plane0 + (size_t)t0 * wpr * 4, 16 * wpr * 4);
    score_blocks<NG, 1>(pi, kw, wplane, P, wpr, T, W, base, s, t0);
  }
#elif KIVI_AVX2
  (void)T;
  (void)kw;
  const __m256 lut = _mm256_load_ps(pi.cb16), hlut = _mm256_load_ps(pi.hcb16);
  const __m256i vindex = vlanes_times(wpr);
  const __m256i three = _mm256_set1_epi32(3), four = _mm256_set1_epi32(4);
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int t0 = 0; t0 < cnt; t0 += 8) {
    if (next) prefetch_lines(next + L.k_plane0 + (size_t)t0 * wpr * 4, 8 * wpr * 4);
    __m256 acc[NG], acc2[NG];
    for (int g = 0; g < NG; ++g) {
      acc[g] = _mm256_set1_ps(base[g]);
      acc2[g] = _mm256_setzero_ps();
    }
    for (int w = 0; w < wpr; ++w) {
      const __m256i words = vgather_u32(kp + 4 * ((size_t)t0 * wpr + w), vindex);
      const float* qw = qs + w * 16;
      const u32 wm = pi.wide[w];
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) {
        __m256i idx = _mm256_srli_epi32(words, 2 * p);
        __m256 val;
        if ((wm >> p) & 1u) {
          const int bits = (int)((wplane[pi.hrow[w * 16 + p] * (P / 32) + t0 / 32] >> (t0 & 31)) & 0xffu);
          const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane_bit), lane_bit);
          idx = _mm256_or_si256(_mm256_and_si256(idx, three), _mm256_and_si256(set, four));
          val = _mm256_permutevar8x32_ps(hlut, idx);
        } else {
          val = _mm256_permutevar8x32_ps(lut, idx);
        }
        __m256* a = p & 1 ? acc2 : acc;
        for (int g = 0; g < NG; ++g) a[g] = _mm256_fmadd_ps(_mm256_set1_ps(qw[g * D + p]), val, a[g]);
      }
    }
    for (int g = 0; g < NG; ++g) _mm256_storeu_ps(s + g * P + t0, _mm256_add_ps(acc[g], acc2[g]));
  }
#else
  (void)next;
  (void)T;
  (void)kw;
  std::vector<float> level(D);
  for (int t = 0; t < cnt; ++t) {
    for (int i = 0; i < D; ++i) {
      u32 word;
      std::memcpy(&word, kp + 4 * ((size_t)t * wpr + i / 16), 4);
      const int c = (int)((word >> (2 * (i % 16))) & 3u);
      if ((pi.wide[i / 16] >> (i % 16)) & 1u) {
        const int top = (int)((wplane[pi.hrow[i] * (P / 32) + t / 32] >> (t % 32)) & 1u);
        level[i] = pi.hcb16[c | (top << 2)];
      } else {
        level[i] = pi.cb16[c];
      }
    }
    for (int g = 0; g < NG; ++g) s[g * P + t] = base[g] + dot(qs + g * D, level.data(), D);
  }
#endif
}

// What P.V adds to each head's accumulator besides the codes' sum: plo[g] on every channel (the
// tokens' offsets) and pe[g] * ev[d] (the exact token; ev null: none).
struct PvExtra {
  const float *plo, *pe, *ev;
  PvExtra at(int g0) const { return {plo + g0, pe + g0, ev}; }
};

// Code groups of a V row that hold a token in the context: group w holds tokens of
// [64 (w % (P / 64)), + 64) (layout.py's code order).
inline u32 live_groups(int P, int cnt) {
  u32 live = 0;
  for (int w = 0; w < P / 16; ++w) live |= (u32)(64 * (w % (P / 64)) < cnt) << w;
  return live;
}

#if KIVI_SIMD
// The start of one channel block [d0, d0 + kVec) of the P.V accumulators of NG heads, in two chains
// (even / odd tokens, so consecutive adds do not wait on each other): a = acc + plo, a2 = pe * ev
// (the exact token), or 0. pv_page and pv_page_codes both begin here.
template <int NG>
inline void pv_block_start(const PvExtra& ex, const float* acc, int D, int d0, vf* a, vf* a2) {
  for (int g = 0; g < NG; ++g) {
    a[g] = vadd(vload(acc + g * D + d0), vset1(ex.plo[g]));
    a2[g] = ex.ev ? vmul(vset1(ex.pe[g]), vload(ex.ev + d0)) : vzero();
  }
}
#endif

#if KIVI_AVX512
// acc[g * D + d] += plo[g] + pe[g] * ev[d] (PvExtra) + sum_i pp'[g, i] * v_cb[code(token i, d)] for
// NG query heads (pp' = p * v_scale, zero for the exact token and past the context), pp' through
// the pair tables T (build_pv_tables).
template <int NG>
void pv_page(const Layout& L, const PageInfo& pi, const float* T, const u32* vw, const PvExtra& ex, float* acc,
             int cnt, const u8* next) {
  const int D = L.head_dim, P = L.page_size, wpr = P / 16;
  const u8* vp = pi.page + L.v_plane0;
  const u32 live = live_groups(P, cnt);
  for (int d0 = 0; d0 < D; d0 += 16) {
    if (next) prefetch_lines(next + L.v_plane0 + (size_t)d0 * wpr * 4, 16 * wpr * 4);
    __m512 a[NG], a2[NG];  // even / odd pairs, as in score_page
    pv_block_start<NG>(ex, acc, D, d0, a, a2);
    for (int w = 0; w < wpr; ++w) {
      if (!((live >> w) & 1u)) continue;  // every token of this group is past the context
      const __m512i words = _mm512_load_si512(vw + ((size_t)d0 / 16 * wpr + w) * 16);
      const float* t = T + (size_t)w * 8 * NG * 16;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        const __m512i idx = _mm512_srli_epi32(words, 4 * k);
        __m512* x = k & 1 ? a2 : a;
        for (int g = 0; g < NG; ++g)
          x[g] = _mm512_add_ps(x[g], _mm512_permutexvar_ps(idx, _mm512_load_ps(t + (k * NG + g) * 16)));
      }
    }
    for (int g = 0; g < NG; ++g) _mm512_storeu_ps(acc + g * D + d0, _mm512_add_ps(a[g], a2[g]));
  }
}

// The same without stored tables, for NG heads x D / 16 channel blocks <= 16 accumulators (D = 64
// with up to 4 heads: SmolLM's 3): the token pairs outermost, each pair's NG tables built in
// registers and used by every channel block at once. The same operations as build_pv_tables +
// pv_page, less one 64-byte store and its reload per table (a fifth of a small page's time).
template <int NG, int DB>
void pv_page_fused(const Layout& L, const PageInfo& pi, const Perm& perm, const float* pp, const u32* vw,
                   const PvExtra& ex, float* acc, int cnt, const u8* next) {
  static_assert(NG * DB <= 16, "accumulators in registers");
  constexpr int D = DB * 16;
  const int P = L.page_size, wpr = P / 16;
  const u8* vp = pi.page + L.v_plane0;
  const u32 live = live_groups(P, cnt);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 cbv = _mm512_load_ps(pi.vcb16);
  const __m512 na = _mm512_permutexvar_ps(_mm512_and_si512(lanes, _mm512_set1_epi32(3)), cbv);
  const __m512 nb = _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 2), cbv);
  const int pf_bytes = D * 4;  // the next page's V plane: a wpr-th of it per code group w (not all at once:
                               // a burst of 32 lines fills the line fill buffers and stalls the loads)
  __m512 a[DB][NG];
  for (int db = 0; db < DB; ++db)
    for (int g = 0; g < NG; ++g) {
      const int d = db * 16;
      const __m512 x = _mm512_add_ps(_mm512_loadu_ps(acc + g * D + d), _mm512_set1_ps(ex.plo[g]));
      a[db][g] = ex.ev ? _mm512_fmadd_ps(_mm512_set1_ps(ex.pe[g]), _mm512_loadu_ps(ex.ev + d), x) : x;
    }
  for (int w = 0; w < wpr; ++w) {
    if (next) prefetch_lines(next + L.v_plane0 + (size_t)w * pf_bytes, pf_bytes);
    if (!((live >> w) & 1u)) continue;  // every token of this group is past the context
    __m512i words[DB];
    for (int db = 0; db < DB; ++db) words[db] = _mm512_load_si512(vw + ((size_t)db * wpr + w) * 16);
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const int j = w * 8 + k;
      const float* ta = pp + perm.v[2 * j];
      const float* tb = pp + perm.v[2 * j + 1];
      __m512 t[NG];
      for (int g = 0; g < NG; ++g)
        t[g] = _mm512_fmadd_ps(_mm512_set1_ps(ta[g * P]), na, _mm512_mul_ps(_mm512_set1_ps(tb[g * P]), nb));
      for (int db = 0; db < DB; ++db) {  // (the words shifted as used, as in score_blocks)
        for (int g = 0; g < NG; ++g) a[db][g] = _mm512_add_ps(a[db][g], _mm512_permutexvar_ps(words[db], t[g]));
        words[db] = _mm512_srli_epi32(words[db], 4);
      }
    }
  }
  for (int db = 0; db < DB; ++db)
    for (int g = 0; g < NG; ++g) _mm512_storeu_ps(acc + g * D + db * 16, a[db][g]);
}
#else
// The same one code at a time, `pp` (pp') in packed token order (stride P per head): per code a
// shift, a lookup in the codebook replicated over the lanes and one FMA per head.
template <int NG>
void pv_page_codes(const Layout& L, const PageInfo& pi, const float* pp, const PvExtra& ex, float* acc, int cnt,
                   const u8* next) {
  const int D = L.head_dim, P = L.page_size, wpr = P / 16;
  const u8* vp = pi.page + L.v_plane0;
  const u32 live = live_groups(P, cnt);
#if KIVI_SIMD
  const vf lut = vload_a(pi.vcb16);
  const vi vindex = vlanes_times(wpr);
  for (int d0 = 0; d0 < D; d0 += kVec) {
    if (next) prefetch_lines(next + L.v_plane0 + (size_t)d0 * wpr * 4, kVec * wpr * 4);
    vf a[NG], a2[NG];
    pv_block_start<NG>(ex, acc, D, d0, a, a2);
    for (int w = 0; w < wpr; ++w) {
      if (!((live >> w) & 1u)) continue;
      const vi words = vgather_u32(vp + 4 * ((size_t)d0 * wpr + w), vindex);
      const float* pw = pp + w * 16;
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) {
        const vf val = vlut(lut, vsrl_n(words, 2 * p));
        vf* x = p & 1 ? a2 : a;
        for (int g = 0; g < NG; ++g) x[g] = vfma(vset1(pw[g * P + p]), val, x[g]);
      }
    }
    for (int g = 0; g < NG; ++g) vstore(acc + g * D + d0, vadd(a[g], a2[g]));
  }
#else
  (void)next;
  for (int g = 0; g < NG; ++g)
    for (int d = 0; d < D; ++d) acc[g * D + d] += ex.plo[g] + (ex.ev ? ex.pe[g] * ex.ev[d] : 0.0f);
  for (int d = 0; d < D; ++d) {
    for (int w = 0; w < wpr; ++w) {
      if (!((live >> w) & 1u)) continue;
      u32 word;
      std::memcpy(&word, vp + 4 * ((size_t)d * wpr + w), 4);
      for (int p = 0; p < 16; ++p) {
        const float val = pi.vcb16[(word >> (2 * p)) & 3u];
        for (int g = 0; g < NG; ++g) acc[g * D + d] += pp[g * P + w * 16 + p] * val;
      }
    }
  }
#endif
}
#endif

// f(integral_constant<n>) for n = 64, 128, 256 (head_dim, page size)
template <typename F>
inline void by_size(int n, F&& f) {
  switch (n) {
    case 64: f(std::integral_constant<int, 64>()); break;
    case 128: f(std::integral_constant<int, 128>()); break;
    case 256: f(std::integral_constant<int, 256>()); break;
    default: break;
  }
}

template <typename F>
inline void by_group(int n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
#if !KIVI_AVX2
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
#endif
    default: break;
  }
}

// ------------------------------------------------------------------------------ one work item
struct Args {
  const Layout* L;
  int dtype;
  const void *query, *key, *value, *staging;
  const u8* pages;
  int Hkv, sdtype;  // sdtype: the staging rows' format (`dtype`, or kI8)
  int Hq;
  i64 q_stride, k_stride, v_stride, o_stride;  // elements from one token's row to the next
  float qscale;  // softmax scale * log2(e)
  void* out;
};

// One decode row of the batch (a sequence with one new token), as validated.
struct Row {
  int b;         // its sequence (block-table row)
  int row;       // its token row in query / key / value / out
  int ctx;       // cached tokens it attends (seq_len - 1)
  int tail;      // staging slot of its open last page (-1: none)
  int n_quant;   // quantized pages read from blocks
  bool staged;   // the last context page is read from the staging slot
  int blocks;    // its block ids: Plan::blocks[blocks .. blocks + n_quant)
};

// A (decode row, KV head)'s work is its units: its quantized pages, then one unit for the staged
// tail and the new token (the new token alone where nothing is staged). An item takes units
// [u0, u1) of one (row, KV head); the items of a (row, KV head) are consecutive, `split` of `n_splits`.
struct Item {
  int r, h, split, n_splits;  // decode row (index into Plan::rows), KV head, split
  int u0, u1;                 // its units
};

// The running softmax of G query heads: max m (log2 domain), sum l, un-normalised output acc.
// With v_rotate, racc (else null) holds the quantized pages' part of the output in the rotated
// space (the V codes describe v @ R): run_item adds racc @ R.T to acc once, at its end.
struct State {
  float *m, *l, *acc, *racc;
};

// Table floats of one head group: the score tables (D / 2 narrow slots, then at most 2 per wide
// channel) or the P.V tables (P / 2 slots), 16 floats each.
inline size_t table_floats(const Layout& L, int G) {
#if KIVI_AVX512
  const size_t slots = std::max<size_t>((size_t)L.head_dim / 2 * 2 + 2 * (size_t)L.hi, (size_t)L.page_size / 2);
  return slots * 16 * (size_t)std::min(G, kMaxGroup);
#else
  (void)L;
  (void)G;
  return 0;
#endif
}

// Per-thread buffers; q/qp per item, the rest per page. "packed": in the code order of a packed
// row (Perm), so the inner loops read them at constant offsets. Carved out of one thread-local
// arena that persists across calls (OpenMP keeps its threads), never zero-filled.
struct Scratch {
  float *q, *qp, *qs, *scp, *base, *s, *p, *pp, *ppp, *plo, *pe, *ek, *ev, *rows, *tab, *racc;
  u32 *kw, *vw;  // avx512: the page's K and V code words regrouped word-major (plane_words)
  PageInfo pi;
  Scratch(const Layout& L, int G) {
    const size_t D = L.head_dim, P = L.page_size;
#if KIVI_AVX512
    const size_t plane = D * P / 16;
#else
    const size_t plane = 0;
#endif
    const size_t sizes[] = {G * D, G * D, G * D, D, (size_t)G, G * P, G * P, G * P, G * P, (size_t)G, (size_t)G,
                            D, D, kRowBlock * D, table_floats(L, G), L.v_rotate ? G * D : 0,
                            plane, plane};
    constexpr size_t n = sizeof(sizes) / sizeof(sizes[0]);
    size_t total = 0;
    for (size_t x : sizes) total += (x + 15) / 16 * 16;
    thread_local std::vector<float> arena;
    if (arena.size() < total + 16) arena.resize(total + 16);
    float* cur = arena.data() + (16 - reinterpret_cast<uintptr_t>(arena.data()) / 4 % 16) % 16;  // 64-byte aligned
    float* words[2];
    float** dst[] = {&q, &qp, &qs, &scp, &base, &s, &p, &pp, &ppp, &plo, &pe, &ek, &ev, &rows, &tab, &racc,
                     &words[0], &words[1]};
    static_assert(sizeof(dst) / sizeof(dst[0]) == n, "one pointer per size");
    for (size_t i = 0; i < n; ++i) {
      *dst[i] = cur;
      cur += (sizes[i] + 15) / 16 * 16;
    }
    kw = reinterpret_cast<u32*>(words[0]);
    vw = reinterpret_cast<u32*>(words[1]);
  }
};

// Online-softmax update of head g with scores s[0, n_vec) (already -inf past the valid tokens)
// whose maximum is smax: rescales acc and l, leaves p[t] = 2^(s[t] - m_new) (0 past the valid
// tokens). With `vsc` (a page): also pp[t] = p[t] * vsc[t], and returns sum_t p[t] * vlo[t] (one
// pass over the tokens for all of it).
inline float softmax_update(State& st, int g, int D, const float* s, float smax, float* p, int n_vec,
                            const float* vsc = nullptr, const float* vlo = nullptr, float* pp = nullptr) {
  const float m_new = std::max(st.m[g], smax);
  if (m_new == kNegInf) {  // nothing to attend (cannot happen for a non-empty page)
    std::fill(p, p + n_vec, 0.0f);
    if (pp) std::fill(pp, pp + n_vec, 0.0f);
    return 0.0f;
  }
  if (m_new != st.m[g]) {  // the maximum grew: rescale what was summed so far (alpha 0 when m was -inf)
    const float alpha = std::exp2(st.m[g] - m_new);
    st.l[g] *= alpha;
    scale_row(st.acc + (size_t)g * D, alpha, D);
    if (st.racc) scale_row(st.racc + (size_t)g * D, alpha, D);
    st.m[g] = m_new;
  }
  float l = 0.0f, plo = 0.0f;
#if KIVI_SIMD
  const vf mv = vset1(m_new);
  vf sum = vzero(), lo = vzero();
  for (int t = 0; t < n_vec; t += kVec) {
    const vf x = exp2v(vsub(vload(s + t), mv));
    vstore(p + t, x);
    sum = vadd(sum, x);
    if (vsc) {
      lo = vfma(x, vload(vlo + t), lo);
      vstore(pp + t, vmul(x, vload(vsc + t)));
    }
  }
  l = hsum(sum);
  plo = hsum(lo);
#else
  for (int t = 0; t < n_vec; ++t) l += (p[t] = std::exp2(s[t] - m_new));
  if (vsc) {
    for (int t = 0; t < n_vec; ++t) pp[t] = p[t] * vsc[t];
    plo = dot(p, vlo, n_vec);
  }
#endif
  st.l[g] += l;
  return plo;
}

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

// One quantized page (tokens [0, cnt) of it in the context) for all G heads.
void attend_page(const Args& a, const Perm& perm, Scratch& sc, State& st, int G, const u8* page, int cnt,
                 const u8* next) {
  const Layout& L = *a.L;
  const int D = L.head_dim, P = L.page_size;
  PageInfo& pi = sc.pi;
  pi.load(L, perm, page);
  if (next) prefetch_lines(next + L.k_lo, L.page_bytes - L.k_lo);  // the next page's metadata
  gather(pi.sc, perm.k, D, sc.scp);
  for (int g = 0; g < G; ++g) {
    const float* qp = sc.qp + (size_t)g * D;
    float* qs = sc.qs + (size_t)g * D;
#if KIVI_SIMD
    for (int i = 0; i < D; i += kVec) vstore(qs + i, vmul(vload(qp + i), vload(sc.scp + i)));
#else
    for (int i = 0; i < D; ++i) qs[i] = qp[i] * sc.scp[i];
#endif
    sc.base[g] = dot(sc.q + (size_t)g * D, pi.lo, D);
  }
  const int cnt_vec = round_up(cnt, kVec);
#if KIVI_AVX512
  // both planes regrouped up front: the V part overlaps the scores (2 % faster than just before P.V)
  plane_words(page + L.k_plane0, D / 16, cnt_vec / 16, sc.kw);
  plane_words(page + L.v_plane0, P / 16, D / 16, sc.vw);
#endif
  for (int g0 = 0; g0 < G; g0 += kMaxGroup) {
    by_group(std::min(kMaxGroup, G - g0), [&](auto NG) {
      constexpr int ng = decltype(NG)::value;
#if KIVI_AVX512
      by_size(D, [&](auto DD) { build_score_tables<ng, decltype(DD)::value>(pi, sc.qs + (size_t)g0 * D, sc.tab); });
#endif
      score_page<ng>(L, pi, sc.qs + (size_t)g0 * D, sc.tab, sc.kw, sc.base + g0, sc.s + (size_t)g0 * P, cnt_vec,
                     g0 == 0 ? next : nullptr);
    });
  }
  // Sparse corrections: K outliers (not on the exact token), then the exact token's own score.
  if (L.outliers) {
    for (int d = 0; d < D; ++d) {
      const int t = page[L.kout_idx + d];
      if (t >= cnt || t == pi.exact) continue;
      const int c = k_code(L, page, t, d, pi.hi_pos);
      const float level = pi.hi_pos[d] >= 0 ? pi.hcb16[c] : pi.cb16[c];
      const float delta = page_f16(page, L.kout_val, d) - (pi.lo[d] + pi.sc[d] * level);
      for (int g = 0; g < G; ++g) sc.s[(size_t)g * P + t] += sc.q[(size_t)g * D + d] * delta;
    }
  }
  const bool exact = pi.exact >= 0 && pi.exact < cnt;
  if (exact) {
    f16_row(page + L.exact_k, D, sc.ek);
    f16_row(page + L.exact_v, D, sc.ev);
    for (int g = 0; g < G; ++g) sc.s[(size_t)g * P + pi.exact] = dot(sc.q + (size_t)g * D, sc.ek, D);
  }
  float* smax = sc.pe;  // the heads' maxima first: independent reductions that overlap
  for (int g = 0; g < G; ++g) {
    float* s = sc.s + (size_t)g * P;
    for (int t = cnt; t < cnt_vec; ++t) s[t] = kNegInf;
    smax[g] = vmax_of(s, cnt_vec);
  }
  for (int g = 0; g < G; ++g) {
    float* s = sc.s + (size_t)g * P;
    float* p = sc.p + (size_t)g * P;
    float* pp = sc.pp + (size_t)g * P;
    float plo = softmax_update(st, g, D, s, smax[g], p, cnt_vec, pi.vsc, pi.vlo, pp);
    sc.pe[g] = 0.0f;  // (smax is done with: pe reuses its buffer)
    if (exact) {
      sc.pe[g] = p[pi.exact];
      plo -= p[pi.exact] * pi.vlo[pi.exact];
      pp[pi.exact] = 0.0f;
    }
    sc.plo[g] = plo;
    for (int t = cnt_vec; t < P; ++t) pp[t] = 0.0f;
#if !KIVI_AVX512
    gather(pp, perm.v, P, sc.ppp + (size_t)g * P);
#endif
  }
  // P.V, its accumulators starting from acc + plo (+ pe * exact_v). With v_rotate the coded part
  // goes to racc (rotated space) and the exact token's, unrotated, straight to acc.
  float* const pv_acc = st.racc ? st.racc : st.acc;
  if (st.racc && exact)
    for (int g = 0; g < G; ++g) axpy(st.acc + (size_t)g * D, sc.pe[g], sc.ev, D);
  const PvExtra ex{sc.plo, sc.pe, exact && !st.racc ? sc.ev : nullptr};
  for (int g0 = 0; g0 < G; g0 += kMaxGroup) {
    by_group(std::min(kMaxGroup, G - g0), [&](auto NG) {
      constexpr int ng = decltype(NG)::value;
      const PvExtra e = ex.at(g0);
#if KIVI_AVX512
      if constexpr (ng <= 4) {
        if (D == 64) {  // (at D = 128, two such passes, each building the tables, are slower)
          pv_page_fused<ng, 4>(L, pi, perm, sc.pp + (size_t)g0 * P, sc.vw, e, pv_acc + (size_t)g0 * D, cnt,
                               g0 == 0 ? next : nullptr);
          return;
        }
      }
      by_size(P, [&](auto PP) { build_pv_tables<ng, decltype(PP)::value>(pi, perm, sc.pp + (size_t)g0 * P, sc.tab); });
      pv_page<ng>(L, pi, sc.tab, sc.vw, e, pv_acc + (size_t)g0 * D, cnt, g0 == 0 ? next : nullptr);
#else
      pv_page_codes<ng>(L, pi, sc.ppp + (size_t)g0 * P, e, pv_acc + (size_t)g0 * D, cnt, g0 == 0 ? next : nullptr);
#endif
    });
  }
}

// ------------------------------------------------------------------------------ the tail

// Rows t0 .. t0 + nb of (the n staged rows at `rows`, `stride` bytes apart, then `fresh`, the new
// token's) as fp32: out[r] points into buf (or at an fp32 source row).
inline void tail_rows(const Args& a, const u8* rows, size_t stride, int n, const u8* fresh, int t0, int nb,
                      float* buf, const float** out) {
  const int D = a.L->head_dim;
  for (int r = 0; r < nb; ++r) {
    const int t = t0 + r;
    out[r] = t < n ? row_f32(rows + t * stride, a.sdtype, a.dtype, D, buf + (size_t)r * D)
                   : row_f32(fresh, a.dtype, a.dtype, D, buf + (size_t)r * D);
  }
}

// s[g * P + r] = q_g . rows[r] for r < nb and every head (four rows per horizontal reduction).
inline void score_rows(const float* q, int G, int D, const float* const* rows, int nb, float* s, int P) {
  for (int g = 0; g < G; ++g) {
    const float* qg = q + (size_t)g * D;
    float* sg = s + (size_t)g * P;
    int r = 0;
#if KIVI_SIMD
    for (; r + 4 <= nb; r += 4) {
      vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      for (int i = 0; i < D; i += kVec) {
        const vf x = vload(qg + i);
        a0 = vfma(x, vload(rows[r] + i), a0);
        a1 = vfma(x, vload(rows[r + 1] + i), a1);
        a2 = vfma(x, vload(rows[r + 2] + i), a2);
        a3 = vfma(x, vload(rows[r + 3] + i), a3);
      }
      _mm_storeu_ps(sg + r, reduce4(a0, a1, a2, a3));
    }
#endif
    for (; r < nb; ++r) sg[r] = dot(qg, rows[r], D);
  }
}

// acc[g * D + d] += sum_r p[g * P + r] * rows[r][d] for NG heads, channels in chunks held in
// registers over the nb rows.
template <int NG>
inline void pv_rows(const float* p, int P, const float* const* rows, int nb, float* acc, int D) {
#if KIVI_SIMD
  constexpr int C = NG <= 4 ? 4 : 2;  // vectors per chunk: NG * C <= 16 accumulators
  for (int c0 = 0; c0 < D; c0 += C * kVec) {
    vf x[NG][C];
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < C; ++c) x[g][c] = vload(acc + (size_t)g * D + c0 + c * kVec);
    for (int r = 0; r < nb; ++r) {
      for (int c = 0; c < C; ++c) {
        const vf v = vload(rows[r] + c0 + c * kVec);
        for (int g = 0; g < NG; ++g) x[g][c] = vfma(vset1(p[g * P + r]), v, x[g][c]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < C; ++c) vstore(acc + (size_t)g * D + c0 + c * kVec, x[g][c]);
  }
#else
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < nb; ++r) axpy(acc + (size_t)g * D, p[g * P + r], rows[r], D);
#endif
}

// The staged tail (`n` rows of `a.sdtype` at krows / vrows, `stride` bytes apart) and the new token
// (knew / vnew, model dtype): full-precision rows, attended exactly, kRowBlock rows at a time.
// n + 1 <= P.
void attend_rows(const Args& a, Scratch& sc, State& st, int G, const u8* krows, const u8* vrows, size_t stride,
                 int n, const u8* knew, const u8* vnew) {
  const int D = a.L->head_dim, P = a.L->page_size, m = n + 1, m_vec = round_up(m, kVec);
  const float* rp[kRowBlock];
  for (int t0 = 0; t0 < m; t0 += kRowBlock) {
    const int nb = std::min(kRowBlock, m - t0);
    tail_rows(a, krows, stride, n, knew, t0, nb, sc.rows, rp);
    score_rows(sc.q, G, D, rp, nb, sc.s + t0, P);
  }
  for (int g = 0; g < G; ++g) {
    float* s = sc.s + (size_t)g * P;
    for (int t = m; t < m_vec; ++t) s[t] = kNegInf;
    softmax_update(st, g, D, s, vmax_of(s, m_vec), sc.p + (size_t)g * P, m_vec);
  }
  for (int t0 = 0; t0 < m; t0 += kRowBlock) {
    const int nb = std::min(kRowBlock, m - t0);
    tail_rows(a, vrows, stride, n, vnew, t0, nb, sc.rows, rp);
    for (int g0 = 0; g0 < G; g0 += kMaxGroup) {
      by_group(std::min(kMaxGroup, G - g0), [&](auto NG) {
        pv_rows<decltype(NG)::value>(sc.p + (size_t)g0 * P + t0, P, rp, nb, st.acc + (size_t)g0 * D, D);
      });
    }
  }
}

void attend_units(const Args& a, const Perm& perm, const Row& r, const int32_t* table, const Item& it, Scratch& sc,
                  State st) {
  const Layout& L = *a.L;
  const int D = L.head_dim, P = L.page_size, G = a.Hq / a.Hkv;
  // this KV head's query rows, scaled into the log2 domain
  const int esize = dtype_size(a.dtype);
  const u8* qrow = static_cast<const u8*>(a.query) + ((size_t)r.row * a.q_stride + (size_t)it.h * G * D) * esize;
  to_f32_row(qrow, a.dtype, G * D, sc.q);
  scale_row(sc.q, a.qscale, G * D);
  for (int g = 0; g < G; ++g) gather(sc.q + (size_t)g * D, perm.k, D, sc.qp + (size_t)g * D);

  const int p0 = std::min(r.n_quant, it.u0), p1 = std::min(r.n_quant, it.u1);
  for (int i = p0; i < p1; ++i) {
    const u8* page = a.pages + ((size_t)table[i] * a.Hkv + it.h) * L.page_bytes;
    const u8* next = i + 1 < p1 ? a.pages + ((size_t)table[i + 1] * a.Hkv + it.h) * L.page_bytes : nullptr;
    attend_page(a, perm, sc, st, G, page, std::min(P, r.ctx - i * P), next);
  }
  if (it.u1 <= r.n_quant) return;  // (the tail unit is the last: it.u1 == n_quant + 1)
  const u8* knew = static_cast<const u8*>(a.key) + ((size_t)r.row * a.k_stride + (size_t)it.h * D) * esize;
  const u8* vnew = static_cast<const u8*>(a.value) + ((size_t)r.row * a.v_stride + (size_t)it.h * D) * esize;
  if (!r.staged) {
    attend_rows(a, sc, st, G, nullptr, nullptr, 0, 0, knew, vnew);
    return;
  }
  const size_t stride = staged_row_bytes(a.sdtype, D), head = (size_t)P * stride;
  const u8* slot = static_cast<const u8*>(a.staging) + ((size_t)r.tail * 2 * a.Hkv + it.h) * head;
  attend_rows(a, sc, st, G, slot, slot + (size_t)a.Hkv * head, stride, r.ctx - r.n_quant * P, knew, vnew);
}

// Work item `it`: its units attended into st (m, l, acc: its split's part of the output).
void run_item(const Args& a, const Perm& perm, const Row& r, const int32_t* table, const Item& it, Scratch& sc,
              State st) {
  const int D = a.L->head_dim, G = a.Hq / a.Hkv;
  for (int g = 0; g < G; ++g) {
    st.m[g] = kNegInf;
    st.l[g] = 0.0f;
  }
  std::fill(st.acc, st.acc + (size_t)G * D, 0.0f);
  if (st.racc) std::fill(st.racc, st.racc + (size_t)G * D, 0.0f);
  attend_units(a, perm, r, table, it, sc, st);
  if (!st.racc || std::min(r.n_quant, it.u1) <= std::min(r.n_quant, it.u0)) return;  // no quantized page
  // sum_t p_t v_t = (sum_t p_t (v_t R)) R.T: the rotated part back, once per head (linear, so before
  // the splits' log-sum-exp merge)
  rotate_value_rows(st.racc, G, D, true);
  for (size_t i = 0; i < (size_t)G * D; ++i) st.acc[i] += st.racc[i];
}

}  // namespace
}  // namespace kivi_cpu

using namespace kivi_cpu;

KIVI_API const char* kivi_isa() { return kIsa; }

// Set (on != 0) or clear flush-to-zero + denormals-are-zero in the threads of the OpenMP pool that
// torch (and vLLM's CPU ops) share with this library. For benchmarks: vLLM's CPU attention runs
// ~20x slower when its scratch memory happens to hold denormals; our decode sets it on its own.
KIVI_API void kivi_flush_denormals(int on, int nthreads) {
#if defined(__SSE__)
#pragma omp parallel num_threads(std::max(1, nthreads))
  {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(on ? (csr | 0x8040u) : (csr & ~0x8040u));
  }
#else
  (void)on;
  (void)nthreads;
#endif
}

// ------------------------------------------------------------------------------ the batch
// A step's decode metadata, validated once and then used by every layer's call (kivi_decode_prepare /
// kivi_decode_run): the decode rows, the work items, and a copy of the metadata as it was checked.
// A run first compares the caller's metadata tensors with that copy (a stale plan, e.g. one kept past
// its step while vLLM rewrites the block table in place, is refused: kStale), then reads only the copy.
struct Plan {
  Layout L;
  i64 num_blocks = 0;
  int Hkv = 0, S = 0, B = 0, bt_stride = 0;
  int need_rows = 0;  // query_start_loc[B]: query / key / value / out must have at least these rows
  const int32_t *bt = nullptr, *seq_lens = nullptr, *qsl = nullptr, *tails = nullptr;  // the caller's
  std::vector<int32_t> meta;    // seq_lens[B], query_start_loc[B + 1], tail_slots[B] as validated
  std::vector<int32_t> blocks;  // block ids of the decode rows' quantized pages, row after row
  std::vector<Row> rows;
  std::vector<Item> items;
  std::vector<int> first_of;    // first item of each item's (row, KV head)
  std::vector<int> chunks;      // chunk c (what a thread takes at a time): items [chunks[c], chunks[c + 1])
  int team_max = 1;             // threads worth starting (1: too little work to split)
};

// Below this many quantized pages + staged tails in a whole call, run on the calling thread: an
// OpenMP fork/join (and the split merges it needs) costs more than a second thread saves.
constexpr int kMinParallelUnits = 4;

// With at least this many (decode row, KV head)s per thread, each is one item (dynamic scheduling
// balances them); with fewer, their units are cut into kChunksPerThread equal chunks per thread.
constexpr int kPairsPerThread = 8;
constexpr int kChunksPerThread = 1;

// The plan's work items and chunks (rows built):
// - num_splits > 0: each (row, KV head)'s units in that many even splits, one chunk each;
// - at least kPairsPerThread (row, KV head)s per thread: one item, one chunk each;
// - fewer (batch 1 is the case): the units of all (row, KV head)s, in order, cut into
//   kChunksPerThread * threads chunks of equal units, an item wherever a chunk meets a (row, KV
//   head): every thread gets the same number of pages, staged tails counted, where splitting each
//   head on its own left up to a page or more of imbalance (3 KV heads of 8 units on 2 threads).
static void plan_work(Plan& p, int n_splits, int nthreads) {
  const int nt = std::max(1, nthreads), Hkv = p.Hkv, n_pairs = (int)p.rows.size() * Hkv;
  i64 total = 0;
  int counted = 0;  // quantized pages + staged tails, for kMinParallelUnits
  for (const Row& r : p.rows) {
    total += (i64)(r.n_quant + 1) * Hkv;
    counted += (r.n_quant + (r.staged ? 1 : 0)) * Hkv;
  }
  p.items.clear();
  p.chunks.clear();
  const bool flat = n_splits <= 0 && n_pairs < kPairsPerThread * nt;
  const i64 K = std::max<i64>(1, std::min<i64>(total, (i64)kChunksPerThread * nt));
  i64 g = 0;  // units of the (row, KV head)s before this one
  for (int ri = 0; ri < (int)p.rows.size(); ++ri) {
    const int U = p.rows[ri].n_quant + 1;
    for (int h = 0; h < Hkv; ++h, g += U) {
      const int first = (int)p.items.size();
      if (!flat) {
        const int ns = n_splits > 0 ? std::min(n_splits, U) : 1;
        for (int s = 0; s < ns; ++s) {
          p.chunks.push_back((int)p.items.size());
          p.items.push_back({ri, h, s, ns, (int)((i64)s * U / ns), (int)((i64)(s + 1) * U / ns)});
        }
        continue;
      }
      for (i64 u = g; u < g + U;) {  // chunk c holds units [c * total / K, (c + 1) * total / K)
        const i64 c = (u * K + total - 1) / total;  // the first chunk starting at or after u ...
        const i64 start = c * total / K;
        const i64 chunk = start == u ? c : c - 1;  // ... or the one u lies in
        if (start == u) p.chunks.push_back((int)p.items.size());
        const i64 end = std::min(g + U, (chunk + 1) * total / K);
        p.items.push_back({ri, h, 0, 0, (int)(u - g), (int)(end - g)});
        u = end;
      }
      const int ns = (int)p.items.size() - first;
      for (int s = 0; s < ns; ++s) {
        p.items[first + s].split = s;
        p.items[first + s].n_splits = ns;
      }
    }
  }
  const int n_items = (int)p.items.size();
  p.chunks.push_back(n_items);
  p.first_of.resize(n_items);
  for (int i = 0; i < n_items; ++i) p.first_of[i] = p.items[i].split == 0 ? i : p.first_of[i - 1];
  p.team_max = counted < kMinParallelUnits ? 1 : std::max(1, (int)p.chunks.size() - 1);
}

// Validate the metadata (before any memory is read through it) and build the plan's rows and items.
// On a bad argument returns a Status and err = {sequence, value}.
static int prepare(Plan& p, const Layout* L, i64 num_blocks, int Hkv, int S, const int32_t* block_tables,
                   int bt_stride, const int32_t* seq_lens, const int32_t* query_start_loc, const int32_t* tail_slots,
                   int B, int n_splits, int nthreads, i64* err) {
  err[0] = -1;
  err[1] = 0;
  if (L->k_bits != 2 || L->v_bits != 2 || Hkv <= 0 || B < 0 || bt_stride < 0) return kBadArgument;
  const int P = L->page_size;
  auto supported = [](int n) { return n == 64 || n == 128 || n == 256; };  // layout.SUPPORTED_*
  if (!supported(L->head_dim) || !supported(P)) return kBadArgument;
  p.L = *L;
  p.num_blocks = num_blocks;
  p.Hkv = Hkv;
  p.S = S;
  p.B = B;
  p.bt_stride = bt_stride;
  p.bt = block_tables;
  p.seq_lens = seq_lens;
  p.qsl = query_start_loc;
  p.tails = tail_slots;
  p.rows.clear();
  p.blocks.clear();
  p.items.clear();
  p.need_rows = 0;
  if (B > 0 && query_start_loc[0] < 0) {
    err[1] = query_start_loc[0];
    return kBadQueryLoc;
  }
  try {
    p.meta.assign(seq_lens, seq_lens + B);
    p.meta.insert(p.meta.end(), query_start_loc, query_start_loc + B + 1);
    p.meta.insert(p.meta.end(), tail_slots, tail_slots + B);
    for (int b = 0; b < B; ++b) {
      const int q0 = p.meta[B + b], q1 = p.meta[B + b + 1];
      if (q1 < q0) {
        err[0] = b;
        err[1] = q1;
        return kBadQueryLoc;
      }
      if (q1 - q0 != 1) continue;
      const int seq_len = p.meta[b], ctx = seq_len - 1, tail = p.meta[2 * B + 1 + b];
      err[0] = b;
      if (seq_len < 1) {
        err[1] = seq_len;
        return kBadSeqLen;
      }
      const int n_pages = (ctx + P - 1) / P;
      if (n_pages > bt_stride) {
        err[1] = n_pages;
        return kBadSeqLen;
      }
      const bool staged = tail >= 0 && n_pages * P > seq_len;
      if (staged && tail >= S) {
        err[1] = tail;
        return kBadSlot;
      }
      const int n_quant = staged ? n_pages - 1 : n_pages;
      const int32_t* table = block_tables + (size_t)b * bt_stride;
      for (int i = 0; i < n_quant; ++i) {
        if (table[i] < 0 || table[i] >= num_blocks) {
          err[1] = table[i];
          return kBadBlock;
        }
      }
      p.rows.push_back({b, q0, ctx, staged ? tail : -1, n_quant, staged, (int)p.blocks.size()});
      p.blocks.insert(p.blocks.end(), table, table + n_quant);
    }
    if (B > 0) p.need_rows = p.meta[2 * B];
    err[0] = -1;
    plan_work(p, n_splits, nthreads);
  } catch (const std::bad_alloc&) {
    return kOutOfMemory;
  }
  return kOk;
}

// The caller's metadata still holds what `p` validated (else kStale, err = {sequence or -1, 0}).
static int unchanged(const Plan& p, i64* err) {
  const int B = p.B;
  const int32_t* m = p.meta.data();
  err[1] = 0;
  if (B > 0 && (std::memcmp(p.seq_lens, m, 4 * (size_t)B) || std::memcmp(p.qsl, m + B, 4 * (size_t)(B + 1)) ||
                std::memcmp(p.tails, m + 2 * B + 1, 4 * (size_t)B))) {
    err[0] = -1;
    return kStale;
  }
  for (const Row& r : p.rows) {
    const int32_t *live = p.bt + (size_t)r.b * p.bt_stride, *seen = p.blocks.data() + r.blocks;
    if (std::memcmp(live, seen, 4 * (size_t)r.n_quant)) {
      int i = 0;
      while (live[i] == seen[i]) ++i;
      err[0] = r.b;
      err[1] = live[i];  // the block id that changed
      return kStale;
    }
  }
  return kOk;
}

// What a run needs besides the plan: one layer's tensors. query [>= need_rows, Hq, D], key / value
// [>= need_rows, Hkv, D] and out [>= need_rows, Hq, D] of `dtype`, each token's row `*_stride` elements
// after the previous one (the heads and channels of a row dense); pages [num_blocks, Hkv, page_bytes]
// uint8; staging [S, 2, Hkv, P, W] rows of `sdtype` (`dtype`, or kI8 with W = D + 4 bytes).
struct Call {
  int dtype, sdtype, Hq, T;
  const void *query, *key, *value, *staging;
  const u8* pages;
  void* out;
  i64 q_stride, k_stride, v_stride, o_stride;
  int nthreads;
};

// Attention of every decode row of `p` for one layer. Only the rows of sequences with one new token
// are written.
static int run(const Plan& p, const Call& c, float scale, i64* err) {
  const Layout* L = &p.L;
  const int D = L->head_dim, Hkv = p.Hkv;
  if (c.Hq <= 0 || c.Hq % Hkv) return kBadArgument;
  if (c.T < p.need_rows) {
    err[0] = -1;
    err[1] = p.need_rows;
    return kBadQueryLoc;
  }
  const int G = c.Hq / Hkv;
  const int n_items = (int)p.items.size();
  if (n_items == 0) return kOk;
  // Per-call buffers of the calling thread, reused across calls (no allocation once grown).
  thread_local std::vector<float> work;
  thread_local std::vector<int> left;
  const size_t per_item = (size_t)G * (D + 2);
  try {
    work.resize((size_t)n_items * per_item);  // every item writes its part
    left.resize(n_items);
  } catch (const std::bad_alloc&) {
    return kOutOfMemory;
  }
  // The last split of a (sequence, KV head) to finish merges them all (a countdown per head, an
  // atomic decrement of left[first]): the only barrier is the join at the end of the parallel
  // region. (Every barrier is a chance to wait a whole time slice for a descheduled thread on a
  // busy machine.)
  for (int i = 0; i < n_items; ++i) left[i] = p.items[i].n_splits;
  const Args a{L, c.dtype, c.query, c.key, c.value, c.staging, c.pages, Hkv, c.sdtype, c.Hq,
               c.q_stride, c.k_stride, c.v_stride, c.o_stride, scale * 1.4426950408889634f, c.out};
  std::unique_ptr<Perm> own_perm;
  const Perm& perm = perm_for(D, L->page_size, own_perm);
  const int esize = dtype_size(c.dtype);
  const int team = std::max(1, std::min(std::max(1, c.nthreads), p.team_max));
  // (The buffers are thread_local: inside the parallel region only these pointers name the calling
  // thread's copies.)
  float* const work_p = work.data();
  int* const left_p = left.data();
  const int* const first_p = p.first_of.data();
  const Item* const items_p = p.items.data();
  const int* const chunks_p = p.chunks.data();
  const int n_chunks = (int)p.chunks.size() - 1;
  const Row* const rows_p = p.rows.data();
  const int32_t* const blocks_p = p.blocks.data();
#pragma omp parallel num_threads(team) if (team > 1)
  {
    FlushDenormals ftz;
    Scratch sc(*L, G);
    alignas(64) float o[kMaxDim];
#pragma omp for schedule(dynamic, 1) nowait
    for (int ch = 0; ch < n_chunks; ++ch)
    for (int i = chunks_p[ch]; i < chunks_p[ch + 1]; ++i) {
      float* w = work_p + i * per_item;
      const Row& r = rows_p[items_p[i].r];
      run_item(a, perm, r, blocks_p + r.blocks, items_p[i], sc,
               State{w, w + G, w + 2 * G, L->v_rotate ? sc.racc : nullptr});
      const int first = first_p[i];
      if (__atomic_fetch_sub(&left_p[first], 1, __ATOMIC_ACQ_REL) != 1) continue;
      // Merge the splits of this (sequence, KV head) by log-sum-exp and write its output rows.
      const Item& it = items_p[first];
      const int ns = it.n_splits;
      for (int g = 0; g < G; ++g) {
        float M = kNegInf;
        for (int s = 0; s < ns; ++s) M = std::max(M, work_p[(first + s) * per_item + g]);
        float l = 0.0f;
        std::fill(o, o + D, 0.0f);
        for (int s = 0; s < ns; ++s) {
          const float* ws = work_p + (first + s) * per_item;
          if (ws[G + g] == 0.0f) continue;  // an empty split (its max is -inf)
          const float f = std::exp2(ws[g] - M);
          l += ws[G + g] * f;
          axpy(o, f, ws + 2 * G + (size_t)g * D, D);
        }
        scale_row(o, l > 0.0f ? 1.0f / l : 0.0f, D);
        store_row(o, c.dtype, D,
                  static_cast<u8*>(c.out) + ((size_t)rows_p[it.r].row * c.o_stride + ((size_t)it.h * G + g) * D) * esize);
      }
    }
  }
  return kOk;
}

template <typename T>
static inline T* ptr(i64 v) { return reinterpret_cast<T*>(static_cast<uintptr_t>(v)); }

// The entry points' arguments after the layout, in int64 blocks (a decode call at short context is
// small enough that converting two dozen ctypes arguments shows: one pointer is converted instead);
// decode_attention.py fills them in this order. The last two entries of each block receive err.
//
// kivi_decode_prepare's block: the step's metadata and the cache it indexes.
enum PrepareArg : int {
  kPrepNumBlocks, kPrepHkv, kPrepSlots, kPrepBlockTables, kPrepBtStride, kPrepSeqLens, kPrepQsl, kPrepTails, kPrepB,
  kPrepSplits, kPrepThreads, kPrepErr, kNumPrepareArgs = kPrepErr + 2
};
// kivi_decode_run's block: one layer's tensors, kivi_cpu.h RunArg.

static int prepare_block(Plan& p, const Layout* L, i64* a) {
  return prepare(p, L, a[kPrepNumBlocks], (int)a[kPrepHkv], (int)a[kPrepSlots], ptr<const int32_t>(a[kPrepBlockTables]),
                 (int)a[kPrepBtStride], ptr<const int32_t>(a[kPrepSeqLens]), ptr<const int32_t>(a[kPrepQsl]),
                 ptr<const int32_t>(a[kPrepTails]), (int)a[kPrepB], (int)a[kPrepSplits], (int)a[kPrepThreads],
                 a + kPrepErr);
}

static int run_block(const Plan& p, i64* a, float scale) {
  const Call c{(int)a[kRunDtype], (int)a[kRunStagingDtype], (int)a[kRunHq], (int)a[kRunT],
               ptr<const void>(a[kRunQuery]), ptr<const void>(a[kRunKey]), ptr<const void>(a[kRunValue]),
               ptr<const void>(a[kRunStaging]), ptr<const u8>(a[kRunPages]), ptr<void>(a[kRunOut]),
               a[kRunQStride], a[kRunKStride], a[kRunVStride], a[kRunOStride], (int)a[kRunThreads]};
  return run(p, c, scale, a + kRunErr);
}

// Decode attention in one call: the metadata checked, then one layer attended (paged_attention).
// `prep`: a kivi_decode_prepare block, `call`: a kivi_decode_run block; errors land in prep's err.
KIVI_API int kivi_decode(const Layout* L, i64* prep, i64* call, float scale) {
  thread_local Plan plan;  // (reused: its vectors keep their capacity)
  const int status = prepare_block(plan, L, prep);
  if (status) return status;
  const int ran = run_block(plan, call, scale);
  if (ran) {
    prep[kPrepErr] = call[kRunErr];
    prep[kPrepErr + 1] = call[kRunErr + 1];
  }
  return ran;
}

// A step's decode metadata, checked once for every layer: a new plan (*status = kOk), or nullptr
// with *status and the block's err set.
KIVI_API void* kivi_decode_prepare(const Layout* L, i64* prep, int* status) {
  Plan* plan = new (std::nothrow) Plan();
  if (plan == nullptr) {
    *status = kOutOfMemory;
    return nullptr;
  }
  *status = prepare_block(*plan, L, prep);
  if (*status == kOk) return plan;
  delete plan;
  return nullptr;
}

// One layer's decode attention over a prepared plan; kStale if the caller's metadata changed since.
KIVI_API int kivi_decode_run(void* plan, i64* call, float scale) {
  const Plan& p = *static_cast<const Plan*>(plan);
  const int stale = unchanged(p, call + kRunErr);
  if (stale) return stale;
  return run_block(p, call, scale);
}

KIVI_API void kivi_decode_free(void* plan) { delete static_cast<Plan*>(plan); }
