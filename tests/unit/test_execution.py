"""Executions: a kernel's terms, attempts and replies, as pure bookkeeping (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcluster.gateway._execution import Execution, Executions, requested_gpus

Book = Executions[str, str]


def book_with(*msg_ids: str) -> tuple[Book, list[Execution[str, str]]]:
    book: Book = Executions()
    cells = [book.submit(m, f"request {m}", "alice") for m in msg_ids]
    return book, cells


def test_cells_take_consecutive_terms_from_one_and_wait() -> None:
    book, (a, b, c) = book_with("m1", "m2", "m3")
    assert [(e.term, e.attempt) for e in (a, b, c)] == [(1, 1), (2, 1), (3, 1)]
    assert all(e.waiting for e in (a, b, c))
    assert book.next_term == 4 and book.last_replied_term == 0
    assert book.waiting_terms() == [1, 2, 3]
    assert len(book) == 3 and list(book) == [a, b, c]
    assert book.get("m2") is b and book.at(2) is b and book.waiting_at(2) is b
    assert book.get("nope") is None and book.at(9) is None


def test_a_dispatched_cell_no_longer_waits() -> None:
    book, (a, _) = book_with("m1", "m2")
    book.dispatched(a, "r1", (0, 2))
    assert (a.replica, a.devices, a.waiting) == ("r1", (0, 2), False)
    assert book.waiting_terms() == [2]
    assert book.waiting_at(1) is None and book.at(1) is a


def test_metadata_of_a_replicated_kernel_names_term_attempt_and_the_state_to_wait_for() -> None:
    book, (a, b) = book_with("m1", "m2")
    book.dispatched(a, "r1", None)
    book.replied(a, yielded=False)
    assert book.metadata(b, replicated=True, devices=None) == {
        "term": 2,
        "attempt": 1,
        "after_term": 1,
    }
    assert book.metadata(b, replicated=True, devices=()) == {
        "term": 2,
        "attempt": 1,
        "after_term": 1,
        "gpus": (),
    }


def test_metadata_of_one_replica_says_only_what_the_gate_bound() -> None:
    book, (a,) = book_with("m1")
    assert book.metadata(a, replicated=False, devices=None) == {}
    assert book.metadata(a, replicated=False, devices=(1,)) == {"gpus": (1,)}


def test_a_reply_closes_the_cell_and_advances_the_last_replied_term() -> None:
    book, (a, b) = book_with("m1", "m2")
    book.dispatched(b, "r1", None)
    assert book.replied(b, yielded=False) is False
    assert book.last_replied_term == 2
    assert book.get("m2") is None and book.at(2) is None and not book.is_open(b)
    # An older term's reply never moves it back.
    book.dispatched(a, "r1", None)
    book.replied(a, yielded=False)
    assert book.last_replied_term == 2
    assert len(book) == 0


def test_a_lost_replica_s_cells_wait_again_with_the_next_attempt() -> None:
    book, (a, b, _) = book_with("m1", "m2", "m3")
    book.dispatched(a, "r1", (3,))
    book.dispatched(b, "r2", None)
    rerun = book.rerun_from("r1", "host h1 was lost")
    assert rerun == [a]
    assert (a.term, a.attempt, a.replica, a.lost_reason) == (1, 2, None, "host h1 was lost")
    assert a.devices == (3,)  # kept: a kernel without a gate runs it again on the same GPUs
    assert book.waiting_terms() == [1, 3]
    assert (b.attempt, b.replica) == (1, "r2")
    assert book.rerun_from("r9", "nothing there") == []


def test_a_yield_to_a_rerun_attempt_means_the_cell_was_lost_and_does_not_count() -> None:
    book, (a,) = book_with("m1")
    book.dispatched(a, "r1", None)
    book.rerun_from("r1", "replica r1 exited")
    book.dispatched(a, "r2", None)
    assert book.replied(a, yielded=True) is True
    # No state is coming for term 1: the next cell must not wait for it.
    assert book.last_replied_term == 0
    assert len(book) == 0


def test_a_yield_to_a_first_attempt_is_an_ordinary_reply() -> None:
    book, (a,) = book_with("m1")
    book.dispatched(a, "r2", None)
    assert book.replied(a, yielded=True) is False
    assert book.last_replied_term == 1


def test_a_rerun_attempt_that_ran_counts_as_replied() -> None:
    book, (a,) = book_with("m1")
    book.dispatched(a, "r1", None)
    book.rerun_from("r1", "gone")
    book.dispatched(a, "r2", None)
    assert book.replied(a, yielded=False) is False
    assert book.last_replied_term == 1


def test_forgetting_a_cell_leaves_a_newer_cell_of_the_same_term_alone() -> None:
    book, (a,) = book_with("m1")
    book.forget(a)
    book.restart()
    (b,) = [book.submit("m2", "request m2", "bob")]
    assert b.term == 1
    book.forget(a)  # a stale handle
    assert book.at(1) is b and book.is_open(b)


def test_execution_count_follows_ints_only() -> None:
    book: Book = Executions()
    assert book.execution_count == 0
    book.counted(7)
    book.counted("8")
    book.counted(None)
    assert book.execution_count == 7


def test_restart_restore_and_reattach_set_the_terms() -> None:
    book, (a, _) = book_with("m1", "m2")
    book.dispatched(a, "r1", None)
    book.replied(a, yielded=False)
    book.restart()
    assert (book.next_term, book.last_replied_term) == (1, 0)
    # Restored from the store at term 5: the next cell is 6 and builds on 5.
    book.restored(5)
    assert (book.next_term, book.last_replied_term) == (6, 5)
    # Restored to an older term than cells already numbered: numbering never goes back.
    for m in ("x", "y", "z", "w"):
        book.submit(m, m, "alice")
    book.restored(3)
    assert (book.next_term, book.last_replied_term) == (10, 3)
    # A restarted gateway found a replica at term 12.
    book.continue_after(12)
    assert (book.next_term, book.last_replied_term) == (13, 12)
    book.continue_after(4)  # an older report changes nothing
    assert (book.next_term, book.last_replied_term) == (13, 12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["submit", "dispatch", "reply", "lose"]), st.integers(0, 5)),
        max_size=40,
    )
)
def test_terms_are_unique_and_the_last_replied_term_never_passes_the_last_one_given(
    steps: list[tuple[str, int]],
) -> None:
    book: Book = Executions()
    given_terms: list[int] = []
    for n, (op, k) in enumerate(steps):
        open_cells = list(book)
        if op == "submit":
            given_terms.append(book.submit(f"m{n}", "r", "o").term)
        elif op == "dispatch" and open_cells:
            cell = open_cells[k % len(open_cells)]
            if cell.waiting:
                book.dispatched(cell, f"r{k % 3}", None)
        elif op == "reply" and open_cells:
            cell = open_cells[k % len(open_cells)]
            if not cell.waiting:
                book.replied(cell, yielded=k % 2 == 0)
        elif op == "lose":
            book.rerun_from(f"r{k % 3}", "lost")
        # Invariants.
        assert len(set(given_terms)) == len(given_terms)
        assert book.last_replied_term <= (given_terms[-1] if given_terms else 0)
        assert book.next_term == len(given_terms) + 1
        assert sorted(book.waiting_terms()) == book.waiting_terms()
        assert {e.term for e in book} == {t for t in given_terms if book.at(t) is not None}


@pytest.mark.parametrize(
    ("code", "gpus"),
    [
        ("%%cpu\nprint(1)\n", 0),
        ("\n# setup\n%%cpu\nx = 1\n", 0),
        ("%%cpu", 0),
        ("print(1)\n%%cpu\n", None),
        ("%%cpus\n", None),
        ("%cpu\n", None),
        ("", None),
        (None, None),
    ],
)
def test_a_cpu_cell_asks_for_no_gpu(code: object, gpus: int | None) -> None:
    assert requested_gpus(code) == gpus
