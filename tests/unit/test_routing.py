"""PendingRequests: which client owns the answer to a request."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from nbcluster.gateway import PendingRequest, PendingRequests


class Owner:
    """Owners are compared by identity, as websocket clients are."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Owner({self.name})"

    def __eq__(self, other: object) -> bool:  # equal names must still be different owners
        return isinstance(other, Owner) and other.name == self.name

    __hash__ = object.__hash__


def test_reply_goes_to_the_owner_and_ends_the_entry() -> None:
    table: PendingRequests[Owner] = PendingRequests()
    alice, bob = Owner("a"), Owner("b")
    table.add("m1", "execute_request", "shell", b'{"msg_id":"m1"}', alice)
    table.add("m2", "kernel_info_request", "shell", b'{"msg_id":"m2"}', bob)
    assert len(table) == 2

    pending = table.route("m1", "execute_reply")
    assert pending == PendingRequest("m1", "execute_request", "shell", b'{"msg_id":"m1"}', alice)
    assert pending is not None and pending.owner is alice
    assert len(table) == 1
    assert table.route("m1", "execute_reply") is None  # already answered

    pending = table.route("m2", "kernel_info_reply")
    assert pending is not None and pending.owner is bob
    assert len(table) == 0


def test_non_reply_messages_are_routed_without_ending_the_entry() -> None:
    table: PendingRequests[Owner] = PendingRequests()
    alice = Owner("a")
    table.add("m1", "execute_request", "shell", b"{}", alice)
    for msg_type in ("input_request", "comm_msg", "stream", "input_request"):
        pending = table.route("m1", msg_type)
        assert pending is not None and pending.owner is alice
        assert len(table) == 1
    pending = table.route("m1", "execute_reply")
    assert pending is not None and pending.owner is alice
    assert len(table) == 0


def test_unknown_or_missing_parent() -> None:
    table: PendingRequests[Owner] = PendingRequests()
    table.add("m1", "execute_request", "shell", b"{}", Owner("a"))
    assert table.route(None, "execute_reply") is None
    assert table.route("nope", "execute_reply") is None
    assert table.route("nope", "input_request") is None
    assert len(table) == 1


def test_drop_owner_forgets_only_that_owners_requests() -> None:
    table: PendingRequests[Owner] = PendingRequests()
    alice, bob, alice_twin = Owner("a"), Owner("b"), Owner("a")
    table.add("a1", "execute_request", "shell", b"{}", alice)
    table.add("b1", "execute_request", "shell", b"{}", bob)
    table.add("a2", "complete_request", "shell", b"{}", alice)
    table.add("t1", "execute_request", "shell", b"{}", alice_twin)

    gone = table.drop_owner(alice)
    assert [p.msg_id for p in gone] == ["a1", "a2"]
    assert len(table) == 2
    assert table.route("a1", "execute_reply") is None
    assert table.route("a2", "complete_reply") is None
    # an equal-but-distinct owner keeps its requests
    pending = table.route("t1", "execute_reply")
    assert pending is not None and pending.owner is alice_twin
    assert table.drop_owner(alice) == []
    pending = table.route("b1", "execute_reply")
    assert pending is not None and pending.owner is bob


def test_take_all_empties_the_table_oldest_first() -> None:
    table: PendingRequests[Owner] = PendingRequests()
    owner = Owner("a")
    for i in range(5):
        table.add(f"m{i}", "execute_request", "shell", b"{}", owner)
    taken = table.take_all()
    assert [p.msg_id for p in taken] == [f"m{i}" for i in range(5)]
    assert len(table) == 0
    assert table.take_all() == []
    assert table.route("m0", "execute_reply") is None


def test_bounded_size_evicts_the_oldest() -> None:
    table: PendingRequests[Owner] = PendingRequests(limit=3)
    owner = Owner("a")
    for i in range(5):
        table.add(f"m{i}", "execute_request", "shell", b"{}", owner)
    assert len(table) == 3
    assert table.route("m0", "execute_reply") is None
    assert table.route("m1", "execute_reply") is None
    assert [p.msg_id for p in table.take_all()] == ["m2", "m3", "m4"]


def test_default_limit_is_bounded() -> None:
    table: PendingRequests[Owner] = PendingRequests()
    owner = Owner("a")
    for i in range(10_050):
        table.add(str(i), "execute_request", "shell", b"{}", owner)
    assert len(table) == 10_000
    assert table.route("49", "execute_reply") is None
    assert table.route("50", "execute_reply") is not None


def test_re_adding_an_id_replaces_its_owner() -> None:
    table: PendingRequests[Owner] = PendingRequests()
    first, second = Owner("1"), Owner("2")
    table.add("m", "execute_request", "shell", b"{}", first)
    table.add("m", "execute_request", "shell", b"{}", second)
    assert len(table) == 1
    pending = table.route("m", "execute_reply")
    assert pending is not None and pending.owner is second


class PendingRequestsMachine(RuleBasedStateMachine):
    """After any sequence of operations the table agrees with a simple model, and never holds
    a request of an owner that was dropped."""

    LIMIT = 6

    owners = Bundle("owners")

    def __init__(self) -> None:
        super().__init__()
        self.table: PendingRequests[Owner] = PendingRequests(limit=self.LIMIT)
        self.model: dict[str, Owner] = {}  # insertion-ordered, like the table
        self.dropped: list[Owner] = []
        self.next_owner = 0

    @rule(target=owners)
    def new_owner(self) -> Owner:
        self.next_owner += 1
        return Owner(str(self.next_owner % 3))  # equal names on purpose

    @rule(owner=owners, msg_id=st.sampled_from([f"m{i}" for i in range(10)]))
    def add(self, owner: Owner, msg_id: str) -> None:
        self.table.add(msg_id, "execute_request", "shell", b"{}", owner)
        self.model[msg_id] = owner  # a re-used id keeps its place (dicts work that way)
        while len(self.model) > self.LIMIT:
            del self.model[next(iter(self.model))]

    @rule(
        msg_id=st.sampled_from([f"m{i}" for i in range(10)] + [None]),
        msg_type=st.sampled_from(["execute_reply", "input_request", "stream", "kernel_info_reply"]),
    )
    def route(self, msg_id: str | None, msg_type: str) -> None:
        pending = self.table.route(msg_id, msg_type)
        expected = self.model.get(msg_id) if msg_id is not None else None
        if expected is None:
            assert pending is None
            return
        assert pending is not None and pending.owner is expected
        if msg_type.endswith("_reply"):
            del self.model[msg_id]  # type: ignore[arg-type]

    @rule(owner=consumes(owners))
    def drop(self, owner: Owner) -> None:
        gone = self.table.drop_owner(owner)
        expected = [m for m, o in self.model.items() if o is owner]
        assert [p.msg_id for p in gone] == expected
        for msg_id in expected:
            del self.model[msg_id]
        self.dropped.append(owner)

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def take_all(self) -> None:
        taken = self.table.take_all()
        assert [(p.msg_id, p.owner) for p in taken] == list(self.model.items())
        self.model.clear()

    @invariant()
    def no_dropped_owner_remains(self) -> None:
        remaining = self.table.take_all()
        for pending in remaining:
            assert not any(pending.owner is d for d in self.dropped), pending
            self.table.add(
                pending.msg_id, pending.msg_type, pending.channel, pending.header, pending.owner
            )
        assert [p.msg_id for p in remaining] == list(self.model)
        assert len(self.table) == len(self.model) <= self.LIMIT


PendingRequestsMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
TestPendingRequests = PendingRequestsMachine.TestCase
