"""A vertically partitioned table through ADBC, checked against the inner join of its parts.

`breast` is the breast-cancer split of tests/data/breast_cancer/vertical: station_a holds
the diagnosis and the `mean_*` features, station_b the `*_error` features, station_c the
`worst_*` features of all but the 29 patients with patient_id % 20 == 7. The stations link
rows by keyed pseudonyms of patient_id; the reference here is pandas' inner join of the
three files on patient_id, and statsmodels fitted on that joined frame.
"""

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

from conftest import DATA, REPO, start_local, stop

VERTICAL = DATA / "breast_cancer" / "vertical" / "csv"
VERTICAL_ARGS = ["--vertical", f"breast={VERTICAL}", "--key", "patient_id"]


@pytest.fixture(scope="module")
def joined() -> pd.DataFrame:
    parts = [pd.read_csv(VERTICAL / f"station_{s}.csv") for s in "abc"]
    frame = parts[0].merge(parts[1], on="patient_id", how="inner").merge(parts[2], on="patient_id", how="inner")
    return frame.drop(columns=["patient_id"])


@pytest.fixture(scope="module")
def open_hub(tmp_path_factory):
    proc, url = start_local(
        tmp_path_factory.mktemp("vertical-open"), REPO / "tests" / "policies" / "open.toml", VERTICAL_ARGS
    )
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def guarded_vertical_hub(tmp_path_factory):
    proc, url = start_local(tmp_path_factory.mktemp("vertical-default"), None, VERTICAL_ARGS)
    yield url
    stop(proc)


def query(url, sql) -> pd.DataFrame:
    with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table().to_pandas()


def test_the_table_is_the_inner_join_of_its_stations(open_hub, joined):
    assert len(joined) == 540
    assert query(open_hub, "SELECT count(*) AS n FROM breast").n.tolist() == [540]
    columns = query(open_hub, "SELECT column_name FROM information_schema.columns WHERE table_name = 'breast'")
    assert sorted(columns.column_name) == sorted(joined.columns)
    assert "patient_id" not in set(columns.column_name)
    policies = query(
        open_hub,
        "SELECT station, bool_and(allow_vertical) AS allow_vertical, "
        "string_agg(DISTINCT visibility, ',' ORDER BY visibility) AS visibilities "
        "FROM railyard.policies WHERE table_name = 'breast' GROUP BY station ORDER BY station",
    )
    # Each member opted in and marks the key join_key; the hub's join station releases
    # nothing for joins itself and treats every column as at most 'aggregate'.
    assert policies.station.tolist() == ["hub join of breast", "station_a", "station_b", "station_c"]
    assert policies.allow_vertical.tolist() == [False, True, True, True]
    assert policies.visibilities.tolist() == ["aggregate"] + ["join_key,public"] * 3


def test_grouped_aggregates_over_three_stations_equal_pandas(open_hub, joined):
    got = query(
        open_hub,
        "SELECT diagnosis, count(*) AS n, avg(worst_area) AS worst_area, sum(radius_error) AS radius_error, "
        "stddev(mean_texture) AS mean_texture FROM breast WHERE worst_smoothness > 0.12 "
        "GROUP BY diagnosis ORDER BY diagnosis",
    )
    rows = joined[joined.worst_smoothness > 0.12]
    expected = rows.groupby("diagnosis").agg(
        n=("worst_area", "size"),
        worst_area=("worst_area", "mean"),
        radius_error=("radius_error", "sum"),
        mean_texture=("mean_texture", "std"),
    )
    assert got.diagnosis.tolist() == expected.index.tolist()
    assert got.n.tolist() == expected.n.tolist()
    for column in ["worst_area", "radius_error", "mean_texture"]:
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-12)


def test_binomial_glm_on_the_vertical_table_equals_statsmodels_on_the_join(open_hub, joined):
    formula = "diagnosis ~ mean_radius + worst_texture + concavity_error"
    ref = smf.glm(formula, joined, family=sm.families.Binomial()).fit(tol=1e-12)
    got = query(open_hub, f"SELECT * FROM glm('breast', '{formula}', 'binomial')")
    assert got.term.tolist() == list(ref.params.index)
    np.testing.assert_allclose(got.estimate, ref.params, rtol=1e-6)
    np.testing.assert_allclose(got.std_error, ref.bse, rtol=1e-6)
    np.testing.assert_allclose(got.p_value, ref.pvalues, rtol=1e-6)
    fit = query(open_hub, f"SELECT n, log_likelihood FROM glm_fit('breast', '{formula}', 'binomial')")
    assert fit.n.tolist() == [540]
    np.testing.assert_allclose(fit.log_likelihood, [ref.llf], rtol=1e-9)


def test_the_default_policy_refuses_rows_and_withholds_small_joined_groups(guarded_vertical_hub, joined):
    with pytest.raises(adbc_driver_manager.Error) as err:
        query(guarded_vertical_hub, "SELECT worst_area, mean_radius FROM breast")
    assert "rule row_level" in str(err.value)
    got = query(
        guarded_vertical_hub,
        "SELECT floor(worst_radius) AS r, count(*) AS n FROM breast GROUP BY 1 ORDER BY 1",
    )
    counts = np.floor(joined.worst_radius).value_counts().sort_index()
    # A joined group of k + 3 = 8 rows or more is always released, one below k = 5 never,
    # one in between by a keyed hash of its rows (threshold_noise = 3); none is changed.
    possible, sure = counts[counts >= 5], counts[counts >= 8]
    assert len(possible) < len(counts)
    released = dict(zip(got.r.tolist(), got.n.tolist()))
    for r, n in sure.items():
        assert released.get(r) == n, (r, released)
    for r, n in released.items():
        assert possible.get(r) == n, (r, released)
