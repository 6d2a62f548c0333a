"""Packaging: lazy framework imports, the integrations mapping, the quickstart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=str(ROOT / "tests")
    ).stdout


def test_import_esswatch_does_not_import_frameworks():
    out = _run(
        "import sys, esswatch, esswatch.ess, esswatch.operators, esswatch.probes;"
        "print(sorted(m for m in ('lightning', 'transformers', 'pytorch_lightning', 'matplotlib') "
        "if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_integrations_install_as_esswatch_integrations():
    out = _run("import esswatch.integrations, esswatch.integrations.transformers as t; print(t.__name__)")
    assert out.strip() == "esswatch.integrations.transformers"


def test_quickstart_prints_bounded_ess():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], check=True, capture_output=True, text=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("blocks.")]
    assert len(rows) == 4
    for row in rows:
        values = [float(v) for v in row[3:7]]
        bounds = [16, 32, 64, 32]  # min(i, L - i) at i = 16, 32, 64, 96 with L = 128
        assert all(0 < v <= b for v, b in zip(values, bounds))
        tss = None if row[2] == "grows" else int(row[2])
        if tss is not None:
            assert all(v <= tss + 1e-6 for v in values)


def test_capture_is_the_function_whatever_is_imported():
    """``esswatch.capture`` names one thing, the function, also after every submodule of the
    capture layer (``esswatch.probes``) was imported: no module doubles as a callable."""
    out = _run(
        "import esswatch, esswatch.probes, esswatch.probes.registry, types;"
        "print(isinstance(esswatch.capture, types.FunctionType), esswatch.capture is esswatch.probes.capture)"
    )
    assert out.split() == ["True", "True"]


def test_the_documented_watch_exceptions_are_exported():
    """The README names ``ESSMeasurementError`` and ``ESSWarning``: both are importable from ``esswatch``
    (lazily, as ``ESSWatch``) and are the classes the watch raises and warns with."""
    out = _run(
        "import esswatch, esswatch.watch.failures as f;"
        "print(esswatch.ESSMeasurementError is f.ESSMeasurementError, esswatch.ESSWarning is f.ESSWarning,"
        " {'ESSMeasurementError', 'ESSWarning'} <= set(esswatch.__all__))"
    )
    assert out.split() == ["True", "True", "True"]
