// realm-nb CPU kernels: y[n, o] = sum_i x[n, i] W[o, i] over GGUF blocks in an interleaved
// layout, as an XLA FFI custom call (see realm_nb/cpu_kernels.py for the layout's packing, the
// build and the Python side).
//
// Glossary: N activation rows, I inputs (a multiple of 32), nb = I/32 blocks, O outputs,
// G = ceil(O/16) groups of 16 output rows.
//
// The layout ("tiles"): W is uint8 [L, G, nb * TS], the matrices of L layers stacked, of which
// the call reads layer l in place (an operand: slicing it in the graph would copy it); tile (g, b) holds block b of the 16 rows
// 16g..16g+15, TS = 16 * the GGUF block size, the same bytes as GGUF's, reordered so that one
// 64-byte vector holds 4 consecutive inputs of each of the 16 rows (the operand layout of
// vpdpbusd against 4 activation bytes broadcast to every lane):
//   d  f16[16]            the rows' block scales
//   m  f16[16]            Q4_1 only: the rows' block minimums
//   Q4_0 / Q4_1: 4 x 64 bytes, byte c*64 + 4r + j = GGUF qs[4c + j] of row r: its low nibble is
//                element 4c + j, its high nibble element 16 + 4c + j (0 <= c < 4)
//   Q8_0:        8 x 64 bytes, byte k*64 + 4r + j = element 4k + j of row r (int8)
// So one block's product for 16 rows is 8 vpdpbusd with no horizontal sums, where GGUF's
// row-major blocks need a reduction per row and block.
//
// The arithmetic is llama.cpp's, with activations of 16 bits: x is rounded per 32-block to
// Q = rint(x * 256 / dx) with dx = amax / 127, held as two int8 planes Q = 256*q1 + q2 (q1 =
// rint(x / dx), q2 = Q - 256*q1 clipped to +-127); with one plane, Q = q1 (8 bits, llama.cpp's
// rounding). Each block's dot is exact in int32 and added in f32:
//   Q8_0 (d, q):        y += d * s * sum(q * Q)
//   Q4_0 (d, nibbles):  y += d * s * sum((nib - 8) * Q)
//   Q4_1 (d, m, nib):   y += d * s * sum(nib * Q) + m * (s * sum(Q))
// with s = dx / 256^(planes - 1). Every output element is computed by the same instruction
// sequence whatever N is and whichever thread runs it, so a row's result never depends on the
// other rows (batch invariance by construction); threads only split the groups.
//
// One binary for any x86-64: the ISA is chosen at run time (CPUID + XGETBV) among
// AVX-512 VNNI (vpdpbusd, 16 rows per zmm), AVX2 (vpmaddubsw, 8 rows per ymm) and a portable
// scalar loop; each vector path is a function with __attribute__((target(...))).

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#define REALM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int QK = 32;    // elements per block
constexpr int GROUP = 16;  // output rows per tile

// ============================================================ formats (ggml type ids)

enum : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };

struct Format {
  int32_t id;
  int tile_size;  // bytes per tile: 16 GGUF blocks
  int qs_at;      // where the quants start in a tile
};

constexpr Format kFormats[] = {{kQ4_0, 16 * 18, 32}, {kQ4_1, 16 * 20, 64}, {kQ8_0, 16 * 34, 32}};

const Format* find_format(int32_t id) {
  for (const Format& f : kFormats)
    if (f.id == id) return &f;
  return nullptr;
}

float f16_to_f32(uint16_t h) {  // IEEE half → float, portable (subnormals, inf, NaN kept)
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t load_u16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }

// ============================================================ activations, quantized once per call

// Per row r and block b: the planes' int8 values (plane p at q[((r*nb + b)*planes + p)*32]),
// the scale s, the weights' bias term and Q4_1's block sum, each one value per (r, b).
struct Acts {
  int64_t n = 0, nb = 0;
  int planes = 1;
  std::vector<int8_t> q;      // [N, nb, planes, 32]
  std::vector<float> s;       // [N, nb]  dx / 256^(planes-1)
  std::vector<int32_t> corr;  // [N, nb]  -offset * sum(Q): the dot's start, undoing the offset
                              //          a vector path added to the weights to make them unsigned
  std::vector<float> msum;    // [N, nb]  s * sum(Q), Q4_1's minimum term
};

// rint for |v| < 2^22 in the default rounding mode (half to even), written so it vectorizes:
// adding 1.5 * 2^23 leaves no fraction bits, and subtracting it back is exact.
inline float round_even(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

// offset: the constant the vector path adds to every weight (0 if none).
void quantize_acts(const float* x, int64_t n, int64_t n_in, int offset, int planes, Acts& a) {
  const int64_t nb = n_in / QK;
  a.n = n;
  a.nb = nb;
  a.planes = planes;
  a.q.resize(size_t(n * nb * planes * QK));
  a.s.resize(size_t(n * nb));
  a.corr.resize(size_t(n * nb));
  a.msum.resize(size_t(n * nb));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * n_in + b * QK;
      float amax = 0.0f;
      for (int i = 0; i < QK; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
      const float dx = amax / 127.0f;
      const float inv = dx != 0.0f ? 1.0f / dx : 0.0f;
      int8_t* q1 = a.q.data() + (r * nb + b) * planes * QK;
      int32_t sum1 = 0, sum2 = 0;
      float t[QK];
      for (int i = 0; i < QK; ++i) t[i] = xb[i] * inv;
      for (int i = 0; i < QK; ++i) {
        const float hi = round_even(t[i]);
        q1[i] = int8_t(hi);
        sum1 += q1[i];
      }
      if (planes == 2) {
        int8_t* q2 = q1 + QK;
        for (int i = 0; i < QK; ++i) {  // Q - 256 q1 in [-128, 128]; ±128 only on exact ties
          float lo = round_even(t[i] * 256.0f) - round_even(t[i]) * 256.0f;
          lo = lo > 127.0f ? 127.0f : (lo < -127.0f ? -127.0f : lo);
          q2[i] = int8_t(lo);
          sum2 += q2[i];
        }
      }
      const int32_t sum_q = planes == 2 ? sum1 * 256 + sum2 : sum1;
      const float s = planes == 2 ? dx * (1.0f / 256.0f) : dx;
      a.s[size_t(r * nb + b)] = s;
      a.corr[size_t(r * nb + b)] = -offset * sum_q;
      a.msum[size_t(r * nb + b)] = s * float(sum_q);
    }
  }
}

// ============================================================ the three dot-product paths

struct Job {
  const Format* fmt;
  const Acts* acts;
  const uint8_t* w;  // [G, nb * tile_size]
  float* y;          // [N, O]
  int64_t n_in, n_out;
};

// ---- portable scalar: the definition the vector paths follow

void groups_scalar(const Job& job, int64_t g0, int64_t g1) {
  const Acts& a = *job.acts;
  const int64_t nb = a.nb;
  const int ts = job.fmt->tile_size, qs_at = job.fmt->qs_at, id = job.fmt->id;
  for (int64_t g = g0; g < g1; ++g) {
    const int rows = int(job.n_out - g * GROUP < GROUP ? job.n_out - g * GROUP : GROUP);
    for (int64_t n = 0; n < a.n; ++n) {
      float acc[GROUP] = {};
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tile = job.w + (g * nb + b) * ts;
        const int8_t* xq = a.q.data() + (n * nb + b) * a.planes * QK;
        const float s = a.s[size_t(n * nb + b)], msum = a.msum[size_t(n * nb + b)];
        for (int r = 0; r < GROUP; ++r) {
          int32_t dot[2] = {0, 0};
          for (int p = 0; p < a.planes; ++p) {
            for (int e = 0; e < QK; ++e) {
              int32_t wq;
              if (id == kQ8_0) {
                wq = int8_t(tile[qs_at + (e / 4) * 64 + 4 * r + e % 4]);
              } else {
                const int c = (e % 16) / 4;
                const uint8_t byte = tile[qs_at + c * 64 + 4 * r + e % 4];
                wq = e < 16 ? (byte & 0x0f) : (byte >> 4);
                if (id == kQ4_0) wq -= 8;
              }
              dot[p] += wq * xq[p * QK + e];
            }
          }
          const int32_t total = a.planes == 2 ? dot[0] * 256 + dot[1] : dot[0];
          const float dw = f16_to_f32(load_u16(tile + 2 * r));
          acc[r] = std::fma(float(total), dw * s, acc[r]);
          if (id == kQ4_1) acc[r] = std::fma(f16_to_f32(load_u16(tile + 32 + 2 * r)), msum, acc[r]);
        }
      }
      for (int r = 0; r < rows; ++r) job.y[n * job.n_out + g * GROUP + r] = acc[r];
    }
  }
}

#ifdef REALM_X86

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- AVX-512 VNNI: a tile's 16 rows in one zmm, 8 vpdpbusd per block and activation plane

#define REALM_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

constexpr int kRowTileVnni = 8;  // activation rows sharing one unpacked tile (registers: 8 + 8)

template <int32_t kType>
REALM_VNNI inline void unpack_vnni(const uint8_t* qs, __m512i w[8]) {
  if (kType == kQ8_0) {  // + 128: unsigned; Acts::corr removes 128 * sum(Q)
    const __m512i bias = _mm512_set1_epi8(char(0x80));
    for (int k = 0; k < 8; ++k)
      w[k] = _mm512_xor_si512(_mm512_loadu_si512(qs + 64 * k), bias);
  } else {
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(qs + 64 * c);
      w[c] = _mm512_and_si512(v, lo4);
      w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
    }
  }
}

// sum over the block's 32 elements of w * q for one activation plane, started at `start`:
// two chains of four, so a single row is not bound by vpdpbusd's latency.
REALM_VNNI inline __m512i dot_plane_vnni(const __m512i w[8], const int8_t* xq, __m512i start) {
  __m512i a0 = start, a1 = _mm512_setzero_si512();
  for (int k = 0; k < 8; k += 2) {
    a0 = _mm512_dpbusd_epi32(a0, w[k], _mm512_set1_epi32(load_i32(xq + 4 * k)));
    a1 = _mm512_dpbusd_epi32(a1, w[k + 1], _mm512_set1_epi32(load_i32(xq + 4 * k + 4)));
  }
  return _mm512_add_epi32(a0, a1);
}

template <int32_t kType, int kPlanes>
REALM_VNNI void groups_vnni(const Job& job, int64_t g0, int64_t g1) {
  const Acts& a = *job.acts;
  const int64_t nb = a.nb;
  const int ts = job.fmt->tile_size, qs_at = job.fmt->qs_at;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t rows = job.n_out - g * GROUP < GROUP ? job.n_out - g * GROUP : GROUP;
    const __mmask16 keep = __mmask16((1u << rows) - 1u);
    const uint8_t* tiles = job.w + g * nb * ts;
    for (int64_t n0 = 0; n0 < a.n; n0 += kRowTileVnni) {
      const int nt = int(a.n - n0 < kRowTileVnni ? a.n - n0 : kRowTileVnni);
      __m512 acc[kRowTileVnni];
      for (int j = 0; j < kRowTileVnni; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tile = tiles + b * ts;
        __m512i w[8];
        unpack_vnni<kType>(tile + qs_at, w);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile)));
        __m512 mw = _mm512_setzero_ps();
        if (kType == kQ4_1)
          mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + 32)));
        for (int j = 0; j < nt; ++j) {
          const int64_t rb = (n0 + j) * nb + b;
          const int8_t* xq = a.q.data() + rb * kPlanes * QK;
          const __m512i corr = _mm512_set1_epi32(a.corr[size_t(rb)]);
          __m512i total;
          if (kPlanes == 2) {
            const __m512i hi = dot_plane_vnni(w, xq, _mm512_setzero_si512());
            total = _mm512_add_epi32(_mm512_slli_epi32(hi, 8), dot_plane_vnni(w, xq + QK, corr));
          } else {
            total = dot_plane_vnni(w, xq, corr);
          }
          const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(a.s[size_t(rb)]));
          acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), sc, acc[j]);
          if (kType == kQ4_1)
            acc[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.msum[size_t(rb)]), acc[j]);
        }
      }
      for (int j = 0; j < nt; ++j)
        _mm512_mask_storeu_ps(job.y + (n0 + j) * job.n_out + g * GROUP, keep, acc[j]);
    }
  }
}

// ---- AVX2: a tile's 16 rows as two halves of 8 (one ymm each), vpmaddubsw + vpmaddwd

#define REALM_AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int kRowTileAvx2 = 4;  // activation rows per unpacked half tile (16 ymm registers)

template <int32_t kType>
REALM_AVX2 inline void unpack_avx2(const uint8_t* qs, int half, __m256i w[8]) {
  if (kType == kQ8_0) {  // signed: |w| against sign(w) * x below (no offset, no saturation)
    for (int k = 0; k < 8; ++k)
      w[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * k + 32 * half));
  } else {
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    for (int c = 0; c < 4; ++c) {
      const __m256i v =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * c + 32 * half));
      w[c] = _mm256_and_si256(v, lo4);
      w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
    }
  }
}

// sum over the block of w * q for one plane, as 8 int32 lanes (one per row). Q4: the nibble
// products (<= 2 * 15 * 127 per pair) add in 16 bits over all 8 groups (<= 30480) before one
// vpmaddwd; Q8_0 (<= 2 * 128 * 127 per pair) widens every group.
template <int32_t kType>
REALM_AVX2 inline __m256i dot_plane_avx2(const __m256i w[8], const int8_t* xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (kType == kQ8_0) {
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < 8; ++k) {
      const __m256i xv = _mm256_set1_epi32(load_i32(xq + 4 * k));
      const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w[k], w[k]),
                                             _mm256_sign_epi8(xv, w[k]));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    return acc;
  }
  __m256i s16 = _mm256_setzero_si256();
  for (int k = 0; k < 8; ++k)
    s16 = _mm256_add_epi16(
        s16, _mm256_maddubs_epi16(w[k], _mm256_set1_epi32(load_i32(xq + 4 * k))));
  return _mm256_madd_epi16(s16, ones);
}

template <int32_t kType, int kPlanes>
REALM_AVX2 void groups_avx2(const Job& job, int64_t g0, int64_t g1) {
  const Acts& a = *job.acts;
  const int64_t nb = a.nb;
  const int ts = job.fmt->tile_size, qs_at = job.fmt->qs_at;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t rows = job.n_out - g * GROUP < GROUP ? job.n_out - g * GROUP : GROUP;
    const uint8_t* tiles = job.w + g * nb * ts;
    for (int half = 0; half < 2 && 8 * half < rows; ++half) {
      for (int64_t n0 = 0; n0 < a.n; n0 += kRowTileAvx2) {
        const int nt = int(a.n - n0 < kRowTileAvx2 ? a.n - n0 : kRowTileAvx2);
        __m256 acc[kRowTileAvx2];
        for (int j = 0; j < kRowTileAvx2; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* tile = tiles + b * ts;
          __m256i w[8];
          unpack_avx2<kType>(tile + qs_at, half, w);
          const __m256 dw = _mm256_cvtph_ps(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 16 * half)));
          __m256 mw = _mm256_setzero_ps();
          if (kType == kQ4_1)
            mw = _mm256_cvtph_ps(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 32 + 16 * half)));
          for (int j = 0; j < nt; ++j) {
            const int64_t rb = (n0 + j) * nb + b;
            const int8_t* xq = a.q.data() + rb * kPlanes * QK;
            __m256i total = dot_plane_avx2<kType>(w, xq);
            if (kPlanes == 2)
              total = _mm256_add_epi32(_mm256_slli_epi32(total, 8),
                                       dot_plane_avx2<kType>(w, xq + QK));
            total = _mm256_add_epi32(total, _mm256_set1_epi32(a.corr[size_t(rb)]));
            const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(a.s[size_t(rb)]));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), sc, acc[j]);
            if (kType == kQ4_1)
              acc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.msum[size_t(rb)]), acc[j]);
          }
        }
        const int64_t col = g * GROUP + 8 * half, valid = rows - 8 * half < 8 ? rows - 8 * half : 8;
        for (int j = 0; j < nt; ++j) {
          float* out = job.y + (n0 + j) * job.n_out + col;
          if (valid == 8) {
            _mm256_storeu_ps(out, acc[j]);
          } else {
            alignas(32) float tmp[8];
            _mm256_store_ps(tmp, acc[j]);
            for (int64_t r = 0; r < valid; ++r) out[r] = tmp[r];
          }
        }
      }
    }
  }
}

#endif  // REALM_X86

// ============================================================ dispatch

enum class Isa : int32_t { kScalar = 0, kAvx2 = 1, kVnni = 2 };

#ifdef REALM_X86
// CPUID leaf 7 / leaf 1 bits, and XGETBV for the register state the OS saves: written out
// because zig's compiler-rt answers __builtin_cpu_supports with 0 for every feature (measured).
bool cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
  if (__get_cpuid_max(0, nullptr) < leaf) return false;
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
  return true;
}

uint64_t os_saved_state() {  // XCR0; only valid when CPUID.1:ECX.OSXSAVE is set
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}
#endif

Isa detect_isa() {
#ifdef REALM_X86
  unsigned l1[4], l7[4];
  if (!cpuid(1, 0, l1) || !(l1[2] & (1u << 27))) return Isa::kScalar;  // no OSXSAVE
  const bool fma = l1[2] & (1u << 12), f16c = l1[2] & (1u << 29), avx = l1[2] & (1u << 28);
  const uint64_t xcr0 = os_saved_state();
  const bool ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xe6) == 0xe6;
  if (!cpuid(7, 0, l7) || !avx || !fma || !f16c || !ymm) return Isa::kScalar;
  const bool avx2 = l7[1] & (1u << 5);
  const bool avx512 = (l7[1] & (1u << 16)) && (l7[1] & (1u << 17)) &&  // F, DQ
                      (l7[1] & (1u << 30)) && (l7[1] & (1u << 31)) &&  // BW, VL
                      (l7[2] & (1u << 11));                            // VNNI
  if (avx2 && avx512 && zmm) return Isa::kVnni;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

// REALM_NB_KERNEL_ISA=scalar|avx2 caps the path (tests compare the paths on one machine).
Isa chosen_isa() {
  static const Isa isa = [] {
    Isa best = detect_isa();
    const char* cap = std::getenv("REALM_NB_KERNEL_ISA");
    if (cap && std::strcmp(cap, "scalar") == 0) return Isa::kScalar;
    if (cap && std::strcmp(cap, "avx2") == 0 && best != Isa::kScalar) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

using GroupsFn = void (*)(const Job&, int64_t, int64_t);

GroupsFn groups_fn(Isa isa, int32_t type, int planes) {
#ifdef REALM_X86
#define REALM_PICK(fn)                                                          \
  if (type == kQ4_0) return planes == 2 ? fn<kQ4_0, 2> : fn<kQ4_0, 1>;        \
  if (type == kQ4_1) return planes == 2 ? fn<kQ4_1, 2> : fn<kQ4_1, 1>;        \
  return planes == 2 ? fn<kQ8_0, 2> : fn<kQ8_0, 1>;
  if (isa == Isa::kVnni) { REALM_PICK(groups_vnni) }
  if (isa == Isa::kAvx2) { REALM_PICK(groups_avx2) }
#undef REALM_PICK
#endif
  (void)isa;
  (void)type;
  (void)planes;
  return groups_scalar;
}

// The weight bias each path folds into Acts::corr (see the paths above).
int weight_offset(Isa isa, int32_t type) {
  if (type == kQ4_0) return isa == Isa::kScalar ? 0 : 8;
  if (type == kQ8_0) return isa == Isa::kVnni ? 128 : 0;
  return 0;
}

// ============================================================ threads: split the groups over XLA's pool

// Work worth one chunk, in weight bytes times (1 + rows/8): small matrices run on the caller
// alone, where waking a second thread would cost more than it saves.
constexpr int64_t kChunkWork = 96 * 1024;

// A range of groups of one matrix.
struct Task {
  const Job* job;
  GroupsFn fn;
  int64_t g0, g1;
};

// Tasks are claimed from an atomic counter by the caller and by helpers scheduled on XLA's
// pool; the caller waits only for tasks that were claimed, so a helper the pool starts late finds
// nothing to do and touches nothing but the shared state (no deadlock if the pool is busy).
struct Split {
  std::atomic<int64_t> next{0}, done{0};
  std::vector<Task> tasks;
};

void run_tasks(Split& s) {
  const int64_t n = int64_t(s.tasks.size());
  for (;;) {
    const int64_t c = s.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= n) return;
    const Task& t = s.tasks[size_t(c)];
    t.fn(*t.job, t.g0, t.g1);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

// REALM_NB_KERNEL_THREADS=k caps the threads one call uses (1: the calling thread only).
int64_t thread_cap() {
  static const int64_t cap = [] {
    const char* v = std::getenv("REALM_NB_KERNEL_THREADS");
    return v ? std::atoll(v) : int64_t(0);
  }();
  return cap;
}

int64_t groups_of(const Job& j) { return (j.n_out + GROUP - 1) / GROUP; }
int64_t work_of(const Job& j) {
  return groups_of(j) * j.acts->nb * j.fmt->tile_size * (1 + j.acts->n / 8);
}

// All matrices of one call share the threads: each is cut into chunks in proportion to its work,
// so three small projections split over two cores as well as one large matrix does.
void parallel_groups(ffi::ThreadPool& pool, const std::vector<Job>& jobs,
                     const std::vector<GroupsFn>& fns) {
  int64_t threads = pool.num_threads();
  if (thread_cap() > 0 && threads > thread_cap()) threads = thread_cap();
  if (threads < 1) threads = 1;
  int64_t total = 0;
  for (const Job& j : jobs) total += work_of(j);
  int64_t chunks = total / kChunkWork;
  if (chunks > 4 * threads) chunks = 4 * threads;
  auto s = std::make_shared<Split>();
  for (size_t k = 0; k < jobs.size(); ++k) {
    const Job& j = jobs[k];
    const int64_t groups = groups_of(j);
    if (groups == 0) continue;
    int64_t parts = threads > 1 && total > 0 ? (chunks * work_of(j) + total - 1) / total : 1;
    if (parts < 1) parts = 1;
    if (parts > groups) parts = groups;
    const int64_t per = (groups + parts - 1) / parts;
    for (int64_t g0 = 0; g0 < groups; g0 += per)
      s->tasks.push_back({&j, fns[k], g0, g0 + per < groups ? g0 + per : groups});
  }
  const int64_t n_tasks = int64_t(s->tasks.size());
  if (threads <= 1 || n_tasks <= 1) {
    for (const Task& t : s->tasks) t.fn(*t.job, t.g0, t.g1);
    return;
  }
  const int64_t helpers = threads - 1 < n_tasks - 1 ? threads - 1 : n_tasks - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([s] { run_tasks(*s); });
  run_tasks(*s);
  while (s->done.load(std::memory_order_acquire) < n_tasks) {
#ifdef REALM_X86
    _mm_pause();
#endif
  }
}

// ============================================================ the FFI handlers

// y_k = x W_k for K matrices sharing one x (q/k/v, gate/up): x is quantized once per weight
// offset and one parallel split covers every output, where separate calls each paid the
// quantization, a thread hand-off and a wait.
ffi::Error matmul_many(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                       const ffi::Buffer<ffi::S32>& layer,
                       const std::vector<ffi::Buffer<ffi::U8>>& ws,
                       ffi::Span<const int32_t> qtypes, int32_t act_planes,
                       std::vector<ffi::Result<ffi::Buffer<ffi::F32>>>& ys) {
  const auto xd = x.dimensions();
  if (xd.size() != 2)
    return ffi::Error::InvalidArgument("realm_quant_matmul: x must be 2-D");
  const int64_t n = xd[0], n_in = xd[1];
  if (act_planes != 1 && act_planes != 2)
    return ffi::Error::InvalidArgument("realm_quant_matmul: act_planes must be 1 or 2");
  if (n_in % QK != 0)
    return ffi::Error::InvalidArgument("realm_quant_matmul: x's width must be a multiple of 32");
  if (ws.size() != ys.size() || ws.size() != qtypes.size() || ws.empty())
    return ffi::Error::InvalidArgument("realm_quant_matmul: one qtype and output per weight");
  if (layer.element_count() != 1)
    return ffi::Error::InvalidArgument("realm_quant_matmul: the layer index must be a scalar");
  const int64_t l = layer.typed_data()[0];
  const Isa isa = chosen_isa();
  std::vector<const Format*> fmts(ws.size());
  for (size_t k = 0; k < ws.size(); ++k) {
    fmts[k] = find_format(qtypes[k]);
    if (fmts[k] == nullptr)
      return ffi::Error::InvalidArgument("realm_quant_matmul: qtype must be Q4_0, Q4_1 or Q8_0");
    const auto wd = ws[k].dimensions(), yd = ys[k]->dimensions();
    if (wd.size() != 3 || yd.size() != 2 || yd[0] != n ||
        wd[1] != (yd[1] + GROUP - 1) / GROUP || wd[2] != n_in / QK * fmts[k]->tile_size)
      return ffi::Error::InvalidArgument("realm_quant_matmul: shapes do not match the layout");
    if (l < 0 || l >= wd[0])
      return ffi::Error::InvalidArgument("realm_quant_matmul: layer index out of range");
  }
  if (n == 0) return ffi::Error::Success();

  // Activations per distinct weight offset (usually one), reused between calls on this thread.
  thread_local Acts acts_by_offset[3];
  thread_local int acts_offset[3];
  int n_acts = 0;
  std::vector<const Acts*> acts_of(ws.size());
  for (size_t k = 0; k < ws.size(); ++k) {
    const int off = weight_offset(isa, qtypes[k]);
    int at = 0;
    while (at < n_acts && acts_offset[at] != off) ++at;
    if (at == n_acts) {
      quantize_acts(x.typed_data(), n, n_in, off, act_planes, acts_by_offset[at]);
      acts_offset[at] = off;
      ++n_acts;
    }
    acts_of[k] = &acts_by_offset[at];
  }
  std::vector<Job> jobs;
  std::vector<GroupsFn> fns;
  jobs.reserve(ws.size());
  for (size_t k = 0; k < ws.size(); ++k) {
    const auto wd = ws[k].dimensions();
    const uint8_t* w = ws[k].typed_data() + l * wd[1] * wd[2];  // layer l, read in place
    jobs.push_back({fmts[k], acts_of[k], w, ys[k]->typed_data(), n_in,
                    int64_t(ys[k]->dimensions()[1])});
    fns.push_back(groups_fn(isa, qtypes[k], act_planes));
  }
  parallel_groups(pool, jobs, fns);
  return ffi::Error::Success();
}

ffi::Error quant_matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::U8> w, int32_t qtype,
                        int32_t act_planes, ffi::ResultBuffer<ffi::F32> y) {
  std::vector<ffi::Buffer<ffi::U8>> ws{w};
  std::vector<ffi::Result<ffi::Buffer<ffi::F32>>> ys{y};
  return matmul_many(pool, x, layer, ws, ffi::Span<const int32_t>(&qtype, 1), act_planes, ys);
}

ffi::Error quant_matmul_many(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs weights, ffi::Span<const int32_t> qtypes,
                             int32_t act_planes, ffi::RemainingRets outs) {
  if (weights.size() != outs.size())
    return ffi::Error::InvalidArgument("realm_quant_matmul_many: one output per weight");
  std::vector<ffi::Buffer<ffi::U8>> ws;
  std::vector<ffi::Result<ffi::Buffer<ffi::F32>>> ys;
  for (size_t k = 0; k < weights.size(); ++k) {
    auto w = weights.get<ffi::Buffer<ffi::U8>>(k);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(k);
    if (w.has_error()) return w.error();
    if (y.has_error()) return y.error();
    ws.push_back(*w);
    ys.push_back(*y);
  }
  return matmul_many(pool, x, layer, ws, qtypes, act_planes, ys);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmQuantMatmul, quant_matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Attr<int32_t>("qtype")
                                  .Attr<int32_t>("act_planes")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmQuantMatmulMany, quant_matmul_many,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Attr<ffi::Span<const int32_t>>("qtypes")
                                  .Attr<int32_t>("act_planes")
                                  .RemainingRets());

// Which path this machine runs (0 scalar, 1 AVX2, 2 AVX-512 VNNI): for tests and benchmarks.
extern "C" int32_t realm_kernels_isa() { return int32_t(chosen_isa()); }
