"""Hugging Face transformers adapter (needs the `transformers` extra).

- :class:`ESSCallback` (:mod:`.callback`): a ``TrainerCallback`` that measures and logs
  ESS during ``Trainer.train``;
- :mod:`.provider`: probes for Hugging Face attention and Mamba mixers (registered
  automatically once ``transformers`` is imported).

Importing this package imports nothing heavy; ``ESSCallback`` imports transformers on
first access.
"""

__all__ = ["ESSCallback"]


def __getattr__(name):
    if name == "ESSCallback":
        from .callback import ESSCallback

        return ESSCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
