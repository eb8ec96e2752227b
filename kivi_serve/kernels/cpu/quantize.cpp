// quantize.cpp — the page encoder and decoder on the CPU, bit for bit the PyTorch reference.
//
// Spec: kivi_serve/quant/page.py (quantize_pages, dequantize_pages) and quant/codebook.py; the
// CUDA twin is cuda/quantize_append.cu (same rules, one CTA per page there, one thread per page
// here). Entry points (extern "C", called through ctypes by kivi_serve/kernels/cpu/*.py):
//
//   kivi_quantize_pages    n pages from two row sources each (a prefix of `prefix` rows, then
//                          the rest): evict (all rows from a staging slot), finalize (slot or a
//                          dequantized old page, then this step's input rows), prefill pages.
//   kivi_dequantize_pages  n pages -> K and V rows in fp32 / bf16 / fp16 (reopen, prefill).
//   kivi_write_staging     this step's tokens of open pages -> their staging rows.
//
// OpenMP over pages. Every rule of the reference lives in one function below, in its order:
//   exact_token      the sink (token 0) or the argmax of the fp64 outlier score
//   choose_outliers  per K channel, drop the extreme that shrinks the range more
//   range_params     fp16 lo / scale of the kept elements
//   wide_and_weights the H widest channels (fp16 scale, ties to the lower channel) and the
//                    integer Lloyd weights rint(scale^2 / max scale^2 * 4096)
//   fit_codebook     fixed-point Lloyd-Max (ends pinned; V's free with v_pin_ends = 0), then fp16
//                    rounding, cummax and the uniform fallback; on a histogram of the 4097 fixed-point values, so
//                    each step costs O(levels) instead of O(P * D) — the integer cell sums are
//                    exact, so the order of summation cannot change a bit
//   pack_planes      codes in mma B-fragment order, bit planes, wide_plane for wide channels
// With v_rotate the V ranges, codebook and codes are those of each token's rotated value
// (kivi_cpu.h rotate_value_rows, the reference's fp32 operations in its order), and the decoder
// rotates the coded values back before the exact token overrides its row.
// The one known corner where the CPU may differ from torch: the exact-token score is an fp64
// sum over channels in another order than torch's, which matters only for two different
// tokens whose scores agree to ~1e-16 (the CUDA kernel has the same corner).
//
// Measured speed: docs/performance.md ("CPU kernels").

#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "kivi_cpu.h"

namespace kivi_cpu {

void to_f32_row(const void* src, int dtype, int n, float* dst) {
  if (dtype == kF32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else if (dtype == kBF16) {
    const u16* s = static_cast<const u16*>(src);
    for (int i = 0; i < n; ++i) dst[i] = f32_from_bits((u32)s[i] << 16);
  } else {
    const u16* s = static_cast<const u16*>(src);
    for (int i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
  }
}

void read_staged_rows(const u8* src, int sdtype, int n, int D, float* dst, int dtype) {
  if (sdtype != kI8) {
    to_f32_row(src, sdtype, n * D, dst);
    return;
  }
  for (int r = 0; r < n; ++r, src += D + 4, dst += D) {
    float scale;
    std::memcpy(&scale, src + D, 4);
    for (int d = 0; d < D; ++d) dst[d] = round_to(dtype, (float)(int8_t)src[d] * scale);
  }
}

void write_staged_row(const float* x, int sdtype, int D, u8* dst) {
  if (sdtype != kI8) {
    for (int d = 0; d < D; ++d) store_from_f32(dst, sdtype, d, x[d]);
    return;
  }
  float amax = 0.0f;
  for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float scale = amax / 127.0f;
  for (int d = 0; d < D; ++d) {
    const float c = scale > 0.0f ? std::nearbyint(x[d] / scale) : 0.0f;  // half to even
    dst[d] = (u8)(int8_t)std::min(127.0f, std::max(-127.0f, c));
  }
  std::memcpy(dst + D, &scale, 4);
}

// ------------------------------------------------------------------------------ page reader
void build_hi_pos(const Layout& L, const u8* page, int* hi_pos) {
  for (int d = 0; d < L.head_dim; ++d) hi_pos[d] = -1;
  for (int i = 0; i < L.hi; ++i) {
    const int d = page[L.wide_idx + i];
    if (d < L.head_dim) hi_pos[d] = i;
  }
}

static inline void packed_pos(int cols, int col, int& w, int& p) {
  const int g = col / 64, r = col % 64, kt = r / 16, r16 = r % 16;
  const int j = (r16 & 7) >> 1, e = (r16 & 1) | ((r16 >> 3) << 1);
  w = j * (cols / 64) + g;
  p = 4 * kt + e;
}

static inline int plane_code(int bits, const u8* page, int off0, int off1, int word, int p) {
  int c = (int)((page_u32(page, off0, word) >> (2 * p)) & 3u);
  if (bits == 3) c |= (int)((page_u16(page, off1, word) >> p) & 1u) << 2;
  if (bits == 4) c |= (int)((page_u32(page, off1, word) >> (2 * p)) & 3u) << 2;
  return c;
}

int k_code(const Layout& L, const u8* page, int t, int d, const int* hi_pos) {
  int w, p;
  packed_pos(L.head_dim, d, w, p);
  int c = plane_code(L.k_bits, page, L.k_plane0, L.k_plane1, t * (L.head_dim / 16) + w, p);
  if (L.hi > 0 && hi_pos[d] >= 0) {
    const u32 word = page_u32(page, L.wide_plane, hi_pos[d] * (L.page_size / 32) + t / 32);
    c |= (int)((word >> (t % 32)) & 1u) << L.k_bits;
  }
  return c;
}

int v_code(const Layout& L, const u8* page, int t, int d) {
  int w, p;
  packed_pos(L.page_size, t, w, p);
  return plane_code(L.v_bits, page, L.v_plane0, L.v_plane1, d * (L.page_size / 16) + w, p);
}

static inline int exact_index(const Layout& L, const u8* page) {
  if (!L.exact) return -1;
  int16_t idx;
  std::memcpy(&idx, page + L.exact_idx, 2);
  return idx;
}

// lo + scale * cb[code] (product and sum rounded separately), then the K outlier, then the exact token.
float dequant_k(const Layout& L, const u8* page, int t, int d, const int* hi_pos) {
  const int c = k_code(L, page, t, d, hi_pos);
  const bool wide = L.hi > 0 && hi_pos[d] >= 0;
  const float level = wide ? page_f16(page, L.wide_cb, c) : page_f16(page, L.k_cb, c);
  float k = page_f16(page, L.k_lo, d) + page_f16(page, L.k_scale, d) * level;
  if (L.outliers && page[L.kout_idx + d] == t) k = page_f16(page, L.kout_val, d);
  if (L.exact && t == exact_index(L, page)) k = page_f16(page, L.exact_k, d);
  return k;
}

float dequant_v(const Layout& L, const u8* page, int t, int d) {
  const int c = v_code(L, page, t, d);
  float v = page_f16(page, L.v_lo, t) + page_f16(page, L.v_scale, t) * page_f16(page, L.v_cb, c);
  if (L.exact && t == exact_index(L, page)) v = page_f16(page, L.exact_v, d);
  return v;
}

namespace {

constexpr int kFixedPoint = 4096;  // codebook.FIXED_POINT
constexpr int kLloydSteps = 8;     // codebook.LLOYD_STEPS
constexpr int kWeightOne = 4096;   // codebook.WEIGHT_ONE
constexpr int kBins = kFixedPoint + 1;
constexpr int kMaxLevels = 16;

// ------------------------------------------------------------------------------ codebooks
inline void thresholds(const float* lv, int L, float* th) {
  for (int i = 0; i < L - 1; ++i) th[i] = (lv[i + 1] + lv[i]) * 0.5f;
}
// codebook.assign: the number of thresholds strictly below u.
inline int assign(float u, const float* th, int L) {
  int c = 0;
  for (int i = 0; i < L - 1; ++i) c += u > th[i] ? 1 : 0;
  return c;
}
// codes[e] = assign(u[e]) for n elements, one threshold at a time (vectorizes).
inline void assign_all(const float* u, size_t n, const float* th, int L, u8* codes) {
  std::fill(codes, codes + n, (u8)0);
  for (int i = 0; i < L - 1; ++i) {
    const float t = th[i];
    for (size_t e = 0; e < n; ++e) codes[e] += u[e] > t ? 1 : 0;
  }
}
inline void uniform_levels(int L, float* lv) {
  for (int i = 0; i < L; ++i) lv[i] = f16_to_f32(f32_to_f16((float)((double)i / (double)(L - 1))));
}

// Prefix sums of a weighted histogram hw[q] (q = fixed-point value 0..4096):
// W[q] = sum_{r<q} hw[r], WU[q] = sum_{r<q} hw[r] * r, WUU[q] = sum_{r<q} hw[r] * r * r.
struct Prefix {
  std::vector<u64> W, WU, WUU;
  Prefix() : W(kBins + 1), WU(kBins + 1), WUU(kBins + 1) {}
  void build(const u64* hw) {
    W[0] = WU[0] = WUU[0] = 0;
    for (int q = 0; q < kBins; ++q) {
      W[q + 1] = W[q] + hw[q];
      WU[q + 1] = WU[q] + hw[q] * (u64)q;
      WUU[q + 1] = WUU[q] + hw[q] * (u64)q * (u64)q;
    }
  }
};

// The cells of a codebook over the fixed-point values: value q (u = q / 4096, exact in fp32)
// has code #{i : u > th[i]} = #{i : q >= first[i]}, first[i] = floor(th[i] * 4096) + 1 (th * 4096
// is exact), so code c covers q in [start[c], start[c + 1]) once the firsts are sorted.
inline void cells(const float* lv, int L, int* start) {
  float th[kMaxLevels];
  thresholds(lv, L, th);
  int first[kMaxLevels];
  for (int i = 0; i < L - 1; ++i) {
    const double b = std::floor((double)th[i] * kFixedPoint) + 1.0;
    first[i] = b < 0.0 ? 0 : (b > kBins ? kBins : (int)b);
  }
  std::sort(first, first + L - 1);
  start[0] = 0;
  for (int i = 0; i < L - 1; ++i) start[i + 1] = first[i];
  start[L] = kBins;
}

// Exact weighted fixed-point distortion sum w * (q - rint(level * 4096))^2 (codebook._distortion).
inline u64 distortion(const Prefix& pf, const float* lv, int L) {
  int start[kMaxLevels + 1];
  cells(lv, L, start);
  u64 total = 0;
  for (int c = 0; c < L; ++c) {
    const int a = start[c], b = start[c + 1];
    if (b <= a) continue;
    const i64 lq = (i64)std::nearbyint((double)lv[c] * kFixedPoint);
    const i64 w = (i64)(pf.W[b] - pf.W[a]), wu = (i64)(pf.WU[b] - pf.WU[a]);
    const i64 wuu = (i64)(pf.WUU[b] - pf.WUU[a]);
    total += (u64)(wuu - 2 * lq * wu + lq * lq * w);  // = sum w (q - lq)^2 >= 0, exact in int64
  }
  return total;
}

// codebook.fit_codebooks for one page: out[0, L) = fp32 values of the fp16 levels. pin_ends: the first
// and last levels stay at 0 and 1 (else every level moves: plain Lloyd-Max from the uniform start).
void fit_codebook(const u64* hw, int L, bool uniform_mode, Prefix& pf, float* out, bool pin_ends = true) {
  float uni[kMaxLevels];
  uniform_levels(L, uni);
  if (uniform_mode) {
    std::copy(uni, uni + L, out);
    return;
  }
  pf.build(hw);
  float lv[kMaxLevels];
  std::copy(uni, uni + L, lv);
  for (int step = 0; step < kLloydSteps; ++step) {
    int start[kMaxLevels + 1];
    cells(lv, L, start);
    float next[kMaxLevels];
    for (int c = 0; c < L; ++c) {
      const u64 sw = pf.W[start[c + 1]] - pf.W[start[c]];
      const u64 swu = pf.WU[start[c + 1]] - pf.WU[start[c]];
      next[c] = sw > 0 ? (float)((double)swu / ((double)sw * (double)kFixedPoint)) : lv[c];
    }
    if (pin_ends) {
      next[0] = 0.0f;
      next[L - 1] = 1.0f;
    }
    std::copy(next, next + L, lv);
  }
  float fit[kMaxLevels];
  for (int i = 0; i < L; ++i) fit[i] = f16_to_f32(f32_to_f16(lv[i]));
  for (int i = 1; i < L; ++i) fit[i] = std::max(fit[i], fit[i - 1]);
  const bool worse = distortion(pf, fit, L) > distortion(pf, uni, L);
  std::copy(worse ? uni : fit, (worse ? uni : fit) + L, out);
}

// ------------------------------------------------------------------------------ the page
struct Scratch {
  std::vector<float> uk, uv;  // normalised K and V, P x D (token-major)
  std::vector<float> vrot;    // v_rotate: the valid tokens' values rotated, P x D
  std::vector<u8> kc, vc;     // codes, P x D
  std::vector<float> ch_lo, ch_sc, ch_hi, tk_lo, tk_sc;
  std::vector<double> mid, half, half_safe, inv_ok;
  std::vector<int> kout_idx, kout_drop, hi_pos, hi_list;
  std::vector<u32> kw;
  std::vector<u64> hist;  // 3 histograms: K narrow, K wide, V
  Prefix pf;
  explicit Scratch(const Layout& L)
      : uk((size_t)L.page_size * L.head_dim), uv(uk.size()), vrot(L.v_rotate ? uk.size() : 0), kc(uk.size()),
        vc(uk.size()),
        ch_lo(L.head_dim), ch_sc(L.head_dim), ch_hi(L.head_dim), tk_lo(L.page_size), tk_sc(L.page_size),
        mid(L.head_dim), half(L.head_dim), half_safe(L.head_dim), inv_ok(L.head_dim), kout_idx(L.head_dim), kout_drop(L.head_dim), hi_pos(L.head_dim),
        hi_list(std::max(1, (int)L.hi)), kw(L.head_dim), hist(3 * (size_t)kBins) {}
};

// rint(u * 4096) for u in [0, 1] (half to even, as torch.round); a NaN (garbage input) counts as 0
// instead of indexing out of the histogram.
inline int fixed_point(float u) {
  const float r = std::nearbyint(u * (float)kFixedPoint);
  return r >= 0.0f && r <= (float)kFixedPoint ? (int)r : 0;
}

inline bool token_kept(const Layout& L, int t, int fill, int exact) { return t < fill && (!L.exact || t != exact); }

// reference.outlier_token_score + argmax (first maximum), or the sink.
int exact_token(const Layout& L, const float* k, int fill, bool sink, Scratch& s) {
  if (sink) return 0;
  const int D = L.head_dim;
  float* hi = s.ch_hi.data();  // free until the K ranges
  float* lo = s.ch_lo.data();
  std::copy(k, k + D, hi);
  std::copy(k, k + D, lo);
  for (int t = 1; t < fill; ++t) {
    const float* row = k + (size_t)t * D;
    for (int d = 0; d < D; ++d) {
      hi[d] = std::max(hi[d], row[d]);
      lo[d] = std::min(lo[d], row[d]);
    }
  }
  for (int d = 0; d < D; ++d) {  // max and min of fp32 values are exact in fp64
    s.mid[d] = ((double)hi[d] + (double)lo[d]) * 0.5;
    s.half[d] = ((double)hi[d] - (double)lo[d]) * 0.5;
    s.inv_ok[d] = s.half[d] > 0.0 ? 1.0 : 0.0;
    s.half_safe[d] = s.half[d] > 0.0 ? s.half[d] : 1.0;
  }
  double best = -std::numeric_limits<double>::infinity();
  int idx = 0;
  for (int t = 0; t < fill; ++t) {
    const float* row = k + (size_t)t * D;
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int d = 0; d < D; ++d) {
      const double z = ((double)row[d] - s.mid[d]) / s.half_safe[d] * s.inv_ok[d];
      acc += z * z;
    }
    if (t == 0 || acc > best) {
      best = acc;
      idx = t;
    }
  }
  return idx;
}

// reference.choose_k_outliers: per channel, among kept elements, drop whichever extreme shrinks
// the range more (ties drop the max); fewer than 3 kept: nothing dropped, the minimum stored;
// none kept: token 0.
void choose_outliers(const Layout& L, const float* k, int fill, int exact, Scratch& s) {
  const int D = L.head_dim, P = L.page_size;
  const float inf = std::numeric_limits<float>::infinity();
  for (int d = 0; d < D; ++d) {
    float max1 = -inf, max2 = -inf, min1 = inf, min2 = inf;
    int imax = 0, imin = 0, count = 0;
    for (int t = 0; t < P; ++t) {
      if (!token_kept(L, t, fill, exact)) continue;
      const float x = k[(size_t)t * D + d];
      ++count;
      if (x > max1) { max2 = max1; max1 = x; imax = t; } else if (x > max2) { max2 = x; }
      if (x < min1) { min2 = min1; min1 = x; imin = t; } else if (x < min2) { min2 = x; }
    }
    const bool drop_hi = (max1 - max2) >= (min2 - min1);
    const bool drop = count >= 3;
    int idx = (drop && drop_hi) ? imax : imin;
    if (count == 0) idx = 0;
    s.kout_idx[d] = idx;
    s.kout_drop[d] = drop ? 1 : 0;
  }
}

// reference.range_params: lo16 = fp16(min), scale16 = fp16(max - lo16) clamped at 0 (keeping -0.0,
// as torch's clamp_min does); both 0 when nothing is kept.
inline void range_params(bool any, float hi, float lo, float& lo16, float& scale16) {
  lo16 = fp16_round(any ? lo : 0.0f);
  const float sc = fp16_round(any ? hi - lo16 : 0.0f);
  scale16 = sc < 0.0f ? 0.0f : sc;
}

// reference.normalise: (x - lo) / scale clamped to [0, 1] (NaN passes); 0 where scale is not > 0.
inline float normalise(float x, float lo, float scale) {
  const bool ok = scale > 0.0f;
  const float u = (x - lo) / (ok ? scale : 1.0f);  // branch-free, so the loops vectorize
  const float c = u < 0.0f ? 0.0f : (u > 1.0f ? 1.0f : u);
  return ok ? c : 0.0f;
}

// page.pick_wide_channels + codebook.scale_weights (see the header comment).
void wide_and_weights(const Layout& L, Scratch& s) {
  const int D = L.head_dim;
  double top = 0.0;
  for (int d = 0; d < D; ++d) {
    const double s2 = (double)s.ch_sc[d] * (double)s.ch_sc[d];
    top = s2 > top ? s2 : top;
  }
  for (int d = 0; d < D; ++d) {
    const double s2 = (double)s.ch_sc[d] * (double)s.ch_sc[d];
    s.kw[d] = top > 0.0 ? (u32)std::nearbyint(s2 / top * (double)kWeightOne) : 0u;
  }
  int n = 0;
  for (int d = 0; d < D; ++d) {
    s.hi_pos[d] = -1;
    if (L.hi == 0) continue;
    const float sd = s.ch_sc[d];
    int rank = 0;
    for (int e = 0; e < D && rank < L.hi; ++e) rank += (s.ch_sc[e] > sd || (s.ch_sc[e] == sd && e < d)) ? 1 : 0;
    if (rank < L.hi) {
      s.hi_pos[d] = n;
      s.hi_list[n++] = d;
    }
  }
}

inline void store_f16(u8* page, int offset, int i, u16 h) { std::memcpy(page + offset + 2 * i, &h, 2); }
inline void store_u32(u8* page, int offset, int i, u32 w) { std::memcpy(page + offset + 4 * i, &w, 4); }

// Codes (u8, element (row, col) at codes[row * row_stride + col * col_stride]) -> bit planes.
void pack_planes(int bits, int rows, int cols, const u8* codes, int row_stride, int col_stride, u8* page, int off0,
                 int off1, u32 mask) {
  const int wpr = cols / 16;
  int perm[256];  // cols <= 256
  for (int i = 0; i < cols; ++i) perm[i] = packed_col(cols, i / 16, i % 16) * col_stride;
  for (int r = 0; r < rows; ++r) {
    const u8* row = codes + (size_t)r * row_stride;
    for (int w = 0; w < wpr; ++w) {
      u32 lo = 0, hi = 0;
      for (int p = 0; p < 16; ++p) {
        const u32 c = row[perm[w * 16 + p]] & mask;
        lo |= (c & 3u) << (2 * p);
        if (bits == 3) hi |= ((c >> 2) & 1u) << p;
        if (bits == 4) hi |= ((c >> 2) & 3u) << (2 * p);
      }
      const int wi = r * wpr + w;
      store_u32(page, off0, wi, lo);
      if (bits == 3) {
        const u16 h16 = (u16)hi;
        std::memcpy(page + off1 + 2 * wi, &h16, 2);
      }
      if (bits == 4) store_u32(page, off1, wi, hi);
    }
  }
}

// Quantize one page: the whole of reference.quantize_pages for n = 1. k, v: P x D fp32, rows
// >= fill are never read.
void quantize_page(const Layout& L, const float* k, const float* v, int fill, bool sink, bool uniform_mode, u8* page,
                   Scratch& s) {
  const int D = L.head_dim, P = L.page_size;
  const float inf = std::numeric_limits<float>::infinity();
  std::memset(page, 0, L.page_bytes);

  // ---- K
  const int exact = L.exact ? exact_token(L, k, fill, sink, s) : -1;
  if (L.outliers) {
    choose_outliers(L, k, fill, exact, s);
  } else {
    std::fill(s.kout_drop.begin(), s.kout_drop.end(), 0);
    std::fill(s.kout_idx.begin(), s.kout_idx.end(), -1);
  }
  for (int d = 0; d < D; ++d) {
    s.ch_hi[d] = -inf;
    s.ch_lo[d] = inf;
  }
  std::vector<int>& any = s.hi_pos;  // reused as "channel has a kept element" until wide_and_weights
  std::fill(any.begin(), any.end(), 0);
  for (int t = 0; t < fill; ++t) {
    if (!token_kept(L, t, fill, exact)) continue;
    const float* row = k + (size_t)t * D;
    float* hi = s.ch_hi.data();
    float* lo = s.ch_lo.data();
    if (!L.outliers) {
      for (int d = 0; d < D; ++d) {
        hi[d] = std::max(hi[d], row[d]);
        lo[d] = std::min(lo[d], row[d]);
        any[d] = 1;
      }
      continue;
    }
    for (int d = 0; d < D; ++d) {
      if (s.kout_drop[d] && s.kout_idx[d] == t) continue;
      hi[d] = std::max(hi[d], row[d]);
      lo[d] = std::min(lo[d], row[d]);
      any[d] = 1;
    }
  }
  for (int d = 0; d < D; ++d) range_params(any[d] != 0, s.ch_hi[d], s.ch_lo[d], s.ch_lo[d], s.ch_sc[d]);
  wide_and_weights(L, s);
  for (int t = 0; t < P; ++t) {
    float* u = s.uk.data() + (size_t)t * D;
    if (t >= fill) {
      std::fill(u, u + D, 0.0f);
      continue;
    }
    const float* row = k + (size_t)t * D;
    for (int d = 0; d < D; ++d) u[d] = normalise(row[d], s.ch_lo[d], s.ch_sc[d]);
  }
  // The fits: k_cb on kept elements of narrow channels, wide_cb on kept elements of wide ones,
  // both weighted by kw[d]; as histograms of the fixed-point values rint(u * 4096).
  u64* h_narrow = s.hist.data();
  u64* h_wide = h_narrow + kBins;
  u64* h_v = h_wide + kBins;
  std::fill(s.hist.begin(), s.hist.end(), 0);
  for (int t = 0; t < fill; ++t) {
    if (!token_kept(L, t, fill, exact)) continue;
    const float* u = s.uk.data() + (size_t)t * D;
    for (int d = 0; d < D; ++d) {
      if (L.outliers && s.kout_drop[d] && s.kout_idx[d] == t) continue;
      (s.hi_pos[d] >= 0 ? h_wide : h_narrow)[fixed_point(u[d])] += s.kw[d];
    }
  }
  const int LK = 1 << L.k_bits, LH = 2 << L.k_bits, LV = 1 << L.v_bits;
  float kcb[kMaxLevels], hcb[kMaxLevels], vcb[kMaxLevels], kth[kMaxLevels], hth[kMaxLevels], vth[kMaxLevels];
  fit_codebook(h_narrow, LK, uniform_mode, s.pf, kcb);
  thresholds(kcb, LK, kth);
  if (L.hi) {
    fit_codebook(h_wide, LH, uniform_mode, s.pf, hcb);
    thresholds(hcb, LH, hth);
  }
  assign_all(s.uk.data(), (size_t)P * D, kth, LK, s.kc.data());
  for (int i = 0; i < L.hi; ++i) {
    const int d = s.hi_list[i];
    for (int t = 0; t < P; ++t) s.kc[(size_t)t * D + d] = (u8)assign(s.uk[(size_t)t * D + d], hth, LH);
  }
  pack_planes(L.k_bits, P, D, s.kc.data(), D, 1, page, L.k_plane0, L.k_plane1, (u32)(LK - 1));
  if (L.hi) {
    const int wpr = P / 32;
    for (int i = 0; i < L.hi; ++i) {
      const int d = s.hi_list[i];
      for (int w = 0; w < wpr; ++w) {
        u32 word = 0;
        for (int b = 0; b < 32; ++b) word |= (u32)((s.kc[(size_t)(w * 32 + b) * D + d] >> L.k_bits) & 1) << b;
        store_u32(page, L.wide_plane, i * wpr + w, word);
      }
      page[L.wide_idx + i] = (u8)d;
    }
    for (int i = 0; i < LH; ++i) store_f16(page, L.wide_cb, i, f32_to_f16(hcb[i]));
  }
  for (int d = 0; d < D; ++d) {
    store_f16(page, L.k_lo, d, f32_to_f16(s.ch_lo[d]));
    store_f16(page, L.k_scale, d, f32_to_f16(s.ch_sc[d]));
  }
  for (int i = 0; i < LK; ++i) store_f16(page, L.k_cb, i, f32_to_f16(kcb[i]));
  if (L.exact) {
    for (int d = 0; d < D; ++d) store_f16(page, L.exact_k, d, f16_sat(k[(size_t)exact * D + d]));
    const int16_t e = (int16_t)exact;
    std::memcpy(page + L.exact_idx, &e, 2);
  }
  if (L.outliers) {
    for (int d = 0; d < D; ++d) {
      const int t = s.kout_idx[d];
      store_f16(page, L.kout_val, d, f16_sat(k[(size_t)t * D + d]));
      page[L.kout_idx + d] = (u8)t;
    }
  }

  // ---- V: per-token ranges over all channels of valid tokens (of the rotated value with v_rotate;
  // exact_v below stays the value itself), one unweighted codebook.
  const float* vq = v;  // what the V codes describe
  if (L.v_rotate) {
    std::copy(v, v + (size_t)fill * D, s.vrot.data());
    rotate_value_rows(s.vrot.data(), fill, D, false);
    vq = s.vrot.data();
  }
  for (int t = 0; t < P; ++t) {
    float* u = s.uv.data() + (size_t)t * D;
    if (t >= fill) {
      s.tk_lo[t] = s.tk_sc[t] = 0.0f;
      std::fill(u, u + D, 0.0f);
      continue;
    }
    const float* row = vq + (size_t)t * D;
    float hv[16], lv[16];  // 16 running extremes (D is a multiple of 16), then 16 -> 1: vectorizes
    std::copy(row, row + 16, hv);
    std::copy(row, row + 16, lv);
    for (int d = 16; d < D; d += 16)
      for (int j = 0; j < 16; ++j) {
        hv[j] = std::max(hv[j], row[d + j]);
        lv[j] = std::min(lv[j], row[d + j]);
      }
    float hi = hv[0], lo = lv[0];
    for (int j = 1; j < 16; ++j) {
      hi = std::max(hi, hv[j]);
      lo = std::min(lo, lv[j]);
    }
    range_params(true, hi, lo, s.tk_lo[t], s.tk_sc[t]);
    for (int d = 0; d < D; ++d) u[d] = normalise(row[d], s.tk_lo[t], s.tk_sc[t]);
    if (!token_kept(L, t, fill, exact)) continue;
    for (int d = 0; d < D; ++d) h_v[fixed_point(u[d])] += 1;
  }
  fit_codebook(h_v, LV, uniform_mode, s.pf, vcb, L.v_pin_ends != 0);
  thresholds(vcb, LV, vth);
  assign_all(s.uv.data(), s.uv.size(), vth, LV, s.vc.data());
  // V codes are stored channel-major: rows = channels, cols = tokens.
  pack_planes(L.v_bits, D, P, s.vc.data(), 1, D, page, L.v_plane0, L.v_plane1, (u32)(LV - 1));
  for (int t = 0; t < P; ++t) {
    store_f16(page, L.v_lo, t, f32_to_f16(s.tk_lo[t]));
    store_f16(page, L.v_scale, t, f32_to_f16(s.tk_sc[t]));
  }
  for (int i = 0; i < LV; ++i) store_f16(page, L.v_cb, i, f32_to_f16(vcb[i]));
  if (L.exact)
    for (int d = 0; d < D; ++d) store_f16(page, L.exact_v, d, f16_sat(v[(size_t)exact * D + d]));
}

inline int threads_for(int n, int nthreads) { return std::max(1, std::min(n, nthreads)); }

}  // namespace

// ------------------------------------------------------------------------------ page primitives
// Where the rows of one page to quantize come from: token t < min(prefix, fill) is row t of
// source 0 (k0 / v0, rows stride0 elements of dtype0 apart: a staging slot's rows, or the batch's
// dtype), token prefix <= t < fill row t - prefix of source 1 (rows of the batch's dtype). The
// page's bytes go to dst.
struct PageSource {
  const u8 *k0, *v0, *k1, *v1;
  i64 stride0, stride1;
  int prefix, fill;
  bool sink;
  u8* dst;
  int dtype0;
};

// Quantize n pages (one KV head each), OpenMP over pages.
void quantize_batch(const Layout& L, int n, int dtype, const PageSource* src, bool uniform_mode, int nthreads) {
  if (n <= 0) return;
  const int D = L.head_dim, P = L.page_size, esize = dtype_size(dtype);
#pragma omp parallel num_threads(threads_for(n, nthreads))
  {
    Scratch s(L);
    std::vector<float> kt((size_t)P * D), vt((size_t)P * D);
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < n; ++i) {
      const PageSource& ps = src[i];
      for (int t = 0; t < ps.fill; ++t) {
        const bool first = t < ps.prefix;
        const u8* kb = first ? ps.k0 : ps.k1;
        const u8* vb = first ? ps.v0 : ps.v1;
        const int dt = first ? ps.dtype0 : dtype;
        const i64 row = first ? t * ps.stride0 * dtype_size(dt) : (t - ps.prefix) * ps.stride1 * esize;
        read_staged_rows(kb + row, dt, 1, D, kt.data() + (size_t)t * D, dtype);
        read_staged_rows(vb + row, dt, 1, D, vt.data() + (size_t)t * D, dtype);
      }
      quantize_page(L, kt.data(), vt.data(), ps.fill, ps.sink, uniform_mode, ps.dst, s);
    }
  }
}

// One page decoded to fp32 rows k, v (P x D): dequant_k / dequant_v for every element, bit for bit,
// but with the per-page f16 fields decoded once — a level table per K channel and per V token
// (lo + scale * level, product and sum rounded separately, as dequant_k does) — and the codes read
// word by word from the bit planes; then the K outliers, then the exact token, in dequant_k's order.
struct PageDecoder {
  const Layout& L;
  std::vector<int> hi_pos, kcol, vrow;  // kcol[w * 16 + p]: channel of packed K position; vrow: token
  std::vector<float> klut, vlut;        // (D, 2^(k_bits+1)) and (P, 2^v_bits) levels

  explicit PageDecoder(const Layout& layout)
      : L(layout), hi_pos(layout.head_dim), kcol(layout.head_dim), vrow(layout.page_size),
        klut((size_t)layout.head_dim << (layout.k_bits + 1)), vlut((size_t)layout.page_size << layout.v_bits) {
    for (int i = 0; i < L.head_dim; ++i) kcol[i] = packed_col(L.head_dim, i / 16, i % 16);
    for (int i = 0; i < L.page_size; ++i) vrow[i] = packed_col(L.page_size, i / 16, i % 16);
  }

  // codes of `cols` packed columns of row `row` (words row * cols / 16 ...) -> out[col]
  void codes(int bits, const u8* page, int off0, int off1, int row, int cols, const int* col_of, u8* out) const {
    const int words = cols / 16;
    for (int w = 0; w < words; ++w) {
      const u32 lo = page_u32(page, off0, row * words + w);
      u32 hi = 0;
      if (bits == 3) hi = page_u16(page, off1, row * words + w);
      if (bits == 4) hi = page_u32(page, off1, row * words + w);
      for (int p = 0; p < 16; ++p) {
        int c = (int)((lo >> (2 * p)) & 3u);
        if (bits == 3) c |= (int)((hi >> p) & 1u) << 2;
        if (bits == 4) c |= (int)((hi >> (2 * p)) & 3u) << 2;
        out[col_of[w * 16 + p]] = (u8)c;
      }
    }
  }

  void decode(const u8* page, float* k, float* v) {
    const int D = L.head_dim, P = L.page_size;
    const int kl = 1 << (L.k_bits + 1), vl = 1 << L.v_bits;
    build_hi_pos(L, page, hi_pos.data());
    for (int d = 0; d < D; ++d) {
      const bool wide = L.hi > 0 && hi_pos[d] >= 0;
      const float lo = page_f16(page, L.k_lo, d), scale = page_f16(page, L.k_scale, d);
      const int n = wide ? kl : kl / 2;
      for (int c = 0; c < n; ++c)
        klut[(size_t)d * kl + c] = lo + scale * (wide ? page_f16(page, L.wide_cb, c) : page_f16(page, L.k_cb, c));
    }
    float vcb[16];
    for (int c = 0; c < vl; ++c) vcb[c] = page_f16(page, L.v_cb, c);
    for (int t = 0; t < P; ++t) {
      const float lo = page_f16(page, L.v_lo, t), scale = page_f16(page, L.v_scale, t);
      for (int c = 0; c < vl; ++c) vlut[(size_t)t * vl + c] = lo + scale * vcb[c];
    }
    std::vector<u8>& kc = kcodes;
    kc.resize((size_t)std::max(D, P));
    for (int t = 0; t < P; ++t) {
      codes(L.k_bits, page, L.k_plane0, L.k_plane1, t, D, kcol.data(), kc.data());
      if (L.hi > 0) {
        for (int d = 0; d < D; ++d)
          if (hi_pos[d] >= 0) {
            const u32 word = page_u32(page, L.wide_plane, hi_pos[d] * (P / 32) + t / 32);
            kc[d] |= (u8)(((word >> (t % 32)) & 1u) << L.k_bits);
          }
      }
      float* row = k + (size_t)t * D;
      for (int d = 0; d < D; ++d) row[d] = klut[(size_t)d * kl + kc[d]];
    }
    for (int d = 0; d < D; ++d) {
      codes(L.v_bits, page, L.v_plane0, L.v_plane1, d, P, vrow.data(), kc.data());
      for (int t = 0; t < P; ++t) v[(size_t)t * D + d] = vlut[(size_t)t * vl + kc[t]];
    }
    if (L.v_rotate)  // the coded values are rotated: back, before the exact token overrides its row
      rotate_value_rows(v, P, D, true);
    if (L.outliers)
      for (int d = 0; d < D; ++d) {
        const int t = page[L.kout_idx + d];
        if (t < P) k[(size_t)t * D + d] = page_f16(page, L.kout_val, d);
      }
    const int x = exact_index(L, page);
    if (x >= 0 && x < P)
      for (int d = 0; d < D; ++d) {
        k[(size_t)x * D + d] = page_f16(page, L.exact_k, d);
        v[(size_t)x * D + d] = page_f16(page, L.exact_v, d);
      }
  }

 private:
  std::vector<u8> kcodes;
};

// n elements of fp32 -> `dtype` (the rounding of store_from_f32).
static void store_row(void* dst, int dtype, const float* src, size_t n) {
  if (dtype == kF32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dtype == kBF16) {
    u16* d = static_cast<u16*>(dst);
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
  } else {
    u16* d = static_cast<u16*>(dst);
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
  }
}

// Dequantize n pages: page src[i] -> P x D rows of `dtype` at dst_k[i] and dst_v[i]; with
// out_dtype kI8, staging rows of the values rounded to `dtype` (a page re-opened into a slot).
void dequantize_batch(const Layout& L, int n, const u8* const* src, u8* const* dst_k, u8* const* dst_v, int dtype,
                      int nthreads, int out_dtype = -1) {
  if (n <= 0) return;
  const size_t elems = (size_t)L.head_dim * L.page_size;
#pragma omp parallel num_threads(threads_for(n, nthreads))
  {
    PageDecoder dec(L);
    std::vector<float> k(elems), v(elems);
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < n; ++i) {
      dec.decode(src[i], k.data(), v.data());
      if (out_dtype == kI8) {  // re-opened into an int8 slot: rounded to the model dtype, then staged
        const int D = L.head_dim;
        for (size_t x = 0; x < elems; ++x) {
          k[x] = round_to(dtype, k[x]);
          v[x] = round_to(dtype, v[x]);
        }
        for (int t = 0; t < L.page_size; ++t) {
          write_staged_row(k.data() + (size_t)t * D, kI8, D, dst_k[i] + (size_t)t * (D + 4));
          write_staged_row(v.data() + (size_t)t * D, kI8, D, dst_v[i] + (size_t)t * (D + 4));
        }
        continue;
      }
      store_row(dst_k[i], dtype, k.data(), elems);
      store_row(dst_v[i], dtype, v.data(), elems);
    }
  }
}

}  // namespace kivi_cpu

using namespace kivi_cpu;

// quant.page.quantize_pages: k, v (n, P, D) contiguous of `dtype` (rows >= fill[i] ignored),
// fill (n,) in [1, P], sink (n,) -> pages (n, page_bytes).
KIVI_API int kivi_quantize_pages(const Layout* L, int n, int dtype, const void* k, const void* v, const int32_t* fill,
                                 const u8* sink, u8* pages, int uniform_mode, int nthreads) {
  const int P = L->page_size;
  const i64 page_elems = (i64)P * L->head_dim;
  const int esize = dtype_size(dtype);
  std::vector<PageSource> src(n);
  for (int i = 0; i < n; ++i) {
    if (fill[i] < 1 || fill[i] > P) return kBadOffset;
    const u8* kb = static_cast<const u8*>(k) + i * page_elems * esize;
    const u8* vb = static_cast<const u8*>(v) + i * page_elems * esize;
    src[i] = {kb, vb, kb, vb, L->head_dim, L->head_dim, fill[i], fill[i], sink[i] != 0, pages + (i64)i * L->page_bytes,
              dtype};
  }
  quantize_batch(*L, n, dtype, src.data(), uniform_mode != 0, nthreads);
  return kOk;
}

// quant.page.dequantize_pages rounded to `dtype`: n pages at addresses src[i] -> P x D rows at
// dst_k[i], dst_v[i].
KIVI_API int kivi_dequantize_pages(const Layout* L, int n, const i64* src, const i64* dst_k, const i64* dst_v,
                                   int dtype, int nthreads) {
  dequantize_batch(*L, n, reinterpret_cast<const u8* const*>(src), reinterpret_cast<u8* const*>(dst_k),
                   reinterpret_cast<u8* const*>(dst_v), dtype, nthreads);
  return kOk;
}

// reference.write_staging: token i (slot >= 0) -> staging[slot, 0/1, h, offset] for every head
// (copied for model-dtype staging, encoded for kI8 rows).
static int write_staging(const void* key, const void* value, void* staging, const int32_t* token_slots,
                         const int32_t* token_offsets, int T, int H, int P, int D, int dtype, int sdtype) {
  const size_t in_row = (size_t)D * dtype_size(dtype), row = staged_row_bytes(sdtype, D);
  const size_t head = (size_t)P * row, kv = (size_t)H * head;
  std::vector<float> x(D);
  for (int i = 0; i < T; ++i) {
    const int s = token_slots[i];
    if (s < 0) continue;
    u8* base = static_cast<u8*>(staging) + (size_t)s * 2 * kv + (size_t)token_offsets[i] * row;
    for (int h = 0; h < H; ++h) {
      for (int c = 0; c < 2; ++c) {
        const u8* src = static_cast<const u8*>(c ? value : key) + ((size_t)i * H + h) * in_row;
        u8* dst = base + c * kv + h * head;
        if (sdtype != kI8) {
          std::memcpy(dst, src, row);
        } else {
          to_f32_row(src, dtype, D, x.data());
          write_staged_row(x.data(), kI8, D, dst);
        }
      }
    }
  }
  return kOk;
}

// One step's AppendPlan for one layer (reference.append_kv), in the plan's order:
//   1. evict + finalize: quantize pages (evict: `fills` tokens from their slot; finalize: `prefix`
//      tokens from the slot, or — slot < 0 — from the page's own block dequantized to `dtype`, then
//      this step's input rows from `starts`), all KV heads, one parallel batch (distinct blocks);
//   2. reopen: dequantize blocks into their new slots;
//   3. this step's tokens of open pages -> staging.
// key, value [T, H, D] (`dtype`), staging [S, 2, H, P, W] (rows of `sdtype`: `dtype`, or kI8
// with W = D + 4 bytes), pages [num_blocks, H, page_bytes].
// Every index is checked first; on failure nothing is written and err = {which list, value}.
KIVI_API int kivi_append(const Layout* L, int dtype, const void* key, const void* value, int T, int H, void* staging,
                         int S, int sdtype, u8* pages, i64 num_blocks, const int32_t* token_slots, const int32_t* token_offsets,
                         const int32_t* ev_blocks, const int32_t* ev_slots, const int32_t* ev_fills, const u8* ev_sinks,
                         int n_ev, const int32_t* fin_blocks, const int32_t* fin_slots, const int32_t* fin_fills,
                         const u8* fin_sinks, const int32_t* fin_starts, const int32_t* fin_prefix, int n_fin,
                         const int32_t* re_blocks, const int32_t* re_slots, int n_re, int uniform_mode, int nthreads,
                         int32_t* err) {
  const int D = L->head_dim, P = L->page_size, esize = dtype_size(dtype);
  auto fail = [&](int code, int which, int value) {
    err[0] = which;
    err[1] = value;
    return code;
  };
  // 0: evict, 1: finalize, 2: reopen, 3: tokens. Entries with a negative block are padding (no op).
  for (int i = 0; i < n_ev; ++i) {
    if (ev_blocks[i] < 0) continue;
    if (ev_blocks[i] >= num_blocks) return fail(kBadBlock, 0, ev_blocks[i]);
    if (ev_slots[i] < 0 || ev_slots[i] >= S) return fail(kBadSlot, 0, ev_slots[i]);
    if (ev_fills[i] < 1 || ev_fills[i] > P) return fail(kBadOffset, 0, ev_fills[i]);
  }
  for (int i = 0; i < n_fin; ++i) {
    if (fin_blocks[i] < 0) continue;
    if (fin_blocks[i] >= num_blocks) return fail(kBadBlock, 1, fin_blocks[i]);
    if (fin_slots[i] < -1 || fin_slots[i] >= S) return fail(kBadSlot, 1, fin_slots[i]);
    if (fin_fills[i] < 1 || fin_fills[i] > P) return fail(kBadOffset, 1, fin_fills[i]);
    if (fin_prefix[i] < 0 || fin_prefix[i] > fin_fills[i]) return fail(kBadOffset, 1, fin_prefix[i]);
    if (fin_prefix[i] < fin_fills[i] && (fin_starts[i] < 0 || fin_starts[i] + fin_fills[i] - fin_prefix[i] > T))
      return fail(kBadOffset, 1, fin_starts[i]);
  }
  for (int i = 0; i < n_re; ++i) {
    if (re_blocks[i] < 0) continue;
    if (re_blocks[i] >= num_blocks) return fail(kBadBlock, 2, re_blocks[i]);
    if (re_slots[i] < 0 || re_slots[i] >= S) return fail(kBadSlot, 2, re_slots[i]);
  }
  for (int i = 0; i < T; ++i) {
    if (token_slots[i] >= S) return fail(kBadSlot, 3, token_slots[i]);
    if (token_slots[i] >= 0 && (token_offsets[i] < 0 || token_offsets[i] >= P))
      return fail(kBadOffset, 3, token_offsets[i]);
  }
  const size_t head_bytes = (size_t)P * D * esize;  // a model-dtype page of one head (early-finalised prefixes)
  const size_t page_span = (size_t)H * L->page_bytes;
  u8* st = static_cast<u8*>(staging);
  const size_t st_head = (size_t)P * staged_row_bytes(sdtype, D), st_slot = 2 * (size_t)H * st_head;
  const i64 st_stride = (i64)(staged_row_bytes(sdtype, D) / dtype_size(sdtype));  // elements of sdtype
  // 1. evict + finalize
  if (n_ev + n_fin > 0) {
    // early-finalised pages completed in this step: their prefix, dequantized to dtype first
    std::vector<int> old_rank(n_fin, -1);
    int n_old = 0;
    for (int i = 0; i < n_fin; ++i)
      if (fin_blocks[i] >= 0 && fin_slots[i] < 0 && fin_prefix[i] > 0) old_rank[i] = n_old++;
    std::vector<u8> old((size_t)n_old * 2 * H * head_bytes);
    if (n_old) {
      std::vector<const u8*> src;
      std::vector<u8*> dk, dv;
      for (int i = 0; i < n_fin; ++i) {
        if (old_rank[i] < 0) continue;
        for (int h = 0; h < H; ++h) {
          src.push_back(pages + fin_blocks[i] * page_span + (size_t)h * L->page_bytes);
          dk.push_back(old.data() + ((size_t)old_rank[i] * 2 * H + h) * head_bytes);
          dv.push_back(old.data() + ((size_t)old_rank[i] * 2 * H + H + h) * head_bytes);
        }
      }
      dequantize_batch(*L, (int)src.size(), src.data(), dk.data(), dv.data(), dtype, nthreads);
    }
    std::vector<PageSource> ops;
    ops.reserve((size_t)(n_ev + n_fin) * H);
    for (int i = 0; i < n_ev; ++i)
      for (int h = 0; h < H && ev_blocks[i] >= 0; ++h) {
        const u8* k = st + ev_slots[i] * st_slot + h * st_head;
        ops.push_back({k, k + H * st_head, nullptr, nullptr, st_stride, 0, ev_fills[i], ev_fills[i], ev_sinks[i] != 0,
                       pages + ev_blocks[i] * page_span + (size_t)h * L->page_bytes, sdtype});
      }
    for (int i = 0; i < n_fin; ++i)
      for (int h = 0; h < H && fin_blocks[i] >= 0; ++h) {
        const u8 *k0 = nullptr, *v0 = nullptr;
        i64 stride0 = D;
        int dtype0 = dtype;
        if (old_rank[i] >= 0) {
          k0 = old.data() + ((size_t)old_rank[i] * 2 * H + h) * head_bytes;
          v0 = k0 + H * head_bytes;
        } else if (fin_slots[i] >= 0) {
          k0 = st + fin_slots[i] * st_slot + h * st_head;
          v0 = k0 + H * st_head;
          stride0 = st_stride;
          dtype0 = sdtype;
        }
        const size_t in = ((size_t)fin_starts[i] * H + h) * D * esize;
        ops.push_back({k0, v0, static_cast<const u8*>(key) + in, static_cast<const u8*>(value) + in, stride0,
                       (i64)H * D, fin_prefix[i], fin_fills[i], fin_sinks[i] != 0,
                       pages + fin_blocks[i] * page_span + (size_t)h * L->page_bytes, dtype0});
      }
    quantize_batch(*L, (int)ops.size(), dtype, ops.data(), uniform_mode != 0, nthreads);
  }
  // 2. reopen
  if (n_re > 0) {
    std::vector<const u8*> src;
    std::vector<u8*> dk, dv;
    for (int i = 0; i < n_re; ++i)
      for (int h = 0; h < H && re_blocks[i] >= 0; ++h) {
        src.push_back(pages + re_blocks[i] * page_span + (size_t)h * L->page_bytes);
        dk.push_back(st + re_slots[i] * st_slot + h * st_head);
        dv.push_back(st + re_slots[i] * st_slot + (H + h) * st_head);
      }
    dequantize_batch(*L, (int)src.size(), src.data(), dk.data(), dv.data(), dtype, nthreads, sdtype);
  }
  // 3. this step's tokens -> staging
  return write_staging(key, value, staging, token_slots, token_offsets, T, H, P, D, dtype, sdtype);
}
