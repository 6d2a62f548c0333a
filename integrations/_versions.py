"""Version checks shared by the framework adapters.

The supported ranges live here (the extras in ``pyproject.toml`` install them, and CI tests
their lower ends). Each adapter calls :func:`require` when it is imported, so an unsupported
framework fails at once, with the installed version and the supported range in the message,
instead of deep inside a training run. The Hugging Face layer provider, which is loaded
whenever ``transformers`` is imported, uses :func:`version_problem` instead: it must not
raise there, and reports out-of-range Hugging Face layers as not capturable.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = ["require", "version_problem", "UnsupportedVersionError", "SUPPORTED_TRANSFORMERS", "SUPPORTED_LIGHTNING"]

#: transformers: ``AttentionInterface.get_interface`` (how esswatch sees every kernel, eager included)
#: exists from 5.1; FalconMamba's captured operator matches its mixer from 5.15
SUPPORTED_TRANSFORMERS = ">=5.15,<6"
#: lightning
SUPPORTED_LIGHTNING = ">=2.2,<3"


class UnsupportedVersionError(ImportError):
    """The installed framework is missing or outside the range an adapter supports."""


def version_problem(mod: ModuleType, spec: str, extra: str) -> Optional[str]:
    """Why ``mod``'s version is not supported (a sentence naming it, the range and the fix), or ``None``."""
    name = mod.__name__
    raw = getattr(mod, "__version__", None)
    try:
        version = Version(str(raw))
    except InvalidVersion:
        return f"cannot read the version of `{name}` ({raw!r}); esswatch supports {name}{spec}"
    if SpecifierSet(spec).contains(version, prereleases=True):
        return None
    return (
        f"esswatch supports {name}{spec}, but {name} {version} is installed. "
        f'Install a supported version with: pip install "esswatch[{extra}]"'
    )


def require(module: str, spec: str, extra: str) -> ModuleType:
    """Import ``module`` and check ``module.__version__`` against ``spec`` (e.g. ``">=2.2,<3"``).

    Returns the imported module. Raises :class:`UnsupportedVersionError` naming the
    installed version, the supported range and the extra to install.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UnsupportedVersionError(
            f"esswatch.integrations.{extra} needs `{module}{spec}`, which is not installed ({e}). "
            f'Install it with: pip install "esswatch[{extra}]"'
        ) from e
    problem = version_problem(mod, spec, extra)
    if problem is not None:
        raise UnsupportedVersionError(f"esswatch.integrations.{extra}: {problem}")
    return mod
