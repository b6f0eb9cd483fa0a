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

#[tokio::test]
async fn dp_fragments_need_plain_columns_bounds_keys_and_no_fallible_casts() {
    let policy = Policy::parse(
        "[dp]\n[tables.lung.columns]\nage = \"dp\"\nnote = \"hidden\"\n\
         [tables.lung.dp]\nage = { lower = 30, upper = 90 }\ninst = { keys = [1, 2] }\n",
        "test",
    )
    .unwrap();
    let dp = |sql: &'static str| {
        let policy = policy.clone();
        async move {
            check(&plan(sql).await, &policy, "s")
                .map(|c| c.release)
                .map_err(|r| r.rule.as_str())
        }
    };
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
        (
            "SELECT a.age FROM lung a JOIN lung b ON a.inst = b.inst",
            "fragment_shape",
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
        ("SELECT sum(age * age) FROM lung", "aggregate_argument"),
        ("SELECT sum(age * inst) FROM lung", "aggregate_argument"),
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
            "fragment_shape",
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
    let fields = checked.plan.schema().fields().clone();
    assert_eq!(fields.len(), 3);
    assert_eq!(fields[2].name(), ROWS_COLUMN);
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
