"""Trial checkpoints and resume states in a real artifact store: a folder, and a real S3 API
(moto's server on loopback) with the same test bodies; keep-top-k; what a checkpoint may
hold; and a full disk under a running sweep."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import resource
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from sweeper import checkpoints, record
from sweeper.errors import SweepError
from sweeper.finetune.loop import TrainState
from sweeper.finetune.model_specs import TinyTextClassifier
from sweeper.finetune.models import from_checkpoint
from tests.helpers import ROOT, TINY_STUDY, run_cli, write_study

# One xdist worker runs this file's tests, so its module- and session-wide fixtures are built once.
pytestmark = pytest.mark.xdist_group("checkpoints")

Store = tuple[Any, Callable[[], set[str]]]  # an opened store, and the names of what it holds


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The default folder store, or a fresh bucket of the loopback S3 server under a prefix."""
    if request.param == "folder":
        return checkpoints.open_store(None, tmp_path), lambda: set(os.listdir(tmp_path / "artifacts"))
    import boto3

    env = request.getfixturevalue("s3_env")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"sweeper-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=bucket)

    def names() -> set[str]:
        listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        assert all(o["Key"].startswith("ckpt/") for o in listed)
        return {o["Key"][len("ckpt/"):] for o in listed}

    return checkpoints.open_store(f"s3://{bucket}/ckpt", tmp_path), names


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """A small BERT classifier and its tokenizer, as a trial would save them."""
    cache = tmp_path_factory.mktemp("tiny-model")
    spec = TinyTextClassifier(layers=1, hidden=16, heads=2)
    return spec.build(2, cache), spec.tokenizer(cache)


def _state() -> TrainState:
    """A resume state after two real AdamW steps: tensors and scalars in the optimizer state."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return TrainState(step=2, evaluations=1, model=weights, optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(), history=[(1, 0.625)], best_value=0.625,
                      best_evaluation=1, best_metrics={"accuracy": 0.625, "loss": 0.7},
                      best_model={n: w + 1 for n, w in weights.items()})


def test_resume_state_round_trips_with_its_optimizer_state_and_replaces_the_previous(store: Store) -> None:
    opened, names = store
    trial = optuna.create_study().ask()
    state = _state()
    checkpoints.save_resume(opened, trial, state)
    first = record.RESUME.get(trial)["id"]
    checkpoints.save_resume(opened, trial, state)
    second = record.RESUME.get(trial)["id"]
    assert first != second and names() == {second}  # the state it replaces is gone

    loaded = checkpoints.load_resume(opened, second)
    assert (loaded.step, loaded.evaluations, loaded.history) == (2, 1, [(1, 0.625)])
    assert (loaded.best_value, loaded.best_evaluation, loaded.best_metrics) == (0.625, 1, state.best_metrics)
    for name, tensor in state.model.items():
        assert torch.equal(loaded.model[name], tensor)
        assert torch.equal(loaded.best_model[name], state.best_model[name])  # type: ignore[index]
    for pid, slots in state.optimizer["state"].items():
        for key, value in slots.items():
            assert torch.equal(torch.as_tensor(loaded.optimizer["state"][pid][key]), value), (pid, key)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(loaded.optimizer)  # what the loop does on a resume
    assert fresh.param_groups[0]["betas"] == (0.9, 0.999)
    assert loaded.scheduler["last_epoch"] == 2

    checkpoints.remove_resume(opened, trial)
    assert names() == set()
    assert record.RESUME.get(trial) is None


def test_checkpoint_is_verified_when_handed_out(store: Store, tiny: tuple[Any, Any], tmp_path: Path) -> None:
    opened, names = store
    adapter, tokenizer = tiny
    study = optuna.create_study()
    trial = study.ask()
    info = checkpoints.save_model(opened, trial, adapter, tokenizer, {"trial": trial.number, "value": 0.5})
    assert names() == {meta["id"] for meta in info["files"].values()}
    listed = optuna.artifacts.get_all_artifact_meta(trial)  # what the dashboard shows
    assert {m.filename for m in listed} == set(info["files"])
    record.CHECKPOINT.set(trial, info)
    study.tell(trial, 0.5)
    frozen = study.trials[0]

    out = checkpoints.download_model(opened, frozen, tmp_path / "out")
    for name, meta in info["files"].items():
        assert checkpoints.sha256_of(out / name) == meta["sha256"]
        assert (out / name).stat().st_size == meta["bytes"]
    assert json.loads((out / "trial.json").read_text()) == {"trial": 0, "value": 0.5}
    assert from_checkpoint(out).num_blocks == 1

    weights = info["files"]["model.safetensors"]["id"]
    opened.write(weights, io.BytesIO(b"not the weights"))
    with pytest.raises(SweepError, match=r"model.safetensors of trial 0 is corrupt: its SHA-256 differs"):
        checkpoints.download_model(opened, frozen, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def _complete(study: optuna.Study, store: Any, value: float) -> int:
    """Add a COMPLETE trial of ``value`` whose one checkpoint file is really in ``store``."""
    artifact = f"file-{uuid.uuid4().hex}"
    store.write(artifact, io.BytesIO(b"weights"))
    info = {"files": {"model.safetensors": {"id": artifact, "sha256": "-", "bytes": 7}}}
    study.add_trial(optuna.create_trial(value=value, system_attrs={record.CHECKPOINT.key: info}))
    return study.trials[-1].number


def _files(study: optuna.Study, numbers: list[int]) -> set[str]:
    trials = {t.number: t for t in study.get_trials()}
    records = [record.CHECKPOINT.get(trials[n]) for n in numbers]
    return {meta["id"] for record in records for meta in record["files"].values()}


def test_keep_top_k_keeps_the_best_k_complete_trials_and_never_the_best(store: Store) -> None:
    opened, names = store
    study = optuna.create_study(direction="maximize")
    numbers = [_complete(study, opened, v) for v in (0.6, 0.9, 0.6, 0.8, 0.7)]
    running = study.ask()  # a trial still running has a checkpoint only once it is told
    record.CHECKPOINT.set(running, {"files": {}})
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.PRUNED))

    # Ranked 1 (0.9), 3 (0.8), 4 (0.7), then the tie 0, 2 (0.6): the earlier trial first.
    assert checkpoints.keep_top_k(study, opened, 2) == [4, 0, 2]
    assert names() == _files(study, [1, 3])
    assert checkpoints.deleted(study) == {0, 2, 4} and checkpoints.deleted_by(study, 4) == 2
    assert checkpoints.keep_top_k(study, opened, 2) == []  # idempotent, from any worker
    assert checkpoints.keep_top_k(study, opened, 0) == [3]  # even k = 0 keeps the best
    assert names() == _files(study, [numbers[1]])


def test_keep_top_k_tries_again_later_when_the_store_refuses_a_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port nothing listens on: an unreachable S3 endpoint
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    unreachable = checkpoints.open_store("s3://bucket/ckpt", tmp_path)
    study = optuna.create_study(direction="maximize")
    for score in (0.5, 0.9):
        info = {"files": {"model.safetensors": {"id": f"file-{score}", "sha256": "-", "bytes": 1}}}
        study.add_trial(optuna.create_trial(value=score, system_attrs={record.CHECKPOINT.key: info}))
    assert checkpoints.keep_top_k(study, unreachable, 1) == []
    assert checkpoints.deleted(study) == set()  # not recorded as removed: its files would be orphaned


def test_a_checkpoint_folder_with_a_pickle_is_not_loaded_from_it(
    tiny: tuple[Any, Any], tmp_path: Path
) -> None:
    adapter, tokenizer = tiny
    adapter.save(tmp_path, tokenizer)
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling this object runs code: it touches the marker
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    loaded = from_checkpoint(tmp_path)  # the safetensors weights, and only them
    for name, tensor in adapter.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError):  # no safetensors: refused, never the pickle instead
        from_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "../config.json", "model.pt", "modeling_evil.py"])
def test_a_checkpoint_record_naming_an_unsafe_file_is_refused(name: str, tmp_path: Path) -> None:
    info = {"files": {name: {"id": "x", "sha256": "0" * 64, "bytes": 1}}}
    trial = optuna.create_trial(value=1.0, system_attrs={record.CHECKPOINT.key: info})
    with pytest.raises(SweepError, match="sweeper never writes"):
        checkpoints.download_model(None, trial, tmp_path / "out")  # refused before the store is read
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_into_a_missing_bucket_fails_with_the_reason(
    tiny: tuple[Any, Any], tmp_path: Path, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    opened = checkpoints.open_store("s3://no-such-bucket/ckpt", tmp_path)
    trial = optuna.create_study().ask()
    expected = r"cannot write the checkpoint of trial 0 \(.*NoSuchBucket"
    with pytest.raises(checkpoints.StoreError, match=expected):
        checkpoints.save_model(opened, trial, *tiny, {"trial": 0})


# --------------------------------------------------------------------------- a full disk


def _mount_tmpfs(path: Path, kilobytes: int) -> bool:
    """A small tmpfs at ``path``: a disk that really fills. False where mounting is not
    permitted (not root, no CAP_SYS_ADMIN)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)],
                             capture_output=True, check=False)
    return mounted.returncode == 0


def _fill(folder: Path) -> None:
    """Write zeros into ``folder`` until its file system says it is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def _launch(args: list[str], file_size_limit: int | None) -> subprocess.CompletedProcess[str]:
    """`sweeper launch`, its processes unable to write a file past ``file_size_limit`` bytes
    when given (Python ignores SIGXFSZ, so such a write fails with EFBIG)."""
    if file_size_limit is None:
        return run_cli("launch", *args)
    env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
    limit = (file_size_limit, file_size_limit)
    return subprocess.run([sys.executable, "-m", "sweeper", "launch", *args], capture_output=True,
                          text=True, check=False, timeout=240, env=env, cwd=ROOT,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limit))


@pytest.mark.slow
@pytest.mark.timeout(300)  # two launches, each importing PyTorch in three processes on 2 cores
@pytest.mark.long
def test_a_full_artifact_disk_fails_only_the_trial_that_cannot_write(tmp_path: Path, pg_url: str) -> None:
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, 4096)
    try:
        study_file = write_study(tmp_path, TINY_STUDY)
        # PostgreSQL: the database's writes are the server's, so only the artifacts feel the full disk.
        args = [str(study_file), "--storage", pg_url, "--workers", "1", "--keep", "10",
                "--set", "pruner=none", "--set", f"artifacts={disk}"]
        first = run_cli("launch", *args, "--n-trials", "1")
        assert first.returncode == 0, first.stderr[-3000:]
        study = optuna.load_study(study_name="tiny", storage=pg_url)
        before = {t.number: (t.state, t.value, t.user_attrs) for t in study.get_trials()}
        stored = set(os.listdir(disk))
        assert len(before) == 1 and len(stored) == 5  # config, weights, two tokenizer files, trial.json

        # The disk fills up; the sweep goes on with one more trial. Where no tmpfs can be
        # mounted, a file-size limit below the weights' size makes the same writes fail.
        if mounted:
            _fill(disk)
        second = _launch([*args, "--n-trials", "2"], None if mounted else 64 * 1024)
        assert second.returncode == 0, second.stderr[-3000:]  # the sweep finishes

        trials = optuna.load_study(study_name="tiny", storage=pg_url).get_trials()
        failed = trials[1]
        assert failed.state == optuna.trial.TrialState.FAIL
        reason = failed.user_attrs["fail_reason"]
        assert reason.startswith("cannot write the checkpoint of trial 1 ("), reason
        assert "free space on the artifact store" in reason
        if mounted:
            assert "No space left on device" in reason
        assert record.CHECKPOINT.get(failed) is None
        # Nothing of the earlier trial changed, and nothing of the failed one is left behind.
        assert {t.number: (t.state, t.value, t.user_attrs) for t in trials[:1]} == before
        assert set(os.listdir(disk)) - {"filler"} == stored
        opened = checkpoints.open_store(str(disk), tmp_path, create=False)
        for trial in trials[:1]:  # every file still matches its SHA-256
            checkpoints.download_model(opened, trial, tmp_path / f"trial-{trial.number}")
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)], check=False)
