"""The demo task (multi-query associative recall, generated locally) and its training loop."""
from .mqar import MQAR, mqar_batch

__all__ = ["MQAR", "mqar_batch"]
