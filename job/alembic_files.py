"""The Alembic project's configuration files, read without importing Alembic.

A project keeps its options in `alembic.ini` (`[alembic]`), in `pyproject.toml` (`[tool.alembic]`,
Alembic 1.16+, `alembic init -t pyproject`), or both: the pyproject template keeps the database URL
and logging in alembic.ini and everything else in pyproject.toml. ALEMBIC_CONFIG may name either
file; the other is looked for beside it, as the alembic CLI finds it in the project directory.
An option set in alembic.ini wins over pyproject.toml, as in Alembic's `Config.get_alembic_option`.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any, NamedTuple

from job.errors import ConfigError

INI, PYPROJECT = "alembic.ini", "pyproject.toml"


class AlembicFiles(NamedTuple):
    """alembic.ini and/or pyproject.toml of one project, with their options parsed, and how Alembic
    is invoked on it: the ini section (`alembic -n`) and the `-x` arguments env.py may read."""

    ini: Path | None
    toml: Path | None
    # alembic.ini, parsed; options are interpolated (`%(here)s`) only when asked for
    ini_parser: configparser.ConfigParser
    # pyproject.toml's [tool.alembic] and [tool.migrate-job] tables
    toml_alembic: dict[str, Any]
    toml_migrate_job: dict[str, Any]
    # the ini section Alembic reads (`alembic -n NAME`, MIGRATE_INI_SECTION)
    section: str = "alembic"
    # `alembic -x KEY=VALUE ...` (MIGRATE_X_ARGS): env.py reads them with context.get_x_argument()
    x_args: tuple[str, ...] = ()

    @classmethod
    def find(cls, given: Path, section: str = "alembic", x_args: tuple[str, ...] = ()) -> AlembicFiles:
        """The project that `given` (an alembic.ini, another .ini, or a pyproject.toml) belongs to."""
        if not given.is_file():
            raise ConfigError(
                f"Alembic config {str(given)!r} not found: run from your project directory "
                "or set ALEMBIC_CONFIG (or --config) to its alembic.ini or pyproject.toml"
            )
        if given.name == PYPROJECT:
            ini, toml = given.parent / INI, given
            ini = ini if ini.is_file() else None
        else:
            ini, toml = given, given.parent / PYPROJECT
            toml = toml if toml.is_file() else None
        parser = _read_ini(ini) if ini else configparser.ConfigParser()
        tool = _read_toml(toml, required=given == toml) if toml else {}
        files = cls(ini, toml, parser, tool.get("alembic", {}), tool.get("migrate-job", {}), section, tuple(x_args))
        if ini is not None and not parser.has_section(section) and not files.toml_alembic:
            named = "" if section == "alembic" else " (MIGRATE_INI_SECTION, -n)"
            raise ConfigError(f"{str(ini)!r} has no [{section}] section{named}: is ALEMBIC_CONFIG the right file?")
        if files.option("script_location") is None:
            where = " or ".join(repr(str(p)) for p in (ini, toml) if p)
            raise ConfigError(f"no script_location in {where}: is ALEMBIC_CONFIG the right file?")
        return files

    @property
    def paths(self) -> list[Path]:
        """The files themselves: what the heads manifest fingerprints besides the scripts."""
        return [p for p in (self.ini, self.toml) if p is not None]

    @property
    def main(self) -> Path:
        """The file ALEMBIC_CONFIG names in messages: alembic.ini when there is one."""
        return self.ini or self.toml  # type: ignore[return-value]

    def option(self, name: str) -> Any:
        """An Alembic option: alembic.ini's section ([alembic], or the one -n names) first, then
        pyproject.toml's [tool.alembic] (with `%(here)s` replaced), else None. From pyproject.toml a
        list stays a list."""
        value = self._ini(self.section, name)
        if value is not None:
            return value
        value = self.toml_alembic.get(name)
        here = str(self.toml.parent.resolve()) if self.toml else ""
        if isinstance(value, str):
            return value.replace("%(here)s", here)
        if isinstance(value, list):
            return [str(v).replace("%(here)s", here) for v in value]
        return value

    def base_dir(self, name: str) -> Path:
        """The directory relative paths of option `name` are resolved from (the file that set it;
        Alembic itself resolves them from the working directory, which is the project's in practice)."""
        if self.ini and self.ini_parser.has_option(self.section, name):
            return self.ini.parent
        return (self.toml or self.main).parent

    def section_option(self, section: str, name: str) -> str | None:
        """An option of another section of alembic.ini (a multidb project's `[engine1]`)."""
        return self._ini(section, name) if self.ini is not None else None

    def migrate_job_option(self, name: str) -> str | None:
        """Our own options: alembic.ini's [migrate_job], else pyproject.toml's [tool.migrate-job]."""
        value = self._ini("migrate_job", name, raw=True)
        if value is None:
            listed = self.toml_migrate_job.get(name.replace("_", "-"), self.toml_migrate_job.get(name))
            value = "\n".join(listed) if isinstance(listed, list) else listed
        return value

    def _ini(self, section: str, name: str, raw: bool = False) -> str | None:
        try:
            return self.ini_parser.get(section, name, raw=raw, fallback=None)
        except configparser.Error as e:
            raise ConfigError(f"{str(self.ini)!r}: [{section}] {name}: {' '.join(str(e).split())}") from None


def _read_ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(defaults={"here": str(path.parent.resolve())})
    try:
        parser.read(path)
        return parser
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not a valid alembic.ini: {' '.join(str(e).split())}") from None


def _read_toml(path: Path, required: bool) -> dict[str, Any]:
    """pyproject.toml's [tool] table; a broken file beside an alembic.ini is only a problem when named."""
    import tomllib

    try:
        with path.open("rb") as f:
            tool = tomllib.load(f).get("tool", {})
    except (OSError, ValueError) as e:
        if not required:
            return {}
        raise ConfigError(f"{str(path)!r} is not a valid pyproject.toml: {e}") from None
    return tool if isinstance(tool, dict) else {}
