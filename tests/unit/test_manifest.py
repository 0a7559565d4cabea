"""The scripts' fingerprint covers every file Alembic would read, however alembic.ini lists them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from job import manifest
from job.alembic_files import AlembicFiles


def project(tmp_path: Path, options: str, locations: tuple[str, ...] = ("a", "b")) -> Path:
    """An alembic.ini with `options` under [alembic], env.py, and one revision file per location."""
    for name in locations:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / f"{name.replace('/', '_')}1.py").write_text(f"revision = '{name}1'\n")
    (tmp_path / "env.py").write_text("# env\n")
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s\n" + options)
    return ini


def fingerprint(ini: Path) -> str | None:
    found = manifest.scripts(AlembicFiles.find(ini))
    return found.fingerprint if found else None


@pytest.mark.parametrize("options", [
    "version_locations = %(here)s/a:%(here)s/b\npath_separator = os\n",
    "version_locations = %(here)s/a:%(here)s/b\nversion_path_separator = os\n",
    "version_locations = %(here)s/a, %(here)s/b\n",
    "version_locations = %(here)s/a %(here)s/b\npath_separator = space\n",
])
def test_a_change_in_any_version_location_changes_the_fingerprint(tmp_path: Path, options: str) -> None:
    """Every location is read, whichever separator (or Alembic's legacy rule) lists them."""
    ini = project(tmp_path, options)
    before = fingerprint(ini)

    (tmp_path / "b" / "b1.py").write_text("revision = 'b2'\n")

    assert before is not None and before != fingerprint(ini)


@pytest.mark.parametrize("changed", ["env.py", "alembic.ini"])
def test_env_py_and_the_config_file_are_part_of_the_fingerprint(tmp_path: Path, changed: str) -> None:
    """env.py decides the version table, the config the locations: a change in either is seen."""
    ini = project(tmp_path, "version_locations = %(here)s/a\n", ("a",))
    before = fingerprint(ini)

    with (tmp_path / changed).open("a") as f:
        f.write("\n# changed\n")

    assert before != fingerprint(ini)


def test_a_missing_version_location_means_nothing_is_known(tmp_path: Path) -> None:
    """A location that is not a directory gives no fingerprint (Alembic will say what is wrong)."""
    assert fingerprint(project(tmp_path, "version_locations = %(here)s/a %(here)s/gone\n", ("a",))) is None


def test_a_package_location_is_found_without_importing_the_package(tmp_path: Path) -> None:
    """`pkg:path` resolves through prepend_sys_path to the package's directory; its __init__ does not run."""
    (tmp_path / "pkg_never_imported").mkdir()
    (tmp_path / "pkg_never_imported" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    ini = project(tmp_path, "", ("pkg_never_imported/migrations/versions",))
    ini.write_text("[alembic]\nscript_location = pkg_never_imported:migrations\nprepend_sys_path = %(here)s\n")
    (tmp_path / "pkg_never_imported" / "migrations" / "env.py").write_text("# env\n")

    found = manifest.scripts(AlembicFiles.find(ini))

    assert found is not None and (tmp_path / "pkg_never_imported" / "migrations").resolve() == found.directory
    assert "pkg_never_imported" not in sys.modules
