//! `railyard demo`: a three-hospital federation on synthetic registry data, a handful of
//! realistic questions, each shown with its federated plan and its answer.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use arrow::array::{Array, AsArray};
use railyard_engine::HubOptions;
use tokio::net::TcpListener;

use crate::client::{Answer, HubClient};
use crate::local::{Governance, LocalFederation, TableSpec};
use crate::synth;

/// Default number of synthetic patients over all stations.
pub const DEFAULT_PATIENTS: usize = 210_000;

/// The demo's questions: (what a researcher asks, the SQL).
pub const QUERIES: &[(&str, &str)] = &[
    (
        "How many patients does the federation hold, and how old were they at diagnosis?",
        "SELECT count(*) AS patients, round(avg(age), 1) AS mean_age, \
         round(stddev_samp(age), 1) AS sd_age FROM registry",
    ),
    (
        "Case mix by tumour site and sex",
        "SELECT site, sex, count(*) AS patients, round(avg(age), 1) AS mean_age \
         FROM registry GROUP BY site, sex ORDER BY site, sex",
    ),
    (
        "Share of advanced (stage III-IV) tumours by site and period of diagnosis \
         (stations release counts per group; the hub computes the shares)",
        "WITH g AS (SELECT site, CASE WHEN diagnosis_year < 2012 THEN '2000-2011' \
         ELSE '2012-2022' END AS period, stage >= 3 AS advanced, count(*) AS n \
         FROM registry WHERE stage IS NOT NULL AND site IN ('lung', 'colorectal', 'breast') \
         GROUP BY 1, 2, 3) \
         SELECT site, period, sum(n) AS patients, \
         round(100.0 * sum(CASE WHEN advanced THEN n ELSE 0 END) / sum(n), 1) AS pct_advanced \
         FROM g GROUP BY site, period ORDER BY site, period",
    ),
    (
        "Crude 5-year mortality by stage, diagnoses up to 2020",
        "WITH g AS (SELECT stage, vital_status = 'dead' AND survival_days <= 1826 AS died, \
         count(*) AS n, sum(survival_days) AS days FROM registry \
         WHERE diagnosis_date <= DATE '2020-12-31' AND stage IS NOT NULL GROUP BY 1, 2) \
         SELECT stage, sum(n) AS patients, \
         round(100.0 * sum(CASE WHEN died THEN n ELSE 0 END) / sum(n), 1) AS pct_dead_within_5y, \
         round(CAST(sum(days) AS DOUBLE) / sum(n) / 365.25, 2) AS mean_years_followed \
         FROM g GROUP BY stage ORDER BY stage",
    ),
    (
        "Body-mass index by sex (a DECIMAL column, with missing values)",
        "SELECT sex, count(bmi) AS measured, count(*) - count(bmi) AS missing, \
         round(avg(bmi), 2) AS mean_bmi, round(var_samp(bmi), 2) AS var_bmi \
         FROM registry GROUP BY sex ORDER BY sex",
    ),
    (
        "Yearly incidence per site: sites averaging more than 500 cases a year",
        "WITH yearly AS (SELECT site, diagnosis_year, count(*) AS cases FROM registry \
         GROUP BY site, diagnosis_year) \
         SELECT site, min(cases) AS fewest, max(cases) AS most, round(avg(cases), 1) AS mean \
         FROM yearly GROUP BY site HAVING avg(cases) > 500 ORDER BY mean DESC",
    ),
];

/// The real datasets the demo's stations also hold, embedded in the binary (see
/// `tests/data/README.md` for their sources): (table, station, CSV text).
/// The OMOP sample's tables the demo's cohort section reads (tests/data/omop: the Eunomia
/// GiBleed sample split by person), per station.
const OMOP_DATA: &[(&str, &str, &[u8])] = &[
    (
        "person",
        "station_a",
        include_bytes!("../tests/data/omop/person/station_a.parquet"),
    ),
    (
        "person",
        "station_b",
        include_bytes!("../tests/data/omop/person/station_b.parquet"),
    ),
    (
        "person",
        "station_c",
        include_bytes!("../tests/data/omop/person/station_c.parquet"),
    ),
    (
        "condition_occurrence",
        "station_a",
        include_bytes!("../tests/data/omop/condition_occurrence/station_a.parquet"),
    ),
    (
        "condition_occurrence",
        "station_b",
        include_bytes!("../tests/data/omop/condition_occurrence/station_b.parquet"),
    ),
    (
        "condition_occurrence",
        "station_c",
        include_bytes!("../tests/data/omop/condition_occurrence/station_c.parquet"),
    ),
    (
        "drug_exposure",
        "station_a",
        include_bytes!("../tests/data/omop/drug_exposure/station_a.parquet"),
    ),
    (
        "drug_exposure",
        "station_b",
        include_bytes!("../tests/data/omop/drug_exposure/station_b.parquet"),
    ),
    (
        "drug_exposure",
        "station_c",
        include_bytes!("../tests/data/omop/drug_exposure/station_c.parquet"),
    ),
];

/// The OMOP vocabularies, reference tables every station holds.
const OMOP_REFERENCES: &[(&str, &[u8])] = &[
    (
        "concept",
        include_bytes!("../tests/data/omop/reference/concept.parquet"),
    ),
    (
        "concept_ancestor",
        include_bytes!("../tests/data/omop/reference/concept_ancestor.parquet"),
    ),
];

/// The cohort section: questions over several tables with many rows per person.
pub const OMOP_QUERIES: &[(&str, &str)] = &[
    (
        "The GI bleed cohort (the concept and its descendants in the vocabulary), by gender",
        "SELECT CASE p.gender_concept_id WHEN 8507 THEN 'MALE' WHEN 8532 THEN 'FEMALE' END \
         AS gender, count(DISTINCT p.person_id) AS persons \
         FROM person p \
         JOIN condition_occurrence co ON co.person_id = p.person_id \
         JOIN concept_ancestor ca ON ca.descendant_concept_id = co.condition_concept_id \
         WHERE ca.ancestor_concept_id = 192671 GROUP BY 1 ORDER BY 1",
    ),
    (
        "Age at first GI bleed: a per-person minimum computed at each station (the same \
         cohort: the query-set auditor refuses two cohorts a few persons apart)",
        "SELECT count(*) AS persons, round(avg(age), 1) AS mean_age, \
         round(stddev(age), 1) AS sd FROM (\
         SELECT co.person_id, \
         min(EXTRACT(YEAR FROM co.condition_start_date)) - min(p.year_of_birth) AS age \
         FROM condition_occurrence co JOIN person p ON p.person_id = co.person_id \
         JOIN concept_ancestor ca ON ca.descendant_concept_id = co.condition_concept_id \
         WHERE ca.ancestor_concept_id = 192671 GROUP BY co.person_id) t",
    ),
    (
        "Diagnoses per person: a per-person count at each station, then how many persons \
         have each count (per-drug counts are refused by the query-set auditor here: two \
         drugs given together differ by a few persons at a station)",
        "SELECT n AS diagnoses, count(*) AS persons FROM (SELECT person_id, count(*) AS n \
         FROM condition_occurrence GROUP BY person_id) t GROUP BY n ORDER BY n",
    ),
    (
        "One person's diagnoses: 41 rows, but one person, so every group is withheld",
        "SELECT condition_concept_id, count(*) AS n FROM condition_occurrence \
         WHERE person_id = 3353 GROUP BY 1",
    ),
];

const REAL_DATA: &[(&str, &str, &str)] = &[
    (
        "lung",
        "station_a",
        include_str!("../tests/data/lung/horizontal/csv/station_a.csv"),
    ),
    (
        "lung",
        "station_b",
        include_str!("../tests/data/lung/horizontal/csv/station_b.csv"),
    ),
    (
        "lung",
        "station_c",
        include_str!("../tests/data/lung/horizontal/csv/station_c.csv"),
    ),
    (
        "breast_cancer",
        "station_a",
        include_str!("../tests/data/breast_cancer/horizontal/csv/station_a.csv"),
    ),
    (
        "breast_cancer",
        "station_b",
        include_str!("../tests/data/breast_cancer/horizontal/csv/station_b.csv"),
    ),
    (
        "breast_cancer",
        "station_c",
        include_str!("../tests/data/breast_cancer/horizontal/csv/station_c.csv"),
    ),
];

/// The vertically partitioned breast-cancer data: (station, CSV text). station_a holds the
/// diagnosis and the `mean_*` features, station_b the `*_error` features, station_c the
/// `worst_*` features of all but 29 patients; `patient_id` links them.
const VERTICAL_DATA: &[(&str, &str)] = &[
    (
        "station_a",
        include_str!("../tests/data/breast_cancer/vertical/csv/station_a.csv"),
    ),
    (
        "station_b",
        include_str!("../tests/data/breast_cancer/vertical/csv/station_b.csv"),
    ),
    (
        "station_c",
        include_str!("../tests/data/breast_cancer/vertical/csv/station_c.csv"),
    ),
];

/// The vertical table's name in the demo.
pub const VERTICAL_TABLE: &str = "breast_vertical";

/// The vertical part of the demo: (what a researcher asks, the SQL).
pub const VERTICAL: &[(&str, &str)] = &[
    (
        "Columns of three stations in one aggregate: mean features (station_a), error \
         features (station_b) and worst features (station_c), joined at the hub on keyed \
         pseudonyms of patient_id",
        "SELECT diagnosis, count(*) AS patients, round(avg(mean_radius), 2) AS mean_radius, \
         round(avg(radius_error), 3) AS radius_error, round(avg(worst_area), 1) AS worst_area \
         FROM breast_vertical WHERE worst_texture > 20 GROUP BY diagnosis ORDER BY diagnosis",
    ),
    (
        "A logistic regression whose covariates live at three different stations",
        "SELECT * FROM glm('breast_vertical', \
         'diagnosis ~ mean_radius + worst_texture + concavity_error', 'binomial')",
    ),
];

/// The statistics part of the demo: (what a researcher asks, the SQL).
pub const MODELS: &[(&str, &str)] = &[
    (
        "Logistic regression on the Wisconsin breast cancer data: how do tumour radius and \
         texture relate to a benign diagnosis? (Fisher scoring, one round trip per station \
         and iteration)",
        "SELECT * FROM glm('breast_cancer', 'diagnosis ~ mean_radius + mean_texture', 'binomial')",
    ),
    (
        "The same model's fit",
        "SELECT * FROM glm_fit('breast_cancer', 'diagnosis ~ mean_radius + mean_texture', 'binomial')",
    ),
    (
        "Survival after advanced lung cancer (NCCTG) by sex: log-rank test",
        "SELECT * FROM logrank('lung', 'time', 'status', 'sex')",
    ),
    (
        "Cox proportional hazards: age and sex (Efron ties)",
        "SELECT * FROM cox('lung', 'time', 'status', 'age + sex')",
    ),
];

/// The Kaplan–Meier query whose curves the demo draws.
const KAPLAN_MEIER: &str =
    "SELECT \"group\", time, survival FROM kaplan_meier('lung', 'time', 'status', 'sex')";

/// Questions the stations' default policy refuses: (what is tried, the SQL).
pub const REFUSED: &[(&str, &str)] = &[
    (
        "The youngest patient's exact age (one person's value)",
        "SELECT min(age) FROM registry",
    ),
    (
        "Row-level data",
        "SELECT patient_id, age, site FROM registry LIMIT 5",
    ),
    (
        "One patient singled out by a filter",
        "SELECT count(*), avg(age) FROM registry WHERE patient_id = 1234",
    ),
    (
        "The first question again without one patient (the query-set auditor: the \
         difference would be that patient's age)",
        "SELECT count(*) AS patients, round(avg(age), 1) AS mean_age FROM registry \
         WHERE patient_id <> 1234",
    ),
];

/// The demo's differentially private query (the example), run with the stations'
/// default ε.
pub const DP_QUERY: &str = "SELECT sex, dp_count(*) AS patients, dp_avg(age) AS mean_age \
     FROM lung GROUP BY sex ORDER BY sex";

/// The demo's DP median: from noisy histograms over the policy's bins (exact medians are
/// refused).
pub const DP_MEDIAN_QUERY: &str =
    "SELECT sex, dp_median(age) AS median_age FROM lung GROUP BY sex ORDER BY sex";

/// The example train the demo runs when its image exists (`scripts/build-trains`).
pub const TRAIN_IMAGE: &str = "railyard/histogram:dev";
/// The demo's train query.
pub const TRAIN_QUERY: &str = "SELECT bin_lower, bin_upper, sum(n) AS patients \
     FROM train('railyard/histogram:dev', 'SELECT age FROM lung', \
     '{\"column\": \"age\", \"edges\": [30, 40, 50, 60, 70, 80, 90]}') \
     GROUP BY bin_lower, bin_upper ORDER BY bin_lower";

/// Runs the demo, writing everything it shows to `out`.
pub async fn run(
    patients: usize,
    data_dir: &Path,
    serve: Option<std::net::SocketAddr>,
    out: &mut impl Write,
) -> Result<()> {
    let console_listener = match serve {
        Some(addr) if !addr.ip().is_loopback() => anyhow::bail!(
            "--serve {addr}: the console has no authentication, so it listens on a loopback \
             address only (127.0.0.1 or ::1)"
        ),
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the console"))?,
        ),
        None => None,
    };
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let profiles = synth::default_profiles(patients);
    let registry = synth::write_registry(dir.path(), &profiles, synth::DEFAULT_SEED)?;
    writeln!(
        out,
        "Generated {patients} synthetic patients for {} stations in {:.1?}:",
        profiles.len(),
        started.elapsed()
    )?;
    for p in &profiles {
        writeln!(out, "  {:<10} {:>7} patients", p.name, p.patients)?;
    }
    let mut tables = vec![TableSpec {
        name: "registry".into(),
        dir: registry,
        key: None,
    }];
    for (table, station, csv) in REAL_DATA {
        let dir = dir.path().join(table);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{station}.csv")), csv)?;
        if !tables.iter().any(|t| t.name == *table) {
            tables.push(TableSpec {
                name: table.to_string(),
                dir,
                key: None,
            });
        }
    }
    for (table, station, bytes) in OMOP_DATA {
        let dir = dir.path().join("omop").join(table);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{station}.parquet")), bytes)?;
        if !tables.iter().any(|t| t.name == *table) {
            tables.push(TableSpec {
                name: table.to_string(),
                dir,
                key: None,
            });
        }
    }
    let vertical = dir.path().join(VERTICAL_TABLE);
    std::fs::create_dir_all(&vertical)?;
    for (station, csv) in VERTICAL_DATA {
        std::fs::write(vertical.join(format!("{station}.csv")), csv)?;
    }
    tables.push(TableSpec {
        name: VERTICAL_TABLE.into(),
        dir: vertical,
        key: Some("patient_id".into()),
    });
    // The example train runs if this machine has its image (scripts/build-trains).
    let mut governance = Governance::new(None, data_dir)?;
    for (name, bytes) in OMOP_REFERENCES {
        let path = dir.path().join("omop").join(format!("{name}.parquet"));
        std::fs::write(&path, bytes)?;
        governance.references.push(crate::local::ReferenceSpec {
            name: name.to_string(),
            path,
        });
    }
    let train_image = railyard_station::train::Trains::new("demo", dir.path().join("trains"), 1)
        .resolve(TRAIN_IMAGE)
        .await
        .ok();
    if let Some(id) = &train_image {
        governance.policy.trains.allowed = vec![id.clone()];
    }
    enable_dp(&mut governance.policy);
    // Each run is its own collaboration, so its DP budget starts full (the ledgers under
    // the data directory keep every run's spend).
    let options = HubOptions {
        collaboration: format!("demo-{}", uuid_like()),
        ..HubOptions::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let federation = LocalFederation::start(&tables, listener, options, &governance).await?;
    writeln!(
        out,
        "Hub listening on {}; stations: {}\n",
        federation.hub_url,
        federation
            .stations
            .iter()
            .map(|s| format!("{} ({})", s.name, s.url))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let mut client = HubClient::connect(&federation.hub_url).await?;
    let result = async {
        for (i, (question, sql)) in QUERIES.iter().enumerate() {
            let title = format!("{}. {question}", i + 1);
            show_query(&mut client, out, &title, sql, true).await?;
        }
        show_models(&mut client, out).await?;
        show_vertical(&mut client, out).await?;
        show_omop(&mut client, out).await?;
        show_train(&mut client, out, train_image.as_deref()).await?;
        show_dp(&mut client, out).await?;
        writeln!(
            out,
            "── The stations' default policy: every column 'aggregate', groups of at least 5"
        )?;
        let policies = client
            .query(
                "SELECT station, table_name, min_group_size, count(*) AS columns, \
                 string_agg(DISTINCT visibility, ', ') AS visibilities FROM railyard.policies \
                 GROUP BY 1, 2, 3 ORDER BY 1, 2",
            )
            .await?;
        writeln!(out, "{}\n", policies.to_table()?)?;
        for (what, sql) in REFUSED {
            writeln!(out, "── Refused: {what}")?;
            writeln!(out, "{sql}")?;
            match client.query(sql).await {
                Ok(answer) => anyhow::bail!(
                    "the default policy let through {} rows of: {sql}",
                    answer.num_rows()
                ),
                Err(e) => writeln!(out, "  → {}\n", refusal_text(&e))?,
            }
        }
        writeln!(
            out,
            "Every decision above is in the stations' audit logs: {} \
             (check one with `railyard audit verify PATH`)",
            data_dir.join("<station>").join("audit.jsonl").display()
        )?;
        anyhow::Ok(())
    }
    .await;
    if let (Ok(()), Some(listener)) = (&result, console_listener) {
        let history = data_dir.join("console").join("history.jsonl");
        crate::local::serve_until_stopped(&federation, listener, history, out).await?;
    }
    federation.shutdown().await?;
    result
}

/// The statistics functions on real data, with a text plot of the Kaplan–Meier curves.
async fn show_models(client: &mut HubClient, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "── Statistics on real data (docs/statistics.md); the stations' default policy \
         applies: models over at least 10 rows per station, survival times in weeks pooled \
         to at least 5 patients per station and released time"
    )?;
    let t = Instant::now();
    let answer = client.query(KAPLAN_MEIER).await?;
    let elapsed = t.elapsed();
    writeln!(
        out,
        "── Kaplan–Meier survival by sex (lung: 1 = male, 2 = female)"
    )?;
    writeln!(out, "{KAPLAN_MEIER}\n")?;
    write!(out, "{}", survival_plot(&answer, 64, 16))?;
    writeln!(
        out,
        "{} released times in {:.1} ms\n",
        answer.num_rows(),
        elapsed.as_secs_f64() * 1000.0
    )?;
    for (question, sql) in MODELS {
        show_query(client, out, question, sql, false).await?;
    }
    Ok(())
}

/// Shows one question: its SQL, optionally its federated plan, its answer and how long the
/// answer took.
async fn show_query(
    client: &mut HubClient,
    out: &mut impl Write,
    question: &str,
    sql: &str,
    explain: bool,
) -> Result<()> {
    writeln!(out, "── {question}")?;
    writeln!(out, "{sql}\n")?;
    if explain {
        let plan = client.query(&format!("EXPLAIN FEDERATED {sql}")).await?;
        write!(out, "{}", format_explain(&plan))?;
    }
    let t = Instant::now();
    let answer = client.query(sql).await?;
    let elapsed = t.elapsed();
    writeln!(out, "{}", answer.to_table()?)?;
    writeln!(
        out,
        "{} rows in {:.1} ms (3 stations, over Flight on loopback)\n",
        answer.num_rows(),
        elapsed.as_secs_f64() * 1000.0
    )?;
    Ok(())
}

/// The OMOP section: a cohort over several tables, each station joining and deriving per
/// person over its own patients; k counts persons, not rows.
async fn show_omop(client: &mut HubClient, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "── Relational data (docs/omop.md): the OHDSI Eunomia OMOP sample, 2,694 synthetic \
         persons split over the three stations, the vocabularies as reference tables; every \
         table counts distinct person_id, so k = 5 means five persons"
    )?;
    for (i, (question, sql)) in OMOP_QUERIES.iter().enumerate() {
        show_query(client, out, question, sql, i == 0).await?;
    }
    Ok(())
}

/// A vertically partitioned table: its plan (each member's fragment, the hub join) and
/// answers.
async fn show_vertical(client: &mut HubClient, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "── Vertically partitioned data (docs/vertical.md): {VERTICAL_TABLE} is the inner join \
         of three stations' columns of the same patients; the stations share a secret for \
         keyed pseudonyms of patient_id that the hub never sees"
    )?;
    for (i, (question, sql)) in VERTICAL.iter().enumerate() {
        show_query(client, out, question, sql, i == 0).await?;
    }
    Ok(())
}

/// The demo stations' DP settings: a budget per researcher, bounds for lung's ages and the
/// public keys of its sex column (the rest of the default policy is unchanged).
fn enable_dp(policy: &mut railyard_station::Policy) {
    use railyard_policy::file::{DpColumn, DpKey, DpPolicy};
    policy.dp = Some(DpPolicy {
        max_rows_per_unit: 1,
        budget: 10.0,
        max_epsilon: 1.0,
        epsilon: 0.5,
    });
    let table = policy.tables.entry("lung".to_string()).or_default();
    table.dp.insert(
        "age".to_string(),
        DpColumn {
            bounds: Some((30.0, 90.0)),
            // Five-year bins for dp_median.
            bins: Some(railyard_udfs::dp::histogram::equal_width_edges(
                30.0, 90.0, 12,
            )),
            keys: None,
            line: 0,
        },
    );
    table.dp.insert(
        "sex".to_string(),
        DpColumn {
            bounds: None,
            bins: None,
            keys: Some(vec![DpKey::Int(1), DpKey::Int(2)]),
            line: 0,
        },
    );
}

/// A random hex word (the demo's collaboration name).
fn uuid_like() -> String {
    use rand::Rng;
    format!("{:08x}", rand::rng().random::<u32>())
}

/// A differentially private query: its plan (with the ε each station charges), a noisy
/// answer, and the budget left.
async fn show_dp(client: &mut HubClient, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "── Differential privacy (docs/privacy.md): each station adds Laplace noise (OpenDP) \
         to its own counts, sums and histograms (medians), after charging ε to the researcher's budget in its \
         ledger; the hub adds up noisy states only"
    )?;
    show_query(
        client,
        out,
        "Patients and mean age by sex, ε = 0.5 per station (the true counts are 138 and 90)",
        DP_QUERY,
        true,
    )
    .await?;
    show_query(
        client,
        out,
        "Median age by sex from noisy 5-year histograms, ε = 0.5 per station (the true \
         medians are 64 and 61)",
        DP_MEDIAN_QUERY,
        false,
    )
    .await?;
    let budget = client
        .query(
            "SELECT station, table_name, budget, spent, remaining FROM railyard.budget \
             WHERE table_name = 'lung' ORDER BY station",
        )
        .await?;
    writeln!(out, "── The budget left (SELECT * FROM railyard.budget)")?;
    writeln!(out, "{}\n", budget.to_table()?)?;
    Ok(())
}

/// The example train, if its image exists here.
async fn show_train(client: &mut HubClient, out: &mut impl Write, id: Option<&str>) -> Result<()> {
    let Some(id) = id else {
        writeln!(
            out,
            "── Containerized trains (docs/trains.md): skipped, this machine has no image \
             {TRAIN_IMAGE} (`scripts/build-trains` builds it; it needs a Docker daemon)\n"
        )?;
        return Ok(());
    };
    writeln!(
        out,
        "── Containerized trains (docs/trains.md): each station runs the image {TRAIN_IMAGE} \
         ({id}, on its allowlist) over its own rows, with no network, a read-only root and \
         an unprivileged user, and releases only its checked output"
    )?;
    show_query(
        client,
        out,
        "Age histogram of the lung patients, computed by a train at each station",
        TRAIN_QUERY,
        true,
    )
    .await
}

/// Step curves of `(group, time, survival)` rows on a `width` × `height` character grid,
/// one letter per group (its first character), survival from 1 at the top to 0 at the bottom.
pub fn survival_plot(answer: &Answer, width: usize, height: usize) -> String {
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for batch in &answer.batches {
        let groups = batch.column(0).as_string::<i32>();
        let times = batch
            .column(1)
            .as_primitive::<arrow::datatypes::Float64Type>();
        let survival = batch
            .column(2)
            .as_primitive::<arrow::datatypes::Float64Type>();
        for r in 0..batch.num_rows() {
            let g = groups.value(r).to_string();
            let point = (times.value(r), survival.value(r));
            match curves.iter_mut().find(|(name, _)| *name == g) {
                Some((_, points)) => points.push(point),
                None => curves.push((g, vec![point])),
            }
        }
    }
    let t_max = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(t, _)| *t))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let mut grid = vec![vec![' '; width]; height];
    for (name, points) in &curves {
        let mark = name.chars().next().unwrap_or('*');
        for (x, column) in (0..width).map(|x| (x, x as f64 / (width - 1) as f64 * t_max)) {
            // The step function: the survival after the last time at or before this column.
            let s = points
                .iter()
                .take_while(|(t, _)| *t <= column)
                .last()
                .map_or(1.0, |(_, s)| *s);
            let y = ((1.0 - s) * (height - 1) as f64).round() as usize;
            grid[y.min(height - 1)][x] = mark;
        }
    }
    let mut text = String::new();
    for (i, row) in grid.iter().enumerate() {
        let label = match i {
            0 => "1.0 ┤".to_string(),
            i if i == height - 1 => "0.0 ┤".to_string(),
            i if i == (height - 1) / 2 => "0.5 ┤".to_string(),
            _ => "    │".to_string(),
        };
        text.push_str(&format!("  {label}{}\n", row.iter().collect::<String>()));
    }
    text.push_str(&format!("      └{}\n", "─".repeat(width)));
    text.push_str(&format!(
        "       0{:>w$}\n",
        format!("{t_max:.0} days"),
        w = width - 1
    ));
    text.push_str(&format!(
        "       curves: {}\n",
        curves
            .iter()
            .map(|(name, _)| format!("{} = sex {name}", name.chars().next().unwrap_or('*')))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    text
}

/// The message of a refused query, without the client library's wrapping.
fn refusal_text(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    match text.find("policy:") {
        Some(at) => text[at..].to_string(),
        None => text,
    }
}

/// Renders an `EXPLAIN FEDERATED` answer compactly: each fragment once, with the stations
/// that run it and what leaves them, then the hub's merge plan.
pub fn format_explain(answer: &Answer) -> String {
    let mut text = String::new();
    let mut fragments: Vec<(String, Vec<String>, String, String)> = Vec::new();
    let mut hub = String::new();
    for batch in &answer.batches {
        let col = |i: usize| batch.column(i).as_string::<i32>().clone();
        let (location, step, plan, releases) = (col(0), col(1), col(2), col(3));
        for r in 0..batch.num_rows() {
            if location.is_null(r) {
                continue;
            }
            // The hub's own steps: the merge plan, or a vertical table's join (a fragment).
            if location.value(r) == "hub" && !step.value(r).starts_with("fragment") {
                hub = plan.value(r).to_string();
                continue;
            }
            match fragments.iter_mut().find(|f| f.0 == step.value(r)) {
                Some(f) => f.1.push(location.value(r).to_string()),
                None => fragments.push((
                    step.value(r).to_string(),
                    vec![location.value(r).to_string()],
                    plan.value(r).to_string(),
                    releases.value(r).to_string(),
                )),
            }
        }
    }
    for (step, stations, sql, releases) in fragments {
        text.push_str(&format!("  {step} at {}:\n", stations.join(", ")));
        text.push_str(&format!("    {sql}\n"));
        if stations == ["hub"] {
            text.push_str(&format!("    leaves the join: {releases}\n"));
        } else {
            text.push_str(&format!("    leaves each station: {releases}\n"));
        }
    }
    text.push_str("  hub merge plan:\n");
    for line in hub.lines() {
        text.push_str(&format!("    {line}\n"));
    }
    text
}
