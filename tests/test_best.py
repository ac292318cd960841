"""`sweeper best` and the checkpoints behind it, through the real CLI.

Each test runs once against the default folder store and once against a real S3 API (moto's
server on loopback, reached with boto3 exactly as a bucket elsewhere would be), on a small
sweep of more trials than it keeps.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from sweeper import checkpoints, finalize, record
from sweeper.study import load as load_sweep
from tests.helpers import TINY_STUDY, run_cli, write_study

# One xdist worker runs this file's tests, so its module- and session-wide fixtures are built once.
pytestmark = pytest.mark.xdist_group("best")

KEEP = 2  # the sweeps below run 4 trials and keep 2


class FolderView:
    """The objects of a folder artifact store, read and written directly."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def names(self) -> set[str]:
        return {p.name for p in self.folder.iterdir()}

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        (self.folder / name).write_bytes(data)


class BucketView:
    """The objects under a prefix of an S3 bucket, through the S3 API."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix

    def names(self) -> set[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return {o["Key"][len(self.prefix) + 1:] for o in listed.get("Contents", [])}

    def read(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")["Body"].read()

    def write(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)


def s3_client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@dataclass
class Swept:
    kind: str  # "folder" or "s3"
    study: Path  # the study file
    url: str  # its storage
    view: FolderView | BucketView  # its artifact store, seen directly
    env: dict[str, str] = field(default_factory=dict)  # what a process needs to reach the store
    unreachable: tuple[list[str], dict[str, str]] = ([], {})  # `best` arguments and env that miss it

    def load(self) -> optuna.Study:
        return optuna.load_study(study_name="tiny", storage=self.url)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_SWEPT: dict[str, Swept] = {}


@pytest.fixture(params=["folder", "s3"])
def swept(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Swept:
    """A finished sweep of 4 trials that keeps 2 checkpoints, with one worker so that the
    keep-top-k of the worker itself (not only the one at the end) has trials to remove.
    Run once per store kind and process: xdist may interleave the two kinds' tests, which
    would tear a module-scoped fixture down and run its sweep again."""
    if request.param not in _SWEPT:
        _SWEPT[request.param] = _sweep(request, tmp_path_factory)
    return _SWEPT[request.param]


def _sweep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Swept:
    folder = tmp_path_factory.mktemp(f"swept-{request.param}")
    study = write_study(folder, TINY_STUDY)
    args = ["launch", str(study), "--workers", "1", "--keep", str(KEEP), "--set", "pruner=none"]
    if request.param == "s3":
        env = dict(request.getfixturevalue("s3_env"))
        bucket = f"sweeper-{uuid.uuid4().hex[:12]}"
        client = s3_client(env)
        client.create_bucket(Bucket=bucket)
        args += ["--set", f"artifacts=s3://{bucket}/sweeps/tiny"]
        swept = Swept("s3", study, "", BucketView(client, bucket, "sweeps/tiny"), env,
                      ([], {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}))
    else:
        swept = Swept("folder", study, "", FolderView(folder / "out" / "artifacts"),
                      unreachable=(["--set", f"artifacts={folder / 'nowhere'}"], {}))
    launched = run_cli(*args, env=swept.env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    swept.url = f"sqlite:///{folder / 'out' / 'study.db'}"
    return swept


def on_swept(test: Callable[..., None]) -> Callable[..., None]:
    """A test of `swept`: slow, since the first of each store kind also runs the sweep (about
    30 s on 2 cores, more on a busy machine)."""
    return pytest.mark.slow(pytest.mark.timeout(300)(test))


def _ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return record.ranked(study.get_trials(), record.direction_of("maximize"))


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("sweeper: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


@on_swept
def test_keep_top_k_leaves_exactly_k_checkpoint_sets_and_no_resume_state(swept: Swept) -> None:
    study = swept.load()
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    ranked = _ranked(study)
    kept, removed = ranked[:KEEP], ranked[KEEP:]
    assert checkpoints.deleted(study) == {t.number for t in removed}
    # The store holds the files of the k kept trials and nothing else: no resume state, no
    # file of a removed trial.
    expected = {meta["id"] for t in kept for meta in record.CHECKPOINT.get(t)["files"].values()}
    assert swept.view.names() == expected
    assert all(record.RESUME.get(t) is None for t in complete)
    # Each kept set is a full Hugging Face folder plus trial.json, listed where the dashboard
    # looks (Optuna's artifact metadata of the trial).
    for trial in kept:
        files = record.CHECKPOINT.get(trial)["files"]
        assert {"config.json", "model.safetensors", "tokenizer.json", "trial.json"} <= set(files)
        listed = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
        assert {m.filename for m in listed} == set(files)
    # The worker removed checkpoints while the sweep ran, not only the launcher at its end.
    log = (swept.study.parent / "out" / "logs" / "worker-0.log").read_text()
    assert f"keep-top-{KEEP} removed the checkpoints of trials" in log


@on_swept
def test_best_folder_loads_with_from_pretrained_and_reproduces_the_validation_metric(
    swept: Swept, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sweeper.finetune.data import prepare
    from sweeper.finetune.loop import evaluate
    from sweeper.finetune.models import TextAdapter

    out = tmp_path / "best"
    # No --set artifacts here: an S3 store is found through the study's record of it.
    result = run_cli("best", str(swept.study), "--out", str(out), "--evaluate", env=swept.env)
    assert result.returncode == 0, result.stderr[-2000:]
    study = swept.load()
    best = _ranked(study)[0]
    expected = f"trial {best.number}: validation accuracy {best.value:.4f}, held-out test"
    assert result.stdout.startswith(expected), result.stdout

    model = AutoModelForSequenceClassification.from_pretrained(out)  # the model's own loader
    AutoTokenizer.from_pretrained(out)
    assert all(p.suffix in (".json", ".safetensors", ".txt") for p in out.iterdir())
    sweep = load_sweep(str(swept.study), [])
    data = prepare(sweep.data, sweep.cache_dir, sweep.seed, sweep.model.tokenizer(sweep.cache_dir),
                   sweep.model.identity())
    saved = json.loads((out / "trial.json").read_text())
    batch_size = saved["hyperparameters"]["batch_size"]
    cpu = torch.device("cpu")
    scores = evaluate(TextAdapter(model), data.validation, cpu, sweep.bf16, data.num_labels, batch_size)

    # The checkpoint is the trial's best evaluation, and the recorded value is its metric.
    recorded = {k[len("val_"):]: v for k, v in best.user_attrs.items() if k.startswith("val_")}
    assert best.value == recorded["accuracy"] == scores["accuracy"]
    assert best.value == max(best.intermediate_values.values())
    assert best.intermediate_values[best.user_attrs["best_evaluation"]] == best.value
    for name, value in recorded.items():  # the loss too: the weights of that evaluation exactly
        assert scores[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name

    assert saved["trial"] == best.number and saved["value"] == best.value
    assert saved["best_evaluation"] == best.user_attrs["best_evaluation"]
    assert saved["params"] == best.params
    assert saved["study"] == record.STUDY_CONFIG.get(study) and saved["study"]["keep"] == KEEP
    assert saved["seed"] == best.user_attrs["seed"]
    assert json.loads((out / "params.json").read_text()) == best.params
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["value"] == best.value and metrics["validation"] == recorded

    # --evaluate: the held-out test figure is that of the folder handed out.
    test = evaluate(TextAdapter(model), data.test, cpu, sweep.bf16, data.num_labels)
    assert metrics["test"]["accuracy"] == test["accuracy"]
    assert study.user_attrs[record.BEST_TEST.key]["trial"] == best.number
    assert f"held-out test accuracy {test['accuracy']:.4f}" in result.stdout


@on_swept
def test_corrupted_checkpoint_file_is_refused(swept: Swept, tmp_path: Path) -> None:
    best = _ranked(swept.load())[0]
    artifact = record.CHECKPOINT.get(best)["files"]["model.safetensors"]["id"]
    original = swept.view.read(artifact)
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    swept.view.write(artifact, bytes(damaged))
    out = tmp_path / "best"
    try:
        result = run_cli("best", str(swept.study), "--out", str(out), env=swept.env)
    finally:
        swept.view.write(artifact, original)
    assert result.returncode == 2, result.stderr
    line = _error_line(result.stderr)
    assert f"model.safetensors of trial {best.number} is corrupt" in line and "SHA-256" in line
    assert not out.exists()  # nothing was handed out, not even the files that were intact


@on_swept
def test_checkpoint_removed_by_keep_top_k_is_refused_clearly(swept: Swept, tmp_path: Path) -> None:
    ranked = _ranked(swept.load())
    removed = ranked[-1].number
    result = run_cli("best", str(swept.study), "--out", str(tmp_path / "t"), "--trial", str(removed),
                     env=swept.env)
    assert result.returncode == 2, result.stderr
    line = _error_line(result.stderr)
    kept = [t.number for t in ranked[:KEEP]]
    assert f"trial {removed} was removed by keep-top-{KEEP}" in line and str(kept) in line


@on_swept
def test_an_unreachable_artifact_store_is_one_clear_error(swept: Swept, tmp_path: Path) -> None:
    args, env = swept.unreachable
    result = run_cli("best", str(swept.study), "--out", str(tmp_path / "b"), *args, env=env or swept.env)
    assert result.returncode == 2, result.stderr
    line = _error_line(result.stderr)
    expected = "cannot be copied from the artifact store" if swept.kind == "s3" else "does not exist"
    assert expected in line
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_best_on_a_study_with_no_finished_trial_says_so(tmp_path: Path) -> None:
    study_file = write_study(tmp_path, TINY_STUDY)
    (tmp_path / "out").mkdir()
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}",
                                direction="maximize")
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    study.ask()  # one still running
    result = run_cli("best", str(study_file), "--out", str(tmp_path / "best"))
    assert result.returncode == 2, result.stderr
    line = _error_line(result.stderr)
    assert "has no finished trial with a checkpoint yet (0 complete, 1 running, 0 pruned, 1 failed)" in line
    assert not (tmp_path / "best").exists()


def _trial_with_checkpoint(value: float) -> optuna.trial.FrozenTrial:
    return optuna.create_trial(value=value, system_attrs={record.CHECKPOINT.key: {"files": {}}})


def test_a_test_figure_becomes_best_test_only_for_the_best_trial() -> None:
    study = optuna.create_study(direction="maximize")
    for value in (0.7, 0.9, 0.8):
        study.add_trial(_trial_with_checkpoint(value))
    finalize.record_test(study, 2, {"accuracy": 0.75}, "accuracy")  # `best --trial 2 --evaluate`
    assert study.user_attrs[record.TEST.key(2)] == {"accuracy": 0.75}
    assert record.BEST_TEST.key not in study.user_attrs
    finalize.record_test(study, 1, {"accuracy": 0.85}, "accuracy")
    assert study.user_attrs[record.BEST_TEST.key]["trial"] == 1
    assert study.user_attrs[record.BEST_TEST.key]["value"] == 0.85
