//! Relational inputs: the part of a plan below a released aggregate (or a rows fragment) that
//! every station computes over its own patients alone — joins of its tables on the privacy
//! unit, joins with reference tables, per-patient GROUP BY, window functions partitioned by
//! the patient, DISTINCT including the patient, UNION ALL of such.
//!
//! A patient lives at one station of a horizontal collaboration, so such a subtree gives at
//! each station exactly the rows the pooled computation gives for that station's patients,
//! and anything above it merges as if over one table. The subtree travels as SQL (DataFusion's
//! unparser) in the fragment's FROM; each station re-plans it and checks the same rules
//! against its own policy (`railyard_policy::check`).
//!
//! What this module refuses to push (a join on another key, a cross join, a window over all
//! patients) is left to the rest of the planner: it runs at the hub over fetched rows when
//! every column is public, and is otherwise refused by the stations.

use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Distinct, JoinType, Operator};
use datafusion::sql::unparser::plan_to_sql;

use super::*;

/// A relational subtree that can run at every station of `stations`.
pub(super) struct RelBase {
    /// The subtree as SQL, its output columns renamed `r0…`.
    pub(super) sql: String,
    /// The federated tables it reads (patient tables first).
    pub(super) tables: Vec<Arc<FederatedTable>>,
    /// The stations that run it: every station of its patient tables, or one station for a
    /// subtree over reference tables only (each holds the same copy).
    pub(super) stations: Vec<String>,
    /// Its output columns (`r…`) that hold the privacy unit.
    pub(super) units: Vec<String>,
}

/// What the analysis knows of a subtree's rows.
struct Units {
    /// Some patient table is read (rows belong to patients).
    patient: bool,
    /// Output columns holding the row's unit value.
    cols: Vec<Column>,
}

struct Scope {
    tables: Vec<Arc<FederatedTable>>,
    stations: Option<Vec<String>>,
}

/// Whether `plan` is the root of a relational subtree (not a straight chain over one table).
pub(super) fn is_relational_root(plan: &LogicalPlan) -> bool {
    matches!(
        plan,
        LogicalPlan::Join(_)
            | LogicalPlan::Union(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Distinct(_)
            | LogicalPlan::Aggregate(_)
    )
}

/// `plan` as a relational input, if every station can compute it over its own patients.
pub(super) fn relational_base(plan: &LogicalPlan) -> Result<Option<RelBase>> {
    if !is_relational_root(plan) {
        return Ok(None);
    }
    let mut scope = Scope {
        tables: Vec::new(),
        stations: None,
    };
    let Some(units) = analyze(plan, &mut scope) else {
        return Ok(None);
    };
    // An aggregate over reference tables alone is an ordinary aggregate fragment (sent to
    // one station), not an input.
    if scope.tables.is_empty() || (!units.patient && matches!(plan, LogicalPlan::Aggregate(_))) {
        return Ok(None);
    }
    let renamed: Vec<Expr> = plan
        .schema()
        .columns()
        .into_iter()
        .enumerate()
        .map(|(i, c)| Expr::Column(c).alias(format!("r{i}")))
        .collect();
    let projected = LogicalPlan::Projection(Projection::try_new(
        renamed,
        Arc::new(filters_in_derived_tables(unaliased_semi_joins(
            plan.clone(),
        )?)?),
    )?);
    let sql = match plan_to_sql(&projected) {
        Ok(statement) => statement.to_string(),
        Err(_) => return Ok(None),
    };
    let stations = match (units.patient, scope.stations) {
        (true, Some(s)) => s,
        (false, _) => {
            let first = scope.tables[0].stations().first().cloned();
            first.into_iter().collect()
        }
        (true, None) => return Ok(None),
    };
    let mut tables = scope.tables;
    tables.sort_by_key(|t| t.is_reference());
    let units = plan
        .schema()
        .columns()
        .iter()
        .enumerate()
        .filter(|(_, c)| units.cols.contains(c))
        .map(|(i, _)| format!("r{i}"))
        .collect();
    Ok(Some(RelBase {
        sql,
        tables,
        stations,
        units,
    }))
}

fn analyze(plan: &LogicalPlan, scope: &mut Scope) -> Option<Units> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            let provider = source_as_provider(&scan.source).ok()?;
            let table = provider.downcast_ref::<FederatedTable>()?;
            if table.vertical().is_some() || scan.fetch.is_some() {
                return None;
            }
            if !scope.tables.iter().any(|t| t.name() == table.name()) {
                scope.tables.push(Arc::new(table.clone()));
            }
            if table.is_reference() {
                return Some(Units {
                    patient: false,
                    cols: vec![],
                });
            }
            let unit = table.privacy_unit()?;
            match &scope.stations {
                None => scope.stations = Some(table.stations().to_vec()),
                Some(s) if s.as_slice() == table.stations() => {}
                Some(_) => return None,
            }
            let col = Column::new(Some(scan.table_name.clone()), unit);
            let cols = if scan.projected_schema.has_column(&col) {
                vec![col]
            } else {
                vec![]
            };
            Some(Units {
                patient: true,
                cols,
            })
        }
        LogicalPlan::Filter(f) => {
            let mut subquery = false;
            let _ = f.predicate.apply(|e| {
                subquery |= matches!(
                    e,
                    Expr::Exists(_)
                        | Expr::InSubquery(_)
                        | Expr::ScalarSubquery(_)
                        | Expr::OuterReferenceColumn(..)
                );
                Ok(TreeNodeRecursion::Continue)
            });
            if subquery {
                return None;
            }
            analyze(&f.input, scope)
        }
        LogicalPlan::Projection(p) => {
            let input = analyze(&p.input, scope)?;
            let cols = p
                .expr
                .iter()
                .zip(p.schema.columns())
                .filter(|(e, _)| matches!((*e).clone().unalias(), Expr::Column(c) if input.cols.contains(&c)))
                .map(|(_, out)| out)
                .collect();
            Some(Units {
                patient: input.patient,
                cols,
            })
        }
        LogicalPlan::SubqueryAlias(a) => {
            let input = analyze(&a.input, scope)?;
            Some(Units {
                patient: input.patient,
                cols: input
                    .cols
                    .iter()
                    .map(|c| Column::new(Some(a.alias.clone()), c.name.clone()))
                    .collect(),
            })
        }
        LogicalPlan::Join(j) => {
            let left = analyze(&j.left, scope)?;
            let right = analyze(&j.right, scope)?;
            let mut pairs = j.on.clone();
            if let Some(filter) = &j.filter {
                for c in split_conjunction(filter) {
                    if let Expr::BinaryExpr(b) = c
                        && b.op == Operator::Eq
                    {
                        pairs.push((b.left.as_ref().clone(), b.right.as_ref().clone()));
                    }
                }
            }
            let is = |e: &Expr, side: &Units| matches!(e.clone().unalias(), Expr::Column(c) if side.cols.contains(&c));
            let keyed = pairs
                .iter()
                .any(|(a, b)| (is(a, &left) && is(b, &right)) || (is(a, &right) && is(b, &left)));
            if left.patient && right.patient && !keyed {
                return None;
            }
            // Unmatched rows an outer join keeps must be patients' (see the station's check).
            let (keeps_left, keeps_right) = match j.join_type {
                JoinType::Left => (true, false),
                JoinType::Right => (false, true),
                JoinType::Full => (true, true),
                _ => (false, false),
            };
            if (left.patient || right.patient)
                && ((keeps_left && !left.patient) || (keeps_right && !right.patient))
            {
                return None;
            }
            let patient = left.patient || right.patient;
            let mut cols = match j.join_type {
                JoinType::Inner => {
                    let mut c = left.cols.clone();
                    c.extend(right.cols.iter().cloned());
                    c
                }
                JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti => left.cols.clone(),
                JoinType::Right | JoinType::RightSemi | JoinType::RightAnti => right.cols.clone(),
                JoinType::Full => vec![],
                JoinType::LeftMark | JoinType::RightMark => return None,
            };
            cols.retain(|c| j.schema.has_column(c));
            Some(Units { patient, cols })
        }
        LogicalPlan::Aggregate(agg) => {
            let input = analyze(&agg.input, scope)?;
            if matches!(agg.group_expr.as_slice(), [Expr::GroupingSet(_)]) {
                return None;
            }
            let out = agg.schema.columns();
            let cols: Vec<Column> = agg
                .group_expr
                .iter()
                .enumerate()
                .filter(|(_, g)| matches!((*g).clone().unalias(), Expr::Column(c) if input.cols.contains(&c)))
                .map(|(i, _)| out[i].clone())
                .collect();
            if input.patient && cols.is_empty() {
                return None;
            }
            Some(Units {
                patient: input.patient,
                cols,
            })
        }
        LogicalPlan::Window(w) => {
            let input = analyze(&w.input, scope)?;
            if input.patient {
                for e in &w.window_expr {
                    let Expr::WindowFunction(f) = e.clone().unalias() else {
                        return None;
                    };
                    if !f
                        .params
                        .partition_by
                        .iter()
                        .any(|p| matches!(p, Expr::Column(c) if input.cols.contains(c)))
                    {
                        return None;
                    }
                }
            }
            Some(input)
        }
        LogicalPlan::Sort(s) if s.fetch.is_none() => analyze(&s.input, scope),
        LogicalPlan::Distinct(Distinct::All(input)) => {
            let input = analyze(input, scope)?;
            (!input.patient || !input.cols.is_empty()).then_some(input)
        }
        LogicalPlan::Union(u) => {
            let mut all = Vec::new();
            for i in &u.inputs {
                all.push((analyze(i, scope)?, i.schema().columns()));
            }
            let patient = all.iter().any(|(u, _)| u.patient);
            if patient && !all.iter().all(|(u, _)| u.patient) {
                return None;
            }
            let out = u.schema.columns();
            let cols = (0..out.len())
                .filter(|i| all.iter().all(|(u, c)| u.cols.contains(&c[*i])))
                .map(|i| out[i].clone())
                .collect();
            Some(Units { patient, cols })
        }
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Some(Units {
            patient: false,
            cols: vec![],
        }),
        _ => None,
    }
}

/// The plan with the alias the optimizer puts on the inner side of a decorrelated subquery
/// (`__correlated_sq_1`) removed, its columns read from the aliased input instead.
/// DataFusion's unparser writes a semi or anti join back as `EXISTS (SELECT … FROM t AS d
/// WHERE …)` but drops that alias while keeping it in the condition, which then names a
/// relation that does not exist.
fn unaliased_semi_joins(plan: LogicalPlan) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up(|node| {
            let LogicalPlan::Join(mut j) = node else {
                return Ok(Transformed::no(node));
            };
            let semi = matches!(
                j.join_type,
                JoinType::LeftSemi | JoinType::LeftAnti | JoinType::RightSemi | JoinType::RightAnti
            );
            let LogicalPlan::SubqueryAlias(alias) = j.right.as_ref() else {
                return Ok(Transformed::no(LogicalPlan::Join(j)));
            };
            let outer = alias.schema.columns();
            let inner = alias.input.schema().columns();
            // Without the alias the inner columns must still name the inner side alone: a
            // subquery over the outer query's own table keeps it (the unparser then keeps
            // it too, as the derived table's name).
            let left_relations: Vec<_> = j
                .left
                .schema()
                .columns()
                .into_iter()
                .filter_map(|c| c.relation)
                .collect();
            let clash = inner.iter().any(|c| match &c.relation {
                Some(r) => left_relations.contains(r),
                None => true,
            });
            if !semi || clash {
                return Ok(Transformed::no(LogicalPlan::Join(j)));
            }
            let renamed = |e: Expr| -> datafusion::common::Result<Expr> {
                Ok(e.transform_up(|e| {
                    Ok(match e {
                        Expr::Column(c) => match outer.iter().position(|o| *o == c) {
                            Some(i) => Transformed::yes(Expr::Column(inner[i].clone())),
                            None => Transformed::no(Expr::Column(c)),
                        },
                        other => Transformed::no(other),
                    })
                })?
                .data)
            };
            j.on =
                j.on.into_iter()
                    .map(|(l, r)| Ok((renamed(l)?, renamed(r)?)))
                    .collect::<datafusion::common::Result<_>>()?;
            j.filter = j.filter.map(renamed).transpose()?;
            j.right = Arc::clone(&alias.input);
            let rebuilt = LogicalPlan::Join(j);
            let exprs = rebuilt.expressions();
            let inputs = rebuilt.inputs().into_iter().cloned().collect();
            Ok(Transformed::yes(rebuilt.with_new_exprs(exprs, inputs)?))
        })?
        .data)
}

/// The plan with every filter directly below a table alias kept in a derived table. The
/// optimizer pushes `d.x = 1` below `drug_exposure AS d` as `drug_exposure.x = 1`;
/// DataFusion's unparser writes that filter into the aliased SELECT as it is, naming a
/// relation the alias has hidden (and lifting it above the alias instead would move it
/// into an outer join's ON).
fn filters_in_derived_tables(plan: LogicalPlan) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up(|node| {
            let LogicalPlan::SubqueryAlias(alias) = &node else {
                return Ok(Transformed::no(node));
            };
            if !matches!(alias.input.as_ref(), LogicalPlan::Filter(_)) {
                return Ok(Transformed::no(node));
            }
            // A projection of every column between the alias and the filter makes the
            // unparser write a derived table, `(SELECT … FROM t WHERE …) AS d`, in which the
            // filter's own qualifiers are right — and which stays below an outer join.
            let columns: Vec<Expr> = alias
                .input
                .schema()
                .columns()
                .into_iter()
                .map(Expr::Column)
                .collect();
            let projected =
                LogicalPlan::Projection(Projection::try_new(columns, Arc::clone(&alias.input))?);
            Ok(Transformed::yes(LogicalPlan::SubqueryAlias(
                datafusion::logical_expr::SubqueryAlias::try_new(
                    Arc::new(projected),
                    alias.alias.clone(),
                )?,
            )))
        })?
        .data)
}
