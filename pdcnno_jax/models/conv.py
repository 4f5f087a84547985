"""2-D convolution whose gradients stay fast inside loops and branches on XLA:CPU.

XLA:CPU runs the convolutions of a network's backward pass 3-15x slower when they sit inside
a ``while`` or ``conditional`` (``lax.while_loop``, ``lax.scan``, ``lax.cond``) than at the
top level of a program (jax-ml/jax#12868; ``benchmarks/bench_conv_in_loops.py`` measures it).
JAX's transpose rules express both gradients as convolutions with swapped dimension numbers
(the batch becomes the contraction of the kernel gradient); outside loops XLA rewrites those
into a fast form, inside it does not. Line searches (CGMSE's optax zoom search evaluates
value and gradient in a ``while_loop``), CGMSE's mini-batch re-evaluation (a ``cond``) and
chunked full-batch losses (a ``scan``) all differentiate the model inside control flow.

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (pass it to
``nnx.Conv(conv_general_dilated=...)``, or use :func:`set_conv_gradients` on a built model)
whose custom VJP writes both gradients as plain
NHWC / HWIO convolutions over transposed operands, the form XLA runs fast everywhere:

* kernel gradient: ``dK[i, j, c, o] = sum_{n, y, x} xpad[n, s y + i, s x + j, c] dy[n, y, x, o]``,
  a VALID convolution of ``xpad`` viewed as (C, H, W, N) with ``dy`` viewed as a (h, w, N, O)
  kernel dilated by the stride s;
* input gradient: ``dy`` dilated by the stride, padded, convolved with the spatially flipped
  kernel whose in / out channels are swapped.

At the top level it is 13-22% slower than JAX's rules (the operand transposes), so
``config.model.conv_gradients`` (``CONV_GRADIENTS``) chooses per run; ``'auto'`` is
loop-friendly for line-search optimizers (:func:`resolve_conv_gradients`). The values are
those of JAX's rules to float rounding. Only the plain case is taken over (4-D NHWC / HWIO,
no dilation, one feature group, default output type); anything else goes to
``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_SPEC = ('NHWC', 'HWIO', 'NHWC')
_NUMBERS = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _SPEC)

Pads = tuple[tuple[int, int], tuple[int, int]]
CONV_GRADIENTS = ('auto', 'lax', 'loop_friendly')
# Optimizers whose update differentiates the loss inside a while_loop (line searches).
_LINE_SEARCH_OPTIMIZERS = ('cgmse', 'lbfgs')


def resolve_conv_gradients(choice: str, optimizer_name: str) -> str:
  """``'lax'`` or ``'loop_friendly'`` for ``config.model.conv_gradients``.

  Args:
    choice: 'auto', 'lax' or 'loop_friendly'.
    optimizer_name: ``config.optimizer.name``; with 'auto', line-search optimizers (cgmse,
      lbfgs) get the loop-friendly gradients, every other optimizer JAX's own.

  Returns:
    The resolved choice.

  Raises:
    ValueError: an unknown choice.
  """
  if choice not in CONV_GRADIENTS:
    raise ValueError(f'config.model.conv_gradients={choice!r}; use one of {CONV_GRADIENTS}.')
  if choice != 'auto':
    return choice
  return 'loop_friendly' if optimizer_name in _LINE_SEARCH_OPTIMIZERS else 'lax'


def set_conv_gradients(model: Any, choice: str) -> int:
  """Makes every ``nnx.Conv`` of ``model`` use ``choice``'s convolution; returns how many.

  Args:
    model: an ``nnx.Module``.
    choice: 'lax' (``lax.conv_general_dilated``) or 'loop_friendly' (this module's).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if choice not in ('lax', 'loop_friendly'):
    raise ValueError(f"conv gradients must be 'lax' or 'loop_friendly' here, got {choice!r}.")
  fn = conv_general_dilated if choice == 'loop_friendly' else lax.conv_general_dilated
  count = 0
  for _, module in model.iter_modules():
    if isinstance(module, nnx.Conv):
      module.conv_general_dilated = fn
      count += 1
  return count


def _all_ones(values: Sequence[int] | None) -> bool:
  return values is None or all(v == 1 for v in values)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
  """``lax.conv_general_dilated`` with gradients that are fast inside control flow.

  Same arguments and result as ``lax.conv_general_dilated``; see the module docstring.
  """
  numbers = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             if dimension_numbers is not None and lhs.ndim == 4 else None)
  plain = (lhs.ndim == 4 and numbers == _NUMBERS and _all_ones(lhs_dilation)
           and _all_ones(rhs_dilation) and feature_group_count == 1
           and batch_group_count == 1 and preferred_element_type is None
           and kwargs.get('out_sharding') is None)
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type, **kwargs)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _conv_nhwc(lhs, rhs, strides, pads, precision)


def _conv(x: jax.Array, k: jax.Array, strides, pads, precision, **kwargs) -> jax.Array:
  return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=_SPEC,
                                  precision=precision, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_nhwc(x: jax.Array, k: jax.Array, strides: tuple[int, int], pads: Pads,
               precision: Any) -> jax.Array:
  return _conv(x, k, strides, pads, precision)


def _conv_nhwc_fwd(x, k, strides, pads, precision):
  return _conv(x, k, strides, pads, precision), (x, k)


def _kernel_grad(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int], strides, pads,
                 precision) -> jax.Array:
  """dK as a VALID NHWC / HWIO convolution of x^T (C, H, W, N) with dy^T (h, w, N, O)."""
  padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out = lax.conv_general_dilated(padded.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3),
                                 (1, 1), 'VALID', rhs_dilation=strides,
                                 dimension_numbers=_SPEC, precision=precision)
  return out[:, :kernel_hw[0], :kernel_hw[1], :].transpose(1, 2, 0, 3)


def _input_grad(dy: jax.Array, k: jax.Array, input_hw: tuple[int, int], strides, pads,
                precision) -> jax.Array:
  """dX: dy dilated by the strides and padded, convolved with the flipped, swapped kernel."""
  grad_pads = []
  for size, window, stride, (lo, _), out in zip(input_hw, k.shape[:2], strides, pads,
                                                dy.shape[1:3]):
    before = window - 1 - lo
    after = size + lo - (out - 1) * stride - 1
    grad_pads.append((before, after))
  flipped = k[::-1, ::-1].transpose(0, 1, 3, 2)  # HWIO with I = out channels.
  return lax.conv_general_dilated(dy, flipped, (1, 1), grad_pads, lhs_dilation=strides,
                                  dimension_numbers=_SPEC, precision=precision)


def _conv_nhwc_bwd(strides, pads, precision, residuals, dy):
  x, k = residuals
  dx = _input_grad(dy, k, x.shape[1:3], strides, pads, precision)
  dk = _kernel_grad(x, dy, k.shape[:2], strides, pads, precision)
  return dx.astype(x.dtype), dk.astype(k.dtype)


_conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)
