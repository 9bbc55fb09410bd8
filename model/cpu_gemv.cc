// Matrix-vector products for decoding on CPU: y[M, N] = x[M, K] · W[K, N] for a few rows M, with W in
// float32, bfloat16, int8 (one scale per output column) or int4 (packed two per byte, low nibble first,
// one scale per group of G rows and output column). The weight is read once in its stored format and
// converted in registers: XLA:CPU instead converts a bfloat16/int8/int4 weight to a float32 copy first,
// which costs several times the memory traffic of the read itself.
//
// Weight rows stream from memory contiguously (a row at a time, or a block of columns of it when M rows
// of accumulators would not fit L2); threads, if any (OpenMP; see threads_for), take ranges of rows.
// Portable C++ written for the compiler's auto-vectoriser (built -O3 -march=native by model/cpu_gemv.py).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <omp.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr int64_t CHUNK = 512;               // weight elements converted at a time (L1)
constexpr int64_t ACC_BYTES = 256 * 1024;    // accumulators of one column block (L2)

int threads_for(int64_t bytes) {
  // Threads: $LLAMA_JAX_CPU_THREADS, default OpenMP's (the cores). Each takes a contiguous range of
  // rows; small weights (L2/L3-resident, microseconds) get one thread, as waking another costs more.
  static const int configured = [] {
    const char* v = std::getenv("LLAMA_JAX_CPU_THREADS");
    return v ? std::max(1, std::atoi(v)) : omp_get_max_threads();
  }();
  return bytes >= (int64_t(512) << 10) ? configured : 1;
}

// Columns per block: the accumulators of all M rows for a block stay in L2 while whole row segments
// of the weight stream from memory (contiguous reads; for few rows a block is the whole row).
int64_t block_cols(int64_t M, int64_t N) {
  int64_t nb = std::max<int64_t>(CHUNK, ACC_BYTES / (4 * std::max<int64_t>(M, 1)) / CHUNK * CHUNK);
  return std::min(nb, N);
}

// acc[m][0..n) += x[m][k] * conv(row[0..n)) for rows k in [k0, k1); acc has leading dimension ld.
template <typename T, typename Conv>
inline void rows_dense(const float* __restrict x, const T* __restrict w, int64_t M, int64_t K, int64_t N,
                       int64_t k0, int64_t k1, int64_t n0, int64_t n, float* __restrict acc, int64_t ld, Conv conv) {
  alignas(64) float tmp[CHUNK];
  int64_t k = k0;
  if (M == 1) {  // one row of x: four weight rows per pass, so the accumulators move once per 4 rows
    for (; k + 4 <= k1; k += 4) {
      const T* __restrict r0 = w + k * N + n0;
      const T* __restrict r1 = r0 + N;
      const T* __restrict r2 = r1 + N;
      const T* __restrict r3 = r2 + N;
      const float x0 = x[k], x1 = x[k + 1], x2 = x[k + 2], x3 = x[k + 3];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        acc[j] += x0 * conv(r0[j]) + x1 * conv(r1[j]) + x2 * conv(r2[j]) + x3 * conv(r3[j]);
    }
  }
  for (; k < k1; ++k) {
    const T* __restrict row = w + k * N + n0;
    for (int64_t c = 0; c < n; c += CHUNK) {
      const int64_t len = std::min(CHUNK, n - c);
#pragma omp simd aligned(tmp : 64)
      for (int64_t j = 0; j < len; ++j) tmp[j] = conv(row[c + j]);
      for (int64_t m = 0; m < M; ++m) {
        const float xv = x[m * K + k];
        float* __restrict a = acc + m * ld + c;
#pragma omp simd aligned(tmp : 64)
        for (int64_t j = 0; j < len; ++j) a[j] += xv * tmp[j];
      }
    }
  }
}

// int4 rows: byte j of a row segment holds columns 2j (low nibble) and 2j+1 (high nibble); accumulated
// de-interleaved into ae (even columns) and ao (odd columns) so every loop is unit-stride.
inline void rows_int4(const float* __restrict x, const uint8_t* __restrict w, int64_t M, int64_t K, int64_t N,
                      int64_t k0, int64_t k1, int64_t n0, int64_t n, float* __restrict ae, float* __restrict ao,
                      int64_t ld) {
  alignas(64) float lo[CHUNK / 2], hi[CHUNK / 2];
  int64_t k = k0;
  if (M == 1) {  // four weight rows per pass (see rows_dense)
    const int64_t hb = n / 2, stride = N / 2;
    for (; k + 4 <= k1; k += 4) {
      const uint8_t* __restrict r0 = w + (k * N + n0) / 2;
      const uint8_t* __restrict r1 = r0 + stride;
      const uint8_t* __restrict r2 = r1 + stride;
      const uint8_t* __restrict r3 = r2 + stride;
      const float x0 = x[k], x1 = x[k + 1], x2 = x[k + 2], x3 = x[k + 3];
#pragma omp simd
      for (int64_t j = 0; j < hb; ++j) {  // nibble v (0..15) is the int4 value ((v ^ 8) - 8), on 32-bit lanes
        const int32_t b0 = r0[j], b1 = r1[j], b2 = r2[j], b3 = r3[j];
        ae[j] += x0 * static_cast<float>(((b0 & 15) ^ 8) - 8) + x1 * static_cast<float>(((b1 & 15) ^ 8) - 8) +
                 x2 * static_cast<float>(((b2 & 15) ^ 8) - 8) + x3 * static_cast<float>(((b3 & 15) ^ 8) - 8);
        ao[j] += x0 * static_cast<float>(((b0 >> 4) ^ 8) - 8) + x1 * static_cast<float>(((b1 >> 4) ^ 8) - 8) +
                 x2 * static_cast<float>(((b2 >> 4) ^ 8) - 8) + x3 * static_cast<float>(((b3 >> 4) ^ 8) - 8);
      }
    }
  }
  for (; k < k1; ++k) {
    const uint8_t* __restrict row = w + (k * N + n0) / 2;
    for (int64_t c = 0; c < n / 2; c += CHUNK / 2) {
      const int64_t len = std::min(CHUNK / 2, n / 2 - c);
#pragma omp simd aligned(lo, hi : 64)
      for (int64_t j = 0; j < len; ++j) {
        const int8_t b = static_cast<int8_t>(row[c + j]);
        lo[j] = static_cast<float>(static_cast<int8_t>(b << 4) >> 4);
        hi[j] = static_cast<float>(b >> 4);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float xv = x[m * K + k];
        float* __restrict e = ae + m * ld + c;
        float* __restrict o = ao + m * ld + c;
#pragma omp simd aligned(lo, hi : 64)
        for (int64_t j = 0; j < len; ++j) {
          e[j] += xv * lo[j];
          o[j] += xv * hi[j];
        }
      }
    }
  }
}

// Splits rows [0, K) into `parts` ranges at multiples of `unit`.
inline void split_rows(int64_t K, int64_t unit, int parts, int t, int64_t* k0, int64_t* k1) {
  const int64_t units = K / unit, per = (units + parts - 1) / parts;
  *k0 = std::min(units, t * per) * unit;
  *k1 = std::min(units, (t + 1) * per) * unit;
}

template <typename T, typename Conv>
void gemv_dense(const float* x, const T* w, const float* col_scale_f32, const uint16_t* col_scale_bf16,
                float* y, int64_t M, int64_t K, int64_t N, Conv conv) {
  const int threads = threads_for(K * N * int64_t(sizeof(T)));
  const int64_t nb = block_cols(M, N);
  std::vector<float> part(static_cast<size_t>(threads > 1 ? threads * M * nb : 0));
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t n = std::min(nb, N - n0);
    if (threads == 1) {
      for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + n0, y + m * N + n0 + n, 0.0f);
      rows_dense(x, w, M, K, N, 0, K, n0, n, y + n0, N, conv);
    } else {  // each thread a contiguous range of rows into its own accumulators, summed after
#pragma omp parallel num_threads(threads)
      {
        const int t = omp_get_thread_num();
        int64_t k0, k1;
        split_rows(K, 1, threads, t, &k0, &k1);
        float* acc = part.data() + t * M * nb;
        std::fill(acc, acc + M * nb, 0.0f);
        rows_dense(x, w, M, K, N, k0, k1, n0, n, acc, nb, conv);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < n; ++j) {
          float sum = 0.0f;
          for (int t = 0; t < threads; ++t) sum += part[t * M * nb + m * nb + j];
          y[m * N + n0 + j] = sum;
        }
    }
    if (col_scale_f32 || col_scale_bf16)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < n; ++j)
          y[m * N + n0 + j] *= col_scale_f32 ? col_scale_f32[n0 + j] : bf16(col_scale_bf16[n0 + j]);
  }
}

template <typename S>
void gemv_int4(const float* x, const uint8_t* w, const S* scale, float* y, int64_t M, int64_t K, int64_t N,
               int64_t G, float (*sconv)(S)) {
  const int threads = threads_for(K * N / 2);
  const int64_t nb = block_cols(M, N), h = nb / 2;  // nb is a multiple of CHUNK: blocks start at even columns
  std::vector<float> out(static_cast<size_t>(threads * M * nb)), ge(threads * M * h), go(threads * M * h);
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t n = std::min(nb, N - n0), hn = n / 2;
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      int64_t k0, k1;
      split_rows(K, G, threads, t, &k0, &k1);
      float* o = out.data() + t * M * nb;
      float* e = ge.data() + t * M * h;
      float* od = go.data() + t * M * h;
      std::fill(o, o + M * nb, 0.0f);
      for (int64_t g0 = k0; g0 < k1; g0 += G) {
        std::fill(e, e + M * h, 0.0f);
        std::fill(od, od + M * h, 0.0f);
        rows_int4(x, w, M, K, N, g0, g0 + G, n0, n, e, od, h);
        const S* srow = scale + (g0 / G) * N + n0;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < hn; ++j) {
            o[m * nb + 2 * j] += e[m * h + j] * sconv(srow[2 * j]);
            o[m * nb + 2 * j + 1] += od[m * h + j] * sconv(srow[2 * j + 1]);
          }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < n; ++j) {
        float sum = 0.0f;
        for (int t = 0; t < threads; ++t) sum += out[t * M * nb + m * nb + j];
        y[m * N + n0 + j] = sum;
      }
  }
}

float f32_id(float v) { return v; }
float bf16_conv(uint16_t v) { return bf16(v); }

ffi::Error check(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, const ffi::Result<ffi::AnyBuffer>& y,
                 int64_t* M, int64_t* K, int64_t* N) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) return ffi::Error::InvalidArgument("gemv: bad shapes");
  *M = xd[0];
  *K = xd[1];
  *N = wd[1];
  return ffi::Error::Success();
}

}  // namespace

// x f32 [M, K], w [K, N] (f32 / bf16 / int8), scale [N] (int8 only; f32 or bf16) -> y f32 [M, N]
static ffi::Error Gemv(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> y) {
  int64_t M, K, N;
  if (auto e = check(x, w, y, &M, &K, &N); e.failure()) return e;
  const float* xp = static_cast<const float*>(x.untyped_data());
  float* yp = static_cast<float*>(y->untyped_data());
  const float* sf = scale.element_type() == ffi::DataType::F32 && scale.element_count() == N
                        ? static_cast<const float*>(scale.untyped_data()) : nullptr;
  const uint16_t* sb = scale.element_type() == ffi::DataType::BF16 && scale.element_count() == N
                           ? static_cast<const uint16_t*>(scale.untyped_data()) : nullptr;
  switch (w.element_type()) {
    case ffi::DataType::F32:
      gemv_dense(xp, static_cast<const float*>(w.untyped_data()), nullptr, nullptr, yp, M, K, N,
                 [](float v) { return v; });
      break;
    case ffi::DataType::BF16:
      gemv_dense(xp, static_cast<const uint16_t*>(w.untyped_data()), nullptr, nullptr, yp, M, K, N,
                 [](uint16_t v) { return bf16(v); });
      break;
    case ffi::DataType::S8:
      gemv_dense(xp, static_cast<const int8_t*>(w.untyped_data()), sf, sb, yp, M, K, N,
                 [](int8_t v) { return static_cast<float>(v); });
      break;
    default:
      return ffi::Error::InvalidArgument("gemv: weight dtype must be f32, bf16 or s8");
  }
  return ffi::Error::Success();
}

// x f32 [M, K], w s4 [K, N] (packed), scale [K / group, N] (f32 or bf16) -> y f32 [M, N]
static ffi::Error GemvInt4(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer scale, ffi::Result<ffi::AnyBuffer> y,
                           int64_t group) {
  int64_t M, K, N;
  if (auto e = check(x, w, y, &M, &K, &N); e.failure()) return e;
  if (w.element_type() != ffi::DataType::S4 || N % 2 || group <= 0 || K % group ||
      scale.element_count() != (K / group) * N)
    return ffi::Error::InvalidArgument("gemv_int4: needs s4 [K, N] with even N and scales [K/group, N]");
  const float* xp = static_cast<const float*>(x.untyped_data());
  const uint8_t* wp = static_cast<const uint8_t*>(w.untyped_data());
  float* yp = static_cast<float*>(y->untyped_data());
  if (scale.element_type() == ffi::DataType::F32)
    gemv_int4<float>(xp, wp, static_cast<const float*>(scale.untyped_data()), yp, M, K, N, group, f32_id);
  else if (scale.element_type() == ffi::DataType::BF16)
    gemv_int4<uint16_t>(xp, wp, static_cast<const uint16_t*>(scale.untyped_data()), yp, M, K, N, group, bf16_conv);
  else
    return ffi::Error::InvalidArgument("gemv_int4: scales must be f32 or bf16");
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(llama_jax_gemv, Gemv,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(llama_jax_gemv_int4, GemvInt4,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>().Attr<int64_t>("group"));
