"""A deployed collaboration, as docs/deployment.md sets it up: `railyard certs`, a hub and
three stations as separate processes with mutual TLS on loopback (one station on PostgreSQL,
one in outbound mode), researchers with bearer tokens, queried through ADBC over TLS; and a
vertical table linked across the three with a collaboration secret only the stations hold."""

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
VERTICAL = DATA / "breast_cancer" / "vertical"
# The open test policy (every column public, k = 1, so answers equal pandas exactly), plus
# differential privacy with a small budget, to see whose budget a query spends.
POLICY = (REPO / "tests" / "policies" / "open.toml").read_text() + """
[dp]
budget = 1.0
max_epsilon = 1.0
epsilon = 0.5

[tables.lung.dp]
sex = { keys = [1, 2] }

# The vertical table's opt-in: its key leaves only as a pseudonym keyed by the secret.
[tables.breast_vertical]
allow_vertical = true
[tables.breast_vertical.columns]
patient_id = "join_key"
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


def station_config(tmp, name, mode, tables, secret=None):
    secret_line = f'collaboration_secret_file = "{secret}"' if secret else ""
    return write(
        tmp / f"{name}.toml",
        f"""
name = "{name}"
data_dir = "state/{name}"
policy = "policy.toml"
{mode}
{secret_line}

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


def load_postgres(connection, csv, table="lung", floats=False):
    """A station's CSV as a PostgreSQL table in a fresh schema; returns its name. Columns are
    bigint, or with `floats` double precision but for the patient_id."""
    psql = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"
    schema = f"deploy_{secrets.token_hex(6)}"
    header = csv.read_text().splitlines()[0].split(",")
    columns = ", ".join(
        f"{c} {'double precision' if floats and c != 'patient_id' else 'bigint'}" for c in header
    )
    script = (
        f"CREATE SCHEMA {schema};\n"
        f"CREATE TABLE {schema}.{table} ({columns});\n"
        f"\\copy {schema}.{table} FROM '{csv}' WITH (FORMAT csv, HEADER true)\n"
    )
    subprocess.run([psql, connection, "-v", "ON_ERROR_STOP=1", "-q"], input=script, text=True, check=True)
    return f"{schema}.{table}"


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
    # The stations' shared secret for the vertical table; the hub's configuration never
    # names it. (On one machine the three stations read one file; in a real deployment
    # each operator keeps a copy.)
    secret = tmp / "stations" / "linkage.secret"
    secret.parent.mkdir()
    railyard("secret", "init", "--collaboration", "linkage", "--out", secret)
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

[[tables]]
name = "breast_vertical"
path = "{VERTICAL / 'parquet' / 'station_a.parquet'}"
""",
                secret=secret,
            ),
        ],
    )
    # leiden: PostgreSQL, listening.
    relation = load_postgres(connection, LUNG / "csv" / "station_b.csv")
    vertical = load_postgres(connection, VERTICAL / "csv" / "station_b.csv", "breast_vertical", floats=True)
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

[[tables]]
name = "breast_vertical"
postgres = "{connection}"
relation = "{vertical}"
""",
                secret=secret,
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

[collaborations.linkage]
stations = ["amsterdam", "leiden", "utrecht"]
researchers = ["erin"]

[[collaborations.linkage.vertical]]
name = "breast_vertical"
key = "patient_id"
members = ["amsterdam", "leiden", "utrecht"]
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

[[tables]]
name = "breast_vertical"
path = "{VERTICAL / 'parquet' / 'station_c.parquet'}"
""",
                secret=secret,
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
        "secret": secret,
        "processes": processes,
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


def pooled_vertical():
    parts = [pd.read_csv(VERTICAL / "csv" / f"station_{s}.csv") for s in "abc"]
    joined = parts[0]
    for part in parts[1:]:
        joined = joined.merge(part, on="patient_id", how="inner")
    return joined


def test_a_vertical_table_links_a_postgresql_and_an_outbound_station(deployment):
    """The linkage the project exists for, deployed: three stations each hold other columns
    of the same patients (leiden in PostgreSQL, utrecht behind a firewall); the hub joins
    their pseudonymized rows without ever holding the key that makes the pseudonyms."""
    erin = deployment["token"]("erin", "linkage")
    got = query(
        deployment,
        erin,
        "SELECT diagnosis, count(*) AS n, avg(mean_radius) AS r, avg(radius_error) AS e, "
        "avg(worst_area) AS w FROM breast_vertical WHERE worst_texture > 20 "
        "GROUP BY diagnosis ORDER BY diagnosis",
    )
    joined = pooled_vertical()
    want = (
        joined[joined["worst_texture"] > 20]
        .groupby("diagnosis")
        .agg(n=("mean_radius", "size"), r=("mean_radius", "mean"), e=("radius_error", "mean"), w=("worst_area", "mean"))
        .reset_index()
    )
    assert got["diagnosis"].tolist() == want["diagnosis"].tolist()
    assert got["n"].tolist() == want["n"].tolist()
    for column in ["r", "e", "w"]:
        assert got[column].tolist() == pytest.approx(want[column].tolist(), rel=1e-12), column
    assert query(deployment, erin, "SELECT count(*) AS n FROM breast_vertical")["n"][0] == len(joined)

    # The key is no column of the joined table, and joined rows never leave the hub.
    for sql in ["SELECT patient_id FROM breast_vertical", "SELECT mean_radius FROM breast_vertical"]:
        with pytest.raises(Exception):
            query(deployment, erin, sql)
    # Another collaboration's researcher does not see the table.
    with pytest.raises(Exception) as failure:
        query(deployment, deployment["token"]("alice", "lung"), "SELECT count(*) FROM breast_vertical")
    assert "breast_vertical" in str(failure.value)

    # Every member, the PostgreSQL and the outbound one included, logged erin's pseudonymized
    # release; the join station at the hub logged its own; every log verifies.
    import json

    tmp = deployment["tmp"]
    join_log = tmp / "state" / "hub" / "collaborations" / "linkage" / "breast_vertical-join" / "audit.jsonl"
    for log in [tmp / "state" / s / "audit.jsonl" for s in ["amsterdam", "leiden", "utrecht"]] + [join_log]:
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert any(r["researcher"] == "erin" and r["decision"] == "allowed" for r in records), log
        railyard("audit", "verify", log)

    # The hub holds no copy of the secret: nothing under its state or its configuration.
    key = deployment["secret"].read_text().splitlines()[-1]
    hub_files = [deployment["hub_config"], *(tmp / "state" / "hub").rglob("*")]
    for f in hub_files:
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f


def test_a_collaboration_secret_is_never_replaced_and_must_stay_private(deployment):
    tmp = deployment["tmp"]
    secret = deployment["secret"]
    before = secret.read_text()
    done = railyard("secret", "init", "--collaboration", "linkage", "--out", secret, check=False)
    assert done.returncode != 0 and "never replaced" in done.stderr, done.stderr
    assert secret.read_text() == before
    assert secret.stat().st_mode & 0o777 == 0o600

    # A station refuses to start with a secret others may read, and says how to fix it
    # (without printing the secret).
    loose = tmp / "stations" / "loose.secret"
    loose.write_text(before)
    loose.chmod(0o644)
    config = station_config(
        tmp,
        "amsterdam-loose",
        'listen = "127.0.0.1:0"',
        f"""
[[tables]]
name = "breast_vertical"
path = "{VERTICAL / 'parquet' / 'station_a.parquet'}"
""",
        secret=loose,
    )
    done = railyard("station", "--config", config, check=False)
    assert done.returncode != 0
    assert "chmod 600" in done.stderr and "collaboration_secret_file" in done.stderr, done.stderr
    assert before.splitlines()[-1] not in done.stderr


def test_railyard_stations_shows_each_station_online_with_its_versions(deployment):
    alice = deployment["token"]("alice", "lung")
    got = query(deployment, alice, "SELECT * FROM railyard.stations ORDER BY station")
    assert got["station"].tolist() == ["amsterdam", "leiden", "utrecht"]
    assert got["online"].tolist() == [True, True, True]
    assert got["last_seen"].notna().all()
    # Only this collaboration's tables are named.
    assert got["tables"].tolist() == ["lung", "lung", "lung"]
    assert got["software_version"].notna().all() and got["policy_version"].notna().all()


def hub_process(deployment):
    return next(p for p in deployment["processes"] if p.name == "hub")


def wait_until(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_researcher_removed_from_hub_toml_is_refused_after_sighup(deployment):
    """Runs last among the fixture's tests: it rewrites hub.toml (and puts it back)."""
    import signal

    config = deployment["hub_config"]
    original = config.read_text()
    dave = deployment["token"]("dave", "lung")
    assert query(deployment, dave, "SELECT count(*) AS n FROM lung")["n"][0] == 228
    hub = hub_process(deployment)
    try:
        config.write_text(original.replace('researchers = ["alice", "dave"]', 'researchers = ["alice"]'))
        hub.proc.send_signal(signal.SIGHUP)

        def refused():
            try:
                query(deployment, dave, "SELECT count(*) AS n FROM lung")
                return False
            except Exception as e:  # noqa: BLE001
                return "not a member" in str(e)

        assert wait_until(refused), "dave was still answered after the reload"
        # Alice is unaffected; so is a file that does not load (the hub keeps running).
        alice = deployment["token"]("alice", "lung")
        assert query(deployment, alice, "SELECT count(*) AS n FROM lung")["n"][0] == 228
        config.write_text("this is not toml [")
        hub.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert query(deployment, alice, "SELECT count(*) AS n FROM lung")["n"][0] == 228
        assert hub.proc.poll() is None
    finally:
        config.write_text(original)
        hub.proc.send_signal(signal.SIGHUP)

    def answered():
        try:
            return query(deployment, dave, "SELECT count(*) AS n FROM lung")["n"][0] == 228
        except Exception:  # noqa: BLE001
            return False

    assert wait_until(answered), "dave was not answered again after hub.toml was restored"


def test_an_offline_station_fails_its_queries_at_once_and_no_others(deployment):
    """Runs last: it stops leiden for good."""
    alice = deployment["token"]("alice", "lung")
    bob = deployment["token"]("bob", "breast")
    leiden = next(p for p in deployment["processes"] if p.name == "leiden")
    leiden.proc.kill()
    leiden.proc.wait()

    def offline():
        try:
            query(deployment, alice, "SELECT count(*) AS n FROM lung")
            return False
        except Exception as e:  # noqa: BLE001
            return "leiden" in str(e) and "offline" in str(e)

    # The hub notices within its station_check_seconds (5 s by default).
    assert wait_until(offline), "a query over lung did not fail naming leiden as offline"
    got = query(deployment, alice, "SELECT station, online FROM railyard.stations ORDER BY station")
    assert got["online"].tolist() == [True, False, True]
    # The failure is the board's (the "offline" error), not a timeout: it comes at once.
    # A collaboration without leiden is unaffected.
    n = query(deployment, bob, "SELECT count(*) AS n FROM breast_cancer")["n"][0]
    assert n == len(pd.read_parquet(BREAST / "station_a.parquet"))
