"""Backups' names, sets, sidecars and retention (job.backup), on a directory store in a temporary
folder: no database, no pg_dump."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from job import backup
from job.directory import Directory

MOMENT = dt.datetime(2026, 11, 26, 9, 30, 1, 123456, tzinfo=dt.timezone.utc)


def test_a_name_sorts_by_time_and_says_set_and_migration() -> None:
    name = backup.file_name(MOMENT, "blog", "d90ad894", ["0005"], ["0006"])

    assert "20261126T093001.123456Z_blog_d90ad894_0005_to_0006.dump" == name
    assert backup.NAME.match(name)


def test_an_empty_revision_list_is_base_and_odd_characters_are_replaced() -> None:
    assert "20261126T093001.123456Z_my_db_s_base_to_a_b.dump" == backup.file_name(MOMENT, "my db", "s", [], ["a", "b"])


def test_a_set_is_one_database_on_one_server() -> None:
    assert backup.set_of("srv", "a") == backup.set_of("srv", "a") != backup.set_of("srv", "b")
    assert 8 == len(backup.set_of("srv", "a"))


def _backups(store: Directory, *migrations: tuple[str, str, bool]) -> list[str]:
    """Backups of set `s`, one per (from, to, succeeded), oldest first; their names."""
    names = []
    for sequence, (start, end, succeeded) in enumerate(migrations, 1):
        name = backup.file_name(MOMENT + dt.timedelta(seconds=sequence), "db", "s", [start], [end])
        (store.path / name).write_bytes(b"PGDMP")
        meta = {"database": "db", "from_revision": [start], "to_revision": [end], "created_at": MOMENT.isoformat(),
                "sha256": "x", "bytes": 5, "set": "s", "sequence": sequence, "succeeded": succeeded}
        (store.path / f"{name}.json").write_text(json.dumps(meta))
        names.append(name)
    return names


def _left(store: Directory) -> list[str]:
    return sorted(p.name for p in store.path.glob("*.dump"))


def test_prune_keeps_the_newest_of_each_migration_up_to_keep(tmp_path: Path) -> None:
    store = Directory(tmp_path)
    names = _backups(store, ("1", "2", True), ("2", "3", True), ("3", "4", True), ("4", "5", True))

    backup.prune(store, backup.listing(store, "db", "s"), keep=2)

    assert sorted(names[2:]) == _left(store)
    assert [] == [p.name for p in tmp_path.glob("*.json") if p.name[:-5] not in names[2:]]


def test_prune_keeps_the_way_back_from_a_migration_that_keeps_failing(tmp_path: Path) -> None:
    """Retries of a failing migration replace each other, and the first backup since the last
    success stays whatever keep says."""
    store = Directory(tmp_path)
    names = _backups(store, ("1", "2", True), ("2", "3", False), ("3", "4", False), ("3", "4", False))

    backup.prune(store, backup.listing(store, "db", "s"), keep=1)

    assert sorted([names[1], names[3]]) == _left(store)


def test_prune_touches_only_its_own_set(tmp_path: Path) -> None:
    store = Directory(tmp_path)
    ours = _backups(store, ("1", "2", True), ("2", "3", True))
    other = tmp_path / "20200101T000000.000000Z_other_t_1_to_2.dump"
    other.write_bytes(b"PGDMP")
    other.with_name(other.name + ".json").write_text(json.dumps(
        {"database": "other", "from_revision": ["1"], "to_revision": ["2"], "created_at": "2020-01-01T00:00:00+00:00",
         "sha256": "x", "set": "t"}))

    backup.prune(store, backup.listing(store, "db", "s"), keep=1)

    assert sorted([ours[1], other.name]) == _left(store)


def test_a_dead_runs_leftovers_of_this_set_go_and_nothing_else(tmp_path: Path) -> None:
    """A partial file and an archive without its sidecar of this set are removed; another set's,
    and the archive this run is writing, stay."""
    store = Directory(tmp_path)
    (kept,) = _backups(store, ("1", "2", True))
    partial = tmp_path / ".20261126T093001.000000Z_db_s_1_to_2.dump.partial"
    orphan = tmp_path / "20261126T093002.000000Z_db_s_1_to_2.dump"
    writing = tmp_path / "20261126T093003.000000Z_db_s_1_to_2.dump"
    theirs = tmp_path / "20261126T093004.000000Z_db_t_1_to_2.dump"
    for path in (partial, orphan, writing, theirs):
        path.write_bytes(b"PGDMP")

    backup.remove_leftovers(store, "s", writing.name)

    assert sorted([kept, writing.name, theirs.name]) == _left(store)
    assert not partial.exists()
