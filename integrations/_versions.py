"""Version checks shared by the framework adapters.

Each adapter declares the range its optional extra installs (``pyproject.toml``) and
calls :func:`require` when it is imported, so an unsupported framework fails at once,
with the installed version and the supported range in the message, instead of deep
inside a training run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = ["require", "UnsupportedVersionError"]


class UnsupportedVersionError(ImportError):
    """The installed framework is missing or outside the range an adapter supports."""


def require(module: str, spec: str, extra: str) -> ModuleType:
    """Import ``module`` and check ``module.__version__`` against ``spec`` (e.g. ``">=2.2,<3"``).

    Returns the imported module. Raises :class:`UnsupportedVersionError` naming the
    installed version, the supported range and the extra to install.
    """
    hint = f'pip install "esswatch[{extra}]"'
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UnsupportedVersionError(
            f"esswatch.integrations.{extra} needs `{module}{spec}`, which is not installed ({e}). "
            f"Install it with: {hint}"
        ) from e
    raw = getattr(mod, "__version__", None)
    try:
        version = Version(str(raw))
    except InvalidVersion as e:
        raise UnsupportedVersionError(
            f"esswatch.integrations.{extra}: cannot read the version of `{module}` ({raw!r}); supported: {module}{spec}"
        ) from e
    if not SpecifierSet(spec).contains(version, prereleases=True):
        raise UnsupportedVersionError(
            f"esswatch.integrations.{extra} supports {module}{spec}, but {module} {version} is installed. "
            f"Install a supported version with: {hint}"
        )
    return mod
