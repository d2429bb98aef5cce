// TljaxResizeBilinear: a uint8 (h, w, c) image resized to (height, width) bilinearly, as
// TensorFlow's `tf.cast(tf.image.resize(tf.cast(image, tf.float32), size) + 0.5, tf.uint8)`
// computes it, bit for bit (half-pixel centres, no antialiasing), in one pass and without the
// float32 copies of the input and the output.
//
// Same arithmetic as TensorFlow's ResizeBilinear kernel: per output pixel, the two source rows
// are each interpolated along x (top = l + (r - l) * ax), then the two results along y
// (top + (bottom - top) * ay), in float32, with no fused multiply-add (built with
// -ffp-contract=off). The x-interpolation of a source row is computed once and kept while the
// next output row uses it; for three channels it runs as one 4-lane SSE operation per pixel.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

REGISTER_OP("TljaxResizeBilinear")
    .Input("image: uint8")
    .Attr("height: int >= 1")
    .Attr("width: int >= 1")
    .Output("resized: uint8")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      int height, width;
      TF_RETURN_IF_ERROR(c->GetAttr("height", &height));
      TF_RETURN_IF_ERROR(c->GetAttr("width", &width));
      tensorflow::shape_inference::ShapeHandle image;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &image));
      c->set_output(0, c->MakeShape({height, width, c->Dim(image, 2)}));
      return absl::OkStatus();
    });

// Output index i of `out` samples input coordinate (i + 0.5) * in / out - 0.5: between
// pixels `lo` and `hi`, at `frac` of the way (TensorFlow's compute_interpolation_weights).
struct Tap {
  int64_t lo, hi;
  float frac;
};

std::vector<Tap> Taps(int64_t in, int64_t out) {
  const float scale = in / static_cast<float>(out);
  std::vector<Tap> taps(out);
  for (int64_t i = 0; i < out; ++i) {
    const float x = (static_cast<float>(i) + 0.5f) * scale - 0.5f;
    const float floor_x = std::floor(x);
    taps[i] = {std::max(static_cast<int64_t>(floor_x), int64_t{0}),
               std::min(static_cast<int64_t>(std::ceil(x)), in - 1), x - floor_x};
  }
  return taps;
}

class ResizeBilinear : public OpKernel {
 public:
  explicit ResizeBilinear(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("height", &height_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("width", &width_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& image = ctx->input(0);
    OP_REQUIRES(ctx, image.dims() == 3,
                tensorflow::errors::InvalidArgument("image must be (height, width, channels), "
                                                    "not ", image.shape().DebugString()));
    const int64_t h = image.dim_size(0), w = image.dim_size(1), c = image.dim_size(2);
    OP_REQUIRES(ctx, h > 0 && w > 0 && c > 0,
                tensorflow::errors::InvalidArgument("cannot resize an empty image ",
                                                    image.shape().DebugString()));
    Tensor* resized = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({height_, width_, c}), &resized));
    const uint8_t* src = image.flat<uint8_t>().data();
    uint8_t* dst = resized->flat<uint8_t>().data();

    const std::vector<Tap> ys = Taps(h, height_), xs = Taps(w, width_);
    const int64_t row = width_ * c;  // floats in an x-interpolated row
    // Each row buffer has one float of slack: the SSE path stores 4 lanes for 3 channels.
    std::vector<float> pixels(w * c + 1), buffers(2 * (row + 1));
    int64_t held[2] = {-1, -1};  // the source rows whose x-interpolations the buffers hold

    // The x-interpolation of source row y. Rows are asked for in non-decreasing order, and the
    // two rows of one output row are both kept: the buffer replaced is the older one.
    auto interpolated = [&](int64_t y) -> const float* {
      for (int k = 0; k < 2; ++k) {
        if (held[k] == y) return buffers.data() + k * (row + 1);
      }
      const int k = held[0] < held[1] ? 0 : 1;
      held[k] = y;
      float* out = buffers.data() + k * (row + 1);
      const uint8_t* in = src + y * w * c;
      for (int64_t j = 0; j < w * c; ++j) pixels[j] = in[j];
      const float* p = pixels.data();
#if defined(__SSE__)
      if (c == 3) {
        for (int64_t x = 0; x < width_; ++x) {
          const __m128 l = _mm_loadu_ps(p + xs[x].lo * 3);
          const __m128 r = _mm_loadu_ps(p + xs[x].hi * 3);
          const __m128 f = _mm_set1_ps(xs[x].frac);
          _mm_storeu_ps(out + x * 3, _mm_add_ps(l, _mm_mul_ps(_mm_sub_ps(r, l), f)));
        }
        return out;
      }
#endif
      for (int64_t x = 0; x < width_; ++x) {
        for (int64_t ch = 0; ch < c; ++ch) {
          const float l = p[xs[x].lo * c + ch], r = p[xs[x].hi * c + ch];
          out[x * c + ch] = l + (r - l) * xs[x].frac;
        }
      }
      return out;
    };

    for (int64_t y = 0; y < height_; ++y) {
      const float* top = interpolated(ys[y].lo);
      const float* bottom = interpolated(ys[y].hi);
      const float f = ys[y].frac;
      uint8_t* out = dst + y * row;
      // Within [0, 255] (a convex combination of uint8 values): + 0.5 and truncate rounds.
      for (int64_t j = 0; j < row; ++j) {
        out[j] = static_cast<uint8_t>(top[j] + (bottom[j] - top[j]) * f + 0.5f);
      }
    }
  }

 private:
  int height_, width_;
};

REGISTER_KERNEL_BUILDER(Name("TljaxResizeBilinear").Device(tensorflow::DEVICE_CPU),
                        ResizeBilinear);

}  // namespace
