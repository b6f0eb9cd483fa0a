//! Example train: a histogram of one numeric column.
//!
//! Arguments: `{"column": "age", "edges": [40, 50, 60, 70, 80]}`. Output: one row per bin
//! `[edges[i], edges[i+1])` with its count (`bin_lower`, `bin_upper`, `n`); NULLs and values
//! outside `[first edge, last edge)` are not counted. Each station's counts add up to the
//! pooled histogram, so `SELECT bin_lower, sum(n) … GROUP BY bin_lower` over the stations'
//! outputs is the federation's histogram.

use std::process::ExitCode;
use std::sync::Arc;

use arrow_array::{Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use railyard_train::{Error, Input, numeric_values, run};

fn histogram(input: Input) -> Result<RecordBatch, Error> {
    let column = input
        .arg("column")
        .and_then(|c| c.as_str())
        .ok_or("argument 'column' (a column name) is required")?
        .to_string();
    let edges: Vec<f64> = input
        .arg("edges")
        .and_then(|e| e.as_array())
        .ok_or("argument 'edges' (an increasing list of numbers) is required")?
        .iter()
        .map(|e| e.as_f64().ok_or("'edges' must hold numbers only"))
        .collect::<Result<_, _>>()?;
    if edges.len() < 2 || edges.windows(2).any(|w| w[0] >= w[1] || !w[1].is_finite()) {
        return Err("'edges' must be at least two increasing finite numbers".into());
    }
    let mut counts = vec![0i64; edges.len() - 1];
    for batch in &input.batches {
        for v in numeric_values(batch, &column)?.into_iter().flatten() {
            // The bin whose lower edge is the last one ≤ v.
            let upper = edges.partition_point(|e| *e <= v);
            if upper >= 1 && upper < edges.len() {
                counts[upper - 1] += 1;
            }
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("bin_lower", DataType::Float64, false),
        Field::new("bin_upper", DataType::Float64, false),
        Field::new("n", DataType::Int64, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Float64Array::from(edges[..edges.len() - 1].to_vec())),
            Arc::new(Float64Array::from(edges[1..].to_vec())),
            Arc::new(Int64Array::from(counts)),
        ],
    )?)
}

fn main() -> ExitCode {
    run(histogram)
}
