"""Users' own training code as sweeper trials (issue 20): a function, and a Hugging Face Trainer.

What the function does wrong is shown in-process on a real study and a real folder store (fast);
the two kinds of study run through the real CLI with two workers; a worker killed with SIGKILL
mid-trial has its trial resumed from the user's own saved state.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState

from sweeper import budget, checkpoints, record, user_train
from sweeper.errors import SweepError
from sweeper.objective import Objective
from sweeper.outcome import Outcome, WorkerInfo
from sweeper.space import LogFloat
from sweeper.storage import open_storage
from sweeper.study import Sweep
from tests.helpers import ROOT, run_cli, write_study


def _run(tmp_path: Path, train: Any, *, pruner: optuna.pruners.BasePruner | None = None,
         stop: threading.Event | None = None) -> tuple[Outcome, FrozenTrial, Any]:
    """One trial of a study whose `train` is ``train``, run by sweeper's objective in-process."""
    sweep = Sweep(name="own", train=train, space={"learning_rate": LogFloat(1e-3, 1e-1)}, metric="score",
                  direction="maximize", n_trials=1, output_dir=str(tmp_path / "out"))
    assert sweep.problems() == []
    study = optuna.create_study(direction="maximize", pruner=pruner or optuna.pruners.NopPruner(),
                                storage=f"sqlite:///{tmp_path / 'own.db'}")
    store = checkpoints.open_store(None, sweep.output_path)
    objective = Objective(sweep, study, WorkerInfo(index=0), store, stop)
    trial = study.ask()
    outcome = objective.run(trial)
    return outcome, study.get_trials()[0], store


def _saving_model(context: user_train.TrialContext) -> None:
    folder = context.scratch / "model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"\x01\x02" * 100)
    (folder / "training_args.bin").write_bytes(b"a pickle")  # never handed out
    context.save_model(folder)


def test_a_function_trial_is_valued_by_its_best_report_and_its_model_is_checkpointed_with_hashes(
        tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def train(params: dict[str, Any], device: torch.device, seed: int, context: user_train.TrialContext) -> None:
        seen.update(params=params, device=device, seed=seed, loaded=context.load())
        for value in (0.2, 0.7, 0.5):
            context.report(value, loss=1 - value)
            context.save({"last": torch.tensor([value])})
        _saving_model(context)

    outcome, trial, store = _run(tmp_path, train)
    assert outcome.state == TrialState.COMPLETE and outcome.value == 0.7
    assert seen["loaded"] is None and seen["device"] == torch.device("cpu") and seen["seed"] == trial.user_attrs["seed"]
    assert 1e-3 <= seen["params"]["learning_rate"] <= 1e-1
    assert trial.intermediate_values == {1: 0.2, 2: 0.7, 3: 0.5}
    assert record.BEST_EVALUATION.get(trial) == 2
    assert record.VALIDATION.items(trial) == {"score": 0.7, "loss": pytest.approx(0.3)}
    out = checkpoints.download_model(store, trial, tmp_path / "best")  # every SHA-256 checked
    assert (out / "weights.safetensors").read_bytes() == b"\x01\x02" * 100
    assert not (out / "training_args.bin").exists()
    saved = json.loads((out / "trial.json").read_text())
    assert saved["value"] == 0.7 and saved["best_evaluation"] == 2 and saved["model_kind"] == "user"
    assert record.RESUME.get(trial) is None, "the resume state is removed once the trial ended"


@pytest.mark.parametrize(("behaviour", "expected"), [
    ("never reports", "the train function returned without reporting: call context.report(value)"),
    ("reports NaN", "the train function reported nan at evaluation 2: report a finite number"),
    ("raises", "RuntimeError: out of ideas"),
    ("saves nothing", "the train function saved no model: call context.save_model(folder)"),
    ("saves an empty folder", "save_model("),
    ("saves what cannot be read back", "the train function saved a state that cannot be read back safely"),
])
def test_what_user_code_does_wrong_fails_its_trial_with_one_line(tmp_path: Path, behaviour: str,
                                                                  expected: str) -> None:
    def train(params: dict[str, Any], device: torch.device, seed: int, context: user_train.TrialContext) -> None:
        if behaviour == "never reports":
            _saving_model(context)
        elif behaviour == "reports NaN":
            context.report(0.5)
            context.report(math.nan)
        elif behaviour == "raises":
            context.report(0.5)
            raise RuntimeError("out of ideas")
        elif behaviour == "saves nothing":
            context.report(0.5)
        elif behaviour == "saves an empty folder":
            context.report(0.5)
            (context.scratch / "empty").mkdir()
            context.save_model(context.scratch / "empty")
        else:
            context.report(0.5)
            context.save({"a function": train})

    outcome, trial, _ = _run(tmp_path, train)
    assert outcome.state == TrialState.FAIL, outcome
    assert expected in (outcome.reason or ""), outcome.reason
    assert "\n" not in (outcome.reason or "")
    assert record.CHECKPOINT.get(trial) is None


def test_the_pruner_ends_a_function_trial_whether_the_function_lets_the_signal_through_or_not(
        tmp_path: Path) -> None:
    def lets_it_through(params: dict[str, Any], device: torch.device, seed: int,
                        context: user_train.TrialContext) -> None:
        context.report(0.1)

    def swallows_it(params: dict[str, Any], device: torch.device, seed: int, context: user_train.TrialContext) -> None:
        try:
            context.report(0.1)
        except optuna.TrialPruned:
            pass

    for index, train in enumerate((lets_it_through, swallows_it)):
        (tmp_path / str(index)).mkdir()
        outcome, _, _ = _run(tmp_path / str(index), train, pruner=optuna.pruners.ThresholdPruner(lower=0.5))
        assert outcome.state == TrialState.PRUNED and outcome.reason == "pruned at evaluation 1 with 0.1000"


def test_a_function_that_ignores_should_stop_past_the_grace_time_is_handed_back_as_preempted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(user_train, "STOP_GRACE_S", 0.3)
    stop = threading.Event()
    stop.set()  # the worker is being stopped from the start

    def ignores(params: dict[str, Any], device: torch.device, seed: int, context: user_train.TrialContext) -> None:
        while True:
            context.report(0.5)
            time.sleep(0.05)

    started = time.monotonic()
    outcome, _, _ = _run(tmp_path, ignores, stop=stop)
    assert outcome.state == TrialState.FAIL and outcome.preempted
    assert outcome.reason == "preempted: the train function ignored should_stop() for more than 0.3 s"
    assert time.monotonic() - started < 10


# --------------------------------------------------------------------------- through the real CLI

SLOW_FUNCTION_STUDY = """
    import time

    import torch
    from safetensors.torch import save_file

    from sweeper import LogFloat, Sweep

    EPOCHS = 6


    def train(params, device, seed, context):
        torch.manual_seed(seed)
        x = torch.linspace(-1, 1, 64).unsqueeze(1)
        y = 3 * x + 0.5
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=params["learning_rate"])
        state = context.load()
        first = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            first = state["epoch"]
        for epoch in range(first, EPOCHS):
            for _ in range(20):
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            time.sleep(SLEEP)
            context.report(-loss.item())
            context.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1})
            if context.should_stop():
                return
        folder = context.scratch / "model"
        folder.mkdir()
        save_file(model.state_dict(), str(folder / "model.safetensors"))
        context.save_model(folder)


    sweep = Sweep(
        name="fn",
        train=train,
        space={"learning_rate": LogFloat(0.05, 0.3)},
        metric="neg_mse",
        direction="maximize",
        n_trials=N_TRIALS,
        pruner="none",
        keep=1,
        output_dir="OUTPUT_DIR",
    )
"""


def _read(url: str) -> list[FrozenTrial]:
    """The sweep's trials; none before the launcher has made the study."""
    if not Path(url.removeprefix("sqlite:///")).exists():
        return []
    try:
        storage = open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)
    except SweepError:  # the launcher is creating the tables right now
        return []
    try:
        return optuna.load_study(study_name="fn", storage=storage).get_trials()
    except KeyError:
        return []
    finally:
        storage.dispose()


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(400)
def test_a_function_study_runs_through_the_cli_with_two_workers_and_a_killed_worker_resumes_its_state(
        tmp_path: Path) -> None:
    study = write_study(tmp_path, SLOW_FUNCTION_STUDY.replace("SLEEP", "0.4").replace("N_TRIALS", "3"))
    url = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    env = {k: v for k, v in os.environ.items() if k != "SWEEPER_STORAGE"}
    launcher = subprocess.Popen([sys.executable, "-m", "sweeper", "launch", str(study), "--workers", "2"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 200
    while victim is None and time.time() < deadline and launcher.poll() is None:
        for trial in _read(url):
            resume = record.RESUME.get(trial)
            if trial.state == TrialState.RUNNING and resume and 2 <= resume["step"] <= 4:
                victim = trial
        time.sleep(0.2)
    assert victim is not None, launcher.communicate()[1][-3000:]
    os.kill(record.PID.get(victim), signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]

    trials = _read(url)
    [retry] = [t for t in trials if record.FAILED_TRIAL.get(t) == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["resumed_from_step"] >= 2, "continued from the user's state, not restarted"
    assert sorted(retry.intermediate_values) == list(range(1, 7)), "the curve is whole"
    for step, value in victim.intermediate_values.items():  # the evaluations before the kill, replayed
        if step <= retry.user_attrs["resumed_from_step"]:
            assert retry.intermediate_values[step] == value
    tally = budget.tally(trials)
    assert (tally.finished, tally.complete, tally.retried, tally.waiting, tally.running) == (3, 3, 1, 0, 0)
    assert len({record.HOST.get(t) for t in trials if t.state == TrialState.COMPLETE}) == 1
    assert len({record.WORKER.get(t) for t in trials if t.state == TrialState.COMPLETE}) == 2, "two workers shared it"

    # keep=1: one model checkpoint is left; `sweeper best` hands it out, SHA-256 checked.
    kept = [t for t in trials if t.state == TrialState.COMPLETE and t.number not in checkpoints.deleted(
        optuna.load_study(study_name="fn", storage=open_storage(url, heartbeat_interval=None, grace_period=None)))]
    assert len(kept) == 1
    best = run_cli("best", str(study), "--out", str(tmp_path / "best"))
    assert best.returncode == 0, best.stderr
    assert (tmp_path / "best" / "model.safetensors").is_file() and f"trial {kept[0].number}:" in best.stdout


TRAINER_STUDY = """
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from sweeper import LogFloat, SweeperCallback, Sweep


    def examples(seed):
        rng = np.random.default_rng(seed)
        ids = rng.integers(5, 40, size=(96, 12))
        labels = (ids[:, :6].mean(axis=1) > ids[:, 6:].mean(axis=1)).astype(int)
        return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                                  "labels": labels.tolist()})


    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


    def train(params, device, seed, context):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=48, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32))
        out = context.scratch / "trainer"
        args = TrainingArguments(str(out), learning_rate=params["learning_rate"], num_train_epochs=2,
                                 per_device_train_batch_size=16, eval_strategy="epoch", save_strategy="epoch",
                                 seed=seed, report_to=[], use_cpu=True, logging_strategy="no",
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=examples(1), eval_dataset=examples(2),
                          compute_metrics=accuracy, callbacks=[SweeperCallback(context)])
        trainer.train(resume_from_checkpoint=SweeperCallback.resume_checkpoint(context, out))
        trainer.save_model(str(out / "best"))
        context.save_model(out / "best")


    sweep = Sweep(name="trainer", train=train, space={"learning_rate": LogFloat(1e-4, 1e-2)},
                  metric="accuracy", direction="maximize", n_trials=2, pruner="none", keep=2,
                  output_dir="OUTPUT_DIR")
"""


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(400)
def test_a_trainer_script_is_a_sweeper_trial_through_the_cli_with_two_workers(tmp_path: Path) -> None:
    study = write_study(tmp_path, TRAINER_STUDY)
    launched = run_cli("launch", str(study), "--workers", "2", timeout=360)
    assert launched.returncode == 0, launched.stderr[-3000:]
    storage = open_storage(f"sqlite:///{tmp_path / 'out' / 'study.db'}", heartbeat_interval=None, grace_period=None)
    trials = optuna.load_study(study_name="trainer", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        assert sorted(trial.intermediate_values) == [1, 2], "one report per epoch's evaluation"
        assert trial.value == max(trial.intermediate_values.values())
        assert {"accuracy", "loss"} <= set(record.VALIDATION.items(trial))
        assert "config.json" in record.CHECKPOINT.get(trial)["files"]
    best = run_cli("best", str(study), "--out", str(tmp_path / "best"))
    assert best.returncode == 0, best.stderr
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "best")  # the Trainer's own format


def test_a_stopped_trainer_saves_once_more_and_its_retry_resumes_the_trainer_from_that_checkpoint(
        tmp_path: Path) -> None:
    """The Trainer's own resume path through sweeper's store: a worker being stopped makes the
    Trainer save and stop; the retry gets the checkpoint back and `trainer.train` continues it."""
    import numpy as np
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from sweeper.hf_callback import SweeperCallback

    def examples(seed: int) -> Dataset:
        rng = np.random.default_rng(seed)
        ids = rng.integers(5, 40, size=(64, 8))
        return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                                  "labels": (ids[:, 0] > 20).astype(int).tolist()})

    class StopAfterFirstEvaluation(TrainerCallback):  # as SIGTERM would: the worker's stop event
        def __init__(self, stop: threading.Event) -> None:
            self.stop = stop

        def on_evaluate(self, *args: Any, **kwargs: Any) -> None:
            self.stop.set()

    started_at: list[int] = []

    def train(params: dict[str, Any], device: torch.device, seed: int, context: user_train.TrialContext) -> None:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=48, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32))
        out = context.scratch / "trainer"
        args = TrainingArguments(str(out), learning_rate=params["learning_rate"], num_train_epochs=3,
                                 per_device_train_batch_size=16, eval_strategy="epoch", save_strategy="no",
                                 seed=seed, report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True)
        first = [] if context.history else [StopAfterFirstEvaluation(context.stop)]
        trainer = Trainer(model=model, args=args, train_dataset=examples(1), eval_dataset=examples(2),
                          compute_metrics=lambda p: {"score": float((p.predictions.argmax(-1) == p.label_ids).mean())},
                          callbacks=[SweeperCallback(context), *first])
        resume = SweeperCallback.resume_checkpoint(context, out)
        if resume is not None:
            started_at.append(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"])
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(out / "best"))
        context.save_model(out / "best")

    sweep = Sweep(name="own", train=train, space={"learning_rate": LogFloat(1e-3, 1e-2)}, metric="score",
                  direction="maximize", n_trials=1, output_dir=str(tmp_path / "out"))
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'own.db'}")
    store = checkpoints.open_store(None, sweep.output_path)
    stop = threading.Event()
    objective = Objective(sweep, study, WorkerInfo(index=0), store, stop)
    first_trial = study.ask()
    outcome = objective.run(first_trial)
    assert outcome.state == TrialState.FAIL and outcome.preempted, outcome
    assert record.RESUME.get(study.get_trials()[0])["step"] == 1, "one evaluation, then the stop's checkpoint"
    study.tell(first_trial, state=TrialState.FAIL)

    stop.clear()  # the retry, on a worker that is not stopping
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=first_trial.params,
                                        distributions=study.get_trials()[0].distributions,
                                        system_attrs={record.RETRY_HISTORY.key: [0], record.FAILED_TRIAL.key: 0}))
    from sweeper.worker import claim

    retry = claim(study)
    assert retry is not None
    outcome = objective.run(retry)
    assert outcome.state == TrialState.COMPLETE, outcome
    # 64 examples / 16 = 4 steps an epoch: the stop came with the first evaluation (step 4), the
    # Trainer saved at the end of the next step and stopped; the retry continued from step 5.
    assert started_at == [5], "the Trainer continued at the step it saved"
    done = study.get_trials()[1]
    assert sorted(done.intermediate_values) == [1, 2, 3] and done.user_attrs["resumed_from_step"] == 1


def test_a_model_and_data_beside_train_are_checked_and_handed_to_the_function(tmp_path: Path) -> None:
    from sweeper import SyntheticText, TinyTextClassifier
    from sweeper.errors import ConfigError
    from sweeper.study import load as load_sweep

    seen: dict[str, Any] = {}

    def train(params: dict[str, Any], device: torch.device, seed: int, context: user_train.TrialContext) -> None:
        seen["data"] = context.sweep.data
        context.report(0.5)
        _saving_model(context)

    sweep = Sweep(name="own", train=train, model=TinyTextClassifier(layers=1, hidden=16, heads=2),
                  data=SyntheticText(n_train=64, n_test=32), space={"learning_rate": LogFloat(1e-3, 1e-1)},
                  metric="score", n_trials=1, output_dir=str(tmp_path / "out"))
    assert sweep.problems() == []
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 'own.db'}")
    objective = Objective(sweep, study, WorkerInfo(index=0), checkpoints.open_store(None, sweep.output_path))
    assert objective.run(study.ask()).state == TrialState.COMPLETE
    assert seen["data"] == SyntheticText(n_train=64, n_test=32)
    bad = write_study(tmp_path, """
        from sweeper import LogFloat, Sweep, SyntheticText

        def train(params, device, seed, context):
            pass

        sweep = Sweep(name="own", train=train, data=SyntheticText(n_train=-1), space={"lr": LogFloat(1e-3, 1e-1)})
    """)
    with pytest.raises(ConfigError, match="n_train"):
        load_sweep(str(bad))
