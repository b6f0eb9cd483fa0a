//! Containerized trains against the real Docker daemon (images from `scripts/build-trains`):
//! the example histogram over the three lung stations equals the pooled histogram; the
//! sandbox holds (no network, unprivileged user, read-only root and input, time limit,
//! output limits); images off the allowlist never start; nothing is left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type};
use datafusion::prelude::{CsvReadOptions, SessionContext};
use railyard::local::{Governance, LocalFederation};
use railyard_engine::HubOptions;

use crate::fixtures::{self, STATIONS, test_data};

const HISTOGRAM: &str = "railyard/histogram:dev";
const PROBE: &str = "railyard/probe:dev";
/// The station's time limit in these tests.
const TIMEOUT_SECONDS: u64 = 5;

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The id of an example image; they are built by `scripts/build-trains` (run by
/// `scripts/test`).
fn image_id(image: &str) -> String {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "image {image} is missing: run scripts/build-trains first"
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Three lung stations whose policy hides `patient_id` and allows `allowed` images.
async fn federation(allowed: &[&str]) -> (LocalFederation, Governance) {
    let data_dir = fixtures::audit_dir();
    let ids: Vec<String> = allowed
        .iter()
        .map(|i| format!("\"{}\"", image_id(i)))
        .collect();
    let policy = format!(
        "[tables.lung.columns]\npatient_id = \"hidden\"\n\n[trains]\nallowed = [{}]\n\
         timeout_seconds = {TIMEOUT_SECONDS}\nmax_output_rows = 100\n",
        ids.join(", ")
    );
    let path = data_dir.join("policy.toml");
    std::fs::write(&path, policy).unwrap();
    let governance = Governance::new(Some(&path), &data_dir).unwrap();
    let fed = fixtures::federation_with(
        &[fixtures::spec("lung", test_data("lung/horizontal/csv"))],
        HubOptions::default(),
        &governance,
    )
    .await;
    (fed, governance)
}

/// Train containers that a station of `governance` has not removed.
fn leftovers(governance: &Governance) -> Vec<String> {
    STATIONS
        .iter()
        .flat_map(|s| {
            let work = work_dir(governance, s);
            let label = format!("label=railyard.train={}", work.display());
            let out = docker(&["ps", "-aq", "--filter", &label]);
            out.lines().map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

fn work_dir(governance: &Governance, station: &str) -> PathBuf {
    governance
        .audit_log(station)
        .parent()
        .unwrap()
        .join("trains")
}

fn assert_clean(governance: &Governance) {
    assert_eq!(
        leftovers(governance),
        Vec::<String>::new(),
        "containers left behind"
    );
    for s in STATIONS {
        let runs: Vec<_> = std::fs::read_dir(work_dir(governance, s))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(runs.is_empty(), "run directories left behind: {runs:?}");
    }
}

async fn query(fed: &LocalFederation, sql: &str) -> Result<Vec<RecordBatch>, String> {
    fed.hub
        .collect(sql, "researcher")
        .await
        .map_err(|e| e.to_string())
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn pooled_lung() -> SessionContext {
    let ctx = SessionContext::new();
    ctx.register_csv(
        "lung",
        fixtures::path(&test_data("lung/full.csv")),
        CsvReadOptions::new().has_header(true),
    )
    .await
    .unwrap();
    ctx
}

/// (bin lower edge, count) pairs, in order.
fn bins(batches: &[RecordBatch]) -> Vec<(f64, i64)> {
    batches
        .iter()
        .flat_map(|b| {
            let lower = b.column(0).as_primitive::<Float64Type>().clone();
            let n = b.column(1).as_primitive::<Int64Type>().clone();
            (0..b.num_rows())
                .map(|i| (lower.value(i), n.value(i)))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn the_histogram_train_over_three_stations_equals_the_pooled_histogram() {
    let (fed, governance) = federation(&[HISTOGRAM]).await;
    let pooled = pooled_lung().await;
    for filter in ["", " WHERE sex = 1"] {
        let sql = format!(
            "SELECT bin_lower, sum(n) AS n FROM train('{HISTOGRAM}', 'SELECT age FROM lung{filter}', \
             '{{\"column\": \"age\", \"edges\": [30, 40, 50, 60, 70, 80, 90]}}') \
             GROUP BY bin_lower ORDER BY bin_lower"
        );
        let federated = bins(&query(&fed, &sql).await.unwrap());
        let and = if filter.is_empty() { " WHERE" } else { " AND" };
        let reference = pooled
            .sql(&format!(
                "SELECT CAST(floor(age / 10.0) * 10 AS DOUBLE) AS b, count(*) AS n FROM lung{filter}\
                 {and} age >= 30 AND age < 90 GROUP BY b ORDER BY b"
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut expected = bins(&reference);
        // Bins nobody falls into are rows with n = 0 in the train's output.
        for lower in [30.0, 40.0, 50.0, 60.0, 70.0, 80.0] {
            if !expected.iter().any(|(b, _)| *b == lower) {
                expected.push((lower, 0));
            }
        }
        expected.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(federated, expected, "{sql}");
    }

    // The union itself: one output per station, named.
    let all = query(
        &fed,
        &format!(
            "SELECT * FROM train('{HISTOGRAM}', 'SELECT age FROM lung', \
             '{{\"column\": \"age\", \"edges\": [0, 200]}}') ORDER BY station"
        ),
    )
    .await
    .unwrap();
    let stations: Vec<String> = all
        .iter()
        .flat_map(|b| {
            let s = b.column(0).as_string::<i32>().clone();
            (0..s.len()).map(move |i| s.value(i).to_string())
        })
        .collect();
    assert_eq!(stations, STATIONS);
    let per_station: i64 = all
        .iter()
        .map(|b| {
            b.column_by_name("n")
                .unwrap()
                .as_primitive::<Int64Type>()
                .iter()
                .flatten()
                .sum::<i64>()
        })
        .sum();
    assert_eq!(per_station, 228, "every patient once");

    // A train's output next to an ordinary federated aggregate in one query: the train call
    // is the query's fragment 1 at every station, the aggregate fragment 2.
    let mixed = query(
        &fed,
        &format!(
            "SELECT sum(t.n) AS binned, max(l.c) AS counted FROM train('{HISTOGRAM}',              'SELECT age FROM lung', '{{\"column\": \"age\", \"edges\": [0, 200]}}') t              CROSS JOIN (SELECT count(*) AS c FROM lung) l"
        ),
    )
    .await
    .unwrap();
    let row = crate::slt::format_rows(&mixed);
    assert_eq!(row, [["228", "228"]]);
    for s in STATIONS {
        let log = records(&governance.audit_log(s));
        let last_query = log.last().unwrap()["query_id"].clone();
        let mut fragments: Vec<(u64, bool)> = log
            .iter()
            .filter(|r| r["query_id"] == last_query)
            .map(|r| (r["fragment"].as_u64().unwrap(), r.get("train").is_some()))
            .collect();
        // Both run when the plan runs, concurrently: in either order.
        fragments.sort();
        assert_eq!(fragments, [(1, true), (2, false)], "{s}");
    }

    // Each station audited the run with the image id and what it released.
    let id = image_id(HISTOGRAM);
    for s in STATIONS {
        let runs: Vec<_> = records(&governance.audit_log(s))
            .into_iter()
            .filter(|r| r["decision"] == "allowed")
            .collect();
        let trains: Vec<_> = runs.iter().filter(|r| r.get("train").is_some()).collect();
        assert_eq!((runs.len(), trains.len()), (5, 4), "{s}");
        for r in trains {
            assert_eq!(r["train"], id.as_str(), "{s}: {r}");
            assert!(
                r["sql"]
                    .as_str()
                    .unwrap()
                    .starts_with("SELECT age FROM lung")
            );
        }
    }
    assert_clean(&governance);
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_train_sees_only_its_input_read_only_as_nobody_without_network() {
    let (fed, governance) = federation(&[PROBE]).await;
    let batches = query(
        &fed,
        &format!(
            "SELECT * FROM train('{PROBE}', 'SELECT age, sex FROM lung WHERE age > 60', \
             '{{\"action\": \"inspect\"}}') ORDER BY station"
        ),
    )
    .await
    .unwrap();
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(b.num_rows(), 3);
    let col = |name: &str| b.column_by_name(name).unwrap().clone();
    assert!(
        col("uid")
            .as_primitive::<Int64Type>()
            .iter()
            .all(|u| u == Some(65534))
    );
    assert_eq!(col("root_writable").as_boolean().true_count(), 0);
    assert_eq!(col("input_writable").as_boolean().true_count(), 0);
    assert!(
        col("input_columns")
            .as_string::<i32>()
            .iter()
            .all(|c| c == Some("age,sex"))
    );
    // Each station's input is its own rows of the input query.
    for (i, s) in STATIONS.iter().enumerate() {
        let ctx = SessionContext::new();
        ctx.register_csv(
            "lung",
            fixtures::path(&test_data(&format!("lung/horizontal/csv/{s}.csv"))),
            CsvReadOptions::new().has_header(true),
        )
        .await
        .unwrap();
        let n = ctx
            .sql("SELECT count(*) FROM lung WHERE age > 60")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()[0]
            .column(0)
            .as_primitive::<Int64Type>()
            .value(0);
        assert_eq!(
            col("input_rows").as_primitive::<Int64Type>().value(i),
            n,
            "{s}"
        );
    }

    // A listener on a private Docker network's gateway, which a container on that network
    // reaches (the control) and a train does not.
    let network = format!("railyard-probe-{}", std::process::id());
    docker(&["network", "create", &network]);
    let gateway = docker(&[
        "network",
        "inspect",
        &network,
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ]);
    let listener = std::net::TcpListener::bind(format!("{gateway}:0")).unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let input = fixtures::audit_dir();
    write_probe_input(&input.join("input.arrow"));
    let control = Command::new("docker")
        .args(["run", "--rm", "--network", &network, "-v"])
        .arg(format!("{}:/in:ro", input.display()))
        .args(["-e", "RAILYARD_INPUT=/in/input.arrow", "-e"])
        .arg(format!(
            "RAILYARD_ARGS={{\"action\": \"network\", \"address\": \"{address}\"}}"
        ))
        // Root in the control, only so that it can write its output into the image root.
        .args(["--user", "0:0", "-e", "RAILYARD_OUTPUT=/out.arrow", PROBE])
        .output()
        .unwrap();
    docker(&["network", "rm", &network]);
    assert!(
        control.status.success(),
        "the control container could not connect: {}",
        String::from_utf8_lossy(&control.stderr)
    );
    for target in [address.as_str(), "1.1.1.1:80"] {
        let err = query(
            &fed,
            &format!(
                "SELECT * FROM train('{PROBE}', 'SELECT age FROM lung', \
                 '{{\"action\": \"network\", \"address\": \"{target}\"}}')"
            ),
        )
        .await
        .unwrap_err();
        // The researcher learns that it failed, not the exit code the train chose; the
        // station's audit log has it: 3, the probe's code for "could not connect".
        assert!(
            err.contains(&format!(
                "train {} failed; nothing was released",
                image_id(PROBE)
            )),
            "{target}: {err}"
        );
        assert!(!err.contains("code"), "{err}");
        let failed: Vec<_> = records(&governance.audit_log("station_a"))
            .into_iter()
            .filter(|r| r["decision"] == "failed")
            .collect();
        assert_eq!(
            failed.last().unwrap()["rule"],
            "train exited with code 3",
            "{target}"
        );
    }
    assert_clean(&governance);
    fed.shutdown().await.unwrap();
}

/// A one-column Arrow IPC file, as a station would hand a train.
fn write_probe_input(path: &Path) {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![Field::new("age", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(Int64Array::from(vec![60, 70]))],
    )
    .unwrap();
    let mut w =
        arrow::ipc::writer::FileWriter::try_new(std::fs::File::create(path).unwrap(), &schema)
            .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
}

#[tokio::test]
async fn time_limits_and_output_limits_are_enforced() {
    let (fed, governance) = federation(&[PROBE]).await;
    let probe =
        |args: &str| format!("SELECT * FROM train('{PROBE}', 'SELECT age FROM lung', '{args}')");
    let err = query(&fed, &probe(r#"{"action": "sleep", "seconds": 600}"#))
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!(
            "ran past the station's time limit of {TIMEOUT_SECONDS} s and was killed"
        )),
        "{err}"
    );
    assert_clean(&governance);

    let ok = query(&fed, &probe(r#"{"action": "rows", "n": 100}"#))
        .await
        .unwrap();
    assert_eq!(ok.iter().map(|b| b.num_rows()).sum::<usize>(), 300);
    for (args, rule) in [
        (r#"{"action": "rows", "n": 101}"#, "max_output_rows"),
        (r#"{"action": "garbage"}"#, "train_output"),
    ] {
        let err = query(&fed, &probe(args)).await.unwrap_err();
        assert!(err.contains(&format!("(rule {rule})")), "{args}: {err}");
    }
    // Columns other than the declared ones are refused, without repeating them: this train
    // names its column after a patient's age.
    let err = query(&fed, &probe(r#"{"action": "undeclared"}"#))
        .await
        .unwrap_err();
    assert!(
        err.contains("(rule train_output)") && err.contains("columns its image declares (i Int64)"),
        "{err}"
    );
    assert!(
        !err.contains("leak_"),
        "the refusal echoes the output's column: {err}"
    );
    // Arguments the label has no columns for are refused before anything starts.
    for args in [r#"{"action": "nope"}"#, "{}"] {
        let err = query(&fed, &probe(args)).await.unwrap_err();
        assert!(err.contains("(rule train_output)"), "{args}: {err}");
    }
    // A refused output is audited as refused, with the image.
    let id = image_id(PROBE);
    let last = records(&governance.audit_log("station_a")).pop().unwrap();
    assert_eq!(last["decision"], "refused");
    assert_eq!(last["rule"], "train_output");
    assert_eq!(last["train"], id.as_str());
    assert_clean(&governance);
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn what_the_policy_refuses_never_starts_a_container() {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let (fed, governance) = federation(&[HISTOGRAM]).await;
    let args = r#"{"column": "age", "edges": [0, 200]}"#;
    let cases = [
        // Not on the allowlist.
        (
            format!("SELECT * FROM train('{PROBE}', 'SELECT age FROM lung', '{{}}')"),
            "(rule train_image)",
        ),
        // A hidden column, also inside the filter.
        (
            format!(
                "SELECT * FROM train('{HISTOGRAM}', 'SELECT patient_id AS age FROM lung', '{args}')"
            ),
            "(rule hidden_column)",
        ),
        (
            format!("SELECT * FROM train('{HISTOGRAM}', 'SELECT * FROM lung', '{args}')"),
            "(rule hidden_column)",
        ),
        (
            format!(
                "SELECT * FROM train('{HISTOGRAM}', 'SELECT age FROM lung WHERE patient_id < 10', '{args}')"
            ),
            "(rule hidden_column)",
        ),
        // Fewer input rows than k at a station.
        (
            format!(
                "SELECT * FROM train('{HISTOGRAM}', 'SELECT age FROM lung WHERE age > 80', '{args}')"
            ),
            "(rule min_group_size)",
        ),
        // Errors found at the hub.
        (
            format!("SELECT * FROM train('{HISTOGRAM}', 'SELECT age FROM lung', 'not json')"),
            "the arguments are not JSON",
        ),
        (
            format!("SELECT * FROM train('{HISTOGRAM}', 'SELECT 1', '{args}')"),
            "must read exactly one federated table; it reads none",
        ),
        (
            format!("SELECT * FROM train('{HISTOGRAM}', 'SELECT nope FROM lung', '{args}')"),
            "the input SQL does not plan",
        ),
        (
            "SELECT * FROM train('railyard/none:dev', 'SELECT age FROM lung')".to_string(),
            "'railyard/none:dev' is not one of them (rule train_image)",
        ),
        (
            format!("SELECT * FROM train('{HISTOGRAM}', 1, '{args}')"),
            "every argument is a string literal",
        ),
    ];
    for (sql, expected) in &cases {
        let err = query(&fed, sql).await.unwrap_err();
        assert!(err.contains(expected), "{sql}: {err}");
    }
    // The refusal of an image names the image and its id.
    let refused = records(&governance.audit_log("station_b"));
    assert!(
        refused
            .iter()
            .any(|r| r["rule"] == "train_image" && r["train"] == image_id(PROBE).as_str())
    );

    // EXPLAIN FEDERATED shows each station's input and train, and contacts none.
    let before = records(&governance.audit_log("station_a")).len();
    let explained = query(
        &fed,
        &format!(
            "EXPLAIN FEDERATED SELECT * FROM train('{HISTOGRAM}', 'SELECT age FROM lung', '{args}')"
        ),
    )
    .await
    .unwrap();
    let rows = crate::slt::format_rows(&explained);
    let stations: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(stations, ["station_a", "station_b", "station_c", "hub"]);
    assert!(rows[0][2].starts_with("SELECT age FROM lung"), "{rows:?}");
    assert_eq!(records(&governance.audit_log("station_a")).len(), before);

    // No station created a container for any of it.
    for s in STATIONS {
        let label = format!(
            "label=railyard.train={}",
            work_dir(&governance, s).display()
        );
        let now = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 1)
        .to_string();
        let created = docker(&[
            "events",
            "--since",
            &since,
            "--until",
            &now,
            "--filter",
            &label,
            "--filter",
            "event=create",
            "--format",
            "{{.ID}}",
        ]);
        assert_eq!(created, "", "{s} created a container");
    }
    fed.shutdown().await.unwrap();

    // A station whose policy allows no image runs no train at all.
    let data_dir = fixtures::audit_dir();
    let governance = Governance::new(None, &data_dir).unwrap();
    let fed = fixtures::federation_with(
        &[fixtures::spec("lung", test_data("lung/horizontal/csv"))],
        HubOptions::default(),
        &governance,
    )
    .await;
    let err = query(
        &fed,
        &format!("SELECT * FROM train('{HISTOGRAM}', 'SELECT age FROM lung', '{args}')"),
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("(rule trains)") && err.contains("runs no trains"),
        "{err}"
    );
    fed.shutdown().await.unwrap();
}

/// Planning a train query starts no container: Flight SQL's `GetFlightInfo` and a prepare
/// have the stations check it and learn the columns its image declares; the trains run at
/// `DoGet`. A client that plans and never comes back has started nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planning_a_train_query_starts_no_container() {
    let (fed, governance) = federation(&[HISTOGRAM]).await;
    let runs = || -> usize {
        STATIONS
            .iter()
            .map(|s| {
                records(&governance.audit_log(s))
                    .into_iter()
                    .filter(|r| r.get("train").is_some())
                    .count()
            })
            .sum()
    };
    let mut client = fixtures::flight_sql_client(&fed.hub_url).await;
    let sql = format!(
        "SELECT sum(n) AS n FROM train('{HISTOGRAM}', 'SELECT age FROM lung', \
         '{{\"column\": \"age\", \"edges\": [0, 200]}}')"
    );
    let total = |batches: &[RecordBatch]| -> i64 {
        assert_eq!(batches[0].schema().field(0).name(), "n");
        batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().iter().flatten())
            .sum()
    };

    // Planned twice and abandoned: checked at every station, run nowhere; the columns are
    // the ones the image declares.
    for _ in 0..2 {
        let info = client.execute(sql.clone(), None).await.unwrap();
        let schema = info.try_decode_schema().unwrap();
        assert_eq!(schema.fields().len(), 1);
        assert_eq!(schema.field(0).name(), "n");
    }
    // Plain EXPLAIN shows the operator that will run the trains.
    let explained = crate::slt::format_rows(&query(&fed, &format!("EXPLAIN {sql}")).await.unwrap());
    assert!(
        explained.iter().any(|r| r
            .iter()
            .any(|c| c.contains("TrainExec: railyard/histogram:dev over lung"))),
        "{explained:?}"
    );
    let info = client.execute(sql.clone(), None).await.unwrap();
    assert_eq!(runs(), 0, "a container started while the query was planned");
    assert_eq!(leftovers(&governance), Vec::<String>::new());
    // Its DoGet runs the trains: one run per station, the pooled count.
    let batches = fixtures::fetch_all(&mut client, &info).await;
    assert_eq!(total(&batches), 228);
    assert_eq!(runs(), STATIONS.len());

    // A prepared statement of it announces its columns and runs nothing until executed.
    let mut prepared = client.prepare(sql.clone(), None).await.unwrap();
    assert_eq!(prepared.dataset_schema().unwrap().field(0).name(), "n");
    let info = prepared.execute().await.unwrap();
    assert_eq!(runs(), STATIONS.len());
    let batches = fixtures::fetch_all(&mut client, &info).await;
    assert_eq!(total(&batches), 228);
    assert_eq!(runs(), 2 * STATIONS.len());
    assert_clean(&governance);
    fed.shutdown().await.unwrap();
}

/// An image that does not declare its output columns is refused when the query is checked,
/// with a message saying how to declare them; no container starts.
#[tokio::test]
async fn an_image_without_declared_output_columns_is_refused_with_how_to_declare_them() {
    const UNLABELLED: &str = "railyard/unlabelled:test";
    let root = fixtures::audit_dir().join("image");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("train"), b"not run").unwrap();
    let imported = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -c train | docker import --change 'ENTRYPOINT [\"/train\"]' - {UNLABELLED}",
            root.display()
        ))
        .output()
        .unwrap();
    assert!(imported.status.success(), "{imported:?}");
    let (fed, governance) = federation(&[HISTOGRAM, UNLABELLED]).await;
    let err = query(
        &fed,
        &format!("SELECT * FROM train('{UNLABELLED}', 'SELECT age FROM lung')"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("(rule train_output)"), "{err}");
    assert!(
        err.contains("declares no output columns")
            && err.contains(
                "LABEL railyard.output-schema='[{\"name\": \"n\", \"type\": \"Int64\"}]'"
            ),
        "{err}"
    );
    // Refused and audited at a station, with the image; nothing ran.
    let refused: Vec<_> = STATIONS
        .iter()
        .flat_map(|s| records(&governance.audit_log(s)))
        .filter(|r| r["rule"] == "train_output")
        .collect();
    assert!(!refused.is_empty());
    assert!(refused.iter().all(|r| r["decision"] == "refused"));
    assert_eq!(refused[0]["train"], image_id(UNLABELLED).as_str());
    assert_clean(&governance);
    fed.shutdown().await.unwrap();
    docker(&["rmi", "-f", UNLABELLED]);
}
