//! Differencing attacks (issue 20): two releases that each pass every threshold but
//! subtract to one patient. Each pair is run in a fresh federation (a fresh query-set
//! memory) by one researcher, under the default policy on the lung stations; the first
//! query is answered, the second refused by the query-set auditor (rule `differencing`)
//! through the hub, and straight at the station holding the patient. No case asserts a
//! value of the data.

use railyard::client::HubClient;

use crate::fixtures;
use crate::policy::lung_under_default_policy;

const RULE: &str = "(rule differencing)";

/// (first query, second query): the second minus the first is one patient's value.
const PAIRS: &[(&str, &str)] = &[
    // One patient out of a total.
    (
        "SELECT sum(age), count(*) FROM lung",
        "SELECT sum(age), count(*) FROM lung WHERE patient_id <> 1",
    ),
    // A tracker: the patient added to a set the researcher can also ask for alone.
    (
        "SELECT sum(age), count(*) FROM lung WHERE sex = 2",
        "SELECT sum(age), count(*) FROM lung WHERE patient_id = 1 OR sex = 2",
    ),
    // The only 82-year-old, by value instead of by id.
    (
        "SELECT sum(meal_cal), count(*) FROM lung",
        "SELECT sum(meal_cal), count(*) FROM lung WHERE NOT (age = 82)",
    ),
    // Complementary filters, grouped: the groups differ by the patient with ph_ecog = 3.
    (
        "SELECT sex, count(*), avg(age) FROM lung WHERE ph_ecog IS NOT NULL GROUP BY sex",
        "SELECT sex, count(*), avg(age) FROM lung WHERE ph_ecog <= 2 GROUP BY sex",
    ),
    // Models over the same rows but one.
    (
        "SELECT term, estimate FROM glm('lung', 'age ~ sex', 'gaussian')",
        "SELECT term, estimate FROM glm('lung', 'age ~ sex', 'gaussian', 'patient_id <> 1')",
    ),
    // A bare count (public columns only, k = 1) is remembered too: a later count that
    // leaves out the patient if aged 74 would tell the age.
    (
        "SELECT count(*) FROM lung",
        "SELECT count(*) FROM lung WHERE patient_id <> 1 OR age <> 74",
    ),
    // Groups of one GROUP BY are compared too: a UNION ALL of the table and the table
    // without patient 1, grouped by part, is two groups one patient apart.
    (
        "SELECT count(*) FROM lung WHERE sex = 1",
        "SELECT g, count(*), sum(age) FROM (SELECT 'a' AS g, age, patient_id FROM lung \
         UNION ALL SELECT 'b' AS g, age, patient_id FROM lung WHERE patient_id <> 1) t GROUP BY g",
    ),
    (
        "SELECT time, at_risk FROM kaplan_meier('lung', 'time', 'status')",
        "SELECT time, at_risk FROM kaplan_meier('lung', 'time', 'status', '', 'patient_id <> 1')",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_that_subtract_to_one_patient_are_refused_through_the_hub() {
    for (first, second) in PAIRS {
        let (federation, _governance) = lung_under_default_policy().await;
        let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
        client
            .query(first)
            .await
            .unwrap_or_else(|e| panic!("{first}: {e:#}"));
        let err = client
            .query(second)
            .await
            .expect_err("the second query differences one patient out")
            .to_string();
        assert!(err.contains(RULE), "{second}: {err}");
        assert!(err.contains("released to you"), "{err}");
        // Patient 1 is 74 years old; no refusal quotes it (the earlier query's id, a
        // random UUID, is left out of the comparison).
        let id_at = err.find("what query ").unwrap() + "what query ".len();
        let without_id = format!("{}{}", &err[..id_at], &err[id_at + 36..]);
        assert!(!without_id.contains("74"), "{err}");
        // Running the first query again is allowed (the same patients), and so is an
        // unrelated query far from both.
        client.query(first).await.unwrap();
        federation.shutdown().await.unwrap();
    }
}

/// Suppression as a side channel: a total minus the released groups is the patients of the
/// groups withheld below k (ph_ecog = 3 has one patient). After the total, the grouped
/// release withholds further groups (secondary suppression) until what it leaves out is
/// none or at least k patients at each station.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_total_minus_the_released_groups_is_never_a_few_patients() {
    let (federation, _governance) = lung_under_default_policy().await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let total = client.query("SELECT count(*) FROM lung").await.unwrap();
    let groups = client
        .query("SELECT ph_ecog, count(*) FROM lung GROUP BY ph_ecog")
        .await
        .unwrap();
    let left_out = column_sum(&total.batches, 0) - column_sum(&groups.batches, 1);
    assert!(
        left_out == 0 || left_out >= 5,
        "{left_out} patients left out"
    );
    assert!(
        left_out > 0,
        "ph_ecog = 3 holds one patient: something is withheld"
    );

    // Straight at the station holding patient 1, by the unit counts it releases.
    let station = holder_of_patient_1(&federation).await;
    // A station's grouped answer ends with each group's count of patients.
    let units = |batches: &[arrow::array::RecordBatch]| -> i64 {
        batches
            .first()
            .map_or(0, |b| column_sum(batches, b.num_columns() - 1))
    };
    let total = fixtures::run_at_station(&station, "SELECT partial_sum(age) AS a0 FROM lung")
        .await
        .unwrap();
    for grouping in ["ph_ecog", "pat_karno", "inst"] {
        let groups = fixtures::run_at_station(
            &station,
            &format!(
                "SELECT {grouping} AS g0, partial_sum(age) AS a0 FROM lung GROUP BY {grouping}"
            ),
        )
        .await
        .unwrap();
        let left_out = units(&total) - units(&groups);
        assert!(
            left_out == 0 || left_out >= 5,
            "{grouping}: {left_out} patients left out"
        );
    }
    federation.shutdown().await.unwrap();
}

/// The sum of an Int64 column over all batches.
fn column_sum(batches: &[arrow::array::RecordBatch], column: usize) -> i64 {
    batches
        .iter()
        .map(|b| {
            let c = b
                .column(column)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .expect("an Int64 count");
            arrow::compute::sum(c).unwrap_or(0)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scalar_subqueries_in_one_statement_are_refused() {
    let (federation, _governance) = lung_under_default_policy().await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    let err = client
        .query(
            "SELECT (SELECT sum(age) FROM lung) - (SELECT sum(age) FROM lung WHERE patient_id <> 1)",
        )
        .await
        .expect_err("one statement, two releases one patient apart")
        .to_string();
    assert!(err.contains(RULE), "{err}");
    federation.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_researcher_has_a_memory_of_their_own() {
    // Under `railyard local` every query is the local researcher's; the stations tell
    // researchers apart by the ticket's name (a deployment's hub puts the token's there).
    let (federation, _governance) = lung_under_default_policy().await;
    let station = holder_of_patient_1(&federation).await;
    let total = "SELECT partial_sum(age) AS a0 FROM lung";
    let but_one = "SELECT partial_sum(age) AS a0 FROM lung WHERE patient_id <> 1";
    fixtures::run_at_station_as(&station, total, "ann")
        .await
        .unwrap();
    // Bob never saw the total: his release is his first.
    fixtures::run_at_station_as(&station, but_one, "bob")
        .await
        .unwrap();
    let err = fixtures::run_at_station_as(&station, but_one, "ann")
        .await
        .expect_err("ann's total minus this is patient 1");
    assert!(err.contains(RULE), "{err}");
    federation.shutdown().await.unwrap();
}

/// The URL of the lung station that holds patient 1 (station_b's rows).
async fn holder_of_patient_1(federation: &railyard::local::LocalFederation) -> String {
    let b =
        std::fs::read_to_string(fixtures::test_data("lung/horizontal/csv/station_b.csv")).unwrap();
    assert!(
        b.lines().any(|l| l.starts_with("1,")),
        "patient 1 is station_b's"
    );
    federation
        .stations
        .iter()
        .find(|s| s.name == "station_b")
        .map(|s| s.url.clone())
        .expect("a station per file: station_b")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_hub_sending_the_pair_straight_to_the_station_is_refused() {
    let (federation, _governance) = lung_under_default_policy().await;
    let station = holder_of_patient_1(&federation).await;
    let pairs = [
        (
            "SELECT partial_sum(age) AS a0, partial_count(1) AS a1 FROM lung",
            "SELECT partial_sum(age) AS a0, partial_count(1) AS a1 FROM lung WHERE patient_id <> 1",
        ),
        (
            "SELECT partial_sum(age) AS a0 FROM lung WHERE sex = 2",
            "SELECT partial_sum(age) AS a0 FROM lung WHERE patient_id = 1 OR sex = 2",
        ),
    ];
    for (first, second) in pairs {
        fixtures::run_at_station(&station, first).await.unwrap();
        let err = fixtures::run_at_station(&station, second)
            .await
            .expect_err("differenced");
        assert!(err.contains(RULE), "{second}: {err}");
    }
    // The refusals are in the station's audit log under their rule.
    federation.shutdown().await.unwrap();
}

/// The auditor is not an oracle: a set built as an earlier one plus k − 1 known patients
/// plus "patient 1 if aged 70 or more" is k patients away when patient 1 is in it (74) and
/// k − 1 away when not. With an exact threshold the refusal would say which; with the
/// threshold's margin drawn per difference, a difference of k patients is refused for some
/// choices of the known patients too, so a refusal does not say the patient is absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditors_refusal_is_no_oracle_for_a_patients_value() {
    // The default policy with the largest margin: a difference of exactly k passes with
    // probability 1/21 per choice, so the test cannot miss a refusal by chance.
    let federation = lung_with("threshold_noise = 20", Default::default()).await;
    let station = holder_of_patient_1(&federation).await;
    // Patients of station_b (ids 1, 4, 7, …): the base set is everyone above 100.
    let ids: Vec<u32> =
        std::fs::read_to_string(fixtures::test_data("lung/horizontal/csv/station_b.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .filter_map(|l| l.split(',').next()?.parse().ok())
            .collect();
    let base = "patient_id > 100";
    fixtures::run_at_station(
        &station,
        &format!("SELECT partial_count(1) AS a0 FROM lung WHERE {base}"),
    )
    .await
    .unwrap();
    let known: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|i| (2..=100).contains(i))
        .collect();
    let attack = |j: usize, threshold: u32| {
        let four: Vec<String> = known[j * 4..j * 4 + 4].iter().map(u32::to_string).collect();
        format!(
            "SELECT partial_count(1) AS a0 FROM lung WHERE {base} OR patient_id IN ({}) OR \
             (patient_id = 1 AND age >= {threshold})",
            four.join(", ")
        )
    };
    // Patient 1 absent (the condition is false): k − 1 = 4 patients away, always refused.
    for j in 0..2 {
        let err = fixtures::run_at_station(&station, &attack(j, 80))
            .await
            .expect_err("four patients away");
        assert!(err.contains(RULE), "{err}");
    }
    // Patient 1 present: five away; refused for some choices of the four.
    let mut refused = 0;
    for j in 2..8 {
        if let Err(err) = fixtures::run_at_station(&station, &attack(j, 70)).await {
            assert!(err.contains(RULE), "{err}");
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "a difference of exactly k was never refused: the auditor's answer would tell the patient's age"
    );
    federation.shutdown().await.unwrap();
}

/// `railyard local --named-researchers`: each client names its researcher, and each name has
/// a memory of its own, through the hub (how test corpora run each test as a fresh
/// researcher). Without the option every client is the researcher `local`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_hub_with_named_researchers_keeps_a_memory_per_name() {
    let options = railyard_engine::HubOptions {
        named_researchers: true,
        ..Default::default()
    };
    let federation = lung_with("", options).await;
    let total = "SELECT sum(age) FROM lung";
    let but_one = "SELECT sum(age) FROM lung WHERE patient_id <> 1";
    let mut ann = HubClient::connect(&federation.hub_url).await.unwrap();
    ann.as_researcher("ann");
    let mut bob = HubClient::connect(&federation.hub_url).await.unwrap();
    bob.as_researcher("bob");
    ann.query(total).await.unwrap();
    bob.query(but_one).await.unwrap();
    let err = ann
        .query(but_one)
        .await
        .expect_err("ann's difference")
        .to_string();
    assert!(err.contains(RULE), "{err}");
    // A name outside the allowed characters is refused, not used.
    let mut odd = HubClient::connect(&federation.hub_url).await.unwrap();
    odd.as_researcher("a b");
    let err = odd.query(total).await.expect_err("bad name").to_string();
    assert!(err.contains("x-railyard-researcher"), "{err}");
    federation.shutdown().await.unwrap();
}

/// Rate limits: the hub's per researcher (`max_queries_per_minute`) and a station's
/// (`max_fragments_per_minute`), each refusing with rule `rate_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn researchers_beyond_their_rate_are_refused_at_the_hub_and_at_the_station() {
    let options = railyard_engine::HubOptions {
        max_queries_per_minute: 3,
        ..Default::default()
    };
    let federation = lung_with("max_fragments_per_minute = 4", options).await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    for _ in 0..3 {
        client.query("SELECT count(*) FROM lung").await.unwrap();
    }
    let err = client
        .query("SELECT count(*) FROM lung")
        .await
        .expect_err("the fourth query in a minute")
        .to_string();
    assert!(err.contains("(rule rate_limit)"), "{err}");
    assert!(err.contains("max_queries_per_minute"), "{err}");
    // The station counts the fragments it ran for this researcher (three through the hub).
    let station = &federation.stations[0].url;
    fixtures::run_at_station_as(station, "SELECT partial_count(1) AS a0 FROM lung", "local")
        .await
        .unwrap();
    let err =
        fixtures::run_at_station_as(station, "SELECT partial_count(1) AS a0 FROM lung", "local")
            .await
            .expect_err("the fifth fragment in a minute");
    assert!(err.contains("(rule rate_limit)"), "{err}");
    // Another researcher has a rate of their own.
    fixtures::run_at_station_as(station, "SELECT partial_count(1) AS a0 FROM lung", "bob")
        .await
        .unwrap();
    federation.shutdown().await.unwrap();
}

/// The lung stations (Parquet) under the default policy plus `policy` (TOML lines), with a
/// hub started with `options`, state in a fresh directory.
async fn lung_with(
    policy: &str,
    options: railyard_engine::HubOptions,
) -> railyard::local::LocalFederation {
    let dir = fixtures::audit_dir();
    let file = dir.join("policy.toml");
    std::fs::write(&file, format!("{policy}\n")).unwrap();
    let governance = railyard::local::Governance::new(Some(&file), dir.join("data")).unwrap();
    fixtures::federation_with(
        &[fixtures::spec(
            "lung",
            fixtures::test_data("lung/horizontal/parquet"),
        )],
        options,
        &governance,
    )
    .await
}
