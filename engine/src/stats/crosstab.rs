//! `crosstab(table, row_column, column_column [, filter])`: pooled cell counts with the
//! stations' thresholds, and Pearson's chi-square test of independence.
//!
//! Each station counts its cells and withholds those below its k; the hub adds the cells
//! up and withholds merged cells below the largest k again. A cell missing from every
//! station is 0 only if no threshold applies (k = 1); otherwise it is reported as
//! suppressed (NULL), because "fewer than k" and "none" cannot be told apart — and the
//! chi-square test is then not computed, since it would need those cells.

use std::sync::Arc;

use arrow::array::{BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{Result, ScalarValue};

use super::{Rounds, Select, Source, batch, chi2_p, ident, sort_levels, value_text, with_rows};

#[derive(Debug, Clone)]
pub(crate) struct CrosstabJob {
    pub source: Source,
    row: String,
    column: String,
}

pub(crate) fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("row_level", DataType::Utf8, true),
        Field::new("col_level", DataType::Utf8, true),
        Field::new("count", DataType::Int64, true),
        Field::new("suppressed", DataType::Boolean, false),
        Field::new("chi_square", DataType::Float64, true),
        Field::new("df", DataType::Int64, true),
        Field::new("p_value", DataType::Float64, true),
    ]))
}

impl CrosstabJob {
    pub fn new(source: Source, row: &str, column: &str) -> Result<Self> {
        source.column_type(row)?;
        source.column_type(column)?;
        if row == column {
            return datafusion::common::plan_err!("crosstab: the two columns must differ");
        }
        Ok(Self {
            source,
            row: row.to_string(),
            column: column.to_string(),
        })
    }

    pub async fn run(&self, rounds: &Rounds) -> Result<RecordBatch> {
        let columns = [self.row.clone(), self.column.clone()];
        let fields = vec![
            Field::new("r", self.source.column_type(&self.row)?, true),
            Field::new("c", self.source.column_type(&self.column)?, true),
            Field::new("n", DataType::Int64, false),
        ];
        let select = Select {
            items: vec![
                (ident(&self.row), "r".to_string()),
                (ident(&self.column), "c".to_string()),
                ("count(*)".to_string(), "n".to_string()),
            ],
            filters: self.source.filters(columns.iter()),
            group_by: vec![ident(&self.row), ident(&self.column)],
        };
        let answers = rounds.run(select, with_rows(fields)).await?;
        let mut cells: Vec<((ScalarValue, ScalarValue), i64)> = Vec::new();
        for b in answers.iter().flatten() {
            let n = b.column(2).as_any().downcast_ref::<Int64Array>();
            for i in 0..b.num_rows() {
                let key = (
                    ScalarValue::try_from_array(b.column(0), i)?,
                    ScalarValue::try_from_array(b.column(1), i)?,
                );
                let count = n.map_or(0, |a| a.value(i));
                match cells.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, c)) => *c += count,
                    None => cells.push((key, count)),
                }
            }
        }
        let k = self
            .source
            .table
            .min_group_size(&self.source.touched(columns.iter())) as i64;
        let mut rows: Vec<ScalarValue> = cells.iter().map(|((r, _), _)| r.clone()).collect();
        let mut cols: Vec<ScalarValue> = cells.iter().map(|((_, c), _)| c.clone()).collect();
        sort_levels(&mut rows);
        sort_levels(&mut cols);
        let count_of = |r: &ScalarValue, c: &ScalarValue| -> Option<i64> {
            let n = cells
                .iter()
                .find(|((a, b), _)| a == r && b == c)
                .map_or(0, |(_, n)| *n);
            if n >= k {
                Some(n)
            } else if k <= 1 {
                Some(0)
            } else {
                None
            }
        };
        let (mut row_level, mut col_level, mut count, mut suppressed) =
            (vec![], vec![], vec![], vec![]);
        let mut table = vec![vec![0.0; cols.len()]; rows.len()];
        let mut complete = true;
        for (i, r) in rows.iter().enumerate() {
            for (j, c) in cols.iter().enumerate() {
                let n = count_of(r, c);
                row_level.push(Some(value_text(r)));
                col_level.push(Some(value_text(c)));
                count.push(n);
                suppressed.push(n.is_none());
                match n {
                    Some(n) => table[i][j] = n as f64,
                    None => complete = false,
                }
            }
        }
        let total: f64 = table.iter().flatten().sum();
        let df = (rows.len().saturating_sub(1) * cols.len().saturating_sub(1)) as i64;
        let chi_square = (complete && df > 0 && total > 0.0).then(|| {
            let row_sums: Vec<f64> = table.iter().map(|r| r.iter().sum()).collect();
            let col_sums: Vec<f64> = (0..cols.len())
                .map(|j| table.iter().map(|r| r[j]).sum())
                .collect();
            let mut x = 0.0;
            for (i, r) in table.iter().enumerate() {
                for (j, observed) in r.iter().enumerate() {
                    let expected = row_sums[i] * col_sums[j] / total;
                    if expected > 0.0 {
                        x += (observed - expected).powi(2) / expected;
                    }
                }
            }
            x
        });
        let cells_len = row_level.len();
        row_level.push(None);
        col_level.push(None);
        count.push(Some(total as i64));
        suppressed.push(false);
        let mut chi = vec![None; cells_len];
        chi.push(chi_square);
        let mut dfs = vec![None; cells_len];
        dfs.push(chi_square.map(|_| df));
        let mut p = vec![None; cells_len];
        p.push(chi_square.map(|x| chi2_p(x, df as f64)));
        batch(
            schema(),
            vec![
                Arc::new(StringArray::from(row_level)),
                Arc::new(StringArray::from(col_level)),
                Arc::new(Int64Array::from(count)),
                Arc::new(BooleanArray::from(suppressed)),
                Arc::new(Float64Array::from(chi)),
                Arc::new(Int64Array::from(dfs)),
                Arc::new(Float64Array::from(p)),
            ],
        )
    }
}
