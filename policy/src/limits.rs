//! Limits on a statement, checked on its tokens before anything parses it into a tree.
//!
//! A sum of 2,000 `+` terms is an 8 KB query, but a tree 2,000 levels deep: every recursive
//! walk over it (the SQL planner's, the optimizer's, the policy check's, the unparser's)
//! runs the stack out and aborts the whole process. Growing the stack only moves the limit,
//! so the statement is measured first, by a tokenizer that does not recurse, and refused
//! over any limit with rule `query_too_complex`, naming the limit. The hub applies it to a
//! researcher's statement, every station to every fragment it receives. (A model round that
//! differs from an approved fragment only in its coefficients is not parsed: the station
//! holds its tokens to the limits here that need no parser, and runs the approved plan with
//! the new coefficients, see `station/src/rebind.rs`.)
//!
//! Shallow is not yet cheap: the SQL parser backtracks. A reserved word that fails to parse
//! as its own construct (`NOT …`, `CAST(…)`) is parsed again as a function name, so a chain
//! of 40 `NOT (` around anything that fails below (its own recursion limit, or a typo) is
//! parsed 2^40 times: minutes of a core for a 200-byte statement, within every limit above.
//! And some nesting passes the parser's own recursion limit (`INTERVAL INTERVAL … '1'`).
//! So the statement is then parsed once more, exactly as DataFusion will parse it, with a
//! dialect that counts the parser's steps and how deeply expressions nest, and stops it
//! past a budget proportional to the statement's length (limit `max_parse_steps`) or past
//! a depth (limit `max_parse_depth`). What DataFusion then parses is known to finish in as
//! many steps, as deep.

use std::cell::Cell;

use datafusion::sql::parser::DFParserBuilder;
use datafusion::sql::sqlparser::ast::{Expr, Statement};
use datafusion::sql::sqlparser::dialect::{Dialect, GenericDialect};
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
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
/// Most parser steps (an expression or operator begun) per token of the statement, plus
/// [`PARSE_STEPS_BASE`]. The SQL corpus takes at most 1.12 per token (a test keeps the
/// budget four times that); backtracking takes twice as many per nested level.
pub const MAX_PARSE_STEPS_PER_TOKEN: usize = 16;
/// Parser steps every statement may take, however short.
pub const PARSE_STEPS_BASE: usize = 4_096;
/// Deepest nesting of expressions the parser may begin, one inside the next. Its own
/// recursion limit (50, DataFusion's default) bounds most nesting, but not all:
/// `INTERVAL INTERVAL … '1'` parses each word's operand without it, with no parentheses
/// or operators for the limits above to see, and 20,000 such words ran a worker's stack out.
pub const MAX_PARSE_DEPTH: usize = 100;

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
    let count = check_tokens(&tokens, who)?;
    let budget = PARSE_STEPS_BASE + MAX_PARSE_STEPS_PER_TOKEN * count;
    let parse = parse_cost(sql, budget);
    if parse.depth > MAX_PARSE_DEPTH {
        return Err(too_complex(
            who,
            format!(
                "the parser nests expressions in it deeper than {MAX_PARSE_DEPTH} \
                 (limit max_parse_depth)"
            ),
        ));
    }
    if parse.steps > budget {
        return Err(too_complex(
            who,
            format!(
                "parsing it takes more than {MAX_PARSE_STEPS_PER_TOKEN} steps per token \
                 (limit max_parse_steps)"
            ),
        ));
    }
    Ok(())
}

/// Refuses a statement whose tokens are over a limit that does not need the parser (all
/// but `max_parse_steps` and `max_parse_depth`); otherwise answers how many tokens it has,
/// whitespace and comments aside.
pub fn check_tokens(tokens: &[Token], who: &str) -> Result<usize, Refusal> {
    // Operators of the expression being read, per open parenthesis; a comma or a clause
    // keyword starts a new expression at its level.
    let mut levels: Vec<usize> = vec![0];
    let (mut deepest, mut deepest_expression, mut operators, mut count) = (0, 0, 0, 0);
    let mut blocks = 0;
    for token in tokens {
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
    Ok(count)
}

/// What parsing a statement cost.
#[derive(Debug, Clone, Copy)]
pub struct ParseCost {
    /// Steps taken, up to the budget and then some number above it.
    pub steps: usize,
    /// The deepest nesting of expressions begun, up to [`MAX_PARSE_DEPTH`] + 1.
    pub depth: usize,
}

/// The cost of DataFusion's parse of `sql`, stopped once past `budget` steps or
/// [`MAX_PARSE_DEPTH`]. A statement that does not parse costs what was spent finding out.
/// Safe on any thread: the metered parse grows its stack as it goes.
pub fn parse_cost(sql: &str, budget: usize) -> ParseCost {
    let dialect = MeteredDialect {
        budget,
        ..MeteredDialect::default()
    };
    let recursion_limit = datafusion::config::SqlParserOptions::default()
        .recursion_limit
        .get();
    let _ = DFParserBuilder::new(sql)
        .with_dialect(&dialect)
        .with_recursion_limit(recursion_limit)
        .build()
        .and_then(|mut parser| parser.parse_statements());
    ParseCost {
        steps: dialect.steps.get(),
        depth: dialect.deepest.get(),
    }
}

/// DataFusion's default dialect (`generic`), measuring the parser: it counts every
/// expression begun (`parse_prefix`) and operator looked for (`get_next_precedence`) as a
/// step, and wraps each expression's parse to know how deeply they nest (growing the
/// stack where needed, so that measuring never overflows it). Past the step budget or the
/// depth limit every step fails at once, so a backtracking parse unwinds in steps linear in
/// its depth. It overrides exactly what `GenericDialect` overrides, delegating to it, and
/// answers to `dialect_of!(… is GenericDialect)`; a test parses the SQL corpus both ways
/// and compares the trees.
#[derive(Debug, Default)]
struct MeteredDialect {
    steps: Cell<usize>,
    budget: usize,
    /// Expressions begun and not yet finished.
    depth: Cell<usize>,
    deepest: Cell<usize>,
    /// Set while this dialect itself asks the parser for the expression it wraps.
    wrapping: Cell<bool>,
}

impl MeteredDialect {
    fn step(&self) -> Result<(), ParserError> {
        let steps = self.steps.get() + 1;
        self.steps.set(steps);
        if steps > self.budget || self.deepest.get() > MAX_PARSE_DEPTH {
            Err(ParserError::RecursionLimitExceeded)
        } else {
            Ok(())
        }
    }
}

macro_rules! generic {
    ($($name:ident),* $(,)?) => {
        $(fn $name(&self) -> bool {
            GenericDialect {}.$name()
        })*
    };
}

impl Dialect for MeteredDialect {
    fn dialect(&self) -> std::any::TypeId {
        GenericDialect {}.dialect()
    }

    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        GenericDialect {}.is_delimited_identifier_start(ch)
    }

    fn is_identifier_start(&self, ch: char) -> bool {
        GenericDialect {}.is_identifier_start(ch)
    }

    fn is_identifier_part(&self, ch: char) -> bool {
        GenericDialect {}.is_identifier_part(ch)
    }

    fn parse_prefix(&self, parser: &mut Parser) -> Option<Result<Expr, ParserError>> {
        if self.wrapping.replace(false) {
            // The call made below: the parser goes on as GenericDialect has it.
            return GenericDialect {}.parse_prefix(parser);
        }
        if let Err(e) = self.step() {
            return Some(Err(e));
        }
        let depth = self.depth.get() + 1;
        self.depth.set(depth);
        self.deepest.set(self.deepest.get().max(depth));
        let parsed = if depth > MAX_PARSE_DEPTH {
            Err(ParserError::RecursionLimitExceeded)
        } else {
            self.wrapping.set(true);
            stacker::maybe_grow(256 * 1024, 2 * 1024 * 1024, || parser.parse_prefix())
        };
        self.wrapping.set(false);
        self.depth.set(depth - 1);
        Some(parsed)
    }

    fn get_next_precedence(&self, parser: &Parser) -> Option<Result<u8, ParserError>> {
        match self.step() {
            Ok(()) => GenericDialect {}.get_next_precedence(parser),
            Err(e) => Some(Err(e)),
        }
    }

    fn parse_statement(&self, parser: &mut Parser) -> Option<Result<Statement, ParserError>> {
        GenericDialect {}.parse_statement(parser)
    }

    generic!(
        supports_unicode_string_literal,
        supports_partition_by_after_order_by,
        supports_array_join_syntax,
        supports_group_by_expr,
        supports_group_by_with_modifier,
        supports_left_associative_joins_without_parens,
        supports_connect_by,
        supports_match_recognize,
        supports_pipe_operator,
        supports_start_transaction_modifier,
        supports_window_function_null_treatment_arg,
        supports_dictionary_syntax,
        supports_window_clause_named_window_reference,
        supports_parenthesized_set_variables,
        supports_select_wildcard_except,
        support_map_literal_syntax,
        allow_extract_custom,
        allow_extract_single_quotes,
        supports_extract_comma_syntax,
        supports_create_view_comment_syntax,
        supports_parens_around_table_factor,
        supports_values_as_table_factor,
        supports_create_index_with_clause,
        supports_explain_with_utility_options,
        supports_limit_comma,
        supports_update_order_by,
        supports_from_first_select,
        supports_projection_trailing_commas,
        supports_asc_desc_in_column_definition,
        supports_try_convert,
        supports_bitwise_shift_operators,
        supports_comment_on,
        supports_load_extension,
        supports_named_fn_args_with_assignment_operator,
        supports_struct_literal,
        supports_empty_projections,
        supports_nested_comments,
        supports_multiline_comment_hints,
        supports_user_host_grantee,
        supports_string_escape_constant,
        supports_array_typedef_with_brackets,
        supports_match_against,
        supports_set_names,
        supports_comma_separated_set_assignments,
        supports_filter_during_aggregation,
        supports_select_wildcard_exclude,
        supports_data_type_signed_suffix,
        supports_interval_options,
        supports_quote_delimited_string,
        supports_select_wildcard_replace,
        supports_select_wildcard_ilike,
        supports_select_wildcard_rename,
        supports_optimize_table,
        supports_install,
        supports_detach,
        supports_prewhere,
        supports_with_fill,
        supports_limit_by,
        supports_interpolate,
        supports_settings,
        supports_select_format,
        supports_comment_optimizer_hint,
        supports_constraint_keyword_without_name,
        supports_key_column_option,
        supports_comma_separated_trim,
        supports_cte_without_as,
        supports_select_item_multi_column_alias,
        supports_xml_expressions,
    );
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

    /// Every statement of the SQL corpus (`sql/**/*.slt`).
    fn corpus() -> Vec<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql");
        let mut files = vec![];
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "slt") {
                    files.push(path);
                }
            }
        }
        let mut statements = vec![];
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let mut current: Option<String> = None;
            for line in text.lines() {
                match current.as_mut() {
                    None if line.starts_with("query") || line.starts_with("statement") => {
                        current = Some(String::new());
                    }
                    None => {}
                    Some(sql) if line.trim().is_empty() || line.starts_with("----") => {
                        statements.push(std::mem::take(sql));
                        current = None;
                    }
                    Some(sql) => {
                        sql.push_str(line);
                        sql.push('\n');
                    }
                }
            }
            if let Some(sql) = current.filter(|s| !s.is_empty()) {
                statements.push(sql);
            }
        }
        statements
    }

    fn tokens(sql: &str) -> usize {
        Tokenizer::new(&GenericDialect {}, sql)
            .tokenize()
            .unwrap()
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .count()
    }

    #[test]
    fn the_metered_dialect_parses_the_corpus_as_datafusion_does_within_budget() {
        let statements = corpus();
        assert!(statements.len() > 200, "{} statements", statements.len());
        let (mut steepest, mut deepest) = (0.0f64, 0usize);
        for sql in &statements {
            let generic = DFParserBuilder::new(sql.as_str())
                .build()
                .and_then(|mut p| p.parse_statements())
                .map(|s| format!("{s:?}"))
                .map_err(|e| e.to_string());
            let dialect = MeteredDialect {
                budget: usize::MAX,
                ..MeteredDialect::default()
            };
            let metered = DFParserBuilder::new(sql.as_str())
                .with_dialect(&dialect)
                .build()
                .and_then(|mut p| p.parse_statements())
                .map(|s| format!("{s:?}"))
                .map_err(|e| e.to_string());
            assert_eq!(generic, metered, "{sql}");
            let steps = dialect.steps.get();
            steepest = steepest.max(steps as f64 / tokens(sql) as f64);
            deepest = deepest.max(dialect.deepest.get());
            assert_eq!(limit(sql), None, "{sql}");
        }
        // Room to spare: the budget is four times what the corpus needs at most.
        assert!(
            steepest * 4.0 <= MAX_PARSE_STEPS_PER_TOKEN as f64,
            "{steepest} steps per token"
        );
        // The deepest parse of the corpus, and the deepest a fragment is written (40
        // nested sums, as the hub writes a 40-term sum for a station), use far less stack
        // than allowed.
        let written = format!(
            "SELECT {}age{} FROM lung",
            "(".repeat(40),
            " + age)".repeat(40)
        );
        deepest = deepest.max(parse_cost(&written, usize::MAX).depth);
        eprintln!("corpus: {steepest:.2} steps per token, expressions nested {deepest} deep");
        assert!(deepest * 2 <= MAX_PARSE_DEPTH, "{deepest} deep");
    }

    #[test]
    fn a_statement_the_parser_would_backtrack_over_exponentially_is_refused() {
        let wrap = |n: usize, open: &str, close: &str, inner: &str| {
            format!(
                "SELECT count(*) FROM lung WHERE {}{inner}{}",
                open.repeat(n),
                close.repeat(n)
            )
        };
        // A short chain is a statement like any other, valid or not.
        assert_eq!(limit(&wrap(3, "NOT (", ")", "age > 1")), None);
        assert_eq!(limit(&wrap(3, "NOT (", ")", "age > )")), None);
        // 40 parsed 2^10 times more than 30, which took 20 ms: minutes. Refused at once,
        // whether it fails at the parser's recursion limit or at a typo.
        for inner in ["age > 1", "age > )"] {
            for n in [40, 60] {
                let refusal = limit(&wrap(n, "NOT (", ")", inner)).unwrap();
                assert!(refusal.contains("max_parse_steps"), "{refusal}");
            }
        }
        // Other reserved words that fall back to a function call nest the same way.
        for (open, close) in [("CAST(", " AS DOUBLE)"), ("TRY_CAST(", " AS DOUBLE)")] {
            let refusal = limit(&wrap(40, open, close, "age > )")).unwrap();
            assert!(refusal.contains("max_parse_steps"), "{open}: {refusal}");
        }
        // The metered parse itself stops at its budget, however deep the backtracking.
        let deep = wrap(60, "NOT (", ")", "age > )");
        let steps = parse_cost(&deep, 10_000).steps;
        assert!((10_000..10_000 + 1_000).contains(&steps), "{steps}");
    }

    #[test]
    fn a_prefix_chain_that_passes_no_recursion_counter_is_refused_before_it_runs_the_stack_out() {
        // `INTERVAL x` parses x as a prefix, without the parser's recursion counter: no
        // parentheses, no operators, and every word a new level of the parser's stack.
        // Measured here on a test's 2 MiB thread, where the plain parse overflowed.
        let chain = |n: usize| format!("SELECT {}'1' FROM lung", "INTERVAL ".repeat(n));
        assert_eq!(limit(&chain(2)), None);
        assert_eq!(limit(&chain(MAX_PARSE_DEPTH - 1)), None);
        for n in [MAX_PARSE_DEPTH + 1, 5_000, 28_000] {
            let refusal = limit(&chain(n)).unwrap();
            assert!(refusal.contains("max_parse_depth"), "{refusal}");
        }
    }
}
