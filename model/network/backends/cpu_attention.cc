// Attention of new tokens over one layer of the serving engine's paged KV pool [L, num_blocks, block_size, 2K, H],
// on one CPU device, with the ragged step of model/network/paged_attention.py (`llama_jax_paged_attention`:
// each token over the keys its sequence's block table names, up to its own position; float32, bfloat16 bits
// or int8 pools).
//
// The same arithmetic as the XLA reference: scores q·k in float32, scaled by 1/sqrt(H); softmax in float32;
// the probabilities rounded to bfloat16 when the model computes in it (as XLA's bf16 einsum takes them);
// their sum with v in float32 (`round_probs`). Tokens past the step's sequences get zeros.
// In XLA the same step is ~10 small ops per layer (a gather of the keys/values, conversions, transposes,
// two dots, the softmax), each costing more in launch overhead than in arithmetic.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using llama_jax::exp_nonpositive;

inline float bf16_bits_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float round_bf16(float f) {  // to the nearest bfloat16, ties to even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline float load(const T* p);
template <>
inline float load<float>(const float* p) { return *p; }
template <>
inline float load<uint16_t>(const uint16_t* p) { return bf16_bits_to_f32(*p); }
template <>
inline float load<int8_t>(const int8_t* p) { return static_cast<float>(*p); }

// q . k over H.
inline float dot(const float* a, const float* b, int64_t H) {
#ifdef __AVX512F__
  if (H % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t h = 0; h < H; h += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + h), _mm512_loadu_ps(b + h), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float sum = 0.0f;
  for (int64_t h = 0; h < H; ++h) sum += a[h] * b[h];
  return sum;
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 bfloat16 (as bits) -> float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline __m512 load16(const int8_t* p) {  // 16 int8 -> float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// The sums of four vectors: [sum(a), sum(b), sum(c), sum(d)].
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto half = [](__m512 x) {
    const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
  };
  return _mm_hadd_ps(_mm_hadd_ps(half(a), half(b)), _mm_hadd_ps(half(c), half(d)));
}

// scores[g * ld + s] = q_g . k_s * scale for the G query heads of one KV head, HV = H / 16 vectors a row.
template <typename T, int HV>
void scores_avx512(const float* q, const T* k, int64_t n, int64_t G, int64_t stride, float scale, float* scores,
                   int64_t ld) {
  for (int64_t g = 0; g < G; ++g) {
    __m512 qv[HV];
    for (int v = 0; v < HV; ++v) qv[v] = _mm512_loadu_ps(q + g * HV * 16 + v * 16);
    int64_t s = 0;
    for (; s + 4 <= n; s += 4) {
      __m512 acc[4];
      for (int i = 0; i < 4; ++i) {
        const T* ks = k + (s + i) * stride;
        acc[i] = _mm512_mul_ps(qv[0], load16(ks));
        for (int v = 1; v < HV; ++v) acc[i] = _mm512_fmadd_ps(qv[v], load16(ks + v * 16), acc[i]);
      }
      _mm_storeu_ps(scores + g * ld + s, _mm_mul_ps(sum4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale)));
    }
    for (; s < n; ++s) {
      __m512 acc = _mm512_setzero_ps();
      for (int v = 0; v < HV; ++v) acc = _mm512_fmadd_ps(qv[v], load16(k + s * stride + v * 16), acc);
      scores[g * ld + s] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

// out_g (+)= sum_s p[g * ld + s] v_s, the accumulator of one head in registers (`add`: onto out's values).
template <typename T, int HV>
void values_avx512(const float* p, const T* v, int64_t n, int64_t G, int64_t stride, float* out, int64_t ld,
                   bool add) {
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[HV];
    for (int i = 0; i < HV; ++i) acc[i] = add ? _mm512_loadu_ps(out + g * HV * 16 + i * 16) : _mm512_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {
      const __m512 ps = _mm512_set1_ps(p[g * ld + s]);
      for (int i = 0; i < HV; ++i) acc[i] = _mm512_fmadd_ps(ps, load16(v + s * stride + i * 16), acc[i]);
    }
    for (int i = 0; i < HV; ++i) _mm512_storeu_ps(out + g * HV * 16 + i * 16, acc[i]);
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define LLAMA_JAX_BF16_ATTENTION 1
// bfloat16 pools of a bfloat16 model: q, the keys, the rounded probabilities and the values are all exact
// bfloat16, so their products are exact in float32 and AVX512-BF16's dot (vdpbf16ps: the sum of a pair of
// products added to a float32 lane) takes the bits as they are. Converting each key and value to float32
// once per query head was most of this kernel's time.

inline __m512bh bits(__m512i x) { return (__m512bh)x; }

// [sum(a[0]), sum(a[1]), ..., sum(a[15])]: a transpose-and-add tree, 45 instructions for 16 sums.
inline __m512 sum16(const __m512* a) {
  __m512 t[8], u[4], v[2];
  for (int i = 0; i < 8; ++i)  // [a0+a2, b0+b2, a1+a3, b1+b3] in each 128-bit lane
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // [a, b, c, d] partial sums in each 128-bit lane
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes 0+1 and 2+3 of two vectors
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
}

// scores[g * ld + s] = q_g . k_s * scale over m keys `stride` apart; qb: the G heads' q as bfloat16 bits.
template <int HV>  // HV = H / 32 vectors a row
void scores_bf16(const uint16_t* qb, const uint16_t* k, int64_t m, int64_t G, int64_t stride, float scale,
                 float* scores, int64_t ld) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < G; ++g) {
    __m512bh qv[HV];
    for (int v = 0; v < HV; ++v) qv[v] = bits(_mm512_loadu_si512(qb + g * HV * 32 + v * 32));
    int64_t s = 0;
    for (; s + 16 <= m; s += 16) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) {
        acc[i] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], bits(_mm512_loadu_si512(k + (s + i) * stride)));
        for (int v = 1; v < HV; ++v)
          acc[i] = _mm512_dpbf16_ps(acc[i], qv[v], bits(_mm512_loadu_si512(k + (s + i) * stride + v * 32)));
      }
      _mm512_storeu_ps(scores + g * ld + s, _mm512_mul_ps(sum16(acc), sv));
    }
    for (; s < m; ++s) {
      __m512 acc = _mm512_setzero_ps();
      for (int v = 0; v < HV; ++v) acc = _mm512_dpbf16_ps(acc, qv[v], bits(_mm512_loadu_si512(k + s * stride + v * 32)));
      scores[g * ld + s] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

// acc_g += the interleaved values' pairs times p_g's pairs, for GB heads g.
template <int HV, int GB>
inline void values_heads(const uint16_t* p, int64_t ld, const __m512i* pairs, int64_t np, float* acc) {
  __m512 o[GB][2 * HV];
  for (int g = 0; g < GB; ++g)
    for (int w = 0; w < 2 * HV; ++w) o[g][w] = _mm512_loadu_ps(acc + g * HV * 32 + w * 16);
  for (int64_t j = 0; j < np; ++j)
    for (int g = 0; g < GB; ++g) {
      int32_t pp;
      std::memcpy(&pp, p + g * ld + 2 * j, 4);
      const __m512bh pv = bits(_mm512_set1_epi32(pp));
      for (int w = 0; w < 2 * HV; ++w) o[g][w] = _mm512_dpbf16_ps(o[g][w], bits(pairs[j * 2 * HV + w]), pv);
    }
  for (int g = 0; g < GB; ++g)
    for (int w = 0; w < 2 * HV; ++w) _mm512_storeu_ps(acc + g * HV * 32 + w * 16, o[g][w]);
}

// pairs[j] = values 2j and 2j + 1 (of m, `stride` apart) interleaved, so that one vdpbf16ps adds both of a
// pair's products (an odd last value is paired with zeros); HV * 2 vectors a pair.
template <int HV>
void interleave(const uint16_t* v, int64_t m, int64_t stride, __m512i* pairs) {
  for (int64_t j = 0; j < (m + 1) / 2; ++j) {
    const uint16_t* a = v + 2 * j * stride;
    const bool odd = 2 * j + 1 == m;
    for (int u = 0; u < HV; ++u) {
      const __m512i x = _mm512_loadu_si512(a + u * 32);
      const __m512i y = odd ? _mm512_setzero_si512() : _mm512_loadu_si512(a + stride + u * 32);
      _mm512_store_si512(pairs + j * 2 * HV + 2 * u, _mm512_unpacklo_epi16(x, y));
      _mm512_store_si512(pairs + j * 2 * HV + 2 * u + 1, _mm512_unpackhi_epi16(x, y));
    }
  }
}

// acc_g += sum_s p[g * ld + s] v_s over the np interleaved pairs, p as bfloat16 bits (p[g * ld + 2 np - 1]
// finite); acc's lanes are in the pairs' order (see `unscramble`).
template <int HV>
void values_bf16(const uint16_t* p, int64_t ld, const __m512i* pairs, int64_t np, int64_t G, float* acc) {
  int64_t g = 0;  // GB heads at a time: 2 * HV * GB accumulators hide vdpbf16ps' latency
  for (; g + 8 / HV <= G; g += 8 / HV) values_heads<HV, 8 / HV>(p + g * ld, ld, pairs, np, acc + g * HV * 32);
  for (; g < G; ++g) values_heads<HV, 1>(p + g * ld, ld, pairs, np, acc + g * HV * 32);
}

// values_bf16's lane order back to h: vector 2u (unpacklo) holds h = 32u + 8L + i, vector 2u + 1 (unpackhi)
// h = 32u + 8L + 4 + i, in 128-bit lane L, element i.
inline void unscramble(const float* acc, int64_t G, int64_t H, float* out) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t u = 0; u < H / 32; ++u)
      for (int L = 0; L < 4; ++L)
        for (int i = 0; i < 4; ++i) {
          const float* a = acc + g * H + u * 32;
          out[g * H + u * 32 + 8 * L + i] = a[4 * L + i];
          out[g * H + u * 32 + 8 * L + 4 + i] = a[16 + 4 * L + i];
        }
}
#endif

// Softmax of each head's n scores in place (rounded to bfloat16 when asked).
inline void softmax(float* scores, int64_t n, int64_t G, bool round_probs) {
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores + g * n;
    float part[16], mx = -INFINITY, sum = 0.0f;  // 16 partial maxima: a float max reduction does not vectorise
    std::fill(part, part + 16, -INFINITY);
    int64_t s0 = 0;
    for (; s0 + 16 <= n; s0 += 16)
      for (int j = 0; j < 16; ++j) part[j] = std::max(part[j], sc[s0 + j]);
    for (; s0 < n; ++s0) mx = std::max(mx, sc[s0]);
    for (int j = 0; j < 16; ++j) mx = std::max(mx, part[j]);
    for (int64_t s = 0; s < n; ++s) sc[s] = exp_nonpositive(sc[s] - mx);
    std::fill(part, part + 16, 0.0f);  // 16 partial sums too: one running sum is a chain of dependent adds
    for (s0 = 0; s0 + 16 <= n; s0 += 16)
      for (int j = 0; j < 16; ++j) part[j] += sc[s0 + j];
    for (; s0 < n; ++s0) sum += sc[s0];
    for (int j = 0; j < 16; ++j) sum += part[j];
    const float inv = 1.0f / sum;
    for (int64_t s = 0; s < n; ++s) sc[s] = round_probs ? round_bf16(sc[s] * inv) : sc[s] * inv;
  }
}


// one(i) for i in [0, items), on the pool's threads too when `work` (multiply-adds) is 128 Ki or more: a
// decode step of 16 sequences over 170 keys (700 Ki) took 0.163 ms a layer on one thread, 0.099 on two;
// under ~128 Ki (one sequence's few hundred keys) waking a thread costs what it saves.
template <typename F>
void parallel_for(ffi::ThreadPool* pool, int64_t items, int64_t work, F& one) {
  llama_jax::parallel(work >= (int64_t(1) << 17) ? pool : nullptr, items, one);
}

// ---------------------------------------------------------------------------------------------
// Paged: the serving pool [L, num_blocks, block_size, 2K, H] (key head i at 2i, value head i at 2i + 1;
// int8 with scales [L, num_blocks, block_size, 2K]) and the ragged step of
// jax.experimental.pallas.ops.tpu.ragged_paged_attention: sequence i's queries are tokens
// cu_q_lens[i]..cu_q_lens[i + 1] and the last q_len of its kv_lens[i] keys, in blocks page_indices[i, :].

struct Paged {
  const int32_t* kv_lens;
  const int32_t* pages;  // [S, P]
  const int32_t* cu;     // [S + 1]
  int64_t P, blocks, bs, K, H, layer;
};

// scores[g * ld + s] = q_g . k_s * scale over m keys `stride` apart (`row`: H floats of scratch).
template <typename T>
void block_scores(const float* q, const T* k, int64_t m, int64_t G, int64_t H, int64_t stride, float scale,
                  float* scores, int64_t ld, float* row) {
#ifdef __AVX512F__
  if (H == 64) return scores_avx512<T, 4>(q, k, m, G, stride, scale, scores, ld);
  if (H == 128) return scores_avx512<T, 8>(q, k, m, G, stride, scale, scores, ld);
#endif
  for (int64_t s = 0; s < m; ++s) {
    for (int64_t h = 0; h < H; ++h) row[h] = load(k + s * stride + h);
    for (int64_t g = 0; g < G; ++g) scores[g * ld + s] = dot(q + g * H, row, H) * scale;
  }
}

// out_g += sum_s p[g * ld + s] v_s over m values `stride` apart.
template <typename T>
void block_values(const float* p, const T* v, int64_t m, int64_t G, int64_t H, int64_t stride, float* out,
                  int64_t ld, float* row) {
#ifdef __AVX512F__
  if (H == 64) return values_avx512<T, 4>(p, v, m, G, stride, out, ld, true);
  if (H == 128) return values_avx512<T, 8>(p, v, m, G, stride, out, ld, true);
#endif
  for (int64_t s = 0; s < m; ++s) {
    for (int64_t h = 0; h < H; ++h) row[h] = load(v + s * stride + h);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t h = 0; h < H; ++h) out[g * H + h] += p[g * ld + s] * row[h];
  }
}

// The G query heads of KV head kh for one token of sequence `seq`, over its first n keys, block by block.
// sc: the int8 pool's scales (nullptr for float pools): a key's scale multiplies its scores, a value's its
// probabilities. buf: G * n + G * bs + H floats of scratch.
template <typename T>
void paged_one(const float* q, const T* kv, const float* sc, const Paged& pg, int64_t seq, int64_t n, int64_t kh,
               int64_t G, bool round_probs, float* out, float* buf) {
  const int64_t bs = pg.bs, K2 = 2 * pg.K, H = pg.H, stride = K2 * H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  float *scores = buf, *scaled = buf + G * n, *row = scaled + G * bs;
  const int32_t* table = pg.pages + seq * pg.P;
  for (int64_t b0 = 0; b0 < n; b0 += bs) {
    const int64_t m = std::min(bs, n - b0), tok0 = (pg.layer * pg.blocks + table[b0 / bs]) * bs;
    block_scores(q, kv + tok0 * stride + 2 * kh * H, m, G, H, stride, scale, scores + b0, n, row);
    if (sc)
      for (int64_t s = 0; s < m; ++s)
        for (int64_t g = 0; g < G; ++g) scores[g * n + b0 + s] *= sc[(tok0 + s) * K2 + 2 * kh];
  }
  softmax(scores, n, G, round_probs);
  std::fill(out, out + G * H, 0.0f);
  for (int64_t b0 = 0; b0 < n; b0 += bs) {
    const int64_t m = std::min(bs, n - b0), tok0 = (pg.layer * pg.blocks + table[b0 / bs]) * bs;
    const float* p = scores + b0;
    int64_t ld = n;
    if (sc) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t s = 0; s < m; ++s) scaled[g * bs + s] = scores[g * n + b0 + s] * sc[(tok0 + s) * K2 + 2 * kh + 1];
      p = scaled, ld = bs;
    }
    block_values(p, kv + tok0 * stride + (2 * kh + 1) * H, m, G, H, stride, out, ld, row);
  }
}

#ifdef LLAMA_JAX_BF16_ATTENTION
// paged_one for a bfloat16 pool and model (H = 32 * HV) with AVX512-BF16: the same arithmetic, the products
// summed in another order.
template <int HV>
void paged_one_bf16(const float* q, const uint16_t* kv, const Paged& pg, int64_t seq, int64_t n, int64_t kh,
                    int64_t G, float* out) {
  constexpr int64_t H = 32 * HV;
  const int64_t bs = pg.bs, stride = 2 * pg.K * H, ld = n + 2;  // p: two more columns, zeros (values_bf16)
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  std::vector<float> scores(G * n), acc(G * H, 0.0f);
  std::vector<uint16_t> qb(G * H), p(G * ld, 0);
  static thread_local std::vector<__m512i> pairs_buf;  // all the values, interleaved: reused, as zero-filling a
  if (pairs_buf.size() < size_t((n + 1) / 2 * 2 * HV))  // new one for every token and KV head cost ~8%
    pairs_buf.resize((n + 1) / 2 * 2 * HV);
  __m512i* pairs = pairs_buf.data();
  for (int64_t i = 0; i < G * H; ++i) {  // q is bfloat16 held in float32: its top 16 bits
    uint32_t u;
    std::memcpy(&u, q + i, 4);
    qb[i] = static_cast<uint16_t>(u >> 16);
  }
  const int32_t* table = pg.pages + seq * pg.P;
  auto block = [&](int64_t b0) { return kv + (pg.layer * pg.blocks + table[b0 / bs]) * bs * stride; };
  for (int64_t b0 = 0; b0 < n; b0 += bs) {  // a block's keys and values together: reading them in two passes was
    const uint16_t* b = block(b0);             // slower from memory (their rows are 2K * H apart)
    if (b0 + bs < n) {  // the next block's keys and values: blocks lie anywhere, so the CPU cannot guess them
      const char* next = reinterpret_cast<const char*>(block(b0 + bs) + 2 * kh * H);
      for (int64_t s = 0; s < bs; ++s)
        for (int64_t c = 0; c < 4 * H; c += 64) _mm_prefetch(next + s * stride * 2 + c, _MM_HINT_T0);
    }
    scores_bf16<HV>(qb.data(), b + 2 * kh * H, std::min(bs, n - b0), G, stride, scale, scores.data() + b0, n);
    interleave<HV>(b + (2 * kh + 1) * H, std::min(bs, n - b0), stride, pairs + b0 / 2 * 2 * HV);
  }
  softmax(scores.data(), n, G, true);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t s = 0; s < n; ++s) {  // rounded to bfloat16 by softmax: exact in its top 16 bits
      uint32_t u;
      std::memcpy(&u, &scores[g * n + s], 4);
      p[g * ld + s] = static_cast<uint16_t>(u >> 16);
    }
  values_bf16<HV>(p.data(), ld, pairs, (n + 1) / 2, G, acc.data());
  unscramble(acc.data(), G, H, out);
}
#endif

// tok_seq[t]: the sequence of token t (-1: padding, output zeros).
template <typename T>
void run_paged(ffi::ThreadPool* pool, const float* q, const T* kv, const float* sc, const Paged& pg,
               const int32_t* tok_seq, float* out, int64_t Tq, int64_t N, bool round_probs) {
  const int64_t K = pg.K, H = pg.H, G = N / K, items = Tq * K;
  int64_t work = 0, longest = 1;  // work counted as the dense kernel does: keys x KV heads x H per token
  for (int64_t t = 0; t < Tq; ++t) {
    if (tok_seq[t] < 0) continue;
    work += pg.kv_lens[tok_seq[t]] * K * H;
    longest = std::max<int64_t>(longest, pg.kv_lens[tok_seq[t]]);
  }
  auto one = [&](int64_t item) {
    const int64_t kh = item % K, t = item / K, seq = tok_seq[t];
    float* o = out + (t * N + kh * G) * H;
    if (seq < 0) {
      std::fill(o, o + G * H, 0.0f);
      return;
    }
    const int64_t q_len = pg.cu[seq + 1] - pg.cu[seq], kv_len = pg.kv_lens[seq];
    const int64_t n = kv_len - q_len + (t - pg.cu[seq]) + 1;  // causal: the keys up to its own
#ifdef LLAMA_JAX_BF16_ATTENTION
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (round_probs && pg.bs % 2 == 0 && H == 64) return paged_one_bf16<2>(q + (t * N + kh * G) * H, kv, pg, seq, n, kh, G, o);
      if (round_probs && pg.bs % 2 == 0 && H == 128) return paged_one_bf16<4>(q + (t * N + kh * G) * H, kv, pg, seq, n, kh, G, o);
    }
#endif
    std::vector<float> buf(G * (longest + pg.bs) + H);
    paged_one(q + (t * N + kh * G) * H, kv, sc, pg, seq, n, kh, G, round_probs, o, buf.data());
  };
  parallel_for(pool, items, work, one);
}

}  // namespace


// Checks the step's metadata against the pool and fills tok_seq (see run_paged); an error names what is wrong.
static ffi::Error paged_metadata(const Paged& pg, int64_t S, int64_t num_seqs, int64_t Tq, int32_t* tok_seq) {
  if (num_seqs < 0 || num_seqs > S) return ffi::Error::InvalidArgument("cpu_paged_attention: num_seqs out of range");
  std::fill(tok_seq, tok_seq + Tq, -1);
  if (pg.cu[0] != 0) return ffi::Error::InvalidArgument("cpu_paged_attention: cu_q_lens[0] must be 0");
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t a = pg.cu[i], b = pg.cu[i + 1], kv_len = pg.kv_lens[i];
    if (b < a || b > Tq) return ffi::Error::InvalidArgument("cpu_paged_attention: cu_q_lens not increasing within the tokens");
    if (kv_len < b - a || kv_len > pg.P * pg.bs)
      return ffi::Error::InvalidArgument("cpu_paged_attention: kv_lens[i] must be in [q_len_i, pages_per_seq * block_size]");
    for (int64_t p = 0; p < (kv_len + pg.bs - 1) / pg.bs; ++p)
      if (pg.pages[i * pg.P + p] < 0 || pg.pages[i * pg.P + p] >= pg.blocks)
        return ffi::Error::InvalidArgument("cpu_paged_attention: page index out of range");
    std::fill(tok_seq + a, tok_seq + b, static_cast<int32_t>(i));
  }
  return ffi::Error::Success();
}

// q f32 [T, N, H]; kv [L, num_blocks, block_size, 2K, H] (f32, bf16 as u16 bits, or s8); scale f32
// [L, num_blocks, block_size, 2K] for s8, else [0]; layer s32 []; kv_lens s32 [S]; page_indices s32 [S, P];
// cu_q_lens s32 [S + 1]; num_seqs s32 [1] -> out f32 [T, N, H] (zeros for tokens past cu_q_lens[num_seqs])
static ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kv, ffi::AnyBuffer scale,
                                 ffi::AnyBuffer layer, ffi::AnyBuffer kv_lens, ffi::AnyBuffer page_indices,
                                 ffi::AnyBuffer cu_q_lens, ffi::AnyBuffer num_seqs, ffi::Result<ffi::AnyBuffer> out,
                                 int64_t round_probs) {
  auto qd = q.dimensions(), kd = kv.dimensions(), pd = page_indices.dimensions();
  const auto et = kv.element_type();
  const bool int8 = et == ffi::DataType::S8;
  if (qd.size() != 3 || kd.size() != 5 || pd.size() != 2 || q.element_type() != ffi::DataType::F32 || qd[2] != kd[4] ||
      kd[3] % 2 || qd[1] % (kd[3] / 2) || kv_lens.dimensions().size() != 1 || kv_lens.dimensions()[0] != pd[0] ||
      cu_q_lens.dimensions()[0] != pd[0] + 1 || (int8 && scale.element_count() != kv.element_count() / kd[4]))
    return ffi::Error::InvalidArgument("cpu_paged_attention: bad shapes or dtypes");
  if (!int8 && et != ffi::DataType::F32 && et != ffi::DataType::U16)
    return ffi::Error::InvalidArgument("cpu_paged_attention: the pool must be f32, bf16 bits (u16) or s8");
  const int32_t li = *static_cast<const int32_t*>(layer.untyped_data());
  if (li < 0 || li >= kd[0]) return ffi::Error::InvalidArgument("cpu_paged_attention: layer out of range");
  const Paged pg{static_cast<const int32_t*>(kv_lens.untyped_data()), static_cast<const int32_t*>(page_indices.untyped_data()),
                 static_cast<const int32_t*>(cu_q_lens.untyped_data()), pd[1], kd[1], kd[2], kd[3] / 2, kd[4], li};
  const int64_t T = qd[0], N = qd[1];
  std::vector<int32_t> tok_seq(T);
  ffi::Error err = paged_metadata(pg, pd[0], *static_cast<const int32_t*>(num_seqs.untyped_data()), T, tok_seq.data());
  if (err.failure()) return err;
  const float* qp = static_cast<const float*>(q.untyped_data());
  float* op = static_cast<float*>(out->untyped_data());
  if (int8)
    run_paged(&pool, qp, static_cast<const int8_t*>(kv.untyped_data()), static_cast<const float*>(scale.untyped_data()), pg,
              tok_seq.data(), op, T, N, round_probs);
  else if (et == ffi::DataType::F32)
    run_paged(&pool, qp, static_cast<const float*>(kv.untyped_data()), nullptr, pg, tok_seq.data(), op, T, N, round_probs);
  else
    run_paged(&pool, qp, static_cast<const uint16_t*>(kv.untyped_data()), nullptr, pg, tok_seq.data(), op, T, N,
              round_probs);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(llama_jax_paged_attention, PagedAttention,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>().Attr<int64_t>("round_probs"));
