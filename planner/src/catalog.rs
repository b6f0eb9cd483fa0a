//! The federated catalog: which logical tables exist and which stations hold a part of each.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::plan_err;
use datafusion::datasource::TableType;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use crate::error::{Error, Result};
use crate::vertical::VerticalLayout;

/// A horizontally partitioned table: every station holds other rows with the same columns,
/// and the table means their union.
///
/// As a [`TableProvider`] it only describes the table to DataFusion's SQL planner; its scan is
/// a placeholder that the federation planner replaces with per-station fragments.
#[derive(Debug, Clone)]
pub struct FederatedTable {
    name: String,
    schema: SchemaRef,
    stations: Vec<String>,
    policies: BTreeMap<String, StationTablePolicy>,
    /// For a vertically partitioned table: its member stations and key. Its `stations` is
    /// then the hub's join station, which reads the members.
    vertical: Option<Arc<VerticalLayout>>,
}

/// What the hub knows of one station's policy for one table (the station remains the
/// authority: it checks every fragment itself).
#[derive(Debug, Clone, PartialEq)]
pub struct StationTablePolicy {
    /// k: the station's minimum group size for this table.
    pub min_group_size: u64,
    /// Columns whose row-level values the station releases.
    pub public: BTreeSet<String>,
    /// Fewest complete rows the station contributes to a model.
    pub model_min_rows: u64,
    /// Bin width of the survival times it releases (0 = exact).
    pub survival_time_resolution: f64,
    /// The column whose distinct values the station counts as units (`None`: rows).
    pub privacy_unit: Option<String>,
    /// The SHA-256 of a reference table's content (`None`: a table of patient data).
    pub reference: Option<String>,
}

impl Default for StationTablePolicy {
    /// A station that announced nothing is treated as fully open: the station enforces its
    /// own policy whatever the hub assumes.
    fn default() -> Self {
        Self {
            min_group_size: 1,
            public: BTreeSet::new(),
            model_min_rows: 1,
            survival_time_resolution: 0.0,
            privacy_unit: None,
            reference: None,
        }
    }
}

impl FederatedTable {
    /// A table computed at the stations from `tables` (a cohort query): its `schema`, the
    /// stations of its patient tables, and per station the strictest of their announced
    /// policies with no column public (its columns are derived).
    pub fn derived(name: &str, schema: SchemaRef, tables: &[Arc<FederatedTable>]) -> Option<Self> {
        let patients: Vec<&Arc<FederatedTable>> =
            tables.iter().filter(|t| !t.is_reference()).collect();
        let first = patients.first()?;
        if patients
            .iter()
            .any(|t| t.stations != first.stations || t.vertical.is_some())
        {
            return None;
        }
        let mut policies: BTreeMap<String, StationTablePolicy> = BTreeMap::new();
        for t in &patients {
            for (station, p) in &t.policies {
                let merged =
                    policies
                        .entry(station.clone())
                        .or_insert_with(|| StationTablePolicy {
                            public: BTreeSet::new(),
                            ..p.clone()
                        });
                merged.min_group_size = merged.min_group_size.max(p.min_group_size);
                merged.model_min_rows = merged.model_min_rows.max(p.model_min_rows);
                merged.survival_time_resolution = merged
                    .survival_time_resolution
                    .max(p.survival_time_resolution);
            }
        }
        Some(Self {
            name: name.to_string(),
            schema,
            stations: first.stations.clone(),
            policies,
            vertical: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stations holding a part of this table, sorted by name.
    pub fn stations(&self) -> &[String] {
        &self.stations
    }

    /// How the table is spread over stations, if it is vertically partitioned.
    pub fn vertical(&self) -> Option<&VerticalLayout> {
        self.vertical.as_deref()
    }

    /// The privacy unit every station of the table counts (`None`: rows somewhere, or the
    /// stations disagree; such a table is never part of a relational fragment).
    pub fn privacy_unit(&self) -> Option<&str> {
        let mut units = self.policies.values().map(|p| p.privacy_unit.as_deref());
        let first = units.next()??;
        units.all(|u| u == Some(first)).then_some(first)
    }

    /// Whether the table is a reference table: every station announced an identical copy.
    pub fn is_reference(&self) -> bool {
        let mut hashes = self.policies.values().map(|p| p.reference.as_deref());
        match hashes.next() {
            Some(Some(first)) => {
                self.policies.len() == self.stations.len() && hashes.all(|h| h == Some(first))
            }
            _ => false,
        }
    }

    /// The group-size threshold the hub applies to merged groups of an aggregate that
    /// touches `columns`: the largest k among the stations where one of them is not public
    /// (1 if every station releases all of them row by row).
    pub fn min_group_size(&self, columns: &BTreeSet<String>) -> u64 {
        self.restricting(columns)
            .map(|p| p.min_group_size)
            .max()
            .unwrap_or(1)
    }

    /// The policies of the stations where one of `columns` is not public: those whose
    /// disclosure rules apply to a computation over them.
    pub fn restricting<'a>(
        &'a self,
        columns: &'a BTreeSet<String>,
    ) -> impl Iterator<Item = &'a StationTablePolicy> + 'a {
        self.policies
            .values()
            .filter(move |p| !columns.iter().all(|c| p.public.contains(c)))
    }
}

#[async_trait]
impl TableProvider for FederatedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        plan_err!(
            "not supported in a federated query: table '{}' is referenced where the federation \
             planner cannot split the query into station fragments (for example inside a \
             correlated subquery)",
            self.name
        )
    }
}

/// All federated tables of a collaboration, built from what each station announces.
#[derive(Debug, Default, Clone)]
pub struct FederatedCatalog {
    tables: BTreeMap<String, (SchemaRef, Vec<String>)>,
    policies: BTreeMap<(String, String), StationTablePolicy>,
    vertical: BTreeMap<String, Arc<VerticalLayout>>,
}

impl FederatedCatalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `station` holds a part of `table` with `schema`. Every station of a table
    /// must announce the same columns with the same types: a union of differently typed parts
    /// would silently change values, so a mismatch is refused and named.
    pub fn add(&mut self, station: &str, table: &str, schema: SchemaRef) -> Result<()> {
        match self.tables.get_mut(table) {
            None => {
                self.tables
                    .insert(table.to_string(), (schema, vec![station.to_string()]));
            }
            Some((existing, stations)) => {
                let first = &stations[0];
                if existing.fields().len() != schema.fields().len() {
                    return Err(Error::Catalog(format!(
                        "table '{table}' has {} columns at station '{first}' but {} at station \
                         '{station}'",
                        existing.fields().len(),
                        schema.fields().len()
                    )));
                }
                for (a, b) in existing.fields().iter().zip(schema.fields()) {
                    if a.name() != b.name() || a.data_type() != b.data_type() {
                        return Err(Error::Catalog(format!(
                            "table '{table}': column '{}' ({}) at station '{first}' does not \
                             match column '{}' ({}) at station '{station}'",
                            a.name(),
                            a.data_type(),
                            b.name(),
                            b.data_type()
                        )));
                    }
                }
                if stations.iter().any(|s| s == station) {
                    return Err(Error::Catalog(format!(
                        "station '{station}' announced table '{table}' twice"
                    )));
                }
                // A column is non-nullable for the federation only if it is at every
                // station: the hub's optimizer folds `x IS NULL` to false for a
                // non-nullable `x`, and the planner counts rows for `count(x)`.
                if existing
                    .fields()
                    .iter()
                    .zip(schema.fields())
                    .any(|(a, b)| !a.is_nullable() && b.is_nullable())
                {
                    let fields: Vec<_> = existing
                        .fields()
                        .iter()
                        .zip(schema.fields())
                        .map(|(a, b)| {
                            Arc::new(
                                a.as_ref()
                                    .clone()
                                    .with_nullable(a.is_nullable() || b.is_nullable()),
                            )
                        })
                        .collect();
                    *existing = Arc::new(arrow::datatypes::Schema::new_with_metadata(
                        fields,
                        existing.metadata().clone(),
                    ));
                }
                stations.push(station.to_string());
                stations.sort();
            }
        }
        Ok(())
    }

    /// Records what `station` announced of its policy for `table`.
    pub fn set_policy(&mut self, station: &str, table: &str, policy: StationTablePolicy) {
        self.policies
            .insert((table.to_string(), station.to_string()), policy);
    }

    /// Records that `table` is vertically partitioned as `layout` (its one station, added
    /// with [`add`](Self::add), is the hub's join station).
    pub fn set_vertical(&mut self, table: &str, layout: VerticalLayout) {
        self.vertical.insert(table.to_string(), Arc::new(layout));
    }

    /// The table providers to register in the hub's session.
    pub fn tables(&self) -> Vec<Arc<FederatedTable>> {
        self.tables
            .iter()
            .map(|(name, (schema, stations))| {
                let policies = stations
                    .iter()
                    .filter_map(|s| {
                        self.policies
                            .get(&(name.clone(), s.clone()))
                            .map(|p| (s.clone(), p.clone()))
                    })
                    .collect();
                Arc::new(FederatedTable {
                    name: name.clone(),
                    schema: Arc::clone(schema),
                    stations: stations.clone(),
                    policies,
                    vertical: self.vertical.get(name).cloned(),
                })
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn the_hub_threshold_is_the_largest_k_where_a_touched_column_is_not_public() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("inst", DataType::Int64, true),
            Field::new("age", DataType::Int64, true),
        ]));
        let mut catalog = FederatedCatalog::new();
        for (station, k, public) in [("a", 5, vec!["inst"]), ("b", 10, vec![]), ("c", 3, vec![])] {
            catalog.add(station, "lung", Arc::clone(&schema)).unwrap();
            catalog.set_policy(
                station,
                "lung",
                StationTablePolicy {
                    min_group_size: k,
                    public: public.into_iter().map(String::from).collect(),
                    ..StationTablePolicy::default()
                },
            );
        }
        let table = &catalog.tables()[0];
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(table.min_group_size(&cols(&["age"])), 10);
        // 'inst' is public at a only: b and c still threshold it.
        assert_eq!(table.min_group_size(&cols(&["inst"])), 10);
        assert_eq!(table.min_group_size(&cols(&[])), 1);

        let mut open = FederatedCatalog::new();
        open.add("a", "t", Arc::clone(&schema)).unwrap();
        open.set_policy(
            "a",
            "t",
            StationTablePolicy {
                min_group_size: 7,
                public: cols(&["inst", "age"]),
                ..StationTablePolicy::default()
            },
        );
        assert_eq!(open.tables()[0].min_group_size(&cols(&["inst", "age"])), 1);
        assert_eq!(open.tables()[0].min_group_size(&cols(&["age"])), 1);
    }
}
