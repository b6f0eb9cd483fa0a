//! `SET railyard.epsilon`: the ε a researcher chooses for the DP aggregates of the queries
//! that follow.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::sql::parser::Statement as DfStatement;

use super::Planned;
use crate::error::{Error, Result};

/// The setting name researchers use for the ε of their queries.
pub const EPSILON_SETTING: &str = "railyard.epsilon";

/// `SET railyard.epsilon = x` (`Some(Some(x))`) or `SET railyard.epsilon TO DEFAULT`
/// (`Some(None)`); `None` for any other statement.
pub(super) fn epsilon_setting(statement: &DfStatement) -> Result<Option<Option<f64>>> {
    use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Set, Statement, Value};
    let DfStatement::Statement(s) = statement else {
        return Ok(None);
    };
    let Statement::Set(Set::SingleAssignment {
        variable, values, ..
    }) = s.as_ref()
    else {
        return Ok(None);
    };
    if !variable.to_string().eq_ignore_ascii_case(EPSILON_SETTING) {
        return Ok(None);
    }
    let bad = || {
        Error::BadRequest(format!(
            "{EPSILON_SETTING} is a number above 0 (the ε of each following query, at each \
             station), or DEFAULT for each station's own default"
        ))
    };
    let value = match values.as_slice() {
        [SqlExpr::Identifier(i)] if i.value.eq_ignore_ascii_case("default") => {
            return Ok(Some(None));
        }
        [SqlExpr::Value(v)] => match &v.value {
            Value::Number(n, _) => n.parse::<f64>().map_err(|_| bad())?,
            Value::SingleQuotedString(n) => n.trim().parse::<f64>().map_err(|_| bad())?,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(bad());
    }
    Ok(Some(Some(value)))
}

/// The answer to `SET railyard.epsilon`: the setting and its value (NULL: station defaults).
pub(super) fn epsilon_answer(setting: Option<f64>) -> Planned {
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("setting", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
    ]));
    // Two columns of one row each always make a batch.
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from(vec![EPSILON_SETTING])),
            Arc::new(Float64Array::from(vec![setting])),
        ],
    )
    .expect("the SET answer is well-formed");
    Planned::Batches(schema, vec![batch])
}
