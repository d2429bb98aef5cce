// Depthwise convolutions on CPU as XLA FFI custom calls: the forward, the input gradient and
// the kernel gradient of tljax.cpu.depthwise, NHWC float32, TensorFlow 'SAME'
// padding given as (pad_top, pad_left), any kernel size and stride.
//
// XLA:CPU runs these as one fused pass per tap (k*k passes over the data for the kernel
// gradient); here each is one pass: for every output pixel the k*k taps are read from cache
// and the loop over channels (contiguous in NHWC) is vectorised by the compiler. Work is split
// into fixed chunks of rows (forward, input gradient) or images (kernel gradient) that the
// calling thread and XLA's intra-op pool claim from a shared counter; a chunk's result does not
// depend on which thread ran it, and the kernel gradient adds the per-image partial sums in
// image order, so results are the same with any number of threads.
//
// Built on first use by tljax/native/build.py (g++ -O3 -march=native); see docs/performance.md.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;
using Dims = ffi::Span<const int64_t>;

namespace {

struct Geometry {
  int64_t n, h, w, c, k, s, pt, pl, oh, ow;
};

// The channel loop is split into blocks of kBlock (then 16, then 1) channels, each summed in
// local accumulators that the compiler keeps in vector registers across all the taps.
constexpr int64_t kBlock = 64;

template <int64_t B, typename Taps>
inline void GatherBlock(float* __restrict out, const Taps& taps, int64_t c0) {
  float acc[B] = {};
  taps([&](const float* __restrict a, const float* __restrict b) {
    for (int64_t t = 0; t < B; ++t) acc[t] += a[c0 + t] * b[c0 + t];
  });
  for (int64_t t = 0; t < B; ++t) out[c0 + t] = acc[t];
}

// out[0:c] = sum over the pairs (a, b) that `taps` yields of a * b, in the order yielded.
template <typename Taps>
inline void Gather(float* out, const Taps& taps, int64_t c) {
  int64_t c0 = 0;
  for (; c0 + kBlock <= c; c0 += kBlock) GatherBlock<kBlock>(out, taps, c0);
  for (; c0 + 32 <= c; c0 += 32) GatherBlock<32>(out, taps, c0);
  for (; c0 + 16 <= c; c0 += 16) GatherBlock<16>(out, taps, c0);
  for (; c0 < c; ++c0) GatherBlock<1>(out, taps, c0);
}

// Calls f(pixel, tap) for each tap (i, j), tap = i*k + j, in row-major order, whose input
// pixel x[n, o*s + i - pt, p*s + j - pl] of output (n, o, p) lies inside the image (the
// padding's zeros add nothing).
template <typename F>
inline void ForEachTap(const Geometry& g, const float* x, int64_t n, int64_t o, int64_t p,
                       F&& f) {
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t r = o * g.s + i - g.pt;
    if (r < 0 || r >= g.h) continue;
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t q = p * g.s + j - g.pl;
      if (q < 0 || q >= g.w) continue;
      f(x + ((n * g.h + r) * g.w + q) * g.c, i * g.k + j);
    }
  }
}

// y[n, o, p] = sum over taps (i, j) of x[n, o*s + i - pt, p*s + j - pl] * kernel[i, j].
void ForwardRow(const Geometry& g, const float* x, const float* kernel, float* y, int64_t row) {
  const int64_t n = row / g.oh, o = row % g.oh;
  for (int64_t p = 0; p < g.ow; ++p) {
    auto taps = [&](auto&& f) {
      ForEachTap(g, x, n, o, p, [&](const float* a, int64_t tap) { f(a, kernel + tap * g.c); });
    };
    Gather(y + ((n * g.oh + o) * g.ow + p) * g.c, taps, g.c);
  }
}

// dx[n, r, q] = sum over taps (i, j) with r + pt - i = o*s, q + pl - j = p*s (0 <= o < oh,
// 0 <= p < ow) of dy[n, o, p] * kernel[i, j].
void InputGradRow(const Geometry& g, const float* dy, const float* kernel, float* dx,
                  int64_t row) {
  const int64_t n = row / g.h, r = row % g.h;
  for (int64_t q = 0; q < g.w; ++q) {
    auto taps = [&](auto&& f) {
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t t = r + g.pt - i;
        if (t < 0 || t % g.s) continue;
        const int64_t o = t / g.s;
        if (o >= g.oh) continue;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t u = q + g.pl - j;
          if (u < 0 || u % g.s) continue;
          const int64_t p = u / g.s;
          if (p >= g.ow) continue;
          f(dy + ((n * g.oh + o) * g.ow + p) * g.c, kernel + (i * g.k + j) * g.c);
        }
      }
    };
    Gather(dx + ((n * g.h + r) * g.w + q) * g.c, taps, g.c);
  }
}

inline void MulAdd(float* __restrict acc, const float* __restrict a,
                   const float* __restrict b, int64_t c) {
  for (int64_t i = 0; i < c; ++i) acc[i] += a[i] * b[i];
}

// partial[i, j] = sum over o, p of x[n, o*s + i - pt, p*s + j - pl] * dy[n, o, p] for one
// image n; each output row is summed apart in `row_sum` and then added, which keeps the
// float32 sums short.
void KernelGradImage(const Geometry& g, const float* x, const float* dy, float* partial,
                     float* row_sum, int64_t n) {
  const int64_t taps = g.k * g.k * g.c;
  std::memset(partial, 0, sizeof(float) * taps);
  for (int64_t o = 0; o < g.oh; ++o) {
    std::memset(row_sum, 0, sizeof(float) * taps);
    for (int64_t p = 0; p < g.ow; ++p) {
      const float* d = dy + ((n * g.oh + o) * g.ow + p) * g.c;
      ForEachTap(g, x, n, o, p,
                 [&](const float* a, int64_t tap) { MulAdd(row_sum + tap * g.c, a, d, g.c); });
    }
    for (int64_t t = 0; t < taps; ++t) partial[t] += row_sum[t];
  }
}

Geometry MakeGeometry(Dims xdims, Dims ydims, int64_t k,
                      int64_t s, int64_t pt, int64_t pl) {
  return Geometry{xdims[0], xdims[1], xdims[2], xdims[3], k, s, pt, pl, ydims[1], ydims[2]};
}

ffi::Error CheckShapes(const Geometry& g, Dims kdims) {
  if (kdims.size() != 3 || kdims[0] != g.k || kdims[1] != g.k || kdims[2] != g.c) {
    return ffi::Error::InvalidArgument("depthwise: kernel must be (k, k, C)");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad_top,
                   int64_t pad_left) {
  const auto kd = kernel.dimensions();
  Geometry g = MakeGeometry(x.dimensions(), y->dimensions(), kd[0], stride, pad_top, pad_left);
  if (auto err = CheckShapes(g, kd); err.failure()) return err;
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  tljax::ParallelFor(pool, g.n * g.oh, [&](int64_t row) { ForwardRow(g, xp, kp, yp, row); });
  return ffi::Error::Success();
}

ffi::Error InputGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                     ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx,
                     int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto kd = kernel.dimensions();
  Geometry g = MakeGeometry(dx->dimensions(), dy.dimensions(), kd[0], stride, pad_top, pad_left);
  if (auto err = CheckShapes(g, kd); err.failure()) return err;
  const float* dyp = dy.typed_data();
  const float* kp = kernel.typed_data();
  float* dxp = dx->typed_data();
  tljax::ParallelFor(pool, g.n * g.h, [&](int64_t row) { InputGradRow(g, dyp, kp, dxp, row); });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dk, int64_t stride, int64_t pad_top,
                      int64_t pad_left) {
  const auto kd = dk->dimensions();
  Geometry g = MakeGeometry(x.dimensions(), dy.dimensions(), kd[0], stride, pad_top, pad_left);
  if (auto err = CheckShapes(g, kd); err.failure()) return err;
  const int64_t taps = g.k * g.k * g.c;
  std::vector<float> partials(g.n * taps), rows(g.n * taps);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  tljax::ParallelFor(pool, g.n, [&](int64_t n) {
    KernelGradImage(g, xp, dyp, partials.data() + n * taps, rows.data() + n * taps, n);
  });
  float* out = dk->typed_data();
  if (g.n == 0) {  // an empty batch: a zero gradient
    std::fill_n(out, taps, 0.0f);
    return ffi::Error::Success();
  }
  std::memcpy(out, partials.data(), sizeof(float) * taps);
  for (int64_t n = 1; n < g.n; ++n) {
    for (int64_t t = 0; t < taps; ++t) out[t] += partials[n * taps + t];
  }
  return ffi::Error::Success();
}

}  // namespace

#define TLJAX_DEPTHWISE_BINDING                         \
  ffi::Ffi::Bind()                                      \
      .Ctx<ffi::ThreadPool>()                           \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Ret<ffi::Buffer<ffi::F32>>()                     \
      .Attr<int64_t>("stride")                          \
      .Attr<int64_t>("pad_top")                         \
      .Attr<int64_t>("pad_left")

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxDepthwiseForward, Forward,
                              TLJAX_DEPTHWISE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxDepthwiseInputGrad, InputGrad,
                              TLJAX_DEPTHWISE_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxDepthwiseKernelGrad, KernelGrad,
                              TLJAX_DEPTHWISE_BINDING);
