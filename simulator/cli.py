"""``fleetsim`` command line: ``fleetsim run [EXPERIMENT.toml] [--out DIR] [--set k=v ...]``,
``fleetsim run --resume DIR`` and
``fleetsim report RUN_DIR [RUN_DIR ...] [--out DIR] [--baseline NAME]``.

Every user error (config, data, arguments, output folder, an unreachable
``--ray-address``) ends in one line on stderr and exit code 2; results already written are
never touched. A strategy that fails (a code error, non-finite training) is one line on
stderr; the other strategies still run and the exit code is 1 (as when a strategy's
devices scored NaN/Inf: its means would cover the other devices only). Ctrl-C: exit 130, with the
strategy in flight marked ``interrupted``; SIGTERM 143 and SIGHUP 129 the same way.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from simulator.errors import FleetsimError  # noqa: E402

EXIT_FAILED = 1
EXIT_USAGE = 2
# OSErrors of the machine, not of the code: a full disk or quota, a file-size limit, a
# read-only file system, no permission (results written under the run folder are
# ``ResultsWriteError``s already; these are the rest, e.g. stdout redirected to a full disk)
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _drop_expected_flower_warning(record: logging.LogRecord) -> bool:
    # fleetsim's FedAvg turns Flower's federated evaluation off on purpose (every device
    # is scored prequentially); Flower's warning about it would put a second line on
    # stderr next to a one-line error.
    return not record.getMessage().startswith("fraction_evaluate is set to 0.0")


def _version() -> str:
    """The installed distribution's version (setup.cfg), or "unknown" when run from a
    checkout that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fleetsim")
    except PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + traceback
        self.exit(EXIT_USAGE, f"fleetsim: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fleetsim", description="Fleet-scale simulator of device-cloud collaborative learning.")
    p.add_argument("--version", action="version", version=f"fleetsim {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="simulate a fleet with one or more strategies")
    run.error = p.error  # type: ignore[method-assign]
    run.add_argument("experiment", nargs="?", help="experiment TOML file (default: experiments/quickstart.toml)")
    run.add_argument("--out", help="results directory (default: runs/<name>-<time>); must not hold results yet")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a setting, e.g. --set data.n_devices=500 (repeatable; values are TOML)")
    run.add_argument("--seed", type=int, help="run seed (overrides experiment.seed)")
    run.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR: finished strategies are "
                     "kept, the one in flight restarts from its last checkpoint (experiment.checkpoint_every)")
    run.add_argument("--allow-code-change", action="store_true",
                     help="with --resume: go on although fleetsim's code, a plug-in module, a library version or the "
                     "CPU model differs from the run's start (recorded in summary.json and the report); changed "
                     "data are never accepted")
    run.add_argument("--ray-address", help="join an existing Ray cluster (default: start an embedded one)")
    run.add_argument("--hosts", type=int, metavar="N", help="Ray device host actors (overrides experiment.hosts; "
                     "0 = one per CPU of the Ray cluster)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--no-report", action="store_true", help="do not write report.html and figures into the run folder")
    rep = sub.add_parser("report", help="compare strategies of one or more runs: report.html, figure PNGs, summary.csv")
    rep.error = p.error  # type: ignore[method-assign]
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory written by fleetsim run")
    rep.add_argument("--out", help="folder for the report (default: the first RUN_DIR)")
    rep.add_argument("--baseline", help="strategy the others are compared with (default: cloud_only)")
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from simulator.writer import lock_run_dir, unlock_run_dir

    if args.resume is None or not os.path.isdir(args.resume):
        return _cmd_run(args)
    # the run folder is this process's before it is read: a second fleetsim on it stops
    # here with one line (the lock goes with the process, however it ends)
    lock_run_dir(args.resume, "--resume")
    try:
        return _cmd_run(args)
    finally:
        unlock_run_dir(args.resume)


def _cmd_run(args: argparse.Namespace) -> int:
    from simulator import config
    from simulator.run import failed_strategies, format_table, run_experiment

    if args.resume is not None:
        from simulator.checkpoint import check_resumable

        given = [flag for flag, v in (("EXPERIMENT", args.experiment is not None), ("--out", args.out is not None),
                                      ("--set", args.overrides), ("--seed", args.seed is not None),
                                      ("--hosts", args.hosts is not None)) if v]
        if given:
            raise FleetsimError(f"--resume takes the run's own config and folder; drop {', '.join(given)}")
        cfg, out = check_resumable(args.resume), args.resume
    elif args.allow_code_change:
        raise FleetsimError("--allow-code-change goes with --resume DIR only")
    else:
        if args.out is not None and not args.out.strip():
            raise FleetsimError("--out is empty; give a folder for the results (or leave --out out for runs/NAME-TIME)")
        hosts = [] if args.hosts is None else [f"experiment.hosts={args.hosts}"]  # checked as the setting is
        cfg = config.load(args.experiment, [*args.overrides, *hosts], args.seed)
        out = args.out or os.path.join("runs", f"{cfg.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if getattr(cfg.data, "protocol", "fleet") == "leave_last":  # the DUET paper's protocol, not a fleet
        from simulator.paper import format_table as format_paper_table, run_leave_last

        summary = run_leave_last(cfg, out, log=log)
        print(format_paper_table(summary))
    else:
        summary = run_experiment(cfg, out, ray_address=args.ray_address, progress=not args.no_progress, log=log,
                                 resume=args.resume is not None, allow_code_change=args.allow_code_change)
        print(format_table(summary))
    print(f"\nresults: {out}  (wall {time.perf_counter() - t0:.1f} s)")
    failed = failed_strategies(summary)
    if not args.no_report:
        from simulator.report import build_report

        print(f"report: {build_report([out], out).html}")
    return EXIT_FAILED if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from simulator.report import build_report

    files = build_report(args.run_dirs, args.out, baseline=args.baseline)
    print(f"report: {files.html}")
    return 0


def _leave(code: int) -> None:
    """End the process at once (``os._exit``), fleetsim's line said: the reaper adds none."""
    from devices.reaper import farewell

    sys.stdout.flush()
    sys.stderr.flush()
    farewell()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.getLogger("flwr").addFilter(_drop_expected_flower_warning)  # no-op if already added
    if args.command is None:
        _parser().print_help()
        return EXIT_USAGE
    try:
        return cmd_report(args) if args.command == "report" else cmd_run(args)
    except FleetsimError as exc:
        print(f"fleetsim: error: {exc}", file=sys.stderr)
        if getattr(exc, "hard_exit", False):  # a thread may still be blocked in ray.init
            _leave(EXIT_USAGE)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:  # a code error: its traceback
            raise
        # the console's file (stdout redirected to a full disk) or another of the user's files
        print(f"fleetsim: error: {exc.strerror}" + (f": {exc.filename}" if exc.filename else " (writing the output)"),
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        from simulator.errors import Terminated

        from devices.raywatch import lost

        if lost() and not Terminated.received:  # the embedded Ray lost its GCS or raylet: said in one line
            _leave(EXIT_USAGE)  # already; a fault of the machine. At once, as below: Ray's exit handler would wait
        if isinstance(exc, Terminated) or Terminated.received:
            import signal

            signum = int(Terminated.received or signal.SIGTERM)
            print(f"fleetsim: terminated ({signal.Signals(signum).name}); rounds already written are kept",
                  file=sys.stderr)
            # at once: every file is written whole already, and Ray's exit handler could wait a minute for a GCS
            # the same signal killed (sent to the process group); Ray's processes die with this one (devices.reaper)
            _leave(128 + signum)
        print("fleetsim: interrupted; rounds already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
