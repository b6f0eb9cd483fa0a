//! Limits on a statement, checked on its tokens before anything parses it into a tree.
//!
//! A sum of 2,000 `+` terms is an 8 KB query, but a tree 2,000 levels deep: every recursive
//! walk over it (the SQL planner's, the optimizer's, the policy check's, the unparser's)
//! runs the stack out and aborts the whole process. Growing the stack only moves the limit,
//! so the statement is measured first, by a tokenizer that does not recurse, and refused
//! over any limit with rule `query_too_complex`, naming the limit. The hub applies it to a
//! researcher's statement, every station to every fragment it receives.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::rule::{Refusal, Rule};

/// Longest statement accepted, in bytes.
pub const MAX_STATEMENT_BYTES: usize = 256 * 1024;
/// Deepest expression: operators chained in one expression (`a + b + … `, `x AND y AND …`
/// is a tree as deep as it is long), plus the parentheses around them. A debug build's
/// 2 MiB worker stack overflows past about 220.
pub const MAX_DEPTH: usize = 100;
/// Most operators (`+`, `*`, `=`, `AND`, `OR`, `||`, …) in one statement.
pub const MAX_OPERATORS: usize = 5_000;
/// Deepest nesting of parentheses.
pub const MAX_NESTING: usize = 64;
/// Most tokens in one statement.
pub const MAX_TOKENS: usize = 50_000;
/// Most query blocks (`SELECT`s) and joins in one statement: a chain of 150 CTEs, each
/// reading the one before, is a plan 150 levels deep that no expression limit sees, and
/// ran a worker's stack out.
pub const MAX_QUERY_BLOCKS: usize = 64;

fn too_complex(who: &str, what: String) -> Refusal {
    Refusal {
        rule: Rule::QueryTooComplex,
        message: format!("policy: {who} refuses the statement: {what}"),
    }
}

/// Refuses a statement over the limits; `who` names the refuser ("the hub", "station 'x'").
pub fn check_statement(sql: &str, who: &str) -> Result<(), Refusal> {
    if sql.len() > MAX_STATEMENT_BYTES {
        return Err(too_complex(
            who,
            format!("it has more than {MAX_STATEMENT_BYTES} bytes (limit max_statement_bytes)"),
        ));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| too_complex(who, format!("it does not tokenize ({e})")))?;
    // Operators of the expression being read, per open parenthesis; a comma or a clause
    // keyword starts a new expression at its level.
    let mut levels: Vec<usize> = vec![0];
    let (mut deepest, mut deepest_expression, mut operators, mut count) = (0, 0, 0, 0);
    let mut blocks = 0;
    for token in &tokens {
        let operator = match token {
            Token::Whitespace(_) => continue,
            Token::LParen | Token::LBracket | Token::LBrace => {
                levels.push(0);
                deepest = deepest.max(levels.len() - 1);
                false
            }
            Token::RParen | Token::RBracket | Token::RBrace => {
                if levels.len() > 1 {
                    levels.pop();
                }
                false
            }
            Token::Comma | Token::SemiColon => {
                if let Some(l) = levels.last_mut() {
                    *l = 0;
                }
                false
            }
            Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::DuckIntDiv
            | Token::Mod
            | Token::StringConcat
            | Token::Eq
            | Token::DoubleEq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::Spaceship
            | Token::Caret
            | Token::Ampersand
            | Token::Pipe
            | Token::ShiftLeft
            | Token::ShiftRight
            | Token::Tilde
            | Token::DoubleColon
            | Token::Arrow
            | Token::LongArrow => true,
            Token::Word(w) => match w.keyword {
                Keyword::AND
                | Keyword::OR
                | Keyword::NOT
                | Keyword::XOR
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::BETWEEN
                | Keyword::IS
                | Keyword::IN => true,
                Keyword::SELECT | Keyword::JOIN => {
                    blocks += 1;
                    if let Some(l) = levels.last_mut() {
                        *l = 0;
                    }
                    false
                }
                Keyword::FROM
                | Keyword::WHERE
                | Keyword::GROUP
                | Keyword::HAVING
                | Keyword::ORDER
                | Keyword::LIMIT
                | Keyword::ON
                | Keyword::UNION
                | Keyword::WHEN
                | Keyword::THEN
                | Keyword::ELSE => {
                    if let Some(l) = levels.last_mut() {
                        *l = 0;
                    }
                    false
                }
                _ => false,
            },
            _ => false,
        };
        if operator {
            operators += 1;
            if let Some(l) = levels.last_mut() {
                *l += 1;
            }
            // Parentheses around one operator each (`((a + b) + c)`, as fragment SQL is
            // written) are no deeper than the chain: only the operators count here, the
            // nesting has its own limit.
            deepest_expression = deepest_expression.max(levels.iter().sum::<usize>());
        }
        count += 1;
    }
    if deepest_expression > MAX_DEPTH {
        return Err(too_complex(
            who,
            format!("an expression in it is deeper than {MAX_DEPTH} operators (limit max_depth)"),
        ));
    }
    if deepest > MAX_NESTING {
        return Err(too_complex(
            who,
            format!("it nests parentheses deeper than {MAX_NESTING} (limit max_nesting)"),
        ));
    }
    if operators > MAX_OPERATORS {
        return Err(too_complex(
            who,
            format!("it has more than {MAX_OPERATORS} operators (limit max_operators)"),
        ));
    }
    if blocks > MAX_QUERY_BLOCKS {
        return Err(too_complex(
            who,
            format!(
                "it has more than {MAX_QUERY_BLOCKS} SELECTs and JOINs (limit max_query_blocks)"
            ),
        ));
    }
    if count > MAX_TOKENS {
        return Err(too_complex(
            who,
            format!("it has more than {MAX_TOKENS} tokens (limit max_tokens)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(sql: &str) -> Option<String> {
        check_statement(sql, "the hub").err().map(|r| {
            assert_eq!(r.rule, Rule::QueryTooComplex);
            r.message
        })
    }

    #[test]
    fn deep_or_long_statements_are_refused_naming_the_limit() {
        let sum = |n: usize| format!("SELECT {} FROM lung", vec!["age"; n].join(" + "));
        assert_eq!(limit(&sum(90)), None);
        // The same sum as a hub writes it for a station, one pair of parentheses per `+`.
        let written = format!(
            "SELECT {}age{} FROM lung",
            "(".repeat(40),
            " + age)".repeat(40)
        );
        assert_eq!(limit(&written), None);
        assert!(limit(&sum(2000)).unwrap().contains("max_depth"));
        let chain = format!(
            "SELECT count(*) FROM lung WHERE {}",
            vec!["age > 1"; 300].join(" AND ")
        );
        assert!(limit(&chain).unwrap().contains("max_depth"));
        // Many short expressions are not one deep one; but their number is bounded too.
        let many = |n: usize| format!("SELECT {} FROM lung", vec!["age + 1"; n].join(", "));
        assert_eq!(limit(&many(1000)), None);
        assert!(limit(&many(6000)).unwrap().contains("max_operators"));
        let nested = format!("SELECT {}1{} FROM lung", "(".repeat(100), ")".repeat(100));
        assert!(limit(&nested).unwrap().contains("max_nesting"));
        let long = format!("SELECT '{}'", "x".repeat(MAX_STATEMENT_BYTES));
        assert!(limit(&long).unwrap().contains("max_statement_bytes"));
        // A chain of CTEs, each reading the one before, is a deep plan.
        let ctes = |n: usize| {
            let parts: Vec<String> = (0..n)
                .map(|i| match i {
                    0 => "t0 AS (SELECT * FROM lung)".to_string(),
                    i => format!("t{i} AS (SELECT * FROM t{})", i - 1),
                })
                .collect();
            format!("WITH {} SELECT count(*) FROM t{}", parts.join(", "), n - 1)
        };
        assert_eq!(limit(&ctes(20)), None);
        assert!(limit(&ctes(150)).unwrap().contains("max_query_blocks"));
        // A long IN list is flat: commas are not operators.
        let list: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
        assert_eq!(
            limit(&format!(
                "SELECT count(*) FROM lung WHERE patient_id IN ({})",
                list.join(", ")
            )),
            None
        );
    }
}
