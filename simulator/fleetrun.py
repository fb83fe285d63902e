"""The run object: ``FleetRun`` owns one run's life, from its config to its last record.

A run goes through these steps, each a method, each done once::

    run = FleetRun(cfg, out)         # checks --out (writes nothing yet)
    run.connect()                    # joins a Ray cluster given by ray_address; starts the
                                     # host processes in the background (a generated fleet)
    run.build_fleet()                # the devices: interactions, timeline, profiles (a fleet
                                     # read from files: the host processes start now)
    run.open(names)                  # the run folder: config.toml, fleet files, pending strategies
    run.train_cloud()                # the cloud model every strategy starts from
    run.start_pool()                 # the Ray host actors, devices held as data
    run.play(name, strategy)         # per strategy: reset hosts, prepare, a FleetGrid, Flower's
                                     # start() on it, per-round records, the summary
    run.close()                      # hosts shut down, the in-progress mark dropped

With a run folder, ``play`` writes a checkpoint every ``experiment.checkpoint_every``
rounds (``simulator.checkpoint``); ``FleetRun(cfg, out, resume=True)`` reopens an
interrupted run and ``play`` continues a strategy from its last checkpoint. The host pool
restarts a lost host from the last checkpoint by itself (``devices.recovery``).

``with FleetRun(...) as run`` closes it whatever happens. Every user of a fleet -- the
``fleetsim run`` loop (``simulator.run``), the paper protocol (``simulator.paper``, which
uses only the folder and status steps), the benchmarks and the tests -- goes through it,
so features that hang on a run's life (checkpoints, host recovery) have one place to go.
Without ``out`` nothing is written: the benchmarks and tests read ``Played`` instead.
"""
from __future__ import annotations

import gc
import random
import re
import time
from contextlib import contextmanager
import traceback
from typing import Any, Callable, Iterator

import numpy as np
import torch
from flwr.serverapp.strategy import Result, Strategy

from devices import reaper
from devices.models import ModelSpec
from devices.pool import HostPool, HostProcesses, RayUnreachable, init_ray, oversubscribed
from simulator import checkpoint, provenance
from strategies.base import FleetMixin
from strategies.cloud import CloudContext, train_cloud_model
from simulator.config import ExperimentConfig
from simulator.errors import FleetsimError, NonFiniteError, RayAddressError, ResultsWriteError, StrategyFailure
from simulator.stall import StallWatch
from simulator.fleet import Fleet, build_fleet
from simulator.grid import CodeError, FleetGrid, RoundResult, flower_patched
from simulator.runstate import Played, RunState, quiet_flower, server_failure, summarise  # noqa: F401 (re-exported)
from simulator.records import array_record
from simulator.writer import RunWriter


class ResumeError(FleetsimError):
    """A checkpoint or the saved cloud model cannot be restored: bad input (one line, exit
    code 2); the run folder is left as it was, checkpoints included."""


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (a Ray task error: of its cause), without
    terminal colour codes."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    first = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {first[0][:300]}" if first else type(exc).__name__


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects alive when a strategy's rounds start (the imported libraries, the
    fleet, the pool, the strategy's prepared state: hundreds of thousands) are left out
    of Python's cycle collections until its rounds end (``gc.freeze``). A round makes
    tens of thousands of short-lived objects (a record per reply); every full collection
    they trigger would otherwise walk the whole heap again (0.05-0.1 s of a 10k-fleet
    round). Afterwards they are collectable as before (``gc.unfreeze``)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _reset_process_state(seed: int) -> None:
    """Process-wide state that results depend on, the same at every strategy's start
    whatever ran before in this process (a resumed run skips the cloud training): one torch
    thread, as cloud training sets it (float sums depend on the thread count), and the
    torch / numpy / ``random`` streams (fleetsim derives its own; a user's may not)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class FleetRun:
    """One run: its config, result folder, fleet, cloud model and host pool, and each
    strategy played on a fresh ``FleetGrid`` (same seed, so the same availability,
    failures and evaluation samples for every strategy).

    Args:
        cfg: the validated experiment.
        out: the run folder, or None to write nothing.
        use_ray: host actors under Ray (False: in-process hosts, for tests).
        ray_address: join this Ray cluster instead of starting an embedded one.
        n_hosts: host count (default ``experiment.hosts``; 0 = one per CPU).
        log: where one-line messages go.
        resume: continue the run in ``out``; ``open`` first checks that its data, code and
            environment are those it started with (``simulator.provenance``), other code or
            environment accepted (and recorded) only with ``allow_code_change``.
    """

    def __init__(self, cfg: ExperimentConfig, out: str | None = None, *, use_ray: bool = True,
                 ray_address: str | None = None, n_hosts: int | None = None,
                 log: Callable[[str], None] = print, resume: bool = False, allow_code_change: bool = False) -> None:
        self.cfg, self.log = cfg, log
        self.allow_code_change = allow_code_change  # resume: other code or environment accepted (recorded)
        self.seed = cfg.experiment.seed
        self.use_ray, self.ray_address = use_ray, ray_address
        self.n_hosts = cfg.experiment.hosts if n_hosts is None else n_hosts
        self.resume = resume  # continue the run in ``out`` (checked by ``simulator.resume``)
        if out is None:
            self.writer = None
        else:  # a new folder fails on a bad --out and writes nothing
            self.writer = RunWriter.reopen(out) if resume else RunWriter(out)
        self.checkpoints = bool(self.writer is not None and cfg.experiment.checkpoint_every)
        self.checkpoint_log: list[dict[str, float]] = []  # round, bytes, seconds of each checkpoint written
        self.state = RunState(self.writer, log) if self.writer is not None else None
        self.fleet: Fleet | None = None
        self.spec: ModelSpec | None = None
        self.initial: dict[str, np.ndarray] | None = None
        self.cloud_losses: list[float] = []
        self.cloud: CloudContext | None = None
        self.pool: HostPool | None = None
        self.processes: HostProcesses | None = None  # started by connect() or build_fleet(), taken by start_pool()
        self._connected = False
        self._opened = False

    # -- the run's life, in order --------------------------------------------------------

    def connect(self) -> None:
        """Join the Ray cluster at ``ray_address`` (an unreachable one fails here, before
        anything is written). A generated fleet (a source that reads no files) then has
        Ray (embedded) and the host processes started in a background thread, to come up
        while the fleet is built (``devices.pool.HostProcesses``; a 1M-device fleet is
        ready ~6 s sooner); a fleet read from files has them started once it is read
        (``build_fleet``), so bad data fails at once."""
        if not self.use_ray:
            return
        if self.ray_address:
            try:
                init_ray(self.ray_address)
            except RayUnreachable as exc:
                raise RayAddressError(str(exc)) from None
        self._connected = True
        from devices.sources import resolve_source

        if not resolve_source(self.cfg.source).reads_files:  # a device per host at most (if the config says how many)
            self.processes = HostProcesses(self.n_hosts, self.ray_address, getattr(self.cfg.data, "n_devices", None))

    def build_fleet(self) -> Fleet:
        self.fleet = build_fleet(self.cfg)
        m = self.cfg.model
        self.spec = m.spec(self.fleet.interactions.n_items)
        if self._connected and self.processes is None:  # read: the hosts start beside the cloud's training
            self.processes = HostProcesses(self.n_hosts, self.ray_address, self.fleet.n_devices)
        return self.fleet

    def open(self, names: list[str], *, fleet: bool = True, mark_running: bool = True) -> None:
        """Make the run folder: ``config.toml``, the fleet's files (``fleet``), and every
        strategy in ``names`` as ``pending``."""
        if self.writer is None:
            return
        if self.resume:  # the same data, code and environment as when the run started, or a refusal
            saved = self.writer.summary.get("provenance")
            entry = provenance.check_resume(f"--resume {self.writer.dir}", saved, self.fleet,
                                            (self.writer.dir / "config.toml").read_text(), self.allow_code_change)
        self.writer.create(mark_running=mark_running)
        self._opened = True
        reaper.run_folder(str(self.writer.dir))  # named if this process ends without a word (devices.reaper)
        if self.resume:  # the folder, its config and its fleet files are the run's own
            if entry is not None:
                saved.setdefault("resumes", []).append(entry)
            return
        toml = self.cfg.to_toml()
        self.writer.summary["config_sha256"] = checkpoint.config_digest(toml)  # --resume refuses an edited config
        self.writer.summary["provenance"] = provenance.record(self.fleet if fleet else None, toml)
        try:
            self.writer.write_config(toml)
            if fleet:
                self.writer.write_fleet(self.fleet)
            self.state.pending(list(names))
        except ResultsWriteError as exc:  # half a run folder would be refused by --resume and by a new run
            self.writer.remove_opened()
            self._opened = False
            raise ResultsWriteError(f"--out {self.writer.dir}: {exc.cause}; the run did not start and its files are "
                                    f"removed again: free space (or make the folder writable), then run again") from None

    def train_cloud(self) -> None:
        """Train the cloud model every strategy starts from (``NonFiniteError`` if it diverges)."""
        c = self.cfg.cloud
        saved = None
        if self.checkpoints and self.resume:
            try:
                saved = checkpoint.load_cloud(self.writer.dir)
            except Exception as exc:  # noqa: BLE001 -- damaged: refuse, touching nothing
                path = self.writer.dir / checkpoint.CHECKPOINTS / checkpoint.CLOUD_FILE
                raise ResumeError(f"--resume {self.writer.dir}: {path} cannot be read ({_one_line(exc)}); delete it "
                                  f"and --resume again to train the cloud model again (same seed, same model)") from None
        if saved is not None:
            self.initial, self.cloud_losses = saved
        else:
            self.initial, self.cloud_losses = train_cloud_model(
                self.fleet.interactions, self.fleet.timeline.history_end, self.spec, epochs=c.epochs, lr=c.lr,
                batch_size=c.batch_size, negatives=c.negatives, seed=self.seed)
            if self.checkpoints:
                checkpoint.save_cloud(self.writer.dir, self.initial, self.cloud_losses)
        self.cloud = CloudContext(self.fleet.interactions, self.fleet.timeline.history_end, self.spec, self.initial,
                                  self.seed, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, negatives=c.negatives)

    def start_pool(self) -> HostPool:
        self.pool = HostPool(self.fleet.interactions, self.fleet.timeline, self.spec, self.cfg.device, self.seed,
                             n_hosts=self.n_hosts, use_ray=self.use_ray, ray_address=self.ray_address,
                             log=self.log, evaluated=self.fleet.evaluated, processes=self.processes)
        if self.pool.use_ray:
            import ray

            if ray.is_initialized():
                warning = oversubscribed(self.pool.n_hosts, ray.cluster_resources().get("CPU", 1))
                if warning:
                    self.log(warning)
        return self.pool

    def new_grid(self, strategy: Strategy, on_round: Callable[[RoundResult], None] | None = None,
                 on_code_error: Callable[[CodeError], None] | None = None) -> FleetGrid:
        """A fresh ``FleetGrid`` for ``strategy`` over the run's fleet and pool."""
        e = self.cfg.experiment
        return FleetGrid(self.fleet, self.pool, strategy.device_app, seed=self.seed, deadline_s=e.deadline_s,
                         wait_s=e.wait_s, on_round=on_round, on_device_error=e.on_device_error,
                         on_code_error=on_code_error)

    def play(self, name: str, strategy: Strategy, *, grid: FleetGrid | None = None, num_rounds: int | None = None,
             evaluate_fn: Callable | None = None, on_round: Callable[[RoundResult], None] | None = None) -> Played:
        """Run one strategy: reset the hosts to the cloud model, ``prepare(cloud)``, then
        Flower's ``start()`` on a fresh grid for ``num_rounds`` (default: the fleet's).

        A ``StrategyFailure``, a ``FleetsimError`` raised while it runs (e.g. it waits for
        more devices than exist) or any exception of its code ends it as ``failed``; a
        host process that died also gets the next strategy a new pool. Ctrl-C,
        ``SystemExit`` and a ``ResultsWriteError`` (the run folder takes no more files)
        mark it ``interrupted`` and are re-raised.
        """
        t_start = t_prepared = time.perf_counter()
        warnings: list[CodeError] = []

        def round_done(result: RoundResult) -> None:
            watch.progress(result.round)
            if self.state is not None:
                self.state.round_done(name, result)
            if on_round is not None:
                on_round(result)

        def on_code_error(err: CodeError) -> None:
            if self.cfg.experiment.on_device_error != "record" or self.writer is None:
                return  # "stop": the failure itself is logged with this traceback
            key = f"{err.error_type}: {err.message}"
            path = self.writer.append_error_log(name, f"round {err.round}, message type {err.message_type!r}, "
                                                      f"{err.devices} device(s): {key}", err.traceback, once_key=key)
            if not warnings:
                warnings.append(err)
                self.log(f"fleetsim: warning: {name}: round {err.round}: device function for {err.message_type!r} "
                         f"raised {key}; recorded as errors, the run goes on (traceback in {path})")

        watch = StallWatch(name, self.cfg.experiment.stall_note_s, self.log, lambda: getattr(self.pool, "in_flight", None),
                           f"fleetsim run --resume {self.writer.dir}" if self.writer is not None else None)
        if grid is None:
            grid = self.new_grid(strategy, round_done, on_code_error)
        played = Played("complete", grid)
        hosts_lost = write_failed = False
        resumable = isinstance(strategy, FleetMixin)  # has the state contract and a resumable start()
        ckpt_dir = checkpoint.folder(self.writer.dir, name) if self.checkpoints and resumable else None
        saved = checkpoint.latest(ckpt_dir) if ckpt_dir is not None and self.resume else None
        n_rounds = num_rounds or self.fleet.timeline.n_rounds
        result = Result()
        hook = evaluate_fn or grid.round_hook
        if ckpt_dir is not None:
            hook = self._checkpointing(name, strategy, grid, result, ckpt_dir, hook, n_rounds,
                                       lambda: (time.perf_counter() - t_start, t_prepared - t_start))
        _reset_process_state(self.seed)
        if saved is not None:  # a failure here is the checkpoint's, not the strategy's: nothing is recorded
            restored = self._restore(name, strategy, grid, result, saved)
        if self.state is not None:
            self.state.start(name)
        try:
            if saved is not None:
                first, arrays, (wall_s, prep_s), rngs = restored
                t_start = time.perf_counter() - wall_s
                t_prepared = t_start + prep_s
            else:
                if self.resume and self.writer is not None:  # a strategy started before, no checkpoint: again
                    self.writer.discard_rounds(name, after=0)
                first, arrays, rngs = 1, array_record(self.initial), None
                self.pool.reset(self.initial)
                t_start = t_prepared = time.perf_counter()  # a strategy's wall time starts with its hosts ready
                prepare = getattr(strategy, "prepare", None)  # Flower strategies without the fleet base lack it
                if prepare is not None:  # cloud-side training before round 1 (DUET, MoMoDistill)
                    prepare(self.cloud)
                t_prepared = time.perf_counter()
            with flower_patched(grid, self.seed), quiet_flower(), frozen_heap(), watch:
                if rngs is not None:
                    checkpoint.set_rng_states(rngs)
                extra = {"first_round": first, "result": result} if resumable else {}
                played.result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=n_rounds,
                                               evaluate_fn=hook, **extra)
                grid.finish_round()
        except StrategyFailure as exc:
            played.failure, played.status = exc, "failed"
        except KeyboardInterrupt:
            played.status = "interrupted"
            raise
        except ResultsWriteError as exc:  # the run folder takes no more files: not the strategy's fault
            played.status, write_failed = "interrupted", True
            raise ResultsWriteError(f"--out {self.writer.dir}: {exc}; {name} stops here: free space (or make the "
                                    f"folder writable), then fleetsim run --resume {self.writer.dir}") from None
        except FleetsimError as exc:  # the strategy asked the fleet for the impossible
            played.failure, played.status = StrategyFailure(str(exc), round=grid.round or None, stage="strategy",
                                                            error_type=type(exc).__name__), "failed"
        except Exception as exc:  # a bug in the strategy's server half, or a host process died
            hosts_lost = self.pool.lost_host(exc)
            if hosts_lost:
                first = (str(exc).splitlines() or [""])[0][:300]
                played.failure = StrategyFailure(
                    f"round {grid.round}: a device host process died ({type(exc).__name__}: {first}); the next "
                    f"strategy gets a new host pool", round=grid.round, stage="device host",
                    error_type=type(exc).__name__, detail=first, traceback="".join(traceback.format_exception(exc)))
            else:
                played.failure = server_failure(exc, grid.round)
            played.status = "failed"
        except BaseException:  # SystemExit and the like: the strategy did not complete
            played.status = "interrupted"
            raise
        finally:
            try:
                self._end(name, played, t_start, t_prepared)
            except ResultsWriteError:
                if not write_failed:
                    raise  # else the first failed write is the one to report
            if ckpt_dir is not None and played.status != "interrupted" and not self.cfg.experiment.keep_checkpoints:
                checkpoint.drop(ckpt_dir)  # finished (complete or failed): nothing to resume
        if hosts_lost:  # a host process died: the next strategy gets a fresh pool
            self.pool.shutdown()
            self.start_pool()
        return played

    def close(self) -> None:
        """Shut the hosts down and drop the run's in-progress mark (idempotent). When every
        strategy has finished, the checkpoints go too (unless ``keep_checkpoints``)."""
        reaper.farewell()  # the run's folder is whole from here: an abrupt end now is not the run's
        try:
            if self.processes is not None:  # hosts started for a pool that never came
                self.processes.close()
                self.processes = None
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None
        finally:
            if self.writer is not None and self._opened:
                try:
                    statuses = [s.get("status") for s in self.writer.summary["strategies"].values()]
                    if self.checkpoints and not self.cfg.experiment.keep_checkpoints and statuses and \
                            all(st in ("complete", "failed") for st in statuses):
                        checkpoint.drop(self.writer.dir / checkpoint.CHECKPOINTS)
                    self.writer.release()
                finally:
                    self.writer.unlock()
            elif self.writer is not None:
                self.writer.unlock()

    # -- checkpoints ---------------------------------------------------------------------

    def _checkpointing(self, name: str, strategy: FleetMixin, grid: FleetGrid, result: Result, parent,
                       hook: Callable, n_rounds: int, clock: Callable[[], tuple[float, float]]) -> Callable:
        """``hook`` (the strategy's ``evaluate_fn``) that first closes the round and, every
        ``checkpoint_every`` rounds but the last, writes a checkpoint between two rounds."""
        every = self.cfg.experiment.checkpoint_every

        def checkpointing_hook(server_round: int, arrays):
            grid.finish_round()
            if server_round and server_round % every == 0 and server_round < n_rounds and \
                    server_round > getattr(grid, "_checkpointed", 0):
                t0 = time.perf_counter()
                driver = {"round": server_round, "strategy": strategy.state(), "arrays": arrays, "result": result,
                          "grid": checkpoint.grid_state(grid), "rng": checkpoint.rng_states(), "clock": clock(),
                          "error_log_bytes": self.writer.error_log_bytes(name),
                          "logged": {k for k in self.writer._logged if k[0] == name}}
                path = checkpoint.write(parent, server_round, driver, self.pool.states())
                self.pool.set_restore_point(path)  # a lost host restarts from here
                grid._checkpointed = server_round
                self.checkpoint_log.append({"round": server_round, "bytes": checkpoint.size_bytes(path),
                                            "seconds": time.perf_counter() - t0})
            return hook(server_round, arrays)

        return checkpointing_hook

    def _restore(self, name: str, strategy: FleetMixin, grid: FleetGrid, result: Result, path):
        """Set strategy, grid, hosts and records back to the checkpoint at ``path``;
        returns the first round to play, the arrays, the clock and the random states.

        Everything that can fail (reading the files, the hosts taking their states, the
        strategy's ``restore``) comes before the first change to the run folder (the round
        files past the checkpoint dropped); a failure is a ``ResumeError`` (one line) and
        leaves every file as it was."""
        try:
            saved = checkpoint.read(path)
            hosts = checkpoint.host_files(path)
            if len(hosts) != self.pool.n_hosts:
                raise ValueError(f"it holds {len(hosts)} host state(s), this run has {self.pool.n_hosts} hosts "
                                 f"(experiment.hosts = {self.cfg.experiment.hosts}; 0: one per CPU)")
            rnd = saved["round"]
            self.pool.load_states(path)
            strategy.restore(saved["strategy"], self.cloud)
            checkpoint.restore_grid(grid, saved["grid"], self.writer.dir, name)
            for k, v in vars(saved["result"]).items():
                setattr(result, k, v)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 -- a damaged or incompatible checkpoint
            raise ResumeError(f"--resume {self.writer.dir}: cannot restore {name} from {path} ({_one_line(exc)}); "
                              f"nothing was changed; delete that folder and --resume again to play {name} from "
                              f"{checkpoint.restart_point(path)}") from None
        grid._checkpointed = rnd
        self.writer.discard_rounds(name, after=rnd, error_log_bytes=saved["error_log_bytes"])
        self.writer._logged |= saved["logged"]
        self.log(f"fleetsim: {name}: resumed from its round-{rnd} checkpoint")
        return rnd + 1, saved["arrays"], saved["clock"], saved["rng"]

    def __enter__(self) -> FleetRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- records -------------------------------------------------------------------------

    @property
    def summary(self) -> dict[str, Any]:
        """``summary.json`` as written so far (empty without a run folder)."""
        return self.writer.summary if self.writer is not None else {}

    def _end(self, name: str, played: Played, t_start: float, t_prepared: float) -> None:
        grid, failure = played.grid, played.failure
        if played.status == "failed":
            try:
                grid.finish_round()  # the round in flight, up to the failure, is kept
            except Exception:  # noqa: BLE001 -- the first failure is the one reported
                pass
        failed_in = failure.info.get("round") if failure is not None else None
        kept, end = grid.results, grid.clock.t
        if played.status == "failed" and failed_in:  # its numbers are those of the rounds it completed
            kept = [r for r in grid.results if r.round < failed_in]
            end = kept[-1].info["t_start"] + kept[-1].info["latency_s"] if kept else self.fleet.timeline.history_end
        # the failed round's errors and quarantined replies are counted: they are part of why it failed
        summary = summarise(kept, self.fleet, time.perf_counter() - t_start, end, counted=grid.results)
        summary["prepare_seconds"] = t_prepared - t_start
        result = played.result
        summary["strategy_metrics"] = {str(r): dict(m) for r, m in getattr(result, "train_metrics_clientapp", {}).items()}
        summary["strategy_eval_metrics"] = {str(r): dict(m) for r, m in
                                            getattr(result, "evaluate_metrics_clientapp", {}).items()}
        played.summary = summary
        if self.state is None:
            return
        done = sum(1 for r in grid.results if not failed_in or r.round < failed_in)  # the failed round is not complete
        if played.status == "interrupted":  # stopped in a round's writing (Ctrl-C, a full disk): what is on disk
            done = sum(1 for r in grid.results if self.writer.has_round(name, r.round))
        self.state.end(name, summary, played.status, failure, rounds=done)
        if summary.get("quarantined") and not (failure is not None and failure.info.get("kind") == "non-finite"):
            self.log(f"fleetsim: warning: {name}: {summary['quarantined']} device replies were quarantined (non-finite "
                     f"or diverged updates, never aggregated; quarantined in rounds.parquet); look at device.lr (or "
                     f"the strategy's lr / local_steps)")
        for key, method in (("strategy_metrics", "aggregate_train"), ("strategy_eval_metrics", "aggregate_evaluate")):
            bad = [(r, k) for r, m in summary[key].items() for k, v in m.items()
                   if not np.isfinite(np.asarray(v, dtype=float)).all()]
            if bad:  # summary.json writes NaN as null: say so once, naming the metrics and rounds
                metrics_, rounds = (", ".join(dict.fromkeys(x[i] for x in bad)) for i in (1, 0))
                self.log(f"fleetsim: warning: {name}: its {method} returned non-finite metrics ({metrics_} in "
                         f"round(s) {rounds}); summary.json writes them as null")
        if summary.get("nonfinite_score_device_rounds"):
            self.log(f"fleetsim: warning: {name}: {summary['nonfinite_score_device_rounds']} device-rounds were scored "
                     f"by a model that emits NaN/Inf; their metrics are NaN and left out of every mean (nonfinite in "
                     f"devices.parquet)")

    def fail_all(self, names: list[str], exc: NonFiniteError) -> None:
        """Record every strategy as failed by one error that happened before any could run."""
        if self.state is not None:
            for name in names:
                self.state.end(name, {}, "failed", exc, quiet=True)
