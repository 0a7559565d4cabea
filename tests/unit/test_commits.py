"""Which ways of ending a revision's transaction a re-run can always complete, read from its source."""

from __future__ import annotations

import pytest

from job.commits import ending


def revision(body: str, function: str = "upgrade") -> str:
    return f'"""doc"""\nfrom alembic import op\nimport sqlalchemy as sa\n\n\ndef {function}():\n' + \
        "\n".join("    " + line for line in body.splitlines()) + "\n"


def test_a_revision_that_keeps_its_transaction_is_not_flagged() -> None:
    """Plain DDL: nothing to say."""
    assert ending(revision('op.add_column("t", sa.Column("c", sa.Text))'), "r1", "upgrade") is None


def test_an_orm_session_committing_on_the_connection_does_not_end_its_transaction() -> None:
    """Optuna's data migrations: `session = orm.Session(bind=op.get_bind())` ... `session.commit()`
    joins the connection's transaction and leaves it open: not a commit of the revision's."""
    body = ('bind = op.get_bind()\nsession = orm.Session(bind=bind)\nop.add_column("t", sa.Column("c", sa.Text))\n'
            'session.execute(sa.text("UPDATE t SET c = 1"))\nsession.commit()')
    assert ending(revision(body), "r1", "upgrade") is None


@pytest.mark.parametrize(("body", "idiom"), [
    ('op.get_bind().commit()\nop.create_table("t")\nop.add_column("t", sa.Column("c", sa.Text))', "commit()"),
    ('bind = op.get_bind()\nbind.commit()\nop.create_table("t")', "commit()"),
    ('"""why"""\nwith op.get_context().autocommit_block():\n    op.execute("CREATE INDEX CONCURRENTLY i ON t (c)")',
     "autocommit_block()"),
    ('op.execute("COMMIT")\nop.execute("CREATE INDEX CONCURRENTLY i ON t (c)")', 'execute("COMMIT")'),
    ('op.execute(sa.text("commit;"))\nop.create_index("i", "t", ["c"], postgresql_concurrently=True)', 'execute("COMMIT")'),
])
def test_safe_shapes_are_recognised_and_allowed(body: str, idiom: str) -> None:
    """Ending the transaction first, with one statement outside a transaction at most."""
    found = ending(revision(body), "r1", "upgrade")

    assert (idiom, None) == (found.idiom, found.problem)


@pytest.mark.parametrize(("body", "problem"), [
    ('op.create_table("t")\nop.get_bind().commit()', "changes the schema before"),
    ('with op.get_context().autocommit_block():\n    op.execute("A")\n    op.execute("B")', "more than one statement"),
    ('with op.get_context().autocommit_block():\n    op.execute("A")\nop.execute("B")', "more statements after"),
    ('op.execute("COMMIT")\nop.execute("A")\nop.execute("B")', "more than one statement"),
    ('op.get_bind().commit()\nop.execute("A")\nop.get_bind().commit()', "more than once"),
])
def test_shapes_a_rerun_could_not_complete_say_why(body: str, problem: str) -> None:
    """Work committed before the version row, or several statements each committed on its own."""
    found = ending(revision(body), "r1", "upgrade")

    assert problem in found.problem


def test_only_the_function_that_runs_is_read() -> None:
    """A downgrade that commits does not flag the upgrade."""
    source = revision('op.create_table("t")') + "\n\n" + revision('op.get_bind().commit()', "downgrade").split("\n\n\n", 1)[1]

    assert (None, "commit()") == (ending(source, "r1", "upgrade"), ending(source, "r1", "downgrade").idiom)
