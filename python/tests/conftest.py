"""Shared fixtures: a real `railyard local` federation, started as a process."""

import os
import pathlib
import signal
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


def railyard_binary() -> pathlib.Path:
    explicit = os.environ.get("RAILYARD_BIN")
    if explicit:
        return pathlib.Path(explicit)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "railyard"


@pytest.fixture(scope="session")
def hub_url():
    binary = railyard_binary()
    if not binary.exists():
        pytest.fail(f"{binary} does not exist: build it with `cargo build` or set RAILYARD_BIN")
    proc = subprocess.Popen(
        [
            str(binary),
            "local",
            "--listen",
            "127.0.0.1:0",
            "--table",
            f"lung={DATA / 'lung' / 'horizontal' / 'csv'}",
            "--table",
            f"breast_cancer={DATA / 'breast_cancer' / 'horizontal' / 'parquet'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    prefix = "hub listening on "
    if not line.startswith(prefix):
        proc.kill()
        pytest.fail(f"railyard local did not start: {line!r} {proc.stderr.read()}")
    yield line[len(prefix):]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


@pytest.fixture(scope="session")
def lung():
    import pandas as pd

    return pd.read_csv(DATA / "lung" / "full.csv")


@pytest.fixture(scope="session")
def breast_cancer():
    import pandas as pd

    return pd.read_csv(DATA / "breast_cancer" / "full.csv")
