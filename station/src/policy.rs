//! A station's disclosure policy: who may learn what from its tables.
//!
//! The policy is a TOML file owned by the station (see `docs/policy.md` for every key):
//!
//! ```toml
//! min_group_size = 5            # k: any released group must count >= k rows here
//! [tables.lung]
//! min_group_size = 10           # per-table override
//! [tables.lung.columns]
//! time = "public"               # public | aggregate | dp | join_key | hidden
//! patient_id = "hidden"
//! ```
//!
//! With no file at all a station uses [`Policy::default`]: every column `aggregate`, k = 5,
//! so nothing row-level leaves and every small group is suppressed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use arrow::datatypes::Schema;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Default minimum group size (vantage6 uses 5, DataSHIELD 3, SCQL 4).
pub const DEFAULT_MIN_GROUP_SIZE: u64 = 5;
/// Default cap on the length of a string literal in a fragment.
pub const DEFAULT_MAX_STRING_LITERAL: usize = 256;
/// Default minimum rows a station contributes to a statistical model (DataSHIELD's
/// `nfilter.glm` uses the same idea).
pub const DEFAULT_MODEL_MIN_ROWS: u64 = 10;
/// Default bin width of released survival times, in the time column's unit (a week when
/// times are days).
pub const DEFAULT_SURVIVAL_TIME_RESOLUTION: f64 = 7.0;

/// How openly a column may be used, from most to least open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Row-level values may leave the station.
    Public,
    /// Only inside disclosure-safe aggregates over groups of at least k rows.
    Aggregate,
    /// Only through differentially private aggregates.
    Dp,
    /// Only as a keyed pseudonym, for linking vertically partitioned tables.
    JoinKey,
    /// Never referenced by any query.
    Hidden,
}

impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Visibility::Public => "public",
            Visibility::Aggregate => "aggregate",
            Visibility::Dp => "dp",
            Visibility::JoinKey => "join_key",
            Visibility::Hidden => "hidden",
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    min_group_size: Option<Spanned<u64>>,
    default_visibility: Option<Visibility>,
    max_string_literal: Option<Spanned<usize>>,
    model_min_rows: Option<Spanned<u64>>,
    survival_time_resolution: Option<Spanned<f64>>,
    allow_vertical: Option<bool>,
    #[serde(default)]
    tables: BTreeMap<Spanned<String>, TableFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    min_group_size: Option<Spanned<u64>>,
    default_visibility: Option<Visibility>,
    model_min_rows: Option<Spanned<u64>>,
    survival_time_resolution: Option<Spanned<f64>>,
    allow_vertical: Option<bool>,
    #[serde(default)]
    columns: BTreeMap<Spanned<String>, Visibility>,
}

/// The policy of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct TablePolicy {
    pub min_group_size: Option<u64>,
    pub default_visibility: Option<Visibility>,
    pub model_min_rows: Option<u64>,
    pub survival_time_resolution: Option<f64>,
    pub allow_vertical: Option<bool>,
    /// The table is the hub's join of several stations' rows (never set by a policy file):
    /// its row count is itself a disclosure, so only aggregates leave it and k applies even
    /// to one that names no column.
    pub joined: bool,
    /// Column name → (visibility, line in the policy file).
    pub columns: BTreeMap<String, (Visibility, usize)>,
    /// Line of the table's section in the policy file.
    pub line: usize,
}

/// A station's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min_group_size: u64,
    pub default_visibility: Visibility,
    pub max_string_literal: usize,
    /// Fewest complete rows a station contributes to a model (GLM, Cox, Kaplan–Meier).
    pub model_min_rows: u64,
    /// Survival times are floored to multiples of this before release, with k applied per
    /// released time; 0 releases exact times (and per-time counts below k).
    pub survival_time_resolution: f64,
    /// Whether `aggregate` columns may leave row by row, keyed by pseudonyms of the
    /// `join_key` column, for a hub that joins them with other stations' columns of the same
    /// patients (vertical partitioning). `None`: not set in the file (off).
    pub allow_vertical: Option<bool>,
    pub tables: BTreeMap<String, TablePolicy>,
    /// Where the policy came from (a path, or "default").
    pub source: String,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_group_size: DEFAULT_MIN_GROUP_SIZE,
            default_visibility: Visibility::Aggregate,
            max_string_literal: DEFAULT_MAX_STRING_LITERAL,
            model_min_rows: DEFAULT_MODEL_MIN_ROWS,
            survival_time_resolution: DEFAULT_SURVIVAL_TIME_RESOLUTION,
            allow_vertical: None,
            tables: BTreeMap::new(),
            source: "default".to_string(),
        }
    }
}

/// A policy file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {origin}: {message}")]
pub struct PolicyError {
    /// The policy file (or "default").
    pub origin: String,
    pub message: String,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            origin: source.clone(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::parse(&text, &source)
    }

    /// Parses and validates policy text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, PolicyError> {
        let error = |message: String| PolicyError {
            origin: source.to_string(),
            message,
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!("line {}: ", line_of(text, s.start)))
                .unwrap_or_default();
            error(format!("{at}{}", e.message()))
        })?;
        let k = |v: &Spanned<u64>| -> Result<u64, PolicyError> {
            if *v.get_ref() == 0 {
                return Err(error(format!(
                    "line {}: min_group_size must be at least 1",
                    line_of(text, v.span().start)
                )));
            }
            Ok(*v.get_ref())
        };
        let min_rows = |v: &Spanned<u64>| -> Result<u64, PolicyError> {
            if *v.get_ref() == 0 {
                return Err(error(format!(
                    "line {}: model_min_rows must be at least 1",
                    line_of(text, v.span().start)
                )));
            }
            Ok(*v.get_ref())
        };
        let resolution = |v: &Spanned<f64>| -> Result<f64, PolicyError> {
            let r = *v.get_ref();
            if !(r.is_finite() && r >= 0.0) {
                return Err(error(format!(
                    "line {}: survival_time_resolution must be a number ≥ 0 (0 = exact times)",
                    line_of(text, v.span().start)
                )));
            }
            Ok(r)
        };
        let mut policy = Policy {
            source: source.to_string(),
            ..Policy::default()
        };
        if let Some(v) = &file.min_group_size {
            policy.min_group_size = k(v)?;
        }
        if let Some(v) = file.default_visibility {
            policy.default_visibility = v;
        }
        if let Some(v) = &file.max_string_literal {
            if *v.get_ref() == 0 {
                return Err(error(format!(
                    "line {}: max_string_literal must be at least 1",
                    line_of(text, v.span().start)
                )));
            }
            policy.max_string_literal = *v.get_ref();
        }
        if let Some(v) = &file.model_min_rows {
            policy.model_min_rows = min_rows(v)?;
        }
        if let Some(v) = &file.survival_time_resolution {
            policy.survival_time_resolution = resolution(v)?;
        }
        policy.allow_vertical = file.allow_vertical;
        for (name, table) in file.tables {
            let min_group_size = match &table.min_group_size {
                Some(v) => Some(k(v)?),
                None => None,
            };
            let columns = table
                .columns
                .into_iter()
                .map(|(c, v)| {
                    let line = line_of(text, c.span().start);
                    (c.into_inner(), (v, line))
                })
                .collect();
            policy.tables.insert(
                name.get_ref().clone(),
                TablePolicy {
                    min_group_size,
                    default_visibility: table.default_visibility,
                    model_min_rows: table.model_min_rows.as_ref().map(min_rows).transpose()?,
                    survival_time_resolution: table
                        .survival_time_resolution
                        .as_ref()
                        .map(resolution)
                        .transpose()?,
                    allow_vertical: table.allow_vertical,
                    joined: false,
                    columns,
                    line: line_of(text, name.span().start),
                },
            );
        }
        Ok(policy)
    }

    /// Refuses a policy that names a column `table` does not have: a misspelt `hidden`
    /// column would otherwise silently fall back to the default visibility. A table has at
    /// most one `join_key` column (the one its pseudonyms are computed from).
    pub fn validate_table(&self, table: &str, schema: &Schema) -> Result<(), PolicyError> {
        let Some(t) = self.tables.get(table) else {
            return Ok(());
        };
        for (column, (_, line)) in &t.columns {
            if schema.field_with_name(column).is_err() {
                return Err(PolicyError {
                    origin: self.source.clone(),
                    message: format!("line {line}: table '{table}' has no column '{column}'"),
                });
            }
        }
        let keys: Vec<_> = schema
            .fields()
            .iter()
            .filter(|f| self.visibility(table, f.name()) == Visibility::JoinKey)
            .map(|f| f.name().as_str())
            .collect();
        if keys.len() > 1 {
            return Err(PolicyError {
                origin: self.source.clone(),
                message: format!(
                    "line {}: table '{table}' has {} join_key columns ({}); a table is linked \
                     by one",
                    t.line,
                    keys.len(),
                    keys.join(", ")
                ),
            });
        }
        Ok(())
    }

    /// Whether `table`'s `aggregate` columns may travel pseudonymized to a hub join.
    pub fn allow_vertical(&self, table: &str) -> bool {
        self.tables
            .get(table)
            .and_then(|t| t.allow_vertical)
            .or(self.allow_vertical)
            .unwrap_or(false)
    }

    /// Whether `table` is a join of other stations' rows (see [`TablePolicy::joined`]).
    pub fn joined(&self, table: &str) -> bool {
        self.tables.get(table).is_some_and(|t| t.joined)
    }

    /// The visibility of `column` of `table`.
    pub fn visibility(&self, table: &str, column: &str) -> Visibility {
        match self.tables.get(table) {
            Some(t) => t
                .columns
                .get(column)
                .map(|(v, _)| *v)
                .or(t.default_visibility)
                .unwrap_or(self.default_visibility),
            None => self.default_visibility,
        }
    }

    /// k for `table`.
    pub fn min_group_size(&self, table: &str) -> u64 {
        self.tables
            .get(table)
            .and_then(|t| t.min_group_size)
            .unwrap_or(self.min_group_size)
    }

    /// The fewest complete rows of `table` this station contributes to a model.
    pub fn model_min_rows(&self, table: &str) -> u64 {
        self.tables
            .get(table)
            .and_then(|t| t.model_min_rows)
            .unwrap_or(self.model_min_rows)
    }

    /// The bin width of released survival times of `table` (0 = exact).
    pub fn survival_time_resolution(&self, table: &str) -> f64 {
        self.tables
            .get(table)
            .and_then(|t| t.survival_time_resolution)
            .unwrap_or(self.survival_time_resolution)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_means_aggregate_only_with_k_5() {
        let p = Policy::default();
        assert_eq!(p.visibility("lung", "age"), Visibility::Aggregate);
        assert_eq!(p.min_group_size("lung"), 5);
    }

    #[test]
    fn the_issue_example_parses() {
        let p = Policy::parse(
            "min_group_size = 5\n[tables.lung]\nmin_group_size = 10\n[tables.lung.columns]\n\
             time = \"public\"\npatient_id = \"hidden\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(p.min_group_size("lung"), 10);
        assert_eq!(p.min_group_size("other"), 5);
        assert_eq!(p.visibility("lung", "time"), Visibility::Public);
        assert_eq!(p.visibility("lung", "patient_id"), Visibility::Hidden);
        assert_eq!(p.visibility("lung", "age"), Visibility::Aggregate);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_their_line() {
        let err = Policy::parse("min_group_size = 5\nmin_grup_size = 3\n", "p.toml").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("min_grup_size"), "{err}");

        let err = Policy::parse(
            "[tables.lung.columns]\nage = \"aggregate\"\ntime = \"publik\"\n",
            "p.toml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        assert!(err.to_string().contains("publik"), "{err}");

        let err = Policy::parse("\n\nmin_group_size = 0\n", "p.toml").unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");

        let err = Policy::parse("[tables.lung]\nminimum = 3\n", "p.toml").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn a_misspelt_column_is_refused_with_its_line() {
        let p =
            Policy::parse("[tables.lung.columns]\npatinet_id = \"hidden\"\n", "p.toml").unwrap();
        let schema = Schema::new(vec![arrow::datatypes::Field::new(
            "patient_id",
            arrow::datatypes::DataType::Int64,
            false,
        )]);
        let err = p.validate_table("lung", &schema).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("patinet_id"),
            "{err}"
        );
        assert!(p.validate_table("other", &schema).is_ok());
    }

    #[test]
    fn model_and_survival_settings_default_validate_and_override_per_table() {
        let p = Policy::default();
        assert_eq!(p.model_min_rows("lung"), DEFAULT_MODEL_MIN_ROWS);
        assert_eq!(p.survival_time_resolution("lung"), 7.0);
        let p = Policy::parse(
            "model_min_rows = 20\nsurvival_time_resolution = 30.5\n\
             [tables.lung]\nsurvival_time_resolution = 0\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.model_min_rows("lung"), 20);
        assert_eq!(p.survival_time_resolution("lung"), 0.0);
        assert_eq!(p.survival_time_resolution("other"), 30.5);
        for (text, line) in [
            ("model_min_rows = 0", 1),
            ("\nsurvival_time_resolution = -1.0", 2),
            ("[tables.t]\nsurvival_time_resolution = nan", 2),
        ] {
            let err = Policy::parse(text, "p.toml").unwrap_err().to_string();
            assert!(err.contains(&format!("line {line}")), "{text}: {err}");
        }
    }

    #[test]
    fn table_defaults_sit_between_columns_and_the_file_default() {
        let p = Policy::parse(
            "default_visibility = \"hidden\"\n[tables.t]\ndefault_visibility = \"public\"\n\
             [tables.t.columns]\nx = \"aggregate\"\n",
            "p.toml",
        )
        .unwrap();
        assert_eq!(p.visibility("t", "x"), Visibility::Aggregate);
        assert_eq!(p.visibility("t", "y"), Visibility::Public);
        assert_eq!(p.visibility("u", "y"), Visibility::Hidden);
    }
}
