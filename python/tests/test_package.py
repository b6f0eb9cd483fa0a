"""The `railyard` Python package (python/railyard, installed from python/ by .ci/run) against
a real hub under the open test policy. Every helper's numbers are compared with pandas,
statsmodels or lifelines on the pooled files, made here."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test

import railyard

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

REL = 1e-6


@pytest.fixture()
def conn(hub_url):
    with railyard.connect(hub_url) as connection:
        yield connection


def test_sql_with_params_in_arrow_pandas_and_polars(conn, lung):
    sql = "SELECT sex, count(*) AS n, avg(age) AS age FROM lung WHERE ph_ecog >= ? GROUP BY sex ORDER BY sex"
    table = conn.sql(sql, params=(1,))
    assert isinstance(table, pa.Table)
    expected = lung[lung.ph_ecog >= 1].groupby("sex").agg(n=("age", "size"), age=("age", "mean")).reset_index()
    frame = conn.sql_pandas(sql, params=(1,))
    assert list(frame["n"]) == list(expected["n"])
    np.testing.assert_allclose(frame["age"], expected["age"], rtol=1e-12)
    polars = conn.sql_polars(sql, params=(1,))
    assert polars["n"].to_list() == list(expected["n"])
    literal = conn.sql("SELECT sex, count(*) AS n, avg(age) AS age FROM lung WHERE ph_ecog >= 1 GROUP BY sex ORDER BY sex")
    assert literal.equals(table)


def test_catalog_policies_stations_and_explain(conn):
    tables = conn.tables()
    assert {"lung", "breast_cancer"} <= set(tables.table_name)
    assert "wt_loss" in set(tables[tables.table_name == "lung"].column_name)
    policies = conn.policies()
    assert {"station", "table_name", "column_name", "visibility"} <= set(policies.columns)
    assert set(policies.station) == {"station_a", "station_b", "station_c"}
    assert len(conn.stations()) == 3
    plan = conn.explain("SELECT sex, avg(age) FROM lung GROUP BY sex")
    assert list(plan["location"]) == ["station_a", "station_b", "station_c", "hub"]


def test_glm_is_shaped_like_statsmodels_and_equal_to_it(conn, lung):
    fit = conn.glm("lung", "status ~ age + sex", "binomial")
    ref = smf.glm("status ~ age + sex", lung, family=sm.families.Binomial()).fit(tol=1e-12)
    for name in ["params", "bse", "tvalues", "pvalues"]:
        got, want = getattr(fit, name), getattr(ref, name)
        assert list(got.index) == list(want.index)
        np.testing.assert_allclose(got, want, rtol=REL, err_msg=name)
    np.testing.assert_allclose(fit.conf_int(), ref.conf_int(), rtol=REL)
    summary = fit.summary()
    assert list(summary.columns) == ["coef", "std err", "z", "P>|z|", "[0.025", "0.975]"]
    # A cohort query and a filter.
    fit = conn.glm("SELECT status, age, sex, wt_loss FROM lung", "status ~ age", "binomial", filter="wt_loss IS NOT NULL")
    ref = smf.glm("status ~ age", lung[lung.wt_loss.notna()], family=sm.families.Binomial()).fit(tol=1e-12)
    np.testing.assert_allclose(fit.params, ref.params, rtol=REL)


def test_kaplan_meier_with_lifelines_bands_and_a_plot(conn, lung):
    curve = conn.kaplan_meier("lung", "time", "status", group="sex")
    for sex in [1, 2]:
        part = curve[curve.group == str(sex)]
        data = lung[lung.sex == sex]
        kmf = KaplanMeierFitter().fit(data.time, data.status)
        survival = kmf.survival_function_.drop(index=0.0).iloc[:, 0]
        np.testing.assert_allclose(part.survival, survival.to_numpy(), rtol=1e-9)
        bands = kmf.confidence_interval_.drop(index=0.0)
        lower, upper = bands.iloc[:, 0].to_numpy(), bands.iloc[:, 1].to_numpy()
        lower, upper = (lower, upper) if "lower" in bands.columns[0] else (upper, lower)
        # Where the band is defined (after the first event; lifelines fills 1 before it).
        defined = np.isfinite(part.lower.to_numpy())
        assert defined.sum() >= len(part) - 2
        np.testing.assert_allclose(part.lower.to_numpy()[defined], lower[defined], rtol=REL)
        np.testing.assert_allclose(part.upper.to_numpy()[defined], upper[defined], rtol=REL)
    ax = curve.plot()
    assert len(ax.get_lines()) == 2
    assert len(ax.collections) == 2  # one band per curve
    assert ax.tables and "at risk (1)" in [c.get_text().get_text() for c in ax.tables[0].get_celld().values()]


def test_cox_logrank_and_crosstab(conn, lung):
    data = lung[["time", "status", "age", "sex"]].dropna()
    cph = CoxPHFitter().fit(data, "time", "status", fit_options={"precision": 1e-12, "r_precision": 1e-14, "max_steps": 200})
    fit = conn.cox("lung", "time", "status", ["age", "sex"])
    np.testing.assert_allclose(fit.params, cph.summary["coef"], rtol=REL)
    np.testing.assert_allclose(fit.bse, cph.summary["se(coef)"], rtol=REL)

    men, women = lung[lung.sex == 1], lung[lung.sex == 2]
    ref = logrank_test(men.time, women.time, men.status, women.status)
    test = conn.logrank("lung", "time", "status", "sex")
    assert test["df"] == 1
    assert test["chi_square"] == pytest.approx(ref.test_statistic, rel=REL)
    assert test["p_value"] == pytest.approx(ref.p_value, rel=REL)

    from scipy.stats import chi2_contingency

    both = lung.dropna(subset=["sex", "ph_ecog"])
    table = pd.crosstab(both.sex, both.ph_ecog)
    chi2, p, dof, _ = chi2_contingency(table.to_numpy(), correction=False)
    result = conn.crosstab("lung", "sex", "ph_ecog")
    assert result.df == dof
    assert result.chi_square == pytest.approx(chi2, rel=REL)
    assert result.p_value == pytest.approx(p, rel=REL)
    assert result.table().to_numpy().tolist() == table.to_numpy().tolist()


def test_set_epsilon_and_the_charged_epsilon(conn):
    with pytest.raises(ValueError):
        conn.set_epsilon(-1)
    # The open test policy has no DP budget: a DP query is refused, naming the rule.
    conn.set_epsilon(0.5)
    with pytest.raises(Exception) as err:
        conn.sql("SELECT dp_count(*) AS n FROM lung")
    assert "rule" in str(err.value)
    conn.set_epsilon(None)
    assert railyard.epsilon_charged(conn.sql("SELECT count(*) AS n FROM lung")) == {}
