"""Differential privacy through the ADBC Flight SQL driver, as a researcher uses it: noisy
answers around the pooled pandas answer, the ε in the answer's metadata, the budget table,
and a refusal once the budget is spent."""

import json
import math

import adbc_driver_flightsql.dbapi as flightsql
import pytest

from conftest import start_local, stop

POLICY = """
[dp]
budget = 1.5
max_epsilon = 1.0
epsilon = 0.5
[tables.lung.columns]
age = "dp"
[tables.lung.dp]
age = { lower = 30, upper = 90 }
sex = { keys = [1, 2] }
"""


@pytest.fixture()
def dp_hub(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    proc, url = start_local(tmp_path / "data", policy)
    yield url
    stop(proc)


def test_noisy_answers_budget_and_refusal_over_adbc(dp_hub, lung):
    query = "SELECT sex, dp_count(*) AS n, dp_avg(age) AS mean_age FROM lung GROUP BY sex ORDER BY sex"
    with flightsql.connect(dp_hub, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute(query)
            table = cur.fetch_arrow_table()
            got = table.to_pandas()
            metadata = table.schema.metadata or {}
            spent = json.loads(metadata[b"railyard.epsilon"])
            assert spent == {"station_a": 0.5, "station_b": 0.5, "station_c": 0.5}
            assert list(got["sex"]) == [1, 2]
            truth = lung.groupby("sex").size().sort_index()
            # Each station's count noise has scale 6 (ε = 0.5 over three state fields): the
            # pooled count's standard deviation is about 14.7; 10 of them never fail in
            # practice (probability far below 1e-9).
            for n, t in zip(got["n"], truth):
                assert abs(n - t) < 147

            cur.execute("SELECT station, spent, remaining FROM railyard.budget WHERE table_name = 'lung'")
            budget = cur.fetch_arrow_table().to_pandas()
            assert sorted(budget["station"]) == ["station_a", "station_b", "station_c"]
            assert list(budget["spent"]) == [0.5, 0.5, 0.5]
            assert list(budget["remaining"]) == [1.0, 1.0, 1.0]

            cur.execute("SET railyard.epsilon = 1.0")
            cur.fetch_arrow_table()
            cur.execute(query)
            cur.fetch_arrow_table()
            # 1.5 of 1.5 spent: the next query is refused, naming the rule, and charges nothing.
            with pytest.raises(Exception, match="dp_budget"):
                cur.execute(query)
                cur.fetch_arrow_table()
            cur.execute("SELECT spent FROM railyard.budget WHERE table_name = 'lung'")
            assert list(cur.fetch_arrow_table().to_pandas()["spent"]) == [1.5, 1.5, 1.5]


MEDIAN_POLICY = """
[dp]
budget = 10000000.0
max_epsilon = 1000000.0
epsilon = 1000000.0
[tables.lung.columns]
age = "dp"
[tables.lung.dp]
age = { lower = 30, upper = 90, bins = 60 }
sex = { keys = [1, 2] }
"""


def test_dp_medians_and_quantiles_match_pandas_within_a_bin(tmp_path, lung):
    # One-year bins and an ε that makes the noise negligible: each DP quantile is the
    # histogram's, within one bin of the order statistic of the pooled ages (pandas).
    policy = tmp_path / "policy.toml"
    policy.write_text(MEDIAN_POLICY)
    proc, url = start_local(tmp_path / "data", policy)
    try:
        with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT sex, dp_median(age) AS median, dp_quantile(age, 0.1) AS p10, "
                "dp_quantile(age, 0.75) AS p75 FROM lung GROUP BY sex ORDER BY sex"
            )
            got = cur.fetch_arrow_table().to_pandas()
        assert list(got["sex"]) == [1, 2]
        for row, (sex, ages) in zip(got.itertuples(), sorted(lung.groupby("sex")["age"])):
            assert row.sex == sex
            for column, q in [("median", 0.5), ("p10", 0.1), ("p75", 0.75)]:
                ordered = sorted(ages)
                want = ordered[max(1, math.ceil(q * len(ordered))) - 1]
                assert abs(getattr(row, column) - want) <= 1.0 + 1e-9, (sex, q)
    finally:
        stop(proc)
