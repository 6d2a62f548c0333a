"""Why d 64 stays below 5x: where its time goes, and three cost-side ideas measured and dropped.

    python examples/benchmarks/d64.py --threads 1

``estimators.py --variants`` runs target (b)'s construction with head dimension 64 ("d 64": low ESS,
a flat tail) at 4.5x-4.7x, short of the 5x target. This script prints the evidence behind the
benchmark log's account of it (examples/benchmarks/README.md, "Small blocks to the quadrature, and
why d 64 stays below 5x"), at L = 2048, 8 interior indices, float32:

0. ``--sections blocks``: per block, ``randomized``'s time against the exact SVD's and the
   Golub-Kahan steps each head ran (the outer blocks are where the ratio is lost), and what the
   four middle blocks would need for 5x over the eight. ``--blocks-of "d 64;noise 0.07"`` runs
   this section on other variants of ``estimators.py`` too.
1. ``profile``: the share of ``randomized``'s CPU time in matrix products
   (``torch.profiler``), and the products' rate inside the Golub-Kahan loop against a single
   product on the same block.
2. ``layouts``: the four combinations of forward (``h v``) and backward (``h^T u``) product forms
   inside the Golub-Kahan loop, per block, against the forms ``golub_kahan._row_products`` picks.
3. ``compact``: each chunk's block copied to compact storage before its Golub-Kahan run (a slice
   of ``T`` keeps ``T``'s row stride of L floats), against the shipped runs on the slice, end to
   end, alternating in one process.
4. ``gram``: exact values from a float64 Gram matrix (``eigvalsh(H^T H)``) against float32
   ``svdvals``, per block, with both errors against a float64 SVD.
5. ``float64``: the same operator built in float64: its low band (values below ``1e-4`` of
   ``||H||_F``) and its exact ESS against the float32 operator's (is the band round-off?).

Timings are medians over repeats after a warm-up; compare within one run only.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

import esswatch as ew
from esswatch.engine import adaptive, golub_kahan
from esswatch.engine.exact import oriented_svdvals
from esswatch.engine.golub_kahan import GolubKahanRuns
from esswatch.engine.spectral import entropy_from_singular_values

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from estimators import FLAT_TAIL_VARIANTS, clustered_attention, interior  # noqa: E402
from flat_tail import timed  # noqa: E402

L = 2048
SECTIONS = ("blocks", "profile", "layouts", "compact", "gram", "float64")


def _tall(T, i):
    h = T[..., i:, :i]
    return h.transpose(-1, -2) if h.shape[-2] < h.shape[-1] else h


# the product forms of golub_kahan._row_products, on vectors stored as rows
FORWARD = {
    "h @ v^T": lambda h: lambda v: (h @ v.mT.contiguous()).mT.contiguous(),
    "v @ h^T": lambda h: lambda v: v @ h.mT,
}
BACKWARD = {
    "u @ h": lambda h: lambda u: u @ h,
    "h^T @ u^T": lambda h: lambda u: (h.mT @ u.mT.contiguous()).mT.contiguous(),
}


def _shipped(h):
    return ("h @ v^T", "u @ h") if h.stride(-1) == 1 else ("v @ h^T", "h^T @ u^T")


def _gk_ms(h, steps: int = 10) -> float:
    """One Golub-Kahan run of all heads of ``h`` (16 probes, ``steps`` steps, rank-16 deflation), in ms."""
    m, n = h.shape[-2:]
    heads = h.shape[0]
    V = torch.linalg.qr(torch.randn(heads, n, 16)).Q
    runs = GolubKahanRuns(h, V, torch.randn(heads, 16, m), torch.randn(heads, 16, n), torch.ones(heads), steps)
    t0 = time.perf_counter()
    runs.run(0, steps)
    return 1e3 * (time.perf_counter() - t0)


def blocks(idx, T, repeats: int, name: str = "d 64"):
    print(f"\n## 0. {name}, per block: randomized (rtol 0.02) against an exact SVD (4 heads; ms, median, alternating)")
    print("| i | block | randomized | exact | exact / randomized | Golub-Kahan steps per head |")
    print("|---|---|---|---|---|---|")
    orig, steps = GolubKahanRuns._step, []

    def counted(self, ci, j):
        steps.append(self.chunks[ci].stop - self.chunks[ci].start)  # the chunk's heads run step j
        return orig(self, ci, j)

    tot, per = [0.0, 0.0], []
    for i in idx:
        h = T[..., i:, :i]
        g = torch.Generator().manual_seed(0)
        t_r, t_e = [], []
        for r in range(repeats + 1):
            steps.clear()
            GolubKahanRuns._step = counted
            try:
                t0 = time.perf_counter()
                adaptive.randomized_entropy(h, 0.02, g)
                t1 = time.perf_counter()
            finally:
                GolubKahanRuns._step = orig
            oriented_svdvals(h)
            t2 = time.perf_counter()
            if r:
                t_r.append(t1 - t0)
                t_e.append(t2 - t1)
        a, b = 1e3 * statistics.median(t_r), 1e3 * statistics.median(t_e)
        tot[0] += a
        tot[1] += b
        per.append((a, b))
        shape = f"{h.shape[-2]} x {h.shape[-1]}"
        print(f"| {i} | {shape} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {sum(steps) / h.shape[0]:.1f} |", flush=True)
    print(f"| all | | {tot[0]:.1f} | {tot[1]:.1f} | {tot[1] / tot[0]:.2f}x | |")
    # 5x over the eight blocks, with the outer four as measured: what is left for the middle four
    outer = [k for k in range(len(idx)) if k < 2 or k >= len(idx) - 2]
    o_r, o_e = sum(per[k][0] for k in outer), sum(per[k][1] for k in outer)
    m_r, m_e = tot[0] - o_r, tot[1] - o_e
    left = tot[1] / 5 - o_r
    need = f"{m_e / left:.1f}x (at most {left:.1f} ms)" if left > 0 else "impossible (the outer four exceed a fifth)"
    print(
        f"\nouter four blocks {o_r:.1f} ms ({o_e / o_r:.2f}x), middle four {m_r:.1f} ms ({m_e / m_r:.2f}x); "
        f"5x over the eight would need the middle four at {need}",
        flush=True,
    )


def profile(att, idx, T):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    call = lambda: ew.entropy_ess(att, idx, estimator="randomized", rtol=0.02)
    for _ in range(2):
        call()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            call()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    print("\n## 1. where a randomized call's CPU time goes (torch.profiler, 3 calls)")
    print("| op | calls | share of CPU time | per randomized call |")
    print("|---|---|---|---|")
    for e in rows[:6]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / total:.1%} | {e.self_cpu_time_total / 3e6:.3f} s |")
    i = idx[len(idx) // 2]
    h = _tall(T, i)
    m, n = h.shape[-2:]
    fwd, bwd = golub_kahan._row_products(h[:1])
    v, u = torch.randn(1, 16, n), torch.randn(1, 16, m)
    alone = 1e3 * (timed(lambda: fwd(v), 20) + timed(lambda: bwd(u), 20))
    h1 = h[:1]  # one head: the chunk the loop runs at this size
    loop = statistics.median(_gk_ms(h1) for _ in range(5)) / 10
    rate = lambda ms: 2 * 2 * m * n * 16 / ms / 1e6
    print(
        f"\nblock i = {i} ({m} x {n}), one head, 16 columns: both products of a step alone {alone:.3f} ms "
        f"({rate(alone):.0f} GFLOP/s); a Golub-Kahan step in the loop {loop:.3f} ms ({rate(loop):.0f} GFLOP/s "
        "counting only its products)"
    )


def layouts(idx, T, repeats: int):
    print("\n## 2. product forms inside the Golub-Kahan loop (4 heads, 10 steps; ms, median of the repeats)")
    combos = [(f, b) for f in FORWARD for b in BACKWARD]
    print("| i | block | layout | " + " | ".join(f"{f}, {b}" for f, b in combos) + " | shipped |")
    print("|---|---|---|" + "---|" * (len(combos) + 1))
    orig = golub_kahan._row_products
    try:
        for i in idx:
            h = _tall(T, i)
            res = {c: [] for c in combos}
            for r in range(repeats + 1):
                for c in combos if r % 2 else combos[::-1]:
                    golub_kahan._row_products = lambda hh, c=c: (FORWARD[c[0]](hh), BACKWARD[c[1]](hh))
                    t = _gk_ms(h)
                    if r:  # the first round warms up
                        res[c].append(t)
            cells = " | ".join(f"{statistics.median(res[c]):.1f}" for c in combos)
            lay = "row-major" if h.stride(-1) == 1 else "column-major"
            print(f"| {i} | {h.shape[-2]} x {h.shape[-1]} | {lay} | {cells} | {', '.join(_shipped(h))} |", flush=True)
    finally:
        golub_kahan._row_products = orig


def _compact(h):
    """``h`` in compact storage of the same layout (row- or column-major)."""
    return h.contiguous() if h.stride(-1) == 1 else h.mT.contiguous().mT


def compact(idx, repeats: int, names):
    print(
        "\n## 3. a compact copy of each chunk's block before its Golub-Kahan run, end to end "
        f"(randomized, rtol 0.02; alternating, {repeats} repeats after a warm-up)"
    )
    print("| variant | shipped s | compact s | shipped / compact, median [min-max] | max rel err, shipped / compact |")
    print("|---|---|---|---|---|")
    orig = golub_kahan._row_products
    with_copy = lambda h: orig(_compact(h))
    for name in names:
        att = clustered_attention(L, dtype=torch.float32, **FLAT_TAIL_VARIANTS[name])
        ref = ew.entropy_ess(att, idx, estimator="exact")
        ts, err = {False: [], True: []}, {False: 0.0, True: 0.0}
        try:
            for r in range(repeats + 1):
                for copy in (False, True) if r % 2 else (True, False):
                    golub_kahan._row_products = with_copy if copy else orig
                    t0 = time.perf_counter()
                    est = ew.entropy_ess(att, idx, estimator="randomized", rtol=0.02)
                    t = time.perf_counter() - t0
                    if r:
                        ts[copy].append(t)
                    err[copy] = max(err[copy], float(((est - ref).abs() / ref).max()))
        finally:
            golub_kahan._row_products = orig
        q = [a / b for a, b in zip(ts[False], ts[True])]
        print(
            f"| {name} | {statistics.median(ts[False]):.3f} | {statistics.median(ts[True]):.3f} | "
            f"{statistics.median(q):.2f}x [{min(q):.2f}-{max(q):.2f}] | {err[False]:.1e} / {err[True]:.1e} |",
            flush=True,
        )


def gram(idx, T, repeats: int):
    print("\n## 4. exact values from a float64 Gram matrix against float32 svdvals (4 heads; ms, median)")
    print("| i | block | svdvals (float32) | eigvalsh(H^T H) (float64) | ratio | ESS error svdvals | ESS error Gram |")
    print("|---|---|---|---|---|---|---|")

    def from_gram(h):
        h64 = h.double()
        return torch.sqrt(torch.clamp(torch.linalg.eigvalsh(h64.mT @ h64), min=0))

    tot = [0.0, 0.0]
    for i in idx:
        h = _tall(T, i).contiguous()
        ref = entropy_from_singular_values(torch.linalg.svdvals(h.double()))
        err = lambda s: float(((entropy_from_singular_values(s.double()) - ref).abs() / ref).max())
        t_svd = 1e3 * timed(lambda: torch.linalg.svdvals(h), repeats)
        t_gram = 1e3 * timed(lambda: from_gram(h), repeats)
        tot[0] += t_svd
        tot[1] += t_gram
        print(
            f"| {i} | {h.shape[-2]} x {h.shape[-1]} | {t_svd:.1f} | {t_gram:.1f} | {t_svd / t_gram:.2f}x | "
            f"{err(torch.linalg.svdvals(h)):.1e} | {err(from_gram(h)):.1e} |",
            flush=True,
        )
    print(f"| all | | {tot[0]:.1f} | {tot[1]:.1f} | {tot[0] / tot[1]:.2f}x | | |")


def float64_operator(idx, T32):
    print("\n## 5. the same operator in float64: is the low band round-off?")
    att64 = clustered_attention(L, dtype=torch.float64, d=64)
    att32 = clustered_attention(L, dtype=torch.float32, d=64)
    r = ew.entropy_ess(att32, idx, estimator="exact").double() / ew.entropy_ess(att64, idx, estimator="exact") - 1
    i = idx[len(idx) // 2]
    T64 = att64.dense()
    for name, t in (("float32", T32), ("float64", T64)):
        s = torch.linalg.svdvals(_tall(t, i)[0].double())
        s = s / s.norm()
        low = s[s < 1e-4]
        print(f"{name} operator, i = {i}, head 0: {low.numel()} values < 1e-4 ||H||_F, median {low.median():.1e}")
    print(f"exact ESS, float32 operator / float64 operator - 1, 8 indices x 4 heads: {r.min():.1e} to {r.max():.1e}")


def _variants(ap, spec: str) -> list[str]:
    parts = [v.strip() for v in spec.split(";") if v.strip()]
    bad = [v for v in parts if not any(v in n for n in FLAT_TAIL_VARIANTS)]
    if bad:
        ap.error(f"no variant matches {bad}; the variants: {list(FLAT_TAIL_VARIANTS)}")
    return [n for v in parts for n in FLAT_TAIL_VARIANTS if v in n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument(
        "--variants",
        default="benchmark;d 64;d 48",
        help="for section compact: ';'-separated parts of estimators.py's FLAT_TAIL_VARIANTS names",
    )
    ap.add_argument(
        "--blocks-of",
        default="d 64",
        help="for section blocks: ';'-separated parts of estimators.py's FLAT_TAIL_VARIANTS names",
    )
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    names = _variants(ap, args.variants)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"d 64 (estimators.py's flat-tail variant), L = {L}, {threads} thread(s), torch {torch.__version__}")
    t_start = time.perf_counter()
    idx = interior(L, 8)
    att = clustered_attention(L, dtype=torch.float32, d=64)
    T = att.dense()
    if "blocks" in sections:
        for name in _variants(ap, args.blocks_of):
            kw = FLAT_TAIL_VARIANTS[name]
            T_v = T if name == "d 64" else clustered_attention(L, dtype=torch.float32, **kw).dense()
            blocks(idx, T_v, args.repeats, name)
    if "profile" in sections:
        profile(att, idx, T)
    if "layouts" in sections:
        layouts(idx, T, args.repeats)
    if "compact" in sections:
        compact(idx, args.repeats, names)
    if "gram" in sections:
        gram(idx, T, max(3, args.repeats // 2))
    if "float64" in sections:
        float64_operator(idx, T)
    print(f"\n{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
