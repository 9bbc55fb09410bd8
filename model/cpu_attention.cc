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
  const float n = std::nearbyint(x * 1.44269504f);
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

// One (row, query, KV head): its G query heads against keys/values [0, n) of the slot; each key and value
// row is converted once for all G heads. scores holds G * n floats, row H.
template <typename T>
void attend_one(const float* q, const T* k, const T* v, float* out, int64_t n, int64_t G, int64_t K, int64_t H,
                bool round_probs, float* scores, float* row) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  for (int64_t s = 0; s < n; ++s) {
    const T* ks = k + s * K * H;
    for (int64_t h = 0; h < H; ++h) row[h] = load(ks + h);
    for (int64_t g = 0; g < G; ++g) scores[g * n + s] = dot(q + g * H, row, H) * scale;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores + g * n;
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t s = 0; s < n; ++s) mx = std::max(mx, sc[s]);
    for (int64_t s = 0; s < n; ++s) sc[s] = exp_nonpositive(sc[s] - mx);
    for (int64_t s = 0; s < n; ++s) sum += sc[s];
    const float inv = 1.0f / sum;
    for (int64_t s = 0; s < n; ++s) sc[s] = round_probs ? round_bf16(sc[s] * inv) : sc[s] * inv;
  }
  std::fill(out, out + G * H, 0.0f);
  for (int64_t s = 0; s < n; ++s) {
    const T* vs = v + s * K * H;
    for (int64_t h = 0; h < H; ++h) row[h] = load(vs + h);
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
