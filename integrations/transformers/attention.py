"""``HFAttentionProbe``: softmax attention of Hugging Face models, through the attention registry.

The probe listens to the attention function the module calls (see
:mod:`.attention_registry`), so the model keeps its own kernel (eager, sdpa, flash,
flex). From that call it keeps ``query`` and ``key`` (after rotary embeddings, as the
kernel sees them), the mask, ``scaling``, ``sliding_window`` and ``softcap``, and
builds :class:`esswatch.operators.SoftmaxAttention` with leading dims
``(batch, query head)``; grouped-query key heads are repeated to the query heads.

Masks, as transformers passes them:

- ``None`` (sdpa / flash with ``is_causal``): causal, plus the sliding window;
- 4-D boolean (sdpa; ``True`` = may attend) or additive float (eager; ``finfo.min``
  where masked, turned into ``-inf`` so that a row with nothing to attend to is zero);
- 2-D ``(batch, keys)`` padding masks (flash): padded keys and padded queries are masked;
- flex-attention ``BlockMask``: evaluated from its ``mask_mod``.

A padded position becomes a zero row and column of the operator (exactly what the
layer computes for the real tokens); since per-index ESS then mixes positions of
differently padded rows, :meth:`build` warns once per layer. Calls that have no square
causal operator (key length != query length: KV cache or cross-attention; a
non-causal call) are skipped with a warning naming the layer; so is a call with an
attention sink. Decoding steps after a recorded prefill (cached forwards with gradients under an armed
capture; the watch's gate does not arm ``generate()``'s no-gradient decoding steps after a first forward) are not
recorded: the capture warns once that only the prefill is measured. A
module whose forward ran while armed without calling the registry gets a warning too (its
kernel bypasses the registry: no operator).

The recorded mask becomes the operator's mask, and a soft-capped call its dense
probabilities, in :mod:`.attention_mask`.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch

from esswatch.operators import Dense, Operator, SoftmaxAttention
from esswatch.probes import PADDING_WARNING, CaptureWarning, Probe, UnsupportedProbe

from . import attention_registry
from .attention_mask import as_mask, softcapped_probs

__all__ = ["HFAttentionProbe", "BypassingAttentionProbe", "BidirectionalAttentionProbe", "CrossAttentionProbe"]

_UNSEEN = object()


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where a boolean or additive float mask (``-inf`` = masked, :func:`~.attention_mask.as_mask`) lets a query
    attend."""
    return mask if mask.dtype == torch.bool else torch.isfinite(mask)


class HFAttentionProbe(Probe):
    layer_type = "Hugging Face attention (attention-function registry)"

    def __init__(self, name, module, session) -> None:
        super().__init__(name, module, session)
        self._pending = False  # armed forward running, registry not called yet
        self._window_seen: Any = _UNSEEN  # sliding_window of the last call (the TSS)
        self._warned: set = set()

    # -- hooks -------------------------------------------------------------------------
    def attach(self) -> List[Any]:
        m = self.module
        handles = [attention_registry.listen(m, self)]
        handles.append(m.register_forward_pre_hook(self._before))
        handles.append(m.register_forward_hook(self._after))
        return handles

    def _before(self, module, args) -> None:
        if self.wants_record():
            self._pending = True

    def _after(self, module, args, output) -> None:
        if self._pending:
            self._pending = False
            self._warn(
                "bypass",
                f"esswatch: {self.name} ({type(module).__name__}) ran but did not call an "
                "attention function of transformers' attention registry (ALL_ATTENTION_FUNCTIONS / "
                "AttentionInterface); no operator was captured for it. Its forward computes attention "
                "another way (e.g. GPT-2 with reorder_and_upcast_attn under eager, a fused or compiled "
                "kernel).",
            )

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, CaptureWarning, stacklevel=3)

    def wants_call(self) -> bool:
        """Every call while armed reaches :meth:`on_attention`: the first is recorded, later
        ones are only checked for a KV cache (a decoding step, warned once per capture)."""
        return self.session.armed

    def on_attention(self, query, key, value, attention_mask, kwargs: Dict[str, Any]) -> None:
        """Called by the registry wrapper before the original kernel runs (no host syncs here)."""
        self._pending = False
        if self.has_record:  # a later call in this armed window: a decoding step?
            if (
                isinstance(query, torch.Tensor)
                and isinstance(key, torch.Tensor)
                and query.dim() == 4
                and key.dim() == 4
                and query.shape[-2] != key.shape[-2]
            ):
                self.session.note_cached_call(self.name)
            return
        module = self.module
        window = kwargs.get("sliding_window")
        self._window_seen = window
        if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)) or query.dim() != 4:
            self._warn(
                "shape",
                f"esswatch: {self.name}: unexpected attention call (query/key are not "
                "(batch, heads, L, d) tensors); skipped",
            )
            return
        Lq, Lk = query.shape[-2], key.shape[-2]
        if Lq != Lk:
            self._warn(
                "lengths",
                f"esswatch: {self.name}: query length {Lq} != key length {Lk} (KV cache or "
                "cross-attention); esswatch captures full-sequence self-attention without a cache. "
                "Call skipped.",
            )
            return
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if is_causal is False:
            self._warn(
                "causal",
                f"esswatch: {self.name}: non-causal (bidirectional) attention has no causal operator; call skipped.",
            )
            return
        if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
            self._warn("sinks", f"esswatch: {self.name}: attention sinks are not supported; call skipped.")
            return
        if kwargs.get("cu_seq_lens_q") is not None:
            self._warn(
                "packed", f"esswatch: {self.name}: packed (cu_seq_lens) batches are not supported; call skipped."
            )
            return
        hq, hk = query.shape[1], key.shape[1]
        groups = max(1, hq // hk) if hk else 1
        q = self.keep(query, head_dim=1)
        k = self.keep(key)
        if self.view()[1] is not None:
            k = k.narrow(1, 0, min(hk, -(-q.shape[1] // groups)))
        mask = attention_mask
        if isinstance(mask, torch.Tensor):
            mask = self.keep(mask, head_dim=1 if mask.dim() == 4 else None)
        elif mask is not None and not hasattr(mask, "mask_mod"):
            self._warn(
                "mask", f"esswatch: {self.name}: unsupported attention mask type {type(mask).__name__}; call skipped."
            )
            return
        bias = kwargs.get("position_bias")
        if isinstance(bias, torch.Tensor):
            bias = self.keep(bias, head_dim=1)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor):
            position_ids = self.keep(position_ids)
        else:
            position_ids = None
        scaling = kwargs.get("scaling")
        if scaling is not None and not isinstance(scaling, torch.Tensor):
            scaling = float(scaling)  # a tensor stays one: float() would sync
        self.record(
            q=q,
            k=k,
            mask=mask,
            bias=bias,
            position_ids=position_ids,
            scaling=scaling,
            window=None if window is None else int(window),
            softcap=kwargs.get("softcap"),
            groups=groups,
            value_dim=int(value.shape[-1]) if isinstance(value, torch.Tensor) else 1,
        )

    # -- operator ------------------------------------------------------------------------
    def tss(self) -> Optional[int]:
        if self._window_seen is not _UNSEEN:
            return self._window_seen
        return getattr(self.module, "sliding_window", None)

    def build(self, record: Dict[str, Any]) -> Operator:
        q, k = record["q"], record["k"]
        B, H, L, _ = q.shape
        groups = record["groups"]
        if groups > 1 or k.shape[1] != H:
            idx = torch.arange(H, device=k.device) // groups
            k = k.index_select(1, idx)
        mask = as_mask(record["mask"], q, L, self.name)
        if record["bias"] is not None:
            bias = record["bias"]
            mask = (
                bias
                if mask is None
                else (torch.where(mask, bias, float("-inf")) if mask.dtype == torch.bool else mask + bias)
            )
        self._check_mask(mask, record["position_ids"])
        scale = record["scaling"]
        if record["softcap"]:
            t = softcapped_probs(q, k, scale, float(record["softcap"]), record["window"], mask)
            return Dense(t, state_size=record["window"], value_dim=record["value_dim"])
        return SoftmaxAttention(q, k, scale=scale, window=record["window"], mask=mask, value_dim=record["value_dim"])

    def valid_rows(self, record: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Rows whose mask lets some position attend causally (a row that is all padding has a zero operator)."""
        q = record["q"]
        mask = as_mask(record["mask"], q, q.shape[-2], self.name)
        if mask is None:
            return None
        valid = torch.tril(_allowed(mask)).flatten(1).any(-1)
        return valid.expand(q.shape[0]) if valid.numel() == 1 else valid

    def _check_mask(self, mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor]) -> None:
        """Warnings about what the operator means (host syncs are fine here, off the hot path)."""
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] > 1:
            if bool((position_ids[:, 1:] - position_ids[:, :-1] != 1).any()):
                self._warn(
                    "positions",
                    f"esswatch: {self.name}: position_ids restart inside a row (packed sequences?) but the kernel got "
                    "no mask: the operator is causal over the whole row."
                    if mask is None
                    else f"esswatch: {self.name}: position_ids restart inside a row (packed sequences?): the operator "
                    "follows the kernel's mask, which separates the documents only if it blocks attention across them.",
                )
        if mask is None:
            return
        L = mask.shape[-1]
        ok = _allowed(mask)
        r = torch.arange(L, device=mask.device)
        if bool((ok & (r[None, :] > r[:, None])).any()):
            self._warn(
                "future",
                f"esswatch: {self.name}: the attention mask lets positions attend to later "
                "positions (bidirectional or prefix attention); the operator keeps only the causal part "
                "T[r, c], c <= r.",
            )
        causal_ok = ok & (r[None, :] <= r[:, None])
        if not bool(causal_ok.any(dim=-2).all()):
            self._warn("padding", f"esswatch: {self.name}: {PADDING_WARNING}")


class BypassingAttentionProbe(UnsupportedProbe):
    """Stands for a transformers attention module whose ``forward`` never calls the registry.

    Such a module (e.g. Bloom and GPT-Neo; GPT-J and Falcon up to transformers 5.23) computes attention
    with its own code, so esswatch cannot see its query and key without reimplementing it.
    Not capturable: the capture names it (an error when nothing else can be captured,
    otherwise one warning), see :mod:`esswatch.probes.unsupported`.
    """

    layer_type = "Hugging Face attention that bypasses the attention-function registry (not capturable)"
    reason = (
        "its forward mixes the sequence without transformers' attention-function registry "
        "(ALL_ATTENTION_FUNCTIONS / AttentionInterface): its own attention code, or a recurrence or linear "
        "attention (RWKV, lightning attention), so esswatch never sees its query and key"
    )


class BidirectionalAttentionProbe(UnsupportedProbe):
    """Stands for a statically bidirectional attention module (``is_causal = False``: BERT, ViT, encoders)."""

    layer_type = "bidirectional Hugging Face attention (not capturable)"
    reason = (
        "bidirectional attention (is_causal = False): every position attends to later ones, so it is not a "
        "causal operator and has no effective state size"
    )


class CrossAttentionProbe(UnsupportedProbe):
    """Stands for a cross-attention module (``is_cross_attention = True``)."""

    layer_type = "Hugging Face cross-attention (not capturable)"
    reason = (
        "cross-attention (is_cross_attention = True): its keys come from another sequence, so it has no "
        "causal sequence operator"
    )
