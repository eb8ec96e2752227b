// kivi_cpu.h — what the CPU kernels share: the page layout as the Python side describes it,
// exact scalar conversions between fp32 and the model dtypes, and small helpers.
//
// The layout is NOT restated here: kivi_serve/kernels/cpu/loader.py fills `Layout` from
// kivi_serve/quant/layout.py (PageLayout.sections) for every call, so the page format keeps one
// definition (plus its CUDA mirror cuda/kivi_layout.cuh, which tests/test_layout.py checks).
//
// Build: loader.py compiles quantize.cpp + decode.cpp into one shared library per ISA
// (avx512 / avx2 / scalar) with -ffp-contract=off, so that no a*b+c is fused behind our back:
// the quantizer must reproduce the PyTorch reference bit for bit. The decode kernel uses FMA
// intrinsics explicitly where it wants them.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define KIVI_API extern "C" __attribute__((visibility("default")))

namespace kivi_cpu {

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

// Model dtypes of keys, values, staging, queries and outputs (loader.DTYPE_CODES); kI8 is only a
// staging format: rows of D int8 codes + their fp32 scale (quant/staging.py "int8").
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };

// Byte offsets of a page's sections (-1: the section is absent), filled from PageLayout (its
// `params` first). v_rotate: the V codes describe each token's value rotated (rotate_value_rows);
// v_pin_ends: the V codebook's end levels are pinned at 0 and 1 (else fitted too).
struct Layout {
  int32_t head_dim, page_size, k_bits, v_bits, exact, outliers, hi, v_rotate, v_pin_ends, page_bytes;
  int32_t k_plane0, k_plane1, v_plane0, v_plane1;
  int32_t k_lo, k_scale, v_lo, v_scale, k_cb, v_cb;
  int32_t exact_k, exact_v, exact_idx, kout_val, kout_idx, wide_plane, wide_cb, wide_idx;
};

// Error codes returned by the entry points (loader.py turns them into ValueErrors).
enum Status : int {
  kOk = 0,
  kBadBlock = 1,       // a block id outside [0, num_blocks)
  kBadSlot = 2,        // a staging slot outside [0, num_slots)
  kBadOffset = 3,      // an in-page offset outside [0, page_size)
  kBadSeqLen = 4,      // seq_len < query length, or a table too short for the context
  kBadQueryLoc = 5,    // query_start_loc not non-decreasing within [0, T]
  kBadArgument = 6,    // anything else (unsupported layout, ...)
  kOutOfMemory = 7,
  kStale = 8,          // a prepared decode plan whose metadata changed since it was checked
};

// kivi_decode_run's argument block (decode.cpp): one layer's tensors, in int64s (the staging format
// first: a DecodeBatch sets it once); the last two receive err. Filled by decode_attention.py, or by
// binding.cpp straight from the tensors.
enum RunArg : int {
  kRunStagingDtype, kRunDtype, kRunHq, kRunT, kRunQuery, kRunKey, kRunValue, kRunStaging, kRunPages, kRunOut,
  kRunQStride, kRunKStride, kRunVStride, kRunOStride, kRunThreads, kRunErr, kNumRunArgs = kRunErr + 2
};

// ------------------------------------------------------------------------------ conversions
inline float f32_from_bits(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
inline u32 bits_from_f32(float f) { u32 u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_f32(u16 h) { return f32_from_bits((u32)h << 16); }
// Round to nearest even, NaN -> 0x7fc0: what c10::BFloat16 does.
inline u16 f32_to_bf16(float f) {
  const u32 u = bits_from_f32(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(u16 h) {
  const u32 sign = (u32)(h & 0x8000u) << 16;
  const u32 exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return f32_from_bits(sign);
    const float mag = (float)man * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return f32_from_bits(bits_from_f32(mag) | sign);
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (man << 13));
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}
// IEEE fp32 -> fp16, round to nearest even, overflow -> inf, NaN stays NaN: torch's `.to(float16)`.
inline u16 f32_to_f16(float f) {
  const u32 u = bits_from_f32(f);
  const u32 sign = (u >> 16) & 0x8000u;
  const u32 ax = u & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (u16)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                               // below 2^-14: subnormal or zero
    const float scaled = f32_from_bits(ax) * 16777216.0f;  // * 2^24, exact
    return (u16)(sign | (u32)std::nearbyint(scaled));      // half to even (default rounding mode)
  }
  return (u16)(sign | ((ax - 0x38000000u + 0xfffu + ((ax >> 13) & 1u)) >> 13));
}

constexpr float kFp16Max = 65504.0f;
// reference fp16_round: clamp to +-65504 (NaN passes), round to fp16, back to fp32.
inline u16 f16_sat(float x) { return f32_to_f16(x < -kFp16Max ? -kFp16Max : (x > kFp16Max ? kFp16Max : x)); }
inline float fp16_round(float x) { return f16_to_f32(f16_sat(x)); }

inline float load_as_f32(const void* base, int dtype, size_t i) {
  switch (dtype) {
    case kBF16: return bf16_to_f32(static_cast<const u16*>(base)[i]);
    case kF16: return f16_to_f32(static_cast<const u16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}
inline void store_from_f32(void* base, int dtype, size_t i, float x) {
  switch (dtype) {
    case kBF16: static_cast<u16*>(base)[i] = f32_to_bf16(x); break;
    case kF16: static_cast<u16*>(base)[i] = f32_to_f16(x); break;
    default: static_cast<float*>(base)[i] = x;
  }
}
inline int dtype_size(int dtype) { return dtype == kF32 ? 4 : (dtype == kI8 ? 1 : 2); }
// n elements of `dtype` -> fp32.
void to_f32_row(const void* src, int dtype, int n, float* dst);
// x rounded to the model `dtype` (what storing it in that dtype and reading it back gives).
inline float round_to(int dtype, float x) {
  switch (dtype) {
    case kBF16: return bf16_to_f32(f32_to_bf16(x));
    case kF16: return f16_to_f32(f32_to_f16(x));
    default: return x;
  }
}

// ------------------------------------------------------------------------------ staging rows
// A staging row of one (token, head): D elements of the model dtype, or (sdtype kI8) D int8 codes
// then the fp32 scale (quant/staging.py: scale = max|x| / 127, code = clamp(rint(x / scale)),
// read = code * scale; every step one IEEE operation, so bit-equal to the PyTorch reference).
inline size_t staged_row_bytes(int sdtype, int D) {
  return sdtype == kI8 ? (size_t)D + 4 : (size_t)D * dtype_size(sdtype);
}
// n consecutive staged rows -> n * D fp32 values (kI8 rows: code * scale rounded to the model `dtype`).
void read_staged_rows(const u8* src, int sdtype, int n, int D, float* dst, int dtype);
// One row of D fp32 values (already model-dtype values) -> its staged bytes.
void write_staged_row(const float* x, int sdtype, int D, u8* dst);

// ------------------------------------------------------------------------------ value rotation
// quant/page.py rotate_values: v @ R with R = diag(s) H / sqrt(D) (H the Sylvester-Hadamard matrix,
// s the fixed signs of value_signs), each fp32 operation as the reference does it, so the quantizer
// reproduces it bit for bit: forward hadamard(v * s) * c, inverse hadamard(v) * c * s, with
// c = fp32(1 / sqrt(D)) (multiplying by s = +-1 is exact, so where it happens does not matter).

// value_signs: -1 where bit 31 of d * 0x9E3779B1 (mod 2^32, a Fibonacci hash) is set.
inline float value_sign(int d) { return (((u32)d * 0x9E3779B1u) >> 31) & 1u ? -1.0f : 1.0f; }
inline float value_rotation_scale(int D) { return (float)(1.0 / std::sqrt((double)D)); }
// page.hadamard in place: log2(D) stages of (a + b, a - b) on pairs h apart, h = 1, 2, 4, ... (D a
// multiple of 8). The stages h = 1, 2, 4 stay inside groups of 8, so they run group by group in
// registers, and the later ones on runs of >= 8 contiguous pairs (which vectorize): every element
// still gets the same additions of the same operands, in the same order.
inline void hadamard_row(float* x, int D) {
  for (int i = 0; i < D; i += 8) {
    float* a = x + i;
    float b0 = a[0] + a[1], b1 = a[0] - a[1], b2 = a[2] + a[3], b3 = a[2] - a[3];  // h = 1
    float b4 = a[4] + a[5], b5 = a[4] - a[5], b6 = a[6] + a[7], b7 = a[6] - a[7];
    const float c0 = b0 + b2, c2 = b0 - b2, c1 = b1 + b3, c3 = b1 - b3;  // h = 2
    const float c4 = b4 + b6, c6 = b4 - b6, c5 = b5 + b7, c7 = b5 - b7;
    a[0] = c0 + c4, a[4] = c0 - c4, a[1] = c1 + c5, a[5] = c1 - c5;  // h = 4
    a[2] = c2 + c6, a[6] = c2 - c6, a[3] = c3 + c7, a[7] = c3 - c7;
  }
  for (int h = 8; h < D; h *= 2)
    for (int i = 0; i < D; i += 2 * h) {
      float* __restrict__ lo = x + i;
      float* __restrict__ hi = x + i + h;
      for (int j = 0; j < h; ++j) {
        const float u = lo[j], w = hi[j];
        lo[j] = u + w;
        hi[j] = u - w;
      }
    }
}
// rotate_values(x) (inverse: rotate_values(x, inverse=True)) for n rows of D values, in place.
inline void rotate_value_rows(float* x, int n, int D, bool inverse) {
  constexpr int kMaxD = 256;  // layout.SUPPORTED_HEAD_DIMS
  float sign[kMaxD], post[kMaxD];
  const float c = value_rotation_scale(D);
  for (int d = 0; d < D; ++d) {
    sign[d] = value_sign(d);
    post[d] = inverse ? c * sign[d] : c;  // (x * c) * s = x * (c * s): s is +-1, both exact
  }
  for (int r = 0; r < n; ++r) {
    float* row = x + (size_t)r * D;
    if (!inverse)
      for (int d = 0; d < D; ++d) row[d] *= sign[d];
    hadamard_row(row, D);
    for (int d = 0; d < D; ++d) row[d] *= post[d];
  }
}

// ------------------------------------------------------------------------------ page fields
inline float page_f16(const u8* page, int offset, int i) {
  u16 h;
  std::memcpy(&h, page + offset + 2 * i, 2);
  return f16_to_f32(h);
}
inline u32 page_u32(const u8* page, int offset, int i) {
  u32 w;
  std::memcpy(&w, page + offset + 4 * i, 4);
  return w;
}
inline u16 page_u16(const u8* page, int offset, int i) {
  u16 w;
  std::memcpy(&w, page + offset + 2 * i, 2);
  return w;
}

// Column stored at (group w, position p) of a packed row of `cols` codes (layout.group_permutation).
inline int packed_col(int cols, int w, int p) {
  const int n_g = cols / 64;
  return 64 * (w % n_g) + 16 * (p / 4) + 2 * (w / n_g) + ((p % 4) & 1) + ((p % 4) >> 1) * 8;
}

// hi_pos[d]: row of channel d in wide_idx / wide_plane, -1 if not wide (entries >= D are ignored).
void build_hi_pos(const Layout& L, const u8* page, int* hi_pos);
// The code of element (t, d) of K (full code: wide channels include their top bit) and of V.
int k_code(const Layout& L, const u8* page, int t, int d, const int* hi_pos);
int v_code(const Layout& L, const u8* page, int t, int d);
// reference.dequantize_pages for one element.
float dequant_k(const Layout& L, const u8* page, int t, int d, const int* hi_pos);
float dequant_v(const Layout& L, const u8* page, int t, int d);

}  // namespace kivi_cpu
