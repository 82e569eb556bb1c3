"""The executor election as a pure state machine, fed committed records in every order."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcluster.kernel._election import Completed, Decided, ElectionLog, Failed, Ignored
from nbcluster.kernel._records import (
    Done,
    Proposal,
    RecordError,
    decode_record,
    encode_record,
)

REPLICAS = ("r1", "r2", "r3")


def lead(replica: str, term: int = 1, attempt: int = 1) -> Proposal:
    return Proposal("lead", term, attempt, replica, f"m{term}")


def yld(replica: str, term: int = 1, attempt: int = 1) -> Proposal:
    return Proposal("yield", term, attempt, replica, f"m{term}")


def test_first_committed_lead_wins_and_later_leads_are_ignored() -> None:
    log = ElectionLog(3)
    assert log.apply(yld("r2")) == []
    assert log.apply(lead("r1")) == [Decided(1, 1, "r1")]
    events = log.apply(lead("r3"))
    assert len(events) == 1 and isinstance(events[0], Ignored)
    assert log.winner(1) == "r1"


def test_all_yield_fails_the_attempt_and_a_later_attempt_reopens_the_term() -> None:
    log = ElectionLog(3)
    assert log.apply(yld("r1")) == []
    assert log.apply(yld("r2")) == []
    assert log.apply(yld("r3")) == [Failed(1, 1)]
    # a straggling lead of the failed attempt does not resurrect it... unless it is first
    assert log.apply(lead("r2", attempt=2)) == [Decided(1, 2, "r2")]
    assert isinstance(log.apply(yld("r1", attempt=1))[0], Ignored)


def test_stale_attempt_proposals_are_ignored() -> None:
    log = ElectionLog(3)
    log.apply(yld("r1", attempt=2))
    events = log.apply(lead("r3", attempt=1))
    assert isinstance(events[0], Ignored) and "stale attempt" in events[0].reason
    assert log.winner(1) is None


def test_done_from_the_winner_completes_and_from_others_is_ignored() -> None:
    log = ElectionLog(3)
    log.apply(lead("r1"))
    bogus = Done(1, "r2", "ok", 1)
    assert isinstance(log.apply(bogus)[0], Ignored)
    real = Done(1, "r1", "ok", 1, b"state")
    assert log.apply(real) == [Completed(real)]
    assert log.last_done_term == 1 and log.last_done_count == 1
    # proposals for a completed term are stale
    assert isinstance(log.apply(lead("r2"))[0], Ignored)


def test_snapshot_round_trip_preserves_decisions() -> None:
    log = ElectionLog(3)
    log.apply(lead("r2", term=1))
    log.apply(Done(1, "r2", "ok", 1))
    log.apply(lead("r3", term=2))
    log.apply(yld("r1", term=3))
    copy = ElectionLog.restore(log.snapshot())
    assert copy.snapshot() == log.snapshot()
    assert copy.winner(2) == "r3"
    assert copy.apply(yld("r2", term=3)) == log.apply(yld("r2", term=3))


# -- every order ------------------------------------------------------------------------------


def _decisions(records: list[Proposal | Done]) -> list[tuple[int, int, str | None]]:
    log = ElectionLog(3)
    out: list[tuple[int, int, str | None]] = []
    for record in records:
        for event in log.apply(record):
            if isinstance(event, Decided):
                out.append((event.term, event.attempt, event.winner))
            elif isinstance(event, Failed):
                out.append((event.term, event.attempt, None))
    return out


@pytest.mark.parametrize("target", REPLICAS)
def test_every_order_of_one_term_elects_the_only_leader(target: str) -> None:
    proposals = [lead(r) if r == target else yld(r) for r in REPLICAS]
    for order in itertools.permutations(proposals):
        assert _decisions(list(order)) == [(1, 1, target)]


proposal_strategy = st.builds(
    Proposal,
    kind=st.sampled_from(["lead", "yield"]),
    term=st.integers(1, 4),
    attempt=st.integers(1, 3),
    replica=st.sampled_from(REPLICAS),
    msg_id=st.just("m"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(proposal_strategy, max_size=25))
def test_replicas_applying_the_same_log_agree(records: list[Proposal]) -> None:
    """Whatever the committed order, every replica that applies it decides the same, each
    (term, attempt) is decided at most once, and a winner always proposed lead."""
    decisions = _decisions(records)
    assert decisions == _decisions(list(records))  # deterministic
    seen: set[tuple[int, int]] = set()
    decided_terms: dict[int, str] = {}
    for term, attempt, winner in decisions:
        assert (term, attempt) not in seen
        seen.add((term, attempt))
        if winner is not None:
            assert term not in decided_terms, "a term was decided twice"
            decided_terms[term] = winner
            assert any(
                r.kind == "lead" and r.term == term and r.attempt == attempt and r.replica == winner
                for r in records
            )


@settings(max_examples=200, deadline=None)
@given(
    st.permutations(
        [lead("r1", 1), yld("r2", 1), yld("r3", 1), lead("r2", 2), yld("r1", 2), yld("r3", 2)]
    )
)
def test_two_terms_in_any_interleaving_keep_their_leaders(order: list[Proposal]) -> None:
    decided = {t: w for t, _, w in _decisions(order)}
    assert decided == {1: "r1", 2: "r2"}


# -- record codec ----------------------------------------------------------------------------


@given(proposal_strategy)
def test_proposals_round_trip(record: Proposal) -> None:
    assert decode_record(encode_record(record)) == record


def test_done_round_trips_with_and_without_sync() -> None:
    for record in (Done(3, "r1", "ok", 7, b"\x00\x01"), Done(4, "r2", "error", 8, None)):
        assert decode_record(encode_record(record)) == record


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x93\x01\x02\x03", "must be a map"),
        (b"\x81\xa1k\xa4nope", "unknown record kind 'nope'"),
        (
            b"\x85\xa1k\xa4lead\xa4term\xa1x\xa7attempt\x01\xa7replica\xa2r1\xa3msg\xa1m",
            "'term' must be int",
        ),
        (b"\x85\xa1k\xa4lead\xa4term\x00\xa7attempt\x01\xa7replica\xa2r1\xa3msg\xa1m", ">= 1"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(raw: bytes, expected: str) -> None:
    with pytest.raises(RecordError, match=expected):
        decode_record(raw)


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_record_errors(raw: bytes) -> None:
    # Anything but a RecordError (a crash on garbage from a peer) fails the test.
    with contextlib.suppress(RecordError):
        decode_record(raw)
