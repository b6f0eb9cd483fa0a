"""The hub's statistical table functions, checked against reference fits on the pooled data.

Each federated answer (three stations per table, open policy) is compared with a fit that this
file makes itself on the pooled `full.csv`:

- glm / glm_fit: statsmodels OLS (gaussian) and GLM Binomial / Poisson;
- kaplan_meier: lifelines KaplanMeierFitter (survival, event table), Greenwood standard errors
  computed here from lifelines' event table;
- logrank: lifelines logrank_test (two groups) and multivariate_logrank_test;
- cox / cox_fit: lifelines CoxPHFitter (Efron ties, tight tolerance) and statsmodels PHReg;
- crosstab: pandas.crosstab and scipy.stats.chi2_contingency (no continuity correction).

Tolerances: estimates, standard errors, statistics, p-values and likelihoods to 1e-6
relative; survival to 1e-9; counts exactly.
"""

import re

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test, multivariate_logrank_test
from scipy.stats import chi2_contingency

# lifelines 0.30 calls pandas reductions with positional axes, deprecated in pandas 3.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

REL = 1e-6
# p-values far in the tail underflow; below this they only need to be tiny.
P_ATOL = 1e-300
# lifelines' default Newton-Raphson stop (precision 1e-7) leaves ~3e-6 relative error in the
# Cox coefficients on lung: tighten it so the reference is good to well under 1e-6.
COX_FIT_OPTIONS = {"precision": 1e-12, "r_precision": 1e-14, "max_steps": 200}


@pytest.fixture()
def conn(hub_url):
    with flightsql.connect(hub_url, autocommit=True) as connection:
        yield connection


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def call(conn, function, *args) -> pd.DataFrame:
    """SELECT * FROM function('arg', ...) at the hub, as a DataFrame."""
    sql = f"SELECT * FROM {function}({', '.join(sql_literal(a) for a in args)})"
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table().to_pandas()


def refusal(conn, function, *args) -> str:
    with pytest.raises(adbc_driver_manager.Error) as err:
        call(conn, function, *args)
    return str(err.value)


def close(actual, expected, rtol=REL, atol=0.0):
    np.testing.assert_allclose(np.asarray(actual, float), np.asarray(expected, float), rtol=rtol, atol=atol)


def sql_text(value) -> str:
    """A level as SQL renders it: integral values without a trailing '.0'."""
    return str(int(value)) if float(value).is_integer() else str(value)


# ---------------------------------------------------------------------------------------- GLM

GLM_CASES = {
    # id: (table, formula, family, SQL filter or None, the same filter on the pooled frame)
    "logistic": ("breast_cancer", "diagnosis ~ mean_radius + mean_texture", "binomial", None, None),
    "linear": ("breast_cancer", "mean_area ~ mean_radius + mean_texture", "gaussian", None, None),
    "linear_no_intercept": ("breast_cancer", "mean_area ~ mean_radius + mean_texture - 1", "gaussian", None, None),
    "poisson_complete_cases": ("lung", "ph_ecog ~ age + sex", "poisson", None, None),
    # Without an intercept the null deviance is still the intercept-only model's (statsmodels'
    # convention): binomial derives it from its first round, poisson asks a round for it.
    "logistic_no_intercept": ("lung", "status ~ age + sex - 1", "binomial", None, None),
    "poisson_no_intercept": ("lung", "ph_ecog ~ age + sex - 1", "poisson", None, None),
    "logistic_categorical": ("lung", "status ~ age + C(sex)", "binomial", None, None),
    # ph_ecog = 3 holds one patient (its coefficient would diverge): filtered out.
    "logistic_categorical_filtered": (
        "lung", "status ~ age + C(ph_ecog)", "binomial", "ph_ecog < 3", lambda d: d[d.ph_ecog < 3]
    ),
    "logistic_filtered": ("lung", "status ~ age", "binomial", "sex = 1", lambda d: d[d.sex == 1]),
}


def glm_args(case):
    table, formula, family, sql_filter, _ = GLM_CASES[case]
    return (table, formula, family) + ((sql_filter,) if sql_filter else ())


def reference_glm(request, case):
    """statsmodels on the pooled (and filtered) data; formula-API fits drop incomplete rows."""
    table, formula, family, _, subset = GLM_CASES[case]
    data = request.getfixturevalue(table)
    if subset is not None:
        data = subset(data)
    if family == "gaussian":
        return smf.ols(formula, data).fit()
    families = {"binomial": sm.families.Binomial(), "poisson": sm.families.Poisson()}
    return smf.glm(formula, data, family=families[family]).fit(tol=1e-12)


def hub_term_names(formula, patsy_names):
    """patsy's names in the hub's order and spelling: Intercept, then the formula's terms in
    the order written (patsy puts categorical terms first), levels as SQL text
    (patsy says C(ph_ecog)[T.1.0] for a float column, the hub C(ph_ecog)[T.1])."""
    rhs = formula.split("~")[1].replace("- 1", "")
    terms = [t.strip() for t in rhs.split("+") if t.strip()]
    order = [n for n in patsy_names if n == "Intercept"]
    for term in terms:
        order += [n for n in patsy_names if n == term or n.startswith(term + "[")]
    assert sorted(order) == sorted(patsy_names)
    return order, [re.sub(r"\[T\.(-?\d+)\.0\]", r"[T.\1]", n) for n in order]


@pytest.mark.parametrize("case", GLM_CASES)
def test_glm_coefficients_equal_statsmodels(conn, request, case):
    ref = reference_glm(request, case)
    order, names = hub_term_names(GLM_CASES[case][1], list(ref.params.index))
    got = call(conn, "glm", *glm_args(case))
    assert list(got.columns) == ["term", "estimate", "std_error", "statistic", "p_value"]
    assert list(got.term) == names
    close(got.estimate, ref.params[order])
    close(got.std_error, ref.bse[order])
    close(got.statistic, ref.tvalues[order])
    close(got.p_value, ref.pvalues[order], atol=P_ATOL)


@pytest.mark.parametrize("case", GLM_CASES)
def test_glm_fit_equals_statsmodels(conn, request, case):
    family = GLM_CASES[case][2]
    ref = reference_glm(request, case)
    p = len(ref.params)
    if family == "gaussian":
        # deviance = RSS, null model = intercept only; AIC counts the dispersion (R's convention).
        expected = dict(log_likelihood=ref.llf, deviance=ref.ssr, null_deviance=ref.centered_tss,
                        aic=-2 * ref.llf + 2 * (p + 1))
    else:
        expected = dict(log_likelihood=ref.llf, deviance=ref.deviance, null_deviance=ref.null_deviance,
                        aic=-2 * ref.llf + 2 * p)
    got = call(conn, "glm_fit", *glm_args(case))
    assert len(got) == 1
    row = got.iloc[0]
    assert int(row.n) == int(ref.nobs)
    assert bool(row.converged) is True
    assert int(row.iterations) >= 0
    for column, value in expected.items():
        close([row[column]], [value])


def test_glm_unknown_column_is_named_in_the_error(conn):
    text = refusal(conn, "glm", "lung", "status ~ age + no_such_column", "binomial")
    assert "no_such_column" in text, text


def test_glm_unknown_family_is_refused(conn):
    text = refusal(conn, "glm", "lung", "status ~ age", "tweedie")
    assert "tweedie" in text or "family" in text, text


# ---------------------------------------------------------------------------- Kaplan-Meier


def reference_km(data) -> pd.DataFrame:
    """lifelines' product-limit estimate and event table (without its row at time 0), with
    Greenwood's standard error S(t)·sqrt(Σ d/(n(n−d))), undefined where S = 0."""
    kmf = KaplanMeierFitter().fit(data.time, data.status)
    table = kmf.event_table.drop(index=0.0)
    survival = kmf.survival_function_.drop(index=0.0).iloc[:, 0].to_numpy()
    n, d = table.at_risk.to_numpy(float), table.observed.to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = survival * np.sqrt(np.cumsum(d / (n * (n - d))))
    greenwood[survival == 0] = np.nan
    assert (table.observed + table.censored == table.removed).all()
    return pd.DataFrame({
        "time": table.index.to_numpy(float),
        "at_risk": table.at_risk.to_numpy(),
        "events": table.observed.to_numpy(),
        "censored": table.censored.to_numpy(),
        "survival": survival,
        "std_error": greenwood,
    })


def assert_km_equal(got, expected):
    np.testing.assert_array_equal(got.time.to_numpy(float), expected.time)
    for column in ["at_risk", "events", "censored"]:
        assert list(got[column]) == list(expected[column]), column
    close(got.survival, expected.survival, rtol=1e-9)
    close(got.std_error, expected.std_error)


def test_kaplan_meier_overall_equals_lifelines(conn, lung):
    got = call(conn, "kaplan_meier", "lung", "time", "status")
    assert list(got.columns) == ["time", "at_risk", "events", "censored", "survival", "std_error"]
    assert_km_equal(got, reference_km(lung))


def test_kaplan_meier_filtered_equals_lifelines(conn, lung):
    got = call(conn, "kaplan_meier", "lung", "time", "status", "", "age >= 65")
    assert_km_equal(got, reference_km(lung[lung.age >= 65]))


def test_kaplan_meier_by_sex_equals_lifelines(conn, lung):
    got = call(conn, "kaplan_meier", "lung", "time", "status", "sex")
    assert list(got.columns) == ["group", "time", "at_risk", "events", "censored", "survival", "std_error"]
    levels = sorted(lung.sex.unique())
    assert list(got.group.unique()) == [sql_text(s) for s in levels]
    for s in levels:
        assert_km_equal(got[got.group == sql_text(s)], reference_km(lung[lung.sex == s]))


# --------------------------------------------------------------------------------- log-rank


def test_logrank_two_groups_equals_lifelines(conn, lung):
    men, women = lung[lung.sex == 1], lung[lung.sex == 2]
    ref = logrank_test(men.time, women.time, men.status, women.status)
    got = call(conn, "logrank", "lung", "time", "status", "sex")
    assert list(got.columns) == ["chi_square", "df", "p_value"] and len(got) == 1
    assert int(got.df[0]) == 1
    close(got.chi_square, [ref.test_statistic])
    close(got.p_value, [ref.p_value])


def test_logrank_four_groups_with_missing_equals_lifelines(conn, lung):
    data = lung.dropna(subset=["ph_ecog"])
    ref = multivariate_logrank_test(data.time, data.ph_ecog, data.status)
    got = call(conn, "logrank", "lung", "time", "status", "ph_ecog")
    assert int(got.df[0]) == ref.degrees_of_freedom == 3
    close(got.chi_square, [ref.test_statistic])
    close(got.p_value, [ref.p_value])


# ------------------------------------------------------------------------------------- Cox


@pytest.mark.parametrize("covariates", ["age + sex", "age + sex + ph_karno"])
def test_cox_equals_lifelines_and_statsmodels(conn, lung, covariates):
    names = [c.strip() for c in covariates.split("+")]
    data = lung[["time", "status"] + names].dropna()  # lifelines refuses NaN: complete cases
    cph = CoxPHFitter().fit(data, "time", "status", fit_options=COX_FIT_OPTIONS)
    phreg = smf.phreg(f"time ~ {covariates}", data, status="status", ties="efron").fit()

    got = call(conn, "cox", "lung", "time", "status", covariates)
    assert list(got.columns) == ["term", "estimate", "std_error", "statistic", "p_value"]
    assert list(got.term) == names
    summary = cph.summary.loc[names]
    close(got.estimate, summary["coef"])
    close(got.std_error, summary["se(coef)"])
    close(got.statistic, summary["z"])
    close(got.p_value, summary["p"])
    close(got.estimate, phreg.params)
    close(got.std_error, phreg.bse)

    fit = call(conn, "cox_fit", "lung", "time", "status", covariates)
    assert len(fit) == 1
    assert int(fit.n[0]) == len(data)
    assert int(fit.events[0]) == int(data.status.sum())
    assert int(fit.iterations[0]) >= 1
    close(fit.log_likelihood, [cph.log_likelihood_])
    close(fit.log_likelihood, [phreg.llf])


# -------------------------------------------------------------------------------- crosstab


def test_crosstab_equals_pandas_and_scipy(conn, lung):
    data = lung.dropna(subset=["sex", "ph_ecog"])
    table = pd.crosstab(data.sex, data.ph_ecog)  # levels sorted; unobserved cells are 0
    chi2, p, dof, _ = chi2_contingency(table.to_numpy(), correction=False)

    got = call(conn, "crosstab", "lung", "sex", "ph_ecog")
    assert list(got.columns) == [
        "row_level", "col_level", "count", "suppressed", "chi_square", "df", "p_value"
    ]
    cells, total = got.iloc[:-1], got.iloc[-1]
    assert list(cells.row_level) == [sql_text(r) for r in table.index for _ in table.columns]
    assert list(cells.col_level) == [sql_text(c) for _ in table.index for c in table.columns]
    assert list(cells["count"]) == table.to_numpy().ravel().tolist()
    assert not cells.suppressed.any()
    assert cells[["chi_square", "df", "p_value"]].isna().all().all()

    assert pd.isna(total.row_level) and pd.isna(total.col_level)
    assert int(total["count"]) == int(table.to_numpy().sum()) and not total.suppressed
    assert int(total.df) == dof
    close([total.chi_square], [chi2])
    close([total.p_value], [p])


# ------------------------------------------------------------------- statistics over a cohort


def test_kaplan_meier_over_a_cohort_query_equals_lifelines(conn, lung):
    """A cohort query in place of the table: the stations run it (here a subquery on the
    patient), and the curve equals lifelines over the same patients."""
    cohort = (
        "SELECT time, status FROM lung WHERE patient_id IN "
        "(SELECT patient_id FROM lung WHERE age >= 60 AND ph_ecog IS NOT NULL)"
    )
    got = call(conn, "kaplan_meier", cohort, "time", "status")
    assert_km_equal(got, reference_km(lung[(lung.age >= 60) & lung.ph_ecog.notna()]))


def test_glm_over_a_cohort_query_equals_statsmodels(conn, lung):
    cohort = "SELECT status, age, sex FROM lung WHERE wt_loss IS NOT NULL"
    got = call(conn, "glm", cohort, "status ~ age + sex", "binomial")
    data = lung[lung.wt_loss.notna()]
    ref = smf.glm("status ~ age + sex", data, family=sm.families.Binomial()).fit(tol=1e-12)
    assert list(got.term) == ["Intercept", "age", "sex"]
    close(got.estimate, ref.params[["Intercept", "age", "sex"]])
    close(got.std_error, ref.bse[["Intercept", "age", "sex"]])
