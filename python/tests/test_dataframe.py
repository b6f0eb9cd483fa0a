"""Dataframes of the `railyard` package, compiled to Substrait by the `datafusion` package and
planned at a real hub, through the real ADBC Flight SQL driver.

A frame must answer exactly what the same SQL answers (and pandas on the pooled file), be
explained as the SQL is, and be refused, checked and audited at the stations as the SQL is.
The hub is also attacked with hand-made plans: too large, too deep, not Substrait, naming a
file instead of a table, carrying parameter values."""

import json

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import railyard
from railyard import col, count, count_distinct, lit, max, mean, min, stddev, sum

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


@pytest.fixture()
def conn(hub_url):
    with railyard.connect(hub_url) as connection:
        yield connection


def same(frame_table: pa.Table, sql_table: pa.Table):
    """The two answers hold the same columns (names and types, in order) and rows."""
    assert frame_table.schema.names == sql_table.schema.names
    assert [f.type for f in frame_table.schema] == [f.type for f in sql_table.schema]
    assert frame_table.to_pylist() == sql_table.to_pylist()


def test_a_grouped_frame_equals_the_same_sql_and_pandas(conn, lung):
    frame = (
        conn.table("lung")
        .filter(col("age") > 60)
        .group_by("sex")
        .agg(count(), mean("age"), min("time"), max("time"), sum("status"))
        .sort("sex")
    )
    assert frame.columns == ["sex", "count(*)", "avg(lung.age)", "min(lung.time)", "max(lung.time)", "sum(lung.status)"]
    got = frame.to_arrow()
    sql = conn.sql(
        "SELECT sex, count(*), avg(age), min(time), max(time), sum(status) FROM lung "
        "WHERE age > 60 GROUP BY sex ORDER BY sex"
    )
    same(got, sql)
    # pandas on the pooled file, independently.
    old = lung[lung.age > 60].groupby("sex")
    want = old.agg(n=("age", "size"), age=("age", "mean"), lo=("time", "min"), hi=("time", "max"), events=("status", "sum"))
    df = frame.to_pandas()
    assert list(df["sex"]) == list(want.index)
    assert list(df["count(*)"]) == list(want["n"])
    np.testing.assert_allclose(df["avg(lung.age)"], want["age"], rtol=1e-12)
    assert list(df["min(lung.time)"]) == list(want["lo"])
    assert list(df["max(lung.time)"]) == list(want["hi"])
    assert list(df["sum(lung.status)"]) == list(want["events"])
    # polars too.
    assert frame.to_polars()["count(*)"].to_list() == list(want["n"])


def test_more_frames_equal_their_sql(conn):
    lung = conn.table("lung")
    cases = [
        (
            lung.agg(count(), count_distinct("inst"), stddev("age")),
            "SELECT count(*), count(DISTINCT inst), stddev(age) FROM lung",
        ),
        (
            lung.filter((col("sex") == 2) & col("wt_loss").is_not_null())
            .select("time", "status", "age")
            .sort("time", "age", "status")
            .limit(7),
            "SELECT time, status, age FROM lung WHERE sex = 2 AND wt_loss IS NOT NULL "
            "ORDER BY time, age, status LIMIT 7",
        ),
        (
            lung.with_column("older", col("age") >= lit(65))
            .group_by("older", "sex")
            .agg(count(), mean("wt_loss"))
            .sort("older", "sex"),
            "SELECT age >= 65 AS older, sex, count(*), avg(wt_loss) FROM lung "
            "GROUP BY age >= 65, sex ORDER BY older, sex",
        ),
        (
            lung.select("ph_ecog").distinct().sort("ph_ecog"),
            "SELECT DISTINCT ph_ecog FROM lung ORDER BY ph_ecog NULLS LAST",
        ),
        (
            lung.join(lung.group_by("inst").agg(count().alias("n")), on="inst")
            .group_by("sex")
            .agg(mean("n"), count())
            .sort("sex"),
            "SELECT l.sex, avg(t.n), count(*) FROM lung l JOIN (SELECT inst, count(*) AS n "
            "FROM lung GROUP BY inst) t ON t.inst = l.inst GROUP BY l.sex ORDER BY l.sex",
        ),
        (
            conn.table("breast_cancer").group_by("diagnosis").agg(count(), mean("mean_radius")).sort("diagnosis"),
            "SELECT diagnosis, count(*), avg(mean_radius) FROM breast_cancer GROUP BY diagnosis ORDER BY diagnosis",
        ),
    ]
    for frame, sql in cases:
        got, want = frame.to_arrow(), conn.sql(sql)
        assert got.schema.names[: len(want.schema.names)]
        assert got.num_rows == want.num_rows, sql
        # Compare by position: SQL names an expression by its own text.
        for i in range(want.num_columns):
            a, b = got.column(i).to_pylist(), want.column(i).to_pylist()
            if a and isinstance(next((x for x in a if x is not None), None), float):
                np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), rtol=1e-12, err_msg=sql)
            else:
                assert a == b, sql


def test_a_frame_is_explained_as_its_sql(conn):
    frame = conn.table("lung").filter(col("age") > 60).group_by("sex").agg(count(), mean("age"))
    plan = frame.explain()
    want = conn.explain("SELECT sex, count(*), avg(age) FROM lung WHERE age > 60 GROUP BY sex")
    assert list(plan.columns) == list(want.columns)
    assert list(plan["location"]) == ["station_a", "station_b", "station_c", "hub"]
    # Each station runs the same fragment for the frame as for the SQL.
    stations = plan[plan.location != "hub"]
    assert list(stations.iloc[:, 1:].astype(str).itertuples(index=False)) == list(
        want[want.location != "hub"].iloc[:, 1:].astype(str).itertuples(index=False)
    )
    assert "lung" in repr(frame) or "sex" in repr(frame)


# ------------------------------------------------------------------ under the default policy


def named(url, researcher):
    """An ADBC connection that names its researcher (the guarded hub trusts the header)."""
    header = "adbc.flight.sql.rpc.call_header.x-railyard-researcher"
    return flightsql.connect(url, autocommit=True, conn_kwargs={header: researcher})


def execute_plan(connection, plan: bytes) -> pa.Table:
    with connection.cursor() as cur:
        cur.execute(plan)
        return cur.fetch_arrow_table()


def test_a_frame_is_refused_checked_and_audited_as_its_sql(guarded_hub):
    url, data = guarded_hub
    with railyard.Connection(named(url, "frames")) as conn:
        # Row-level: refused with the same rule and message as the SQL.
        rows = conn.table("lung").filter(col("age") > 70).select("age", "sex")
        with pytest.raises(adbc_driver_manager.Error) as frame_err:
            rows.to_arrow()
        with pytest.raises(adbc_driver_manager.Error) as sql_err:
            conn.sql("SELECT age, sex FROM lung WHERE age > 70")
        assert "row_level" in str(frame_err.value) or "public" in str(frame_err.value)
        assert str(frame_err.value).split("[")[0] == str(sql_err.value).split("[")[0]
        # An aggregate with large enough groups is answered, and every station audits the
        # fragment it ran for it: SQL, with the literal in it.
        got = conn.table("lung").filter(col("age") > 57).group_by("sex").agg(count()).sort("sex").to_arrow()
        want = conn.sql("SELECT sex, count(*) FROM lung WHERE age > 57 GROUP BY sex ORDER BY sex")
        assert got.to_pylist() == want.to_pylist()
    for station in ["station_a", "station_b", "station_c"]:
        records = [json.loads(line) for line in (data / station / "audit.jsonl").read_text().splitlines()]
        mine = [r for r in records if r.get("researcher") == "frames" and "57" in r["sql"]]
        # The check before the run, and the run: both allowed, both the literal SQL.
        assert len(mine) >= 2, (station, records[-3:])
        assert all(r["decision"] == "allowed" for r in mine), mine
        assert all("> 57" in r["sql"] for r in mine), mine
    # The refusal was audited too.
    records = [json.loads(line) for line in (data / "station_a" / "audit.jsonl").read_text().splitlines()]
    assert any(r.get("researcher") == "frames" and r["decision"] == "refused" and "70" in r["sql"] for r in records)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    return varint((number << 3) | 2) + varint(len(payload)) + payload


def test_hand_made_plans_are_refused_clearly_and_the_hub_survives(guarded_hub):
    url, _ = guarded_hub
    with named(url, "substrait-attacks") as connection:

        def refused(plan: bytes, *needles: str):
            with pytest.raises(adbc_driver_manager.Error) as err:
                execute_plan(connection, plan)
            text = str(err.value)
            assert any(n in text for n in needles), text
            return text

        # Over the statement byte limit.
        refused(b"\x0a" * (256 * 1024 + 1), "query_too_complex", "max_statement_bytes")
        # Not Substrait.
        refused(b"\xff\xff\xff\xff not a plan", "does not decode")
        # 5,000 filters, one inside the next: 20 KB, far deeper than any walk may recurse.
        rel = _field(1, b"")  # Rel { read: {} }
        for _ in range(5000):
            rel = _field(2, _field(2, rel))  # Rel { filter: FilterRel { input: rel } }
        plan = _field(3, _field(2, _field(1, rel)))  # Plan { relations: [PlanRel { root: RelRoot { input } }] }
        message = refused(plan, "nested more than 100 messages deep")
        assert len(message) < 400, message
        # Shallow but wide: a union of 300 reads of a table (SQL refuses as many SELECTs).
        from datafusion.substrait import Plan

        one = json.loads(_plan_json(railyard.Connection(connection).table("lung").select("sex").substrait()))
        root = one["relations"][0]["root"]
        root["input"] = {"set": {"inputs": [root["input"]] * 300, "op": "SET_OP_UNION_ALL"}}
        refused(Plan.from_json(json.dumps(one)).encode(), "query_too_complex")
        # A file path where a table belongs: resolved as a table name, never read.
        frames = railyard.Connection(connection)  # over the same ADBC connection
        lung = frames.table("lung").group_by("sex").agg(count())
        as_json = json.loads(_plan_json(lung.substrait()))
        _replace_named_table(as_json, {"items": [{"uriFile": "file:///etc/passwd", "parquet": {}}]})
        forged = Plan.from_json(json.dumps(as_json)).encode()
        message = refused(forged, "passwd", "not found", "does not resolve")
        assert "root:" not in message
        # A prepared plan takes no parameter values.
        with pytest.raises(adbc_driver_manager.Error) as err:
            with connection.cursor() as cur:
                cur.execute(lung.substrait(), parameters=(1,))
                cur.fetch_arrow_table()
        assert "no parameter values" in str(err.value)
        # The hub still answers.
        assert lung.sort("sex").to_arrow().num_rows == 2


def _plan_json(plan: bytes) -> str:
    from datafusion.substrait import Serde

    return Serde.deserialize_bytes(plan).to_json()


def _replace_named_table(node, local_files):
    if isinstance(node, dict):
        if "namedTable" in node:
            del node["namedTable"]
            node["localFiles"] = local_files
            return
        for value in node.values():
            _replace_named_table(value, local_files)
    elif isinstance(node, list):
        for value in node:
            _replace_named_table(value, local_files)
