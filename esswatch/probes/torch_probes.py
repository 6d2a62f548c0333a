"""Probes for PyTorch's built-in attention: ``torch.nn.MultiheadAttention``.

The probe recomputes ``q`` and ``k`` from the module's own ``in_proj`` weights and
the inputs of the call (only on armed steps, only for the kept batch rows and
under ``no_grad`` unless the graph is kept) and builds a
:class:`~esswatch.operators.SoftmaxAttention` of leading dims ``(batch, head)``
with ``value_dim = head_dim``. Masks are recorded as given and merged when the
operator is built:

- ``attn_mask`` (``(L, L)`` or ``(batch * heads, L, L)``, boolean with ``True`` =
  blocked as in ``nn.MultiheadAttention``, or additive float) or ``is_causal``;
- ``key_padding_mask`` (``(batch, L)``): a padded position is removed both as a key
  and as a query, so its row of the operator is zero (the layer's output there is
  padding and never compared).

What is not a causal self-attention is never turned into a number:

- cross-attention (``key`` is not the same tensor as ``query``, e.g. the
  ``multihead_attn`` of ``nn.TransformerDecoderLayer``) and bidirectional calls
  (no ``attn_mask`` and no ``is_causal``, e.g. an encoder without a mask): a
  :class:`~esswatch.probes.CaptureWarning` naming the layer, and the layer is left
  out of ``cap.operators``;
- an ``attn_mask`` that lets a position attend to a later one (an entry above the
  diagonal that is not ``True`` / not below ``-1e4``): building the operator raises
  :class:`~esswatch.probes.CaptureError` naming the layer (checking values needs a
  host sync, so it happens outside the hooks);
- ``add_bias_kv`` / ``add_zero_attn`` (an extra key that is no sequence position),
  and subclasses that override ``forward`` (their ``q``, ``k`` are unknown): not
  capturable (:meth:`MultiheadAttentionProbe.unsupported_reason`), so the capture
  raises :class:`~esswatch.probes.UnsupportedModelError` when no other layer can be
  captured and otherwise warns once on construction, naming the layer and the reason.

``nn.TransformerEncoderLayer``'s fused fast path (eval mode, no grad) calls a
fused kernel instead of ``self_attn.forward``, so hooks on the attention module
do not fire on older torch versions (pytorch/pytorch#128413; newer versions
instead leave the fast path whenever a hook is attached to the layer or its
children, so in eval mode under ``no_grad`` a hooked layer runs the unfused path,
whose outputs differ from the fused kernel's at the rounding level). The probe
therefore also puts a forward *pre*-hook on a parent ``TransformerEncoderLayer``
(only when its ``forward`` and ``_sa_block`` are torch's own, so the attention
input is known) and records its self-attention from the layer's inputs
(``norm1(src)`` when ``norm_first``): correct on both paths, and what the layer
computes is never changed; the global ``torch.backends.mha`` fast-path switch is
left alone.
(``nn.TransformerDecoderLayer`` has no fast path; its ``self_attn`` is captured by
the module hook, its ``multihead_attn`` is cross-attention.)
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..engine.spectral import compute_dtype
from ..operators import Operator, SoftmaxAttention
from .probe import PADDING_WARNING, CaptureError, CaptureWarning, Probe
from .registry import register_probe

__all__ = ["MultiheadAttentionProbe", "BLOCKED_BELOW"]

#: an additive mask entry at or below this counts as blocked (``-inf``, ``-1e9``, ``finfo.min``).
BLOCKED_BELOW = -1e4

_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)
_ENCODER_LAYER_ARGS = ("src", "src_mask", "src_key_padding_mask", "is_causal")


def _bind(names, args, kwargs) -> Dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _blocked(mask: torch.Tensor) -> torch.Tensor:
    """Boolean: where a float (additive) mask blocks attention."""
    return mask <= BLOCKED_BELOW


def _padded(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """``key_padding_mask`` as booleans, True where a key is padding (a bool mask, or a float one's blocked
    entries)."""
    return key_padding_mask if key_padding_mask.dtype == torch.bool else _blocked(key_padding_mask)


@register_probe(torch.nn.MultiheadAttention)
class MultiheadAttentionProbe(Probe):
    """Realizes the causal self-attention of a ``torch.nn.MultiheadAttention`` call."""

    layer_type = "torch.nn.MultiheadAttention (causal self-attention)"

    def __init__(self, name, module, session) -> None:
        super().__init__(name, module, session)
        self._warned: set = set()

    # -- messages --------------------------------------------------------------
    def _describe(self) -> str:
        return f"{self.name or '<model>'} ({type(self.module).__name__})"

    def _warn(self, key: str, msg: str) -> None:
        """Warn once per probe (a host-side Python call: no device sync)."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"esswatch: {self._describe()}: {msg}; this layer is left out of the captured operators",
                CaptureWarning,
                stacklevel=3,
            )

    # -- hooks -----------------------------------------------------------------
    def _encoder_parent(self) -> Optional[torch.nn.TransformerEncoderLayer]:
        model = self.session._model()
        if model is None or not self.name:
            return None
        parent_name, _, attr = self.name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:  # pragma: no cover - name from named_modules always resolves
            return None
        base = torch.nn.TransformerEncoderLayer
        if (
            isinstance(parent, base)
            and attr == "self_attn"
            and parent.self_attn is self.module
            and type(parent).forward is base.forward
            and type(parent)._sa_block is base._sa_block
        ):
            return parent
        return None  # a subclass may feed self_attn something else: rely on the module hook

    def unsupported_reason(self) -> Optional[str]:
        mha = self.module
        if type(mha).forward is not torch.nn.MultiheadAttention.forward:
            return (
                f"{type(mha).__qualname__} overrides MultiheadAttention.forward, so its q and k are unknown "
                "(register a probe for it)"
            )
        if mha.bias_k is not None or mha.add_zero_attn:
            return (
                "add_bias_kv / add_zero_attn append a key that is no sequence position, which esswatch does not model"
            )
        return None

    def attach(self) -> List[Any]:
        mha = self.module
        reason = self.unsupported_reason()
        if reason is not None:  # Capture never attaches it; a direct attach() warns and hooks nothing
            self._warn("unsupported", reason)
            return []
        handles = [mha.register_forward_hook(self._mha_hook, with_kwargs=True)]
        parent = self._encoder_parent()
        if parent is not None:
            handles.append(parent.register_forward_pre_hook(self._encoder_layer_hook, with_kwargs=True))
        return handles

    def _mha_hook(self, module, args, kwargs, output):
        if not self.wants_record():
            return None
        a = _bind(_MHA_ARGS, args, kwargs)
        self._capture(
            a["query"],
            a["key"],
            a.get("attn_mask"),
            a.get("key_padding_mask"),
            bool(a.get("is_causal", False)),
            norm=None,
        )
        return None

    def _encoder_layer_hook(self, layer, args, kwargs):
        if not self.wants_record():
            return None
        a = _bind(_ENCODER_LAYER_ARGS, args, kwargs)
        src = a["src"]
        mask, kpm, is_causal = a.get("src_mask"), a.get("src_key_padding_mask"), bool(a.get("is_causal", False))
        if src.is_nested and (mask is not None or is_causal):  # pragma: no cover - torch never builds this
            self._warn("nested", "nested-tensor input is not supported")
            return None
        self._capture(src, src, mask, kpm, is_causal, norm=layer.norm1 if layer.norm_first else None)
        return None

    # -- recording -----------------------------------------------------------------
    def _capture(self, query, key, attn_mask, key_padding_mask, is_causal: bool, norm) -> None:
        if key is not query:
            self._warn("cross", "cross-attention (key is not the query tensor) has no causal sequence operator")
            return
        if attn_mask is None and not is_causal:
            self._warn(
                "bidirectional",
                "called without attn_mask or is_causal, i.e. bidirectional attention; "
                "ESS is defined for causal operators only",
            )
            return
        if query.is_nested:
            self._warn("nested", "nested-tensor input is not supported")
            return
        mha = self.module
        session = self.session
        unbatched = query.dim() == 2
        x = query.unsqueeze(0) if unbatched else (query if mha.batch_first else query.transpose(0, 1))
        rows = self.view()[0]
        if rows is not None:
            x = x[:rows]
        B, L, _ = x.shape
        H, hd, E = mha.num_heads, mha.head_dim, mha.embed_dim
        if mha._qkv_same_embed_dim:
            w_q, w_k = mha.in_proj_weight[:E], mha.in_proj_weight[E : 2 * E]
        else:
            w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
        b = mha.in_proj_bias
        b_q, b_k = (None, None) if b is None else (b[:E], b[E : 2 * E])
        with torch.set_grad_enabled(session.keep_graph and torch.is_grad_enabled()):
            if norm is not None:
                x = norm(x)
            q = F.linear(x, w_q, b_q).view(B, L, H, hd).transpose(1, 2)
            k = F.linear(x, w_k, b_k).view(B, L, H, hd).transpose(1, 2)
        if attn_mask is not None:
            attn_mask = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask.view(-1, H, *attn_mask.shape[-2:])
        if key_padding_mask is not None:
            kpm = key_padding_mask[None] if key_padding_mask.dim() == 1 else key_padding_mask
            key_padding_mask = kpm[:, None, None, :]
        self.record(
            q=self.keep(q, head_dim=1),
            k=self.keep(k, head_dim=1),
            attn_mask=self.keep(attn_mask, head_dim=1),
            key_padding_mask=self.keep(key_padding_mask),
        )

    # -- building ------------------------------------------------------------------
    def _merged_mask(self, attn_mask, key_padding_mask, dtype) -> Optional[torch.Tensor]:
        """One additive float mask ``(batch|1, head|1, L, L)`` (``-inf`` = blocked), or ``None``."""
        mask = None
        if attn_mask is not None:
            mask = (
                torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else attn_mask.to(dtype)
            )
        if key_padding_mask is not None:
            pad = _padded(key_padding_mask)
            kp = (
                torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(pad, float("-inf"))
                if key_padding_mask.dtype == torch.bool
                else key_padding_mask.to(dtype)
            )
            kp = kp + kp.transpose(-1, -2).masked_fill(~pad.transpose(-1, -2), 0.0)  # padded queries: zero rows
            mask = kp if mask is None else mask + kp
        return mask

    def build(self, record: Dict[str, Any]) -> Operator:
        q, k = record["q"], record["k"]
        L = q.shape[-2]
        dt = compute_dtype(q.dtype)
        mask = self._merged_mask(record["attn_mask"], record["key_padding_mask"], dt)
        self._warn_padding(record["key_padding_mask"])
        if mask is not None:
            future = torch.ones(L, L, dtype=torch.bool, device=mask.device).triu(1)
            open_future = ~_blocked(mask) & future
            if bool(open_future.any()):
                r, c = [int(v) for v in torch.nonzero(open_future.reshape(-1, L, L).any(0))[0]]
                raise CaptureError(
                    f"{self._describe()}: the attention mask lets position {r} attend to the later position {c} "
                    "(a bidirectional / non-causal mask); ESS is defined for causal operators only. Pass a causal "
                    "attn_mask (e.g. nn.Transformer.generate_square_subsequent_mask) or leave this layer out of "
                    "`layers`."
                )
        return SoftmaxAttention(q, k, mask=mask, value_dim=self.module.head_dim)

    def valid_rows(self, record: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Rows with a key that is not padding (``key_padding_mask``)."""
        kpm = record["key_padding_mask"]
        if kpm is None:
            return None
        return ~_padded(kpm).flatten(1).all(-1)

    def _warn_padding(self, key_padding_mask) -> None:
        """Once per layer, where a row is padded (outside the hooks: reading the mask syncs)."""
        if key_padding_mask is None or "padding" in self._warned:
            return
        if bool(_padded(key_padding_mask).any()):
            self._warned.add("padding")
            warnings.warn(f"esswatch: {self._describe()}: {PADDING_WARNING}", CaptureWarning, stacklevel=3)

    def tss(self) -> Optional[int]:
        return None  # softmax attention: the cache grows with the index
