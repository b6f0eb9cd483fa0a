"""The hub through the real ADBC Flight SQL driver, checked against pandas on pooled data.

The federation runs the lung data as three CSV stations and breast_cancer as three
Parquet stations; pandas reads the pooled `full.csv` files independently.
"""

import math

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pandas as pd
import pyarrow as pa
import pytest


@pytest.fixture()
def conn(hub_url):
    with flightsql.connect(hub_url, autocommit=True) as connection:
        yield connection


def query(conn, sql) -> pd.DataFrame:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table().to_pandas()


def assert_close(actual, expected, rel=1e-12):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e is None or (isinstance(e, float) and math.isnan(e)):
            assert a is None or (isinstance(a, float) and math.isnan(a))
        else:
            assert a == pytest.approx(e, rel=rel), (actual, expected)


def test_row_count(conn, lung):
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM lung")
        assert cur.fetchone()[0] == len(lung)


def test_grouped_moments_equal_pandas(conn, lung):
    got = query(
        conn,
        "SELECT sex, count(*) AS n, avg(age) AS mean_age, var_samp(time) AS var_time, "
        "stddev_pop(age) AS sd_pop_age, sum(time) AS total_time "
        "FROM lung GROUP BY sex ORDER BY sex",
    )
    grouped = lung.groupby("sex")
    assert list(got["sex"]) == sorted(lung["sex"].unique())
    assert list(got["n"]) == list(grouped.size())
    assert_close(got["mean_age"], grouped["age"].mean())
    assert_close(got["var_time"], grouped["time"].var(ddof=1))
    assert_close(got["sd_pop_age"], grouped["age"].std(ddof=0))
    assert list(got["total_time"]) == list(grouped["time"].sum())


def test_missing_values_and_filters_equal_pandas(conn, lung):
    got = query(
        conn,
        "SELECT ph_ecog, count(*) AS n, count(wt_loss) AS n_wt, avg(wt_loss) AS mean_wt "
        "FROM lung WHERE age BETWEEN 50 AND 70 AND meal_cal IS NOT NULL "
        "GROUP BY ph_ecog ORDER BY ph_ecog NULLS FIRST",
    )
    subset = lung[(lung.age >= 50) & (lung.age <= 70) & lung.meal_cal.notna()]
    grouped = subset.groupby("ph_ecog", dropna=False)
    expected = pd.DataFrame(
        {
            "n": grouped.size(),
            "n_wt": grouped["wt_loss"].count(),
            "mean_wt": grouped["wt_loss"].mean(),
        }
    ).reset_index()
    expected = pd.concat(
        [expected[expected.ph_ecog.isna()], expected[expected.ph_ecog.notna()]]
    )
    assert list(got["n"]) == list(expected["n"])
    assert list(got["n_wt"]) == list(expected["n_wt"])
    assert_close(list(got["mean_wt"]), list(expected["mean_wt"]))


def test_expressions_case_and_having_equal_pandas(conn, lung):
    got = query(
        conn,
        "SELECT CASE WHEN age < 60 THEN 'young' ELSE 'old' END AS band, "
        "sum(time * (1 - status)) AS censored_time, count(*) AS n "
        "FROM lung GROUP BY 1 HAVING count(*) > 50 ORDER BY band",
    )
    band = lung.age.map(lambda a: "young" if a < 60 else "old")
    frame = lung.assign(band=band, censored=lung.time * (1 - lung.status))
    grouped = frame.groupby("band")
    expected = grouped.agg(censored_time=("censored", "sum"), n=("time", "size"))
    expected = expected[expected.n > 50].sort_index()
    assert list(got["band"]) == list(expected.index)
    assert list(got["censored_time"]) == list(expected["censored_time"])
    assert list(got["n"]) == list(expected["n"])


def test_parquet_stations_equal_pandas(conn, breast_cancer):
    got = query(
        conn,
        "SELECT diagnosis, avg(mean_radius) AS r, stddev_samp(mean_area) AS sd_area, "
        "min(worst_area) AS lo, max(worst_area) AS hi "
        "FROM breast_cancer GROUP BY diagnosis ORDER BY diagnosis",
    )
    grouped = breast_cancer.groupby("diagnosis")
    assert_close(got["r"], grouped["mean_radius"].mean())
    assert_close(got["sd_area"], grouped["mean_area"].std(ddof=1))
    assert_close(got["lo"], grouped["worst_area"].min())
    assert_close(got["hi"], grouped["worst_area"].max())


def test_arrow_types_survive_the_trip(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT sex, count(*) AS n, avg(age) AS mean_age FROM lung GROUP BY sex")
        table = cur.fetch_arrow_table()
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("mean_age").type == pa.float64()


def test_explain_federated_shows_station_fragments(conn):
    plan = query(conn, "EXPLAIN FEDERATED SELECT sex, avg(age) FROM lung GROUP BY sex")
    stations = [loc for loc in plan["location"] if loc != "hub"]
    assert stations == ["station_a", "station_b", "station_c"]
    assert all("partial_avg" in sql for sql in plan["plan"][:3])
    assert "merge_avg" in plan["plan"].iloc[-1]


def test_catalog_metadata(conn):
    objects = conn.adbc_get_objects(depth="columns", db_schema_filter="public").read_all()
    tables = {}
    for catalog in objects.to_pylist():
        for schema in catalog["catalog_db_schemas"] or []:
            for table in schema["db_schema_tables"] or []:
                tables[table["table_name"]] = [c["column_name"] for c in table["table_columns"]]
    assert set(tables) == {"breast_cancer", "lung"}
    assert "wt_loss" in tables["lung"]
    schema = conn.adbc_get_table_schema("lung", db_schema_filter="public")
    assert schema.field("age").type == pa.int64()


def test_errors_name_the_problem(conn):
    with conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute("SELECT no_such_column FROM lung")
    assert "no_such_column" in str(err.value)
