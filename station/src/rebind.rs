//! Model rounds that differ from an approved fragment only in their coefficients run that
//! fragment's physical plan with the new coefficients bound in, instead of being planned
//! from their text again.
//!
//! An iterative model (a GLM's Fisher scoring, a Cox fit's Newton steps) sends each station
//! one fragment per round, and the rounds of one fit differ only in the trailing numeric
//! literals of their `glm_terms(…)` or `survival_terms(…)` call: the coefficients. Planning
//! each round's text afresh (SQL to plan, the policy check, DataFusion's optimizers) cost a
//! station about 6 M instructions per round, five times what running it costs.
//!
//! What makes reusing the approval sound:
//! - the policy's decision on a model call does not depend on its coefficients' values: it
//!   asks only that each is a numeric literal (`railyard_policy`'s `model_call`); every other
//!   argument (family, intercept, columns, a Cox fit's resolution and minimum counts) is part
//!   of what must match;
//! - two fragments share a [`Shape`] only when their token streams are equal but for those
//!   coefficients (whitespace and comments aside, which the parser skips too), each of which
//!   must be a plain float literal (`0.5`, `-1.0e-3`), read the way DataFusion reads it;
//! - a plan is kept for its shape only when its model aggregates hold, in the coefficients'
//!   places, exactly the literals its text gave (bit for bit): so the new values go where
//!   planning the new text would have put them, and nowhere else (a literal argument of an
//!   aggregate is not folded, moved or shared by the optimizers);
//! - the release rules, the query-set auditor and the audit record run on every round as
//!   before, and the audit record holds the round's own text.
//!
//! Whatever does not fit (another function, an integer or a computed coefficient, two model
//! calls, a model call without an alias, tokens over a statement limit, a changed file) is
//! planned from its text as before.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::expressions::Literal;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use railyard_policy::Release;
use railyard_policy::limits::{MAX_STATEMENT_BYTES, check_tokens};
use railyard_udfs::glm_terms::{GLM_TERMS, glm_covariates};
use railyard_udfs::survival_terms::{SURVIVAL_TERMS, survival_covariates};
use sha2::{Digest, Sha256};

use crate::fragment::Approved;
use crate::kept::files_unchanged;

/// Distinct fragment shapes whose plans a station keeps; past it the cache starts over.
const ENTRIES: usize = 256;
/// Distinct rebound texts whose shapes a station remembers.
const TEXTS: usize = 1024;

/// A fragment's text with its model call's coefficients taken out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shape {
    /// The SHA-256 of the fragment's tokens (whitespace and comments left out), each
    /// written with `Debug` (which quotes and escapes what it holds, so that distinct token
    /// streams never write the same text) and ended by `\u{1}`, with a `?` in each
    /// coefficient's place. A digest, so that a long fragment does not make a long key.
    key: [u8; 32],
    /// The coefficients, in order, as DataFusion reads them.
    coefficients: Vec<f64>,
    /// How many arguments the model call has.
    arity: usize,
}

/// The shape of `sql`, if it holds exactly one model call (`glm_terms` or `survival_terms`)
/// whose coefficients are all plain float literals. The station's session reads SQL in the
/// generic dialect, which is the dialect tokenized here.
///
/// Its tokens must be within the statement limits that need no parser (`max_tokens`,
/// `max_depth`, …): a rebound round is never parsed, so those of the parser do not apply.
pub(crate) fn shape(sql: &str) -> Option<Shape> {
    if sql.len() > MAX_STATEMENT_BYTES || !mentions_a_model(sql) {
        return None;
    }
    let tokens: Vec<Token> = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .ok()?
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    check_tokens(&tokens, "").ok()?;
    let mut calls = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| model_name(t).is_some());
    let (name_at, name) = calls.next().map(|(i, t)| (i, model_name(t)))?;
    if calls.next().is_some() {
        return None;
    }
    let args = arguments(&tokens, name_at + 1)?;
    let coefficients = match name? {
        Model::Glm => {
            let intercept = match args.get(1).map(|r| &tokens[r.clone()]) {
                Some([Token::Word(w)]) if w.keyword == Keyword::TRUE => true,
                Some([Token::Word(w)]) if w.keyword == Keyword::FALSE => false,
                _ => return None,
            };
            let p = glm_covariates(args.len(), intercept)?;
            3 + p..args.len()
        }
        Model::Survival => 5 + survival_covariates(args.len())?..args.len(),
    };
    // Per token: kept in the key, the first token of a coefficient (a `?` in the key), or
    // another token of one (left out).
    const KEEP: u8 = 0;
    const FIRST: u8 = 1;
    const REST: u8 = 2;
    let mut values = Vec::with_capacity(coefficients.len());
    let mut role = vec![KEEP; tokens.len()];
    for arg in &args[coefficients] {
        values.push(float_literal(&tokens[arg.clone()])?);
        role[arg.clone()].fill(REST);
        role[arg.start] = FIRST;
    }
    let mut key = Sha256::new();
    let mut written = String::new();
    for (token, role) in tokens.iter().zip(role) {
        match role {
            KEEP => {
                written.clear();
                write!(written, "{token:?}\u{1}").ok()?;
                key.update(written.as_bytes());
            }
            FIRST => key.update("?\u{1}".as_bytes()),
            _ => {}
        }
    }
    Some(Shape {
        key: key.finalize().into(),
        coefficients: values,
        arity: args.len(),
    })
}

/// Whether `sql` holds a model aggregate's name anywhere, in any case: a fragment that does
/// not is no model round, and is not tokenized to learn so (every fragment a station plans
/// afresh is asked).
fn mentions_a_model(sql: &str) -> bool {
    [GLM_TERMS, SURVIVAL_TERMS].iter().any(|name| {
        sql.as_bytes()
            .windows(name.len())
            .any(|w| w.eq_ignore_ascii_case(name.as_bytes()))
    })
}

enum Model {
    Glm,
    Survival,
}

/// Which model aggregate the word `t` names, however it is quoted.
fn model_name(t: &Token) -> Option<Model> {
    let Token::Word(w) = t else { return None };
    if w.value.eq_ignore_ascii_case(GLM_TERMS) {
        Some(Model::Glm)
    } else if w.value.eq_ignore_ascii_case(SURVIVAL_TERMS) {
        Some(Model::Survival)
    } else {
        None
    }
}

/// The token ranges of the arguments of the call whose `(` is at `open`: split at the commas
/// outside any nested bracket, up to the matching `)`.
fn arguments(tokens: &[Token], open: usize) -> Option<Vec<std::ops::Range<usize>>> {
    if !matches!(tokens.get(open), Some(Token::LParen)) {
        return None;
    }
    let mut args = Vec::new();
    let (mut depth, mut start) = (0usize, open + 1);
    for (i, token) in tokens.iter().enumerate().skip(open + 1) {
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => depth += 1,
            Token::RParen if depth == 0 => {
                if i > start {
                    args.push(start..i);
                } else if !args.is_empty() {
                    return None;
                }
                return Some(args);
            }
            Token::RParen | Token::RBracket | Token::RBrace => depth = depth.checked_sub(1)?,
            Token::Comma if depth == 0 => {
                if i == start {
                    return None;
                }
                args.push(start..i);
                start = i + 1;
            }
            _ => {}
        }
    }
    None
}

/// The value of a plain float literal (`0.5`, `1.0e-3`, `-2.5`) as DataFusion's SQL planner
/// reads it (`f64` from the text, the sign included), if it is finite. Integers (which
/// DataFusion reads as `Int64`), numbers with `_` separators and anything else are not.
fn float_literal(tokens: &[Token]) -> Option<f64> {
    let (negative, text) = match tokens {
        [Token::Number(text, false)] => (false, text),
        [Token::Minus, Token::Number(text, false)] => (true, text),
        _ => return None,
    };
    if !text.contains(['.', 'e', 'E']) || text.contains('_') {
        return None;
    }
    let signed = if negative {
        format!("-{text}")
    } else {
        text.clone()
    };
    if signed.parse::<i64>().is_ok() || signed.parse::<u64>().is_ok() {
        return None;
    }
    signed.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// An approved fragment's plan kept for its shape.
struct Shaped {
    approved: Approved,
    physical: Arc<dyn ExecutionPlan>,
    shape: Shape,
}

/// Physical plans of approved model fragments, by [`Shape`].
#[derive(Default)]
pub(crate) struct Rebinder {
    shapes: Mutex<HashMap<[u8; 32], Shaped>>,
    /// The shapes of texts rebound before, by the SHA-256 of their text (a fit asked again
    /// sends the same texts), so that they are not tokenized again.
    texts: Mutex<HashMap<[u8; 32], Shape>>,
}

impl Rebinder {
    /// Keeps `physical`, the plan of the approved fragment `sql`, for its shape, if its
    /// model aggregates hold the text's coefficients as literals in their places. The
    /// caller keeps only plans it would keep by text (see `kept.rs`).
    ///
    /// Not kept: a differentially private release (which plans from the logical plan), and
    /// a fragment whose output names show the model call (`glm_terms(…)` without an alias
    /// is named after its coefficients, and the released schema is the kept fragment's).
    pub(crate) fn keep(&self, sql: &str, approved: &Approved, physical: &Arc<dyn ExecutionPlan>) {
        if matches!(approved.release, Release::Dp(_))
            || approved.plan.schema().fields().iter().any(|f| {
                let name = f.name().to_ascii_lowercase();
                name.contains(GLM_TERMS) || name.contains(SURVIVAL_TERMS)
            })
        {
            return;
        }
        let Some(shape) = shape(sql) else { return };
        if bind(physical, &shape, &shape.coefficients)
            .ok()
            .flatten()
            .is_none()
        {
            return;
        }
        let mut shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
        if shapes.len() >= ENTRIES {
            shapes.clear();
        }
        shapes.insert(
            shape.key,
            Shaped {
                approved: approved.clone(),
                physical: Arc::clone(physical),
                shape,
            },
        );
    }

    /// The approval and a fresh physical plan for `sql`, if it has the shape of a kept
    /// fragment whose files have not changed: the kept plan with `sql`'s coefficients bound
    /// in. The approval's logical plan is the kept fragment's (same schema, other
    /// coefficients): it serves for the released schema only, never to plan.
    ///
    /// Nothing parses a rebound text: it is only tokenized, which does not recurse, and held
    /// to the statement limits that need no parser (its length, tokens, operators, depth,
    /// nesting; see [`shape`]). A text over one is planned, and refused, from its text.
    pub(crate) fn rebind(&self, sql: &str) -> Result<Option<(Approved, Arc<dyn ExecutionPlan>)>> {
        if sql.len() > MAX_STATEMENT_BYTES || !mentions_a_model(sql) {
            return Ok(None);
        }
        let text: [u8; 32] = Sha256::digest(sql.as_bytes()).into();
        let known = {
            let texts = self.texts.lock().unwrap_or_else(|p| p.into_inner());
            texts.get(&text).cloned()
        };
        let (shape, known) = match known {
            Some(shape) => (shape, true),
            None => match shape(sql) {
                Some(shape) => (shape, false),
                None => return Ok(None),
            },
        };
        let (approved, physical, kept) = {
            let shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
            let Some(shaped) = shapes.get(&shape.key) else {
                return Ok(None);
            };
            (
                shaped.approved.clone(),
                Arc::clone(&shaped.physical),
                shaped.shape.clone(),
            )
        };
        if !files_unchanged(&physical) {
            let mut shapes = self.shapes.lock().unwrap_or_else(|p| p.into_inner());
            shapes.remove(&shape.key);
            return Ok(None);
        }
        let fresh = reset_plan_states(physical)?;
        let Some(plan) = bind(&fresh, &kept, &shape.coefficients)? else {
            return Ok(None);
        };
        if !known {
            let mut texts = self.texts.lock().unwrap_or_else(|p| p.into_inner());
            if texts.len() >= TEXTS {
                texts.clear();
            }
            texts.insert(text, shape);
        }
        Ok(Some((approved, plan)))
    }
}

/// `plan` with the coefficients of `from` (the shape it was planned from) in its model
/// aggregates replaced by `to`; `None` if it has no model aggregate, or one whose arguments
/// are not as many as `from`'s call had, ending in exactly its coefficients as literals.
fn bind(
    plan: &Arc<dyn ExecutionPlan>,
    from: &Shape,
    to: &[f64],
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let mut bound = 0usize;
    let mut mismatch = false;
    let plan = Arc::clone(plan).transform_up(|node| {
        let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
            return Ok(Transformed::no(node));
        };
        let mut changed = false;
        let mut exprs = Vec::with_capacity(aggregate.aggr_expr().len());
        for expr in aggregate.aggr_expr() {
            let name = expr.fun().name();
            if name != GLM_TERMS && name != SURVIVAL_TERMS {
                exprs.push(Arc::clone(expr));
                continue;
            }
            match rebound_call(expr, from, to) {
                Some(new) => {
                    exprs.push(Arc::new(new));
                    changed = true;
                    bound += 1;
                }
                None => {
                    mismatch = true;
                    return Ok(Transformed::new(node, false, TreeNodeRecursion::Stop));
                }
            }
        }
        if !changed {
            return Ok(Transformed::no(node));
        }
        let new: Arc<dyn ExecutionPlan> = Arc::new(aggregate.with_new_aggr_exprs(exprs));
        Ok(Transformed::yes(new))
    })?;
    Ok((bound > 0 && !mismatch).then_some(plan.data))
}

/// The model aggregate `expr` with its trailing literals, the coefficients of `from`,
/// replaced by `to`; `None` unless it has as many arguments as `from`'s call and ends in
/// exactly those literals.
fn rebound_call(
    expr: &AggregateFunctionExpr,
    from: &Shape,
    to: &[f64],
) -> Option<AggregateFunctionExpr> {
    let mut args = expr.expressions();
    if args.len() != from.arity || to.len() != from.coefficients.len() {
        return None;
    }
    let first = args.len().checked_sub(to.len()).filter(|&f| f > 0)?;
    let from = &from.coefficients;
    for (arg, (old, new)) in args[first..].iter_mut().zip(from.iter().zip(to)) {
        let literal = arg.downcast_ref::<Literal>()?;
        match literal.value() {
            ScalarValue::Float64(Some(v)) if v.to_bits() == old.to_bits() => {}
            _ => return None,
        }
        *arg = Arc::new(Literal::new(ScalarValue::Float64(Some(*new))));
    }
    let order_by = expr
        .order_bys()
        .iter()
        .map(|s| Arc::clone(&s.expr))
        .collect();
    expr.with_new_expressions(args, order_by)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUND: &str = "SELECT glm_terms('binomial', true, \"diagnosis\", \"mean_radius\", \
                         \"mean_texture\", 0.5, -1.25e-3, 0.0) AS terms FROM t WHERE x > 1.5";

    #[test]
    fn rounds_share_a_shape_when_only_their_coefficients_differ() {
        let a = shape(ROUND).unwrap();
        assert_eq!(a.coefficients, vec![0.5, -1.25e-3, 0.0]);
        let b = shape(&ROUND.replace("0.5, -1.25e-3, 0.0", "-3.0, 2.0e10,   1.0")).unwrap();
        assert_eq!(b.coefficients, vec![-3.0, 2.0e10, 1.0]);
        assert_eq!(a.key, b.key);
        // Whitespace and comments are not part of it.
        let c = shape(&ROUND.replace(" AS terms", " /* round 2 */ AS\n terms")).unwrap();
        assert_eq!(a.key, c.key);
    }

    #[test]
    fn anything_but_the_coefficients_changes_the_shape() {
        let a = shape(ROUND).unwrap().key;
        for other in [
            ROUND.replace("x > 1.5", "x > 2.5"),
            ROUND.replace("'binomial'", "'poisson'"),
            ROUND.replace("true", "false").replace("0.5, ", ""),
            ROUND.replace("\"mean_texture\"", "\"mean_area\""),
            ROUND.replace("FROM t", "FROM u"),
            ROUND.replace("AS terms", "AS other"),
        ] {
            match shape(&other) {
                Some(s) => assert_ne!(s.key, a, "{other}"),
                None => panic!("{other} has no shape"),
            }
        }
        // A string that reads like two arguments is one token, quoted in the key.
        let quoted = shape("SELECT glm_terms('a'', ''b', true, y, x, 0.5, 0.5) FROM t").unwrap();
        let split = shape("SELECT glm_terms('a', 'b', true, y, x, 0.5, 0.5) FROM t");
        assert!(split.is_none_or(|s| s.key != quoted.key));
    }

    #[test]
    fn only_plain_float_coefficients_of_one_model_call_take_part() {
        for sql in [
            // An integer is read as Int64, a computed value is no literal.
            ROUND.replace("0.5,", "1,"),
            ROUND.replace("0.5,", "0.5 + 0.0,"),
            ROUND.replace("0.5,", "(0.5),"),
            ROUND.replace("0.5,", "- -0.5,"),
            ROUND.replace("0.5,", "1_0.5,"),
            ROUND.replace("0.5,", "1.0e999,"),
            ROUND.replace("0.5,", "\"x\","),
            // Two model calls, or none.
            format!("{ROUND} UNION ALL {ROUND}"),
            "SELECT sum(x) FROM t".to_string(),
            // Not as many coefficients as design columns.
            ROUND.replace("0.5, ", ""),
            "SELECT glm_terms('binomial', maybe, y, x, 0.5, 0.5) FROM t".to_string(),
            "SELECT glm_terms('binomial', true, y, x, 0.5, 0.5 FROM t".to_string(),
            // Over a statement limit that needs no parser (max_depth): planned, and
            // refused, from its text.
            format!("{ROUND}{}", " + x".repeat(150)),
        ] {
            assert_eq!(shape(&sql), None, "{sql}");
        }
        // Cox: the resolution and minimum counts are no coefficients.
        let cox = "SELECT survival_terms(t, e, 30.0, 5.0, 2.0, age, sex, 0.1, -0.2) FROM lung";
        let s = shape(cox).unwrap();
        assert_eq!(s.coefficients, vec![0.1, -0.2]);
        let coarser = shape(&cox.replace("30.0", "60.0")).unwrap();
        assert_ne!(coarser.key, s.key);
    }

    /// The breast cancer file of station `part` (a, b, c).
    fn part(part: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "../tests/data/breast_cancer/horizontal/parquet/station_{part}.parquet"
        ))
    }

    /// A station over `dir/data.parquet` as `breast_cancer`, under the default policy.
    async fn station(dir: &std::path::Path, name: &str) -> crate::Station {
        station_over(dir, name, "breast_cancer", dir.join("data.parquet")).await
    }

    /// A station over `file` as `table`, under the default policy.
    async fn station_over(
        dir: &std::path::Path,
        name: &str,
        table: &str,
        file: std::path::PathBuf,
    ) -> crate::Station {
        let tables = [crate::TableFile {
            name: table.into(),
            path: file,
            format: crate::Format::Parquet,
            schema: None,
        }];
        let config = crate::StationConfig {
            policy: crate::Policy::default(),
            audit_log: dir.join(name).join("audit.jsonl"),
            collaboration_secret: None,
            hub_secret: None,
        };
        crate::Station::open(name, &tables, config).await.unwrap()
    }

    fn round(b: [&str; 3]) -> String {
        format!(
            "SELECT glm_terms('binomial', true, \"diagnosis\", \"mean_radius\", \"mean_texture\", \
             {}, {}, {}) AS \"terms\" FROM \"breast_cancer\" WHERE (diagnosis IS NOT NULL) AND \
             (mean_radius IS NOT NULL) AND (mean_texture IS NOT NULL)",
            b[0], b[1], b[2]
        )
    }

    fn fragment_ticket(sql: &str) -> railyard_contract::FragmentTicket {
        railyard_contract::FragmentTicket {
            query_id: "q".into(),
            fragment: 1,
            researcher: "test".into(),
            collaboration: String::new(),
            epsilon: None,
            sql: sql.into(),
            train: None,
        }
    }

    /// The released `glm_terms` sums of `station`'s answer to `sql`, as bits.
    async fn terms(station: &crate::Station, sql: &str) -> Vec<u64> {
        use arrow::array::AsArray;
        use futures::TryStreamExt;
        let ticket = fragment_ticket(sql);
        let stream = station.run_fragment(&ticket).await.unwrap();
        let batches: Vec<arrow::array::RecordBatch> = stream.try_collect().await.unwrap();
        let list = batches[0].column(0).as_list::<i32>();
        railyard_udfs::glm_terms::list_values(list, 0)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// Rounds with other coefficients run the first round's plan with theirs bound in, and
    /// answer exactly what a station planning their text afresh answers; a file that changes
    /// under a kept plan sends the next round back to planning.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_with_new_coefficients_answers_as_if_planned_afresh() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(part("a"), dir.path().join("data.parquet")).unwrap();
        let kept = station(dir.path(), "kept").await;
        let first = round(["0.0", "0.0", "0.0"]);
        terms(&kept, &first).await;
        assert_eq!(kept.rebinder.shapes.lock().unwrap().len(), 1);
        for b in [
            [
                "19.848841649516228",
                "-1.0570688502968781",
                "-0.21813564778105735",
            ],
            ["-3.5", "0.25", "1.0e-7"],
            ["40.0", "-2.0", "0.0"],
        ] {
            let sql = round(b);
            let ticket = fragment_ticket(&sql);
            assert!(kept.rebound(&ticket).is_some(), "{sql} is rebound");
            let fresh = station(dir.path(), &format!("fresh{}", b[0])).await;
            assert_eq!(
                terms(&kept, &sql).await,
                terms(&fresh, &sql).await,
                "{sql}: rebound and planned afresh"
            );
            // Its audit record holds its own text.
            let log = std::fs::read_to_string(dir.path().join("kept/audit.jsonl")).unwrap();
            let last: serde_json::Value =
                serde_json::from_str(log.lines().last().unwrap()).unwrap();
            assert_eq!(last["sql"], sql.as_str());
            assert_eq!(last["decision"], "allowed");
        }
        // A model call without an alias is named after its coefficients: not kept.
        let unnamed = round(["0.0", "0.0", "0.0"]).replace(" AS \"terms\"", "");
        terms(&kept, &unnamed).await;
        let ticket = fragment_ticket(&unnamed.replace("0.0, 0.0, 0.0", "0.5, 0.5, 0.5"));
        assert!(
            kept.rebound(&ticket).is_none(),
            "an unaliased call is planned afresh"
        );
        // Another filter is another fragment.
        let other = round(["0.5", "0.5", "0.5"])
            .replace("IS NOT NULL)", "IS NOT NULL) AND (mean_radius > 10.0)");
        let ticket = fragment_ticket(&other);
        assert!(kept.rebound(&ticket).is_none());
        // The file is replaced by another: the next round is planned over it.
        let next = round(["1.5", "-0.5", "0.125"]);
        std::fs::copy(part("b"), dir.path().join("data.parquet")).unwrap();
        let ticket = fragment_ticket(&next);
        assert!(
            kept.rebound(&ticket).is_none(),
            "a changed file is planned afresh"
        );
        let fresh = station(dir.path(), "fresh_b").await;
        assert_eq!(terms(&kept, &next).await, terms(&fresh, &next).await);
    }

    /// A Cox fit's rounds too: only the trailing coefficients are bound; the resolution and
    /// the minimum counts before them are part of the shape.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cox_round_with_new_coefficients_answers_as_if_planned_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let lung = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/lung/horizontal/parquet/station_a.parquet");
        let round = |b: &str| {
            format!(
                "SELECT survival_terms(\"time\", \"status\", 7.0, 5, 5, \"age\", \"sex\", {b}) AS \
                 \"terms\" FROM \"lung\" WHERE (\"time\" IS NOT NULL) AND (\"status\" IS NOT NULL) \
                 AND (age IS NOT NULL) AND (sex IS NOT NULL)"
            )
        };
        let kept = station_over(dir.path(), "kept", "lung", lung.clone()).await;
        terms(&kept, &round("0.0, 0.0")).await;
        for b in ["0.022086814296979312, -0.5258195053644209", "0.03, -0.4"] {
            let sql = round(b);
            let ticket = fragment_ticket(&sql);
            assert!(kept.rebound(&ticket).is_some(), "{sql} is rebound");
            let fresh = station_over(dir.path(), &format!("fresh{b}"), "lung", lung.clone()).await;
            assert_eq!(terms(&kept, &sql).await, terms(&fresh, &sql).await, "{sql}");
        }
        // Coefficients under which one row dominates a sum: refused, rebound or not.
        let dominated = round("-0.1, 1.0e-3");
        let ticket = fragment_ticket(&dominated);
        assert!(kept.rebound(&ticket).is_some());
        let fresh = station_over(dir.path(), "fresh_dominated", "lung", lung.clone()).await;
        for station in [&kept, &fresh] {
            match station.run_fragment(&ticket).await {
                Err(crate::Error::Refused(refusal)) => {
                    assert_eq!(refusal.rule, railyard_policy::Rule::ModelDominance)
                }
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("{dominated} was released"),
            }
        }
        let coarser = round("0.5, 0.5").replace("7.0", "14.0");
        let ticket = fragment_ticket(&coarser);
        assert!(
            kept.rebound(&ticket).is_none(),
            "another resolution is another shape"
        );
    }
}
