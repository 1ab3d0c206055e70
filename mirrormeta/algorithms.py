"""Algorithm names → (conjugate, first_order): the preconditioned-GD family as mirror descent.

A quadratic conjugate h*(z) = ½ zᵀPz turns the mirror step into φ ← φ − α P ∇ℓ(φ)
(DESIGN.md §1), so every named method is a choice of conjugate:

=============  ===========================  ===========  ==============================
name           conjugate                    first_order  method
=============  ===========================  ===========  ==============================
maml           euclidean: ½‖z‖²             False        MAML (Finn et al. 2017)
fomaml         euclidean                    True         first-order MAML
metasgd        diagonal: ½ Σ p_i z_i²       False        Meta-SGD (Li et al. 2017)
metacurvature  kronecker per tensor         False        MetaCurvature (Park & Oliva 2019)
metamida       icnn (learned, convex)       False        MetaMiDA (arXiv 2509.02418)
=============  ===========================  ===========  ==============================
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from mirrormeta import conjugates
from mirrormeta.errors import MirrormetaError

ALGORITHMS = ('maml', 'fomaml', 'metasgd', 'metacurvature', 'metamida')


class Algorithm(NamedTuple):
  """A named method: its conjugate DGF and whether the meta-gradient is first order."""
  name: str
  conjugate: conjugates.ConjugateDGF
  first_order: bool


def get(name: str, *, first_order: bool = False,
        icnn: Mapping[str, Any] | None = None) -> Algorithm:
  """The conjugate and gradient order of algorithm ``name``.

  Args:
    name: one of ALGORITHMS.
    first_order: also drop second-order terms for the other methods (fomaml always does).
    icnn: keyword arguments of :func:`mirrormeta.conjugates.icnn` (metamida only).

  Raises:
    MirrormetaError: unknown name or invalid icnn settings.
  """
  if name == 'maml':
    conj = conjugates.euclidean()
  elif name == 'fomaml':
    conj, first_order = conjugates.euclidean(), True
  elif name == 'metasgd':
    conj = conjugates.diagonal()
  elif name == 'metacurvature':
    conj = conjugates.kronecker()
  elif name == 'metamida':
    try:
      conj = conjugates.icnn(**dict(icnn or {}))
    except TypeError as e:
      raise MirrormetaError(f'bad icnn settings {dict(icnn or {})}: {e}') from None
  else:
    raise MirrormetaError(f'unknown algorithm {name!r}; choose one of {", ".join(ALGORITHMS)}')
  return Algorithm(name, conj, bool(first_order))
