//! Fragment SQL text: what a station receives and re-plans itself.
//!
//! Expressions are rendered by DataFusion's unparser. Two adjustments keep the station's
//! re-planned types identical to the hub's: columns lose their qualifier (a fragment reads
//! exactly one table), and literals whose SQL spelling would re-parse as another type
//! (`1.00` parses as a float, not `DECIMAL(20,2)`; `5` as `BIGINT`, not `INT`) are wrapped in
//! an explicit `CAST`.

use arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue};
use datafusion::logical_expr::{Cast, Expr};
use datafusion::sql::unparser::Unparser;

use crate::error::{Error, Result};

/// Renders one expression over the fragment's table.
pub fn expr_sql(expr: &Expr) -> Result<String> {
    // DataFusion's unparser writes `a SIMILAR TO p` as `a LIKE p`, which matches other rows:
    // a federated answer would silently differ from the pooled one.
    if expr.exists(|e| Ok(matches!(e, Expr::SimilarTo(_))))? {
        return Err(Error::NotSupported(
            "SIMILAR TO in a federated query (write the pattern with LIKE, or as a regular \
             expression with ~)"
                .to_string(),
        ));
    }
    let prepared = expr
        .clone()
        .transform_up(|e| {
            Ok(match e {
                Expr::Column(c) => Transformed::yes(Expr::Column(Column::new_unqualified(c.name))),
                Expr::Literal(value, _) if needs_cast(&value) => {
                    let data_type = value.data_type();
                    Transformed::yes(Expr::Cast(Cast::new(
                        Box::new(Expr::Literal(spelling(&value), None)),
                        data_type,
                    )))
                }
                other => Transformed::no(other),
            })
        })?
        .data;
    let ast = Unparser::default().expr_to_sql(&prepared).map_err(|e| {
        Error::NotSupported(format!(
            "the expression {expr} cannot be written as fragment SQL ({e})"
        ))
    })?;
    Ok(ast.to_string())
}

/// The literal the SQL text carries before its `CAST`: the widest type of the same family
/// (so `CAST(2012 AS INTEGER)` reads naturally), or the exact text for decimals.
fn spelling(value: &ScalarValue) -> ScalarValue {
    if value.is_null() {
        return ScalarValue::Null;
    }
    match value {
        ScalarValue::Int8(Some(v)) => ScalarValue::Int64(Some(*v as i64)),
        ScalarValue::Int16(Some(v)) => ScalarValue::Int64(Some(*v as i64)),
        ScalarValue::Int32(Some(v)) => ScalarValue::Int64(Some(*v as i64)),
        ScalarValue::UInt8(Some(v)) => ScalarValue::Int64(Some(*v as i64)),
        ScalarValue::UInt16(Some(v)) => ScalarValue::Int64(Some(*v as i64)),
        ScalarValue::UInt32(Some(v)) => ScalarValue::Int64(Some(*v as i64)),
        ScalarValue::UInt64(Some(v)) if i64::try_from(*v).is_ok() => {
            ScalarValue::Int64(Some(*v as i64))
        }
        ScalarValue::Float32(Some(v)) => ScalarValue::Float64(Some(*v as f64)),
        other => ScalarValue::Utf8(Some(other.to_string())),
    }
}

/// Literals that the SQL parser would read back as a different type.
fn needs_cast(value: &ScalarValue) -> bool {
    if value.is_null() {
        return !matches!(value.data_type(), DataType::Null);
    }
    matches!(
        value.data_type(),
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Float16
            | DataType::Float32
            | DataType::Decimal32(_, _)
            | DataType::Decimal64(_, _)
            | DataType::Decimal128(_, _)
            | DataType::Decimal256(_, _)
    )
}

/// A float as SQL text that parses back to exactly the same value.
pub fn float_sql(v: f64) -> String {
    let text = format!("{v:?}");
    // `{:?}` writes `1e-10`; SQL reads that as a float too, but `1.0e-10` keeps it a float
    // literal for every dialect.
    if text.contains('e') && !text.contains('.') {
        text.replacen('e', ".0e", 1)
    } else {
        text
    }
}

/// A level value as a bare SQL literal (for `column = literal` level indicators, which the
/// station reads as a literal, not as a cast).
pub fn value_sql(v: &ScalarValue) -> Result<String> {
    Ok(match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => {
            format!("'{}'", s.replace('\'', "''"))
        }
        ScalarValue::Boolean(Some(b)) => b.to_string(),
        ScalarValue::Float32(Some(f)) => float_sql(f64::from(*f)),
        ScalarValue::Float64(Some(f)) => float_sql(*f),
        v if v.data_type().is_integer() && !v.is_null() => v.to_string(),
        other => {
            return Err(Error::NotSupported(format!(
                "levels of type {} (use an integer, text or boolean column)",
                other.data_type()
            )));
        }
    })
}

pub use railyard_contract::quote_ident;

/// The parts of one fragment's `SELECT`.
pub struct SelectSql<'a> {
    /// The FROM clause: a quoted table name, or a derived table with its alias.
    pub table: &'a str,
    /// Output expressions and their (positional) names.
    pub items: Vec<(String, String)>,
    pub filters: Vec<String>,
    pub group_by: Vec<String>,
    pub limit: Option<usize>,
}

impl SelectSql<'_> {
    pub fn render(&self) -> String {
        let items = self
            .items
            .iter()
            .map(|(e, name)| format!("{e} AS {}", quote_ident(name)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut sql = format!("SELECT {items} FROM {}", self.table);
        match self.filters.as_slice() {
            [] => {}
            [only] => sql.push_str(&format!(" WHERE {only}")),
            many => {
                let preds = many
                    .iter()
                    .map(|f| format!("({f})"))
                    .collect::<Vec<_>>()
                    .join(" AND ");
                sql.push_str(&format!(" WHERE {preds}"));
            }
        }
        if !self.group_by.is_empty() {
            sql.push_str(&format!(" GROUP BY {}", self.group_by.join(", ")));
        }
        if let Some(n) = self.limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        sql
    }
}
