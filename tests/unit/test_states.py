"""The protected item state machine: the allowed-operations table, begin, finish, direction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from siterecovery.domain.states import (
    ALLOWED,
    BEGIN,
    ENABLE_STATE,
    IN_PROGRESS_STATES,
    STABLE_STATES,
    SUCCEEDED,
    TERMINAL_STATES,
    Direction,
    ItemState,
    Operation,
    after_enable,
    after_initial_replication,
    allowed_operations,
    begin,
    direction_after,
    finish,
    is_in_progress,
)
from siterecovery.errors import InvalidInput, OperationNotAllowed

S = ItemState
O = Operation  # noqa: E741


def test_values_are_user_facing_names() -> None:
    assert str(S.PROTECTED) == "Protected"
    assert str(S.INITIAL_REPLICATION) == "InitialReplication"
    assert str(S.FAILOVER_COMMITTED) == "FailoverCommitted"
    assert str(O.TEST_FAILOVER_CLEANUP) == "test-failover-cleanup"
    assert str(O.CHANGE_RECOVERY_POINT) == "change-recovery-point"
    assert {o.value for o in Operation} == {
        "disable",
        "test-failover",
        "test-failover-cleanup",
        "planned-failover",
        "unplanned-failover",
        "change-recovery-point",
        "cancel-failover",
        "commit",
        "reprotect",
        "complete-migration",
        "resync",
    }


def test_table_covers_every_state_and_operation() -> None:
    assert set(ALLOWED) == set(ItemState)
    assert set(BEGIN) == set(Operation) == set(SUCCEEDED)
    assert set(ItemState) == STABLE_STATES | IN_PROGRESS_STATES | TERMINAL_STATES
    assert not (STABLE_STATES & IN_PROGRESS_STATES)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (S.ENABLING, (O.DISABLE,)),
        (S.INITIAL_REPLICATION, (O.DISABLE,)),
        (
            S.PROTECTED,
            (
                O.TEST_FAILOVER,
                O.PLANNED_FAILOVER,
                O.UNPLANNED_FAILOVER,
                O.COMPLETE_MIGRATION,
                O.RESYNC,
                O.DISABLE,
            ),
        ),
        (S.TEST_FAILOVER, (O.TEST_FAILOVER_CLEANUP, O.DISABLE)),
        (S.FAILED_OVER, (O.CHANGE_RECOVERY_POINT, O.COMMIT, O.DISABLE)),
        (S.FAILOVER_COMMITTED, (O.REPROTECT, O.COMPLETE_MIGRATION, O.DISABLE)),
        (S.REPROTECTING, (O.DISABLE,)),
        (S.RESYNCHRONIZING, (O.DISABLE,)),
        (S.DISABLED, ()),
        (S.MIGRATED, ()),
    ],
)
def test_allowed_operations(state: ItemState, expected: tuple[Operation, ...]) -> None:
    assert allowed_operations(state) == expected


def test_cancel_failover_allowed_only_after_planned_failover() -> None:
    assert O.CANCEL_FAILOVER in allowed_operations(S.FAILED_OVER, planned_failover=True)
    assert O.CANCEL_FAILOVER not in allowed_operations(S.FAILED_OVER, planned_failover=False)
    assert begin(S.FAILED_OVER, O.CANCEL_FAILOVER, item="web01", planned_failover=True) == (
        S.CANCELLING_FAILOVER
    )
    with pytest.raises(OperationNotAllowed, match="only allowed after a planned failover"):
        begin(S.FAILED_OVER, O.CANCEL_FAILOVER, item="web01")


@pytest.mark.parametrize("state", sorted(IN_PROGRESS_STATES))
def test_in_progress_states_allow_nothing(state: ItemState) -> None:
    assert allowed_operations(state, planned_failover=True) == ()
    assert is_in_progress(state)
    with pytest.raises(OperationNotAllowed, match="wait for it to finish"):
        begin(state, O.DISABLE, item="web01")


def test_disable_allowed_from_every_stable_state() -> None:
    for state in STABLE_STATES:
        assert O.DISABLE in allowed_operations(state), state


def test_begin_refusal_names_item_state_and_allowed_operations() -> None:
    with pytest.raises(OperationNotAllowed) as info:
        begin(S.PROTECTED, O.COMMIT, item="web01")
    assert str(info.value) == (
        "commit is not allowed for 'web01' in state Protected; allowed operations: "
        "test-failover, planned-failover, unplanned-failover, complete-migration, resync, disable."
    )
    assert info.value.exit_code == 5
    assert info.value.http_status == 409


def test_begin_refusal_in_terminal_state_says_to_enable_again() -> None:
    with pytest.raises(OperationNotAllowed, match="enable protection again"):
        begin(S.DISABLED, O.DISABLE, item="web01")


def test_begin_accepts_strings() -> None:
    assert begin("Protected", "test-failover", item="web01") == S.STARTING_TEST_FAILOVER


def test_begin_unknown_operation_lists_known_ones() -> None:
    with pytest.raises(InvalidInput, match="unknown operation 'failback'.*test-failover"):
        begin(S.PROTECTED, "failback", item="web01")


def test_unknown_state_lists_known_ones() -> None:
    with pytest.raises(InvalidInput, match="unknown item state 'Sleeping'.*Protected"):
        allowed_operations("Sleeping")


def test_enable_path() -> None:
    assert ENABLE_STATE is S.ENABLING
    assert after_enable(succeeded=True) is S.INITIAL_REPLICATION
    assert after_enable(succeeded=False) is S.DISABLED
    assert after_initial_replication() is S.PROTECTED


def test_test_failover_then_cleanup() -> None:
    running = begin(S.PROTECTED, O.TEST_FAILOVER, item="web01")
    assert running is S.STARTING_TEST_FAILOVER
    assert finish(running, O.TEST_FAILOVER, succeeded=True) is S.TEST_FAILOVER
    cleaning = begin(S.TEST_FAILOVER, O.TEST_FAILOVER_CLEANUP, item="web01")
    assert cleaning is S.CLEANING_UP_TEST_FAILOVER
    assert finish(cleaning, O.TEST_FAILOVER_CLEANUP, succeeded=True) is S.PROTECTED


def test_failed_test_failover_returns_to_protected() -> None:
    assert finish(S.STARTING_TEST_FAILOVER, O.TEST_FAILOVER, succeeded=False) is S.PROTECTED
    assert finish(S.PROTECTED, O.TEST_FAILOVER, succeeded=False) is S.PROTECTED


def test_failed_cleanup_stays_in_test_failover() -> None:
    assert finish(S.CLEANING_UP_TEST_FAILOVER, O.TEST_FAILOVER_CLEANUP, succeeded=False) is (S.TEST_FAILOVER)


@pytest.mark.parametrize("op", [O.PLANNED_FAILOVER, O.UNPLANNED_FAILOVER])
def test_failover_commit_reprotect_round_trip(op: Operation) -> None:
    state = begin(S.PROTECTED, op, item="db01")
    assert state is S.FAILING_OVER
    state = finish(state, op, succeeded=True)
    assert state is S.FAILED_OVER
    state = finish(
        begin(state, O.CHANGE_RECOVERY_POINT, item="db01"), O.CHANGE_RECOVERY_POINT, succeeded=True
    )
    assert state is S.FAILED_OVER
    state = finish(begin(state, O.COMMIT, item="db01"), O.COMMIT, succeeded=True)
    assert state is S.FAILOVER_COMMITTED
    state = begin(state, O.REPROTECT, item="db01")
    assert state is S.REPROTECTING
    assert finish(state, O.REPROTECT, succeeded=True) is S.PROTECTED


def test_failed_failover_returns_to_protected() -> None:
    assert finish(S.FAILING_OVER, O.PLANNED_FAILOVER, succeeded=False) is S.PROTECTED
    assert finish(S.FAILING_OVER, O.UNPLANNED_FAILOVER, succeeded=False) is S.PROTECTED


def test_failed_change_point_and_commit_stay_failed_over() -> None:
    assert finish(S.CHANGING_RECOVERY_POINT, O.CHANGE_RECOVERY_POINT, succeeded=False) is (S.FAILED_OVER)
    assert finish(S.COMMITTING, O.COMMIT, succeeded=False) is S.FAILED_OVER


def test_cancel_failover_returns_to_protected() -> None:
    assert finish(S.CANCELLING_FAILOVER, O.CANCEL_FAILOVER, succeeded=True) is S.PROTECTED
    assert finish(S.CANCELLING_FAILOVER, O.CANCEL_FAILOVER, succeeded=False) is S.FAILED_OVER


def test_failed_reprotect_returns_to_failover_committed() -> None:
    assert finish(S.REPROTECTING, O.REPROTECT, succeeded=False) is S.FAILOVER_COMMITTED


def test_resync() -> None:
    assert begin(S.PROTECTED, O.RESYNC, item="web01") is S.RESYNCHRONIZING
    assert finish(S.RESYNCHRONIZING, O.RESYNC, succeeded=True) is S.PROTECTED
    assert finish(S.RESYNCHRONIZING, O.RESYNC, succeeded=False) is S.PROTECTED


def test_complete_migration() -> None:
    assert begin(S.PROTECTED, O.COMPLETE_MIGRATION, item="web01") is S.COMPLETING_MIGRATION
    assert finish(S.COMPLETING_MIGRATION, O.COMPLETE_MIGRATION, succeeded=True) is S.MIGRATED
    assert finish(S.FAILOVER_COMMITTED, O.COMPLETE_MIGRATION, succeeded=False) is (S.FAILOVER_COMMITTED)


@pytest.mark.parametrize("origin", sorted(STABLE_STATES))
def test_disable_succeeds_to_disabled_and_failure_stays(origin: ItemState) -> None:
    running = begin(origin, O.DISABLE, item="web01", planned_failover=True)
    assert running is S.DISABLING
    assert finish(running, O.DISABLE, succeeded=True) is S.DISABLED
    assert finish(running, O.DISABLE, succeeded=False, origin=origin) is origin
    assert finish(origin, O.DISABLE, succeeded=False) is origin


def test_failed_disable_from_in_progress_state_needs_origin() -> None:
    with pytest.raises(InvalidInput, match="pass origin="):
        finish(S.DISABLING, O.DISABLE, succeeded=False)


def test_finish_rejects_unrelated_state() -> None:
    with pytest.raises(InvalidInput, match="commit cannot finish from state Protected"):
        finish(S.PROTECTED, O.COMMIT, succeeded=True)
    with pytest.raises(InvalidInput, match="cannot have started from Protected"):
        finish(S.COMMITTING, O.COMMIT, succeeded=False, origin=S.PROTECTED)


def test_direction() -> None:
    assert str(Direction.FORWARD) == "forward"
    assert str(Direction.REVERSE) == "reverse"
    assert Direction.FORWARD.reversed() is Direction.REVERSE
    assert direction_after(Direction.FORWARD, O.REPROTECT, succeeded=True) is Direction.REVERSE
    assert direction_after("reverse", "reprotect", succeeded=True) is Direction.FORWARD
    assert direction_after(Direction.FORWARD, O.REPROTECT, succeeded=False) is Direction.FORWARD
    assert direction_after(Direction.FORWARD, O.COMMIT, succeeded=True) is Direction.FORWARD


@given(st.lists(st.tuples(st.sampled_from(list(Operation)), st.booleans()), max_size=40))
def test_random_walks_only_reach_stable_or_terminal_states(
    steps: list[tuple[Operation, bool]],
) -> None:
    """Whatever is tried, begin+finish never leave an item in an in-progress state."""
    state = after_initial_replication()
    planned = False
    for op, ok in steps:
        try:
            running = begin(state, op, item="x", planned_failover=planned)
        except OperationNotAllowed:
            continue
        state = finish(running, op, succeeded=ok, origin=state)
        if op in (O.PLANNED_FAILOVER, O.UNPLANNED_FAILOVER) and ok:
            planned = op is O.PLANNED_FAILOVER
        assert state in STABLE_STATES | TERMINAL_STATES
