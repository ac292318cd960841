"""Many hosts, for real, on one machine: what only a sweep across machines shows.

Three hosts, each a network namespace with its own hostname and PID namespace, on one bridge;
PostgreSQL (127.0.0.1 only) is reached through a TCP relay on the bridge's address, the way
workers on other machines reach a database server (the compose and Kubernetes deployments'
default; `sweeper proxy` is the other way, tested in tests/test_proxy.py). One study made with
the real `sweeper create`, the real `sweeper worker` on every host, and while the sweep runs:
100 ms more per round trip and 1% packet loss on every link, then one host lost with its
launcher, then one host cut off for longer than the grace period (tests/multihost/cluster.py
says exactly how). The scenario runs once for the module; each test judges one part of it.

Needs root, `ip`, `iptables` and `unshare`, and fails (never skips) without them. The figures
of a longer run: `python bench/multihost.py`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest
from optuna.trial import TrialState

from sweeper import record
from tests.helpers import ROOT
from tests.multihost.cluster import GRACE_S, Outcome, Settings, run_scenario
from tests.multihost.net import NetworkUnavailable, missing_requirements

pytestmark = [
    pytest.mark.slow,
    pytest.mark.long,
    pytest.mark.postgres,
    pytest.mark.xdist_group("multihost"),
    # Three hosts each import PyTorch and tokenise on two shared cores: about 1.5 minutes when
    # the machine is quiet, several when it is busy.
    pytest.mark.timeout(600),
]

SETTINGS = Settings(hosts=3, n_trials=18, per_phase=3, evals=2, delay_ms=100.0, loss_percent=1.0)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    problem = missing_requirements()
    if problem:
        pytest.fail(problem)
    try:
        outcome = run_scenario(tmp_path_factory.mktemp("multihost"), SETTINGS)
    except NetworkUnavailable as exc:
        pytest.fail(str(exc))
    return outcome


def counted(outcome: Outcome) -> list[int]:
    """The trials that count in the budget: every trial but the failed ones a retry replaced."""
    replaced = {n for t in outcome.trials for n in record.RETRY_HISTORY.get(t, [])}
    return [t.number for t in outcome.trials if not (t.state == TrialState.FAIL and t.number in replaced)]


def test_each_host_is_a_machine_of_its_own(scenario: Outcome) -> None:
    hosts = {record.HOST.get(t) for t in scenario.trials}
    assert len(hosts - {None}) >= 2 and hosts <= {f"host{i}" for i in range(1, SETTINGS.hosts + 1)}
    # PID namespaces: the workers' pids repeat across hosts, as on separate machines, so the
    # owner check can only be right if it goes by host name too.
    owners = {(record.HOST.get(t), record.PID.get(t)) for t in scenario.trials}
    assert len({pid for _, pid in owners}) < len(owners)
    assert scenario.relayed_connections > 0  # every host reached the database over its link


def test_the_budget_is_exact_and_no_trial_is_counted_twice(scenario: Outcome) -> None:
    tally = scenario.tally
    assert (tally.waiting, tally.running, tally.failed) == (0, 0, 0), scenario.logs
    assert tally.finished == SETTINGS.n_trials
    assert len(counted(scenario)) == SETTINGS.n_trials
    # Each retry replaces one trial, once: no lineage has two trials that count.
    lineages = [tuple(record.RETRY_HISTORY.get(t, [])) for t in scenario.trials if record.RETRY_HISTORY.get(t)]
    assert len(lineages) == len(set(lineages)) == tally.retried
    assert all(t.state == TrialState.COMPLETE for t in scenario.trials if t.number in counted(scenario))
    alive = {name: code for name, code in scenario.exit_codes.items() if code is not None}
    assert alive and all(code == 0 for code in alive.values()), scenario.logs


def test_a_host_lost_with_its_launcher_has_its_trial_resumed_on_another(scenario: Outcome) -> None:
    assert scenario.lost_trial is not None and scenario.killed_processes >= 3  # launcher, template, worker
    lost = scenario.by_number(scenario.lost_trial)
    assert lost.state == TrialState.FAIL
    assert "no heartbeat" in record.FAIL_REASON.get(lost, "")  # no launcher was left to hand it back
    [retry] = scenario.retries_of(lost.number)
    assert retry.state == TrialState.COMPLETE and record.HOST.get(retry) != scenario.lost_host
    assert record.RESUMED_FROM_STEP.get(retry), "killed after its first evaluation: the retry continues from there"


def test_a_partitioned_host_has_its_trial_retried_elsewhere_and_its_late_report_refused(scenario: Outcome) -> None:
    assert scenario.partitioned_trial is not None
    assert scenario.partition_s > GRACE_S
    late = scenario.by_number(scenario.partitioned_trial)
    assert late.state == TrialState.FAIL and "no heartbeat" in record.FAIL_REASON.get(late, "")
    [retry] = scenario.retries_of(late.number)
    assert retry.state == TrialState.COMPLETE and record.HOST.get(retry) != scenario.partitioned_host
    # Back on the network, the late worker went on with its trial: what it told was refused.
    assert scenario.refused, f"no refused report of trial {late.number} in the worker logs\n{scenario.logs}"
    assert late.value is None
    assert scenario.exit_codes[scenario.partitioned_host or ""] == 0
    assert not scenario.crashes, "\n".join(scenario.crashes)


def test_latency_and_loss_on_every_link_slow_each_trial_and_lose_none(scenario: Outcome) -> None:
    clean, slow = sorted(scenario.clean_s), sorted(scenario.latency_s)
    assert len(clean) >= SETTINGS.per_phase and len(slow) >= SETTINGS.per_phase
    # A trial makes its storage calls one after another: each pays the added round trip.
    assert scenario.overhead_s > SETTINGS.delay_ms / 1000
    print(f"\nmulti-host sweep, {SETTINGS.hosts} hosts, {SETTINGS.n_trials} trials in {scenario.wall_s:.0f} s: "
          f"{scenario.tally.retried} retried, {len(scenario.refused)} late report(s) refused; per trial "
          f"(median) {statistics.median(clean):.1f} s on clean links, {statistics.median(slow):.1f} s with "
          f"+{SETTINGS.delay_ms:g} ms per round trip and {SETTINGS.loss_percent:g}% loss: "
          f"{scenario.overhead_s:+.1f} s per trial")


def test_the_hosts_leave_no_namespace_link_or_rule_behind(scenario: Outcome) -> None:
    assert scenario.leftovers == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"swmh{os.getpid()}-" not in namespaces


NO_ROOT = "the multi-host tests need root (network namespaces, veth pairs, iptables): run them as root"


def test_without_root_the_multihost_tests_fail_with_one_line() -> None:
    if os.geteuid() != 0:  # then the scenario fixture has failed with this line already
        assert missing_requirements() == NO_ROOT
        return
    # A user namespace of its own makes the same interpreter an unprivileged user (uid 65534),
    # who can still read this checkout (not so `nobody`: the interpreter is under /root).
    done = subprocess.run(
        ["unshare", "--user", sys.executable, "-c",
         "from tests.multihost.net import missing_requirements; print(missing_requirements())"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == NO_ROOT
