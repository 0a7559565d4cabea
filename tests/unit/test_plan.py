"""What the database is at against what is known of the scripts without Alembic (job.plan)."""

from __future__ import annotations

from job.lineage import Revision
from job.plan import Plan, Step, known_at_target


def graph(*revisions: tuple[str, str | None]) -> dict[str, Revision]:
    return {r: Revision(r, (down,) if down else (), f"revision {r}") for r, down in revisions}


LINE = graph(("a", None), ("b", "a"), ("c", "b"))


def test_at_the_known_head_the_plan_is_empty() -> None:
    assert Plan(("b",), "head", ("b",)) == known_at_target(("b",), ("b",), "head")


def test_behind_or_unknown_asks_alembic() -> None:
    """Behind the head, an explicit target, several heads for `head`, or nothing known: None (ask Alembic)."""
    assert [None] * 4 == [
        known_at_target(("b",), ("a",), "head", lambda: LINE),
        known_at_target(("b",), ("b",), "a"),
        known_at_target(("b", "x"), ("b", "x"), "head"),
        known_at_target(None, ("b",), "head"),
    ]


def test_ahead_on_its_own_line_by_the_recorded_lineage() -> None:
    """Older code (head b) on a database newer code took to c: the plan says what it is ahead by."""
    assert Plan(("c",), "head", ("b",), ahead=(Step("c", "revision c"),)) == known_at_target(
        ("b",), ("c",), "head", lambda: LINE)


def test_ahead_is_not_settled_when_not_allowed_or_not_recorded() -> None:
    assert [None, None] == [known_at_target(("b",), ("c",), "head", lambda: LINE, allow_ahead=False),
                            known_at_target(("b",), ("c",), "head", lambda: None)]


def test_the_plan_as_json() -> None:
    plan = Plan(("a",), "head", ("b",), pending=(Step("b", "add b"),))

    assert {"current": ["a"], "target": "head", "heads": ["b"], "pending": [{"revision": "b", "description": "add b"}],
            "ahead": []} == plan.as_dict()
