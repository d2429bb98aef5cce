// The kernel a convolution's input gradient convolves with, on CPU as an XLA FFI custom call:
// a (KH, KW, I, O) kernel flipped in space and transposed to (KH, KW, O, I), float32.
//
// XLA:CPU's autodiff of a convolution computes this inside the input gradient as a fused
// reverse + transpose at ~2.4 GB/s: 3.8 ms for a (3, 3, 512, 512) kernel, about 40% of that
// layer's input gradient at 112x112 (docs/benchmarks.md). Here each tap's (I, O) matrix is
// transposed in 32x32 tiles that stay in L1 (8x8 blocks in AVX registers), split over XLA's
// intra-op pool by tap and tile row: 0.36-0.48 ms, the time of a copy. A copy: the result
// does not depend on the number of threads.

#include <algorithm>
#include <cstdint>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;

#ifdef __AVX__
// dst[r * ld_dst + c] = src[c * ld_src + r] for an 8x8 block, in registers.
inline void Transpose8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// o[r * ci + c] = s[c * co + r] for rows r in [o0, o1) and columns c in [i0, i1).
inline void TransposeTile(const float* s, float* o, int64_t ci, int64_t co, int64_t o0,
                          int64_t o1, int64_t i0, int64_t i1) {
#ifdef __AVX__
  if (o1 - o0 == kTile && i1 - i0 == kTile) {
    for (int64_t r = o0; r < o1; r += 8) {
      for (int64_t c = i0; c < i1; c += 8) Transpose8x8(s + c * co + r, co, o + r * ci + c, ci);
    }
    return;
  }
#endif
  for (int64_t r = o0; r < o1; ++r) {
    for (int64_t c = i0; c < i1; ++c) o[r * ci + c] = s[c * co + r];
  }
}

ffi::Error FlipTranspose(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto d = kernel.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("flip_transpose: kernel must be 4-D");
  const int64_t kh = d[0], kw = d[1], ci = d[2], co = d[3];
  const auto od = out->dimensions();
  if (od.size() != 4 || od[0] != kh || od[1] != kw || od[2] != co || od[3] != ci) {
    return ffi::Error::InvalidArgument("flip_transpose: result must be (KH, KW, O, I)");
  }
  const float* src = kernel.typed_data();
  float* dst = out->typed_data();
  const int64_t taps = kh * kw, row_tiles = (co + kTile - 1) / kTile;
  tljax::ParallelFor(pool, taps * row_tiles, [&](int64_t item) {
    const int64_t t = item / row_tiles, o0 = (item % row_tiles) * kTile;
    const int64_t o1 = std::min(o0 + kTile, co);
    const float* s = src + (taps - 1 - t) * ci * co;  // tap (kh-1-i, kw-1-j) for t = (i, j)
    float* o = dst + t * co * ci;
    for (int64_t i0 = 0; i0 < ci; i0 += kTile) {
      TransposeTile(s, o, ci, co, o0, o1, i0, std::min(i0 + kTile, ci));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxFlipTranspose, FlipTranspose,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
