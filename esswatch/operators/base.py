"""The operator interface every structured causal operator implements.

An operator is a batch of causal ``L x L`` matrices ``T`` (leading dims are batch
dims: batch row, head or channel). The functional API (:mod:`esswatch.ess`) reaches the
entries of ``T`` through :meth:`Operator.hankel_support`, :meth:`Operator.block` and
:meth:`Operator.dense` (recurrences also through ``hankel(i)`` and their factors for the
Gramian route), after :meth:`Operator.validate`, :meth:`Operator.normalized` and
:meth:`Operator.to` once per call. The randomized estimator multiplies the materialized
block ``H_i`` (:mod:`esswatch.engine.adaptive`): there are no operator-specific products.
:meth:`Operator.hankel_fro2` and :meth:`Operator.tss` serve callers (utilization, tests),
not the estimators.

A new operator type implements ``dense()``, ``_tensors()`` and ``to()``; where its structure
allows, it overrides ``block()`` (a slice without materializing ``T``),
``hankel_support()`` (a window or a short kernel leaves most of ``H_i`` zero) and, for a finite
state, ``gramians()`` with ``has_gramians = True`` and ``state_width``.

``H_i = T[..., i:, :i]`` is the past-to-future submatrix at 0-based index ``i``
(``1 <= i <= L-1``), see ``docs/ess.md`` section 2.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..engine import gram as _gram
from ..engine import hankel as _hankel
from ..engine.spectral import compute_dtype
from ..engine.validation import check_finite

#: a block whose largest magnitude lies outside [SCALE_LO, 1 / SCALE_LO] (in float32 terms) is
#: rescaled before its spectrum is taken: denormals would flush to zero, squares would overflow
SCALE_LO = 1e-15

#: an :meth:`Operator.envelope` taken in float32 widens each log bound by this (the relative round-off of a
#: norm of a few hundred terms is far below ``1e-5``)
ENVELOPE_SLACK = 1e-5

__all__ = ["Operator", "matrix_scale", "SCALE_LO", "ENVELOPE_SLACK"]


def matrix_scale(x: torch.Tensor, dims, squared: bool = False) -> Optional[torch.Tensor]:
    """The detached max magnitude of ``x`` over ``dims`` (zeros -> 1), or ``None`` when every
    matrix is already in range (one host sync). ``squared``: a factor of an operator whose spectrum may
    be taken from Gramians (squares of products of two factors): a float64 factor must then lie within
    ``[SCALE_LO**3, SCALE_LO**-3]``, so that ``|q|^2 |k|^2`` stays far inside float64's normal range."""
    with torch.no_grad():
        x = x.detach()  # max |x| as max(max x, -min x): two reductions, no copy of x (NaN propagates through both)
        s = torch.maximum(x.amax(dim=dims, keepdim=True), -x.amin(dim=dims, keepdim=True))
        s = torch.where(s > 0, s, torch.ones_like(s))
        lo = SCALE_LO if x.dtype != torch.float64 else SCALE_LO ** (3 if squared else 10)
        if bool(((s < lo) | (s > 1 / lo)).any()):
            return s
    return None


class Operator:
    """Base class of a batch of causal ``L x L`` operators.

    Subclasses set ``seq_len``, ``batch_shape`` and ``state_size`` and implement
    :meth:`dense`, :meth:`_tensors` and :meth:`to` (``dtype`` and ``device`` are read from
    the first of :meth:`_tensors`).

    Attributes:
        seq_len: sequence length ``L``.
        batch_shape: the leading (batch, head or channel) dims.
        state_size: the natural state size per channel of the family (``docs/ess.md``
            section 1), or ``None`` where it grows with the index or is
            unbounded (softmax attention, long convolutions).
        value_dim: how many value channels share this operator (a head of
            width ``d_v`` counts ``d_v`` times in *total* ESS). Metadata only.
    """

    seq_len: int
    batch_shape: torch.Size
    state_size: Optional[int] = None
    value_dim: int = 1
    #: the operator factors through a state of width ``state_width`` and implements :meth:`gramians`
    #: (the exact ``"gram"`` estimator of :mod:`esswatch.ess`)
    has_gramians: bool = False
    #: :meth:`gram_spectrum` also resolves the indices with ``min(i, L - i) < state_width`` (elsewhere those
    #: take the dense SVD, cheap where a block near an end can be sliced without materializing ``T``)
    gram_at_ends: bool = False

    @property
    def prefers_gram(self) -> bool:
        """Whether ``estimator="auto"`` takes the Gramian route (where ``has_gramians``)."""
        return self.has_gramians

    # -- required -----------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """The materialized operator ``T`` of shape ``batch_shape + (L, L)``."""
        raise NotImplementedError

    # -- dtype / device -----------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._tensors()[0].dtype

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    def _tensors(self) -> Sequence[torch.Tensor]:
        """The tensors the operator is built from (for dtype/device/validation)."""
        raise NotImplementedError

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "Operator":
        """A copy with every tensor cast/moved (differentiable)."""
        raise NotImplementedError

    @property
    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in self._tensors() if t is not None)

    def validate(self) -> None:
        """Raise ``ValueError`` on NaN/Inf or a malformed operator."""
        for t in self._tensors():
            if t is not None and t.is_floating_point():
                check_finite(t, type(self).__name__)

    def normalized(self) -> "Operator":
        """An operator with the same entropy-ESS (and relative tolerance-ESS) whose entries are of
        order one: each matrix divided by a (detached) positive scale, so tiny (denormal) or huge
        entries neither flush to zero nor overflow. Returns ``self`` when nothing needs rescaling
        or the subclass cannot rescale (the default)."""
        return self

    # -- Hankel blocks and their products -----------------------------------
    def block(self, rows: slice, cols: slice) -> torch.Tensor:
        """``T[..., rows, cols]`` (subclasses compute it without materializing ``T`` where they can)."""
        return self.dense()[..., rows, cols]

    def hankel_support(self, i: int):
        """``(rows, cols)``: slices of ``T`` that hold every non-zero of ``H_i`` by structure.

        The default is all of ``H_i``; a sliding window or a short kernel narrows it (the
        trimming of :mod:`esswatch.engine.exact`). Rows and columns outside are exactly zero.
        """
        return slice(i, self.seq_len), slice(0, i)

    def hankel(self, i: int) -> torch.Tensor:
        """``H_i = T[..., i:, :i]`` materialized, shape ``batch + (L-i, i)``."""
        return self.dense()[..., i:, :i]

    def hankel_fro2(self, indices: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact ``||H_i||_F^2`` for each index, shape ``batch + (n,)``, float64.

        From prefix sums of the row and column sums of ``T^2`` (:func:`~esswatch.engine.hankel.hankel_fro2_dense`):
        ``O(L^2)`` per matrix for all indices. Not used by the estimators, which take the norm
        of the block they hold."""
        t = self.dense() if dense is None else dense
        return _hankel.hankel_fro2_dense(t, indices)

    def gramians(self, indices: torch.Tensor):
        """``(P, Q)``: the Gramians of ``H_i = O_i R_i`` (``P_i = R_i R_i^T``, ``Q_i = O_i^T O_i``) at the
        sorted unique ``indices``, float64, ``batch_shape + (n, N, N)`` (only where ``has_gramians``)."""
        raise NotImplementedError(f"{type(self).__name__} has no Gramians")

    def hankel_window(self, i: int, a: int, b: int) -> torch.Tensor:
        """``H_i`` restricted to the rows ``[i, i + a)`` and the columns ``[i - b, i)``:
        ``T[..., i:i+a, i-b:i]`` (:meth:`block`; operators with a cheaper form override it)."""
        return self.block(slice(i, i + a), slice(i - b, i))

    def envelope(self):
        """``(out, inp, step)``, ``batch_shape + (L,)`` float64 (detached), with
        ``|T[r, c]| <= exp(out_r + inp_c + step_{c+1} + ... + step_r)`` for every ``c <= r``, or ``None``
        (the default: no such bound). Where the gates forget within a few steps, :mod:`esswatch.ess.near`
        takes the singular values from the window of ``H_i`` this bound leaves
        (:class:`esswatch.engine.envelope.Envelope`, through :meth:`hankel_window`) instead of the Gramians
        or ``T``."""
        return None

    def gram_bytes(self, n: int, grad: bool = False) -> int:
        """An upper-range estimate of the Gramian route's big buffers for ``n`` indices (the memory guard of
        :mod:`esswatch.ess`): float64 factors of length ``L`` and ``N x N`` Gramians, per matrix (with
        ``grad``, the same: they are what the graph keeps)."""
        b, L, N = self.numel_batch(), self.seq_len, self.state_width
        return 4 * b * L * N * 8 + 4 * b * n * N * N * 8

    #: copies of ``T`` that :meth:`dense` holds at its peak, without and with gradients (with: its autograd graph
    #: and the backward pass's buffers); the memory guard's model (:meth:`materialize_bytes`), measured by
    #: examples/benchmarks/memory_guard.py
    dense_copies = (1, 4)

    def materialize_bytes(self, indices: Sequence[int], grad: bool) -> int:
        """An upper-range estimate of what the dense routes hold to cut the blocks at ``indices`` (the memory guard
        of :mod:`esswatch.ess`; the blocks' own copies are counted there): :attr:`dense_copies` of ``T``."""
        itemsize = torch.finfo(compute_dtype(self.dtype)).bits // 8
        return self.numel_batch() * self.seq_len**2 * itemsize * self.dense_copies[bool(grad)]

    def gram_spectrum(self, indices: torch.Tensor):
        """``(sigma2, ok, fro2)`` at the sorted unique ``indices`` from :meth:`gramians`
        (:func:`esswatch.engine.gram.gramian_squared_singular_values`)."""
        return _gram.gramian_squared_singular_values(*self.gramians(indices))

    # -- state sizes -----------------------------------------------------------
    def tss(self, indices: torch.Tensor) -> torch.Tensor:
        """``TSS_i = min(TSS, i, L - i)`` per index (``docs/ess.md`` section 3), float64 on CPU."""
        idx = torch.as_tensor(indices, dtype=torch.float64).cpu()
        geo = torch.minimum(idx, self.seq_len - idx)
        if self.state_size is None:
            return geo
        return torch.clamp(geo, max=float(self.state_size))

    # -- misc ------------------------------------------------------------------
    def numel_batch(self) -> int:
        return int(math.prod(self.batch_shape))

    def narrowed(self, rows: Optional[int], heads: Optional[int]) -> "Operator":
        """The first ``rows`` entries of the first batch dim and the first ``heads`` of the second (``None``:
        all; operands broadcast along a dim are left as they are). ``self`` where nothing is cut, or where the
        class does not define ``_rebuild(fn)`` itself (a copy with ``fn(x, core)`` applied to each operand,
        ``core`` its trailing non-batch dims): a subclass of a built-in operator would lose its overrides."""
        b = self.batch_shape
        cut = [(d, n) for d, n in enumerate((rows, heads)) if n is not None and d < len(b) and n < b[d]]
        if not cut:
            return self

        def narrow(x, core):
            lead = x.dim() - core
            for d, n in cut:
                pos = d - (len(b) - lead)  # leading dims align with batch_shape from the right
                if pos >= 0 and x.shape[pos] > n:
                    x = x.narrow(pos, 0, n)
            return x

        rebuild = type(self).__dict__.get("_rebuild")
        return self if rebuild is None else self._kept(rebuild(self, narrow))

    def _kept(self, out: "Operator") -> "Operator":
        """``out`` (rebuilt from this operator's operands) with the state size given to this one (a probe's TSS)."""
        if out.state_size is None and self.state_size is not None:
            out.state_size = self.state_size
        return out

    def selected_rows(self, rows: torch.Tensor) -> "Operator":
        """The entries ``rows`` (1-D int64) of the first batch dim (operands broadcast along it are left as they
        are); ``self`` where the class does not define ``_rebuild(fn)`` itself (see :meth:`narrowed`)."""
        b = self.batch_shape

        def pick(x, core):
            pos = (x.dim() - core) - len(b)  # the first batch dim of x (leading dims align from the right)
            return x.index_select(pos, rows.to(x.device)) if pos >= 0 and x.shape[pos] > 1 else x

        rebuild = type(self).__dict__.get("_rebuild")
        return self if rebuild is None or not b else self._kept(rebuild(self, pick))

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (
            f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, L={self.seq_len}, "
            f"state_size={self.state_size}, dtype={self.dtype})"
        )
