"""OMOP CDM stations through the ADBC Flight SQL driver, checked against DuckDB over the pooled
files (tests/data/omop: the Eunomia GiBleed sample split over three stations by person, the
vocabularies as reference tables)."""

import pathlib
import tempfile

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import pandas as pd
import pytest

from conftest import DATA, REPO, start_local, stop

OMOP = DATA / "omop"
TABLES = [
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
]
REFERENCES = ["concept", "concept_ancestor"]


def omop_args():
    args = []
    for t in TABLES:
        args += ["--table", f"{t}={OMOP / t}"]
    for r in REFERENCES:
        args += ["--reference", f"{r}={OMOP / 'reference' / (r + '.parquet')}"]
    return args


@pytest.fixture(scope="module")
def pooled():
    """DuckDB over the pooled files, each row marked with its station by the split rule."""
    db = duckdb.connect()
    for t in TABLES:
        db.execute(
            f"CREATE VIEW {t} AS SELECT *, CASE WHEN person_id % 10 < 5 THEN 'station_a' "
            f"WHEN person_id % 10 < 8 THEN 'station_b' ELSE 'station_c' END AS station "
            f"FROM read_parquet('{OMOP / 'pooled' / (t + '.parquet')}')"
        )
    for r in REFERENCES:
        db.execute(
            f"CREATE VIEW {r} AS SELECT * FROM read_parquet('{OMOP / 'reference' / (r + '.parquet')}')"
        )
    return db


def federation(policy):
    tmp = tempfile.TemporaryDirectory()
    proc, url = start_local(pathlib.Path(tmp.name), policy, omop_args())
    return tmp, proc, url


@pytest.fixture(scope="module")
def open_conn():
    tmp, proc, url = federation(REPO / "tests" / "policies" / "open.toml")
    with flightsql.connect(url, autocommit=True) as conn:
        yield conn
    stop(proc)
    tmp.cleanup()


@pytest.fixture(scope="module")
def guarded_conn():
    tmp, proc, url = federation(REPO / "tests" / "policies" / "exact-k.toml")
    with flightsql.connect(url, autocommit=True) as conn:
        yield conn
    stop(proc)
    tmp.cleanup()


def fetch(conn, sql) -> pd.DataFrame:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table().to_pandas()


def same(got: pd.DataFrame, want: pd.DataFrame):
    got = got.reset_index(drop=True)
    want = want.reset_index(drop=True)
    assert got.shape == want.shape, (got, want)
    for g, w in zip(got.columns, want.columns):
        a, b = got[g], want[w]
        if pd.api.types.is_float_dtype(a) or pd.api.types.is_float_dtype(b):
            assert ((a.astype(float) - b.astype(float)).abs() <= 1e-9 * b.astype(float).abs().clip(lower=1)).all(), (a, b)
        else:
            assert [str(x) for x in a] == [str(x) for x in b], (g, a, b)


COHORT = (
    "SELECT DISTINCT co.person_id FROM condition_occurrence co JOIN concept_ancestor ca "
    "ON ca.descendant_concept_id = co.condition_concept_id WHERE ca.ancestor_concept_id = 192671"
)

QUERIES = [
    # A cohort through the vocabulary, by gender.
    f"WITH cohort AS ({COHORT}) SELECT p.gender_concept_id, count(*) AS n FROM person p "
    "JOIN cohort c ON c.person_id = p.person_id GROUP BY 1 ORDER BY 1",
    # Age at first diagnosis, per person, then its mean and spread.
    "SELECT count(*) AS n, avg(age) AS mean_age, stddev_samp(age) AS sd FROM ("
    "SELECT co.person_id, min(EXTRACT(YEAR FROM co.condition_start_date)) - min(p.year_of_birth) AS age "
    "FROM condition_occurrence co JOIN person p ON p.person_id = co.person_id "
    "WHERE co.condition_concept_id = 192671 GROUP BY co.person_id) t",
    # The drugs the cohort takes.
    f"WITH cohort AS ({COHORT}) SELECT d.drug_concept_id, count(DISTINCT d.person_id) AS n "
    "FROM drug_exposure d JOIN cohort c ON c.person_id = d.person_id GROUP BY 1 ORDER BY n DESC, 1 LIMIT 10",
    # Visits per person.
    "SELECT n, count(*) AS persons FROM (SELECT person_id, count(*) AS n FROM visit_occurrence "
    "GROUP BY person_id) t GROUP BY n ORDER BY n",
    # NOT EXISTS on the person.
    "SELECT count(*) AS n FROM person p WHERE NOT EXISTS (SELECT 1 FROM visit_occurrence v "
    "WHERE v.person_id = p.person_id)",
    # A window partitioned by the person.
    "SELECT condition_concept_id, count(*) AS n FROM (SELECT person_id, condition_concept_id, "
    "row_number() OVER (PARTITION BY person_id ORDER BY condition_start_date, condition_occurrence_id, "
    "condition_concept_id) AS rn FROM condition_occurrence) t WHERE rn = 1 GROUP BY 1 ORDER BY n DESC, 1 LIMIT 5",
    # Time from diagnosis to the end of observation.
    "SELECT avg(op.observation_period_end_date - c.first_date) AS days FROM observation_period op "
    "JOIN (SELECT person_id, min(condition_start_date) AS first_date FROM condition_occurrence "
    "WHERE condition_concept_id = 192671 GROUP BY person_id) c ON c.person_id = op.person_id",
]


@pytest.mark.parametrize("sql", QUERIES)
def test_relational_queries_equal_duckdb_over_the_pooled_files(open_conn, pooled, sql):
    same(fetch(open_conn, sql), pooled.execute(sql).df())


def test_pandas_read_sql_over_a_cohort(open_conn, pooled):
    sql = QUERIES[0]
    got = pd.read_sql(sql, open_conn)
    same(got, pooled.execute(sql).df())


def test_groups_count_persons_per_station_under_the_default_policy(guarded_conn, pooled):
    """k = 5 persons, no margin: a group leaves a station with at least 5 persons there, and
    the hub keeps merged groups of at least 5; the count released is of rows."""
    sql = "SELECT drug_concept_id, count(*) AS n FROM drug_exposure GROUP BY 1 ORDER BY 1"
    want = pooled.execute(
        "WITH per AS (SELECT station, drug_concept_id, count(*) AS n, count(DISTINCT person_id) AS p "
        "FROM drug_exposure GROUP BY 1, 2 HAVING count(DISTINCT person_id) >= 5) "
        "SELECT drug_concept_id, sum(n) AS n FROM per GROUP BY 1 HAVING sum(p) >= 5 ORDER BY 1"
    ).df()
    got = fetch(guarded_conn, sql)
    same(got, want)
    # Counting rows would have released more groups.
    by_rows = pooled.execute(
        "SELECT count(*) FROM (SELECT station, drug_concept_id FROM drug_exposure GROUP BY 1, 2 "
        "HAVING count(*) >= 5 AND count(DISTINCT person_id) < 5)"
    ).fetchone()[0]
    assert by_rows > 0


def test_one_persons_history_is_withheld(guarded_conn):
    got = fetch(
        guarded_conn,
        "SELECT condition_concept_id, count(*) AS n FROM condition_occurrence "
        "WHERE person_id = 3353 GROUP BY 1",
    )
    assert len(got) == 0


def test_a_join_on_another_key_is_refused_naming_the_rule(guarded_conn):
    with pytest.raises(Exception) as err:
        fetch(
            guarded_conn,
            "SELECT count(*) FROM condition_occurrence a JOIN condition_occurrence b "
            "ON a.condition_concept_id = b.condition_concept_id",
        )
    assert "rule row_level" in str(err.value)


def test_policies_show_the_unit_and_reference_tables(open_conn):
    got = fetch(
        open_conn,
        "SELECT table_name, privacy_unit, reference FROM railyard.policies "
        "WHERE station = 'station_a' GROUP BY 1, 2, 3 ORDER BY 1",
    )
    rows = {r.table_name: (r.privacy_unit, r.reference) for r in got.itertuples()}
    assert rows["condition_occurrence"] == ("person_id", False)
    assert rows["concept"][1] is True or rows["concept"][1] == True  # noqa: E712
    assert pd.isna(rows["concept"][0])
    # lung has patient_id: detected as its unit.
    assert rows["lung"] == ("patient_id", False)


def test_a_glm_over_an_omop_cohort_equals_statsmodels(open_conn, pooled):
    """glm() over a cohort query: persons with a GI bleed (EXISTS on the person), year of
    birth by gender, against statsmodels over the same persons from DuckDB."""
    import statsmodels.formula.api as smf

    cohort = (
        "SELECT p.year_of_birth, p.gender_concept_id FROM person p WHERE EXISTS "
        "(SELECT 1 FROM condition_occurrence co WHERE co.person_id = p.person_id "
        "AND co.condition_concept_id = 192671)"
    )
    literal = "'" + cohort.replace("'", "''") + "'"
    got = fetch(
        open_conn,
        f"SELECT * FROM glm({literal}, 'year_of_birth ~ C(gender_concept_id)', 'gaussian')",
    )
    data = pooled.execute(cohort).df()
    ref = smf.ols("year_of_birth ~ C(gender_concept_id)", data).fit()
    assert list(got.term) == ["Intercept", "C(gender_concept_id)[T.8532]"]
    for g, w in zip(got.estimate, ref.params):
        assert abs(g - w) <= 1e-9 * max(1.0, abs(w))
    for g, w in zip(got.std_error, ref.bse):
        assert abs(g - w) <= 1e-9 * max(1.0, abs(w))
