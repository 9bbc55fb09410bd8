// What the CPU kernels (cpu_gemv.cc, cpu_attention.cc, cpu_logits.cc) share: running parts of a call on
// XLA's thread pool, and e^x for x <= 0.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace llama_jax {

// Runs f(part) for part in [0, parts) on the calling thread and the pool's (all on the calling thread when
// pool is null). Parts are claimed from a counter, so a pool thread that starts late finds nothing left
// rather than being waited for.
template <typename F>
void parallel(xla::ffi::ThreadPool* pool, int64_t parts, const F& f) {
  const int64_t workers = pool ? std::min<int64_t>(pool->num_threads(), parts - 1) : 0;
  if (workers <= 0) {
    for (int64_t p = 0; p < parts; ++p) f(p);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    int64_t parts;
    const F* f;
  };
  auto s = std::make_shared<Shared>();
  s->parts = parts;
  s->f = &f;
  auto work = [](Shared& sh) {
    for (int64_t p; (p = sh.next.fetch_add(1)) < sh.parts;) {
      (*sh.f)(p);
      sh.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t w = 0; w < workers; ++w) pool->Schedule([s, work] { work(*s); });
  work(*s);
  while (s->done.load(std::memory_order_acquire) < parts) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }
}

// e^x for x <= 0 (scores minus their max), vectorisable: 2^n · p(r) with x = n·ln2 + r, |r| <= ln2/2,
// p the degree-6 Taylor polynomial (relative error < 2e-7, about glibc's expf). std::exp is a scalar
// library call: ~2,400 of them per decode step were most of the attention kernel's time.
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

}  // namespace llama_jax
