"""A deployed collaboration, as docs/deployment.md sets it up: `railyard certs`, a hub and
three stations as separate processes with mutual TLS on loopback (one station on PostgreSQL,
one in outbound mode), researchers with bearer tokens, queried through ADBC over TLS."""

import os
import pathlib
import secrets
import shutil
import subprocess
import time

import pandas as pd
import pyarrow.flight as flight
import pytest

from conftest import DATA, REPO, railyard_binary

adbc = pytest.importorskip("adbc_driver_flightsql.dbapi")
from adbc_driver_flightsql import DatabaseOptions  # noqa: E402
from adbc_driver_manager import AdbcStatusCode  # noqa: E402

LUNG = DATA / "lung" / "horizontal"
BREAST = DATA / "breast_cancer" / "horizontal" / "parquet"
# The open test policy (every column public, k = 1, so answers equal pandas exactly), plus
# differential privacy with a small budget, to see whose budget a query spends.
POLICY = (REPO / "tests" / "policies" / "open.toml").read_text() + """
[dp]
budget = 1.0
max_epsilon = 1.0
epsilon = 0.5

[tables.lung.dp]
sex = { keys = [1, 2] }
"""


def railyard(*args, cwd=None, check=True):
    done = subprocess.run(
        [str(railyard_binary()), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    if check and done.returncode != 0:
        pytest.fail(f"railyard {' '.join(map(str, args))} failed: {done.stderr}")
    return done


class Process:
    """A railyard daemon whose stdout lines announce what it listens on."""

    def __init__(self, name, args, log_dir):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            [str(railyard_binary()), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            text=True,
            env={**os.environ, "RAILYARD_LOG": "info"},
        )

    def expect(self, prefix):
        line = self.proc.stdout.readline().strip()
        if not line.startswith(prefix):
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.name}: expected {prefix!r}, got {line!r}; log:\n{self.log.read_text()}")
        return line[len(prefix):]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write(path, text):
    path.write_text(text)
    return path


def station_config(tmp, name, mode, tables):
    return write(
        tmp / f"{name}.toml",
        f"""
name = "{name}"
data_dir = "state/{name}"
policy = "policy.toml"
{mode}

[tls]
ca = "certs/ca.pem"
cert = "certs/{name}.pem"
key = "certs/{name}.key"

{tables}
""",
    )


def hub_config(path, body, *, tunnel=None, wait=30, ca="certs/ca.pem", cert="certs/hub"):
    """Writes a hub.toml: the listeners, state and TLS files every test hub has, then `body`
    (its stations and collaborations)."""
    tunnel_line = f'tunnel_listen = "{tunnel}"' if tunnel else ""
    return write(
        path,
        f"""
listen = "127.0.0.1:0"
{tunnel_line}
data_dir = "state/{path.stem}"
station_wait_seconds = {wait}

[tls]
ca = "{ca}"
cert = "{cert}.pem"
key = "{cert}.key"
{body}""",
    )


def load_postgres(connection, csv):
    """The lung station's CSV as a PostgreSQL table in a fresh schema; returns its name."""
    psql = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"
    schema = f"deploy_{secrets.token_hex(6)}"
    header = csv.read_text().splitlines()[0].split(",")
    columns = ", ".join(f"{c} bigint" for c in header)
    script = (
        f"CREATE SCHEMA {schema};\n"
        f"CREATE TABLE {schema}.lung ({columns});\n"
        f"\\copy {schema}.lung FROM '{csv}' WITH (FORMAT csv, HEADER true)\n"
    )
    subprocess.run([psql, connection, "-v", "ON_ERROR_STOP=1", "-q"], input=script, text=True, check=True)
    return f"{schema}.lung"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    connection = os.environ.get("RAILYARD_TEST_POSTGRES")
    if not connection:
        pytest.fail("RAILYARD_TEST_POSTGRES is not set: run `export RAILYARD_TEST_POSTGRES=\"$(scripts/postgres)\"`")
    tmp = tmp_path_factory.mktemp("deploy")
    write(tmp / "policy.toml", POLICY)
    certs = tmp / "certs"
    railyard("certs", "init", "--dir", certs, "--collaboration", "lung-study")
    railyard("certs", "issue", "--dir", certs, "--name", "hub", "--host", "127.0.0.1", "--host", "localhost")
    for name in ["amsterdam", "leiden", "utrecht"]:
        railyard("certs", "issue", "--dir", certs, "--name", name, "--host", "127.0.0.1")
    processes = []

    def start(name, args):
        p = Process(name, args, tmp)
        processes.append(p)
        return p

    # amsterdam: Parquet, listening; also holds a table of another collaboration.
    amsterdam = start(
        "amsterdam",
        [
            "station",
            "--config",
            station_config(
                tmp,
                "amsterdam",
                'listen = "127.0.0.1:0"',
                f"""
[[tables]]
name = "lung"
path = "{LUNG / 'parquet' / 'station_a.parquet'}"

[[tables]]
name = "breast_cancer"
path = "{BREAST / 'station_a.parquet'}"
""",
            ),
        ],
    )
    # leiden: PostgreSQL, listening.
    relation = load_postgres(connection, LUNG / "csv" / "station_b.csv")
    leiden = start(
        "leiden",
        [
            "station",
            "--config",
            station_config(
                tmp,
                "leiden",
                'listen = "127.0.0.1:0"',
                f"""
[[tables]]
name = "lung"
postgres = "{connection}"
relation = "{relation}"
""",
            ),
        ],
    )
    addresses = {
        "amsterdam": amsterdam.expect("station amsterdam listening on "),
        "leiden": leiden.expect("station leiden listening on "),
    }
    config = hub_config(
        tmp / "hub.toml",
        f"""
[[stations]]
name = "amsterdam"
address = "{addresses['amsterdam']}"

[[stations]]
name = "leiden"
address = "{addresses['leiden']}"

[[stations]]
name = "utrecht"
outbound = true

[collaborations.lung]
stations = ["amsterdam", "leiden", "utrecht"]
tables = ["lung"]
researchers = ["alice", "dave"]

[collaborations.breast]
stations = ["amsterdam"]
tables = ["breast_cancer"]
researchers = ["bob"]
""",
        tunnel="127.0.0.1:0",
    )
    hub = start("hub", ["hub", "--config", config])
    tunnel = hub.expect("hub tunnel listening on ")
    # utrecht: Parquet, outbound only (it opens no port).
    start(
        "utrecht",
        [
            "station",
            "--config",
            station_config(
                tmp,
                "utrecht",
                f'hub = "{tunnel}"',
                f"""
[[tables]]
name = "lung"
path = "{LUNG / 'parquet' / 'station_c.parquet'}"
""",
            ),
        ],
    ).expect("station utrecht dialing the hub at ")
    url = hub.expect("hub listening on ")

    def token(researcher, collaboration, expires="1d"):
        done = railyard(
            "token", "create", "--config", config, "--researcher", researcher,
            "--collaboration", collaboration, "--expires-in", expires,
        )
        return done.stdout.strip()

    yield {
        "tmp": tmp,
        "url": url,
        "tunnel": tunnel,
        "ca": (certs / "ca.pem").read_text(),
        "hub_config": config,
        "stations": addresses,
        "token": token,
    }
    for p in reversed(processes):
        p.stop()


def connect(deployment, token):
    kwargs = {DatabaseOptions.TLS_ROOT_CERTS.value: deployment["ca"]}
    if token is not None:
        kwargs[DatabaseOptions.AUTHORIZATION_HEADER.value] = f"Bearer {token}"
    return adbc.connect(deployment["url"], db_kwargs=kwargs)


def query(deployment, token, sql):
    with connect(deployment, token) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table().to_pandas()


def pooled_lung():
    return pd.concat(pd.read_csv(LUNG / "csv" / f"station_{s}.csv") for s in "abc")


def test_a_researcher_queries_all_three_stations_over_tls_with_a_token(deployment):
    alice = deployment["token"]("alice", "lung")
    got = query(
        deployment,
        alice,
        "SELECT sex, count(*) AS n, avg(age) AS age, sum(time) AS t FROM lung GROUP BY sex ORDER BY sex",
    )
    lung = pooled_lung()
    want = lung.groupby("sex").agg(n=("age", "size"), age=("age", "mean"), t=("time", "sum")).reset_index()
    assert list(got["sex"]) == list(want["sex"])
    assert list(got["n"]) == list(want["n"])
    assert sum(got["n"]) == 228  # every station, the outbound and the PostgreSQL one included
    assert list(got["t"]) == list(want["t"])
    assert got["age"].round(10).tolist() == want["age"].round(10).tolist()

    # A filter (pushed into PostgreSQL at leiden) and row-level columns the policy makes public.
    got = query(deployment, alice, "SELECT patient_id, age FROM lung WHERE age >= 75 ORDER BY patient_id")
    want = lung[lung["age"] >= 75].sort_values("patient_id")
    assert got["patient_id"].tolist() == want["patient_id"].tolist()
    assert got["age"].tolist() == want["age"].tolist()

    # Every station, the outbound one too, learned who asked (its audit log names alice).
    import json

    for station in ["amsterdam", "leiden", "utrecht"]:
        log = deployment["tmp"] / "state" / station / "audit.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert any(r["researcher"] == "alice" and r["decision"] == "allowed" for r in records), records


def test_each_researcher_spends_their_own_privacy_budget_at_every_station(deployment):
    """The stations learn who asks from the authenticated hub, so a researcher cannot spend
    (or start afresh) a budget under another name."""
    alice = deployment["token"]("alice", "lung")
    dave = deployment["token"]("dave", "lung")
    dp = "SELECT sex, dp_count(*) AS n FROM lung GROUP BY sex ORDER BY sex"

    def spent(token):
        budget = query(deployment, token, "SELECT station, spent FROM railyard.budget ORDER BY station")
        return dict(zip(budget["station"], budget["spent"]))

    for _ in range(2):  # 2 x 0.5 of a budget of 1.0 at each station
        got = query(deployment, alice, dp)
        assert got["sex"].tolist() == [1, 2]
    assert spent(alice) == {"amsterdam": 1.0, "leiden": 1.0, "utrecht": 1.0}
    with pytest.raises(Exception) as failure:
        query(deployment, alice, dp)
    assert "dp_budget" in str(failure.value)
    # Dave's budget is his own, untouched by alice's queries.
    assert spent(dave) == {"amsterdam": 0.0, "leiden": 0.0, "utrecht": 0.0}
    assert query(deployment, dave, dp)["sex"].tolist() == [1, 2]
    assert spent(dave) == {"amsterdam": 0.5, "leiden": 0.5, "utrecht": 0.5}


def test_railyard_sql_speaks_tls_with_a_token(deployment):
    alice = deployment["token"]("alice", "lung")
    ca = deployment["tmp"] / "certs" / "ca.pem"
    sql = "SELECT count(*) AS n FROM lung WHERE sex = 2"
    done = subprocess.run(
        [str(railyard_binary()), "sql", "--hub", deployment["url"], "--ca", str(ca), "--format", "csv", sql],
        capture_output=True, text=True, timeout=60, env={**os.environ, "RAILYARD_TOKEN": alice},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["n", str((pooled_lung()["sex"] == 2).sum())]
    # Without the CA, or without a token, it fails and says why.
    done = railyard("sql", "--hub", deployment["url"], sql, check=False)
    assert done.returncode != 0 and "--ca" in done.stderr
    done = railyard("sql", "--hub", deployment["url"], "--ca", ca, sql, check=False)
    assert done.returncode != 0 and "Unauthenticated" in done.stderr, done.stderr


def assert_unauthenticated(deployment, token):
    with pytest.raises(Exception) as failure:
        query(deployment, token, "SELECT count(*) FROM lung")
    status = getattr(failure.value, "status_code", None)
    assert status == AdbcStatusCode.UNAUTHENTICATED or "Unauthenticated" in str(failure.value), failure.value
    return str(failure.value)


def test_missing_wrong_expired_and_revoked_tokens_are_unauthenticated(deployment):
    assert "bearer token" in assert_unauthenticated(deployment, None)
    assert "not known" in assert_unauthenticated(deployment, "ryt_0000_" + "0" * 64)
    assert "not a Railyard token" in assert_unauthenticated(deployment, "hunter2")
    real = deployment["token"]("alice", "lung")
    forged = real[: real.rindex("_") + 1] + "f" * 64
    assert "not known" in assert_unauthenticated(deployment, forged)

    expired = deployment["token"]("alice", "lung", expires="1s")
    time.sleep(2.1)
    assert "expired" in assert_unauthenticated(deployment, expired)

    revoked = deployment["token"]("alice", "lung")
    assert query(deployment, revoked, "SELECT count(*) AS n FROM lung")["n"][0] == 228
    token_id = revoked.split("_")[1]
    railyard("token", "revoke", "--config", deployment["hub_config"], token_id)
    assert "revoked" in assert_unauthenticated(deployment, revoked)
    listed = railyard("token", "list", "--config", deployment["hub_config"]).stdout
    assert token_id in listed and real not in listed  # ids are listed, secrets never


def test_a_token_is_only_issued_to_a_member(deployment):
    done = railyard(
        "token", "create", "--config", deployment["hub_config"], "--researcher", "mallory",
        "--collaboration", "lung", check=False,
    )
    assert done.returncode != 0 and "mallory" in done.stderr


def test_a_researcher_sees_only_their_collaboration(deployment):
    alice = deployment["token"]("alice", "lung")
    bob = deployment["token"]("bob", "breast")
    with pytest.raises(Exception) as failure:
        query(deployment, alice, "SELECT count(*) FROM breast_cancer")
    assert "breast_cancer" in str(failure.value)
    with pytest.raises(Exception):
        query(deployment, bob, "SELECT count(*) FROM lung")
    n = query(deployment, bob, "SELECT count(*) AS n FROM breast_cancer")["n"][0]
    assert n == len(pd.read_parquet(BREAST / "station_a.parquet"))
    # The catalog a client browses is the collaboration's too.
    with connect(deployment, alice) as conn:
        tables = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    names = {t["table_name"] for c in tables for s in c["catalog_db_schemas"] or [] for t in s["db_schema_tables"] or []}
    assert "lung" in names and "breast_cancer" not in names


def test_plaintext_connections_fail(deployment):
    addresses = [
        deployment["stations"]["amsterdam"],
        deployment["stations"]["leiden"],
        deployment["tunnel"],
        deployment["url"].removeprefix("grpc+tls://"),
    ]
    for address in addresses:
        client = flight.connect(f"grpc://{address}")
        with pytest.raises(flight.FlightError):
            list(client.list_flights())
        client.close()


def test_a_station_refuses_a_hub_from_another_ca_and_the_hub_a_station_it_does_not_know(deployment):
    tmp = deployment["tmp"]
    other = tmp / "other-certs"
    railyard("certs", "init", "--dir", other, "--collaboration", "impostor")
    railyard("certs", "issue", "--dir", other, "--name", "hub", "--host", "127.0.0.1")
    shutil.copy(tmp / "certs" / "ca.pem", other / "their-ca.pem")

    def run_hub(name, ca, cert, station, address):
        config = hub_config(
            tmp / f"{name}.toml",
            f"""
[[stations]]
name = "{station}"
address = "{address}"

[collaborations.c]
stations = ["{station}"]
tables = ["lung"]
""",
            wait=2,
            ca=ca,
            cert=cert,
        )
        return railyard("hub", "--config", config, check=False)

    # A hub whose certificate comes from another CA (it trusts the right CA itself).
    done = run_hub("impostor", other / "their-ca.pem", other / "hub", "amsterdam", deployment["stations"]["amsterdam"])
    assert done.returncode != 0
    assert "amsterdam" in done.stderr and "unreachable" in done.stderr, done.stderr

    # The right CA, and a certificate that lists "hub" as a host name, but names another
    # party: a station's certificate cannot pass for the hub's.
    railyard("certs", "issue", "--dir", tmp / "certs", "--name", "rogue", "--host", "hub")
    done = run_hub("rogue", tmp / "certs" / "ca.pem", tmp / "certs" / "rogue", "amsterdam", deployment["stations"]["amsterdam"])
    assert done.returncode != 0
    assert "amsterdam" in done.stderr and "unreachable" in done.stderr, done.stderr

    # The right CA, but the station at that address is leiden, not amsterdam.
    certs = tmp / "certs"
    done = run_hub("confused", certs / "ca.pem", certs / "hub", "amsterdam", deployment["stations"]["leiden"])
    assert done.returncode != 0
    assert "amsterdam" in done.stderr and "certificate" in done.stderr.lower(), done.stderr


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_outbound_station_dials_again_when_the_hub_restarts(deployment):
    """Kill the hub outright; a new hub process on the same tunnel port gets the station
    back without anyone touching the hospital's side."""
    tmp = deployment["tmp"] / "restart"
    tmp.mkdir()
    (tmp / "certs").symlink_to(deployment["tmp"] / "certs")
    write(tmp / "policy.toml", POLICY)
    tunnel = f"127.0.0.1:{free_port()}"
    config = hub_config(
        tmp / "hub.toml",
        """
[[stations]]
name = "utrecht"
outbound = true

[collaborations.lung]
stations = ["utrecht"]
tables = ["lung"]
researchers = ["carol"]
""",
        tunnel=tunnel,
    )
    station = Process(
        "utrecht-restart",
        [
            "station",
            "--config",
            station_config(
                tmp,
                "utrecht",
                f'hub = "{tunnel}"',
                f"""
[[tables]]
name = "lung"
path = "{LUNG / 'parquet' / 'station_c.parquet'}"
""",
            ),
        ],
        tmp,
    )
    hubs = []
    try:
        # The station starts first and keeps dialing until the hub is there.
        station.expect("station utrecht dialing the hub at ")
        token = railyard(
            "token", "create", "--config", config, "--researcher", "carol", "--collaboration", "lung"
        ).stdout.strip()
        want = len(pd.read_parquet(LUNG / "parquet" / "station_c.parquet"))
        for _ in range(2):
            hub = Process(f"hub-restart-{len(hubs)}", ["hub", "--config", config], tmp)
            hubs.append(hub)
            hub.expect("hub tunnel listening on ")
            url = hub.expect("hub listening on ")
            got = query({**deployment, "url": url}, token, "SELECT count(*) AS n FROM lung")
            assert got["n"][0] == want
            hub.proc.kill()  # no goodbye: the station must notice on its own
            hub.proc.wait()
    finally:
        for p in hubs + [station]:
            p.stop()
