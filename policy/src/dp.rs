//! What a checked differentially private fragment releases: its groups with their public
//! keys, its DP calls with their bounds, and where each output column comes from. The
//! station's noise (OpenDP) works from this description; the check builds it.

use arrow::datatypes::SchemaRef;
use datafusion::common::ScalarValue;
use railyard_udfs::dp::DpKind;

/// A group column of a DP release and its public keys (as values of the column's type).
#[derive(Debug, Clone, PartialEq)]
pub struct DpGroup {
    pub column: String,
    pub keys: Vec<ScalarValue>,
}

/// One DP aggregate of a release.
#[derive(Debug, Clone, PartialEq)]
pub struct DpAggregateSpec {
    pub kind: DpKind,
    /// The column it reads (none for `dp_count(*)`).
    pub column: Option<String>,
    /// How much one patient (or row) can change its sum: max(|lower|, |upper|) times the
    /// release's rows per unit (for counts and histograms, the rows per unit).
    pub bound: f64,
    /// The bin edges of a quantile's histogram (empty for the other kinds).
    pub edges: Vec<f64>,
}

/// What a checked DP fragment releases.
#[derive(Debug, Clone, PartialEq)]
pub struct DpRelease {
    pub table: String,
    /// The aggregate's group columns, in its output order.
    pub groups: Vec<DpGroup>,
    /// The aggregate's DP calls, in its output order (after the groups).
    pub aggregates: Vec<DpAggregateSpec>,
    /// The most rows one privacy unit contributes (1 without a unit): how much one
    /// patient can change a count.
    pub rows_per_unit: f64,
    /// The aggregate's output schema (what an input without rows would have produced).
    pub aggregate_schema: SchemaRef,
    /// For each output column of the fragment, its column in the aggregate's output.
    pub output: Vec<usize>,
    /// The fragment's output schema.
    pub schema: SchemaRef,
}
