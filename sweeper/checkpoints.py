"""Trial checkpoints in Optuna's artifact store.

Two kinds, both in the study's artifact store (a folder by default, an S3 bucket when the
study's ``artifacts`` is ``s3://bucket/prefix``):

- the *model checkpoint* of a finished trial: its best evaluation (not merely its last
  step), in the model's own format (Hugging Face ``save_pretrained`` with safetensors and the
  tokenizer, or a safetensors state dict for a CNN), plus ``trial.json`` with the trial's
  parameters, metrics and the resolved study configuration. Each file is uploaded with
  ``optuna.artifacts.upload_artifact``, so the dashboard lists it beside its trial; its
  SHA-256 is recorded on the trial (user attribute ``checkpoint``) and checked before the
  files are handed out.
- the *resume state* of a running trial: trainable weights, optimizer and scheduler state
  and the evaluation history, in one safetensors file (the non-tensor part as JSON in its
  metadata). Written at every evaluation under a fresh id, recorded on the trial (user
  attribute ``resume``) only once complete, and deleted when the trial ends. A retry of a
  trial cut off by a dead or preempted worker continues from it.

Study-wide keep-top-k runs at the end of every trial and of the sweep: only the best ``k``
complete trials keep their checkpoint files (the best is never removed), a trial that failed,
was pruned or was retried keeps none (a worker that died while saving leaves part of one),
and the study records which trials lost theirs (user attribute ``checkpoint_deleted:<n>``). Optuna does not
record which artifact store a study uses, so ``sweeper launch`` records an explicit
``artifacts`` setting on the study (user attribute ``artifact_store``) for readers elsewhere.

Nothing is ever pickled, and loading never executes code from a checkpoint: weights are
safetensors, everything else JSON, and ``sweeper best`` refuses to hand out a file in a
format that can run code when loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState

from sweeper import optuna_adapter, record
from sweeper.errors import SweepError

if TYPE_CHECKING:
    import torch

    from sweeper.finetune.loop import TrainState
    from sweeper.study import Sweep

logger = logging.getLogger(__name__)

# Never handed out, whatever the storage says: these formats can run code when loaded.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc", ".so")


class StoreError(SweepError):
    """The artifact store refused a read or a write (full, unwritable, unreachable)."""


def location_of(sweep: Sweep, study: optuna.Study | None = None) -> str | None:
    """The ``artifacts`` setting to use: the study file's (with ``--set``) when it names one,
    else the one recorded on the study at launch (so that ``sweeper best`` on another machine
    finds an S3 store), else None for the default folder in the output folder."""
    if sweep.artifacts:
        return str(sweep.artifacts)
    recorded = record.ARTIFACT_STORE.get(study) if study is not None else None
    return str(recorded) if recorded else None


def record_location(study: optuna.Study, sweep: Sweep) -> None:
    """Remember on the study which store its checkpoints go to: Optuna does not. Only an
    explicit setting is recorded; the default folder follows the output folder wherever the
    sweep's files are moved."""
    if not sweep.artifacts:
        return
    location = str(sweep.artifacts)
    if not location.startswith("s3://"):
        location = os.path.abspath(os.path.expanduser(location))
    record.ARTIFACT_STORE.set(study, location)


def open_store(location: str | None, output_dir: Path, *, create: bool = True) -> Any:
    """The artifact store for ``location``: a folder, ``s3://bucket/prefix``, or the default
    (``output_dir/artifacts``). A reader passes ``create=False``: a missing folder is then an
    error, not a new empty store."""
    if location and location.startswith("s3://"):
        return _s3_store(location)
    base = Path(os.path.expanduser(location)) if location else Path(output_dir) / "artifacts"
    if not create:
        if not base.is_dir():
            raise SweepError(f"the artifact folder {str(base)!r} does not exist: set `artifacts` "
                             "(--set artifacts=DIR or s3://bucket/prefix) to where the sweep wrote "
                             "its checkpoints")
        return optuna.artifacts.FileSystemArtifactStore(base_path=str(base))
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"cannot create the artifact folder {str(base)!r} ({exc.strerror}): "
                         "set `artifacts` to a writable folder") from None
    return optuna.artifacts.FileSystemArtifactStore(base_path=str(base))


def _s3_store(location: str) -> Any:
    try:
        import boto3  # optional: pip install 'sweeper[s3]'
        from botocore.config import Config
    except ImportError:
        raise SweepError(f"the artifact store {location} needs boto3: pip install 'sweeper[s3]'") from None
    from optuna.artifacts import Boto3ArtifactStore

    bucket, _, prefix = location[len("s3://"):].partition("/")
    if not bucket:
        raise SweepError(f"`artifacts` is {location!r}, which names no bucket: use s3://BUCKET/PREFIX")
    # Bounded retries and timeouts: an unreachable endpoint fails a trial (or `sweeper best`)
    # within seconds, with its reason, instead of hanging the worker.
    config = Config(connect_timeout=10, read_timeout=120, retries={"max_attempts": 3, "mode": "standard"})
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=config)
    store = Boto3ArtifactStore(bucket, client=client)
    return _PrefixedStore(store, prefix.strip("/")) if prefix.strip("/") else store


class _PrefixedStore:
    """An artifact store that keeps its objects under ``prefix/`` of another store."""

    def __init__(self, inner: Any, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def open_reader(self, artifact_id: str) -> Any:
        return self.inner.open_reader(f"{self.prefix}/{artifact_id}")

    def write(self, artifact_id: str, content_body: Any) -> None:
        self.inner.write(f"{self.prefix}/{artifact_id}", content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(f"{self.prefix}/{artifact_id}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- model checkpoints


def save_model(
    store: Any, trial: optuna.Trial, adapter: Any, tokenizer: Any, record: dict[str, Any]
) -> dict[str, Any]:
    """Upload ``adapter`` (already holding its best weights) and ``record`` as the trial's
    checkpoint; return what is recorded on the trial.

    All or nothing: when a file cannot be written (a full disk, an unwritable folder, an
    unreachable bucket) the files already uploaded are removed again and a ``StoreError``
    says why, so that a failed trial leaves no half checkpoint behind.
    """
    files: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sweeper-ckpt-") as tmp:
            folder = Path(tmp)
            adapter.save(folder, tokenizer)
            (folder / "trial.json").write_text(json.dumps(record, indent=1, default=str))
            for path in sorted(folder.iterdir()):
                artifact_id = optuna.artifacts.upload_artifact(
                    artifact_store=store, file_path=str(path), study_or_trial=trial
                )
                size = path.stat().st_size
                files[path.name] = {"id": artifact_id, "sha256": sha256_of(path), "bytes": size}
    except optuna.exceptions.UpdateFinishedTrialError:
        # Not the store: a reaper failed this trial meanwhile (its worker was cut off). The
        # files stay unreferenced for keep-top-k to find; the objective drops the trial.
        raise
    except Exception as exc:  # noqa: BLE001  (OSError from a folder, botocore errors from S3)
        _remove_partial_upload(store, trial)
        raise StoreError(f"cannot write the checkpoint of trial {trial.number} ({failure_reason(exc)}): free "
                         "space on the artifact store, or point `artifacts` at a writable folder or "
                         "bucket; the other trials are unaffected") from None
    return {"files": files}


def _remove_partial_upload(store: Any, trial: optuna.Trial) -> None:
    """Remove every file uploaded for ``trial`` so far. ``upload_artifact`` records a file's
    metadata before it writes the file, so the metadata lists the partial one too."""
    try:
        metas = optuna.artifacts.get_all_artifact_meta(trial)
    except Exception as exc:  # noqa: BLE001  (the storage is down as well: the files stay, unreferenced)
        logger.warning("trial %d: cannot list its partial checkpoint to remove it (%s)", trial.number, exc)
        return
    for meta in metas:
        remove_quietly(store, meta.artifact_id)


def failure_reason(exc: BaseException) -> str:
    """The cause of a store failure in a few words: the OS's reason, or the S3 error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def download_model(store: Any, trial: FrozenTrial, out: Path, *, verify: bool = True) -> Path:
    """Write the checkpoint of ``trial`` into ``out``, refusing any file whose SHA-256 differs
    from the one recorded when it was saved.

    Every file is downloaded and checked in a staging folder beside ``out`` first: when one is
    missing or corrupt, nothing is handed out.
    """
    info = record.CHECKPOINT.get(trial)
    if not info:
        raise SweepError(f"trial {trial.number} has no checkpoint (it did not finish an evaluation, "
                         "or keep-top-k removed it)")
    for name in info["files"]:
        if name != Path(name).name or name.startswith(".") or name.lower().endswith(UNSAFE_SUFFIXES):
            raise SweepError(f"the checkpoint of trial {trial.number} lists a file {name!r} that "
                             "sweeper never writes (a path, or a format that can run code when "
                             "loaded): refusing to hand it out")
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sweeper-partial-", dir=out))
    handed_out = False
    try:
        for name, meta in info["files"].items():
            target = staging / name
            try:
                with store.open_reader(meta["id"]) as reader, open(target, "wb") as writer:
                    shutil.copyfileobj(reader, writer)
            except ArtifactNotFound:
                raise SweepError(f"the checkpoint file {name} of trial {trial.number} is not in the "
                                 "artifact store: it was deleted (by keep-top-k, or by hand), or "
                                 "`artifacts` points at another store") from None
            except Exception as exc:  # noqa: BLE001  (OSError from a folder, botocore errors from S3)
                raise StoreError(f"the checkpoint file {name} of trial {trial.number} cannot be copied "
                                 f"from the artifact store into {out}/ ({failure_reason(exc)}): check that the "
                                 "store is reachable (AWS_ENDPOINT_URL and credentials for S3) and "
                                 f"that {out}/ is writable") from None
            if verify and sha256_of(target) != meta["sha256"]:
                raise SweepError(f"the checkpoint file {name} of trial {trial.number} is corrupt: its "
                                 "SHA-256 differs from the one recorded when it was saved; refusing to "
                                 "hand it out (pick another trial with --trial N)")
        for name in info["files"]:
            os.replace(staging / name, out / name)
        handed_out = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not handed_out:
            shutil.rmtree(out, ignore_errors=True)
    return out


def remove_model(store: Any, trial: FrozenTrial) -> bool:
    """Delete the checkpoint files of ``trial``; False if any is still there."""
    info = record.CHECKPOINT.get(trial) or {}
    # A list, not a generator: every file is tried, even after one is refused.
    return all([remove_quietly(store, meta["id"]) for meta in info.get("files", {}).values()])  # noqa: C419


# --------------------------------------------------------------------------- resume states


def save_resume(store: Any, trial: optuna.Trial, state: TrainState) -> None:
    """Write ``state`` as the trial's resume point, then delete the one it replaces."""
    import torch  # here, not with the module: `status` and the dashboard read checkpoints' records only
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.model.items():
        tensors[f"model.{name}"] = value.contiguous()
    for name, value in (state.best_model or {}).items():
        tensors[f"best.{name}"] = value.contiguous()
    optimizer_state = {}
    for pid, slots in state.optimizer.get("state", {}).items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                optimizer_state[f"{pid}.{key}"] = value
    meta = {
        "step": state.step, "evaluations": state.evaluations, "history": state.history,
        "best_value": state.best_value, "best_evaluation": state.best_evaluation,
        "best_metrics": state.best_metrics, "scheduler": state.scheduler,
        "optimizer_groups": state.optimizer.get("param_groups", []),
        "optimizer_scalars": optimizer_state, "has_best": state.best_model is not None,
    }
    blob = save(tensors, metadata={"sweeper": json.dumps(meta, default=_json_default)})
    artifact_id = f"resume-{uuid.uuid4().hex}"
    try:
        store.write(artifact_id, io.BytesIO(blob))
    except Exception as exc:  # noqa: BLE001  (full, unwritable or unreachable: leave no partial file behind)
        remove_quietly(store, artifact_id)
        raise StoreError(f"cannot write the resume state of trial {trial.number} ({failure_reason(exc)})") from None
    previous = record.RESUME.get(trial) if hasattr(trial, "user_attrs") else None
    record.RESUME.set(trial, {"id": artifact_id, "step": state.step})
    if previous:
        remove_quietly(store, previous["id"])


def load_resume(store: Any, artifact_id: str) -> TrainState:
    from safetensors.torch import load

    from sweeper.finetune.loop import TrainState

    with store.open_reader(artifact_id) as reader:
        blob = reader.read()
    tensors = load(blob)
    from safetensors import safe_open  # metadata is only reachable through a file handle

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
        tmp.write(blob)
        tmp.flush()
        with safe_open(tmp.name, framework="pt") as handle:
            meta = json.loads(handle.metadata()["sweeper"])
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            slots.setdefault(int(pid), {})[name] = value
    for key, value in meta["optimizer_scalars"].items():
        pid, name = key.split(".", 1)
        slots.setdefault(int(pid), {})[name] = value
    groups = meta["optimizer_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return TrainState(
        step=meta["step"], evaluations=meta["evaluations"],
        model=model, optimizer={"state": slots, "param_groups": groups}, scheduler=meta["scheduler"],
        history=[tuple(h) for h in meta["history"]], best_value=meta["best_value"],
        best_evaluation=meta["best_evaluation"], best_metrics=meta["best_metrics"],
        best_model=best if meta["has_best"] else None,
    )


def remove_resume(store: Any, trial: optuna.Trial | FrozenTrial) -> None:
    """Delete the resume state of ``trial``; a live trial's record of it is cleared too."""
    info = record.RESUME.get(trial)
    if not info:
        return
    remove_quietly(store, info["id"])
    if isinstance(trial, optuna.Trial):
        try:
            record.RESUME.set(trial, None)
        except Exception as exc:  # noqa: BLE001  (already finished by another process: the record just stays)
            logger.debug("trial %d: resume record not cleared (%s)", trial.number, exc)


def remove_stale_resumes(study: optuna.Study, store: Any) -> list[int]:
    """At the end of a sweep, delete the resume states that no retry will read: those of
    trials cut off once too often (their retries were not queued). Does nothing while any
    trial is running or waiting, since a retry may yet continue from one."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return []
    removed = []
    for trial in trials:
        info = record.RESUME.get(trial)
        if info:
            remove_quietly(store, info["id"])
            removed.append(trial.number)
    if removed:
        logger.info("removed the resume states left by trials %s", removed)
    return removed


def remove_quietly(store: Any, artifact_id: str) -> bool:
    """Delete one artifact; True once it is gone (also when it already was)."""
    try:
        store.remove(artifact_id)
    except ArtifactNotFound:  # already gone: keep-top-k may run on several machines at once
        logger.debug("artifact %s already removed", artifact_id)
    except Exception as exc:  # noqa: BLE001  (the store is unreachable: the caller tries again later)
        logger.warning("cannot remove artifact %s (%s)", artifact_id, failure_reason(exc))
        return False
    return True


def _json_default(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return float(value)


# --------------------------------------------------------------------------- keep-top-k


def deleted(study: optuna.Study) -> set[int]:
    """Trials whose checkpoint keep-top-k has removed."""
    return {int(number) for number in record.CHECKPOINT_DELETED.items(study)}


def deleted_by(study: optuna.Study, trial_number: int) -> int | None:
    """The k of the keep-top-k that removed the checkpoint of ``trial_number``, if one did."""
    value = record.CHECKPOINT_DELETED.get(study, trial_number)
    if value is None:
        return None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


def keep_top_k(study: optuna.Study, store: Any, k: int) -> list[int]:
    """Delete the checkpoints of every complete trial outside the best ``k`` (the best is
    never deleted), and every model file of a trial that did not complete. Safe to run from
    several workers at once. Returns the trials cleaned.

    Only trials already told COMPLETE are ranked. Each set seen is a subset of the sweep's
    final set of trials, and a trial outside the top k of a subset is outside the top k of
    the whole, so a removal is never undone by a later trial.

    A trial that failed, was pruned or was retried keeps no model: its files are those of a
    worker that died while saving, or after saving and before telling (issue 17.6: 40 files
    where keep=2 means 10). They are found through Optuna's artifact records, which
    ``upload_artifact`` writes before each file, so a partial upload is found too.
    """
    trials = study.get_trials(deepcopy=False)
    gone = deleted(study)
    doomed = record.ranked(trials, study.direction)[max(1, k):] + [
        t for t in trials if t.state in (TrialState.FAIL, TrialState.PRUNED)]
    cleaned = []
    for trial in doomed:
        if trial.number in gone:
            continue
        ids = _model_file_ids(study, trial)
        if not ids:
            continue  # a failed trial that never saved: nothing to remove, nothing to record
        # A list, not a generator: every file is tried, even after one is refused.
        if not all([remove_quietly(store, artifact_id) for artifact_id in ids]):  # noqa: C419
            continue  # the store refused: the next clean-up tries again, so nothing is orphaned
        record.CHECKPOINT_DELETED.set(study, trial.number, k)
        cleaned.append(trial.number)
    if cleaned:
        logger.info("keep-top-%d removed the checkpoints of trials %s", k, cleaned)
    return cleaned


def _model_file_ids(study: optuna.Study, trial: FrozenTrial) -> list[str]:
    """Every model file of a finished ``trial``: those its checkpoint record lists, and those
    Optuna's artifact records list (which include a partial upload). Resume states are not
    among them: they are written to the store directly, and removed on their own terms."""
    listed = [meta["id"] for meta in (record.CHECKPOINT.get(trial) or {}).get("files", {}).values()]
    uploaded = [meta.artifact_id for meta in optuna.artifacts.get_all_artifact_meta(
        trial, storage=optuna_adapter.storage_of(study))]
    return list(dict.fromkeys(listed + uploaded))


def tidy(study: optuna.Study, store: Any, k: int) -> None:
    """Keep-top-k at the end of every trial, while the sweep runs, so that a long sweep never
    holds more than about k + (number of workers) checkpoints. A failure here is logged and
    left to the next trial's clean-up: it must not fail the trial that just ended."""
    try:
        keep_top_k(study, store, k)
    except Exception as exc:  # noqa: BLE001  (the next trial's clean-up tries again)
        logger.warning("keep-top-%d skipped this time: %s", k, failure_reason(exc))
