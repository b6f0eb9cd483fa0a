//! A station's disclosure policy: who may learn what from its tables.
//!
//! The policy is a TOML file owned by the station (see `docs/policy.md` for every key):
//!
//! ```toml
//! min_group_size = 5            # k: any released group must count >= k rows here
//! threshold_noise = 3           # plus a margin of 0..=3 rows, drawn per set of rows
//! [tables.lung]
//! min_group_size = 10           # per-table override
//! [tables.lung.columns]
//! time = "public"               # public | aggregate | dp | join_key | hidden
//! patient_id = "hidden"
//! [dp]                          # differential privacy (off without this section)
//! budget = 10.0                 # total ε per (researcher, collaboration, table)
//! [tables.lung.dp]
//! age = { lower = 0, upper = 120, bins = 24 }   # dp_sum / dp_avg bounds, dp_median bins
//! sex = { keys = [1, 2] }            # the public groups of a DP GROUP BY
//! ```
//!
//! With no file at all a station uses [`Policy::default`]: every column `aggregate`, k = 5,
//! so nothing row-level leaves and every small group is suppressed.

use std::collections::BTreeMap;

use arrow::datatypes::Schema;

/// Default minimum group size (vantage6 uses 5, DataSHIELD 3, SCQL 4).
pub const DEFAULT_MIN_GROUP_SIZE: u64 = 5;
/// Default largest noisy margin over k (extra rows a released value may need, drawn per
/// set of contributing rows; see `docs/policy.md`).
pub const DEFAULT_THRESHOLD_NOISE: u64 = 3;
/// Default largest share one row may hold of a released model sum (`model_dominance`).
pub const DEFAULT_MODEL_DOMINANCE: f64 = 0.5;
/// Largest `threshold_noise` a policy may set.
pub const MAX_THRESHOLD_NOISE: u64 = 20;
/// Default number of released sets a station's query-set auditor remembers per researcher
/// before it merges the oldest into their union (`max_query_sets`).
pub const DEFAULT_MAX_QUERY_SETS: u64 = 10_000;
/// Default cap on the length of a string literal in a fragment.
pub const DEFAULT_MAX_STRING_LITERAL: usize = 256;
/// Default minimum rows a station contributes to a statistical model (DataSHIELD's
/// `nfilter.glm` uses the same idea).
pub const DEFAULT_MODEL_MIN_ROWS: u64 = 10;
/// Default bin width of released survival times, in the time column's unit (a week when
/// times are days).
pub const DEFAULT_SURVIVAL_TIME_RESOLUTION: f64 = 7.0;

pub use railyard_contract::Visibility;

mod parse;
#[cfg(test)]
mod tests;

/// Default total ε per (researcher, collaboration, table).
pub const DEFAULT_DP_BUDGET: f64 = 10.0;
/// Default cap on the ε of one query.
pub const DEFAULT_DP_MAX_EPSILON: f64 = 1.0;
/// Default ε of a query that does not choose one.
pub const DEFAULT_DP_EPSILON: f64 = 0.5;
/// Most public keys one column may declare, and most groups (key combinations) one DP
/// release may have.
pub const MAX_DP_GROUPS: usize = 10_000;

/// The station's differential privacy settings (`[dp]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DpPolicy {
    /// Total ε per (researcher, collaboration, table), over all time.
    pub budget: f64,
    /// The largest ε one query may spend on one table.
    pub max_epsilon: f64,
    /// The ε of a query that does not choose one.
    pub epsilon: f64,
    /// In a table with a privacy unit, the most rows of one patient a DP aggregate reads
    /// (the rest are left out); the noise is scaled to it, so ε protects a patient.
    pub max_rows_per_unit: u64,
}

/// Default `[dp] max_rows_per_unit`.
pub const DEFAULT_DP_MAX_ROWS_PER_UNIT: u64 = 1;

/// A public key value of a DP group column, as written in the policy.
#[derive(Debug, Clone, PartialEq)]
pub enum DpKey {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
}

/// Default number of equal-width bins over a column's bounds for `dp_quantile` /
/// `dp_median`, when the policy declares bounds but no `bins`.
pub const DEFAULT_DP_BINS: usize = 32;

/// What the policy declares about one column for DP aggregates.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DpColumn {
    /// Clamping bounds for `dp_sum` / `dp_avg`.
    pub bounds: Option<(f64, f64)>,
    /// The edges of the bins of `dp_quantile` / `dp_median` (`bins = N` over the bounds, or
    /// `bins = [e0, e1, …]`), if declared.
    pub bins: Option<Vec<f64>>,
    /// The column's public values: a DP `GROUP BY` over it releases exactly these groups.
    pub keys: Option<Vec<DpKey>>,
    /// Line in the policy file.
    pub line: usize,
}

/// Default cap on the rows of a train's output.
pub const DEFAULT_TRAIN_MAX_OUTPUT_ROWS: u64 = 100;
/// Default cap on the size of a train's output file.
pub const DEFAULT_TRAIN_MAX_OUTPUT_BYTES: u64 = 1024 * 1024;
/// Default wall-clock limit of one train run.
pub const DEFAULT_TRAIN_TIMEOUT_SECONDS: u64 = 120;
/// Default memory limit of a train's container (no swap beyond it).
pub const DEFAULT_TRAIN_MEMORY_MB: u64 = 512;
/// Default CPU limit of a train's container, in cores.
pub const DEFAULT_TRAIN_CPUS: f64 = 1.0;
/// Default limit on the processes and threads in a train's container.
pub const DEFAULT_TRAIN_PIDS: u64 = 64;
/// Default number of trains a station runs at once (more wait their turn).
pub const DEFAULT_TRAIN_MAX_CONCURRENT: u64 = 2;

/// Which containerized trains a station runs, and inside which limits (`[trains]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPolicy {
    /// Image ids (`sha256:` and 64 hex digits) the station runs; empty: no trains at all.
    pub allowed: Vec<String>,
    pub max_output_rows: u64,
    pub max_output_bytes: u64,
    pub timeout_seconds: u64,
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids: u64,
    pub max_concurrent: u64,
}

impl Default for TrainPolicy {
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            max_output_rows: DEFAULT_TRAIN_MAX_OUTPUT_ROWS,
            max_output_bytes: DEFAULT_TRAIN_MAX_OUTPUT_BYTES,
            timeout_seconds: DEFAULT_TRAIN_TIMEOUT_SECONDS,
            memory_mb: DEFAULT_TRAIN_MEMORY_MB,
            cpus: DEFAULT_TRAIN_CPUS,
            pids: DEFAULT_TRAIN_PIDS,
            max_concurrent: DEFAULT_TRAIN_MAX_CONCURRENT,
        }
    }
}

/// Whether `id` is an image id as Docker reports it: `sha256:` and 64 lowercase hex digits.
pub fn is_image_id(id: &str) -> bool {
    id.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Columns that name a patient in common health data models (OMOP CDM, most registries):
/// a table with one of them and no declared unit counts its distinct values, never less
/// protective than counting rows.
pub const DEFAULT_UNIT_COLUMNS: [&str; 2] = ["person_id", "patient_id"];

/// What one unit of disclosure is: the rules count distinct values of a column (a
/// patient), or rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivacyUnit {
    Row,
    /// A column name, with its line in the policy file.
    Column {
        name: String,
        line: usize,
    },
}

/// Where a table's privacy unit comes from (for the start-up log and `railyard.policies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitSource {
    /// `[tables.T] privacy_unit`.
    Table,
    /// The top-level `privacy_unit`.
    Policy,
    /// The table has a `person_id` or `patient_id` column and no declared unit.
    Detected,
    /// No unit applies: one row is one unit.
    Rows,
    /// A reference table (no patient data).
    Reference,
}

/// The policy of one table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TablePolicy {
    pub min_group_size: Option<u64>,
    pub default_visibility: Option<Visibility>,
    pub model_min_rows: Option<u64>,
    pub survival_time_resolution: Option<f64>,
    pub allow_vertical: Option<bool>,
    /// `[tables.T] privacy_unit`: overrides the top-level unit for this table.
    pub privacy_unit: Option<PrivacyUnit>,
    /// `[tables.T] query_set_audit`: `false` turns the query-set auditor off for this
    /// table (a weakening: differencing attacks on it are no longer noticed).
    pub query_set_audit: Option<bool>,
    /// The table is the hub's join of several stations' rows (never set by a policy file):
    /// its row count is itself a disclosure, so only aggregates leave it and k applies even
    /// to one that names no column.
    pub joined: bool,
    /// Column name → (visibility, line in the policy file).
    pub columns: BTreeMap<String, (Visibility, usize)>,
    /// Column name → its DP bounds and public keys (`[tables.T.dp]`).
    pub dp: BTreeMap<String, DpColumn>,
    /// Line of the table's section in the policy file.
    pub line: usize,
}

/// The thresholds of a join's policy (see [`Policy::for_join`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JoinLimits {
    pub min_group_size: u64,
    pub model_min_rows: u64,
    pub survival_time_resolution: f64,
}

/// A station's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min_group_size: u64,
    /// The largest margin over k a released value's contributors must clear (0 to
    /// `threshold_noise`, drawn from a keyed hash of which rows contribute); 0 makes the
    /// threshold exact, and a below-k refusal an exact oracle.
    pub threshold_noise: u64,
    pub default_visibility: Visibility,
    pub max_string_literal: usize,
    /// Fewest complete rows a station contributes to a model (GLM, Cox, Kaplan–Meier).
    pub model_min_rows: u64,
    /// The largest share one row may hold of a released model sum (X'WX, X'Wz, the
    /// deviance), against the sum of absolute contributions; 1 turns the rule off.
    pub model_dominance: f64,
    /// Survival times are floored to multiples of this before release, with k applied per
    /// released time; 0 releases exact times (and per-time counts below k).
    pub survival_time_resolution: f64,
    /// Whether `aggregate` columns may leave row by row, keyed by pseudonyms of the
    /// `join_key` column, for a hub that joins them with other stations' columns of the same
    /// patients (vertical partitioning). `None`: not set in the file (off).
    pub allow_vertical: Option<bool>,
    /// The top-level `privacy_unit`: the column that identifies a patient in every table
    /// that has it. Tables without it (and without their own) fall back to
    /// [`DEFAULT_UNIT_COLUMNS`], then to the row.
    pub privacy_unit: Option<PrivacyUnit>,
    /// Tables every station holds an identical copy of (vocabularies): public, no unit.
    /// Name → the SHA-256 (hex) of the copy's content, announced to the hub, which
    /// registers the table only when every station holds the same.
    pub reference_tables: BTreeMap<String, String>,
    /// The query-set auditor (on by default): a release whose patients differ by fewer
    /// than k (plus a noisy margin) from a set released to the same researcher before is
    /// refused (rule `differencing`).
    pub query_set_audit: bool,
    /// Sets the auditor remembers per researcher; beyond it the oldest are merged into
    /// their union (compacted, never forgotten).
    pub max_query_sets: u64,
    /// Fragments one researcher may have run per minute (0: no limit).
    pub max_fragments_per_minute: u64,
    /// Containerized trains (none allowed by default).
    pub trains: TrainPolicy,
    /// Differential privacy (off by default: no budget, no DP aggregates).
    pub dp: Option<DpPolicy>,
    pub tables: BTreeMap<String, TablePolicy>,
    /// Where the policy came from (a path, or "default").
    pub source: String,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_group_size: DEFAULT_MIN_GROUP_SIZE,
            threshold_noise: DEFAULT_THRESHOLD_NOISE,
            default_visibility: Visibility::Aggregate,
            max_string_literal: DEFAULT_MAX_STRING_LITERAL,
            model_min_rows: DEFAULT_MODEL_MIN_ROWS,
            model_dominance: DEFAULT_MODEL_DOMINANCE,
            survival_time_resolution: DEFAULT_SURVIVAL_TIME_RESOLUTION,
            allow_vertical: None,
            privacy_unit: None,
            reference_tables: Default::default(),
            query_set_audit: true,
            max_query_sets: DEFAULT_MAX_QUERY_SETS,
            max_fragments_per_minute: 0,
            trains: TrainPolicy::default(),
            dp: None,
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

impl Policy {
    /// Table `table`'s policy, resolved per column of `schema`, as a station announces it
    /// to the hub.
    pub fn announce(&self, table: &str, schema: &Schema) -> railyard_contract::TablePolicyInfo {
        railyard_contract::TablePolicyInfo {
            table: table.to_string(),
            min_group_size: self.min_group_size(table),
            model_min_rows: self.model_min_rows(table),
            survival_time_resolution: self.survival_time_resolution(table),
            allow_vertical: self.allow_vertical(table),
            privacy_unit: self.privacy_unit(table, schema).0,
            reference: self.reference_tables.get(table).cloned(),
            columns: schema
                .fields()
                .iter()
                .map(|f| (f.name().clone(), self.visibility(table, f.name())))
                .collect(),
        }
    }

    /// The policy of the hub's join of a vertical table's stations: the strictest of the
    /// members' announced policies. Every column not listed in `columns` is at most
    /// `aggregate` (joined rows never leave the hub); k, the model minimum and the survival
    /// time resolution are the largest asked for; and the table is marked joined (k applies
    /// even to an aggregate that names no column).
    pub fn for_join(
        table: &str,
        limits: JoinLimits,
        columns: BTreeMap<String, Visibility>,
    ) -> Self {
        let mut policy = Policy {
            min_group_size: limits.min_group_size,
            model_min_rows: limits.model_min_rows,
            survival_time_resolution: limits.survival_time_resolution,
            source: format!("the hub's join of '{table}' (the strictest policy of its stations)"),
            // The hub's join station keeps no state across queries (its threshold key is
            // drawn per process): no query-set memory to audit against.
            query_set_audit: false,
            ..Policy::default()
        };
        policy.tables.insert(
            table.to_string(),
            TablePolicy {
                default_visibility: Some(Visibility::Aggregate),
                allow_vertical: Some(false),
                joined: true,
                // Not from a file: no line to point at.
                columns: columns.into_iter().map(|(c, v)| (c, (v, 0))).collect(),
                ..TablePolicy::default()
            },
        );
        policy
    }

    /// Whether the station runs the train image `id`.
    pub fn allows_train(&self, id: &str) -> bool {
        self.trains.allowed.iter().any(|a| a == id)
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
        if let Some(PrivacyUnit::Column { name, line }) = &t.privacy_unit
            && schema.field_with_name(name).is_err()
        {
            return Err(PolicyError {
                origin: self.source.clone(),
                message: format!(
                    "line {line}: the privacy_unit of table '{table}' is '{name}', a column \
                     it does not have"
                ),
            });
        }
        for (column, dp) in &t.dp {
            let line = dp.line;
            let refuse = |why: String| PolicyError {
                origin: self.source.clone(),
                message: format!("line {line}: {why}"),
            };
            let Ok(field) = schema.field_with_name(column) else {
                return Err(refuse(format!("table '{table}' has no column '{column}'")));
            };
            if (dp.bounds.is_some() || dp.bins.is_some()) && !field.data_type().is_numeric() {
                return Err(refuse(format!(
                    "column '{column}' of table '{table}' is not numeric ({}); only numeric \
                     columns have sum bounds or bins",
                    field.data_type()
                )));
            }
            let mut seen = Vec::new();
            for key in dp.keys.iter().flatten() {
                let Some(value) = key.to_scalar(field.data_type()) else {
                    return Err(refuse(format!(
                        "a public key of column '{column}' of table '{table}' is not a value \
                         of its type {}",
                        field.data_type()
                    )));
                };
                if seen.contains(&value) {
                    return Err(refuse(format!(
                        "two public keys of column '{column}' of table '{table}' are the same \
                         value of its type {}",
                        field.data_type()
                    )));
                }
                seen.push(value);
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
    /// Whether the query-set auditor watches releases of `table`.
    pub fn query_set_audit(&self, table: &str) -> bool {
        self.tables
            .get(table)
            .and_then(|t| t.query_set_audit)
            .unwrap_or(self.query_set_audit)
    }

    pub fn allow_vertical(&self, table: &str) -> bool {
        self.tables
            .get(table)
            .and_then(|t| t.allow_vertical)
            .or(self.allow_vertical)
            .unwrap_or(false)
    }

    /// The column whose distinct values count as units in `table` (`None`: rows), and where
    /// that choice comes from. A declared unit the table lacks falls through to the next
    /// rule (the top-level key names a column "in every table that has it").
    pub fn privacy_unit(&self, table: &str, schema: &Schema) -> (Option<String>, UnitSource) {
        if self.reference_tables.contains_key(table) {
            return (None, UnitSource::Reference);
        }
        let t = self.tables.get(table);
        if t.is_some_and(|t| t.joined) {
            return (None, UnitSource::Rows);
        }
        match t.and_then(|t| t.privacy_unit.as_ref()) {
            Some(PrivacyUnit::Row) => return (None, UnitSource::Table),
            Some(PrivacyUnit::Column { name, .. }) => {
                return (Some(name.clone()), UnitSource::Table);
            }
            None => {}
        }
        match &self.privacy_unit {
            Some(PrivacyUnit::Row) => return (None, UnitSource::Policy),
            Some(PrivacyUnit::Column { name, .. }) if schema.field_with_name(name).is_ok() => {
                return (Some(name.clone()), UnitSource::Policy);
            }
            _ => {}
        }
        for name in DEFAULT_UNIT_COLUMNS {
            if schema.field_with_name(name).is_ok() {
                return (Some(name.to_string()), UnitSource::Detected);
            }
        }
        (None, UnitSource::Rows)
    }

    /// Whether `table` is a reference table (identical at every station, public).
    pub fn is_reference(&self, table: &str) -> bool {
        self.reference_tables.contains_key(table)
    }

    /// Whether `table` is a join of other stations' rows (see [`TablePolicy::joined`]).
    pub fn joined(&self, table: &str) -> bool {
        self.tables.get(table).is_some_and(|t| t.joined)
    }

    /// The visibility of `column` of `table`.
    pub fn visibility(&self, table: &str, column: &str) -> Visibility {
        // A reference table holds no patient data: public unless the policy says otherwise.
        let reference = self.reference_tables.contains_key(table);
        match self.tables.get(table) {
            Some(t) => t
                .columns
                .get(column)
                .map(|(v, _)| *v)
                .or(t.default_visibility)
                .unwrap_or(if reference {
                    Visibility::Public
                } else {
                    self.default_visibility
                }),
            None if reference => Visibility::Public,
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

impl Policy {
    /// What the policy declares about `column` of `table` for DP aggregates.
    pub fn dp_column(&self, table: &str, column: &str) -> Option<&DpColumn> {
        self.tables.get(table).and_then(|t| t.dp.get(column))
    }

    /// The bin edges of a DP quantile of `column`: its declared `bins`, or
    /// [`DEFAULT_DP_BINS`] equal bins over its bounds.
    pub fn dp_quantile_edges(&self, table: &str, column: &str) -> Option<Vec<f64>> {
        let c = self.dp_column(table, column)?;
        c.bins.clone().or_else(|| {
            c.bounds.map(|(l, u)| {
                railyard_udfs::dp::histogram::equal_width_edges(l, u, DEFAULT_DP_BINS)
            })
        })
    }
}

impl DpKey {
    /// The key as a value of a column of type `to`, if it is one.
    pub fn to_scalar(
        &self,
        to: &arrow::datatypes::DataType,
    ) -> Option<datafusion::common::ScalarValue> {
        use datafusion::common::ScalarValue;
        let v = match self {
            DpKey::Int(i) => ScalarValue::Int64(Some(*i)),
            DpKey::Float(f) => ScalarValue::Float64(Some(*f)),
            DpKey::Text(s) => ScalarValue::Utf8(Some(s.clone())),
            DpKey::Bool(b) => ScalarValue::Boolean(Some(*b)),
        };
        let cast = v.cast_to(to).ok()?;
        // A key that does not survive the round trip (1.5 as an integer, 300 as Int8, 'x'
        // as a number) names no value of the column.
        let back = cast.cast_to(&v.data_type()).ok()?;
        (back == v && !cast.is_null()).then_some(cast)
    }
}
