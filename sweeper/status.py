"""``sweeper status``: the study read back from its storage, as a table or as JSON.

Everything comes from the storage itself, so it works from any machine that can reach it, while
the sweep runs or after: trial states and values from Optuna, who ran what (worker, host,
device), progress, timings and device-seconds from the user attributes each trial records (see
``objective.py``), the budget from the study's system attributes, and the held-out test figure
from the study's user attributes (``finalize.py``). ``--json`` prints :func:`summarize` as it is,
for scripts; the table is :func:`render` of the same data.
"""

from __future__ import annotations

import time
from typing import Any

import optuna
from optuna.trial import TrialState

from sweeper import budget, checkpoints, promotion, record
from sweeper.study import Sweep


def summarize(study: optuna.Study, sweep: Sweep) -> dict[str, Any]:
    """Everything the table shows, as JSON-friendly data."""
    trials = study.get_trials(deepcopy=False)
    tally = budget.tally(trials)
    direction = record.direction_of(sweep.direction)
    ranked = record.ranked(trials, direction)
    best = record.best(trials, direction)
    now = time.time()
    running = []
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        progress = record.PROGRESS.get(t, {})
        running.append({
            "number": t.number, "worker": record.WORKER.get(t), "host": record.HOST.get(t),
            "device": record.DEVICE.get(t), "params": t.params,
            "evaluation": progress.get("evaluation", 0), "of": progress.get("of"),
            "last_value": progress.get("value"),
            "seconds": round(now - t.datetime_start.timestamp(), 1) if t.datetime_start else None,
            "retry_of": record.FAILED_TRIAL.get(t),
        })
    # Waiting for a promotion (pruner="asha"): counted among the waiting trials, listed apart.
    paused = [{"number": t.number, "rung": p["rung"], "evaluation": p["evaluation"], "value": p["value"],
               "params": t.params} for t in trials if (p := promotion.paused_at(t))]
    failed = [{"number": t.number, "reason": record.FAIL_REASON.get(t), "params": t.params,
               "retried": t.number in budget.superseded(trials)}
              for t in trials if t.state == TrialState.FAIL]
    test = record.BEST_TEST.get(study)
    return {
        "study": sweep.name,
        "metric": sweep.metric,
        "direction": sweep.direction,
        "budget": record.N_TRIALS.get(study),
        "counts": {"complete": tally.complete, "pruned": tally.pruned, "failed": tally.failed,
                   "retried": tally.retried, "running": tally.running, "waiting": tally.waiting,
                   "paused": len(paused), "finished": tally.finished},
        "best": None if best is None else {
            "number": best.number, "value": best.value, "params": best.params,
            "best_evaluation": record.BEST_EVALUATION.get(best),
            "checkpoint": record.CHECKPOINT.get(best) is not None
            and best.number not in checkpoints.deleted(study),
            "test": test if test and test.get("trial") == best.number else None,
        },
        "running": running,
        "paused": paused,
        "failed": failed,
        # Named `gpu_hours` after the budget setting it is checked against; `hours_unit` says
        # what was measured on these trials' devices (CPU-hours on a CPU run).
        "gpu_hours": round(budget.gpu_seconds_spent(trials) / 3600, 4),
        "hours_unit": hours_unit(trials),
        "checkpoints_kept": [t.number for t in ranked if t.number not in checkpoints.deleted(study)],
    }


def hours_unit(trials: list[optuna.trial.FrozenTrial]) -> str:
    """What the time spent measures: elapsed hours times devices, named after the devices the
    trials ran on ("CPU-hours", "GPU-hours", or "device-hours" when mixed or not yet known)."""
    kinds = {_device_kind(device) for t in trials if (device := record.DEVICE.get(t)) is not None}
    return f"{kinds.pop()}-hours" if len(kinds) == 1 else "device-hours"


def _device_kind(device: str) -> str:
    """``cpu`` -> CPU; ``cuda:0`` or ``cuda (GPU 3)`` -> GPU; anything else is a device."""
    if device == "cpu":
        return "CPU"
    return "GPU" if device.startswith("cuda") else "device"


def render(s: dict[str, Any]) -> str:
    """The summary as a table for a terminal."""
    c = s["counts"]
    lines = [f"study {s['study']}  ({s['metric']}, {s['direction']})",
             f"trials  {c['finished']}/{s['budget'] or '?'} finished: {c['complete']} complete, "
             f"{c['pruned']} pruned, {c['failed']} failed ({c['retried']} more retried); "
             f"{c['running']} running, {c['waiting']} waiting"
             + (f" ({c['paused']} paused at a rung)" if c.get("paused") else ""),
             f"spent   {s['gpu_hours']:.3f} {s['hours_unit']}"]
    best = s["best"]
    if best:
        lines.append(f"best    trial {best['number']}: {s['metric']} {best['value']:.4f} "
                     f"(evaluation {best['best_evaluation']})")
        if best["test"]:
            lines.append(f"        held-out test {s['metric']} {best['test']['value']:.4f}")
        for name, value in best["params"].items():
            lines.append(f"        {name:22s} {value:.4g}" if isinstance(value, float) else f"        {name:22s} {value}")
    else:
        lines.append("best    - (no trial has completed yet)")
    if s["running"]:
        lines.append("running")
        lines.append(f"  {'trial':>5}  {'worker':>6}  {'host':12s} {'device':16s} {'eval':>7}  {'last':>7}  {'time':>7}")
        for r in s["running"]:
            of = f"{r['evaluation']}/{r['of']}" if r["of"] else str(r["evaluation"])
            last = f"{r['last_value']:.4f}" if r["last_value"] is not None else "-"
            secs = f"{r['seconds']:.0f}s" if r["seconds"] is not None else "-"
            lines.append(f"  {r['number']:>5}  {str(r['worker']):>6}  {str(r['host'])[:12]:12s} "
                         f"{str(r['device'])[:16]:16s} {of:>7}  {last:>7}  {secs:>7}")
    if s.get("paused"):
        lines.append("paused (pruner asha: each resumes from its resume state if promoted)")
        lines.append(f"  {'trial':>5}  {'rung':>4}  {'eval':>5}  {'value':>7}")
        for p in s["paused"]:
            lines.append(f"  {p['number']:>5}  {p['rung']:>4}  {p['evaluation']:>5}  {p['value']:>7.4f}")
    final_fails = [f for f in s["failed"] if not f["retried"]]
    if final_fails:
        lines.append("failed")
        for f in final_fails[-10:]:
            lines.append(f"  trial {f['number']}: {f['reason']}")
    return "\n".join(lines)
