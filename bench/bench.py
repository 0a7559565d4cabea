"""`make bench`: migrate-job against bare Alembic and bare pg_dump, side by side in one run.

Sets up its own databases on BENCH_DATABASE_URL's server (default: the machine's 127.0.0.1:5432),
runs each pair alternately on the same data, and prints medians and ratios against the targets.
It is a measurement, not a test: nothing here passes or fails on machine speed.

    BENCH_RUNS=21 BENCH_BACKUP_MB=120 BENCH_REHEARSAL_MB=1100 python bench/bench.py
    BENCH_ONLY=backup,rehearsal python bench/bench.py    # some rows only
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.events import wait_for_event  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".local" / "wheels"
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RUNS = int(os.environ.get("BENCH_RUNS", "15"))
FLEET_TENANTS = int(os.environ.get("BENCH_FLEET_TENANTS", "200"))
BACKUP_MB = int(os.environ.get("BENCH_BACKUP_MB", "1100"))
REHEARSAL_MB = int(os.environ.get("BENCH_REHEARSAL_MB", "1100"))
WATCHED_MB = int(os.environ.get("BENCH_WATCHED_MB", "400"))
WORK = Path(tempfile.mkdtemp(prefix="migrate-job-bench-"))
BIN = WORK / "venv" / "bin"  # the job as the image installs it (not the editable development install)


def image_venv() -> None:
    """Build the venv the Dockerfile's way (its two pip steps), from the local wheelhouse. Alembic
    comes with it, so the bare `alembic` baseline is the very same version."""
    subprocess.run([sys.executable, "-m", "venv", str(WORK / "venv")], check=True)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELS), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for step in (["install", "--requirement", "requirements.txt"], ["install", "--no-deps", "."]):
        subprocess.run([str(BIN / "pip"), *step], cwd=ROOT, env=env, check=True, capture_output=True)


def main() -> int:
    print(f"migrate-job benchmark: {RUNS} runs per side, {os.cpu_count()} cores, {sys.version.split()[0]}")
    image_venv()
    only = [name for name in os.environ.get("BENCH_ONLY", "").split(",") if name]
    rows = []
    for measure in (at_head, revisions_flat, long_history, replicas, handoff, backup, rehearsal, watched, drift_check,
                    fleet, fleet_schemas):
        if not only or measure.__name__ in only:
            measured = measure()
            rows.extend(measured if isinstance(measured, list) else [measured])
    print()
    print(f"{'work':58} {'measured':>28} {'target':>14}")
    for name, measured, target in rows:
        print(f"{name:58} {measured:>28} {target:>14}")
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


# --- helpers ---------------------------------------------------------------------------------

def admin(sql: str) -> None:
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def new_database() -> str:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return name


def url_of(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def env_for(name: str, ini: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "DATABASE_URL", "ALEMBIC_"))}
    backups = WORK / "backups"
    backups.mkdir(exist_ok=True)
    env.update(DATABASE_URL=url_of(name), ALEMBIC_CONFIG=str(ini), MIGRATE_BACKUP_DIR=str(backups),
               MIGRATE_LOG_FORMAT="json")
    env.update(extra)
    return env


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} exited {os.waitstatus_to_exitcode(status)}")
    return elapsed, usage.ru_maxrss


def settled_timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """`timed`, once the server has written out what the last run left dirty (a restore leaves over
    a gigabyte): without it, whichever side follows a restore pays for its checkpoint."""
    admin("CHECKPOINT")
    os.sync()
    return timed(argv, env, cwd)


def alternate(*sides: tuple[list[str], dict, Path]) -> list[list[tuple[float, int]]]:
    """Run the sides in turn RUNS times each (after one warm-up each); return each side's samples."""
    for side in sides:
        timed(*side)
    samples: list[list[tuple[float, int]]] = [[] for _ in sides]
    for _ in range(RUNS):
        for side, taken in zip(sides, samples):
            taken.append(timed(*side))
    return samples


def med(samples: list[tuple[float, int]], index: int = 0) -> float:
    return statistics.median(s[index] for s in samples)


def linear_project(count: int, url: str) -> Path:
    """An Alembic project of `count` trivial linear revisions; `url` for bare `alembic` runs."""
    project = WORK / f"linear{count}"
    (project / "versions").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "scenarios" / "slow" / "env.py", project / "env.py")
    (project / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s\nprepend_sys_path = " + str(ROOT) + "\npath_separator = os\n"
        + "sqlalchemy.url = " + url.replace("postgresql://", "postgresql+psycopg2://") + "\n"
    )
    previous = None
    for i in range(1, count + 1):
        rev = f"r{i:04d}"
        (project / "versions" / f"{rev}.py").write_text(
            f'"""step {i}"""\nfrom alembic import op\n\nrevision = "{rev}"\ndown_revision = {previous!r}\n'
            "branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n"
            f'    op.execute("SELECT {i}")\n\n\n'
            "def downgrade():\n    pass\n"
        )
        previous = rev
    return project / "alembic.ini"


def log_times(path: Path, event: str) -> list[dt.datetime]:
    times = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["event"] == event:
            times.append(dt.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")))
    return times




# --- rows ------------------------------------------------------------------------------------

def at_head() -> list[tuple[str, str, str]]:
    """migrate-job run at head vs alembic upgrade head at head: with the image's heads manifest, and
    with none (a project without the build step: from the second start on, the database's record)."""
    name = new_database()
    projects = {}
    for kind in ("manifest", "record"):
        ini = WORK / f"example-{kind}" / "alembic.ini"
        shutil.copytree(ROOT / "alembic", ini.parent / "alembic", ignore=shutil.ignore_patterns("migrate-job-heads.json"))
        shutil.copytree(ROOT / "app", ini.parent / "app")
        shutil.copy(ROOT / "alembic.ini", ini)
        env = env_for(name, ini)
        subprocess.run([BIN / "migrate-job", "run"], env=env, cwd=ini.parent, check=True, capture_output=True)
        if kind == "manifest":
            subprocess.run([BIN / "migrate-job", "manifest"], env=env, cwd=ini.parent, check=True, capture_output=True)
        projects[kind] = ([str(BIN / "migrate-job"), "run"], env, ini.parent)
    with_manifest, with_record, alembic = alternate(
        projects["manifest"], projects["record"],
        ([str(BIN / "alembic"), "upgrade", "head"], projects["manifest"][1], projects["manifest"][2]),
    )
    for label, samples in (("with manifest", with_manifest), ("no manifest", with_record), ("alembic", alembic)):
        print(f"at head, {label}: {med(samples)*1000:.0f} ms {med(samples, 1)/1024:.1f} MiB")
    admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    return [
        ("run at head vs alembic upgrade head, manifest (wall; RSS)",
         f"{med(with_manifest)/med(alembic):.2f}x; {med(with_manifest, 1)/med(alembic, 1):.2f}x", "<=0.25x; <=1x"),
        ("  the same without a manifest, second start on",
         f"{med(with_record)/med(alembic):.2f}x; {med(with_record, 1)/med(alembic, 1):.2f}x", "<=0.30x; <=0.70x"),
    ]


def revisions_flat() -> tuple[str, str, str]:
    """run at head with 500 revisions vs with 5."""
    setups = {}
    for count in (5, 500):
        name = new_database()
        ini = linear_project(count, url_of(name))
        env = env_for(name, ini, MIGRATE_BACKUP="off")
        subprocess.run([BIN / "migrate-job", "run"], env=env, cwd=ini.parent, check=True, capture_output=True)
        subprocess.run([BIN / "migrate-job", "manifest"], env=env, cwd=ini.parent, check=True, capture_output=True)
        setups[count] = ([str(BIN / "migrate-job"), "run"], env, ini.parent, name)
    five, many = alternate(setups[5][:3], setups[500][:3])
    alembic5, alembic500 = alternate(
        ([str(BIN / "alembic"), "upgrade", "head"], setups[5][1], setups[5][2]),
        ([str(BIN / "alembic"), "upgrade", "head"], setups[500][1], setups[500][2]),
    )
    print(f"revisions: migrate-job 5 → {med(five)*1000:.0f} ms, 500 → {med(many)*1000:.0f} ms; "
          f"alembic 5 → {med(alembic5)*1000:.0f} ms, 500 → {med(alembic500)*1000:.0f} ms")
    for count in (5, 500):
        admin(f'DROP DATABASE "{setups[count][3]}" WITH (FORCE)')
    return ("run at head, 500 revisions vs 5", f"{med(many)/med(five):.2f}x (alembic {med(alembic500)/med(alembic5):.2f}x)",
            "<=1.1x")


def long_history(count: int = 300, runs: int = 5) -> tuple[str, str, str]:
    """Empty → head on a `count`-revision history with merges, the stock `alembic init` env.py:
    migrate-job run (backup included) vs alembic upgrade head, each on a fresh database."""
    project = WORK / "long"
    project.mkdir()
    subprocess.run([str(BIN / "alembic"), "init", "-t", "generic", "migrations"], cwd=project, check=True,
                   capture_output=True)
    versions = project / "migrations" / "versions"
    previous: object = None
    for i in range(1, count + 1):
        rev = f"h{i:04d}"
        if i % 50 == 0:  # a branch of two revisions off the previous one, merged here
            side = f"s{i:04d}"
            (versions / f"{side}.py").write_text(_revision(side, previous, f"CREATE TABLE {side} (id int)"))
            previous = (previous, side)
        (versions / f"{rev}.py").write_text(_revision(rev, previous, f"CREATE TABLE {rev} (id int)"))
        previous = rev
    ini = project / "alembic.ini"
    job, bare = [], []
    for _ in range(runs):
        for side, samples in (("job", job), ("bare", bare)):
            name = new_database()
            env = env_for(name, ini)
            url = url_of(name).replace("postgresql://", "postgresql+psycopg2://")
            ini.write_text(re.sub(r"(?m)^sqlalchemy\.url = .*$", f"sqlalchemy.url = {url}", ini.read_text()))
            argv = [str(BIN / "migrate-job"), "run"] if side == "job" else [str(BIN / "alembic"), "upgrade", "head"]
            samples.append(timed(argv, env, project))
            admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    print(f"{count} revisions, empty to head: migrate-job {med(job):.2f} s, alembic {med(bare):.2f} s ({runs} runs each)")
    return (f"empty → head, {count} revisions with merges", f"{med(job)/med(bare):.2f}x", "<=1.3x")


def _revision(rev: str, down: object, sql: str) -> str:
    return (f'"""{rev}"""\nfrom alembic import op\n\nrevision = "{rev}"\ndown_revision = {down!r}\n'
            f"branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n    op.execute(\"{sql}\")\n\n\n"
            "def downgrade():\n    pass\n")


def replicas(rounds: int = 7) -> list[tuple[str, str, str]]:
    """16 replicas started at once on a 2 s migration: with the image's heads manifest, without it,
    and bench/floor.py (the least a Python job can do) in the same rounds, each on a fresh database."""
    project = WORK / "slow"
    shutil.copytree(ROOT / "tests" / "scenarios" / "slow", project, ignore=shutil.ignore_patterns("migrate-job-heads.json"))
    ini = project / "alembic.ini"  # its env.py imports tests.scenarios from the repository
    ini.write_text(ini.read_text().replace("%(here)s/../../..", str(ROOT)))
    kinds = ("with manifest", "no manifest", "floor")
    walls: dict[str, list[float]] = {kind: [] for kind in kinds}
    all_ok = True
    for round_ in range(rounds):
        for kind in kinds[round_ % 3:] + kinds[:round_ % 3]:  # each goes first in turn
            name = new_database()
            env = env_for(name, ini, SCENARIO_SLEEP="2", MIGRATE_BACKUP="off")
            argv = [str(BIN / "migrate-job"), "run"]
            if kind == "floor":
                argv = [str(BIN / "python"), str(ROOT / "bench" / "floor.py")]
            elif kind == "with manifest":
                subprocess.run([BIN / "migrate-job", "manifest"], env=env, cwd=ROOT, check=True, capture_output=True)
            else:
                (project / "migrate-job-heads.json").unlink(missing_ok=True)
            started = time.perf_counter()
            procs = [subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for _ in range(16)]
            codes = [p.wait() for p in procs]
            walls[kind].append(time.perf_counter() - started)
            if kind != "floor":
                conn = psycopg2.connect(url_of(name))
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM ran")
                    all_ok = all_ok and set(codes) == {0} and cur.fetchone()[0] == 1
                conn.close()
            admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    for kind in kinds:
        print(f"replicas ({kind}): walls {sorted(round(w, 2) for w in walls[kind])}")
    print(f"replicas: every job exited 0 and the migration ran once: {all_ok}")
    floor = statistics.median(walls["floor"])
    return [
        (f"16 replicas, 2 s migration, {kind}: start to last exit",
         f"{statistics.median(walls[kind]):.2f} s median, floor +{statistics.median(walls[kind]) - floor:.2f} s", "<=3 s")
        for kind in kinds[:2]
    ] + [("  floor (bench/floor.py: lock, import Alembic, sleep)", f"{floor:.2f} s median", ""),
         ("  every job exited 0, the migration ran once", str(all_ok), "")]


def handoff() -> tuple[str, str, str]:
    """Holder releases → next waiter holds it, from the two jobs' own log timestamps."""
    gaps = []
    for _ in range(max(5, RUNS // 2)):
        name = new_database()
        env = env_for(name, ROOT / "tests" / "scenarios" / "slow" / "alembic.ini", SCENARIO_SLEEP="0.5",
                      MIGRATE_BACKUP="off")
        first, second = WORK / f"{name}.a", WORK / f"{name}.b"
        a = subprocess.Popen([BIN / "migrate-job", "run"], env=env, cwd=ROOT, stdout=first.open("w"))
        wait_for_event(first, "lock.acquired", timeout=60, poll=0.005)
        b = subprocess.Popen([BIN / "migrate-job", "run"], env=env, cwd=ROOT, stdout=second.open("w"))
        wait_for_event(second, "lock.waiting", timeout=60, poll=0.005)
        a.wait(), b.wait()
        released = log_times(first, "lock.released")[0]
        acquired = log_times(second, "lock.acquired")[0]
        gaps.append((acquired - released).total_seconds())
        admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    print(f"hand-off gaps (ms): {sorted(round(g * 1000, 1) for g in gaps)}")
    return ("lock hand-off: release to next holder", f"{statistics.median(gaps)*1000:.1f} ms median", "<=250 ms")


def backup() -> list[tuple[str, str, str]]:
    """migrate-job backup to a directory and to a bucket (moto's server on loopback) vs bare
    pg_dump -Fc to a file and vs the read floor (pg_dump -Fc -Z0 into /dev/null), on application-like
    data of at least BACKUP_MB; the archives' sizes; migrate-job restore vs bare pg_restore of the
    pg_dump -Fc archive into an empty database; the job's peak memory."""
    from tests.s3server import Server

    name, size = realistic_database(BACKUP_MB)
    ini = ROOT / "alembic.ini"
    env = env_for(name, ini, MIGRATE_BACKUP_KEEP="1")
    # a database the job manages, as users back up: migrated once (so the job knows its version table)
    subprocess.run([BIN / "migrate-job", "run"], env={**env, "MIGRATE_BACKUP": "off"}, cwd=ROOT, check=True,
                   capture_output=True)
    server = Server()
    server.client().create_bucket(Bucket="bench")
    to_bucket = {**env, **server.env(), "MIGRATE_BACKUP_DIR": "s3://bench/backups"}
    dump = WORK / "bare.dump"
    bare_argv = ["pg_dump", "--format=custom", f"--dbname={url_of(name)}", "-f", str(dump)]
    floor_argv = ["pg_dump", "--format=custom", "--compress=0", f"--dbname={url_of(name)}"]  # (stdout: /dev/null)
    restored = f"{name}_restored"
    runs = max(3, RUNS // 5)
    job, bucket, bare, floor, restore, bare_restore = [], [], [], [], [], []
    try:
        for _ in range(runs):
            job.append(settled_timed([str(BIN / "migrate-job"), "backup"], env, ROOT))
            bucket.append(settled_timed([str(BIN / "migrate-job"), "backup"], to_bucket, ROOT))
            bare.append(settled_timed(bare_argv, env, ROOT))
            floor.append(settled_timed(floor_argv, env, ROOT))
            newest = max((WORK / "backups").glob("*.dump"), key=lambda path: path.stat().st_mtime)
            restore.append(settled_timed([str(BIN / "migrate-job"), "restore", newest.name, "--yes"], env, ROOT))
            admin(f'DROP DATABASE IF EXISTS "{restored}"')
            admin(f'CREATE DATABASE "{restored}" TEMPLATE template0')
            bare_restore.append(settled_timed(["pg_restore", f"--dbname={url_of(restored)}", str(dump)], env, ROOT))
        ours = newest.stat().st_size
    finally:
        server.stop()
        admin(f'DROP DATABASE IF EXISTS "{restored}"')
    admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    theirs = dump.stat().st_size
    peak = max(r for _, r in job + bucket + restore) / 1024
    print(f"backup of {size / 2**20:.0f} MiB: migrate-job to a directory {med(job):.2f} s, to a bucket "
          f"{med(bucket):.2f} s, pg_dump -Fc {med(bare):.2f} s, read floor {med(floor):.2f} s; archive "
          f"{ours / 2**20:.0f} MiB vs {theirs / 2**20:.0f} MiB; restore {med(restore):.2f} s vs pg_restore "
          f"{med(bare_restore):.2f} s; peak {peak:.1f} MiB ({runs} runs each)")
    return [
        (f"backup vs pg_dump -Fc ({size / 2**20:.0f} MiB of rows)", f"{med(job)/med(bare):.2f}x", "<=0.70x"),
        ("  vs the read floor (pg_dump -Fc -Z0 > /dev/null)", f"{med(job)/med(floor):.2f}x", "<=1.25x"),
        ("  to a bucket (S3 server on loopback) vs the floor", f"{med(bucket)/med(floor):.2f}x", "<=1.35x"),
        ("  archive size vs pg_dump -Fc's", f"{ours / theirs:.2f}x", "<=1.00x"),
        ("restore vs pg_restore of the pg_dump -Fc archive", f"{med(restore)/med(bare_restore):.2f}x", "<=0.80x"),
        ("  the job's peak memory (backups, restore)", f"{peak:.1f} MiB", "<150 MiB"),
    ]


def realistic_database(megabytes: int) -> tuple[str, int]:
    """A new database of at least `megabytes` whose rows compress like an application's (not
    pgbench's filler): orders with names, emails, a status, amounts, times, a free-text note and a
    JSON document, with a primary key and two indexes; its name and size in bytes."""
    words = ("alpha bravo charlie delivery express fragile gift handle invoice jacket kettle lamp monitor "
             "notebook orange parcel quick return shipped tracking urgent voucher warehouse yellow zipper "
             "customer asked about the second item please call before noon leave at the door").split()
    names = "Ada Alan Grace Edsger Barbara Donald Margaret Ken Dennis Frances Niklaus Radia Tim Linus Guido".split()
    return filled_database(
        ("SELECT setseed(0.26)", None),
        ("CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, email text NOT NULL, "
         "status text NOT NULL, amount numeric(12, 2) NOT NULL, created_at timestamptz NOT NULL, "
         "note text, details jsonb NOT NULL)", None),
        ("""INSERT INTO orders
           SELECT g, n || ' ' || n2, lower(n) || '.' || g %% 9973 || '@example.org',
                  (ARRAY['new', 'paid', 'shipped', 'delivered', 'returned'])[1 + g %% 5],
                  round((random() * 500)::numeric, 2), '2024-01-01'::timestamptz + g * interval '7 seconds',
                  (SELECT string_agg((%(words)s::text[])[1 + floor(random() * %(count)s)::int], ' ')
                     FROM generate_series(1, 4 + g %% 12) WHERE g > 0),
                  jsonb_build_object('sku', 'SKU-' || (g::bigint * 7919) %% 100000, 'qty', 1 + g %% 4,
                                     'gift', g %% 11 = 0, 'tags', jsonb_build_array((%(words)s::text[])[1 + g %% %(count)s]),
                                     'address', jsonb_build_object('city', n2 || 'ville', 'zip', lpad((g %% 99999)::text, 5, '0')))
             FROM generate_series(1, %(rows)s) g,
                  LATERAL (SELECT (%(names)s::text[])[1 + g %% %(name_count)s] AS n,
                                  (%(names)s::text[])[1 + (g / 7) %% %(name_count)s] AS n2) people""",
        {"words": words, "count": len(words), "names": names, "name_count": len(names),
         "rows": megabytes * 1024 * 1024 // 330}),
        ("CREATE INDEX orders_customer ON orders (customer)", None),
        ("CREATE INDEX orders_created_at ON orders (created_at)", None),
    )


def big_database(megabytes: int) -> tuple[str, int]:
    """A new database with one table `big` (a primary key, two text columns, a timestamp) of at
    least `megabytes`; its name and size in bytes."""
    return filled_database(
        ("CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS a, "
         "md5((g * 13)::text) AS b, now() AS t FROM generate_series(1, %s) g", (megabytes * 1024 * 1024 // 140,)),
        ("ALTER TABLE big ADD PRIMARY KEY (id)", None),
    )


def filled_database(*statements: tuple[str, Any]) -> tuple[str, int]:
    """A new database, `statements` (SQL, parameters) run in it, vacuumed: its name and size in bytes."""
    name = new_database()
    conn = psycopg2.connect(url_of(name))
    conn.autocommit = True
    with conn.cursor() as cur:
        for statement, parameters in statements:
            cur.execute(statement, parameters)
        cur.execute("VACUUM ANALYZE")
        cur.execute("SELECT pg_database_size(current_database())")
        size = cur.fetchone()[0]
    conn.close()
    return name, size


def rehearsal() -> list[tuple[str, str, str]]:
    """migrate-job rehearse on a database of REHEARSAL_MB (no backup at its revision: the copy is a
    streamed dump) vs the same by hand: createdb, pg_dump -Fc | pg_restore into it, alembic upgrade
    head, (for the round trip: alembic downgrade and upgrade again), dropdb. The pending revision
    builds an index on the big table and adds a column."""
    name, size = big_database(REHEARSAL_MB)
    project = WORK / "rehearsal"
    (project / "versions").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "scenarios" / "slow" / "env.py", project / "env.py")
    copy = f"{name}_by_hand"
    (project / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s\nprepend_sys_path = " + str(ROOT) + "\npath_separator = os\n"
        "sqlalchemy.url = " + url_of(copy).replace("postgresql://", "postgresql+psycopg2://") + "\n"
    )
    (project / "versions" / "r1.py").write_text(_revision("r1", None, "SELECT 1"))
    ini = project / "alembic.ini"
    env = env_for(name, ini, MIGRATE_BACKUP="off")
    subprocess.run([BIN / "migrate-job", "run"], env=env, cwd=project, check=True, capture_output=True)
    (project / "versions" / "r2.py").write_text(
        '"""index and column"""\nfrom alembic import op\n\nrevision = "r2"\ndown_revision = "r1"\n'
        "branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n"
        '    op.execute("CREATE INDEX big_t ON big (t, id)")\n'
        '    op.execute("ALTER TABLE big ADD COLUMN flag boolean NOT NULL DEFAULT false")\n\n\n'
        "def downgrade():\n"
        '    op.execute("ALTER TABLE big DROP COLUMN flag")\n'
        '    op.execute("DROP INDEX big_t")\n'
    )
    alembic = [str(BIN / "alembic"), "upgrade", "head"]

    def by_hand(round_trip: bool) -> str:
        steps = [
            f'createdb "{copy}"',
            f'pg_dump --format=custom "{url_of(name)}" | pg_restore --single-transaction --exit-on-error '
            f'--dbname="{url_of(copy)}"',
            " ".join(alembic),
            *([f"{BIN / 'alembic'} downgrade r1", " ".join(alembic)] if round_trip else []),
            f'dropdb "{copy}"',
        ]
        return " && ".join(steps)

    runs = max(2, RUNS // 5)
    samples: dict[str, list[tuple[float, int]]] = {k: [] for k in ("job", "hand", "job-one-way", "hand-one-way")}
    pg_env = {**env, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
    for _ in range(runs):
        for key, argv, extra in (
            ("job", [str(BIN / "migrate-job"), "rehearse"], {}),
            ("hand", ["sh", "-ec", by_hand(True)], {}),
            ("job-one-way", [str(BIN / "migrate-job"), "rehearse"], {"MIGRATE_REHEARSAL_ROUND_TRIP": "off"}),
            ("hand-one-way", ["sh", "-ec", by_hand(False)], {}),
        ):
            samples[key].append(timed(argv, {**pg_env, **extra}, project))
    admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    print(f"rehearsal of a {size / 2**20:.0f} MiB database: migrate-job rehearse {med(samples['job']):.1f} s, by hand "
          f"{med(samples['hand']):.1f} s; without the round trip {med(samples['job-one-way']):.1f} s and "
          f"{med(samples['hand-one-way']):.1f} s ({runs} runs each)")
    return [
        (f"rehearse vs copy + apply by hand ({size / 2**30:.2f} GiB database)",
         f"{med(samples['job'])/med(samples['hand']):.2f}x", "<=1.15x"),
        ("  without the round trip (MIGRATE_REHEARSAL_ROUND_TRIP=off)",
         f"{med(samples['job-one-way'])/med(samples['hand-one-way']):.2f}x", "<=1.15x"),
    ]


def watched() -> tuple[str, str, str]:
    """The watchdog's cost: migrate-job run (its watchdog polling pg_stat_activity and the progress
    views four times a second from its own connection) vs alembic upgrade head, on a revision that
    builds an index for several seconds on a WATCHED_MB table; downgraded, untimed, between runs."""
    name, size = big_database(WATCHED_MB)
    project = WORK / "watched"
    (project / "versions").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "scenarios" / "slow" / "env.py", project / "env.py")
    (project / "alembic.ini").write_text(
        "[alembic]\nscript_location = %(here)s\nprepend_sys_path = " + str(ROOT) + "\npath_separator = os\n"
        "sqlalchemy.url = " + url_of(name).replace("postgresql://", "postgresql+psycopg2://") + "\n"
    )
    (project / "versions" / "r1.py").write_text(_revision("r1", None, "SELECT 1"))
    (project / "versions" / "r2.py").write_text(
        _revision("r2", "r1", "CREATE INDEX big_a ON big (a)").replace("    pass\n", '    op.execute("DROP INDEX big_a")\n'))
    env = env_for(name, project / "alembic.ini", MIGRATE_BACKUP="off", MIGRATE_PROGRESS_INTERVAL="1")
    alembic = str(BIN / "alembic")
    subprocess.run([alembic, "upgrade", "r1"], env=env, cwd=project, check=True, capture_output=True)
    job, bare = [], []
    for _ in range(max(3, RUNS // 3)):
        for argv, samples in (([str(BIN / "migrate-job"), "run"], job), ([alembic, "upgrade", "head"], bare)):
            samples.append(timed(argv, env, project))
            subprocess.run([alembic, "downgrade", "r1"], env=env, cwd=project, check=True, capture_output=True)
    admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    print(f"an index build on a {size / 2**20:.0f} MiB database: migrate-job run {med(job):.2f} s "
          f"(watchdog, progress every 1 s), alembic upgrade head {med(bare):.2f} s ({len(job)} runs each)")
    return (f"run vs alembic upgrade head, a {med(bare):.0f} s index build (watchdog on)",
            f"{med(job)/med(bare):.3f}x", "<=1.02x")


def drift_check(tables: int = 300) -> list[tuple[str, str, str]]:
    """On a schema of `tables` tables (each with a primary key, an index, a foreign key and four
    columns), migrated by the job: what the drift check at the start of a run with work costs (the
    live schema against the recorded one, and the applied revisions' files, in this process on the
    job's own code), and `migrate-job drift` (recorded schema, models and files) as a process."""
    from job import config, drift, integrity, migrate, plan
    from job.project import version_table_of

    name = new_database()
    project = WORK / "drift"
    (project / "versions").mkdir(parents=True)
    models = ["from sqlalchemy import Column, ForeignKey, Index, Integer, MetaData, Table, Text, DateTime",
              "metadata = MetaData()", "parent = Table('parent', metadata, Column('id', Integer, primary_key=True))"]
    ddl = ["CREATE TABLE parent (id serial PRIMARY KEY)"]
    for i in range(tables - 1):
        models.append(f"Table('t{i:03d}', metadata, Column('id', Integer, primary_key=True), Column('name', Text, "
                      f"nullable=False), Column('parent_id', Integer, ForeignKey('parent.id')), Column('at', "
                      f"DateTime(timezone=True)), Index('ix_t{i:03d}_name', 'name'))")
        ddl.append(f"CREATE TABLE t{i:03d} (id serial PRIMARY KEY, name text NOT NULL, parent_id int REFERENCES "
                   f"parent (id), at timestamptz); CREATE INDEX ix_t{i:03d}_name ON t{i:03d} (name)")
    (project / "bench_models.py").write_text("\n".join(models) + "\n")
    env_py = (ROOT / "tests" / "scenarios" / "drift" / "env.py").read_text().replace("drift_models", "bench_models")
    (project / "env.py").write_text(env_py)
    (project / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s\nprepend_sys_path = %(here)s\n"
                                         "path_separator = os\n")
    (project / "versions" / "r1.py").write_text(_revision("r1", None, "; ".join(ddl)))
    env = env_for(name, project / "alembic.ini", MIGRATE_BACKUP="off")
    subprocess.run([BIN / "migrate-job", "run"], env=env, cwd=project, check=True, capture_output=True)
    (project / "versions" / "r2.py").write_text(_revision("r2", "r1", "SELECT 1"))

    sys.path.insert(0, str(project))
    settings = config.load(env, {}, need_database=True)
    conn = psycopg2.connect(url_of(name))
    conn.autocommit = True  # (as the job's own session is)
    with migrate.project_of(settings, conn) as alembic_project:
        version_table = version_table_of(settings, conn, alembic_project)
        current = plan.current_revisions(conn, version_table)
        objects = len(drift.live(settings, conn, version_table))
        checks = []
        for _ in range(max(5, RUNS)):
            started = time.perf_counter()
            drift.against_recorded(settings, conn, version_table, current)
            integrity.changed(settings, conn, alembic_project, version_table, current, record_first_seen=False)
            checks.append(time.perf_counter() - started)
        records = []
        for _ in range(5):
            started = time.perf_counter()
            drift.record_schema(settings, conn, version_table, "migrated")
            records.append(time.perf_counter() - started)
    conn.close()
    runs = [timed([str(BIN / "migrate-job"), "drift"], env, project) for _ in range(max(3, RUNS // 3))]
    admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    print(f"drift on {tables} tables ({objects} objects): the check at a run's start {statistics.median(checks)*1000:.1f} ms "
          f"median ({len(checks)} runs), recording the schema after it {statistics.median(records)*1000:.1f} ms, "
          f"migrate-job drift {med(runs):.2f} s ({len(runs)} runs)")
    return [
        (f"drift check at the start of a run with work, {tables} tables", f"{statistics.median(checks)*1000:.1f} ms",
         "<=50 ms"),
        ("  recording the schema a run left (after its last revision)", f"{statistics.median(records)*1000:.1f} ms", ""),
        (f"  migrate-job drift, {tables} tables (recorded, models, files)", f"{med(runs):.2f} s", "<=2 s"),
    ]

def fleet() -> list[tuple[str, str, str]]:
    """migrate-job run over FLEET_TENANTS tenant databases (MIGRATE_FLEET), 3 pending revisions each,
    vs a shell loop of `alembic upgrade head` per tenant (DATABASE_URL set for each, as such loops
    do), each on its own fresh set; then the same fleet again, at head."""
    def sides() -> tuple[str, str, str, list[str]]:
        sets = [[new_database() for _ in range(FLEET_TENANTS)] for _ in range(2)]
        return (sets[0][0], ",".join("database:" + name for name in sets[0]), " ".join(url_of(n) for n in sets[1]),
                sets[0] + sets[1])

    return _fleet_against_a_loop("databases", "DATABASE_URL=$tenant", sides)


def fleet_schemas() -> list[tuple[str, str, str]]:
    """The same for FLEET_TENANTS tenant schemas of one database (MIGRATE_FLEET's schema names), the
    loop giving each `alembic upgrade head` its schema in PGOPTIONS, as such loops do; each side on
    its own fresh database."""
    schemas = [f"tenant_{i:04d}" for i in range(FLEET_TENANTS)]

    def sides() -> tuple[str, str, str, list[str]]:
        databases = [new_database() for _ in range(2)]
        for name in databases:
            conn = psycopg2.connect(url_of(name))
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("".join(f"CREATE SCHEMA {s};" for s in schemas))
            conn.close()
        return databases[0], ",".join(schemas), " ".join(schemas), databases

    return _fleet_against_a_loop("schemas", f"DATABASE_URL={url_of('$BENCH_LOOP_DB')} PGOPTIONS=-csearch_path=$tenant",
                                 sides)


def _fleet_against_a_loop(kind: str, loop_env: str,
                          sides: Callable[[], tuple[str, str, str, list[str]]]) -> list[tuple[str, str, str]]:
    """Twice: `sides()` makes two fresh fleets (the fleet's database, its MIGRATE_FLEET, the loop's
    tenants, every database made: the last one the loop's own, as BENCH_LOOP_DB); migrate-job runs
    the first, the loop the second, then migrate-job three times more at head."""
    ini = ROOT / "tests" / "scenarios" / "tenant" / "alembic.ini"
    loop = (f"for tenant in $TENANTS; do {loop_env} {BIN / 'alembic'} -c {ini} upgrade head || exit 1; done")
    ours, theirs, at_head = [], [], []
    for _ in range(2):
        database, listed, tenants, made = sides()
        env = env_for(database, ini, MIGRATE_FLEET=listed)
        ours.append(timed([str(BIN / "migrate-job"), "run"], env, ROOT))
        theirs.append(timed(["bash", "-c", loop], {**env, "TENANTS": tenants, "BENCH_LOOP_DB": made[-1]}, ROOT))
        at_head += [timed([str(BIN / "migrate-job"), "run"], env, ROOT) for _ in range(3)]
        for name in made:
            admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    print(f"fleet of {FLEET_TENANTS} tenant {kind}, 3 revisions each: migrate-job {med(ours):.1f} s, "
          f"shell loop of alembic upgrade head {med(theirs):.1f} s; at head {med(at_head):.2f} s")
    return [
        (f"fleet of {FLEET_TENANTS} {kind} x 3 revisions vs a loop of alembic", f"{med(ours)/med(theirs):.2f}x",
         "<=0.25x"),
        ("  the same fleet at head", f"{med(at_head):.2f} s", "<=2 s"),
    ]

if __name__ == "__main__":
    sys.exit(main())
