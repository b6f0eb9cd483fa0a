use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;

use super::*;

async fn plan(sql: &str) -> LogicalPlan {
    let ctx = railyard_udfs::fragment_context().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("age", DataType::Int32, true),
        Field::new("inst", DataType::Int64, true),
        Field::new("note", DataType::Utf8, true),
        Field::new("weight", DataType::Float64, true),
        Field::new("height", DataType::Float64, true),
        Field::new("born", DataType::Int64, true),
        Field::new("diagnosed", DataType::Date32, true),
    ]));
    ctx.register_table(
        "lung",
        Arc::new(MemTable::try_new(schema, vec![vec![]]).unwrap()),
    )
    .unwrap();
    ctx.state().create_logical_plan(sql).await.unwrap()
}

fn policy() -> Policy {
    Policy::parse(
        "[tables.lung.columns]\ninst = \"public\"\nnote = \"hidden\"\n",
        "test",
    )
    .unwrap()
}

async fn rule(sql: &str) -> Result<Release, &'static str> {
    check(&plan(sql).await, &policy(), "s")
        .map(|c| c.release)
        .map_err(|r| {
            assert!(r.message.starts_with("policy: "), "{}", r.message);
            r.rule.as_str()
        })
}

/// What the check of `sql` under `policy` releases, or the rule it refuses by.
async fn checked_under(policy: &Policy, sql: &str) -> Result<Release, &'static str> {
    check(&plan(sql).await, policy, "s")
        .map(|c| c.release)
        .map_err(|r| r.rule.as_str())
}

#[tokio::test]
async fn dp_fragments_need_plain_columns_bounds_keys_and_no_fallible_casts() {
    let policy = Policy::parse(
        "[dp]\n[tables.lung.columns]\nage = \"dp\"\nnote = \"hidden\"\n\
         [tables.lung.dp]\nage = { lower = 30, upper = 90 }\ninst = { keys = [1, 2] }\n",
        "test",
    )
    .unwrap();
    let dp = |sql: &'static str| checked_under(&policy, sql);
    for sql in [
        "SELECT inst AS g0, partial_dp_count(1) AS a0, partial_dp_avg(CAST(age AS DOUBLE)) AS a1 \
         FROM lung WHERE age > 60 GROUP BY inst",
        "SELECT a0 FROM (SELECT partial_dp_sum(age) AS a0 FROM lung)",
    ] {
        assert!(matches!(dp(sql).await, Ok(Release::Dp(_))), "{sql}");
    }
    for (sql, expected) in [
        // A cast that can fail on a value (a one-digit decimal of an age) is a side
        // channel, in an argument as anywhere else.
        (
            "SELECT partial_dp_count(CAST(age AS DECIMAL(1,0))) AS a FROM lung",
            "fallible_expression",
        ),
        (
            "SELECT partial_dp_sum(patient_id) AS a FROM lung",
            "dp_bounds",
        ),
        (
            "SELECT partial_dp_sum(age + 1) AS a FROM lung",
            "fragment_shape",
        ),
        (
            "SELECT patient_id, partial_dp_count(1) AS a FROM lung GROUP BY patient_id",
            "dp_keys",
        ),
        (
            "SELECT partial_dp_count(note) AS a FROM lung",
            "hidden_column",
        ),
        (
            "SELECT partial_dp_count(1) AS a, partial_count(age) AS b FROM lung",
            "dp_mixed",
        ),
        (
            "SELECT partial_distinct_dp_count(age) AS a FROM lung",
            "fragment_shape",
        ),
        ("SELECT dp_count(age) AS a FROM lung", "fragment_shape"),
        (
            "SELECT inst, partial_dp_count(1) AS a FROM lung GROUP BY inst HAVING inst > 1",
            "fragment_shape",
        ),
        (
            "SELECT partial_dp_count(1) AS a FROM lung ORDER BY 1",
            "ordering",
        ),
        ("SELECT count(age) FROM lung", "dp_column"),
    ] {
        assert_eq!(dp(sql).await.err(), Some(expected), "{sql}");
    }
    // No [dp] section: refused as such.
    assert_eq!(
        rule("SELECT partial_dp_count(1) AS a FROM lung")
            .await
            .err(),
        Some("dp")
    );
    // As a train's input a DP call is an aggregate like any other: refused, no panic,
    // and `dp` columns stay unreadable.
    let input = check_train_input(
        &plan("SELECT partial_dp_count(age) AS a FROM lung").await,
        &policy,
        "s",
    );
    assert_eq!(input.err().map(|r| r.rule.as_str()), Some("dp_column"));
    let input = check_train_input(
        &plan("SELECT partial_dp_count(1) AS a FROM lung").await,
        &policy,
        "s",
    );
    assert_eq!(input.err().map(|r| r.rule.as_str()), Some("fragment_shape"));
}

#[tokio::test]
async fn dp_quantiles_count_over_the_policys_bins_and_nothing_the_hub_chooses() {
    let policy = Policy::parse(
        "[dp]\n[tables.lung.columns]\nage = \"dp\"\nborn = \"hidden\"\n\
         [tables.lung.dp]\nage = { lower = 30, upper = 90, bins = 12 }\n\
         weight = { bins = [0, 100, 1000, 3000] }\nheight = { lower = -20, upper = 50 }\n\
         inst = { keys = [1, 2] }\n",
        "test",
    )
    .unwrap();
    let dp = |sql: &'static str| checked_under(&policy, sql);
    let edges = |sql: &'static str| async move {
        match dp(sql).await {
            Ok(Release::Dp(d)) => d.aggregates.iter().map(|a| a.edges.clone()).collect(),
            other => panic!("{sql}: {other:?}"),
        }
    };
    let got: Vec<Vec<f64>> = edges(
        "SELECT inst AS g0, partial_dp_median(age) AS a0, partial_dp_quantile(weight, 0.9) AS a1, \
         partial_dp_quantile(height, 0) AS a2 FROM lung GROUP BY inst",
    )
    .await;
    assert_eq!(
        got[0],
        (0..=12).map(|i| 30.0 + 5.0 * i as f64).collect::<Vec<_>>()
    );
    assert_eq!(got[1], vec![0.0, 100.0, 1000.0, 3000.0]);
    // Bounds without bins: the default number of equal bins over them.
    assert_eq!(got[2].len(), crate::file::DEFAULT_DP_BINS + 1);
    assert_eq!(
        (got[2][0], got[2][crate::file::DEFAULT_DP_BINS]),
        (-20.0, 50.0)
    );
    for (sql, expected) in [
        // A hub that appends its own edges (narrow bins around one value) is refused: the
        // station appends the policy's.
        (
            "SELECT partial_dp_median(age, 64.5, 65.5) AS a FROM lung",
            "fragment_shape",
        ),
        (
            "SELECT partial_dp_quantile(age, 0.5, 64.5, 65.5) AS a FROM lung",
            "fragment_shape",
        ),
        // q is a constant between 0 and 1.
        (
            "SELECT partial_dp_quantile(age, 1.5) AS a FROM lung",
            "fragment_shape",
        ),
        (
            "SELECT partial_dp_quantile(age, weight) AS a FROM lung",
            "fragment_shape",
        ),
        (
            "SELECT partial_dp_median(age + 1) AS a FROM lung",
            "fragment_shape",
        ),
        // No bins or bounds: nothing to count over.
        (
            "SELECT partial_dp_median(patient_id) AS a FROM lung",
            "dp_bounds",
        ),
        (
            "SELECT partial_dp_median(born) AS a FROM lung",
            "hidden_column",
        ),
        (
            "SELECT partial_dp_median(age) AS a, partial_median(weight) AS b FROM lung",
            "dp_mixed",
        ),
    ] {
        assert_eq!(dp(sql).await.err(), Some(expected), "{sql}");
    }
    // Groups × bins are bounded: 150 keys of 1,000 bins each would be 150,000 noised
    // counts per station.
    let keys: Vec<String> = (0..150).map(|k| k.to_string()).collect();
    let wide = Policy::parse(
        &format!(
            "[dp]\n[tables.lung.dp]\nage = {{ lower = 0, upper = 1000, bins = 1000 }}\n\
             inst = {{ keys = [{}] }}\n",
            keys.join(", ")
        ),
        "test",
    )
    .unwrap();
    let sql = "SELECT inst AS g0, partial_dp_median(age) AS a0 FROM lung GROUP BY inst";
    let Err(refusal) = check(&plan(sql).await, &wide, "s") else {
        panic!("too many bins")
    };
    assert_eq!(refusal.rule.as_str(), "fragment_shape");
    assert!(
        refusal.message.contains("histogram bins"),
        "{}",
        refusal.message
    );
    // Exact medians, quantiles, minima and maxima of a dp column stay refused.
    for sql in [
        "SELECT partial_median(age) AS a FROM lung",
        "SELECT partial_approx_percentile_cont(age, 0.5) AS a FROM lung",
        "SELECT partial_min(age) AS a FROM lung",
        "SELECT partial_max(age) AS a FROM lung",
    ] {
        assert!(dp(sql).await.is_err(), "{sql}");
    }
}

#[tokio::test]
async fn a_train_reads_aggregate_columns_row_by_row_but_never_hidden_ones() {
    let train = |sql: &'static str| async move {
        check_train_input(&plan(sql).await, &policy(), "s")
            .map(|c| c.release)
            .map_err(|r| r.rule.as_str())
    };
    // Row-level over an aggregate column: refused as a release, accepted as a train's
    // input (it stays at the station), with the table's k.
    assert_eq!(rule("SELECT age FROM lung").await, Err("row_level"));
    for sql in [
        "SELECT age, inst FROM lung",
        "SELECT age AS years FROM lung WHERE inst > 2 AND age < 80",
        "SELECT age, inst * 2 AS i FROM lung",
    ] {
        assert_eq!(train(sql).await, Ok(Release::TrainInput { k: 5 }), "{sql}");
    }
    for (sql, expected) in [
        ("SELECT age FROM lung ORDER BY age LIMIT 10", "ordering"),
        ("SELECT age FROM lung LIMIT 10", "ordering"),
        ("SELECT age + 1 AS a FROM lung", "train_input"),
        (
            "SELECT CASE WHEN inst = 3 AND age = 61 THEN 1000 ELSE age END AS age FROM lung",
            "train_input",
        ),
        ("SELECT * FROM lung", "hidden_column"),
        ("SELECT age FROM lung WHERE note = 'x'", "hidden_column"),
        ("SELECT count(*) FROM lung", "fragment_shape"),
        // A self-join on a column other than the patient mixes patients.
        (
            "SELECT a.age FROM lung a JOIN lung b ON a.inst = b.inst",
            "privacy_unit",
        ),
        (
            "SELECT CAST(age AS TINYINT) FROM lung",
            "fallible_expression",
        ),
    ] {
        assert_eq!(train(sql).await, Err(expected), "{sql}");
    }
}

#[tokio::test]
async fn each_rule_refuses_its_shape() {
    let cases = [
        ("SELECT age FROM lung", "row_level"),
        ("SELECT inst FROM lung WHERE age > 3", "row_level"),
        ("SELECT note FROM lung", "hidden_column"),
        (
            "SELECT count(*) FROM lung WHERE note = 'x'",
            "hidden_column",
        ),
        ("SELECT min(age) FROM lung", "unsafe_aggregate"),
        ("SELECT partial_max(age) FROM lung", "unsafe_aggregate"),
        (
            "SELECT sum(age * age * age) FROM lung",
            "aggregate_argument",
        ),
        ("SELECT bool_or(age > 3) FROM lung", "aggregate_argument"),
        ("SELECT count(DISTINCT age) FROM lung", "distinct_aggregate"),
        (
            "SELECT count(*) FILTER (WHERE age > 3) FROM lung",
            "aggregate_filter",
        ),
        (
            "SELECT sum(age / (age - 3)) FROM lung",
            "fallible_expression",
        ),
        (
            "SELECT count(*) FROM lung WHERE CAST(age AS TINYINT) = 1",
            "fallible_expression",
        ),
        (
            "SELECT inst, count(*) FROM lung GROUP BY inst HAVING count(*) > 1",
            "fragment_shape",
        ),
        (
            "SELECT count(*) FROM lung a JOIN lung b ON a.inst = b.inst",
            "privacy_unit",
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(rule(sql).await, Err(expected), "{sql}");
    }
}

#[tokio::test]
async fn safe_fragments_pass_with_the_right_threshold() {
    assert_eq!(
        rule("SELECT inst FROM lung WHERE inst > 2").await,
        Ok(Release::Rows)
    );
    assert_eq!(
        rule("SELECT inst, count(*) FROM lung GROUP BY inst").await,
        Ok(Release::Groups {
            k: 1,
            global: false
        })
    );
    assert_eq!(
        rule("SELECT inst, partial_avg(age * 2 + 1) AS a0 FROM lung WHERE age > 60 GROUP BY inst")
            .await,
        Ok(Release::Groups {
            k: 5,
            global: false
        })
    );
    assert_eq!(
        rule("SELECT count(*) FROM lung WHERE CAST(age AS BIGINT) / 10 = 6").await,
        Ok(Release::Groups { k: 5, global: true })
    );
    // The row count is appended as the last column.
    let checked = check(
        &plan("SELECT inst AS g0, partial_sum(age) AS a0 FROM lung GROUP BY inst").await,
        &policy(),
        "s",
    )
    .unwrap();
    let names = |schema: &Schema| -> Vec<String> {
        schema.fields().iter().map(|f| f.name().clone()).collect()
    };
    let schema = Arc::new(checked.plan.schema().as_arrow().clone());
    assert_eq!(
        names(&schema),
        [
            "g0",
            "a0",
            "__contributors_0",
            "__digest_0",
            // The query-set auditor's set of the value's contributors.
            "__units_0",
            // lung's patient_id is its unit: every sum is held to the dominance rule, per
            // patient.
            "__dominance_max_0_0",
            "__dominance_sum_0_0",
            "__digest_rows",
            "__units_rows",
            ROWS_COLUMN
        ]
    );
    assert_eq!(
        names(&crate::release::released_schema(&schema)),
        ["g0", "a0", ROWS_COLUMN]
    );
}

/// The approved plan counts, per group, the rows each value is computed from: both
/// arguments non-NULL for a two-argument aggregate, the FILTER for a filtered one.
#[tokio::test]
async fn contributors_are_counted_per_value() {
    use arrow::array::{Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
    let ctx = railyard_udfs::fragment_context().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("age", DataType::Int32, true),
        Field::new("inst", DataType::Int64, true),
        Field::new("note", DataType::Utf8, true),
        Field::new("weight", DataType::Float64, true),
    ]));
    let n = 12;
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from_iter_values(1..=n)),
            Arc::new(Int32Array::from_iter(
                (1..=n).map(|i| (i % 4 != 0).then_some(60 + i as i32)),
            )),
            Arc::new(Int64Array::from_iter((1..=n).map(|i| Some(i % 2)))),
            Arc::new(StringArray::from_iter((1..=n).map(|_| Some("x")))),
            Arc::new(Float64Array::from_iter(
                (1..=n).map(|i| (i == 1).then_some(70.0)),
            )),
        ],
    )
    .unwrap();
    ctx.register_table(
        "lung",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let sql = "SELECT inst AS g0, partial_regr_avgx(weight, age) AS a0, \
               partial_count(age) AS a1 FROM (SELECT patient_id, age, inst, weight FROM lung WHERE patient_id > 0) t \
               GROUP BY inst ORDER BY inst";
    let sql = sql.replace(" ORDER BY inst", "");
    let logical = ctx.state().create_logical_plan(&sql).await.unwrap();
    let checked = check(&logical, &policy(), "s").unwrap();
    let out = ctx
        .execute_logical_plan(checked.plan)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let batch = arrow::compute::concat_batches(&out[0].schema(), &out).unwrap();
    let col = |name: &str| -> Vec<i64> {
        let c = batch.column_by_name(name).unwrap();
        let c = c.as_any().downcast_ref::<Int64Array>().unwrap();
        let g = batch.column_by_name("g0").unwrap();
        let g = g.as_any().downcast_ref::<Int64Array>().unwrap();
        let mut v: Vec<(i64, i64)> = (0..c.len()).map(|i| (g.value(i), c.value(i))).collect();
        v.sort();
        v.into_iter().map(|(_, x)| x).collect()
    };
    // Groups inst = 0 and 1 have 6 rows each; weight is known for patient 1 only (inst 1),
    // age for 9 of 12 (not ids 4, 8, 12, all inst 0).
    assert_eq!(col(ROWS_COLUMN), [6, 6]);
    assert_eq!(col("__contributors_0"), [0, 1]);
    assert_eq!(col("__contributors_1"), [3, 6]);
}

#[tokio::test]
async fn pseudonymized_rows_need_the_join_key_and_an_opt_in() {
    let vertical = |extra: &str| {
        Policy::parse(
            &format!(
                "[tables.lung]\n{extra}\n[tables.lung.columns]\npatient_id = \"join_key\"\n\
                 inst = \"public\"\nnote = \"hidden\"\n"
            ),
            "test",
        )
        .unwrap()
    };
    let run = |sql: &'static str, policy: Policy| async move {
        check(&plan(sql).await, &policy, "s")
            .map(|c| c.release)
            .map_err(|r| {
                assert!(!r.message.contains("7"), "{}", r.message);
                r.rule.as_str()
            })
    };
    let on = || vertical("allow_vertical = true");
    let ok = "SELECT pseudonym(patient_id) AS p, age, inst FROM lung WHERE age > 60";
    assert_eq!(run(ok, on()).await, Ok(Release::Pseudonymized { k: 5 }));
    assert_eq!(run(ok, vertical("")).await, Err("allow_vertical"));
    assert_eq!(
        run(ok, vertical("allow_vertical = false")).await,
        Err("allow_vertical")
    );
    let refused = [
        ("SELECT patient_id, age FROM lung", "join_key_column"),
        (
            "SELECT pseudonym(patient_id) AS p, note FROM lung",
            "hidden_column",
        ),
        ("SELECT pseudonym(age) AS p FROM lung", "join_key"),
        (
            "SELECT pseudonym(patient_id) AS p, CASE WHEN age >= 80 THEN 1 END AS x FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT pseudonym(patient_id + 1) AS p FROM lung",
            "join_key",
        ),
        (
            "SELECT pseudonym(patient_id) AS p FROM lung WHERE patient_id = 7",
            "join_key_column",
        ),
        (
            "SELECT pseudonym(patient_id) AS p, count(*) FROM lung GROUP BY pseudonym(patient_id)",
            "join_key_column",
        ),
        (
            "SELECT pseudonym(patient_id) AS p, age FROM lung ORDER BY age LIMIT 3",
            "ordering",
        ),
    ];
    for (sql, rule) in refused {
        assert_eq!(run(sql, on()).await, Err(rule), "{sql}");
    }
    // A pseudonym computed and then projected away leaves plain row-level values.
    assert_eq!(
        run(
            "SELECT age FROM (SELECT pseudonym(patient_id) AS p, age FROM lung)",
            on()
        )
        .await,
        Err("fragment_shape")
    );
    assert_eq!(
        run(
            "SELECT q, age FROM (SELECT pseudonym(patient_id) AS p, age FROM lung) AS s(q, age)",
            on()
        )
        .await,
        Ok(Release::Pseudonymized { k: 5 })
    );
    // Without a join_key column in the policy there is nothing to pseudonymize.
    assert_eq!(
        run("SELECT pseudonym(patient_id) AS p FROM lung", policy()).await,
        Err("join_key")
    );
}

#[tokio::test]
async fn a_joined_table_releases_only_aggregates_with_k_even_without_columns() {
    let mut joined = policy();
    joined.tables.get_mut("lung").unwrap().joined = true;
    let run = |sql: &'static str, policy: Policy| async move {
        check(&plan(sql).await, &policy, "s")
            .map(|c| c.release)
            .map_err(|r| r.rule.as_str())
    };
    assert_eq!(
        run("SELECT count(*) FROM lung", policy()).await,
        Ok(Release::Groups { k: 1, global: true })
    );
    assert_eq!(
        run("SELECT count(*) FROM lung", joined.clone()).await,
        Ok(Release::Groups { k: 5, global: true })
    );
    assert_eq!(
        run(
            "SELECT inst, count(*) FROM lung GROUP BY inst",
            joined.clone()
        )
        .await,
        Ok(Release::Groups {
            k: 5,
            global: false
        })
    );
    assert_eq!(run("SELECT 1 FROM lung", policy()).await, Ok(Release::Rows));
    assert_eq!(
        run("SELECT 1 FROM lung", joined.clone()).await,
        Err("row_level")
    );
    assert_eq!(run("SELECT inst FROM lung", joined).await, Err("row_level"));
}

#[test]
fn casts_that_cannot_fail() {
    assert!(lossless_cast(&DataType::Int32, &DataType::Int64));
    assert!(lossless_cast(&DataType::Int64, &DataType::Float64));
    assert!(lossless_cast(&DataType::UInt8, &DataType::Int16));
    assert!(lossless_cast(&DataType::Date32, &DataType::Utf8));
    assert!(!lossless_cast(&DataType::Int64, &DataType::Int32));
    assert!(!lossless_cast(&DataType::Utf8, &DataType::Int64));
    assert!(!lossless_cast(&DataType::Int64, &DataType::UInt64));
    assert!(lossless_cast(
        &DataType::Decimal128(4, 1),
        &DataType::Decimal128(20, 1)
    ));
    assert!(!lossless_cast(
        &DataType::Decimal128(20, 1),
        &DataType::Decimal128(4, 1)
    ));
}

#[tokio::test]
async fn long_string_literals_and_fine_survival_times_are_refused() {
    let long = "a".repeat(300);
    assert_eq!(
        rule(&format!(
            "SELECT count(*) FROM lung WHERE CAST(inst AS VARCHAR) = '{long}'"
        ))
        .await,
        Err("string_literal")
    );
    // The policy's default resolution is 7: a week when times are days.
    assert_eq!(
        rule("SELECT survival_terms(age, inst, 1.0, 10, 5) FROM lung").await,
        Err("survival_time_resolution")
    );
    assert!(
        rule("SELECT survival_terms(age, inst, 7.0, 10, 5) FROM lung")
            .await
            .is_ok()
    );
}

/// Derived measures a study needs are answered; forms that can act as an indicator of one
/// row are refused, wherever in the fragment they are computed.
#[tokio::test]
async fn the_grammar_accepts_derived_measures_and_refuses_indicators() {
    let global = Ok(Release::Groups { k: 5, global: true });
    for sql in [
        "SELECT sum(age * age) FROM lung",
        "SELECT sum((age - 60) * (age - 60)) FROM lung",
        "SELECT avg(weight / (height * height)) FROM lung",
        "SELECT avg(weight / ((height / 100) * (height / 100))) FROM lung",
        "SELECT avg(date_part('year', diagnosed) - born) FROM lung",
        "SELECT avg(CAST(age AS DOUBLE) / 10 + 1) FROM lung",
        "SELECT avg(floor(weight)), avg(signum(weight)) FROM lung",
        "SELECT regr_slope(weight, height), covar_samp(age, weight) FROM lung",
        "SELECT count(CASE WHEN age >= 80 THEN 1 END) FROM lung",
        "SELECT count(age, weight) FROM lung",
        "SELECT avg(a) FROM (SELECT age AS a FROM lung)",
        "SELECT avg(weight * 12 + weight) FROM lung",
        "SELECT count(*) FROM lung WHERE CAST(age AS BIGINT) / 10 = 6",
        "SELECT count(*) FROM lung WHERE diagnosed >= CAST('2020-01-01' AS DATE)",
        "SELECT count(*) FROM lung WHERE date_part('year', diagnosed) = 2020",
        "SELECT count(*) FROM lung WHERE age / 10 = 6 AND 2 * 3 = 6",
    ] {
        assert_eq!(rule(sql).await, global, "{sql}");
    }
    for (sql, expected) in [
        // A large term added and removed again: in floating point it takes every other
        // row's value with it, except where it is zero (patient 1).
        (
            "SELECT sum(weight + 1e20 * (patient_id - 1) * (patient_id - 1) \
             - 1e20 * (patient_id - 1) * (patient_id - 1) + 1000) FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT sum(weight + 1e20 * (patient_id - 1) - 1e20 * (patient_id - 1)) FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT sum(weight + 1e20 * floor(height) - 1e20 * ceil(height)) FROM lung",
            "aggregate_argument",
        ),
        // Single precision rounds every age but one away, and the sum adds exact multiples
        // of 2^31 to the one left.
        (
            "SELECT sum(CAST(age AS REAL) + CAST(2147483648 AS REAL) * (CAST(patient_id AS REAL) \
             - CAST(1 AS REAL))) FROM lung",
            "aggregate_argument",
        ),
        // A term renamed by signum() (1 on every row) cancels all the same; a scale of 2^60
        // swallows the other terms' digits.
        (
            "SELECT sum((age + (1152921504606846976.0 * patient_id - 1152921504606846976.0)) \
             - (1152921504606846976.0 * patient_id * signum(age) \
             - 1152921504606846976.0 * signum(age))) FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT sum(weight + 4398046511104.0 * patient_id) FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT sum(weight + 1e20 - 1e20) FROM lung",
            "aggregate_argument",
        ),
        // Computed below the aggregate, where the terms cannot be seen: the hub always
        // writes an argument out in the aggregate itself.
        (
            "SELECT avg(a) FROM (SELECT age + 1 AS a FROM lung)",
            "aggregate_argument",
        ),
        (
            "SELECT avg(bmi) FROM (SELECT weight / (height * height) AS bmi FROM lung) t",
            "aggregate_argument",
        ),
        // TRY_CAST turns every row but one into NULL.
        (
            "SELECT regr_avgx(TRY_CAST((patient_id - 1) * 200 AS TINYINT), age) FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT sum(TRY_CAST((age - 74) * 200 AS TINYINT)) FROM lung",
            "aggregate_argument",
        ),
        // Integer division, rounding and casts place a step where the researcher wants it.
        (
            "SELECT sum((age - 74 + 10000) / 10000) FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT sum(floor((weight - 73.5) / 100)) FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT sum(round(weight, -1)) FROM lung",
            "aggregate_argument",
        ),
        // A denominator shifted to zero at one row; a polynomial through known ids.
        (
            "SELECT sum(weight / (height - 1.5)) FROM lung",
            "aggregate_argument",
        ),
        (
            "SELECT sum(age * (patient_id - 2) * (patient_id - 3)) FROM lung",
            "aggregate_argument",
        ),
        // The indicator computed in a subquery, out of sight of the aggregate.
        (
            "SELECT sum(x) FROM (SELECT CASE WHEN age >= 80 THEN 1 END AS x FROM lung)",
            "aggregate_argument",
        ),
        (
            "SELECT partial_sum(x) FROM (SELECT CASE WHEN age >= 80 THEN 1 END AS x FROM lung)",
            "aggregate_argument",
        ),
        (
            "SELECT avg(y) FROM (SELECT x + 1 AS y FROM (SELECT coalesce(age, 0) AS x FROM lung) a) b",
            "aggregate_argument",
        ),
        // Failures that depend on one row: a negative length, a division by zero that only
        // the rows reaching a CASE arm (or passing an AND) evaluate, -1 at the smallest integer.
        (
            "SELECT count(*) FROM lung WHERE length(substr('abcdefghij', 1, CASE WHEN \
             patient_id = 1 THEN age - 70 ELSE 1 END)) >= 0",
            "fallible_expression",
        ),
        (
            "SELECT count(*) FROM lung WHERE CASE WHEN patient_id = 1 AND age >= 70 THEN 1/0 \
             ELSE 1 END = 1",
            "fallible_expression",
        ),
        (
            "SELECT count(*) FROM lung WHERE age > 70 AND 1/0 = 1",
            "fallible_expression",
        ),
        (
            "SELECT count(*) FROM lung WHERE patient_id / -1 > 0",
            "fallible_expression",
        ),
        // A constant that makes integer arithmetic wrap for some values.
        (
            "SELECT sum(age * 9223372036854775807) FROM lung",
            "fallible_expression",
        ),
        (
            "SELECT count(*) FROM lung WHERE patient_id + 9223372036854775733 < 0",
            "fallible_expression",
        ),
        // Constants each under the cap, chained until the sum wraps where they choose.
        (
            "SELECT sum(age + 4611686018427387904 + 4611686018427387000) FROM lung",
            "fallible_expression",
        ),
        (
            "SELECT sum(age * 1048576 * 1048576 * 1048576) FROM lung",
            "fallible_expression",
        ),
        (
            "SELECT count(*) FROM lung WHERE date_part(CASE WHEN age > 70 THEN 'year' ELSE 'x' END, diagnosed) > 0",
            "fallible_expression",
        ),
    ] {
        assert_eq!(rule(sql).await, Err(expected), "{sql}");
    }
}

/// A ratio with known weights (`age / (patient_id * patient_id)` in floats, over patient 1 and nine
/// patients numbered above 200) is patient 1's age to two decimals: the release withholds
/// it by the dominance rule, while a ratio of the data's own values (BMI) is released.
#[tokio::test]
async fn a_value_one_row_dominates_is_withheld() {
    use arrow::array::{Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
    let ctx = railyard_udfs::fragment_context().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("age", DataType::Int32, true),
        Field::new("inst", DataType::Int64, true),
        Field::new("note", DataType::Utf8, true),
        Field::new("weight", DataType::Float64, true),
        Field::new("height", DataType::Float64, true),
    ]));
    let ids: Vec<i64> = std::iter::once(1).chain(201..=209).collect();
    let n = ids.len();
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(Int32Array::from_iter_values((0..n).map(|i| 60 + i as i32))),
            Arc::new(Int64Array::from_iter_values((0..n).map(|_| 1))),
            Arc::new(StringArray::from_iter_values((0..n).map(|_| "x"))),
            Arc::new(Float64Array::from_iter_values(
                (0..n).map(|i| 60.0 + i as f64),
            )),
            Arc::new(Float64Array::from_iter_values(
                (0..n).map(|i| 1.6 + 0.02 * i as f64),
            )),
        ],
    )
    .unwrap();
    ctx.register_table(
        "lung",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let released = |sql: &'static str| {
        let ctx = ctx.clone();
        async move {
            let logical = ctx.state().create_logical_plan(sql).await.unwrap();
            let checked = check(&logical, &policy(), "s").unwrap();
            let out = ctx
                .execute_logical_plan(checked.plan)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let key = crate::release::ThresholdKey::new([7; 32], 0);
            match crate::release::release("s", "lung", &checked.release, out, &key) {
                Ok(r) => Ok(r.released),
                Err(crate::release::ReleaseError::Refused(r)) => Err(r.rule.as_str()),
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(
        released(
            "SELECT partial_sum(CAST(age AS DOUBLE) / (patient_id * patient_id)) AS a0 FROM lung"
        )
        .await,
        Err("min_group_size")
    );
    // A constant, or a known linear term, added to every row does not hide a dominated
    // term: each non-linear term is held to the rule on its own.
    assert_eq!(
        released(
            "SELECT partial_sum(CAST(age AS DOUBLE) / (patient_id * patient_id) + 1000) AS a0 \
             FROM lung"
        )
        .await,
        Err("min_group_size")
    );
    assert_eq!(
        released(
            "SELECT partial_avg(CAST(age AS DOUBLE) / (patient_id * patient_id) \
             + 1000 * patient_id) AS a0 FROM lung"
        )
        .await,
        Err("min_group_size")
    );
    assert_eq!(
        released("SELECT inst AS g0, partial_sum(age * patient_id) AS a0 FROM lung GROUP BY inst")
            .await,
        Ok(1),
        "known weights of one order of magnitude do not single out a row"
    );
    assert_eq!(
        released("SELECT partial_avg(weight / (height * height)) AS a0 FROM lung").await,
        Ok(1)
    );
}

/// A station with a patient table (`lung`, unit `patient_id`), a second patient table
/// (`visits`) and a reference table (`codes`): what a relational fragment may do, as the
/// station decides it whatever the hub sent.
#[tokio::test]
async fn relational_fragments_combine_rows_of_one_patient_only() {
    let ctx = railyard_udfs::fragment_context().unwrap();
    let lung = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("age", DataType::Int32, true),
        Field::new("inst", DataType::Int64, true),
        Field::new("note", DataType::Utf8, true),
    ]));
    let visits = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("code", DataType::Int64, true),
        Field::new("day", DataType::Int64, true),
    ]));
    let codes = Arc::new(Schema::new(vec![
        Field::new("code", DataType::Int64, false),
        Field::new("parent", DataType::Int64, true),
    ]));
    for (name, schema) in [("lung", lung), ("visits", visits), ("codes", codes)] {
        ctx.register_table(
            name,
            Arc::new(MemTable::try_new(schema, vec![vec![]]).unwrap()),
        )
        .unwrap();
    }
    let mut policy = Policy::parse(
        "[tables.lung.columns]\ninst = \"public\"\nnote = \"hidden\"\n",
        "test",
    )
    .unwrap();
    policy
        .reference_tables
        .insert("codes".to_string(), "digest".to_string());
    let rule = |sql: &'static str| {
        let ctx = ctx.clone();
        let policy = policy.clone();
        async move {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            check(&plan, &policy, "s").map(|c| c.release).map_err(|r| {
                assert!(r.message.starts_with("policy: "), "{}", r.message);
                r.rule.as_str()
            })
        }
    };
    let groups = Ok(Release::Groups { k: 5, global: true });
    let grouped = Ok(Release::Groups {
        k: 5,
        global: false,
    });
    for sql in [
        // Joins on the unit, with a reference table, semi and anti joins.
        "SELECT partial_count(1) FROM lung l JOIN visits v ON v.patient_id = l.patient_id",
        "SELECT partial_count(1) FROM visits v JOIN codes c ON c.code = v.code WHERE c.parent = 7",
        "SELECT partial_count(1) FROM lung l LEFT JOIN visits v ON v.patient_id = l.patient_id",
        // Per-patient derivations below the release.
        "SELECT partial_avg(CAST(n AS DOUBLE)) FROM (SELECT patient_id, count(*) AS n FROM visits \
         GROUP BY patient_id) t",
        "SELECT partial_count(1) FROM (SELECT patient_id, row_number() OVER (PARTITION BY \
         patient_id ORDER BY day) AS rn FROM visits) t WHERE rn = 1",
        "SELECT partial_count(1) FROM (SELECT DISTINCT patient_id, code FROM visits) t",
        // Subqueries correlated on the unit, or over reference tables only.
        "SELECT partial_count(1) FROM lung l WHERE EXISTS (SELECT 1 FROM visits v WHERE \
         v.patient_id = l.patient_id AND v.code = 3)",
        "SELECT partial_count(1) FROM lung l WHERE NOT EXISTS (SELECT 1 FROM visits v WHERE \
         v.patient_id = l.patient_id)",
        "SELECT partial_count(1) FROM lung WHERE patient_id IN (SELECT patient_id FROM visits)",
        "SELECT partial_count(1) FROM visits WHERE code IN (SELECT code FROM codes WHERE parent = 7)",
        "SELECT partial_count(1) FROM (SELECT patient_id FROM lung UNION ALL SELECT patient_id \
         FROM visits) u",
        // A scalar subquery over a reference table beside an EXISTS on the patient.
        "SELECT partial_count(1) FROM visits v WHERE EXISTS (SELECT 1 FROM visits w WHERE \
         w.patient_id = v.patient_id) AND v.code = (SELECT max(code) FROM codes)",
        // A union met again by a join: each input's unit hash keeps a name of its own.
        "SELECT partial_count(1) FROM lung l LEFT JOIN (SELECT patient_id FROM visits UNION ALL \
         SELECT patient_id FROM visits) u ON u.patient_id = l.patient_id",
    ] {
        assert_eq!(rule(sql).await, groups, "{sql}");
    }
    assert_eq!(
        rule(
            "SELECT inst AS g0, partial_count(1) AS a0 FROM lung l JOIN visits v \
             ON v.patient_id = l.patient_id GROUP BY inst"
        )
        .await,
        grouped
    );
    for (sql, expected) in [
        // Rows of two patients paired, or a patient's rows shaped by another's.
        (
            "SELECT partial_count(1) FROM visits a JOIN visits b ON a.code = b.code",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM lung l JOIN visits v ON v.patient_id = l.inst",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM lung l, visits v",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM lung l JOIN visits v ON v.patient_id = l.patient_id \
             OR v.code = l.inst",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM lung WHERE EXISTS (SELECT 1 FROM visits WHERE \
             patient_id = 7 AND code = 3)",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM lung WHERE inst IN (SELECT patient_id FROM visits)",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM lung WHERE age > (SELECT avg(code) FROM visits)",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM (SELECT code, count(*) AS n FROM visits GROUP BY code) t",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM (SELECT patient_id, rank() OVER (ORDER BY day) AS r \
             FROM visits) t WHERE r = 1",
            "privacy_unit",
        ),
        (
            "SELECT partial_count(1) FROM (SELECT DISTINCT code FROM visits) t",
            "privacy_unit",
        ),
        (
            "SELECT partial_sum(age) FROM (SELECT patient_id, age FROM lung ORDER BY age DESC \
             LIMIT 1) t JOIN visits v ON v.patient_id = t.patient_id",
            "ordering",
        ),
        // What a per-patient derivation computes is held to the grammar where it is
        // released: a rank, or a CASE that singles a patient out, may only select.
        (
            "SELECT partial_sum(rn) FROM (SELECT patient_id, row_number() OVER (PARTITION BY \
             patient_id ORDER BY day) AS rn FROM visits) t",
            "aggregate_argument",
        ),
        (
            "SELECT partial_sum(x) FROM (SELECT l.patient_id, CASE WHEN l.patient_id = 7 THEN \
             l.age ELSE 0 END AS x FROM lung l JOIN visits v ON v.patient_id = l.patient_id) t",
            "aggregate_argument",
        ),
        // Hidden stays hidden through a join; rows stay rows.
        (
            "SELECT partial_count(l.note) FROM lung l JOIN visits v ON v.patient_id = l.patient_id",
            "hidden_column",
        ),
        (
            "SELECT l.age FROM lung l JOIN visits v ON v.patient_id = l.patient_id",
            "row_level",
        ),
    ] {
        assert_eq!(rule(sql).await, Err(expected), "{sql}");
    }
    // Over reference tables only: public rows.
    assert_eq!(
        rule("SELECT c.code FROM codes c JOIN codes p ON p.code = c.parent").await,
        Ok(Release::Rows)
    );
}
