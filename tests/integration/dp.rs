//! Differential privacy end to end: DP aggregates over the lung stations (real Flight,
//! real ledgers), checked against the pooled centralized DataFusion answer, the budget, the
//! refusals, and the ledger through a SIGKILL.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::Float64Type;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use railyard::client::{Answer, HubClient};
use railyard::local::{Governance, LocalFederation};
use railyard_engine::HubOptions;

use crate::fixtures::{self, STATIONS, spec, test_data};

/// A DP policy: ages are `dp` with bounds, sex and ph_ecog have public keys (ph_ecog 4 does
/// not occur in the data), inst has none. `budget` and `max_epsilon` vary per test.
fn dp_policy(budget: f64, max_epsilon: f64, age_bounds: (f64, f64)) -> String {
    format!(
        "min_group_size = 5\n\
         [dp]\nbudget = {budget}\nmax_epsilon = {max_epsilon}\nepsilon = {default}\n\
         [tables.lung.columns]\nage = \"dp\"\nmeal_cal = \"hidden\"\n\
         [tables.lung.dp]\nage = {{ lower = {}, upper = {} }}\n\
         sex = {{ keys = [1, 2] }}\nph_ecog = {{ keys = [0, 1, 2, 3, 4] }}\n\
         wt_loss = {{ lower = -20, upper = 50 }}\n",
        age_bounds.0,
        age_bounds.1,
        default = max_epsilon.min(0.5),
    )
}

fn dp_governance(policy: &str) -> (Governance, PathBuf) {
    let dir = fixtures::audit_dir();
    let file = dir.join("policy.toml");
    std::fs::write(&file, policy).unwrap();
    (
        Governance::new(Some(&file), dir.join("data")).unwrap(),
        file,
    )
}

/// The lung stations (Parquet) and a hub under `policy`, and a client of the hub.
async fn lung(policy: &str) -> (Governance, LocalFederation, HubClient) {
    let (governance, _) = dp_governance(policy);
    let federation = fixtures::federation_with(
        &[spec("lung", test_data("lung/horizontal/parquet"))],
        HubOptions::default(),
        &governance,
    )
    .await;
    let client = HubClient::connect(&federation.hub_url).await.unwrap();
    (governance, federation, client)
}

/// Plain DataFusion over the three station files as one table.
async fn pooled() -> SessionContext {
    let ctx = SessionContext::new();
    let files: Vec<String> = STATIONS
        .iter()
        .map(|s| fixtures::path(&test_data(&format!("lung/horizontal/parquet/{s}.parquet"))))
        .collect();
    ctx.register_parquet("lung", files[0].as_str(), ParquetReadOptions::default())
        .await
        .unwrap();
    for (i, f) in files.iter().enumerate().skip(1) {
        ctx.register_parquet(
            format!("lung{i}"),
            f.as_str(),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap();
    }
    ctx.sql("CREATE VIEW lung_all AS SELECT * FROM lung UNION ALL SELECT * FROM lung1 UNION ALL SELECT * FROM lung2")
        .await
        .unwrap();
    ctx
}

async fn reference_f64(ctx: &SessionContext, sql: &str) -> Vec<f64> {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let mut out = Vec::new();
    for b in batches {
        let c = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Float64).unwrap();
        out.extend(
            c.as_primitive::<Float64Type>()
                .iter()
                .map(|v| v.unwrap_or(0.0)),
        );
    }
    out
}

fn ints(answer: &Answer, column: usize) -> Vec<i64> {
    answer
        .batches
        .iter()
        .flat_map(|b| {
            let c = b
                .column(column)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            c.iter().map(|v| v.unwrap()).collect::<Vec<_>>()
        })
        .collect()
}

fn floats(answer: &Answer, column: usize) -> Vec<Option<f64>> {
    answer
        .batches
        .iter()
        .flat_map(|b| {
            let c = b
                .column(column)
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap();
            c.iter().collect::<Vec<_>>()
        })
        .collect()
}

/// (station, spent, remaining) for table lung from `railyard.budget`, in station order.
async fn budget(client: &mut HubClient) -> Vec<(String, f64, f64)> {
    let a = client
        .query(
            "SELECT station, spent, remaining FROM railyard.budget \
             WHERE table_name = 'lung' ORDER BY station",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    for b in &a.batches {
        let s = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let spent = b.column(1).as_primitive::<Float64Type>();
        let left = b.column(2).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            out.push((s.value(i).to_string(), spent.value(i), left.value(i)));
        }
    }
    out
}

fn assert_spent(rows: &[(String, f64, f64)], spent: f64, budget: f64) {
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (s, got, left) in rows {
        assert!(
            (got - spent).abs() < 1e-9,
            "{s}: spent {got}, expected {spent}"
        );
        assert!(
            (left - (budget - spent)).abs() < 1e-9,
            "{s}: remaining {left}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issue_query_is_noisy_around_the_pooled_answer_and_spends_the_budget() {
    let (governance, federation, mut client) = lung(&dp_policy(10.0, 1.0, (30.0, 90.0))).await;
    let sql = "SELECT sex, dp_count(*) AS n, dp_avg(age) AS mean_age FROM lung \
               GROUP BY sex ORDER BY sex";
    let answer = client.query(sql).await.unwrap();
    // The answer says what it spent: ε = 0.5 (the policy default) at each station.
    let spent = answer
        .schema
        .metadata()
        .get("railyard.epsilon")
        .expect("the ε metadata");
    let spent: serde_json::Value = serde_json::from_str(spent).unwrap();
    for s in STATIONS {
        assert_eq!(spent[s], 0.5, "{spent}");
    }
    assert_eq!(ints(&answer, 0), vec![1, 2], "one row per declared key");
    let pooled = pooled().await;
    let n = reference_f64(
        &pooled,
        "SELECT count(*) FROM lung_all GROUP BY sex ORDER BY sex",
    )
    .await;
    let mean = reference_f64(
        &pooled,
        "SELECT avg(age) FROM lung_all GROUP BY sex ORDER BY sex",
    )
    .await;
    // Three fields (the count, the mean's sum and count) share ε = 0.5: each station's
    // count noise has scale 6, so the pooled count has standard deviation √(3·2·36) ≈ 14.7.
    // 10 standard deviations: a false failure has probability far below 1e-9.
    for (got, want) in ints(&answer, 1).iter().zip(&n) {
        assert!((*got as f64 - want).abs() < 147.0, "count {got} vs {want}");
    }
    // The mean is the ratio of two noisy sums (its accuracy at these ε is checked with a
    // negligible noise in the clamping test); here: present for both groups (a noisy count
    // ≤ 0 at ~100 patients is beyond 6 standard deviations).
    assert_eq!(mean.len(), 2);
    for got in floats(&answer, 2) {
        assert!(got.is_some_and(f64::is_finite), "{got:?}");
    }
    assert_spent(&budget(&mut client).await, 0.5, 10.0);
    // The same query twice spends twice.
    client.query(sql).await.unwrap();
    assert_spent(&budget(&mut client).await, 1.0, 10.0);
    // SET railyard.epsilon chooses the ε of the next queries.
    client.query("SET railyard.epsilon = 0.25").await.unwrap();
    client.query(sql).await.unwrap();
    assert_spent(&budget(&mut client).await, 1.25, 10.0);
    client
        .query("SET railyard.epsilon TO DEFAULT")
        .await
        .unwrap();
    client.query(sql).await.unwrap();
    assert_spent(&budget(&mut client).await, 1.75, 10.0);
    federation.shutdown().await.unwrap();
    // Every release is audited with its ε.
    for s in STATIONS {
        let text = std::fs::read_to_string(governance.audit_log(s)).unwrap();
        let spent: Vec<f64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["decision"] == "allowed")
            .filter_map(|r| r["epsilon"].as_f64())
            .collect();
        assert_eq!(spent.len(), 4, "{s}");
        assert!(
            (spent.iter().sum::<f64>() - 1.75).abs() < 1e-9,
            "{s}: {spent:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_has_the_planned_spread_across_many_releases() {
    // ε = 1 on one count: each station adds discrete Laplace noise of scale 1 (variance
    // ≈ 2), so the pooled count varies with variance ≈ 6 around the exact count. Over 200
    // releases the sample variance has standard deviation ≈ 0.6 (the Laplace sum's excess
    // kurtosis is 1); the band below is 5 of them wide on each side.
    let (_, federation, mut client) = lung(&dp_policy(1000.0, 1.0, (30.0, 90.0))).await;
    client.query("SET railyard.epsilon = 1").await.unwrap();
    let exact = reference_f64(
        &pooled().await,
        "SELECT count(*) FROM lung_all WHERE age > 60",
    )
    .await[0];
    let mut draws = Vec::new();
    for _ in 0..200 {
        let a = client
            .query("SELECT dp_count(*) FROM lung WHERE age > 60")
            .await
            .unwrap();
        draws.push(ints(&a, 0)[0] as f64 - exact);
    }
    let n = draws.len() as f64;
    let mean = draws.iter().sum::<f64>() / n;
    let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0);
    // The discrete Laplace of scale 1 has variance 2e/(e−1)² ≈ 1.84 per station.
    let expected = 3.0 * 2.0 * std::f64::consts::E / (std::f64::consts::E - 1.0).powi(2);
    assert!(
        (var - expected).abs() < 3.0,
        "variance {var}, expected {expected}"
    );
    assert!(mean.abs() < 6.0 * (expected / n).sqrt(), "mean {mean}");
    assert!(draws.iter().any(|d| *d != 0.0), "no noise at all");
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_are_clamped_to_the_policy_bounds_and_groups_are_the_declared_keys() {
    // A huge ε makes the noise negligible (scale 20/1e6 for the sum), so the answer shows
    // the clamped exact sum; ages outside [50, 70] are counted at the bounds.
    let (_, federation, mut client) = lung(&dp_policy(1e7, 1e6, (50.0, 70.0))).await;
    client
        .query("SET railyard.epsilon = 1000000")
        .await
        .unwrap();
    let pooled = pooled().await;
    let a = client
        .query(
            "SELECT ph_ecog, dp_sum(age), dp_count(age), dp_avg(age) FROM lung \
             GROUP BY ph_ecog ORDER BY ph_ecog",
        )
        .await
        .unwrap();
    assert_eq!(
        ints(&a, 0),
        vec![0, 1, 2, 3, 4],
        "exactly the declared keys"
    );
    let clamped = reference_f64(
        &pooled,
        "SELECT sum(CASE WHEN age < 50 THEN 50 WHEN age > 70 THEN 70 ELSE age END) \
         FROM (SELECT * FROM lung_all WHERE ph_ecog IS NOT NULL) \
         RIGHT JOIN (VALUES (0), (1), (2), (3), (4)) k(key) ON ph_ecog = key \
         GROUP BY key ORDER BY key",
    )
    .await;
    let raw = reference_f64(
        &pooled,
        "SELECT sum(age) FROM lung_all WHERE ph_ecog IS NOT NULL GROUP BY ph_ecog ORDER BY ph_ecog",
    )
    .await;
    let counts = reference_f64(
        &pooled,
        "SELECT count(age) FROM lung_all RIGHT JOIN (VALUES (0), (1), (2), (3), (4)) k(key) \
         ON ph_ecog = key GROUP BY key ORDER BY key",
    )
    .await;
    let sums = floats(&a, 1);
    for (i, (got, want)) in sums.iter().zip(&clamped).enumerate() {
        let got = got.unwrap();
        assert!(
            (got - want).abs() < 0.5,
            "ph_ecog {i}: {got} vs clamped {want}"
        );
    }
    assert_ne!(clamped[..4], raw[..], "the bounds clamp some ages");
    for (got, want) in ints(&a, 2).iter().zip(&counts) {
        assert!((*got as f64 - want).abs() <= 1.0, "{got} vs {want}");
    }
    // dp_avg = clamped sum / count, per key; NULL for the key without rows.
    let means = floats(&a, 3);
    for i in 0..4 {
        let want = clamped[i] / counts[i];
        let got = means[i].unwrap();
        assert!(
            (got - want).abs() < 0.01,
            "ph_ecog {i}: mean {got} vs {want}"
        );
    }
    assert_eq!(means[4], None, "no mean for a key without rows");
    // A filter that matches no row still releases every declared key (noised zeros): an
    // empty input may not look different from a non-empty one.
    let empty = client
        .query("SELECT sex, dp_count(*) FROM lung WHERE age > 200 GROUP BY sex ORDER BY sex")
        .await
        .unwrap();
    assert_eq!(ints(&empty, 0), vec![1, 2]);
    assert_eq!(
        ints(&empty, 1),
        vec![0, 0],
        "ε = 1e6: the noise rounds to nothing"
    );
    federation.shutdown().await.unwrap();
}

/// The `k`-th smallest (1-based) of `sorted`, `k` clamped to the list.
fn order_statistic(sorted: &[f64], k: f64) -> f64 {
    let i = (k.ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_medians_and_quantiles_come_from_merged_histograms_over_the_policys_bins() {
    // One-year bins over [30, 90] and an ε that makes the noise negligible: each quantile
    // is within one bin of the pooled order statistic, per group.
    let policy =
        dp_policy(1e7, 1e6, (30.0, 90.0)).replace("upper = 90 }", "upper = 90, bins = 60 }");
    assert!(policy.contains("bins = 60"), "{policy}");
    let (_, federation, mut client) = lung(&policy).await;
    client
        .query("SET railyard.epsilon = 1000000")
        .await
        .unwrap();
    let a = client
        .query(
            "SELECT sex, dp_median(age) AS median_age, dp_quantile(age, 0.25) AS q1, \
             dp_quantile(age, 0.9) AS p90, dp_quantile(age, 0) AS lowest \
             FROM lung GROUP BY sex ORDER BY sex",
        )
        .await
        .unwrap();
    assert_eq!(ints(&a, 0), vec![1, 2]);
    let pooled = pooled().await;
    for (row, sex) in [1, 2].iter().enumerate() {
        let ages = reference_f64(
            &pooled,
            &format!("SELECT age FROM lung_all WHERE sex = {sex} AND age IS NOT NULL ORDER BY age"),
        )
        .await;
        let n = ages.len() as f64;
        for (column, q) in [(1, 0.5), (2, 0.25), (3, 0.9), (4, 0.0)] {
            let got = floats(&a, column)[row].expect("a quantile");
            let want = order_statistic(&ages, q * n);
            assert!(
                (got - want).abs() <= 1.0 + 1e-9,
                "sex {sex}, q {q}: {got} vs the order statistic {want}"
            );
        }
    }
    // The exact median of all patients is within a bin of the DP one; with no rows the
    // median is NULL, not a value.
    let all = client
        .query("SELECT dp_median(age) FROM lung")
        .await
        .unwrap();
    let want = reference_f64(&pooled, "SELECT median(age) FROM lung_all").await[0];
    let got = floats(&all, 0)[0].unwrap();
    assert!((got - want).abs() <= 1.0 + 1e-9, "{got} vs {want}");
    let none = client
        .query("SELECT dp_median(age) FROM lung WHERE age > 200")
        .await
        .unwrap();
    assert_eq!(floats(&none, 0), vec![None]);
    // Each query charged its ε at every station, one histogram per call.
    let spent = budget(&mut client).await;
    assert!(
        spent.iter().all(|(_, s, _)| (*s - 3e6).abs() < 1e-3),
        "{spent:?}"
    );
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_medians_are_noisy_at_a_small_epsilon() {
    // ε = 0.1 over default bins: the histograms are noised at every station, so repeated
    // medians differ; they stay inside the bounds, and their spread is that of the noise.
    let (_, federation, mut client) = lung(&dp_policy(100.0, 1.0, (30.0, 90.0))).await;
    client.query("SET railyard.epsilon = 0.1").await.unwrap();
    let mut medians = Vec::new();
    for _ in 0..10 {
        let a = client
            .query("SELECT dp_median(age) FROM lung")
            .await
            .unwrap();
        if let Some(m) = floats(&a, 0)[0] {
            medians.push(m);
        }
    }
    assert!(medians.len() >= 9, "{medians:?}");
    assert!(
        medians.iter().all(|m| (30.0..=90.0).contains(m)),
        "{medians:?}"
    );
    let distinct: std::collections::BTreeSet<u64> = medians.iter().map(|m| m.to_bits()).collect();
    assert!(
        distinct.len() >= 5,
        "the noise changes the answer: {medians:?}"
    );
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_refuses_the_query_that_would_overrun_and_charges_nothing() {
    let (_, federation, mut client) = lung(&dp_policy(2.0, 1.0, (30.0, 90.0))).await;
    let sql = "SELECT sex, dp_count(*) FROM lung GROUP BY sex";
    // EXPLAIN FEDERATED shows the ε each station would charge, and spends nothing.
    let explained = client
        .query(&format!("EXPLAIN FEDERATED {sql}"))
        .await
        .unwrap();
    let text = explained.to_table().unwrap();
    for s in STATIONS {
        assert!(text.contains(s), "{text}");
    }
    assert_eq!(
        text.matches("ε = 0.5 charged at this station").count(),
        3,
        "{text}"
    );
    assert_spent(&budget(&mut client).await, 0.0, 2.0);
    for _ in 0..4 {
        client.query(sql).await.unwrap();
    }
    assert_spent(&budget(&mut client).await, 2.0, 2.0);
    let err = client.query(sql).await.expect_err("over budget");
    let text = format!("{err:#}");
    assert!(
        text.contains("(rule dp_budget)") && text.contains("PermissionDenied"),
        "{text}"
    );
    assert_spent(&budget(&mut client).await, 2.0, 2.0);
    // A smaller ε that still fits is not the point: nothing is left at all.
    client.query("SET railyard.epsilon = 0.1").await.unwrap();
    assert!(client.query(sql).await.is_err());
    assert_spent(&budget(&mut client).await, 2.0, 2.0);
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_queries_outside_the_rules_are_refused_naming_the_rule() {
    let (_, federation, mut client) = lung(&dp_policy(10.0, 1.0, (30.0, 90.0))).await;
    // The attacks of issue 18 under a DP policy: a failure as an oracle costs a tiny ε
    // and would read a `dp` column exactly, and the non-`dp` columns are still held to
    // the grammar of released computation.
    client
        .query("SET railyard.epsilon = 0.000001")
        .await
        .unwrap();
    for (sql, rule) in [
        (
            "SELECT dp_count(*) FROM lung WHERE CASE WHEN patient_id = 1 AND age >= 70 \
             THEN 1/0 ELSE 1 END = 1",
            "(rule fallible_expression)",
        ),
        (
            "SELECT dp_count(*) FROM lung WHERE length(substr('abcdefghij', 1, CASE WHEN \
             patient_id = 1 THEN age - 70 ELSE 1 END)) >= 0",
            "(rule fallible_expression)",
        ),
        (
            "SELECT regr_avgx(TRY_CAST((patient_id - 1) * 200 AS TINYINT), time) FROM lung",
            "(rule aggregate_argument)",
        ),
        ("SELECT dp_sum(time) FROM lung", "(rule dp_bounds)"),
        ("SELECT dp_median(time) FROM lung", "(rule dp_bounds)"),
        ("SELECT median(age) FROM lung", "(rule dp_column)"),
        ("SELECT max(age) FROM lung", "(rule dp_column)"),
        ("SELECT dp_quantile(age, age / 100) FROM lung", "quantile q"),
        (
            "SELECT inst, dp_count(*) FROM lung GROUP BY inst",
            "(rule dp_keys)",
        ),
        (
            "SELECT dp_count(meal_cal) FROM lung",
            "(rule hidden_column)",
        ),
        (
            "SELECT sex, avg(age) FROM lung GROUP BY sex",
            "(rule dp_column)",
        ),
        (
            "SELECT dp_count(*) FROM lung WHERE age > 1000 / (age - 60)",
            "(rule fallible_expression)",
        ),
    ] {
        let err = client.query(sql).await.expect_err(sql);
        let text = format!("{err:#}");
        // The hub may already fail folding `1/0`: a fixed message, whatever the data.
        let folded = sql.contains("1/0") && text.to_lowercase().contains("by zero");
        assert!(text.contains(rule) || folded, "{sql}: {text}");
    }
    let err = client
        .query("SELECT dp_count(*), count(*) FROM lung")
        .await
        .expect_err("mixed");
    assert!(format!("{err:#}").contains("cannot be mixed"), "{err:#}");
    // Two DP aggregates over one table in one query would be checked one by one and could
    // together overrun the budget: refused at the hub.
    let err = client
        .query(
            "SELECT * FROM (SELECT dp_count(*) AS a FROM lung) x \
             CROSS JOIN (SELECT dp_count(*) AS b FROM lung WHERE age > 60) y",
        )
        .await
        .expect_err("two DP fragments over lung");
    assert!(format!("{err:#}").contains("once"), "{err:#}");
    // Crafted tickets straight to a station: an exact state beside a DP one, a DISTINCT
    // state, and the DP function itself (its value is the exact count) are all refused.
    let url = &federation.stations[0].url;
    for (sql, what) in [
        (
            "SELECT partial_dp_count(age) AS a, partial_count(age) AS b FROM lung",
            "(rule dp_mixed)",
        ),
        (
            "SELECT partial_distinct_dp_count(age) AS a FROM lung",
            "DISTINCT",
        ),
        ("SELECT dp_count(age) AS a FROM lung", "partial_dp_count"),
        ("SELECT partial_dp_sum(age * 2) AS a FROM lung", "unchanged"),
        // A hub choosing the bins of a quantile (one narrow bin around one age) is refused.
        (
            "SELECT partial_dp_quantile(age, 0.5, 64.5, 65.5) AS a FROM lung",
            "two arguments",
        ),
        (
            "SELECT partial_dp_count(CAST(age AS DECIMAL(1,0))) AS a FROM lung",
            "(rule fallible_expression)",
        ),
    ] {
        let err = fixtures::run_at_station(url, sql).await.expect_err(sql);
        assert!(err.contains(what), "{sql}: {err}");
    }
    client.query("SET railyard.epsilon = 5").await.unwrap();
    let err = client
        .query("SELECT dp_count(*) FROM lung")
        .await
        .expect_err("ε cap");
    assert!(format!("{err:#}").contains("(rule dp_epsilon)"), "{err:#}");
    assert!(client.query("SET railyard.epsilon = -1").await.is_err());
    // Nothing was charged by any refusal.
    assert_spent(&budget(&mut client).await, 0.0, 10.0);
    federation.shutdown().await.unwrap();

    // A station without a [dp] section answers no DP aggregate.
    let (_, federation, mut client) = lung("min_group_size = 5\n").await;
    let err = client
        .query("SELECT dp_count(*) FROM lung")
        .await
        .expect_err("no dp");
    assert!(format!("{err:#}").contains("(rule dp)"), "{err:#}");
    assert_eq!(budget(&mut client).await, vec![]);
    federation.shutdown().await.unwrap();
}

/// `railyard local` over the lung stations (Parquet) under `policy`, state in `data`.
fn spawn_lung(policy: &std::path::Path, data: &std::path::Path) -> (std::process::Child, String) {
    let mut args = vec![
        "--policy".to_string(),
        fixtures::path(policy),
        "--data-dir".to_string(),
        fixtures::path(data),
    ];
    args.extend(fixtures::table_arg("lung", "lung/horizontal/parquet"));
    fixtures::spawn_local(args)
}

/// The spend each station's ledger records for `local` on lung, read through a fresh
/// `railyard local` over the same data directory (the restart).
fn recorded_spend(policy: &std::path::Path, data: &std::path::Path) -> Vec<f64> {
    let (mut child, url) = spawn_lung(policy, data);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = runtime.block_on(async {
        let mut client = HubClient::connect(&url).await.unwrap();
        budget(&mut client).await
    });
    child.kill().unwrap();
    child.wait().unwrap();
    rows.into_iter().map(|(_, spent, _)| spent).collect()
}

#[test]
fn the_ledger_never_records_less_than_was_released_across_a_sigkill() {
    let (_, policy) = dp_governance(&dp_policy(1000.0, 1.0, (30.0, 90.0)));
    let data = fixtures::audit_dir().join("data");
    let (mut child, url) = spawn_lung(&policy, &data);
    let pid = child.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Four clients send DP queries (ε = 0.5 each) as fast as they can; after a while the
    // whole federation is killed with SIGKILL, mid-run.
    let answered = runtime.block_on(async {
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let url = url.clone();
            let answered = std::sync::Arc::clone(&answered);
            tasks.push(tokio::spawn(async move {
                let mut client = HubClient::connect(&url).await.unwrap();
                loop {
                    match client
                        .query("SELECT sex, dp_count(*), dp_sum(age) FROM lung GROUP BY sex")
                        .await
                    {
                        Ok(_) => {
                            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        let started = Instant::now();
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 20
            && started.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        for t in tasks {
            let _ = t.await;
        }
        answered.load(std::sync::atomic::Ordering::SeqCst)
    });
    child.wait().unwrap();
    assert!(answered >= 20, "only {answered} answers before the kill");
    // Every answer released ε = 0.5 at every station; the restarted stations' ledgers hold
    // at least that much (more if a charge was committed for a release the kill stopped).
    let spent = recorded_spend(&policy, &data);
    assert_eq!(spent.len(), 3);
    for s in spent {
        assert!(
            s + 1e-9 >= 0.5 * answered as f64,
            "recorded {s} < released {}",
            0.5 * answered as f64
        );
        assert!(
            s <= 0.5 * (answered + 4) as f64 + 1e-9,
            "recorded {s}, answered {answered}"
        );
    }
}

#[test]
fn a_charge_left_without_its_audit_record_is_recorded_at_the_next_start() {
    let (_, policy) = dp_governance(&dp_policy(1000.0, 1.0, (30.0, 90.0)));
    let data = fixtures::audit_dir().join("data");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A first run: one DP query, charged and audited at every station.
    let (mut child, url) = spawn_lung(&policy, &data);
    runtime.block_on(async {
        let mut client = HubClient::connect(&url).await.unwrap();
        client.query("SELECT dp_count(*) FROM lung").await.unwrap();
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // What a crash between the charge and its audit record leaves at station_a.
    let sql = "SELECT partial_dp_count(1) AS \"a0\" FROM \"lung\"";
    let ledger =
        railyard_station::ledger::Ledger::open(&data.join("station_a").join("ledger.sqlite"))
            .unwrap();
    ledger
        .charge(
            railyard_station::ledger::Charge {
                researcher: "local",
                collaboration: "default",
                table: "lung",
                query_id: "killed-between-charge-and-record",
                fragment: 1,
                epsilon: 0.25,
                sql,
            },
            1000.0,
        )
        .unwrap();
    drop(ledger);
    let records = |station: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(data.join(station).join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let recovered = |station: &str| -> Vec<serde_json::Value> {
        records(station)
            .into_iter()
            .filter(|r| r["rule"] == "recovered")
            .collect()
    };
    // Two restarts: the first records the charge, the second adds nothing.
    for _ in 0..2 {
        let spent = recorded_spend(&policy, &data);
        assert_eq!(spent.len(), 3);
        let found = recovered("station_a");
        assert_eq!(found.len(), 1, "{found:?}");
        let r = &found[0];
        assert_eq!(r["decision"], "failed");
        assert_eq!(r["query_id"], "killed-between-charge-and-record");
        assert_eq!(r["researcher"], "local");
        assert_eq!(r["epsilon"], 0.25);
        assert_eq!(r["sql"], sql);
        assert!(recovered("station_b").is_empty());
        for station in ["station_a", "station_b", "station_c"] {
            let verified = railyard_audit::verify(&data.join(station).join("audit.jsonl")).unwrap();
            assert!(verified.broken.is_none(), "{station}: {verified:?}");
            // Every charge has its record: the ε in the audit log adds up to the ledger's.
            let audited: f64 = records(station)
                .iter()
                .filter_map(|r| r["epsilon"].as_f64())
                .sum();
            let charged = if station == "station_a" { 0.75 } else { 0.5 };
            assert!((audited - charged).abs() < 1e-9, "{station}: {audited}");
        }
    }
}
