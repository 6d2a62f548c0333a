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
from .probe import Probe

__all__ = ["ProtocolProbe"]


class ProtocolProbe(Probe):
    layer_type = "esswatch_operator protocol"
    hook_what = "esswatch_operator"

    def attach(self) -> List[Any]:
        def hook(module, args, kwargs, output):
            if not self.wants_record():
                return None
            # an exception never reaches the user's forward: the hook guard records it (Probe.hook_failed), and
            # building the operator raises it as a CaptureError (a layer failure)
            op = module.esswatch_operator(args, kwargs, output)
            self.record(op=op.narrowed(*self.view()) if isinstance(op, Operator) else op)
            return None

        return [self.module.register_forward_hook(hook, with_kwargs=True)]

    def build(self, record: Dict[str, Any]) -> Operator:
        op = record["op"]
        if not isinstance(op, Operator):
            raise TypeError(f"{self.name}: esswatch_operator returned {type(op).__name__}, not an Operator")
        return op

    def tss(self) -> Optional[int]:
        return getattr(self.module, "esswatch_tss", None)
