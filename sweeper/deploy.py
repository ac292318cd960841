"""Kubernetes manifests for one sweep: ``sweeper deploy k8s STUDY --workers N``.

Why they are generated: the study file, its name, the worker count, the budget, the image and
whether workers go through the storage proxy each appear in several manifests, which must
agree. ``docker/k8s/`` is this module's output for ``studies/quickstart.py`` with 4 workers,
and a test keeps the two identical, so the committed files cannot drift from the renderer.

The parts, one file each (``kubectl apply -f DIR`` applies them in name order; a pod waits for
a Secret or ConfigMap that does not exist yet):

- ``postgres.yaml``: PostgreSQL 15 as a StatefulSet with its volume, and its Service
  (left out with ``--external-db``: the URL in the Secret then names your own server);
- ``sweeps.yaml``: the shared ReadWriteMany volume for checkpoints, data caches and logs;
- ``study.yaml``: the study file, in a ConfigMap mounted at ``/sweeper/study/``;
- ``create.yaml``: a Job that creates the study and its budget once (``sweeper create``);
- ``workers.yaml``: the workers, an Indexed Job with one GPU per pod (``sweeper worker``);
- ``dashboard.yaml``: optuna-dashboard as a Deployment and a ClusterIP Service;
- ``proxy.yaml`` (``--proxy``): ``sweeper proxy`` and its Service; workers then use
  ``grpc://sweeper-proxy:13000`` and the database sees a few connections, not hundreds.

Each object is built as plain data by a function of its own and written by PyYAML; each file
opens with a comment that explains it (PyYAML writes no comments: they are prepended as text).

Secrets are never rendered: the database URL comes from the Secret ``sweeper-storage`` (key
``url``) and the PostgreSQL password from ``sweeper-postgres`` (key ``password``), both made
with ``kubectl create secret`` (README, "Scaling out"); ``secret.yaml.example`` shows their
shape. The manifests name no namespace: ``kubectl -n NAME apply`` puts them anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sweeper import __version__
from sweeper.errors import SweepError
from sweeper.storage import GRACE_PERIOD_S

DEFAULT_IMAGE = f"sweeper:{__version__}"
PROXY_PORT = 13000
DASHBOARD_PORT = 8080
STUDY_DIR = "/sweeper/study"  # where the study ConfigMap is mounted
SWEEPS_DIR = "/sweeper/sweeps"  # the image's working folder holds sweeps/{name}: this volume
UID = 1000  # the image's non-root user (docker/Dockerfile)
STOP_GRACE_S = 150  # the launcher gives workers 120 s to hand their trials back on SIGTERM
PART_OF = {"app.kubernetes.io/part-of": "sweeper"}  # the label of every object sweeper renders

Object = dict[str, Any]  # one Kubernetes object, as `kubectl apply` reads it


@dataclass
class K8sOptions:
    study_file: Path  # the study file; its text goes into the ConfigMap
    sweep_name: str  # the study's name (its `name`), for the names of the objects
    workers: int  # worker pods, one GPU each, 1..10000
    image: str = DEFAULT_IMAGE  # built from docker/Dockerfile and pushed where the cluster pulls
    proxy: bool = False  # workers reach the database through `sweeper proxy`
    postgres: bool = True  # render PostgreSQL; False when the Secret's URL names your own server
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, for every command
    n_trials: int | None = None  # the budget, if not the study's n_trials
    workers_per_gpu: int = 1  # trials sharing each pod's GPU, 1..16
    grace: int | None = None  # seconds without a heartbeat before a trial is retried (default 120)


@dataclass(frozen=True)
class Manifest:
    """One file: the comment that explains it (plain text), then its objects, a document each."""

    comment: str
    objects: list[Object]


def slug(name: str) -> str:
    """``name`` as a DNS label part: lowercase letters, digits and hyphens."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return text[:40].rstrip("-") or "sweep"


def check(options: K8sOptions) -> None:
    problems = []
    if not 1 <= options.workers <= 10000:
        problems.append(f"--workers is {options.workers}: use 1..10000")
    if not 1 <= options.workers_per_gpu <= 16:
        problems.append(f"--workers-per-gpu is {options.workers_per_gpu}: use 1..16")
    if options.n_trials is not None and options.n_trials < 1:
        problems.append(f"--n-trials is {options.n_trials}: use 1 or more")
    if options.grace is not None and options.grace < 10:
        problems.append(f"--grace is {options.grace}: use 10 seconds or more (above the heartbeat interval)")
    if not options.study_file.is_file():
        problems.append(f"the study file {options.study_file} does not exist")
    if problems:
        raise SweepError("; ".join(problems))


# --------------------------------------------------------------------------- shared parts


def _prefix(options: K8sOptions) -> str:
    """The start of the name of every object that belongs to this sweep alone."""
    return f"sweeper-{slug(options.sweep_name)}"


def _study_path(options: K8sOptions) -> str:
    return f"{STUDY_DIR}/{options.study_file.name}"


def _sets(options: K8sOptions) -> list[str]:
    return [arg for item in options.overrides for arg in ("--set", item)]


def _labels(options: K8sOptions) -> dict[str, str]:
    return {**PART_OF, "sweeper/study": slug(options.sweep_name)}


def _pod_labels(name: str) -> dict[str, str]:
    """The labels of a Deployment's or StatefulSet's pods: its selector, and sweeper's."""
    return {"app.kubernetes.io/name": name, **PART_OF}


def _database_url() -> Object:
    return {"name": "SWEEPER_STORAGE", "valueFrom": {"secretKeyRef": {"name": "sweeper-storage", "key": "url"}}}


def _worker_url(options: K8sOptions) -> Object:
    if options.proxy:
        return {"name": "SWEEPER_STORAGE", "value": f"grpc://sweeper-proxy:{PROXY_PORT}"}
    return _database_url()


def _s3_credentials() -> list[Object]:
    return [{"secretRef": {"name": "sweeper-s3", "optional": True}}]


def _pod_security() -> Object:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID}


def _volumes(options: K8sOptions) -> list[Object]:
    return [{"name": "study", "configMap": {"name": f"{_prefix(options)}-study"}},
            {"name": "sweeps", "persistentVolumeClaim": {"claimName": "sweeper-sweeps"}}]


def _mounts() -> list[Object]:
    return [{"name": "study", "mountPath": STUDY_DIR, "readOnly": True},
            {"name": "sweeps", "mountPath": SWEEPS_DIR}]


def _service(name: str, labels: dict[str, str], selector: str, port_name: str, port: int) -> Object:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
            "spec": {"selector": {"app.kubernetes.io/name": selector},
                     "ports": [{"name": port_name, "port": port, "targetPort": port}]}}


# --------------------------------------------------------------------------- the objects


def postgres_service() -> Object:
    return _service("sweeper-postgres", dict(PART_OF), "sweeper-postgres", "postgres", 5432)


def postgres_statefulset(options: K8sOptions) -> Object:
    # Without the proxy each `sweeper worker` pod holds up to about 6 connections (its
    # launcher's and its worker's pools); the proxy holds at most 6 for all of them.
    max_connections = 100 if options.proxy else max(100, 8 * options.workers + 20)
    container = {
        "name": "postgres",
        "image": "postgres:15",
        "args": ["-c", f"max_connections={max_connections}"],
        "env": [{"name": "POSTGRES_USER", "value": "sweeper"},
                {"name": "POSTGRES_DB", "value": "sweeper"},
                {"name": "POSTGRES_PASSWORD",
                 "valueFrom": {"secretKeyRef": {"name": "sweeper-postgres", "key": "password"}}},
                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
        "ports": [{"name": "postgres", "containerPort": 5432}],
        "readinessProbe": {"exec": {"command": ["pg_isready", "-U", "sweeper", "-d", "sweeper"]},
                           "periodSeconds": 5},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "sweeper-postgres", "labels": dict(PART_OF)},
        "spec": {
            "serviceName": "sweeper-postgres",
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "sweeper-postgres"}},
            "template": {"metadata": {"labels": _pod_labels("sweeper-postgres")},
                         "spec": {"containers": [container]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"},
                                      "spec": {"accessModes": ["ReadWriteOnce"],
                                               "resources": {"requests": {"storage": "20Gi"}}}}],
        },
    }


def sweeps_volume_claim() -> Object:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "sweeper-sweeps", "labels": dict(PART_OF)},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "100Gi"}}}}


def study_config_map(options: K8sOptions) -> Object:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{_prefix(options)}-study", "labels": _labels(options)},
            "data": {options.study_file.name: options.study_file.read_text()}}


def create_job(options: K8sOptions) -> Object:
    args = ["create", _study_path(options), *_sets(options)]
    if options.n_trials:
        args += ["--n-trials", str(options.n_trials)]
    container = {"name": "create", "image": options.image, "args": args, "env": [_database_url()],
                 "envFrom": _s3_credentials(), "volumeMounts": _mounts()}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{_prefix(options)}-create", "labels": _labels(options)},
        "spec": {
            "backoffLimit": 10,
            "template": {"metadata": {"labels": _labels(options)},
                         "spec": {"restartPolicy": "OnFailure", "securityContext": _pod_security(),
                                  "containers": [container], "volumes": _volumes(options)}},
        },
    }


def workers_job(options: K8sOptions) -> Object:
    study_path = _study_path(options)
    wait = ('until sweeper status "$0" > /dev/null 2>&1; do '
            f'echo "waiting for the study (Job {_prefix(options)}-create) and the storage"; sleep 10; done')
    wait_for_study = {"name": "wait-for-study", "image": options.image, "command": ["sh", "-c", wait, study_path],
                      "env": [_worker_url(options)], "volumeMounts": _mounts()}
    args = ["worker", study_path, "--workers-per-gpu", str(options.workers_per_gpu), *_sets(options)]
    if options.grace:
        args += ["--grace", str(options.grace)]
    worker = {
        "name": "worker",
        "image": options.image,
        "args": args,
        "env": [_worker_url(options)],
        "envFrom": _s3_credentials(),
        "resources": {"limits": {"nvidia.com/gpu": 1}, "requests": {"cpu": "4", "memory": "16Gi"}},
        "volumeMounts": [*_mounts(), {"name": "shm", "mountPath": "/dev/shm"}],
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{_prefix(options)}-workers", "labels": _labels(options)},
        "spec": {
            "completionMode": "Indexed",
            "completions": options.workers,
            "parallelism": options.workers,
            "backoffLimit": 3 * options.workers,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "template": {
                "metadata": {"labels": _labels(options)},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": STOP_GRACE_S,
                    "securityContext": _pod_security(),
                    "initContainers": [wait_for_study],
                    "containers": [worker],
                    "volumes": [*_volumes(options),
                                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
                },
            },
        },
    }


def dashboard_deployment(options: K8sOptions) -> Object:
    name = f"{_prefix(options)}-dashboard"
    args = ["dashboard", _study_path(options), "--host", "0.0.0.0", "--port", str(DASHBOARD_PORT), *_sets(options)]
    container = {
        "name": "dashboard",
        "image": options.image,
        "args": args,
        "env": [_database_url()],
        "envFrom": _s3_credentials(),
        "ports": [{"name": "http", "containerPort": DASHBOARD_PORT}],
        "readinessProbe": {"tcpSocket": {"port": DASHBOARD_PORT}, "periodSeconds": 10},
        "volumeMounts": _mounts(),
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": _labels(options)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {"metadata": {"labels": _pod_labels(name)},
                         "spec": {"securityContext": _pod_security(), "containers": [container],
                                  "volumes": _volumes(options)}},
        },
    }


def dashboard_service(options: K8sOptions) -> Object:
    name = f"{_prefix(options)}-dashboard"
    return _service(name, _labels(options), name, "http", DASHBOARD_PORT)


def proxy_deployment(options: K8sOptions) -> Object:
    grace = options.grace or GRACE_PERIOD_S
    container = {
        "name": "proxy",
        "image": options.image,
        "args": ["proxy", "--host", "0.0.0.0", "--port", str(PROXY_PORT), "--grace", str(grace)],
        "env": [_database_url()],
        "ports": [{"name": "grpc", "containerPort": PROXY_PORT}],
        "readinessProbe": {"tcpSocket": {"port": PROXY_PORT}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "2", "memory": "2Gi"}},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "sweeper-proxy", "labels": dict(PART_OF)},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {"app.kubernetes.io/name": "sweeper-proxy"}},
            "template": {"metadata": {"labels": _pod_labels("sweeper-proxy")},
                         "spec": {"securityContext": _pod_security(), "containers": [container]}},
        },
    }


def proxy_service() -> Object:
    return _service("sweeper-proxy", dict(PART_OF), "sweeper-proxy", "grpc", PROXY_PORT)


class _Quoted(str):
    """A string written in double quotes, whatever it holds: a ``${VARIABLE}`` that envsubst
    fills in must stay a string (a password of digits alone would otherwise be a number)."""


def storage_secrets() -> list[Object]:
    """The two Secrets the manifests read, with ``${POSTGRES_PASSWORD}`` where a value goes."""
    url = "postgresql+psycopg2://sweeper:${POSTGRES_PASSWORD}@sweeper-postgres:5432/sweeper"
    return [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sweeper-postgres"}, "type": "Opaque",
             "stringData": {"password": _Quoted("${POSTGRES_PASSWORD}")}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sweeper-storage"}, "type": "Opaque",
             "stringData": {"url": _Quoted(url)}}]


# --------------------------------------------------------------------------- the files


def manifests(options: K8sOptions) -> dict[str, Manifest]:
    """File name -> the comment and the objects of every file of the sweep."""
    check(options)
    prefix = _prefix(options)
    command = " ".join(["sweeper deploy k8s", str(options.study_file), "--workers", str(options.workers),
                        *(["--proxy"] if options.proxy else []), *(["--external-db"] if not options.postgres else [])])
    rendered = f"Rendered by `{command}` (sweeper {__version__}): change the command, not this file.\n"
    files: dict[str, Manifest] = {}
    if options.postgres:
        files["postgres.yaml"] = Manifest(rendered + """\
PostgreSQL 15 for the sweep's storage. The password comes from the Secret sweeper-postgres;
the URL every sweeper pod uses comes from the Secret sweeper-storage (see secret.yaml.example).
PGDATA is a subfolder of the volume: volumes may hold lost+found.
""", [postgres_service(), postgres_statefulset(options)])

    files["sweeps.yaml"] = Manifest(rendered + """\
Checkpoints, data caches and worker logs, shared by every sweeper pod on every node: it needs
a storage class with ReadWriteMany (NFS, CephFS, EFS, Filestore, ...). With checkpoints in S3
(the study's artifacts="s3://bucket/prefix", credentials in the optional Secret sweeper-s3),
it only holds caches and logs.
""", [sweeps_volume_claim()])

    files["study.yaml"] = Manifest(rendered + f"""\
The study file, mounted at {_study_path(options)} in every sweeper pod.
""", [study_config_map(options)])

    files["create.yaml"] = Manifest(rendered + """\
Creates the study and its budget once. The workers wait for it (their init container), so
that a single process sets the budget: tickets added by several at once would overshoot it.
Until PostgreSQL is up it fails with exit code 2 and is restarted with back-off.
""", [create_job(options)])

    files["workers.yaml"] = Manifest(rendered + f"""\
The workers: an Indexed Job, one pod per index, one GPU per pod, {options.workers} at once.
Each pod runs `sweeper worker`, which claims trials of the shared budget until it is spent
and then exits 0, completing its index. Its terminationGracePeriodSeconds ({STOP_GRACE_S} s) is the
time to checkpoint the trial and hand it back; DataLoader workers share batches through /dev/shm.

Restarts. A trial whose pod dies is not lost: its heartbeat stops, and after the grace period
({options.grace or GRACE_PERIOD_S} s) any live worker{' or the proxy' if options.proxy else ''} fails it and queues a retry with the same parameters (it resumes
from its last checkpoint). So a pod need not come back to save its trial, only to keep the
worker count, and restartPolicy Never is enough: the Job replaces a failed pod. Never is also
what podFailurePolicy needs, which tells the two failures apart that the heartbeat cannot:
- a preempted or evicted pod (DisruptionTarget) handed its trial back on SIGTERM: Ignore,
  i.e. replace it without counting it against backoffLimit;
- exit code 2 is a bad study or configuration, the same for every pod: FailJob at once
  rather than crash-looping on every GPU (the init container has just reached the storage,
  so it is not an unreachable database).
Any other failure (a crash, an OOM kill) counts; backoffLimit allows 3 per worker.
""", [workers_job(options)])

    files["dashboard.yaml"] = Manifest(rendered + f"""\
optuna-dashboard on the sweep. It has no login: the Service is ClusterIP only; reach it with
  kubectl port-forward service/{prefix}-dashboard {DASHBOARD_PORT}
""", [dashboard_deployment(options), dashboard_service(options)])

    if options.proxy:
        files["proxy.yaml"] = Manifest(rendered + """\
`sweeper proxy`: the workers' one way to the database. One replica (Recreate): it keeps no
state, and a restart costs the workers a pause (they retry their storage calls for up to
5 minutes), not their trials. It also fails and retries the trials of dead workers, which
have no native heartbeat behind it. It has no login: the Service is ClusterIP only.
""", [proxy_deployment(options), proxy_service()])

    files["secret.yaml.example"] = Manifest("""\
The two Secrets the manifests read, never committed with values. Make them with
  export POSTGRES_PASSWORD=$(openssl rand -hex 24)   # letters and digits: it goes into a URL
  envsubst < secret.yaml.example | kubectl apply -f -
or with `kubectl create secret generic` (README, "Scaling out"). kubectl apply -f DIR skips
this file (its name does not end in .yaml). With your own database (--external-db), only
sweeper-storage is needed, with that database's URL.
""", storage_secrets())
    return files


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, writing YAML the way Kubernetes manifests are read: lists indented
    under their key, multi-line text (the study file) as a literal block, no anchors."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    # PyYAML falls back to quotes where a block cannot hold the text exactly (trailing spaces).
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


def _represent_quoted(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"')


_Dumper.add_representer(str, _represent_text)
_Dumper.add_representer(_Quoted, _represent_quoted)


def dump(manifest: Manifest) -> str:
    """The text of one file: its comment, then its objects as a multi-document YAML stream."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in manifest.comment.splitlines())
    # width: a long value (the init container's shell loop) stays on one line.
    return comment + yaml.dump_all(manifest.objects, Dumper=_Dumper, sort_keys=False, allow_unicode=True,
                                   width=4096)


def render_k8s(options: K8sOptions) -> dict[str, str]:
    """File name -> YAML text of every manifest of the sweep."""
    return {name: dump(manifest) for name, manifest in manifests(options).items()}


def write(files: dict[str, str], folder: Path) -> list[Path]:
    """Write the manifests into ``folder``, replacing the rendered files already there."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written


def as_stream(files: dict[str, str]) -> str:
    """Every applicable manifest as one YAML stream, for ``kubectl apply -f -``."""
    parts = [text.rstrip("\n") + "\n" for name, text in files.items() if name.endswith(".yaml")]
    return "---\n".join(parts)
