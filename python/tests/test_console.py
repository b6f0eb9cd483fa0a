"""The hub's HTTP front (the console's JSON API) against a real `railyard local`, over real
HTTP: every answer must equal the same query through ADBC Flight SQL (and pandas on the
pooled file), refusals must carry their rule and no value, downloads must hold the answer,
and requests that are not the console's own are refused."""

import csv
import io
import json
import urllib.error
import urllib.request

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, start_local, stop


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """`railyard local` under the stations' default policy; yields (hub URL, console URL)."""
    proc, url = start_local(tmp_path_factory.mktemp("console"), None)
    line = proc.stdout.readline().strip()
    prefix = "console at "
    assert line.startswith(prefix), line
    yield url, line[len(prefix):]
    stop(proc)


def call(console, path, body=None, headers=None):
    """(status, content type, bytes) of a request to the console."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(console.rstrip("/") + path, data=data, method="GET" if body is None else "POST")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def adbc(url, sql) -> pa.Table:
    with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()


SQL = "SELECT sex, count(*) AS patients, avg(age) AS mean_age FROM lung GROUP BY sex ORDER BY sex"


def test_the_page_and_its_assets_are_served(federation):
    _, console = federation
    status, kind, body = call(console, "/")
    assert status == 200 and kind.startswith("text/html")
    page = body.decode()
    assert '<textarea id="sql"' in page and 'src="/console.js"' in page
    for asset, kind_prefix in [("/console.js", "text/javascript"), ("/console.css", "text/css")]:
        status, kind, body = call(console, asset)
        assert status == 200 and kind.startswith(kind_prefix) and len(body) > 500


def test_a_query_answers_as_flight_sql_and_pandas(federation, lung):
    url, console = federation
    status, kind, body = call(console, "/api/query", {"sql": SQL})
    assert status == 200, body
    answer = json.loads(body)
    assert [c["name"] for c in answer["columns"]] == ["sex", "patients", "mean_age"]
    flight = adbc(url, SQL).to_pylist()
    assert answer["rows"] == [[r["sex"], r["patients"], r["mean_age"]] for r in flight]
    assert answer["row_count"] == 2 and answer["truncated"] is False
    want = lung.groupby("sex").agg(n=("age", "size"), age=("age", "mean"))
    assert [r[1] for r in answer["rows"]] == list(want["n"])
    assert [r[2] for r in answer["rows"]] == pytest.approx(list(want["age"]), rel=1e-12)


def test_downloads_hold_the_answer(federation):
    url, console = federation
    flight = adbc(url, SQL)
    status, kind, body = call(console, "/api/query?format=csv", {"sql": SQL})
    assert status == 200 and kind.startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [int(r["patients"]) for r in rows] == flight.column("patients").to_pylist()
    assert [float(r["mean_age"]) for r in rows] == pytest.approx(flight.column("mean_age").to_pylist(), rel=1e-12)
    status, kind, body = call(console, "/api/query?format=parquet", {"sql": SQL})
    assert status == 200
    assert pq.read_table(io.BytesIO(body)).select(["sex", "patients", "mean_age"]).to_pylist() == flight.to_pylist()
    status, kind, body = call(console, "/api/query?format=arrow", {"sql": SQL})
    assert status == 200
    assert pa.ipc.open_stream(body).read_all().to_pylist() == flight.to_pylist()
    # An answer without rows is still a CSV with its header.
    status, _, body = call(console, "/api/query?format=csv", {"sql": "SELECT sex, count(*) AS patients FROM lung WHERE age > 1000 GROUP BY sex"})
    assert status == 200 and body.decode().strip() == "sex,patients"
    status, _, body = call(console, "/api/query?format=xlsx", {"sql": "SELECT count(*) AS xlsx_probe FROM lung"})
    assert status == 400 and b"csv, parquet or arrow" in body
    # Refused before it ran: the history has no such query.
    history = json.loads(call(console, "/api/history")[2])["entries"]
    assert all("xlsx_probe" not in e["sql"] for e in history)


def test_a_refusal_names_its_rule_and_no_value(federation, lung):
    _, console = federation
    status, kind, body = call(console, "/api/query", {"sql": "SELECT age FROM lung WHERE age > 80"})
    assert status == 403 and kind.startswith("application/json")
    failure = json.loads(body)
    assert failure["rule"] == "row_level"
    assert "age" in failure["error"]
    for value in {str(int(a)) for a in lung.age[lung.age > 80]}:
        assert value not in failure["error"]
    status, _, body = call(console, "/api/query", {"sql": "SELEC 1"})
    assert status == 400 and "error" in json.loads(body)


def test_explain_catalog_stations_policies(federation):
    _, console = federation
    status, _, body = call(console, "/api/explain", {"sql": SQL})
    assert status == 200
    plan = json.loads(body)
    names = [c["name"] for c in plan["columns"]]
    locations = [r[names.index("location")] for r in plan["rows"]]
    assert locations == ["station_a", "station_b", "station_c", "hub"]
    status, _, body = call(console, "/api/catalog")
    tables = {t["name"]: t for t in json.loads(body)["tables"]}
    assert {"lung", "breast_cancer"} <= set(tables)
    assert "age" in [c["name"] for c in tables["lung"]["columns"]]
    status, _, body = call(console, "/api/stations")
    stations = json.loads(body)
    names = [c["name"] for c in stations["columns"]]
    assert sorted(r[names.index("station")] for r in stations["rows"]) == ["station_a", "station_b", "station_c"]
    assert all(r[names.index("online")] is True for r in stations["rows"])
    status, _, body = call(console, "/api/policies")
    assert status == 200 and json.loads(body)["row_count"] > 0
    status, _, body = call(console, "/api/budget")
    assert status == 200


def test_requests_that_are_not_the_consoles_own_are_refused(federation):
    _, console = federation
    # Another host name (a page rebinding its name to 127.0.0.1).
    status, _, body = call(console, "/api/catalog", headers={"Host": "attacker.example"})
    assert status == 403 and b"loopback" in body
    # A form post (what another site can send without a preflight) is not JSON.
    request = urllib.request.Request(console + "api/query", data=b"sql=SELECT+1", method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 415
    # A query is a POST.
    status, _, _ = call(console, "/api/query")
    assert status == 405


def test_the_console_refuses_a_non_loopback_address(tmp_path):
    import subprocess

    from conftest import DATA, railyard_binary

    proc = subprocess.run(
        [str(railyard_binary()), "local", "--listen", "127.0.0.1:0", "--console-listen", "0.0.0.0:0",
         "--data-dir", str(tmp_path), "--table", f"lung={DATA / 'lung' / 'horizontal' / 'csv'}"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "loopback" in proc.stderr


def test_the_demo_serves_its_federation_and_console_until_stopped(tmp_path):
    import signal
    import subprocess

    from conftest import railyard_binary

    proc = subprocess.Popen(
        [str(railyard_binary()), "demo", "--serve", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        hub = page = None
        for line in proc.stdout:
            if line.startswith("hub listening on "):
                hub = line.strip()[len("hub listening on "):]
            if line.startswith("console at "):
                page = line.strip()[len("console at "):]
                break
        assert hub and page, proc.stderr.read()
        # The demo's own tables, through the console and through Flight SQL alike.
        status, _, body = call(page, "/api/catalog")
        tables = {t["name"] for t in json.loads(body)["tables"]}
        sql = "SELECT count(*) AS n FROM " + sorted(t for t in tables if t in {"registry", "lung"})[0]
        status, _, body = call(page, "/api/query", {"sql": sql})
        assert status == 200, body
        assert json.loads(body)["rows"][0][0] == adbc(hub, sql).column("n")[0].as_py()
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()


def test_the_history_keeps_each_query_and_its_outcome_across_a_restart(tmp_path):
    proc, _ = start_local(tmp_path, None)
    page = proc.stdout.readline().strip()[len("console at "):]
    try:
        assert call(page, "/api/query", {"sql": "SELECT count(*) AS n_history FROM lung"})[0] == 200
        assert call(page, "/api/query", {"sql": "SELECT age AS history_age FROM lung"})[0] == 403
        entries = json.loads(call(page, "/api/history")[2])["entries"]
    finally:
        stop(proc)
    assert [e["sql"] for e in entries[:2]] == ["SELECT age AS history_age FROM lung", "SELECT count(*) AS n_history FROM lung"]
    assert entries[0]["outcome"] == "refused" and entries[0]["rule"] == "row_level"
    assert entries[1]["outcome"] == "answered" and entries[1]["rows"] == 1
    # The answer's values are not kept: only the SQL, the outcome and the row count.
    assert set(entries[1]) == {"at", "researcher", "sql", "outcome", "rows"}
    proc, _ = start_local(tmp_path, None)
    page = proc.stdout.readline().strip()[len("console at "):]
    try:
        again = json.loads(call(page, "/api/history")[2])["entries"]
    finally:
        stop(proc)
    assert again[:2] == entries[:2]
