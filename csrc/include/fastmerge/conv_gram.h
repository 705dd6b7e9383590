// Implicit im2col of a 2-D convolution, shared by the host and device conv_gram kernels.
//
// A sample m is one output pixel (image n, row oh, column ow), m = (n * h_out + oh) * w_out
// + ow. Its patch feature f < c_in * kh * kw is (channel c, kernel row i, kernel column j)
// in F.unfold's order, f = (c * kh + i) * kw + j, and reads x[n, c, oh * sh - ph + i * dh,
// ow * sw - pw + j * dw] (0 outside the image); feature c_in * kh * kw is the constant 1
// when `bias` is set. Column t of the combined matrix B = [patches | y] is feature t for
// t < features(), else output channel t - features() of y[n, :, oh, ow].
#pragma once

#include <cstdint>

#include "fastmerge/moments.h"  // FM_HD

namespace fastmerge {

struct ConvGeometry {
  int64_t n, c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, ph, pw, dh, dw, bias;

  FM_HD int64_t patch_features() const { return c_in * kh * kw; }
  FM_HD int64_t features() const { return c_in * kh * kw + (bias ? 1 : 0); }
  FM_HD int64_t columns() const { return features() + c_out; }
  FM_HD int64_t pixels() const { return h_out * w_out; }
  FM_HD int64_t samples() const { return n * h_out * w_out; }
};

// Number of int64 fields of ConvGeometry, in declaration order (the Python side passes them).
constexpr int kConvGeometryFields = 16;

// Column t of the combined matrix for sample m, as double (see the file comment).
template <typename T>
FM_HD double conv_column_value(const T* x, const T* y, const ConvGeometry& g, int64_t m,
                               int64_t t) {
  const int64_t pixels = g.pixels();
  const int64_t n = m / pixels;
  const int64_t p = m - n * pixels;
  const int64_t k = g.patch_features();
  if (t >= g.features()) {
    return static_cast<double>(y[(n * g.c_out + (t - g.features())) * pixels + p]);
  }
  if (t >= k) return 1.0;  // the bias feature
  const int64_t oh = p / g.w_out;
  const int64_t ow = p - oh * g.w_out;
  const int64_t c = t / (g.kh * g.kw);
  const int64_t r = t - c * g.kh * g.kw;
  const int64_t i = r / g.kw;
  const int64_t j = r - i * g.kw;
  const int64_t ih = oh * g.sh - g.ph + i * g.dh;
  const int64_t iw = ow * g.sw - g.pw + j * g.dw;
  if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) return 0.0;
  return static_cast<double>(x[((n * g.c_in + c) * g.h + ih) * g.w + iw]);
}

}  // namespace fastmerge
