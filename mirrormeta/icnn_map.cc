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
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;

namespace {

// A vector of kLanes channels (GCC/Clang vector extensions). Why 16 with AVX-512: on this
// project's 2-core AMD EPYC (Zen 4) the same loops on 8-lane vectors took 1.4x the time
// (forward, 0.43 vs 0.32 ns per sigmoid on a 576 x 64 tensor); without AVX-512 (built with
// -mno-avx512f) 16 lanes, split in halves that do not fit the 16 registers, took 6.8x the
// time of 8 (2.6 vs 0.38 ns). Explicit vectors, not GCC's auto-vectoriser, which chose 8
// lanes: the kernel as a whole takes 0.45x (forward) and 0.55x (backward) the time of the
// auto-vectorised loops it replaced (0.26 vs 0.58, 0.36 vs 0.65 ns per sigmoid).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t IVec __attribute__((vector_size(4 * kLanes)));
// Rows per block: each unit's parameters (and the backward pass's sums) are loaded once per
// block and stay in registers for its rows.
constexpr int kRows = 4;

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// min(max(x, lo), hi), a NaN staying a NaN. Why the intrinsics: GCC compiles the portable
// form to a compare and a blend per bound; x86's max and min are one instruction each, and
// return their second operand when one is NaN (the clamps took a fifth of the kernel's time).
inline Vec Clamp(Vec x, float lo, float hi) {
#if defined(__AVX512F__)
  return (Vec)_mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), (__m512)x));
#elif defined(__AVX__)
  return (Vec)_mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), (__m256)x));
#else
  x = x < lo ? lo + Vec{} : x;
  return x > hi ? hi + Vec{} : x;
#endif
}

// sigmoid(s) = 1 / (1 + exp(-s)), with exp(x) = 2^n exp(r): n = round(x / ln 2),
// r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 in two parts, so r is exact), exp(r) by a
// degree-5 polynomial (Chebyshev fit): relative error 2.5e-7 over |s| <= 87 (~2 ulp).
// Why not std::exp: GCC vectorises it only with -ffast-math (glibc's vector expf), which
// must not be used here (mirrormeta/native.py).
inline Vec Sigmoid(Vec s) {
  const Vec x = Clamp(-s, -87.0f, 87.0f);
  const Vec n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 2^23)
  const Vec r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
  Vec p = 8.37512889e-3f + Vec{};
  p = p * r + 4.19175297e-2f;
  p = p * r + 1.66664155e-1f;
  p = p * r + 4.99988691e-1f;
  p = p * r + 1.00000004f;
  p = p * r + 1.00000008f;
  // p * 2^n, by adding n to the exponent field
  const IVec bits = __builtin_bit_cast(IVec, p) + __builtin_convertvector(n, IVec) * (1 << 23);
  return 1.0f / (1.0f + __builtin_bit_cast(Vec, bits));
}

// kLanes channels of one batch element: rows of x, g and out at stride ld, unit w's
// parameters at stride ldw.
struct Block {
  const float *x, *g;       // [R, ld]; g (the cotangent) in the backward pass only
  float* out;               // phi or du, [R, ld]
  const float *b, *c, *vb;  // [W, ldw]
  Vec q, s0;                // s0 in the forward pass only
  int64_t r, w, ld, ldw;
};

template <int N>
inline void FwdRows(const Block& k, int64_t r0) {
  Vec u[N], phi[N];
  for (int i = 0; i < N; ++i) {
    u[i] = Load(k.x + (r0 + i) * k.ld);
    phi[i] = k.q * u[i] - k.s0;
  }
  for (int64_t w = 0; w < k.w; ++w) {
    const Vec b = Load(k.b + w * k.ldw), c = Load(k.c + w * k.ldw), vb = Load(k.vb + w * k.ldw);
    for (int i = 0; i < N; ++i) phi[i] += vb * Sigmoid(b * u[i] + c);
  }
  for (int i = 0; i < N; ++i) Store(k.out + (r0 + i) * k.ld, phi[i]);
}

void Fwd(const Block& k, float*) {
  int64_t r = 0;
  for (; r + kRows <= k.r; r += kRows) FwdRows<kRows>(k, r);
  for (; r < k.r; ++r) FwdRows<1>(k, r);
}

// red: the 3W + 2 rows [.., ldw] of the sums for these channels, accumulated block by block.
template <int N>
inline void BwdRows(const Block& k, int64_t r0, float* red) {
  const int64_t W = k.w, lw = k.ldw;
  Vec u[N], g[N], du[N];
  Vec gu = Load(red + 3 * W * lw), gs = Load(red + (3 * W + 1) * lw);
  for (int i = 0; i < N; ++i) {
    u[i] = Load(k.x + (r0 + i) * k.ld);
    g[i] = Load(k.g + (r0 + i) * k.ld);
    du[i] = k.q * g[i];
    gu += g[i] * u[i];
    gs += g[i];
  }
  Store(red + 3 * W * lw, gu), Store(red + (3 * W + 1) * lw, gs);
  for (int64_t w = 0; w < W; ++w) {
    const Vec b = Load(k.b + w * lw), c = Load(k.c + w * lw), vbb = Load(k.vb + w * lw) * b;
    float *gt_w = red + w * lw, *gud_w = red + (W + w) * lw, *gd_w = red + (2 * W + w) * lw;
    Vec gt = Load(gt_w), gud = Load(gud_w), gd = Load(gd_w);
    for (int i = 0; i < N; ++i) {
      const Vec t = Sigmoid(b * u[i] + c);
      const Vec gti = g[i] * t;
      const Vec gdi = gti - gti * t;  // g t (1 - t)
      gt += gti;
      gud += gdi * u[i];
      gd += gdi;
      du[i] += vbb * gdi;
    }
    Store(gt_w, gt), Store(gud_w, gud), Store(gd_w, gd);
  }
  for (int i = 0; i < N; ++i) Store(k.out + (r0 + i) * k.ld, du[i]);
}

void Bwd(const Block& k, float* red) {
  for (int64_t j = 0; j < 3 * k.w + 2; ++j) Store(red + j * k.ldw, Vec{});
  int64_t r = 0;
  for (; r + kRows <= k.r; r += kRows) BwdRows<kRows>(k, r, red);
  for (; r < k.r; ++r) BwdRows<1>(k, r, red);
}

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

// Copies m <= kLanes columns of rows [R, ld] into zero-padded rows [R, kLanes], or back.
void Pad(const float* src, int64_t ld, int64_t rows, int64_t m, std::vector<float>* dst) {
  dst->assign(rows * kLanes, 0.0f);
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst->data() + i * kLanes, src + i * ld, m * 4);
}
void Unpad(const std::vector<float>& src, int64_t rows, int64_t m, float* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * ld, src.data() + i * kLanes, m * 4);
}
Vec PadVec(const float* p, int64_t m) {
  float v[kLanes] = {};
  std::memcpy(v, p, m * 4);
  return Load(v);
}

// Runs fn(block, red) on every batch element's channels, kLanes at a time; the last C mod
// kLanes channels (all of them for e.g. a 5-way output layer) on zero-padded copies.
// g, s0 and red may be null (the pass does not use them); red has red_rows rows [.., C].
template <class Fn>
void ForEachBlock(const Shape& s, const float* x, const float* g, float* out, const float* b,
                  const float* c, const float* vb, const float* q, const float* s0, float* red,
                  int64_t red_rows, Fn fn) {
  const int64_t R = s.r, C = s.c, W = s.w;
  std::vector<float> px, pg, pout, pb, pc, pvb, pred;
  for (int64_t e = 0; e < s.n; ++e) {
    const int64_t xo = e * R * C, po = e * W * C, ro = e * red_rows * C;
    for (int64_t k = 0; k < C; k += kLanes) {
      const int64_t m = C - k < kLanes ? C - k : kLanes;
      const float* s0k = s0 ? s0 + e * C + k : nullptr;
      if (m == kLanes) {
        Block blk{x + xo + k, g ? g + xo + k : nullptr, out + xo + k,
                  b + po + k, c + po + k, vb + po + k,
                  Load(q + e * C + k), s0k ? Load(s0k) : Vec{}, R, W, C, C};
        fn(blk, red ? red + ro + k : nullptr);
        continue;
      }
      Pad(x + xo + k, C, R, m, &px);
      if (g) Pad(g + xo + k, C, R, m, &pg);
      Pad(b + po + k, C, W, m, &pb);
      Pad(c + po + k, C, W, m, &pc);
      Pad(vb + po + k, C, W, m, &pvb);
      pout.resize(R * kLanes);  // not zeroed: fn writes every row (Bwd zeroes its sums)
      pred.resize(red_rows * kLanes);
      Block blk{px.data(), g ? pg.data() : nullptr, pout.data(), pb.data(), pc.data(), pvb.data(),
                PadVec(q + e * C + k, m), s0k ? PadVec(s0k, m) : Vec{}, R, W, kLanes, kLanes};
      fn(blk, pred.data());
      Unpad(pout, R, m, out + xo + k, C);
      if (red) Unpad(pred, red_rows, m, red + ro + k, C);
    }
  }
}

// One thread: the map runs beside convolutions that use the other cores (with a second
// thread from XLA's intra-op pool, MetaMiDA's K=1 Conv4 step took 1.06x XLA's map's time,
// not 0.99x).
ffi::Error FwdImpl(F32 x, F32 b, F32 c, F32 vb, F32 quad, F32 slope0,
                   ffi::ResultBuffer<ffi::F32> phi) {
  Shape s;
  if (!ShapeOf(x, b, &s)) return ffi::Error::InvalidArgument("icnn_map: bad shapes");
  ForEachBlock(s, x.typed_data(), nullptr, phi->typed_data(), b.typed_data(), c.typed_data(),
               vb.typed_data(), quad.typed_data(), slope0.typed_data(), nullptr, 0, Fwd);
  return ffi::Error::Success();
}

ffi::Error BwdImpl(F32 x, F32 b, F32 c, F32 vb, F32 quad, F32 g,
                   ffi::ResultBuffer<ffi::F32> du, ffi::ResultBuffer<ffi::F32> red) {
  Shape s;
  if (!ShapeOf(x, b, &s)) return ffi::Error::InvalidArgument("icnn_map: bad shapes");
  ForEachBlock(s, x.typed_data(), g.typed_data(), du->typed_data(), b.typed_data(),
               c.typed_data(), vb.typed_data(), quad.typed_data(), nullptr, red->typed_data(),
               3 * s.w + 2, Bwd);
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
