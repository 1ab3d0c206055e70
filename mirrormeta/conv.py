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
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(x_NHWC: jax.Array, w_HWIO: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x_NHWC, w_HWIO, (1, 1), 'SAME', dimension_numbers=_DIMS)


def _flip(w_HWIO: jax.Array) -> jax.Array:
  """w̃[d, o, c] = w[k−1−d, c, o]: the kernel of conv's input gradient."""
  return jnp.swapaxes(w_HWIO[::-1, ::-1], 2, 3)


@jax.custom_vjp
def conv(x_NHWC: jax.Array, w_HWIO: jax.Array) -> jax.Array:
  """'SAME'-padded, stride-1 2-D convolution with odd kernel sizes (NHWC, HWIO)."""
  return _lax_conv(x_NHWC, w_HWIO)


def _conv_fwd(x, w):
  # conv, not _lax_conv: under a further derivative (the meta-gradient differentiates
  # this forward pass too), JAX differentiates fwd with the rules of what it calls.
  return conv(x, w), (x, w)


def _conv_bwd(res, y_bar):
  x, w = res
  return conv(y_bar, _flip(w)), wgrad(x, y_bar, w.shape[:2])


conv.defvjp(_conv_fwd, _conv_bwd)


def _lax_wgrad(x, g, kernel_hw):
  """XLA's own weight gradient (its canonical form): the transpose of w ↦ conv(x, w)."""
  w_shape = jax.ShapeDtypeStruct(tuple(kernel_hw) + (x.shape[-1], g.shape[-1]), x.dtype)
  return jax.linear_transpose(lambda w: _lax_conv(x, w), w_shape)(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def wgrad(x_NHWC: jax.Array, g_NHWC: jax.Array, kernel_hw: tuple[int, int]) -> jax.Array:
  """∂⟨g, conv(x, w)⟩/∂w, a [kh, kw, C_in, C_out] kernel (the weight gradient of conv)."""
  return _lax_wgrad(x_NHWC, g_NHWC, kernel_hw)


def _wgrad_fwd(x, g, kernel_hw):
  return wgrad(x, g, kernel_hw), (x, g)


def _wgrad_bwd(kernel_hw, res, w_bar):
  del kernel_hw
  x, g = res
  return conv(g, _flip(w_bar)), conv(x, w_bar)


wgrad.defvjp(_wgrad_fwd, _wgrad_bwd)


def _is_same(padding: Any, kernel_hw: Sequence[int]) -> bool:
  if isinstance(padding, str):
    return padding.upper() == 'SAME'
  return [tuple(p) for p in padding] == [((k - 1) // 2, k // 2) for k in kernel_hw]


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """Drop-in for ``lax.conv_general_dilated`` (e.g. ``flax.linen.Conv(conv_general_dilated=...)``).

  Takes :func:`conv` for 2-D NHWC/HWIO, stride 1, undilated, ungrouped convolutions with
  odd kernels and 'SAME' padding (every convolution of Conv4 and ResNet-12), and
  ``lax.conv_general_dilated`` for anything else.
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
    return conv(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  batch_group_count, precision, preferred_element_type)
