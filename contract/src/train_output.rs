//! What a train image declares about its output, so that a query with a train is planned —
//! its columns known, every fragment checked — before any container starts.
//!
//! The image carries the label [`OUTPUT_SCHEMA_LABEL`]; a station's `check` reads it and
//! answers the columns in its [`CheckAnswer`](crate::CheckAnswer), and the station refuses
//! an output that does not match at run time. The label is JSON, in one of two forms:
//!
//! ```text
//! [{"name": "bin_lower", "type": "Float64"}, {"name": "n", "type": "Int64"}]
//! {"argument": "action", "schemas": {"rows": [{"name": "i", "type": "Int64"}], …}}
//! ```
//!
//! The second gives the columns per value of one argument of the call. Types are Arrow's
//! names, as `arrow_schema::DataType` writes and reads them (`Int64`, `Float64`, `Utf8`,
//! `Boolean`, `Date32`, …). Every declared column is nullable.

use std::collections::BTreeMap;

use arrow_schema::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};

use crate::TRAIN_STATION_COLUMN;

/// The image label that declares a train's output columns.
pub const OUTPUT_SCHEMA_LABEL: &str = "railyard.output-schema";

/// The most columns an image may declare.
pub const MAX_OUTPUT_COLUMNS: usize = 1000;

/// How to add the label, for error messages.
pub const HOW_TO_DECLARE: &str = "an image declares its output columns with the label \
    railyard.output-schema, e.g. the Dockerfile line LABEL \
    railyard.output-schema='[{\"name\": \"n\", \"type\": \"Int64\"}]' (the same works as \
    docker import --change); see docs/trains.md";

/// One declared output column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputColumn {
    pub name: String,
    /// An Arrow type name (`Int64`, `Float64`, `Utf8`, …).
    #[serde(rename = "type")]
    pub data_type: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Label {
    Fixed(Vec<OutputColumn>),
    ByArgument {
        argument: String,
        schemas: BTreeMap<String, Vec<OutputColumn>>,
    },
}

/// The columns an image whose label reads `label` declares for a call with the arguments
/// `args` (a JSON object), checked with [`schema_of`]. The error says what is wrong, for
/// the researcher or the image's author.
pub fn declared_columns(label: &str, args: &str) -> Result<Vec<OutputColumn>, String> {
    let label: Label = serde_json::from_str(label).map_err(|_| {
        format!(
            "its {OUTPUT_SCHEMA_LABEL} label is neither a list of {{\"name\", \"type\"}} \
             columns nor {{\"argument\", \"schemas\"}}; {HOW_TO_DECLARE}"
        )
    })?;
    let columns = match label {
        Label::Fixed(columns) => columns,
        Label::ByArgument { argument, schemas } => {
            let known = schemas.keys().cloned().collect::<Vec<_>>().join(", ");
            let args: serde_json::Value = serde_json::from_str(args)
                .map_err(|e| format!("the train's arguments are not JSON ({e})"))?;
            let value = match args.get(&argument) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => {
                    return Err(format!(
                        "its output columns depend on the argument '{argument}', which the \
                         call does not give (the image declares them for: {known})"
                    ));
                }
            };
            match schemas.get(&value) {
                Some(columns) => columns.clone(),
                None => {
                    return Err(format!(
                        "it declares no output columns for the argument '{argument}' with this \
                         value (it does for: {known})"
                    ));
                }
            }
        }
    };
    schema_of(&columns)?;
    Ok(columns)
}

/// The Arrow schema of declared columns: at least one and at most [`MAX_OUTPUT_COLUMNS`],
/// unique names, none named like the hub's station column, every type an Arrow type name.
pub fn schema_of(columns: &[OutputColumn]) -> Result<Schema, String> {
    if columns.is_empty() || columns.len() > MAX_OUTPUT_COLUMNS {
        return Err(format!(
            "it declares {} output columns; a train has 1 to {MAX_OUTPUT_COLUMNS}",
            columns.len()
        ));
    }
    let mut fields = Vec::with_capacity(columns.len());
    for (i, c) in columns.iter().enumerate() {
        if c.name.is_empty() || columns[..i].iter().any(|o| o.name == c.name) {
            return Err(format!(
                "its declared output columns need unique, non-empty names ('{}' is not)",
                c.name
            ));
        }
        if c.name == TRAIN_STATION_COLUMN {
            return Err(format!(
                "it declares an output column named '{TRAIN_STATION_COLUMN}', which the hub \
                 adds itself"
            ));
        }
        let data_type: DataType = c.data_type.parse().map_err(|_| {
            format!(
                "its declared column '{}' has the type '{}', which is not an Arrow type name \
                 (Int64, Float64, Utf8, Boolean, Date32, …)",
                c.name, c.data_type
            )
        })?;
        fields.push(Field::new(&c.name, data_type, true));
    }
    Ok(Schema::new(fields))
}

/// Whether an output's columns are the declared ones: the same names, in order, of the
/// same types (nullability aside).
pub fn matches(declared: &Schema, output: &Schema) -> bool {
    declared.fields().len() == output.fields().len()
        && declared
            .fields()
            .iter()
            .zip(output.fields())
            .all(|(d, o)| d.name() == o.name() && d.data_type() == o.data_type())
}

/// The columns of `schema` as `name type, …`, for messages.
pub fn describe(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_label_declares_its_columns() {
        let label = r#"[{"name": "bin_lower", "type": "Float64"}, {"name": "n", "type": "Int64"}]"#;
        let columns = declared_columns(label, "{}").unwrap();
        let schema = schema_of(&columns).unwrap();
        assert_eq!(describe(&schema), "bin_lower Float64, n Int64");
        assert!(schema.fields().iter().all(|f| f.is_nullable()));
    }

    #[test]
    fn a_label_by_argument_picks_the_call_s_columns() {
        let label = r#"{"argument": "action", "schemas": {
            "rows": [{"name": "i", "type": "Int64"}],
            "inspect": [{"name": "uid", "type": "Int64"}, {"name": "cols", "type": "Utf8"}]}}"#;
        let rows = declared_columns(label, r#"{"action": "rows", "n": 3}"#).unwrap();
        assert_eq!(rows[0].name, "i");
        let inspect = declared_columns(label, r#"{"action": "inspect"}"#).unwrap();
        assert_eq!(inspect.len(), 2);
        let missing = declared_columns(label, "{}").unwrap_err();
        assert!(missing.contains("argument 'action'") && missing.contains("inspect, rows"));
        let unknown = declared_columns(label, r#"{"action": "nope"}"#).unwrap_err();
        assert!(unknown.contains("declares no output columns"), "{unknown}");
        assert!(!unknown.contains("nope"), "{unknown}");
    }

    #[test]
    fn bad_labels_say_what_is_wrong_and_how_to_declare() {
        for (label, expected) in [
            ("not json", "railyard.output-schema"),
            (r#"{"n": "Int64"}"#, "LABEL"),
            ("[]", "1 to 1000"),
            (
                r#"[{"name": "n", "type": "Int64"}, {"name": "n", "type": "Utf8"}]"#,
                "unique",
            ),
            (r#"[{"name": "station", "type": "Utf8"}]"#, "adds itself"),
            (
                r#"[{"name": "n", "type": "Integer"}]"#,
                "not an Arrow type name",
            ),
            (
                r#"[{"name": "n", "type": "Int64", "extra": 1}]"#,
                "railyard.output-schema",
            ),
        ] {
            let err = declared_columns(label, "{}").unwrap_err();
            assert!(err.contains(expected), "{label}: {err}");
        }
    }

    #[test]
    fn an_output_matches_by_name_and_type_not_nullability() {
        let declared =
            schema_of(&declared_columns(r#"[{"name": "n", "type": "Int64"}]"#, "{}").unwrap())
                .unwrap();
        let same = Schema::new(vec![Field::new("n", DataType::Int64, false)]);
        let renamed = Schema::new(vec![Field::new("m", DataType::Int64, true)]);
        let retyped = Schema::new(vec![Field::new("n", DataType::Float64, true)]);
        assert!(matches(&declared, &same));
        assert!(!matches(&declared, &renamed));
        assert!(!matches(&declared, &retyped));
    }
}
