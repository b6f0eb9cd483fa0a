//! The split-merge contract of the model aggregates: `glm_terms` and `survival_terms` over
//! chunks (stations), added up, equal the same aggregate over all rows; and their sums equal
//! plain SQL sums over the same rows.

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use railyard_udfs::fragment_context;
use railyard_udfs::glm_terms::{GlmLayout, add_terms};
use railyard_udfs::survival_terms::{SurvivalLayout, survival_entries};

const ROWS: usize = 600;
const CHUNKS: [usize; 5] = [0, 150, 151, 400, ROWS];

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("y", DataType::Float64, true),
        Field::new("x1", DataType::Float64, true),
        Field::new("x2", DataType::Float64, true),
        Field::new("t", DataType::Float64, true),
        Field::new("e", DataType::Float64, true),
    ]))
}

/// Deterministic rows with NULLs, repeated times and 0/1 outcomes.
fn rows() -> Vec<[Option<f64>; 5]> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..ROWS)
        .map(|_| {
            let r = next();
            let x1 = ((r >> 8) % 1000) as f64 / 100.0 - 5.0;
            let x2 = ((r >> 20) % 7) as f64;
            let y = if (r >> 30) % 3 == 0 { 1.0 } else { 0.0 };
            [
                (r % 17 != 0).then_some(y),
                (r % 13 != 0).then_some(x1),
                Some(x2),
                (r % 11 != 0).then_some(((r >> 40) % 90) as f64),
                Some(((r >> 50) % 2) as f64),
            ]
        })
        .collect()
}

fn batch(rows: &[[Option<f64>; 5]]) -> RecordBatch {
    let columns = (0..5)
        .map(|c| Arc::new(rows.iter().map(|r| r[c]).collect::<Float64Array>()) as _)
        .collect();
    RecordBatch::try_new(schema(), columns).unwrap()
}

async fn context() -> SessionContext {
    let ctx = fragment_context().unwrap();
    let all = rows();
    ctx.register_table(
        "all_rows",
        Arc::new(MemTable::try_new(schema(), vec![vec![batch(&all)]]).unwrap()),
    )
    .unwrap();
    for c in 0..CHUNKS.len() - 1 {
        let part = batch(&all[CHUNKS[c]..CHUNKS[c + 1]]);
        ctx.register_table(
            format!("chunk{c}"),
            Arc::new(MemTable::try_new(schema(), vec![vec![part]]).unwrap()),
        )
        .unwrap();
    }
    ctx
}

/// The list value of `SELECT {select} FROM {table}` (one row, one column).
async fn value(ctx: &SessionContext, select: &str, table: &str) -> Option<Vec<f64>> {
    let batches = ctx
        .sql(&format!("SELECT {select} FROM {table}"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let list = batches[0].column(0).as_list::<i32>();
    if list.is_null(0) {
        return None;
    }
    Some(
        list.value(0)
            .as_primitive::<Float64Type>()
            .values()
            .to_vec(),
    )
}

fn assert_close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "{x} vs {y}");
    }
}

async fn scalar(ctx: &SessionContext, sql: &str) -> f64 {
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let column = arrow::compute::cast(batches[0].column(0), &DataType::Float64).unwrap();
    column.as_primitive::<Float64Type>().value(0)
}

#[tokio::test]
async fn glm_terms_merge_like_one_pass_and_match_sql_sums() {
    let ctx = context().await;
    for call in [
        "glm_terms('binomial', true, y, x1, x2, -0.3, 0.2, 0.1)",
        "glm_terms('poisson', false, y, x1, x2 = 3, 0.05, -0.4)",
        "glm_terms('gaussian', true, y, x1, x2, 0.0, 0.0, 0.0)",
    ] {
        let whole = value(&ctx, call, "all_rows").await.unwrap();
        let mut merged = vec![0.0; whole.len()];
        for c in 0..CHUNKS.len() - 1 {
            let part = value(&ctx, call, &format!("chunk{c}")).await.unwrap();
            add_terms(&mut merged, &part).unwrap();
        }
        assert_close(&merged, &whole);
    }
    // At b = 0 a gaussian step's sums are plain cross-products of the complete rows.
    let v = value(
        &ctx,
        "glm_terms('gaussian', true, y, x1, x2, 0.0, 0.0, 0.0)",
        "all_rows",
    )
    .await
    .unwrap();
    let layout = GlmLayout { q: 3 };
    let complete = "FROM all_rows WHERE y IS NOT NULL AND x1 IS NOT NULL AND x2 IS NOT NULL";
    let sql = |e: &str| format!("SELECT {e} {complete}");
    assert_eq!(v[GlmLayout::N], scalar(&ctx, &sql("count(*)")).await);
    let (xtwz, xtwx) = (layout.xtwz().start, layout.xtwx().start);
    let expected = [
        (xtwz + 1, "sum(x1 * y)"),
        (xtwx + 3 + 2, "sum(x1 * x2)"),
        (xtwx + 8, "sum(x2 * x2)"),
        (GlmLayout::DEVIANCE, "sum(y * y)"),
        (
            layout.nonzero().start + 2,
            "sum(CASE WHEN x2 <> 0 THEN 1 ELSE 0 END)",
        ),
    ];
    for (i, e) in expected {
        let reference = scalar(&ctx, &sql(e)).await;
        assert!(
            (v[i] - reference).abs() <= 1e-9 * reference.abs().max(1.0),
            "{e}"
        );
    }
}

#[tokio::test]
async fn survival_terms_merge_by_time_and_pool_to_their_rules() {
    let ctx = context().await;
    let exact = "survival_terms(t, e, 0.0, 1, 0, x1, 0.2)";
    let layout = SurvivalLayout { p: 1 };
    let whole = survival_entries(&value(&ctx, exact, "all_rows").await.unwrap(), layout).unwrap();
    let mut merged: Vec<(f64, Vec<f64>)> = Vec::new();
    for c in 0..CHUNKS.len() - 1 {
        let part = value(&ctx, exact, &format!("chunk{c}")).await.unwrap();
        for (t, v) in survival_entries(&part, layout).unwrap() {
            match merged.iter_mut().find(|(u, _)| *u == t) {
                Some((_, sums)) => add_terms(sums, &v).unwrap(),
                None => merged.push((t, v)),
            }
        }
    }
    merged.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(merged.len(), whole.len());
    for ((t1, a), (t2, b)) in merged.iter().zip(&whole) {
        assert_eq!(t1, t2);
        assert_close(a, b);
    }
    let complete = "FROM all_rows WHERE t IS NOT NULL AND e IS NOT NULL AND x1 IS NOT NULL";
    let rows: f64 = whole.iter().map(|(_, v)| v[SurvivalLayout::ROWS]).sum();
    assert_eq!(
        rows,
        scalar(&ctx, &format!("SELECT count(*) {complete}")).await
    );

    // Weeks, at least 25 rows and none or at least 10 deaths per released time.
    let pooled = "survival_terms(t, e, 7.0, 25, 10, x1, 0.2)";
    let released =
        survival_entries(&value(&ctx, pooled, "all_rows").await.unwrap(), layout).unwrap();
    assert!(released.len() > 1);
    for (t, v) in &released {
        assert_eq!(t % 7.0, 0.0);
        assert!(v[SurvivalLayout::ROWS] >= 25.0);
        let d = v[SurvivalLayout::EVENTS];
        assert!(d == 0.0 || d >= 10.0);
    }
    let total =
        |entries: &[(f64, Vec<f64>)], i: usize| entries.iter().map(|(_, v)| v[i]).sum::<f64>();
    for i in 0..layout.len() {
        let (a, b) = (total(&released, i), total(&whole, i));
        assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "component {i}");
    }
    // Rules no pooling can meet give NULL (the station then refuses the release).
    assert_eq!(
        value(&ctx, "survival_terms(t, e, 7.0, 100000, 0)", "all_rows").await,
        None
    );
}
