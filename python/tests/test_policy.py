"""The stations' default policy, seen from a real ADBC client: refusals arrive as errors
that name the rule, and grouped answers hold only groups of at least k = 5 rows per station.
The reference is pandas on each station's own file."""

import pathlib
import uuid

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pandas as pd
import pytest

from conftest import DATA

K = 5
STATIONS = ["station_a", "station_b", "station_c"]


@pytest.fixture()
def conn(guarded_hub):
    """A connection as a researcher of its own: the stations' query-set auditor remembers
    what each researcher was released, and one test's queries must not meet another's."""
    url, _ = guarded_hub
    researcher = f"test-{uuid.uuid4().hex[:12]}"
    header = "adbc.flight.sql.rpc.call_header.x-railyard-researcher"
    with flightsql.connect(url, db_kwargs={header: researcher}, autocommit=True) as connection:
        yield connection


def fetch(conn, sql) -> pd.DataFrame:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table().to_pandas()


def refusal(conn, sql) -> str:
    with conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute(sql)
            cur.fetch_arrow_table()
    return str(err.value)


def test_row_level_and_single_values_are_refused_with_the_rule(conn):
    text = refusal(conn, "SELECT age FROM lung")
    assert "policy:" in text and "'age'" in text and "row-level" in text, text
    text = refusal(conn, "SELECT min(age) FROM lung")
    assert "min() would release a single value" in text, text


def test_refusals_never_echo_a_value(conn):
    # A cast that would fail on a data value is refused before it runs.
    text = refusal(conn, "SELECT count(*) FROM lung WHERE CAST(CAST(age AS VARCHAR) || 'x' AS INT) = 1")
    assert "fallible_expression" in text or "can fail" in text, text
    lung = pd.read_csv(DATA / "lung" / "full.csv")
    for value in lung["age"].astype(str).unique():
        assert f"'{value}'" not in text


def test_grouped_counts_keep_only_groups_of_k_per_station(conn):
    got = fetch(conn, "SELECT inst, count(*) AS n FROM lung GROUP BY inst")
    # Reference: per station, groups of at least `floor` rows; then summed over stations.
    # A station releases a group of k + 3 rows or more always, one below k never, and one
    # in between by a keyed hash of its rows (the noisy margin, threshold_noise = 3).
    def reference(floor):
        parts = []
        for s in STATIONS:
            df = pd.read_csv(DATA / "lung" / "horizontal" / "csv" / f"{s}.csv")
            counts = df.groupby("inst").size()
            parts.append(counts[counts >= floor])
        summed = pd.concat(parts).groupby(level=0).sum()
        return summed[summed >= K]

    sure, most = reference(K + 3), reference(K)
    got = got.dropna(subset=["inst"]).set_index("inst")["n"].sort_index()
    for inst, n in sure.items():
        assert inst in got.index and got.loc[inst] >= n, (inst, got, sure)
    for inst, n in got.items():
        assert inst in most.index and n <= most.loc[inst], (inst, got, most)
    assert (got >= K).all()
    # Something is withheld: the pooled answer has more groups.
    assert len(got) < len(pd.read_csv(DATA / "lung" / "full.csv")["inst"].dropna().unique())


def test_every_decision_is_in_an_audit_log(conn, guarded_hub):
    _, data_dir = guarded_hub
    refusal(conn, "SELECT max(age) FROM lung")
    logs = sorted(pathlib.Path(data_dir).glob("*/audit.jsonl"))
    assert [p.parent.name for p in logs] == STATIONS
    import json

    records = [json.loads(line) for p in logs for line in p.read_text().splitlines()]
    refused = [r for r in records if r["decision"] == "refused" and "max(" in r["sql"]]
    assert refused and all(r["rule"] == "unsafe_aggregate" for r in refused)


def test_grouped_answers_say_how_many_groups_each_station_withheld(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT age, count(*) AS n FROM lung GROUP BY age")
        table = cur.fetch_arrow_table()
    import json

    withheld = json.loads((table.schema.metadata or {})[b"railyard.withheld"])
    assert set(withheld["stations"]) == set(STATIONS), withheld
    # Reference: a station withholds every group below k, never one of k + 3 rows or more
    # (the noisy margin decides in between).
    for s in STATIONS:
        sizes = pd.read_csv(DATA / "lung" / "horizontal" / "csv" / f"{s}.csv").groupby("age").size()
        below, at_most = int((sizes < K).sum()), int((sizes < K + 3).sum())
        assert below <= withheld["stations"][s] <= at_most, (s, withheld, below, at_most)
    # Every station has the same k, so every merged group of released groups reaches it.
    assert withheld["hub"] == 0
