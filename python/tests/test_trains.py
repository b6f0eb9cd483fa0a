"""Trains from Python: the Python train SDK honours the contract (run here as a process,
with the environment a station gives a container), and the Rust and Python example trains
run in their images at three stations through a real ADBC client, equal to pandas on the
pooled data."""

import json
import os
import pathlib
import subprocess
import sys

import adbc_driver_flightsql.dbapi as flightsql
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from conftest import DATA, REPO, start_local, stop

TRAINS = REPO / "trains" / "python"
HISTOGRAM = "railyard/histogram:dev"
SUMMARY = "railyard/summary-python:dev"


def run_train(script: pathlib.Path, table: pa.Table, args, tmp: pathlib.Path):
    """Runs a Python train as a station would: input file, arguments, output path."""
    (tmp / "input.arrow").write_bytes(b"")
    with pa.OSFile(str(tmp / "input.arrow"), "wb") as sink:
        with ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(TRAINS),
        "RAILYARD_INPUT": str(tmp / "input.arrow"),
        "RAILYARD_OUTPUT": str(tmp / "output.arrow"),
        "RAILYARD_ARGS": args if isinstance(args, str) else json.dumps(args),
    }
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    out = None
    if done.returncode == 0:
        with pa.memory_map(str(tmp / "output.arrow"), "r") as source:
            out = ipc.open_file(source).read_all()
    return done, out


def test_the_python_example_pools_to_the_pandas_mean_and_variance(tmp_path, lung):
    # Each station's output, then the pooled mean and variance from the sums.
    outputs = []
    for station in ["station_a", "station_b", "station_c"]:
        part = pd.read_csv(DATA / "lung" / "horizontal" / "csv" / f"{station}.csv")
        table = pa.Table.from_pandas(part[["wt_loss", "sex"]], preserve_index=False)
        d = tmp_path / station
        d.mkdir()
        done, out = run_train(TRAINS / "example_summary.py", table, {"column": "wt_loss", "by": "sex"}, d)
        assert done.returncode == 0, done.stderr
        outputs.append(out.to_pandas())
    pooled = pd.concat(outputs).groupby("level")[["n", "sum", "sum_sq"]].sum()
    expected = lung.groupby("sex")["wt_loss"]
    for level, row in pooled.iterrows():
        sex = int(level)  # the example's group column is text
        values = lung.loc[lung["sex"] == sex, "wt_loss"].dropna()
        assert row["n"] == len(values)
        mean = row["sum"] / row["n"]
        var = (row["sum_sq"] - row["sum"] ** 2 / row["n"]) / (row["n"] - 1)
        np.testing.assert_allclose(mean, expected.mean()[sex], rtol=1e-12)
        np.testing.assert_allclose(var, expected.var()[sex], rtol=1e-10)


def test_the_python_sdk_reports_bad_arguments_as_a_failure(tmp_path):
    table = pa.table({"age": [60, 70]})
    done, out = run_train(TRAINS / "example_summary.py", table, {"column": "nope"}, tmp_path)
    assert done.returncode == 1 and out is None
    assert "argument 'column'" in done.stderr
    done, _ = run_train(TRAINS / "example_summary.py", table, "[not json", tmp_path)
    assert done.returncode == 1 and "JSONDecodeError" in done.stderr


def image_id(image: str) -> str:
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"image {image} is missing: run scripts/build-trains first")
    return done.stdout.strip()


def test_rust_and_python_trains_at_three_stations_through_adbc_equal_pandas(tmp_path, lung):
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'[trains]\nallowed = ["{image_id(HISTOGRAM)}", "{image_id(SUMMARY)}"]\n'
        "[tables.lung.columns]\npatient_id = \"hidden\"\n"
    )
    proc, url = start_local(tmp_path, policy)
    try:
        with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cur:
            edges = [40, 50, 60, 70, 80]
            cur.execute(
                "SELECT bin_lower, sum(n) AS n FROM train("
                f"'{HISTOGRAM}', 'SELECT age FROM lung WHERE ph_ecog >= 1', "
                f"'{json.dumps({'column': 'age', 'edges': edges})}') "
                "GROUP BY bin_lower ORDER BY bin_lower"
            )
            got = cur.fetch_arrow_table().to_pandas()
            cur.execute(
                f"SELECT station, count(*) AS bins FROM train('{HISTOGRAM}', 'SELECT age FROM lung', "
                "'{\"column\": \"age\", \"edges\": [0, 100]}') GROUP BY station ORDER BY station"
            )
            stations = cur.fetch_arrow_table().to_pandas()
            # The Python example in its own image: per-station sums, pooled at the hub.
            cur.execute(
                "SELECT level, sum(n) AS n, sum(\"sum\") / sum(n) AS mean, "
                "(sum(sum_sq) - sum(\"sum\") * sum(\"sum\") / sum(n)) / (sum(n) - 1) AS var "
                f"FROM train('{SUMMARY}', 'SELECT wt_loss, sex FROM lung', "
                "'{\"column\": \"wt_loss\", \"by\": \"sex\"}') GROUP BY level ORDER BY level"
            )
            summary = cur.fetch_arrow_table().to_pandas()
    finally:
        stop(proc)
    ages = lung.loc[lung["ph_ecog"] >= 1, "age"]
    expected = pd.cut(ages, bins=edges, right=False).value_counts(sort=False).to_numpy()
    assert list(got["bin_lower"]) == [float(e) for e in edges[:-1]]
    assert list(got["n"]) == list(expected)
    assert list(stations["station"]) == ["station_a", "station_b", "station_c"]
    assert list(stations["bins"]) == [1, 1, 1]
    expected = lung.groupby("sex")["wt_loss"]
    # The example declares its group column as text, whatever the input's type.
    assert list(summary["level"]) == ["1", "2"]
    assert list(summary["n"]) == list(expected.count())
    np.testing.assert_allclose(summary["mean"], expected.mean(), rtol=1e-12)
    np.testing.assert_allclose(summary["var"], expected.var(), rtol=1e-10)
