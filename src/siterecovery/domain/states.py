"""The protected item state machine (ASR's ``allowed_operations``).

An item moves between *stable* states (some operation may start; background replication may be
running, as in ``InitialReplication`` or ``Reprotecting``) and *in-progress* states (a job that
changes the item is running and nothing else may start). Every operation follows the same
path::

    stable state --begin(op)--> in-progress state --finish(op, succeeded)--> stable state

* :func:`allowed_operations` answers from one explicit table, :data:`ALLOWED`, plus one
  contextual rule: ``cancel-failover`` is allowed in ``FailedOver`` only when that failover was
  planned.
* :func:`begin` refuses an operation the state does not allow with
  :class:`~siterecovery.errors.OperationNotAllowed` naming the item, the state and the
  operations that are allowed; otherwise it returns the in-progress state (:data:`BEGIN`).
* :func:`finish` returns where the operation ends: :data:`SUCCEEDED` on success; on failure the
  state the operation started from (a failed test failover or failover returns to
  ``Protected``, a failed commit to ``FailedOver``, a failed disable to wherever it started).

Enable has its own path, because the item does not exist before it: the control plane creates
the item in ``Enabling`` (:data:`ENABLE_STATE`), then :func:`after_enable` gives
``InitialReplication`` (or ``Disabled`` when enabling failed and was rolled back), and
:func:`after_initial_replication` gives ``Protected``.

Direction: an item replicates ``forward`` (primary -> recovery) until a reprotect after a
committed failover makes it replicate ``reverse`` (recovery -> primary); failback is a failover
in the reverse direction, and reprotecting after it makes the item ``forward`` again
(:func:`direction_after`).

The terminal states ``Disabled`` and ``Migrated`` allow no operation: the item is no longer
protected and the control plane deletes or archives its record.

State values are the user-facing names ("Protected", "InitialReplication"); operation values are
the CLI's ("test-failover", "commit"). Both enums are ``StrEnum`` so they store and compare as
plain strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

from siterecovery.errors import InvalidInput, OperationNotAllowed


class ItemState(StrEnum):
    # Stable states.
    ENABLING = "Enabling"
    INITIAL_REPLICATION = "InitialReplication"
    PROTECTED = "Protected"
    RESYNCHRONIZING = "Resynchronizing"
    TEST_FAILOVER = "TestFailover"
    """A test machine exists and awaits cleanup; replication continues meanwhile."""
    FAILED_OVER = "FailedOver"
    """Failed over, not yet committed: the recovery point may still be changed."""
    FAILOVER_COMMITTED = "FailoverCommitted"
    REPROTECTING = "Reprotecting"
    """Replicating back in the other direction until the first point exists there."""
    # In-progress states: a job is running; no operation may start.
    STARTING_TEST_FAILOVER = "StartingTestFailover"
    CLEANING_UP_TEST_FAILOVER = "CleaningUpTestFailover"
    FAILING_OVER = "FailingOver"
    CHANGING_RECOVERY_POINT = "ChangingRecoveryPoint"
    CANCELLING_FAILOVER = "CancellingFailover"
    COMMITTING = "Committing"
    COMPLETING_MIGRATION = "CompletingMigration"
    DISABLING = "Disabling"
    # Terminal states.
    DISABLED = "Disabled"
    MIGRATED = "Migrated"


class Operation(StrEnum):
    DISABLE = "disable"
    TEST_FAILOVER = "test-failover"
    TEST_FAILOVER_CLEANUP = "test-failover-cleanup"
    PLANNED_FAILOVER = "planned-failover"
    UNPLANNED_FAILOVER = "unplanned-failover"
    CHANGE_RECOVERY_POINT = "change-recovery-point"
    CANCEL_FAILOVER = "cancel-failover"
    COMMIT = "commit"
    REPROTECT = "reprotect"
    COMPLETE_MIGRATION = "complete-migration"
    RESYNC = "resync"


class Direction(StrEnum):
    FORWARD = "forward"
    """Primary site -> recovery site."""
    REVERSE = "reverse"
    """Recovery site -> primary site, after a reprotect; failing over now is a failback."""

    def reversed(self) -> Direction:
        return Direction.REVERSE if self is Direction.FORWARD else Direction.FORWARD


S = ItemState
O = Operation  # noqa: E741 - a one-letter alias keeps the table below readable

#: What may start in each state. The one source of truth for ``allowed_operations``; the order
#: is the order shown to users. ``cancel-failover`` is further limited to planned failovers.
ALLOWED: Mapping[ItemState, tuple[Operation, ...]] = MappingProxyType(
    {
        S.ENABLING: (O.DISABLE,),
        S.INITIAL_REPLICATION: (O.DISABLE,),
        S.PROTECTED: (
            O.TEST_FAILOVER,
            O.PLANNED_FAILOVER,
            O.UNPLANNED_FAILOVER,
            O.COMPLETE_MIGRATION,
            O.RESYNC,
            O.DISABLE,
        ),
        S.RESYNCHRONIZING: (O.DISABLE,),
        S.TEST_FAILOVER: (O.TEST_FAILOVER_CLEANUP, O.DISABLE),
        S.FAILED_OVER: (O.CHANGE_RECOVERY_POINT, O.COMMIT, O.CANCEL_FAILOVER, O.DISABLE),
        # complete-migration after a committed failover stops replication and keeps the
        # failed-over machine (ASR's "Complete migration"); from Protected it does it all at once.
        S.FAILOVER_COMMITTED: (O.REPROTECT, O.COMPLETE_MIGRATION, O.DISABLE),
        S.REPROTECTING: (O.DISABLE,),
        S.STARTING_TEST_FAILOVER: (),
        S.CLEANING_UP_TEST_FAILOVER: (),
        S.FAILING_OVER: (),
        S.CHANGING_RECOVERY_POINT: (),
        S.CANCELLING_FAILOVER: (),
        S.COMMITTING: (),
        S.COMPLETING_MIGRATION: (),
        S.DISABLING: (),
        S.DISABLED: (),
        S.MIGRATED: (),
    }
)

#: The in-progress state entered when an operation starts.
BEGIN: Mapping[Operation, ItemState] = MappingProxyType(
    {
        O.DISABLE: S.DISABLING,
        O.TEST_FAILOVER: S.STARTING_TEST_FAILOVER,
        O.TEST_FAILOVER_CLEANUP: S.CLEANING_UP_TEST_FAILOVER,
        O.PLANNED_FAILOVER: S.FAILING_OVER,
        O.UNPLANNED_FAILOVER: S.FAILING_OVER,
        O.CHANGE_RECOVERY_POINT: S.CHANGING_RECOVERY_POINT,
        O.CANCEL_FAILOVER: S.CANCELLING_FAILOVER,
        O.COMMIT: S.COMMITTING,
        O.REPROTECT: S.REPROTECTING,
        O.COMPLETE_MIGRATION: S.COMPLETING_MIGRATION,
        O.RESYNC: S.RESYNCHRONIZING,
    }
)

#: Where an operation ends when it succeeds.
SUCCEEDED: Mapping[Operation, ItemState] = MappingProxyType(
    {
        O.DISABLE: S.DISABLED,
        O.TEST_FAILOVER: S.TEST_FAILOVER,
        O.TEST_FAILOVER_CLEANUP: S.PROTECTED,
        O.PLANNED_FAILOVER: S.FAILED_OVER,
        O.UNPLANNED_FAILOVER: S.FAILED_OVER,
        O.CHANGE_RECOVERY_POINT: S.FAILED_OVER,
        O.CANCEL_FAILOVER: S.PROTECTED,
        O.COMMIT: S.FAILOVER_COMMITTED,
        O.REPROTECT: S.PROTECTED,
        O.COMPLETE_MIGRATION: S.MIGRATED,
        O.RESYNC: S.PROTECTED,
    }
)

ENABLE_STATE = S.ENABLING
TERMINAL_STATES = frozenset({S.DISABLED, S.MIGRATED})
#: States in which a job that changes the item runs and no operation may start.
IN_PROGRESS_STATES = frozenset(
    state for state, ops in ALLOWED.items() if not ops and state not in TERMINAL_STATES
)
#: States in which some operation may start (background replication may be running).
STABLE_STATES = frozenset(set(ItemState) - IN_PROGRESS_STATES - TERMINAL_STATES)


def parse_state(value: ItemState | str) -> ItemState:
    """Return ``value`` as an :class:`ItemState`; InvalidInput listing the states otherwise."""
    try:
        return ItemState(value)
    except ValueError:
        names = ", ".join(s.value for s in ItemState)
        raise InvalidInput(f"unknown item state {value!r}: known states are {names}.") from None


def parse_operation(value: Operation | str) -> Operation:
    """Return ``value`` as an :class:`Operation`; InvalidInput listing the operations otherwise."""
    try:
        return Operation(value)
    except ValueError:
        names = ", ".join(o.value for o in Operation)
        raise InvalidInput(f"unknown operation {value!r}: known operations are {names}.") from None


def allowed_operations(state: ItemState | str, *, planned_failover: bool = False) -> tuple[Operation, ...]:
    """Operations that may start in ``state``, in display order.

    ``planned_failover`` says whether the failover that led to ``FailedOver`` was planned; only
    then may it be cancelled (an unplanned failover gives no clean source to go back to).
    """
    ops = ALLOWED[parse_state(state)]
    if not planned_failover:
        ops = tuple(op for op in ops if op is not O.CANCEL_FAILOVER)
    return ops


def is_in_progress(state: ItemState | str) -> bool:
    """True while a job that changes the item runs (no operation may start)."""
    return parse_state(state) in IN_PROGRESS_STATES


def _describe_allowed(state: ItemState, ops: tuple[Operation, ...]) -> str:
    if ops:
        return ", ".join(op.value for op in ops)
    if state in TERMINAL_STATES:
        return "none (the item is no longer protected; enable protection again to protect it)"
    return f"none while the {state.value} job runs (wait for it to finish, see the job list)"


def begin(
    state: ItemState | str,
    op: Operation | str,
    *,
    item: str,
    planned_failover: bool = False,
) -> ItemState:
    """Return the in-progress state that starting ``op`` on ``item`` in ``state`` enters.

    Raises :class:`~siterecovery.errors.OperationNotAllowed` (naming ``item``, ``state`` and the
    allowed operations) when ``state`` does not allow ``op``.
    """
    current = parse_state(state)
    operation = parse_operation(op)
    allowed = allowed_operations(current, planned_failover=planned_failover)
    if operation not in allowed:
        description = _describe_allowed(current, allowed)
        if operation is O.CANCEL_FAILOVER and current is S.FAILED_OVER:
            description += " (cancel-failover is only allowed after a planned failover)"
        raise OperationNotAllowed(
            operation=operation.value,
            item=item,
            state=current.value,
            allowed=description,
        )
    return BEGIN[operation]


def _origins(op: Operation) -> tuple[ItemState, ...]:
    return tuple(state for state, ops in ALLOWED.items() if op in ops)


def finish(
    state: ItemState | str,
    op: Operation | str,
    *,
    succeeded: bool,
    origin: ItemState | str | None = None,
) -> ItemState:
    """Return the state in which ``op`` ends.

    ``state`` is either the state ``op`` was begun from (what was passed to :func:`begin`) or the
    in-progress state :func:`begin` returned. On success the result is ``SUCCEEDED[op]``; on
    failure it is the state ``op`` was begun from. That origin is ``state`` itself in the first
    case; in the second it is ``origin`` when given, else the only state that allows ``op``.
    ``disable`` and ``complete-migration`` can start from several states, so a failure reported
    with their in-progress state needs ``origin``.

    Raises :class:`~siterecovery.errors.InvalidInput` when ``state`` is neither a state that
    allows ``op`` nor ``op``'s in-progress state, or when the origin cannot be told.
    """
    current = parse_state(state)
    operation = parse_operation(op)
    origins = _origins(operation)
    if current in origins:
        start = current
    elif current is BEGIN[operation]:
        if origin is not None:
            start = parse_state(origin)
            if start not in origins:
                raise InvalidInput(
                    f"{operation.value} cannot have started from {start.value}: it starts from "
                    f"{', '.join(s.value for s in origins)}."
                )
        elif len(origins) == 1 or succeeded:
            start = origins[0]
        else:
            raise InvalidInput(
                f"cannot tell where a failed {operation.value} returns to from {current.value}: "
                f"pass origin= (one of {', '.join(s.value for s in origins)})."
            )
    else:
        raise InvalidInput(
            f"{operation.value} cannot finish from state {current.value}: pass the state it was "
            f"begun from ({', '.join(s.value for s in origins)}) or {BEGIN[operation].value}."
        )
    return SUCCEEDED[operation] if succeeded else start


def after_enable(*, succeeded: bool) -> ItemState:
    """Where the enable job ends: ``InitialReplication``, or ``Disabled`` when it failed.

    A failed enable is rolled back by the control plane (nothing replicates yet), so the item
    ends as if never enabled; the user fixes the cause and enables again.
    """
    return S.INITIAL_REPLICATION if succeeded else S.DISABLED


def after_initial_replication() -> ItemState:
    """Where an item goes once its first recovery point is stored: ``Protected``.

    Initial replication does not fail as a whole: failed attempts are retried and show in the
    item's health (see :mod:`siterecovery.domain.health`).
    """
    return S.PROTECTED


def direction_after(direction: Direction | str, op: Operation | str, *, succeeded: bool) -> Direction:
    """The replication direction after ``op`` ends: a successful reprotect reverses it."""
    current = Direction(direction)
    if succeeded and parse_operation(op) is O.REPROTECT:
        return current.reversed()
    return current
