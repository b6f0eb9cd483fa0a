//! The split: turn an optimized hub plan over federated tables into station fragments plus a
//! hub plan that merges their results.
//!
//! The planner walks the plan top-down looking for the largest subtree that reads a single
//! federated table through operators a station can run on its own rows:
//!
//! ```text
//!   Aggregate            ← partial states pushed to the station, merged at the hub
//!     Projection         ← expressions inlined into the fragment
//!       SubqueryAlias    ← renames only
//!         Filter         ← predicates pushed into the fragment's WHERE
//!           TableScan    ← the federated table
//! ```
//!
//! Such a subtree becomes one [`Fragment`] (SQL text) and is replaced in the hub's plan by a
//! [`FragmentNode`] (the union of the stations' answers) under, for an aggregate, a merge
//! `Aggregate` of the same shape whose functions are [`MergeAggregate`]s, and a projection
//! that restores the original column names and types, so the rest of the plan (joins, HAVING,
//! ORDER BY, LIMIT, window functions, …) runs at the hub unchanged.
//!
//! An aggregate that has no mergeable state (an ordered aggregate such as
//! `array_agg(x ORDER BY y)`) is not pushed: the subtree below it is fetched as rows and the
//! hub aggregates. Whether a station releases those rows is its policy's decision.

mod aggregate;
mod relational;
mod rows;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use arrow::datatypes::{DataType, Schema};
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema};
use datafusion::datasource::empty::EmptyTable;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::logical_expr::expr::{AggregateFunction, NullTreatment};
use datafusion::logical_expr::{
    Aggregate, AggregateUDF, Expr, ExprSchemable, GroupingSet, LogicalPlan, Projection, cast,
};
use datafusion::prelude::SessionContext;
use futures::future::BoxFuture;
use railyard_contract::ROWS_COLUMN;
use railyard_udfs::{MergeAggregate, MergeArg, partial_of};

use crate::catalog::{FederatedCatalog, FederatedTable};
use crate::error::{Error, Result};
use crate::fragment::{Fragment, FragmentKind, FragmentNode, ThresholdNode};
use crate::sql::{SelectSql, expr_sql, quote_ident};
use crate::vertical::MemberFragment;
use aggregate::*;
use relational::*;
use rows::*;

/// A hub plan whose federated scans have been replaced by fragments.
#[derive(Debug, Clone)]
pub struct FederatedPlan {
    /// The hub's logical plan; its leaves over federated data are [`FragmentNode`]s.
    pub plan: LogicalPlan,
    /// Every fragment, in the order the planner created them.
    pub fragments: Vec<Arc<Fragment>>,
}

/// Splits plans over a [`FederatedCatalog`]. Holds a "shadow" session with the same table
/// schemas and fragment functions as a station, used to plan each fragment's SQL exactly as
/// the stations will, before any station is contacted.
pub struct FederationPlanner {
    shadow: SessionContext,
    /// Fragment schemas by SQL text: the shadow catalog never changes, so neither do they.
    schemas: Mutex<HashMap<String, Arc<Schema>>>,
}

/// Distinct fragment texts whose schemas the planner remembers.
const SCHEMA_CACHE_ENTRIES: usize = 1024;

impl std::fmt::Debug for FederationPlanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationPlanner").finish_non_exhaustive()
    }
}

impl FederationPlanner {
    pub fn new(catalog: &FederatedCatalog) -> Result<Self> {
        let shadow = railyard_udfs::fragment_context()?;
        for table in catalog.tables() {
            shadow.register_table(
                table.name(),
                Arc::new(EmptyTable::new(datafusion::catalog::TableProvider::schema(
                    table.as_ref(),
                ))),
            )?;
        }
        Ok(Self {
            shadow,
            schemas: Mutex::new(HashMap::new()),
        })
    }

    /// Splits an optimized logical plan. Plans that read no federated table come back
    /// unchanged with no fragments.
    pub async fn federate(&self, plan: &LogicalPlan) -> Result<FederatedPlan> {
        let mut fragments = Vec::new();
        let plan = self.rewrite(plan.clone(), &mut fragments).await?;
        check_no_federated_scan(&plan)?;
        // Stations check and charge each fragment on its own: two DP fragments over one
        // table could each pass the check and together overrun the budget.
        let mut dp_tables = BTreeSet::new();
        for f in &fragments {
            if matches!(f.kind, FragmentKind::DpAggregate { .. }) && !dp_tables.insert(&f.table) {
                return Err(Error::NotSupported(format!(
                    "a query may compute differentially private aggregates over table '{}' \
                     once (one GROUP BY); run the other part as its own query",
                    f.table
                )));
            }
        }
        Ok(FederatedPlan { plan, fragments })
    }

    fn rewrite<'a>(
        &'a self,
        plan: LogicalPlan,
        fragments: &'a mut Vec<Arc<Fragment>>,
    ) -> BoxFuture<'a, Result<LogicalPlan>> {
        Box::pin(async move {
            if let LogicalPlan::Aggregate(agg) = &plan {
                let dp = dp_aggregate(agg)?;
                if let Some(split) = AggregateSplit::analyze(agg)? {
                    return self.aggregate_fragment(agg, split, fragments, dp).await;
                }
                if dp {
                    return Err(Error::NotSupported(
                        "differentially private aggregates run at the stations: over one \
                         federated table, grouped by its columns, with filters a station can \
                         evaluate on its own rows"
                            .to_string(),
                    ));
                }
            }
            if let Some(chain) = RowChain::analyze(&plan)? {
                return self.rows_fragment(&plan, chain, fragments).await;
            }
            let before = fragments.len();
            let mut inputs = Vec::new();
            for input in plan.inputs().into_iter().cloned().collect::<Vec<_>>() {
                inputs.push(self.rewrite(input, fragments).await?);
            }
            // Rebuild a node only if something below it changed: nodes that read no
            // federated table pass through exactly as DataFusion planned them.
            let plan = if fragments.len() == before {
                plan
            } else {
                plan.with_new_exprs(plan.expressions(), inputs)?
            };
            self.rewrite_subqueries(plan, fragments).await
        })
    }

    /// Splits the plans of subquery expressions (`x > (SELECT avg(x) …)`, `EXISTS (…)`,
    /// `IN (SELECT …)`) that DataFusion keeps as expressions rather than joins.
    async fn rewrite_subqueries(
        &self,
        plan: LogicalPlan,
        fragments: &mut Vec<Arc<Fragment>>,
    ) -> Result<LogicalPlan> {
        let mut subplans = Vec::new();
        plan.apply_subqueries(|sub| {
            if let LogicalPlan::Subquery(s) = sub {
                subplans.push(s.subquery.as_ref().clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let before = fragments.len();
        let mut rewritten = Vec::new();
        for sub in subplans {
            rewritten.push(self.rewrite(sub, fragments).await?);
        }
        if fragments.len() == before {
            return Ok(plan);
        }
        // `map_subqueries` visits subqueries in the same order as `apply_subqueries`.
        let mut rewritten = rewritten.into_iter();
        let plan = plan
            .map_subqueries(|sub| match sub {
                LogicalPlan::Subquery(mut s) => match rewritten.next() {
                    Some(new) => {
                        s.subquery = Arc::new(new);
                        Ok(Transformed::yes(LogicalPlan::Subquery(s)))
                    }
                    None => Ok(Transformed::no(LogicalPlan::Subquery(s))),
                },
                other => Ok(Transformed::no(other)),
            })?
            .data;
        Ok(plan)
    }

    /// Plans `sql` in the shadow session: the schema every station will return.
    async fn fragment_schema(&self, sql: &str) -> Result<Arc<Schema>> {
        // The lock guards map operations only; after a panic the map is still valid.
        if let Some(schema) = self
            .schemas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sql)
        {
            return Ok(Arc::clone(schema));
        }
        let plan = self
            .shadow
            .state()
            .create_logical_plan(sql)
            .await
            .map_err(|e| {
                Error::NotSupported(format!(
                    "the fragment SQL generated for this query does not plan ({e}): {sql}"
                ))
            })?;
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let mut schemas = self.schemas.lock().unwrap_or_else(|p| p.into_inner());
        if schemas.len() >= SCHEMA_CACHE_ENTRIES {
            schemas.clear();
        }
        schemas.insert(sql.to_string(), Arc::clone(&schema));
        Ok(schema)
    }

    async fn aggregate_fragment(
        &self,
        agg: &Aggregate,
        split: AggregateSplit,
        fragments: &mut Vec<Arc<Fragment>>,
        dp: bool,
    ) -> Result<LogicalPlan> {
        let rows = &split.rows;
        let mut items = Vec::new();
        let mut group_sql = Vec::new();
        for (i, g) in split.groups.iter().enumerate() {
            let sql = expr_sql(g)?;
            items.push((sql.clone(), format!("g{i}")));
            group_sql.push(sql);
        }
        let mut aggregate_sql = Vec::new();
        for (j, p) in split.partials.iter().enumerate() {
            items.push((expr_sql(p)?, format!("a{j}")));
            aggregate_sql.push(expr_sql(&split.originals[j])?);
        }
        let filters = rows
            .filters
            .iter()
            .map(expr_sql)
            .collect::<Result<Vec<_>>>()?;
        let from = rows.source_sql();
        let sql = SelectSql {
            table: &from,
            items,
            filters,
            group_by: group_sql.clone(),
            limit: None,
        }
        .render();
        let schema = self.fragment_schema(&sql).await?;
        // Every station appends its groups' row counts (see `railyard_contract`), except to
        // a DP release, whose counts are noisy states like any other.
        let schema = if dp {
            schema
        } else {
            let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
            fields.push(Arc::new(arrow::datatypes::Field::new(
                ROWS_COLUMN,
                DataType::Int64,
                false,
            )));
            Arc::new(Schema::new(fields))
        };
        let mut used = BTreeSet::new();
        for e in split
            .groups
            .iter()
            .chain(&split.partials)
            .chain(&rows.filters)
        {
            used.extend(e.column_refs().into_iter().map(|c| c.name.clone()));
        }
        let min_group_size = if dp { 1 } else { rows.min_group_size(&used) };
        let members = match rows.rel {
            Some(_) => Vec::new(),
            None => vertical_members(&rows.table, &used, &rows.filters)?,
        };
        if dp && !members.is_empty() {
            return Err(Error::NotSupported(format!(
                "differentially private aggregates over the vertically partitioned table \
                 '{}' are not supported (its join has no privacy budget)",
                rows.table.name()
            )));
        }

        // The merge functions were derived from the hub's own argument types; the station's
        // states must have exactly the struct type they expect.
        for (j, expected) in split.state_types.iter().enumerate() {
            let got = schema.field(split.groups.len() + j).data_type();
            if got != expected {
                return Err(Error::NotSupported(format!(
                    "the fragment SQL for {} changes the type of its partial state \
                     ({got} instead of {expected}): {sql}",
                    aggregate_sql[j]
                )));
            }
        }

        let fragment = Arc::new(Fragment {
            id: fragments.len() + 1,
            table: rows.table.name().to_string(),
            stations: rows.stations(),
            sql,
            schema,
            kind: if dp {
                FragmentKind::DpAggregate {
                    groups: group_sql,
                    aggregates: aggregate_sql,
                }
            } else {
                FragmentKind::PartialAggregate {
                    groups: group_sql,
                    aggregates: aggregate_sql,
                }
            },
            fetch: None,
            min_group_size,
            members,
            unit: rows.unit(),
        });
        fragments.push(Arc::clone(&fragment));
        let node = Arc::new(FragmentNode::try_new(fragment)?.into_plan());

        let group_cols: Vec<Expr> = (0..split.groups.len())
            .map(|i| Expr::Column(Column::new_unqualified(format!("g{i}"))))
            .collect();
        let hub_groups = hub_group_exprs(&agg.group_expr, &split.keys, &group_cols)?;
        let mut hub_aggs: Vec<Expr> = split
            .merges
            .into_iter()
            .map(|merge| {
                Expr::AggregateFunction(AggregateFunction::new_udf(
                    Arc::new(merge.func),
                    vec![merge.input.hub_arg()],
                    false,
                    None,
                    vec![],
                    None,
                ))
            })
            .collect();
        if !dp {
            hub_aggs
                .push(sum(Expr::Column(Column::new_unqualified(ROWS_COLUMN))).alias(ROWS_COLUMN));
        }
        let grouped = !hub_groups.is_empty();
        let mut merged = LogicalPlan::Aggregate(Aggregate::try_new(node, hub_groups, hub_aggs)?);
        // A global aggregate needs no second threshold: each station refused it below its
        // own k, so the merged count is at least the largest k.
        if grouped && min_group_size > 1 {
            merged = ThresholdNode {
                input: merged,
                min_group_size,
            }
            .into_plan();
        }
        restore_schema(merged, agg.schema.as_ref())
    }

    async fn rows_fragment(
        &self,
        plan: &LogicalPlan,
        chain: RowChain,
        fragments: &mut Vec<Arc<Fragment>>,
    ) -> Result<LogicalPlan> {
        let mut items = Vec::new();
        let mut columns = Vec::new();
        for (i, e) in chain.outputs.iter().enumerate() {
            items.push((expr_sql(e)?, format!("c{i}")));
            columns.push(plan.schema().field(i).name().clone());
        }
        let empty = items.is_empty();
        if empty {
            // Only the row count matters to the hub (e.g. count(*) over a LIMIT).
            items.push(("1".to_string(), "c0".to_string()));
        }
        let filters = chain
            .filters
            .iter()
            .map(expr_sql)
            .collect::<Result<Vec<_>>>()?;
        let from = chain.source_sql();
        let sql = SelectSql {
            table: &from,
            items,
            filters,
            group_by: vec![],
            limit: chain.fetch,
        }
        .render();
        let schema = self.fragment_schema(&sql).await?;
        let mut used = BTreeSet::new();
        for e in chain.outputs.iter().chain(&chain.filters) {
            used.extend(e.column_refs().into_iter().map(|c| c.name.clone()));
        }
        let members = match chain.rel {
            Some(_) => Vec::new(),
            None => vertical_members(&chain.table, &used, &chain.filters)?,
        };
        let fragment = Arc::new(Fragment {
            id: fragments.len() + 1,
            table: chain.table.name().to_string(),
            stations: chain.stations(),
            sql,
            schema,
            kind: FragmentKind::Rows { columns },
            fetch: chain.fetch,
            min_group_size: 1,
            members,
            unit: chain.unit(),
        });
        fragments.push(Arc::clone(&fragment));
        let id = fragment.id;
        let node = FragmentNode::try_new(fragment)?.into_plan();
        if empty {
            // Only its rows are used, but its one field needs a name no other fragment's
            // has: a join of two such fragments (a table with itself) would hold two `c0`.
            let unique = Expr::Column(Column::new_unqualified("c0")).alias(format!("__rows_{id}"));
            return Ok(LogicalPlan::Projection(Projection::try_new(
                vec![unique],
                Arc::new(node),
            )?));
        }
        restore_schema(node, plan.schema().as_ref())
    }
}

/// Whether `agg` computes differentially private aggregates; refuses a mix of DP and exact
/// aggregates over the same rows (the exact ones would bypass the noise).
fn dp_aggregate(agg: &Aggregate) -> Result<bool> {
    let mut dp = 0;
    for e in &agg.aggr_expr {
        let inner = match e {
            Expr::Alias(a) => a.expr.as_ref(),
            other => other,
        };
        if let Expr::AggregateFunction(f) = inner
            && railyard_udfs::dp::dp_kind(&f.func).is_some()
        {
            dp += 1;
        }
    }
    if dp > 0 && dp < agg.aggr_expr.len() {
        return Err(Error::NotSupported(
            "differentially private aggregates (dp_*) cannot be mixed with exact aggregates \
             over the same rows: run them as separate queries"
                .to_string(),
        ));
    }
    Ok(dp > 0)
}

/// What each member of a vertically partitioned table sends to the hub's join for a
/// fragment that uses `used` (none for other tables).
fn vertical_members(
    table: &FederatedTable,
    used: &BTreeSet<String>,
    filters: &[Expr],
) -> Result<Vec<MemberFragment>> {
    let Some(layout) = table.vertical() else {
        return Ok(Vec::new());
    };
    let columns: Vec<String> = datafusion::catalog::TableProvider::schema(table)
        .fields()
        .iter()
        .filter(|f| used.contains(f.name()))
        .map(|f| f.name().clone())
        .collect();
    layout.member_fragments(table.name(), &columns, filters)
}

/// Projects `plan`'s columns, by position, back to the names, qualifiers and types of
/// `original`, so parent operators of the replaced subtree resolve their columns unchanged.
fn restore_schema(plan: LogicalPlan, original: &DFSchema) -> Result<LogicalPlan> {
    let produced = Arc::clone(plan.schema());
    // A merged aggregate carries the row count as one trailing column, dropped here.
    let trailing_count = produced.fields().len() == original.fields().len() + 1
        && produced.field(produced.fields().len() - 1).name() == ROWS_COLUMN;
    if produced.fields().len() != original.fields().len() && !trailing_count {
        return Err(Error::Internal(format!(
            "the merge plan has {} columns where the query expects {}",
            produced.fields().len(),
            original.fields().len()
        )));
    }
    let exprs = (0..original.fields().len())
        .map(|i| {
            let (q, f) = original.qualified_field(i);
            let (pq, pf) = produced.qualified_field(i);
            let mut e = Expr::Column(Column::from((pq, pf)));
            if pf.data_type() != f.data_type() {
                e = cast(e, f.data_type().clone());
            }
            e.alias_qualified(q.cloned(), f.name())
        })
        .collect::<Vec<_>>();
    Ok(LogicalPlan::Projection(Projection::try_new(
        exprs,
        Arc::new(plan),
    )?))
}

/// The hub's grouping: the original grouping with every key replaced by the fragment column
/// holding it. Grouping sets keep their shape: the stations group by every key that occurs in
/// any set, and the hub rolls those fine groups up, which merges states correctly.
fn hub_group_exprs(original: &[Expr], keys: &[Expr], cols: &[Expr]) -> Result<Vec<Expr>> {
    let lookup = |e: &Expr| -> Result<Expr> {
        keys.iter()
            .position(|k| k == e)
            .map(|i| cols[i].clone())
            .ok_or_else(|| Error::Internal(format!("unknown group key {e}")))
    };
    let map_list = |list: &[Expr]| list.iter().map(lookup).collect::<Result<Vec<_>>>();
    if let [Expr::GroupingSet(set)] = original {
        let set = match set {
            GroupingSet::Rollup(list) => GroupingSet::Rollup(map_list(list)?),
            GroupingSet::Cube(list) => GroupingSet::Cube(map_list(list)?),
            GroupingSet::GroupingSets(sets) => GroupingSet::GroupingSets(
                sets.iter()
                    .map(|s| map_list(s))
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        return Ok(vec![Expr::GroupingSet(set)]);
    }
    Ok(cols.to_vec())
}

/// Fails if a federated table is still scanned anywhere (also inside subquery expressions):
/// such a scan has no fragment and would not run.
fn check_no_federated_scan(plan: &LogicalPlan) -> Result<()> {
    let mut found = None;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Ok(provider) = source_as_provider(&scan.source)
            && provider.is::<FederatedTable>()
        {
            found = Some(scan.table_name.to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match found {
        Some(table) => Err(Error::NotSupported(format!(
            "table '{table}' is used in a subquery that could not be turned into a join \
             (correlated subqueries over federated tables must be decorrelatable)"
        ))),
        None => Ok(()),
    }
}
