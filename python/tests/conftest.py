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


def start_local(tmp: pathlib.Path, policy: "pathlib.Path | None", extra=()):
    """Starts `railyard local` over the lung and breast_cancer stations (and whatever
    `extra` arguments add); returns the process and the hub's URL."""
    binary = railyard_binary()
    if not binary.exists():
        pytest.fail(f"{binary} does not exist: build it with `cargo build` or set RAILYARD_BIN")
    args = [
        str(binary),
        "local",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp),
        "--table",
        f"lung={DATA / 'lung' / 'horizontal' / 'csv'}",
        "--table",
        f"breast_cancer={DATA / 'breast_cancer' / 'horizontal' / 'parquet'}",
    ]
    if policy is not None:
        args += ["--policy", str(policy)]
    args += list(extra)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    prefix = "hub listening on "
    if not line.startswith(prefix):
        proc.kill()
        pytest.fail(f"railyard local did not start: {line!r} {proc.stderr.read()}")
    return proc, line[len(prefix):]


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


@pytest.fixture(scope="session")
def hub_url(tmp_path_factory):
    """A federation under the open test policy (every column public, k = 1): answers
    must equal pandas on the pooled data exactly."""
    proc, url = start_local(tmp_path_factory.mktemp("open"), REPO / "tests" / "policies" / "open.toml")
    yield url
    stop(proc)


@pytest.fixture(scope="session")
def guarded_hub():
    """A federation under the stations' default policy (nothing row-level, k = 5); yields
    (hub URL, data directory holding the audit logs). Clients name their researcher
    (`--named-researchers`), so each test can start with a fresh query-set memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_local(pathlib.Path(tmp), None, ["--named-researchers"])
        yield url, pathlib.Path(tmp)
        stop(proc)


@pytest.fixture(scope="session")
def lung():
    import pandas as pd

    return pd.read_csv(DATA / "lung" / "full.csv")


@pytest.fixture(scope="session")
def breast_cancer():
    import pandas as pd

    return pd.read_csv(DATA / "breast_cancer" / "full.csv")


def chromium(*arguments, downloads=None):
    """A headless Debian chromium driven by selenium, at 1280 px (`arguments` are added to
    its command line; `downloads` is where it saves files). Skips without the browser,
    unless RAILYARD_REQUIRE_BROWSER is set (as .ci/run does), where it fails."""
    import shutil

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        message = "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        if os.environ.get("RAILYARD_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900", *arguments]:
        options.add_argument(argument)
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where a browser test saves its screenshots: RAILYARD_SCREENSHOTS (docs/console/ holds
    the ones docs/console.md shows), or a temporary directory."""
    target = os.environ.get("RAILYARD_SCREENSHOTS")
    path = pathlib.Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait(browser, condition, timeout=30):
    """Waits until `condition(browser)` is true (or fails after `timeout` seconds)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)
