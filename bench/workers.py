"""``parley serve --workers N`` against one worker, side by side in one run.

For each configuration in ``--workers-list`` (default 1 and 2), Parley runs on PostgreSQL
(the server on this machine; a fresh database per configuration, dropped and re-created
before every start) with the tests' fake provider (child processes, as in
``bench/chat_load.py``), and ``--clients`` clients, each a user of its own so that no turn
waits for another's reply, send ``POST /chat`` turn after turn with ``chat_load.load``:

- with a model that answers at once, for ``--throughput-seconds``: turns/s, and the CPU
  of Parley's whole process tree (the supervisor and its workers, read with psutil before
  and after) per turn;
- with a model that answers after ``--latency`` seconds, for ``--latency-seconds``: the
  median and p99 turn time.

Each of the two is a start of its own (fresh database, a warm-up of every client, then
``ANALYZE``, since autovacuum may be off). The configurations alternate, 1, N, 1, N, ...,
round after round, so that the machine's drift hits each alike. Parley counts as ready when
every worker has started DBOS, not when the first one answers. During every measured span
the CPU of PostgreSQL (the bench database's backends, and the whole server), of the fake
provider, of this process (the load generator) and of the whole machine is read as well,
to show what shares the cores with Parley.

    .venv/bin/python bench/workers.py [--workers-list 1,2] [--clients 150] [--rounds 2]
                                      [--throughput-seconds 12] [--latency-seconds 15]
                                      [--database-url URL] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import sqlalchemy as sa

from _support import cpu_seconds, fake_provider, parley, percentile, storage
from chat_load import load

DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/parley_bench_workers"


def tree_cpu(root: psutil.Process) -> float:
    """CPU seconds of a process and all its descendants, those already reaped included
    (``children_user``/``children_system`` hold the CPU of waited-for children)."""
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def postmaster(conn: sa.Connection) -> psutil.Process | None:
    """The postmaster of the server ``conn`` is connected to, if it runs on this machine
    (the parent of the connection's backend)."""
    pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid).parent()
        if parent is not None and parent.name() in ("postgres", "postmaster"):
            return parent
    return None


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, not idle nor waiting)."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


@dataclass
class Span:
    """CPU seconds of each party over one measured span."""

    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    workers: list[float] = field(default_factory=list)  # Parley's workers, each alone


@dataclass
class Result:
    turns: int
    errors: int
    times: list[float]
    span: Span
    idle: float  # Parley's CPU at rest, seconds per second
    took: str  # how long each step of the start took

    @property
    def rate(self) -> float:
        return self.turns / self.span.wall

    @property
    def cpu_per_turn(self) -> float:
        return self.span.cpu["Parley"] / max(1, self.turns)


class Meter:
    """Reads every party's CPU at once."""

    def __init__(self, parley_pid: int, provider: psutil.Process, conn: sa.Connection) -> None:
        self.parley = psutil.Process(parley_pid)
        self.provider = provider
        self.postgres = postmaster(conn)
        self.me = psutil.Process()
        self.conn = conn

    def workers(self) -> dict[int, float]:
        found = {}
        for process in serving_processes(self.parley):
            with contextlib.suppress(psutil.Error):
                found[process.pid] = tree_cpu(process)
        return found

    def backends(self) -> dict[int, float]:
        """CPU seconds of each backend of the bench's database (this reader's own aside)."""
        pids = self.conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalars()
        found = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                found[pid] = cpu_seconds(psutil.Process(pid))
        return found

    def read(self) -> tuple[float, dict[str, float], dict[int, float]]:
        cpu = {
            "Parley": tree_cpu(self.parley),
            "PostgreSQL server": tree_cpu(self.postgres) if self.postgres else float("nan"),
            "fake provider": tree_cpu(self.provider),
            "load generator": cpu_seconds(self.me),
            "machine": machine_busy(),
        }
        backends = {-pid: cpu for pid, cpu in self.backends().items()}
        return time.perf_counter(), cpu, self.workers() | backends

    @contextlib.contextmanager
    def span(self) -> Iterator[Span]:
        result = Span()
        started, before, pids_before = self.read()
        yield result
        ended, after, pids_after = self.read()
        result.wall = ended - started
        result.cpu = {name: after[name] - before[name] for name in before}
        deltas = {pid: cpu - pids_before.get(pid, 0.0) for pid, cpu in pids_after.items()}
        # Backends that ended within the span are missed: the pools keep theirs open.
        result.cpu["PostgreSQL"] = sum(cpu for pid, cpu in deltas.items() if pid < 0)
        result.cpu["PostgreSQL, other"] = result.cpu["PostgreSQL server"] - result.cpu["PostgreSQL"]
        result.cpu["the rest"] = result.cpu["machine"] - sum(
            result.cpu[name]
            for name in ("Parley", "PostgreSQL server", "fake provider", "load generator")
        )
        result.workers = sorted((cpu for pid, cpu in deltas.items() if pid > 0), reverse=True)


def serving_processes(server: psutil.Process) -> list[psutil.Process]:
    """The processes that serve requests: the workers, or the server itself when alone."""
    workers = []
    for child in server.children():
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                workers.append(child)
    return workers or [server]


def wait_for_workers(server: psutil.Process, workers: int, conn: sa.Connection) -> list[int]:
    """Wait until every worker has finished starting: answering ``/times`` shows only that
    one has. A worker counts once DBOS has started in it (it holds a connection named
    ``parley-dbos``; DBOS starts last, after the model's memory). Returns their ids."""
    deadline = time.monotonic() + 180
    while True:
        ports = set(
            conn.execute(
                sa.text(
                    "SELECT client_port FROM pg_stat_activity WHERE datname = "
                    "current_database() AND application_name = 'parley-dbos'"
                )
            ).scalars()
        )
        ready = []
        for process in serving_processes(server):
            with contextlib.suppress(psutil.Error):
                if any(c.laddr.port in ports for c in process.net_connections("tcp")):
                    ready.append(process.pid)
        if len(ready) >= workers:
            return sorted(ready)
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(ready)} of {workers} workers started in 180 s")
        time.sleep(0.2)


def drop(database_url: str) -> None:
    url = sa.make_url(database_url)
    admin = sa.create_engine(
        url.set(drivername="postgresql+psycopg", database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


def server_facts(database_url: str) -> tuple[int, int, bool]:
    """The server's ``max_connections``, the connections open now, and whether the
    server runs on this machine."""
    url = sa.make_url(database_url).set(drivername="postgresql+psycopg", database="postgres")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        limit = int(conn.execute(sa.text("SHOW max_connections")).scalar_one())
        in_use = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity")).scalar_one()
        local = postmaster(conn) is not None
    engine.dispose()
    return limit, in_use, local


def log_tail(data_dir: Path, lines: int = 30) -> str:
    log = data_dir / "server.log"
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return f"the end of {log}:\n" + "\n".join(text[-lines:])


def guarded_load(url: str, clients: int, data_dir: Path, seconds: float) -> tuple[list[float], int]:
    """``chat_load.load``, stopping the bench with Parley's log if a request fails outright
    (the connection dropped: Parley raised instead of answering)."""
    try:
        return asyncio.run(load([url], clients, seconds))
    except Exception as error:
        raise SystemExit(f"a request failed: {error!r}; {log_tail(data_dir)}") from error


def run_once(
    *,
    workers: int,
    database_url: str,
    provider_url: str,
    provider: psutil.Process,
    data_dir: Path,
    clients: int,
    seconds: float,
    warm_up: float,
    extra_env: dict[str, str],
) -> Result:
    """Start Parley with ``workers`` processes on a fresh database, warm it up with every
    client, ANALYZE, measure its idle CPU, then load it for ``seconds``."""
    steps = {"database": time.perf_counter()}
    env, _ = storage(database_url)
    data_dir.mkdir(parents=True, exist_ok=True)
    env |= {
        "OPENAI_BASE_URL": provider_url,
        "PARLEY_WORKERS": str(workers),
        "PARLEY_EXECUTOR_ID": "bench",
        **extra_env,
    }
    with contextlib.ExitStack() as stack:
        # One connection of the bench's own, for the whole start, taken before Parley's:
        # on a PostgreSQL that others use too, a slot may not come free later.
        engine = sa.create_engine(
            sa.make_url(database_url).set(drivername="postgresql+psycopg"),
            isolation_level="AUTOCOMMIT",  # no transaction, no snapshot held open
            poolclass=sa.NullPool,
        )
        conn = stack.enter_context(engine.connect())
        try:
            url, pid = stack.enter_context(parley(data_dir, **env))
        except SystemExit:
            raise SystemExit(
                f"parley serve with {workers} workers did not start; {log_tail(data_dir)}"
            ) from None
        steps["start"] = time.perf_counter()
        ready = wait_for_workers(psutil.Process(pid), workers, conn)
        steps["all ready"] = time.perf_counter()
        run_load = functools.partial(guarded_load, url, clients, data_dir)
        run_load(warm_up)  # every user's conversation, every pool
        steps["warm-up"] = time.perf_counter()
        conn.execute(sa.text("ANALYZE"))  # autovacuum may be off
        meter = Meter(pid, provider, conn)
        idle_started = time.perf_counter()
        idle_before = tree_cpu(meter.parley)
        time.sleep(2)
        idle = (tree_cpu(meter.parley) - idle_before) / (time.perf_counter() - idle_started)
        with meter.span() as span:
            times, errors = run_load(seconds)
        steps["load"] = time.perf_counter()
        if (after := sorted(p.pid for p in serving_processes(meter.parley))) != ready:
            print(f"  warning: the workers changed during the run: {ready} -> {after}")
    steps["stop"] = time.perf_counter()
    marks = list(steps.items())
    took = ", ".join(f"{name} {t - marks[i][1]:.1f} s" for i, (name, t) in enumerate(marks[1:]))
    return Result(turns=len(times), errors=errors, times=times, span=span, idle=idle, took=took)


def fmt_rounds(values: list[float], spec: str) -> str:
    text = ", ".join(format(value, spec) for value in values)
    if len(values) > 2:
        text += f" (median {format(statistics.median(values), spec)})"
    return text


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  " + "   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers-list",
        default="1,2",
        type=lambda text: [int(part) for part in text.split(",") if part.strip()],
        help="the configurations to compare, comma-separated (default 1,2)",
    )
    parser.add_argument("--clients", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every configuration")
    parser.add_argument("--throughput-seconds", type=float, default=12)
    parser.add_argument("--latency-seconds", type=float, default=15)
    parser.add_argument("--latency", type=float, default=1.0, help="the slow model's answer time")
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE,
        help="PostgreSQL URL; each configuration uses a database of this name with _wN "
        "appended, dropped and re-created at every start",
    )
    parser.add_argument("--quick", action="store_true", help="one round, shorter loads")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.throughput_seconds, args.latency_seconds = 1, 6, 8
    warm_up = 0.5  # about one turn per client: every conversation exists
    configs: list[int] = args.workers_list
    if not configs or min(configs) < 1:
        parser.error("--workers-list: numbers of 1 or more, such as 1,2")

    base = sa.make_url(args.database_url)
    urls = {
        n: base.set(database=f"{base.database}_w{n}").render_as_string(hide_password=False)
        for n in configs
    }
    budget = int(os.environ.get("PARLEY_DB_CONNECTIONS", "40"))
    limit, in_use, local = server_facts(args.database_url)
    extra_env = {"PARLEY_DB_CONNECTIONS": str(budget)}
    print(
        f"machine: {psutil.cpu_count()} cores ({platform.machine()}), Python "
        f"{platform.python_version()}; PostgreSQL at {base.host}:{base.port}"
        f"{' on this machine' if local else ''} (max_connections {limit}); "
        f"{budget} connections per Parley process"
    )
    for n in configs:
        if n * budget + in_use + 3 > limit:
            print(
                f"  warning: {n} workers may hold {n * budget} connections, and "
                f"{in_use} of PostgreSQL's {limit} are taken already: expect refusals "
                "(a server of the bench's own avoids them)"
            )
    order = ", ".join(str(n) for n in configs * min(2, args.rounds))
    print(
        f"{args.clients} clients, each a user of its own; an instant model for "
        f"{args.throughput_seconds:g} s, a {args.latency:g} s model for "
        f"{args.latency_seconds:g} s; {args.rounds} rounds, the configurations alternated "
        f"({order}{', ...' if args.rounds > 2 else ''}) so that machine noise hits each alike"
    )

    results: dict[tuple[str, int], list[Result]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="parley-bench-workers-"))
    with contextlib.ExitStack() as stack:
        providers = {}
        me = psutil.Process()
        for name, latency in (("instant", 0.0), ("slow", args.latency)):
            known = {child.pid for child in me.children()}
            provider_url = stack.enter_context(fake_provider(latency))
            (child,) = [c for c in me.children() if c.pid not in known]
            providers[name] = (provider_url, child)
        for round_number in range(1, args.rounds + 1):
            for n in configs:
                for phase, seconds in (
                    ("instant", args.throughput_seconds),
                    ("slow", args.latency_seconds),
                ):
                    provider_url, provider = providers[phase]
                    result = run_once(
                        workers=n,
                        database_url=urls[n],
                        provider_url=provider_url,
                        provider=provider,
                        data_dir=scratch / f"r{round_number}-w{n}-{phase}",
                        clients=args.clients,
                        seconds=seconds,
                        warm_up=warm_up,
                        extra_env=extra_env,
                    )
                    results.setdefault((phase, n), []).append(result)
                    split = "/".join(
                        f"{cpu / max(1e-9, sum(result.span.workers)):.0%}"
                        for cpu in result.span.workers
                    )
                    print(
                        f"round {round_number}, {n} worker{'s' if n > 1 else ''}, "
                        f"{'instant' if phase == 'instant' else f'{args.latency:g} s'} model: "
                        f"{result.turns} turns in {result.span.wall:.1f} s "
                        f"({result.rate:.1f}/s), {result.errors} errors, "
                        f"p50 {percentile(result.times, 0.5):.3f} s, "
                        f"p99 {percentile(result.times, 0.99):.3f} s, "
                        f"Parley {result.cpu_per_turn * 1000:.2f} ms CPU/turn"
                        + (f", workers' CPU split {split}" if n > 1 else "")
                        + f"\n  ({result.took})",
                        flush=True,
                    )
    for n in configs:
        drop(urls[n])
    if any(r.errors for rs in results.values() for r in rs):
        print(f"there were errors: Parley's logs are kept in {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)

    report(results, configs, args.clients, f"{args.latency:g} s model")


def label(n: int) -> str:
    return f"{n} worker{'s' if n > 1 else ''}"


def report(
    results: dict[tuple[str, int], list[Result]], configs: list[int], clients: int, slow: str
) -> None:
    def row(name: str, phase: str, value: Callable[[Result], float], spec: str) -> list[str]:
        return [name, *(fmt_rounds([value(r) for r in results[(phase, n)]], spec) for n in configs)]

    print(f"\n== {clients} clients; each cell lists the rounds in the order run")
    rows = [
        row("instant model: turns/s", "instant", lambda r: r.rate, ".1f"),
        row("instant model: Parley CPU ms/turn", "instant", lambda r: r.cpu_per_turn * 1e3, ".2f"),
        row(f"{slow}: turn time p50 (s)", "slow", lambda r: percentile(r.times, 0.5), ".2f"),
        row(f"{slow}: turn time p99 (s)", "slow", lambda r: percentile(r.times, 0.99), ".2f"),
        row(f"{slow}: turns/s", "slow", lambda r: r.rate, ".1f"),
        row(f"{slow}: Parley CPU ms/turn", "slow", lambda r: r.cpu_per_turn * 1e3, ".2f"),
        row("Parley idle CPU (ms/s)", "instant", lambda r: r.idle * 1e3, ".1f"),
        [
            "errors",
            *(
                str(sum(r.errors for phase in ("instant", "slow") for r in results[(phase, n)]))
                for n in configs
            ),
        ],
    ]
    print_table(["", *(label(n) for n in configs)], rows)

    cores = psutil.cpu_count()
    print(
        f"\n== CPU during the measured spans, % of one core ({cores} cores = {cores * 100}%), "
        "mean of the rounds"
    )
    columns = [(phase, n) for phase in ("instant", "slow") for n in configs]
    header = ["", *(f"{'instant' if p == 'instant' else slow}, {label(n)}" for p, n in columns)]

    def share(key: tuple[str, int], party: str) -> str:
        value = statistics.mean(r.span.cpu[party] / r.span.wall for r in results[key])
        return f"{max(0.0, value):.0%}"  # not "-0%" from the readings' jitter

    def per_turn(key: tuple[str, int], party: str) -> str:
        values = [r.span.cpu[party] / max(1, r.turns) * 1e3 for r in results[key]]
        return f"{statistics.mean(values):.2f}"

    parties = {
        "Parley": "Parley (all its processes)",
        "PostgreSQL": "PostgreSQL: the bench database's backends",
        "PostgreSQL, other": "PostgreSQL: the rest of the server",
        "fake provider": "fake provider",
        "load generator": "load generator (this process)",
        "the rest": "everything else on the machine",
        "machine": "the whole machine",
    }
    rows = [[name, *(share(key, party) for key in columns)] for party, name in parties.items()]
    rows += [
        [f"ms of CPU per turn: {name}", *(per_turn(key, party) for key in columns)]
        for party, name in (
            ("PostgreSQL", "PostgreSQL (bench database)"),
            ("load generator", "load generator"),
            ("fake provider", "fake provider"),
        )
    ]
    print_table(header, rows)


if __name__ == "__main__":
    main()
