"""Faults between real hosts: every party of a collaboration in its own container on a private
Docker network this module creates (the `railyard` test build, imported by scripts/build-image),
with mutual TLS: a hub, two listening stations (amsterdam, leiden) and one outbound station
(utrecht). The researchers' ADBC client runs here and reaches the hub's container address.

Each fault has a bounded deadline and a named error: a station killed with SIGKILL while
queries run, a station paused (`docker pause`), 200 ms latency and 5 % loss on a station's
link, and the hub killed and restarted while the outbound station reconnects. After each,
the queries that do not need the broken party succeed, the restarted party is used again, and
at the end every audit log verifies and every station's DP ledger and audit log agree: no
charge without its audit record, no released DP answer without its charge.

Latency and loss: `tc netem`, entered into the station container's network namespace with
`nsenter`, where the kernel has `sch_netem`; where it does not (this test says which it
used), the hub reaches that station through a delaying TCP proxy run by this test on the
network's gateway, which holds back the station's bytes by the latency and, for the loss
rate's share of its reads, by one more TCP retransmission timeout (what a lost segment costs
a TCP stream).
"""

import asyncio
import concurrent.futures
import json
import random
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid

import pandas as pd
import pytest

from conftest import DATA, REPO, railyard_binary

adbc = pytest.importorskip("adbc_driver_flightsql.dbapi")
from adbc_driver_flightsql import DatabaseOptions  # noqa: E402

LUNG = DATA / "lung" / "horizontal" / "parquet"
BREAST = DATA / "breast_cancer" / "horizontal" / "parquet"
IMAGE = "railyard/railyard:test"
STATIONS = ["amsterdam", "leiden", "utrecht"]
# What every query may take, the slowest fault included, before the test calls it hung:
# the hub's fragment timeout (8 s) plus the time to connect and plan.
DEADLINE = 30
# The open test policy (every column public, k = 1: answers equal pandas), and a DP budget
# large enough for the DP queries this module runs.
POLICY = (REPO / "tests" / "policies" / "open.toml").read_text() + """
[dp]
budget = 1000.0
max_epsilon = 1.0
epsilon = 0.01

[tables.lung.dp]
sex = { keys = [1, 2] }
"""
DP_QUERY = "SELECT sex, dp_count(*) AS n FROM lung GROUP BY sex ORDER BY sex"
COUNT_LUNG = "SELECT count(*) AS n FROM lung"
COUNT_BREAST = "SELECT count(*) AS n FROM breast_cancer"
GLM = "SELECT * FROM glm('lung', 'status ~ age + sex', 'binomial')"


def run(*args, check=True, timeout=120):
    done = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} failed: {done.stderr}{done.stdout}")
    return done


def docker(*args, check=True, timeout=120):
    return run("docker", *args, check=check, timeout=timeout)


def railyard(*args):
    return run(railyard_binary(), *args)


def netem_available():
    """Whether this kernel can add a netem qdisc (tried in a throwaway network namespace)."""
    if not shutil.which("tc") or not shutil.which("unshare"):
        return False
    done = subprocess.run(
        ["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        capture_output=True,
    )
    return done.returncode == 0


class DelayProxy:
    """A TCP proxy (run on an asyncio loop in a thread) that forwards to `target()` and holds
    back what comes from the target: by `delay` seconds, and for a `loss` share of reads by
    one more retransmission timeout. The order of bytes is kept."""

    RETRANSMISSION = 0.2  # Linux's minimum TCP retransmission timeout

    def __init__(self, host, target):
        self.target = target
        self.delay = 0.0
        self.loss = 0.0
        self.held_back = 0  # reads from the target that were delayed
        self.random = random.Random(7)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(host, ready), daemon=True)
        self.thread.start()
        assert ready.wait(10), "the delaying proxy did not start"

    def _serve(self, host, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._connection, host, 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _connection(self, reader, writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target())
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, upstream_writer, held=False),
            self._pipe(upstream_reader, writer, held=True),
            return_exceptions=True,
        )

    async def _pipe(self, reader, writer, held):
        queue = asyncio.Queue()

        async def send():
            try:
                while True:
                    due, data = await queue.get()
                    if data is None:
                        break
                    wait = due - self.loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        sender = asyncio.ensure_future(send())
        last = 0.0
        try:
            while data := await reader.read(65536):
                due = self.loop.time()
                if held and (self.delay or self.loss):
                    due += self.delay
                    if self.random.random() < self.loss:
                        due += self.RETRANSMISSION
                    self.held_back += 1
                last = due = max(due, last)
                queue.put_nowait((due, data))
        finally:
            queue.put_nowait((0.0, None))
            await asyncio.gather(sender, return_exceptions=True)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


def report(request, line):
    """A figure for the run's output (shown also when pytest captures output)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nfaults: {line}", flush=True)


def container_ip(name, network):
    return docker(
        "inspect", "--format", f'{{{{ (index .NetworkSettings.Networks "{network}").IPAddress }}}}', name
    ).stdout.strip()


def wait_for_log(name, text, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done = docker("logs", name, check=False)
        if text in done.stdout or text in done.stderr:
            return
        time.sleep(0.2)
    logs = docker("logs", name, check=False)
    pytest.fail(f"container {name} did not print {text!r} within {seconds} s:\n{logs.stdout}{logs.stderr}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("docker") is None or docker("info", check=False).returncode != 0:
        pytest.fail("the fault tests need a running Docker daemon")
    if not railyard_binary().exists():
        pytest.fail(f"{railyard_binary()} does not exist: build it with `cargo build`")
    run(REPO / "scripts" / "build-image", railyard_binary(), timeout=600)
    tmp = tmp_path_factory.mktemp("faults")
    tmp.chmod(0o755)
    run_id = uuid.uuid4().hex[:8]
    network = f"railyard-faults-{run_id}"
    names = {party: f"ry-{run_id}-{party}" for party in ["hub", *STATIONS]}
    (tmp / "policy.toml").write_text(POLICY)
    certs = tmp / "certs"
    railyard("certs", "init", "--dir", certs, "--collaboration", "faults")
    for party in ["hub", *STATIONS]:
        # Each party is reached at its container name on the network.
        railyard("certs", "issue", "--dir", certs, "--name", party, "--host", names[party])
    docker("network", "create", network)
    gateway = docker(
        "network", "inspect", "--format", "{{ (index .IPAM.Config 0).Gateway }}", network
    ).stdout.strip()
    netem = netem_available()
    proxy = None
    if not netem:
        proxy = DelayProxy(gateway, lambda: (container_ip(names["amsterdam"], network), 7000))
    started = []

    def start(party, config):
        """Starts a party's container: the module's directory at the same path inside,
        the data read-only."""
        args = [
            "run", "-d", "--name", names[party], "--hostname", names[party],
            "--network", network, "--network-alias", names[party],
            "-v", f"{tmp}:{tmp}", "-v", f"{DATA}:{DATA}:ro", "-w", str(tmp),
            "-e", "RAILYARD_LOG=info", IMAGE,
        ]
        if party == "hub":
            args += ["hub", "--config", str(config)]
        else:
            args += ["station", "--config", str(config)]
        docker(*args)
        started.append(names[party])

    def station_config(name, mode):
        path = tmp / f"{name}.toml"
        path.write_text(f"""
name = "{name}"
data_dir = "{tmp}/state/{name}"
policy = "{tmp}/policy.toml"
{mode}

[tls]
ca = "{certs}/ca.pem"
cert = "{certs}/{name}.pem"
key = "{certs}/{name}.key"

[[tables]]
name = "lung"
path = "{LUNG / f'station_{"abc"[STATIONS.index(name)]}.parquet'}"

[[tables]]
name = "breast_cancer"
path = "{BREAST / f'station_{"abc"[STATIONS.index(name)]}.parquet'}"
""")
        return path

    for name in ["amsterdam", "leiden"]:
        start(name, station_config(name, 'listen = "0.0.0.0:7000"'))
    for name in ["amsterdam", "leiden"]:
        wait_for_log(names[name], f"station {name} listening on")
    amsterdam = f"{gateway}:{proxy.port}" if proxy else f"{names['amsterdam']}:7000"
    hub_toml = tmp / "hub.toml"
    hub_toml.write_text(f"""
listen = "0.0.0.0:7100"
tunnel_listen = "0.0.0.0:7200"
data_dir = "{tmp}/state/hub"
station_wait_seconds = 60
fragment_timeout_seconds = 8
station_check_seconds = 1

[tls]
ca = "{certs}/ca.pem"
cert = "{certs}/hub.pem"
key = "{certs}/hub.key"

[[stations]]
name = "amsterdam"
address = "{amsterdam}"

[[stations]]
name = "leiden"
address = "{names['leiden']}:7000"

[[stations]]
name = "utrecht"
outbound = true

# One researcher per collaboration (and per client): the stations' per-researcher limits
# refuse nothing here that they should not.
[collaborations.all]
stations = ["amsterdam", "leiden", "utrecht"]
tables = ["lung"]
researchers = ["ann", "dana", "gus"]

[collaborations.without_amsterdam]
stations = ["leiden", "utrecht"]
tables = ["breast_cancer"]
researchers = ["ben"]

[collaborations.without_leiden]
stations = ["amsterdam", "utrecht"]
tables = ["breast_cancer"]
researchers = ["cat"]
""")
    start("hub", hub_toml)
    wait_for_log(names["hub"], "hub tunnel listening on")
    start("utrecht", station_config("utrecht", f'hub = "{names["hub"]}:7200"'))
    wait_for_log(names["hub"], "hub listening on")
    hub_ip = container_ip(names["hub"], network)

    def token(researcher, collaboration):
        done = run(
            railyard_binary(), "token", "create", "--config", hub_toml, "--researcher", researcher,
            "--collaboration", collaboration, "--expires-in", "1d",
        )
        return done.stdout.strip()

    tokens = {
        "ann": token("ann", "all"),
        "dana": token("dana", "all"),
        "gus": token("gus", "all"),
        "ben": token("ben", "without_amsterdam"),
        "cat": token("cat", "without_leiden"),
    }
    yield {
        "tmp": tmp,
        "url": f"grpc+tls://{hub_ip}:7100",
        "ca": (certs / "ca.pem").read_text(),
        "names": names,
        "network": network,
        "tokens": tokens,
        "netem": netem,
        "proxy": proxy,
    }
    for name in started:
        logs = docker("logs", name, check=False)
        (tmp / f"{name}.log").write_text(logs.stdout + logs.stderr)
        docker("rm", "-f", name, check=False)
    docker("network", "rm", network, check=False)
    if proxy:
        proxy.close()


def query(cluster, researcher, sql):
    """Runs `sql` as `researcher`; fails the test if no answer (or error) comes within the
    deadline."""

    def ask():
        kwargs = {
            DatabaseOptions.TLS_ROOT_CERTS.value: cluster["ca"],
            DatabaseOptions.TLS_OVERRIDE_HOSTNAME.value: cluster["names"]["hub"],
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {cluster['tokens'][researcher]}",
        }
        with adbc.connect(cluster["url"], db_kwargs=kwargs) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table().to_pandas()

    # Not `with`: leaving it would wait for a hung call, which is what the deadline is for.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(ask).result(timeout=DEADLINE)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"{sql!r} as {researcher}: no answer and no error within {DEADLINE} s")
    finally:
        pool.shutdown(wait=False)


def failure(cluster, researcher, sql):
    """The error `sql` fails with (within the deadline)."""
    # A hang (pytest.fail) is not an Exception: it propagates.
    try:
        query(cluster, researcher, sql)
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


def wait_until(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return False


def answers_all_three(cluster, researcher="ann"):
    try:
        return query(cluster, researcher, COUNT_LUNG)["n"][0] == 228
    except Exception:  # noqa: BLE001
        return False


def breast_rows(*stations):
    return sum(len(pd.read_parquet(BREAST / f"station_{'abc'[STATIONS.index(s)]}.parquet")) for s in stations)


class Load:
    """Queries run in a loop by one researcher in a thread: what each ended with."""

    def __init__(self, cluster, researcher, sql):
        self.answers = 0
        self.errors = []
        self.stop = threading.Event()

        def loop():
            while not self.stop.is_set():
                try:
                    query(cluster, researcher, sql)
                    self.answers += 1
                except pytest.fail.Exception as e:
                    self.errors.append(f"hung: {e}")
                except Exception as e:  # noqa: BLE001
                    self.errors.append(str(e))

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def finish(self):
        self.stop.set()
        self.thread.join(DEADLINE + 5)
        assert not self.thread.is_alive()
        assert not [e for e in self.errors if e.startswith("hung")], self.errors
        return self


def test_a_query_reaches_all_three_containers(cluster):
    assert answers_all_three(cluster)
    assert query(cluster, "ben", COUNT_BREAST)["n"][0] == breast_rows("leiden", "utrecht")
    assert query(cluster, "cat", COUNT_BREAST)["n"][0] == breast_rows("amsterdam", "utrecht")
    got = query(cluster, "ann", "SELECT station, online FROM railyard.stations ORDER BY station")
    assert got["online"].tolist() == [True, True, True]


def test_a_station_killed_mid_query_fails_only_its_queries_and_is_used_again(cluster, request):
    names = cluster["names"]
    # Queries in flight at every moment: aggregates, a model (several rounds), DP releases.
    loads = [Load(cluster, "ann", COUNT_LUNG), Load(cluster, "gus", GLM), Load(cluster, "dana", DP_QUERY)]
    others = Load(cluster, "ben", COUNT_BREAST)
    time.sleep(2)
    docker("kill", "--signal", "KILL", names["amsterdam"])
    time.sleep(4)
    for load in loads:
        load.finish()
        # Every failure names the station that died; none is a hang.
        for error in load.errors:
            assert "amsterdam" in error, error
    others.finish()
    assert others.errors == [] and others.answers > 0
    assert any(load.errors for load in loads), "no query was in flight when amsterdam was killed"
    report(
        request,
        "amsterdam killed: "
        + ", ".join(f"{q}: {l.answers} answered, {len(l.errors)} failed naming it" for q, l in zip(["aggregate", "glm", "dp"], loads))
        + f"; without amsterdam: {others.answers} answered, 0 failed",
    )
    restarted = time.monotonic()
    error = failure(cluster, "ann", COUNT_LUNG)
    assert error and "amsterdam" in error and ("offline" in error or "unreachable" in error), error

    docker("start", names["amsterdam"])
    # The restarted station is used again (the hub reconnects; no hub restart).
    assert wait_until(lambda: answers_all_three(cluster)), "amsterdam was not used again after its restart"
    report(request, f"amsterdam restarted: used again {time.monotonic() - restarted:.1f} s after `docker start`")
    assert query(cluster, "dana", DP_QUERY)["sex"].tolist() == [1, 2]


def test_a_paused_station_fails_its_queries_within_the_deadline(cluster, request):
    names = cluster["names"]
    docker("pause", names["leiden"])
    try:
        started = time.monotonic()
        error = failure(cluster, "ann", COUNT_LUNG)
        assert error and "leiden" in error, error
        report(request, f"leiden paused: the first query failed after {time.monotonic() - started:.1f} s: {error[:160]}")
        # The hub's checks find it silent and mark it offline; others are unaffected.
        assert wait_until(lambda: "offline" in (failure(cluster, "ann", COUNT_LUNG) or ""), 30)
        assert query(cluster, "cat", COUNT_BREAST)["n"][0] == breast_rows("amsterdam", "utrecht")
        got = query(cluster, "ann", "SELECT station, online FROM railyard.stations ORDER BY station")
        assert got["online"].tolist() == [True, False, True]
    finally:
        docker("unpause", names["leiden"])
    assert wait_until(lambda: answers_all_three(cluster)), "leiden was not used again after unpause"


def test_latency_and_loss_on_a_station_link_slow_queries_but_change_no_answer(cluster, request):
    names = cluster["names"]
    proxy = cluster["proxy"]
    if cluster["netem"]:
        pid = docker("inspect", "--format", "{{ .State.Pid }}", names["amsterdam"]).stdout.strip()
        run("nsenter", "-t", pid, "-n", "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
            "delay", "200ms", "loss", "5%")
        shown = run("nsenter", "-t", pid, "-n", "tc", "qdisc", "show", "dev", "eth0").stdout
        assert "netem" in shown, shown
        report(request, "latency and loss by tc netem in amsterdam's network namespace")
    else:
        proxy.delay, proxy.loss = 0.2, 0.05
        report(request, "this kernel has no sch_netem: latency and loss by the test's delaying TCP proxy")
    try:
        started = time.monotonic()
        held_before = proxy.held_back if proxy else 0
        lung = pd.concat(pd.read_parquet(LUNG / f"station_{s}.parquet") for s in "abc")
        for _ in range(3):
            got = query(cluster, "ann", "SELECT sex, count(*) AS n, sum(time) AS t FROM lung GROUP BY sex ORDER BY sex")
            want = lung.groupby("sex").agg(n=("age", "size"), t=("time", "sum")).reset_index()
            assert got["n"].tolist() == want["n"].tolist()
            assert got["t"].tolist() == want["t"].tolist()
        assert query(cluster, "gus", GLM)["term"].tolist()[0] == "Intercept"
        if proxy:
            # The answers above came through the slowed link.
            assert proxy.held_back > held_before
        report(request, f"200 ms / 5 %: 3 aggregates and a GLM answered correctly in {time.monotonic() - started:.1f} s")
    finally:
        if cluster["netem"]:
            run("nsenter", "-t", pid, "-n", "tc", "qdisc", "del", "dev", "eth0", "root")
        else:
            proxy.delay, proxy.loss = 0.0, 0.0


def test_the_hub_killed_and_restarted_is_rejoined_by_the_outbound_station(cluster, request):
    names = cluster["names"]
    docker("kill", "--signal", "KILL", names["hub"])
    error = failure(cluster, "ann", COUNT_LUNG)
    assert error, "a killed hub answered"
    docker("start", names["hub"])
    started = time.monotonic()
    # Its address on the network may change with the restart.
    cluster["url"] = f"grpc+tls://{container_ip(names['hub'], cluster['network'])}:7100"
    # The restarted hub waits for its stations; the outbound one dials in again by itself.
    assert wait_until(lambda: answers_all_three(cluster), 90), "the restarted hub did not answer over all three"
    report(request, f"hub killed and restarted: answering over all three stations {time.monotonic() - started:.1f} s after `docker start`")
    assert query(cluster, "cat", COUNT_BREAST)["n"][0] == breast_rows("amsterdam", "utrecht")
    got = query(cluster, "ann", "SELECT station, online FROM railyard.stations ORDER BY station")
    assert got["online"].tolist() == [True, True, True]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_audit_log_verifies_and_every_ledger_agrees_with_its_audit_log(cluster, request):
    """Runs last: after every fault above (a station killed while DP queries ran included)."""
    names = cluster["names"]
    # Kill a station once more while DP queries run, and restart it: it reconciles at start.
    load = Load(cluster, "dana", DP_QUERY)
    time.sleep(1.5)
    docker("kill", "--signal", "KILL", names["leiden"])
    load.finish()
    docker("start", names["leiden"])
    assert wait_until(lambda: answers_all_three(cluster)), "leiden was not used again after its restart"
    answered = load.answers
    for station in STATIONS:
        state = cluster["tmp"] / "state" / station
        done = run(railyard_binary(), "audit", "verify", state / "audit.jsonl", check=False)
        assert done.returncode == 0, f"{station}: {done.stdout}{done.stderr}"
        audit = records(state / "audit.jsonl")
        with sqlite3.connect(f"file:{state / 'ledger.sqlite'}?mode=ro", uri=True) as ledger:
            charges = ledger.execute("SELECT query_id, fragment, epsilon FROM charges").fetchall()
        charged = {(q, f) for q, f, _ in charges}
        dp_records = [r for r in audit if r.get("epsilon") is not None]
        recorded = {(r["query_id"], r["fragment"]) for r in dp_records}
        # No charge without its audit record (a crash between the two gets a recovered one).
        assert charged <= recorded, f"{station}: charges without an audit record: {charged - recorded}"
        # No released DP answer without its charge.
        released = {(r["query_id"], r["fragment"]) for r in dp_records if r["decision"] == "allowed"}
        assert released <= charged, f"{station}: DP releases without a charge: {released - charged}"
        # Every DP answer a researcher received was released (and charged) at every station.
        assert len(released) >= answered, f"{station}: {len(released)} DP releases, {answered} answers"
        recovered = sum(1 for r in dp_records if r.get("rule") == "recovered")
        report(
            request,
            f"{station}: audit log verifies ({len(audit)} records); {len(charges)} ε charges, "
            f"{len(released)} DP releases, {recovered} recovered charge records",
        )
