"""Schedulers that reuse work (issue 16): sweeper's PBT and promotion against Hyperband and Ray Tune.

    python bench/schedulers.py --tiny                  # quickstart's tiny random BERT, 60 s each, ~7 min
    python bench/schedulers.py --device cpu            # MiniLM-L6 cut to 2 cores, 150 s each, 15-18 min
    python bench/schedulers.py --device cpu --seed 1   # another study seed: split, samplers, trial seeds
    python bench/schedulers.py --device cuda           # GPU size (bench/gpu_session.sh schedulers)
    python bench/schedulers.py --tiny --contenders random-hyperband,pbt,ray-pbt --budget 30 --json out.json

One run, one task, one device budget for every contender, run one after another:

1. ``random-hyperband``: sweeper, random sampler, ``pruner="hyperband"`` (today's kind of search);
2. ``tpe-hyperband``: sweeper, TPE, Hyperband;
3. ``asha-promotion``: sweeper, random sampler, ``pruner="asha"`` (pause at a rung, resume when
   promoted: sweeper/promotion.py);
4. ``pbt``: sweeper, ``scheduler="pbt"`` (sweeper/pbt.py), initial members drawn at random;
5. ``ray-pbt``: Ray Tune's ``PopulationBasedTraining`` with the same population, interval and
   explore settings (quantile 0.25, resample probability 0.25, factors 1.2 / 0.8: Ray's defaults,
   which are sweeper's too);
6. ``ray-asha``: Ray Tune's ``ASHAScheduler`` (random search, grace period 1 evaluation, η = 3 as
   sweeper's Hyperband and promotion use, ``max_t`` the evaluations of a whole trial).

The sweeper contenders run through the real ``sweeper launch`` (a subprocess) of one study file
this script writes, with ``--set`` overrides and ``--timeout`` the budget; the script stops the
launch (one Ctrl-C: workers hand their trials back) if it is still running when the budget is
spent. The Ray contenders drive the same training code: a function trainable that loads the
same study file and does what ``sweeper.objective`` does for a trial (the study's data through
``prepare_data``, the model through ``sweep.model.build`` seeded as ``Objective.prepare`` seeds
it, ``finetune.loop.train`` with the same ``LoopSettings``), with ``Hooks`` that save the
loop's ``TrainState`` as a Ray checkpoint and report each evaluation through ``tune.report``;
Ray ends a stopped trial inside that call. PBT's exploit restores the donor's checkpoint: the
trainable starts again from that ``TrainState`` with its new hyperparameters, exactly as a
sweeper PBT segment starts from its parent's. Ray runs ``--workers`` trials at a time (one CPU
each; on a GPU, a 1/workers share of it), reuses its actors (so a worker process keeps its
frozen-prefix cache, as a sweeper worker does), and stops at ``time_budget_s``, the budget.

The budget is device-seconds: wall seconds times devices, where a device is a worker's core on a
CPU (``--workers`` of them) and the one GPU on a GPU. Each contender's clock starts when its
``sweeper launch`` starts, or when ``Tuner.fit`` is called (``ray.init``, the start of Ray's own
cluster, is before it and not counted: generous to Ray). The data are tokenised and the model
prepared once, before any clock starts, and every contender reads them from that cache.

Figures per contender:
- the held-out test accuracy of its selected model. Selection uses the sweep's own validation
  split (carved from the training sentences with the study seed; the Ray trainable prepares the
  same split) and nothing else: for sweeper, the best complete trial as ``record.ranked`` ranks
  them (a PBT segment's value is its last evaluation), scored once by
  ``finalize.evaluate_on_test``; for Ray, the best reported validation figure (a tie: the
  earlier), whose model is in the checkpoint Ray kept for it (the best two per trial by the
  metric, and the latest), scored by the same evaluation. The test split is SST-2 validation
  (``--tiny``: the synthetic task's held-out sentences);
- the device-seconds it took to FIRST reach the validation figure of random-hyperband's selected
  model (None if it never did), from the time of each evaluation: sweeper's worker logs
  ("trial N evaluation K: V", stamped to the second; the end of that second is used), the
  trainable's own clock for Ray.

Then the two targets of issue 16 as measured ratios: (a) PBT's and promotion's device-seconds to
that figure over random-hyperband's own, (b) sweeper PBT's test accuracy minus Ray PBT's.

What the CPU size cuts from the issue's task (MiniLM-L6 on SST-2): 1,500 training sentences
(``random.Random(0)`` shuffle; 20% of them are the validation split), max length 64, the top 2
of 6 blocks train (fixed: PBT never changes a structural value), 2 epochs, 4 evaluations per
epoch (8 per trial), learning rate and weight decay searched, 2 workers, 150 s, PBT population
4. The GPU size (not run yet): 8,000 sentences (10% validation), all 6 blocks, 4 workers on the
GPU, 90 s each, population 8. ``--tiny``:
the quickstart's random 2-block BERT on its synthetic task, 4 epochs of 2 evaluations, learning
rate, weight decay and λ of ``l2sp`` searched, 60 s each. One seed is one run: the ordering of
close contenders is within noise (one validation sentence is 1/300 of accuracy here), and Ray
Tune's own draws (its random search, PBT's explore) are not seeded.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import common

SWEEPER_CONTENDERS = ("random-hyperband", "tpe-hyperband", "asha-promotion", "pbt")
RAY_CONTENDERS = ("ray-pbt", "ray-asha")
CONTENDERS = SWEEPER_CONTENDERS + RAY_CONTENDERS
REFERENCE = "random-hyperband"  # the figure every contender is timed to
RAY_HINT = "pip install 'ray[tune]'"
EVALUATION_LINE = re.compile(r"(?P<clock>\d\d:\d\d:\d\d) .*sweeper\.objective: trial (?P<trial>\d+) "
                             r"evaluation \d+: (?P<value>[-+.\deE]+|nan)$")  # objective.py's log line
TICKETS = 400  # the trial budget of the non-PBT sweeps: more than the time budget allows


# --------------------------------------------------------------------------- the task


@dataclass
class Size:
    """One size of the task, and the budget each contender gets."""

    budget_s: float  # wall seconds for each contender
    workers: int  # trials trained at once
    population: int  # PBT members (sweeper's and Ray's)
    study: str  # the study file's text, with {fields} from the run


TINY = '''
"""Written by bench/schedulers.py (--tiny): the quickstart's model and task, depth fixed."""
from sweeper import Float, LogFloat, Sweep, SyntheticText, TinyTextClassifier

sweep = Sweep(
    name="schedulers",
    model=TinyTextClassifier(layers=2, hidden=64, heads=2),
    data=SyntheticText(n_train=2000, n_test=500),
    space={{
        "learning_rate": LogFloat(3e-4, 1e-2),  # wider than the quickstart's: room for a schedule to matter
        "weight_decay": LogFloat(1e-6, 1e-1),
        "pretrain_loss_weight": LogFloat(1e-4, 1e-1),  # λ of l2sp
        "unfreeze_depth": 2,  # of 2: fixed, since PBT never changes a structural value
        "batch_size": 32,
    }},
    pretrain_loss="l2sp",
    epochs=4,
    evals_per_epoch=2,
    metric="accuracy",
    direction="maximize",
    keep=3,
)
'''

MINILM = '''
"""Written by bench/schedulers.py: MiniLM-L6 on SST-2 sentences, depth fixed."""
from sweeper import LogFloat, Sweep, TextClassifier, TextData

sweep = Sweep(
    name="schedulers",
    model=TextClassifier({model!r}),
    data=TextData({data!r}, max_length=64, validation_fraction={fraction}),
    space={{
        "learning_rate": LogFloat(1e-5, 1e-3),
        "weight_decay": LogFloat(1e-4, 3e-1),
        "unfreeze_depth": {depth},  # of 6: fixed, since PBT never changes a structural value
        "batch_size": 32,
    }},
    epochs=2,
    evals_per_epoch=4,
    metric="accuracy",
    direction="maximize",
    keep=3,
)
'''


def size_of(args: argparse.Namespace, device: str) -> Size:
    if args.tiny:
        return Size(60.0, 2, 4, TINY)
    if device == "cuda":
        return Size(90.0, 4, 8, MINILM)
    return Size(150.0, 2, 4, MINILM)


def write_study(args: argparse.Namespace, device: str, size: Size, work: Path) -> Path:
    """The one study file every contender runs (Ray's trainable loads it too)."""
    fields: dict[str, Any] = {}
    if not args.tiny:
        gpu = device == "cuda"
        rows = common.read_sst2("train", args.samples or (8_000 if gpu else 1_500), seed=0)
        data = work / "data"
        common.write_tsv(data, "train", rows)
        common.write_tsv(data, "validation", common.read_sst2("validation"))  # the held-out test
        fields = {"model": str(common.minilm()), "data": str(data), "fraction": 0.1 if gpu else 0.2,
                  "depth": 6 if gpu else 2}
    path = work / "study.py"
    path.write_text(textwrap.dedent(size.study.format(**fields)).lstrip())
    return path


def warm_cache(study: Path, work: Path, seed: int) -> Path:
    """Tokenise the data and build the model once, before any clock starts; returns the cache."""
    from sweeper import objective
    from sweeper import study as study_mod

    sweep = study_mod.load(str(study), [f"output_dir={work / 'warm'}", f"seed={seed}"])
    data, _ = objective.prepare_data(sweep)
    sweep.model.build(data.num_labels, sweep.cache_dir)  # the tiny model is written into the cache here
    return sweep.cache_dir


def segments_per_member(study: Path) -> int:
    from sweeper import study as study_mod

    return study_mod.load(str(study)).max_evaluations  # perturbation_interval 1: one segment per evaluation


# --------------------------------------------------------------------------- what a contender gives back


@dataclass
class Evaluation:
    at: float  # epoch seconds
    trial: str
    value: float


@dataclass
class Outcome:
    name: str
    started: float  # epoch seconds: the contender's clock starts here
    ended: float
    devices: int
    evaluations: list[Evaluation] = field(default_factory=list)
    trials: int = 0
    selected: str | None = None  # the selected trial
    selected_validation: float | None = None
    test: float | None = None
    note: str = ""
    load: float | None = None
    first_trial_at: float | None = None  # epoch seconds: its first trial began (after start-up)

    def device_seconds(self, at: float) -> float:
        return max(0.0, at - self.started) * self.devices

    def first_reach(self, target: float) -> float | None:
        """Device-seconds to the first evaluation at or above ``target`` (maximised metric)."""
        times = [e.at for e in self.evaluations if e.value >= target]
        return round(self.device_seconds(min(times)), 1) if times else None

    def first_reach_after_start_up(self, target: float) -> float | None:
        """The same, counted from its first trial's start: without the start-up of its workers."""
        reach = self.first_reach(target)
        if reach is None or self.first_trial_at is None:
            return None
        return round(max(0.0, reach - self.device_seconds(self.first_trial_at)), 1)

    def row(self, target: float | None) -> dict[str, Any]:
        best = max((e.value for e in self.evaluations), default=None)
        return {
            "contender": self.name, "trials": self.trials, "evaluations": len(self.evaluations),
            "device_s": round(self.device_seconds(self.ended), 1),
            "start_up_s": round(self.first_trial_at - self.started, 1) if self.first_trial_at else None,
            "best_validation": best, "selected": self.selected, "selected_validation": self.selected_validation,
            "test": self.test, "reach_device_s": self.first_reach(target) if target is not None else None,
            "reach_after_start_up": self.first_reach_after_start_up(target) if target is not None else None,
            "load_1m": self.load, "note": self.note,
        }


# --------------------------------------------------------------------------- sweeper's contenders


def sweeper_overrides(name: str, population: int, segments: int) -> list[str]:
    if name == "random-hyperband":
        return ["sampler=random", "pruner=hyperband", f"n_trials={TICKETS}"]
    if name == "tpe-hyperband":
        return ["sampler=tpe", "pruner=hyperband", f"n_trials={TICKETS}"]
    if name == "asha-promotion":
        return ["sampler=random", "pruner=asha", "reduction_factor=3", f"n_trials={TICKETS}"]
    # PBT's budget is its segments: every member trains one whole run.
    return ["sampler=random", "pruner=none", "scheduler=pbt", f"population={population}",
            "perturbation_interval=1", "quantile=0.25", "resample_probability=0.25",
            "perturbation_factors=[1.2,0.8]", f"n_trials={population * segments}"]


def run_sweeper(name: str, study: Path, cache: Path, args: argparse.Namespace, device: str,
                work: Path) -> Outcome:
    """``sweeper launch`` of the study with ``name``'s settings, stopped when the budget is spent."""
    import optuna

    from sweeper import checkpoints, finalize, record
    from sweeper import study as study_mod

    folder = work / name
    shutil.copytree(cache, folder / "cache")  # the warm cache: no contender tokenises on its clock
    url = f"sqlite:///{folder / 'study.db'}"
    overrides = [f"output_dir={folder}", f"seed={args.seed}",
                 *sweeper_overrides(name, args.population, segments_per_member(study))]
    command = [sys.executable, "-m", "sweeper", "launch", str(study), "--workers", str(args.workers),
               "--storage", url, "--timeout", str(args.budget)]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "SWEEPER_THREADS": str(args.threads)}
    env.pop("SWEEPER_STORAGE", None)
    if device == "cuda":
        command += ["--workers-per-gpu", str(args.workers), "--gpus", "0"]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = folder / "launch.log"
    started = time.time()
    with open(log, "w") as out:
        launch = subprocess.Popen(command, cwd=common.ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        stopped = _wait_or_stop(launch, started + args.budget)
    ended = min(time.time(), started + args.budget)
    if launch.returncode not in (0, 130) and not stopped:
        raise SystemExit(f"schedulers: `sweeper launch` for {name} failed ({launch.returncode}):\n"
                         f"{log.read_text()[-3000:]}")

    sweep = study_mod.load(str(study), overrides)
    loaded = optuna.load_study(study_name=sweep.name, storage=url)
    trials = loaded.get_trials(deepcopy=False)
    outcome = Outcome(name, started, ended, devices(device, args.workers), load=_load())
    outcome.evaluations = [e for e in worker_evaluations(folder / "logs", started) if e.at <= started + args.budget]
    outcome.trials = sum(1 for t in trials if t.datetime_start is not None)
    begun = [t.datetime_start.timestamp() for t in trials if t.datetime_start is not None]
    outcome.first_trial_at = min(begun) if begun else None
    ranked = [t for t in record.ranked(trials, loaded.direction)
              if t.datetime_complete is not None and t.datetime_complete.timestamp() <= started + args.budget]
    if not ranked:
        outcome.note = "no trial completed within the budget"
        return outcome
    best = ranked[0]
    store = checkpoints.open_store(checkpoints.location_of(sweep, loaded), sweep.output_path)
    outcome.selected, outcome.selected_validation = f"trial {best.number}", float(best.value or 0.0)
    recorded = record.BEST_TEST.get(loaded) or {}  # a launch that ended by itself scored its best already
    outcome.test = (float(recorded["value"]) if recorded.get("trial") == best.number
                    else finalize.evaluate_on_test(sweep, store, best)[sweep.metric])
    if name == "pbt":
        outcome.note = f"population {args.population}, {len(trials)} segments"
    return outcome


def _wait_or_stop(launch: subprocess.Popen[bytes], deadline: float) -> bool:
    """Wait for ``launch``; at ``deadline`` stop it as one Ctrl-C does (workers hand their trials
    back), then a second one. Returns whether it had to be stopped."""
    while launch.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if launch.poll() is not None:
        return False
    launch.send_signal(signal.SIGINT)
    try:
        launch.wait(timeout=60)
    except subprocess.TimeoutExpired:
        launch.send_signal(signal.SIGINT)  # the second Ctrl-C kills the workers
        launch.wait(timeout=30)
    return True


def worker_evaluations(logs: Path, started: float) -> list[Evaluation]:
    """Every evaluation sweeper's workers logged ("HH:MM:SS [worker i] INFO sweeper.objective:
    trial N evaluation K: V"), at the end of its second. A PBT segment's replay of its parent's
    curve is not logged, so each evaluation counts once."""
    day = datetime.fromtimestamp(started).date()
    found = []
    for path in sorted(logs.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            match = EVALUATION_LINE.match(line)
            if match is None:
                continue
            clock, trial, value = match.group("clock"), match.group("trial"), float(match.group("value"))
            stamp = datetime.combine(day, datetime.strptime(clock, "%H:%M:%S").time())
            if stamp.timestamp() < started - 3600:  # past midnight since the start
                stamp += timedelta(days=1)
            found.append(Evaluation(stamp.timestamp() + 1.0, f"trial {trial}", value))
    return sorted(found, key=lambda e: e.at)


def devices(device: str, workers: int) -> int:
    """Devices a contender holds: a core per worker on a CPU, the one GPU on a GPU."""
    return 1 if device == "cuda" else workers


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- Ray Tune's contenders


def ray_trial(config: dict[str, Any], study: str, overrides: list[str], log: str, device: str, threads: int) -> None:
    """One Ray Tune trial of the study, trained as ``sweeper.objective`` trains a trial.

    Module-level and importing only sweeper, torch and Ray, so that Ray's workers can run it."""
    import torch
    from ray import tune

    from sweeper import objective
    from sweeper import study as study_mod
    from sweeper.finetune import freeze
    from sweeper.finetune.loop import Hooks, Hyper, LoopSettings, TrainState, train

    torch.set_num_threads(threads)
    trial_id = tune.get_context().get_trial_id()
    with open(Path(log).with_name("starts.jsonl"), "a") as out:
        out.write(json.dumps({"trial": trial_id, "at": time.time()}) + "\n")
    sweep = study_mod.load(study, overrides)
    data, tokenizer = objective.prepare_data(sweep)  # from the warm cache
    params = {name: config.get(name, value) for name, value in sweep.space.items()}  # constants, then draws
    hyper = Hyper(**params)
    number = int(trial_id.rsplit("_", 1)[-1]) if trial_id and trial_id.rsplit("_", 1)[-1].isdigit() else 0
    seed = objective.trial_seed(sweep.seed, number)
    torch.manual_seed(objective.head_seed(sweep.seed) if sweep.head_init == "shared" else seed)
    adapter = sweep.model.build(data.num_labels, sweep.cache_dir, hyper.dropout, data.label_names)
    freeze.check_depth(adapter.num_blocks if hyper.unfreeze_depth is None else hyper.unfreeze_depth,
                       adapter.num_blocks)
    lm_head = (sweep.model.pretrained_lm_head(sweep.cache_dir)  # type: ignore[union-attr]
               if sweep.pretrain_loss == "mlm" else None)  # only text models have one: the study check says so
    settings = LoopSettings(
        epochs=sweep.epochs, metric=sweep.metric, direction=sweep.direction, device=torch.device(device),
        seed=seed, pretrain_loss=sweep.pretrain_loss, evals_per_epoch=sweep.evals_per_epoch,
        eval_every_steps=sweep.eval_every_steps, bf16=sweep.bf16, compile=sweep.compile)
    resume: TrainState | None = None
    checkpoint = tune.get_checkpoint()  # a PBT exploit's donor, or this trial's own after a pause
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / "state.pt", weights_only=False)

    class RayHooks(Hooks):
        def evaluated(self, evaluation: int, value: float, all_metrics: dict[str, float], improved: bool,
                      snapshot: Any) -> None:
            state, at = snapshot(), time.time()
            # Before the report, since Ray may end a stopped trial inside it: this evaluation, and
            # its model where it is the best of the run so far (the selection's candidates, kept
            # here because Ray's own checkpoint retention is not the selection's to rely on).
            row: dict[str, Any] = {"trial": trial_id, "evaluation": evaluation, "value": value, "at": at}
            with open(log, "a+") as out:
                fcntl.flock(out, fcntl.LOCK_EX)
                out.seek(0)
                best = max((json.loads(line)["value"] for line in out if line.strip()), default=None)
                if best is None or value >= best:
                    row["model"] = str(Path(log).with_name(f"model-{trial_id}-{evaluation}-{time.time_ns()}.pt"))
                    torch.save(state.model, row["model"])
                out.write(json.dumps(row) + "\n")
            with tempfile.TemporaryDirectory(prefix="ray-state-") as folder:
                torch.save(state, Path(folder) / "state.pt")
                tune.report({sweep.metric: value, "evaluation": evaluation, "at": at},
                            checkpoint=tune.Checkpoint.from_directory(folder))

    train(adapter, data, hyper, settings, RayHooks(), resume, lm_head=lm_head, tokenizer=tokenizer)


def ray_space(space: dict[str, Any]) -> dict[str, Any]:
    """The study's searched values as Ray Tune distributions (constants stay the study's)."""
    from ray import tune

    from sweeper import space as space_mod

    found: dict[str, Any] = {}
    for name, dist in space.items():
        if isinstance(dist, space_mod.LogFloat):
            found[name] = tune.loguniform(dist.low, dist.high)
        elif isinstance(dist, space_mod.Float):
            found[name] = (tune.quniform(dist.low, dist.high, dist.step) if dist.step
                           else tune.uniform(dist.low, dist.high))
        elif isinstance(dist, space_mod.Int):
            found[name] = tune.qrandint(dist.low, dist.high, dist.step)
        elif isinstance(dist, space_mod.Categorical):
            found[name] = tune.choice(list(dist.choices))
    return found


def run_ray(name: str, study: Path, cache: Path, args: argparse.Namespace, device: str, work: Path) -> Outcome:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no per-trial result boxes on the console
    import ray
    import torch
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    from sweeper import study as study_mod
    from sweeper.finetune.loop import evaluate, load_trained

    folder = work / name
    shutil.copytree(cache, folder / "cache")
    overrides = [f"output_dir={folder}", f"seed={args.seed}"]
    sweep = study_mod.load(str(study), overrides)
    space = ray_space(sweep.space)
    log = folder / "evaluations.jsonl"
    env = {"SWEEPER_THREADS": str(args.threads), "PYTHONPATH": str(common.ROOT),
           "TRANSFORMERS_VERBOSITY": "error"}
    if device != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # Ray's sockets live under its temp folder, and a Unix socket's path has at most 107 bytes:
    # a short folder of its own, not one under the work folder.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=args.workers, num_gpus=1 if device == "cuda" else 0, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": env}, _temp_dir=ray_tmp)
    logging.getLogger("ray").setLevel(logging.ERROR)  # ray.init sets its own level: PBT logs every decision
    try:
        if name == "ray-pbt":
            scheduler: Any = PopulationBasedTraining(
                time_attr="training_iteration", perturbation_interval=1, hyperparam_mutations=space,
                quantile_fraction=0.25, resample_probability=0.25, perturbation_factors=(1.2, 0.8))
            samples = args.population
        else:
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sweep.max_evaluations, grace_period=1,
                                      reduction_factor=3)
            samples = TICKETS
        trainable = tune.with_parameters(ray_trial, study=str(study), overrides=overrides, log=str(log),
                                         device=device, threads=args.threads)
        resources: dict[str, float] = {"cpu": 1.0, "gpu": 1 / args.workers} if device == "cuda" else {"cpu": 1.0}
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources), param_space=space,
            tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler, num_samples=samples,
                                        time_budget_s=args.budget, max_concurrent_trials=args.workers,
                                        reuse_actors=True),
            # Every checkpoint kept: with `num_to_keep`, Ray 2.60's PBT deleted a checkpoint
            # twice after an exploit and then skipped exploits for want of one (seen here).
            run_config=tune.RunConfig(name=name, storage_path=str(folder / "ray-results"), verbose=0))
        started = time.time()
        results = tuner.fit()
        ended = min(time.time(), started + args.budget)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    outcome = Outcome(name, started, ended, devices(device, args.workers), load=_load())
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    rows = [r for r in rows if r["at"] <= started + args.budget]
    outcome.evaluations = sorted((Evaluation(r["at"], r["trial"], r["value"]) for r in rows), key=lambda e: e.at)
    starts = folder / "starts.jsonl"
    if starts.exists():
        outcome.first_trial_at = min(json.loads(line)["at"] for line in starts.read_text().splitlines() if line.strip())
    outcome.trials = len({e.trial for e in outcome.evaluations})
    del results  # the figures are the trainable's own records, above
    # The selected model: the best validation figure reported, the earlier of a tie.
    candidates = [r for r in rows if "model" in r]
    if not candidates:
        outcome.note = "no trial reported within the budget"
        return outcome
    chosen = min(candidates, key=lambda r: (-r["value"], r["at"]))
    from sweeper import objective

    data, _ = objective.prepare_data(sweep)
    adapter = sweep.model.build(data.num_labels, sweep.cache_dir, None, data.label_names)
    load_trained(adapter, torch.load(chosen["model"], weights_only=False))
    run_on = torch.device("cuda" if device == "cuda" else "cpu")
    adapter.to(run_on)
    outcome.selected = f"{chosen['trial']} evaluation {chosen['evaluation']}"
    outcome.selected_validation = float(chosen["value"])
    outcome.test = evaluate(adapter, data.test, run_on, sweep.bf16, data.num_labels)[sweep.metric]
    if name == "ray-pbt":
        outcome.note = f"population {args.population}"
    return outcome


# --------------------------------------------------------------------------- the run


def report(outcomes: dict[str, Outcome], target: float | None) -> dict[str, Any]:
    rows = [o.row(target) for o in outcomes.values()]
    print("\n" + common.table(rows, ["contender", "trials", "evaluations", "device_s", "start_up_s",
                                     "best_validation", "selected_validation", "test", "reach_device_s",
                                     "reach_after_start_up", "load_1m", "note"]))
    checks: dict[str, Any] = {"target_validation": target}
    reference = outcomes.get(REFERENCE)
    base = reference.first_reach(target) if reference is not None and target is not None else None
    if target is not None:
        print(f"\nthe figure to reach: {target:.4f}, the validation accuracy of {REFERENCE}'s selected model, "
              f"which it first reached after {base} device-s")
    base_net = reference.first_reach_after_start_up(target) if reference is not None and target is not None else None
    for name in ("pbt", "asha-promotion"):
        if name not in outcomes or not base or target is None:
            continue
        reach, net = outcomes[name].first_reach(target), outcomes[name].first_reach_after_start_up(target)
        ratio = round(reach / base, 3) if reach is not None else None
        ratio_net = round(net / base_net, 3) if net is not None and base_net else None
        checks[f"{name}_reach_over_{REFERENCE}"] = ratio
        checks[f"{name}_reach_over_{REFERENCE}_after_start_up"] = ratio_net
        print(f"(a) {name}: {reach if reach is not None else 'never'} device-s to it: {ratio} of {REFERENCE}'s "
              f"{base}; after start-up {net} of {base_net}: {ratio_net} (target: at most 0.5)")
    ours, theirs = outcomes.get("pbt"), outcomes.get("ray-pbt")
    if ours and theirs and ours.test is not None and theirs.test is not None:
        checks["pbt_test_minus_ray_pbt"] = round(ours.test - theirs.test, 4)
        print(f"(b) sweeper PBT test accuracy {ours.test:.4f}, Ray Tune PBT {theirs.test:.4f}: "
              f"difference {ours.test - theirs.test:+.4f} (target: at least 0)")
    return {"rows": rows, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.device_arg(parser)
    parser.add_argument("--tiny", action="store_true", help="the quickstart's tiny random model and synthetic task")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated, from {', '.join(CONTENDERS)} (default: all)")
    parser.add_argument("--budget", type=float, help="wall seconds for each contender (default 60 --tiny, "
                                                       "150 on cpu, 90 on cuda)")
    parser.add_argument("--workers", type=int, help="trials at once (default 2, 4 on cuda)")
    parser.add_argument("--population", type=int, help="PBT members, sweeper's and Ray's (default 4, 8 on cuda)")
    parser.add_argument("--samples", type=int, help="SST-2 training sentences (default 1,500; 8,000 on cuda)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the study seed: its validation split, sweeper's samplers, every trial's seed (default 0)")
    parser.add_argument("--workdir", help="keep every contender's files here (default: a temporary folder)")
    args = parser.parse_args()
    chosen = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CONTENDERS]
    if unknown:
        parser.exit(2, f"schedulers.py: --contenders {','.join(unknown)}: unknown; "
                       f"choose from {', '.join(CONTENDERS)}\n")
    device = common.resolve_device(args.device, args.threads)
    common.quiet()
    size = size_of(args, device)
    args.budget = args.budget or size.budget_s
    args.workers = args.workers or size.workers
    args.population = args.population or size.population
    if any(c in RAY_CONTENDERS for c in chosen):
        try:
            import ray.tune  # noqa: F401  (Ray is the contender here, not a sweeper dependency)
        except ImportError:
            print(f"schedulers: {', '.join(c for c in chosen if c in RAY_CONTENDERS)} skipped: Ray Tune is not "
                  f"installed here ({RAY_HINT})")
            chosen = [c for c in chosen if c not in RAY_CONTENDERS]
    if not chosen:
        parser.exit(2, "schedulers.py: no contender left to run\n")
    # The reference first: every other contender is timed to its figure.
    chosen.sort(key=lambda c: CONTENDERS.index(c))
    result: dict[str, Any] = {"machine": common.machine(), "device": device, "tiny": args.tiny,
                              "budget_s": args.budget, "workers": args.workers, "seed": args.seed,
                              "population": args.population,
                              "devices": devices(device, args.workers), "contenders": chosen}
    print(f"{'tiny model' if args.tiny else 'MiniLM-L6 on SST-2'}, {device}, {args.workers} workers, "
          f"{args.budget:.0f} s ({args.budget * devices(device, args.workers):.0f} device-s) each; {result['machine']}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="sweeper-schedulers-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        study = write_study(args, device, size, work)
        cache = warm_cache(study, work, args.seed)
        outcomes: dict[str, Outcome] = {}
        for name in chosen:
            if name in RAY_CONTENDERS:
                outcome = run_ray(name, study, cache, args, device, work)
            else:
                outcome = run_sweeper(name, study, cache, args, device, work)
            outcomes[name] = outcome
            print(f"{name}: {outcome.trials} trials, {len(outcome.evaluations)} evaluations, selected "
                  f"{outcome.selected} (validation {outcome.selected_validation}), test {outcome.test}", flush=True)
        reference = outcomes.get(REFERENCE)
        target = reference.selected_validation if reference is not None else None
        result.update(report(outcomes, target))
        result["evaluations"] = {name: [(round(e.at - o.started, 1), e.trial, e.value) for e in o.evaluations]
                                 for name, o in outcomes.items()}
    common.finish(args, result)


if __name__ == "__main__":
    main()
