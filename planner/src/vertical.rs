//! Vertically partitioned tables: the same patients' columns spread over several stations,
//! linked by keyed pseudonyms of a key column.
//!
//! ```text
//!   SELECT diagnosis, avg(worst_area) FROM breast WHERE mean_radius > 15 GROUP BY diagnosis
//!     station_a: SELECT pseudonym("patient_id") AS "__pseudonym", "diagnosis", "mean_radius"
//!                FROM "breast" WHERE "mean_radius" > 15
//!     station_c: SELECT pseudonym("patient_id") AS "__pseudonym", "worst_area" FROM "breast"
//!     station_b: SELECT pseudonym("patient_id") AS "__pseudonym" FROM "breast"
//!   hub: inner join on __pseudonym (every member, so the table means the patients all
//!        stations hold), then the query's aggregate over the joined rows, groups ≥ k
//! ```
//!
//! Each member station receives only the columns it holds that the query needs, and the
//! filters over those columns alone; a filter that mixes columns of two stations runs at
//! the hub after the join.

use std::collections::BTreeSet;

use datafusion::logical_expr::Expr;
use datafusion::logical_expr::utils::split_conjunction;
use railyard_contract::PSEUDONYM_COLUMN;
use railyard_udfs::pseudonym::PSEUDONYM;

use crate::error::Result;
use crate::sql::{SelectSql, expr_sql, quote_ident};

/// How a vertical table is spread over its stations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VerticalLayout {
    /// The linking column every member holds; never a column of the federated table.
    pub key: String,
    /// The members in station-name order, each with the columns it holds (key excluded).
    pub members: Vec<VerticalMember>,
}

/// One station of a vertical table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VerticalMember {
    pub station: String,
    pub columns: Vec<String>,
}

/// What one member station runs for a query over a vertical table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberFragment {
    pub station: String,
    /// `SELECT pseudonym(key) AS __pseudonym, <its needed columns> FROM table WHERE …`.
    pub sql: String,
    /// The columns it releases besides the pseudonym, in SQL order.
    pub columns: Vec<String>,
}

impl VerticalLayout {
    /// The member holding `column`.
    pub fn owner(&self, column: &str) -> Option<usize> {
        self.members
            .iter()
            .position(|m| m.columns.iter().any(|c| c == column))
    }

    /// The member whose columns cover every column of `filter` (a filter over no column,
    /// or over columns of several members, belongs to none and runs after the join).
    pub fn filter_owner(&self, filter: &Expr) -> Option<usize> {
        let owners: BTreeSet<Option<usize>> = filter
            .column_refs()
            .iter()
            .map(|c| self.owner(&c.name))
            .collect();
        match owners.into_iter().collect::<Vec<_>>().as_slice() {
            [Some(one)] => Some(*one),
            _ => None,
        }
    }

    /// Every member's fragment for a query that needs `columns` (in the order wanted) of
    /// `table`, with `filters` (over its columns) pushed to the member that can evaluate
    /// each alone. Every member takes part, even with no column: the table is the inner
    /// join of all of them.
    pub fn member_fragments(
        &self,
        table: &str,
        columns: &[String],
        filters: &[Expr],
    ) -> Result<Vec<MemberFragment>> {
        let mut out = Vec::with_capacity(self.members.len());
        for (i, member) in self.members.iter().enumerate() {
            let own: Vec<String> = columns
                .iter()
                .filter(|c| self.owner(c) == Some(i))
                .cloned()
                .collect();
            let mut items = vec![(
                format!("{PSEUDONYM}({})", quote_ident(&self.key)),
                PSEUDONYM_COLUMN.to_string(),
            )];
            items.extend(own.iter().map(|c| (quote_ident(c), c.clone())));
            // Conjuncts one by one, as the join station's optimizer hands them to its scan; a
            // conjunct that cannot be written as SQL stays at the join.
            let pushed: Vec<String> = filters
                .iter()
                .flat_map(|f| split_conjunction(f))
                .filter(|f| self.filter_owner(f) == Some(i))
                .filter_map(|f| expr_sql(f).ok())
                .collect();
            let from = quote_ident(table);
            let sql = SelectSql {
                table: &from,
                items,
                filters: pushed,
                group_by: vec![],
                limit: None,
            }
            .render();
            out.push(MemberFragment {
                station: member.station.clone(),
                sql,
                columns: own,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::{col, lit};

    use super::*;

    #[test]
    fn each_member_gets_its_columns_and_its_own_filters() {
        let layout = VerticalLayout {
            key: "patient_id".into(),
            members: vec![
                VerticalMember {
                    station: "a".into(),
                    columns: vec!["diagnosis".into(), "mean_radius".into()],
                },
                VerticalMember {
                    station: "b".into(),
                    columns: vec!["radius_error".into()],
                },
                VerticalMember {
                    station: "c".into(),
                    columns: vec!["worst_area".into()],
                },
            ],
        };
        let filters = vec![
            // A conjunction over two members: each half goes to its own member.
            col("mean_radius")
                .gt(lit(15.0))
                .and(col("radius_error").lt(lit(0.5))),
            // Mixes two members: stays at the hub.
            col("mean_radius").gt(col("worst_area")),
        ];
        let wanted = vec!["worst_area".to_string(), "diagnosis".to_string()];
        let f = layout
            .member_fragments("breast", &wanted, &filters)
            .unwrap();
        assert_eq!(
            f[0].sql,
            "SELECT pseudonym(\"patient_id\") AS \"__pseudonym\", \"diagnosis\" AS \"diagnosis\" \
             FROM \"breast\" WHERE (mean_radius > 15.0)"
        );
        assert_eq!(
            f[1].sql,
            "SELECT pseudonym(\"patient_id\") AS \"__pseudonym\" FROM \"breast\" \
             WHERE (radius_error < 0.5)"
        );
        assert_eq!(f[2].columns, vec!["worst_area".to_string()]);
        assert!(!f[2].sql.contains("WHERE"));
        assert_eq!(layout.filter_owner(&filters[1]), None);
        assert_eq!(layout.filter_owner(&lit(true)), None);
    }
}
