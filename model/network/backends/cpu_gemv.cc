// Dense products on one CPU device: y[M, N] = x[M, K] · W[K, N] with W stored transposed, as wt[N, K] (the
// layout Hugging Face files use): every output is a dot product of two contiguous rows, so weight rows
// stream from memory once, x stays in cache, and no thread needs another's partial sums.
//
//   float32  wt f32 [N, K], x f32                          FMA on 16 lanes
//   bfloat16 wt bf16 [N, K], x bf16 (the model's compute)  AVX512-BF16 pair dot products (exact products)
//   int8     wt s8 [N, K], scale [N]                       activations quantized to int8 per 128-block,
//   int4     wt s4 [N, K] (two per byte along K),          integer dot products (AVX512-VNNI), then
//            scale [N, K / group], group % 128 == 0        scaled in float32 per block
//
// XLA:CPU instead converts a bfloat16/int8/int4 weight to a float32 copy before each dot, which costs
// several times the memory traffic of reading it. Quantizing the activations (symmetric, per row and
// block of 128 inputs, round to nearest even) is what llama.cpp's CPU dot products do; the integer
// products and block sums are exact, so the only change against float activations is that rounding.
//
// Sixteen rows or more (a decode step of many requests, a prompt chunk) are arithmetic-bound instead: there
// the AMX tiles take bfloat16 and int8 weights where the CPU has them, and elsewhere the AVX-512 row tiles
// (run_pairs, run_quads), which broadcast each weight pair or quad to 16 packed rows of x.
//
// Threads: XLA's intra-op pool (the FFI's ThreadPool), over contiguous ranges of output rows; products
// under 256 KiB of weights run on the calling thread. Without AVX-512 (BF16 + VNNI) the same arithmetic
// runs as portable loops.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define LLAMA_JAX_AVX512 1
#include <immintrin.h>
#endif

#if defined(LLAMA_JAX_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define LLAMA_JAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using llama_jax::parallel;

constexpr int64_t QB = 128;                 // activation quantization block (inputs)
constexpr int64_t X_CACHE = 256 << 10;      // x rows per pass over the weights: this many bytes (L2)
constexpr int64_t SERIAL_BYTES = 256 << 10; // smaller weights: one thread

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One product's weight: wt [N, K], its scales (int8/int4) and its output y [M, N]. One call computes
// several that share the input (q, k, v; gate, up) as one stream of output rows.
struct Seg {
  const void* wt;
  const void* scale;
  float* y;
  int64_t N;
};

// Output rows of all segments in blocks of 4, split into parts for the threads; x rows in chunks that
// stay in L2. tile(seg, m0, rows, n0) computes rows [m0, m0 + rows) x outputs [n0, n0 + 4) of seg.
template <typename Tile>
void for_tiles(ffi::ThreadPool* pool, const std::vector<Seg>& segs, int64_t M, int64_t weight_bytes,
               int64_t x_row_bytes, const Tile& tile) {
  std::vector<int64_t> first(segs.size() + 1, 0);  // first block of each segment
  for (size_t i = 0; i < segs.size(); ++i) first[i + 1] = first[i] + segs[i].N / 4;
  const int64_t nblocks = first.back();
  const int64_t threads = weight_bytes < SERIAL_BYTES || !pool ? 1 : std::max<int64_t>(1, pool->num_threads());
  const int64_t parts = std::min(nblocks, threads * 2);
  const int64_t mc = std::max<int64_t>(4, X_CACHE / std::max<int64_t>(x_row_bytes, 1) / 4 * 4);
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t m1 = std::min(M, m0 + mc);
    parallel(threads > 1 ? pool : nullptr, parts, [&](int64_t p) {
      const int64_t b0 = nblocks * p / parts, b1 = nblocks * (p + 1) / parts;
      size_t i = 0;
      for (int64_t b = b0; b < b1; ++b) {
        while (b >= first[i + 1]) ++i;
        for (int64_t m = m0; m < m1; m += 4) tile(segs[i], m, std::min<int64_t>(4, m1 - m), 4 * (b - first[i]));
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------
// Quantized activations: per row m and block b of 128 inputs, scale s = max|x| / 127 and q = rint(x / s).
// The block's 128 bytes are laid out as two 64-byte halves matching the weight vectors: for int8 inputs
// [0, 64) and [64, 128); for int4 the even and the odd inputs (the low and high nibbles of a weight
// byte). Weights enter the integer dot product as unsigned (w + offset: 128 for int8, 8 for int4), so
// each 32-bit lane starts from -offset · (sum of its 4 + 4 activation bytes).
struct QuantX {
  std::vector<int8_t> q;     // [M, K / 128, 128]
  std::vector<float> s;      // [M, K / 128]
  std::vector<int32_t> c;    // [M, K / 128, 16]

  QuantX(const float* x, int64_t M, int64_t K, bool nibbles) : q(M * K), s(M * (K / QB)), c(M * (K / QB) * 16) {
    const int32_t offset = nibbles ? 8 : 128;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < K / QB; ++b) {
        const float* xb = x + m * K + b * QB;
        float amax = 0.0f;
        for (int64_t j = 0; j < QB; ++j) amax = std::max(amax, std::fabs(xb[j]));
        const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
        const float inv = 1.0f / scale;
        int8_t* qb = q.data() + (m * (K / QB) + b) * QB;
        for (int64_t j = 0; j < QB; ++j) {
          const int64_t src = nibbles ? (j < 64 ? 2 * j : 2 * (j - 64) + 1) : j;
          qb[j] = static_cast<int8_t>(std::nearbyint(std::min(127.0f, std::max(-127.0f, xb[src] * inv))));
        }
        s[m * (K / QB) + b] = scale;
        int32_t* cb = c.data() + (m * (K / QB) + b) * 16;
        for (int lane = 0; lane < 16; ++lane) {
          int32_t sum = 0;
          for (int j = 0; j < 4; ++j) sum += qb[4 * lane + j] + qb[64 + 4 * lane + j];
          cb[lane] = -offset * sum;
        }
      }
  }
};

template <typename S>
inline float scale_f32(S v);
template <>
inline float scale_f32<float>(float v) { return v; }
template <>
inline float scale_f32<uint16_t>(uint16_t v) { return bf16_to_f32(v); }

#ifdef LLAMA_JAX_AVX512
// ---------------------------------------------------------------------------------------------------
// AVX-512 tiles: MR rows of x against 4 weight rows, 16 accumulators at most, all in registers.

// Every weight line read is preceded by a prefetch into L2 of the line PREFETCH_BYTES further on (the
// weights are read in address order). One core alone then keeps enough reads in flight to stream at
// ~20 GB/s instead of ~9 (int4 layers of the bench shape, measured): the hardware prefetcher does not
// run that far ahead over the short rows of one tile.
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 16384
#endif
inline void prefetch(const void* line) {
  _mm_prefetch(static_cast<const char*>(line) + PREFETCH_BYTES, _MM_HINT_T1);
}

// Float weights: one 64-byte vector holds 16 float32 (FMA) or 32 bfloat16 (pair dot products).
inline __m512 vload(const float* p) { return _mm512_loadu_ps(p); }
inline __m512bh vload(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512 madd(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(x, w, acc); }
inline __m512 madd(__m512 acc, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }

template <int MR, typename T>
void tile_float(const T* x, const T* wt, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64 / sizeof(T)) {
    decltype(vload(wt)) w[4];
    for (int j = 0; j < 4; ++j) {
      const T* r = wt + (n0 + j) * K + k;
      prefetch(r);
      w[j] = vload(r);
    }
    for (int i = 0; i < MR; ++i) {
      const auto xv = vload(x + (m0 + i) * K + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = madd(acc[i][j], w[j], xv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) y[(m0 + i) * N + n0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int MR, typename S>
void tile_int8(const QuantX& xq, const int8_t* wt, const S* scale, float* y, int64_t K, int64_t N, int64_t m0,
               int64_t n0) {
  const int64_t nb = K / QB;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i w0[4], w1[4];
    for (int j = 0; j < 4; ++j) {
      const int8_t* r = wt + (n0 + j) * K + b * QB;
      prefetch(r);
      prefetch(r + 64);
      w0[j] = _mm512_xor_si512(_mm512_loadu_si512(r), flip);
      w1[j] = _mm512_xor_si512(_mm512_loadu_si512(r + 64), flip);
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t mb = (m0 + i) * nb + b;
      const int8_t* q = xq.q.data() + mb * QB;
      const __m512i x0 = _mm512_loadu_si512(q), x1 = _mm512_loadu_si512(q + 64);
      const __m512i c = _mm512_loadu_si512(xq.c.data() + mb * 16);
      const __m512 s = _mm512_set1_ps(xq.s[mb]);
      for (int j = 0; j < 4; ++j) {
        const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c, w0[j], x0), w1[j], x1);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j)
      y[(m0 + i) * N + n0 + j] = _mm512_reduce_add_ps(acc[i][j]) * scale_f32(scale[n0 + j]);
}

template <int MR, typename S>
void tile_int4(const QuantX& xq, const uint8_t* wt, const S* scale, int64_t group, float* y, int64_t K, int64_t N,
               int64_t m0, int64_t n0) {
  const int64_t nb = K / QB, ng = K / group, per_group = group / QB;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x88)), low = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {  // groups outside blocks: no division in the loop
    float sw[4];
    for (int j = 0; j < 4; ++j) sw[j] = scale_f32(scale[(n0 + j) * ng + g]);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m512i we[4], wo[4];
      for (int j = 0; j < 4; ++j) {
        const uint8_t* r = wt + (n0 + j) * (K / 2) + b * 64;
        prefetch(r);
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(r), flip);
        we[j] = _mm512_and_si512(v, low);
        wo[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      for (int i = 0; i < MR; ++i) {
        const int64_t mb = (m0 + i) * nb + b;
        const int8_t* q = xq.q.data() + mb * QB;
        const __m512i xe = _mm512_loadu_si512(q), xo = _mm512_loadu_si512(q + 64);
        const __m512i c = _mm512_loadu_si512(xq.c.data() + mb * 16);
        const float s = xq.s[mb];
        for (int j = 0; j < 4; ++j) {
          const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c, we[j], xe), wo[j], xo);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(s * sw[j]), acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) y[(m0 + i) * N + n0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

#define TILE_SWITCH_S(fn, S, rows, ...)       \
  switch (rows) {                             \
    case 1: fn<1, S>(__VA_ARGS__); break;     \
    case 2: fn<2, S>(__VA_ARGS__); break;     \
    case 3: fn<3, S>(__VA_ARGS__); break;     \
    default: fn<4, S>(__VA_ARGS__);           \
  }
#endif

// Portable float path: 16 partial sums, so that the compiler vectorises it (one running float sum would
// not be, without -ffast-math). K is a multiple of 16 (float32) or 32 (bfloat16).
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_f32(v); }
template <typename T>
float portable_dot(const T* x, const T* w, int64_t K) {
  float part[16] = {0};
  for (int64_t k = 0; k < K; k += 16)
    for (int j = 0; j < 16; ++j) part[j] += widen(x[k + j]) * widen(w[k + j]);
  float sum = 0.0f;
  for (int j = 0; j < 16; ++j) sum += part[j];
  return sum;
}

// ---------------------------------------------------------------------------------------------------
// Products over segments sharing x [M, K]; weight_bytes is their total.

template <typename T>  // float or uint16_t (bfloat16 bits): x and the weights share the type
void run_float(ffi::ThreadPool* pool, const T* x, const std::vector<Seg>& segs, int64_t M, int64_t K, int64_t wb) {
  for_tiles(pool, segs, M, wb, K * sizeof(T), [&](const Seg& g, int64_t m0, int64_t mr, int64_t n0) {
    const T* wt = static_cast<const T*>(g.wt);
#ifdef LLAMA_JAX_AVX512
    TILE_SWITCH_S(tile_float, T, mr, x, wt, g.y, K, g.N, m0, n0)
#else
    for (int64_t i = m0; i < m0 + mr; ++i)
      for (int64_t j = n0; j < n0 + 4; ++j) g.y[i * g.N + j] = portable_dot(x + i * K, wt + j * K, K);
#endif
  });
}

#ifdef LLAMA_JAX_AVX512
// ---------------------------------------------------------------------------------------------------
// Many rows of x (a decode step of 16 requests or more, a prompt chunk) against bfloat16 weights: the
// 4-row tiles above are arithmetic-bound there at about half the CPU's pair-dot-product rate (every output
// ends in a horizontal sum, and a weight vector feeds only 4 rows). Here x is packed once per call in pairs
// of inputs, [K/2, 16 rows, 2] per block of 16 rows (zero-padded), and each weight pair is broadcast to 16
// rows at once: acc[output][16 rows] += w(output, pair) . x(16 rows, pair), no horizontal sums. 12 outputs x
// 16 rows or 8 outputs x 32 rows stay in registers. The AMX path takes the same packed x.
constexpr int64_t PAIR_ROWS = 16;

std::vector<uint16_t> pack_pairs(const uint16_t* x, int64_t M, int64_t K) {
  const int64_t pairs = K / 2;
  std::vector<uint16_t> xv((M + 15) / 16 * pairs * 32, 0);  // [mblocks, K/2, 16, 2]
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < pairs; ++p) {
      uint16_t* d = xv.data() + ((m / 16 * pairs + p) * 16 + m % 16) * 2;
      d[0] = x[m * K + 2 * p];
      d[1] = x[m * K + 2 * p + 1];
    }
  return xv;
}

// Items of `width` outputs of one segment (its last item may be narrower), split into parts for the threads.
// part(run_all) is called once per part, on the thread that runs it; run_all(item) calls item(seg, n0, n1)
// for each of the part's items.
template <typename F>
void for_items(ffi::ThreadPool* pool, const std::vector<Seg>& segs, int64_t wb, int64_t width, const F& part) {
  std::vector<std::pair<size_t, int64_t>> items;  // (segment, first output)
  for (size_t i = 0; i < segs.size(); ++i)
    for (int64_t n0 = 0; n0 < segs[i].N; n0 += width) items.emplace_back(i, n0);
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t threads = wb < SERIAL_BYTES || !pool ? 1 : std::max<int64_t>(1, pool->num_threads());
  const int64_t parts = std::min(n_items, threads * 4);
  parallel(threads > 1 ? pool : nullptr, parts, [&](int64_t p) {
    part([&](const auto& item) {
      for (int64_t it = n_items * p / parts; it < n_items * (p + 1) / parts; ++it) {
        const Seg& g = segs[items[it].first];
        item(g, items[it].second, std::min(g.N, items[it].second + width));
      }
    });
  });
}

// Outputs [n0, n0 + NR) x rows of the 16-row blocks [mb0, mb0 + MB); the weights are prefetched on the first
// pass over them (later row blocks find them in cache). Not inlined: in its caller the compiler ran out of
// general registers for the NR row pointers and reloaded them for every pair (1.5x slower, measured).
template <int NR, int MB>
__attribute__((noinline)) void tile_pairs(const uint16_t* xv, const Seg& g, int64_t M, int64_t K, int64_t mb0,
                                          int64_t n0, bool first) {
  const int64_t pairs = K / 2;
  const uint32_t* x = reinterpret_cast<const uint32_t*>(xv) + mb0 * pairs * 16;
  const uint32_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(g.wt) + (n0 + j) * K);
  __m512 acc[NR][MB];
  for (int j = 0; j < NR; ++j)
    for (int b = 0; b < MB; ++b) acc[j][b] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {  // 16 pairs: one 64-byte line of each weight row
    if (first)
      for (int j = 0; j < NR; ++j) prefetch(w[j] + p0);
    for (int64_t p = p0; p < p0 + 16; ++p) {
      __m512bh xb[MB];
      for (int b = 0; b < MB; ++b) xb[b] = (__m512bh)_mm512_loadu_si512(x + (b * pairs + p) * 16);
      for (int j = 0; j < NR; ++j) {
        const __m512bh wj = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(w[j][p]));
        for (int b = 0; b < MB; ++b) acc[j][b] = _mm512_dpbf16_ps(acc[j][b], wj, xb[b]);
      }
    }
  }
  alignas(64) float t[NR][MB][16];
  for (int j = 0; j < NR; ++j)
    for (int b = 0; b < MB; ++b) _mm512_store_ps(t[j][b], acc[j][b]);
  for (int b = 0; b < MB; ++b)  // row by row: y's rows are often 4 KiB multiples apart (one cache set), and
    for (int64_t r = 0, m = (mb0 + b) * 16; r < 16 && m < M; ++r, ++m)  // column-wise writes thrashed it (2x)
      for (int j = 0; j < NR; ++j) g.y[m * g.N + n0 + j] = t[j][b][r];
}

void run_pairs(ffi::ThreadPool* pool, const uint16_t* x, const std::vector<Seg>& segs, int64_t M, int64_t K,
               int64_t wb) {
  const int64_t mblocks = (M + 15) / 16;
  const std::vector<uint16_t> xv = pack_pairs(x, M, K);
  for_items(pool, segs, wb, 24, [&](const auto& run_all) {
    run_all([&](const Seg& g, int64_t n0, int64_t n1) {
      for (int64_t mb = 0; mb < mblocks; mb += std::min<int64_t>(mblocks - mb, mblocks - mb == 3 ? 3 : 2)) {
        const bool two = mblocks - mb >= 2, three = mblocks - mb == 3;  // 48 rows: one pass over the weights
        for (int64_t n = n0; n < n1;) {  // N % 4 == 0: the tail is whole tiles of 4
          if (three && n1 - n >= 8) tile_pairs<8, 3>(xv.data(), g, M, K, mb, n, mb == 0), n += 8;
          else if (three) tile_pairs<4, 3>(xv.data(), g, M, K, mb, n, mb == 0), n += 4;
          else if (two && n1 - n >= 8) tile_pairs<8, 2>(xv.data(), g, M, K, mb, n, mb == 0), n += 8;
          else if (two) tile_pairs<4, 2>(xv.data(), g, M, K, mb, n, mb == 0), n += 4;
          else if (n1 - n >= 12) tile_pairs<12, 1>(xv.data(), g, M, K, mb, n, mb == 0), n += 12;
          else tile_pairs<4, 1>(xv.data(), g, M, K, mb, n, mb == 0), n += 4;
        }
      }
    });
  });
}

// int8 weights, the same way: x quantized per block of 128 inputs (QuantX, int8 order) and packed in quads,
// [K/4, 16 rows, 4] per block of 16 rows (the AMX int8 layout); each weight quad, made unsigned as in
// tile_int8, is broadcast to 16 rows by VNNI (exact int32 sums per block, starting from the rows' offset
// correction), then added in float32 with the rows' block scales; the weight's scale at the end.
struct QuadX {
  std::vector<int8_t> q;   // [mblocks, K/4, 16, 4]
  std::vector<float> s;    // [mblocks, K/128, 16]: the rows' block scales (0 for padding rows)
  std::vector<int32_t> c;  // [mblocks, K/128, 16]: -offset x the sum of the row's block of q

  QuadX(const QuantX& xq, int64_t M, int64_t K, int32_t offset) {  // offset: what makes the weights unsigned
    const int64_t mblocks = (M + 15) / 16, quads = K / 4, nb = K / QB;
    q.assign(mblocks * quads * 64, 0);
    s.assign(mblocks * nb * 16, 0.0f);
    c.assign(mblocks * nb * 16, 0);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* row = xq.q.data() + m * K;
      int8_t* dst = q.data() + (m / 16 * quads * 16 + m % 16) * 4;
      for (int64_t p = 0; p < quads; ++p) std::memcpy(dst + p * 64, row + 4 * p, 4);  // a quad at a time
      for (int64_t b = 0; b < nb; ++b) {
        int32_t sum = 0;
        for (int64_t k = 0; k < QB; ++k) sum += row[b * QB + k];
        s[(m / 16 * nb + b) * 16 + m % 16] = xq.s[m * nb + b];
        c[(m / 16 * nb + b) * 16 + m % 16] = -offset * sum;
      }
    }
  }
};

// INT4: weights [N, K/2], a block of 128 inputs in 64 bytes (input 2i in byte i's low nibble, 2i + 1 in its
// high one), against x in int4 order (QuantX's even inputs, then odd, in each block): a block's quad p < 16 is
// the low nibbles of its bytes 4p..4p+3, quad 16 + p their high nibbles. Made unsigned (+8) as in tile_int4;
// the group's scale is applied per block, int8's per-output scale at the end.
template <int NR, int MB, typename S, bool INT4>
__attribute__((noinline)) void tile_quads(const QuadX& xq, const Seg& g, int64_t M, int64_t K, int64_t group,
                                          int64_t mb0, int64_t n0, bool first) {
  const int64_t quads = K / 4, nb = K / QB, row_bytes = INT4 ? K / 2 : K;
  const int32_t* x = reinterpret_cast<const int32_t*>(xq.q.data()) + mb0 * quads * 16;
  const int32_t* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = reinterpret_cast<const int32_t*>(static_cast<const int8_t*>(g.wt) + (n0 + j) * row_bytes);
  const S* scale = static_cast<const S*>(g.scale);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  alignas(64) float acc[NR][MB][16] = {};  // touched once a block: memory, so that NR x MB sums fit in registers
  for (int64_t b = 0; b < nb; ++b) {
    __m512i t[NR][MB];
    for (int bb = 0; bb < MB; ++bb) {
      const __m512i c = _mm512_loadu_si512(xq.c.data() + ((mb0 + bb) * nb + b) * 16);
      for (int j = 0; j < NR; ++j) t[j][bb] = c;
    }
    if (first)
      for (int j = 0; j < NR; ++j) {
        prefetch(w[j] + b * (INT4 ? 16 : 32));
        if (!INT4) prefetch(w[j] + b * 32 + 16);
      }
    for (int half = 0; half < (INT4 ? 2 : 1); ++half) {
      const int64_t p0 = b * 32 + half * 16, p1 = INT4 ? p0 + 16 : p0 + 32;
#pragma GCC unroll 2  // rolled, GCC copied the accumulators to other registers at every step (64 rows: +17%)
      for (int64_t p = p0; p < p1; ++p) {
        __m512i xb[MB];
        for (int bb = 0; bb < MB; ++bb) xb[bb] = _mm512_loadu_si512(x + (bb * quads + p) * 16);
        for (int j = 0; j < NR; ++j) {
          __m512i wj;
          if constexpr (INT4) {
            const uint32_t v = (static_cast<uint32_t>(w[j][b * 16 + p - p0]) ^ 0x88888888u) >> (4 * half);
            wj = _mm512_set1_epi32(static_cast<int32_t>(v & 0x0F0F0F0Fu));
          } else {
            wj = _mm512_xor_si512(_mm512_set1_epi32(w[j][p]), flip);
          }
          for (int bb = 0; bb < MB; ++bb) t[j][bb] = _mm512_dpbusd_epi32(t[j][bb], wj, xb[bb]);
        }
      }
    }
    for (int bb = 0; bb < MB; ++bb) {
      const __m512 sx = _mm512_loadu_ps(xq.s.data() + ((mb0 + bb) * nb + b) * 16);
      for (int j = 0; j < NR; ++j) {
        const __m512 s = INT4 ? _mm512_mul_ps(sx, _mm512_set1_ps(scale_f32(scale[(n0 + j) * (K / group) + b * QB / group])))
                              : sx;
        _mm512_store_ps(acc[j][bb], _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[j][bb]), s, _mm512_load_ps(acc[j][bb])));
      }
    }
  }
  float sw[NR];
  for (int j = 0; j < NR; ++j) sw[j] = INT4 ? 1.0f : scale_f32(scale[n0 + j]);
  for (int bb = 0; bb < MB; ++bb)  // row by row, as in tile_pairs
    for (int64_t r = 0, m = (mb0 + bb) * 16; r < 16 && m < M; ++r, ++m)
      for (int j = 0; j < NR; ++j) g.y[m * g.N + n0 + j] = acc[j][bb][r] * sw[j];
}

template <typename S, bool INT4>
void run_quads(ffi::ThreadPool* pool, const QuantX& xq, const std::vector<Seg>& segs, int64_t M, int64_t K,
               int64_t wb, int64_t group = 0) {
  const int64_t mblocks = (M + 15) / 16;
  const QuadX xv(xq, M, K, INT4 ? 8 : 128);
  for_items(pool, segs, wb, 24, [&](const auto& run_all) {  // two row blocks a tile where there are two:
    run_all([&](const Seg& g, int64_t n0, int64_t n1) {      // 64 rows 784 -> ~1,000 GFLOP/s (AMD EPYC, Zen 5)
      for (int64_t mb = 0; mb < mblocks; mb += mblocks - mb == 3 ? 3 : mblocks - mb >= 2 ? 2 : 1)
        for (int64_t n = n0; n < n1;) {  // N % 4 == 0: the tail is whole tiles of 4
          const bool first = mb == 0;
          if (mblocks - mb == 3) tile_quads<4, 3, S, INT4>(xv, g, M, K, group, mb, n, first), n += 4;
          else if (mblocks - mb >= 2 && n1 - n >= 8) tile_quads<8, 2, S, INT4>(xv, g, M, K, group, mb, n, first), n += 8;
          else if (mblocks - mb >= 2) tile_quads<4, 2, S, INT4>(xv, g, M, K, group, mb, n, first), n += 4;
          else if (n1 - n >= 12) tile_quads<12, 1, S, INT4>(xv, g, M, K, group, mb, n, first), n += 12;
          else tile_quads<4, 1, S, INT4>(xv, g, M, K, group, mb, n, first), n += 4;
        }
    });
  });
}
#endif

#ifdef LLAMA_JAX_AMX
// ---------------------------------------------------------------------------------------------------
// AMX (Intel Sapphire Rapids and later), bfloat16 weights with AMX_ROWS or more rows of x: many rows are
// arithmetic-bound in the AVX-512 tiles above (a 16-row decode step or a prompt chunk), and one tile product
// (TDPBF16PS, 16 x 16 x 32) does 64 of their pair dot products. A tile (tmm2) is 16 weight rows x 32 inputs
// read in place from wt [N, K]; x is packed once per call in pairs of inputs ([K/2, 16 rows, 2] per block of
// 16 rows, zero-padded), the layout the second operand needs (tmm3, tmm4); C (tmm0, tmm1) is [16 outputs,
// 16 rows] in float32, written to y transposed. The products of bfloat16 pairs are exact in float32 as in
// the AVX-512 path; only the order of the float32 sums differs.
constexpr int64_t AMX_ROWS = 16;

struct TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_rows(int64_t M, const std::vector<Seg>& segs) {  // the shapes the AMX paths take
  return M >= AMX_ROWS && std::all_of(segs.begin(), segs.end(), [](const Seg& g) { return g.N % 16 == 0; });
}

bool amx_ready() {  // Linux grants a process the tile state on request (5.16+); refused: the AVX-512 path
  static const bool ok = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// Items of 32 outputs (two A tiles) x every row, in pairs of 16-row blocks (two B tiles): four C tiles, so
// every tile load feeds two products. A segment's last 16 outputs may be an item alone. item(g, n0) runs on
// a thread whose tiles are configured: tmm0-3 C, tmm4-5 A, tmm6-7 B, all 16 rows x 64 bytes.
template <typename F>
void for_amx_items(ffi::ThreadPool* pool, const std::vector<Seg>& segs, int64_t wb, const F& item) {
  for_items(pool, segs, wb, 32, [&](const auto& run_all) {
    TileConfig cfg;  // tile configuration is per thread
    for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    run_all([&](const Seg& g, int64_t n0, int64_t) { item(g, n0); });
    _tile_release();
  });
}

inline void store_c(void* c) {  // tmm0-3 to c[4][256] (4-byte elements; a tile number is an immediate)
  char* p = static_cast<char*>(c);
  _tile_stored(0, p, 64);
  _tile_stored(1, p + 1024, 64);
  _tile_stored(2, p + 2048, 64);
  _tile_stored(3, p + 3072, 64);
}

// y of the four [16 outputs, 16 rows] accumulators of rows from 16 * mb and outputs from n0 (tile t: rows
// block t % 2, outputs block t / 2), times scale(output); rows past M and a missing output block skipped.
template <typename Scale>
void write_c(const Seg& g, const float (*c)[256], int64_t M, int64_t mb, int64_t n0, const Scale& scale) {
  for (int t = 0; t < 4; ++t) {
    const int64_t m_first = (mb + t % 2) * 16, o_first = n0 + 16 * (t / 2);
    if (m_first >= M || o_first >= g.N) continue;
    for (int64_t o = 0; o < 16; ++o) {
      const float s = scale(o_first + o);
      for (int64_t r = 0; r < 16 && m_first + r < M; ++r) g.y[(m_first + r) * g.N + o_first + o] = c[t][o * 16 + r] * s;
    }
  }
}

void run_amx(ffi::ThreadPool* pool, const uint16_t* x, const std::vector<Seg>& segs, int64_t M, int64_t K,
             int64_t wb) {
  const int64_t mblocks = (M + 15) / 16, pairs = K / 2;
  const std::vector<uint16_t> xv = pack_pairs(x, M, K);
  for_amx_items(pool, segs, wb, [&](const Seg& g, int64_t n0) {
    alignas(64) float c[4][16 * 16];
    const uint16_t* w0 = static_cast<const uint16_t*>(g.wt) + n0 * K;
    const uint16_t* w1 = n0 + 16 < g.N ? w0 + 16 * K : w0;
    for (int64_t mb = 0; mb < mblocks; mb += 2) {
      const uint16_t* x0 = xv.data() + mb * pairs * 32;
      const uint16_t* x1 = mb + 1 < mblocks ? x0 + pairs * 32 : x0;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < K; k += 32) {
        if (mb == 0)
          for (int r = 0; r < 16; ++r) {
            prefetch(w0 + r * K + k + PREFETCH_BYTES / 2);
            prefetch(w1 + r * K + k + PREFETCH_BYTES / 2);
          }
        _tile_loadd(4, w0 + k, K * 2);
        _tile_loadd(5, w1 + k, K * 2);
        _tile_loadd(6, x0 + k * 16, 64);
        _tile_loadd(7, x1 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      store_c(c);
      write_c(g, c, M, mb, n0, [](int64_t) { return 1.0f; });
    }
  });
}

// int8 weights: the same items with TDPBSSD (signed int8 pairs of 4, exact int32 sums) over the activations
// quantized per block of 128 inputs (QuantX, int8 order); each block's four C tiles are stored and added in
// float32 with the rows' block scales, the weight's scale applied at the end, as the AVX-512 tiles do.
template <typename S>
void run_amx_int8(ffi::ThreadPool* pool, const QuantX& xq, const std::vector<Seg>& segs, int64_t M, int64_t K,
                  int64_t wb) {
  const int64_t mblocks = (M + 15) / 16, quads = K / 4, nb = K / QB;
  std::vector<int8_t> xv(mblocks * quads * 64, 0);  // [mblocks, K/4, 16, 4]
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xv[((m / 16 * quads + k / 4) * 16 + m % 16) * 4 + k % 4] = xq.q[m * K + k];
  for_amx_items(pool, segs, wb, [&](const Seg& g, int64_t n0) {
    alignas(64) int32_t c[4][16 * 16];
    alignas(64) float acc[4][16 * 16];
    alignas(64) float sx[2][16];
    const S* scale = static_cast<const S*>(g.scale);
    const int8_t* w0 = static_cast<const int8_t*>(g.wt) + n0 * K;
    const int8_t* w1 = n0 + 16 < g.N ? w0 + 16 * K : w0;
    for (int64_t mb = 0; mb < mblocks; mb += 2) {
      const int8_t* x0 = xv.data() + mb * quads * 64;
      const int8_t* x1 = mb + 1 < mblocks ? x0 + quads * 64 : x0;
      std::memset(acc, 0, sizeof(acc));
      for (int64_t b = 0; b < nb; ++b) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = b * QB; k < (b + 1) * QB; k += 64) {
          if (mb == 0)
            for (int r = 0; r < 16; ++r) {
              prefetch(w0 + r * K + k + PREFETCH_BYTES);
              prefetch(w1 + r * K + k + PREFETCH_BYTES);
            }
          _tile_loadd(4, w0 + k, K);
          _tile_loadd(5, w1 + k, K);
          _tile_loadd(6, x0 + k * 16, 64);
          _tile_loadd(7, x1 + k * 16, 64);
          _tile_dpbssd(0, 4, 6);
          _tile_dpbssd(1, 4, 7);
          _tile_dpbssd(2, 5, 6);
          _tile_dpbssd(3, 5, 7);
        }
        store_c(c);
        for (int h = 0; h < 2; ++h)
          for (int r = 0; r < 16; ++r) {
            const int64_t m = (mb + h) * 16 + r;
            sx[h][r] = m < M ? xq.s[m * nb + b] : 0.0f;
          }
        for (int t = 0; t < 4; ++t) {
          const __m512 s = _mm512_load_ps(sx[t % 2]);
          for (int o = 0; o < 16; ++o) {
            float* a = acc[t] + o * 16;
            const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c[t] + o * 16));
            _mm512_store_ps(a, _mm512_fmadd_ps(v, s, _mm512_load_ps(a)));
          }
        }
      }
      write_c(g, acc, M, mb, n0, [&](int64_t o) { return scale_f32(scale[o]); });
    }
  });
}
#endif

// Portable integer path: the same exact block sums as the vector code.
template <typename WeightAt>
float int_dot(const QuantX& xq, int64_t m, int64_t K, const WeightAt& w, int64_t j, const float* block_scale) {
  const int64_t nb = K / QB;
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* q = xq.q.data() + (m * nb + b) * QB;
    int32_t t = 0;
    for (int64_t i = 0; i < QB; ++i) t += int32_t(q[i]) * w(j, b, i);
    acc += static_cast<float>(t) * (xq.s[m * nb + b] * block_scale[b]);
  }
  return acc;
}

template <typename S>
void run_int8(ffi::ThreadPool* pool, const float* x, const std::vector<Seg>& segs, int64_t M, int64_t K, int64_t wb) {
  const QuantX xq(x, M, K, false);
  for_tiles(pool, segs, M, wb, K, [&](const Seg& g, int64_t m0, int64_t mr, int64_t n0) {
    const int8_t* wt = static_cast<const int8_t*>(g.wt);
    const S* scale = static_cast<const S*>(g.scale);
#ifdef LLAMA_JAX_AVX512
    TILE_SWITCH_S(tile_int8, S, mr, xq, wt, scale, g.y, K, g.N, m0, n0)
#else
    std::vector<float> ones(K / QB, 1.0f);
    auto w = [&](int64_t j, int64_t b, int64_t i) { return int32_t(wt[j * K + b * QB + i]); };
    for (int64_t i = m0; i < m0 + mr; ++i)
      for (int64_t j = n0; j < n0 + 4; ++j)
        g.y[i * g.N + j] = int_dot(xq, i, K, w, j, ones.data()) * scale_f32(scale[j]);
#endif
  });
}

template <typename S>
void run_int4(ffi::ThreadPool* pool, const float* x, const std::vector<Seg>& segs, int64_t group, int64_t M, int64_t K,
              int64_t wb) {
  const QuantX xq(x, M, K, true);
  for_tiles(pool, segs, M, wb, K, [&](const Seg& g, int64_t m0, int64_t mr, int64_t n0) {
    const uint8_t* wt = static_cast<const uint8_t*>(g.wt);
    const S* scale = static_cast<const S*>(g.scale);
#ifdef LLAMA_JAX_AVX512
    TILE_SWITCH_S(tile_int4, S, mr, xq, wt, scale, group, g.y, K, g.N, m0, n0)
#else
    const int64_t nb = K / QB, ng = K / group;
    int8_t wb[QB];  // one block of a weight row, unpacked in the activations' order (even inputs, then odd)
    for (int64_t j = n0; j < n0 + 4; ++j) {
      std::vector<float> acc(mr, 0.0f);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* bytes = wt + j * (K / 2) + b * 64;
        for (int i = 0; i < 64; ++i) {
          wb[i] = static_cast<int8_t>(static_cast<int8_t>(bytes[i] << 4) >> 4);  // low nibble, sign-extended
          wb[64 + i] = static_cast<int8_t>(static_cast<int8_t>(bytes[i]) >> 4);  // high nibble
        }
        const float sw = scale_f32(scale[j * ng + b * QB / group]);
        for (int64_t i = 0; i < mr; ++i) {
          const int64_t mb = (m0 + i) * nb + b;
          const int8_t* q = xq.q.data() + mb * QB;
          int32_t t = 0;
          for (int k = 0; k < QB; ++k) t += int32_t(q[k]) * int32_t(wb[k]);
          acc[i] += static_cast<float>(t) * (xq.s[mb] * sw);
        }
      }
      for (int64_t i = 0; i < mr; ++i) g.y[(m0 + i) * g.N + j] = acc[i];
    }
#endif
  });
}

}  // namespace

// x [M, K] (bf16 for bf16 weights, else f32), then per product a weight and its scales, (wt_1, scale_1,
// wt_2, scale_2, ...), all of one dtype: wt [N_i, K] f32 / bf16 / s8 / s4; scale: none (an empty
// array) for float weights, [N_i] for s8, [N_i, K / group] for s4 (f32 or bf16). -> y_i f32 [M, N_i].
static ffi::Error Gemv(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                       int64_t group) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || args.size() == 0 || args.size() != 2 * rets.size())
    return ffi::Error::InvalidArgument("cpu_gemv: needs x [M, K] and (weight, scale) pairs, one output each");
  const int64_t M = xd[0], K = xd[1];
  std::vector<Seg> segs;
  ffi::DataType wdt = ffi::DataType::INVALID, sdt = ffi::DataType::INVALID;
  int64_t wb = 0;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto wt = args.get<ffi::AnyBuffer>(2 * i), sc = args.get<ffi::AnyBuffer>(2 * i + 1);
    auto y = rets.get<ffi::AnyBuffer>(i);
    if (!wt || !sc || !y) return ffi::Error::InvalidArgument("cpu_gemv: bad arguments");
    auto wd = wt->dimensions();
    if (wd.size() != 2 || wd[1] != K || wd[0] % 4)
      return ffi::Error::InvalidArgument("cpu_gemv: each weight must be [N, K] with N % 4 == 0");
    if (i > 0 && (wt->element_type() != wdt || sc->element_type() != sdt))
      return ffi::Error::InvalidArgument("cpu_gemv: the weights of one call must share dtypes");
    wdt = wt->element_type();
    sdt = sc->element_type();
    const int64_t N = wd[0];
    const int64_t want = wdt == ffi::DataType::S8 ? N : wdt == ffi::DataType::S4 ? N * (K / std::max<int64_t>(group, 1)) : 0;
    if ((wdt == ffi::DataType::S8 || wdt == ffi::DataType::S4) && sc->element_count() != want)
      return ffi::Error::InvalidArgument("cpu_gemv: scales must be [N] (int8) or [N, K / group] (int4)");
    segs.push_back({wt->untyped_data(), sc->untyped_data(), static_cast<float*>((*y)->untyped_data()), N});
    wb += static_cast<int64_t>(wt->size_bytes());
  }
  const auto xdt = x.element_type();
  const bool f32_scales = sdt == ffi::DataType::F32, bf16_scales = sdt == ffi::DataType::BF16;
  if (wdt == ffi::DataType::F32 && xdt == ffi::DataType::F32 && K % 16 == 0) {
    run_float(&pool, static_cast<const float*>(x.untyped_data()), segs, M, K, wb);
  } else if (wdt == ffi::DataType::BF16 && xdt == ffi::DataType::BF16 && K % 32 == 0) {
#ifdef LLAMA_JAX_AMX
    if (amx_rows(M, segs) && amx_ready()) {
      run_amx(&pool, static_cast<const uint16_t*>(x.untyped_data()), segs, M, K, wb);
      return ffi::Error::Success();
    }
#endif
#ifdef LLAMA_JAX_AVX512
    if (M >= PAIR_ROWS) {
      run_pairs(&pool, static_cast<const uint16_t*>(x.untyped_data()), segs, M, K, wb);
      return ffi::Error::Success();
    }
#endif
    run_float(&pool, static_cast<const uint16_t*>(x.untyped_data()), segs, M, K, wb);
  } else if (wdt == ffi::DataType::S8 && xdt == ffi::DataType::F32 && K % QB == 0 && (f32_scales || bf16_scales)) {
    const float* xp = static_cast<const float*>(x.untyped_data());
#ifdef LLAMA_JAX_AMX
    if (amx_rows(M, segs) && amx_ready()) {
      const QuantX xq(xp, M, K, false);
      f32_scales ? run_amx_int8<float>(&pool, xq, segs, M, K, wb) : run_amx_int8<uint16_t>(&pool, xq, segs, M, K, wb);
      return ffi::Error::Success();
    }
#endif
#ifdef LLAMA_JAX_AVX512
    if (M >= PAIR_ROWS) {
      const QuantX xq(xp, M, K, false);
      f32_scales ? run_quads<float, false>(&pool, xq, segs, M, K, wb) : run_quads<uint16_t, false>(&pool, xq, segs, M, K, wb);
      return ffi::Error::Success();
    }
#endif
    f32_scales ? run_int8<float>(&pool, xp, segs, M, K, wb) : run_int8<uint16_t>(&pool, xp, segs, M, K, wb);
  } else if (wdt == ffi::DataType::S4 && xdt == ffi::DataType::F32 && group > 0 && group % QB == 0 && K % group == 0 &&
             (f32_scales || bf16_scales)) {
    const float* xp = static_cast<const float*>(x.untyped_data());
#ifdef LLAMA_JAX_AVX512
    if (M > PAIR_ROWS) {  // row tiles of two or three row blocks, as int8's (16 rows: tile_int4 was as fast)
      const QuantX xq(xp, M, K, true);
      f32_scales ? run_quads<float, true>(&pool, xq, segs, M, K, wb, group)
                 : run_quads<uint16_t, true>(&pool, xq, segs, M, K, wb, group);
      return ffi::Error::Success();
    }
#endif
    f32_scales ? run_int4<float>(&pool, xp, segs, group, M, K, wb)
               : run_int4<uint16_t>(&pool, xp, segs, group, M, K, wb);
  } else {
    return ffi::Error::InvalidArgument("cpu_gemv: unsupported weight/activation dtypes, K or group");
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(llama_jax_gemv, Gemv,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().RemainingArgs()
                                  .RemainingRets().Attr<int64_t>("group"));
