//! What differential privacy costs a query, and where that cost goes.
//!
//! `cargo bench --bench privacy` starts three loopback lung stations whose policy allows DP
//! aggregates (a budget no run can exhaust) and times, through the Flight SQL client, the
//! same question asked exactly (the baseline: a grouped count and mean, thresholded) and with
//! DP (`dp_count(*)`, `dp_avg(age)`: a check round, one durable ledger charge per station,
//! clamping, key completion and OpenDP noise). Then it times the two station-side parts on
//! their own, in the same process: one ledger charge (an SQLite transaction committed with
//! fsync, in a directory beside the bench's stations) and the noise of one release (key
//! completion and three OpenDP Laplace measurements over two groups). Ratios are against the
//! baseline measured in the same process.
//!
//! Environment: `RAILYARD_BENCH_RUNS` (timed runs per query, default 50).

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

mod support;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use arrow::array::{Float64Array, Int64Array, RecordBatch, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use datafusion::common::ScalarValue;
use railyard::client::HubClient;
use railyard::local::Governance;
use railyard_policy::dp::{DpAggregateSpec, DpGroup, DpRelease};
use railyard_station::dp::{add_noise, plan_noise};
use railyard_station::ledger::{Charge, Ledger};
use railyard_udfs::dp::DpKind;

use support::{median, print_ratios, time_query};

const BASELINE: &str = "SELECT sex, count(*), avg(age) FROM lung GROUP BY sex";
const DP: &str = "SELECT sex, dp_count(*), dp_avg(age) FROM lung GROUP BY sex";

const POLICY: &str = "[dp]\nbudget = 1000000000\n\
                      [tables.lung.dp]\nage = { lower = 30, upper = 90 }\nsex = { keys = [1, 2] }\n";

/// A release like the DP query's at one station: two groups, a count and a mean.
fn release() -> (DpRelease, RecordBatch) {
    let count = Fields::from(vec![Field::new("s0", DataType::Int64, true)]);
    let avg = Fields::from(vec![
        Field::new("s0", DataType::Float64, true),
        Field::new("s1", DataType::Int64, true),
    ]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("g0", DataType::Int64, true),
        Field::new("a0", DataType::Struct(count.clone()), false),
        Field::new("a1", DataType::Struct(avg.clone()), false),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from(vec![1, 2])),
            Arc::new(StructArray::new(
                count,
                vec![Arc::new(Int64Array::from(vec![46, 30]))],
                None,
            )),
            Arc::new(StructArray::new(
                avg,
                vec![
                    Arc::new(Float64Array::from(vec![2900.0, 1860.0])),
                    Arc::new(Int64Array::from(vec![46, 30])),
                ],
                None,
            )),
        ],
    )
    .expect("a well-formed batch");
    let release = DpRelease {
        table: "lung".to_string(),
        groups: vec![DpGroup {
            column: "sex".to_string(),
            keys: vec![ScalarValue::Int64(Some(1)), ScalarValue::Int64(Some(2))],
        }],
        aggregates: vec![
            DpAggregateSpec {
                kind: DpKind::Count,
                column: None,
                bound: 1.0,
                edges: Vec::new(),
            },
            DpAggregateSpec {
                kind: DpKind::Avg,
                column: Some("age".to_string()),
                bound: 90.0,
                edges: Vec::new(),
            },
        ],
        rows_per_unit: 1.0,
        aggregate_schema: Arc::clone(&schema),
        output: vec![0, 1, 2],
        schema,
    };
    (release, batch)
}

#[tokio::main]
async fn main() -> Result<()> {
    let runs = support::runs(50);
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY)?;
    let governance = Governance::new(Some(&policy), dir.path().join("data"))?;
    let federation = support::lung_federation(&governance).await?;
    let mut client = HubClient::connect(&federation.hub_url).await?;
    let baseline = time_query(&mut client, BASELINE, 5, runs).await?;
    let dp = time_query(&mut client, DP, 5, runs).await?;
    federation.shutdown().await?;

    // One station's durable charge, on the same file system as the stations' ledgers.
    let ledger = Ledger::open(&dir.path().join("bench-ledger.sqlite"))?;
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        let t = Instant::now();
        ledger.charge(
            Charge {
                researcher: "bench",
                collaboration: "bench",
                table: "lung",
                query_id: "q",
                fragment: i as u64,
                epsilon: 0.5,
                sql: "SELECT partial_dp_count(1) AS a0 FROM lung",
            },
            1e9,
        )?;
        samples.push(t.elapsed());
    }
    let charge = median(samples);
    // One station's noise: plan (OpenDP privacy maps) and add (three measurements).
    let (release, batch) = release();
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let plan = plan_noise(&release, 0.5)?;
        std::hint::black_box(add_noise(&release, &plan, std::slice::from_ref(&batch))?);
        samples.push(t.elapsed());
    }
    let noise = median(samples);

    println!("three loopback lung stations, median of {runs} runs through Flight SQL\n");
    print_ratios(
        baseline,
        &[
            ("baseline: exact grouped count and mean", baseline),
            ("the same with dp_count(*), dp_avg(age)", dp),
            ("one station's ledger charge (SQLite, fsync)", charge),
            ("one station's noise (plan + 3 OpenDP measurements)", noise),
        ],
    );
    Ok(())
}
