//! Station policy end to end, under the default policy (every column `aggregate`, k = 5):
//! grouped answers against an independent per-station reference, and the audit log through
//! a crash and a tampering.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use datafusion::prelude::{ParquetReadOptions, SessionContext};
use railyard::client::HubClient;
use railyard::local::{Governance, LocalFederation};
use railyard_engine::HubOptions;

use crate::fixtures::{self, STATIONS, railyard, spec, test_data};
use crate::slt::format_rows;

/// The reference: plain DataFusion over each station's own file, as one view with a
/// `station` column, so per-station thresholds can be written in SQL.
async fn per_station_reference() -> SessionContext {
    let ctx = SessionContext::new();
    let mut parts = Vec::new();
    for s in STATIONS {
        let file = test_data(&format!("lung/horizontal/parquet/{s}.parquet"));
        ctx.register_parquet(
            format!("lung_{s}"),
            fixtures::path(&file),
            ParquetReadOptions::default(),
        )
        .await
        .expect("station file");
        parts.push(format!("SELECT '{s}' AS station, * FROM lung_{s}"));
    }
    ctx.sql(&format!(
        "CREATE VIEW lung_s AS {}",
        parts.join(" UNION ALL ")
    ))
    .await
    .expect("reference view");
    ctx
}

/// The lung stations (Parquet) and a hub, under the default policy (k = 5).
pub(crate) async fn lung_under_default_policy() -> (LocalFederation, Governance) {
    let governance = fixtures::default_governance();
    let federation = fixtures::federation_with(
        &[spec("lung", test_data("lung/horizontal/parquet"))],
        HubOptions::default(),
        &governance,
    )
    .await;
    (federation, governance)
}

/// The lung stations under the default policy with an exact threshold
/// (`tests/policies/exact-k.toml`: no noisy margin).
async fn lung_under_exact_k() -> (LocalFederation, Governance) {
    let policy = fixtures::repo().join("tests/policies/exact-k.toml");
    let governance = Governance::new(Some(&policy), fixtures::audit_dir()).unwrap();
    let federation = fixtures::federation_with(
        &[spec("lung", test_data("lung/horizontal/parquet"))],
        HubOptions::default(),
        &governance,
    )
    .await;
    (federation, governance)
}

/// (federated query, reference query): the reference keeps, per station, the groups of at
/// least 5 rows (and at least 5 contributors of every value), merges them, and keeps merged
/// groups of at least 5 rows.
const CASES: &[(&str, &str)] = &[
    (
        "SELECT inst, count(*) AS n FROM lung GROUP BY inst ORDER BY inst",
        "WITH per AS (SELECT station, inst, count(*) AS n FROM lung_s GROUP BY station, inst \
         HAVING count(*) >= 5) \
         SELECT inst, sum(n) FROM per GROUP BY inst HAVING sum(n) >= 5 ORDER BY inst",
    ),
    (
        "SELECT age, count(*) AS n, avg(time) AS mean_time FROM lung GROUP BY age ORDER BY age",
        "WITH per AS (SELECT station, age, count(*) AS n, sum(time) AS s FROM lung_s \
         GROUP BY station, age HAVING count(*) >= 5) \
         SELECT age, sum(n), CAST(sum(s) AS DOUBLE) / sum(n) FROM per GROUP BY age \
         HAVING sum(n) >= 5 ORDER BY age",
    ),
    (
        "SELECT sex, ph_ecog, count(*) AS n, avg(wt_loss) AS w FROM lung WHERE age > 60 \
         GROUP BY sex, ph_ecog ORDER BY sex, ph_ecog",
        "WITH per AS (SELECT station, sex, ph_ecog, count(*) AS n, sum(wt_loss) AS s, \
         count(wt_loss) AS c FROM lung_s WHERE age > 60 GROUP BY station, sex, ph_ecog \
         HAVING count(*) >= 5 AND count(wt_loss) >= 5) \
         SELECT sex, ph_ecog, sum(n), CAST(sum(s) AS DOUBLE) / nullif(sum(c), 0) FROM per \
         GROUP BY sex, ph_ecog HAVING sum(n) >= 5 ORDER BY sex, ph_ecog",
    ),
    (
        // Ordering by size cannot reach below k: the smallest groups shown have k rows.
        "SELECT age, count(*) AS n FROM lung GROUP BY age ORDER BY n, age LIMIT 3",
        "WITH per AS (SELECT station, age, count(*) AS n FROM lung_s GROUP BY station, age \
         HAVING count(*) >= 5) \
         SELECT age, sum(n) AS n FROM per GROUP BY age HAVING sum(n) >= 5 \
         ORDER BY n, age LIMIT 3",
    ),
    (
        // HAVING runs on merged groups: groups withheld at a station are not there to find.
        "SELECT inst, count(*) AS n FROM lung GROUP BY inst HAVING count(*) < 12 ORDER BY inst",
        "WITH per AS (SELECT station, inst, count(*) AS n FROM lung_s GROUP BY station, inst \
         HAVING count(*) >= 5) \
         SELECT inst, sum(n) FROM per GROUP BY inst HAVING sum(n) >= 5 AND sum(n) < 12 \
         ORDER BY inst",
    ),
    (
        // DISTINCT is a grouping at the stations: only values k rows share are counted.
        "SELECT count(DISTINCT age) FROM lung",
        "WITH per AS (SELECT station, age, count(*) AS n FROM lung_s GROUP BY station, age \
         HAVING count(*) >= 5), \
         merged AS (SELECT age FROM per GROUP BY age HAVING sum(n) >= 5) \
         SELECT count(age) FROM merged",
    ),
    (
        // A global aggregate over at least k rows at every station is exact.
        "SELECT count(*), avg(age), var_samp(time) FROM lung WHERE age > 65",
        "SELECT count(*), avg(age), var_samp(time) FROM lung_s WHERE age > 65",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_answers_equal_the_per_station_thresholded_reference() {
    let (federation, _) = lung_under_exact_k().await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let reference = per_station_reference().await;
    for (federated, expected) in CASES {
        let got = client
            .query(federated)
            .await
            .unwrap_or_else(|e| panic!("{federated}: {e:#}"));
        let want = reference
            .sql(expected)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let (got, want) = (format_rows(&got.batches), format_rows(&want));
        assert!(!want.is_empty(), "the reference of {federated} is empty");
        assert_eq!(got, want, "{federated}");
    }
    // The inst query does withhold something: some institution has fewer than k patients
    // at some station, so the pooled answer differs from the released one.
    let pooled = reference
        .sql("SELECT inst, count(*) FROM lung_s GROUP BY inst ORDER BY inst")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let released = client.query(CASES[0].0).await.unwrap();
    assert_ne!(format_rows(&pooled), format_rows(&released.batches));
    federation.shutdown().await.unwrap();

    // Under the default policy a station's group needs k rows plus a margin of 0 to 3
    // (drawn per set of rows): one of k + 3 rows or more is always released, one below k
    // never, and the merged count lies between the two references.
    let (federation, _) = lung_under_default_policy().await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let with_floor = |floor: u64| {
        format!(
            "WITH per AS (SELECT station, inst, count(*) AS n FROM lung_s GROUP BY station, \
             inst HAVING count(*) >= {floor}) SELECT inst, sum(n) FROM per GROUP BY inst \
             HAVING sum(n) >= 5 ORDER BY inst"
        )
    };
    let counts = |rows: Vec<Vec<String>>| -> BTreeMap<String, u64> {
        rows.into_iter()
            .map(|r| (r[0].clone(), r[1].parse().unwrap()))
            .collect()
    };
    let mut bounds = Vec::new();
    for floor in [5, 8] {
        let rows = reference
            .sql(&with_floor(floor))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        bounds.push(counts(format_rows(&rows)));
    }
    let (most, sure) = (&bounds[0], &bounds[1]);
    let got = counts(format_rows(
        &client.query(CASES[0].0).await.unwrap().batches,
    ));
    for (inst, n) in sure {
        assert!(
            got.get(inst).is_some_and(|g| g >= n),
            "inst {inst}: {got:?} vs {sure:?}"
        );
    }
    for (inst, n) in &got {
        assert!(
            most.get(inst).is_some_and(|m| n <= m),
            "inst {inst}: {got:?} vs {most:?}"
        );
    }
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_query_runs_nowhere_and_every_station_audits_its_own_decision() {
    let (federation, governance) = lung_under_default_policy().await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    client
        .query("SELECT sex, count(*) FROM lung GROUP BY sex")
        .await
        .unwrap();
    let err = client
        .query("SELECT sex, min(age) FROM lung GROUP BY sex")
        .await
        .expect_err("min() of an aggregate column is refused");
    let text = format!("{err:#}");
    assert!(text.contains("(rule unsafe_aggregate)"), "{text}");
    assert!(text.contains("PermissionDenied"), "{text}");
    // The first refusal ends the query at once; the other stations were asked too and
    // record their own refusal, maybe a moment later.
    for s in STATIONS {
        let log = governance.audit_log(s);
        let deadline = Instant::now() + Duration::from_secs(20);
        while read_records(&log).len() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    federation.shutdown().await.unwrap();
    for s in STATIONS {
        let records = read_records(&governance.audit_log(s));
        // The allowed query: checked and run, one record with what it released.
        let allowed: Vec<_> = records
            .iter()
            .filter(|r| r["decision"] == "allowed")
            .collect();
        assert_eq!(allowed.len(), 1, "{s}: {records:?}");
        assert_eq!(allowed[0]["rows"], 2, "{s}: two sex groups released");
        assert_eq!(allowed[0]["researcher"], "local");
        // The refused one: refused when asked to run it (a fragment that spends no ε and
        // starts no container is checked as it runs), nothing released.
        let refused: Vec<_> = records
            .iter()
            .filter(|r| r["decision"] == "refused")
            .collect();
        assert_eq!(refused.len(), 1, "{s}: {records:?}");
        assert_eq!(refused[0]["rule"], "unsafe_aggregate");
        assert_eq!(refused[0]["rows"], 0);
        assert_eq!(records.len(), 2, "{s}: {records:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_enforces_its_policy_when_the_hub_is_bypassed() {
    let (federation, _) = lung_under_default_policy().await;
    let url = &federation.stations[0].url;
    let refused = [
        ("SELECT age FROM lung", "(rule row_level)"),
        (
            "SELECT count(*) FROM lung WHERE patient_id = 7",
            "(rule min_group_size)",
        ),
        // An error computed from a group's size would tell that a small group exists
        // before it is withheld: only plain columns may sit above the aggregate.
        (
            "SELECT inst AS g0, CASE WHEN count(*) = 1 THEN 1 / 0 ELSE 0 END AS a0 FROM lung \
             GROUP BY inst",
            "(rule fragment_shape)",
        ),
        (
            "SELECT inst, count(*) FROM lung GROUP BY inst HAVING count(*) < 5",
            "(rule fragment_shape)",
        ),
    ];
    for (sql, rule) in refused {
        let err = fixtures::run_at_station(url, sql)
            .await
            .expect_err("refused by the station itself");
        assert!(err.contains(rule), "{sql}: {err}");
    }
    // Groups of one patient are withheld by the station, not only by the hub.
    let released = fixtures::run_at_station(
        url,
        "SELECT patient_id AS g0, partial_count(1) AS a0 FROM lung GROUP BY patient_id",
    )
    .await
    .unwrap();
    assert_eq!(released.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    federation.shutdown().await.unwrap();
}

/// The answer says what it left out: each station's count of groups below k, and the hub's
/// count of merged groups below k (none here: every station has the same k, so a merged
/// group of released groups always reaches it). `railyard sql` prints it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_say_how_many_groups_each_station_withheld() {
    let (federation, _) = lung_under_exact_k().await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let reference = per_station_reference().await;
    let sql = "SELECT age, count(*) AS n FROM lung GROUP BY age ORDER BY age";
    let answer = client.query(sql).await.unwrap();
    let reported: serde_json::Value = serde_json::from_str(
        answer
            .schema
            .metadata()
            .get("railyard.withheld")
            .expect("a grouped answer reports what it withheld"),
    )
    .unwrap();
    let below_k = reference
        .sql(
            "SELECT station, count(*) FROM (SELECT station, age FROM lung_s \
             GROUP BY station, age HAVING count(*) < 5) GROUP BY station ORDER BY station",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut want = serde_json::Map::new();
    for s in STATIONS {
        want.insert(s.to_string(), 0.into());
    }
    for row in format_rows(&below_k) {
        want.insert(row[0].clone(), row[1].parse::<u64>().unwrap().into());
    }
    assert!(want.values().any(|n| n.as_u64() > Some(0)), "{want:?}");
    assert_eq!(
        reported["stations"],
        serde_json::Value::Object(want),
        "{reported}"
    );
    assert_eq!(reported["hub"], 0, "{reported}");
    // One patient's group, or none: the station may not say which (the count would be
    // that patient's age), so it says only "fewer than k rows, possibly none" either way.
    for cut in [60, 90] {
        let one = client
            .query(&format!(
                "SELECT sex, count(*) FROM lung WHERE patient_id = 1 AND age >= {cut} GROUP BY sex"
            ))
            .await
            .unwrap();
        assert_eq!(one.num_rows(), 0);
        let reported: serde_json::Value =
            serde_json::from_str(&one.schema.metadata()["railyard.withheld"]).unwrap();
        assert!(
            reported["stations"]
                .as_object()
                .unwrap()
                .values()
                .all(|n| n.is_null()),
            "{reported}"
        );
    }
    // A global aggregate is released whole or refused: nothing withheld, and it says so.
    let global = client.query("SELECT count(*) FROM lung").await.unwrap();
    let reported: serde_json::Value =
        serde_json::from_str(&global.schema.metadata()["railyard.withheld"]).unwrap();
    assert_eq!(reported["hub"], 0, "{reported}");
    assert!(
        reported["stations"]
            .as_object()
            .unwrap()
            .values()
            .all(|n| n == 0),
        "{reported}"
    );

    let url = federation.hub_url.clone();
    let out = tokio::task::spawn_blocking(move || {
        railyard()
            .args(["sql", "--hub", &url, sql])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains("withheld below the group-size threshold k: "),
        "{note}"
    );
    federation.shutdown().await.unwrap();
}

fn read_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

/// Starts `railyard local` over the lung stations with audit logs under `data_dir`.
fn start_local(data_dir: &Path) -> (Child, String) {
    let mut args = vec!["--data-dir".to_string(), fixtures::path(data_dir)];
    args.extend(fixtures::table_arg("lung", "lung/horizontal/csv"));
    fixtures::spawn_local(args)
}

fn verify(log: &Path) -> std::process::Output {
    railyard()
        .args(["audit", "verify"])
        .arg(log)
        .output()
        .unwrap()
}

fn logs(data_dir: &Path) -> Vec<PathBuf> {
    STATIONS
        .iter()
        .map(|s| data_dir.join(s).join("audit.jsonl"))
        .collect()
}

/// Queries the stations answer and refuse, in a loop, until `stop` passes.
async fn query_until(url: &str, stop: Instant) -> usize {
    let mut client = HubClient::connect(url).await.unwrap();
    let mut n = 0;
    let queries = [
        "SELECT sex, count(*), avg(age) FROM lung GROUP BY sex",
        "SELECT max(age) FROM lung",
        "SELECT ph_ecog, avg(time) FROM lung GROUP BY ph_ecog",
    ];
    while Instant::now() < stop {
        // Refusals are expected; the connection may die with the process.
        let _ = client.query(queries[n % queries.len()]).await;
        n += 1;
    }
    n
}

#[test]
fn the_audit_chain_verifies_after_the_stations_are_killed_mid_run() {
    let data_dir = fixtures::audit_dir();
    let (mut child, url) = start_local(&data_dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Kill (SIGKILL, no clean-up) while queries are in flight.
    let sent = runtime.block_on(async {
        let load = tokio::spawn({
            let url = url.clone();
            async move { query_until(&url, Instant::now() + Duration::from_secs(3)).await }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        child.kill().unwrap();
        load.await.unwrap()
    });
    child.wait().unwrap();
    assert!(sent > 3, "only {sent} queries were sent before the kill");
    let mut before = Vec::new();
    for log in logs(&data_dir) {
        let out = verify(&log);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout}{}",
            log.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("chain intact"), "{stdout}");
        before.push(read_complete_records(&log));
    }
    assert!(before.iter().all(|n| *n > 0), "{before:?}");

    // Restarted on the same logs, the stations continue the chain.
    let (mut child, url) = start_local(&data_dir);
    runtime.block_on(async {
        let mut client = HubClient::connect(&url).await.unwrap();
        client
            .query("SELECT sex, count(*) FROM lung GROUP BY sex")
            .await
            .unwrap();
    });
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    for (log, n) in logs(&data_dir).iter().zip(before) {
        let out = verify(log);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(read_complete_records(log) > n);
    }
}

/// Complete (newline-terminated) records in a log.
fn read_complete_records(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap().matches('\n').count()
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn audit_verify_reports_the_first_edited_or_missing_record() {
    let data_dir = fixtures::audit_dir();
    let (child, url) = start_local(&data_dir);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = HubClient::connect(&url).await.unwrap();
        for sql in [
            "SELECT sex, count(*) FROM lung GROUP BY sex",
            "SELECT min(age) FROM lung",
            "SELECT inst, count(*) FROM lung GROUP BY inst",
            "SELECT count(*) FROM lung",
        ] {
            let _ = client.query(sql).await;
        }
    });
    sigterm(&child);
    let mut child = child;
    assert!(child.wait().unwrap().success());

    let log = data_dir.join("station_a/audit.jsonl");
    let original = std::fs::read_to_string(&log).unwrap();
    assert!(verify(&log).status.success());
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() >= 4, "{original}");

    // A privacy officer's nightmare: someone hides what was released by record 3.
    let edited = lines[2].replacen("\"rows\":", "\"rows\":1", 1);
    assert_ne!(edited, lines[2]);
    let mut tampered = lines.clone();
    tampered[2] = &edited;
    std::fs::write(&log, tampered.join("\n") + "\n").unwrap();
    let out = verify(&log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("record 3 is broken"), "{stderr}");
    assert!(stderr.contains("edited"), "{stderr}");

    // Deleting a record is caught at the record after it.
    let mut deleted = lines.clone();
    deleted.remove(1);
    std::fs::write(&log, deleted.join("\n") + "\n").unwrap();
    let out = verify(&log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("record 2 is broken"), "{stderr}");

    // A station refuses to start on a broken log rather than extend it.
    let mut start = railyard()
        .args(["local", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .args(fixtures::table_arg("lung", "lung/horizontal/csv"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = start.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut start.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("audit log") && stderr.contains("broken"),
        "{stderr}"
    );
}

#[test]
fn a_policy_file_with_a_mistake_is_refused_at_start_naming_the_line() {
    let dir = fixtures::audit_dir();
    let policy = dir.join("policy.toml");
    let cases = [
        (
            "min_group_size = 5\n[tables.lung.columns]\nage = \"aggregate\"\ntime = \"publik\"\n",
            ["line 4", "publik"],
        ),
        // A column the table does not have (a misspelt 'hidden' would silently do nothing).
        (
            "[tables.lung.columns]\npatinet_id = \"hidden\"\n",
            ["line 2", "no column 'patinet_id'"],
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&policy, text).unwrap();
        let out = railyard()
            .args(["local", "--listen", "127.0.0.1:0", "--policy"])
            .arg(&policy)
            .args(fixtures::table_arg("lung", "lung/horizontal/csv"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        for e in expected {
            assert!(stderr.contains(e), "{stderr}");
        }
    }
}

/// A plain Flight client of a hub or station at `url`.
async fn flight(
    url: &str,
) -> arrow_flight::flight_service_client::FlightServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    arrow_flight::flight_service_client::FlightServiceClient::new(channel)
}

/// The status of a query the hub answers with an error, asked through the plain Flight
/// service (`GetFlightInfo` of a Flight SQL statement), so the status arrives whole.
async fn hub_status(url: &str, sql: &str) -> tonic::Status {
    use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
    use prost::Message;
    let mut client = flight(url).await;
    let command = CommandStatementQuery {
        query: sql.to_string(),
        transaction_id: None,
    };
    let descriptor = arrow_flight::FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
    client
        .get_flight_info(descriptor)
        .await
        .expect_err("the query is refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_carries_its_rule_as_structured_detail_on_both_hops() {
    let (federation, _governance) = lung_under_default_policy().await;
    // Hub → researcher: PERMISSION_DENIED, the station's message, and the rule as details.
    let status = hub_status(
        &federation.hub_url,
        "SELECT sex, min(age) FROM lung GROUP BY sex",
    )
    .await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let refusal = railyard_contract::Refusal::from_bytes(status.details())
        .expect("the status details hold the refusal");
    assert_eq!(refusal.rule, "unsafe_aggregate");
    assert!(
        status.message().contains("(rule unsafe_aggregate)"),
        "{status:?}"
    );
    assert!(refusal.message.contains("min()"), "{refusal:?}");

    // Station → hub (or anyone at the station's port): the same detail on the check action
    // and on DoGet, and the rule is one the policy crate knows.
    let url = &federation.stations[0].url;
    let mut client = flight(url).await;
    let ticket = railyard_contract::FragmentTicket {
        query_id: "detail".into(),
        fragment: 1,
        researcher: "test".into(),
        collaboration: String::new(),
        epsilon: None,
        sql: "SELECT age FROM lung".into(),
        train: None,
    };
    let check = client
        .do_action(fixtures::as_hub(
            url,
            tonic::Request::new(arrow_flight::Action::new(
                railyard_contract::actions::CHECK,
                ticket.to_bytes(),
            )),
        ))
        .await
        .expect_err("row-level ages are refused");
    let run = client
        .do_get(fixtures::as_hub(
            url,
            tonic::Request::new(arrow_flight::Ticket::new(ticket.to_bytes())),
        ))
        .await
        .expect_err("row-level ages are refused");
    for status in [check, run] {
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let refusal = railyard_contract::Refusal::from_bytes(status.details()).unwrap();
        assert_eq!(
            railyard_policy::Rule::from_name(&refusal.rule),
            Some(railyard_policy::Rule::RowLevel)
        );
        // The detail names the rule and the column, never a value.
        assert!(refusal.message.contains("column 'age'"), "{refusal:?}");
    }
    federation.shutdown().await.unwrap();
}

/// (federated query, reference query) over the OMOP stations, counted in persons: the
/// reference keeps, per station, the groups of at least 5 distinct persons, merges them,
/// and keeps merged groups of at least 5 persons; what it answers is computed over the
/// kept rows (row counts included).
const OMOP_CASES: &[(&str, &str)] = &[
    (
        "SELECT drug_concept_id, count(*) AS n FROM drug_exposure GROUP BY 1 ORDER BY 1",
        "WITH per AS (SELECT station, drug_concept_id, count(*) AS n, \
         count(DISTINCT person_id) AS p FROM drug_exposure_s GROUP BY 1, 2 HAVING \
         count(DISTINCT person_id) >= 5) \
         SELECT drug_concept_id, sum(n) FROM per GROUP BY 1 HAVING sum(p) >= 5 ORDER BY 1",
    ),
    (
        "SELECT condition_concept_id, count(*) AS n, count(DISTINCT person_id) AS persons \
         FROM condition_occurrence GROUP BY 1 ORDER BY 1",
        "WITH per AS (SELECT station, condition_concept_id, count(*) AS n, \
         count(DISTINCT person_id) AS p FROM condition_occurrence_s GROUP BY 1, 2 HAVING \
         count(DISTINCT person_id) >= 5) \
         SELECT condition_concept_id, sum(n), sum(p) FROM per GROUP BY 1 HAVING sum(p) >= 5 \
         ORDER BY 1",
    ),
    (
        // A join on the person at the stations: rows multiply, persons do not. (Row counts
        // over a join are also held to the dominance rule on each person's departure from
        // the median person, which this reference does not model: persons are counted.)
        "SELECT p.gender_concept_id, d.drug_concept_id, count(DISTINCT p.person_id) AS n \
         FROM person p JOIN drug_exposure d ON d.person_id = p.person_id GROUP BY 1, 2 \
         ORDER BY 1, 2",
        "WITH per AS (SELECT d.station, p.gender_concept_id, d.drug_concept_id, \
         count(DISTINCT p.person_id) AS k FROM person_s p JOIN drug_exposure_s d \
         ON d.person_id = p.person_id GROUP BY 1, 2, 3 HAVING count(DISTINCT p.person_id) >= 5) \
         SELECT gender_concept_id, drug_concept_id, sum(k) FROM per GROUP BY 1, 2 \
         HAVING sum(k) >= 5 ORDER BY 1, 2",
    ),
    (
        // A per-person derivation below the release: visits per person, then persons per
        // count.
        "SELECT n, count(*) AS persons FROM (SELECT person_id, count(*) AS n FROM \
         visit_occurrence GROUP BY person_id) t GROUP BY n ORDER BY n",
        "WITH t AS (SELECT station, person_id, count(*) AS n FROM visit_occurrence_s \
         GROUP BY 1, 2), per AS (SELECT station, n, count(*) AS c FROM t GROUP BY 1, 2 \
         HAVING count(*) >= 5) \
         SELECT n, sum(c) FROM per GROUP BY n HAVING sum(c) >= 5 ORDER BY n",
    ),
];

/// Issue 19's "done when": under the default policy with `privacy_unit = "person_id"`, every
/// group with at least k persons at each contributing station is answered exactly, every
/// other is withheld, and one person's history is withheld however many rows it has.
#[test]
fn omop_groups_are_answered_or_withheld_by_persons_per_station() {
    fixtures::on_railyard_stacks(async {
        let mut governance = Governance::new(
            Some(&fixtures::repo().join("tests/policies/exact-k.toml")),
            fixtures::audit_dir(),
        )
        .unwrap();
        governance.policy.privacy_unit = Some(railyard_policy::file::PrivacyUnit::Column {
            name: "person_id".into(),
            line: 0,
        });
        let governance = fixtures::with_omop_references(governance);
        let federation =
            fixtures::federation_with(&fixtures::omop_specs(), HubOptions::default(), &governance)
                .await;
        let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
        // The reference: the pooled files, each row marked with its station by the
        // split rule of tests/data/README.md.
        let reference = SessionContext::new();
        for t in [
            "person",
            "drug_exposure",
            "condition_occurrence",
            "visit_occurrence",
        ] {
            reference
                .register_parquet(
                    &format!("{t}_pooled"),
                    test_data(&format!("omop/pooled/{t}.parquet"))
                        .to_str()
                        .unwrap(),
                    ParquetReadOptions::default(),
                )
                .await
                .unwrap();
            reference
                .sql(&format!(
                    "CREATE VIEW {t}_s AS SELECT *, CASE WHEN person_id % 10 < 5 THEN \
                         'station_a' WHEN person_id % 10 < 8 THEN 'station_b' ELSE \
                         'station_c' END AS station FROM {t}_pooled"
                ))
                .await
                .unwrap();
        }
        for (federated, expected) in OMOP_CASES {
            let got = client
                .query(federated)
                .await
                .unwrap_or_else(|e| panic!("{federated}: {e:#}"));
            let want = reference
                .sql(expected)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let (got, want) = (format_rows(&got.batches), format_rows(&want));
            assert!(!want.is_empty(), "the reference of {federated} is empty");
            assert_eq!(got, want, "{federated}");
        }
        // Counting rows would have released these: a drug group with at least 5 rows
        // but fewer than 5 persons at every station (the join multiplies its rows).
        let history = client
            .query(
                "SELECT condition_concept_id, count(*) FROM condition_occurrence \
                     WHERE person_id = 3353 GROUP BY 1",
            )
            .await
            .unwrap();
        assert_eq!(format_rows(&history.batches).len(), 0);
        let rare = client
            .query(
                "SELECT d.drug_concept_id, count(*) FROM drug_exposure d JOIN \
                     condition_occurrence c ON c.person_id = d.person_id \
                     WHERE d.drug_concept_id = 1519937 GROUP BY 1",
            )
            .await
            .unwrap();
        assert_eq!(format_rows(&rare.batches).len(), 0);
        federation.shutdown().await.unwrap();
    });
}
