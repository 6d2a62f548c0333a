"""The watch's state in the Trainer's checkpoints: written into ``TrainerState.stateful_callbacks`` (under
:data:`STATE_KEY`) where the Trainer is about to save one, read back when ``train(resume_from_checkpoint=...)``
restores that ``TrainerState``."""

from __future__ import annotations

import warnings
from typing import Any

from esswatch.watch import ESSWarning, ESSWatch

__all__ = ["STATE_KEY", "save_watch_state", "restore_watch_state"]

#: the key in ``stateful_callbacks``: not a class name, so that the Trainer's
#: ``restore_callback_states_from_checkpoint`` never replaces the callback by one rebuilt from it
STATE_KEY = "esswatch.ESSCallback"


def save_watch_state(watch: ESSWatch, state: Any, control: Any, always: bool = False) -> None:
    """Where the Trainer is about to save a checkpoint (``control.should_save``, set by its flow callback before
    ours runs; ``always``: after an evaluation under ``save_strategy="best"``, which decides the save after the
    callbacks), put the watch's state into the ``TrainerState`` it writes (``trainer_state.json``)."""
    if (always or control.should_save) and getattr(state, "stateful_callbacks", None) is not None:
        watch.flush()  # on every rank (reduce=True): the outstanding background sample is in the state
        state.stateful_callbacks[STATE_KEY] = watch.state_dict()


def restore_watch_state(watch: ESSWatch, state: Any) -> None:
    """On a resumed run (``state.global_step > 0``), continue the watch from the restored ``TrainerState``'s
    copy; a state that does not validate is an ``ESSWarning`` and the watch starts afresh (training goes on)."""
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_KEY)
    if saved is None or state.global_step <= 0:
        return
    try:
        watch.load_state_dict(saved)
    except ValueError as e:
        warnings.warn(f"ESSCallback: the checkpoint's watch state was not restored ({e})", ESSWarning, stacklevel=3)
