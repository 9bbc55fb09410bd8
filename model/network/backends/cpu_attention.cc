// Attention of new tokens over one layer of the serving KV cache, on one CPU device (model/kv_cache.py).
//
// The same arithmetic as model/attention.py's XLA path over a cache: scores q·k in float32, scaled by
// 1/sqrt(H); query t of row b sees cache positions s <= positions[b, t]; softmax in float32; the
// probabilities rounded to the cache's dtype (as XLA's bf16 einsum takes them); their sum with v in
// float32 (`round_probs`: when the model computes in bfloat16). Padding queries (segment 0) get zeros:
// they write nothing and nothing reads them.
// In XLA the same step is ~10 small ops per layer (a gather of the row's keys/values, conversions,
// transposes, two dots, the softmax), each costing more in launch overhead than in arithmetic.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// e^x for x <= 0 (scores minus their max), vectorisable: 2^n · p(r) with x = n·ln2 + r, |r| <= ln2/2,
// p the degree-6 Taylor polynomial (relative error < 2e-7, about glibc's expf). std::exp is a scalar
// library call: ~2,400 of them per decode step were most of this kernel's time.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  return p * two_n;
}

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

// The sums of four vectors: [sum(a), sum(b), sum(c), sum(d)].
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto half = [](__m512 x) {
    const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
  };
  return _mm_hadd_ps(_mm_hadd_ps(half(a), half(b)), _mm_hadd_ps(half(c), half(d)));
}

// scores[g * n + s] = q_g . k_s * scale for the G query heads of one KV head, HV = H / 16 vectors a row.
template <typename T, int HV>
void scores_avx512(const float* q, const T* k, int64_t n, int64_t G, int64_t stride, float scale, float* scores) {
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
      _mm_storeu_ps(scores + g * n + s, _mm_mul_ps(sum4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale)));
    }
    for (; s < n; ++s) {
      __m512 acc = _mm512_setzero_ps();
      for (int v = 0; v < HV; ++v) acc = _mm512_fmadd_ps(qv[v], load16(k + s * stride + v * 16), acc);
      scores[g * n + s] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

// out_g = sum_s p[g * n + s] v_s, the accumulator of one head in registers.
template <typename T, int HV>
void values_avx512(const float* p, const T* v, int64_t n, int64_t G, int64_t stride, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[HV];
    for (int i = 0; i < HV; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {
      const __m512 ps = _mm512_set1_ps(p[g * n + s]);
      for (int i = 0; i < HV; ++i) acc[i] = _mm512_fmadd_ps(ps, load16(v + s * stride + i * 16), acc[i]);
    }
    for (int i = 0; i < HV; ++i) _mm512_storeu_ps(out + g * HV * 16 + i * 16, acc[i]);
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
    for (int64_t s = 0; s < n; ++s) sum += sc[s];
    const float inv = 1.0f / sum;
    for (int64_t s = 0; s < n; ++s) sc[s] = round_probs ? round_bf16(sc[s] * inv) : sc[s] * inv;
  }
}

// One (row, query, KV head): its G query heads against keys/values [0, n) of the slot. scores holds G * n
// floats, row H (the portable path's converted key/value row).
template <typename T>
void attend_one(const float* q, const T* k, const T* v, float* out, int64_t n, int64_t G, int64_t K, int64_t H,
                bool round_probs, float* scores, float* row) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const int64_t stride = K * H;
#ifdef __AVX512F__
  if (H == 64 || H == 128) {
    if (H == 64) scores_avx512<T, 4>(q, k, n, G, stride, scale, scores);
    else scores_avx512<T, 8>(q, k, n, G, stride, scale, scores);
    softmax(scores, n, G, round_probs);
    if (H == 64) values_avx512<T, 4>(scores, v, n, G, stride, out);
    else values_avx512<T, 8>(scores, v, n, G, stride, out);
    return;
  }
#endif
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t h = 0; h < H; ++h) row[h] = load(k + s * stride + h);
    for (int64_t g = 0; g < G; ++g) scores[g * n + s] = dot(q + g * H, row, H) * scale;
  }
  softmax(scores, n, G, round_probs);
  std::fill(out, out + G * H, 0.0f);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t h = 0; h < H; ++h) row[h] = load(v + s * stride + h);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * n + s];
      float* o = out + g * H;
      for (int64_t h = 0; h < H; ++h) o[h] += p * row[h];
    }
  }
}

template <typename T>
void run(ffi::ThreadPool* pool, const float* q, const T* kc, const T* vc, const int32_t* rows, const int32_t* pos,
         const int32_t* seg, float* out, int64_t layer, int64_t B, int64_t Tq, int64_t N, int64_t H, int64_t slots,
         int64_t S, int64_t K, int64_t kv_len, bool round_probs) {
  const int64_t G = N / K, items = B * Tq * K;
  auto one = [&](int64_t item) {
    const int64_t kh = item % K, bt = item / K, b = bt / Tq;
    float* o = out + (bt * N + kh * G) * H;
    if (seg[bt] <= 0) {
      std::fill(o, o + G * H, 0.0f);
      return;
    }
    const int64_t n = std::min<int64_t>(kv_len, static_cast<int64_t>(pos[bt]) + 1);
    const int64_t base = ((layer * slots + rows[b]) * S) * K * H + kh * H;
    std::vector<float> scores(G * std::max<int64_t>(n, 1)), row(H);
    attend_one(q + (bt * N + kh * G) * H, kc + base, vc + base, o, n, G, K, H, round_probs, scores.data(),
               row.data());
  };
  // Work of a decode step is tens of microseconds: threads only for long prompts or many rows.
  const int64_t work = items * kv_len * H;
  const int64_t threads = pool && work >= (int64_t(1) << 20) ? std::min<int64_t>(pool->num_threads() + 1, items) : 1;
  if (threads <= 1) {
    for (int64_t i = 0; i < items; ++i) one(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto sh = std::make_shared<Shared>();
  auto loop = [items, &one](Shared& s) {  // a pool thread that starts late finds nothing left to claim
    for (int64_t i; (i = s.next.fetch_add(1)) < items;) {
      one(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t w = 1; w < threads; ++w) pool->Schedule([sh, loop] { loop(*sh); });
  loop(*sh);
  while (sh->done.load(std::memory_order_acquire) < items) {
  }
}

}  // namespace

// q f32 [B, T, N, H]; k, v caches [L, slots, S, K, H] (f32, or bf16 as u16 bits); layer s32 [];
// rows s32 [B]; positions, segments s32 [B, T] -> out f32 [B, T, N, H]
static ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::AnyBuffer layer, ffi::AnyBuffer rows, ffi::AnyBuffer positions,
                            ffi::AnyBuffer segments, ffi::Result<ffi::AnyBuffer> out, int64_t kv_len,
                            int64_t round_probs) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || q.element_type() != ffi::DataType::F32 || k.element_type() != v.element_type() ||
      qd[3] != kd[4] || qd[2] % kd[3] || kv_len > kd[2])
    return ffi::Error::InvalidArgument("cpu_attention: bad shapes or dtypes");
  const int64_t B = qd[0], T = qd[1], N = qd[2], H = qd[3], L = kd[0], slots = kd[1], S = kd[2], K = kd[3];
  const int32_t li = *static_cast<const int32_t*>(layer.untyped_data());
  const int32_t* rp = static_cast<const int32_t*>(rows.untyped_data());
  for (int64_t b = 0; b < B; ++b)
    if (rp[b] < 0 || rp[b] >= slots) return ffi::Error::InvalidArgument("cpu_attention: row out of range");
  if (li < 0 || li >= L) return ffi::Error::InvalidArgument("cpu_attention: layer out of range");
  const float* qp = static_cast<const float*>(q.untyped_data());
  const int32_t* pp = static_cast<const int32_t*>(positions.untyped_data());
  const int32_t* sp = static_cast<const int32_t*>(segments.untyped_data());
  float* op = static_cast<float*>(out->untyped_data());
  if (k.element_type() == ffi::DataType::F32)
    run(&pool, qp, static_cast<const float*>(k.untyped_data()), static_cast<const float*>(v.untyped_data()), rp, pp, sp,
        op, li, B, T, N, H, slots, S, K, kv_len, round_probs);
  else if (k.element_type() == ffi::DataType::U16)
    run(&pool, qp, static_cast<const uint16_t*>(k.untyped_data()), static_cast<const uint16_t*>(v.untyped_data()), rp,
        pp, sp, op, li, B, T, N, H, slots, S, K, kv_len, round_probs);
  else
    return ffi::Error::InvalidArgument("cpu_attention: caches must be f32 or bf16 bits (u16)");
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(llama_jax_attention, Attention,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kv_len").Attr<int64_t>("round_probs"));
