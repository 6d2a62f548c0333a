"""``MixerProbe``: the probe every reference mixer of :mod:`esswatch.layers` registers.

A reference mixer splits its forward pass in two:

- ``featurize(x) -> dict``: every input-dependent tensor (queries, keys, gates,
  step sizes, kernels, values, output gates), shapes ``(batch, head or channel, L, .)``;
- the mixing itself, ``y = T v`` per head or channel, written out plainly in ``forward``.

It lists in ``operator_keys`` which of those tensors define ``T``, builds the
operator from them in ``operator_from(tensors)``, and states its theoretical state
size per channel in ``state_size``. The probe's forward hook recomputes
``featurize`` on the kept batch rows of the layer's input (only on armed steps;
under ``no_grad`` unless the graph is kept; the mixers draw no random numbers) and
keeps the operator tensors, sliced to the configured heads / channels.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..operators import Operator
from ..probes.probe import Probe

__all__ = ["MixerProbe"]


class MixerProbe(Probe):
    """Captures an :mod:`esswatch.layers` mixer through its ``featurize`` / ``operator_from`` methods."""

    layer_type = "esswatch.layers mixer"

    def attach(self) -> List[Any]:
        def hook(module, args, output):
            if not self.wants_record():
                return None
            x = args[0]
            rows = self.view()[0]
            if rows is not None:
                x = x[:rows]
            with torch.set_grad_enabled(self.session.keep_graph and torch.is_grad_enabled()):
                feats = module.featurize(x)
            self.record(**{key: self.keep(feats[key], head_dim=1) for key in module.operator_keys})
            return None

        return [self.module.register_forward_hook(hook)]

    def build(self, record: Dict[str, Any]) -> Operator:
        return self.module.operator_from(record)

    def tss(self) -> Optional[int]:
        return self.module.state_size
