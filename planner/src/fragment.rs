//! A fragment: the SQL one station runs, and the placeholder node that stands for its
//! union over all stations in the hub's plan.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::{DFSchema, DFSchemaRef, Result};
use datafusion::logical_expr::{Expr, LogicalPlan, UserDefinedLogicalNodeCore};

use crate::vertical::MemberFragment;

/// What a fragment releases from a station.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FragmentKind {
    /// One row per group: the group keys and the accumulator state of each aggregate.
    PartialAggregate {
        /// How each group key is computed at the station (SQL text).
        groups: Vec<String>,
        /// Which aggregate each state column belongs to (SQL text of the original call).
        aggregates: Vec<String>,
    },
    /// Differentially private aggregate states: one row per public key combination, every
    /// state noised at the station, which charges ε to the researcher's budget.
    DpAggregate {
        groups: Vec<String>,
        aggregates: Vec<String>,
    },
    /// Rows of the table after the pushed-down filters and projections.
    Rows { columns: Vec<String> },
}

impl FragmentKind {
    /// A short name for plans and explanations.
    pub fn name(&self) -> &'static str {
        match self {
            FragmentKind::PartialAggregate { .. } => "partial aggregate",
            FragmentKind::DpAggregate { .. } => "DP aggregate",
            FragmentKind::Rows { .. } => "rows",
        }
    }
}

/// One query part that runs, unchanged, at every station holding `table`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// Position of this fragment in its query (1-based, for EXPLAIN and errors).
    pub id: usize,
    /// The federated table the fragment reads.
    pub table: String,
    /// The stations it runs at.
    pub stations: Vec<String>,
    /// The SQL text each station re-plans itself.
    pub sql: String,
    /// The schema a station must return (positional column names).
    pub schema: SchemaRef,
    pub kind: FragmentKind,
    /// A row limit already in the SQL; the hub applies it again to the union.
    pub fetch: Option<usize>,
    /// The group-size threshold the hub applies to merged groups (1: none). Stations apply
    /// their own k to their groups before anything leaves them.
    pub min_group_size: u64,
    /// For a vertically partitioned table: what each member station sends to the hub's
    /// join station, which runs `sql` over the joined rows (empty otherwise).
    pub members: Vec<MemberFragment>,
    /// The privacy unit the stations count (`None`: rows), as they announced it.
    pub unit: Option<String>,
}

impl Fragment {
    /// A human-readable account of what leaves each station.
    pub fn releases(&self) -> String {
        match &self.kind {
            FragmentKind::PartialAggregate { groups, aggregates } => {
                let mut parts = Vec::new();
                if groups.is_empty() {
                    parts.push("one row".to_string());
                } else {
                    parts.push(format!("one row per group of ({})", groups.join(", ")));
                }
                if !aggregates.is_empty() {
                    parts.push(format!(
                        "with the partial state of {}",
                        aggregates.join(", ")
                    ));
                }
                parts.push(match &self.unit {
                    Some(u) => format!("and its count of distinct {u} (the privacy unit)"),
                    None => "and its row count".to_string(),
                });
                let mut text = parts.join(" ");
                if self.min_group_size > 1 && !self.members.is_empty() {
                    text.push_str(&format!(
                        "; groups of fewer than {} joined rows are withheld",
                        self.min_group_size
                    ));
                } else if self.min_group_size > 1 {
                    text.push_str(&format!(
                        "; each station withholds groups below its k, and the hub those \
                         below {} after merging",
                        self.min_group_size
                    ));
                }
                text
            }
            FragmentKind::DpAggregate { groups, aggregates } => {
                let rows = if groups.is_empty() {
                    "one row".to_string()
                } else {
                    format!(
                        "one row per public key combination of ({}) declared in its policy",
                        groups.join(", ")
                    )
                };
                format!(
                    "{rows} with the noisy state of {} (Laplace noise added at the station, \
                     which charges ε to the researcher's budget first); no row count",
                    aggregates.join(", ")
                )
            }
            FragmentKind::Rows { columns } => {
                format!("row-level values of ({})", columns.join(", "))
            }
        }
    }
}

/// Leaf of the hub's logical plan that stands for the union of a fragment's results over all
/// of its stations. The hub's physical planner turns it into the Flight client operator.
#[derive(Debug, Clone)]
pub struct FragmentNode {
    pub fragment: Arc<Fragment>,
    schema: DFSchemaRef,
}

impl FragmentNode {
    pub fn try_new(fragment: Arc<Fragment>) -> Result<Self> {
        let schema = Arc::new(DFSchema::try_from(fragment.schema.as_ref().clone())?);
        Ok(Self { fragment, schema })
    }

    pub fn into_plan(self) -> LogicalPlan {
        LogicalPlan::Extension(datafusion::logical_expr::Extension {
            node: Arc::new(self),
        })
    }
}

impl PartialEq for FragmentNode {
    fn eq(&self, other: &Self) -> bool {
        self.fragment == other.fragment
    }
}

impl Eq for FragmentNode {}

impl Hash for FragmentNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.fragment.hash(state)
    }
}

impl PartialOrd for FragmentNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        (self.fragment.id, &self.fragment.sql)
            .partial_cmp(&(other.fragment.id, &other.fragment.sql))
    }
}

impl UserDefinedLogicalNodeCore for FragmentNode {
    fn name(&self) -> &str {
        "Fragment"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let kind = self.fragment.kind.name();
        write!(
            f,
            "Fragment #{}: {} of {} at [{}]",
            self.fragment.id,
            kind,
            self.fragment.table,
            self.fragment.stations.join(", ")
        )
    }

    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, _inputs: Vec<LogicalPlan>) -> Result<Self> {
        Ok(self.clone())
    }
}

/// The hub's second threshold over merged groups: keeps the groups whose summed row count
/// ([`ROWS_COLUMN`](railyard_contract::ROWS_COLUMN)) reaches `min_group_size`. A node of its
/// own rather than a `Filter`, so that the hub's physical operator can count the groups it
/// withholds and the answer can say so (`railyard.withheld`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct ThresholdNode {
    pub input: LogicalPlan,
    pub min_group_size: u64,
}

impl ThresholdNode {
    pub fn into_plan(self) -> LogicalPlan {
        LogicalPlan::Extension(datafusion::logical_expr::Extension {
            node: Arc::new(self),
        })
    }
}

impl UserDefinedLogicalNodeCore for ThresholdNode {
    fn name(&self) -> &str {
        "Threshold"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        self.input.schema()
    }

    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "Threshold: {} >= {} (merged groups below it are withheld)",
            railyard_contract::ROWS_COLUMN,
            self.min_group_size
        )
    }

    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> Result<Self> {
        let Some(input) = inputs.into_iter().next() else {
            return Err(datafusion::error::DataFusionError::Internal(
                "Threshold has one input".to_string(),
            ));
        };
        Ok(Self {
            input,
            min_group_size: self.min_group_size,
        })
    }
}
