// kivi_layout.cuh — the kivi-serve page format, mirrored from kivi_serve/quant/layout.py.
//
// One page = P tokens of one layer and one KV head; vLLM sees it as P slots of C bytes
// (KiviLayout<...>::kSlotBytes). tests/test_layout.py compiles this header with the host C++
// compiler and checks every offset against the Python module: change both or neither.
//
// Sections (16-byte aligned, in this order):
//   k planes  K codes, token-major (rows = tokens, cols = channels), mma B-fragment order
//   v planes  V codes, channel-major (rows = channels, cols = tokens), same order
//   k_lo[D] k_scale[D] v_lo[P] v_scale[P] k_cb[2^KB] v_cb[2^VB]      (fp16)
//   exact_k[D] exact_v[D] (fp16) exact_idx (int16)                   (if EXACT)
//   kout_val[D] (fp16) kout_idx[D] (uint8)                           (if OUTLIERS)
//   wide_plane[HI][P/32] (uint32) wide_cb[2^(KB+1)] (fp16) wide_idx[HI] (uint8)   (if HI > 0)
//
// Wide K channels (HI > 0): the HI channels with the largest fp16 k_scale (ties: lower channel)
// are coded with KB + 1 bits against their own codebook wide_cb; the K planes hold the low KB bits
// of every channel's code, wide_plane row i holds the top bit (bit KB) of channel wide_idx[i]:
// bit t % 32 of word t / 32 is token t's. wide_idx is ascending.
//
// Code order: a row of `cols` codes is stored in groups of 16; group w = j * (cols/64) + g holds
// at position p = 4*kt + e the column 64*g + 16*kt + 2*j + {0,1,8,9}[e] — the B fragment of
// lane 4*n + j of mma.m16n8k16 for four consecutive k-tiles. A 2-bit plane stores a group as
// one uint32 (element p in bits 2p..2p+1); a 1-bit plane as one uint16 (element p in bit p).
// Planes: 2 bits -> {2}; 3 bits -> {2, 1}; 4 bits -> {2, 2}; low plane first.
#pragma once

#ifdef __CUDACC__
#define KIVI_HD __host__ __device__
#else
#define KIVI_HD
#endif

namespace kivi {

constexpr int kGroup = 16;    // codes per group (uint32 of a 2-bit plane)
constexpr int kAlign = 16;    // section alignment in bytes
constexpr int kMetaBytes = 2; // fp16 metadata

KIVI_HD constexpr int align_up(int n) { return (n + kAlign - 1) / kAlign * kAlign; }
KIVI_HD constexpr int num_planes(int bits) { return bits == 2 ? 1 : 2; }
KIVI_HD constexpr int plane_width(int bits, int plane) { return plane == 0 ? 2 : (bits == 3 ? 1 : 2); }
KIVI_HD constexpr int plane_bytes(int width, int n) { return n * width / 8; }
KIVI_HD constexpr int code_bytes(int bits, int n) {
  return align_up(plane_bytes(2, n)) + (num_planes(bits) == 2 ? align_up(plane_bytes(plane_width(bits, 1), n)) : 0);
}
// Column stored at (group w, position p) of a packed row of `cols` codes.
KIVI_HD constexpr int packed_col(int cols, int w, int p) {
  return 64 * (w % (cols / 64)) + 16 * (p / 4) + 2 * (w / (cols / 64)) + ((p % 4) & 1) + ((p % 4) >> 1) * 8;
}
// Its inverse: the group w and position p where column `col` of a packed row of `cols` codes is stored.
KIVI_HD constexpr void packed_pos(int cols, int col, int& w, int& p) {
  const int g = col / 64, r = col % 64, kt = r / 16, r16 = r % 16;
  w = ((r16 & 7) >> 1) * (cols / 64) + g;
  p = 4 * kt + ((r16 & 1) | ((r16 >> 3) << 1));
}

// Value rotation (layout.py v_rotate; page.rotate_values): the V codes, v_lo, v_scale and v_cb describe
// each token's value times R = diag(s) H / sqrt(D) (H: Sylvester-Hadamard), exact_v stays unrotated.
// s[d] = -1 where bit 31 of d * 0x9E3779B1 (mod 2^32) is set; 1 / sqrt(D) is the fp32 rounding of the
// double (what torch.tensor(1.0 / D**0.5, dtype=float32) holds). Forward: hadamard(v * s) * c; back:
// hadamard(v) * c * s, hadamard as log2(D) butterfly stages (a + b, a - b) on pairs h = 1, 2, 4, ... apart.
KIVI_HD constexpr float value_sign(int d) { return (((unsigned)d * 0x9E3779B1u) >> 31) ? -1.0f : 1.0f; }
KIVI_HD constexpr float rotation_scale(int head_dim) {
  return head_dim == 64 ? static_cast<float>(0.125) : head_dim == 128 ? static_cast<float>(0.08838834764831843)
                                                                     : static_cast<float>(0.0625);
}

// HI: wide K channels per page (layout.py wide_channels; no default here, on purpose: the Python
// default is 3 * HEAD_DIM / 16 for 2- and 3-bit keys, and a silent 0 would be a different page format).
template <int HEAD_DIM, int PAGE, int K_BITS, int V_BITS, bool EXACT, bool OUTLIERS, int HI>
struct KiviLayout {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "head_dim must be 64, 128 or 256");
  static_assert(PAGE == 64 || PAGE == 128 || PAGE == 256, "page size must be 64, 128 or 256");
  static_assert(K_BITS >= 2 && K_BITS <= 4 && V_BITS >= 2 && V_BITS <= 4, "bits must be 2, 3 or 4");
  static_assert(HI >= 0 && HI < HEAD_DIM && HI % 4 == 0, "wide K channels: a multiple of 4 in [0, head_dim)");
  static_assert(HI == 0 || K_BITS < 4, "wide K channels need k_bits < 4");

  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kPage = PAGE;
  static constexpr int kKBits = K_BITS;
  static constexpr int kVBits = V_BITS;
  static constexpr int kElems = PAGE * HEAD_DIM;
  static constexpr int kWide = HI;

  static constexpr int kKPlane0 = 0;
  static constexpr int kKPlane1 = align_up(kKPlane0 + plane_bytes(2, kElems));  // valid if K_BITS > 2
  static constexpr int kVPlane0 = align_up(kKPlane0 + code_bytes(K_BITS, kElems));
  static constexpr int kVPlane1 = align_up(kVPlane0 + plane_bytes(2, kElems));  // valid if V_BITS > 2
  static constexpr int kKLo = align_up(kVPlane0 + code_bytes(V_BITS, kElems));
  static constexpr int kKScale = align_up(kKLo + HEAD_DIM * kMetaBytes);
  static constexpr int kVLo = align_up(kKScale + HEAD_DIM * kMetaBytes);
  static constexpr int kVScale = align_up(kVLo + PAGE * kMetaBytes);
  static constexpr int kKCb = align_up(kVScale + PAGE * kMetaBytes);
  static constexpr int kVCb = align_up(kKCb + (1 << K_BITS) * kMetaBytes);
  static constexpr int kMetaEnd = kVCb + (1 << V_BITS) * kMetaBytes;
  static constexpr int kExactK = EXACT ? align_up(kMetaEnd) : -1;
  static constexpr int kExactV = EXACT ? align_up(kExactK + HEAD_DIM * kMetaBytes) : -1;
  static constexpr int kExactIdx = EXACT ? align_up(kExactV + HEAD_DIM * kMetaBytes) : -1;
  static constexpr int kExactEnd = EXACT ? kExactIdx + 2 : kMetaEnd;
  static constexpr int kKoutVal = OUTLIERS ? align_up(kExactEnd) : -1;
  static constexpr int kKoutIdx = OUTLIERS ? align_up(kKoutVal + HEAD_DIM * kMetaBytes) : -1;
  static constexpr int kKoutEnd = OUTLIERS ? kKoutIdx + HEAD_DIM : kExactEnd;
  static constexpr int kWidePlane = HI ? align_up(kKoutEnd) : -1;            // uint32[HI][PAGE / 32]
  static constexpr int kWideCb = HI ? align_up(kWidePlane + HI * PAGE / 8) : -1;  // fp16[2^(K_BITS+1)]
  static constexpr int kWideIdx = HI ? align_up(kWideCb + (2 << K_BITS) * kMetaBytes) : -1;  // uint8[HI]
  static constexpr int kContentBytes = HI ? kWideIdx + HI : kKoutEnd;
  static constexpr int kSlotBytes = (kContentBytes + PAGE - 1) / PAGE;  // C
  static constexpr int kPageBytes = PAGE * kSlotBytes;
};

}  // namespace kivi

// Defaults of the page-format defines, so that `nvcc -cubin -I cuda cuda/<kernel>.cu` builds the
// default format by hand (the loader, kivi_serve/kernels/loader.py, always passes every one).
#ifndef KIVI_HEAD_DIM
#define KIVI_HEAD_DIM 128
#endif
#ifndef KIVI_PAGE
#define KIVI_PAGE 64
#endif
#ifndef KIVI_K_BITS
#define KIVI_K_BITS 2
#endif
#ifndef KIVI_V_BITS
#define KIVI_V_BITS 2
#endif
#ifndef KIVI_EXACT
#define KIVI_EXACT 1
#endif
#ifndef KIVI_OUTLIERS
#define KIVI_OUTLIERS 0
#endif
#ifndef KIVI_STAGING  // staging rows: 0 model dtype, 1 int8 + fp32 scale (kivi_serve/quant/staging.py)
#define KIVI_STAGING 0
#endif
#ifndef KIVI_HI  // layout.default_wide_channels
#define KIVI_HI (KIVI_K_BITS < 4 ? 3 * KIVI_HEAD_DIM / 16 : 0)
#endif
#ifndef KIVI_V_ROTATE  // layout.py v_rotate: values quantized rotated (value_sign, rotation_scale)
#define KIVI_V_ROTATE 0
#endif
#ifndef KIVI_V_PIN_ENDS  // layout.py v_pin_ends: the V codebook's end levels pinned at 0 and 1
#define KIVI_V_PIN_ENDS 1
#endif
#ifndef KIVI_DTYPE  // 0: fp16, 1: bf16
#define KIVI_DTYPE 1
#endif
