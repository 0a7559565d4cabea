"""`make chart`: render the chart with the real Helm v4 SDK, offline, to stdout.

    python deploy/helm/render.py [values.yaml ...]

With no values file it renders the defaults with database.existingSecret=blog-database.
"""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python
import yaml

CHART = Path(__file__).resolve().parent / "migrate-job"


def main(argv: list[str]) -> int:
    values: dict = {"database": {"existingSecret": "blog-database"}} if not argv else {}
    for path in argv:  # later files win, key by top-level key, as `helm -f a -f b` for flat overrides
        values.update(yaml.safe_load(Path(path).read_text()) or {})
    try:
        rendered = helm_python.Chart.load(CHART).render(values, name="blog", namespace="default", is_install=True)
    except helm_python.HelmError as e:
        print(f"render failed: {e}", file=sys.stderr)
        return 2
    for name, text in sorted(rendered.items()):
        if text.strip():
            sys.stdout.write(f"---\n# Source: {name}\n{text.strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
