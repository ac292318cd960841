"""docker/: the image, the compose file and the Kubernetes manifests.

Docker and a Kubernetes API server cannot run here, so these tests check everything short of
running them: every file parses; the compose file is interpolated the way compose does it;
every Kubernetes object is checked field by field against the Kubernetes API's own models (the
official Python client); every sweeper command in them is one the CLI accepts; images,
files and variables they name exist; no secret is written in them. And the compose file's
own `create` and `worker` commands run, as written, against the local PostgreSQL.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sweeper import __version__, deploy
from sweeper.cli import build_parser
from sweeper.storage import ENV_STORAGE
from tests.helpers import ROOT, TINY_STUDY, ConnectionCounter, run_cli, write_study

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
K8S = DOCKER / "k8s"
IMAGE = f"sweeper:{__version__}"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# What the compose file reads from the environment (docker/.env), and test values for them.
COMPOSE_ENV = {"POSTGRES_PASSWORD": "not-a-real-password"}


# --------------------------------------------------------------------------- compose

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """``value`` with ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}`` and ``$$`` replaced,
    as docker compose does it before it reads the file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-") and unset:
            return arg
        if op in ("?", ":?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(one, value)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as compose sees it: anchors merged, variables interpolated."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {**COMPOSE_ENV, **(env or {})})


def sweeper_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in config["services"].items() if "build" in s}


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment list; a name without ``=`` passes the host's value through."""
    items = service.get("environment", [])
    assert isinstance(items, list), "environment is a list: NAME=value, or NAME to pass it through"
    return dict((item.split("=", 1) + [None])[:2] if "=" in item else (item, None) for item in items)


def test_compose_runs_postgres_with_a_health_check_and_a_volume() -> None:
    config = compose()
    postgres = config["services"]["postgres"]
    assert postgres["image"] == "postgres:15"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in config["volumes"]
    assert "ports" not in postgres  # reached on the compose network only


def test_compose_services_use_the_image_that_docker_dockerfile_builds() -> None:
    services = sweeper_services(compose())
    assert set(services) == {"create", "worker", "dashboard"}
    for name, service in services.items():
        assert service["image"] == IMAGE, name
        assert service["build"]["context"] == ".."
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() \
            == DOCKER / "Dockerfile"
        assert "entrypoint" not in service  # the image's: sweeper


def test_compose_commands_are_ones_the_cli_accepts_on_a_study_that_exists() -> None:
    config = compose()
    mounts = {}
    for name, service in sweeper_services(config).items():
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            mounts[target] = source
        args = build_parser().parse_args(service["command"])
        assert args.command == name, name
        # studies/X inside the image is ../studies/X here (the mount), relative to docker/.
        study = (COMPOSE.parent / mounts["/sweeper/studies"] / Path(args.study).relative_to("studies")).resolve()
        assert study.is_file(), study
    assert mounts["/sweeper/sweeps"] in config["volumes"]
    dashboard = config["services"]["dashboard"]
    assert dashboard["ports"] == ["127.0.0.1:8080:8080"]  # no login: this host only


def test_compose_workers_reserve_the_gpus_and_stop_gracefully() -> None:
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["depends_on"] == {"create": {"condition": "service_completed_successfully"}}
    # The launcher gives its workers 120 s to hand their trials back: stop must wait longer.
    assert int(worker["stop_grace_period"].rstrip("s")) > 120


def test_compose_takes_every_secret_from_the_environment() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolate(raw, {})  # compose refuses to start without it
    for name, service in compose()["services"].items():
        env = environment(service)
        for key, value in env.items():
            if "PASSWORD" in key or "SECRET" in key or "TOKEN" in key or "ACCESS_KEY" in key:
                assert value in (None, COMPOSE_ENV.get(key)), f"{name}: {key} is written in the file"
        if ENV_STORAGE in env:
            assert COMPOSE_ENV["POSTGRES_PASSWORD"] in str(env[ENV_STORAGE])  # from the environment
    # Nothing in docker/ holds a password: every URL's password is a ${VARIABLE}.
    for path in DOCKER.rglob("*"):
        if path.is_file():
            for password in re.findall(r"://[^:/@\s\"]+:([^@\s\"]+)@", path.read_text()):
                assert password.startswith("${"), f"{path}: a password is written in it"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", "docker"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "docker/.env\n" not in tracked


def test_env_example_names_every_variable_the_compose_file_reads() -> None:
    read = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    example = (DOCKER / "env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    assert {"POSTGRES_PASSWORD", "SWEEPER_STUDY", "SWEEPER_GPUS", "SWEEPER_WORKERS_PER_GPU"} <= documented
    assert read - documented <= {"SWEEPER_IMAGE", "SWEEPER_STUDIES", "SWEEPER_DASHBOARD_PORT",
                                 "POSTGRES_USER", "POSTGRES_DB"}
    assert re.search(r"^POSTGRES_PASSWORD=$", example, re.MULTILINE)  # empty: compose refuses to start


# --------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_builds_in_two_stages_and_runs_sweeper_as_a_user() -> None:
    steps = dockerfile()
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = [args for op, args in final if op == "ENTRYPOINT"][-1]
    assert entrypoint == '["sweeper"]' and PYPROJECT["project"]["scripts"]["sweeper"] == "sweeper.cli:main"
    cmd = yaml.safe_load([args for op, args in final if op == "CMD"][-1])
    assert build_parser().parse_args(cmd).command == "worker" and (ROOT / cmd[1]).is_file()
    assert ("WORKDIR", "/sweeper") in final  # where compose and Kubernetes mount studies and sweeps


def test_dockerfile_installs_extras_and_copies_files_that_exist() -> None:
    steps = dockerfile()
    installs = " ".join(args for op, args in steps if op == "RUN" and "pip install" in args)
    extras = re.search(r"/src\[([a-z0-9,]+)\]", installs)
    assert extras is not None
    wanted = set(extras.group(1).split(","))
    assert {"postgres", "s3", "dashboard", "proxy"} <= wanted <= set(PYPROJECT["project"]["optional-dependencies"])
    for op, args in steps:
        if op == "COPY" and "--from=" not in args:
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {"!sweeper/", "!studies/", "!pyproject.toml", "!README.md"} <= set(ignore)


# --------------------------------------------------------------------------- Kubernetes


def k8s_problems(data: Any, type_name: str, where: str) -> list[str]:
    """Fields of ``data`` that the Kubernetes API's model ``type_name`` does not have."""
    import kubernetes.client as models

    if type_name.startswith("list["):
        if not isinstance(data, list):
            return [f"{where}: a list expected"]
        return [p for i, item in enumerate(data) for p in k8s_problems(item, type_name[5:-1], f"{where}[{i}]")]
    if type_name.startswith(("dict(", "dict[")):
        if not isinstance(data, dict):
            return [f"{where}: a mapping expected"]
        inner = type_name[type_name.index(",") + 1:-1].strip()
        return [p for k, v in data.items() for p in k8s_problems(v, inner, f"{where}.{k}")]
    if type_name == "object":  # int-or-string and free-form fields
        return []
    if type_name in ("str", "int", "bool", "float", "datetime"):
        allowed = {"str": (str, int, float), "int": (int,), "bool": (bool,), "float": (int, float),
                   "datetime": (str,)}[type_name]  # quantities may be written as numbers
        return [] if isinstance(data, allowed) else [f"{where}: {data!r} is not a {type_name}"]
    model = getattr(models, type_name)
    if not isinstance(data, dict):
        return [f"{where}: a {type_name} mapping expected"]
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    problems = []
    for key, value in data.items():
        if key not in by_json:
            problems.append(f"{where}.{key}: not a field of {type_name}")
        else:
            problems += k8s_problems(value, model.openapi_types[by_json[key]], f"{where}.{key}")
    return problems


def check_k8s_object(doc: dict[str, Any], where: str) -> None:
    """``doc`` against the Kubernetes API: no unknown field, no required field missing."""
    import kubernetes.client

    type_name = {"v1": "V1", "apps/v1": "V1", "batch/v1": "V1"}[doc["apiVersion"]] + doc["kind"]
    problems = k8s_problems(doc, type_name, where)
    assert not problems, problems
    # Building the client's model checks required fields and enumerations.
    kubernetes.client.ApiClient()._ApiClient__deserialize(doc, type_name)


def load_manifests(folder: Path) -> dict[str, list[dict[str, Any]]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
            for path in sorted(folder.iterdir()) if path.suffix in (".yaml", ".yml")}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def sweeper_args(container: dict[str, Any]) -> list[str]:
    """The sweeper command line a container runs (the image's entrypoint is `sweeper`)."""
    if "command" not in container:
        return container["args"]
    command = container["command"]
    assert command[:2] == ["sh", "-c"], container["name"]
    # `sh -c '... sweeper ARGS "$0" ...' STUDY`: the sweeper call, with $0 put back.
    script = command[2].replace('"$0"', shlex.quote(command[3]))
    call = re.search(r"sweeper ([^;>|&]+)", script)
    assert call is not None, script
    return shlex.split(call.group(1))


def quickstart_options(**changes: Any) -> deploy.K8sOptions:
    values: dict[str, Any] = {"study_file": Path("studies/quickstart.py"), "sweep_name": "quickstart", "workers": 4}
    values.update(changes)
    return deploy.K8sOptions(**values)


def test_docker_k8s_is_the_rendering_of_the_quickstart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    rendered = deploy.render_k8s(quickstart_options())
    committed = {p.name: p.read_text() for p in K8S.iterdir()}
    assert committed == rendered, ("docker/k8s/ is stale: run `sweeper deploy k8s studies/quickstart.py "
                                   "--workers 4 --out docker/k8s`")


@pytest.mark.parametrize("changes", [{}, {"proxy": True},
                                     {"postgres": False, "overrides": ["epochs=1", "data.path=a: b"],
                                      "n_trials": 7, "grace": 300, "image": "registry.example/sweeper:1"}],
                         ids=["direct", "proxy", "external-db"])
def test_each_rendered_file_loads_back_as_the_objects_its_builders_returned(
        changes: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    options = quickstart_options(**changes)
    built = deploy.manifests(options)
    rendered = deploy.render_k8s(options)
    assert list(rendered) == list(built)
    for name, manifest in built.items():
        assert list(yaml.safe_load_all(rendered[name])) == manifest.objects, name
        lines = rendered[name].splitlines()
        comment = lines[:len(manifest.comment.splitlines())]
        assert comment and all(line.startswith("#") for line in comment), name  # the comment opens the file
        assert "&id" not in rendered[name] and "*id" not in rendered[name], name  # no YAML anchors


def test_the_study_file_goes_into_its_config_map_to_the_last_character(tmp_path: Path) -> None:
    study = tmp_path / "odd.py"
    study.write_text('"""λ, a line of spaces, a tab and trailing blanks."""\n    \n\tx = 1  \nno newline at the end')
    files = deploy.render_k8s(quickstart_options(study_file=study))
    (config_map,) = yaml.safe_load_all(files["study.yaml"])
    assert config_map["data"]["odd.py"] == study.read_text()


@pytest.mark.parametrize("proxy", [False, True], ids=["direct", "proxy"])
def test_every_manifest_is_a_valid_kubernetes_object(proxy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    files = deploy.render_k8s(quickstart_options(proxy=proxy))
    for name, text in files.items():
        for i, doc in enumerate(yaml.safe_load_all(text)):
            check_k8s_object(doc, f"{name}[{i}]")
    expected = {"postgres.yaml", "sweeps.yaml", "study.yaml", "create.yaml", "workers.yaml", "dashboard.yaml",
                "secret.yaml.example"} | ({"proxy.yaml"} if proxy else set())
    assert set(files) == expected


def test_workers_are_an_indexed_job_with_one_gpu_each() -> None:
    (job,) = load_manifests(K8S)["workers.yaml"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == 4
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it; see the file's comment
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["terminationGracePeriodSeconds"] > 120  # the hand-back on SIGTERM
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_every_sweeper_command_in_the_manifests_is_accepted_and_names_the_mounted_study() -> None:
    manifests = load_manifests(K8S)
    (config_map,) = manifests["study.yaml"]
    assert config_map["data"]["quickstart.py"] == (ROOT / "studies" / "quickstart.py").read_text()
    seen = set()
    for docs in manifests.values():
        for doc in docs:
            for container in containers(doc):
                if container["image"].startswith("postgres:"):
                    continue
                assert container["image"] == IMAGE  # what compose builds from docker/Dockerfile
                args = build_parser().parse_args(sweeper_args(container))
                seen.add(args.command)
                assert args.study == f"{deploy.STUDY_DIR}/quickstart.py"
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
                assert volumes[mounts[deploy.STUDY_DIR]]["configMap"]["name"] == config_map["metadata"]["name"]
                assert mounts["/sweeper/sweeps"] == "sweeps"
    assert seen == {"create", "worker", "status", "dashboard"}


def test_manifests_read_secrets_from_kubernetes_secrets_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    for proxy in (False, True):
        files = deploy.render_k8s(quickstart_options(proxy=proxy))
        for name, text in files.items():
            if not name.endswith(".yaml"):
                continue
            for doc in yaml.safe_load_all(text):
                assert doc["kind"] != "Secret", name  # applying must not overwrite the real one
                for container in containers(doc):
                    for var in container.get("env", []):
                        if var["name"] in (ENV_STORAGE, "POSTGRES_PASSWORD"):
                            if "value" in var:  # only the proxy's address, which is no secret
                                assert proxy and var["value"] == f"grpc://sweeper-proxy:{deploy.PROXY_PORT}"
                            else:
                                assert var["valueFrom"]["secretKeyRef"]["name"] in ("sweeper-storage",
                                                                                    "sweeper-postgres")
    example = list(yaml.safe_load_all((K8S / "secret.yaml.example").read_text()))
    assert {d["metadata"]["name"] for d in example} == {"sweeper-storage", "sweeper-postgres"}
    assert example[0]["stringData"]["password"] == "${POSTGRES_PASSWORD}"
    assert "${POSTGRES_PASSWORD}@sweeper-postgres:5432" in example[1]["stringData"]["url"]


def test_with_the_proxy_only_the_workers_go_through_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    files = deploy.render_k8s(quickstart_options(proxy=True, workers=200, grace=300))
    deployment, service = yaml.safe_load_all(files["proxy.yaml"])
    (proxy,) = deployment["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(proxy["args"])
    assert (args.command, args.host, args.port, args.grace) == ("proxy", "0.0.0.0", 13000, 300)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (job,) = yaml.safe_load_all(files["workers.yaml"])
    worker = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": ENV_STORAGE, "value": "grpc://sweeper-proxy:13000"} in worker["env"]
    assert build_parser().parse_args(worker["args"]).grace == 300
    assert job["spec"]["parallelism"] == 200
    # One pool for every worker: PostgreSQL keeps its default connection limit.
    postgres = list(yaml.safe_load_all(files["postgres.yaml"]))[1]
    assert postgres["spec"]["template"]["spec"]["containers"][0]["args"] == ["-c", "max_connections=100"]


def test_without_the_proxy_postgres_allows_connections_for_every_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    files = deploy.render_k8s(quickstart_options(workers=50))
    postgres = list(yaml.safe_load_all(files["postgres.yaml"]))[1]
    limit = int(postgres["spec"]["template"]["spec"]["containers"][0]["args"][1].split("=")[1])
    assert limit >= 50 * 6  # each `sweeper worker` pod: its launcher's pools and its worker's


def test_dashboard_service_selects_its_deployment() -> None:
    deployment, service = load_manifests(K8S)["dashboard.yaml"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"  # no login: never exposed


def test_deploy_command_writes_or_prints_manifests_that_parse(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    result = run_cli("deploy", "k8s", "studies/quickstart.py", "--workers", "3", "--proxy", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "kubectl apply -f" in result.stderr
    assert yaml.safe_load((out / "workers.yaml").read_text())["spec"]["parallelism"] == 3
    printed = run_cli("deploy", "k8s", "studies/quickstart.py", "--workers", "2")
    assert printed.returncode == 0, printed.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(printed.stdout)]
    assert kinds.count("Job") == 2 and "Secret" not in kinds


def test_deploy_rejects_a_bad_worker_count_in_one_line() -> None:
    result = run_cli("deploy", "k8s", "studies/quickstart.py", "--workers", "0")
    assert result.returncode == 2
    assert "--workers is 0: use 1..10000" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- compose, run


@pytest.mark.slow
@pytest.mark.timeout(300)  # three processes import PyTorch and train on 2 cores
@pytest.mark.postgres
@pytest.mark.long
def test_the_compose_create_and_worker_commands_run_a_sweep_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """The compose file's own commands and environment, as its containers would run them: the
    working folder is the image's (studies/ inside it), `sweeper` is the entrypoint, and the
    database is the local one instead of the `postgres` service."""
    database = pg_url.rsplit("/", 1)[1]
    config = compose({"POSTGRES_USER": "postgres", "POSTGRES_DB": database, "SWEEPER_STUDY": "tiny.py"})
    (tmp_path / "studies").mkdir()
    write_study(tmp_path / "studies", TINY_STUDY.replace("n_trials=4", "n_trials=2"), name="tiny.py")

    def run(service: str) -> subprocess.CompletedProcess[str]:
        spec = config["services"][service]
        env = {k: v for k, v in os.environ.items() if k != ENV_STORAGE}
        env.update({k: v for k, v in environment(spec).items() if v is not None})
        # The compose network's name for the database is `postgres`; here it is loopback.
        env[ENV_STORAGE] = env[ENV_STORAGE].replace("@postgres:5432/", "@127.0.0.1:5432/")
        env["PYTHONPATH"] = str(ROOT)
        return subprocess.run([sys.executable, "-m", "sweeper", *spec["command"]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    assert config["services"]["worker"]["command"][:2] == ["worker", "studies/tiny.py"]
    created = run("create")
    assert created.returncode == 0, created.stderr[-3000:]
    with ConnectionCounter(database) as connections:
        worked = run("worker")
    assert worked.returncode == 0, worked.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=pg_url)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # the study's budget, exactly
    # One `sweeper worker` (its launcher and one worker process) on a few connections: the
    # number that sizes PostgreSQL's max_connections in docker/k8s without the proxy.
    assert 1 <= connections.peak <= 6
    print(f"\none `sweeper worker` with 1 worker process: peak {connections.peak} PostgreSQL connections")
