"""The least a Python migration job can do, for `make bench` to set migrate-job against.

Connect with psycopg2 and try an advisory lock. The holder imports Alembic (as any Alembic-based
job must before it migrates), runs the migration (a sleep of SCENARIO_SLEEP seconds, like the
slow scenario's), releases the lock and NOTIFYs. The others lower their priority, wait for the
notification, read the version table once, and exit. No logging, no checks, no backup.

    DATABASE_URL=postgresql://... SCENARIO_SLEEP=2 python bench/floor.py
"""

import importlib
import os
import select

import psycopg2

KEY = 4242


def main() -> None:
    conn = psycopg2.connect(os.environ["DATABASE_URL"])
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT pg_try_advisory_lock(%s)", (KEY,))
    if cur.fetchone()[0]:
        for module in ("alembic.runtime.environment", "alembic.script"):
            importlib.import_module(module)
        cur.execute("SELECT pg_sleep(%s)", (float(os.environ.get("SCENARIO_SLEEP", "2")),))
        cur.execute("CREATE TABLE IF NOT EXISTS floor_version (version_num text)")
        cur.execute("SELECT pg_advisory_unlock(%s)", (KEY,))
        cur.execute("NOTIFY floor")
        return
    os.nice(19)
    cur.execute("LISTEN floor")
    while not select.select([conn], [], [], 0.1)[0]:
        cur.execute("SELECT pg_try_advisory_lock_shared(%s)", (KEY,))  # the holder may have gone
        if cur.fetchone()[0]:
            break
    cur.execute("SELECT to_regclass('floor_version')")


if __name__ == "__main__":
    main()
    os._exit(0)
