//! OMOP cohort queries: federated (three stations + hub, under the default policy: k counts
//! persons, joins and per-person derivations run at the stations) vs one DataFusion session
//! over the pooled files, in one process, on the repository's OMOP sample
//! (tests/data/omop). Prints the median times and their ratio.
//!
//! `cargo bench --bench omop`; `RAILYARD_BENCH_RUNS` sets the timed runs per query
//! (default 15).

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use railyard::client::HubClient;
use railyard::local::{Governance, LocalFederation, ReferenceSpec, TableSpec};
use railyard_engine::HubOptions;
use tokio::net::TcpListener;

const TABLES: &[&str] = &[
    "person",
    "condition_occurrence",
    "drug_exposure",
    "visit_occurrence",
];
const REFERENCES: &[&str] = &["concept", "concept_ancestor"];

const QUERIES: &[(&str, &str)] = &[
    (
        "cohort by gender (3-way join)",
        "SELECT p.gender_concept_id, count(DISTINCT p.person_id) FROM person p \
         JOIN condition_occurrence co ON co.person_id = p.person_id \
         JOIN concept_ancestor ca ON ca.descendant_concept_id = co.condition_concept_id \
         WHERE ca.ancestor_concept_id = 192671 GROUP BY 1 ORDER BY 1",
    ),
    (
        "age at first diagnosis",
        "SELECT avg(age) FROM (SELECT co.person_id, \
         min(EXTRACT(YEAR FROM co.condition_start_date)) - min(p.year_of_birth) AS age \
         FROM condition_occurrence co JOIN person p ON p.person_id = co.person_id \
         WHERE co.condition_concept_id = 192671 GROUP BY co.person_id) t",
    ),
    (
        "drugs of the cohort (EXISTS)",
        "SELECT d.drug_concept_id, count(DISTINCT d.person_id) AS n FROM drug_exposure d \
         WHERE EXISTS (SELECT 1 FROM condition_occurrence co WHERE co.person_id = d.person_id \
         AND co.condition_concept_id = 192671) GROUP BY 1 ORDER BY n DESC, 1 LIMIT 10",
    ),
    (
        "visits per person",
        "SELECT n, count(*) FROM (SELECT person_id, count(*) AS n FROM visit_occurrence \
         GROUP BY person_id) t GROUP BY n ORDER BY n",
    ),
    (
        "first condition (window)",
        "SELECT condition_concept_id, count(*) AS n FROM (SELECT person_id, condition_concept_id, \
         row_number() OVER (PARTITION BY person_id ORDER BY condition_start_date, \
         condition_occurrence_id) AS rn FROM condition_occurrence) t WHERE rn = 1 \
         GROUP BY 1 ORDER BY n DESC, 1 LIMIT 5",
    ),
    (
        "drugs by concept (rows, one table)",
        "SELECT drug_concept_id, count(*) FROM drug_exposure GROUP BY 1 ORDER BY 1",
    ),
];

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let runs: usize = std::env::var("RAILYARD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/omop");
    let temp = tempfile::tempdir()?;
    let mut governance = Governance::new(None, temp.path().join("audit"))?;
    governance.references = REFERENCES
        .iter()
        .map(|r| ReferenceSpec {
            name: r.to_string(),
            path: data.join("reference").join(format!("{r}.parquet")),
        })
        .collect();
    let specs: Vec<TableSpec> = TABLES
        .iter()
        .map(|t| TableSpec {
            name: t.to_string(),
            dir: data.join(t),
            key: None,
        })
        .collect();
    let central = SessionContext::new();
    for t in TABLES {
        let path = data.join("pooled").join(format!("{t}.parquet"));
        central
            .register_parquet(*t, path.to_str().unwrap(), ParquetReadOptions::default())
            .await?;
    }
    for r in REFERENCES {
        let path = data.join("reference").join(format!("{r}.parquet"));
        central
            .register_parquet(*r, path.to_str().unwrap(), ParquetReadOptions::default())
            .await?;
    }
    let federation = LocalFederation::start(
        &specs,
        TcpListener::bind("127.0.0.1:0").await?,
        HubOptions::default(),
        &governance,
    )
    .await?;
    let mut client = HubClient::connect(&federation.hub_url).await?;
    println!(
        "OMOP sample (2,694 persons, 3 stations, default policy) federated vs one session \
         over the pooled files; median of {runs} runs\n"
    );
    println!(
        "{:<36} {:>14} {:>14} {:>8}",
        "query", "centralized ms", "federated ms", "ratio"
    );
    for (label, sql) in QUERIES {
        central.sql(sql).await?.collect().await?;
        client.query(sql).await?;
        let (mut c, mut f) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let t = Instant::now();
            central.sql(sql).await?.collect().await?;
            c.push(t.elapsed());
            let t = Instant::now();
            client.query(sql).await?;
            f.push(t.elapsed());
        }
        let (c, f) = (median(c), median(f));
        println!(
            "{label:<36} {:>14.1} {:>14.1} {:>7.2}x",
            c.as_secs_f64() * 1e3,
            f.as_secs_f64() * 1e3,
            f.as_secs_f64() / c.as_secs_f64()
        );
    }
    federation.shutdown().await?;
    Ok(())
}
