//! `EXPLAIN FEDERATED <query>`: per station, the fragment SQL it would run and what would
//! leave it; then the hub's merge plan. Nothing is sent to any station.

use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::Result;
use crate::split::FederatedPlan;

/// The prefix that selects a federated explanation (case-insensitive).
pub const EXPLAIN_FEDERATED: &str = "explain federated";

/// If `sql` starts with `EXPLAIN FEDERATED`, the query after it.
pub fn strip_explain_federated(sql: &str) -> Option<&str> {
    let trimmed = sql.trim_start();
    let mut words = trimmed.split_whitespace();
    let (Some(a), Some(b)) = (words.next(), words.next()) else {
        return None;
    };
    if !a.eq_ignore_ascii_case("explain") || !b.eq_ignore_ascii_case("federated") {
        return None;
    }
    let after_explain = &trimmed[a.len()..];
    let at = after_explain.find(b)? + b.len();
    Some(after_explain[at..].trim())
}

/// The schema of an `EXPLAIN FEDERATED` answer.
pub fn explain_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("location", DataType::Utf8, false),
        Field::new("step", DataType::Utf8, false),
        Field::new("plan", DataType::Utf8, false),
        Field::new("releases", DataType::Utf8, false),
    ]))
}

/// Renders a federated plan as rows of (location, step, plan, releases). `epsilon` gives,
/// per (fragment id, station), the ε a DP fragment would charge there, as the station
/// answered a check.
pub fn explain_batch(
    plan: &FederatedPlan,
    epsilon: &std::collections::HashMap<(usize, String), f64>,
) -> Result<RecordBatch> {
    let mut location = Vec::new();
    let mut step = Vec::new();
    let mut text = Vec::new();
    let mut releases = Vec::new();
    for f in &plan.fragments {
        let kind = f.kind.name();
        if !f.members.is_empty() {
            // A vertical table: each member sends pseudonymized columns, the hub joins them
            // and runs the fragment over the joined rows.
            for (i, m) in f.members.iter().enumerate() {
                location.push(m.station.clone());
                step.push(format!(
                    "fragment #{}.{} (pseudonymized rows of {} for the hub join)",
                    f.id,
                    i + 1,
                    f.table
                ));
                text.push(m.sql.clone());
                releases.push(if m.columns.is_empty() {
                    "the keyed pseudonyms (HMAC-SHA256) of its rows, to the hub only".to_string()
                } else {
                    format!(
                        "the keyed pseudonyms (HMAC-SHA256) of its rows with their values of \
                         ({}), to the hub only, for this query only",
                        m.columns.join(", ")
                    )
                });
            }
            location.push("hub".to_string());
            step.push(format!(
                "fragment #{} (join of {}, then {kind})",
                f.id, f.table
            ));
            let stations: Vec<&str> = f.members.iter().map(|m| m.station.as_str()).collect();
            text.push(format!(
                "inner join of [{}] on the pseudonyms, then: {}",
                stations.join(", "),
                f.sql
            ));
            releases.push(f.releases());
            continue;
        }
        for s in &f.stations {
            location.push(s.clone());
            step.push(format!("fragment #{} ({kind} of {})", f.id, f.table));
            text.push(f.sql.clone());
            releases.push(match epsilon.get(&(f.id, s.clone())) {
                Some(e) => format!("{}; ε = {e} charged at this station", f.releases()),
                None => f.releases(),
            });
        }
    }
    location.push("hub".to_string());
    step.push(if plan.fragments.is_empty() {
        "local plan (no federated table)".to_string()
    } else {
        "merge".to_string()
    });
    text.push(plan.plan.display_indent().to_string());
    releases.push("the query result, to the researcher".to_string());
    explain_rows(location, step, text, releases)
}

/// An `EXPLAIN FEDERATED` answer from its four columns (one entry per row in each).
pub fn explain_rows(
    location: Vec<String>,
    step: Vec<String>,
    plan: Vec<String>,
    releases: Vec<String>,
) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        explain_schema(),
        vec![
            Arc::new(StringArray::from(location)),
            Arc::new(StringArray::from(step)),
            Arc::new(StringArray::from(plan)),
            Arc::new(StringArray::from(releases)),
        ],
    )
    .map_err(datafusion::error::DataFusionError::from)?)
}

#[cfg(test)]
mod tests {
    use super::strip_explain_federated;

    #[test]
    fn recognises_the_prefix_in_any_case_and_spacing() {
        assert_eq!(
            strip_explain_federated("  Explain\n  FEDERATED select 1"),
            Some("select 1")
        );
        assert_eq!(strip_explain_federated("explain select 1"), None);
        assert_eq!(strip_explain_federated("explain"), None);
        assert_eq!(strip_explain_federated("select 'explain federated'"), None);
    }
}
