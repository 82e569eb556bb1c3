"""How trainings without sessions become notebook sessions (``_grouping``): the rule on
hand-made cases, and its invariants on random traces."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcluster.simulation import SessionGrouping, Training, group_trainings

MIN = 60.0


def t(job: str, submit_min: float, minutes: float, gpus: int = 1, model: str = "m") -> Training:
    return Training(job, submit_min * MIN, minutes * MIN, gpus, model)


def shape(
    grouping: SessionGrouping, *trainings: Training
) -> list[tuple[float, float, list[float]]]:
    """Each session as (opens, closes, its cells' submission times), in minutes."""
    return [
        (s.opens / MIN, s.closes / MIN, [c.submit / MIN for c in s.cells])
        for s in group_trainings(trainings, grouping)
    ]


def test_a_training_joins_an_idle_session_within_the_gap() -> None:
    rule = SessionGrouping(idle_gap=30 * MIN)
    # b starts 20 min after a ended: same session; c starts 31 min after b ended: a new one.
    assert shape(rule, t("a", 0, 10), t("b", 30, 10), t("c", 71, 5)) == [
        (0, 70, [0, 30]),
        (71, 106, [71]),
    ]


def test_a_running_session_takes_no_training_and_gpu_counts_never_mix() -> None:
    rule = SessionGrouping(idle_gap=30 * MIN)
    # b starts while a runs, d asks for 4 GPUs: each opens its own session. c joins the
    # session that finished most recently (b's, at 25; a's ended at 20).
    sessions = group_trainings(
        [t("a", 0, 20), t("b", 5, 20), t("c", 40, 5), t("d", 41, 5, gpus=4)], rule
    )
    assert [[c.submit / MIN for c in s.cells] for s in sessions] == [[0], [5, 40], [41]]
    assert [s.request.gpus for s in sessions] == [1, 1, 4]


def test_lead_tail_length_and_model_are_configurable() -> None:
    rule = SessionGrouping(idle_gap=60 * MIN, lead=5 * MIN, tail=0, max_length=45 * MIN)
    # c would join (idle 20 min) but the session opened 55 min before it: too old.
    assert shape(rule, t("a", 10, 10), t("b", 30, 10), t("c", 60, 10)) == [
        (5, 40, [10, 30]),
        (55, 70, [60]),
    ]
    by_model = SessionGrouping(idle_gap=60 * MIN, by_model=True)
    assert len(group_trainings([t("a", 0, 1, model="x"), t("b", 5, 1, model="y")], by_model)) == 2
    assert "and model" in by_model.describe()


def test_negative_knobs_are_refused() -> None:
    with pytest.raises(ValueError, match="idle_gap must not be negative"):
        SessionGrouping(idle_gap=-1)


trainings = st.lists(
    st.builds(
        Training,
        job_id=st.uuids().map(str),
        submit=st.integers(0, 5000).map(float),
        duration=st.integers(0, 600).map(float),
        gpus=st.sampled_from([1, 2, 8]),
        model=st.sampled_from(["a", "b"]),
    ),
    max_size=40,
    unique_by=lambda t: t.job_id,
)


@settings(max_examples=60, deadline=None)
@given(
    trainings=trainings,
    gap=st.integers(0, 900).map(float),
    tail=st.one_of(st.none(), st.integers(0, 900).map(float)),
    by_model=st.booleans(),
)
def test_every_training_lands_in_one_session_that_fits_the_rule(
    trainings: list[Training], gap: float, tail: float | None, by_model: bool
) -> None:
    rule = SessionGrouping(idle_gap=gap, tail=tail, by_model=by_model)
    sessions = group_trainings(trainings, rule)
    assert sum(len(s.cells) for s in sessions) == len(trainings)
    assert [s.opens for s in sessions] == sorted(s.opens for s in sessions)
    by_job = {(t.submit, t.duration, t.gpus) for t in trainings}
    for session in sessions:
        cells = session.cells
        assert {(c.submit, c.duration, c.gpus) for c in cells} <= by_job
        assert {c.gpus for c in cells} == {session.request.gpus}
        assert session.opens == cells[0].submit
        for before, after in itertools.pairwise(cells):
            idle = after.submit - (before.submit + before.duration)
            assert 0 <= idle <= gap  # one training at a time, never idle past the gap
        last = cells[-1]
        assert session.closes == last.submit + last.duration + rule.closing_tail
