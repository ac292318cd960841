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

Secrets are never rendered: the database URL comes from the Secret ``sweeper-storage`` (key
``url``) and the PostgreSQL password from ``sweeper-postgres`` (key ``password``), both made
with ``kubectl create secret`` (README, "Scaling out"); ``secret.yaml.example`` shows their
shape. The manifests name no namespace: ``kubectl -n NAME apply`` puts them anywhere.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

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


def slug(name: str) -> str:
    """``name`` as a DNS label part: lowercase letters, digits and hyphens."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return text[:40].rstrip("-") or "sweep"


def _q(value: object) -> str:
    """A YAML scalar for ``value``: JSON strings are YAML, and quote whatever needs it."""
    return json.dumps(str(value))


def _list(items: list[str], indent: int) -> str:
    pad = " " * indent
    return "".join(f"\n{pad}- {_q(item)}" for item in items)


def _block(text: str, indent: int) -> str:
    pad = " " * indent
    return "\n".join(pad + line if line.strip() else "" for line in text.splitlines())


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


def render_k8s(options: K8sOptions) -> dict[str, str]:
    """File name -> YAML text of every manifest of the sweep."""
    check(options)
    name = slug(options.sweep_name)
    prefix = f"sweeper-{name}"
    study_name = options.study_file.name
    study_path = f"{STUDY_DIR}/{study_name}"
    grace = options.grace or GRACE_PERIOD_S
    sets = [arg for item in options.overrides for arg in ("--set", item)]
    worker_args = ["worker", study_path, "--workers-per-gpu", str(options.workers_per_gpu), *sets]
    if options.grace:
        worker_args += ["--grace", str(options.grace)]
    create_args = ["create", study_path, *sets]
    if options.n_trials:
        create_args += ["--n-trials", str(options.n_trials)]
    dashboard_args = ["dashboard", study_path, "--host", "0.0.0.0", "--port", str(DASHBOARD_PORT), *sets]
    labels = f"app.kubernetes.io/part-of: sweeper\n    sweeper/study: {_q(name)}"
    database_url = ('- name: SWEEPER_STORAGE\n'
                    '              valueFrom: {secretKeyRef: {name: sweeper-storage, key: url}}')
    worker_url = (f'- name: SWEEPER_STORAGE\n'
                  f'              value: "grpc://sweeper-proxy:{PROXY_PORT}"'
                  if options.proxy else database_url)
    pod_security = (f"securityContext: {{runAsNonRoot: true, runAsUser: {UID}, runAsGroup: {UID}, "
                    f"fsGroup: {UID}}}")
    volumes = (f"volumes:\n"
               f"        - name: study\n"
               f"          configMap: {{name: {prefix}-study}}\n"
               f"        - name: sweeps\n"
               f"          persistentVolumeClaim: {{claimName: sweeper-sweeps}}")
    mounts = (f"volumeMounts:\n"
              f"            - {{name: study, mountPath: {STUDY_DIR}, readOnly: true}}\n"
              f"            - {{name: sweeps, mountPath: {SWEEPS_DIR}}}")
    command = " ".join(["sweeper deploy k8s", str(options.study_file), "--workers", str(options.workers),
                        *(["--proxy"] if options.proxy else []), *(["--external-db"] if not options.postgres else [])])
    header = f"# Rendered by `{command}` (sweeper {__version__}): change the command, not this file.\n"
    files: dict[str, str] = {}

    if options.postgres:
        # Without the proxy each `sweeper worker` pod holds up to about 6 connections (its
        # launcher's and its worker's pools); the proxy holds at most 6 for all of them.
        max_connections = 100 if options.proxy else max(100, 8 * options.workers + 20)
        files["postgres.yaml"] = header + f"""\
# PostgreSQL 15 for the sweep's storage. The password comes from the Secret sweeper-postgres;
# the URL every sweeper pod uses comes from the Secret sweeper-storage (see secret.yaml.example).
apiVersion: v1
kind: Service
metadata:
  name: sweeper-postgres
  labels:
    app.kubernetes.io/part-of: sweeper
spec:
  selector: {{app.kubernetes.io/name: sweeper-postgres}}
  ports:
    - {{name: postgres, port: 5432, targetPort: 5432}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: sweeper-postgres
  labels:
    app.kubernetes.io/part-of: sweeper
spec:
  serviceName: sweeper-postgres
  replicas: 1
  selector:
    matchLabels: {{app.kubernetes.io/name: sweeper-postgres}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: sweeper-postgres, app.kubernetes.io/part-of: sweeper}}
    spec:
      containers:
        - name: postgres
          image: "postgres:15"
          args: ["-c", "max_connections={max_connections}"]
          env:
            - {{name: POSTGRES_USER, value: sweeper}}
            - {{name: POSTGRES_DB, value: sweeper}}
            - name: POSTGRES_PASSWORD
              valueFrom: {{secretKeyRef: {{name: sweeper-postgres, key: password}}}}
            - {{name: PGDATA, value: /var/lib/postgresql/data/pgdata}}  # a subfolder: volumes may hold lost+found
          ports:
            - {{name: postgres, containerPort: 5432}}
          readinessProbe:
            exec: {{command: [pg_isready, -U, sweeper, -d, sweeper]}}
            periodSeconds: 5
          resources:
            requests: {{cpu: "1", memory: 2Gi}}
          volumeMounts:
            - {{name: data, mountPath: /var/lib/postgresql/data}}
  volumeClaimTemplates:
    - metadata: {{name: data}}
      spec:
        accessModes: [ReadWriteOnce]
        resources:
          requests: {{storage: 20Gi}}
"""

    files["sweeps.yaml"] = header + """\
# Checkpoints, data caches and worker logs, shared by every sweeper pod on every node: it needs
# a storage class with ReadWriteMany (NFS, CephFS, EFS, Filestore, ...). With checkpoints in S3
# (the study's artifacts="s3://bucket/prefix", credentials in the optional Secret sweeper-s3),
# it only holds caches and logs.
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: sweeper-sweeps
  labels:
    app.kubernetes.io/part-of: sweeper
spec:
  accessModes: [ReadWriteMany]
  resources:
    requests: {storage: 100Gi}
"""

    files["study.yaml"] = header + f"""\
# The study file, mounted at {study_path} in every sweeper pod.
apiVersion: v1
kind: ConfigMap
metadata:
  name: {prefix}-study
  labels:
    {labels}
data:
  {study_name}: |
{_block(options.study_file.read_text(), 4)}
"""

    files["create.yaml"] = header + f"""\
# Creates the study and its budget once. The workers wait for it (their init container), so
# that a single process sets the budget: tickets added by several at once would overshoot it.
# Until PostgreSQL is up it fails with exit code 2 and is restarted with back-off.
apiVersion: batch/v1
kind: Job
metadata:
  name: {prefix}-create
  labels:
    {labels}
spec:
  backoffLimit: 10
  template:
    metadata:
      labels:
        {labels.replace(chr(10) + '    ', chr(10) + '        ')}
    spec:
      restartPolicy: OnFailure
      {pod_security}
      containers:
        - name: create
          image: {_q(options.image)}
          args:{_list(create_args, 12)}
          env:
            {database_url}
          envFrom:
            - secretRef: {{name: sweeper-s3, optional: true}}
          {mounts}
      {volumes}
"""

    wait = ('until sweeper status "$0" > /dev/null 2>&1; do '
            f'echo "waiting for the study (Job {prefix}-create) and the storage"; sleep 10; done')
    files["workers.yaml"] = header + f"""\
# The workers: an Indexed Job, one pod per index, one GPU per pod, {options.workers} at once.
# Each pod runs `sweeper worker`, which claims trials of the shared budget until it is spent
# and then exits 0, completing its index.
#
# Restarts. A trial whose pod dies is not lost: its heartbeat stops, and after the grace period
# ({grace} s) any live worker{' or the proxy' if options.proxy else ''} fails it and queues a retry with the same parameters (it resumes
# from its last checkpoint). So a pod need not come back to save its trial, only to keep the
# worker count, and restartPolicy Never is enough: the Job replaces a failed pod. Never is also
# what podFailurePolicy needs, which tells the two failures apart that the heartbeat cannot:
# - a preempted or evicted pod (DisruptionTarget) handed its trial back on SIGTERM: Ignore,
#   i.e. replace it without counting it against backoffLimit;
# - exit code 2 is a bad study or configuration, the same for every pod: FailJob at once
#   rather than crash-looping on every GPU (the init container has just reached the storage,
#   so it is not an unreachable database).
# Any other failure (a crash, an OOM kill) counts; backoffLimit allows 3 per worker.
apiVersion: batch/v1
kind: Job
metadata:
  name: {prefix}-workers
  labels:
    {labels}
spec:
  completionMode: Indexed
  completions: {options.workers}
  parallelism: {options.workers}
  backoffLimit: {3 * options.workers}
  podFailurePolicy:
    rules:
      - action: FailJob
        onExitCodes: {{containerName: worker, operator: In, values: [2]}}
      - action: Ignore
        onPodConditions:
          - {{type: DisruptionTarget}}
  template:
    metadata:
      labels:
        {labels.replace(chr(10) + '    ', chr(10) + '        ')}
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: {STOP_GRACE_S}  # time to checkpoint the trial and hand it back
      {pod_security}
      initContainers:
        - name: wait-for-study
          image: {_q(options.image)}
          command:{_list(["sh", "-c", wait, study_path], 12)}
          env:
            {worker_url}
          {mounts}
      containers:
        - name: worker
          image: {_q(options.image)}
          args:{_list(worker_args, 12)}
          env:
            {worker_url}
          envFrom:
            - secretRef: {{name: sweeper-s3, optional: true}}
          resources:
            limits: {{nvidia.com/gpu: 1}}
            requests: {{cpu: "4", memory: 16Gi}}
          {mounts}
            - {{name: shm, mountPath: /dev/shm}}  # DataLoader workers share batches through it
      {volumes}
        - name: shm
          emptyDir: {{medium: Memory, sizeLimit: 2Gi}}
"""

    files["dashboard.yaml"] = header + f"""\
# optuna-dashboard on the sweep. It has no login: the Service is ClusterIP only; reach it with
#   kubectl port-forward service/{prefix}-dashboard {DASHBOARD_PORT}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {prefix}-dashboard
  labels:
    {labels}
spec:
  replicas: 1
  selector:
    matchLabels: {{app.kubernetes.io/name: {prefix}-dashboard}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: {prefix}-dashboard, app.kubernetes.io/part-of: sweeper}}
    spec:
      {pod_security}
      containers:
        - name: dashboard
          image: {_q(options.image)}
          args:{_list(dashboard_args, 12)}
          env:
            {database_url}
          envFrom:
            - secretRef: {{name: sweeper-s3, optional: true}}
          ports:
            - {{name: http, containerPort: {DASHBOARD_PORT}}}
          readinessProbe:
            tcpSocket: {{port: {DASHBOARD_PORT}}}
            periodSeconds: 10
          {mounts}
      {volumes}
---
apiVersion: v1
kind: Service
metadata:
  name: {prefix}-dashboard
  labels:
    {labels}
spec:
  selector: {{app.kubernetes.io/name: {prefix}-dashboard}}
  ports:
    - {{name: http, port: {DASHBOARD_PORT}, targetPort: {DASHBOARD_PORT}}}
"""

    if options.proxy:
        proxy_args = ["proxy", "--host", "0.0.0.0", "--port", str(PROXY_PORT), "--grace", str(grace)]
        files["proxy.yaml"] = header + f"""\
# `sweeper proxy`: the workers' one way to the database. One replica (Recreate): it keeps no
# state, and a restart costs the workers a pause (they retry their storage calls for up to
# 5 minutes), not their trials. It also fails and retries the trials of dead workers, which
# have no native heartbeat behind it. It has no login: the Service is ClusterIP only.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: sweeper-proxy
  labels:
    app.kubernetes.io/part-of: sweeper
spec:
  replicas: 1
  strategy: {{type: Recreate}}
  selector:
    matchLabels: {{app.kubernetes.io/name: sweeper-proxy}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: sweeper-proxy, app.kubernetes.io/part-of: sweeper}}
    spec:
      {pod_security}
      containers:
        - name: proxy
          image: {_q(options.image)}
          args:{_list(proxy_args, 12)}
          env:
            {database_url}
          ports:
            - {{name: grpc, containerPort: {PROXY_PORT}}}
          readinessProbe:
            tcpSocket: {{port: {PROXY_PORT}}}
            periodSeconds: 5
          resources:
            requests: {{cpu: "2", memory: 2Gi}}
---
apiVersion: v1
kind: Service
metadata:
  name: sweeper-proxy
  labels:
    app.kubernetes.io/part-of: sweeper
spec:
  selector: {{app.kubernetes.io/name: sweeper-proxy}}
  ports:
    - {{name: grpc, port: {PROXY_PORT}, targetPort: {PROXY_PORT}}}
"""

    files["secret.yaml.example"] = """\
# The two Secrets the manifests read, never committed with values. Make them with
#   export POSTGRES_PASSWORD=$(openssl rand -hex 24)   # letters and digits: it goes into a URL
#   envsubst < secret.yaml.example | kubectl apply -f -
# or with `kubectl create secret generic` (README, "Scaling out"). kubectl apply -f DIR skips
# this file (its name does not end in .yaml). With your own database (--external-db), only
# sweeper-storage is needed, with that database's URL.
apiVersion: v1
kind: Secret
metadata:
  name: sweeper-postgres
type: Opaque
stringData:
  password: "${POSTGRES_PASSWORD}"
---
apiVersion: v1
kind: Secret
metadata:
  name: sweeper-storage
type: Opaque
stringData:
  url: "postgresql+psycopg2://sweeper:${POSTGRES_PASSWORD}@sweeper-postgres:5432/sweeper"
"""
    return files


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
