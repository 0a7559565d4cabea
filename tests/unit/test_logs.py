"""Secrets masked in every form they can take in a line; long text cut, and marked."""

from __future__ import annotations

from job.cli import TERMINATION_LIMIT, termination_message
from job.logs import FIELD_LIMIT, Redactor


def test_a_secret_is_masked_as_typed_url_encoded_and_in_repr_form() -> None:
    """SQLAlchemy's debug lines show bound parameters in repr form: that form is masked too."""
    redactor = Redactor(["it's\\a%secret"])
    line = f"{'it' + chr(39) + 's'}\\a%secret | it%27s%5Ca%25secret | {repr(chr(39) + 'x')} {repr(chr(92))} " \
           f"params: {repr(('it' + chr(39) + 's' + chr(92) + 'a%secret',))}"

    masked = redactor({}, "", {"event": line})["event"]

    assert "secret" not in masked and masked.count("***") == 3


def test_a_long_field_is_cut_and_says_so() -> None:
    """A 4.5-million-character error becomes a bounded field that says how much was cut."""
    masked = Redactor()({}, "", {"error": "x" * 4_500_000})["error"]

    assert len(masked) < FIELD_LIMIT + 100 and masked.endswith("[cut: 4492000 more characters]")


def test_the_termination_message_fits_kubernetes_limit_on_a_character_boundary() -> None:
    """Multi-byte text is cut to at most 4096 bytes of valid UTF-8, marked as cut."""
    message = termination_message("é" * 5000)

    assert len(message) <= TERMINATION_LIMIT and message.decode().endswith(" [cut]\n")


def test_a_short_termination_message_is_kept_whole() -> None:
    assert b"migrated (exit 0)\n" == termination_message("migrated (exit 0)")


def test_an_error_from_the_tools_is_its_first_error_with_its_detail() -> None:
    """psql/pg_restore output: the first ERROR and its DETAIL, not the `Command was:` line at the end."""
    from job.archive import first_error

    stderr = ("psql:<stdin>:41: ERROR:  cannot drop table users because other objects depend on it\n"
              "DETAIL:  constraint profiles_user_id_fkey on table profiles depends on table users\n"
              "HINT:  Use DROP ... CASCADE to drop the dependent objects too.\n"
              "psql:<stdin>:42: ERROR:  current transaction is aborted\n"
              "Command was: ALTER TABLE ONLY public.profiles DROP CONSTRAINT profiles_user_id_fkey;\n")

    assert ("psql:<stdin>:41: ERROR:  cannot drop table users because other objects depend on it "
            "DETAIL:  constraint profiles_user_id_fkey on table profiles depends on table users "
            "HINT:  Use DROP ... CASCADE to drop the dependent objects too.") == first_error(stderr)
