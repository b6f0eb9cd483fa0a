//! A rows fragment: the chain of filters, projections and aliases over one federated
//! table that a station runs on its own rows, collected into one fragment's SQL.

use super::*;

/// A chain of row-wise operators over one federated table, as station-side expressions.
pub(super) struct RowChain {
    pub(super) table: Arc<FederatedTable>,
    /// Predicates over the table's columns.
    pub(super) filters: Vec<Expr>,
    /// One expression over the table's columns per output column of the chain's top node.
    pub(super) outputs: Vec<Expr>,
    /// The chain top's output columns, for substituting parent expressions.
    pub(super) columns: Vec<Column>,
    /// A row limit pushed into the scan; nothing row-changing may sit above it in the chain.
    pub(super) fetch: Option<usize>,
    /// The chain starts from a relational input (joins, per-patient derivations) rather
    /// than from `table` alone.
    pub(super) rel: Option<Arc<RelBase>>,
}

impl RowChain {
    pub(super) fn analyze(plan: &LogicalPlan) -> Result<Option<RowChain>> {
        Self::analyze_in(plan, false)
    }

    /// As [`analyze`](Self::analyze); `under_aggregate`: the chain is the input of an
    /// aggregate the stations release, so a per-patient GROUP BY may be its relational
    /// input. Otherwise such a GROUP BY is itself the release (its groups of one patient
    /// are withheld), not rows.
    pub(super) fn analyze_in(
        plan: &LogicalPlan,
        under_aggregate: bool,
    ) -> Result<Option<RowChain>> {
        let aggregate_root = matches!(plan, LogicalPlan::Aggregate(_));
        if (under_aggregate || !aggregate_root)
            && let Some(base) = relational_base(plan)?
        {
            let columns = plan.schema().columns();
            let outputs = (0..columns.len())
                .map(|i| Expr::Column(Column::new_unqualified(format!("r{i}"))))
                .collect();
            return Ok(Some(RowChain {
                table: Arc::clone(&base.tables[0]),
                filters: vec![],
                outputs,
                columns,
                fetch: None,
                rel: Some(Arc::new(base)),
            }));
        }
        Ok(match plan {
            LogicalPlan::TableScan(scan) => {
                let Ok(provider) = source_as_provider(&scan.source) else {
                    return Ok(None);
                };
                let Some(table) = provider.downcast_ref::<FederatedTable>() else {
                    return Ok(None);
                };
                let table = Arc::new(table.clone());
                let full = DFSchema::try_from_qualified_schema(
                    scan.table_name.clone(),
                    scan.source.schema().as_ref(),
                )?;
                let base = RowChain {
                    table,
                    rel: None,
                    filters: vec![],
                    outputs: full
                        .fields()
                        .iter()
                        .map(|f| Expr::Column(Column::new_unqualified(f.name())))
                        .collect(),
                    columns: full.columns(),
                    fetch: None,
                };
                let filters = scan
                    .filters
                    .iter()
                    .map(|f| base.substitute(f))
                    .collect::<Option<Vec<_>>>();
                let Some(filters) = filters else {
                    return Ok(None);
                };
                let outputs = scan
                    .projected_schema
                    .columns()
                    .iter()
                    .map(|c| base.substitute(&Expr::Column(c.clone())))
                    .collect::<Option<Vec<_>>>();
                let Some(outputs) = outputs else {
                    return Ok(None);
                };
                Some(RowChain {
                    table: base.table,
                    rel: None,
                    filters,
                    outputs,
                    columns: scan.projected_schema.columns(),
                    fetch: scan.fetch,
                })
            }
            LogicalPlan::Filter(filter) => {
                let Some(mut chain) = RowChain::analyze_in(&filter.input, under_aggregate)? else {
                    return Ok(None);
                };
                if chain.fetch.is_some() {
                    return Ok(None);
                }
                let Some(pred) = chain.substitute(&filter.predicate) else {
                    return Ok(None);
                };
                chain.filters.push(pred);
                Some(chain)
            }
            LogicalPlan::Projection(proj) => {
                let Some(chain) = RowChain::analyze_in(&proj.input, under_aggregate)? else {
                    return Ok(None);
                };
                let outputs = proj
                    .expr
                    .iter()
                    .map(|e| chain.substitute(&e.clone().unalias()))
                    .collect::<Option<Vec<_>>>();
                let Some(outputs) = outputs else {
                    return Ok(None);
                };
                Some(RowChain {
                    outputs,
                    columns: proj.schema.columns(),
                    ..chain
                })
            }
            LogicalPlan::SubqueryAlias(alias) => {
                let Some(chain) = RowChain::analyze_in(&alias.input, under_aggregate)? else {
                    return Ok(None);
                };
                Some(RowChain {
                    columns: alias.schema.columns(),
                    ..chain
                })
            }
            _ => None,
        })
    }

    /// Rewrites an expression over the chain top's columns into one over the table's
    /// columns, or `None` if it needs anything a station cannot evaluate on its own rows.
    pub(super) fn substitute(&self, expr: &Expr) -> Option<Expr> {
        let mut supported = true;
        let out = expr
            .clone()
            .transform_up(|e| {
                Ok(match e {
                    Expr::Column(c) => match self.lookup(&c) {
                        Some(sub) => Transformed::yes(sub.clone()),
                        None => {
                            supported = false;
                            Transformed::new(Expr::Column(c), false, TreeNodeRecursion::Stop)
                        }
                    },
                    Expr::ScalarSubquery(_)
                    | Expr::InSubquery(_)
                    | Expr::Exists(_)
                    | Expr::SetComparison(_)
                    | Expr::OuterReferenceColumn(..)
                    | Expr::Placeholder(_)
                    | Expr::ScalarVariable(..)
                    | Expr::GroupingSet(_)
                    | Expr::AggregateFunction(_)
                    | Expr::WindowFunction(_)
                    | Expr::Unnest(_) => {
                        supported = false;
                        Transformed::new(e, false, TreeNodeRecursion::Stop)
                    }
                    #[expect(deprecated)]
                    Expr::Wildcard { .. } => {
                        supported = false;
                        Transformed::new(e, false, TreeNodeRecursion::Stop)
                    }
                    other => Transformed::no(other),
                })
            })
            .ok()?
            .data;
        supported.then_some(out)
    }

    pub(super) fn lookup(&self, c: &Column) -> Option<&Expr> {
        if let Some(i) = self.columns.iter().position(|x| x == c) {
            return self.outputs.get(i);
        }
        if c.relation.is_none() {
            let mut hits = self
                .columns
                .iter()
                .enumerate()
                .filter(|(_, x)| x.name == c.name);
            if let (Some((i, _)), None) = (hits.next(), hits.next()) {
                return self.outputs.get(i);
            }
        }
        None
    }
}

impl RowChain {
    /// The stations that answer the chain's fragment: every station of its table or
    /// relational input, or one station for reference tables only (each holds the same
    /// copy, so the union of all would repeat every row).
    pub(super) fn stations(&self) -> Vec<String> {
        match &self.rel {
            Some(rel) => rel.stations.clone(),
            None if self.table.is_reference() => {
                self.table.stations().iter().take(1).cloned().collect()
            }
            None => self.table.stations().to_vec(),
        }
    }

    /// The privacy unit the chain's stations count, as announced (`None`: rows).
    pub(super) fn unit(&self) -> Option<String> {
        let tables = match &self.rel {
            Some(rel) => rel.tables.clone(),
            None => vec![Arc::clone(&self.table)],
        };
        tables
            .iter()
            .filter(|t| !t.is_reference())
            .find_map(|t| t.privacy_unit().map(str::to_string))
    }

    /// Whether the station column `name` holds the privacy unit of the chain's patients.
    pub(super) fn is_unit(&self, name: &str) -> bool {
        match &self.rel {
            Some(rel) => rel.units.iter().any(|u| u == name),
            None => !self.table.is_reference() && self.table.privacy_unit() == Some(name),
        }
    }

    /// The fragment's FROM: the table, or the relational input as a derived table.
    pub(super) fn source_sql(&self) -> String {
        match &self.rel {
            Some(rel) => format!("({}) AS {}", rel.sql, quote_ident("__rel")),
            None => quote_ident(self.table.name()),
        }
    }

    /// The hub's threshold for an aggregate over the chain that touches `used`: over a
    /// relational input, the largest k of its patient tables (every column counts).
    pub(super) fn min_group_size(&self, used: &BTreeSet<String>) -> u64 {
        match &self.rel {
            Some(rel) => rel
                .tables
                .iter()
                .filter(|t| !t.is_reference())
                .map(|t| {
                    let all = datafusion::catalog::TableProvider::schema(t.as_ref())
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect();
                    t.min_group_size(&all)
                })
                .max()
                .unwrap_or(1),
            None => self.table.min_group_size(used),
        }
    }
}
