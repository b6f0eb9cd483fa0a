"""Bound parameters through the real ADBC Flight SQL driver: `?` and `$1`, NULL, text that
tries to change the statement, wrong counts and types. Every bound query must equal the same
query with the values written in, and pandas on the pooled file; the stations must receive
and audit the literal query."""

import json

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pandas as pd
import pytest


@pytest.fixture()
def conn(hub_url):
    with flightsql.connect(hub_url, autocommit=True) as connection:
        yield connection


def run(conn, sql, parameters=None) -> pd.DataFrame:
    with conn.cursor() as cur:
        cur.execute(sql, parameters=parameters)
        return cur.fetch_arrow_table().to_pandas()


def test_bound_values_equal_the_literal_query_and_pandas(conn, lung):
    bound = run(conn, "SELECT count(*) AS n, avg(wt_loss) AS w FROM lung WHERE age > ? AND sex = ?", (60, 1))
    literal = run(conn, "SELECT count(*) AS n, avg(wt_loss) AS w FROM lung WHERE age > 60 AND sex = 1")
    pd.testing.assert_frame_equal(bound, literal)
    expected = lung[(lung["age"] > 60) & (lung["sex"] == 1)]
    assert bound["n"][0] == len(expected)
    assert bound["w"][0] == pytest.approx(expected["wt_loss"].mean(), rel=1e-12)

    # $n, used twice and out of order; a float and a string.
    got = run(
        conn,
        "SELECT sex, count(*) AS n FROM lung WHERE age BETWEEN $2 AND $1 AND meal_cal > $3 "
        "AND CAST(sex AS VARCHAR) <> $4 AND age <> $2 GROUP BY sex ORDER BY sex",
        (70, 50, 500.5, "9"),
    )
    subset = lung[(lung["age"] >= 50) & (lung["age"] <= 70) & (lung["meal_cal"] > 500.5) & (lung["age"] != 50)]
    expected = subset.groupby("sex").size()
    assert list(got["sex"]) == list(expected.index)
    assert list(got["n"]) == list(expected)


def test_a_cursor_binds_for_pandas(conn, lung):
    # pandas.read_sql refuses params for any ADBC driver (pandas' own limit): a cursor binds
    # them, and fetch_df() gives the frame.
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) AS n FROM lung WHERE ph_ecog >= ?", parameters=(2,))
        got = cur.fetch_df()
    assert got["n"][0] == (lung["ph_ecog"] >= 2).sum()


def test_null_and_text_come_back_exactly_as_bound(conn):
    got = run(conn, "SELECT ? IS NULL AS missing", (None,))
    assert bool(got["missing"][0])
    for text in [
        "it's",
        "x' OR '1'='1",
        "'); SELECT * FROM lung; --",
        "back\\slash \\' and $1 and ?",
        "ünïcødé ✓",
        "",
    ]:
        got = run(conn, "SELECT ? AS v, length(?) AS n", (text, text))
        assert got["v"][0] == text
        assert got["n"][0] == len(text)


def test_wrong_counts_and_types_are_invalid_arguments(conn):
    cases = [
        ("SELECT count(*) AS n FROM lung WHERE age > ?", (60, 1), "1 parameter, and 2 values"),
        ("SELECT count(*) AS n FROM lung WHERE age > ? AND sex = ?", (60,), "2 parameters, and 1 value"),
        ("SELECT count(*) AS n FROM lung WHERE age > ?", ("sixty",), "parameter $1"),
        ("SELECT count(*) AS n FROM lung WHERE age > ? AND sex = $1", (1,), "not both"),
    ]
    for sql, parameters, expected in cases:
        with pytest.raises(adbc_driver_manager.Error) as err:
            run(conn, sql, parameters)
        message = str(err.value)
        assert expected in message, (sql, message)
        assert "INVALID_ARGUMENT" in message or "InvalidArgument" in message or "INVALID" in message.upper(), message
    # A statement with parameters run without values says how to bind them.
    with pytest.raises(adbc_driver_manager.Error) as err:
        run(conn, "SELECT count(*) AS n FROM lung WHERE age > ?")
    assert "no values were bound" in str(err.value)


def test_the_stations_check_and_audit_the_literal_query(guarded_hub):
    url, data = guarded_hub
    with flightsql.connect(url, autocommit=True) as connection:
        got = run(connection, "SELECT sex, count(*) AS n FROM lung WHERE age > ? GROUP BY sex ORDER BY sex", (61,))
        assert list(got["sex"]) == [1, 2]
    records = [json.loads(line) for line in (data / "station_a" / "audit.jsonl").read_text().splitlines()]
    sqls = [r["sql"] for r in records if "61" in r["sql"]]
    assert sqls, records[-3:]
    assert all("?" not in s and "$1" not in s for s in sqls), sqls
