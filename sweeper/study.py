"""Study files: loading one by path, applying ``--set`` overrides, validating it whole.

A study file is a plain Python file (never imported as a package) that defines ``sweep``, a
:class:`Sweep`. ``--set key=value`` overrides any field, nested ones with dots
(``data.max_length=64``), search-space entries under ``space.`` (see ``space.py``), and two
shorthands: ``model=PATH`` loads a text model from PATH (a folder or hub name; for a CNN, a
ResNet name or weights file) and ``data=PATH`` reads the data from PATH. Every
unknown key and every bad value is reported in one error.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import os
import re
import traceback
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper import space as space_mod
from sweeper.errors import ConfigError, SweepError
from sweeper.finetune import metrics, rules
from sweeper.finetune.data import DataSpec
from sweeper.finetune.hyper import ARRAY_PRETRAIN_LOSSES, HYPERPARAMETERS, PRETRAIN_LOSSES, Hyper
from sweeper.finetune.model_specs import ModelSpec
from sweeper.finetune.rules import Check, Flag, Kinds, OneOf, Range, about, setting

PRUNERS = ("median", "hyperband", "successive_halving", "asha", "none")  # asha: promotion.py
SAMPLERS = ("tpe", "random", "qmc")
DIRECTIONS = ("maximize", "minimize")
# A study's name is a folder name (`output_dir` is sweeps/{name} by default): no separators,
# no "..", no NUL, nothing a shell or a Kubernetes label would trip on (issue 17.8).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SCHEDULERS = ("none", "pbt")  # pbt: population-based training (pbt.py)
HEAD_INITS = ("shared", "trial", "probe")  # `head_init` (issue 19: averaged trials must start from one head)


@dataclass
class Sweep:
    """One sweep: the model, the data, the search space, and how the search runs."""

    name: str = field(metadata=about("the Optuna study name, unique within its storage", Check(
        lambda v: isinstance(v, str) and bool(SAFE_NAME.fullmatch(v)),
        "letters, digits, `.`, `_`, `-` (a safe folder name: it names `output_dir`), at most 100",
        "use letters, digits, `.`, `_` and `-` only, starting with a letter or digit, e.g. name=\"bert-sst2\"")))
    # None only in a study with its own `train` function, which never reads them; every other
    # study is refused without both (problems below), so the rest of sweeper reads them as given.
    model: ModelSpec = field(default=typing.cast(ModelSpec, None), metadata=about(
        "the pretrained model and its new head (required, unless `train` is given)", Kinds(ModelSpec)))
    data: DataSpec = field(default=typing.cast(DataSpec, None), metadata=about(
        "where examples come from; validation is carved from train (required, unless `train` is given)", Kinds(DataSpec)))
    space: dict[str, Any] = field(default_factory=dict, metadata=about(
        "hyperparameter -> distribution or constant (`sweeper/space.py`; the hyperparameters are listed below)"))
    pretrain_loss: str = setting("none", "L_pretrain, the term that keeps the model near its pretrained weights",
                                 OneOf(PRETRAIN_LOSSES))
    epochs: float = setting(3, "passes over the training split per trial", Range(0, 1000, above=True, unit="passes"))
    evals_per_epoch: int = setting(1, "validation evaluations (pruning points) per epoch", Range(1, 1000, whole=True))
    eval_every_steps: int | None = setting(
        None, "or: evaluate every N steps (per-epoch is comparable across batch sizes)",
        Range(1, whole=True, unit="steps", none="evals_per_epoch"))
    metric: str = setting("accuracy", "the validation figure the sweep optimises", OneOf(tuple(metrics.METRICS)))
    direction: str = setting("maximize", "must agree with the metric", OneOf(DIRECTIONS))
    n_trials: int = setting(64, "trials in all, across every worker and machine", Range(1, whole=True))
    timeout: float | None = setting(None, "wall time for the whole sweep",
                                    Range(0, above=True, unit="seconds", none="no limit"))
    gpu_hours: float | None = setting(None, "device time the sweep may spend in all: elapsed hours times "
                                      "devices, GPU-hours on GPUs and CPU-hours on a CPU",
                                      Range(0, above=True, unit="device-hours", none="no limit"))
    pruner: str = setting("median", "stops trials that trail others at the same evaluation; \"asha\" pauses them "
                          "instead, and resumes one from its resume state when it is promoted (sweeper/promotion.py)",
                          OneOf(PRUNERS))
    reduction_factor: int = setting(3, "η of pruner=\"asha\": rungs at evaluations 1, η, η², ..., where a trial goes "
                                    "on only in the top 1/η of those that reached the rung (typically 2..4)",
                                    Range(2, 100, whole=True))
    scheduler: str = setting(
        "none", "\"pbt\": population-based training (sweeper/pbt.py): each trial is one segment of a member; at its "
        "end the bottom `quantile` goes on from a top member's weights and optimizer state, perturbed; nothing is "
        "pruned", OneOf(SCHEDULERS))
    population: int | None = setting(
        None, "scheduler=\"pbt\": members trained side by side, started by the first trials of the budget "
        "(typically the number of workers, or a small multiple); the first launch records it",
        Range(1, 10_000, whole=True, unit="members", none="one member per worker slot of the first launch"))
    perturbation_interval: int = setting(1, "scheduler=\"pbt\": evaluations in one segment; a member is ranked "
                                         "after each (typically 1..4)", Range(1, 1000, whole=True, unit="evaluations"))
    quantile: float = setting(0.25, "scheduler=\"pbt\": the share of the members ranked at an evaluation that "
                              "exploits the same share at the top (Ray Tune's quantile_fraction)",
                              Range(0, 0.5, above=True))
    resample_probability: float = setting(0.25, "scheduler=\"pbt\": chance that an exploiting member draws a "
                                          "hyperparameter afresh from the space instead of perturbing it (Ray Tune's)",
                                          Range(0, 1))
    perturbation_factors: tuple[float, ...] = setting(
        (1.2, 0.8), "scheduler=\"pbt\": an exploiting member's continuous hyperparameters are multiplied by one of "
        "these, drawn at random, and clipped to the space (Ray Tune's)", Check(
            lambda v: isinstance(v, (list, tuple)) and len(v) > 0
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v),
            "positive numbers", "give positive factors, e.g. perturbation_factors=[1.2,0.8]"))
    sampler: str = setting("tpe", "proposes each trial's hyperparameters", OneOf(SAMPLERS))
    first_trials: tuple[Any, ...] = setting(
        (), "trials run before the sampler proposes any: dicts of searched values (a recipe known to work; the "
        "sampler draws what one leaves out) or \"center\", the middle of the space")
    seed: int = setting(0, "study seed: data split, and with the worker index, each worker's sampler",
                        Range(whole=True))
    # "trial" by default: on a CPU-sized sweep bench/soup.py measured no gain from "shared", and soups that gain
    # with "probe" but single trials 2.5 points weaker on test (issue 19).
    head_init: str = setting(
        "trial", "the new head's initial weights: each trial's own draw; \"shared\", one draw from the study "
        "seed for every trial (the paper's premise for weight soups); or \"probe\", one linear probe of the "
        "pretrained features fitted on the training split once per study (as the paper starts its heads); the "
        "trial's seed drives batch order and dropout either way", OneOf(HEAD_INITS))
    output_dir: str = setting("sweeps/{name}", "checkpoints, caches and the default SQLite file")
    storage: str | None = setting(None, "an RDB URL; None = SQLite in output_dir (or SWEEPER_STORAGE)")
    artifacts: str | None = setting(
        None, "checkpoint store: a folder or s3://bucket/prefix; None = output_dir/artifacts")
    keep: int = setting(3, "checkpoints of the best k trials are kept", Range(1, whole=True))
    array_size: int = setting(
        1, "trials a worker trains at once as one stacked model (trial arrays, sweeper/array_worker.py): members "
        "share the unfreeze depth and batch size the first one drew; 1 trains each trial alone",
        Range(1, 256, whole=True, unit="trials"))
    max_retries: int = setting(3, "times a trial cut off by a dead or preempted worker is retried",
                               Range(0, whole=True))
    bf16: bool = setting(True, "bf16 autocast on GPUs that support it", Flag())
    compile: bool = setting(False, "the trainable blocks through torch.compile (finetune/compiled.py)", Flag())
    train: Callable[..., Any] | None = setting(
        None, "your own training function, train(params, device, seed, context), run for each trial instead of "
        "sweeper's loop (sweeper/user_train.py); `model` and `data` are then optional, the function's to use", Check(
            lambda v: v is None or callable(v), "a function or None",
            "give a function train(params, device, seed, context), or leave `train` out"))

    # ------------------------------------------------------------------ derived values

    @property
    def output_path(self) -> Path:
        return Path(os.path.expanduser(self.output_dir.format(name=self.name)))

    @property
    def cache_dir(self) -> Path:
        return self.output_path / "cache"

    @property
    def max_evaluations(self) -> int:
        """Evaluations of a trial that runs to the end: the pruners' ``max_resource``."""
        if self.eval_every_steps:
            return 0  # depends on the batch size; the pruner then uses "auto"
        return max(1, int(round(self.epochs * self.evals_per_epoch)))

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as JSON-friendly data (recorded on every trial)."""
        data = dataclasses.asdict(self)
        if self.model is not None:
            data["model"] = {"type": type(self.model).__name__, **data["model"]}
        if self.data is not None:
            data["data"] = {"type": type(self.data).__name__, **data["data"]}
        if self.train is not None:  # by name: a function's repr holds its address, which differs per process
            data["train"] = getattr(self.train, "__qualname__", type(self.train).__name__)
        data["space"] = {k: str(v) if space_mod.is_distribution(v) else v for k, v in self.space.items()}
        return data

    # ------------------------------------------------------------------ validation

    def problems(self) -> list[str]:
        """Every problem of the configuration, without loading a model or data: each setting
        against its rule (``rules.setting`` above), then what relates settings to each other."""
        if self.train is not None:
            return self._train_problems()
        p = rules.problems(self)
        if isinstance(self.model, ModelSpec):
            p.extend(self.model.check())
        if isinstance(self.data, DataSpec):
            p.extend(self.data.check())
            if isinstance(self.model, ModelSpec) and self.model.kind != self.data.kind:
                p.append(
                    f"the model is for {self.model.kind} but the data is {self.data.kind}: pair a "
                    "TextClassifier with TextData and an ImageClassifier with ImageData"
                )
        if not isinstance(self.space, dict):
            p.append(f"`space` is {type(self.space).__name__}: give a dict of name -> distribution")
        else:
            p.extend(self._space_problems())
        if self.pretrain_loss == "mlm" and getattr(self.model, "kind", "") == "image":
            p.append("`pretrain_loss` is 'mlm', which needs a text model with a masked-LM head: use distill or l2sp")
        p.extend(self._array_problems())
        p.extend(self._asha_problems())
        p.extend(self._pbt_problems())
        better = metrics.METRICS.get(self.metric) if isinstance(self.metric, str) else None
        if better and self.direction in DIRECTIONS and better != self.direction:
            p.append(f"`direction` is {self.direction!r}, but `{self.metric}` is better when it is "
                     f"{'higher' if better == 'maximize' else 'lower'}: use direction={better}")
        return p

    def _train_problems(self) -> list[str]:
        """A study with its own ``train`` function: the function decides what the searched names
        and the metric mean, so only the search and the budget are sweeper's to check."""
        unset = tuple(f"`{name}`" for name in ("model", "data") if getattr(self, name) is None)
        p = [line for line in rules.problems(self) if not line.startswith((*unset, "`metric`"))]
        # Beside `train`, a model and data are the function's to use (context.sweep): checked as ever.
        if isinstance(self.model, ModelSpec):
            p.extend(self.model.check())
        if isinstance(self.data, DataSpec):
            p.extend(self.data.check())
        if not isinstance(self.space, dict) or not self.space:
            p.append("`space` is empty: give a dict of name -> distribution for the function's `params`")
        else:
            p.extend(space_mod.check(self.space))
            p.extend(space_mod.first_trial_params(self.space, self.first_trials)[1])
        if not isinstance(self.metric, str) or not self.metric.strip():
            p.append(f"`metric` is {self.metric!r}: name the figure the function reports (e.g. \"accuracy\")")
        p.extend(self._asha_problems())
        p.extend(self._pbt_problems())
        return p

    def _asha_problems(self) -> list[str]:
        """``pruner="asha"`` pauses a trial in sweeper's own loop and resumes it from its resume
        state (``promotion.py``): one trial alone, in that loop."""
        if self.pruner != "asha":
            return []
        if self.train is not None:
            return ["`pruner` is 'asha', which pauses and resumes trials inside sweeper's own training loop, "
                    "and this study has its own `train`: use pruner=\"hyperband\" or \"median\""]
        if _whole(self.array_size) and self.array_size > 1:
            return [f"`pruner` is 'asha' and `array_size` is {self.array_size}: a member of a trial array "
                    "cannot pause alone; set array_size=1 or use pruner=\"hyperband\""]
        return []

    def _pbt_problems(self) -> list[str]:
        """``scheduler="pbt"`` hands one trial's resume state to another inside sweeper's own
        loop (``pbt.py``), and its budget is segments: population × segments per member."""
        if self.scheduler != "pbt":
            return []
        if self.train is not None:
            return ["`scheduler` is 'pbt', which hands weights and optimizer state from trial to trial inside "
                    "sweeper's own training loop, and this study has its own `train`: use scheduler=\"none\""]
        p = []
        if _whole(self.array_size) and self.array_size > 1:
            p.append(f"`scheduler` is 'pbt' and `array_size` is {self.array_size}: a member of a trial array cannot "
                     "hand its state to another trial alone; set array_size=1 or scheduler=\"none\"")
        if self.pruner == "asha":
            p.append("`scheduler` is 'pbt' and `pruner` is 'asha': a rung would pause a member in the middle of a "
                     "segment; use pruner=\"none\" (PBT prunes nothing: it exploits)")
        if self.population is not None:
            p.extend(self.pbt_budget_problems(self.population, "`population`"))
        return p

    def pbt_budget_problems(self, population: Any, source: str, n_trials: Any = None) -> list[str]:
        """Whether ``population`` members fit the budget: each starts with one trial, and none
        trains more than ⌈max_evaluations / perturbation_interval⌉ segments. ``source`` names
        where the population came from, for the message (the setting, or the worker slots);
        ``n_trials``, the budget a launch sets when it is not the study's (``--n-trials``)."""
        n_trials = self.n_trials if n_trials is None else n_trials
        if not (_whole(population) and _whole(n_trials) and _whole(self.perturbation_interval)
                and self.perturbation_interval > 0 and population > 0):
            return []  # their own rules report them
        if population > n_trials:
            return [f"{source} is {population} but `n_trials` is {n_trials}: the first segment of every "
                    "member is a trial of the budget; raise n_trials to population × segments per member"]
        if self.max_evaluations and isinstance(self.epochs, (int, float)) and not self.eval_every_steps:
            segments = -(-self.max_evaluations // self.perturbation_interval)
            if n_trials > population * segments:
                return [f"`n_trials` is {n_trials}, but {population} members of {segments} segments each "
                        f"({self.max_evaluations} evaluations, perturbation_interval {self.perturbation_interval}) "
                        f"train {population * segments} trials in all: set n_trials={population * segments} "
                        f"or fewer ({source} is {population})"]
        return []

    def _array_problems(self) -> list[str]:
        """What trial arrays cannot train yet (``finetune/arrays.py``)."""
        if not _whole(self.array_size) or self.array_size <= 1:
            return []
        p = []
        if self.pretrain_loss not in ARRAY_PRETRAIN_LOSSES:
            p.append(f"`array_size` is {self.array_size}, but trial arrays train with pretrain_loss "
                     f"{' or '.join(ARRAY_PRETRAIN_LOSSES)}, not {self.pretrain_loss!r}: set array_size=1 "
                     "or change pretrain_loss")
        if self.compile is True:
            p.append(f"`array_size` is {self.array_size} and `compile` is on: trial arrays run their own "
                     "stacked layers, not torch.compile; set compile=False or array_size=1")
        return p

    def _space_problems(self) -> list[str]:
        p = space_mod.check(self.space)
        for key in self.space:
            if key not in HYPERPARAMETERS:
                p.append(f"`space.{key}` is not a hyperparameter sweeper trains with{_suggest(key, HYPERPARAMETERS)}: "
                         f"use {', '.join(HYPERPARAMETERS)}")
        if "learning_rate" not in self.space:
            p.append("`space` has no `learning_rate`: search it (e.g. LogFloat(1e-6, 1e-3)) or fix it")
        p.extend(space_mod.first_trial_params(self.space, self.first_trials)[1])
        if _whole(self.n_trials) and isinstance(self.first_trials, (list, tuple)) \
                and len(self.first_trials) > self.n_trials:
            p.append(f"`first_trials` has {len(self.first_trials)} entries but `n_trials` is "
                     f"{self.n_trials}: raise n_trials or list fewer first trials")
        # The constants of the space against the rules of the hyperparameters they fix.
        constants = {k: v for k, v in self.space.items() if k in HYPERPARAMETERS and not space_mod.is_distribution(v)}
        return p + Hyper(**constants).check(prefix="space.")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _suggest(key: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


# --------------------------------------------------------------------------- loading


def load(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Load the study file at ``path``, apply ``overrides`` and validate the result."""
    file = Path(path)
    if not file.is_file():
        hint = " (it is a folder: name the .py file inside)" if file.is_dir() else ""
        raise SweepError(f"the study file {str(path)!r} does not exist{hint}: give the path of a "
                         "study such as studies/quickstart.py")
    module_name = "sweeper_study_" + hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise SweepError(f"the study file {str(path)!r} is not a Python file: use a .py file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        where = f":{exc.lineno}" if exc.lineno else ""  # a NUL byte has no line
        raise SweepError(f"{path}{where}: syntax error: {exc.msg}: fix the study file") from None
    except Exception as exc:
        line = _study_line(exc, file)
        raise SweepError(f"{path}{line}: the study file raised {type(exc).__name__}: {exc}") from None
    sweep = getattr(module, "sweep", None)
    if not isinstance(sweep, Sweep):
        found = f"a {type(sweep).__name__}" if sweep is not None else "nothing"
        raise SweepError(f"{path}: defines {found} as `sweep`: a study file must set "
                         "`sweep = Sweep(...)` (see studies/quickstart.py)")
    sweep, problems = _apply(sweep, overrides)
    problems += sweep.problems()
    if problems:
        raise ConfigError(str(path), problems)
    return sweep


def _study_line(exc: BaseException, file: Path) -> str:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == file.resolve():
            return f":{frame.lineno}"
    return ""


class _BadKey(Exception):
    """An override names a setting that does not exist."""


def _apply(sweep: Sweep, overrides: typing.Iterable[str]) -> tuple[Sweep, list[str]]:
    problems: list[str] = []
    result = dataclasses.replace(sweep, space=dict(sweep.space))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"`--set {item}` is not key=value: write e.g. --set epochs=1")
            continue
        try:
            result = _set(result, key, text.strip())
        except (ValueError, TypeError, _BadKey) as exc:
            problems.append(str(exc))
    return result, problems


def _set(sweep: Sweep, key: str, text: str) -> Sweep:
    if key == "model":  # a folder or hub name for text models, an arch or weights for CNNs
        return dataclasses.replace(sweep, model=sweep.model.with_path(text))
    if key == "data":
        return dataclasses.replace(sweep, data=sweep.data.with_path(text))
    head, _, rest = key.partition(".")
    if head == "space":
        if not rest:
            raise _BadKey("`space` cannot be set whole: set one entry, e.g. space.learning_rate=1e-5..1e-3")
        try:
            sweep.space[rest] = space_mod.parse_override(sweep.space.get(rest), text)
        except ValueError as exc:
            raise ValueError(f"`space.{rest}={text}`: {exc}: write low..high, [a, b] or a value") from None
        return sweep
    return _set_field(sweep, key.split("."), text, prefix="")


def _set_field(obj: Any, parts: list[str], text: str, prefix: str) -> Any:
    name = parts[0]
    fields = {f.name: f for f in dataclasses.fields(obj)}
    full = prefix + name
    if name not in fields:
        raise _BadKey(f"`{full}` is not a setting of {type(obj).__name__}{_suggest(name, fields)}: "
                       f"use {', '.join(f for f in fields if f != 'space')}")
    if len(parts) > 1:
        child = getattr(obj, name)
        if not dataclasses.is_dataclass(child):
            raise _BadKey(f"`{full}` has no settings below it: write --set {full}=VALUE")
        return dataclasses.replace(obj, **{name: _set_field(child, parts[1:], text, full + ".")})
    hints = typing.get_type_hints(type(obj))
    return dataclasses.replace(obj, **{name: coerce(text, hints[name], full)})


def coerce(text: str, hint: Any, key: str) -> Any:
    """``text`` as a value of the annotated type ``hint``, or a ValueError naming ``key``."""
    value = space_mod.literal(text)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is str:
            return text
        if origin is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if origin is tuple and isinstance(value, str):
            return (value,)
        if dataclasses.is_dataclass(origin):
            raise ValueError(f"`{key}` is a group of settings: set its parts, e.g. `{key}.path=...`")
    if bool in options:
        raise ValueError(f"`{key}={text}`: expected bool, write {key}=true or {key}=false")
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"`{key}={text}`: expected {expected}")


def check_model_fit(sweep: Sweep, source: str) -> int:
    """Check what needs the model's config (not its weights): the unfreeze depths the space
    can draw, and an MLM head for ``pretrain_loss='mlm'``. Returns the model's block count
    (0 for a study with its own ``train`` function, whose model is its own)."""
    if sweep.train is not None:
        return 0
    blocks = sweep.model.num_blocks(sweep.cache_dir)
    problems = []
    depth = sweep.space.get("unfreeze_depth")
    if isinstance(depth, space_mod.Int):
        values: list[Any] = [depth.low, depth.high]
    elif isinstance(depth, space_mod.Categorical):
        values = list(depth.choices)
    elif depth is None or space_mod.is_distribution(depth):
        values = []
    else:
        values = [depth]
    rule = rules.Blocks()  # Hyper.unfreeze_depth's rule, now that the block count is known
    outside = [m for v in values if (m := rule.problem("space.unfreeze_depth", v, blocks, shown=depth))]
    problems.extend(outside[:1])  # one message for the distribution, not one per value
    if sweep.pretrain_loss == "mlm" and not sweep.model.has_lm_head(sweep.cache_dir):
        problems.append(f"`pretrain_loss` is 'mlm', but the model {sweep.model.path!r} has no masked-LM "
                        "head: use distill or l2sp, or a checkpoint saved with its MLM head")
    if problems:
        raise ConfigError(source, problems)
    return blocks


# --------------------------------------------------------------------------- docs


def settings_markdown() -> str:
    """docs/settings.md, from the same declarations the checks read (a test compares them)."""
    sections: list[tuple[str, str, type]] = [
        ("Sweep", "The fields of `Sweep(...)` in a study file; `--set NAME=VALUE` overrides any of them.", Sweep),
        ("Hyperparameters (`space`)",
         "What `space` may search or fix, by name (see `sweeper/space.py`): `--set space.NAME=low..high` "
         "searches, `--set space.NAME=VALUE` fixes. A fixed value is checked when the study loads, a "
         "drawn one when its trial starts.", Hyper),
    ]
    for union, where in ((DataSpec, "data"), (ModelSpec, "model")):
        for kind in typing.get_args(union):
            doc = " ".join((kind.__doc__ or "").split("\n\n")[0].split())
            sections.append((f"`{where}={kind.__name__}(...)`",
                             f"{doc} `--set {where}.NAME=VALUE` overrides a setting.", kind))
    return rules.markdown(sections)
