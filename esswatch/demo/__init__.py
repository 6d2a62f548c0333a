"""What the ``esswatch`` command runs (:mod:`esswatch.cli` only parses arguments):

- :mod:`.mqar`: the multi-query associative recall task, generated locally;
- :mod:`.train`: the MQAR training loop (``esswatch demo`` and ``examples/mqar/study.py``);
- :mod:`.run`: ``esswatch demo``; :mod:`.progress`: its stderr progress line;
- :mod:`.report`: ``esswatch report`` (TensorBoard event files -> per-layer table);
- :mod:`.diagnosis`: saturation / collapse from a utilization (``esswatch report``, the MQAR study);
- :mod:`.profile`: ``esswatch profile`` (per-position ESS of a local Hugging Face checkpoint).
"""

from .mqar import MQAR, mqar_batch

__all__ = ["MQAR", "mqar_batch"]
