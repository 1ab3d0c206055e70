"""A 'SAME', stride-1 convolution whose derivatives of every order stay fast convolutions.

MAML-style meta-gradients differentiate the inner loop's backward pass, so the program
holds convolutions, their input/weight gradients, and the gradients of those. JAX's own
transpose rules express the second-order ones with permuted dimension labels (e.g.
``01fb_o01i->f01b``, batch as the minor axis) that XLA:CPU's fast convolution path does
not take: on the Conv4 meta-step they fell back to a generic kernel that ran a 5-image
3x3 convolution in ~10 ms instead of ~0.5 ms, about a third of the whole step
(benchmarks/results/conv_cpu.md).

Two linear maps are closed under transposition, so defining both with ``custom_vjp`` keeps
every derivative order in canonical NHWC/HWIO form:

    conv(x, w)[n,p,o]     = Σ_{d,c} x[n, p+d−r, c] · w[d, c, o]        (r = (k−1)/2)
    wgrad(x, g)[d,c,o]    = Σ_{n,p} x[n, p+d−r, c] · g[n, p, o]        (∂conv/∂w, transposed)

    conv:  x̄ = conv(ȳ, w̃),  w̄ = wgrad(x, ȳ)        with w̃[d,o,c] = w[k−1−d, c, o]
    wgrad: x̄ = conv(g, W̃), ḡ = conv(x, W̄)          for the cotangent W̄ of wgrad's output

(d and p run over the 2-D kernel offsets and pixels; out-of-range x is zero padding).

On CPU, wgrad's value is computed image by image where that is faster (:func:`_per_image`);
``wgrad_form='batched'`` keeps XLA's one convolution over the whole batch.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mirrormeta import runtime
from mirrormeta.errors import MirrormetaError

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(x_NHWC: jax.Array, w_HWIO: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x_NHWC, w_HWIO, (1, 1), 'SAME', dimension_numbers=_DIMS)


def _flip(w_HWIO: jax.Array) -> jax.Array:
  """w̃[d, o, c] = w[k−1−d, c, o]: the kernel of conv's input gradient."""
  return jnp.swapaxes(w_HWIO[::-1, ::-1], 2, 3)


# How wgrad's value is computed: 'auto' (image by image on CPU where _per_image says it
# pays, else XLA's one convolution) or 'batched' (always XLA's).
WGRAD_FORMS = ('auto', 'batched')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x_NHWC: jax.Array, w_HWIO: jax.Array, wgrad_form: str = 'auto') -> jax.Array:
  """'SAME'-padded, stride-1 2-D convolution with odd kernel sizes (NHWC, HWIO)."""
  return _lax_conv(x_NHWC, w_HWIO)


def _conv_fwd(x, w, wgrad_form):
  # conv, not _lax_conv: under a further derivative (the meta-gradient differentiates
  # this forward pass too), JAX differentiates fwd with the rules of what it calls.
  return conv(x, w, wgrad_form), (x, w)


def _conv_bwd(wgrad_form, res, y_bar):
  x, w = res
  return (conv(y_bar, _flip(w), wgrad_form),
          wgrad(x, y_bar, w.shape[:2], wgrad_form))


conv.defvjp(_conv_fwd, _conv_bwd)


def _lax_wgrad(x, g, kernel_hw):
  """XLA's own weight gradient (its canonical form): the transpose of w ↦ conv(x, w)."""
  w_shape = jax.ShapeDtypeStruct(tuple(kernel_hw) + (x.shape[-1], g.shape[-1]), x.dtype)
  return jax.linear_transpose(lambda w: _lax_conv(x, w), w_shape)(g)[0]


def _per_image(x, g) -> bool:
  """Whether XLA:CPU computes wgrad faster as a sum of one-image weight gradients.

  Why: YNNPACK's weight-gradient convolution (XLA:CPU's default) slows down when it
  contracts over many large images at once, while one image at a time keeps its speed. One
  convolution, 75 images (a query set), image by image / whole batch: 14x14x64 → 64 0.33,
  42x42x32 → 32 0.32, 21x21x32 → 32 0.43, but 10x10x32 → 32 1.66; 5 images: 42x42x32 → 32
  0.41, 14x14x64 → 64 1.19 (scratch script, 2 cores). MAML K=5 meta-step: 0.83x the time on
  the Omniglot shape, 0.81x on the miniImageNet one (benchmarks/results/conv_cpu.md,
  conv_mini_cpu.md; benchmarks/README.md, "The weight gradient on CPU"). So: images of
  ≥ 14x14 pixels whose output gradient holds ≥ 2^18 numbers. XLA's own threaded
  convolutions (runtime.threaded_convolutions) are the other way round (1.5-2.9x slower
  image by image): there, never.
  """
  n, h, w = g.shape[:3]
  return n > 1 and h * w >= 196 and g.size >= 2 ** 18 and runtime.ynnpack_convolutions()


def _wgrad_value(x, g, kernel_hw, wgrad_form):
  if wgrad_form not in WGRAD_FORMS:
    raise MirrormetaError(f'wgrad_form must be one of {WGRAD_FORMS}, got {wgrad_form!r}')
  if wgrad_form == 'batched' or not _per_image(x, g):
    return _lax_wgrad(x, g, kernel_hw)

  def per_image(x, g):
    # Slices, then XLA's form for each: its per-image transposes fuse into the slices' copies.
    # (The batch transposed once, then sliced, took 1.08x the step time and 3% more memory.)
    out = _lax_wgrad(x[:1], g[:1], kernel_hw)
    for n in range(1, x.shape[0]):
      out = out + _lax_wgrad(x[n:n + 1], g[n:n + 1], kernel_hw)
    return out

  # Resolved when the program is lowered for a platform: other backends get XLA's form.
  return lax.platform_dependent(x, g, cpu=per_image,
                                default=lambda x, g: _lax_wgrad(x, g, kernel_hw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def wgrad(x_NHWC: jax.Array, g_NHWC: jax.Array, kernel_hw: tuple[int, int],
          wgrad_form: str = 'auto') -> jax.Array:
  """∂⟨g, conv(x, w)⟩/∂w, a [kh, kw, C_in, C_out] kernel (the weight gradient of conv)."""
  return _wgrad_value(x_NHWC, g_NHWC, kernel_hw, wgrad_form)


def _wgrad_fwd(x, g, kernel_hw, wgrad_form):
  return wgrad(x, g, kernel_hw, wgrad_form), (x, g)


def _wgrad_bwd(kernel_hw, wgrad_form, res, w_bar):
  del kernel_hw
  x, g = res
  return conv(g, _flip(w_bar), wgrad_form), conv(x, w_bar, wgrad_form)


wgrad.defvjp(_wgrad_fwd, _wgrad_bwd)


def _is_same(padding: Any, kernel_hw: Sequence[int]) -> bool:
  if isinstance(padding, str):
    return padding.upper() == 'SAME'
  return [tuple(p) for p in padding] == [((k - 1) // 2, k // 2) for k in kernel_hw]


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         *, wgrad_form: str = 'auto'):
  """Drop-in for ``lax.conv_general_dilated`` (e.g. ``flax.linen.Conv(conv_general_dilated=...)``).

  Takes :func:`conv` for 2-D NHWC/HWIO, stride 1, undilated, ungrouped convolutions with
  odd kernels and 'SAME' padding (every convolution of Conv4 and ResNet-12), and
  ``lax.conv_general_dilated`` for anything else. ``wgrad_form``: see :data:`WGRAD_FORMS`.
  """
  kernel_hw = tuple(rhs.shape[:2])
  fast = (lhs.ndim == 4 and rhs.ndim == 4 and dimension_numbers is not None
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMS)
          and tuple(window_strides) == (1, 1) and all(k % 2 for k in kernel_hw)
          and _is_same(padding, kernel_hw)
          and not any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
          and feature_group_count == 1 and batch_group_count == 1
          and precision is None and preferred_element_type is None)
  if fast:
    return conv(lhs, rhs, wgrad_form)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  batch_group_count, precision, preferred_element_type)
