"""Load: 50 concurrent ADBC clients for 60 seconds against `railyard local` (three stations,
the stations' default policy, loopback), each client a researcher of its own, mixing small
grouped aggregates, a logistic regression and a query the policy refuses. Every answer is
checked against pandas (the aggregate), or against the first answer of the same model (the
GLM is exact, so every run must give the same coefficients); the refusal must name its rule.
Nothing else may fail. Reports p50/p99 per kind of query and the federation's resident memory
(the hub and its stations share the `railyard local` process).

Then clients that disconnect in the middle of a long stream: the process's memory must stay
bounded (the hub stops producing for a client that is gone instead of buffering its answer).
"""

import os
import pathlib
import statistics
import threading
import time
import uuid

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pandas as pd
import pytest

from conftest import DATA, start_local, stop

CLIENTS = int(os.environ.get("RAILYARD_LOAD_CLIENTS", "50"))
SECONDS = float(os.environ.get("RAILYARD_LOAD_SECONDS", "60"))
K = 5
AGGREGATE = "SELECT sex, count(*) AS n, sum(age) AS s FROM lung GROUP BY sex ORDER BY sex"
GLM = "SELECT term, estimate FROM glm('breast_cancer', 'diagnosis ~ mean_radius', 'binomial')"
REFUSED = "SELECT age FROM lung"
HEADER = "adbc.flight.sql.rpc.call_header.x-railyard-researcher"
# A stream far larger than any buffer: 8 bytes a row, 800 MB if it were held whole.
LONG_STREAM = "SELECT value FROM generate_series(1, 100000000)"


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def report(request, line):
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{line}", flush=True)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    proc, url = start_local(tmp_path_factory.mktemp("load"), None, ["--named-researchers"])
    yield proc, url
    stop(proc)


def expected_aggregate():
    lung = pd.concat(pd.read_csv(p) for p in sorted((DATA / "lung" / "horizontal" / "csv").glob("*.csv")))
    # The default policy suppresses groups below k at each station; both sexes exceed it at
    # every station, so the pooled answer is the reference.
    want = lung.groupby("sex").agg(n=("age", "size"), s=("age", "sum")).reset_index()
    return want["n"].tolist(), want["s"].tolist()


def test_fifty_clients_for_a_minute_meet_no_unexpected_error(federation, request):
    proc, url = federation
    want_n, want_s = expected_aggregate()
    latencies = {"aggregate": [], "glm": [], "refusal": []}
    unexpected = []
    reference_glm = []
    lock = threading.Lock()
    start_rss = rss_kib(proc.pid)
    peak_rss = [start_rss]
    stop_at = time.monotonic() + SECONDS

    def client(index):
        researcher = f"load-{index}-{uuid.uuid4().hex[:8]}"
        kinds = ["aggregate", "glm", "refusal"]
        turn = index
        try:
            with flightsql.connect(url, db_kwargs={HEADER: researcher}, autocommit=True) as conn:
                while time.monotonic() < stop_at:
                    kind = kinds[turn % 3]
                    turn += 1
                    started = time.perf_counter()
                    try:
                        with conn.cursor() as cur:
                            cur.execute({"aggregate": AGGREGATE, "glm": GLM, "refusal": REFUSED}[kind])
                            got = cur.fetch_arrow_table().to_pandas()
                        elapsed = time.perf_counter() - started
                        if kind == "aggregate":
                            ok = got["n"].tolist() == want_n and got["s"].tolist() == want_s
                        elif kind == "glm":
                            estimates = got["estimate"].tolist()
                            with lock:
                                if not reference_glm:
                                    reference_glm.append(estimates)
                            ok = got["term"].tolist() == ["Intercept", "mean_radius"] and all(
                                abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(estimates, reference_glm[0])
                            )
                        else:
                            ok = False  # the refusal must not be answered
                        if not ok:
                            with lock:
                                unexpected.append(f"{kind}: wrong answer {got.to_dict('list')}")
                    except adbc_driver_manager.Error as e:
                        elapsed = time.perf_counter() - started
                        message = str(e)
                        if kind != "refusal" or ("PERMISSION_DENIED" not in message and "Permission" not in message):
                            with lock:
                                unexpected.append(f"{kind}: {message}")
                        elif "rule" not in message:
                            with lock:
                                unexpected.append(f"refusal without its rule: {message}")
                    with lock:
                        latencies[kind].append(elapsed)
                        peak_rss[0] = max(peak_rss[0], rss_kib(proc.pid))
        except Exception as e:  # noqa: BLE001
            with lock:
                unexpected.append(f"client {index}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    assert unexpected == [], unexpected[:10]
    total = sum(map(len, latencies.values()))
    for kind, values in latencies.items():
        assert values, f"no {kind} query ran"
        values.sort()
        p50 = statistics.median(values)
        p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
        report(request, f"load: {kind}: {len(values)} queries, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    report(
        request,
        f"load: {CLIENTS} clients, {SECONDS:.0f} s: {total} queries ({total / SECONDS:.0f}/s), 0 unexpected errors; "
        f"railyard local RSS {start_rss // 1024} MiB before, peak {peak_rss[0] // 1024} MiB",
    )
    assert proc.poll() is None


def test_clients_that_leave_mid_stream_leave_no_memory_behind(federation, request):
    proc, url = federation

    def leave_mid_stream():
        researcher = f"leaver-{uuid.uuid4().hex[:8]}"
        with flightsql.connect(url, db_kwargs={HEADER: researcher}, autocommit=True) as conn:
            cur = conn.cursor()
            cur.execute(LONG_STREAM)
            reader = cur.fetch_record_batch()
            first = reader.read_next_batch()
            assert first.num_rows > 0
            # The connection closes with most of the stream unread.

    for _ in range(3):
        leave_mid_stream()
    settled = rss_kib(proc.pid)
    for _ in range(20):
        leave_mid_stream()
    time.sleep(1)
    after = rss_kib(proc.pid)
    report(request, f"load: 20 clients left a 100M-row stream after one batch: RSS {settled // 1024} -> {after // 1024} MiB")
    # One buffered answer alone would be 800 MB; twenty would be 16 GB.
    assert after - settled < 256 * 1024, f"RSS grew from {settled} KiB to {after} KiB"
    # The federation still answers.
    with flightsql.connect(url, db_kwargs={HEADER: "after-leavers"}, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(AGGREGATE)
        assert cur.fetch_arrow_table().num_rows == 2
