"""Where the database stands relative to older scripts, by the lineage: job.lineage.ahead_of and
the fast path's plan.known_at_target. Pure logic, no database."""

from __future__ import annotations

import pytest

from job.errors import RevisionError
from job.lineage import Revision, ahead_of, ancestry
from job.plan import known_at_target


def graph(*edges: str, breaking: dict[str, str] | None = None) -> dict[str, Revision]:
    """`"b<a"` is revision b on top of a; `"m<a,b"` a merge; `"a<"` a root."""
    found = {}
    for edge in edges:
        revision, _, down = edge.partition("<")
        found[revision] = Revision(revision, tuple(d for d in down.split(",") if d), f"revision {revision}",
                                   (breaking or {}).get(revision))
    return found


LINE = graph("1<", "2<1", "3<2", "4<3", "5<4", "6<5")


def ours(last: int) -> dict[str, Revision]:
    return {r: LINE[r] for r in map(str, range(1, last + 1))}


def ids(revisions: list[Revision]) -> list[str]:
    return [r.revision for r in revisions]


def test_ahead_on_its_own_line_lists_what_the_code_lacks_oldest_first() -> None:
    assert ids(ahead_of(("6",), ours(4), ("4",), LINE)) == ["5", "6"]


def test_an_explicit_target_behind_the_database_is_ahead_too() -> None:
    assert ids(ahead_of(("6",), ours(4), ("2",), LINE)) == ["5", "6"]


def test_a_merge_with_a_new_branch_is_ahead_and_the_branch_is_lacking() -> None:
    recorded = {**LINE, **graph("x1<", "m<4,x1")}
    assert ids(ahead_of(("m",), ours(4), ("4",), recorded)) == ["x1", "m"]


def test_a_dependency_counts_as_applied_before() -> None:
    recorded = {**LINE, **graph("d1<", "5d<4,d1")}  # depends_on is recorded among what must come first
    assert set(ids(ahead_of(("5d",), ours(4), ("4",), recorded))) == {"d1", "5d"}


def test_several_heads_each_descended_from() -> None:
    recorded = graph("1<", "a<1", "b<1", "a2<a")
    mine = {r: recorded[r] for r in ("1", "a", "b")}
    assert ids(ahead_of(("a2", "b"), mine, ("a", "b"), recorded)) == ["a2"]


def test_a_head_the_database_never_applied_is_a_diverged_line() -> None:
    recorded = graph("1<", "a<1", "b<1", "a2<a")
    mine = {r: recorded[r] for r in ("1", "a", "b")}
    with pytest.raises(RevisionError, match="does not descend from their targets 'a', 'b'"):
        ahead_of(("a2",), mine, ("a", "b"), recorded)


def test_a_diverged_line_names_where_the_lines_part() -> None:
    recorded = {**LINE, **graph("4x<3", "5x<4x")}
    with pytest.raises(RevisionError, match=r"revision '5x', on a line .* head '4' \(the lines part after '3'\)"):
        ahead_of(("5x",), ours(4), ("4",), recorded)


def test_no_lineage_says_so() -> None:
    with pytest.raises(RevisionError, match="no lineage is recorded in the database"):
        ahead_of(("6",), ours(4), ("4",), None)


def test_lineage_without_the_revision_says_so() -> None:
    with pytest.raises(RevisionError, match="the recorded lineage does not have it"):
        ahead_of(("7",), ours(4), ("4",), LINE)


def test_a_gap_in_the_lineage_is_incomplete_lineage() -> None:
    recorded = {r: v for r, v in LINE.items() if r != "5"}
    with pytest.raises(RevisionError, match="lineage is incomplete \\(revision '5' is not recorded\\)"):
        ahead_of(("6",), ours(4), ("4",), recorded)


def test_a_breaking_revision_in_between_is_named_with_its_reason() -> None:
    recorded = graph("1<", "2<1", "3<2", "4<3", "5<4", "6<5", breaking={"5": "drops users.nickname"})
    with pytest.raises(RevisionError, match=r"breaks the previous release's code: '5' \(drops users.nickname\)"):
        ahead_of(("6",), ours(4), ("4",), recorded)
    assert ids(ahead_of(("6",), ours(5), ("5",), recorded)) == ["6"]  # already past it: only 6 is between


def test_not_allowed_ahead_refuses_naming_what_is_lacking() -> None:
    with pytest.raises(RevisionError, match=r"they lack '5', '6'\), and MIGRATE_ALLOW_AHEAD=false"):
        ahead_of(("6",), ours(4), ("4",), LINE, allow=False)


def test_the_scripts_own_graph_wins_over_the_record() -> None:
    """A record that says 4 breaks does not matter to code that has 4 itself."""
    recorded = graph("1<", "2<1", "3<2", "4<3", "5<4", breaking={"4": "x"})
    assert ids(ahead_of(("5",), ours(4), ("4",), recorded)) == ["5"]


def test_ancestry_of_a_long_history_has_no_recursion_limit() -> None:
    long = graph("0<", *(f"{i}<{i - 1}" for i in range(1, 5000)))
    order = ancestry(("4999",), long)
    assert order[0] == "0" and order[-1] == "4999" and len(order) == 5000


def test_ancestry_places_each_revision_after_what_it_needs() -> None:
    recorded = graph("1<", "a<1", "b<a", "c<1", "m<b,c", "n<m,a")
    order = ancestry(("n",), recorded)
    for revision, node in recorded.items():
        assert all(order.index(down) < order.index(revision) for down in node.down)


# the fast path: heads known without Alembic, the rest from the lineage

def test_known_at_target_at_the_heads() -> None:
    assert known_at_target(("4",), ("4",), "head").ahead == ()


def test_known_at_target_ahead_by_the_lineage() -> None:
    found = known_at_target(("4",), ("6",), "head", lambda: LINE)
    assert found is not None and [s.revision for s in found.ahead] == ["5", "6"] and not found.pending


@pytest.mark.parametrize(("current", "recorded", "allow"), [
    (("3",), LINE, True),  # behind: work to do
    (("6",), None, True),  # no lineage: Alembic words the refusal
    (("5x",), {**LINE, **graph("4x<3", "5x<4x")}, True),  # diverged
    (("6",), graph("1<", "2<1", "3<2", "4<3", "5<4", "6<5", breaking={"6": "y"}), True),  # breaking
    (("6",), LINE, False),  # not allowed
    (("6",), {r: v for r, v in LINE.items() if r != "4"}, True),  # the heads themselves not recorded
])
def test_known_at_target_steps_aside_for_everything_else(current: tuple[str, ...], recorded: dict | None,
                                                         allow: bool) -> None:
    assert known_at_target(("4",), current, "head", lambda: recorded, allow) is None
