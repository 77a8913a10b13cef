"""The ``coalesce`` command line (docs/cli.md documents verbs and exit codes).

I/O lives here: reading the config, printing views, exit codes.  Errors a
user can cause print one message and a hint (coalesce_core/ui/errors.py; no
traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from rich.console import Console, Group
from rich.text import Text

from coalesce_core import __version__, crashpoints, grouplock, requests
from coalesce_core.config import GroupConfig, load_config, replica_block, without_replica, write_config
from coalesce_core.errors import BackendError, CoalesceError, ConfigError, GroupLocked, NotFound, RequestRefused
from coalesce_core.ui import graphs, logs, render, reports
from coalesce_core.ui.errors import report_error
from coalesce_core.ui.peertext import markup
from coalesce_core.ui.tracker import Tracker

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_NOT_STABLE = 3
EXIT_TRANSFER_FAILED = 8  # `run --once`: an update, baseline or re-seed failed in the run
#: `run --once` of a group of several sources: the cycle completed for some sources and failed for others only
EXIT_PARTIAL = 10
EXIT_INTERRUPTED = 130

DEFAULT_CONFIG = "coalesce.toml"
#: how long a verb handed to a running agent waits for its answer (--timeout), and how often it looks
DEFAULT_REQUEST_TIMEOUT = 600.0
REQUEST_POLL = 0.2
#: how often a running `coalesce run` looks for requests while it waits between cycles
AGENT_POLL = 0.5
#: the newest requests `status` shows
STATUS_REQUESTS = 10


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _live_console() -> Console:
    """For live views: no soft wrap, so rows are cropped instead of folded."""
    return Console(highlight=False)


def _config(args: argparse.Namespace) -> GroupConfig:
    cfg = load_config(args.config or os.environ.get("COALESCE_CONFIG") or DEFAULT_CONFIG)
    logs.set_group(cfg.name)
    return cfg


def _agent(args: argparse.Namespace, recover: bool = True, reconcile: bool = True):
    """The group's agent for a verb that changes it: holds the group's lock (docs/operations.md);
    what it does goes to the log (coalesce_core/ui/runlog.py).  Only `run` asks the source what it
    holds when it recovers: the other verbs need the destination alone.  ``reconcile``: refuse a
    config that lost or changed a replica of the ledger (`run`; `add` and `remove` are what mend it)."""
    return _agent_with(args, [], recover=recover, reconcile=reconcile)


def _reader(args: argparse.Namespace):
    """The group's state for a read verb: no lock, no recovery, nothing written, the source never opened;
    runs beside an agent."""
    from coalesce_core.agent import Agent

    return Agent.open(_config(args), readonly=True)


def _dump_json(data: Any, compact: bool = False) -> None:
    if compact:  # one document per line (``--watch --json``)
        sys.stdout.write(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    else:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def _positive(kind: type = float, minimum: float = 0.0, inclusive: bool = False) -> Callable[[str], Any]:
    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'number' if kind is float else 'whole number'}")
        if v < minimum or (v == minimum and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'more than'} {minimum:g}, got {text}"
            )
        return v

    return conv


# -- verbs -----------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from coalesce_core.agent import Agent

    agent = Agent.init(_config(args))
    try:
        _console().print(
            f"initialised group [bold]{agent.state.name}[/] with {len(agent.state.replicas)} replicas; "
            f"metadata at {markup(agent.ledger.path)}"
        )
    finally:
        agent.close()
    return EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    cfg = _config(args)
    source = args.source or args.name
    if any(r.name == args.name for r in cfg.replicas):
        raise ConfigError(f"replica {args.name!r} is already in {cfg.path}", hint="choose another name")
    origin = args.origin
    defined = ", ".join(repr(one.name) for one in cfg.sources)
    if origin is not None and all(one.name != origin for one in cfg.sources):
        raise ConfigError(
            f"{cfg.path}: group {cfg.name!r} has no source named {origin!r} (add --from)",
            hint=f"the defined sources: {defined}; give one of them to --from, or define it in a [[source]] "
            'table first (docs/config.md, "Sources")',
        )
    if origin is None and len(cfg.sources) > 1:
        raise ConfigError(
            f"{cfg.path}: group {cfg.name!r} has {len(cfg.sources)} sources: say which one replica {args.name!r} "
            "comes from",
            hint=f"give --from SOURCE, one of the defined sources: {defined}",
        )
    block = replica_block(args.name, source, origin)
    from coalesce_core.config import parse_config

    assert cfg.path is not None  # a configuration loaded from its file
    before = Path(cfg.path).read_text(encoding="utf-8")
    parse_config(before + block, cfg.path)  # validate before writing

    def report(agent: Any) -> None:
        of = f" of source {markup(origin)}" if origin is not None else ""
        _console().print(
            f"added replica [bold]{markup(args.name)}[/] (source qtree {markup(source)}{of}); "
            "its baseline runs in the next cycle"
        )

    # the config first: a crash before the ledger has it leaves a replica the next open adds
    write_config(cfg.path, before + block)
    # put back unless the ledger has it with this source (unreadable: put back; `run` then refuses a
    # replica the ledger has and the config lacks, it never loses data)
    with _config_restored(cfg.path, before, lambda: _ledger_source(args, args.name) != source):
        return _change(
            args,
            "add",
            requests.make_args("add", replica=args.name, source=source, **{"from": origin}),
            lambda agent: agent.add_replica(args.name, source, origin),
            report,
        )


def cmd_remove(args: argparse.Namespace) -> int:
    cfg = _config(args)
    assert cfg.path is not None  # a configuration loaded from its file
    before = Path(cfg.path).read_text(encoding="utf-8")

    def report(agent: Any) -> None:
        _console().print(
            f"removed replica [bold]{markup(args.name)}[/] from group {markup(cfg.name)}: its export ended and the PCPIs only it "
            f"pinned were released; its data stay in the destination's qtree {markup(args.name)} until you delete them"
        )

    # the config first: a crash before the ledger lost it leaves a replica `run` refuses, never one
    # the next open adds again (whose baseline would overwrite the data)
    if any(r.name == args.name for r in cfg.replicas):
        write_config(cfg.path, without_replica(before, args.name, cfg.path))
        if _ledger_source(args, args.name) is None:  # in the config only: the group never added it
            _console().print(
                f"removed replica [bold]{markup(args.name)}[/] from {markup(cfg.path)}; the group had not added it yet"
            )
            return EXIT_OK
    # put back only if the ledger still has it: a replica back in the config but gone from the ledger
    # would be added again, and its baseline would empty the qtree whose data `remove` keeps
    with _config_restored(cfg.path, before, lambda: _ledger_source(args, args.name) not in (None, "")):
        return _change(
            args,
            "remove",
            requests.make_args("remove", replica=args.name),
            lambda agent: agent.remove_replica(args.name),
            report,
        )


@contextlib.contextmanager
def _config_restored(path: str, before: str, undone: Callable[[], bool]):
    """Put the config file's text ``before`` back when the block fails and ``undone()`` says the change
    did not reach the ledger (a failure after its decision was committed leaves the config edited)."""
    try:
        yield
    except BaseException:
        if undone() and Path(path).read_text(encoding="utf-8") != before:
            write_config(path, before)
        raise


def _ledger_source(args: argparse.Namespace, name: str) -> str | None:
    """The source qtree of replica ``name`` in the committed state (read without the lock): None when
    the group has no such replica, "" when the ledger cannot be read."""
    try:
        with _reader(args) as reader:
            r = reader.state.replicas.get(name)
    except (CoalesceError, sqlite3.Error, OSError):
        return ""
    return None if r is None else r.source_qtree


def _change(
    args: argparse.Namespace,
    verb: str,
    params: dict[str, str],
    act: Callable[[Any], None],
    report: Callable[[Any], None],
) -> int:
    """A verb that changes the group: done here, holding the group's lock, or, beside a running
    `coalesce run`, handed to it as a request (coalesce_core.requests) whose answer is awaited;
    ``report`` prints what it did from an agent (this one, or a reader of the state it left)."""
    try:
        agent = _agent(args, reconcile=False)
    except GroupLocked as exc:
        holder = grouplock.running_agent(Path(exc.ledger)) if exc.ledger else None
        if holder is None:
            raise
        if _hand_over(args, verb, params, Path(exc.ledger), holder):
            with _reader(args) as reader:
                report(reader)
        return EXIT_OK
    with agent:
        act(agent)
        report(agent)
    return EXIT_OK


def _hand_over(args: argparse.Namespace, verb: str, params: dict[str, str], path: Path, holder: dict[str, Any]) -> bool:
    """Queue the request for the running agent ``holder`` and wait for its answer: True when it was
    taken, RequestRefused when refused, GroupLocked when not taken within --timeout (then it is
    withdrawn); False at once with --no-wait."""
    from coalesce_core.ledger import Ledger

    who = grouplock.describe(holder)
    led = Ledger.open(path, group=_config(args).name)
    try:
        req = led.ask(verb, params, time.time(), os.getpid())
        if args.no_wait:
            _console().print(
                f"queued {markup(req.describe())} for the running agent, {markup(who)}: it takes it between cycles; "
                "`coalesce status` shows its answer"
            )
            return False
        answer = _await(args, led, req, path, who)
    finally:
        led.close()
    if answer.status == requests.REFUSED:
        raise RequestRefused(answer.message, hint=answer.hint, exit_code=answer.exit_code)
    when = time.strftime("%H:%M:%S", time.localtime(answer.answered))
    _console().print(f"{markup(req.describe())} handed to the running agent, {markup(who)}: taken at {when}")
    return True


def _await(args: argparse.Namespace, led: Any, req: requests.Request, path: Path, who: str) -> requests.Request:
    """Wait for the answer to ``req``.  If the agent stops before taking it, this process takes the
    group's lock and the queue itself; at --timeout (or Ctrl-C) the request is withdrawn unless it
    was answered first."""
    deadline = time.monotonic() + args.timeout
    try:
        while True:
            answer = led.request(req.id)
            if answer is not None and answer.status in requests.ANSWERED:
                return answer
            if grouplock.running_agent(path) is None:  # another holder, or none: try to take them here
                with contextlib.suppress(GroupLocked):
                    with _agent(args, reconcile=False) as agent:
                        agent.take_requests()
            if time.monotonic() >= deadline and led.withdraw(req.id, time.time()):
                raise GroupLocked(
                    f"{req.describe()} was not taken within {args.timeout:g} s by the running agent, {who}, "
                    "which takes requests between cycles; it was withdrawn",
                    hint="run the verb again with a longer --timeout (`coalesce status` shows the cycle under way, "
                    "`coalesce history` how long cycles take), or with --no-wait to leave it queued",
                )
            time.sleep(REQUEST_POLL)
    except BaseException as exc:
        if led.withdraw(req.id, time.time()):
            raise
        answer = led.request(req.id)
        if isinstance(exc, KeyboardInterrupt) and answer is not None and answer.status in requests.ANSWERED:
            return answer  # taken before the interrupt: say what it did
        raise


class _StopNow(Exception):
    """Raised by the signal handler while `coalesce run` waits between cycles: stop at once."""


class _Stop:
    """SIGTERM and SIGINT during `coalesce run` (docs/operations.md, "Stopping"): the first sets
    :attr:`asked`, which the run checks between cycles (the cycle in progress ends normally) and
    which ends a wait between cycles at once; the second raises KeyboardInterrupt, which aborts the
    cycle to the crash-recovery path."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.asked = threading.Event()
        self._waiting = False

    def on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.asked.is_set():
            raise KeyboardInterrupt(name)
        self.asked.set()
        self.say(f"coalesce run: {name}: stopping after the current cycle (send it again to abort now)")
        if self._waiting:
            raise _StopNow(name)

    def pause(self, seconds: float) -> None:
        """The wait between cycles (time.sleep, looked up now); a first signal ends it."""
        self._waiting = True
        try:
            if not self.asked.is_set():
                time.sleep(seconds)
        finally:
            self._waiting = False

    @contextlib.contextmanager
    def installed(self):
        """The handlers for the run's duration, the previous ones back afterwards; outside the main
        thread (where no signal arrives) nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                # once a stop was asked the process is on its way out: a late second signal must
                # not kill it by the default action (exit -15) after the run ended cleanly
                signal.signal(s, signal.SIG_IGN if self.asked.is_set() else h)


def cmd_run(args: argparse.Namespace) -> int:
    with _Stop(lambda line: logs.say(logs.NOTICE, line)).installed() as stop:
        return _run(args, stop)


def _run(args: argparse.Namespace, stop: _Stop) -> int:
    console = _live_console()
    progress = not args.quiet and console.is_interactive
    tracker = Tracker() if progress else None
    agent = _agent(args) if tracker is None else _agent_with(args, [tracker])
    if tracker is not None:
        _map_transfers(tracker, agent)
    logs.say(
        logs.NOTICE,
        f"coalesce {__version__}: run"
        + (" --once" if args.once else f" every {args.interval or agent.config.interval:g} s")
        + f", config {os.path.abspath(agent.config.path or '?')}",
        to="log",
    )

    def cycle() -> dict[str, Any]:
        return _run_with_progress(agent, tracker, console) if tracker is not None else agent.run_once()

    def on_cycle(report: dict[str, Any]) -> None:
        _print_removed_sources(agent.removed_source_pcpis())
        if not report and not agent.refusals:  # no source due (each [[source]]'s `interval`): no cycle
            logs.say(logging.INFO, "no cycle: no source is due yet", to="log" if args.quiet else "all", stdout=True)
            return
        logs.say(  # the terminal shows it on standard output, unless --quiet; the log always has it
            logging.INFO,
            f"cycle {report.get('cycle')}: {report.get('seconds', 0):.3f}s, "
            f"slowest {report.get('slowest')}, failures {report.get('failures')}, "
            f"states {report.get('states')}",
            to="log" if args.quiet else "all",
            stdout=True,
        )
        _print_failures(agent.failures, args)
        if not args.once:
            for exc in agent.refusals:
                _print_refusal(exc)

    def on_error(exc: BackendError, wait: float) -> None:
        logs.say(
            logging.ERROR,
            f"cycle failed: {exc.message}",
            markup=f"[bold red]cycle failed:[/] {markup(exc.message)}",
        )
        logs.say(
            logging.ERROR,
            f"next: recovering and retrying in {wait:g} s" + (f"; {exc.hint}" if exc.hint else ""),
            markup=f"[bold]next:[/] recovering and retrying in {wait:g} s"
            + (f"; {markup(exc.hint)}" if exc.hint else ""),
        )

    try:
        if args.once:
            from coalesce_core.agent import TRANSFER_FAILURES

            on_cycle(cycle())
            if stop.asked.is_set():
                logs.say(logs.NOTICE, "coalesce run: stopped after the cycle, as asked")
            done = agent.source_outcome()
            if done.partial:  # some sources failed, the others completed, nothing else failed (docs/cli.md)
                for exc in agent.refusals:
                    _print_refusal(exc)
                logs.say(
                    logging.WARNING,
                    f"partial: the cycle completed for source(s) {', '.join(done.completed)}; "
                    f"failed for {', '.join(done.failed)}",
                )
                return EXIT_PARTIAL
            if agent.refusals:  # a PCPI refused, the source out of reach or another's, no PCPI headroom (docs/cli.md)
                return report_error(agent.refusals[0])
            if any(f["trigger"] in TRANSFER_FAILURES for f in agent.failures):
                return EXIT_TRANSFER_FAILED
            return EXIT_OK if agent.all_stable() else EXIT_NOT_STABLE
        try:
            agent.run_forever(
                args.interval or agent.config.interval,
                cycle=cycle,
                on_cycle=on_cycle,
                on_error=on_error,
                sleep=stop.pause,
                stop=stop.asked,
                poll=AGENT_POLL,
            )
        except _StopNow:
            pass
        logs.say(logs.NOTICE, "coalesce run: stopped between cycles, as asked; the group is at rest")
        return EXIT_OK
    except KeyboardInterrupt:
        logs.say(logging.WARNING, "coalesce run: aborted; the next `coalesce run` recovers from the ledger")
        return EXIT_INTERRUPTED
    finally:
        agent.close()


def _print_failures(failures: list[dict[str, str]], args: argparse.Namespace) -> None:
    """The failures of the run on the terminal's standard error: every error with --debug, else one
    line (the log has every error already, from coalesce_core/ui/runlog.py)."""
    if not failures:
        return
    if args.debug:
        for f in failures:
            logs.say(
                logging.WARNING,
                f"{f['trigger']} {f['replica']}: {f['error']}",
                markup=f"[bold red]{markup(f['trigger'])}[/] {markup(f['replica'])}: {markup(f['error'])}",
                to="console",
            )
    elif not args.quiet:
        names = ", ".join(sorted({f["replica"] for f in failures}))
        logs.say(
            logging.WARNING,
            f"failed: {names} (`coalesce status` shows why; --debug prints the errors)",
            markup=f"[bold red]failed:[/] {markup(names)} (`coalesce status` shows why; --debug prints the errors)",
            to="console",
        )


def _print_removed_sources(removed: dict[str, tuple[str, ...]]) -> None:
    """The source PCPIs the ledger holds on sources whose [[source]] table was removed: what is left on
    each such volume and what to do (docs/config.md, "Removing a source"); every cycle, so never silent."""
    for source, names in removed.items():
        logs.say(
            logging.WARNING,
            f"warning: source {source!r} is no longer in the config, and the group still holds "
            f"{len(names)} PCPI(s) on it: {', '.join(names)}",
            markup=f"[bold yellow]warning:[/] source {markup(repr(source))} is no longer in the config, and the "
            f"group still holds {len(names)} PCPI(s) on it: {markup(', '.join(names))}",
        )
        logs.say(
            logging.WARNING,
            f'hint: put its [[source]] table back (name = "{source}", its url) for one `coalesce run`: the '
            "release step releases them, no replica names it any more; then remove the table (docs/config.md, "
            '"Removing a source")',
        )


def _print_refusal(exc: CoalesceError) -> None:
    """A refusal `coalesce run` lives through (it goes on at the next cycle): its error: and hint: lines."""
    report_error(exc)


def _agent_with(args: argparse.Namespace, plugins: list[object], recover: bool = True, reconcile: bool = True):
    from coalesce_core.agent import Agent
    from coalesce_core.ui.runlog import RunLog

    runlog = RunLog()
    verb = getattr(args, "verb", None) or "?"
    agent = Agent.open(
        _config(args),
        plugins=[runlog, *plugins],
        recover=recover,
        reconcile=reconcile,
        verb=verb,
        reach_source=verb == "run",
    )
    runlog.bind(lambda: agent.state)
    return agent


def _map_transfers(tracker: Tracker, agent: Any) -> None:
    """Tell the tracker which diff belongs to which replica (source qtree or destination qtree)."""
    dst = agent.dest.handle

    def replica_of(volume: Any, qtree: str) -> str | None:
        state = agent.state
        if volume is dst:
            return qtree if qtree in state.replicas else None
        for one in agent.config.sources:
            src = agent.source_if_open(one.name)  # opened by the cycle's first call to it, never here
            if src is not None and volume is src.handle:
                for r in state.replicas.values():
                    if (
                        r.origin == one.name
                        and r.source_qtree == qtree
                        and r.state in ("update", "baseline", "reseeding", "update_uncoalesced")
                    ):
                        return r.name
        return None

    tracker.replica_of = replica_of


def _run_with_progress(agent: Any, tracker: Tracker, console: Console) -> dict[str, Any]:
    """One `run_once` under a transient live display of the transfers (bytes, records, rate, time left)."""
    from rich.live import Live

    def frame() -> Any:
        now = tracker.clock()
        _events, transfers = tracker.snapshot()
        st = agent.state
        head = Text.assemble(
            ("coalesce run ", "bold"),
            f"group {st.name} · cycle {st.cycle} · phase ",
            (st.phase, "bold yellow"),
            "  ",
            render.budget_text(st),
        )
        return Group(head, render.transfers_table(transfers, now))

    tracker.reset_transfers()
    with Live(get_renderable=frame, console=console, refresh_per_second=8, transient=True):
        return agent.run_once()


def cmd_status(args: argparse.Namespace) -> int:
    with _reader(args) as agent:
        paths = {r: agent.export_path(r) for r in agent.state.replicas}
        if not args.watch:
            holder = grouplock.probe(agent.ledger.path)
            queue = agent.ledger.requests(last=STATUS_REQUESTS)
            kept = agent.kept_paths()
            if args.json:
                _dump_json(
                    reports.status_data(
                        agent.state,
                        paths,
                        now=time.time(),
                        agent=holder,
                        requests=queue,
                        kept_paths=kept,
                        generation_paths=agent.generation_paths(),
                        intervals={one.name: one.interval for one in agent.config.sources},
                        seen=_seen(agent),
                    )
                )
            else:
                _console().print(_status_view(agent, agent.state, paths, kept))
                _console().print(render.agent_text(holder, agent.state.phase))
                for line in render.requests_lines(queue):
                    _console().print(line, markup=False)
            return EXIT_OK
        return _watch_status(args, agent, paths)


def _seen(agent: Any) -> dict[str, Any]:
    """The last cycle's record of each source (the ledger's note ``sources``, coalesce_core/sources.py)."""
    from coalesce_core.sources import seen_from_note

    return seen_from_note(agent.ledger.note("sources"))


def _status_view(
    agent: Any, state: Any, paths: dict[str, str | None], kept: dict[str, str | None] | None = None
) -> Any:
    """The text of `status`: the replicas grouped by source under each source's line (docs/cli.md)."""
    now = time.time()
    intervals = {one.name: one.interval for one in agent.config.sources}
    sources = reports.sources_data(state, intervals, _seen(agent), now)
    return render.status_view(state, paths, sources, now=now, kept_paths=kept)


def _watch_status(args: argparse.Namespace, agent: Any, paths: dict[str, str | None]) -> int:
    """Re-read the ledger every ``--interval`` seconds (another process may be running cycles)."""
    interval = args.interval or 2.0
    n = 0

    last: list[Any] = []

    def read() -> Any:
        """One consistent snapshot of the ledger (a read transaction; WAL lets the agent go on writing).
        A failed re-read keeps showing the last good state instead of ending the watch."""
        try:
            state = agent.ledger.load_consistent()
        except (CoalesceError, sqlite3.Error):
            if not last:
                raise
            return last[-1]
        last[:] = [state]
        return state

    try:
        if args.json:
            while True:
                holder = grouplock.probe(agent.ledger.path)
                queue = agent.ledger.requests(last=STATUS_REQUESTS)
                state = read()
                kept = agent.kept_paths(state)
                doc = reports.status_data(
                    state,
                    paths,
                    now=time.time(),
                    agent=holder,
                    requests=queue,
                    kept_paths=kept,
                    generation_paths=agent.generation_paths(state),
                    intervals={one.name: one.interval for one in agent.config.sources},
                    seen=_seen(agent),
                )
                _dump_json(doc, compact=True)
                n += 1
                if args.count and n >= args.count:
                    return EXIT_OK
                time.sleep(interval)
        console = _live_console()
        if not console.is_interactive:
            while True:
                if n:
                    console.print()
                console.print(f"# {time.strftime('%H:%M:%S')}", markup=False)
                state = read()
                console.print(_status_view(agent, state, paths, agent.kept_paths(state)))
                n += 1
                if args.count and n >= args.count:
                    return EXIT_OK
                time.sleep(interval)
        from rich.live import Live

        def frame() -> Any:
            return Group(
                Text(f"every {interval:g}s · {time.strftime('%H:%M:%S')} · Ctrl-C to stop", style="dim"),
                _status_view(agent, state := read(), paths, agent.kept_paths(state)),
            )

        with Live(frame(), console=console, auto_refresh=False, transient=False) as live:
            while True:
                n += 1
                if args.count and n >= args.count:
                    return EXIT_OK
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from coalesce_core.cycle.invariants import live_check
    from coalesce_core.ledger import iter_log_edges

    with _reader(args) as agent:  # never writes, never opens the source (spec/invariants.md, I3 and I5)
        findings = live_check(
            agent.state,
            None,
            agent.dest,
            agent.ledger.note("i5_marks") or {},
            edges=list(iter_log_edges(agent.ledger.transitions())),
            now=time.time(),
            max_lag=agent.config.max_lag,
        )
        if args.json:
            _dump_json(reports.check_data(findings))
        else:
            _console().print(render.check_table(findings))
    return EXIT_OK if all(f.ok for f in findings) else EXIT_ERROR


def cmd_verify(args: argparse.Namespace) -> int:
    """Compare exported images with their source PCPIs; read-only (the ledger is opened read-only)."""
    from coalesce_core.backend.manager import plugin_manager
    from coalesce_core.backend.volume import Volume
    from coalesce_core.cycle.planner import NotNow
    from coalesce_core.stream import privileges
    from coalesce_core.verifier import read_state, verify_replicas

    cfg = _config(args)
    pm = plugin_manager()
    dest = Volume.open(pm, cfg.destination)
    sources: dict[str, Volume] = {}  # each replica is compared with its own source, opened once

    def source_of(name: str) -> Any:
        if name not in sources:
            one = cfg.source_named(name)
            sources[name] = Volume.open(pm, one.url, options=one.options())
        return privileges.view(sources[name], cfg.privileges)  # the source as the group's policy strips it

    try:
        state = read_state(cfg, dest)
        unknown = [n for n in args.names if n not in state.replicas]
        if unknown:
            raise NotNow(
                f"no replica {unknown[0]!r} in group {state.name!r}",
                hint=f"replicas: {', '.join(sorted(state.replicas)) or 'none'}",
            )
        rows = []
        for name in args.names or sorted(state.replicas):
            origin = state.replicas[name].origin
            rows += verify_replicas(source_of(origin), dest, state, [name], full=args.full)
    finally:
        for source in sources.values():
            source.close()
        dest.close()
    if args.json:
        _dump_json(rows)
    else:
        console = _console()
        for row in rows:
            what = f"{row['checked']} paths" + (", with content" if row["full"] else "")
            if row["result"] == "ok":
                console.print(
                    f"[bold]{markup(row['replica'])}[/] [green]ok[/] ({what}; {markup(row['exported_pcpi'])} "
                    f"= source PCPI {markup(row['source_point'])})"
                )
            elif row["result"] == "differs":
                console.print(
                    f"[bold]{markup(row['replica'])}[/] [bold red]differs[/] ({what}; "
                    f"{markup(row['exported_pcpi'])} against source PCPI {markup(row['source_point'])}):"
                )
                for d in row["differences"]:
                    console.print(f"  {markup(d['message'])}")
            else:
                console.print(
                    f"[bold]{markup(row['replica'])}[/] [yellow]{markup(row['result'])}[/]: {markup(row['detail'] or '')}"
                )
            if row["not_compared"]:
                console.print(
                    f"  not compared (the destination does not keep them): {markup(', '.join(row['not_compared']))}"
                )
    if any(r["result"] == "differs" for r in rows):
        return EXIT_ERROR
    return BackendError.exit_code if any(r["result"] == "error" for r in rows) else EXIT_OK


def cmd_break(args: argparse.Namespace) -> int:
    def report(agent: Any) -> None:
        _console().print(
            f"replica [bold]{markup(args.name)}[/] is broken: writable, exporting its active FS "
            f"({markup(agent.export_path(args.name) or 'no path on this backend')})"
        )

    return _change(
        args, "break", requests.make_args("break", replica=args.name), lambda a: a.break_mirror(args.name), report
    )


def cmd_resync(args: argparse.Namespace) -> int:
    def report(agent: Any) -> None:
        r = agent.state.replicas[args.name]
        kept = agent.state.kept_pcpi(args.name)
        _console().print(
            f"replica [bold]{markup(args.name)}[/] is {r.state}; it rejoins the cycle at the next jump-ahead"
        )
        if kept is not None and not args.discard:
            _console().print(
                f"the writes it had are kept in PCPI {markup(kept.name)} until `coalesce release {markup(args.name)}`"
            )

    discard = "yes" if args.discard else None
    return _change(
        args,
        "resync",
        requests.make_args("resync", replica=args.name, discard=discard),
        lambda a: a.resync(args.name, discard=args.discard),
        report,
    )


def cmd_release(args: argparse.Namespace) -> int:
    def report(_agent: Any) -> None:
        _console().print(f"released the PCPI that kept the writes of replica [bold]{markup(args.name)}[/]")

    return _change(
        args, "release", requests.make_args("release", replica=args.name), lambda a: a.release_kept(args.name), report
    )


def cmd_reseed(args: argparse.Namespace) -> int:
    reason = args.reason or "requested by the operator (coalesce reseed)"

    def report(agent: Any) -> None:
        r = agent.state.replicas[args.name]
        _console().print(
            f"replica [bold]{markup(args.name)}[/] is {r.state}: outside the cycle, still exporting its last good "
            f"image; the next cycle re-seeds it by a baseline transfer, and it rejoins the cycle at the "
            f"jump-ahead after that"
        )

    return _change(
        args,
        "reseed",
        requests.make_args("reseed", replica=args.name, reason=reason),
        lambda a: a.reseed(args.name, reason),
        report,
    )


def cmd_backends(args: argparse.Namespace) -> int:
    from coalesce_core.backend.manager import backend_infos, plugin_manager

    infos = backend_infos(plugin_manager())
    if args.json:
        _dump_json(infos)
    else:
        for i in infos:
            print(f"{i['scheme']:8} {i['plugin']:10} {i.get('description', '')}")
        if not infos:
            print("no backend installed; see docs/writing-a-backend.md")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    with _reader(args) as agent:
        cycles = agent.ledger.cycles()
        if args.last:
            cycles = cycles[-args.last :]
        if args.json:
            _dump_json(cycles)
        else:
            c = _console()
            c.print(render.history_table(cycles, bars=c.width >= 120))
    return EXIT_OK


def cmd_generations(args: argparse.Namespace) -> int:
    with _reader(args) as agent:
        doc = reports.generations_data(agent.state, time.time(), plan=args.plan, paths=agent.generation_paths())
    if args.json:
        _dump_json(doc)
        return EXIT_OK
    if not doc["generations"]:
        hint = (
            "the next jump-ahead keeps the coalesced base as one"
            if doc["policy"]["retains"]
            else 'add [retention] to the config to keep some (docs/config.md, "Retention")'
        )
        print(f"group {doc['group']} keeps no generations yet: {hint}")
        return EXIT_OK
    _console().print(render.generations_table(doc))
    return EXIT_OK


def _image(agent: Any, ref: str) -> tuple[str, Any]:
    """The replica (destination qtree) and the coalesced image PCPI that ``REPLICA[@GEN]`` names."""
    from coalesce_core.cycle import refs

    name, gen = refs.split(ref)
    qtree, image = refs.replica(agent.state, name), refs.resolve(agent.state, gen)
    refs.holding(agent.state, name, image)
    return qtree, image


def cmd_ls(args: argparse.Namespace) -> int:
    from coalesce_core import images

    with _reader(args) as agent:
        qtree, pcpi = _image(agent, args.ref)
        found = list(images.entries(agent.dest, qtree, pcpi.name, args.path or ""))
    if args.json:
        _dump_json({"replica": qtree, "pcpi": pcpi.name, "entries": [images.entry_data(d) for d in found]})
        return EXIT_OK
    for d in found:
        print(render.entry_line(d))
    return EXIT_OK


_CHANGE_MARKS = {"added": "A", "deleted": "D", "replaced": "R", "modified": "M"}


def cmd_diff(args: argparse.Namespace) -> int:
    from coalesce_core import images

    with _reader(args) as agent:
        qtree, old = _image(agent, args.old)
        other, new = _image(agent, args.new or qtree)
        if other != qtree:
            raise NotFound(
                f"diff compares two images of one replica, not {qtree!r} and {other!r}",
                hint=f"write `coalesce diff {qtree}@GEN1 {qtree}@GEN2`",
            )
        found = images.changed(agent.dest, qtree, old.name, new.name)
    if args.json:
        _dump_json(
            {
                "replica": qtree,
                "from": old.name,
                "to": new.name,
                "changes": [{"path": c.path, "kind": c.kind} for c in found],
            }
        )
        return EXIT_OK
    for c in found:
        print(f"{_CHANGE_MARKS[c.kind]} {c.path or '.'}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from coalesce_core import images

    with _reader(args) as agent:
        qtree, pcpi = _image(agent, args.ref)
        done = images.restore(agent.dest, qtree, pcpi.name, args.to, args.path or "")
    what = f"{args.path} of replica {qtree}" if args.path else f"replica {qtree}"
    _console().print(
        f"restored {markup(what)} from {markup(pcpi.name)} into {markup(args.to)}: "
        f"{done.records} records, {done.bytes} bytes"
    )
    for path in done.skipped_links:
        _console().print(
            f"not restored: {markup(path)}, a hard link to a file outside {markup(args.path)} "
            "(restore without PATH, or a PATH that holds both names)"
        )
    return EXIT_OK


def cmd_pin(args: argparse.Namespace) -> int:
    from coalesce_core.cycle import refs
    from coalesce_core.cycle.invariants import seq_of
    from coalesce_core.errors import NotFound

    pin = args.verb == "pin"
    named: list[str] = []  # the generation's PCPI, resolved before an unpin may prune it

    def act(agent: Any) -> None:
        named.append(refs.resolve(agent.state, args.generation).name)
        agent.pin(args.generation, pinned=pin)

    def report(agent: Any) -> None:
        try:
            name = named[0] if named else refs.resolve(agent.state, args.generation).name
        except NotFound:
            if pin:
                raise
            # handed to a running agent that took it at rest: the unpin pruned it before we could look
            _console().print(f"generation {markup(args.generation)} is no longer pinned, and pruned")
            return
        if pin:
            what = "is pinned: no prune removes it until `coalesce unpin`"
        elif name in {g.name for g in agent.state.generations()}:
            what = "is no longer pinned"
        else:
            what = "is no longer pinned, and pruned: the retention policy does not keep it"
        _console().print(f"generation {seq_of(name)} ({markup(name)}) {what}")

    return _change(args, args.verb, requests.make_args(args.verb, generation=args.generation), act, report)


def cmd_graph(args: argparse.Namespace) -> int:
    if args.format == "mermaid":
        sys.stdout.write(graphs.graph_mermaid())
        return EXIT_OK
    if args.format == "dot":
        sys.stdout.write(graphs.graph_dot())
        return EXIT_OK
    counts = None
    group = None
    if args.config or os.environ.get("COALESCE_CONFIG") or Path(DEFAULT_CONFIG).exists():
        with _reader(args) as agent:
            counts = agent.state.state_counts()
            group = agent.state.name
    if args.json:
        _dump_json(reports.graph_data(counts=counts))
        return EXIT_OK
    _console().print(graphs.graph_view(counts=counts, group=group))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from coalesce_core.ui.demo import run_demo

    console = _live_console()
    live = console.is_interactive and not args.plain
    return run_demo(
        backend=args.backend, replicas=args.replicas, seed=args.seed, speed=args.speed, live=live, console=console
    )


def cmd_crash_points(args: argparse.Namespace) -> int:
    if args.json:
        _dump_json(crashpoints.CRASH_POINTS)
    else:
        for name, where in crashpoints.CRASH_POINTS.items():
            print(f"{name:26} {where}")
    return EXIT_OK


# -- parser ------------------------------------------------------------------------
def build_parser(pm: Any = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coalesce", description="Snapshot-coalescing replication of qtrees.")
    p.add_argument("--config", "-c", help=f"group config (default: $COALESCE_CONFIG or ./{DEFAULT_CONFIG})")
    p.add_argument("--debug", action="store_true", help="show tracebacks and every error; --log-level debug")
    p.add_argument(
        "--log-file",
        metavar="PATH",
        help="also append timestamped log lines to PATH (reopened when rotated; docs/operations.md, Logs)",
    )
    p.add_argument(
        "--log-level",
        dest="log_threshold",  # `coalesce serve` has a --log-level of its own
        choices=tuple(logs.LEVELS),
        help="the least severe lines logged, on standard error and in --log-file (default: info; debug with --debug)",
    )
    p.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write Prometheus metrics to PATH (same as $COALESCE_METRICS_FILE; needs coalesce_metrics)",
    )
    p.add_argument("--version", action="version", version=f"coalesce {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def verb(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    verb("init", cmd_init, "create the group's volumes (if needed) and metadata")

    def handed(sp: argparse.ArgumentParser) -> None:
        """The options of a verb a running `coalesce run` takes as a request (docs/operations.md)."""
        sp.add_argument(
            "--timeout",
            type=_positive(),
            default=DEFAULT_REQUEST_TIMEOUT,
            help=f"beside a running agent: seconds to wait for it to take the request (default "
            f"{DEFAULT_REQUEST_TIMEOUT:g}); then it is withdrawn",
        )
        sp.add_argument(
            "--no-wait", action="store_true", help="beside a running agent: queue the request and return at once"
        )

    a = verb("add", cmd_add, "add a replica (appended to the config; baseline in the next cycle)")
    a.add_argument("name")
    a.add_argument("--source", help="source qtree (default: NAME)")
    a.add_argument(
        "--from",
        dest="origin",
        metavar="SOURCE",
        help="the [[source]] it comes from (default: the group's only source)",
    )
    handed(a)
    rm = verb("remove", cmd_remove, "remove a replica from the group and the config (its data stay)")
    rm.add_argument("name")
    handed(rm)
    r = verb("run", cmd_run, "run coalescing cycles (every `interval` seconds)")
    r.add_argument(
        "--once",
        action="store_true",
        help="one cycle; exit 0 when every replica ends stable, 8 when a transfer failed, "
        "4 when the source was out of reach or a PCPI was refused, else 3",
    )
    r.add_argument("--interval", type=_positive(), help="override [group] interval")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress display and no per-cycle line")
    st = verb("status", cmd_status, "replicas, exports and PCPIs")
    st.add_argument("--json", action="store_true", help="machine-readable output (docs/schemas/status.schema.json)")
    st.add_argument(
        "--watch", "-w", action="store_true", help="refresh until Ctrl-C (with --json: one document per line)"
    )
    st.add_argument("--interval", "-n", type=_positive(), default=2.0, help="seconds between refreshes (default 2)")
    st.add_argument("--count", type=_positive(int, 1, inclusive=True), help="stop after COUNT refreshes")
    h = verb("history", cmd_history, "one row per finished cycle: start, end, slowest replica, PCPIs, failures")
    h.add_argument("--json", action="store_true", help="machine-readable output (docs/schemas/history.schema.json)")
    h.add_argument("--last", type=_positive(int, 1, inclusive=True), help="only the last N cycles")
    gn = verb("generations", cmd_generations, "retained coalesced generations ([retention]) and what each holds")
    gn.add_argument(
        "--json", action="store_true", help="machine-readable output (docs/schemas/generations.schema.json)"
    )
    gn.add_argument("--plan", action="store_true", help="what the retention policy keeps or prunes now, and why")
    gen_help = "GEN: a generation id (`coalesce generations`), an ISO time (the newest at or before it) or latest"
    ls = verb("ls", cmd_ls, "the entries of a replica's image in a retained generation (default: the coalesced base)")
    ls.add_argument("ref", metavar="REPLICA[@GEN]", help=gen_help)
    ls.add_argument("path", nargs="?", metavar="PATH", help="only PATH and what is below it")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    df = verb(
        "diff",
        cmd_diff,
        "the paths changed between two images of a replica (A added, D deleted, R replaced, M modified)",
    )
    df.add_argument("old", metavar="REPLICA@GEN1", help=gen_help)
    df.add_argument("new", nargs="?", metavar="REPLICA@GEN2", help="the newer image (default: the coalesced base)")
    df.add_argument("--json", action="store_true", help="machine-readable output")
    rt = verb("restore", cmd_restore, "copy a replica's image (or PATH of it) out of a retained generation into DIR")
    rt.add_argument("ref", metavar="REPLICA@GEN", help=gen_help + " (no @GEN: the coalesced base)")
    rt.add_argument("path", nargs="?", metavar="PATH", help="only PATH and what is below it, at DIR/PATH")
    rt.add_argument("--to", required=True, metavar="DIR", help="an empty or new directory")
    for name, func, help in (
        ("check", cmd_check, "verify invariants I1-I5, I8, I9, I11 on the live group (exit 1 if violated)"),
        ("backends", cmd_backends, "installed storage backends (entry points)"),
    ):
        sp = verb(name, func, help)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    vf = verb("verify", cmd_verify, "compare exported images with their source PCPIs (exit 1 if one differs)")
    vf.add_argument("names", nargs="*", metavar="NAME", help="replicas (default: all)")
    vf.add_argument("--full", action="store_true", help="also compare the bytes of every file (content digests)")
    vf.add_argument("--json", action="store_true", help="machine-readable output (docs/schemas/verify.schema.json)")
    for name, func, help in (
        ("break", cmd_break, "break a replica: writable, exports its active FS"),
        ("resync", cmd_resync, "resynchronise a broken replica back into the cycle, keeping its writes in a PCPI"),
        ("release", cmd_release, "delete the PCPI that keeps a resynced replica's writes"),
    ):
        sp = verb(name, func, help)
        sp.add_argument("name")
        if name == "resync":
            sp.add_argument(
                "--discard", action="store_true", help="do not keep the broken replica's writes (no kept PCPI)"
            )
        handed(sp)
    for name, help in (
        ("pin", "exempt a retained generation from pruning ([retention])"),
        ("unpin", "let the retention policy prune a pinned generation again"),
    ):
        sp = verb(name, cmd_pin, help)
        sp.add_argument("generation", metavar="GEN", help=gen_help)
        handed(sp)
    rs = verb("reseed", cmd_reseed, "rebuild a replica by a baseline transfer (it keeps exporting its last good image)")
    rs.add_argument("name")
    rs.add_argument("--reason", help="why (shown by `coalesce status`)")
    handed(rs)
    g = verb("graph", cmd_graph, "the replica state graph from spec/coalescing.toml")
    g.add_argument("--format", choices=("text", "mermaid", "dot"), default="text")
    g.add_argument("--json", action="store_true")
    d = verb("demo", cmd_demo, "replay the patent's Fig. 7 scenario on the embedded backend")
    from coalesce_core.ui.demo import DEFAULT_BACKEND

    d.add_argument("--backend", default=DEFAULT_BACKEND, help=f"volume backend scheme (default: {DEFAULT_BACKEND})")
    d.add_argument("--replicas", type=_positive(int, 1, inclusive=True), default=3, help="qtrees (default 3: A, B, C)")
    d.add_argument("--seed", type=int, default=7, help="seed of the random source changes")
    d.add_argument("--speed", type=_positive(), default=1.0, help="time scale (2 = twice as fast)")
    d.add_argument("--plain", action="store_true", help="plain lines even on a terminal (the default when piped)")
    dbg = sub.add_parser("debug", help="developer tools")
    dsub = dbg.add_subparsers(dest="debug_verb", metavar="TOOL")
    dsub.required = True
    cp = dsub.add_parser("crash-points", help="list the named crash points (COALESCE_CRASH_AT)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_crash_points)
    if pm is not None:
        for impl in pm.hook.coalesce_cli_commands.get_hookimpls():
            try:  # a broken plugin must not take the core verbs down with it
                impl.function(subparsers=sub)
            except Exception as exc:
                sys.stderr.write(f"warning: plugin {impl.plugin_name!r} could not add its commands: {exc}\n")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        from coalesce_core.backend.manager import plugin_manager

        try:
            pm = plugin_manager()
        except CoalesceError:
            pm = None
            if debug:
                raise
        parser = build_parser(pm)
        args = parser.parse_args(argv)
        logs.configure(args.log_threshold or ("debug" if args.debug else "info"), args.log_file)
        if getattr(args, "metrics_file", None):
            os.environ["COALESCE_METRICS_FILE"] = os.path.abspath(args.metrics_file)
        return int(args.func(args) or 0)
    except CoalesceError as exc:
        if debug and logs.active():
            logs.log.error("traceback:", exc_info=True)
        elif debug:
            traceback.print_exc()
        return report_error(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        return report_error(exc)
    finally:
        logs.reset()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
