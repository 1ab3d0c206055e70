// The depth-1 ICNN map of mirrormeta.conjugates.icnn and its reverse-mode derivative, on
// CPU, as two XLA FFI handlers (mirrormeta/native.py builds and registers them).
//
// A tensor's coordinates as x [R, C], channel blocks on the minor axis (a kernel's own
// order, reshaped), with per-channel parameters b, c, vb = v b [W, C] (W units) and Q,
// slope0 [C]. For every coordinate u = x[r, k] of channel k, t_w = sigmoid(b_w u + c_w):
//
//   phi(u)  = Q u + sum_w vb_w t_w - slope0                                  (IcnnMapFwd)
//
// and, given the cotangent g of phi, with d_w = t_w (1 - t_w):
//
//   du      = (Q + sum_w vb_w b_w d_w) g                                     (IcnnMapBwd)
//   red     = [sum g t_w | sum g u d_w | sum g d_w (w = 1..W) | sum g u | sum g]  [3W+2, C]
//
// sums over the R coordinates of each channel. Why: XLA:CPU computes these as
// [coordinates, W] sigmoid buffers that its dots then read back, memory traffic that was
// most of MetaMiDA's overhead over MAML (benchmarks/README.md); here the sigmoids stay in
// registers, vectorised over the channels, and the sums run as they are made.
// Leading dimensions (e.g. vmapped tasks) are batch dimensions that every argument shares
// (the Python side broadcasts them).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;

namespace {

struct Shape {
  int64_t n, r, c, w;  // batch, coordinates per channel, channels, units
};

// x [..., R, C] and b [..., W, C] with the same leading dimensions.
bool ShapeOf(const F32& x, const F32& b, Shape* s) {
  auto xd = x.dimensions(), bd = b.dimensions();
  if (xd.size() < 2 || bd.size() != xd.size()) return false;
  s->r = xd[xd.size() - 2];
  s->c = xd[xd.size() - 1];
  s->w = bd[bd.size() - 2];
  if (bd[bd.size() - 1] != s->c || s->c == 0 || s->r == 0) return false;
  s->n = x.element_count() / (s->r * s->c);
  return b.element_count() == s->n * s->w * s->c;
}

// sigmoid(s) = 1 / (1 + exp(-s)), with exp(x) = 2^n exp(r): n = round(x / ln 2),
// r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 in two parts, so r is exact), exp(r) by a
// degree-6 polynomial (Chebyshev fit): relative error 1.1e-7 over |s| <= 87 (~1 ulp).
// Why not std::exp: GCC vectorises it only with -ffast-math (glibc's vector expf), which
// must not be used here (mirrormeta/native.py); inlined, each loop vectorises whole.
inline float Sigmoid(float s) {
  float x = -s < -87.0f ? -87.0f : -s;  // comparisons, not std::min/max: they vectorise,
  x = x > 87.0f ? 87.0f : x;              // and a NaN stays a NaN
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
  float p = 1.39485845e-3f;
  p = p * r + 8.37513188e-3f;
  p = p * r + 4.16662182e-2f;
  p = p * r + 1.66664154e-1f;
  p = p * r + 5.00000011e-1f;
  p = p * r + 1.00000004f;
  p = p * r + 1.0f;
  // p * 2^n, by adding n to the exponent field (bit casts, so the loops still vectorise)
  const int32_t bits = __builtin_bit_cast(int32_t, p) + static_cast<int32_t>(n) * (1 << 23);
  return 1.0f / (1.0f + __builtin_bit_cast(float, bits));
}

ffi::Error FwdImpl(F32 x, F32 b, F32 c, F32 vb, F32 quad, F32 slope0,
                   ffi::ResultBuffer<ffi::F32> phi) {
  Shape s;
  if (!ShapeOf(x, b, &s)) return ffi::Error::InvalidArgument("icnn_map: bad shapes");
  const float *X = x.typed_data(), *B = b.typed_data(), *Cc = c.typed_data(),
              *V = vb.typed_data(), *Q = quad.typed_data(), *S0 = slope0.typed_data();
  float* P = phi->typed_data();
  const int64_t C = s.c, W = s.w;
  // Rows of all batch elements in one range: row i is batch element i / R. One thread:
  // the map runs beside convolutions that use the other cores (with a second thread from
  // XLA's intra-op pool, MetaMiDA's K=1 Conv4 step took 1.06x XLA's map's time, not 0.99x).
  for (int64_t row = 0; row < s.n * s.r; ++row) {
    const int64_t e = row / s.r;
    const float *u = X + row * C, *q = Q + e * C, *s0 = S0 + e * C;
    float* p = P + row * C;
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) p[k] = q[k] * u[k] - s0[k];
    for (int64_t w = 0; w < W; ++w) {
      const float *bw = B + (e * W + w) * C, *cw = Cc + (e * W + w) * C,
                  *vw = V + (e * W + w) * C;
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) p[k] += vw[k] * Sigmoid(bw[k] * u[k] + cw[k]);
    }
  }
  return ffi::Error::Success();
}

ffi::Error BwdImpl(F32 x, F32 b, F32 c, F32 vb, F32 quad, F32 g,
                   ffi::ResultBuffer<ffi::F32> du, ffi::ResultBuffer<ffi::F32> red) {
  Shape s;
  if (!ShapeOf(x, b, &s)) return ffi::Error::InvalidArgument("icnn_map: bad shapes");
  const float *X = x.typed_data(), *B = b.typed_data(), *Cc = c.typed_data(),
              *V = vb.typed_data(), *Q = quad.typed_data(), *G = g.typed_data();
  float *D = du->typed_data(), *Rd = red->typed_data();
  const int64_t C = s.c, W = s.w, K = 3 * W + 2;  // red: [..., K, C]
  std::fill(Rd, Rd + s.n * K * C, 0.0f);
  for (int64_t row = 0; row < s.n * s.r; ++row) {
    const int64_t e = row / s.r;
    const float *u = X + row * C, *gr = G + row * C, *q = Q + e * C;
    float* d = D + row * C;
    float* acc = Rd + e * K * C;
    float *sum_gu = acc + 3 * W * C, *sum_g = acc + (3 * W + 1) * C;
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) {
      d[k] = q[k] * gr[k];
      sum_gu[k] += gr[k] * u[k];
      sum_g[k] += gr[k];
    }
    for (int64_t w = 0; w < W; ++w) {
      const float *bw = B + (e * W + w) * C, *cw = Cc + (e * W + w) * C,
                  *vw = V + (e * W + w) * C;
      float *sum_gt = acc + w * C, *sum_gud = acc + (W + w) * C, *sum_gd = acc + (2 * W + w) * C;
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) {
        const float t = Sigmoid(bw[k] * u[k] + cw[k]);
        const float gd = gr[k] * t * (1.0f - t);
        sum_gt[k] += gr[k] * t;
        sum_gud[k] += gd * u[k];
        sum_gd[k] += gd;
        d[k] += vw[k] * bw[k] * gd;
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IcnnMapFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // x [..., R, C]
                                  .Arg<F32>()  // b [..., W, C]
                                  .Arg<F32>()  // c
                                  .Arg<F32>()  // vb
                                  .Arg<F32>()  // quad [..., C]
                                  .Arg<F32>()  // slope0 [..., C]
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(IcnnMapBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // x
                                  .Arg<F32>()  // b
                                  .Arg<F32>()  // c
                                  .Arg<F32>()  // vb
                                  .Arg<F32>()  // quad
                                  .Arg<F32>()  // g, the cotangent of phi
                                  .Ret<F32>()  // du [..., R, C]
                                  .Ret<F32>());  // red [..., 3W + 2, C]
