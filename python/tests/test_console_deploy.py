"""The console of a deployed hub and a station's audit page, against real processes: a hub
and two stations with mutual TLS on loopback (`railyard certs`), the hub's console on HTTPS
(`console_listen`), one station's audit page (`admin_listen`, `admin_token_file`).

- No page and no API call works without a valid token (none, malformed, unknown, revoked);
  the sign-in page shows nothing else, and its cookie is HttpOnly, Secure and SameSite.
- One researcher never sees another collaboration's stations, tables, policies or history.
- A running query can be cancelled by its researcher, and by no one else.
- The station's page lists its decisions (filterable), the ε each researcher spent (equal to
  what the answers said they charged), and `audit verify`'s verdict, which turns to broken
  when a record is altered.
- In headless Chromium: signing in, the collaboration's overview, and a station going
  offline there when its process stops; the station's page after signing in.
"""

import http.client
import json
import ssl
import threading
import time
import urllib.parse

import pytest

from conftest import DATA, chromium, wait
from test_deploy import POLICY, Process, railyard, station_config, write

LUNG = DATA / "lung" / "horizontal" / "parquet"
BREAST = DATA / "breast_cancer" / "horizontal" / "parquet"
ADMIN_TOKEN = "a" * 8 + "0123456789abcdef" * 3


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-deploy")
    write(tmp / "policy.toml", POLICY)
    certs = tmp / "certs"
    railyard("certs", "init", "--dir", certs, "--collaboration", "console")
    railyard("certs", "issue", "--dir", certs, "--name", "hub", "--host", "127.0.0.1")
    for name in ["amsterdam", "leiden"]:
        railyard("certs", "issue", "--dir", certs, "--name", name, "--host", "127.0.0.1")
    token_file = write(tmp / "admin.token", f"# amsterdam's audit page\n{ADMIN_TOKEN}\n")
    token_file.chmod(0o600)
    processes = []

    def start(name, args):
        p = Process(name, args, tmp)
        processes.append(p)
        return p

    amsterdam = start("amsterdam", ["station", "--config", station_config(
        tmp, "amsterdam",
        'listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\nadmin_token_file = "admin.token"',
        f"""
[[tables]]
name = "lung"
path = "{LUNG / 'station_a.parquet'}"

[[tables]]
name = "breast_cancer"
path = "{BREAST / 'station_a.parquet'}"
""")])
    leiden = start("leiden", ["station", "--config", station_config(
        tmp, "leiden", 'listen = "127.0.0.1:0"', f"""
[[tables]]
name = "lung"
path = "{LUNG / 'station_b.parquet'}"
""")])
    addresses = {"amsterdam": amsterdam.expect("station amsterdam listening on ")}
    admin = amsterdam.expect("station admin at ")
    addresses["leiden"] = leiden.expect("station leiden listening on ")
    config = write(tmp / "hub.toml", f"""
listen = "127.0.0.1:0"
console_listen = "127.0.0.1:0"
data_dir = "state/hub"
station_check_seconds = 1

[tls]
ca = "certs/ca.pem"
cert = "certs/hub.pem"
key = "certs/hub.key"

[[stations]]
name = "amsterdam"
address = "{addresses['amsterdam']}"

[[stations]]
name = "leiden"
address = "{addresses['leiden']}"

[collaborations.lung]
stations = ["amsterdam", "leiden"]
tables = ["lung"]
researchers = ["alice", "carol", "dora"]

[collaborations.breast]
stations = ["amsterdam"]
tables = ["breast_cancer"]
researchers = ["bob"]
""")
    hub = start("hub", ["hub", "--config", config])
    url = hub.expect("hub listening on ")
    console = hub.expect("console at ")

    def token(researcher, collaboration):
        return railyard("token", "create", "--config", config, "--researcher", researcher,
                        "--collaboration", collaboration, "--expires-in", "1d").stdout.strip()

    revoked = token("carol", "lung")
    railyard("token", "revoke", "--config", config, revoked.split("_")[1])
    yield {
        "url": url,
        "console": console,
        "admin": admin,
        "ca": certs / "ca.pem",
        "alice": token("alice", "lung"),
        "bob": token("bob", "breast"),
        "dora": token("dora", "lung"),
        "revoked": revoked,
        "audit": tmp / "state" / "amsterdam" / "audit.jsonl",
        "leiden": leiden,
    }
    for p in reversed(processes):
        p.stop()


def https(deployed, base, path, body=None, token=None, cookie=None, method=None):
    """(status, headers, body) of one HTTPS request, the server checked against the CA;
    redirects are not followed."""
    parts = urllib.parse.urlsplit(base)
    context = ssl.create_default_context(cafile=str(deployed["ca"]))
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=120)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        headers["Cookie"] = cookie
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method or ("GET" if body is None else "POST"), path, body=data, headers=headers)
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out


def api(deployed, path, token, body=None):
    status, _, data = https(deployed, deployed["console"], path, body, token=token)
    return status, json.loads(data)


PAGES = ["/", "/console.js", "/editor.js"]
GETS = ["/api/answer/q1", "/api/catalog", "/api/stations", "/api/policies", "/api/budget", "/api/history", "/api/session"]
POSTS = ["/api/query", "/api/explain", "/api/cancel", "/api/logout"]


def test_no_page_or_call_works_without_a_valid_token(deployed):
    console = deployed["console"]
    assert console.startswith("https://")
    for token in [None, "not-a-token", "ryt_000000000000_" + "0" * 64, deployed["revoked"]]:
        for page in PAGES:
            status, headers, body = https(deployed, console, page, token=token)
            assert status == 303 and headers["location"] == "/login", (page, token, status)
            assert b"lung" not in body and b"SELECT" not in body
        for path in GETS:
            status, headers, body = https(deployed, console, path, token=token)
            assert status == 401, (path, token, status, body)
            assert "Bearer" in headers["www-authenticate"]
            assert b"lung" not in body and b"breast" not in body
            if token:
                assert token.encode() not in body
        for path in POSTS:
            status, _, body = https(deployed, console, path, {"sql": "SELECT count(*) FROM lung", "id": "q1"}, token=token)
            assert status == 401, (path, token, status, body)
    # The revoked token is refused as revoked.
    _, _, body = https(deployed, console, "/api/catalog", token=deployed["revoked"])
    assert "revoked" in json.loads(body)["error"]
    # The sign-in page is served, and is only a token field.
    status, headers, body = https(deployed, console, "/login")
    assert status == 200 and b'type="password"' in body and b"lung" not in body
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    # Plain HTTP on the console's port gets no page.
    parts = urllib.parse.urlsplit(console)
    plain = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain.request("GET", "/")
        plain.getresponse().read()


def test_signing_in_keeps_the_token_in_a_guarded_cookie(deployed):
    console = deployed["console"]
    status, headers, body = https(deployed, console, "/api/login", {"token": "ryt_nope_nope"})
    assert status == 401 and "set-cookie" not in {k.lower() for k in headers}
    status, headers, body = https(deployed, console, "/api/login", {"token": deployed["bob"]})
    assert status == 200 and json.loads(body) == {"researcher": "bob", "collaboration": "breast"}
    cookie = headers["set-cookie"]
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"]:
        assert attribute in cookie
    jar = cookie.split(";")[0]
    status, _, body = https(deployed, console, "/api/session", cookie=jar)
    assert status == 200 and json.loads(body)["researcher"] == "bob"
    status, _, body = https(deployed, console, "/", cookie=jar)
    assert status == 200 and b'<textarea id="sql"' in body
    # Another cookie name (a station's page on the same host) is not the console's.
    status, _, _ = https(deployed, console, "/api/session", cookie=jar.replace("railyard_console", "railyard_admin"))
    assert status == 401


def public_tables(catalog):
    return sorted(t["name"] for t in catalog["tables"] if t["schema"] == "public")


def test_a_researcher_sees_only_their_collaboration(deployed):
    import adbc_driver_flightsql.dbapi as flightsql
    from adbc_driver_flightsql import DatabaseOptions

    alice, bob = deployed["alice"], deployed["bob"]
    status, catalog = api(deployed, "/api/catalog", alice)
    assert status == 200 and public_tables(catalog) == ["lung"]
    status, catalog = api(deployed, "/api/catalog", bob)
    assert status == 200 and public_tables(catalog) == ["breast_cancer"]

    def column(answer, name):
        i = [c["name"] for c in answer["columns"]].index(name)
        return sorted({row[i] for row in answer["rows"]})

    assert column(api(deployed, "/api/stations", alice)[1], "station") == ["amsterdam", "leiden"]
    assert column(api(deployed, "/api/stations", bob)[1], "station") == ["amsterdam"]
    assert column(api(deployed, "/api/policies", alice)[1], "table_name") == ["lung"]
    assert column(api(deployed, "/api/policies", bob)[1], "table_name") == ["breast_cancer"]

    # alice's answer equals Flight SQL's with the same token, and pandas on her stations.
    sql = "SELECT sex, count(*) AS n, avg(age) AS mean_age FROM lung GROUP BY sex ORDER BY sex"
    status, answer = api(deployed, "/api/query", alice, {"sql": sql})
    assert status == 200, answer
    kwargs = {DatabaseOptions.TLS_ROOT_CERTS.value: deployed["ca"].read_text(),
              DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {alice}"}
    with flightsql.connect(deployed["url"], db_kwargs=kwargs) as conn, conn.cursor() as cur:
        cur.execute(sql)
        flight = cur.fetch_arrow_table().to_pylist()
    assert answer["rows"] == [[r["sex"], r["n"], r["mean_age"]] for r in flight]
    import pandas as pd

    pooled = pd.concat([pd.read_parquet(LUNG / f"station_{s}.parquet") for s in "ab"])
    assert [r[1] for r in answer["rows"]] == list(pooled.groupby("sex").size())

    # Neither reaches the other's table, through any call.
    for token, other in [(alice, "breast_cancer"), (bob, "lung")]:
        for path in ["/api/query", "/api/explain"]:
            status, failure = api(deployed, path, token, {"sql": f"SELECT count(*) FROM {other}"})
            assert status >= 400 and "error" in failure, (path, failure)
    # Each history holds only its owner's queries.
    alice_history = api(deployed, "/api/history", alice)[1]["entries"]
    bob_history = api(deployed, "/api/history", bob)[1]["entries"]
    assert alice_history and all(e["researcher"] == "alice" and e["collaboration"] == "lung" for e in alice_history)
    assert bob_history and all(e["researcher"] == "bob" and e["collaboration"] == "breast" for e in bob_history)
    assert any(e["sql"] == sql for e in alice_history) and not any(e["sql"] == sql for e in bob_history)


# Tens of billions of joined rows: it runs until cancelled.
SLOW = ("SELECT count(*) AS n FROM lung a JOIN lung b ON a.sex = b.sex JOIN lung c ON b.sex = c.sex "
        "JOIN lung d ON c.sex = d.sex JOIN lung e ON d.sex = e.sex")


def test_a_running_query_is_cancelled_by_its_researcher_only(deployed):
    alice, bob = deployed["alice"], deployed["bob"]
    outcome = {}

    def slow():
        outcome["answer"] = api(deployed, "/api/query", alice, {"sql": SLOW, "id": "slow-1"})

    runner = threading.Thread(target=slow)
    runner.start()
    # Until it is registered, cancelling finds nothing; bob never finds alice's query.
    deadline = time.time() + 60
    while True:
        assert api(deployed, "/api/cancel", bob, {"id": "slow-1"})[0] == 404
        status, body = api(deployed, "/api/cancel", alice, {"id": "slow-1"})
        if status == 200:
            assert body == {"cancelled": True}
            break
        assert status == 404 and runner.is_alive(), (status, body, outcome)
        assert time.time() < deadline
        time.sleep(0.2)
    runner.join(timeout=60)
    assert not runner.is_alive()
    status, failure = outcome["answer"]
    assert status == 409 and failure["error"].startswith("cancelled"), failure
    # The hub goes on answering, and the history says what happened.
    assert api(deployed, "/api/query", alice, {"sql": "SELECT count(*) AS n FROM lung"})[0] == 200
    entries = api(deployed, "/api/history", alice)[1]["entries"]
    assert any(e["sql"] == SLOW and e["outcome"] == "cancelled" for e in entries)
    # An id is letters, digits and '-'.
    assert api(deployed, "/api/cancel", alice, {"id": "<script>"})[0] == 400


def test_a_download_is_the_answer_shown_not_a_second_run(deployed):
    """A DP answer downloaded from the page holds the same noisy values, and costs no more
    budget: the hub kept the answer instead of running the query again."""
    import csv
    import io

    dora, alice = deployed["dora"], deployed["alice"]
    dp = "SELECT sex, dp_count(*) AS n FROM lung GROUP BY sex ORDER BY sex"

    def spent():
        budget = api(deployed, "/api/budget", dora)[1]
        names = [c["name"] for c in budget["columns"]]
        return {r[names.index("station")]: r[names.index("spent")] for r in budget["rows"]}

    status, answer = api(deployed, "/api/query", dora, {"sql": dp, "id": "dp-1"})
    assert status == 200, answer
    after_query = spent()
    assert after_query == {"amsterdam": 0.5, "leiden": 0.5}
    status, headers, body = https(deployed, deployed["console"], "/api/answer/dp-1?format=csv", token=dora)
    assert status == 200 and headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [[int(r["sex"]), float(r["n"])] for r in rows] == [[r[0], float(r[1])] for r in answer["rows"]]
    status, _, _ = https(deployed, deployed["console"], "/api/answer/dp-1?format=parquet", token=dora)
    assert status == 200
    assert spent() == after_query
    # Only dora's: another researcher, or an id never answered, finds nothing.
    assert https(deployed, deployed["console"], "/api/answer/dp-1?format=csv", token=alice)[0] == 404
    assert https(deployed, deployed["console"], "/api/answer/dp-2?format=csv", token=dora)[0] == 404
    assert https(deployed, deployed["console"], "/api/answer/dp-1?format=xlsx", token=dora)[0] == 400


def admin(deployed, path, token=ADMIN_TOKEN, cookie=None, body=None):
    return https(deployed, deployed["admin"], path, body, token=token, cookie=cookie)


def test_the_station_page_needs_its_token(deployed):
    for token in [None, "x" * 40, deployed["alice"]]:
        for page in ["/", "/admin.js"]:
            status, headers, _ = admin(deployed, page, token=token)
            assert status == 303 and headers["location"] == "/login"
        for path in ["/api/audit", "/api/verify", "/api/spending"]:
            status, _, body = admin(deployed, path, token=token)
            assert status == 401 and b"SELECT" not in body
    status, headers, _ = admin(deployed, "/api/login", token=None, body={"token": ADMIN_TOKEN})
    assert status == 200 and "railyard_admin=" in headers["set-cookie"]


def test_the_station_page_shows_decisions_spending_and_the_chain(deployed):
    alice, bob = deployed["alice"], deployed["bob"]
    dp = "SELECT sex, dp_count(*) AS n FROM lung GROUP BY sex"
    charged = 0.0
    for _ in range(2):
        status, answer = api(deployed, "/api/query", alice, {"sql": dp})
        assert status == 200, answer
        charged += answer["epsilon"]["amsterdam"]
    # The budget (1.0, 0.5 a query) is spent: the third is refused at the stations.
    status, refusal = api(deployed, "/api/query", alice, {"sql": dp})
    assert status == 403 and refusal["rule"], refusal
    assert api(deployed, "/api/query", bob, {"sql": "SELECT count(*) AS n FROM breast_cancer"})[0] == 200

    # Spending: alice's ε on lung, as the answers reported it; bob spent none.
    status, _, body = admin(deployed, "/api/spending")
    spending = json.loads(body)
    assert spending["budget"] == 1.0
    accounts = {(a["researcher"], a["collaboration"], a["table"]): a for a in spending["accounts"]}
    assert accounts[("alice", "lung", "lung")]["spent"] == pytest.approx(charged)
    assert accounts[("alice", "lung", "lung")]["charges"] == 2
    assert not any(r == "bob" for r, _, _ in accounts)

    # Decisions, filtered; the log file itself is the reference.
    records = [json.loads(line) for line in deployed["audit"].read_text().splitlines()]
    status, _, body = admin(deployed, "/api/audit?limit=1000")
    everything = json.loads(body)
    assert everything["station"] == "amsterdam" and everything["matched"] == len(records)
    assert [r["seq"] for r in everything["records"]] == sorted((r["seq"] for r in records), reverse=True)
    query = urllib.parse.urlencode({"researcher": "alice", "decision": "refused"})
    refused = json.loads(admin(deployed, f"/api/audit?{query}")[2])
    want = [r for r in records if r["researcher"] == "alice" and r["decision"] == "refused"]
    assert refused["matched"] == len(want) >= 1
    assert all(r["rule"] == refusal["rule"] for r in refused["records"] if "dp_count" in r["sql"])
    bobs = json.loads(admin(deployed, "/api/audit?researcher=bob&sql=BREAST_cancer")[2])
    assert bobs["matched"] == len([r for r in records if r["researcher"] == "bob" and "breast_cancer" in r["sql"].lower()]) >= 1
    assert admin(deployed, "/api/audit?decision=maybe")[0] == 400
    assert admin(deployed, "/api/audit?limit=100000")[0] == 400

    # The chain, as `railyard audit verify` sees it.
    verified = json.loads(admin(deployed, "/api/verify")[2])
    assert verified["intact"] is True and verified["records"] == len(records)
    cli = railyard("audit", "verify", deployed["audit"])
    assert str(len(records)) in cli.stdout


@pytest.fixture(scope="module")
def browser():
    # The collaboration's CA is not in the browser's store; the HTTPS tests above check
    # the certificate against it.
    driver = chromium("--ignore-certificate-errors")
    yield driver
    driver.quit()


def texts(browser, selector):
    """The text of every element `selector` matches, read in one step (a table the page
    redraws meanwhile cannot go stale under the reader)."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector)


def sign_in(browser, base, token):
    from selenium.webdriver.common.by import By

    browser.get(base)
    wait(browser, lambda b: b.current_url.endswith("/login"))
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait(browser, lambda b: not b.current_url.endswith("/login"))


def test_in_a_browser_sign_in_see_the_collaboration_and_a_station_go_offline(deployed, browser, shots):
    from selenium.webdriver.common.by import By

    # The station's page first (the station stays up).
    sign_in(browser, deployed["admin"], ADMIN_TOKEN)
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#decisions tbody tr"))
    assert "Intact" in browser.find_element(By.ID, "verify").text
    assert browser.find_element(By.ID, "station").text == "amsterdam"
    assert "alice" in browser.find_element(By.ID, "spending").text
    browser.find_element(By.ID, "f-decision").send_keys("refused")
    browser.find_element(By.CSS_SELECTOR, "#filters button").click()
    wait(browser, lambda b: set(texts(b, "#decisions tbody td:nth-child(5)")) == {"refused"})
    browser.save_screenshot(str(shots / "station-audit.png"))

    # A wrong token is refused on the sign-in page.
    browser.get(deployed["console"] + "login")
    browser.find_element(By.ID, "token").send_keys("ryt_nope_nope")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait(browser, lambda b: b.find_element(By.ID, "refusal").is_displayed())
    browser.save_screenshot(str(shots / "sign-in.png"))

    sign_in(browser, deployed["console"], deployed["alice"])
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#stations td.online")) == 2)
    assert browser.find_element(By.ID, "who").text == "alice · lung"
    wait(browser, lambda b: "lung" in b.find_element(By.ID, "tables").text)
    tables = browser.find_element(By.ID, "tables").text
    assert "lung" in tables and "breast_cancer" not in tables

    deployed["leiden"].stop()
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#stations td.offline")) == 1, timeout=60)
    # Read in one step: the page redraws the table every 5 s.
    offline = browser.execute_script(
        "return [...document.querySelectorAll('#stations tbody tr')]"
        ".filter(tr => tr.querySelector('td.offline')).map(tr => tr.textContent)")
    assert len(offline) == 1 and "leiden" in offline[0]
    browser.save_screenshot(str(shots / "station-offline.png"))

    # Signing out forgets the token: the console sends the browser back to sign in.
    browser.find_element(By.ID, "logout").click()
    wait(browser, lambda b: b.current_url.endswith("/login"))
    browser.get(deployed["console"])
    wait(browser, lambda b: b.current_url.endswith("/login"))


def test_the_station_page_reports_an_altered_record(deployed):
    path = deployed["audit"]
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["rows"] += 1
    lines[0] = json.dumps(record) + "\n"
    path.write_text("".join(lines))
    verified = json.loads(admin(deployed, "/api/verify")[2])
    assert verified["intact"] is False and verified["broken"]["line"] == 1
