"""The ``sweeper`` command: a table of subcommands, ``main() -> int``.

Each subcommand is two functions side by side: ``_add_NAME`` declares its parser (its own flags,
the shared ones through argparse's ``parents=``, its help ending with examples) and ``cmd_NAME``
runs it. ``_COMMANDS`` lists them in the order ``sweeper --help`` shows them.

Any problem with the user's input or environment ends in one line on stderr and exit code 2;
only this module prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweeper import __version__
from sweeper.errors import SweepError

if TYPE_CHECKING:
    from typing import TypeAlias

    _Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_USAGE = 2


# --------------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace) -> Any:
    from sweeper import study

    return study.load(args.study, args.set or [])


def _url(args: argparse.Namespace, sweep: Any) -> str:
    from sweeper.storage import resolve_url

    return resolve_url(getattr(args, "storage", None), sweep.storage, sweep.output_path)


def _open_study(args: argparse.Namespace, sweep: Any) -> Any:
    import optuna

    from sweeper.storage import mask, open_storage

    url = _url(args, sweep)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise SweepError(f"the study {sweep.name!r} has not started: there is no {url[len('sqlite:///'):]} "
                         f"yet (run `sweeper launch {args.study}` first)")
    storage = open_storage(url, heartbeat_interval=None, grace_period=None, create_tables=False)
    try:
        return optuna.load_study(study_name=sweep.name, storage=storage)
    except KeyError:
        raise SweepError(f"the study {sweep.name!r} does not exist in {mask(url)}: run "
                         f"`sweeper launch {args.study}` first") from None


def check_port(flag: str, port: int) -> None:
    """A port a server can listen on (issue 17.8: 70000 ended in a traceback)."""
    if not 0 <= port <= 65535:
        raise SweepError(f"`{flag}` is {port}: use a port from 1 to 65535, or 0 for any free one")


def check_out(out: Path, *, folder: bool) -> None:
    """``--out`` before anything is read or written: a folder to write (``best``, ``deploy``)
    must not be an existing file, and no path may lie under a file (issue 17.8)."""
    for above in out.parents:
        if above.exists() and not above.is_dir():
            raise SweepError(f"`--out {out}` lies under {above}, which is a file: choose a path in a folder")
    if folder and out.exists() and not out.is_dir():
        raise SweepError(f"`--out {out}` is a file: give a folder to write into (created if missing), "
                         "or remove the file first")


def _setup_logging(verbose: int, prefix: str = "") -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The hub client logs every retry of an unreachable network; sweeper's own error says it once.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # transformers warns about every newly initialised head: expected here, so hide it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --------------------------------------------------------------------------- parsers


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _command(sub: _Subparsers, name: str, run: Callable[[argparse.Namespace], int] | None, help: str, *,
             examples: Sequence[str], description: str | None = None,
             parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The parser of ``sweeper NAME``, run by ``run``; its help ends with ``examples``.

    Every command has a description (``help`` stands in when none is given), wrapped here
    since the raw formatter that keeps the examples' lines also leaves it unwrapped."""
    text = description or f"{help[0].upper()}{help[1:]}."
    parser = sub.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
                            description=textwrap.fill(text, 88), epilog=_examples(*examples),
                            parents=list(parents))
    # The innermost command's parser wins (`deploy k8s` over `deploy`): its usage is the one to show.
    parser.set_defaults(command_parser=parser)
    if run is not None:
        parser.set_defaults(func=run)
    return parser


def _flags() -> argparse.ArgumentParser:
    """A group of flags that several commands share, declared once (their ``parents=``)."""
    return argparse.ArgumentParser(add_help=False)


_STUDY = _flags()
# nargs="?": a study path that a --set before it took in is found again in main().
_STUDY.add_argument("study", nargs="?", help="path of the study file, e.g. studies/quickstart.py")
_STUDY.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                    help="override study values, several after one --set or one --set each: epochs=1, "
                         "model=PATH, data.max_length=64, space.learning_rate=1e-5..1e-3")

_STORAGE = _flags()
_STORAGE.add_argument("--storage", metavar="URL",
                      help="storage URL (default: $SWEEPER_STORAGE, the study's, or SQLite in its output folder)")

_WORKERS = _flags()  # the worker processes of one machine: `launch` and `worker`
_WORKERS.add_argument("--workers", type=int,
                      help="worker processes on this machine (default: one per GPU, or 1 on CPU)")
_WORKERS.add_argument("--workers-per-gpu", type=int, default=1, metavar="K",
                      help="trials sharing each GPU (default 1)")
_WORKERS.add_argument("--gpus", metavar="IDS", help="GPUs to use, e.g. 0,2 (default: every visible GPU)")
_WORKERS.add_argument("--heartbeat", type=int, metavar="S", help="heartbeat interval in seconds (default 20)")
_WORKERS.add_argument("--grace", type=int, metavar="S",
                      help="seconds without a heartbeat before a trial is failed and retried (default 120)")
_WORKERS.add_argument("--keep", type=int, metavar="K",
                      help="keep the checkpoints of the best K trials, delete the rest as the sweep "
                           "runs (default: the study's `keep`, 3 unless it says otherwise)")
_WORKERS.add_argument("--array-size", type=int, metavar="K",
                      help="trials each worker trains at once as one stacked model (trial arrays; "
                           "default: the study's `array_size`, 1 = one at a time)")

_BUDGET = _flags()  # the global budget, set where the study is created: `launch` and `create`
_BUDGET.add_argument("--n-trials", type=int, metavar="N", help="trials in all, across every worker and machine")
_BUDGET.add_argument("--timeout", type=float, metavar="S", help="no new trial starts after S seconds")
_BUDGET.add_argument("--gpu-hours", type=float, metavar="H",
                     help="no new trial starts once H device-hours are spent (GPU-hours; CPU-hours on a CPU)")

_VERBOSE = _flags()
_VERBOSE.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")


# --------------------------------------------------------------------------- commands


def _add_validate(sub: _Subparsers) -> None:
    _command(sub, "validate", cmd_validate, "check a study file and sample its space once (no training)",
             description=cmd_validate.__doc__, parents=[_STUDY, _STORAGE],
             examples=["sweeper validate studies/bert_sst2.py",
                       "sweeper validate studies/bert_sst2.py --set model=../shared/models/minilm-l6-h384"])


def cmd_validate(args: argparse.Namespace) -> int:
    """Load the study, check it whole, sample the space once; no training."""
    import optuna

    from sweeper import space, study
    from sweeper.finetune.data import check_source
    from sweeper.storage import mask

    sweep = _load(args)
    blocks = study.check_model_fit(sweep, args.study)
    if sweep.train is not None:
        print(f"{args.study}: OK (its own train function {sweep.to_dict()['train']}; space "
              f"{', '.join(sweep.space)}; {sweep.metric}, {sweep.direction}, {sweep.n_trials} trials)")
        return 0
    check_source(sweep.data)
    sampler_study = optuna.create_study(direction=sweep.direction,
                                        sampler=optuna.samplers.RandomSampler(seed=sweep.seed))
    sample = space.sample(sweep.space, sampler_study.ask())
    print(f"{args.study}: OK")
    print(f"  study      {sweep.name}  ({sweep.metric}, {sweep.direction}, {sweep.n_trials} trials, "
          f"{sweep.epochs:g} epochs, pruner {sweep.pruner}, sampler {sweep.sampler})")
    print(f"  model      {type(sweep.model).__name__} {sweep.model.path}  ({blocks} blocks)")
    print(f"  data       {type(sweep.data).__name__} {getattr(sweep.data, 'path', '(generated)')}")
    print(f"  loss       task + λ·{sweep.pretrain_loss}")
    print(f"  storage    {mask(_url(args, sweep))}")
    print(f"  outputs    {sweep.output_path}")
    print("  space")
    for name, dist in sweep.space.items():
        print(f"    {name:22s} {dist}")
    first, _ = space.first_trial_params(sweep.space, sweep.first_trials)
    for k, params in enumerate(first):
        print(f"  first {k + 1:<4d} {json.dumps(params)}")
    print(f"  a sample   {json.dumps(sample)}")
    return 0


def _add_launch(sub: _Subparsers) -> None:
    _command(sub, "launch", cmd_launch, "create or resume a sweep and run its workers here",
             description="Create the study (or resume it), then run worker processes on this "
                         "machine until the budget is spent. Ctrl-C stops cleanly; launching "
                         "again resumes. Workers are forked from a template process that "
                         "imports PyTorch once (SWEEPER_WORKER_START=fresh: a new interpreter "
                         "each). Exit code 0: the budget is spent and a trial completed; 1: every "
                         "trial failed; 2: bad input (one line says what); 130: stopped with Ctrl-C.",
             parents=[_STUDY, _STORAGE, _WORKERS, _VERBOSE, _BUDGET],
             examples=["sweeper launch studies/quickstart.py --workers 2",
                       "sweeper launch studies/bert_sst2.py --workers 8 --workers-per-gpu 2",
                       "SWEEPER_STORAGE=postgresql+psycopg2://u:p@db/sweeps sweeper launch studies/bert_sst2.py"])


def cmd_launch(args: argparse.Namespace, join: bool = False) -> int:
    from sweeper import processes, study
    from sweeper.launcher import Launcher, LaunchOptions, finish_spent_budget
    from sweeper.storage import mask

    if args.keep is not None:  # the study's `keep`, overridden for this machine's workers too
        args.set = [*(args.set or []), f"keep={args.keep}"]
    if args.array_size is not None:  # as --keep: a study value, for this machine's workers
        args.set = [*(args.set or []), f"array_size={args.array_size}"]
    starter = processes.starter()
    if Path(args.study).is_file():
        starter.warm_up()  # the worker template imports torch while this process reads, checks and tokenises
    sweep = _load(args)
    url = _url(args, sweep)
    options = LaunchOptions(
        study_path=args.study, overrides=args.set or [], url=url, workers=args.workers,
        workers_per_gpu=args.workers_per_gpu,
        gpus=_gpu_ids(args.gpus),
        n_trials=getattr(args, "n_trials", None), timeout=getattr(args, "timeout", None),
        gpu_hours=getattr(args, "gpu_hours", None), join=join, heartbeat_interval=args.heartbeat,
        grace_period=args.grace, progress=sys.stderr,
    )
    spent = finish_spent_budget(sweep, options, say=lambda line: print(f"sweeper: {line}", file=sys.stderr))
    if spent is not None:
        return spent  # nothing left to run: no model check, no tokenising, no worker
    launcher = Launcher(sweep, options, starter)
    if not join:
        study.check_model_fit(sweep, args.study)
    if sweep.train is None and (not sweep.cache_dir.is_dir() or not any(sweep.cache_dir.iterdir())):
        # The first launch's longest silence (issue 18.3): say what it is doing, and that it is once.
        print(f"sweeper: preparing {sweep.name!r} (first launch): building the model and tokenising the data "
              f"into {sweep.cache_dir}; later launches read them back", file=sys.stderr, flush=True)
    # Tokenise here, once, before any worker starts: a missing data set is one line now rather
    # than a failed trial per worker, and the workers start from the cache.
    from sweeper.objective import prepare_data

    if sweep.train is None:  # a study's own train function reads its own data
        prepare_data(sweep)
    devices = sorted({s.gpu for s in launcher.slots if s.gpu is not None})
    where = f"GPU {','.join(devices)}" if devices else "CPU"
    print(f"sweeper: {'joining' if join else 'launching'} {sweep.name!r} with {len(launcher.slots)} "
          f"worker(s) on {where}; storage {mask(url)}; logs in {launcher.logs}", file=sys.stderr)
    return launcher.run()


def _add_worker(sub: _Subparsers) -> None:
    _command(sub, "worker", cmd_worker, "join a running sweep from this machine",
             description="Run workers for a study that `sweeper launch` created on a shared "
                         "storage; never creates the study or changes its budget. Workers start "
                         "as for `sweeper launch`.",
             parents=[_STUDY, _STORAGE, _WORKERS, _VERBOSE],
             examples=["SWEEPER_STORAGE=postgresql+psycopg2://u:p@db/sweeps sweeper worker studies/bert_sst2.py --workers 4"])


def cmd_worker(args: argparse.Namespace) -> int:
    return cmd_launch(args, join=True)


def _add_status(sub: _Subparsers) -> None:
    parser = _command(sub, "status", cmd_status, "trials by state, the best so far, what is running",
                      description="Read the study back from its storage: trials by state, the device-hours "
                                  "spent, the best trial with its parameters and held-out test figure, "
                                  "each running trial with its worker, host, device and progress, and "
                                  "why trials failed. Works while the sweep runs or after it, from any "
                                  "machine that reaches the storage.",
                      parents=[_STUDY, _STORAGE],
                      examples=["sweeper status studies/quickstart.py", "sweeper status studies/quickstart.py --json"])
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def cmd_status(args: argparse.Namespace) -> int:
    from sweeper import status

    sweep = _load(args)
    study = _open_study(args, sweep)
    summary = status.summarize(study, sweep)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(status.render(summary))
    return 0


def _add_best(sub: _Subparsers) -> None:
    parser = _command(sub, "best", cmd_best, "write the best trial's checkpoint, params and metrics to a folder",
                      description="Write the best trial's checkpoint (or trial N's) into a folder that "
                                  "the model's own loader opens (from_pretrained for text models), with "
                                  "params.json and metrics.json. Works while the sweep runs. Each file's "
                                  "SHA-256 is checked against the one recorded when it was saved; a "
                                  "corrupt or missing file is refused and nothing is written. --soup "
                                  "writes the weight soup of the kept trials instead; --seeds N first "
                                  "trains the configuration again with N other seeds (workers run here, "
                                  "as for `launch`) and reports the spread of its figures.",
                      parents=[_STUDY, _STORAGE, _WORKERS, _VERBOSE],
                      examples=["sweeper best studies/quickstart.py --out best/",
                                "sweeper best studies/bert_sst2.py --out soup/ --soup greedy --evaluate",
                                "sweeper best studies/bert_sst2.py --out best/ --seeds 3 --workers 2",
                                "sweeper best studies/bert_sst2.py --out t7/ --trial 7"])
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (created if missing)")
    parser.add_argument("--trial", type=int, metavar="N", help="this trial instead of the best")
    parser.add_argument("--evaluate", action="store_true", help="also score it on the held-out test split")
    parser.add_argument("--soup", nargs="?", const="greedy", choices=("greedy", "uniform"),
                        help="write the weight soup of the kept trials instead (default greedy: each trial, "
                             "best first, stays only if the validation figure does not drop), with soup.json")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="first train the chosen trial's configuration again with N other seeds (budgeted "
                             "trials, run by workers here as `launch` runs them); report mean and spread of "
                             "validation and test, and write seeds.json")


def cmd_best(args: argparse.Namespace) -> int:
    from sweeper import best

    check_out(Path(args.out), folder=True)
    if args.keep is not None:  # as for `launch`: the seed trials' workers keep K
        args.set = [*(args.set or []), f"keep={args.keep}"]
    if args.array_size is not None:  # as --keep: a study value, for this machine's workers
        args.set = [*(args.set or []), f"array_size={args.array_size}"]
    sweep = _load(args)
    study = _open_study(args, sweep)
    if args.soup and args.trial is not None:
        raise SweepError("--soup averages the kept trials, --trial picks one: give one of them")
    seeds = None
    if args.seeds is not None:
        seeds = _run_seed_trials(args, sweep, study)
    if args.soup:
        result = best.export_soup(sweep, study, Path(args.out), args.soup, evaluate=args.evaluate)
    else:
        trial = seeds["trial"] if seeds else args.trial
        result = best.export(sweep, study, Path(args.out), trial_number=trial, evaluate=args.evaluate)
    print(result)
    if seeds:
        (Path(args.out) / "seeds.json").write_text(json.dumps(seeds, indent=1))
        print(best.seeds_line(sweep, seeds))
    return 0


def _run_seed_trials(args: argparse.Namespace, sweep: Any, study: Any) -> dict[str, Any]:
    """`best --seeds N`: queue the repeats as tickets, run workers as `launch` does, score them."""
    from sweeper import best, processes
    from sweeper.launcher import Launcher, LaunchOptions
    from sweeper.objective import prepare_data

    original, total = best.queue_seeds(sweep, study, args.seeds, args.trial)
    starter = processes.starter()
    starter.warm_up()
    options = LaunchOptions(
        study_path=args.study, overrides=args.set or [], url=_url(args, sweep), workers=args.workers,
        workers_per_gpu=args.workers_per_gpu,
        gpus=_gpu_ids(args.gpus),
        n_trials=total, heartbeat_interval=args.heartbeat, grace_period=args.grace, progress=sys.stderr,
    )
    launcher = Launcher(sweep, options, starter)
    prepare_data(sweep)
    print(f"sweeper: training trial {original.number}'s configuration with {args.seeds} other seeds "
          f"(budget now {total} trials); logs in {launcher.logs}", file=sys.stderr)
    code = launcher.run()
    if code:
        raise SweepError(f"the seed trials' workers stopped (exit code {code}): run the same command again "
                         "to finish them")
    return best.seed_figures(sweep, study, original)


def _add_dashboard(sub: _Subparsers) -> None:
    parser = _command(sub, "dashboard", cmd_dashboard, "optuna-dashboard on the study's storage and checkpoints",
                      description="Serve optuna-dashboard on the study's storage, with its artifact store "
                                  "so that each trial's checkpoint files are listed beside it. The "
                                  "dashboard has no login: it listens on 127.0.0.1 unless --host says "
                                  "otherwise. Ctrl-C stops it.",
                      parents=[_STUDY, _STORAGE],
                      examples=["sweeper dashboard studies/quickstart.py",
                                "sweeper dashboard studies/bert_sst2.py --port 8081",
                                "SWEEPER_STORAGE=postgresql+psycopg2://u:p@db/sweeps sweeper dashboard studies/bert_sst2.py --host 0.0.0.0"])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it, without a login)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks a free one)")
    # Not the shared -v: at -vv the dashboard logs every request, which its help says.
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv logs every request)")


def cmd_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard on the study's storage and artifact store, until Ctrl-C."""
    from sweeper import dashboard
    from sweeper.storage import mask

    check_port("--port", args.port)
    sweep = _load(args)
    url = _url(args, sweep)
    board = dashboard.start(sweep, url, host=args.host, port=args.port)
    print(f"sweeper: dashboard for {sweep.name!r} at {board.url}  (storage {mask(url)}; artifacts "
          f"{board.artifacts}; Ctrl-C stops)", flush=True)
    try:
        board.serve_forever()
    except KeyboardInterrupt:
        print("sweeper: dashboard stopped", file=sys.stderr)
    return 0


def _add_report(sub: _Subparsers) -> None:
    parser = _command(sub, "report", cmd_report, "write one self-contained HTML report of the sweep (opens offline)",
                      description="Write one self-contained HTML file (plotly.js inlined: it opens "
                                  "offline): optimisation history, importances, parallel coordinates, "
                                  "pruning curves, the metric over λ and unfreeze depth, timings, "
                                  "device-hours, and the best trial with its held-out test figure.",
                      parents=[_STUDY, _STORAGE],
                      examples=["sweeper report studies/quickstart.py --out report.html",
                                "sweeper report studies/bert_sst2.py --storage postgresql+psycopg2://u:p@db/sweeps --out bert.html"])
    parser.add_argument("--out", metavar="FILE",
                        help="HTML file to write (default: report.html in the study's output folder)")


def cmd_report(args: argparse.Namespace) -> int:
    """Write the sweep's report: one HTML file that opens offline."""
    from sweeper import report

    if args.out:
        check_out(Path(args.out), folder=False)
    sweep = _load(args)
    study = _open_study(args, sweep)
    out = Path(args.out) if args.out else sweep.output_path / "report.html"
    result = report.write(study, sweep, out)
    print(f"sweeper: report of {sweep.name!r} written to {result.path} ({result.bytes / 1e6:.1f} MB, "
          f"{len(result.drawn)} plots)")
    for key, why in result.not_drawn.items():
        print(f"  {key}: {why}")
    return 0


def _add_create(sub: _Subparsers) -> None:
    _command(sub, "create", cmd_create, "create a sweep's study and budget on its storage; start no worker",
             description="Create the study (or resume it) and set its budget, as `sweeper launch` "
                         "does, but start no worker: for Docker Compose and Kubernetes, where "
                         "the workers run elsewhere and join with `sweeper worker`.",
             parents=[_STUDY, _STORAGE, _BUDGET, _VERBOSE],
             examples=["SWEEPER_STORAGE=postgresql+psycopg2://u:p@db/sweeps sweeper create studies/bert_sst2.py",
                       "sweeper create studies/bert_sst2.py --storage grpc://proxy:13000 --n-trials 200"])


def cmd_create(args: argparse.Namespace) -> int:
    """Create the study (or resume it) and set its budget; start no worker."""
    from sweeper import record, study
    from sweeper.launcher import LaunchOptions, budget_note, prepare_study
    from sweeper.storage import mask

    sweep = _load(args)
    study.check_model_fit(sweep, args.study)
    url = _url(args, sweep)
    options = LaunchOptions(study_path=args.study, overrides=args.set or [], url=url, n_trials=args.n_trials,
                            timeout=args.timeout, gpu_hours=args.gpu_hours)
    created = prepare_study(sweep, options)
    note = budget_note(created, sweep, options)  # a budget never shrinks: say what it is
    print(f"sweeper: study {sweep.name!r} is ready in {mask(url)} with a budget of "
          f"{record.N_TRIALS.get(created)} trials; workers join it with `sweeper worker {args.study}`"
          + (f" ({note})" if note else ""))
    return 0


def _add_proxy(sub: _Subparsers) -> None:
    # Its own flags as a group too, so that --help lists them before the shared -v, as it always has.
    flags = _flags()
    flags.add_argument("--storage", metavar="URL", help="the database URL (default: $SWEEPER_STORAGE)")
    flags.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                                                           "workers on other machines: there is no login)")
    flags.add_argument("--port", type=int, default=13000, help="port to listen on (default 13000)")
    flags.add_argument("--grace", type=float, default=120, metavar="S",
                       help="seconds without a heartbeat before a trial is failed and retried (default 120; "
                            "match the workers' --grace)")
    flags.add_argument("--threads", type=int, default=8, metavar="N",
                       help="request threads (default 8); each busy one holds a database connection")
    _command(sub, "proxy", cmd_proxy, "one gRPC storage proxy in front of the database, for many workers",
             description="Serve the database to workers over gRPC (Optuna's storage proxy), so "
                         "that PostgreSQL sees the proxy's few connections instead of a few per "
                         "worker. Workers use --storage grpc://HOST:PORT. Workers behind it have "
                         "no native heartbeat: the proxy fails and retries the trials whose "
                         "attribute heartbeat is older than --grace. It has no login: it listens "
                         "on 127.0.0.1 unless --host says otherwise.",
             parents=[flags, _VERBOSE],
             examples=["sweeper proxy --storage postgresql+psycopg2://u:p@db/sweeps",
                       "SWEEPER_STORAGE=postgresql+psycopg2://u:p@db/sweeps sweeper proxy --host 0.0.0.0 --port 13000",
                       "SWEEPER_STORAGE=grpc://proxyhost:13000 sweeper worker studies/bert_sst2.py"])


def cmd_proxy(args: argparse.Namespace) -> int:
    """Serve one database to many workers over gRPC; fail and retry the trials of dead workers."""
    from sweeper import proxy
    from sweeper.storage import ENV_STORAGE, mask

    url = args.storage or os.environ.get(ENV_STORAGE)
    if not url:
        raise SweepError("`sweeper proxy` needs the database URL: pass --storage "
                         f"postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB or set {ENV_STORAGE}")
    check_port("--port", args.port)
    problems = ([f"`--threads` is {args.threads}: use 1 or more"] if args.threads < 1 else []) + (
        [f"`--grace` is {args.grace:g} s: use more than the workers' heartbeat interval (20 s unless "
         "they set --heartbeat)"] if args.grace <= 0 else [])
    if problems:
        raise SweepError("; ".join(problems))
    shown = "localhost" if args.host in ("127.0.0.1", "localhost", "::1") else "THIS_HOST"
    print(f"sweeper: storage proxy for {mask(url)} on {args.host}:{args.port} ({args.threads} threads; "
          f"trials without a heartbeat for {args.grace:g}s are failed and retried); workers use "
          f"--storage grpc://{shown}:{args.port}", file=sys.stderr, flush=True)
    try:
        proxy.serve(url, host=args.host, port=args.port, grace=args.grace, threads=args.threads)
    except KeyboardInterrupt:
        print("sweeper: storage proxy stopped", file=sys.stderr)
    return 0


def _add_deploy(sub: _Subparsers) -> None:
    deploy = _command(sub, "deploy", None, "render a sweep's Kubernetes manifests",
                      description="Render the Kubernetes manifests of one sweep (the study file in a "
                                  "ConfigMap, a Job that creates the study, the workers as an Indexed "
                                  "Job with one GPU each, the dashboard, PostgreSQL, and with --proxy the "
                                  "storage proxy). docker/k8s/ holds them for studies/quickstart.py.",
                      examples=["sweeper deploy k8s studies/bert_sst2.py --workers 16 --image registry.example/sweeper:0.1.0 --out k8s/",
                                "sweeper deploy k8s studies/bert_sst2.py --workers 200 --proxy --out k8s/",
                                "sweeper deploy k8s studies/quickstart.py --workers 4 | kubectl apply -f -"])
    targets = deploy.add_subparsers(dest="target", metavar="TARGET", required=True)
    # No --storage: the pods read the URL from a Kubernetes Secret (sweeper.deploy).
    k8s = _command(targets, "k8s", cmd_deploy, "Kubernetes manifests", parents=[_STUDY],
                   description="Render the Kubernetes manifests of one sweep, one file per part with "
                               "--out or one stream on stdout: PostgreSQL (unless --external-db), a "
                               "shared volume, the study file in a ConfigMap, a Job that creates the "
                               "study, the workers as an Indexed Job with one GPU each, the dashboard, "
                               "and with --proxy the storage proxy. Secrets are never written: the pods "
                               "read the database URL from the Secret sweeper-storage.",
                   examples=["sweeper deploy k8s studies/bert_sst2.py --workers 16 --out k8s/"])
    k8s.add_argument("--workers", type=int, required=True, metavar="N", help="worker pods, one GPU each")
    k8s.add_argument("--workers-per-gpu", type=int, default=1, metavar="K", help="trials sharing each GPU (default 1)")
    k8s.add_argument("--image", default=f"sweeper:{__version__}",
                     help=f"the worker image, built from docker/Dockerfile (default sweeper:{__version__})")
    k8s.add_argument("--n-trials", type=int, metavar="N", help="the budget, if not the study's n_trials")
    k8s.add_argument("--proxy", action="store_true", help="workers reach the database through `sweeper proxy`")
    k8s.add_argument("--external-db", action="store_true",
                     help="no PostgreSQL manifests: the URL in the sweeper-storage Secret names your own")
    k8s.add_argument("--grace", type=int, metavar="S",
                     help="seconds without a heartbeat before a trial is failed and retried (default 120)")
    k8s.add_argument("--out", metavar="DIR", help="write one file per part here (default: print one stream)")


def cmd_deploy(args: argparse.Namespace) -> int:
    """Render the Kubernetes manifests of one sweep."""
    from sweeper import deploy

    if args.out:
        check_out(Path(args.out), folder=True)
    if not args.image.strip():
        raise SweepError("--image is empty: name the worker image the cluster pulls (built from "
                         f"docker/Dockerfile), or leave out --image for sweeper:{__version__}")
    sweep = _load(args)
    options = deploy.K8sOptions(
        study_file=Path(args.study), sweep_name=sweep.name, workers=args.workers, image=args.image,
        proxy=args.proxy, postgres=not args.external_db, overrides=args.set or [], n_trials=args.n_trials,
        workers_per_gpu=args.workers_per_gpu, grace=args.grace,
    )
    files = deploy.render_k8s(options)
    if args.out:
        written = deploy.write(files, Path(args.out))
        print(f"sweeper: wrote {len(written)} manifests for {sweep.name!r} ({args.workers} workers) to "
              f"{args.out}; apply them with `kubectl apply -f {args.out}`", file=sys.stderr)
    else:
        print(deploy.as_stream(files), end="")
    return 0


def _add_env(sub: _Subparsers) -> None:
    _command(sub, "env", cmd_env, "versions, GPUs and storage: what a bug report needs",
             description="Print what a bug report needs: the versions of sweeper, Python and its "
                         "libraries, the GPUs PyTorch sees, and the environment variables sweeper "
                         "reads (a password in SWEEPER_STORAGE is masked).",
             examples=["sweeper env"])


def cmd_env(args: argparse.Namespace) -> int:
    """What a bug report needs."""
    lines = [f"sweeper {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"platform {platform.platform()}"]
    for name in ("optuna", "torch", "transformers", "sqlalchemy", "torchvision", "optuna_dashboard",
                 "plotly", "psycopg2", "boto3", "grpc"):
        try:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            lines.append(f"{name} (not installed)")
        except Exception as exc:  # noqa: BLE001  (installed but broken: what a bug report needs most)
            lines.append(f"{name} (fails to import: {type(exc).__name__}: {' '.join(str(exc).split())[:120]})")
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            lines.append(f"cuda {torch.version.cuda}, GPUs: {', '.join(names)}")
        else:
            lines.append("cuda: no GPU visible")
    except ImportError:
        pass
    from sweeper.storage import ENV_STORAGE, mask

    lines.append(f"{ENV_STORAGE}={mask(os.environ[ENV_STORAGE]) if ENV_STORAGE in os.environ else '(unset)'}")
    from sweeper.processes import ENV_PRELOAD, ENV_START

    lines += [f"{name}={os.environ.get(name, '(unset)')}" for name in (ENV_START, ENV_PRELOAD)]
    print("\n".join(lines))
    return 0


def _add_work(sub: _Subparsers) -> None:
    # Not listed in `sweeper --help` (no help=): the launcher starts it, with these flags.
    parser = sub.add_parser("_work", parents=[_STUDY, _STORAGE],
                            description="One worker process, started by `sweeper launch` and `sweeper "
                                        "worker` (not meant to be run by hand).")
    parser.set_defaults(command_parser=parser)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--gpu")
    parser.add_argument("--join", action="store_true")
    parser.add_argument("--heartbeat", type=int)
    parser.add_argument("--grace", type=int)
    parser.set_defaults(func=cmd_work)


def cmd_work(args: argparse.Namespace) -> int:
    """One worker process (started by the launcher)."""
    from sweeper import worker
    from sweeper.worker import WorkerInfo

    _setup_logging(1, prefix=f"[worker {args.index}] ")
    if os.environ.get("SWEEPER_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["SWEEPER_THREADS"]))
    sweep = _load(args)
    url = _url(args, sweep)
    info = WorkerInfo(index=args.index, device="cuda:0" if args.gpu is not None else "cpu",
                      physical_gpu=args.gpu)
    salt = socket.gethostname() if args.join else ""
    return worker.run(sweep, url, info, host_salt=salt, heartbeat_interval=args.heartbeat,
                      grace_period=args.grace)


# --------------------------------------------------------------------------- the table

# In the order of `sweeper --help`.
_COMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _add_validate, _add_launch, _add_worker, _add_status, _add_best, _add_dashboard, _add_report, _add_create,
    _add_proxy, _add_deploy, _add_env, _add_work,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeper", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hyperparameter sweeps for fine-tuning pretrained models, built on Optuna.",
        epilog=_examples("sweeper launch studies/quickstart.py --workers 2",
                         "sweeper status studies/quickstart.py",
                         "sweeper best studies/quickstart.py --out best/"),
    )
    parser.add_argument("--version", action="version", version=f"sweeper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def _find_study(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--set a=1 studies/x.py`` hands the study path to --set: take it back from there."""
    paths = [value for value in args.set or [] if "=" not in value]
    if len(paths) != 1:
        # The command's own usage and example (`sweeper deploy k8s ...`), not the top level's.
        command = getattr(args, "command_parser", parser)
        command.print_usage(sys.stderr)
        examples = (command.epilog or "").split("examples:\n", 1)[-1].splitlines()
        example = examples[0].strip() if examples and examples[0].strip() else f"{command.prog} STUDY.py"
        print(f"sweeper: error: `{command.prog}` needs the study file, e.g. `{example}`", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    args.study = paths[0]
    args.set.remove(paths[0])


def _hide_passwords_from_ps() -> None:
    """A password typed on the command line (``--storage postgresql://u:pw@...``) is masked in
    this process's title, which ``ps`` and ``/proc/PID/cmdline`` show to every user of the
    machine. (It is visible from the start of the process until here; the environment,
    ``SWEEPER_STORAGE``, never shows it.)"""
    from sweeper.redact import mask

    shown = [mask(arg) for arg in sys.argv]
    if shown != sys.argv:
        import setproctitle

        setproctitle.setproctitle(" ".join(shown))



def _gpu_ids(text: str | None) -> list[str] | None:
    """``--gpus 0,2`` as ids; None when left out (every visible GPU). One that names none is
    an error, not a quiet run on the CPU."""
    if text is None:
        return None
    ids = [g.strip() for g in text.split(",") if g.strip()]
    if not ids:
        raise SweepError(f"--gpus {text!r} names no GPU: give ids such as 0 or 0,2 (`nvidia-smi -L` lists "
                         "them), or leave out --gpus to use every visible GPU")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    _hide_passwords_from_ps()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if hasattr(args, "study") and args.study is None:
        _find_study(args, parser)
    if args.command not in ("_work",):
        _setup_logging(getattr(args, "verbose", 0))
    try:
        return int(args.func(args) or 0)
    except SweepError as exc:
        from sweeper.storage import mask

        print(f"sweeper: error: {mask(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sweeper: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sweeper status ... | head` closed the pipe: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
