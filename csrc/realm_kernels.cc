// realm-nb CPU kernels: y[n, o] = sum_i x[n, i] W[o, i] over raw GGUF blocks, as an XLA FFI
// custom call (see realm_nb/cpu_kernels.py for the build and the Python side).
//
// Glossary: N activation rows, I inputs (a multiple of 32), O outputs, P = ceil(I/32 / 2) block
// pairs. W is uint8 [O, row_bytes]: each row I/32 GGUF blocks of one type (the table below).
//
// The scheme is llama.cpp's: x is rounded per 32-block to int8 with one f32 scale (dx = amax/127,
// q = round-half-even(x / dx)), each block's dot is exact in int32, and the block results are
// accumulated in f32:
//   Q8_0 (d, q[32] int8):       y += dw*dx * sum(q*qx)
//   Q4_0 (d, nibbles):          y += dw*dx * sum((nib - 8)*qx)
//   Q4_1 (d, m, nibbles):       y += dw*dx * sum(nib*qx) + m * (dx*sum(qx))
// Every output element is computed by the same instruction sequence whatever N is and whichever
// thread runs it, so a row's result never depends on the other rows (batch invariance by
// construction); threads only split the O axis.
//
// One binary for any x86-64: the ISA is chosen at run time (CPUID + XGETBV) among
// AVX-512 VNNI (vpdpbusd, two blocks per zmm), AVX2 (vpmaddubsw, one block per ymm) and a portable
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

constexpr int QK = 32;  // elements per block

// ============================================================ formats (ggml type ids)

enum : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };

struct Format {
  int32_t id;
  int type_size;  // bytes per block
  int qs_at;      // where the quants start in a block
};

constexpr Format kFormats[] = {{kQ4_0, 18, 2}, {kQ4_1, 20, 4}, {kQ8_0, 34, 2}};

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

// Per row n and block pair p (block b = 2p + half), 16 lanes of 4 elements each, the lane layout
// of one vpdpbusd over a pair of blocks. A missing last block (odd I/32) is zeros.
struct Acts {
  int64_t n = 0, pairs = 0;
  std::vector<int8_t> q;      // [N, P*64]   int8 activations
  std::vector<int32_t> corr;  // [N, P*16]   -offset * (sum of the lane's 4 q): the weights' bias
  std::vector<float> d;       // [N, P*16]   dx of the lane's block
  std::vector<float> s;       // [N, P*16]   dx * sum(q of the block) in the block's first lane
};

// offset: the constant the vector path adds to every weight to make it unsigned (0 if none).
// planes 2: rows n..2n-1 hold what rows 0..n-1 rounded away (x - dx*q), quantized the same way.
void quantize_acts(const float* x, int64_t n_x, int64_t n_in, int offset, int planes, Acts& a) {
  const int64_t nb = n_in / QK, pairs = (nb + 1) / 2, n = n_x * planes;
  thread_local std::vector<float> resid;
  if (planes == 2) {  // [2n, I]: x, then its residual after the first rounding
    resid.resize(size_t(n * n_in));
    std::memcpy(resid.data(), x, size_t(n_x * n_in) * sizeof(float));
  }
  a.n = n;
  a.pairs = pairs;
  a.q.assign(size_t(n * pairs * 64), 0);
  a.corr.assign(size_t(n * pairs * 16), 0);
  a.d.assign(size_t(n * pairs * 16), 0.0f);
  a.s.assign(size_t(n * pairs * 16), 0.0f);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = (planes == 2 ? resid.data() : x) + r * n_in + b * QK;
      float amax = 0.0f;
      for (int i = 0; i < QK; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
      const float dx = amax / 127.0f;
      const float inv = dx != 0.0f ? 1.0f / dx : 0.0f;
      int8_t* qb = a.q.data() + r * pairs * 64 + b * QK;
      int32_t sum = 0;
      for (int i = 0; i < QK; ++i) {
        qb[i] = int8_t(std::nearbyint(xb[i] * inv));
        sum += qb[i];
      }
      const int64_t lane0 = r * pairs * 16 + b * 8;
      for (int j = 0; j < 8; ++j) {
        a.corr[lane0 + j] = -offset * (qb[4 * j] + qb[4 * j + 1] + qb[4 * j + 2] + qb[4 * j + 3]);
        a.d[lane0 + j] = dx;
      }
      a.s[lane0] = dx * float(sum);
      if (planes == 2 && r < n_x) {
        float* rb = resid.data() + (n_x + r) * n_in + b * QK;
        for (int i = 0; i < QK; ++i) rb[i] = xb[i] - dx * float(qb[i]);
      }
    }
  }
}

// ============================================================ the three dot-product paths

struct Job {
  const Format* fmt;
  const Acts* acts;
  const uint8_t* w;  // [O, row_bytes]
  float* y;          // [N, O]
  int64_t n_in, n_out, row_bytes;
};

// ---- portable scalar: one block at a time

void rows_scalar(const Job& job, int64_t o0, int64_t o1) {
  const Acts& a = *job.acts;
  const int64_t nb = job.n_in / QK;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = job.w + o * job.row_bytes;
    for (int64_t r = 0; r < a.n; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * job.fmt->type_size;
        const uint8_t* qs = blk + job.fmt->qs_at;
        const int8_t* qx = a.q.data() + r * a.pairs * 64 + b * QK;
        const int64_t lane0 = r * a.pairs * 16 + b * 8;
        int32_t dot = 0;
        for (int i = 0; i < QK; ++i) {
          int32_t wq;
          if (job.fmt->id == kQ8_0) wq = int8_t(qs[i]);
          else wq = i < 16 ? (qs[i] & 0x0f) : (qs[i - 16] >> 4);
          if (job.fmt->id == kQ4_0) wq -= 8;
          dot += wq * qx[i];
        }
        acc += f16_to_f32(load_u16(blk)) * a.d[lane0] * float(dot);
        if (job.fmt->id == kQ4_1) acc += f16_to_f32(load_u16(blk + 2)) * a.s[lane0];
      }
      job.y[r * job.n_out + o] = acc;
    }
  }
}

#ifdef REALM_X86

constexpr int kRowTile = 8;  // activation rows that share one decoded weight block

// ---- AVX2: one block per ymm, vpmaddubsw (u8 x s8 → s16 pairs) then vpmaddwd into 8 lanes

#define REALM_AVX2 __attribute__((target("avx2,fma,f16c")))

REALM_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int32_t kType>
REALM_AVX2 void rows_avx2(const Job& job, int64_t o0, int64_t o1) {
  const Acts& a = *job.acts;
  const int64_t nb = job.n_in / QK;
  const int ts = job.fmt->type_size, qs_at = job.fmt->qs_at;
  const __m128i lo4 = _mm_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = job.w + o * job.row_bytes;
    for (int64_t r0 = 0; r0 < a.n; r0 += kRowTile) {
      const int rt = int(a.n - r0 < kRowTile ? a.n - r0 : kRowTile);
      __m256 acc[kRowTile];
      for (int j = 0; j < rt; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * ts;
        // d (and Q4_1's m) converted together: one load and one vcvtph2ps for both
        int32_t dm_bits;
        std::memcpy(&dm_bits, blk, 4);
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm_bits));
        const __m256 dw = _mm256_broadcastss_ps(dm);
        __m256i wv;
        if (kType == kQ8_0) {
          wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + qs_at));
        } else {
          const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + qs_at));
          wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), lo4), _mm_and_si128(p, lo4));
        }
        const __m256 mv = kType == kQ4_1 ? _mm256_broadcastss_ps(_mm_movehdup_ps(dm))
                                         : _mm256_setzero_ps();
        // Q8_0 is signed: |w| as u8 against sign(w)*x (llama.cpp's trick), no offset needed.
        const __m256i wu = kType == kQ8_0 ? _mm256_sign_epi8(wv, wv) : wv;
        for (int j = 0; j < rt; ++j) {
          const int64_t r = r0 + j, at = r * a.pairs * 16 + b * 8;
          __m256i xv = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(a.q.data() + r * a.pairs * 64 + b * QK));
          if (kType == kQ8_0) xv = _mm256_sign_epi8(xv, wv);
          __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), ones);
          if (kType == kQ4_0)
            dot = _mm256_add_epi32(
                dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.corr.data() + at)));
          const __m256 sc = _mm256_mul_ps(dw, _mm256_loadu_ps(a.d.data() + at));
          // Q4_1's two terms are formed off the accumulator's dependency chain, which then
          // carries one add per block: chained as two FMAs, their latency bounded a row's speed
          // (Q4_1 [16384, 576], one row, one thread: 2.04 → 1.58 ms).
          if (kType == kQ4_1) {
            __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), sc);
            t = _mm256_fmadd_ps(mv, _mm256_loadu_ps(a.s.data() + at), t);
            acc[j] = _mm256_add_ps(acc[j], t);
          } else {
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[j]);
          }
        }
      }
      for (int j = 0; j < rt; ++j) job.y[(r0 + j) * job.n_out + o] = hsum8(acc[j]);
    }
  }
}

// ---- AVX-512 VNNI: two blocks per zmm, vpdpbusd (u8 x s8, 4 products per int32 lane)

#define REALM_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

template <int32_t kType>
REALM_VNNI inline __m256i block_u8(const uint8_t* blk, int qs_at) {
  if (kType == kQ8_0) {  // + 128: unsigned, the bias is removed through Acts::corr
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + qs_at));
    return _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80)));
  }
  const __m128i lo4 = _mm_set1_epi8(0x0f);
  const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + qs_at));
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), lo4), _mm_and_si128(p, lo4));
}

template <int32_t kType>
REALM_VNNI void rows_vnni(const Job& job, int64_t o0, int64_t o1) {
  const Acts& a = *job.acts;
  const int64_t nb = job.n_in / QK;
  const int ts = job.fmt->type_size, qs_at = job.fmt->qs_at;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = job.w + o * job.row_bytes;
    for (int64_t r0 = 0; r0 < a.n; r0 += kRowTile) {
      const int rt = int(a.n - r0 < kRowTile ? a.n - r0 : kRowTile);
      __m512 acc[kRowTile];
      for (int j = 0; j < rt; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t p = 0; p < a.pairs; ++p) {
        const uint8_t* b0 = row + 2 * p * ts;
        const bool two = 2 * p + 1 < nb;
        const __m256i w0 = block_u8<kType>(b0, qs_at);
        const __m256i w1 = two ? block_u8<kType>(b0 + ts, qs_at) : _mm256_setzero_si256();
        const __m512i wv = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
        const float d1 = two ? _cvtsh_ss(load_u16(b0 + ts)) : 0.0f;
        const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(load_u16(b0))),
                                             _mm256_set1_ps(d1), 1);
        __m512 mv = _mm512_setzero_ps();
        if (kType == kQ4_1) {
          const float m1 = two ? _cvtsh_ss(load_u16(b0 + ts + 2)) : 0.0f;
          mv = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(load_u16(b0 + 2))),
                                  _mm256_set1_ps(m1), 1);
        }
        for (int j = 0; j < rt; ++j) {
          const int64_t r = r0 + j, at = (r * a.pairs + p) * 16;
          const __m512i xv = _mm512_loadu_si512(a.q.data() + (r * a.pairs + p) * 64);
          const __m512i c = kType == kQ4_1 ? _mm512_setzero_si512()
                                           : _mm512_loadu_si512(a.corr.data() + at);
          const __m512i dot = _mm512_dpbusd_epi32(c, wv, xv);
          const __m512 sc = _mm512_mul_ps(dw, _mm512_loadu_ps(a.d.data() + at));
          acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[j]);
          if (kType == kQ4_1) acc[j] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(a.s.data() + at), acc[j]);
        }
      }
      for (int j = 0; j < rt; ++j) job.y[(r0 + j) * job.n_out + o] = _mm512_reduce_add_ps(acc[j]);
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

using RowsFn = void (*)(const Job&, int64_t, int64_t);

RowsFn rows_fn(Isa isa, int32_t type) {
#ifdef REALM_X86
  if (isa == Isa::kVnni) {
    if (type == kQ4_0) return rows_vnni<kQ4_0>;
    if (type == kQ4_1) return rows_vnni<kQ4_1>;
    return rows_vnni<kQ8_0>;
  }
  if (isa == Isa::kAvx2) {
    if (type == kQ4_0) return rows_avx2<kQ4_0>;
    if (type == kQ4_1) return rows_avx2<kQ4_1>;
    return rows_avx2<kQ8_0>;
  }
#endif
  (void)isa;
  (void)type;
  return rows_scalar;
}

// The weight bias each path folds into Acts::corr (see the paths above).
int weight_offset(Isa isa, int32_t type) {
  if (type == kQ4_0) return isa == Isa::kScalar ? 0 : 8;
  if (type == kQ8_0) return isa == Isa::kVnni ? 128 : 0;
  return 0;
}

// ============================================================ threads: split O over XLA's pool

// Work worth one chunk, in weight bytes times (1 + rows/4): small matrices run on the caller
// alone, where waking a second thread would cost more than it saves.
constexpr int64_t kChunkWork = 96 * 1024;

// A range of output rows of one matrix.
struct Task {
  const Job* job;
  RowsFn fn;
  int64_t o0, o1;
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
    t.fn(*t.job, t.o0, t.o1);
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

// All matrices of one call share the threads: each is cut into chunks in proportion to its work,
// so three small projections split over two cores as well as one large matrix does.
void parallel_rows(ffi::ThreadPool& pool, const std::vector<Job>& jobs,
                   const std::vector<RowsFn>& fns) {
  int64_t threads = pool.num_threads();
  if (thread_cap() > 0 && threads > thread_cap()) threads = thread_cap();
  if (threads < 1) threads = 1;
  int64_t total = 0;
  for (const Job& j : jobs) total += j.n_out * j.row_bytes * (1 + j.acts->n / 4);
  int64_t chunks = total / kChunkWork;
  if (chunks > 4 * threads) chunks = 4 * threads;
  auto s = std::make_shared<Split>();
  for (size_t k = 0; k < jobs.size(); ++k) {
    const Job& j = jobs[k];
    if (j.n_out == 0) continue;
    const int64_t work = j.n_out * j.row_bytes * (1 + j.acts->n / 4);
    int64_t parts = threads > 1 && total > 0 ? (chunks * work + total - 1) / total : 1;
    if (parts < 1) parts = 1;
    if (parts > j.n_out) parts = j.n_out;
    const int64_t per = (j.n_out + parts - 1) / parts;
    for (int64_t o0 = 0; o0 < j.n_out; o0 += per)
      s->tasks.push_back({&j, fns[k], o0, o0 + per < j.n_out ? o0 + per : j.n_out});
  }
  const int64_t n_tasks = int64_t(s->tasks.size());
  if (threads <= 1 || n_tasks <= 1) {
    for (const Task& t : s->tasks) t.fn(*t.job, t.o0, t.o1);
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

// act_planes 2 rounds x twice (x ≈ dx*q + dx2*q2 per block, q2 the first rounding's residual):
// twice the integer work for the same weight reads, with activations kept to ~14 bits.
//
// y_k = x W_k for K matrices sharing one x (q/k/v, gate/up): x is quantized once per weight
// offset and one parallel split covers every output, where separate calls each paid the
// quantization, a thread hand-off and a wait (half the decode step's time at one row, measured).
ffi::Error matmul_many(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
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
  const Isa isa = chosen_isa();
  std::vector<const Format*> fmts(ws.size());
  for (size_t k = 0; k < ws.size(); ++k) {
    fmts[k] = find_format(qtypes[k]);
    if (fmts[k] == nullptr)
      return ffi::Error::InvalidArgument("realm_quant_matmul: qtype must be Q4_0, Q4_1 or Q8_0");
    const auto wd = ws[k].dimensions(), yd = ys[k]->dimensions();
    if (wd.size() != 2 || yd.size() != 2 || wd[1] != n_in / QK * fmts[k]->type_size ||
        yd[0] != n || yd[1] != wd[0])
      return ffi::Error::InvalidArgument("realm_quant_matmul: shapes do not match the format");
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
  // With two planes each matrix writes [2N, O] into scratch, and the planes are added after.
  thread_local std::vector<float> planes_out;
  std::vector<size_t> scratch_at(ws.size(), 0);
  if (act_planes == 2) {
    size_t need = 0;
    for (size_t k = 0; k < ws.size(); ++k) {
      scratch_at[k] = need;
      need += size_t(2 * n * ys[k]->dimensions()[1]);
    }
    if (planes_out.size() < need) planes_out.resize(need);
  }
  std::vector<Job> jobs;
  std::vector<RowsFn> fns;
  jobs.reserve(ws.size());
  for (size_t k = 0; k < ws.size(); ++k) {
    const int64_t n_out = ws[k].dimensions()[0];
    float* out = act_planes == 2 ? planes_out.data() + scratch_at[k] : ys[k]->typed_data();
    jobs.push_back({fmts[k], acts_of[k], ws[k].typed_data(), out, n_in, n_out,
                    int64_t(ws[k].dimensions()[1])});
    fns.push_back(rows_fn(isa, qtypes[k]));
  }
  parallel_rows(pool, jobs, fns);
  if (act_planes == 2) {
    for (size_t k = 0; k < ws.size(); ++k) {
      const int64_t m = n * ys[k]->dimensions()[1];
      const float* out = planes_out.data() + scratch_at[k];
      float* yd = ys[k]->typed_data();
      for (int64_t i = 0; i < m; ++i) yd[i] = out[i] + out[m + i];
    }
  }
  return ffi::Error::Success();
}

ffi::Error quant_matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                        int32_t qtype, int32_t act_planes, ffi::ResultBuffer<ffi::F32> y) {
  std::vector<ffi::Buffer<ffi::U8>> ws{w};
  std::vector<ffi::Result<ffi::Buffer<ffi::F32>>> ys{y};
  return matmul_many(pool, x, ws, ffi::Span<const int32_t>(&qtype, 1), act_planes, ys);
}

ffi::Error quant_matmul_many(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::RemainingArgs weights, ffi::Span<const int32_t> qtypes,
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
  return matmul_many(pool, x, ws, qtypes, act_planes, ys);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmQuantMatmul, quant_matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Attr<int32_t>("qtype")
                                  .Attr<int32_t>("act_planes")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RealmQuantMatmulMany, quant_matmul_many,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Attr<ffi::Span<const int32_t>>("qtypes")
                                  .Attr<int32_t>("act_planes")
                                  .RemainingRets());

// Which path this machine runs (0 scalar, 1 AVX2, 2 AVX-512 VNNI): for tests and benchmarks.
extern "C" int32_t realm_kernels_isa() { return int32_t(chosen_isa()); }
