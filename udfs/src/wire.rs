//! The hub ↔ station contract that is not a function: what a fragment ticket carries.
//!
//! A fragment travels as an Arrow Flight `DoGet` ticket whose bytes are this JSON document.
//! SQL text (not a serialized plan) keeps hub and stations on different versions compatible
//! and keeps the station's audit log readable by a privacy officer.

use serde::{Deserialize, Serialize};

/// The column a station appends to every aggregate fragment's answer: how many of its rows
/// each group counts (`count(*)`, Int64). The station suppresses groups below its k with it,
/// and the hub sums it to apply k again to merged groups.
pub const ROWS_COLUMN: &str = "__rows";

/// The column holding the keyed pseudonym of the join key in a station's answer to a
/// vertical-table fragment (`pseudonym(key) AS __pseudonym`).
pub const PSEUDONYM_COLUMN: &str = "__pseudonym";

/// A station's answer to the `check` action: the fragment passed its policy, and what it
/// will release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckAnswer {
    /// `rows` (row-level values of public columns), `groups` (one row per group, with
    /// [`ROWS_COLUMN`] appended), `model`, or `pseudonymized` (rows keyed by
    /// [`PSEUDONYM_COLUMN`], for a hub join).
    pub release: String,
    /// The group-size threshold the station applies (1 for row-level releases).
    pub min_group_size: u64,
    /// For a differentially private release (`dp`): the ε the station will charge to the
    /// researcher's budget when the fragment runs (nothing is charged by the check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
}

/// One table's policy as a station announces it through the `policy` action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TablePolicyInfo {
    pub table: String,
    /// k for this table.
    pub min_group_size: u64,
    /// Fewest complete rows the station contributes to a model.
    pub model_min_rows: u64,
    /// Bin width of released survival times (0 = exact).
    pub survival_time_resolution: f64,
    /// (column, visibility) in schema order; visibility is `public`, `aggregate`, `dp`,
    /// `join_key` or `hidden`.
    pub columns: Vec<(String, String)>,
    /// Whether the station releases this table's `aggregate` columns row by row, keyed by
    /// pseudonyms, to a hub that joins them with other stations' columns.
    #[serde(default)]
    pub allow_vertical: bool,
}

/// The contents of a fragment ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FragmentTicket {
    /// The hub's id of the researcher's query (one query may send several fragments).
    pub query_id: String,
    /// Which fragment of that query this is (1-based).
    pub fragment: usize,
    /// Who asked: a researcher name, or `local` in `railyard local` mode.
    pub researcher: String,
    /// The collaboration the researcher asks in (a station keeps a DP budget per
    /// researcher, collaboration and table); empty means [`DEFAULT_COLLABORATION`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub collaboration: String,
    /// The ε the researcher chose for this query (`SET railyard.epsilon`); without one a
    /// station uses its policy's default. Only DP fragments use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// The fragment's SQL; the station plans it itself. For a train, the SQL of its input.
    pub sql: String,
    /// Run a containerized train over the fragment's rows instead of releasing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainCall>,
}

/// A train a fragment asks a station to run: the image (a name the station resolves, or
/// an image id `sha256:…`) and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainCall {
    pub image: String,
    pub args: String,
}

/// The column the hub prepends to the union of a train's outputs: which station produced
/// each row. A train's output may not have a column of this name.
pub const TRAIN_STATION_COLUMN: &str = "station";

/// The collaboration of a ticket that names none.
pub const DEFAULT_COLLABORATION: &str = "default";

/// `collaboration`, or [`DEFAULT_COLLABORATION`] if it is empty.
pub fn collaboration_or_default(collaboration: &str) -> &str {
    if collaboration.is_empty() {
        DEFAULT_COLLABORATION
    } else {
        collaboration
    }
}

/// The body of a station's `budget` action: whose DP budget to report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    pub researcher: String,
    #[serde(default)]
    pub collaboration: String,
}

/// One table's DP budget at a station, for one researcher and collaboration (the answer to
/// the `budget` action is a JSON list of these, one per table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetInfo {
    pub table: String,
    /// The total ε the station allows per (researcher, collaboration, table).
    pub budget: f64,
    /// ε already charged (committed before each release).
    pub spent: f64,
    /// The largest ε one query may spend.
    pub max_query_epsilon: f64,
    /// The ε of a query that does not choose one.
    pub default_epsilon: f64,
}

impl FragmentTicket {
    /// The collaboration, with the default for a ticket that names none.
    pub fn collaboration(&self) -> &str {
        collaboration_or_default(&self.collaboration)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).expect("a fragment ticket serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a Railyard fragment ticket: {e}"))
    }
}
