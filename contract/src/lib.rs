//! The typed hub ↔ station contract: what both roles send each other besides Arrow batches.
//!
//! ```text
//!   hub ── DoGet(Ticket = FragmentTicket as JSON) ─────────────────▶ station
//!   hub ── DoAction(actions::CHECK, FragmentTicket) ───────────────▶ station
//!   hub ◀── CheckAnswer { release: ReleaseKind, min_group_size, ε, train output } ─┘
//!   hub ◀── PERMISSION_DENIED + details = Refusal { rule, message }  (any call)
//!   hub ── DoAction(actions::POLICY) ◀── [TablePolicyInfo { columns: (name, Visibility) }]
//!   hub ── DoAction(actions::BUDGET, BudgetRequest) ◀── [BudgetInfo]
//! ```
//!
//! Everything is JSON on the wire, so a privacy officer reads a ticket in the station's audit
//! log as it arrived. A fragment travels as SQL text (not a serialized plan): hub and stations
//! may run different versions, and the station plans every fragment itself. The types here
//! are plain data: the rules that produce them live in `railyard-policy`, the transport in
//! the station and engine crates.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

pub mod train_output;

/// The names of a station's Flight actions (`DoAction` types).
pub mod actions {
    /// Returns the station's name.
    pub const HEALTH: &str = "health";
    /// Checks a [`FragmentTicket`](crate::FragmentTicket) against the station's policy
    /// without running it; answers a [`CheckAnswer`](crate::CheckAnswer).
    pub const CHECK: &str = "check";
    /// Answers the station's policy per table, a list of
    /// [`TablePolicyInfo`](crate::TablePolicyInfo).
    pub const POLICY: &str = "policy";
    /// Takes a [`BudgetRequest`](crate::BudgetRequest); answers a list of
    /// [`BudgetInfo`](crate::BudgetInfo).
    pub const BUDGET: &str = "budget";
    /// Answers a [`StationStatus`](crate::StationStatus): the station's software and policy
    /// versions (the hub's `railyard.stations`, and its cue to re-read the catalog).
    pub const STATUS: &str = "status";
}

/// What a station says of itself through the `status` action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StationStatus {
    pub station: String,
    /// The station's software version (`railyard --version`).
    pub version: String,
    /// A digest of the station's whole policy as loaded: it changes when the policy does.
    pub policy_version: String,
}

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

impl Visibility {
    /// The name in policy files, messages and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Aggregate => "aggregate",
            Visibility::Dp => "dp",
            Visibility::JoinKey => "join_key",
            Visibility::Hidden => "hidden",
        }
    }
}

impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a fragment that passed a station's check releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseKind {
    /// Row-level values of public columns.
    Rows,
    /// One row per group, with [`ROWS_COLUMN`] appended; groups below k are suppressed.
    Groups,
    /// A model's sufficient statistics (`glm_terms`), bounded by the model rules.
    Model,
    /// Rows keyed by [`PSEUDONYM_COLUMN`], for a hub that joins them.
    Pseudonymized,
    /// The checked output of a containerized train.
    Train,
    /// Differentially private aggregate states.
    Dp,
}

impl ReleaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseKind::Rows => "rows",
            ReleaseKind::Groups => "groups",
            ReleaseKind::Model => "model",
            ReleaseKind::Pseudonymized => "pseudonymized",
            ReleaseKind::Train => "train",
            ReleaseKind::Dp => "dp",
        }
    }
}

impl fmt::Display for ReleaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy's refusal as it crosses the wire: the gRPC status is PERMISSION_DENIED, its
/// message is `message`, and its details are this document, so the other side reads the rule
/// without parsing text. `rule` is the name of a `railyard_policy::Rule` (or a failure of an
/// upstream station's, for the hub's join station).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub rule: String,
    pub message: String,
}

impl Refusal {
    /// The bytes of a status' details.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of two strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The refusal in a status' details, if they hold one.
    pub fn from_bytes(details: &[u8]) -> Option<Self> {
        serde_json::from_slice(details).ok()
    }
}

/// Quotes an identifier for fragment SQL (PostgreSQL-style double quotes, embedded quotes
/// doubled): the one quoting of the hub's SQL writer and of a station's PostgreSQL pushdown.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The column a station appends to every aggregate fragment's answer: how many of its rows
/// each group counts (`count(*)`, Int64). The station suppresses groups below its k with it,
/// and the hub sums it to apply k again to merged groups.
pub const ROWS_COLUMN: &str = "__rows";

/// The schema metadata key of a station's answer to an aggregate fragment: how many of its
/// groups it withheld below its k (a decimal count, or [`WITHHELD_FEW`]). The hub adds up the stations' counts and
/// its own into the same key of the researcher's answer, as JSON
/// (`{"stations": {"station_a": 2}, "hub": 1}`).
pub const WITHHELD_METADATA: &str = "railyard.withheld";

/// The value of [`WITHHELD_METADATA`] when a station may not say how many groups it
/// withheld: together they hold fewer than k rows, possibly none (the count of a few rows'
/// groups would tell whether one patient is among them). The researcher's JSON shows `null`.
pub const WITHHELD_FEW: &str = "fewer than k rows";

/// The column holding the keyed pseudonym of the join key in a station's answer to a
/// vertical-table fragment (`pseudonym(key) AS __pseudonym`).
pub const PSEUDONYM_COLUMN: &str = "__pseudonym";

/// A station's answer to the `check` action: the fragment passed its policy, and what it
/// will release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckAnswer {
    pub release: ReleaseKind,
    /// The group-size threshold the station applies (1 for row-level releases).
    pub min_group_size: u64,
    /// For a differentially private release (`dp`): the ε the station will charge to the
    /// researcher's budget when the fragment runs (nothing is charged by the check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// For a train: the output columns its image declares for this call
    /// ([`train_output`]); the hub plans the query over them before any container starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_output: Option<Vec<train_output::OutputColumn>>,
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
    /// (column, visibility) in schema order. A visibility this side does not know (from a
    /// newer station) reads as `hidden`, the strictest.
    #[serde(deserialize_with = "lenient_visibilities")]
    pub columns: Vec<(String, Visibility)>,
    /// Whether the station releases this table's `aggregate` columns row by row, keyed by
    /// pseudonyms, to a hub that joins them with other stations' columns.
    #[serde(default)]
    pub allow_vertical: bool,
    /// The column whose distinct values the station's disclosure rules count (one patient's
    /// rows count once); `None`: every row is its own unit.
    #[serde(default)]
    pub privacy_unit: Option<String>,
    /// A reference table (an identical copy at every station, e.g. a vocabulary): the
    /// SHA-256 of its content, announced so the hub registers it only when every station
    /// holds the same copy.
    #[serde(default)]
    pub reference: Option<String>,
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

/// The request header that carries a hub's secret to stations that require one
/// (`railyard local` draws one per run).
pub const HUB_SECRET_HEADER: &str = "x-railyard-hub-secret";

/// Whether `sent` equals `secret`, in time that does not depend on where they differ.
pub fn same_secret(sent: &[u8], secret: &[u8]) -> bool {
    sent.len() == secret.len() && sent.iter().zip(secret).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

/// The researcher of a ticket that names none (`railyard local`).
pub const LOCAL_RESEARCHER: &str = "local";

/// `researcher`, or [`LOCAL_RESEARCHER`] if it is empty.
pub fn researcher_or_local(researcher: &str) -> &str {
    if researcher.is_empty() {
        LOCAL_RESEARCHER
    } else {
        researcher
    }
}

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
    /// The researcher, `local` for a ticket that names none.
    pub fn researcher(&self) -> &str {
        researcher_or_local(&self.researcher)
    }

    /// The collaboration, with the default for a ticket that names none.
    pub fn collaboration(&self) -> &str {
        collaboration_or_default(&self.collaboration)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings, integers and finite-or-absent floats always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a Railyard fragment ticket: {e}"))
    }
}

/// Reads announced visibilities, taking one this side does not know as `hidden`.
fn lenient_visibilities<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, Visibility)>, D::Error> {
    let raw: Vec<(String, String)> = Vec::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(column, v)| {
            let v =
                serde_json::from_value(serde_json::Value::String(v)).unwrap_or(Visibility::Hidden);
            (column, v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_stays_readable_json() {
        let answer = CheckAnswer {
            release: ReleaseKind::Pseudonymized,
            min_group_size: 5,
            epsilon: None,
            train_output: None,
        };
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(text, r#"{"release":"pseudonymized","min_group_size":5}"#);
        assert_eq!(serde_json::from_str::<CheckAnswer>(&text).unwrap(), answer);

        let refusal = Refusal {
            rule: "min_group_size".into(),
            message: "policy: …".into(),
        };
        assert_eq!(Refusal::from_bytes(&refusal.to_bytes()), Some(refusal));
        assert_eq!(Refusal::from_bytes(b"not json"), None);
    }

    #[test]
    fn an_unknown_visibility_reads_as_hidden() {
        let info: TablePolicyInfo = serde_json::from_str(
            r#"{"table":"t","min_group_size":5,"model_min_rows":10,
                "survival_time_resolution":7.0,
                "columns":[["a","public"],["b","secret_sauce"],["c","dp"]]}"#,
        )
        .unwrap();
        assert_eq!(
            info.columns,
            vec![
                ("a".to_string(), Visibility::Public),
                ("b".to_string(), Visibility::Hidden),
                ("c".to_string(), Visibility::Dp),
            ]
        );
    }
}
