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
//! [dp]                          # differential privacy (off without this section)
//! budget = 10.0                 # total ε per (researcher, collaboration, table)
//! [tables.lung.dp]
//! age = { lower = 0, upper = 120 }   # clamping bounds of dp_sum / dp_avg
//! sex = { keys = [1, 2] }            # the public groups of a DP GROUP BY
//! ```
//!
//! With no file at all a station uses [`Policy::default`]: every column `aggregate`, k = 5,
//! so nothing row-level leaves and every small group is suppressed.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::datatypes::Schema;
use serde::Deserialize;
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

pub use railyard_contract::Visibility;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    min_group_size: Option<Spanned<u64>>,
    default_visibility: Option<Visibility>,
    max_string_literal: Option<Spanned<usize>>,
    model_min_rows: Option<Spanned<u64>>,
    survival_time_resolution: Option<Spanned<f64>>,
    allow_vertical: Option<bool>,
    trains: Option<TrainsFile>,
    dp: Option<DpFile>,
    #[serde(default)]
    tables: BTreeMap<Spanned<String>, TableFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpFile {
    budget: Option<Spanned<f64>>,
    max_epsilon: Option<Spanned<f64>>,
    epsilon: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpColumnFile {
    lower: Option<f64>,
    upper: Option<f64>,
    keys: Option<Vec<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainsFile {
    #[serde(default)]
    allowed: Vec<Spanned<String>>,
    max_output_rows: Option<Spanned<u64>>,
    max_output_bytes: Option<Spanned<u64>>,
    timeout_seconds: Option<Spanned<u64>>,
    memory_mb: Option<Spanned<u64>>,
    cpus: Option<Spanned<f64>>,
    pids: Option<Spanned<u64>>,
    max_concurrent: Option<Spanned<u64>>,
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
    #[serde(default)]
    dp: BTreeMap<Spanned<String>, DpColumnFile>,
}

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
}

/// A public key value of a DP group column, as written in the policy.
#[derive(Debug, Clone, PartialEq)]
pub enum DpKey {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
}

/// What the policy declares about one column for DP aggregates.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DpColumn {
    /// Clamping bounds for `dp_sum` / `dp_avg`.
    pub bounds: Option<(f64, f64)>,
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

/// The policy of one table.
#[derive(Debug, Clone, PartialEq, Default)]
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
            default_visibility: Visibility::Aggregate,
            max_string_literal: DEFAULT_MAX_STRING_LITERAL,
            model_min_rows: DEFAULT_MODEL_MIN_ROWS,
            survival_time_resolution: DEFAULT_SURVIVAL_TIME_RESOLUTION,
            allow_vertical: None,
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

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
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
        if let Some(trains) = &file.trains {
            policy.trains = parse_trains(trains, text, source)?;
        }
        if let Some(dp) = &file.dp {
            policy.dp = Some(parse_dp(dp, text, source)?);
        }
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
            let mut dp = BTreeMap::new();
            for (c, f) in table.dp {
                let line = line_of(text, c.span().start);
                dp.insert(c.into_inner(), parse_dp_column(f, line).map_err(error)?);
            }
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
                    dp,
                    line: line_of(text, name.span().start),
                },
            );
        }
        Ok(policy)
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
        for (column, dp) in &t.dp {
            let line = dp.line;
            let refuse = |why: String| PolicyError {
                origin: self.source.clone(),
                message: format!("line {line}: {why}"),
            };
            let Ok(field) = schema.field_with_name(column) else {
                return Err(refuse(format!("table '{table}' has no column '{column}'")));
            };
            if dp.bounds.is_some() && !field.data_type().is_numeric() {
                return Err(refuse(format!(
                    "column '{column}' of table '{table}' is not numeric ({}); only numeric \
                     columns have sum bounds",
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

impl Policy {
    /// What the policy declares about `column` of `table` for DP aggregates.
    pub fn dp_column(&self, table: &str, column: &str) -> Option<&DpColumn> {
        self.tables.get(table).and_then(|t| t.dp.get(column))
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

fn parse_dp(file: &DpFile, text: &str, source: &str) -> Result<DpPolicy, PolicyError> {
    let positive = |v: &Option<Spanned<f64>>, name: &str, default: f64| match v {
        Some(v) if !(v.get_ref().is_finite() && *v.get_ref() > 0.0) => Err(PolicyError {
            origin: source.to_string(),
            message: format!(
                "line {}: dp.{name} must be a number > 0",
                line_of(text, v.span().start)
            ),
        }),
        Some(v) => Ok(*v.get_ref()),
        None => Ok(default),
    };
    let dp = DpPolicy {
        budget: positive(&file.budget, "budget", DEFAULT_DP_BUDGET)?,
        max_epsilon: positive(&file.max_epsilon, "max_epsilon", DEFAULT_DP_MAX_EPSILON)?,
        epsilon: positive(&file.epsilon, "epsilon", DEFAULT_DP_EPSILON)?,
    };
    let at = |v: &Option<Spanned<f64>>| v.as_ref().map_or(1, |v| line_of(text, v.span().start));
    if dp.epsilon > dp.max_epsilon {
        return Err(PolicyError {
            origin: source.to_string(),
            message: format!(
                "line {}: dp.epsilon (the default ε of a query) is above dp.max_epsilon",
                at(&file.epsilon).max(at(&file.max_epsilon))
            ),
        });
    }
    if dp.max_epsilon > dp.budget {
        return Err(PolicyError {
            origin: source.to_string(),
            message: format!(
                "line {}: dp.max_epsilon is above dp.budget",
                at(&file.max_epsilon).max(at(&file.budget))
            ),
        });
    }
    Ok(dp)
}

fn parse_dp_column(file: DpColumnFile, line: usize) -> Result<DpColumn, String> {
    let bounds = match (file.lower, file.upper) {
        (None, None) => None,
        (Some(l), Some(u)) if l.is_finite() && u.is_finite() && l < u => Some((l, u)),
        (Some(_), Some(_)) => {
            return Err(format!(
                "line {line}: DP bounds need finite numbers with lower < upper"
            ));
        }
        _ => return Err(format!("line {line}: DP bounds need both lower and upper")),
    };
    let keys = match file.keys {
        None => None,
        Some(values) => {
            if values.is_empty() || values.len() > MAX_DP_GROUPS {
                return Err(format!(
                    "line {line}: a column's DP keys are 1 to {MAX_DP_GROUPS} values"
                ));
            }
            let mut keys = Vec::with_capacity(values.len());
            for v in values {
                let key = match v {
                    toml::Value::Integer(i) => DpKey::Int(i),
                    toml::Value::Float(f) if f.is_finite() => DpKey::Float(f),
                    toml::Value::String(s) => DpKey::Text(s),
                    toml::Value::Boolean(b) => DpKey::Bool(b),
                    _ => {
                        return Err(format!(
                            "line {line}: DP keys are integers, finite numbers, strings or \
                             booleans"
                        ));
                    }
                };
                if keys.contains(&key) {
                    return Err(format!("line {line}: a DP key is listed twice"));
                }
                keys.push(key);
            }
            Some(keys)
        }
    };
    if bounds.is_none() && keys.is_none() {
        return Err(format!(
            "line {line}: a DP column entry needs bounds (lower, upper) or keys"
        ));
    }
    Ok(DpColumn { bounds, keys, line })
}

fn parse_trains(file: &TrainsFile, text: &str, source: &str) -> Result<TrainPolicy, PolicyError> {
    let error = |span: std::ops::Range<usize>, message: String| PolicyError {
        origin: source.to_string(),
        message: format!("line {}: {message}", line_of(text, span.start)),
    };
    let mut trains = TrainPolicy::default();
    for id in &file.allowed {
        if !is_image_id(id.get_ref()) {
            return Err(error(
                id.span(),
                "trains.allowed lists image ids: 'sha256:' and 64 hex digits, as \
                 `docker image inspect --format '{{.Id}}' IMAGE` prints them"
                    .to_string(),
            ));
        }
        trains.allowed.push(id.get_ref().clone());
    }
    let at_least = |v: &Option<Spanned<u64>>, name: &str, min: u64, default: u64| match v {
        Some(v) if *v.get_ref() < min => Err(error(
            v.span(),
            format!("trains.{name} must be at least {min}"),
        )),
        // Large enough for any machine, small enough for every conversion downstream.
        Some(v) if *v.get_ref() > 1 << 40 => {
            Err(error(v.span(), format!("trains.{name} is too large")))
        }
        Some(v) => Ok(*v.get_ref()),
        None => Ok(default),
    };
    trains.max_output_rows = at_least(
        &file.max_output_rows,
        "max_output_rows",
        1,
        trains.max_output_rows,
    )?;
    trains.max_output_bytes = at_least(
        &file.max_output_bytes,
        "max_output_bytes",
        1,
        trains.max_output_bytes,
    )?;
    trains.timeout_seconds = at_least(
        &file.timeout_seconds,
        "timeout_seconds",
        1,
        trains.timeout_seconds,
    )?;
    // Docker refuses memory limits below 6 MB.
    trains.memory_mb = at_least(&file.memory_mb, "memory_mb", 6, trains.memory_mb)?;
    trains.pids = at_least(&file.pids, "pids", 1, trains.pids)?;
    trains.max_concurrent = at_least(
        &file.max_concurrent,
        "max_concurrent",
        1,
        trains.max_concurrent,
    )?;
    if let Some(cpus) = &file.cpus {
        let c = *cpus.get_ref();
        if !(c.is_finite() && (0.01..=4096.0).contains(&c)) {
            return Err(error(
                cpus.span(),
                "trains.cpus must be a number of cores ≥ 0.01".to_string(),
            ));
        }
        trains.cpus = c;
    }
    Ok(trains)
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
    fn trains_are_off_by_default_and_their_limits_validate() {
        let p = Policy::default();
        assert!(p.trains.allowed.is_empty());
        assert_eq!(p.trains.max_output_rows, 100);
        let id = format!("sha256:{}", "ab".repeat(32));
        let p = Policy::parse(
            &format!("[trains]\nallowed = [\"{id}\"]\nmax_output_rows = 7\ncpus = 0.5\n"),
            "p.toml",
        )
        .unwrap();
        assert!(p.allows_train(&id));
        assert!(!p.allows_train(&format!("sha256:{}", "cd".repeat(32))));
        assert_eq!(p.trains.max_output_rows, 7);
        assert_eq!(p.trains.cpus, 0.5);
        assert_eq!(p.trains.timeout_seconds, DEFAULT_TRAIN_TIMEOUT_SECONDS);
        for (text, line, what) in [
            (
                "[trains]\nallowed = [\"railyard/histogram:dev\"]",
                2,
                "sha256:",
            ),
            ("[trains]\n\nmax_output_rows = 0", 3, "max_output_rows"),
            ("[trains]\nmemory_mb = 1", 2, "memory_mb"),
            ("[trains]\nmemory_mb = 9223372036854775807", 2, "memory_mb"),
            ("[trains]\nmax_concurrent = 0", 2, "max_concurrent"),
            ("[trains]\ncpus = 0.0", 2, "cpus"),
            ("[trains]\nnetwork = true", 2, "network"),
        ] {
            let err = Policy::parse(text, "p.toml").unwrap_err().to_string();
            assert!(
                err.contains(&format!("line {line}")) && err.contains(what),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn dp_is_off_by_default_and_its_settings_validate() {
        assert!(Policy::default().dp.is_none());
        let p = Policy::parse(
            "[dp]\nbudget = 3.0\n[tables.lung.dp]\nage = { lower = 0, upper = 120 }\n\
             sex = { keys = [1, 2] }\nsite = { keys = [\"a\", \"b\"] }\n",
            "p.toml",
        )
        .unwrap();
        let dp = p.dp.clone().unwrap();
        assert_eq!(
            (dp.budget, dp.max_epsilon, dp.epsilon),
            (3.0, DEFAULT_DP_MAX_EPSILON, DEFAULT_DP_EPSILON)
        );
        assert_eq!(
            p.dp_column("lung", "age").unwrap().bounds,
            Some((0.0, 120.0))
        );
        assert_eq!(
            p.dp_column("lung", "sex").unwrap().keys,
            Some(vec![DpKey::Int(1), DpKey::Int(2)])
        );
        use arrow::datatypes::{DataType, Field};
        let schema = Schema::new(vec![
            Field::new("age", DataType::Int64, true),
            Field::new("sex", DataType::Int32, true),
            Field::new("site", DataType::Utf8, true),
        ]);
        assert!(p.validate_table("lung", &schema).is_ok());
        let wrong_type = Schema::new(vec![
            Field::new("age", DataType::Int64, true),
            Field::new("sex", DataType::Utf8, true),
            Field::new("site", DataType::Int64, true),
        ]);
        let err = p
            .validate_table("lung", &wrong_type)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 6") && err.contains("site"), "{err}");
        // 1 and 1.0 are one value of an integer column.
        let p = Policy::parse("[dp]\n[tables.t.dp]\nx = { keys = [1, 1.0] }\n", "p.toml").unwrap();
        let int = Schema::new(vec![Field::new("x", DataType::Int64, true)]);
        let err = p.validate_table("t", &int).unwrap_err().to_string();
        assert!(
            err.contains("line 3") && err.contains("same value"),
            "{err}"
        );
        for (text, line, what) in [
            ("[dp]\nbudget = 0", 2, "dp.budget"),
            ("[dp]\nepsilon = 2.0", 2, "dp.epsilon"),
            ("[dp]\nbudget = 0.5", 2, "dp.max_epsilon"),
            ("[dp]\ndelta = 1e-6", 2, "delta"),
            (
                "[tables.t.dp]\nx = { lower = 5, upper = 1 }",
                2,
                "lower < upper",
            ),
            ("[tables.t.dp]\nx = { lower = 5 }", 2, "both"),
            ("[tables.t.dp]\n\nx = { keys = [] }", 3, "keys"),
            ("[tables.t.dp]\nx = { keys = [1, 1] }", 2, "twice"),
            ("[tables.t.dp]\nx = {}", 2, "needs bounds"),
        ] {
            let err = Policy::parse(text, "p.toml").unwrap_err().to_string();
            assert!(
                err.contains(&format!("line {line}")) && err.contains(what),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn dp_keys_convert_only_to_values_of_the_column_type() {
        use arrow::datatypes::DataType;
        use datafusion::common::ScalarValue;
        assert_eq!(
            DpKey::Int(2).to_scalar(&DataType::Int32),
            Some(ScalarValue::Int32(Some(2)))
        );
        assert_eq!(DpKey::Int(300).to_scalar(&DataType::Int8), None);
        assert_eq!(DpKey::Float(1.5).to_scalar(&DataType::Int64), None);
        assert_eq!(DpKey::Text("x".into()).to_scalar(&DataType::Int64), None);
        assert_eq!(
            DpKey::Int(2).to_scalar(&DataType::Float64),
            Some(ScalarValue::Float64(Some(2.0)))
        );
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
