//! Criterion micro-bench: the cost of federating an aggregate through its state.
//!
//! Compares, on one million rows in memory, a plain grouped `avg`/`var_samp`, the station
//! half alone (`partial_avg`/`partial_var`, returning states), and station half plus hub
//! half (`merge_avg`/`merge_var` over the states). The wrappers delegate to DataFusion's own
//! group accumulators, so the first two should cost the same.

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use datafusion::datasource::MemTable;
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::AggregateUDF;
use datafusion::prelude::{SessionContext, col};
use railyard_udfs::{MergeAggregate, MergeArg, fragment_context};

const ROWS: usize = 1_000_000;
const GROUPS: i64 = 100;

fn table() -> Arc<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("g", DataType::Int64, false),
        Field::new("x", DataType::Float64, true),
    ]));
    let batches = (0..ROWS / 8192 + 1)
        .map(|b| {
            let lo = b * 8192;
            let hi = ((b + 1) * 8192).min(ROWS);
            let g: ArrayRef = Arc::new(Int64Array::from_iter_values(
                (lo..hi).map(|i| (i as i64 * 7919) % GROUPS),
            ));
            let x: ArrayRef = Arc::new(Float64Array::from_iter_values(
                (lo..hi).map(|i| ((i * 2_654_435_761) % 100_000) as f64 / 100.0),
            ));
            RecordBatch::try_new(Arc::clone(&schema), vec![g, x]).unwrap()
        })
        .filter(|b| b.num_rows() > 0)
        .collect();
    Arc::new(MemTable::try_new(schema, vec![batches]).unwrap())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ctx = fragment_context().unwrap();
    ctx.register_table("t", table()).unwrap();
    let x = Arc::new(Field::new("x", DataType::Float64, true));

    let mut group = c.benchmark_group("grouped avg + var_samp, 1M rows, 100 groups");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(20);
    group.bench_function("plain aggregate", |b| {
        b.to_async(&rt).iter(|| async {
            ctx.sql("SELECT g, avg(x), var_samp(x) FROM t GROUP BY g")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap()
        })
    });
    group.bench_function("station half (partial states)", |b| {
        b.to_async(&rt).iter(|| async {
            ctx.sql("SELECT g, partial_avg(x), partial_var(x) FROM t GROUP BY g")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap()
        })
    });
    group.bench_function("station half + hub merge", |b| {
        b.to_async(&rt).iter(|| async {
            let states = ctx
                .sql("SELECT g, partial_avg(x) AS s1, partial_var(x) AS s2 FROM t GROUP BY g")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            let hub = SessionContext::new();
            let schema = states[0].schema();
            hub.register_table(
                "states",
                Arc::new(MemTable::try_new(schema, vec![states]).unwrap()),
            )
            .unwrap();
            let merge = |name: &str| {
                AggregateUDF::from(MergeAggregate::new(
                    hub.udaf(name).unwrap(),
                    vec![MergeArg::Column(Arc::clone(&x))],
                    false,
                ))
            };
            hub.table("states")
                .await
                .unwrap()
                .aggregate(
                    vec![col("g")],
                    vec![
                        merge("avg").call(vec![col("s1")]),
                        merge("var").call(vec![col("s2")]),
                    ],
                )
                .unwrap()
                .collect()
                .await
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
