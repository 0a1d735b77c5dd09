"""The bus's states and the errors that name them."""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where a bus is in its lifecycle.

    ``STOPPED -> STARTING -> STARTED -> STOPPING -> STOPPED``, and from any of them
    ``EXITING``, which is final.
    """

    STOPPED = "stopped"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    EXITING = "exiting"

    def __repr__(self) -> str:
        return f"State.{self.name}"


class StateError(RuntimeError):
    """A transition was asked of a bus whose state does not allow it.

    Attributes:
        action: what was asked (``"start"``, ``"graceful"``...).
        state: the state the bus was in.
    """

    def __init__(self, action: str, state: State) -> None:
        super().__init__(f"cannot {action} the bus: it is {state.name}")
        self.action = action
        self.state = state
