"""The web console in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) against a running `railyard local` under the stations' default policy:
the overview lists the stations online, a query's table equals the same query through ADBC
Flight SQL, Explain lists each station's fragment and the hub's merge, a refusal shows its
rule, sorting a column reorders the rows, the CSV download equals the answer, and a
Kaplan–Meier answer and a model are drawn (one curve and band per group, one estimate per
term).

Screenshots of each view go to the test's temporary directory, or to the directory in
RAILYARD_SCREENSHOTS (docs/console/ holds the ones docs/console.md shows)."""

import csv
import time

import adbc_driver_flightsql.dbapi as flightsql
import pytest

from conftest import chromium, start_local, stop, wait

SQL = "SELECT sex, count(*) AS patients, avg(age) AS mean_age FROM lung GROUP BY sex ORDER BY sex"


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    proc, url = start_local(tmp_path_factory.mktemp("browser"), None)
    line = proc.stdout.readline().strip()
    assert line.startswith("console at "), line
    yield url, line[len("console at "):]
    stop(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    driver = chromium(downloads=downloads)
    driver.downloads = downloads
    yield driver
    driver.quit()


def ask(browser, sql, button):
    from selenium.webdriver.common.by import By

    from selenium.webdriver.common.keys import Keys

    editor = browser.find_element(By.ID, "sql")
    editor.clear()
    editor.send_keys(sql)
    # Escape closes a completion list the last word may have opened over the buttons.
    editor.send_keys(Keys.ESCAPE)
    browser.find_element(By.ID, button).click()


def result_rows(browser):
    from selenium.webdriver.common.by import By

    table = browser.find_element(By.CSS_SELECTOR, "#result table")
    header = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    return header, rows


def test_the_console_in_a_browser(console, browser, shots):
    from selenium.webdriver.common.by import By

    url, page = console
    browser.get(page)
    # The overview: three stations online, the tables listed.
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#stations td.online")) == 3)
    wait(browser, lambda b: "lung" in b.find_element(By.ID, "tables").text)
    tables = browser.find_element(By.ID, "tables").text
    assert "lung" in tables and "breast_cancer" in tables
    browser.save_screenshot(str(shots / "overview.png"))

    # A query: the table equals Flight SQL's answer.
    ask(browser, SQL, "run")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#result table tbody tr"))
    header, rows = result_rows(browser)
    assert header == ["sex", "patients", "mean_age"]
    with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(SQL)
        flight = cur.fetch_arrow_table().to_pylist()
    assert [[int(r[0]), int(r[1])] for r in rows] == [[f["sex"], f["patients"]] for f in flight]
    assert [float(r[2]) for r in rows] == pytest.approx([f["mean_age"] for f in flight], rel=1e-12)
    assert "2 rows" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(shots / "answer.png"))

    # Sorting by a column: a click on "sex" twice puts sex 2 first.
    sex = browser.find_element(By.CSS_SELECTOR, "#result thead th")
    sex.click()
    sex.click()
    assert sex.get_attribute("aria-sort") == "descending"
    assert [r[0] for r in result_rows(browser)[1]] == ["2", "1"]

    # The CSV download holds the answer.
    browser.find_element(By.ID, "download-csv").click()
    target = browser.downloads / "railyard-answer.csv"
    deadline = time.time() + 30
    while not target.exists() and time.time() < deadline:
        time.sleep(0.1)
    with open(target, encoding="utf-8") as f:
        downloaded = list(csv.DictReader(f))
    assert [int(r["patients"]) for r in downloaded] == [f["patients"] for f in flight]

    # Explain: each station's fragment, then the hub.
    ask(browser, SQL, "explain")
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#result details")) == 4)
    summaries = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "#result details summary")]
    assert [s.split(":")[0] for s in summaries] == ["station_a", "station_b", "station_c", "hub"]
    assert "partial" in browser.find_element(By.CSS_SELECTOR, "#result details pre").text
    browser.save_screenshot(str(shots / "explain.png"))

    # A refusal: its rule, shown as an alert, no stack trace.
    ask(browser, "SELECT age FROM lung WHERE age > 80", "run")
    wait(browser, lambda b: b.find_element(By.ID, "refusal").is_displayed())
    refusal = browser.find_element(By.ID, "refusal")
    assert "rule row_level" in refusal.text
    assert refusal.get_attribute("role") == "alert"
    assert "panicked" not in refusal.text and "backtrace" not in refusal.text
    browser.save_screenshot(str(shots / "refusal.png"))

    # A Kaplan–Meier answer is drawn: one curve and one band per group.
    ask(browser, "SELECT * FROM kaplan_meier('lung', 'time', 'status', 'sex')", "run")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#result svg.survival"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result svg.survival path.curve")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result svg.survival path.band")) == 2
    # The number at risk under the axis, per group and tick; at time 0 it is every patient
    # of the group.
    at_risk = browser.find_elements(By.CSS_SELECTOR, "#result svg.survival text.at-risk")
    assert len(at_risk) == 2 * 6
    assert sorted(int(a.text) for a in at_risk[::6]) == [90, 138]
    browser.execute_script("document.getElementById('status').scrollIntoView()")
    browser.save_screenshot(str(shots / "kaplan-meier.png"))

    # A model is drawn as a forest plot: one estimate per term.
    ask(browser, "SELECT * FROM glm('lung', 'status ~ age + sex', 'binomial')", "run")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#result svg.forest"))
    terms = [r[0] for r in result_rows(browser)[1]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result svg.forest circle.estimate")) == len(terms) == 3
    browser.execute_script("document.getElementById('status').scrollIntoView()")
    browser.save_screenshot(str(shots / "glm.png"))

    # The history lists the queries just run, newest first; choosing one puts it back.
    wait(browser, lambda b: "glm(" in b.find_element(By.CSS_SELECTOR, "#history li button").text)
    entries = browser.find_elements(By.CSS_SELECTOR, "#history li button")
    assert any("kaplan_meier(" in e.text for e in entries)
    refused = browser.find_elements(By.CSS_SELECTOR, "#history li.refused")
    assert refused and "rule row_level" in refused[0].text
    refused[0].find_element(By.TAG_NAME, "button").click()
    assert browser.find_element(By.ID, "sql").get_attribute("value") == "SELECT age FROM lung WHERE age > 80"

    # Keyboard: Ctrl+Enter in the editor runs.
    from selenium.webdriver.common.keys import Keys

    editor = browser.find_element(By.ID, "sql")
    editor.clear()
    editor.send_keys("SELECT count(*) AS n FROM lung")
    editor.send_keys(Keys.CONTROL, Keys.ENTER)
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#result table tbody tr"))
    assert result_rows(browser) == (["n"], [["228"]])

    # The editor highlights what it knows, and completes from the catalog.
    editor.clear()
    editor.send_keys("SELECT count(*) FROM lu")
    wait(browser, lambda b: b.find_element(By.ID, "completions").is_displayed())
    options = [li.text.split()[0] for li in browser.find_elements(By.CSS_SELECTOR, "#completions li")]
    assert options[0] == "lung", options
    editor.send_keys(Keys.TAB)
    assert editor.get_attribute("value") == "SELECT count(*) FROM lung"
    assert not browser.find_element(By.ID, "completions").is_displayed()
    kinds = {s.text: s.get_attribute("class") for s in browser.find_elements(By.CSS_SELECTOR, "#highlight span")}
    assert kinds["SELECT"] == kinds["FROM"] == "tok-keyword"
    assert kinds["count"] == "tok-function" and kinds["lung"] == "tok-table", kinds
    # Columns too: "a" offers age; arrow keys move, Enter accepts.
    editor.send_keys(" WHERE a")
    wait(browser, lambda b: b.find_element(By.ID, "completions").is_displayed())
    options = [li.text.split()[0] for li in browser.find_elements(By.CSS_SELECTOR, "#completions li")]
    assert "age" in options, options
    for _ in range(options.index("age")):
        editor.send_keys(Keys.ARROW_DOWN)
    browser.save_screenshot(str(shots / "editor.png"))
    editor.send_keys(Keys.ENTER)
    assert editor.get_attribute("value") == "SELECT count(*) FROM lung WHERE age"
    kinds = {s.text: s.get_attribute("class") for s in browser.find_elements(By.CSS_SELECTOR, "#highlight span")}
    assert kinds["age"] == "tok-column"

    # The overview tells each table's rules: k and the privacy unit per station.
    facts = browser.find_element(By.ID, "tables").get_attribute("textContent")
    assert "k: 5" in facts and "privacy unit" in facts
