"""The method protocol: a module that defines ``esswatch_operator`` is capturable.

::

    class MyMixer(nn.Module):
        def forward(self, x): ...
        def esswatch_operator(self, args, kwargs, output) -> esswatch.operators.Operator:
            # recompute (cheaply) or return what forward cached *outside* the module
            ...
        esswatch_tss = 16      # optional: theoretical state size per channel

The generic probe calls it from a forward hook when capture is armed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..operators import Operator
from .probe import CaptureError, Probe

__all__ = ["ProtocolProbe"]


class ProtocolProbe(Probe):
    layer_type = "esswatch_operator protocol"

    def attach(self) -> List[Any]:
        def hook(module, args, kwargs, output):
            if not self.wants_record():
                return None
            try:
                op = module.esswatch_operator(args, kwargs, output)
            except Exception as e:  # noqa: BLE001 - never reaches the user's forward
                self.record(op=None, error=e)  # raised when the operator is built (a layer failure)
                return None
            self.record(op=op.narrowed(*self.view()) if isinstance(op, Operator) else op)
            return None

        return [self.module.register_forward_hook(hook, with_kwargs=True)]

    def build(self, record: Dict[str, Any]) -> Operator:
        err = record.get("error")
        if err is not None:
            raise CaptureError(f"{self.name}: esswatch_operator raised {type(err).__name__}: {err}") from err
        op = record["op"]
        if not isinstance(op, Operator):
            raise TypeError(f"{self.name}: esswatch_operator returned {type(op).__name__}, not an Operator")
        return op

    def tss(self) -> Optional[int]:
        return getattr(self.module, "esswatch_tss", None)
