// Max pooling on CPU as XLA FFI custom calls: 'VALID' windows of k x k at stride s, NHWC
// float32, the forward and its gradient, for tljax.native.pool.
//
// XLA:CPU runs tljax's pure-JAX form (k*k shifted maxima; each tap's share of the gradient
// put back at its strided positions by an interior-padded pad) in fused loops that compute
// each element's place by division, slowly (docs/performance.md). Here the gradient runs over the outputs and adds
// each one's dy to the first input of its window (row-major) equal to the maximum, as
// select_and_scatter does and as the pure-JAX form does (ties included); NaN propagates as in
// jnp.maximum. Work is split into fixed items (output rows; images x channel blocks for the
// gradient, whose windows overlap), each summed in a fixed order: the results do not depend on
// the number of threads.

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct PoolGeom {
  int64_t n, h, w, c, k, s, oh, ow;
};

ffi::Error MakeGeom(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> od, int64_t k,
                    int64_t s, PoolGeom* g) {
  if (xd.size() != 4 || od.size() != 4 || k < 1 || s < 1 || od[0] != xd[0] ||
      od[3] != xd[3] || od[1] != (xd[1] - k) / s + 1 || od[2] != (xd[2] - k) / s + 1 ||
      xd[1] < k || xd[2] < k) {
    return ffi::Error::InvalidArgument("max_pool: x (N, H, W, C) with H, W >= window and "
                                       "out (N, (H - k) / s + 1, (W - k) / s + 1, C) expected");
  }
  *g = PoolGeom{xd[0], xd[1], xd[2], xd[3], k, s, od[1], od[2]};
  return ffi::Error::Success();
}

#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
using Vec = __m512;
using Mask = __mmask16;
inline Mask Lanes(int64_t left) {
  return left >= kLanes ? Mask(0xFFFF) : Mask((1u << left) - 1);
}
inline Vec Load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline void Store(Mask m, float* p, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
// max(a, v) as jnp.maximum: NaN in either gives NaN.
inline Vec Max(Vec a, Vec v) {
  const Vec m = _mm512_max_ps(v, a);  // a where either is NaN
  return _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}
#endif

// out[n, r, c] = max over the window at (r * s, c * s).
void ForwardRow(const PoolGeom& g, const float* x, float* out, int64_t row) {
  const int64_t n = row / g.oh, r = row % g.oh;
  for (int64_t c = 0; c < g.ow; ++c) {
    float* o = out + (row * g.ow + c) * g.c;
    const float* base = x + ((n * g.h + r * g.s) * g.w + c * g.s) * g.c;
#ifdef __AVX512F__
    for (int64_t ch = 0; ch < g.c; ch += kLanes) {
      const Mask m = Lanes(g.c - ch);
      Vec acc = Load(m, base + ch);
      for (int64_t i = 0; i < g.k; ++i) {
        for (int64_t j = (i == 0); j < g.k; ++j) {
          acc = Max(acc, Load(m, base + (i * g.w + j) * g.c + ch));
        }
      }
      Store(m, o + ch, acc);
    }
#else
    for (int64_t ch = 0; ch < g.c; ++ch) {
      float acc = base[ch];
      for (int64_t i = 0; i < g.k; ++i) {
        for (int64_t j = (i == 0); j < g.k; ++j) {
          const float v = base[(i * g.w + j) * g.c + ch];
          acc = (v > acc || v != v) ? v : acc;
        }
      }
      o[ch] = acc;
    }
#endif
  }
}

constexpr int64_t kChannelBlock = 64;

// dx of image n, channels [c0, c1): zero, then each output's dy added to the first input of
// its window (row-major) that equals its maximum, outputs in row-major order.
void BackwardItem(const PoolGeom& g, const float* x, const float* out, const float* dy,
                  float* dx, int64_t n, int64_t c0, int64_t c1) {
  const int64_t width = c1 - c0;
  for (int64_t p = 0; p < g.h * g.w; ++p) {
    std::memset(dx + (n * g.h * g.w + p) * g.c + c0, 0, width * sizeof(float));
  }
  for (int64_t r = 0; r < g.oh; ++r) {
    for (int64_t c = 0; c < g.ow; ++c) {
      const int64_t o = ((n * g.oh + r) * g.ow + c) * g.c;
      const int64_t b = ((n * g.h + r * g.s) * g.w + c * g.s) * g.c;
#ifdef __AVX512F__
      for (int64_t ch = c0; ch < c1; ch += kLanes) {
        const Mask m = Lanes(c1 - ch);
        const Vec best = Load(m, out + o + ch), grad = Load(m, dy + o + ch);
        Mask open = m;  // lanes whose first maximum is still to be found
        for (int64_t i = 0; i < g.k && open; ++i) {
          for (int64_t j = 0; j < g.k && open; ++j) {
            const int64_t at = b + (i * g.w + j) * g.c + ch;
            const Mask hit = _mm512_mask_cmp_ps_mask(open, Load(open, x + at), best, _CMP_EQ_OQ);
            if (hit) {
              Store(hit, dx + at, _mm512_add_ps(Load(hit, dx + at), grad));
              open &= ~hit;
            }
          }
        }
      }
#else
      for (int64_t ch = c0; ch < c1; ++ch) {
        bool found = false;
        for (int64_t i = 0; i < g.k && !found; ++i) {
          for (int64_t j = 0; j < g.k && !found; ++j) {
            const int64_t at = b + (i * g.w + j) * g.c + ch;
            if (x[at] == out[o + ch]) {
              dx[at] += dy[o + ch];
              found = true;
            }
          }
        }
      }
#endif
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::ResultBuffer<ffi::F32> out, int64_t window, int64_t stride) {
  PoolGeom g;
  if (auto e = MakeGeom(x.dimensions(), out->dimensions(), window, stride, &g); e.failure()) {
    return e;
  }
  const float* xs = x.typed_data();
  float* os = out->typed_data();
  tljax::ParallelFor(pool, g.n * g.oh, [&](int64_t row) { ForwardRow(g, xs, os, row); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx, int64_t window,
                    int64_t stride) {
  PoolGeom g;
  if (auto e = MakeGeom(x.dimensions(), out.dimensions(), window, stride, &g); e.failure()) {
    return e;
  }
  const float *xs = x.typed_data(), *os = out.typed_data(), *dys = dy.typed_data();
  float* dxs = dx->typed_data();
  const int64_t blocks = (g.c + kChannelBlock - 1) / kChannelBlock;
  tljax::ParallelFor(pool, g.n * blocks, [&](int64_t item) {
    const int64_t n = item / blocks, c0 = (item % blocks) * kChannelBlock;
    BackwardItem(g, xs, os, dys, dxs, n, c0, std::min(c0 + kChannelBlock, g.c));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxMaxPoolForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxMaxPoolBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("stride"));
