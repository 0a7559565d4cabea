"""The script heads without importing Alembic or a single revision file.

`migrate-job manifest` (run at image build time) stores the heads beside the scripts, with a
fingerprint of every file in the version locations: paths and contents, hashed. At start-up the
fingerprint is computed again (reading the files, not importing them) and the manifest is used
only if it matches, so a stale manifest can cost speed but never give a wrong answer. Anything
this module does not understand (a package resource location, pyproject-only configuration)
means "no manifest": the caller falls back to Alembic.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
from pathlib import Path

NAME = "migrate-job-heads.json"


def _locations(ini: Path) -> tuple[Path, list[Path], bool] | None:
    """script_location, the version locations and whether they are searched recursively, from alembic.ini."""
    parser = configparser.ConfigParser(defaults={"here": str(ini.parent.resolve())})
    try:
        if not parser.read(ini):
            return None
        section = dict(parser["alembic"])
    except (configparser.Error, KeyError):
        return None
    script_location = section.get("script_location")
    if not script_location or (":" in script_location and not Path(script_location).is_absolute()):
        return None  # a package:resource location
    script = (ini.parent / script_location).resolve() if not Path(script_location).is_absolute() else Path(script_location)
    raw = section.get("version_locations")
    if raw:
        separator = {"os": os.pathsep, "space": None, "newline": "\n", ":": ":", ";": ";", ",": ","}.get(
            section.get("path_separator", "space"), None
        )
        parts = [p.strip() for p in raw.split(separator) if p.strip()]
        if any(":" in p and not Path(p).is_absolute() for p in parts):
            return None
        versions = [(ini.parent / p).resolve() for p in parts]
    else:
        versions = [script / "versions"]
    recursive = section.get("recursive_version_locations", "false").lower() in ("true", "1", "yes")
    return script, versions, recursive


def fingerprint(ini: Path) -> tuple[Path, str] | None:
    """Where the manifest lives, and the hash of every file under the version locations."""
    found = _locations(ini)
    if found is None:
        return None
    script, versions, recursive = found
    digest = hashlib.sha256()
    for location in versions:
        digest.update(f"location {location}\n".encode())
        for relative, path in sorted(_files(str(location), "", recursive)):
            content = _read(path)
            digest.update(f"file {relative} {len(content)}\n".encode())
            digest.update(content)
    return script / NAME, digest.hexdigest()


def _files(directory: str, prefix: str, recursive: bool) -> list[tuple[str, str]]:
    """(relative name, path) of every file under `directory`; os.scandir, as this runs at every start-up."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if entry.is_file():
            found.append((prefix + entry.name, entry.path))
        elif recursive and entry.is_dir() and entry.name != "__pycache__":
            found.extend(_files(entry.path, f"{prefix}{entry.name}/", recursive))
    return found


def _read(path: str) -> bytes:
    """A file's bytes through bare file descriptors: a Python file object costs more than the read
    itself, and this runs for every revision file at every start-up."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def heads(ini: Path) -> tuple[str, ...] | None:
    """The heads recorded for these exact scripts, or None when there is no valid manifest."""
    found = fingerprint(ini)
    if found is None:
        return None
    path, current = found
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != current or not isinstance(manifest.get("heads"), list):
        return None
    return tuple(sorted(manifest["heads"]))


def write(ini: Path, script_heads: tuple[str, ...]) -> Path:
    """Record `script_heads` (from Alembic) for the scripts as they are now."""
    found = fingerprint(ini)
    if found is None:
        raise ValueError(f"{ini}: script location not understood; the manifest cannot be used for it")
    path, current = found
    path.write_text(json.dumps({"heads": sorted(script_heads), "fingerprint": current}, indent=2) + "\n")
    return path
