//! The SQL corpus (`sql/*.slt`): every file runs on two engines — the centralized reference
//! and the federation (3 stations + hub over Flight SQL) — and both must give the file's
//! expected results. The federation runs each file twice: as SQL text, and as Substrait
//! plans (each query planned in a session over the pooled files, serialized by
//! `datafusion-substrait`, sent as `CommandStatementSubstraitPlan`), which must give the
//! same results.
//!
//! Expected results are the centralized engine's answers: regenerate them with
//! `RAILYARD_SLT_COMPLETE=1 cargo test --test integration slt` after adding queries, and
//! review the diff. Records only one engine should run carry `onlyif federated` or
//! `onlyif centralized`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::util::display::array_value_to_string;
use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use railyard::client::HubClient;
use railyard_engine::HubOptions;
use sqllogictest::{
    AsyncDB, DBOutput, DefaultColumnType, Runner, default_column_validator, default_normalizer,
    default_validator,
};

use crate::fixtures;

#[derive(Debug)]
pub struct EngineError(String);

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EngineError {}

/// Prints a value the same way for both engines: floats to 10 significant digits (the two
/// engines add partial sums in different orders), empty strings as `(empty)`.
pub fn format_rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for batch in batches {
        for r in 0..batch.num_rows() {
            let row = batch
                .columns()
                .iter()
                .map(|col| format_value(col.as_ref(), r))
                .collect();
            rows.push(row);
        }
    }
    rows
}

fn format_value(col: &dyn Array, row: usize) -> String {
    if col.is_null(row) {
        return "NULL".to_string();
    }
    let value = match col.data_type() {
        DataType::Float16 | DataType::Float32 | DataType::Float64 => {
            let text = array_value_to_string(col, row).expect("float formats");
            let x: f64 = text.parse().expect("float parses");
            format_float(x)
        }
        _ => array_value_to_string(col, row).expect("value formats"),
    };
    if value.is_empty() {
        "(empty)".to_string()
    } else {
        value
    }
}

pub fn format_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    if x == 0.0 {
        return "0".to_string();
    }
    let rounded: f64 = format!("{x:.9e}").parse().expect("rounded float parses");
    format!("{rounded}")
}

fn output(batches: &[RecordBatch], columns: usize) -> DBOutput<DefaultColumnType> {
    DBOutput::Rows {
        types: vec![DefaultColumnType::Any; columns],
        rows: format_rows(batches),
    }
}

/// The reference: one DataFusion session over the pooled data.
pub struct Centralized {
    ctx: SessionContext,
}

#[async_trait]
impl AsyncDB for Centralized {
    type Error = EngineError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let df = self
            .ctx
            .sql(sql)
            .await
            .map_err(|e| EngineError(e.strip_backtrace()))?;
        let columns = df.schema().fields().len();
        let batches = df
            .collect()
            .await
            .map_err(|e| EngineError(e.strip_backtrace()))?;
        Ok(output(&batches, columns))
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "centralized"
    }
}

/// The system under test: a Flight SQL client of the hub.
pub struct Federated {
    client: HubClient,
}

#[async_trait]
impl AsyncDB for Federated {
    type Error = EngineError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let answer = self
            .client
            .query(sql)
            .await
            .map_err(|e| EngineError(format!("{e:#}")))?;
        Ok(output(&answer.batches, answer.schema.fields().len()))
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "federated"
    }
}

/// The federation asked with Substrait plans: each query is planned in a session over the
/// pooled data with the same tables (the role of a client's dataframe library) and sent to
/// the hub as a plan. What that session cannot plan or serialize (a statement, an
/// intentional error of the corpus, an expression Substrait has no form for) is sent as SQL
/// and counted, so the test can say how much of the corpus went as Substrait.
pub struct Substrait {
    client: HubClient,
    planner: SessionContext,
    sent: Arc<std::sync::atomic::AtomicUsize>,
    as_sql: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl AsyncDB for Substrait {
    type Error = EngineError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        use std::sync::atomic::Ordering;
        let plan = match self.planner.sql(sql).await {
            // A table function (`generate_series(…)`) has no Substrait form: it would
            // travel as a table of that name, which no catalog holds.
            Ok(df) if reads_table_functions(df.logical_plan()) => None,
            Ok(df) => datafusion_substrait::logical_plan::producer::to_substrait_plan(
                df.logical_plan(),
                &self.planner.state(),
            )
            .ok(),
            Err(_) => None,
        };
        let answer = match plan {
            Some(plan) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                let bytes = prost::Message::encode_to_vec(plan.as_ref());
                self.client.query_substrait(bytes, false).await
            }
            None => {
                self.as_sql.fetch_add(1, Ordering::Relaxed);
                self.client.query(sql).await
            }
        }
        .map_err(|e| EngineError(format!("{e:#}")))?;
        Ok(output(&answer.batches, answer.schema.fields().len()))
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "substrait"
    }
}

/// Whether `plan` reads a table function's output.
fn reads_table_functions(plan: &datafusion::logical_expr::LogicalPlan) -> bool {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        if let datafusion::logical_expr::LogicalPlan::TableScan(scan) = node {
            found |= scan.table_name.table().ends_with(')');
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

fn corpus_file(name: &str) -> PathBuf {
    fixtures::repo().join("sql").join(name)
}

async fn run_corpus_file(name: &str) {
    let file = corpus_file(name);
    let ctx = Arc::new(fixtures::centralized().await);
    let federation =
        async { fixtures::federation(&fixtures::table_specs(), HubOptions::default()).await };
    run_against(name, &file, ctx, federation).await;
}

/// The OMOP corpus: pooled files against three stations with the vocabularies as
/// reference tables, under the open test policy.
async fn run_omop_corpus(name: &str) {
    let file = corpus_file(name);
    let ctx = Arc::new(fixtures::omop_centralized().await);
    let federation = async {
        let governance = fixtures::with_omop_references(fixtures::open_governance());
        fixtures::federation_with(&fixtures::omop_specs(), HubOptions::default(), &governance).await
    };
    run_against(name, &file, ctx, federation).await;
}

/// Runs `file` on the centralized reference, then on the federation `start` builds.
async fn run_against(
    name: &str,
    file: &Path,
    ctx: Arc<SessionContext>,
    start: impl Future<Output = railyard::local::LocalFederation>,
) {
    let make_central = {
        let ctx = Arc::clone(&ctx);
        move || {
            let ctx = ctx.as_ref().clone();
            async move { Ok::<_, EngineError>(Centralized { ctx }) }
        }
    };
    if std::env::var_os("RAILYARD_SLT_COMPLETE").is_some() {
        let mut runner = Runner::new(make_central.clone());
        runner.add_label("centralized");
        runner
            .update_test_file(
                file,
                " ",
                default_validator,
                default_normalizer,
                default_column_validator,
            )
            .await
            .unwrap_or_else(|e| panic!("completing {name}: {e}"));
    }

    let mut central = Runner::new(make_central);
    central.add_label("centralized");
    if let Err(e) = central.run_file_async(file).await {
        panic!("centralized engine, {name}:\n{}", e.display(true));
    }

    let federation = start.await;
    if !SQL_ONLY.contains(&name) {
        run_substrait(&federation, file, name, &ctx).await;
    }
    run_federated(federation, file, name, 2).await;
}

/// Corpus files not run as Substrait plans: the records of `errors.slt` are errors of SQL
/// text (it does not parse, it names nothing the catalog has), which have no plan to send.
const SQL_ONLY: &[&str] = &["errors.slt"];

/// Runs `file` through a Flight SQL client of `federation` that sends Substrait plans
/// ([`Substrait`]); most of each corpus must go as plans.
async fn run_substrait(
    federation: &railyard::local::LocalFederation,
    file: &Path,
    name: &str,
    ctx: &Arc<SessionContext>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (sent, as_sql) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let url = federation.hub_url.clone();
    let mut runner = Runner::new({
        let (sent, as_sql) = (Arc::clone(&sent), Arc::clone(&as_sql));
        let planner = ctx.as_ref().clone();
        move || {
            let (url, planner) = (url.clone(), planner.clone());
            let (sent, as_sql) = (Arc::clone(&sent), Arc::clone(&as_sql));
            async move {
                HubClient::connect(&url)
                    .await
                    .map(|client| Substrait {
                        client,
                        planner,
                        sent,
                        as_sql,
                    })
                    .map_err(|e| EngineError(format!("{e:#}")))
            }
        }
    });
    // A Substrait plan is what the federation is asked; records for the SQL text alone
    // (its errors' wording, EXPLAIN) say `onlyif federated`.
    runner.add_label("substrait");
    if let Err(e) = runner.run_file_async(file).await {
        panic!(
            "federation asked with Substrait plans, {name}:\n{}",
            e.display(true)
        );
    }
    let (sent, as_sql) = (sent.load(Ordering::Relaxed), as_sql.load(Ordering::Relaxed));
    eprintln!("{name}: {sent} queries sent as Substrait plans, {as_sql} as SQL");
    assert!(
        sent * 2 > sent + as_sql,
        "{name}: only {sent} of {} queries could be sent as Substrait plans",
        sent + as_sql
    );
}

/// Runs `file` through a Flight SQL client of `federation`, then stops the federation.
/// Runs `file` against `federation` `passes` times. A second pass of a corpus file asks
/// every statement again, so it is answered from the hub's kept plans (engine/src/hub/
/// cache.rs) where it may be, and must answer the same. (Policy files run once: a
/// researcher asking again changes what a station's query-set auditor allows.)
async fn run_federated(
    federation: railyard::local::LocalFederation,
    file: &Path,
    name: &str,
    passes: usize,
) {
    let url = federation.hub_url.clone();
    let mut federated = Runner::new(move || {
        let url = url.clone();
        async move {
            HubClient::connect(&url)
                .await
                .map(|client| Federated { client })
                .map_err(|e| EngineError(format!("{e:#}")))
        }
    });
    federated.add_label("federated");
    let mut result = Ok(());
    for _ in 0..passes {
        result = federated.run_file_async(file).await;
        if result.is_err() {
            break;
        }
    }
    federation
        .shutdown()
        .await
        .expect("federation stops cleanly");
    if let Err(e) = result {
        panic!("federated engine, {name}:\n{}", e.display(true));
    }
}

macro_rules! corpus {
    ($($test:ident => $file:literal),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                run_corpus_file($file).await;
            }
        )*

        /// Every corpus file has a test above.
        #[test]
        fn every_corpus_file_is_run() {
            let listed: std::collections::BTreeSet<&str> =
                [$($file),*, "omop.slt"].into_iter().collect();
            let mut on_disk = std::collections::BTreeSet::new();
            for entry in std::fs::read_dir(fixtures::repo().join("sql")).expect("sql/ exists") {
                let name = entry.expect("dir entry").file_name().into_string().expect("UTF-8");
                if name.ends_with(".slt") {
                    on_disk.insert(name);
                }
            }
            let on_disk: std::collections::BTreeSet<&str> =
                on_disk.iter().map(String::as_str).collect();
            assert_eq!(listed, on_disk, "sql/*.slt and the corpus! list differ");
        }
    };
}

corpus! {
    slt_lung => "lung.slt",
    slt_breast_cancer => "breast_cancer.slt",
    slt_registry => "registry.slt",
    slt_tpch => "tpch.slt",
    slt_errors => "errors.slt",
}

/// Relational fragments plan deeper than single-table ones: the runtime has the worker
/// stacks of `railyard` itself (8 MiB; tokio's default is 2 MiB).
#[test]
fn slt_omop() {
    fixtures::on_railyard_stacks(run_omop_corpus("omop.slt"));
}

/// Runs a policy corpus file (`sql/policy/NAME.slt`) on the federation only, its stations
/// governed by `policy` (a file under `sql/policy/`, or the default policy).
async fn run_policy_file(name: &str, policy: Option<&str>) {
    let file = fixtures::repo().join("sql/policy").join(name);
    let policy = policy.map(|p| fixtures::repo().join("sql/policy").join(p));
    let governance = railyard::local::Governance::new(policy.as_deref(), fixtures::audit_dir())
        .expect("the corpus policy loads");
    let federation =
        fixtures::federation_with(&fixtures::table_specs(), HubOptions::default(), &governance)
            .await;
    // The same refusals must hold for the same queries sent as Substrait plans.
    let planner = Arc::new(fixtures::centralized().await);
    run_substrait(&federation, &file, name, &planner).await;
    run_federated(federation, &file, name, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_policy_adversarial_under_the_default_policy() {
    run_policy_file("adversarial.slt", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_policy_attacks_under_the_default_policy() {
    run_policy_file("attacks.slt", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_policy_hospital() {
    run_policy_file("hospital.slt", Some("hospital.toml")).await;
}

/// The OMOP attacks (`sql/policy/omop_attacks.slt`): the OMOP stations under the default
/// policy, their vocabularies as reference tables.
#[test]
fn slt_policy_omop_attacks_under_the_default_policy() {
    fixtures::on_railyard_stacks(async {
        let file = fixtures::repo().join("sql/policy/omop_attacks.slt");
        let governance = fixtures::with_omop_references(fixtures::default_governance());
        let federation =
            fixtures::federation_with(&fixtures::omop_specs(), HubOptions::default(), &governance)
                .await;
        let planner = Arc::new(fixtures::omop_centralized().await);
        run_substrait(&federation, &file, "omop_attacks.slt", &planner).await;
        run_federated(federation, &file, "omop_attacks.slt", 1).await;
    });
}

/// Every policy corpus file has a test above.
#[test]
fn every_policy_corpus_file_is_run() {
    let mut on_disk = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(fixtures::repo().join("sql/policy")).expect("sql/policy/") {
        let name = entry
            .expect("dir entry")
            .file_name()
            .into_string()
            .expect("UTF-8");
        if name.ends_with(".slt") {
            on_disk.insert(name);
        }
    }
    let listed: std::collections::BTreeSet<String> = [
        "adversarial.slt",
        "attacks.slt",
        "hospital.slt",
        "omop_attacks.slt",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(listed, on_disk);
}
