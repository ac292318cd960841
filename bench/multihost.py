"""Many hosts on one machine: the faults' figures, and what a slow network adds to each trial.

    sudo python bench/multihost.py                         # 3 hosts, 24 trials, 100 ms and 1% loss
    sudo python bench/multihost.py --hosts 4 --trials 40 --per-phase 8
    sudo python bench/multihost.py --delay-ms 20 --loss 0 --no-faults

The scenario of tests/test_multihost.py, larger (tests/multihost/cluster.py says exactly what
runs): N hosts, each a network namespace with its own hostname and PID namespace on one
bridge, PostgreSQL reached through a TCP relay on the bridge's address, one study made with
`sweeper create` and the real `sweeper worker` on every host. In phases, while the sweep runs:

- clean links, until ``--per-phase`` trials have run (the baseline);
- ``--delay-ms`` more on every round trip to the database and ``--loss`` % of the packets
  dropped each way on every link, until as many trials have run wholly under it;
- one host lost with its launcher (every process SIGKILLed at once) mid-trial;
- one host cut off mid-trial for longer than the grace period, then back.

Per-trial time is a trial's start to end by the workers' clock (claim to tell), so the
overhead is what the latency adds to the trial itself: the median with latency minus the
median without, measured in the same run. Every trial does the same work (fixed depth and
batch size, no pruner). Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)

from tests.multihost.cluster import GRACE_S, HEARTBEAT_S, Outcome, Settings, run_scenario
from tests.multihost.net import NetworkUnavailable, missing_requirements


def figures(outcome: Outcome) -> dict[str, object]:
    tally = outcome.tally
    return {
        "hosts": outcome.settings.hosts, "trials": tally.finished, "budget": outcome.settings.n_trials,
        "retries": tally.retried, "lost_trials": tally.failed + tally.waiting + tally.running,
        "refused_late_reports": len(outcome.refused), "worker_crashes": len(outcome.crashes),
        "delay_ms": outcome.settings.delay_ms, "loss_percent": outcome.settings.loss_percent,
        "trial_s_clean": round(statistics.median(outcome.clean_s), 2),
        "trial_s_latency": round(statistics.median(outcome.latency_s), 2),
        "overhead_s_per_trial": round(outcome.overhead_s, 2),
        "heartbeat_s": HEARTBEAT_S, "grace_s": GRACE_S, "partition_s": round(outcome.partition_s, 1),
        "wall_s": round(outcome.wall_s, 1), "leftovers": outcome.leftovers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=3, help="namespaced hosts (default 3; 2 with --no-faults)")
    parser.add_argument("--trials", type=int, default=24, help="the study's budget (default 24)")
    parser.add_argument("--per-phase", type=int, default=4, help="trials measured per phase (default 4)")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="added per round trip (default 100)")
    parser.add_argument("--loss", type=float, default=1.0, help="percent of packets dropped each way (default 1)")
    parser.add_argument("--no-faults", action="store_true", help="only the clean and the latency phases")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args()
    problem = missing_requirements()
    if problem:
        raise SystemExit(problem)
    minimum = 1 if args.no_faults else 3  # the lost host, the partitioned one, one that stays
    if args.hosts < minimum:
        raise SystemExit(f"--hosts is {args.hosts}: use {minimum} or more")
    settings = Settings(hosts=args.hosts, n_trials=args.trials, per_phase=args.per_phase, delay_ms=args.delay_ms,
                        loss_percent=args.loss, faults=not args.no_faults, evals=2, deadline_s=1800.0)
    try:
        outcome = run_scenario(Path(tempfile.mkdtemp(prefix="sweeper-multihost-")), settings)
    except NetworkUnavailable as exc:
        raise SystemExit(str(exc)) from None
    except AssertionError as exc:  # a phase timed out: its message has every host's log
        print(str(exc)[-6000:], file=sys.stderr)
        return 1
    result = figures(outcome)
    print(f"{result['hosts']} hosts, budget {result['budget']}: {result['trials']} trials counted, "
          f"{result['retries']} retried, {result['lost_trials']} lost, {result['refused_late_reports']} late "
          f"report(s) refused, {result['worker_crashes']} worker crash(es); {result['wall_s']} s in all")
    print(f"per trial (median): {result['trial_s_clean']} s on clean links, {result['trial_s_latency']} s with "
          f"+{args.delay_ms:g} ms per round trip and {args.loss:g}% loss: {result['overhead_s_per_trial']:+} s "
          f"per trial ({len(outcome.clean_s)} and {len(outcome.latency_s)} trials)")
    if outcome.crashes:
        print("worker crashes:\n  " + "\n  ".join(outcome.crashes))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
