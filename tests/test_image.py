"""The image and the pods, for real: the Dockerfile built with podman, its entrypoint run locked
down, and the chart's and the plain manifests' pods played with `podman kube play` against the
machine's PostgreSQL.

Base images cannot be pulled here, so a stand-in for `python:3.11-slim-bookworm` is made from
Debian's packages (mmdebstrap) inside the tests' own container storage, with pip pointed at the
local wheelhouse (`make install` fills it) through the build's only mount. The storage is kept
outside the checkout (`~/.cache/migrate-job-tests/podman`), with the stand-in and podman's layer
cache, so that a second run, from a fresh clone too, fetches nothing; each run builds under tags of
its own. The Dockerfile itself is built as is, with Debian's PostgreSQL client
(`PG_CLIENT_SOURCE=debian`).

The pods reach the server on the host's loopback through slirp4netns (10.0.2.2). What the harness
does that a cluster would: it resolves `secretKeyRef` to values (podman 4's `kube play` cannot read
a Kubernetes Secret), plays a Job's and a Deployment's pod template as Pods (one per replica, all at
once; `restartPolicy: Never`, or podman would restart finished init containers), drops the
informational `containerPort`s (podman would publish each on the host) and mounts a file at
`/dev/termination-log` as the kubelet does. Job backoff, hook ordering and Pod Security admission are
not modelled: the render tests check those (tests/test_deploy.py).
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import helm_python
import pytest
import yaml

from tests.conftest import ADMIN_URL, ROOT, Db, Result, create_database, drop_database
from tests.pgcluster import free_port

pytestmark = [pytest.mark.image, pytest.mark.xdist_group("image")]

# What the tests fetch and build (the stand-in base, podman's layers) is kept outside the checkout,
# so that a fresh clone's run fetches nothing a run before it fetched.
STORE = Path(os.environ.get("MIGRATE_JOB_TEST_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "migrate-job-tests") / "podman"
WHEELS = ROOT / ".local" / "wheels"
BASE = "docker.io/library/python:3.11-slim-bookworm"
# this run's own tags (other checkouts may build into the same storage at the same time)
TAG = f"test-{uuid.uuid4().hex[:8]}"
JOB_IMAGE, APP_IMAGE = f"localhost/migrate-job:{TAG}", f"localhost/migrate-job-blog:{TAG}"
# the stand-in base: what the slim image gives the Dockerfile (a `python` with venv and pip)
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
NETWORK = "slirp4netns:allow_host_loopback=true"
HOST = "10.0.2.2"  # the host's loopback, seen from a pod on slirp4netns
CHART = ROOT / "deploy" / "helm" / "migrate-job"
K8S = ROOT / "deploy" / "k8s"


class Podman:
    """podman on the tests' own storage and configuration."""

    def __init__(self) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(STORE / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(STORE / "storage.conf")}

    def __call__(self, *args: str, check: bool = True, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
        done = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done

    def has_image(self, name: str) -> bool:
        return self("image", "exists", name, check=False).returncode == 0


def _configure() -> None:
    STORE.mkdir(parents=True, exist_ok=True)
    hard_nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = 4096 if hard_nproc == resource.RLIM_INFINITY else min(hard_nproc, 4096)
    # podman's default ulimits exceed this machine's hard limits; runc, since crun refuses this cgroup
    # setup; cgroupfs and file events, since no systemd runs
    _write_atomically(STORE / "containers.conf",
        "[containers]\n"
        f'default_ulimits = ["nofile=1024:1024", "nproc={nproc}:{nproc}"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    _write_atomically(STORE / "storage.conf",
        f'[storage]\ndriver = "overlay"\ngraphroot = "{STORE / "graph"}"\nrunroot = "{STORE / "run"}"\n')


def _write_atomically(path: Path, text: str) -> None:
    """Another run sharing the store may be reading it: it sees the old file or the new, whole."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.rename(path)


def _cannot_run() -> str | None:
    """Why podman cannot run here at all, if it cannot."""
    if os.geteuid() != 0:
        return "podman's kube play and slirp4netns need root here (CI runs as root)"
    for tool in ("podman", "runc", "mmdebstrap", "slirp4netns"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make system-deps` installs it)"
    return None


@pytest.fixture(scope="session")
def podman() -> Podman:
    reason = _cannot_run()
    if reason:
        pytest.skip(reason)
    _configure()
    return Podman()


@pytest.fixture(scope="session")
def images(podman: Podman) -> Iterator[tuple[str, str]]:
    """The job and app images, built from the Dockerfile as is, once per run."""
    if not podman.has_image(BASE):
        tarball = STORE / "base-bookworm.tar"
        if not tarball.exists():
            partial = tarball.with_suffix(f".{os.getpid()}.partial")  # (another run may be making one too)
            subprocess.run(["mmdebstrap", "--quiet", "--variant=apt", "--format=tar", f"--include={BASE_PACKAGES}", "bookworm",
                            str(partial), "http://deb.debian.org/debian"], check=True, capture_output=True,
                           timeout=600)
            partial.rename(tarball)
        podman("import", "--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8",
               "--change", "ENV PIP_NO_INDEX=1", "--change", "ENV PIP_FIND_LINKS=/wheelhouse", str(tarball), BASE)
    assert any(WHEELS.glob("fastapi-*.whl")), "run `make install` first: it fills .local/wheels"
    for target, tag in (("job", JOB_IMAGE), ("app", APP_IMAGE)):
        podman("build", "--network", "host", "--volume", f"{WHEELS}:/wheelhouse:ro",
               "--build-arg", "PG_CLIENT_SOURCE=debian", "--target", target, "--tag", tag, str(ROOT), timeout=900)
    yield JOB_IMAGE, APP_IMAGE
    podman("rmi", JOB_IMAGE, APP_IMAGE, check=False)  # (the layers stay, for the next run's build)


def in_pod(db: Db) -> str:
    """The test database's URL as a pod sees it."""
    return db.url.replace("127.0.0.1", HOST)


def results(podman: Podman, container: str) -> Result:
    state = json.loads(podman("inspect", container, "--format", "{{json .State}}").stdout)
    logs = podman("logs", container)
    return Result(state["ExitCode"], logs.stdout, logs.stderr)


# --- the job image, locked down ---------------------------------------------------------------

def run_image(podman: Podman, db: Db, backups: Path, *args: str, user: str = "10001:10001") -> Result:
    """The job image as the restricted Pod Security profile runs it: the root filesystem read-only,
    writable only what is mounted (the backups volume, and an emptyDir at /tmp, as the chart mounts)."""
    done = podman("run", "--rm", "--network", NETWORK, "--user", user, "--read-only", "--read-only-tmpfs=false",
                  "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                  "--volume", f"{backups}:/backups", "--env", f"DATABASE_URL={in_pod(db)}", JOB_IMAGE, *args, check=False)
    return Result(done.returncode, done.stdout, done.stderr)


def test_the_job_image_runs_locked_down(podman: Podman, images: tuple[str, str], db: Db, tmp_path: Path) -> None:
    """uid 10001, read-only root, every capability dropped: --help, run (a 0600 backup in the
    mounted volume), run again (nothing to do), check."""
    db.holds_data()
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700)
    os.chown(backups, 10001, 10001)

    helped = run_image(podman, db, backups, "--help")
    assert helped.code == 0 and "usage: migrate-job" in helped.stdout

    first = run_image(podman, db, backups, "run")
    assert first.code == 0, first.stdout + first.stderr
    assert [e["revision"] for e in first.events("migration.done")] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    dump = backups / Path(first.event("backup.done")["path"]).name
    assert dump.stat().st_mode & 0o777 == 0o600 and dump.stat().st_uid == 10001

    again = run_image(podman, db, backups, "run")
    assert again.code == 0 and again.event("run.done")["outcome"] == "up-to-date"
    assert run_image(podman, db, backups, "check").code == 0
    assert db.version() == ["0006"]


def test_the_app_image_is_ready_at_head(podman: Podman, images: tuple[str, str], db: Db, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    os.chown(backups, 10001, 10001)
    assert run_image(podman, db, backups, "run").code == 0
    port = free_port()
    name = f"blog-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--network", NETWORK, "--publish", f"127.0.0.1:{port}:8000",
           "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--env", f"DATABASE_URL={in_pod(db)}", APP_IMAGE)
    try:
        assert _ready(f"http://127.0.0.1:{port}/readyz") == 200
    finally:
        podman("rm", "--force", name, check=False)


def test_every_command_runs_as_any_uid_with_only_its_volumes_writable(podman: Podman, images: tuple[str, str],
                                                                      db: Db, tmp_path: Path) -> None:
    """A uid the image has never heard of (OpenShift's kind), root read-only: run, backup, status,
    check, and a restore that brings the data back."""
    db.holds_data()
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700)
    os.chown(backups, 54321, 0)
    stranger = "54321:0"

    assert 0 == run_image(podman, db, backups, "run", user=stranger).code
    taken = run_image(podman, db, backups, "backup", user=stranger)
    assert 0 == taken.code, taken.stdout[-1500:] + taken.stderr[-1500:]
    db.query("DELETE FROM legacy_notes")
    restored = run_image(podman, db, backups, "restore", Path(taken.event("backup.done")["path"]).name, "--yes",
                         user=stranger)

    assert 0 == restored.code, restored.stdout[-1500:] + restored.stderr[-1500:]
    assert [(1, "kept")] == db.query("SELECT id, body FROM legacy_notes")
    assert (0, 0) == (run_image(podman, db, backups, "status", user=stranger).code,
                      run_image(podman, db, backups, "check", user=stranger).code)


def _ready(url: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# --- the chart's and the manifests' pods, played ------------------------------------------------

class Cluster:
    """Pods played from rendered documents, cleaned up afterwards."""

    def __init__(self, podman: Podman, tmp_path: Path) -> None:
        self.podman, self.tmp_path = podman, tmp_path
        self.run = uuid.uuid4().hex[:6]
        self.pods: list[str] = []
        # the claims (made before the pods start, as in a cluster), and every volume to remove after
        self.claims: list[str] = []
        self.volumes: list[str] = []
        self.termination: dict[str, Path] = {}

    def pods_of(self, docs: list[dict[str, Any]], kind: str, replicas: int = 1) -> list[dict[str, Any]]:
        """The pod template of the `kind` document, as Pods (one per replica), Secrets resolved."""
        secrets = {d["metadata"]["name"]: {**{k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()},
                                           **(d.get("stringData") or {})}
                   for d in docs if d["kind"] == "Secret"}
        (owner,) = [d for d in docs if d["kind"] == kind]
        pods = []
        for index in range(replicas):
            template = json.loads(json.dumps(owner["spec"]["template"]))
            spec = template["spec"]
            spec["restartPolicy"] = "Never"
            name = f"{owner['metadata']['name']}-{self.run}-{index}"
            for container in spec.get("initContainers", []) + spec["containers"]:
                # informational in Kubernetes; podman would publish it on the host, once per replica
                container.pop("ports", None)
                for item in container.get("env", []):
                    ref = (item.get("valueFrom") or {}).get("secretKeyRef")
                    if ref:
                        item.pop("valueFrom")
                        item["value"] = secrets[ref["name"]][ref["key"]]
                # the kubelet's terminationMessagePath: a file of the host's, bind-mounted
                log = self.tmp_path / f"{name}-{container['name']}.termination-log"
                log.touch(mode=0o666)
                log.chmod(0o666)
                self.termination[f"{name}-{container['name']}"] = log
                spec.setdefault("volumes", []).append(
                    {"name": f"termination-{container['name']}", "hostPath": {"path": str(log), "type": "File"}})
                container.setdefault("volumeMounts", []).append(
                    {"name": f"termination-{container['name']}", "mountPath": "/dev/termination-log"})
            for volume in spec.get("volumes", []):
                claim = volume.get("persistentVolumeClaim")
                if claim:  # a volume of this test's own
                    claim["claimName"] = f"{claim['claimName']}-{self.run}"
                    if claim["claimName"] not in self.claims:
                        self.claims.append(claim["claimName"])
                        self.volumes.append(claim["claimName"])
                if "emptyDir" in volume:
                    # podman 4 makes a named volume of an emptyDir, named as in the pod spec: pods
                    # played at once would race to create (and then share) one `tmp`. In a cluster
                    # each pod's emptyDir is its own: so here too.
                    own = f"{volume['name']}-{name}"
                    for container in spec.get("initContainers", []) + spec["containers"]:
                        for mount in container.get("volumeMounts", []):
                            if mount["name"] == volume["name"]:
                                mount["name"] = own
                    volume["name"] = own
                    self.volumes.append(own)
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": name, "labels": template["metadata"]["labels"]}, "spec": spec})
        return pods

    def play(self, pods: list[dict[str, Any]]) -> None:
        """Start the pods at once (each `kube play` runs its init containers before returning). The
        claims exist first, as in a cluster: pods starting together would race to create them."""
        for claim in self.claims:
            if self.podman("volume", "exists", claim, check=False).returncode != 0:
                self.podman("volume", "create", claim)
        procs = []
        for pod in pods:
            path = self.tmp_path / f"{pod['metadata']['name']}.yaml"
            path.write_text(yaml.safe_dump(pod))
            self.pods.append(pod["metadata"]["name"])
            procs.append(subprocess.Popen(["podman", "kube", "play", "--network", NETWORK, str(path)],
                                          env=self.podman.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"podman kube play failed: {err[-2000:]}"

    def finished(self, container: str, timeout: float = 120) -> Result:
        """The container's exit code and logs once it has exited. An init container has run by the time
        `kube play` returns, and podman has removed it: its exit code is its termination message's."""
        deadline = time.monotonic() + timeout
        while True:
            if self.podman("container", "exists", container, check=False).returncode != 0:
                message = self.outcome(container)
                found = re.search(r"\(exit (\d+)\)", message)
                assert found, f"{container} is gone and left no termination message"
                return Result(int(found.group(1)), "", message)
            state = json.loads(self.podman("inspect", container, "--format", "{{json .State}}").stdout)
            if state["Status"] in ("exited", "stopped") or time.monotonic() > deadline:
                return results(self.podman, container)
            time.sleep(0.3)

    def outcome(self, container: str) -> str:
        """The container's termination message (podman keeps no logs of a pod's init containers)."""
        return self.termination[container].read_text().strip()

    def ready(self, container: str) -> int:
        """/readyz from inside the app container, as the kubelet's readiness probe asks it."""
        probe = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/readyz', timeout=5).status)"
        deadline = time.monotonic() + 60
        while True:
            done = self.podman("exec", container, "python", "-c", probe, check=False)
            if done.returncode == 0 or time.monotonic() > deadline:
                return int(done.stdout.strip() or 0)
            time.sleep(0.5)

    def close(self) -> None:
        for pod in self.pods:
            # the containers first, with the anonymous volumes the image's VOLUME gave them
            containers = self.podman("ps", "--all", "--quiet", "--filter", f"pod={pod}", check=False).stdout.split()
            if containers:
                self.podman("rm", "--force", "--volumes", "--time", "0", *containers, check=False)
            self.podman("pod", "rm", "--force", "--time", "0", pod, check=False)
        for volume in self.volumes:
            self.podman("volume", "rm", "--force", volume, check=False)


@pytest.fixture
def cluster(podman: Podman, images: tuple[str, str], tmp_path: Path) -> Iterator[Cluster]:
    played = Cluster(podman, tmp_path)
    yield played
    played.close()


def chart(db: Db, **values: Any) -> list[dict[str, Any]]:
    merged = {"database": {"url": in_pod(db)},
              "image": {"repository": JOB_IMAGE.split(":")[0], "tag": TAG, "pullPolicy": "Never"},
              "app": {"replicas": 3, "image": {"repository": APP_IMAGE.split(":")[0], "tag": TAG,
                                               "pullPolicy": "Never"}}}
    for key, value in values.items():
        merged[key] = {**merged.get(key, {}), **value}
    rendered = helm_python.Chart.load(CHART).render(merged, name="blog", namespace="default", is_install=True)
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def manifests(overlay: str, db: Db) -> list[dict[str, Any]]:
    """An overlay's resources as `kustomize build` lists them, with the test's images and a Secret."""
    docs = []

    def collect(directory: Path) -> None:
        for listed in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]:
            path = (directory / listed).resolve()
            if path.is_dir():
                collect(path)
            else:
                docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)

    collect(K8S / "overlays" / overlay)
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            container["image"] = APP_IMAGE if container["name"] == "app" else JOB_IMAGE
    docs.append({"kind": "Secret", "metadata": {"name": "blog-database"}, "stringData": {"DATABASE_URL": in_pod(db)}})
    return docs


def migrations(result: Result) -> list[str]:
    return [e["revision"] for e in result.events("migration.done")]


def test_hook_mode_the_job_migrates_then_three_app_pods_start(cluster: Cluster, db: Db) -> None:
    docs = chart(db)
    (job_pod,) = cluster.pods_of(docs, "Job")
    cluster.play([job_pod])
    migrated = cluster.finished(f"{job_pod['metadata']['name']}-migrate")
    assert migrated.code == 0, migrated.stdout[-3000:]
    assert len(migrations(migrated)) == 6
    assert cluster.termination[f"{job_pod['metadata']['name']}-migrate"].read_text() == "migrated (exit 0)\n"

    app_pods = cluster.pods_of(docs, "Deployment", replicas=3)
    cluster.play(app_pods)
    for pod in app_pods:
        waiter = f"{pod['metadata']['name']}-wait-for-migrations"
        assert (cluster.finished(waiter).code, cluster.outcome(waiter)) == (0, "at-target (exit 0)")
        assert cluster.ready(f"{pod['metadata']['name']}-app") == 200
    assert db.version() == ["0006"]


@pytest.mark.parametrize("source", ["chart", "manifests"])
def test_init_container_mode_three_replicas_one_migration(cluster: Cluster, db: Db, source: str) -> None:
    if source == "chart":
        docs = chart(db, migration={"mode": "initContainer"},
                     backups={"persistence": {"accessModes": ["ReadWriteMany"], "create": True}})
    else:
        docs = manifests("init-container", db)
    db.holds_data()
    pods = cluster.pods_of(docs, "Deployment", replicas=3)
    cluster.play(pods)
    runners = [f"{pod['metadata']['name']}-migrate" for pod in pods]
    assert [cluster.finished(r).code for r in runners] == [0, 0, 0], [cluster.outcome(r) for r in runners]
    assert sorted(cluster.outcome(r) for r in runners) == ["migrated (exit 0)"] + ["up-to-date (exit 0)"] * 2
    assert db.query("SELECT count(*), count(backup_path) FROM migrate_job.migrate_job_history "
                    "WHERE kind = 'run' AND outcome = 'migrated'") == [(1, 1)]
    assert db.version() == ["0006"]
    for pod in pods:
        assert cluster.ready(f"{pod['metadata']['name']}-app") == 200


def test_manifests_job_overlay_migrates_and_the_app_waits(cluster: Cluster, db: Db) -> None:
    docs = manifests("job", db)
    (job_pod,) = cluster.pods_of(docs, "Job")
    cluster.play([job_pod])
    assert len(migrations(cluster.finished(f"{job_pod['metadata']['name']}-migrate"))) == 6
    (app_pod,) = cluster.pods_of(docs, "Deployment")
    cluster.play([app_pod])
    waiter = f"{app_pod['metadata']['name']}-wait-for-migrations"
    assert (cluster.finished(waiter).code, cluster.outcome(waiter)) == (0, "at-target (exit 0)")
    assert cluster.ready(f"{app_pod['metadata']['name']}-app") == 200


def test_a_failing_revision_shows_exit_6_and_the_termination_message(cluster: Cluster, db: Db) -> None:
    """A table in the way of 0001: the Job's pod exits 6, and its termination message says why."""
    db.query("CREATE TABLE users (id int)")
    (job_pod,) = cluster.pods_of(chart(db), "Job")
    cluster.play([job_pod])
    container = f"{job_pod['metadata']['name']}-migrate"
    failed = cluster.finished(container)
    assert failed.code == 6
    message = cluster.outcome(container)
    assert message.startswith("failed (exit 6): revision 0001") and 'relation "users" already exists' in message


def test_a_fleet_in_three_shards_each_pod_migrates_its_share_and_a_failing_tenant_fails_its_shard_alone(
        cluster: Cluster) -> None:
    """The chart's Indexed Job played as the Job controller runs it: three pods, each with its
    JOB_COMPLETION_INDEX; a tenant in whose way the first revision's table stands fails its
    shard (exit 6), the other shards succeed, and every other tenant is at head; the shard retried
    once the tenant is mended succeeds, and the app pod, which waits for the whole fleet, starts."""
    from job.fleet import Target, shard_of

    tenants: list[Db] = []
    while any(sum(shard_of(Target("", t.name), 3) == s for t in tenants) < 2 for s in range(3)):
        tenants.append(create_database(ADMIN_URL, prefix="fleet"))  # (until each shard has two)
    try:
        broken = tenants[0]
        broken.query("CREATE TABLE users (id int)")
        targets = ",".join("database:" + t.name for t in tenants)
        docs = chart(tenants[0], migration={"fleet": {"targets": targets, "shards": 3}},
                     backups={"mode": "off"})
        pods = cluster.pods_of(docs, "Job", replicas=3)
        for index, pod in enumerate(pods):
            for container in pod["spec"]["containers"]:
                container["env"].append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
        cluster.play(pods)
        failing = shard_of(Target("", broken.name), 3)
        ended = [cluster.finished(f"{pod['metadata']['name']}-migrate", timeout=300) for pod in pods]
        assert [e.code for e in ended] == [6 if i == failing else 0 for i in range(3)], \
            [cluster.outcome(f"{pod['metadata']['name']}-migrate") for pod in pods]
        assert cluster.outcome(f"{pods[failing]['metadata']['name']}-migrate").startswith(
            f"fleet-failed: 1 of {sum(shard_of(Target('', t.name), 3) == failing for t in tenants)} failed; "
            f"{broken.name} (exit 6)")
        for index, result in enumerate(ended):
            said = {e["tenant"] for e in result.events("fleet.target")}
            assert said == {t.name for t in tenants if shard_of(Target("", t.name), 3) == index}
        assert [t.version() for t in tenants[1:]] == [["0006"]] * (len(tenants) - 1)

        # the tenant mended, the failing shard's pod again (what backoffLimitPerIndex does): then
        # the app's wait-for-migrations, which waits for the whole fleet, lets the app start
        broken.query("DROP TABLE users")
        retried = pods[failing]
        cluster.podman("pod", "rm", "--force", "--time", "0", retried["metadata"]["name"])
        cluster.play([retried])
        assert cluster.finished(f"{retried['metadata']['name']}-migrate", timeout=300).code == 0
        assert broken.version() == ["0006"]
        (app_pod,) = cluster.pods_of(docs, "Deployment")
        cluster.play([app_pod])
        waiter = f"{app_pod['metadata']['name']}-wait-for-migrations"
        assert cluster.outcome(waiter).startswith(f"fleet-done: 0 of {len(tenants)} failed; {len(tenants)} at-target")
        assert cluster.ready(f"{app_pod['metadata']['name']}-app") == 200
    finally:
        for tenant in tenants:
            drop_database(tenant)


def test_a_fleet_of_tenant_schemas_in_three_shards_each_pod_migrates_its_schemas(cluster: Cluster, db: Db) -> None:
    """The same Indexed Job over tenant schemas of one database (MIGRATE_FLEET's schema names): each
    pod migrates the schemas of its shard, each in its own schema; the shard of a tenant whose
    first table is in the way fails alone."""
    from job.fleet import Target, shard_of

    names: list[str] = []
    while any(sum(shard_of(Target("", n, n), 3) == s for n in names) < 2 for s in range(3)):
        names.append(f"tenant_{len(names):02d}")  # (until each shard has two)
    db.query("".join(f"CREATE SCHEMA {name};" for name in names))
    broken = names[0]
    db.query(f"CREATE TABLE {broken}.users (id int)")
    docs = chart(db, migration={"fleet": {"targets": " ".join(names), "shards": 3}}, backups={"mode": "off"})
    pods = cluster.pods_of(docs, "Job", replicas=3)
    for index, pod in enumerate(pods):
        for container in pod["spec"]["containers"]:
            container["env"].append({"name": "JOB_COMPLETION_INDEX", "value": str(index)})
    cluster.play(pods)
    failing = shard_of(Target("", broken, broken), 3)
    ended = [cluster.finished(f"{pod['metadata']['name']}-migrate", timeout=300) for pod in pods]
    assert [e.code for e in ended] == [6 if i == failing else 0 for i in range(3)], \
        [cluster.outcome(f"{pod['metadata']['name']}-migrate") for pod in pods]
    for index, result in enumerate(ended):
        assert {e["tenant"] for e in result.events("fleet.target")} == {
            n for n in names if shard_of(Target("", n, n), 3) == index}
    migrated = {s for (s,) in db.query("SELECT table_schema FROM information_schema.tables WHERE table_name = "
                                       "'comments'")}
    assert migrated == set(names) - {broken} and db.tables("public") == set()
