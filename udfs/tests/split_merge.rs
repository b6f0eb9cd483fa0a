//! The split-merge contract for every aggregate the federation relies on: split the input
//! into chunks (the stations), run `partial_<agg>` on each, merge the states with
//! `merge_<agg>` (the hub), and compare with the aggregate over all rows at once.

#![allow(clippy::unwrap_used)] // a test or benchmark that cannot unwrap has failed

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Decimal128Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use arrow::util::display::array_value_to_string;
use datafusion::datasource::MemTable;
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::AggregateUDF;
use datafusion::prelude::{SessionContext, col};
use railyard_udfs::{MergeAggregate, MergeArg, fragment_context};

const ROWS: usize = 1_000;
const CHUNKS: usize = 4;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("g", DataType::Utf8, false),
        Field::new("x", DataType::Float64, true),
        Field::new("i", DataType::Int64, true),
        Field::new("d", DataType::Decimal128(10, 2), true),
    ]))
}

/// Deterministic, irregular data with NULLs and repeated values, in `CHUNKS` uneven chunks.
fn chunks() -> Vec<RecordBatch> {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut g = Vec::new();
    let mut x = Vec::new();
    let mut i = Vec::new();
    let mut d = Vec::new();
    for _ in 0..ROWS {
        let r = next();
        g.push(["a", "b", "c"][(r % 3) as usize].to_string());
        x.push((r % 11 != 0).then(|| ((r >> 8) % 100_000) as f64 / 37.0 - 1000.0));
        i.push((r % 13 != 0).then_some(((r >> 20) % 50) as i64));
        d.push((r % 7 != 0).then_some(((r >> 32) % 1_000_000) as i128));
    }
    let bounds = [0, 100, 420, 421, ROWS];
    (0..CHUNKS)
        .map(|c| {
            let (lo, hi) = (bounds[c], bounds[c + 1]);
            let columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from(g[lo..hi].to_vec())),
                Arc::new(Float64Array::from(x[lo..hi].to_vec())),
                Arc::new(Int64Array::from(i[lo..hi].to_vec())),
                Arc::new(
                    Decimal128Array::from(d[lo..hi].to_vec())
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
            ];
            RecordBatch::try_new(schema(), columns).unwrap()
        })
        .collect()
}

fn field(name: &str) -> FieldRef {
    Arc::new(schema().field_with_name(name).unwrap().clone())
}

/// Values of one column, floats compared to 12 significant digits.
fn values(batches: &[RecordBatch], column: usize) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let a = b.column(column);
        for r in 0..b.num_rows() {
            out.push(if a.is_null(r) {
                "NULL".to_string()
            } else if a.data_type() == &DataType::Float64 {
                let v = a.as_any().downcast_ref::<Float64Array>().unwrap().value(r);
                format!("{v:.11e}")
            } else {
                array_value_to_string(a, r).unwrap()
            });
        }
    }
    out
}

/// Runs `call` (e.g. `avg(x)`) split and merged, grouped by `g` and globally, and compares
/// with the centralized answer. `args` are the (coerced) argument fields of the call.
async fn check(function: &str, call_args: &str, args: Vec<MergeArg>, distinct: bool) {
    let data = chunks();
    let keyword = if distinct { "DISTINCT " } else { "" };
    let call = format!("{function}({keyword}{call_args})");
    let partial = format!(
        "{}{function}({call_args})",
        if distinct {
            "partial_distinct_"
        } else {
            "partial_"
        }
    );
    for grouped in [true, false] {
        let (select_g, group_by) = if grouped {
            ("g, ", " GROUP BY g ORDER BY g")
        } else {
            ("", "")
        };
        let central = SessionContext::new();
        central
            .register_table(
                "t",
                Arc::new(MemTable::try_new(schema(), vec![data.clone()]).unwrap()),
            )
            .unwrap();
        let expected = central
            .sql(&format!("SELECT {select_g}{call} AS v FROM t{group_by}"))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();

        let mut states = Vec::new();
        for chunk in &data {
            let station = fragment_context().unwrap();
            station
                .register_table(
                    "t",
                    Arc::new(MemTable::try_new(schema(), vec![vec![chunk.clone()]]).unwrap()),
                )
                .unwrap();
            let group = if grouped { " GROUP BY g" } else { "" };
            let sql = format!("SELECT {select_g}{partial} AS s FROM t{group}");
            states.extend(station.sql(&sql).await.unwrap().collect().await.unwrap());
        }
        // The hub registers the same functions as the stations (checked_sum's state is
        // its own); the reference above is DataFusion's plain session.
        let hub = fragment_context().unwrap();
        let state_schema = states[0].schema();
        hub.register_table(
            "states",
            Arc::new(MemTable::try_new(state_schema, vec![states]).unwrap()),
        )
        .unwrap();
        let inner = hub.udaf(function).unwrap();
        let merge = AggregateUDF::from(MergeAggregate::new(inner, args.clone(), distinct));
        let groups = if grouped { vec![col("g")] } else { vec![] };
        let mut df = hub
            .table("states")
            .await
            .unwrap()
            .aggregate(groups, vec![merge.call(vec![col("s")]).alias("v")])
            .unwrap();
        if grouped {
            df = df.sort(vec![col("g").sort(true, false)]).unwrap();
        }
        let merged = df.collect().await.unwrap();
        let column = usize::from(grouped);
        assert_eq!(
            values(&merged, column),
            values(&expected, column),
            "{call}, grouped: {grouped}"
        );
        assert_eq!(
            merged[0].schema().field(column).data_type(),
            expected[0].schema().field(column).data_type(),
            "{call} keeps its type"
        );
    }
}

fn column(name: &str) -> MergeArg {
    MergeArg::Column(field(name))
}

fn float_of(name: &str) -> MergeArg {
    MergeArg::Column(Arc::new(Field::new(name, DataType::Float64, true)))
}

#[tokio::test]
async fn counts() {
    check("count", "x", vec![column("x")], false).await;
    check(
        "count",
        "1",
        vec![MergeArg::Literal(
            Arc::new(Field::new("1", DataType::Int64, false)),
            datafusion::scalar::ScalarValue::Int64(Some(1)),
        )],
        false,
    )
    .await;
    check("count", "i", vec![column("i")], true).await;
}

#[tokio::test]
async fn sums_and_means_keep_exact_types() {
    check("sum", "x", vec![column("x")], false).await;
    check("sum", "i", vec![column("i")], false).await;
    check("sum", "d", vec![column("d")], false).await;
    check("sum", "i", vec![column("i")], true).await;
    check("avg", "x", vec![column("x")], false).await;
    check("avg", "d", vec![column("d")], false).await;
}

#[tokio::test]
async fn extremes() {
    check("min", "x", vec![column("x")], false).await;
    check("max", "d", vec![column("d")], false).await;
    check("min", "g", vec![column("g")], false).await;
}

#[tokio::test]
async fn variances_merge_with_the_stable_formula() {
    for f in ["var_samp", "var_pop", "stddev_samp", "stddev_pop"] {
        check(f, "x", vec![column("x")], false).await;
    }
    check("var_samp", "i", vec![float_of("i")], false).await;
}

#[tokio::test]
async fn bivariate_statistics() {
    check("corr", "x, i", vec![column("x"), float_of("i")], false).await;
    check(
        "covar_samp",
        "x, i",
        vec![column("x"), float_of("i")],
        false,
    )
    .await;
    check(
        "regr_slope",
        "x, i",
        vec![column("x"), float_of("i")],
        false,
    )
    .await;
}

#[tokio::test]
async fn holistic_and_sketch_aggregates() {
    check("median", "x", vec![column("x")], false).await;
    check("approx_distinct", "i", vec![column("i")], false).await;
}

/// A state no station's accumulator produces (avg's count 0 beside a sum, which avg's merge
/// divides by) fails the query with an error that names no value, grouped or not, instead
/// of panicking the hub's task.
#[tokio::test]
async fn a_state_no_accumulator_produces_is_an_error_not_a_panic() {
    use arrow::array::{StructArray, UInt64Array};
    let sum_type = DataType::Decimal128(38, 2);
    let fields = vec![
        Arc::new(Field::new("s0", DataType::UInt64, true)),
        Arc::new(Field::new("s1", sum_type.clone(), true)),
    ];
    let state = StructArray::new(
        fields.clone().into(),
        vec![
            Arc::new(UInt64Array::from(vec![0_u64])) as ArrayRef,
            Arc::new(Decimal128Array::from(vec![123_456_i128]).with_data_type(sum_type.clone())),
        ],
        None,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("g", DataType::Utf8, false),
        Field::new("s", DataType::Struct(fields.into()), false),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(StringArray::from(vec!["a"])), Arc::new(state)],
    )
    .unwrap();
    for grouped in [true, false] {
        let hub = fragment_context().unwrap();
        hub.register_table(
            "states",
            Arc::new(MemTable::try_new(Arc::clone(&schema), vec![vec![batch.clone()]]).unwrap()),
        )
        .unwrap();
        let merge = AggregateUDF::from(MergeAggregate::new(
            hub.udaf("avg").unwrap(),
            vec![column("d")],
            false,
        ));
        let groups = if grouped { vec![col("g")] } else { vec![] };
        let result = hub
            .table("states")
            .await
            .unwrap()
            .aggregate(groups, vec![merge.call(vec![col("s")]).alias("v")])
            .unwrap()
            .collect()
            .await;
        let Err(e) = result else {
            // DataFusion's non-grouped avg answers NULL-safe: nothing to guard there.
            assert!(
                !grouped,
                "a grouped merge of a count of 0 beside a sum must fail"
            );
            continue;
        };
        let message = e.to_string();
        assert!(
            message.contains("could not merge the aggregate states"),
            "{message}"
        );
        assert!(
            !message.contains("1234.56") && !message.contains("123456"),
            "{message}"
        );
    }
}
