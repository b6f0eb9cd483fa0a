//! Lineage: where every column of a fragment comes from, traced node by node, and the
//! checker that holds what the trace learned (the table, the columns used, the model and
//! pseudonym seen) and refuses a column by its visibility.

use super::*;

/// Where a column comes from: the table columns it is computed from, and whether it is one
/// of them unchanged.
#[derive(Debug, Clone, Default)]
pub(super) struct Lineage {
    pub(super) bases: BTreeSet<String>,
    pub(super) direct: bool,
    /// The column is `pseudonym(join_key)`, possibly renamed.
    pub(super) pseudonym: bool,
    /// What the column computes from the table's columns, in the grammar of
    /// [`super::form`].
    pub(super) form: Form,
}

/// The lineage of column `c` among a node's input columns.
pub(super) fn find<'a>(input: &'a [(Column, Lineage)], c: &Column) -> Option<&'a Lineage> {
    input
        .iter()
        .find(|(col, _)| col == c)
        .or_else(|| {
            let mut named = input.iter().filter(|(col, _)| col.name == c.name);
            match (c.relation.is_none(), named.next(), named.next()) {
                (true, Some(hit), None) => Some(hit),
                _ => None,
            }
        })
        .map(|(_, l)| l)
}

pub(super) struct Checker<'a> {
    pub(super) policy: &'a Policy,
    pub(super) station: &'a str,
    pub(super) table: String,
    /// A relational fragment's tables (empty for one table): a column name's visibility
    /// is the strictest among the tables that have it.
    pub(super) tables: Vec<(String, arrow::datatypes::SchemaRef)>,
    /// The privacy unit columns of the fragment's patient tables.
    pub(super) units: Vec<String>,
    /// Every table column referenced anywhere in the fragment.
    pub(super) used: BTreeSet<String>,
    /// The model aggregate of the fragment, if it has one.
    pub(super) model: Option<ModelCall>,
    /// Whether the fragment outputs `pseudonym(join_key)`.
    pub(super) pseudonymized: bool,
    /// Whether the fragment is a DP aggregate (`dp` columns may be read).
    pub(super) dp: bool,
    /// The index of the aggregate call being checked.
    pub(super) call: usize,
    /// Arguments of a non-linear form (a product, a ratio) with the index of their call:
    /// known weights (`1.0 * age / (patient_id * patient_id)`) could make one row dominate
    /// them, so the release holds each to the dominance rule.
    pub(super) nonlinear: Vec<(usize, Expr)>,
}

impl Checker<'_> {
    pub(super) fn column_refusal(&self, rule: Rule, column: &str, why: &str) -> Refusal {
        let visibility = self.visibility(column);
        Refusal {
            rule,
            message: format!(
                "policy: column '{column}' of table '{}' is '{visibility}' at station '{}'; {why}",
                self.table, self.station
            ),
        }
    }

    pub(super) fn shape(&self, why: &str) -> Refusal {
        Refusal {
            rule: Rule::FragmentShape,
            message: format!(
                "policy: station '{}' refuses the fragment: {why}",
                self.station
            ),
        }
    }

    pub(super) fn visibility(&self, column: &str) -> Visibility {
        let strictness = |v: Visibility| match v {
            Visibility::Public => 0,
            Visibility::Aggregate => 1,
            Visibility::Dp => 2,
            Visibility::JoinKey => 3,
            Visibility::Hidden => 4,
        };
        let having: Vec<Visibility> = self
            .tables
            .iter()
            .filter(|(_, s)| s.field_with_name(column).is_ok())
            .map(|(t, _)| self.policy.visibility(t, column))
            .collect();
        having
            .into_iter()
            .max_by_key(|v| strictness(*v))
            .unwrap_or_else(|| self.policy.visibility(&self.table, column))
    }

    /// Whether `expr` is a privacy unit column, unchanged.
    pub(super) fn is_unit(&self, expr: &Expr, input: &[(Column, Lineage)]) -> bool {
        let Expr::Column(c) = expr.clone().unalias() else {
            return false;
        };
        find(input, &c).is_some_and(|l| {
            l.direct && l.bases.len() == 1 && l.bases.iter().all(|b| self.units.contains(b))
        })
    }

    /// k for the fragment: the largest of its patient tables' (one table: that table's).
    pub(super) fn k(&self) -> u64 {
        self.tables
            .iter()
            .filter(|(t, _)| !self.policy.is_reference(t))
            .map(|(t, _)| self.policy.min_group_size(t))
            .max()
            .unwrap_or_else(|| self.policy.min_group_size(&self.table))
    }

    /// The table columns an expression is computed from, given its input's lineage.
    pub(super) fn lineage(
        &mut self,
        expr: &Expr,
        input: &[(Column, Lineage)],
        schema: &DFSchema,
    ) -> Result<Lineage, Refusal> {
        self.literals(expr)?;
        let mut out = Lineage::default();
        for c in expr.column_refs() {
            let Some(lineage) = find(input, c) else {
                return Err(self.shape(&format!("column '{}' cannot be traced", c.name)));
            };
            out.bases.extend(lineage.bases.iter().cloned());
        }
        for c in &out.bases {
            self.forbidden(c)?;
        }
        if let Some(c) = self.first_non_public(&out.bases)
            && let Some(what) = fallible(expr, schema)
        {
            return Err(self.column_refusal(
                Rule::FallibleExpression,
                &c,
                &format!(
                    "{what} can fail on particular values, and whether the fragment fails \
                     would reveal them"
                ),
            ));
        }
        self.used.extend(out.bases.iter().cloned());
        Ok(out)
    }

    /// Refuses subqueries and over-long string literals anywhere in an expression.
    pub(super) fn literals(&self, expr: &Expr) -> Result<(), Refusal> {
        let mut refusal = None;
        let _ = expr.apply(|e| {
            match e {
                Expr::ScalarSubquery(_)
                | Expr::InSubquery(_)
                | Expr::Exists(_)
                | Expr::SetComparison(_)
                | Expr::OuterReferenceColumn(..) => {
                    refusal = Some(self.shape("subqueries are not accepted in a fragment"));
                }
                Expr::Literal(
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::LargeUtf8(Some(s))
                    | ScalarValue::Utf8View(Some(s)),
                    _,
                ) if s.chars().count() > self.policy.max_string_literal => {
                    refusal = Some(Refusal {
                        rule: Rule::StringLiteral,
                        message: format!(
                            "policy: station '{}' accepts string literals of at most {} \
                             characters; the fragment has one of {}",
                            self.station,
                            self.policy.max_string_literal,
                            s.chars().count()
                        ),
                    });
                }
                _ => {}
            }
            Ok(if refusal.is_some() {
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            })
        });
        refusal.map_or(Ok(()), Err)
    }

    /// Accepts `pseudonym(key)` only over the table's `join_key` column, unchanged.
    pub(super) fn pseudonym(
        &mut self,
        key: &Expr,
        input: &[(Column, Lineage)],
    ) -> Result<(), Refusal> {
        let wrong = |checker: &Self| Refusal {
            rule: Rule::JoinKey,
            message: format!(
                "policy: station '{}' computes {PSEUDONYM}() only of table '{}''s join_key \
                 column, unchanged",
                checker.station, checker.table
            ),
        };
        let Expr::Column(c) = key else {
            return Err(wrong(self));
        };
        let Some(lineage) = find(input, c) else {
            return Err(self.shape(&format!("column '{}' cannot be traced", c.name)));
        };
        let Some(base) = lineage.bases.iter().next() else {
            return Err(wrong(self));
        };
        if !lineage.direct
            || lineage.bases.len() != 1
            || self.visibility(base) != Visibility::JoinKey
        {
            return Err(wrong(self));
        }
        self.pseudonymized = true;
        Ok(())
    }

    /// Refuses a column that may never appear, whatever the fragment does with it.
    pub(super) fn forbidden(&self, column: &str) -> Result<(), Refusal> {
        let (rule, why) = match self.visibility(column) {
            Visibility::Public | Visibility::Aggregate => return Ok(()),
            Visibility::Dp if self.dp => return Ok(()),
            Visibility::Hidden => (Rule::HiddenColumn, "it cannot be used in any query"),
            Visibility::JoinKey => (
                Rule::JoinKeyColumn,
                "it leaves a station only as a keyed pseudonym for linking tables",
            ),
            Visibility::Dp => (
                Rule::DpColumn,
                "it can only be used in differentially private aggregates",
            ),
        };
        Err(self.column_refusal(rule, column, why))
    }

    pub(super) fn first_non_public<'b>(
        &self,
        columns: impl IntoIterator<Item = &'b String>,
    ) -> Option<String> {
        columns
            .into_iter()
            .find(|c| self.visibility(c) != Visibility::Public)
            .cloned()
    }
}
