"""The Golub-Kahan-Lanczos runs of the deflated SLQ (:mod:`.slq`), chunk by chunk of batch entries.

Each probe's run alternates a product with ``h`` and one with ``h^T``: about 2 passes over the
block per step, the bulk of the quadrature's cost. The batch entries (heads) run in chunks: off
CPU, and on CPU where one entry's block is larger than ``SLQ_CPU_CHUNK_BYTES`` (it cannot stay in
cache), one chunk holds them all (one batched product per step); otherwise a chunk holds as many
entries as fit in ``SLQ_CPU_CHUNK_BYTES`` of block, and runs all its steps up to the next
acceptance check before the next chunk starts, so its block stays in cache across those passes
(a batch of 4 attention heads at L = 2048 does not fit, one head does:
``examples/benchmarks/estimators.py``).
A chunk whose entries were all accepted or given up at a check runs no further steps.
Pure tensor math on the block's device.
"""

from __future__ import annotations

import torch

__all__ = ["SLQ_CPU_CHUNK_BYTES", "GolubKahanRuns", "chunk_size"]

#: on CPU, the most bytes of block one chunk of batch entries holds (blocks of one entry larger than
#: this run batched); 4 MiB: every block of L = 2048 fits (measured on a CPU with 1 MiB of L2 per core
#: and a shared L3)
SLQ_CPU_CHUNK_BYTES = 4 * 2**20
_TINY = 1e-30


def _row_products(h: torch.Tensor):
    """``(v -> (h @ v^T)^T, u -> (h^T @ u^T)^T)`` on vectors stored as contiguous rows
    (``batch + (probes, n)`` and ``batch + (probes, m)``), in the BLAS layouts of :func:`products`;
    both results are contiguous rows."""
    if h.stride(-1) == 1:  # row-major
        return (lambda v: (h @ v.mT.contiguous()).mT.contiguous()), (lambda u: u @ h)
    return (lambda v: v @ h.mT), (lambda u: (h.mT @ u.mT.contiguous()).mT.contiguous())


def chunk_size(h: torch.Tensor, entries: int) -> int:
    """Batch entries per chunk of the Golub-Kahan runs: on CPU, where one entry's block fits in
    ``SLQ_CPU_CHUNK_BYTES``, as many entries as fit there, so that a chunk's block stays in cache
    across the passes it runs between two checks; otherwise all of them (one batched product per
    step: off CPU, and on CPU where a block cannot stay in cache anyway, there chunks of one entry
    were 0.93-0.97x as fast, ``examples/benchmarks/second_try.py --contenders with,batched``)."""
    per_entry = h.shape[-1] * h.shape[-2] * h.element_size()
    if h.device.type != "cpu" or per_entry > SLQ_CPU_CHUNK_BYTES:
        return entries
    return max(1, min(entries, SLQ_CPU_CHUNK_BYTES // max(per_entry, 1)))


class GolubKahanRuns:
    """The Golub-Kahan runs of :func:`~esswatch.engine.slq.slq_entropy` on the flattened batch, chunk by chunk.

    Vectors are stored as rows (``entries x probes x dim``), so norms and projections read
    contiguous memory. The runs are on ``h`` itself: ``A v = h v`` for ``v`` orthogonal to ``V``,
    ``A^T u = (I - V V^T) h^T u``, from ``u0 = h v0`` (unscaled), and :meth:`coefficients` scales
    ``alpha``, ``beta`` by ``inv`` (``1 / ||h||_F``: the runs of ``h / ||h||_F``, same vectors, two
    vector scalings per step fewer).
    The right vectors are projected off ``V`` every step (the top: ``h^T u`` has large components
    there) but not reorthogonalized against the probe's earlier ones: within ``SLQ_STEPS`` (12)
    steps, on flat-tail and near-uniform attention blocks at L = 2048, that changed the estimates by
    about ``1e-7`` (relative: float32 round-off) and cost about 150 us per step and head, 10-12% of
    the step (a line timer, one thread). The estimates, half gaps and standard errors match a
    float64 run with full reorthogonalization of both sides (``tests/test_estimators_fast.py``;
    the coefficients themselves agree in the first steps and drift apart later, by about 1e-4 of
    the largest, as float32 runs with reorthogonalization do too); Lanczos quadrature without
    reorthogonalization is the standard SLQ (Ubaru, Chen & Saad 2017)."""

    def __init__(self, h, V, u0, v0, inv, steps):
        m, n = h.shape[-2:]
        self.shape = u0.shape[:-2]
        entries = u0.numel() // (u0.shape[-1] * u0.shape[-2])
        probes = u0.shape[-2]
        h = h.reshape(entries, m, n)
        V = V.reshape(entries, n, V.shape[-1])
        self.inv = inv.reshape(entries, 1)
        # alpha_j, beta_j of every step (1 and 0 past a stopped chunk's last step: a valid tridiagonal)
        self.alpha = torch.ones(entries, probes, steps, dtype=h.dtype, device=h.device)
        self.beta = torch.zeros(entries, probes, steps, dtype=h.dtype, device=h.device)
        size = chunk_size(h, entries)
        self.chunks = [slice(a, min(a + size, entries)) for a in range(0, entries, size)]
        u0 = u0.reshape(entries, probes, m)  # once (a copy where u0 is a transposed view), then sliced
        v0 = v0.reshape(entries, probes, n)
        # per chunk, made once: (products, V, V^T, alpha, beta) and the current (u, v)
        self.parts = [
            (*_row_products(h[c]), V[c], V[c].transpose(-1, -2), self.alpha[c], self.beta[c]) for c in self.chunks
        ]
        self.uv = [(u0[c].contiguous(), v0[c].contiguous()) for c in self.chunks]
        self.running = [True] * len(self.chunks)

    def run(self, j0: int, j1: int) -> None:
        """Steps ``j0 .. j1 - 1`` of every running chunk, one chunk after the other."""
        for ci in range(len(self.chunks)):
            if self.running[ci]:
                for j in range(j0, j1):
                    self._step(ci, j)

    def _step(self, ci: int, j: int) -> None:
        fwd, bwd, V, Vt, alpha_, beta_ = self.parts[ci]
        ur, vr = self.uv[ci]
        if j > 0:
            ur = torch.addcmul(fwd(vr), beta_[:, :, j - 1 : j], ur, value=-1)
        alpha = torch.linalg.vector_norm(ur, dim=-1, keepdim=True)
        ur = ur / torch.clamp(alpha, min=_TINY)
        alpha_[:, :, j] = alpha[..., 0]
        w = bwd(ur)
        w = torch.addcmul(w - (w @ V) @ Vt, alpha, vr, value=-1)
        beta = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
        beta_[:, :, j] = beta[..., 0]
        self.uv[ci] = (ur, w / torch.clamp(beta, min=_TINY))

    def coefficients(self, steps: int):
        """``(alpha, beta)`` of the first ``steps`` steps, ``batch + (probes, steps)``, of ``h / ||h||_F``.

        A coefficient below the dtype's ``eps`` is a breakdown: the probe's Krylov space is exhausted
        (an exactly low-rank block, whose deflated remainder is round-off). The runs go on with
        normalized round-off, which the one-sided deflation lets pick up the top of the spectrum
        again, so that coefficient and every later one of the probe are set to 0, as in exact
        arithmetic. On blocks with a real tail no coefficient comes near ``eps``."""
        a, b = ((x[..., :steps] * self.inv[..., None]) for x in (self.alpha, self.beta))
        eps = torch.finfo(a.dtype).eps
        bad_a, bad_b = a < eps, b < eps
        if bool((bad_a | bad_b).any()):
            # alpha_j ~ 0: alpha_j, beta_j and later are 0; beta_j ~ 0: beta_j and alpha_{j+1} on are 0
            after_b = torch.nn.functional.pad(bad_b[..., :-1], (1, 0))
            a = torch.where((bad_a | after_b).cumsum(-1) > 0, 0.0, a)
            b = torch.where((bad_a | bad_b).cumsum(-1) > 0, 0.0, b)
        return (x.reshape(*self.shape, x.shape[1], steps) for x in (a, b))

    def frozen(self):
        """Entries of the chunks that stopped (their values stay those of their last check), or ``None``."""
        if all(self.running):
            return None
        f = torch.zeros(self.alpha.shape[0], dtype=torch.bool, device=self.alpha.device)
        for ci, c in enumerate(self.chunks):
            f[c] = not self.running[ci]
        return f.reshape(self.shape)

    def stop_chunks(self, finished) -> None:
        """Stop the chunks whose entries are all accepted or given up (``finished``: flat, host)."""
        for ci, c in enumerate(self.chunks):
            if self.running[ci] and all(finished[c]):
                self.running[ci] = False
