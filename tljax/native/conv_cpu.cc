// Convolutions on CPU as XLA FFI custom calls, float32, for tljax.native.conv:
//
// - tljax_flip_transpose: the kernel a convolution's input gradient convolves with, a
//   (KH, KW, I, O) kernel flipped in space and transposed to (KH, KW, O, I). XLA:CPU's
//   autodiff computes it inside the input gradient as a fused reverse + transpose at a
//   fraction of the memory bandwidth. Here each tap's (I, O) matrix is transposed in 32x32
//   tiles that stay in L1 (8x8 blocks in AVX registers), split over XLA's intra-op pool by
//   tap and tile row: the time of a copy.
// - tljax_conv_forward, tljax_conv_kernel_grad: a direct convolution, NHWC x HWIO, any kernel
//   size, stride and zero padding, and its kernel gradient, in AVX-512 register tiles (below).
//
// Every output element is computed in a fixed order: the results do not depend on the number
// of threads.

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Dims = ffi::Span<const int64_t>;

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


// ---- Direct convolution, NHWC x HWIO, float32, AVX-512 register tiles. ----
//
// y[n, r, c, o] = sum over (i, j, ci) of x[n, r*sh + i - pt, c*sw + j - pl, ci] * k[i, j, ci, o]
// (zero padding). The forward keeps a tile of P output pixels (along a row, or where rows are
// narrow, any pixels that meet the same taps) x 16*V output channels in registers and, for
// each tap and input channel, broadcasts P input values against V kernel vectors; the kernel
// gradient keeps P input channels x 16*V output channels and runs over the pixels. With P = 6
// and V = 4, 24 FMAs per 10 loads: close to the FMA peak (docs/performance.md).

struct ConvGeom {
  int64_t n, h, w, ci, kh, kw, co, oh, ow, pt, pl, sh, sw;
};

// The product's epilogue (see MatmulTile): per-column conv bias, mean, mul and bias, and an
// optional residual laid out as the output.
struct Epilogue {
  const float *conv_bias, *mean, *mul, *bias, *residual;
};

#ifdef __AVX512F__
#define TLJAX_UNROLL _Pragma("GCC unroll 32")  // so that GCC keeps each tile in registers

// The output channels come in blocks of up to 64 (4 vectors); the last vector of a block
// is masked to the channels that remain.
struct ChannelBlock {
  int64_t o0;
  int vectors;
  __mmask16 last;
};

inline ChannelBlock MakeChannelBlock(int64_t co, int64_t o0) {
  const int64_t left = std::min<int64_t>(co - o0, 64), vectors = (left + 15) / 16;
  const int64_t tail = left - 16 * (vectors - 1);
  return {o0, static_cast<int>(vectors),
          tail == 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1)};
}

// Calls f.template operator()<V>() for the block's vector count.
template <typename F>
inline void ForVectors(const ChannelBlock& b, F&& f) {
  switch (b.vectors) {
    case 4: f.template operator()<4>(); break;
    case 3: f.template operator()<3>(); break;
    case 2: f.template operator()<2>(); break;
    default: f.template operator()<1>(); break;
  }
}

// Calls f.template operator()<P>() for P in 1..6.
template <typename F>
inline void ForWidth(int64_t p, F&& f) {
  switch (p) {
    case 6: f.template operator()<6>(); break;
    case 5: f.template operator()<5>(); break;
    case 4: f.template operator()<4>(); break;
    case 3: f.template operator()<3>(); break;
    case 2: f.template operator()<2>(); break;
    default: f.template operator()<1>(); break;
  }
}

constexpr int64_t kTileWidth = 6;  // 6 pixels (or channels) x 4 vectors = 24 accumulators

// Splits [0, count) into ceil(count / 6) runs of near-equal length (7 -> 4 + 3), and calls
// f(start, length) for each.
template <typename F>
inline void ForRuns(int64_t count, F&& f) {
  const int64_t runs = (count + kTileWidth - 1) / kTileWidth;
  for (int64_t t = 0, start = 0; t < runs; ++t) {
    const int64_t len = count / runs + (t < count % runs ? 1 : 0);
    f(start, len);
    start += len;
  }
}

// acc[p] += sum over the input channels ci < c of px[p][ci] times the kernel's row ci, rows
// ldk floats apart (kp at the block's first channel; the last vector masked to the block): one
// tap of the direct forward (the tap's (I, O) matrix), or the whole of the product's (C, F).
template <int V, int P>
inline void AccumulateTap(__m512 (&acc)[P][V], const float* const (&px)[P], const float* kp,
                          int64_t c, int64_t ldk, const ChannelBlock& b) {
  for (int64_t ci = 0; ci < c; ++ci, kp += ldk) {
    __m512 kv[V];
    TLJAX_UNROLL for (int v = 0; v < V - 1; ++v) kv[v] = _mm512_loadu_ps(kp + 16 * v);
    kv[V - 1] = _mm512_maskz_loadu_ps(b.last, kp + 16 * (V - 1));
    TLJAX_UNROLL for (int p = 0; p < P; ++p) {
      const __m512 xv = _mm512_set1_ps(px[p][ci]);
      TLJAX_UNROLL for (int v = 0; v < V; ++v) acc[p][v] = _mm512_fmadd_ps(xv, kv[v], acc[p][v]);
    }
  }
}

// Stores one pixel's accumulators to its output row yp (channels of block b).
template <int V>
inline void StoreBlock(float* yp, const __m512 (&acc)[V], const ChannelBlock& b) {
  yp += b.o0;
  TLJAX_UNROLL for (int v = 0; v < V - 1; ++v) _mm512_storeu_ps(yp + 16 * v, acc[v]);
  _mm512_mask_storeu_ps(yp + 16 * (V - 1), b.last, acc[V - 1]);
}

// The forward of output pixels c0..c0+P-1 of row r of one image, channels of block b.
template <int V, int P>
inline void ForwardTile(const ConvGeom& g, const float* x_img, const float* k, float* y_row,
                        int64_t r, int64_t c0, const ChannelBlock& b, const float* zeros) {
  __m512 acc[P][V];
  TLJAX_UNROLL for (int p = 0; p < P; ++p)
    TLJAX_UNROLL for (int v = 0; v < V; ++v) acc[p][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t xr = r * g.sh + i - g.pt;
    if (xr < 0 || xr >= g.h) continue;
    const float* xrow = x_img + xr * g.w * g.ci;
    for (int64_t j = 0; j < g.kw; ++j) {
      const float* px[P];
      TLJAX_UNROLL for (int p = 0; p < P; ++p) {
        const int64_t xc = (c0 + p) * g.sw + j - g.pl;
        px[p] = (xc >= 0 && xc < g.w) ? xrow + xc * g.ci : zeros;
      }
      AccumulateTap<V, P>(acc, px, k + (i * g.kw + j) * g.ci * g.co + b.o0, g.ci, g.co, b);
    }
  }
  TLJAX_UNROLL for (int p = 0; p < P; ++p) StoreBlock<V>(y_row + (c0 + p) * g.co, acc[p], b);
}

// Output row `row` (= n * OH + r), every channel block.
void ForwardRow(const ConvGeom& g, const float* x, const float* k, float* y, int64_t row,
                const float* zeros) {
  const int64_t n = row / g.oh, r = row % g.oh;
  const float* x_img = x + n * g.h * g.w * g.ci;
  float* y_row = y + row * g.ow * g.co;
  for (int64_t o0 = 0; o0 < g.co; o0 += 64) {
    const ChannelBlock b = MakeChannelBlock(g.co, o0);
    ForRuns(g.ow, [&](int64_t c0, int64_t len) {
      ForVectors(b, [&]<int V>() {
        ForWidth(len, [&]<int P>() { ForwardTile<V, P>(g, x_img, k, y_row, r, c0, b, zeros); });
      });
    });
  }
}

// Below this output width the forward runs flat tiles (below) instead of rows: narrow rows
// leave row tiles partly empty, and wide rows are faster as rows (docs/performance.md).
constexpr int64_t kFlatBelowWidth = 32;

// Flat tiles of the forward, over the whole batch's output pixels, each of pixels that meet
// the same taps: an output row's valid taps along the height are [i0, i1) (the others fall
// in the zero padding), a column's along the width [j0, j1); the pixels of each pair of row
// and column classes form runs of up to 6, listed in `pixels` (flat indices
// (n * OH + r) * OW + c). So a tile is full where rows are narrow (a row of 7 makes row tiles
// of 4 and 3), and skips the padding's taps exactly: at 4x4 with a 3x3 kernel, 31% of the
// taps, of which the row tiles skip the padded rows' and multiply the padded columns' by zeros.
struct FlatTile {
  int64_t start;
  int32_t len;
  int16_t i0, i1, j0, j1;
};

struct FlatTiling {
  std::vector<int64_t> pixels;
  std::vector<int64_t> windows;  // x's offset of each pixel's window's top-left (may be < 0)
  std::vector<FlatTile> tiles;
};

// Classes of positions 0..out-1 along one axis: (first valid tap, end) -> positions.
inline std::vector<std::pair<std::pair<int16_t, int16_t>, std::vector<int64_t>>> TapClasses(
    int64_t out, int64_t in, int64_t k, int64_t pad, int64_t stride) {
  std::vector<std::pair<std::pair<int16_t, int16_t>, std::vector<int64_t>>> classes;
  for (int64_t o = 0; o < out; ++o) {
    const auto key = std::make_pair(
        static_cast<int16_t>(std::clamp<int64_t>(pad - o * stride, 0, k)),
        static_cast<int16_t>(std::clamp<int64_t>(in + pad - o * stride, 0, k)));
    auto it = std::find_if(classes.begin(), classes.end(),
                           [&](const auto& c) { return c.first == key; });
    if (it == classes.end()) {
      classes.push_back({key, {}});
      it = classes.end() - 1;
    }
    it->second.push_back(o);
  }
  return classes;
}

FlatTiling MakeFlatTiling(const ConvGeom& g) {
  FlatTiling t;
  t.pixels.reserve(g.n * g.oh * g.ow);
  t.windows.reserve(g.n * g.oh * g.ow);
  for (const auto& [rk, rows] : TapClasses(g.oh, g.h, g.kh, g.pt, g.sh)) {
    for (const auto& [ck, cols] : TapClasses(g.ow, g.w, g.kw, g.pl, g.sw)) {
      const int64_t start = t.pixels.size();
      for (int64_t n = 0; n < g.n; ++n) {
        for (int64_t r : rows) {
          for (int64_t c : cols) {
            t.pixels.push_back((n * g.oh + r) * g.ow + c);
            t.windows.push_back(((n * g.h + r * g.sh - g.pt) * g.w + c * g.sw - g.pl) * g.ci);
          }
        }
      }
      ForRuns(t.pixels.size() - start, [&](int64_t t0, int64_t len) {
        t.tiles.push_back({start + t0, static_cast<int32_t>(len), rk.first, rk.second, ck.first,
                           ck.second});
      });
    }
  }
  return t;
}

// The forward of one FlatTile, channels of block b. Every pixel of the tile meets the same
// taps, so a tap's input lies at the same offset from each pixel's top-left input position.
template <int V, int P>
inline void ForwardTileFlat(const ConvGeom& g, const float* x, const float* k, float* y,
                            const FlatTiling& ft, const FlatTile& t, const ChannelBlock& b) {
  const int64_t* pixels = ft.pixels.data() + t.start;
  const int64_t* windows = ft.windows.data() + t.start;
  __m512 acc[P][V];
  TLJAX_UNROLL for (int p = 0; p < P; ++p)
    TLJAX_UNROLL for (int v = 0; v < V; ++v) acc[p][v] = _mm512_setzero_ps();
  for (int64_t i = t.i0; i < t.i1; ++i) {
    for (int64_t j = t.j0; j < t.j1; ++j) {
      const int64_t off = (i * g.w + j) * g.ci;
      const float* px[P];
      TLJAX_UNROLL for (int p = 0; p < P; ++p) px[p] = x + (windows[p] + off);
      AccumulateTap<V, P>(acc, px, k + (i * g.kw + j) * g.ci * g.co + b.o0, g.ci, g.co, b);
    }
  }
  TLJAX_UNROLL for (int p = 0; p < P; ++p) StoreBlock<V>(y + pixels[p] * g.co, acc[p], b);
}

// The kernel gradient's tile: input channels ci0..ci0+P-1 x channels of block b of tap
// (i, j), summed over the output rows [row0, row1) (row = n * OH + r), added to dk (or
// written, if `first`).
template <int V, int P>
inline void KernelGradTile(const ConvGeom& g, const float* x, const float* dy, float* dk,
                           int64_t i, int64_t j, int64_t ci0, const ChannelBlock& b,
                           int64_t row0, int64_t row1, bool first) {
  float* dkp = dk + ((i * g.kw + j) * g.ci + ci0) * g.co + b.o0;
  __m512 acc[P][V];
  TLJAX_UNROLL for (int p = 0; p < P; ++p) {
    TLJAX_UNROLL for (int v = 0; v < V - 1; ++v)
      acc[p][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(dkp + p * g.co + 16 * v);
    acc[p][V - 1] = first ? _mm512_setzero_ps()
                          : _mm512_maskz_loadu_ps(b.last, dkp + p * g.co + 16 * (V - 1));
  }
  // Output columns c whose input column c * sw + j - pl lies in [0, W).
  const int64_t c_lo = std::max<int64_t>(0, (g.pl - j + g.sw - 1) / g.sw);
  const int64_t c_hi = std::min<int64_t>(g.ow, (g.w - 1 + g.pl - j) / g.sw + 1);
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t n = row / g.oh, r = row % g.oh, xr = r * g.sh + i - g.pt;
    if (xr < 0 || xr >= g.h || c_lo >= c_hi) continue;
    const float* xp = x + ((n * g.h + xr) * g.w + (c_lo * g.sw + j - g.pl)) * g.ci + ci0;
    const float* dyp = dy + (row * g.ow + c_lo) * g.co + b.o0;
    const int64_t x_step = g.sw * g.ci;
    for (int64_t c = c_lo; c < c_hi; ++c, xp += x_step, dyp += g.co) {
      __m512 dv[V];
      TLJAX_UNROLL for (int v = 0; v < V - 1; ++v) dv[v] = _mm512_loadu_ps(dyp + 16 * v);
      dv[V - 1] = _mm512_maskz_loadu_ps(b.last, dyp + 16 * (V - 1));
      TLJAX_UNROLL for (int p = 0; p < P; ++p) {
        const __m512 xv = _mm512_set1_ps(xp[p]);
        TLJAX_UNROLL for (int v = 0; v < V; ++v)
          acc[p][v] = _mm512_fmadd_ps(xv, dv[v], acc[p][v]);
      }
    }
  }
  TLJAX_UNROLL for (int p = 0; p < P; ++p) {
    TLJAX_UNROLL for (int v = 0; v < V - 1; ++v)
      _mm512_storeu_ps(dkp + p * g.co + 16 * v, acc[p][v]);
    _mm512_mask_storeu_ps(dkp + p * g.co + 16 * (V - 1), b.last, acc[p][V - 1]);
  }
}

// How the kernel gradient is split: the output rows into `parts` (each summed into its own
// copy of dk, the copies then added in order) and the input channels into `groups` of near
// equal size (at most kGradGroup); each part's rows go in chunks of about 256 pixels that stay
// in cache while every output channel block, tap and channel tile runs over them.
constexpr int64_t kGradGroup = 8 * kTileWidth;
constexpr int64_t kPartialBudget = int64_t{1} << 20;  // floats of dk copies at most (4 MiB)

struct GradSplit {
  int64_t parts, rows_per_part, chunk_rows, groups;
};

GradSplit MakeGradSplit(const ConvGeom& g) {
  GradSplit s;
  const int64_t rows = g.n * g.oh, dk_size = g.kh * g.kw * g.ci * g.co;
  s.groups = (g.ci + kGradGroup - 1) / kGradGroup;
  s.chunk_rows = std::max<int64_t>(1, 256 / g.ow);
  const int64_t want = (16 + s.groups - 1) / s.groups;  // work items for the threads
  const int64_t chunks = (rows + s.chunk_rows - 1) / s.chunk_rows;
  s.parts = std::max<int64_t>(1, std::min({want, chunks, kPartialBudget / dk_size}));
  s.rows_per_part = (rows + s.parts - 1) / s.parts;
  s.parts = (rows + s.rows_per_part - 1) / s.rows_per_part;
  return s;
}

// Input channels of group `grp` (of s.groups near-equal runs) x every output channel, summed
// over the output rows [row0, row1), written to dk.
void KernelGradItem(const ConvGeom& g, const GradSplit& s, const float* x, const float* dy,
                    float* dk, int64_t row0, int64_t row1, int64_t grp) {
  const int64_t ci_lo = grp * g.ci / s.groups, ci_n = (grp + 1) * g.ci / s.groups - ci_lo;
  for (int64_t r0 = row0; r0 < row1; r0 += s.chunk_rows) {
    const int64_t r1 = std::min(r0 + s.chunk_rows, row1);
    for (int64_t o0 = 0; o0 < g.co; o0 += 64) {
      const ChannelBlock b = MakeChannelBlock(g.co, o0);
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          ForRuns(ci_n, [&](int64_t c0, int64_t len) {
            ForVectors(b, [&]<int V>() {
              ForWidth(len, [&]<int P>() {
                KernelGradTile<V, P>(g, x, dy, dk, i, j, ci_lo + c0, b, r0, r1, r0 == row0);
              });
            });
          });
        }
      }
    }
  }
}

// The 1x1 convolution as a product y (M, F) = x (M, C) k (C, F) over the batch's M pixels:
// tiles of up to 6 rows x 64 columns as the direct forward's. A tile reads k in place: for each
// input channel, its row's 64 columns of the block (the last vector masked to the columns
// that remain). Packing k's blocks into contiguous panels first costs more than it saves, even
// for ResNet's power-of-two widths whose rows fall into few L1 sets.
//
// An optional epilogue applies the convolution's bias, an inference BatchNorm, a residual and
// an activation to each tile in registers before it is stored, instead of passes over y:
// y = act(residual + ((x k + conv_bias) - mean) * mul + bias) per column (flax's formula, mul
// = rsqrt(var + eps) * scale; the residual where given). Act -1 none, 0 no activation, 1 a
// ReLU, 2 a SiLU.
// exp(x), 16 lanes: Cephes' expf as batchnorm_cpu.cc's Exp (range reduction by ln 2, a
// degree-6 polynomial), 2^n applied by scalef; within 2 ulp over [-87.3, 88.3], clamped.
inline __m512 Exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

template <int Act>
inline __m512 Activate16(__m512 z) {
  if constexpr (Act == 1) return _mm512_max_ps(z, _mm512_setzero_ps());
  if constexpr (Act == 2) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_mul_ps(z, _mm512_div_ps(one, _mm512_add_ps(one, Exp16(_mm512_sub_ps(
                                                      _mm512_setzero_ps(), z)))));
  }
  return z;
}

template <int V, int P, int Act>
inline void MatmulTile(const float* x, int64_t c, const float* k, float* y, int64_t f,
                       const ChannelBlock& b, const Epilogue& e, const float* residual) {
  __m512 acc[P][V];
  TLJAX_UNROLL for (int p = 0; p < P; ++p)
    TLJAX_UNROLL for (int v = 0; v < V; ++v) acc[p][v] = _mm512_setzero_ps();
  const float* px[P];
  TLJAX_UNROLL for (int p = 0; p < P; ++p) px[p] = x + p * c;
  AccumulateTap<V, P>(acc, px, k + b.o0, c, f, b);
  if constexpr (Act >= 0) {
    TLJAX_UNROLL for (int v = 0; v < V; ++v) {
      const __mmask16 mask = v == V - 1 ? b.last : __mmask16(0xFFFF);
      const int64_t o = b.o0 + 16 * v;
      const __m512 conv_bias = _mm512_maskz_loadu_ps(mask, e.conv_bias + o);
      const __m512 mean = _mm512_maskz_loadu_ps(mask, e.mean + o);
      const __m512 mul = _mm512_maskz_loadu_ps(mask, e.mul + o);
      const __m512 bias = _mm512_maskz_loadu_ps(mask, e.bias + o);
      TLJAX_UNROLL for (int p = 0; p < P; ++p) {
        __m512 z = _mm512_add_ps(acc[p][v], conv_bias);
        z = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(z, mean), mul), bias);
        if (residual) z = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, residual + p * f + o), z);
        acc[p][v] = Activate16<Act>(z);
      }
    }
  }
  TLJAX_UNROLL for (int p = 0; p < P; ++p) StoreBlock<V>(y + p * f, acc[p], b);
}

// Work items: chunks of up to 8 row tiles x groups of column blocks, at least ~16 items for
// the threads; with few rows the columns are split, so that each item reads only its own
// column blocks of k (k is the larger operand then, and read once per item).
struct MatmulSplit {
  int64_t rows, row_items, blocks_per_item, col_items;
};

inline MatmulSplit MakeMatmulSplit(int64_t m, int64_t blocks) {
  MatmulSplit s;
  s.rows = 8 * kTileWidth;
  s.row_items = (m + s.rows - 1) / s.rows;
  const int64_t want_cols = std::clamp<int64_t>((16 + s.row_items - 1) / s.row_items, 1, blocks);
  s.blocks_per_item = (blocks + want_cols - 1) / want_cols;
  s.col_items = (blocks + s.blocks_per_item - 1) / s.blocks_per_item;
  return s;
}

#undef TLJAX_UNROLL
#endif  // __AVX512F__

ffi::Error ConvGeometry(ffi::Buffer<ffi::F32>& x, Dims kdims, Dims ydims, int64_t pt,
                        int64_t pl, int64_t sh, int64_t sw, ConvGeom* g) {
  const auto xd = x.dimensions();
  if (xd.size() != 4 || kdims.size() != 4 || ydims.size() != 4 || kdims[2] != xd[3] ||
      ydims[0] != xd[0] || ydims[3] != kdims[3] || pt < 0 || pl < 0 || sh < 1 ||
      sw < 1) {
    return ffi::Error::InvalidArgument("conv: x (N, H, W, I), kernel (KH, KW, I, O), "
                                       "y (N, H', W', O), pads >= 0 and strides >= 1 "
                                       "expected");
  }
  *g = ConvGeom{xd[0], xd[1], xd[2], xd[3], kdims[0], kdims[1], kdims[3], ydims[1], ydims[2],
                pt, pl, sh, sw};
  return ffi::Error::Success();
}

ffi::Error DirectForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                         int64_t pad_top, int64_t pad_left, int64_t stride_h,
                         int64_t stride_w) {
#ifdef __AVX512F__
  ConvGeom g;
  if (auto e = ConvGeometry(x, kernel.dimensions(), y->dimensions(), pad_top, pad_left, stride_h,
                              stride_w, &g);
      e.failure()) return e;
  if (y->element_count() == 0) return ffi::Error::Success();
  const float *xs = x.typed_data(), *ks = kernel.typed_data();
  float* ys = y->typed_data();
  if (g.ow >= kFlatBelowWidth) {
    std::vector<float> zeros(g.ci, 0.0f);  // the row tiles' input beyond the left/right edge
    tljax::ParallelFor(pool, g.n * g.oh,
                       [&](int64_t row) { ForwardRow(g, xs, ks, ys, row, zeros.data()); });
    return ffi::Error::Success();
  }
  // Work items as the product's (MatmulSplit): runs of 8 tiles x groups of channel blocks.
  const FlatTiling ft = MakeFlatTiling(g);
  const int64_t blocks = (g.co + 63) / 64, ntiles = ft.tiles.size();
  const MatmulSplit sp = MakeMatmulSplit(ntiles * kTileWidth, blocks);
  const int64_t per_item = sp.rows / kTileWidth;
  tljax::ParallelFor(pool, sp.row_items * sp.col_items, [&](int64_t item) {
    const int64_t t0 = (item / sp.col_items) * per_item, t1 = std::min(ntiles, t0 + per_item);
    const int64_t q0 = (item % sp.col_items) * sp.blocks_per_item;
    for (int64_t q = q0; q < std::min(blocks, q0 + sp.blocks_per_item); ++q) {
      const ChannelBlock b = MakeChannelBlock(g.co, 64 * q);
      for (int64_t ti = t0; ti < t1; ++ti) {
        const FlatTile& t = ft.tiles[ti];
        ForVectors(b, [&]<int V>() {
          ForWidth(t.len, [&]<int P>() {
            ForwardTileFlat<V, P>(g, xs, ks, ys, ft, t, b);
          });
        });
      }
    }
  });
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("conv: the direct convolution needs AVX-512");
#endif
}

#ifdef __AVX512F__
template <int Act>
void MatmulRun(ffi::ThreadPool& pool, const float* xs, const float* ks, float* ys, int64_t m,
               int64_t c, int64_t f, const Epilogue& e) {
  const int64_t blocks = (f + 63) / 64;
  const MatmulSplit sp = MakeMatmulSplit(m, blocks);
  tljax::ParallelFor(pool, sp.row_items * sp.col_items, [&](int64_t item) {
    const int64_t r0 = (item / sp.col_items) * sp.rows, rows = std::min(sp.rows, m - r0);
    const int64_t q0 = (item % sp.col_items) * sp.blocks_per_item;
    for (int64_t q = q0; q < std::min(blocks, q0 + sp.blocks_per_item); ++q) {
      const ChannelBlock b = MakeChannelBlock(f, 64 * q);
      ForRuns(rows, [&](int64_t t0, int64_t len) {
        ForVectors(b, [&]<int V>() {
          ForWidth(len, [&]<int P>() {
            MatmulTile<V, P, Act>(xs + (r0 + t0) * c, c, ks, ys + (r0 + t0) * f, f, b, e,
                                  e.residual ? e.residual + (r0 + t0) * f : nullptr);
          });
        });
      });
    }
  });
}
#endif  // __AVX512F__

// y = x k, then the epilogue `e` with activation `act` (-1: no epilogue), as in MatmulTile.
ffi::Error MatmulImpl(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x,
                      ffi::Buffer<ffi::F32>& kernel, ffi::ResultBuffer<ffi::F32>& y,
                      const Epilogue& e, int64_t act) {
#ifdef __AVX512F__
  const auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (xd.size() < 1 || kd.size() != 2 || yd.size() != xd.size() || kd[0] != xd.back() ||
      yd.back() != kd[1]) {
    return ffi::Error::InvalidArgument("matmul: x (..., C), kernel (C, F), y (..., F) expected");
  }
  if (y->element_count() == 0) return ffi::Error::Success();
  const int64_t c = kd[0], f = kd[1], m = y->element_count() / f;  // C may be 0: y = 0 x k
  auto run = [&](auto fn) {
    fn(pool, x.typed_data(), kernel.typed_data(), y->typed_data(), m, c, f, e);
  };
  switch (act) {
    case -1: run(MatmulRun<-1>); break;
    case 0: run(MatmulRun<0>); break;
    case 1: run(MatmulRun<1>); break;
    case 2: run(MatmulRun<2>); break;
    default: return ffi::Error::InvalidArgument("matmul: act must be -1, 0, 1 or 2");
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("matmul: needs AVX-512");
#endif
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                  ffi::ResultBuffer<ffi::F32> y) {
  return MatmulImpl(pool, x, kernel, y, Epilogue{nullptr, nullptr, nullptr, nullptr, nullptr},
                    -1);
}

ffi::Error MatmulBatchNormImpl(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x,
                               ffi::Buffer<ffi::F32>& kernel, ffi::Buffer<ffi::F32>& conv_bias,
                               ffi::Buffer<ffi::F32>& mean, ffi::Buffer<ffi::F32>& mul,
                               ffi::Buffer<ffi::F32>& bias, const float* residual,
                               ffi::ResultBuffer<ffi::F32>& y, int64_t act) {
  const int64_t f = kernel.dimensions().back();
  for (auto* v : {&conv_bias, &mean, &mul, &bias}) {
    if (v->element_count() != f) {
      return ffi::Error::InvalidArgument("matmul_bn: conv_bias, mean, mul, bias (F,) expected");
    }
  }
  if (act < 0) return ffi::Error::InvalidArgument("matmul_bn: act must be 0, 1 or 2");
  return MatmulImpl(pool, x, kernel, y,
                    Epilogue{conv_bias.typed_data(), mean.typed_data(), mul.typed_data(),
                             bias.typed_data(), residual},
                    act);
}

ffi::Error MatmulBatchNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> conv_bias,
                           ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> mul,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                           int64_t act) {
  return MatmulBatchNormImpl(pool, x, kernel, conv_bias, mean, mul, bias, nullptr, y, act);
}

ffi::Error MatmulBatchNormAdd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> conv_bias,
                              ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> mul,
                              ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual,
                              ffi::ResultBuffer<ffi::F32> y, int64_t act) {
  if (residual.element_count() != y->element_count()) {
    return ffi::Error::InvalidArgument("matmul_bn: the residual must have the output's shape");
  }
  return MatmulBatchNormImpl(pool, x, kernel, conv_bias, mean, mul, bias,
                             residual.typed_data(), y, act);
}

ffi::Error DirectKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                            int64_t pad_top, int64_t pad_left, int64_t stride_h,
                            int64_t stride_w) {
#ifdef __AVX512F__
  ConvGeom g;
  if (auto e = ConvGeometry(x, dk->dimensions(), dy.dimensions(), pad_top, pad_left, stride_h,
                              stride_w, &g);
      e.failure()) return e;
  const float *xs = x.typed_data(), *dys = dy.typed_data();
  float* dks = dk->typed_data();
  if (dk->element_count() == 0) return ffi::Error::Success();
  if (dy.element_count() == 0) {  // no pixels (an empty batch): a zero gradient
    std::fill_n(dks, dk->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const GradSplit s = MakeGradSplit(g);
  const int64_t dk_size = g.kh * g.kw * g.ci * g.co, rows = g.n * g.oh;
  std::vector<float> partials((s.parts - 1) * dk_size);  // part 0 sums into dk itself
  tljax::ParallelFor(pool, s.parts * s.groups, [&](int64_t item) {
    const int64_t grp = item % s.groups, q = item / s.groups;
    float* out = q == 0 ? dks : partials.data() + (q - 1) * dk_size;
    KernelGradItem(g, s, xs, dys, out, q * s.rows_per_part,
                   std::min(rows, (q + 1) * s.rows_per_part), grp);
  });
  if (s.parts > 1) {
    constexpr int64_t kSpan = 16384;
    tljax::ParallelFor(pool, (dk_size + kSpan - 1) / kSpan, [&](int64_t item) {
      const int64_t e0 = item * kSpan, e1 = std::min(e0 + kSpan, dk_size);
      for (int64_t q = 1; q < s.parts; ++q) {
        const float* part = partials.data() + (q - 1) * dk_size;
        for (int64_t e = e0; e < e1; ++e) dks[e] += part[e];
      }
    });
  }
  return ffi::Error::Success();
#else
  return ffi::Error::Internal("conv: the direct convolution needs AVX-512");
#endif
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxFlipTranspose, FlipTranspose,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define TLJAX_DIRECT_CONV_BINDING                       \
  ffi::Ffi::Bind()                                      \
      .Ctx<ffi::ThreadPool>()                           \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Ret<ffi::Buffer<ffi::F32>>()                     \
      .Attr<int64_t>("pad_top")                         \
      .Attr<int64_t>("pad_left")                        \
      .Attr<int64_t>("stride_h")                        \
      .Attr<int64_t>("stride_w")

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxConvForward, DirectForward, TLJAX_DIRECT_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxConvKernelGrad, DirectKernelGrad,
                              TLJAX_DIRECT_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
// x, kernel, conv_bias, mean, mul, bias; then the residual (tljax_matmul_bn_add), y and act.
#define TLJAX_MATMUL_BN_ARGS                            \
  ffi::Ffi::Bind()                                      \
      .Ctx<ffi::ThreadPool>()                           \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxMatmulBatchNorm, MatmulBatchNorm,
                              TLJAX_MATMUL_BN_ARGS.Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("act"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxMatmulBatchNormAdd, MatmulBatchNormAdd,
                              TLJAX_MATMUL_BN_ARGS.Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("act"));

// 1 where this library has the direct convolution (built for a CPU with AVX-512), else 0.
extern "C" int TljaxDirectConvAvailable() {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}
