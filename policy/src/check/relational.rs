//! Relational fragments: joins, per-patient derivations and correlated subqueries that a
//! station computes over its own tables *below* what it releases.
//!
//! A fragment may read several of the station's tables when everything that shapes one
//! patient's rows comes from that patient's own rows or from reference tables (vocabularies,
//! identical at every station):
//!
//! ```text
//!   join of two patient tables        keyed on the unit: … ON co.person_id = p.person_id
//!   join with a reference table       any condition (it holds no patient data)
//!   GROUP BY below the release        must include the unit (one row per patient)
//!   window function                   PARTITION BY must include the unit
//!   DISTINCT                          over columns that include the unit
//!   EXISTS / IN subquery              correlated on the unit (or over reference tables only)
//!   UNION ALL                         of such inputs
//!   LIMIT, ORDER BY … LIMIT           refused (they pick rows by their values)
//! ```
//!
//! Two things follow. The hub can merge the stations' answers exactly: a patient lives at one
//! station, so nothing computed for one patient needs another station's rows. And every row
//! that reaches the released aggregate belongs to one patient, whose unit the station carries
//! up to the release as `__unit_hash` ([`carry`]): k, the contributor counts and the dominance
//! rule count patients, whatever the joins did to the number of rows.
//!
//! Privacy-wise the intermediate rows never leave; the checks of the released aggregate (its
//! argument grammar, its thresholds) apply to the columns of the relational input through
//! their lineage ([`trace_base`]): a value derived per patient (`min(condition_start_date)`)
//! counts as computed from the columns it reads and from the patient's key.

use datafusion::common::tree_node::Transformed;
use datafusion::functions::core::expr_fn::coalesce;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Distinct, Filter, JoinType, LogicalPlanBuilder, Sort, Subquery, Window,
};
use railyard_udfs::row_hash::RowHash;

use super::*;

/// The hash of a row's unit, over the unit's text: the same patient hashes alike in every
/// table, whatever integer width each stores the id in.
pub(super) fn unit_hash(unit: Column) -> Expr {
    RowHash::udf().call(vec![cast(Expr::Column(unit), DataType::Utf8)])
}

/// Whether a node starts a relational input: something other than a straight chain over one
/// table (`release_seen`: the release aggregate is above it, so a further aggregate is a
/// per-patient derivation).
pub(super) fn is_relational(node: &LogicalPlan, release_seen: bool) -> bool {
    match node {
        LogicalPlan::Join(_)
        | LogicalPlan::Union(_)
        | LogicalPlan::Window(_)
        | LogicalPlan::Distinct(_) => true,
        LogicalPlan::Aggregate(_) => release_seen,
        LogicalPlan::Filter(f) => has_subquery(&f.predicate),
        _ => false,
    }
}

fn has_subquery(e: &Expr) -> bool {
    e.exists(|e| {
        Ok(matches!(
            e,
            Expr::Exists(_) | Expr::InSubquery(_) | Expr::ScalarSubquery(_)
        ))
    })
    .unwrap_or(true)
}

/// The tables a relational input reads (subqueries included), with their schemas.
pub(super) fn tables_of(node: &LogicalPlan) -> Vec<(String, arrow::datatypes::SchemaRef)> {
    let mut out: Vec<(String, arrow::datatypes::SchemaRef)> = Vec::new();
    let _ = node.apply_with_subqueries(|n| {
        if let LogicalPlan::TableScan(scan) = n {
            let name = scan.table_name.table().to_string();
            if !out.iter().any(|(t, _)| *t == name) {
                out.push((name, scan.source.schema()));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// A relational input rebuilt to carry each row's unit hash.
pub(super) struct Carried {
    pub(super) plan: LogicalPlan,
    /// The output column holding the unit hash (`None`: no patient table below, only
    /// reference tables or literal rows).
    pub(super) hash: Option<Column>,
    /// Output columns known to hold the unit's own value on every row (join keys on it).
    pub(super) units: Vec<Column>,
}

/// Builds carried plans, naming each hash column apart (`__unit_hash_1`, …) so that the two
/// sides of a join never clash.
pub(super) struct Carrier<'a> {
    pub(super) policy: &'a Policy,
    pub(super) station: &'a str,
    next: usize,
}

type Step<T> = Result<T, Refusal>;

impl<'a> Carrier<'a> {
    pub(super) fn new(policy: &'a Policy, station: &'a str) -> Self {
        Self {
            policy,
            station,
            next: 0,
        }
    }

    fn refuse(&self, why: &str) -> Refusal {
        Refusal {
            rule: Rule::PrivacyUnit,
            message: format!(
                "policy: station '{}' refuses the fragment: {why} (a relational fragment \
                 combines rows of the same patient only: join patient tables on the privacy \
                 unit, group and partition by it, correlate subqueries on it)",
                self.station
            ),
        }
    }

    fn internal(&self, e: datafusion::error::DataFusionError) -> Refusal {
        Refusal {
            rule: Rule::FragmentShape,
            message: format!(
                "policy: station '{}' refuses the fragment: its unit cannot be traced ({e})",
                self.station
            ),
        }
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("{UNIT_HASH_COLUMN}_{}", self.next)
    }

    /// `plan` rebuilt so that every row carries its unit hash.
    pub(super) fn carry(&mut self, plan: &LogicalPlan) -> Step<Carried> {
        let df = |c: &Self, r: datafusion::error::Result<LogicalPlan>| r.map_err(|e| c.internal(e));
        match plan {
            LogicalPlan::TableScan(scan) => {
                let table = scan.table_name.table();
                let scanned = LogicalPlan::TableScan(scan.clone());
                let columns: Vec<Expr> = scanned
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                if self.policy.is_reference(table) {
                    return Ok(Carried {
                        plan: scanned,
                        hash: None,
                        units: vec![],
                    });
                }
                let schema = scan.source.schema();
                let Some(unit) = self.policy.privacy_unit(table, schema.as_ref()).0 else {
                    return Err(self.refuse(&format!(
                        "table '{table}' has no privacy unit here (no person_id or patient_id \
                         column, none declared), so its rows cannot be joined or derived per \
                         patient"
                    )));
                };
                let unit_col = Column::new(Some(scan.table_name.clone()), &unit);
                if scanned.schema().index_of_column(&unit_col).is_err() {
                    return Err(self.refuse(&format!(
                        "the unit column '{unit}' of table '{table}' is not read"
                    )));
                }
                let name = self.fresh();
                let hash = unit_hash(unit_col.clone()).alias(&name);
                let mut exprs = columns;
                exprs.push(hash);
                let plan = df(
                    self,
                    Projection::try_new(exprs, Arc::new(scanned)).map(LogicalPlan::Projection),
                )?;
                Ok(Carried {
                    plan,
                    hash: Some(Column::new_unqualified(name)),
                    units: vec![unit_col],
                })
            }
            LogicalPlan::Filter(f) => {
                let input = self.carry(&f.input)?;
                self.subqueries(&f.predicate, &input)?;
                let plan = df(
                    self,
                    Filter::try_new(f.predicate.clone(), Arc::new(input.plan))
                        .map(LogicalPlan::Filter),
                )?;
                Ok(Carried { plan, ..input })
            }
            LogicalPlan::Projection(p) => {
                let input = self.carry(&p.input)?;
                let mut exprs = p.expr.clone();
                let mut units = Vec::new();
                for (e, out) in p.expr.iter().zip(p.schema.columns()) {
                    if let Expr::Column(c) = e.clone().unalias()
                        && input.units.contains(&c)
                    {
                        units.push(out);
                    }
                }
                let hash = match &input.hash {
                    Some(h) => {
                        let name = self.fresh();
                        exprs.push(Expr::Column(h.clone()).alias(&name));
                        Some(Column::new_unqualified(name))
                    }
                    None => None,
                };
                let plan = df(
                    self,
                    Projection::try_new(exprs, Arc::new(input.plan)).map(LogicalPlan::Projection),
                )?;
                Ok(Carried { plan, hash, units })
            }
            LogicalPlan::SubqueryAlias(a) => {
                let input = self.carry(&a.input)?;
                let plan = df(
                    self,
                    SubqueryAlias::try_new(Arc::new(input.plan), a.alias.clone())
                        .map(LogicalPlan::SubqueryAlias),
                )?;
                let requalify = |c: &Column| Column::new(Some(a.alias.clone()), c.name.clone());
                Ok(Carried {
                    hash: input.hash.as_ref().map(requalify),
                    units: input.units.iter().map(requalify).collect(),
                    plan,
                })
            }
            LogicalPlan::Join(j) => self.join(plan, j),
            LogicalPlan::Aggregate(agg) => {
                let input = self.carry(&agg.input)?;
                if matches!(agg.group_expr.as_slice(), [Expr::GroupingSet(_)]) {
                    return Err(self.refuse("GROUPING SETS below the released aggregate"));
                }
                let unit_keys: Vec<usize> = agg
                    .group_expr
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| {
                        matches!((*g).clone().unalias(), Expr::Column(c) if input.units.contains(&c))
                    })
                    .map(|(i, _)| i)
                    .collect();
                let Some(hash) = input.hash.clone() else {
                    return Ok(Carried {
                        plan: plan.clone(),
                        hash: None,
                        units: vec![],
                    });
                };
                if unit_keys.is_empty() {
                    return Err(self.refuse(
                        "an aggregate below the released one must GROUP BY the privacy unit",
                    ));
                }
                let mut groups = agg.group_expr.clone();
                groups.push(Expr::Column(hash));
                let rebuilt = df(
                    self,
                    Aggregate::try_new(Arc::new(input.plan), groups, agg.aggr_expr.clone())
                        .map(LogicalPlan::Aggregate),
                )?;
                let out = rebuilt.schema().columns();
                let units = unit_keys.iter().map(|i| out[*i].clone()).collect();
                let hash = out[agg.group_expr.len()].clone();
                Ok(Carried {
                    plan: rebuilt,
                    hash: Some(hash),
                    units,
                })
            }
            LogicalPlan::Window(w) => {
                let input = self.carry(&w.input)?;
                if input.hash.is_some() {
                    for e in &w.window_expr {
                        let partitioned =
                            match e.clone().unalias() {
                                Expr::WindowFunction(f) => f.params.partition_by.iter().any(
                                    |p| matches!(p, Expr::Column(c) if input.units.contains(c)),
                                ),
                                _ => false,
                            };
                        if !partitioned {
                            return Err(self.refuse(
                                "a window function must be PARTITION BY the privacy unit",
                            ));
                        }
                    }
                }
                let plan = df(
                    self,
                    Window::try_new(w.window_expr.clone(), Arc::new(input.plan))
                        .map(LogicalPlan::Window),
                )?;
                Ok(Carried { plan, ..input })
            }
            LogicalPlan::Sort(s) => {
                if s.fetch.is_some() {
                    return Err(Refusal {
                        rule: Rule::Ordering,
                        message: format!(
                            "policy: station '{}' refuses ORDER BY … LIMIT inside a fragment: \
                             it would select rows by their values",
                            self.station
                        ),
                    });
                }
                let input = self.carry(&s.input)?;
                let plan = LogicalPlan::Sort(Sort {
                    expr: s.expr.clone(),
                    input: Arc::new(input.plan),
                    fetch: None,
                });
                Ok(Carried { plan, ..input })
            }
            LogicalPlan::Limit(_) => Err(Refusal {
                rule: Rule::Ordering,
                message: format!(
                    "policy: station '{}' refuses LIMIT inside a fragment: it would select \
                     which rows are aggregated",
                    self.station
                ),
            }),
            LogicalPlan::Distinct(Distinct::All(input)) => {
                let input = self.carry(input)?;
                // The hash is a function of the unit column, which the rows include: it
                // does not change which rows are distinct.
                if input.hash.is_some() && input.units.is_empty() {
                    return Err(self.refuse("SELECT DISTINCT must include the privacy unit"));
                }
                let plan = LogicalPlan::Distinct(Distinct::All(Arc::new(input.plan)));
                Ok(Carried { plan, ..input })
            }
            LogicalPlan::Union(u) => {
                let mut inputs = Vec::new();
                for i in &u.inputs {
                    inputs.push(self.carry(i)?);
                }
                let hashed = inputs.iter().filter(|c| c.hash.is_some()).count();
                if hashed == 0 {
                    return Ok(Carried {
                        plan: plan.clone(),
                        hash: None,
                        units: vec![],
                    });
                }
                if hashed != inputs.len() {
                    return Err(self.refuse(
                        "a UNION mixes patient rows with rows of reference tables or constants",
                    ));
                }
                // Each branch: its own columns, then its hash last, under one fresh name (a
                // join above may meet another input's hash).
                let width = plan.schema().fields().len();
                let hash_name = self.fresh();
                let mut unit_positions: Option<Vec<usize>> = None;
                let mut builder: Option<LogicalPlanBuilder> = None;
                for c in inputs {
                    let cols = c.plan.schema().columns();
                    let positions: Vec<usize> =
                        (0..width).filter(|i| c.units.contains(&cols[*i])).collect();
                    unit_positions = Some(match unit_positions {
                        None => positions,
                        Some(p) => p.into_iter().filter(|i| positions.contains(i)).collect(),
                    });
                    let mut exprs: Vec<Expr> =
                        cols[..width].iter().cloned().map(Expr::Column).collect();
                    let hash = c.hash.clone().expect("every branch is hashed");
                    exprs.push(Expr::Column(hash).alias(&hash_name));
                    let branch = df(
                        self,
                        Projection::try_new(exprs, Arc::new(c.plan)).map(LogicalPlan::Projection),
                    )?;
                    builder = Some(match builder {
                        None => LogicalPlanBuilder::from(branch),
                        Some(b) => b.union(branch).map_err(|e| self.internal(e))?,
                    });
                }
                let plan = builder
                    .expect("a union has inputs")
                    .build()
                    .map_err(|e| self.internal(e))?;
                let cols = plan.schema().columns();
                Ok(Carried {
                    units: unit_positions
                        .unwrap_or_default()
                        .into_iter()
                        .map(|i| cols[i].clone())
                        .collect(),
                    hash: Some(cols[width].clone()),
                    plan,
                })
            }
            LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Ok(Carried {
                plan: plan.clone(),
                hash: None,
                units: vec![],
            }),
            other => Err(Refusal {
                rule: Rule::FragmentShape,
                message: format!(
                    "policy: station '{}' refuses the fragment: {} is not accepted in a fragment",
                    self.station,
                    other.display()
                ),
            }),
        }
    }

    fn join(&mut self, plan: &LogicalPlan, j: &datafusion::logical_expr::Join) -> Step<Carried> {
        let left = self.carry(&j.left)?;
        let right = self.carry(&j.right)?;
        // Equalities between a column of each side, from the ON pairs and the join filter.
        let mut pairs: Vec<(Expr, Expr)> = j.on.clone();
        if let Some(filter) = &j.filter {
            for c in split_conjunction(filter) {
                if let Expr::BinaryExpr(b) = c
                    && b.op == Operator::Eq
                {
                    pairs.push((b.left.as_ref().clone(), b.right.as_ref().clone()));
                }
            }
        }
        let keyed = pairs.iter().any(|(a, b)| {
            let is = |e: &Expr, side: &Carried| {
                matches!(e.clone().unalias(), Expr::Column(c) if side.units.contains(&c))
            };
            (is(a, &left) && is(b, &right)) || (is(a, &right) && is(b, &left))
        });
        // Rows an outer join keeps without a match must be patients' rows: rows of a
        // reference table kept at every station would be counted once per station, and
        // rows without a patient escape every count of patients.
        let (keeps_left, keeps_right) = match j.join_type {
            JoinType::Left => (true, false),
            JoinType::Right => (false, true),
            JoinType::Full => (true, true),
            _ => (false, false),
        };
        let patients = left.hash.is_some() || right.hash.is_some();
        if patients
            && ((keeps_left && left.hash.is_none()) || (keeps_right && right.hash.is_none()))
        {
            return Err(self.refuse(
                "an outer join keeps unmatched rows of a reference table or of constants; \
                 keep the patient side (… FROM person p LEFT JOIN concept c …)",
            ));
        }
        if left.hash.is_some() && right.hash.is_some() && !keyed {
            return Err(self.refuse(
                "a join of two patient tables must include the equality of their privacy \
                 units (… ON a.person_id = b.person_id)",
            ));
        }
        let rebuilt = plan
            .clone()
            .with_new_exprs(plan.expressions(), vec![left.plan, right.plan])
            .map_err(|e| self.internal(e))?;
        let out = rebuilt.schema();
        // The output's own copy of a carried column (the join keeps qualifiers).
        let own = |c: &Column| -> Option<Column> {
            out.columns()
                .into_iter()
                .find(|o| o == c || (c.relation.is_none() && o.name == c.name))
        };
        let (mut units, hash) = match j.join_type {
            JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => {
                (left.units.clone(), left.hash.clone())
            }
            JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => {
                (right.units.clone(), right.hash.clone())
            }
            JoinType::Inner => {
                let mut u = left.units.clone();
                u.extend(right.units.iter().cloned());
                (u, left.hash.clone().or_else(|| right.hash.clone()))
            }
            JoinType::Left => (left.units.clone(), left.hash.clone().or(right.hash.clone())),
            JoinType::Right => (
                right.units.clone(),
                right.hash.clone().or(left.hash.clone()),
            ),
            JoinType::Full => (vec![], None),
        };
        units.retain(|c| own(c).is_some());
        let outer_both = matches!(j.join_type, JoinType::Full)
            || (matches!(j.join_type, JoinType::Left | JoinType::Right)
                && left.hash.is_some()
                && right.hash.is_some());
        if outer_both
            || (hash.is_some()
                && matches!(
                    j.join_type,
                    JoinType::Left | JoinType::Right | JoinType::Full
                ))
        {
            // An outer join: the unit of a row is whichever side has one.
            let hashes: Vec<Expr> = [left.hash.as_ref(), right.hash.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(&own)
                .map(Expr::Column)
                .collect();
            if hashes.is_empty() {
                return Ok(Carried {
                    plan: rebuilt,
                    hash: None,
                    units,
                });
            }
            let name = self.fresh();
            let mut exprs: Vec<Expr> = out.columns().into_iter().map(Expr::Column).collect();
            exprs.push(coalesce(hashes).alias(&name));
            let plan = Projection::try_new(exprs, Arc::new(rebuilt))
                .map(LogicalPlan::Projection)
                .map_err(|e| self.internal(e))?;
            return Ok(Carried {
                plan,
                hash: Some(Column::new_unqualified(name)),
                units,
            });
        }
        Ok(Carried {
            hash: hash.as_ref().and_then(&own),
            plan: rebuilt,
            units,
        })
    }

    /// Checks the subqueries of a filter whose input's carried form is `carried`: each reads
    /// reference tables only, or is correlated on the unit (a scalar subquery never is).
    fn subqueries(&mut self, predicate: &Expr, carried: &Carried) -> Step<()> {
        // (the probe of an IN, the subquery, whether it is scalar)
        let mut found: Vec<(Option<Expr>, Subquery, bool)> = Vec::new();
        let _ = predicate.apply(|e| {
            match e {
                Expr::Exists(x) => found.push((None, x.subquery.clone(), false)),
                Expr::InSubquery(x) => {
                    found.push((Some(x.expr.as_ref().clone()), x.subquery.clone(), false))
                }
                Expr::ScalarSubquery(s) => found.push((None, s.clone(), true)),
                _ => {}
            }
            Ok(TreeNodeRecursion::Continue)
        });
        for (probe, sub, scalar) in found {
            let inner = self.carry(&sub.subquery)?;
            if inner.hash.is_none() {
                continue; // reference tables only
            }
            if scalar {
                return Err(self.refuse("a scalar subquery over a patient table"));
            }
            let correlated = match &probe {
                // `unit IN (SELECT unit FROM …)`
                Some(e) => {
                    let first = sub.subquery.schema().columns().into_iter().next();
                    matches!(e.clone().unalias(), Expr::Column(c) if carried.units.contains(&c))
                        && first.is_some_and(|f| inner.units.contains(&f))
                }
                // `EXISTS (… WHERE inner.unit = outer.unit …)`
                None => self.correlated(&sub.subquery, &carried.units)?,
            };
            if !correlated {
                return Err(self.refuse(
                    "a subquery over a patient table must be correlated on the privacy unit \
                     (… WHERE c.person_id = p.person_id, or person_id IN (SELECT person_id …))",
                ));
            }
        }
        Ok(())
    }

    /// Whether some filter inside `plan` equates its own unit with one of `outer` (an outer
    /// reference to the enclosing row's unit).
    fn correlated(&mut self, plan: &LogicalPlan, outer: &[Column]) -> Step<bool> {
        let mut filters = Vec::new();
        let _ = plan.apply(|n| {
            if let LogicalPlan::Filter(f) = n {
                filters.push(f.clone());
            }
            Ok(TreeNodeRecursion::Continue)
        });
        for f in filters {
            let below = self.carry(&f.input)?;
            for c in split_conjunction(&f.predicate) {
                let Expr::BinaryExpr(b) = c else { continue };
                if b.op != Operator::Eq {
                    continue;
                }
                let hit = |x: &Expr, y: &Expr| {
                    matches!(x, Expr::Column(c) if below.units.contains(c))
                        && matches!(y, Expr::OuterReferenceColumn(_, o) if outer.contains(o))
                };
                if hit(&b.left, &b.right) || hit(&b.right, &b.left) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// The lineage of a relational input's output columns, checking every expression on the
/// way as the straight-chain trace does (literals, visibilities, fallible expressions).
pub(super) fn trace_base(
    checker: &mut Checker<'_>,
    plan: &LogicalPlan,
    outer: &[(Column, Lineage)],
) -> Result<Vec<(Column, Lineage)>, Refusal> {
    let with_outer = |input: &[(Column, Lineage)]| -> Vec<(Column, Lineage)> {
        let mut all = input.to_vec();
        all.extend(outer.iter().cloned());
        all
    };
    Ok(match plan {
        LogicalPlan::TableScan(scan) => scan_lineage(checker, scan)?,
        LogicalPlan::Filter(f) => {
            let input = trace_base(checker, &f.input, outer)?;
            let scope = with_outer(&input);
            let predicate = subqueries_traced(checker, &f.predicate, &scope)?;
            checker.lineage(&predicate, &scope, f.input.schema())?;
            input
        }
        LogicalPlan::Projection(p) => {
            let input = trace_base(checker, &p.input, outer)?;
            let scope = with_outer(&input);
            let mut out = Vec::new();
            for (e, c) in p.expr.iter().zip(p.schema.columns()) {
                let e = outer_as_columns(e);
                if pseudonym_argument(&e).is_some() {
                    return Err(checker.shape("pseudonym() inside a relational fragment"));
                }
                let mut l = checker.lineage(&e, &scope, p.input.schema())?;
                let source = match e.clone().unalias() {
                    Expr::Column(source) => find(&scope, &source),
                    _ => None,
                };
                l.direct = source.is_some_and(|s| s.direct);
                l.form = form_of(&e, &scope, p.input.schema());
                out.push((c, l));
            }
            out
        }
        LogicalPlan::SubqueryAlias(a) => {
            let input = trace_base(checker, &a.input, outer)?;
            a.schema
                .columns()
                .into_iter()
                .zip(input.into_iter().map(|(_, l)| l))
                .collect()
        }
        LogicalPlan::Join(j) => {
            let left = trace_base(checker, &j.left, outer)?;
            let right = trace_base(checker, &j.right, outer)?;
            let mut both = left.clone();
            both.extend(right.iter().cloned());
            let scope = with_outer(&both);
            let schema = join_scope_schema(j);
            for (a, b) in &j.on {
                checker.lineage(a, &scope, &schema)?;
                checker.lineage(b, &scope, &schema)?;
            }
            if let Some(f) = &j.filter {
                checker.lineage(f, &scope, &schema)?;
            }
            match j.join_type {
                JoinType::LeftSemi | JoinType::LeftAnti => left,
                JoinType::RightSemi | JoinType::RightAnti => right,
                JoinType::LeftMark | JoinType::RightMark => {
                    return Err(checker.shape("a mark join is not accepted in a fragment"));
                }
                _ => {
                    // Requalify by the join's own output schema.
                    j.schema
                        .columns()
                        .into_iter()
                        .zip(both.into_iter().map(|(_, l)| l))
                        .collect()
                }
            }
        }
        LogicalPlan::Aggregate(agg) => {
            let input = trace_base(checker, &agg.input, outer)?;
            let schema = agg.input.schema();
            let columns = agg.schema.columns();
            let mut out = Vec::new();
            // Whatever is computed per group is information about the group's patient.
            let mut key_bases = BTreeSet::new();
            for (g, c) in agg.group_expr.iter().zip(&columns) {
                let mut l = checker.lineage(g, &input, schema)?;
                key_bases.extend(l.bases.iter().cloned());
                let source = match g.clone().unalias() {
                    Expr::Column(source) => find(&input, &source),
                    _ => None,
                };
                l.direct = source.is_some_and(|s| s.direct);
                l.form = form_of(g, &input, schema);
                out.push((c.clone(), l));
            }
            for (e, c) in agg.aggr_expr.iter().zip(columns.iter().skip(out.len())) {
                let call = match e {
                    Expr::Alias(a) => a.expr.as_ref(),
                    other => other,
                };
                let Expr::AggregateFunction(f) = call else {
                    return Err(checker.shape("an aggregate output is not an aggregate call"));
                };
                let mut bases = key_bases.clone();
                let mut smooth = true;
                for a in &f.params.args {
                    let l = checker.lineage(a, &input, schema)?;
                    bases.extend(l.bases);
                    smooth &= matches!(form_of(a, &input, schema), Form::Smooth { .. });
                }
                if let Some(flt) = &f.params.filter {
                    let l = checker.lineage(flt, &input, schema)?;
                    bases.extend(l.bases);
                }
                for o in &f.params.order_by {
                    let l = checker.lineage(&o.expr, &input, schema)?;
                    bases.extend(l.bases);
                    smooth = false;
                }
                // A patient's own min, max, sum or count of a value of the grammar is a new
                // value of it (an atom); anything else may single rows out.
                out.push((
                    c.clone(),
                    Lineage {
                        bases,
                        direct: false,
                        pseudonym: false,
                        form: if smooth { Form::COLUMN } else { Form::Other },
                    },
                ));
            }
            out
        }
        LogicalPlan::Window(w) => {
            let input = trace_base(checker, &w.input, outer)?;
            let schema = w.input.schema();
            let mut out = input.clone();
            let columns = w.schema.columns();
            for (e, c) in w.window_expr.iter().zip(columns.iter().skip(input.len())) {
                let mut bases = BTreeSet::new();
                if let Expr::WindowFunction(f) = e.clone().unalias() {
                    for x in f
                        .params
                        .args
                        .iter()
                        .chain(&f.params.partition_by)
                        .chain(f.params.order_by.iter().map(|o| &o.expr))
                    {
                        bases.extend(checker.lineage(x, &input, schema)?.bases);
                    }
                }
                out.push((
                    c.clone(),
                    Lineage {
                        bases,
                        direct: false,
                        pseudonym: false,
                        form: Form::Other,
                    },
                ));
            }
            // Requalify by the window's schema.
            columns
                .into_iter()
                .zip(out.into_iter().map(|(_, l)| l))
                .collect()
        }
        LogicalPlan::Sort(s) => {
            let input = trace_base(checker, &s.input, outer)?;
            for e in &s.expr {
                checker.lineage(&e.expr, &input, s.input.schema())?;
            }
            input
        }
        LogicalPlan::Distinct(Distinct::All(input)) => trace_base(checker, input, outer)?,
        LogicalPlan::Union(u) => {
            let mut merged: Option<Vec<(Column, Lineage)>> = None;
            for i in &u.inputs {
                let l = trace_base(checker, i, outer)?;
                merged = Some(match merged {
                    None => l,
                    Some(m) => m
                        .into_iter()
                        .zip(l)
                        .map(|((c, a), (_, b))| {
                            let mut bases = a.bases;
                            bases.extend(b.bases);
                            let same = a.form == b.form;
                            (
                                c,
                                Lineage {
                                    bases,
                                    direct: a.direct && b.direct,
                                    pseudonym: false,
                                    form: if same { a.form } else { Form::Other },
                                },
                            )
                        })
                        .collect(),
                });
            }
            u.schema
                .columns()
                .into_iter()
                .zip(merged.unwrap_or_default().into_iter().map(|(_, l)| l))
                .collect()
        }
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => plan
            .schema()
            .columns()
            .into_iter()
            .map(|c| (c, Lineage::default()))
            .collect(),
        other => {
            return Err(checker.shape(&format!(
                "{} is not accepted in a fragment",
                other.display()
            )));
        }
    })
}

/// A join's combined input schema, for typing its conditions.
fn join_scope_schema(j: &datafusion::logical_expr::Join) -> DFSchema {
    j.left
        .schema()
        .as_ref()
        .clone()
        .join(j.right.schema().as_ref())
        .unwrap_or_else(|_| j.schema.as_ref().clone())
}

/// Outer references as plain columns (their lineage is in the outer scope).
fn outer_as_columns(e: &Expr) -> Expr {
    e.clone()
        .transform_up(|e| {
            Ok(match e {
                Expr::OuterReferenceColumn(_, c) => Transformed::yes(Expr::Column(c)),
                other => Transformed::no(other),
            })
        })
        .map(|t| t.data)
        .unwrap_or_else(|_| e.clone())
}

/// Traces every subquery of a predicate (their columns are used, their literals checked),
/// and returns the predicate with each subquery replaced by what selects rows without it:
/// `EXISTS (…)` by `true`, `x IN (…)` by `x IS NOT NULL`.
fn subqueries_traced(
    checker: &mut Checker<'_>,
    predicate: &Expr,
    scope: &[(Column, Lineage)],
) -> Result<Expr, Refusal> {
    let mut plans = Vec::new();
    let _ = predicate.apply(|e| {
        match e {
            Expr::Exists(x) => plans.push(x.subquery.subquery.clone()),
            Expr::InSubquery(x) => plans.push(x.subquery.subquery.clone()),
            Expr::ScalarSubquery(s) => plans.push(s.subquery.clone()),
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    });
    for p in plans {
        trace_base(checker, &p, scope)?;
    }
    let stripped = predicate
        .clone()
        .transform_up(|e| {
            Ok(match e {
                Expr::Exists(_) => Transformed::yes(lit(true)),
                Expr::InSubquery(x) => Transformed::yes(x.expr.as_ref().clone().is_not_null()),
                Expr::ScalarSubquery(_) => Transformed::yes(lit(ScalarValue::Null)),
                other => Transformed::no(other),
            })
        })
        .map(|t| t.data)
        .map_err(|_| checker.shape("a subquery cannot be traced"))?;
    Ok(outer_as_columns(&stripped))
}
