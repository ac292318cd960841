"""``sweeper report``: a sweep as one HTML file that opens anywhere, offline.

The dashboard needs a server beside the storage; a report is a file to keep with the results,
attach to a review, or open on a laptop with no network. So it carries everything itself:
plotly.js is inlined once in the page (about 5 MB) and every figure is a ``div`` that uses it;
opening the file fetches nothing.

Everything in it is read from the study, through the user attributes each trial records (see
``sweeper/objective.py``) and the held-out test figure on the study (``sweeper/finalize.py``):

- the optimisation history, the hyperparameter importances, the parallel coordinates and the
  intermediate values of every trial (the pruning curves), drawn by ``optuna.visualization``.
  Importances use Optuna 5's default evaluator, PED-ANOVA, which needs no scikit-learn;
- the metric over λ (``pretrain_loss_weight``) and the unfreeze depth;
- the time each trial spent training, evaluating and otherwise, its throughput, and the
  device-hours the sweep has spent (GPU-hours, or CPU-hours on a CPU);
- for ``scheduler="pbt"``, the lineage: every segment's curve, coloured by member, and a
  dashed link from the segment it started from (a member's own previous one, or the donor it
  exploited) (``lineage.py``);
- the best trial: its parameters, validation metrics and held-out test figure;
- beside it, the weight soups and the seed trials' spread that ``sweeper best --soup`` and
  ``--seeds`` recorded on the study;
- a table of every trial.

A plot that cannot be drawn (too few complete trials, a parameter that is not searched) is
replaced by a note that says why; the rest of the report is still written.
"""

from __future__ import annotations

import html
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper import __version__, lineage, promotion, record, status
from sweeper.errors import SweepError
from sweeper.study import Sweep

if TYPE_CHECKING:
    import plotly.graph_objects as go

logger = logging.getLogger(__name__)

LAMBDA = "pretrain_loss_weight"  # λ in L = L_task + λ·L_pretrain
DEPTH = "unfreeze_depth"  # top blocks that train; the rest stay frozen
INSTALL_HINT = "pip install 'sweeper[report]'"
PLOT_HEIGHT = 440  # pixels per figure
# The Plotly logo in the mode bar links out of the page; a report stays offline.
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
STATE_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#2ca02c",
                 "WAITING": "#7f7f7f"}


class CannotDraw(Exception):
    """The study cannot support this plot (yet); the message says why, for the reader."""


@dataclass
class Section:
    """One plot of the report, or the note that replaces it."""

    key: str  # the figure's div id is ``plot-<key>``
    title: str
    figure: str | None  # the figure's HTML div, or None when it could not be drawn
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What ``write`` produced: the file, the plots drawn, and why the others were not."""

    path: Path
    drawn: list[str]
    not_drawn: dict[str, str]
    bytes: int


def write(study: optuna.Study, sweep: Sweep, out: Path) -> Report:
    """Write the report of ``study`` to ``out`` (atomically: a reader never sees half a file)."""
    out = Path(out)
    if out.is_dir():
        raise SweepError(f"--out {str(out)!r} is a folder: give a file name, e.g. {out / 'report.html'}")
    page, sections = build(study, sweep)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # beside it: os.replace stays on one disk
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_text(page, encoding="utf-8")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise SweepError(f"cannot write the report to {str(out)!r} ({exc.strerror or exc}): "
                         "choose a writable --out") from None
    drawn = [s.key for s in sections if s.figure is not None]
    missing = {s.key: s.notes[0] for s in sections if s.figure is None}
    logger.info("report of %s written to %s (%d plots, %d not drawn)", sweep.name, out, len(drawn), len(missing))
    return Report(out, drawn, missing, out.stat().st_size)


def build(study: optuna.Study, sweep: Sweep) -> tuple[str, list[Section]]:
    """The report's HTML, and its sections (to say what was and was not drawn)."""
    plotly_js = _plotly_js()
    trials = study.get_trials(deepcopy=False)
    summary = status.summarize(study, sweep)
    label = f"validation {sweep.metric}"
    sections = [
        _draw("history", "Optimisation history", lambda: _history(study, trials, label)),
        _draw("importances", "Hyperparameter importances", lambda: _importances(study, trials, label)),
        _draw("parallel", "Parallel coordinates", lambda: _parallel(study, trials, label)),
        _draw("intermediate", "Intermediate values (pruning curves)",
              lambda: _intermediate(study, trials, label)),
        _draw("lambda_depth", "The metric over λ and unfreeze depth", lambda: _lambda_depth(trials, label)),
        _draw("timings", "Time per trial", lambda: _timings(trials)),
        _draw("gpu_hours", f"{summary['hours_unit']} spent", lambda: _gpu_hours(trials)),
    ]
    if lineage.is_pbt(trials):
        sections.insert(4, _draw("lineage", "Population-based training: the lineage", lambda: _lineage(trials, label)))
    best = next((t for t in trials if summary["best"] and t.number == summary["best"]["number"]), None)
    return _page(sweep, summary, sections, best, trials, plotly_js, _soups_html(study, sweep)), sections


# --------------------------------------------------------------------------- drawing


def _plotly_js() -> str:
    try:
        from plotly.offline import get_plotlyjs  # optional: pip install 'sweeper[report]'
    except ImportError:
        raise SweepError(f"`sweeper report` needs plotly, which is not installed: {INSTALL_HINT}") from None
    return str(get_plotlyjs())


def _draw(key: str, title: str, make: Callable[[], go.Figure]) -> Section:
    """Run one plot builder; on failure, a section whose note says why."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fig = make()
        except CannotDraw as exc:
            return Section(key, title, None, [f"Not drawn: {exc}."])
        except Exception as exc:  # one plot that fails on an odd study must not cost the report
            logger.warning("report: %s not drawn", title, exc_info=True)
            return Section(key, title, None, [f"Not drawn: {type(exc).__name__}: {exc}"])
    notes = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, FutureWarning, optuna.exceptions.ExperimentalWarning)):
            continue
        text = str(w.message).strip()
        if text and text not in notes:
            notes.append(text)
    if not fig.data:
        return Section(key, title, None, [f"Not drawn: {notes[0] if notes else 'nothing to draw'}"])
    fig.update_layout(height=PLOT_HEIGHT, template="plotly_white", margin={"t": 60, "b": 50, "l": 60, "r": 30})
    div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{key}", config=PLOTLY_CONFIG)
    return Section(key, title, div, notes)


def _complete(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]


def _history(study: optuna.Study, trials: Sequence[FrozenTrial], label: str) -> go.Figure:
    if not _complete(trials):
        raise CannotDraw("no trial has completed yet")
    return optuna.visualization.plot_optimization_history(study, target_name=label)


def _importances(study: optuna.Study, trials: Sequence[FrozenTrial], label: str) -> go.Figure:
    n = len(_complete(trials))
    if n < 2:
        raise CannotDraw(f"importances need at least 2 complete trials; this study has {n}")
    return optuna.visualization.plot_param_importances(study, target_name=label)


def _parallel(study: optuna.Study, trials: Sequence[FrozenTrial], label: str) -> go.Figure:
    if not _complete(trials):
        raise CannotDraw("no trial has completed yet")
    return optuna.visualization.plot_parallel_coordinate(study, target_name=label)


def _intermediate(study: optuna.Study, trials: Sequence[FrozenTrial], label: str) -> go.Figure:
    if not any(t.intermediate_values for t in trials):
        raise CannotDraw("no trial has reported an evaluation yet")
    fig = optuna.visualization.plot_intermediate_values(study)
    fig.update_layout(xaxis_title="evaluation", yaxis_title=label)
    return fig


def _lineage(trials: Sequence[FrozenTrial], label: str) -> go.Figure:
    """Each PBT segment's own evaluations, one colour per member, with a dashed link from the
    point of the segment it started from: a jump between colours is an exploit."""
    import plotly.graph_objects as go

    segments = [t for t in trials if lineage.segment(t) is not None and t.state != TrialState.FAIL]
    if not any(lineage.own_curve(t) for t in segments):
        raise CannotDraw("no segment has reported an evaluation yet")
    by_number = lineage.latest(trials)  # a failed parent's retry holds the state its children started from
    members = sorted({int(lineage.segment(t)["member"]) for t in segments})  # type: ignore[index]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    colour = {m: palette[i % len(palette)] for i, m in enumerate(members)}
    fig = go.Figure()
    for t in segments:
        seg = lineage.segment(t) or {}
        curve = lineage.own_curve(t)
        if not curve:
            continue
        hue = colour[int(seg["member"])]
        name = f"member {seg['member']}"
        text = f"trial {t.number}, member {seg['member']}, generation {seg.get('generation')}: {seg.get('decision')}"
        fig.add_trace(go.Scatter(x=[k for k, _ in curve], y=[v for _, v in curve], mode="lines+markers",
                                 line={"color": hue}, name=name, legendgroup=name,
                                 showlegend=seg.get("generation") == 0, hovertext=text, hoverinfo="text+y"))
        parent = by_number.get(int(seg["parent"])) if seg.get("parent") is not None else None
        start = int(seg.get("start_evaluation") or 0)
        if parent is not None and start in parent.intermediate_values:
            fig.add_trace(go.Scatter(x=[start, curve[0][0]], y=[parent.intermediate_values[start], curve[0][1]],
                                     mode="lines", line={"color": hue, "dash": "dash"}, showlegend=False,
                                     legendgroup=name, hoverinfo="skip"))
    fig.update_layout(xaxis_title="evaluation", yaxis_title=label)
    return fig


def _score(t: FrozenTrial) -> float | None:
    """A trial's value, or for a pruned or running trial its last reported evaluation."""
    if t.state == TrialState.COMPLETE:
        return t.value
    if t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


def _lambda_depth(trials: Sequence[FrozenTrial], label: str) -> go.Figure:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    scored = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and _score(t) is not None]
    has_lambda = any(LAMBDA in t.params for t in scored)
    has_depth = any(DEPTH in t.params for t in scored)
    if not scored:
        raise CannotDraw("no trial has completed or been pruned after an evaluation yet")
    if not has_lambda and not has_depth:
        raise CannotDraw(f"neither {LAMBDA} (λ) nor {DEPTH} is searched in this study")
    panels = ([f"{label} over λ" + (" (colour: unfreeze depth)" if has_depth else "")] if has_lambda else []) \
        + ([f"{label} over unfreeze depth"] if has_depth else [])
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels, shared_yaxes=True)
    depths = [t.params[DEPTH] for t in scored if DEPTH in t.params]
    for state, symbol, name in ((TrialState.COMPLETE, "circle", "complete"),
                                (TrialState.PRUNED, "circle-open", "pruned (last evaluation)")):
        group = [t for t in scored if t.state == state]
        if not group:
            continue
        text = [f"trial {t.number}<br>" + "<br>".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
                for t in group]
        col = 1
        if has_lambda:
            points = [t for t in group if LAMBDA in t.params]
            marker: dict[str, Any] = {"symbol": symbol, "size": 10, "line": {"width": 1.5}}
            if has_depth:
                marker.update(color=[t.params.get(DEPTH) for t in points], colorscale="Viridis",
                              cmin=min(depths), cmax=max(depths),
                              showscale=state == TrialState.COMPLETE,
                              colorbar={"title": {"text": "depth"}, "x": 0.46 if len(panels) > 1 else 1.02})
            fig.add_trace(go.Scatter(x=[t.params[LAMBDA] for t in points], y=[_score(t) for t in points],
                                     mode="markers", name=name, marker=marker, legendgroup=name,
                                     text=[x for t, x in zip(group, text) if LAMBDA in t.params],
                                     hoverinfo="text+y"), row=1, col=col)
            fig.update_xaxes(type="log", title_text="λ (pretrain_loss_weight)", row=1, col=col)
            col += 1
        if has_depth:
            points = [t for t in group if DEPTH in t.params]
            fig.add_trace(go.Scatter(x=[t.params[DEPTH] for t in points], y=[_score(t) for t in points],
                                     mode="markers", name=name, legendgroup=name, showlegend=not has_lambda,
                                     marker={"symbol": symbol, "size": 10, "color": STATE_COLOURS[state.name],
                                             "line": {"width": 1.5, "color": STATE_COLOURS[state.name]}},
                                     text=[x for t, x in zip(group, text) if DEPTH in t.params],
                                     hoverinfo="text+y"), row=1, col=col)
            fig.update_xaxes(title_text="unfreeze depth (top blocks trained)", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text=label, row=1, col=1)
    fig.update_layout(legend={"orientation": "h", "y": -0.2})
    return fig


def _elapsed(t: FrozenTrial) -> float | None:
    if t.datetime_start is None:
        return None
    end = t.datetime_complete
    if end is None:
        return time.time() - t.datetime_start.timestamp() if t.state == TrialState.RUNNING else None
    return (end - t.datetime_start).total_seconds()


def _timings(trials: Sequence[FrozenTrial]) -> go.Figure:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    timed = [t for t in trials if _elapsed(t) is not None]
    if not timed:
        raise CannotDraw("no trial has started yet")
    numbers = [t.number for t in timed]

    def attr(t: FrozenTrial, field: record.Field[float]) -> float | None:
        value = field.get(t)
        return float(value) if isinstance(value, (int, float)) else None

    train = [attr(t, record.TRAIN_SECONDS) for t in timed]
    evals = [attr(t, record.EVAL_SECONDS) for t in timed]
    # Elapsed time not spent in training or evaluation: model building, data, checkpoints, the
    # database. A trial without the breakdown (pruned, failed, running) shows its elapsed time.
    other = [max(0.0, (_elapsed(t) or 0.0) - (tr or 0.0) - (ev or 0.0)) for t, tr, ev in zip(timed, train, evals)]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=numbers, y=[v or 0.0 for v in train], name="training"), secondary_y=False)
    fig.add_trace(go.Bar(x=numbers, y=[v or 0.0 for v in evals], name="evaluation"), secondary_y=False)
    fig.add_trace(go.Bar(x=numbers, y=other, name="other (set-up, checkpoints; all of it when not broken down)",
                         marker_color="#bbbbbb",
                         text=[t.state.name.lower() if t.state != TrialState.COMPLETE else "" for t in timed],
                         textposition="outside"), secondary_y=False)
    throughput = [(t.number, attr(t, record.SAMPLES_PER_SECOND)) for t in timed]
    throughput = [(n, v) for n, v in throughput if v is not None]
    if throughput:
        fig.add_trace(go.Scatter(x=[n for n, _ in throughput], y=[v for _, v in throughput], mode="markers+lines",
                                 name="samples per second", marker={"symbol": "diamond", "size": 9}),
                      secondary_y=True)
        fig.update_yaxes(title_text="samples per second (training)", secondary_y=True, rangemode="tozero")
    fig.update_layout(barmode="stack", legend={"orientation": "h", "y": -0.2})
    fig.update_xaxes(title_text="trial", dtick=1 if len(numbers) <= 30 else None)
    fig.update_yaxes(title_text="seconds", secondary_y=False)
    return fig


def _gpu_hours(trials: Sequence[FrozenTrial]) -> go.Figure:
    import plotly.graph_objects as go

    spans = sorted(((t.datetime_complete, t.datetime_start, t) for t in trials
                    if t.state.is_finished() and t.datetime_complete is not None and t.datetime_start is not None),
                   key=lambda span: (span[0], span[2].number))
    if not spans:
        raise CannotDraw("no trial has finished yet")
    done = [t for _, _, t in spans]
    start = min(begun for _, begun, _ in spans)
    unit = status.hours_unit(done)  # CPU-hours on a CPU run: say what was measured
    minutes, hours, total = [0.0], [0.0], 0.0  # the sweep starts at nothing spent
    for end, _, t in spans:
        total += float(record.GPU_SECONDS.get(t, 0.0)) / 3600
        minutes.append((end - start).total_seconds() / 60)
        hours.append(total)
    fig = go.Figure(go.Scatter(
        x=minutes, y=hours, mode="lines+markers", line={"shape": "hv", "color": "#555555"}, name="cumulative",
        marker={"size": [0] + [10] * len(done),
                "color": ["#555555"] + [STATE_COLOURS[t.state.name] for t in done]},
        text=["start"] + [f"trial {t.number} ({t.state.name.lower()})" for t in done], hoverinfo="text+y",
    ))
    by_state = {s: sum(float(record.GPU_SECONDS.get(t, 0.0)) for t in done if t.state == s) / 3600
                for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    split = ", ".join(f"{s.name.lower()} {h:.3f}" for s, h in by_state.items())
    fig.update_layout(title={"text": f"{total:.3f} {unit} in finished trials ({split})", "font": {"size": 14}},
                      xaxis_title="minutes since the first trial started", yaxis_title=f"{unit}, cumulative",
                      showlegend=False)
    return fig


# --------------------------------------------------------------------------- the page


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _e(value: Any) -> str:
    return html.escape(_fmt(value) if value is not None else "-")


def _rows(pairs: Sequence[tuple[str, Any]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)


def _best_html(sweep: Sweep, summary: dict[str, Any], best: FrozenTrial | None) -> str:
    if best is None or summary["best"] is None:
        return '<p class="note">No trial has completed yet.</p>'
    b = summary["best"]
    test = b["test"]
    test_line = (f"{sweep.metric} {test['value']:.4f}" if test else
                 "not evaluated yet (the sweep evaluates it when it ends, or run "
                 "<code>sweeper best STUDY --out DIR --evaluate</code>)")
    figures = [("validation " + sweep.metric, b["value"]), ("best evaluation", b["best_evaluation"])]
    figures += [(f"validation {k}", v) for k, v in sorted(record.VALIDATION.items(best).items()) if k != sweep.metric]
    ckpt = record.CHECKPOINT.get(best) or {}
    size = sum(int(f.get("bytes", 0)) for f in ckpt.get("files", {}).values())
    where = [("worker", record.WORKER.get(best)), ("host", record.HOST.get(best)),
             ("device", record.DEVICE.get(best)),
             ("checkpoint", f"{len(ckpt.get('files', {}))} files, {size / 1e6:.1f} MB"
              + ("" if b["checkpoint"] else " (removed)") if ckpt else None),
             ("train seconds", record.TRAIN_SECONDS.get(best)),
             ("samples per second", record.SAMPLES_PER_SECOND.get(best))]
    return (f'<div class="cards"><div><h3>Trial {best.number}</h3>'
            f'<p class="figure">held-out test: <b id="best-test">{test_line}</b></p>'
            f'<table id="best-figures">{_rows(figures)}</table></div>'
            f'<div><h3>Parameters</h3><table id="best-params">{_rows(list(best.params.items()))}</table></div>'
            f'<div><h3>Where it ran</h3><table>{_rows(where)}</table></div></div>')


def _soups_html(study: optuna.Study, sweep: Sweep) -> str:
    """The soups' and the seed trials' figures (``sweeper best --soup / --seeds``) beside the
    best trial's, as recorded on the study."""
    soups, seeds = record.SOUP.items(study), record.SEEDS.items(study)
    if not soups and not seeds:
        return ('<p class="note" id="soups-none">No weight soup or seed figures yet: run <code>sweeper best '
                'STUDY --out DIR --soup --evaluate</code> or <code>--seeds 3</code>.</p>')

    def spread(s: dict[str, Any]) -> str:
        if s.get("mean") is None:
            return "-"
        return f"{s['mean']:.4f} ± {s['std']:.4f} (std, n={s['n']})" if s.get("std") is not None else f"{s['mean']:.4f}"

    def _figure(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, int | float) else "-"

    rows: list[tuple[str, str, str]] = []
    for method, f in sorted(soups.items()):
        if not rows:
            rows.append((f"best trial {f['best_trial']}", _figure(f["best_validation"]), _figure(f.get("best_test"))))
        rows.append((f"{method} soup of trials {f['members']}", _figure(f["validation"]), _figure(f.get("test"))))
    for trial, f in sorted(seeds.items(), key=lambda kv: int(kv[0])):
        rows.append((f"trial {trial} itself", _figure(f["original"]["validation"]), _figure(f["original"]["test"])))
        rows.append((f"trial {trial} with {f['validation']['n']} other seeds {f['seed_trials']}",
                     spread(f["validation"]), spread(f["test"])))
    body = "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(v)}</td><td>{html.escape(t)}</td></tr>"
                   for name, v, t in rows)
    metric = html.escape(sweep.metric)
    return (f'<table id="soups"><thead><tr><th></th><th>validation {metric}</th><th>held-out test {metric}</th>'
            f'</tr></thead><tbody>{body}</tbody></table>')


def _trials_html(trials: Sequence[FrozenTrial]) -> str:
    names: list[str] = []
    for t in trials:
        names += [k for k in t.params if k not in names]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ["trial", "state", "value", *names, "worker", "device", "train s", "eval s", "samples/s",
                    "GPU s", "note"])
    body = []
    for t in trials:
        note = record.FAIL_REASON.get(t) or ""
        if t.state == TrialState.RUNNING:
            p = record.PROGRESS.get(t) or {}
            note = f"evaluation {p.get('evaluation', 0)}/{p.get('of', '?')}"
        pause = promotion.paused_at(t)
        if pause is not None:  # pruner="asha": waiting for a promotion, its resume state kept
            note = f"paused at rung {pause['rung']} (evaluation {pause['evaluation']}, {_fmt(pause['value'])})"
        elif promotion.decisions(t):
            note = (note + "; " if note else "") + _decisions(t)
        state = "paused" if pause is not None else t.state.name.lower()
        cells = [t.number, state, t.value, *[t.params.get(n) for n in names],
                 record.WORKER.get(t), record.DEVICE.get(t), record.TRAIN_SECONDS.get(t),
                 record.EVAL_SECONDS.get(t), record.SAMPLES_PER_SECOND.get(t), record.GPU_SECONDS.get(t), note]
        row = "".join(f"<td>{_e(c)}</td>" for c in cells)
        body.append(f'<tr class="{state}">{row}</tr>')
    return (f'<table class="trials" id="trials"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _decisions(t: FrozenTrial) -> str:
    """A trial's rung decisions, oldest first: "pause@1, promote@1, promote@3"."""
    return ", ".join(f"{d['decision']}@{d['evaluation']}" for d in promotion.decisions(t))


def _page(sweep: Sweep, summary: dict[str, Any], sections: list[Section], best: FrozenTrial | None,
          trials: Sequence[FrozenTrial], plotly_js: str, soups: str = "") -> str:
    c = summary["counts"]
    counts = (f"{c['finished']} of {summary['budget'] or '?'} trials finished: {c['complete']} complete, "
              f"{c['pruned']} pruned, {c['failed']} failed ({c['retried']} more retried); "
              f"{c['running']} running, {c['waiting']} waiting"
              + (f" ({c['paused']} paused at a rung)" if c.get("paused") else "")
              + f". {summary['gpu_hours']:.3f} {summary['hours_unit']} spent.")
    parts = []
    for s in sections:
        notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in s.notes)
        body = s.figure if s.figure is not None else f'<div class="missing" id="missing-{s.key}"></div>'
        parts.append(f'<section id="section-{s.key}"><h2>{html.escape(s.title)}</h2>{notes}{body}</section>')
    generated = time.strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sweeper report: {html.escape(sweep.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} h2 {{ margin-top: 2em; border-bottom: 1px solid #ddd; }}
.sub {{ color: #666; }} .note {{ color: #8a5a00; background: #fff6e0; padding: 0.4em 0.8em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 0.2em 0.8em; text-align: left; }}
.cards {{ display: flex; gap: 3em; flex-wrap: wrap; }} .figure {{ font-size: 1.2em; }}
table.trials {{ font-size: 0.85em; }} table.trials td {{ border-top: 1px solid #eee; }}
tr.pruned td {{ color: #a0522d; }} tr.fail td {{ color: #c00; }} tr.running td {{ color: #2a7; }}
tr.paused td {{ color: #777; font-style: italic; }}
</style>
<script type="text/javascript">{plotly_js}</script>
</head>
<body>
<h1>{html.escape(sweep.name)}</h1>
<p class="sub">{html.escape(sweep.metric)}, {html.escape(sweep.direction)};
L = L_task + λ·L_pretrain ({html.escape(sweep.pretrain_loss)}); generated {html.escape(generated)} by sweeper {__version__}</p>
<p id="counts">{html.escape(counts)}</p>
<h2>Best trial</h2>
{_best_html(sweep, summary, best)}
<h2>Weight soups and seeds</h2>
{soups}
{"".join(parts)}
<h2>Trials</h2>
<p class="sub">Durations are recorded by the worker; GPU seconds are elapsed time × devices (a CPU
worker's time counts the same way, as the budget counts it).</p>
{_trials_html(trials)}
</body>
</html>
"""
