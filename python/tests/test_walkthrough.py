"""docs/deployment.md's walk-through, pasted as one script (scripts/walkthrough): certificates,
three stations (one on PostgreSQL, one outbound), the hub, a researcher's query, then the
vertical table across all three stations after they restart with the collaboration secret
and the hub re-reads hub.toml. The answers are checked against pandas over the same files."""

import os
import subprocess

import numpy as np
import pandas as pd

from conftest import DATA, REPO, railyard_binary


def ascii_tables(text: str) -> list[list[list[str]]]:
    """The tables `railyard sql` printed, as rows of cells (header first)."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif line.startswith("+"):
            continue
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def test_the_deployment_walkthrough_runs_as_pasted():
    env = {**os.environ, "RAILYARD_BIN": str(railyard_binary())}
    done = subprocess.run(
        [str(REPO / "scripts" / "walkthrough")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    tables = ascii_tables(done.stdout)
    assert len(tables) == 2, done.stdout[-6000:]
    lung_table, breast_table = tables

    lung = pd.read_csv(DATA / "lung" / "full.csv")
    expected = lung.groupby("sex").agg(n=("age", "size"), age=("age", "mean"))
    assert lung_table[0] == ["sex", "n", "age"]
    for (sex, n, age), (want_sex, want) in zip(lung_table[1:], expected.iterrows(), strict=True):
        assert int(sex) == want_sex and int(n) == want["n"]
        np.testing.assert_allclose(float(age), want["age"], rtol=1e-12)

    parts = [pd.read_csv(DATA / "breast_cancer" / "vertical" / "csv" / f"station_{s}.csv") for s in "abc"]
    joined = parts[0].merge(parts[1], on="patient_id").merge(parts[2], on="patient_id")
    expected = joined.groupby("diagnosis").agg(
        n=("patient_id", "size"), radius=("mean_radius", "mean"), worst_area=("worst_area", "mean")
    )
    assert breast_table[0] == ["diagnosis", "n", "radius", "worst_area"]
    for row, (diagnosis, want) in zip(breast_table[1:], expected.iterrows(), strict=True):
        assert int(row[0]) == diagnosis and int(row[1]) == want["n"]
        np.testing.assert_allclose(float(row[2]), want["radius"], rtol=1e-12)
        np.testing.assert_allclose(float(row[3]), want["worst_area"], rtol=1e-12)
