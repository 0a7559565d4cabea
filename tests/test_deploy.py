"""The image, the Helm chart and the plain manifests: rendered by the real Helm v4 SDK offline,
validated against a current Kubernetes schema, and their containers run as local processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT, Db, Result, base_env, run_job

CHART = ROOT / "deploy" / "helm" / "migrate-job"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
URL_VALUES = {"database": {"url": "postgresql://blog:s3cret@db:5432/blog"}}
KUBERNETES = kubernetes_validate.latest_version()


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's documents for `values` (on top of a database URL), as Helm renders them."""
    merged = {**URL_VALUES, **(values or {})}
    chart = helm_python.Chart.load(CHART)
    rendered = chart.render(merged, name="blog", namespace="prod", is_install=True)
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def one(docs: list[dict[str, Any]], kind: str, name_part: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    assert len(found) == 1, f"expected one {kind} {name_part!r}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def annotations(doc: dict[str, Any]) -> dict[str, str]:
    return doc["metadata"].get("annotations") or {}


# --- hook mode -------------------------------------------------------------------------------

def test_hook_mode_renders_a_pre_install_pre_upgrade_job() -> None:
    """By default the Job is a pre-install/pre-upgrade hook, deleted before the next and on success."""
    job = one(render(), "Job")

    assert {
        "helm.sh/hook": "pre-install,pre-upgrade",
        "helm.sh/hook-weight": "0",
        "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
    } == annotations(job)
    assert (2, 1800, "Never") == (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"],
                                  job["spec"]["template"]["spec"]["restartPolicy"])
    assert ["run"] == job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_hook_mode_rehearses_first_when_asked() -> None:
    """migration.rehearse: the hook Job's init container rehearses on a copy; off by default."""
    plain = one(render(), "Job")["spec"]["template"]["spec"]
    rehearsing = one(render({"migration": {"rehearse": True}}), "Job")["spec"]["template"]["spec"]

    (rehearse,) = rehearsing["initContainers"]
    assert (None, ["rehearse"], ["run"]) == (plain.get("initContainers"), rehearse["args"],
                                             rehearsing["containers"][0]["args"])
    assert rehearsing["containers"][0]["env"] == rehearse["env"]


def test_hook_mode_app_waits_for_migrations() -> None:
    """In hook mode the app's init container only waits: `check --wait`, no backups mounted."""
    deployment = one(render(), "Deployment")
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]

    assert ("wait-for-migrations", ["check", "--wait"]) == (init["name"], init["args"])
    assert "MIGRATE_BACKUP_DIR" not in env_of(init)
    assert ["tmp"] == [m["name"] for m in init["volumeMounts"]]


def test_ttl_is_left_out_when_null_and_kept_when_zero() -> None:
    """ttlSecondsAfterFinished renders only when set; 0 is a value, not 'unset'."""
    assert "ttlSecondsAfterFinished" not in one(render(), "Job")["spec"]
    assert 0 == one(render({"migration": {"mode": "hook", "ttlSecondsAfterFinished": 0}}), "Job")["spec"][
        "ttlSecondsAfterFinished"]
    assert 600 == one(render({"migration": {"mode": "hook", "ttlSecondsAfterFinished": 600}}), "Job")["spec"][
        "ttlSecondsAfterFinished"]


def test_without_helm_hooks_the_job_is_plain() -> None:
    """useHelmHooks: false renders the Job, Secret and claim without hook annotations (Argo CD, helm --wait)."""
    docs = render({"useHelmHooks": False})

    assert not any(k.startswith("helm.sh/hook") for d in docs for k in annotations(d))
    assert "Job" in kinds(docs)


def test_user_annotations_are_merged_into_the_job() -> None:
    """migration.annotations join the hook annotations; the hook's own keys win."""
    job = one(render({"migration": {"mode": "hook", "annotations": {
        "argocd.argoproj.io/hook": "PreSync", "helm.sh/hook-weight": "99"}}}), "Job")

    assert "PreSync" == annotations(job)["argocd.argoproj.io/hook"]
    assert "0" == annotations(job)["helm.sh/hook-weight"]


def test_chart_created_secret_and_account_are_hooks_before_the_job() -> None:
    """Without existingSecret the chart's Secret (and ServiceAccount) are hooks weighted before the Job."""
    docs = render()
    secret = one(docs, "Secret")

    assert "pre-install,pre-upgrade" == annotations(secret)["helm.sh/hook"]
    assert int(annotations(secret)["helm.sh/hook-weight"]) < int(annotations(one(docs, "Job"))["helm.sh/hook-weight"])
    assert int(annotations(one(docs, "ServiceAccount"))["helm.sh/hook-weight"]) < 0
    assert "postgresql://blog:s3cret@db:5432/blog" == secret["stringData"]["DATABASE_URL"]


def test_existing_secret_is_used_and_none_is_created() -> None:
    """database.existingSecret: no Secret rendered; every container reads the URL from it."""
    docs = render({"database": {"existingSecret": "blog-db", "existingSecretKey": "url"}})

    assert "Secret" not in kinds(docs)
    for container in _containers(docs):
        assert {"secretKeyRef": {"name": "blog-db", "key": "url"}} == env_of(container)["DATABASE_URL"]


# --- init-container mode ---------------------------------------------------------------------

def test_init_container_mode_has_no_job_and_the_app_runs_the_pipeline() -> None:
    """migration.mode: initContainer renders no Job; each app pod's init container runs `run` with backups."""
    docs = render({"migration": {"mode": "initContainer"}, "app": {"replicas": 1}})
    (init,) = one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]

    assert "Job" not in kinds(docs)
    assert ("migrate", ["run"]) == (init["name"], init["args"])
    assert "/backups" == env_of(init)["MIGRATE_BACKUP_DIR"]
    assert not any(k.startswith("helm.sh/hook") for d in docs for k in annotations(d))


# --- backups ---------------------------------------------------------------------------------

def test_backups_get_a_kept_claim_created_once() -> None:
    """By default a PVC is created as a pre-install hook and kept on uninstall, mounted at /backups."""
    docs = render()
    claim = one(docs, "PersistentVolumeClaim")
    job = one(docs, "Job")["spec"]["template"]["spec"]

    assert ("keep", "pre-install") == (annotations(claim)["helm.sh/resource-policy"], annotations(claim)["helm.sh/hook"])
    assert {"name": "backups", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in job["volumes"]
    assert "/backups" == env_of(job["containers"][0])["MIGRATE_BACKUP_DIR"]


def test_existing_claim_is_mounted_and_none_is_created() -> None:
    """backups.persistence.existingClaim is mounted; no claim is rendered."""
    docs = render({"backups": {"persistence": {"existingClaim": "blog-backups"}}})
    job = one(docs, "Job")["spec"]["template"]["spec"]

    assert "PersistentVolumeClaim" not in kinds(docs)
    assert {"name": "backups", "persistentVolumeClaim": {"claimName": "blog-backups"}} in job["volumes"]


def test_backups_off_mounts_nothing() -> None:
    """backups.mode: off renders no claim and no volume, and tells the job."""
    docs = render({"backups": {"mode": "off"}})
    job = one(docs, "Job")["spec"]["template"]["spec"]

    assert "PersistentVolumeClaim" not in kinds(docs)
    assert ["tmp"] == [v["name"] for v in job["volumes"]]
    assert "off" == env_of(job["containers"][0])["MIGRATE_BACKUP"]


def test_backups_in_a_bucket_need_no_claim_with_three_replicas_in_init_container_mode() -> None:
    """backups.s3.bucket: no claim, no backups volume, whatever the replicas; the job is told the
    bucket, endpoint, region and addressing, and takes its keys from the Secret."""
    values = _ci_values()["s3-values.yaml"]
    docs = render(values)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    env = env_of(pod["initContainers"][0])

    assert 3 == one(docs, "Deployment")["spec"]["replicas"]
    assert "PersistentVolumeClaim" not in kinds(docs)
    assert ["tmp"] == [v["name"] for v in pod["volumes"]]
    assert [] == [m for c in pod["initContainers"] for m in c["volumeMounts"] if m["name"] == "backups"]
    assert ("s3://blog-backups/production/blog", "https://minio.storage.svc:9000", "eu-west-1", "path") == (
        env["MIGRATE_BACKUP_DIR"], env["AWS_ENDPOINT_URL"], env["AWS_REGION"], env["MIGRATE_S3_ADDRESSING"])
    assert {"secretKeyRef": {"name": "blog-backups-s3", "key": "AWS_SECRET_ACCESS_KEY"}} == env["AWS_SECRET_ACCESS_KEY"]


def test_backups_in_a_bucket_without_keys_use_the_service_accounts_identity() -> None:
    """With no credentials Secret, no AWS key is set: the annotated service account's web identity is used."""
    docs = render({"backups": {"s3": {"bucket": "blog-backups"}},
                   "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}}})
    job = one(docs, "Job")["spec"]["template"]["spec"]
    env = env_of(job["containers"][0])

    assert "s3://blog-backups/" == env["MIGRATE_BACKUP_DIR"]
    assert not any(k.startswith("AWS_") for k in env)
    assert "arn:aws:iam::1:role/r" == annotations(one(docs, "ServiceAccount"))["eks.amazonaws.com/role-arn"]
    assert "PersistentVolumeClaim" not in kinds(docs)


# --- credentials -----------------------------------------------------------------------------

NO_PASSWORD_URL = {"url": "postgresql://blog@db.example.com:5432/blog"}


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def test_a_password_secret_is_mounted_as_a_directory_and_named_by_database_password_file() -> None:
    """A directory mount (not subPath), so that Kubernetes swaps the file when the Secret rotates; in
    both modes, on every container of the job that connects."""
    for mode in ("hook", "initContainer"):
        docs = render({"database": {**NO_PASSWORD_URL, "auth": {"passwordSecret": {"name": "blog-db", "key": "pw"}}},
                       "migration": {"mode": mode, "rehearse": True}, "app": {"replicas": 1}})
        spec = one(docs, "Job" if mode == "hook" else "Deployment")["spec"]["template"]["spec"]
        containers = spec.get("initContainers", []) + (spec["containers"] if mode == "hook" else [])
        volumes = {v["name"]: v for v in spec["volumes"]}

        assert {"secretName": "blog-db", "items": [{"key": "pw", "path": "password"}]} == volumes[
            "database-password"]["secret"]
        for container in containers:
            assert "/etc/migrate-job/database/password" == env_of(container)["DATABASE_PASSWORD_FILE"]
            assert "/etc/migrate-job/database" == _mounts(container)["database-password"]
            assert not any(m.get("subPath") for m in container["volumeMounts"])


def test_a_password_command_and_its_cache_reach_the_job() -> None:
    docs = render({"database": {**NO_PASSWORD_URL, "auth": {"passwordCommand": "vault-get blog", "passwordCache": 30}}})
    env = env_of(one(docs, "Job")["spec"]["template"]["spec"]["containers"][0])

    assert ("vault-get blog", "30") == (env["MIGRATE_PASSWORD_COMMAND"], env["MIGRATE_PASSWORD_CACHE"])
    assert "DATABASE_PASSWORD_FILE" not in env and "MIGRATE_AUTH" not in env


@pytest.mark.parametrize(("provider", "annotation"), [
    ("aws-rds-iam", "eks.amazonaws.com/role-arn"),
    ("azure-entra", "azure.workload.identity/client-id"),
    ("gcp-cloudsql", "iam.gke.io/gcp-service-account"),
])
def test_a_cloud_provider_gets_its_identity_and_the_ca_bundle(provider: str, annotation: str) -> None:
    """MIGRATE_AUTH on every container that connects, the service account annotated for the pod's
    identity, the CA from a ConfigMap named by PGSSLROOTCERT; Azure's pods carry the label its
    webhook looks for."""
    docs = render({"database": {**NO_PASSWORD_URL, "auth": {"provider": provider},
                                "tls": {"caConfigMap": "rds-ca", "caKey": "global-bundle.pem"}},
                   "serviceAccount": {"annotations": {annotation: "the-identity"}}})
    job = one(docs, "Job")["spec"]["template"]
    app = one(docs, "Deployment")["spec"]["template"]
    volumes = {v["name"]: v for v in job["spec"]["volumes"]}

    for container in job["spec"]["containers"] + app["spec"]["initContainers"]:
        env = env_of(container)
        assert (provider, "/etc/migrate-job/ca/ca.crt") == (env["MIGRATE_AUTH"], env["PGSSLROOTCERT"])
        assert "/etc/migrate-job/ca" == _mounts(container)["database-ca"]
    assert {"name": "rds-ca", "items": [{"key": "global-bundle.pem", "path": "ca.crt"}]} == volumes[
        "database-ca"]["configMap"]
    assert "the-identity" == annotations(one(docs, "ServiceAccount"))[annotation]
    labelled = [t["metadata"]["labels"].get("azure.workload.identity/use") for t in (job, app)]
    assert labelled == (["true", "true"] if provider == "azure-entra" else [None, None])


def test_no_credential_values_render_nothing_of_them() -> None:
    spec = one(render(), "Job")["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])

    assert not {"MIGRATE_AUTH", "DATABASE_PASSWORD_FILE", "MIGRATE_PASSWORD_COMMAND", "PGSSLROOTCERT"} & set(env)
    assert not {"database-password", "database-ca"} & {v["name"] for v in spec["volumes"]}


# --- security --------------------------------------------------------------------------------

def test_every_pod_and_container_is_locked_down() -> None:
    """Non-root, read-only root, no escalation, no capabilities, RuntimeDefault seccomp, no token."""
    for values in ({}, {"migration": {"mode": "initContainer"}, "app": {"replicas": 1}}):
        docs = render(values)
        for spec in _pod_specs(docs):
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert "RuntimeDefault" == spec["securityContext"]["seccompProfile"]["type"]
            assert spec["automountServiceAccountToken"] is False
        for container in _containers(docs):
            sc = container["securityContext"]
            assert (True, False, ["ALL"]) == (sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"],
                                              sc["capabilities"]["drop"])
            assert container["resources"]["limits"]["memory"]
        assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False


# Kubernetes Pod Security Standards, `restricted` profile (which includes `baseline`):
# https://kubernetes.io/docs/concepts/security/pod-security-standards/
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What in a pod spec the `restricted` Pod Security profile would refuse (admission is not run here)."""
    found = []
    pod = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"{field} is set")
    for volume in spec.get("volumes", []):
        kinds_ = set(volume) - {"name"}
        if not kinds_ <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} is of type {sorted(kinds_)}")
    for container in spec.get("initContainers", []) + spec["containers"]:
        sc = container.get("securityContext") or {}
        name = container["name"]
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if not (sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True):
            found.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{name}: runs as uid 0")
        seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is {seccomp!r}")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: uses a hostPort")
    return found


def _ci_values() -> dict[str, dict[str, Any]]:
    """The chart's chart-testing values files (ci/*-values.yaml), by name."""
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((CHART / "ci").glob("*-values.yaml"))}


def test_the_chart_has_ci_values_for_each_mode() -> None:
    found = _ci_values()
    modes = {(v.get("migration") or {}).get("mode", "hook") for v in found.values()}
    assert modes == {"hook", "initContainer"} and any(v.get("useHelmHooks") is False for v in found.values())


@pytest.mark.parametrize("name", sorted(_ci_values()))
def test_ci_values_pass_helm_lint_strict_and_render_valid_restricted_pods(name: str) -> None:
    """`helm lint --strict -f ci/<name>` as chart-testing runs it, with no other values: no warning or
    error; every document valid Kubernetes; every pod within the `restricted` profile."""
    values = _ci_values()[name]
    report = helm_python.lint(CHART, values, strict=True, namespace="prod")
    assert [] == report["errors"] and [] == [m for m in report["messages"] if m["severity"] >= 2]
    docs = [doc for text in helm_python.Chart.load(CHART).render(values, name="blog", namespace="prod",
                                                                 is_install=True).values()
            for doc in yaml.safe_load_all(text) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert _pod_specs(docs)
    for spec in _pod_specs(docs):
        assert [] == restricted_violations(spec)


def test_the_plain_manifests_pods_meet_the_restricted_profile() -> None:
    specs = [doc["spec"]["template"]["spec"] for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml"
             for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] in ("Job", "Deployment")]
    assert len(specs) >= 3
    for spec in specs:
        assert [] == restricted_violations(spec)


def test_the_restricted_check_finds_what_it_must() -> None:
    spec = one(render(), "Job")["spec"]["template"]["spec"]
    spec["hostNetwork"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    spec["containers"][0]["securityContext"] = {"capabilities": {"add": ["SYS_ADMIN"]}}
    spec["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    found = " | ".join(restricted_violations(spec))
    for what in ("hostNetwork", "hostPath", "allowPrivilegeEscalation", "SYS_ADMIN", "drop ALL", "Unconfined"):
        assert what in found


# --- scheduling --------------------------------------------------------------------------------

def test_scheduling_falls_back_to_the_global_values() -> None:
    """nodeSelector, affinity, tolerations, priorityClassName: each pod's own, else the global ones
    (as the Airflow chart does); pod labels and annotations merged, the component's winning."""
    values = _ci_values()["scheduling-values.yaml"]
    docs = render(values)
    job, app = one(docs, "Job")["spec"]["template"], one(docs, "Deployment")["spec"]["template"]
    assert job["spec"]["nodeSelector"] == {"pool": "batch"} and app["spec"]["nodeSelector"] == {"pool": "services"}
    assert job["spec"]["tolerations"][0]["value"] == "batch" and app["spec"]["tolerations"][0]["value"] == "services"
    assert job["spec"]["affinity"] == app["spec"]["affinity"] == values["affinity"]
    assert (job["spec"]["priorityClassName"], app["spec"]["priorityClassName"]) == ("migrations", "services")
    assert job["metadata"]["annotations"] == {"example.org/team": "blog",
                                              "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert app["metadata"]["annotations"] == {"example.org/team": "blog"}
    assert job["metadata"]["labels"]["team"] == app["metadata"]["labels"]["team"] == "blog"
    overridden = render({**values, "podLabels": {"team": "blog"}, "app": {"podLabels": {"team": "web"}}})
    assert one(overridden, "Deployment")["spec"]["template"]["metadata"]["labels"]["team"] == "web"


def test_no_scheduling_values_render_no_scheduling_fields() -> None:
    for spec in _pod_specs(render()):
        assert not {"nodeSelector", "affinity", "tolerations", "priorityClassName"} & set(spec)


def test_app_is_ready_only_at_head() -> None:
    """The app's readiness probe is /readyz (503 until the database is at head), its Service targets it."""
    docs = render()
    app = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]

    assert "/readyz" == app["readinessProbe"]["httpGet"]["path"]
    assert "http" == one(docs, "Service")["spec"]["ports"][0]["targetPort"]


# --- bad values ------------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "message"), [
    ({"migration": {"mode": "sidecar"}}, "mode"),
    ({"database": {}}, "database"),
    ({"database": {"url": "mysql://u:p@h/db"}}, "url"),
    ({"backups": {"persistence": {"create": False}}}, "PersistentVolumeClaim"),
    ({"migration": {"mode": "initContainer"}}, "ReadWriteMany"),
    ({"migraton": {}}, "migraton"),
    ({"migration": {"mode": "hook", "ttlSecondsAfterFinished": -1}}, "ttlSecondsAfterFinished"),
    ({"database": {**NO_PASSWORD_URL, "auth": {"passwordSecret": {"name": "s"}, "passwordCommand": "c"}}},
     "two would both give the password"),
    ({"database": {**NO_PASSWORD_URL, "auth": {"provider": "aws-rds-iam", "passwordCommand": "c"}}},
     "two would both give the password"),
    ({"database": {**NO_PASSWORD_URL, "auth": {"provider": "okta"}}}, "provider"),
])
def test_bad_values_fail_to_render_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    """Unknown modes or keys, no database, backups without a claim: rendering fails and says why."""
    merged = {**values} if "database" in values else {**URL_VALUES, **values}
    chart = helm_python.Chart.load(CHART)

    with pytest.raises(helm_python.HelmError) as failure:
        chart.render(merged, name="blog", namespace="prod", is_install=True)

    assert message in str(failure.value)


# --- validation ------------------------------------------------------------------------------

VALUE_SETS = {
    "default": {},
    "existing-secret": {"database": {"existingSecret": "blog-db"}},
    "init-container": {"migration": {"mode": "initContainer"}, "app": {"replicas": 1}},
    "no-hooks": {"useHelmHooks": False},
    "backups-off": {"backups": {"mode": "off"}},
    "existing-claim-ttl": {"backups": {"persistence": {"existingClaim": "b"}},
                           "migration": {"mode": "hook", "ttlSecondsAfterFinished": 0}},
    "no-app": {"app": {"enabled": False}},
    "password-file": {"database": {**NO_PASSWORD_URL, "auth": {"passwordSecret": {"name": "blog-db"}}},
                      "migration": {"rehearse": True}},
    "cloud-iam-ca": {"database": {**NO_PASSWORD_URL, "auth": {"provider": "azure-entra"},
                                  "tls": {"caConfigMap": "ca"}}},
    "drift-cronjob": {"drift": {"enabled": True, "exclude": "public.pgboss_*"}},
}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_document_is_valid_kubernetes(name: str) -> None:
    """Each document validates strictly against the current Kubernetes schema."""
    docs = render(VALUE_SETS[name])

    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_finds_no_error(name: str) -> None:
    """helm lint (strict) reports no warning or error for the value sets."""
    report = helm_python.lint(CHART, {**URL_VALUES, **VALUE_SETS[name]}, strict=True, namespace="prod")

    assert [] == report["errors"]
    assert [] == [m for m in report["messages"] if m["severity"] >= 2]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_pod_meets_the_restricted_pod_security_profile(name: str) -> None:
    for spec in _pod_specs(render(VALUE_SETS[name])):
        assert [] == restricted_violations(spec)


def test_plain_manifests_are_valid_kubernetes() -> None:
    """Every resource file in deploy/k8s validates strictly."""
    files = [f for f in K8S.rglob("*.yaml") if f.name != "kustomization.yaml"]

    assert len(files) >= 7
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_kustomizations_list_files_that_exist() -> None:
    """Each kustomization's resources exist, and the two overlays build on the base."""
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / resource).exists(), (kustomization, resource)
    for overlay in ("job", "init-container"):
        assert "../../base" in yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())["resources"]


# --- pods, simulated -------------------------------------------------------------------------

def _pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Job", "Deployment")] + [
        d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for d in docs if d["kind"] == "CronJob"]


def _containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for spec in _pod_specs(docs) for c in spec.get("initContainers", []) + spec["containers"]]


def _image_config() -> tuple[list[str], dict[str, str]]:
    """The job image's ENTRYPOINT and ENV, read from the Dockerfile's final stage."""
    text = DOCKERFILE.read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    env_block = re.search(r"^ENV PATH=/opt/venv/bin:\$PATH \\\n((?:    .*\n)+)", text, re.M).group(1)
    env = dict(re.findall(r"(\w+)=(\S+?)(?: \\)?$", env_block, re.M))
    assert entrypoint and env
    return entrypoint, env


def _pod_command(container: dict[str, Any], docs: list[dict[str, Any]], secrets: dict[str, dict[str, str]],
                 mounts: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """The container's exact command line and environment, with the image's ENV, Secrets resolved,
    and its mount paths mapped onto local folders (/app is the repository, as the image lays it out)."""
    entrypoint, image_env = _image_config()
    for secret in (d for d in docs if d["kind"] == "Secret"):
        secrets.setdefault(secret["metadata"]["name"], secret["stringData"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIGRATE_", "DATABASE_URL", "ALEMBIC_", "PG"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(image_env)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    mapped = {"/app": ROOT, **mounts}
    for name, value in env.items():
        for path, local in mapped.items():
            if value == path or value.startswith(path + "/"):
                env[name] = str(local) + value[len(path):]
    argv = (container.get("command") or entrypoint) + container.get("args", [])
    return argv, env


def _run_pods(argv: list[str], env: dict[str, str], copies: int) -> list[Result]:
    procs = [subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(copies)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(Result(proc.returncode, out, err))
    return results


def test_hook_job_pods_migrate_once_and_the_app_pods_then_start(db: Db, tmp_path: Path) -> None:
    """Four copies of the rendered Job's container run together: all exit 0, the migrations run once;
    then the app's wait-for-migrations init container returns 0."""
    db.holds_data()
    docs = render({"database": {"existingSecret": "blog-db"}})
    secrets = {"blog-db": {"DATABASE_URL": db.url}}
    backups = tmp_path / "backups"
    backups.mkdir()
    job = one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]
    argv, env = _pod_command(job, docs, secrets, {"/backups": backups})

    results = _run_pods(argv, env, copies=4)

    assert [0, 0, 0, 0] == [r.code for r in results], [r.stdout[-400:] for r in results]
    assert 6 == sum(len(r.events("migration.done")) for r in results)
    assert ["0006"] == db.version()
    assert 1 == len(list(backups.glob("*.dump")))
    (init,) = one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    argv, env = _pod_command(init, docs, secrets, {})
    assert [0, 0] == [r.code for r in _run_pods(argv, env, copies=2)]


def test_the_drift_cronjob_runs_drift_read_only_and_fails_on_a_hand_made_change(db: Db, tmp_path: Path) -> None:
    """drift.enabled: a CronJob whose container runs `drift` with the same image, Secret and
    excludes, no backups mounted; played against the example's database it exits 0, then 9 with
    the difference in its termination message once the schema is changed by hand."""
    assert "CronJob" not in kinds(render())
    docs = render({"database": {"existingSecret": "blog-db"}, "drift": {"enabled": True, "exclude": "public.pgboss_*"}})
    cron = one(docs, "CronJob")
    assert ("17 6 * * *", "Forbid") == (cron["spec"]["schedule"], cron["spec"]["concurrencyPolicy"])
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert ["drift"] == container["args"] and "/backups" not in _mounts(container).values()
    assert "public.pgboss_*" == env_of(container)["MIGRATE_DRIFT_EXCLUDE"]
    secrets = {"blog-db": {"DATABASE_URL": db.url}}
    assert 0 == run_job("run", env=base_env(DATABASE_URL=db.url, MIGRATE_BACKUP="off",
                                            MIGRATE_TERMINATION_LOG=str(tmp_path / "migrated"))).code
    argv, env = _pod_command(container, docs, secrets, {})
    env["MIGRATE_TERMINATION_LOG"] = str(tmp_path / "termination-log")

    (clean,) = _run_pods(argv, env, copies=1)
    db.query("CREATE TABLE pgboss_jobs (id int); CREATE INDEX hotfix ON posts (title)")
    (drifted,) = _run_pods(argv, env, copies=1)

    assert 0 == clean.code, clean.stdout[-600:]
    assert 9 == drifted.code
    assert {"public.hotfix"} == {e["object"] for e in drifted.events("drift.difference")}
    assert "failed (exit 9): drift: index public.hotfix" in (tmp_path / "termination-log").read_text()


def test_init_container_pods_migrate_once(db: Db, tmp_path: Path) -> None:
    """In initContainer mode, four app pods' init containers run together: all exit 0, one migrates."""
    docs = render({"migration": {"mode": "initContainer"}, "database": {"url": db.url},
                   "backups": {"persistence": {"accessModes": ["ReadWriteMany"]}}})
    backups = tmp_path / "backups"
    backups.mkdir()
    (init,) = one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    argv, env = _pod_command(init, docs, {}, {"/backups": backups})

    results = _run_pods(argv, env, copies=4)

    assert [0, 0, 0, 0] == [r.code for r in results]
    assert ["migrated", "up-to-date", "up-to-date", "up-to-date"] == sorted(r.event("run.done")["outcome"] for r in results)
    assert ["0006"] == db.version()


# --- the image -------------------------------------------------------------------------------

def test_dockerfile_is_hadolint_clean() -> None:
    """hadolint finds nothing in the Dockerfile (not even a warning)."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")

    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)

    assert 0 == result.returncode, result.stdout + result.stderr


INSTALL_STEPS = ["pip install --requirement requirements.txt", "pip install --no-deps ."]


def test_image_venv_built_the_dockerfile_way_runs_the_entrypoint(db: Db, tmp_path: Path) -> None:
    """A venv built with the Dockerfile's own install commands (from the local wheelhouse) has a
    working `migrate-job` that writes the manifest and migrates from the image's /app layout."""
    text = DOCKERFILE.read_text()
    for step in INSTALL_STEPS:
        assert f"RUN {step}\n" in text
    wheels = ROOT / ".local" / "wheels"
    assert wheels.is_dir(), "run `make install` first: it fills .local/wheels for this test"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("requirements.txt", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "job", src / "job", ignore=shutil.ignore_patterns("__pycache__"))
    build_env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PIP_NO_INDEX": "1",
                 "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for step in INSTALL_STEPS:
        subprocess.run(step.split(), cwd=src, env=build_env, check=True, capture_output=True)
    app = tmp_path / "app"  # the image's /app
    app.mkdir()
    shutil.copy(ROOT / "alembic.ini", app)
    shutil.copytree(ROOT / "alembic", app / "alembic", ignore=shutil.ignore_patterns("migrate-job-heads.json", "__pycache__"))
    shutil.copytree(ROOT / "app", app / "app", ignore=shutil.ignore_patterns("__pycache__"))
    run_env = {k: v for k, v in build_env.items() if not k.startswith(("MIGRATE_", "PIP_", "DATABASE_URL"))}
    run_env.update(ALEMBIC_CONFIG=str(app / "alembic.ini"), MIGRATE_BACKUP="off", DATABASE_URL=db.url,
                   PYTHONPATH="")
    entrypoint = str(venv / "bin" / "migrate-job")

    assert 0 == subprocess.run([entrypoint, "manifest"], cwd=app, env=run_env, capture_output=True).returncode
    result = subprocess.run([entrypoint, "run"], cwd=app, env=run_env, capture_output=True, text=True)

    assert 0 == result.returncode, result.stdout + result.stderr
    assert ["0006"] == db.version()
    assert str(venv) in subprocess.run([str(venv / "bin" / "python"), "-c", "import job; print(job.__file__)"],
                                       capture_output=True, text=True, cwd=tmp_path).stdout


def test_every_values_key_has_a_comment_above_it() -> None:
    """values.yaml documents each key on the line above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        above = next((lines[i].strip() for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        if not above.startswith("#"):
            undocumented.append(f"{number + 1}: {stripped}")

    assert [] == undocumented


# --- a fleet -----------------------------------------------------------------------------------

def test_a_fleet_shared_among_shards_is_an_indexed_job_that_retries_each_shard_alone() -> None:
    values = {"migration": {"fleet": {"targets": "tenant_a,tenant_b", "shards": 3, "parallelism": 2,
                                      "failFast": True}}, "backups": {"mode": "off"}}
    job = one(render(values), "Job")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"]) == \
        ("Indexed", 3, 2, 2)
    assert "backoffLimit" not in spec  # (a shard's retries are its own: backoffLimitPerIndex)
    env = env_of(spec["template"]["spec"]["containers"][0])
    assert {k: v for k, v in env.items() if k.startswith("MIGRATE_FLEET")} == {
        "MIGRATE_FLEET": "tenant_a,tenant_b", "MIGRATE_FLEET_PARALLEL": "4", "MIGRATE_FLEET_CANARY": "0",
        "MIGRATE_FLEET_FAIL_FAST": "true", "MIGRATE_FLEET_SHARDS": "3"}
    assert env["MIGRATE_TENANT_SCHEMA_VIA"] == "search_path"
    kubernetes_validate.validate(job, KUBERNETES, strict=True)
    # the app waits for the whole fleet, not a shard of it
    (waiter,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert waiter["args"][:2] == ["check", "--wait"]
    assert env_of(waiter)["MIGRATE_FLEET"] == "tenant_a,tenant_b" and "MIGRATE_FLEET_SHARDS" not in env_of(waiter)
    # an env.py that takes its tenant from -x: the migration and the app's wait both give it
    by_x = {"migration": {"fleet": {"targets": "tenant_a", "schemaVia": "x:tenant"}}, "backups": {"mode": "off"}}
    docs = render(by_x)
    assert env_of(one(docs, "Job")["spec"]["template"]["spec"]["containers"][0])["MIGRATE_TENANT_SCHEMA_VIA"] == \
        "x:tenant"
    (waiter,) = one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert env_of(waiter)["MIGRATE_TENANT_SCHEMA_VIA"] == "x:tenant"


def test_a_fleet_in_one_pod_is_a_plain_job_and_no_fleet_renders_nothing_of_it() -> None:
    one_pod = one(render({"migration": {"fleet": {"targets": "@/etc/tenants/list"}}, "backups": {"mode": "off"}}),
                  "Job")["spec"]
    assert "completionMode" not in one_pod and one_pod["backoffLimit"] == 2
    env = env_of(one_pod["template"]["spec"]["containers"][0])
    assert env["MIGRATE_FLEET"] == "@/etc/tenants/list" and "MIGRATE_FLEET_SHARDS" not in env
    plain = env_of(one(render(), "Job")["spec"]["template"]["spec"]["containers"][0])
    assert not [k for k in plain if k.startswith("MIGRATE_FLEET")]


@pytest.mark.parametrize("values, message", [
    ({"migration": {"fleet": {"shards": 3}}, "backups": {"mode": "off"}}, "it needs migration.mode: hook and migration.fleet.targets"),
    ({"migration": {"mode": "initContainer", "fleet": {"targets": "a", "shards": 2}}, "backups": {"mode": "off"}},
     "it needs migration.mode: hook"),
    ({"migration": {"fleet": {"targets": "a", "shards": 2}}, "backups": {"persistence": {"create": True}}},
     "must be ReadWriteMany"),
    ({"migration": {"fleet": {"parallel": 0}}}, "parallel"),
    ({"migration": {"fleet": {"targets": "a", "schemaVia": "x:"}}}, "schemaVia"),
    ({"migration": {"fleet": {"targets": "a", "schemaVia": "search-path"}}}, "schemaVia"),
])
def test_fleet_values_that_cannot_work_fail_to_render(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception) as raised:
        render(values)
    assert message in str(raised.value)
