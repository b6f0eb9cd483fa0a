//! Bound parameters of prepared statements (Flight SQL `DoPut` with
//! `CommandPreparedStatementQuery`), the way DB-API, pandas and polars pass values.
//!
//! ```text
//!   prepare "… WHERE age > ? AND sex = ?"  ──▶ parameters $1, $2 (`?` numbered in order),
//!                                              their types as DataFusion infers them
//!   DoPut one row (60, 1)                   ──▶ each value cast to its parameter's type and
//!                                              written into the statement as a literal:
//!                                              "… WHERE age > 60 AND sex = 1"
//!   that text is the new statement handle   ──▶ planned, checked, audited like typed SQL
//! ```
//!
//! A parameter becomes a literal of the SQL text before anything is planned, so the hub's
//! planner, every station's check and its audit record see exactly the query that ran. The
//! literal is built as a syntax-tree node, never by pasting a value into text; quotes and
//! backslashes in text values are written as `chr(…)` (see [`text_literal`]), so a value
//! cannot change the statement's shape. The unit tests read bound statements back with
//! DataFusion and compare every value.

use std::ops::ControlFlow;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Value, visit_expressions_mut};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::error::{Error, Result};

/// The placeholders of `statement` (also inside `EXPLAIN`), numbered: `?` in order of
/// appearance, `$n` by its number. Rewrites every `?` to `$n` so that DataFusion sees one
/// parameter per position, and returns how many there are (0: none). Named placeholders,
/// a mix of `?` and `$n`, and numbers with gaps are errors.
pub fn number_placeholders(statement: &mut DfStatement) -> Result<usize> {
    let Some(inner) = query_mut(statement) else {
        return Ok(0);
    };
    let (mut questions, mut numbered) = (0usize, Vec::<usize>::new());
    let flow = visit_expressions_mut(inner, |expr| {
        let SqlExpr::Value(v) = expr else {
            return ControlFlow::Continue(());
        };
        let Value::Placeholder(p) = &mut v.value else {
            return ControlFlow::Continue(());
        };
        if p == "?" {
            questions += 1;
            *p = format!("${questions}");
            return ControlFlow::Continue(());
        }
        match p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if n >= 1 => {
                numbered.push(n);
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Break(format!(
                "the parameter '{p}' is not supported: use ? or $1, $2, … (named parameters \
                 are not)"
            )),
        }
    });
    if let ControlFlow::Break(message) = flow {
        return Err(Error::BadRequest(message));
    }
    if questions > 0 && !numbered.is_empty() {
        return Err(Error::BadRequest(
            "a statement uses either ? or $1, $2, … for its parameters, not both".to_string(),
        ));
    }
    if questions > 0 {
        return Ok(questions);
    }
    numbered.sort_unstable();
    numbered.dedup();
    let count = numbered.len();
    if numbered.last().is_some_and(|&last| last != count) {
        return Err(Error::BadRequest(format!(
            "the parameters must be numbered $1 to ${count} without gaps",
        )));
    }
    Ok(count)
}

/// `statement` (numbered by [`number_placeholders`]) with parameter `$i` replaced by the
/// literal of `values`' column `i - 1` (one row), cast to `types[i - 1]` when DataFusion
/// inferred one.
pub fn bind(
    statement: &mut DfStatement,
    count: usize,
    types: &[Option<DataType>],
    values: &RecordBatch,
) -> Result<()> {
    if values.num_rows() != 1 {
        return Err(Error::BadRequest(format!(
            "a statement is run with one row of parameter values, not {}",
            values.num_rows()
        )));
    }
    if values.num_columns() != count {
        return Err(Error::BadRequest(format!(
            "the statement has {count} parameter{}, and {} value{} were bound",
            if count == 1 { "" } else { "s" },
            values.num_columns(),
            if values.num_columns() == 1 { "" } else { "s" },
        )));
    }
    let mut literals = Vec::with_capacity(count);
    for (i, column) in values.columns().iter().enumerate() {
        let value = ScalarValue::try_from_array(column, 0)?;
        let value = match types.get(i).cloned().flatten() {
            Some(wanted) if !value.is_null() && value.data_type() != wanted => {
                value.cast_to(&wanted).map_err(|_| {
                    Error::BadRequest(format!(
                        "parameter ${}: a {} value where the statement needs {wanted}",
                        i + 1,
                        value.data_type()
                    ))
                })?
            }
            _ => value,
        };
        literals.push(literal(i + 1, &value)?);
    }
    let Some(inner) = query_mut(statement) else {
        return Ok(());
    };
    let _ = visit_expressions_mut(inner, |expr| {
        if let SqlExpr::Value(v) = expr
            && let Value::Placeholder(p) = &v.value
            && let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok())
            && let Some(literal) = literals.get(n.wrapping_sub(1))
        {
            *expr = literal.clone();
        }
        ControlFlow::<()>::Continue(())
    });
    Ok(())
}

/// The SQL statement itself, also under `EXPLAIN` (other statements have no parameters).
fn query_mut(
    statement: &mut DfStatement,
) -> Option<&mut datafusion::sql::sqlparser::ast::Statement> {
    match statement {
        DfStatement::Statement(s) => Some(s.as_mut()),
        DfStatement::Explain(e) => query_mut(&mut e.statement),
        _ => None,
    }
}

/// The SQL of a text value. Quotes and backslashes never go inside a quoted string (the
/// SQL printer doubles quotes, but the parser also reads backslash escapes, so a value
/// ending in a backslash would close the string early): each is written as `chr(39)` or
/// `chr(92)`, joined with `||`, which the hub folds back into one constant.
fn text_literal(position: usize, s: &str) -> Result<SqlExpr> {
    if !s.contains(['\'', '\\']) {
        return Ok(SqlExpr::Value(
            Value::SingleQuotedString(s.to_string()).with_empty_span(),
        ));
    }
    let mut parts = Vec::new();
    let mut run = String::new();
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            if !run.is_empty() {
                parts.push(format!("'{run}'"));
                run.clear();
            }
            parts.push(format!("chr({})", u32::from(c)));
        } else {
            run.push(c);
        }
    }
    if !run.is_empty() {
        parts.push(format!("'{run}'"));
    }
    // A lone chr() is typed as text anyway; `''` first makes the whole a text concatenation.
    parse_expr(position, &format!("('' || {})", parts.join(" || ")))
}

/// `text`, which this module wrote, as an expression.
fn parse_expr(position: usize, text: &str) -> Result<SqlExpr> {
    Parser::new(&GenericDialect {})
        .try_with_sql(text)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| Error::Internal(format!("parameter ${position}: {e}")))
}

/// The SQL literal of a parameter value.
fn literal(position: usize, value: &ScalarValue) -> Result<SqlExpr> {
    let plain = |v: Value| Ok(SqlExpr::Value(v.with_empty_span()));
    // Text of digits, signs, dots, dashes and colons only (formatted numbers, dates and
    // times), parsed as an expression.
    let parsed = |text: String| parse_expr(position, &text);
    if value.is_null() {
        return plain(Value::Null);
    }
    match value {
        ScalarValue::Boolean(Some(b)) => plain(Value::Boolean(*b)),
        ScalarValue::Int8(_)
        | ScalarValue::Int16(_)
        | ScalarValue::Int32(_)
        | ScalarValue::Int64(_)
        | ScalarValue::UInt8(_)
        | ScalarValue::UInt16(_)
        | ScalarValue::UInt32(_)
        | ScalarValue::UInt64(_) => {
            let text = value.to_string();
            if text.starts_with('-') {
                // Written as a minus applied to a number, the most negative BIGINT would not
                // fit: a negative integer is read from text.
                parsed(format!("CAST('{text}' AS BIGINT)"))
            } else {
                plain(Value::Number(text, false))
            }
        }
        ScalarValue::Float32(Some(_)) | ScalarValue::Float64(Some(_)) => {
            let Some(f) = (match value {
                ScalarValue::Float32(Some(f)) => Some(f64::from(*f)),
                ScalarValue::Float64(Some(f)) => Some(*f),
                _ => None,
            })
            .filter(|f| f.is_finite()) else {
                return Err(Error::BadRequest(format!(
                    "parameter ${position}: NaN and infinite numbers cannot be bound"
                )));
            };
            // Written with its exact digits, and read back as a double.
            parsed(format!("CAST({f:?} AS DOUBLE)"))
        }
        ScalarValue::Decimal128(..) | ScalarValue::Decimal256(..) => {
            let (DataType::Decimal128(p, s) | DataType::Decimal256(p, s)) = value.data_type()
            else {
                return Err(Error::Internal("a decimal without precision".to_string()));
            };
            parsed(format!("CAST({value} AS DECIMAL({p}, {s}))"))
        }
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => text_literal(position, s),
        ScalarValue::Date32(_) | ScalarValue::Date64(_) => {
            parsed(format!("CAST('{value}' AS DATE)"))
        }
        ScalarValue::TimestampSecond(_, None)
        | ScalarValue::TimestampMillisecond(_, None)
        | ScalarValue::TimestampMicrosecond(_, None)
        | ScalarValue::TimestampNanosecond(_, None) => {
            parsed(format!("CAST('{value}' AS TIMESTAMP)"))
        }
        other => Err(Error::BadRequest(format!(
            "parameter ${position}: values of type {} cannot be bound (numbers, text, \
             booleans, dates and timestamps without a time zone can)",
            other.data_type()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::prelude::SessionContext;

    use super::*;

    fn parse(sql: &str) -> DfStatement {
        let state = SessionContext::new().state();
        let dialect = state.config().options().sql_parser.dialect;
        state.sql_to_statement(sql, &dialect).unwrap()
    }

    fn row(columns: Vec<ArrayRef>) -> RecordBatch {
        let fields: Vec<Field> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| Field::new(format!("p{i}"), c.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    #[test]
    fn question_marks_are_numbered_in_order_and_dollars_by_number() {
        let mut s = parse("SELECT * FROM t WHERE a > ? AND b = ? OR c < ?");
        assert_eq!(number_placeholders(&mut s).unwrap(), 3);
        assert!(s.to_string().contains("a > $1 AND b = $2 OR c < $3"), "{s}");
        let mut s = parse("SELECT * FROM t WHERE a > $2 AND b = $1 AND c = $2");
        assert_eq!(number_placeholders(&mut s).unwrap(), 2);
        assert_eq!(number_placeholders(&mut parse("SELECT 1")).unwrap(), 0);
        for (sql, expected) in [
            ("SELECT * FROM t WHERE a > ? AND b = $1", "not both"),
            ("SELECT * FROM t WHERE a > $1 AND b = $3", "without gaps"),
            ("SELECT * FROM t WHERE a > $name", "not supported"),
        ] {
            let err = number_placeholders(&mut parse(sql))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{sql}: {err}");
        }
    }

    #[tokio::test]
    async fn values_become_literals_that_cannot_change_the_statement() {
        let evil = [
            "x' OR '1'='1'; DROP TABLE t; --",
            "ends in a backslash \\",
            "\\' OR 1=1 --",
            "''\\\\''",
            "$1 ? :name",
            "",
        ];
        for text in evil {
            let mut s = parse("SELECT ? AS a, ? AS b, ? AS c, ? AS d");
            let n = number_placeholders(&mut s).unwrap();
            let values = row(vec![
                Arc::new(StringArray::from(vec![text])),
                Arc::new(Int64Array::from(vec![-7])),
                Arc::new(Float64Array::from(vec![1e-7])),
                Arc::new(Int64Array::from(vec![None::<i64>])),
            ]);
            bind(&mut s, n, &[None, None, None, None], &values).unwrap();
            let sql = s.to_string();
            // Read back by DataFusion, the statement has four columns and the exact values.
            let batches = SessionContext::new()
                .sql(&sql)
                .await
                .unwrap_or_else(|e| panic!("{text:?} → {sql}: {e}"))
                .collect()
                .await
                .unwrap();
            let b = &batches[0];
            assert_eq!(b.num_columns(), 4, "{sql}");
            let a = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            assert_eq!(
                a.as_any().downcast_ref::<StringArray>().unwrap().value(0),
                text,
                "{sql}"
            );
            let c = b.column(2).as_any().downcast_ref::<Float64Array>().unwrap();
            assert_eq!(c.value(0), 1e-7, "{sql}");
            assert_eq!(b.column(3).logical_null_count(), 1, "{sql}");
            assert!(sql.contains("-7"), "{sql}");
        }
    }

    #[test]
    fn wrong_counts_rows_and_types_are_refused() {
        let mut s = parse("SELECT * FROM t WHERE a > ?");
        let n = number_placeholders(&mut s).unwrap();
        let one = row(vec![Arc::new(Int64Array::from(vec![1]))]);
        let two = row(vec![
            Arc::new(Int64Array::from(vec![1])),
            Arc::new(Int64Array::from(vec![2])),
        ]);
        let rows = row(vec![Arc::new(Int64Array::from(vec![1, 2]))]);
        let text = row(vec![Arc::new(StringArray::from(vec!["sixty"]))]);
        assert!(
            bind(&mut s.clone(), n, &[None], &two)
                .unwrap_err()
                .to_string()
                .contains("1 parameter, and 2 values")
        );
        assert!(
            bind(&mut s.clone(), n, &[None], &rows)
                .unwrap_err()
                .to_string()
                .contains("one row")
        );
        let err = bind(&mut s.clone(), n, &[Some(DataType::Int64)], &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("parameter $1: a Utf8 value where the statement needs Int64"),
            "{err}"
        );
        bind(&mut s, n, &[Some(DataType::Int64)], &one).unwrap();
        assert!(s.to_string().ends_with("a > 1"), "{s}");
    }
}
