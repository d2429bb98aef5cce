// Training BatchNorm followed by an activation, on CPU, as XLA FFI custom calls: the forward
// (batch statistics, then y = act((x - mean) * rsqrt(var + eps) * scale + bias)) and the
// backward, for x of shape (M, C) (NHWC flattened), float32.
//
// XLA:CPU computes this as separate passes that each write a full-size tensor (x - mean, the
// normalised value, the sigmoid, the product); here the forward reads x three times (mean,
// variance, output) and writes y once, and the backward reads x and dy twice (the two
// reductions, then dx) and writes dx once, recomputing the activation's derivative from x.
// Statistics are summed in float32 over fixed blocks of rows and the blocks' sums added in
// float64, in block order: the same bits with any number of threads.
//
// act: 0 none, 1 ReLU, 2 SiLU (swish, x * sigmoid(x)).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 512;  // rows per block of the statistics and of the parallel loops

// exp(x) for float32, vectorisable: Cephes' expf (range reduction by ln 2, a degree-6
// polynomial, 2^n from the exponent bits); within 2 ulp over [-87.3, 88.3], clamped outside.
inline float Exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + Exp(-z)); }

template <int Act>
inline float Activation(float z) {
  if constexpr (Act == 1) return z > 0.0f ? z : 0.0f;
  if constexpr (Act == 2) return z * Sigmoid(z);
  return z;
}

template <int Act>
inline float ActivationGrad(float z) {
  if constexpr (Act == 1) return z > 0.0f ? 1.0f : 0.0f;
  if constexpr (Act == 2) {
    const float s = Sigmoid(z);
    return s * (1.0f + z * (1.0f - s));
  }
  return 1.0f;
}

int64_t Blocks(int64_t m) { return (m + kRows - 1) / kRows; }

// Adds the blocks' per-channel float32 sums in float64, in block order.
void Combine(const std::vector<float>& partial, int64_t blocks, int64_t c, double* out) {
  for (int64_t j = 0; j < c; ++j) out[j] = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t j = 0; j < c; ++j) out[j] += partial[b * c + j];
  }
}

template <int Act>
void Forward(ffi::ThreadPool& pool, const float* x, const float* scale, const float* bias,
             float eps, int64_t m, int64_t c, float* y, float* mean, float* var_out) {
  const int64_t blocks = Blocks(m);
  std::vector<float> partial(blocks * c);
  std::vector<double> sum(c);
  tljax::ParallelFor(pool, blocks, [&](int64_t b) {
    float* __restrict acc = partial.data() + b * c;
    std::memset(acc, 0, sizeof(float) * c);
    for (int64_t i = b * kRows, end = std::min(m, i + kRows); i < end; ++i) {
      const float* __restrict row = x + i * c;
#pragma GCC ivdep
      for (int64_t j = 0; j < c; ++j) acc[j] += row[j];
    }
  });
  Combine(partial, blocks, c, sum.data());
  std::vector<float> mul(c);
  for (int64_t j = 0; j < c; ++j) mean[j] = static_cast<float>(sum[j] / m);
  tljax::ParallelFor(pool, blocks, [&](int64_t b) {
    float* __restrict acc = partial.data() + b * c;
    const float* __restrict mu = mean;
    std::memset(acc, 0, sizeof(float) * c);
    for (int64_t i = b * kRows, end = std::min(m, i + kRows); i < end; ++i) {
      const float* __restrict row = x + i * c;
#pragma GCC ivdep
      for (int64_t j = 0; j < c; ++j) {
        const float d = row[j] - mu[j];
        acc[j] += d * d;
      }
    }
  });
  Combine(partial, blocks, c, sum.data());
  for (int64_t j = 0; j < c; ++j) {
    const float var = static_cast<float>(sum[j] / m);
    var_out[j] = var;
    mul[j] = 1.0f / std::sqrt(var + eps) * scale[j];
  }
  tljax::ParallelFor(pool, blocks, [&](int64_t b) {
    const float* __restrict mu = mean;
    const float* __restrict k = mul.data();
    for (int64_t i = b * kRows, end = std::min(m, i + kRows); i < end; ++i) {
      const float* __restrict row = x + i * c;
      float* __restrict out = y + i * c;
#pragma GCC ivdep
      for (int64_t j = 0; j < c; ++j) out[j] = Activation<Act>((row[j] - mu[j]) * k[j] + bias[j]);
    }
  });
}

template <int Act>
void Backward(ffi::ThreadPool& pool, const float* x, const float* dy, const float* mean,
              const float* var, const float* scale, const float* bias, float eps, int64_t m,
              int64_t c, float* dx, float* dscale_out, float* dbias_out) {
  const int64_t blocks = Blocks(m);
  std::vector<float> r(c), mul(c), partial_g(blocks * c), partial_gx(blocks * c);
  for (int64_t j = 0; j < c; ++j) {
    r[j] = 1.0f / std::sqrt(var[j] + eps);
    mul[j] = r[j] * scale[j];
  }
  tljax::ParallelFor(pool, blocks, [&](int64_t b) {
    float* __restrict sg = partial_g.data() + b * c;
    float* __restrict sgx = partial_gx.data() + b * c;
    const float* __restrict mu = mean;
    const float* __restrict rr = r.data();
    const float* __restrict k = mul.data();
    std::memset(sg, 0, sizeof(float) * c);
    std::memset(sgx, 0, sizeof(float) * c);
    for (int64_t i = b * kRows, end = std::min(m, i + kRows); i < end; ++i) {
      const float* __restrict row = x + i * c;
      const float* __restrict d = dy + i * c;
#pragma GCC ivdep
      for (int64_t j = 0; j < c; ++j) {
        const float xc = row[j] - mu[j];
        const float g = d[j] * ActivationGrad<Act>(xc * k[j] + bias[j]);
        sg[j] += g;
        sgx[j] += g * (xc * rr[j]);
      }
    }
  });
  std::vector<double> sum_g(c), sum_gx(c);
  Combine(partial_g, blocks, c, sum_g.data());
  Combine(partial_gx, blocks, c, sum_gx.data());
  std::vector<float> dbias_n(c), dscale_n(c);
  for (int64_t j = 0; j < c; ++j) {
    dbias_out[j] = static_cast<float>(sum_g[j]);
    dscale_out[j] = static_cast<float>(sum_gx[j]);
    dbias_n[j] = dbias_out[j] / static_cast<float>(m);
    dscale_n[j] = dscale_out[j] / static_cast<float>(m);
  }
  tljax::ParallelFor(pool, blocks, [&](int64_t b) {
    const float* __restrict rr = r.data();
    const float* __restrict k = mul.data();
    const float* __restrict db = dbias_n.data();
    const float* __restrict ds = dscale_n.data();
    for (int64_t i = b * kRows, end = std::min(m, i + kRows); i < end; ++i) {
      const float* __restrict row = x + i * c;
      const float* __restrict d = dy + i * c;
      float* __restrict out = dx + i * c;
#pragma GCC ivdep
      for (int64_t j = 0; j < c; ++j) {
        const float xc = row[j] - mean[j];
        const float g = d[j] * ActivationGrad<Act>(xc * k[j] + bias[j]);
        out[j] = k[j] * (g - db[j] - (xc * rr[j]) * ds[j]);
      }
    }
  });
}

ffi::Error CheckChannels(int64_t c, std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes) {
    if (s != c) return ffi::Error::InvalidArgument("batchnorm: per-channel arrays must be (C,)");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> var, float eps, int64_t act) {
  const auto dims = x.dimensions();
  const int64_t c = dims.back(), m = x.element_count() / c;
  if (auto err = CheckChannels(c, {scale.element_count(), bias.element_count()}); err.failure())
    return err;
  auto run = [&](auto fn) {
    fn(pool, x.typed_data(), scale.typed_data(), bias.typed_data(), eps, m, c, y->typed_data(),
       mean->typed_data(), var->typed_data());
  };
  switch (act) {
    case 0: run(Forward<0>); break;
    case 1: run(Forward<1>); break;
    case 2: run(Forward<2>); break;
    default: return ffi::Error::InvalidArgument("batchnorm: act must be 0, 1 or 2");
  }
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias, float eps, int64_t act) {
  const int64_t c = x.dimensions().back(), m = x.element_count() / c;
  if (auto err = CheckChannels(c, {mean.element_count(), var.element_count(),
                                   scale.element_count(), bias.element_count()});
      err.failure())
    return err;
  auto run = [&](auto fn) {
    fn(pool, x.typed_data(), dy.typed_data(), mean.typed_data(), var.typed_data(),
       scale.typed_data(), bias.typed_data(), eps, m, c, dx->typed_data(),
       dscale->typed_data(), dbias->typed_data());
  };
  switch (act) {
    case 0: run(Backward<0>); break;
    case 1: run(Backward<1>); break;
    case 2: run(Backward<2>); break;
    default: return ffi::Error::InvalidArgument("batchnorm: act must be 0, 1 or 2");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxBatchNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // var
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("act"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(TljaxBatchNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("act"));
