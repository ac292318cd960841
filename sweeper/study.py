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
import json
import os
import traceback
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper import space as space_mod
from sweeper.errors import ConfigError, SweepError
from sweeper.finetune import losses, metrics
from sweeper.finetune.data import DataSpec, ImageData, SyntheticText, TextData
from sweeper.finetune.loop import HYPERPARAMETERS, Hyper
from sweeper.finetune.models import (
    RESNETS,
    ImageClassifier,
    ModelSpec,
    TextClassifier,
    TinyTextClassifier,
)

PRUNERS = ("median", "hyperband", "successive_halving", "none")
SAMPLERS = ("tpe", "random", "qmc")


@dataclass
class Sweep:
    """One sweep: the model, the data, the search space, and how the search runs."""

    name: str  # the Optuna study name, unique within its storage
    model: ModelSpec  # the pretrained model and its new head
    data: DataSpec  # where examples come from; validation is carved from train
    space: dict[str, Any]  # hyperparameter -> distribution or constant (see sweeper.space)
    pretrain_loss: str = "none"  # L_pretrain: "l2sp", "distill", "mlm" or "none"
    epochs: float = 3  # passes over the training split per trial, 0.1..100
    evals_per_epoch: int = 1  # validation evaluations (pruning points) per epoch, 1..100
    eval_every_steps: int | None = None  # or: evaluate every N steps (per-epoch is comparable across batch sizes)
    metric: str = "accuracy"  # accuracy, f1, matthews or loss
    direction: str = "maximize"  # "maximize" or "minimize"; must agree with the metric
    n_trials: int = 64  # trials in all, across every worker and machine
    timeout: float | None = None  # seconds of wall time for the whole sweep; None = no limit
    gpu_hours: float | None = None  # GPU-hours the sweep may spend in all; None = no limit
    pruner: str = "median"  # median, hyperband, successive_halving or none
    sampler: str = "tpe"  # tpe, random or qmc
    # Trials run before the sampler proposes any: dicts of searched values (a recipe known to
    # work; the sampler draws what one leaves out) or "center", the middle of the space.
    first_trials: tuple[Any, ...] = ()
    seed: int = 0  # study seed: data split, and with the worker index, each worker's sampler
    output_dir: str = "sweeps/{name}"  # checkpoints, caches and the default SQLite file
    storage: str | None = None  # an RDB URL; None = SQLite in output_dir (or SWEEPER_STORAGE)
    artifacts: str | None = None  # checkpoint store: a folder or s3://bucket/prefix; None = output_dir/artifacts
    keep: int = 3  # checkpoints of the best k trials are kept, 1..1000
    max_retries: int = 3  # times a trial cut off by a dead or preempted worker is retried
    bf16: bool = True  # bf16 autocast on GPUs that support it
    compile: bool = False  # the trainable blocks through torch.compile (finetune/compiled.py)

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

    def defaults(self) -> Hyper:
        """The hyperparameters a trial uses for everything the space leaves out."""
        return Hyper()

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as JSON-friendly data (recorded on every trial)."""
        data = dataclasses.asdict(self)
        data["model"] = {"type": type(self.model).__name__, **data["model"]}
        data["data"] = {"type": type(self.data).__name__, **data["data"]}
        data["space"] = {k: str(v) if space_mod.is_distribution(v) else v for k, v in self.space.items()}
        return data

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]

    # ------------------------------------------------------------------ validation

    def problems(self) -> list[str]:
        """Every problem of the configuration, without loading a model or data."""
        p: list[str] = []
        if not isinstance(self.name, str) or not self.name.strip():
            p.append(f"`name` is {self.name!r}: give the study a name")
        if not isinstance(self.model, (TextClassifier, TinyTextClassifier, ImageClassifier)):
            p.append(f"`model` is {self.model!r}: use TextClassifier, ImageClassifier or TinyTextClassifier")
        else:
            p.extend(self.model.check())
        if not isinstance(self.data, (TextData, SyntheticText, ImageData)):
            p.append(f"`data` is {self.data!r}: use TextData, ImageData or SyntheticText")
        else:
            p.extend(self.data.check())
            if getattr(self.model, "kind", None) and self.model.kind != self.data.kind:
                p.append(
                    f"the model is for {self.model.kind} but the data is {self.data.kind}: pair a "
                    "TextClassifier with TextData and an ImageClassifier with ImageData"
                )
        if not isinstance(self.space, dict):
            p.append(f"`space` is {type(self.space).__name__}: give a dict of name -> distribution")
        else:
            p.extend(space_mod.check(self.space))
            unknown = [k for k in self.space if k not in HYPERPARAMETERS]
            for key in unknown:
                p.append(f"`space.{key}` is not a hyperparameter sweeper trains with{_suggest(key, HYPERPARAMETERS)}: "
                         f"use {', '.join(HYPERPARAMETERS)}")
            if "learning_rate" not in self.space:
                p.append("`space` has no `learning_rate`: search it (e.g. LogFloat(1e-6, 1e-3)) or fix it")
            p.extend(space_mod.first_trial_params(self.space, self.first_trials)[1])
            if _whole(self.n_trials) and isinstance(self.first_trials, (list, tuple)) \
                    and len(self.first_trials) > self.n_trials:
                p.append(f"`first_trials` has {len(self.first_trials)} entries but `n_trials` is "
                         f"{self.n_trials}: raise n_trials or list fewer first trials")
        if self.pretrain_loss not in losses.PRETRAIN_LOSSES:
            p.append(f"`pretrain_loss` is {self.pretrain_loss!r}: use one of {', '.join(losses.PRETRAIN_LOSSES)}")
        elif self.pretrain_loss == "mlm" and getattr(self.model, "kind", "") == "image":
            p.append("`pretrain_loss` is 'mlm', which needs a text model with a masked-LM head: use distill or l2sp")
        if not _number(self.epochs) or not 0 < self.epochs <= 1000:
            p.append(f"`epochs` is {self.epochs!r}: use a number of passes, 0.1..100")
        if not _whole(self.evals_per_epoch) or not 1 <= self.evals_per_epoch <= 1000:
            p.append(f"`evals_per_epoch` is {self.evals_per_epoch!r}: use 1..100")
        if self.eval_every_steps is not None and (not _whole(self.eval_every_steps) or self.eval_every_steps < 1):
            p.append(f"`eval_every_steps` is {self.eval_every_steps!r}: use a positive step count or None")
        if self.metric not in metrics.METRICS:
            p.append(f"`metric` is {self.metric!r}: use one of {', '.join(metrics.METRICS)}")
        elif self.direction in ("maximize", "minimize") and metrics.METRICS[self.metric] != self.direction:
            p.append(f"`direction` is {self.direction!r}, but `{self.metric}` is better when it is "
                     f"{'higher' if metrics.METRICS[self.metric] == 'maximize' else 'lower'}: use "
                     f"direction={metrics.METRICS[self.metric]}")
        if self.direction not in ("maximize", "minimize"):
            p.append(f"`direction` is {self.direction!r}: use maximize or minimize")
        if not _whole(self.n_trials) or self.n_trials < 1:
            p.append(f"`n_trials` is {self.n_trials!r}: use a positive whole number")
        for key in ("timeout", "gpu_hours"):
            value = getattr(self, key)
            if value is not None and (not _number(value) or value <= 0):
                p.append(f"`{key}` is {value!r}: use a positive number, or None for no limit")
        if self.pruner not in PRUNERS:
            p.append(f"`pruner` is {self.pruner!r}: use one of {', '.join(PRUNERS)}")
        if self.sampler not in SAMPLERS:
            p.append(f"`sampler` is {self.sampler!r}: use one of {', '.join(SAMPLERS)}")
        if not _whole(self.seed):
            p.append(f"`seed` is {self.seed!r}: use a whole number")
        if not _whole(self.keep) or self.keep < 1:
            p.append(f"`keep` is {self.keep!r}: keep at least the best trial's checkpoint (1)")
        if not _whole(self.max_retries) or self.max_retries < 0:
            p.append(f"`max_retries` is {self.max_retries!r}: use 0 or more")
        for flag in ("bf16", "compile"):
            if not isinstance(getattr(self, flag), bool):
                p.append(f"`{flag}` is {getattr(self, flag)!r}: use True or False")
        if isinstance(self.space, dict):
            constants = {k: v for k, v in self.space.items() if k in HYPERPARAMETERS and not space_mod.is_distribution(v)}
            try:
                hyper = Hyper(**constants)
            except TypeError as exc:
                p.append(str(exc))
            else:
                p.extend(f"`space.{x[1:]}" if x.startswith("`") else x for x in hyper.check())
        return p

    def validate(self, source: str) -> Sweep:
        problems = self.problems()
        if problems:
            raise ConfigError(source, problems)
        return self


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
        raise SweepError(f"{path}:{exc.lineno}: syntax error: {exc.msg}: fix the study file") from None
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


def _model_from_text(model: ModelSpec, text: str) -> ModelSpec:
    """``--set model=X``: a folder or hub name for text models, an arch or weights for CNNs."""
    if isinstance(model, ImageClassifier):
        if text in RESNETS:
            return dataclasses.replace(model, arch=text)
        return dataclasses.replace(model, weights=text)
    return TextClassifier(path=text)


def apply_overrides(sweep: Sweep, overrides: typing.Iterable[str], source: str = "--set") -> Sweep:
    """A copy of ``sweep`` with every ``key=value`` applied; all problems in one error."""
    result, problems = _apply(sweep, overrides)
    if problems:
        raise ConfigError(f"{source} --set", problems)
    return result


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
    if key == "model":
        return dataclasses.replace(sweep, model=_model_from_text(sweep.model, text))
    if key == "data":
        data = sweep.data
        if isinstance(data, SyntheticText):
            data = TextData(path=text)
        return dataclasses.replace(sweep, data=dataclasses.replace(data, path=text))
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
    can draw, and an MLM head for ``pretrain_loss='mlm'``. Returns the model's block count."""
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
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= blocks]
    if bad:
        problems.append(f"The value of `space.unfreeze_depth` is {depth}, but the model has {blocks} "
                        f"blocks: use 0..{blocks}")
    if sweep.pretrain_loss == "mlm" and not sweep.model.has_lm_head(sweep.cache_dir):
        problems.append(f"`pretrain_loss` is 'mlm', but the model {sweep.model.path!r} has no masked-LM "
                        "head: use distill or l2sp, or a checkpoint saved with its MLM head")
    if problems:
        raise ConfigError(source, problems)
    return blocks
