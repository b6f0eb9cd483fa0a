"""Railyard's query path through the real ADBC Flight SQL driver, figure by figure beside
the targets of issue 24.

    cargo build --release --bin railyard --bin flight_sql_floor
    .venv/bin/python benches/adbc.py            # everything (about 10 minutes on 2 cores)
    .venv/bin/python benches/adbc.py latency    # or some of: latency throughput stations
                                                #   tpch glm
    RAILYARD_BASELINE=DIR .venv/bin/python benches/adbc.py compare   # A/B against DIR's build

Every figure comes from this run, on this machine, with the release build:
- floor: the same ADBC calls against src/bin/flight_sql_floor.rs, a Flight SQL server
  that answers one constant row (no planning, no stations): what the driver, gRPC and
  loopback cost on their own. Printed beside each latency.
- latency: `SELECT 1` at the hub and a small aggregate over three lung stations under the
  stations' default policy (policy check, query-set auditor, audit record fsynced), with one
  cursor reused and with a new cursor per query (as pandas.read_sql does: ADBC then
  prepares the statement before it runs it). A reused cursor's `execute` first releases the
  previous query's result in the driver, without a request to the server; its time is
  printed apart from the query's for `SELECT 1` (a new cursor releases it when closed, before
  its timed span).
- throughput: 50 clients (threads, each its own connection) asking the aggregate at once.
- stations: the aggregate over N stations (3 to 100, and 1,000), open policy; the hub's
  own CPU time per query (its threads apart from the stations', read from /proc), and its
  growth per extra station.
- tpch: TPC-H Q1 at SF1, lineitem over three stations, against DuckDB over the same files,
  and DataFusion on its own over them (the Python package of the engine's major version,
  default settings): the engine's own cost beside the target.
- glm: a binomial GLM on breast cancer over three stations, its rounds, and what 50 ms of
  round-trip latency per station would add (rounds x 50 ms: each round is one fetch). The
  same model asked again is answered from plans the hub and the stations kept; a model not
  fitted before (another filter text each time) is planned afresh in its first round, and
  each station binds the later rounds' coefficients into that round's plan.
- compare (only when asked for, with RAILYARD_BASELINE set): an A/B of two builds in one
  run. Both builds' `railyard local` run at once, and the small queries above go to one and
  then the other in short alternating blocks, so that a slower stretch of the machine falls
  on both alike. Prints each build's p50 and the ratio of the two, with the spread of the
  per-block ratios (their quartiles).

Environment: RAILYARD_RELEASE (default target/release), RAILYARD_BENCH_RUNS (timed runs per
latency figure, default 300), RAILYARD_BENCH_DIR (keep generated data here),
RAILYARD_BASELINE (for compare: the directory holding the other build's `railyard`).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import warnings

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

warnings.filterwarnings("ignore", message="Cannot disable autocommit")
REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
RELEASE = pathlib.Path(os.environ.get("RAILYARD_RELEASE", TARGET / "release"))
RUNS = int(os.environ.get("RAILYARD_BENCH_RUNS", "300"))
AGGREGATE = "SELECT sex, count(*), avg(age) FROM lung GROUP BY sex"


def binary(name, release=None):
    path = (release or RELEASE) / name
    if not path.exists():
        sys.exit(f"{path} is missing: cargo build --release --bin railyard --bin flight_sql_floor")
    return path


class Server:
    """A process that prints its address on its first line (`… on HOST:PORT`)."""

    def __init__(self, args, prefix):
        self.proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith(prefix):
            self.proc.kill()
            raise RuntimeError(f"{args[0]} did not start: {line!r}")
        rest = line[len(prefix):]
        self.url = rest if "://" in rest else "grpc://" + rest

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def thread_cpu(self, name):
        """CPU seconds (user + system) of this process's threads named `name`, and of all
        the others."""
        mine = other = 0
        tick = os.sysconf("SC_CLK_TCK")
        for task in pathlib.Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / tick
            if comm == name:
                mine += cpu
            else:
                other += cpu
        return mine, other


def local(tmp, tables, policy=None, extra=(), release=None):
    args = [binary("railyard", release), "local", "--listen", "127.0.0.1:0", "--data-dir", tmp]
    for name, path in tables:
        args += ["--table", f"{name}={path}"]
    if policy:
        args += ["--policy", policy]
    return Server(args + list(extra), "hub listening on ")


def timed(conn, sql, runs, new_cursor, warmup=20):
    samples = []
    cursor = conn.cursor()
    for i in range(warmup + runs):
        if new_cursor:
            cursor.close()
            cursor = conn.cursor()
        t = time.perf_counter()
        cursor.execute(sql)
        cursor.fetch_arrow_table()
        if i >= warmup:
            samples.append(time.perf_counter() - t)
    cursor.close()
    samples.sort()
    return samples


def reused_parts(conn, sql, runs, warmup=20):
    """A reused cursor's query in its two parts: the DB-API layer releasing the previous
    query's result (the driver's reader; no request reaches the server: strace of the floor
    server shows no frame), which `execute` does first, and the query itself. A new cursor
    releases it in `close`, outside the timed span of `timed`. Uses the DB-API cursor's
    `_clear` (adbc_driver_manager 1.13); None where it has no such method."""
    cursor = conn.cursor()
    if not hasattr(cursor, "_clear"):
        cursor.close()
        return None
    release, query = [], []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        cursor._clear()
        t1 = time.perf_counter()
        cursor.execute(sql)
        cursor.fetch_arrow_table()
        t2 = time.perf_counter()
        if i >= warmup:
            release.append(t1 - t0)
            query.append(t2 - t1)
    cursor.close()
    return sorted(release), sorted(query)


def pct(samples, p):
    return samples[min(len(samples) - 1, int(len(samples) * p))]


def ms(seconds):
    return f"{seconds * 1000:8.2f} ms"


def row(label, value, target=""):
    print(f"  {label:<58} {value:>22}   {target}")


def latency_pair(url, sql, runs):
    with flightsql.connect(url) as conn:
        return {new: timed(conn, sql, runs, new) for new in (False, True)}


def section_latency(tmp):
    print("\n== latency (ADBC Flight SQL driver, loopback; p50 / p99 of", RUNS, "runs)")
    floor = Server([binary("flight_sql_floor")], "listening on ")
    try:
        base = latency_pair(floor.url, "SELECT 1", RUNS)
        with flightsql.connect(floor.url) as conn:
            base_parts = reused_parts(conn, "SELECT 1", RUNS)
    finally:
        floor.stop()
    hub = local(tmp / "latency", [("lung", DATA / "lung" / "horizontal" / "csv")])
    try:
        one = latency_pair(hub.url, "SELECT 1", RUNS)
        agg = latency_pair(hub.url, AGGREGATE, RUNS)
        with flightsql.connect(hub.url) as conn:
            one_parts = reused_parts(conn, "SELECT 1", RUNS)
    finally:
        hub.stop()
    for new in (False, True):
        how = "new cursor" if new else "reused cursor"
        row(f"floor server, SELECT 1, {how}", f"{ms(pct(base[new], .5))} / {ms(pct(base[new], .99))}")
        row(f"hub, SELECT 1, {how}", f"{ms(pct(one[new], .5))} / {ms(pct(one[new], .99))}", "target p50 <= 1 ms")
        row(f"3 stations, {AGGREGATE[:22]}…, {how}", f"{ms(pct(agg[new], .5))} / {ms(pct(agg[new], .99))}", "target p50 <= 3 ms, p99 <= 5 ms")
    for name, parts in (("floor server", base_parts), ("hub", one_parts)):
        if parts:
            release, query = parts
            row(f"{name}: the driver releasing the last result / query", f"{ms(pct(release, .5))} / {ms(pct(query, .5))}", "SELECT 1, reused cursor, p50 each")


def section_throughput(tmp, clients=50, seconds=10.0):
    print(f"\n== throughput ({clients} concurrent ADBC clients, each its own connection, {seconds:.0f} s)")
    hub = local(tmp / "throughput", [("lung", DATA / "lung" / "horizontal" / "csv")], extra=["--named-researchers"])
    latencies, errors = [], []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i):
        mine = []
        # Each client is its own researcher, as 50 researchers would be.
        with flightsql.connect(hub.url, db_kwargs={"adbc.flight.sql.rpc.call_header.x-railyard-researcher": f"r{i}"}) as conn:
            cursor = conn.cursor()
            cursor.execute(AGGREGATE)
            cursor.fetch_arrow_table()
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                try:
                    cursor.execute(AGGREGATE)
                    cursor.fetch_arrow_table()
                except Exception as e:  # noqa: BLE001 — counted and reported
                    with lock:
                        errors.append(str(e)[:200])
                    continue
                mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 1e9
    start.wait()
    began = time.perf_counter()
    stop_at[0] = began + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    hub.stop()
    latencies.sort()
    row("queries per second", f"{len(latencies) / elapsed:8.1f} q/s", "target >= 200 q/s")
    row("latency p50 / p99", f"{ms(pct(latencies, .5))} / {ms(pct(latencies, .99))}")
    if errors:
        row("errors", str(len(errors)), errors[0])


def split_lung(dest, n):
    table = pacsv.read_csv(DATA / "lung" / "full.csv")
    # At least 5 rows per station (an empty file has no column types): the patients again,
    # as often as needed.
    table = pa.concat_tables([table] * max(1, -(-5 * n // table.num_rows)))
    dest.mkdir(parents=True, exist_ok=True)
    rows = table.num_rows
    for i in range(n):
        part = table.slice(i * rows // n, (i + 1) * rows // n - i * rows // n)
        pacsv.write_csv(part, dest / f"s{i:04}.csv")
    return dest


def section_stations(tmp, counts=(3, 10, 30, 100), big=1000):
    print("\n== stations (the aggregate over N stations, open policy, reused cursor; the hub's own CPU per query: its threads, named 'railyard', apart from the stations')")
    open_policy = REPO / "tests" / "policies" / "open.toml"
    cpu = {}
    for n in list(counts) + [big]:
        runs = max(30, RUNS // max(1, n // 10)) if n < big else 20
        data = split_lung(tmp / f"lung{n}", n)
        hub = local(tmp / f"stations{n}", [("lung", data)], policy=open_policy)
        try:
            with flightsql.connect(hub.url) as conn:
                timed(conn, AGGREGATE, 5, False, warmup=5)
                h0, s0 = hub.thread_cpu("railyard")
                samples = timed(conn, AGGREGATE, runs, False, warmup=0)
                h1, s1 = hub.thread_cpu("railyard")
        finally:
            hub.stop()
        cpu[n] = ((h1 - h0) / runs, (s1 - s0) / runs)
        target = "target p50 <= 30 ms" if n == 100 else ("reported" if n == big else "")
        row(f"N = {n:>4}: p50 / p99", f"{ms(pct(samples, .5))} / {ms(pct(samples, .99))}", target)
        row(f"N = {n:>4}: CPU per query, hub / stations", f"{cpu[n][0] * 1e3:.2f} / {cpu[n][1] * 1e3:.2f} ms")
    lo, hi = counts[0], counts[-1]
    slope = (cpu[hi][0] - cpu[lo][0]) / (hi - lo)
    row(f"hub CPU per extra station ({lo} -> {hi})", f"{slope * 1e6:8.1f} us", "target <= 100 us")
    slope = (cpu[big][0] - cpu[hi][0]) / (big - hi)
    row(f"hub CPU per extra station ({hi} -> {big})", f"{slope * 1e6:8.1f} us", "reported")


TPCH_Q1 = """select l_returnflag, l_linestatus, sum(l_quantity) as sum_qty,
 sum(l_extendedprice) as sum_base_price, sum(l_extendedprice * (1 - l_discount)) as sum_disc_price,
 sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) as sum_charge, avg(l_quantity) as avg_qty,
 avg(l_extendedprice) as avg_price, avg(l_discount) as avg_disc, count(*) as count_order
 from lineitem where l_shipdate <= date '1998-12-01' - interval '90' day
 group by l_returnflag, l_linestatus order by l_returnflag, l_linestatus"""


TPCH_Q1_COLUMNS = ["l_returnflag", "l_linestatus", "sum_qty", "sum_base_price", "sum_disc_price",
                   "sum_charge", "avg_qty", "avg_price", "avg_disc", "count_order"]


def section_tpch(tmp, runs=11):
    import datafusion
    import duckdb

    print("\n== TPC-H Q1, SF1 (lineitem over 3 stations, open policy) against DuckDB and DataFusion over the same files; medians of", runs, "runs of each, taken in turns")
    root = pathlib.Path(os.environ.get("RAILYARD_BENCH_DIR", tmp / "tpch"))
    lineitem = root / "lineitem"
    if not lineitem.exists():
        subprocess.run([binary("railyard"), "gen", "--out", root, "--patients", "300", "--tpch-scale", "1"], check=True, stdout=subprocess.DEVNULL)
    files = sorted(str(p) for p in lineitem.glob("*.parquet"))
    duck = duckdb.connect()
    duck.execute(f"CREATE VIEW lineitem AS SELECT * FROM read_parquet({files!r})")
    want = duck.sql(TPCH_Q1).to_arrow_table()
    # The engine the stations run, as released (the Python package of the same major
    # version, its default settings: every core), over the pooled files: what DataFusion
    # alone costs for Q1 on this machine, beside DuckDB.
    engine = datafusion.SessionContext()
    engine.register_parquet("lineitem", str(lineitem))
    pooled = engine.sql(TPCH_Q1).to_arrow_table()
    assert pooled.column(9).to_pylist() == want.column(9).to_pylist(), "DataFusion's count_order differs from DuckDB"
    hub = local(tmp / "tpchfed", [("lineitem", lineitem)], policy=REPO / "tests" / "policies" / "open.toml")
    d, e, f = [], [], []
    try:
        with flightsql.connect(hub.url) as conn:
            timed(conn, TPCH_Q1, 0, False, warmup=1)
            # One DuckDB run, one DataFusion run, then one federated run, and again: a slower
            # stretch of the machine (another process, a frequency change) falls on all alike.
            for _ in range(runs):
                t = time.perf_counter()
                duck.sql(TPCH_Q1).to_arrow_table()
                d.append(time.perf_counter() - t)
                t = time.perf_counter()
                engine.sql(TPCH_Q1).collect()
                e.append(time.perf_counter() - t)
                f += timed(conn, TPCH_Q1, 1, False, warmup=0)
            cursor = conn.cursor()
            cursor.execute(TPCH_Q1)
            got = cursor.fetch_arrow_table()
            cursor.close()
    finally:
        hub.stop()
    assert got.num_rows == want.num_rows, (got.num_rows, want.num_rows)
    assert got.column(9).to_pylist() == want.column(9).to_pylist(), "count_order differs from DuckDB"
    # The sums and averages too (DuckDB's averages are doubles, DataFusion's are decimals
    # rounded to 6 places).
    for c in range(2, 9):
        for a, b in zip(got.column(c).to_pylist(), want.column(c).to_pylist()):
            assert abs(float(a) - float(b)) <= 1e-6 + 1e-9 * abs(float(b)), (TPCH_Q1_COLUMNS[c], a, b)
    d.sort()
    e.sort()
    f.sort()
    row("DuckDB, pooled files", ms(pct(d, .5)))
    row(f"DataFusion {datafusion.__version__} (Python package, defaults), pooled files", ms(pct(e, .5)))
    row("Railyard, 3 stations through ADBC", ms(pct(f, .5)))
    row("ratio, DataFusion alone to DuckDB", f"{pct(e, .5) / pct(d, .5):8.2f} x")
    row("ratio", f"{pct(f, .5) / pct(d, .5):8.2f} x", "target <= 1.3x")


GLM = "SELECT * FROM glm('breast_cancer', 'diagnosis ~ mean_radius + mean_texture', 'binomial')"


def section_glm(tmp, runs=50):
    print("\n== models (binomial GLM on breast cancer over 3 stations, default policy)")
    data = tmp / "glm"
    hub = local(data, [("breast_cancer", DATA / "breast_cancer" / "horizontal" / "parquet")])
    try:
        with flightsql.connect(hub.url) as conn:
            timed(conn, GLM, 1, False, warmup=2)
            log = next(data.glob("*/audit.jsonl"))
            before = len(log.read_text().splitlines())
            samples = timed(conn, GLM, runs, False, warmup=0)
            rounds = (len(log.read_text().splitlines()) - before) / runs
            # A model not fitted before: a filter every row meets, another each time, so
            # that neither the hub nor the stations have planned any of its rounds (the
            # stations plan its first round and bind the later rounds into that plan).
            fresh = []
            cursor = conn.cursor()
            for i in range(runs):
                sql = GLM.replace("'binomial')", f"'binomial', 'mean_radius > -{i + 1}')")
                t = time.perf_counter()
                cursor.execute(sql)
                cursor.fetch_arrow_table()
                fresh.append(time.perf_counter() - t)
            cursor.close()
            fresh.sort()
    finally:
        hub.stop()
    row("p50 / p99", f"{ms(pct(samples, .5))} / {ms(pct(samples, .99))}", "target <= 8 ms")
    row("a model not fitted before (a new filter each time)", f"{ms(pct(fresh, .5))} / {ms(pct(fresh, .99))}")
    row("rounds (fragments per station per fit)", f"{rounds:8.1f}")
    row("with 50 ms round trip per station: rounds x 50 ms", f"{rounds * 50:8.0f} ms", "target <= 10 rounds (500 ms)")


def section_compare(tmp, blocks=20, block=10):
    baseline = os.environ.get("RAILYARD_BASELINE")
    if not baseline:
        sys.exit("compare needs RAILYARD_BASELINE: the directory of the build to compare against")
    baseline = pathlib.Path(baseline)
    if baseline.resolve() == RELEASE.resolve():
        sys.exit(f"RAILYARD_BASELINE and RAILYARD_RELEASE are the same directory ({RELEASE})")
    print(f"\n== compare: {RELEASE} (new) against {baseline} (baseline), {blocks} alternating blocks of {block} runs; p50 each, ratio new / baseline (quartiles of the per-block ratios)")
    tables = [("lung", DATA / "lung" / "horizontal" / "csv"),
              ("breast_cancer", DATA / "breast_cancer" / "horizontal" / "parquet")]
    hubs = {"baseline": local(tmp / "cmp-base", tables, release=baseline), "new": local(tmp / "cmp-new", tables)}
    figures = [("SELECT 1, reused cursor", "SELECT 1", False), ("SELECT 1, new cursor", "SELECT 1", True),
               (f"{AGGREGATE[:22]}…, reused cursor", AGGREGATE, False), (f"{AGGREGATE[:22]}…, new cursor", AGGREGATE, True),
               ("binomial GLM, repeated fit", GLM, False)]
    try:
        conns = {k: flightsql.connect(h.url) for k, h in hubs.items()}
        try:
            for label, sql, new in figures:
                samples = {"baseline": [], "new": []}
                ratios = []
                for k in conns:
                    timed(conns[k], sql, 0, new, warmup=20)
                for b in range(blocks):
                    # ABBA order: neither build always runs right after the other.
                    order = ("baseline", "new") if b % 2 == 0 else ("new", "baseline")
                    got = {k: timed(conns[k], sql, block, new, warmup=0) for k in order}
                    for k in order:
                        samples[k] += got[k]
                    ratios.append(pct(got["new"], .5) / pct(got["baseline"], .5))
                for k in samples:
                    samples[k].sort()
                ratios.sort()
                a, b = pct(samples["baseline"], .5), pct(samples["new"], .5)
                row(label, f"{ms(a)} -> {ms(b)}", f"{b / a:.3f}x ({pct(ratios, .25):.3f}-{pct(ratios, .75):.3f})")
        finally:
            for c in conns.values():
                c.close()
    finally:
        for h in hubs.values():
            h.stop()


SECTIONS = {
    "latency": section_latency,
    "throughput": section_throughput,
    "stations": section_stations,
    "tpch": section_tpch,
    "glm": section_glm,
}
# Sections that run only when named.
ON_REQUEST = {"compare": section_compare}


def main():
    chosen = sys.argv[1:] or list(SECTIONS)
    every = {**SECTIONS, **ON_REQUEST}
    unknown = [c for c in chosen if c not in every]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {list(every)}")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="railyard-bench-"))
    try:
        for name in chosen:
            every[name](tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
