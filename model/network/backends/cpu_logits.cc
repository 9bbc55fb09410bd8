// What sampling needs from each row of a step's logits [B, V] (float32 or bfloat16), in one call (`llama_jax_logit_stats`):
// the first index of the largest value (the greedy token), the largest value, and log Σ exp(x − max) (the
// log-softmax's normalizer: a token's log-prob is x − max − that).
//
// XLA:CPU computes these as ~8 ops over [B, V] (a max, a broadcast compare, a select of indices, a min,
// the exponentials and their sum), writing and reading back several [B, V] float32 arrays: at 64 rows
// and a 32k vocabulary (8 MiB a copy, past the L2 caches) that was ~3 ms of a 35 ms decode token. Here
// each row is read twice (max, then the sum of exponentials), the second time from L1/L2.
//
// Same results as serve/sampling.py's XLA path: the index and the max exactly (NaN rows: index V - 1 and
// NaN, as jnp.max and first_argmax give), the sum to float32 rounding (a different summation order, and
// the exponential's relative error < 2e-7).
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

struct Stats {
  int32_t first;  // first index of the largest value
  float top;      // the largest value (NaN if any is)
  bool nan;
};

inline float widen(float v) { return v; }
inline float widen(uint16_t h) {  // bfloat16 bits
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// e^x for 16 lanes of x <= 0: llama_jax::exp_nonpositive's arithmetic, 2^n applied by scalef.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// 16 lanes, each keeping its largest value and where it first saw it; then the lanes at the overall max
// give the smallest index. Elements past the last full vector: the scalar tail (later indices).
template <typename T>
Stats scan(const T* x, int64_t V) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  __m512i mi = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __mmask16 nan = 0;
  int64_t v = 0;
  for (; v + 16 <= V; v += 16) {
    const __m512 xv = load16(x + v);
    const __mmask16 gt = _mm512_cmp_ps_mask(xv, m, _CMP_GT_OQ);
    m = _mm512_mask_mov_ps(m, gt, xv);
    mi = _mm512_mask_mov_epi32(mi, gt, idx);
    nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
    idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
  }
  Stats s{0, _mm512_reduce_max_ps(m), nan != 0};
  alignas(64) float lane_max[16];
  alignas(64) int32_t lane_at[16];
  _mm512_store_ps(lane_max, m);
  _mm512_store_si512(lane_at, mi);
  s.first = int32_t(V);
  for (int j = 0; j < 16; ++j)
    if (lane_max[j] == s.top) s.first = std::min(s.first, lane_at[j]);
  for (; v < V; ++v) {
    const float xf = widen(x[v]);
    s.nan |= std::isnan(xf);
    if (xf > s.top) s.top = xf, s.first = int32_t(v);
  }
  return s;
}

// Summed in blocks of 256 (four accumulators), the blocks' sums added to a total: a single running sum of
// 2,048 terms a lane was 2e-6 off in a 32k row's log-sum, this ~1e-7 as XLA's.
template <typename T>
float sum_exp(const T* x, int64_t V, float top) {
  const __m512 t = _mm512_set1_ps(top);
  auto e = [&](int64_t v) { return exp16(_mm512_sub_ps(load16(x + v), t)); };
  __m512 total = _mm512_setzero_ps();
  int64_t v = 0;
  for (; v + 256 <= V; v += 256) {
    __m512 a[4] = {e(v), e(v + 16), e(v + 32), e(v + 48)};
    for (int64_t u = v + 64; u < v + 256; u += 64)
      for (int j = 0; j < 4; ++j) a[j] = _mm512_add_ps(a[j], e(u + 16 * j));
    total = _mm512_add_ps(total, _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  }
  for (; v + 16 <= V; v += 16) total = _mm512_add_ps(total, e(v));
  float sum = _mm512_reduce_add_ps(total);
  for (; v < V; ++v) sum += llama_jax::exp_nonpositive(widen(x[v]) - top);
  return sum;
}
#else
template <typename T>
Stats scan(const T* x, int64_t V) {
  Stats s{0, widen(x[0]), std::isnan(widen(x[0]))};
  for (int64_t v = 1; v < V; ++v) {
    const float xf = widen(x[v]);
    s.nan |= std::isnan(xf);
    if (xf > s.top) s.top = xf, s.first = int32_t(v);
  }
  return s;
}

template <typename T>
float sum_exp(const T* x, int64_t V, float top) {  // 16 partial sums a block of 256, as above
  float total[16] = {}, sum = 0.0f;
  int64_t v = 0;
  for (; v + 256 <= V; v += 256) {
    float part[16] = {};
    for (int64_t u = v; u < v + 256; u += 16)
      for (int j = 0; j < 16; ++j) part[j] += llama_jax::exp_nonpositive(widen(x[u + j]) - top);
    for (int j = 0; j < 16; ++j) total[j] += part[j];
  }
  for (; v < V; ++v) sum += llama_jax::exp_nonpositive(widen(x[v]) - top);
  for (int j = 0; j < 16; ++j) sum += total[j];
  return sum;
}
#endif

template <typename T>
void row(const T* x, int64_t V, int32_t* first, float* top, float* log_sum) {
  const Stats s = scan(x, V);
  if (s.nan) {
    *first = int32_t(V - 1), *top = NAN, *log_sum = NAN;
    return;
  }
  *first = s.first, *top = s.top;
  *log_sum = std::isfinite(s.top) ? std::log(sum_exp(x, V, s.top)) : NAN;  // as exp(x - max) gives for ±inf
}

template <typename T>
void run(ffi::ThreadPool* pool, const T* x, int64_t B, int64_t V, int32_t* first, float* top, float* log_sum) {
  auto one = [&](int64_t b) { row(x + b * V, V, first + b, top + b, log_sum + b); };
  llama_jax::parallel(B * V >= (int64_t(1) << 17) ? pool : nullptr, B, one);  // one 32k row: not worth a thread
}

// x f32 or bf16 [B, V] -> first s32 [B], top f32 [B], log_sum f32 [B]
ffi::Error LogitStats(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::Buffer<ffi::S32>> first,
                      ffi::Result<ffi::Buffer<ffi::F32>> top, ffi::Result<ffi::Buffer<ffi::F32>> log_sum) {
  const auto d = x.dimensions();
  const auto et = x.element_type();
  if (d.size() != 2 || d[1] < 1 || first->element_count() != d[0] || top->element_count() != d[0] ||
      log_sum->element_count() != d[0] || (et != ffi::DataType::F32 && et != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("cpu_logit_stats: expected x [B, V] (V >= 1), f32 or bf16, and three [B] outputs");
  int32_t* fp = first->typed_data();
  float *tp = top->typed_data(), *lp = log_sum->typed_data();
  if (et == ffi::DataType::F32)
    run(&pool, static_cast<const float*>(x.untyped_data()), d[0], d[1], fp, tp, lp);
  else
    run(&pool, static_cast<const uint16_t*>(x.untyped_data()), d[0], d[1], fp, tp, lp);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(llama_jax_logit_stats, LogitStats,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
