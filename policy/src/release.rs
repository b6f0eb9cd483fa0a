//! The post-run half of the rules: what of an approved fragment's result may leave.
//!
//! The check ([`crate::check`]) decided the [`Release`] before anything ran; here the
//! result is held to it: groups below k are suppressed, a global aggregate below k is refused,
//! model terms must cover enough rows and levels, survival times must pool, pseudonymized rows
//! and a train's input must cover k rows. Nothing here reads or writes anything: the station
//! audits what these functions decide.

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::filter_record_batch;
use datafusion::error::DataFusionError;
use railyard_udfs::glm_terms::GlmLayout;

use crate::check::{ROWS_COLUMN, Release};
use crate::rule::{Refusal, Rule};

/// What leaves: the batches, and how many groups (or rows) were released and suppressed.
#[derive(Debug)]
pub struct Released {
    pub batches: Vec<RecordBatch>,
    pub released: u64,
    pub suppressed: u64,
}

/// Why a result does not leave.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// A rule refuses the whole release.
    #[error("{0}")]
    Refused(Refusal),
    /// The result does not have the shape its release promised: a bug, not the user's fault.
    #[error("internal: {0}")]
    Internal(String),
}

fn refuse(station: &str, rule: Rule, why: String) -> ReleaseError {
    ReleaseError::Refused(Refusal {
        rule,
        message: format!("policy: station '{station}' {why}"),
    })
}

fn rows_of(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}

/// Applies `release` to the result of the fragment over `table`.
pub fn release(
    station: &str,
    table: &str,
    release: &Release,
    batches: Vec<RecordBatch>,
) -> Result<Released, ReleaseError> {
    match release {
        // Row-level public values, or groups over public columns only (k = 1): nothing
        // to withhold (an empty global aggregate still answers, with its zero count).
        Release::Rows | Release::Groups { k: 1, .. } => {
            let released = rows_of(&batches);
            Ok(Released {
                batches,
                released,
                suppressed: 0,
            })
        }
        Release::Pseudonymized { k } => {
            let released = rows_of(&batches);
            if released < *k {
                return Err(refuse(
                    station,
                    Rule::MinGroupSize,
                    format!(
                        "requires a pseudonymized release of table '{table}' to cover at least {k} rows; this one covers fewer"
                    ),
                ));
            }
            Ok(Released {
                batches,
                released,
                suppressed: 0,
            })
        }
        Release::Groups { k, global } | Release::Survival { k, global } => {
            let kept = apply_threshold(batches, *k)?;
            if *global && kept.released == 0 {
                return Err(refuse(
                    station,
                    Rule::MinGroupSize,
                    format!(
                        "requires every released aggregate of table '{table}' to cover at least {k} rows; this one covers fewer"
                    ),
                ));
            }
            if matches!(release, Release::Survival { .. })
                && kept
                    .batches
                    .iter()
                    .any(|b| b.num_columns() >= 2 && b.column(b.num_columns() - 2).null_count() > 0)
            {
                return Err(refuse(
                    station,
                    Rule::SurvivalEvents,
                    format!(
                        "cannot pool the survival times of table '{table}' into released times of at least {k} deaths each"
                    ),
                ));
            }
            Ok(kept)
        }
        Release::TrainInput { .. } => Err(ReleaseError::Internal(
            "a train's input is never released".to_string(),
        )),
        Release::Dp(_) => Err(ReleaseError::Internal(
            "a DP release is noised, not thresholded".to_string(),
        )),
        Release::Model {
            k,
            min_rows,
            parameters,
        } => {
            model(station, table, *k, *min_rows, *parameters, &batches)?;
            let released = rows_of(&batches);
            Ok(Released {
                batches,
                released,
                suppressed: 0,
            })
        }
    }
}

/// The model rules on a `glm_terms` result: enough complete rows (`model_min_rows`, and
/// k), at most one parameter per three rows, every design column non-zero on at least k
/// rows and zero on none or at least k.
fn model(
    station: &str,
    table: &str,
    k: u64,
    min_rows: u64,
    parameters: usize,
    batches: &[RecordBatch],
) -> Result<(), ReleaseError> {
    let terms = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| b.column(0).as_list_opt::<i32>())
        .and_then(|l| railyard_udfs::glm_terms::list_values(l, 0));
    let layout = GlmLayout { q: parameters };
    let Some(terms) = terms.filter(|t| t.len() == layout.len()) else {
        return Err(ReleaseError::Internal(
            "a model fragment returned no terms of the expected length".into(),
        ));
    };
    let n = terms[GlmLayout::N];
    let needed = min_rows.max(k) as f64;
    if n < needed {
        return Err(refuse(
            station,
            Rule::ModelMinRows,
            format!(
                "requires a model over table '{table}' to use at least {needed} complete rows; this one uses fewer"
            ),
        ));
    }
    if 3.0 * parameters as f64 > n {
        return Err(refuse(
            station,
            Rule::ModelParameters,
            format!(
                "allows at most one model parameter per three complete rows of table '{table}'; this model has {parameters} parameters and too few rows"
            ),
        ));
    }
    let k = k as f64;
    for (j, nonzero) in terms[layout.nonzero()].iter().enumerate() {
        let zero = n - nonzero;
        if *nonzero < k || (zero > 0.0 && zero < k) {
            return Err(refuse(
                station,
                Rule::ModelLevel,
                format!(
                    "requires every design column of a model over table '{table}' (a covariate, or a level of a categorical one) to be non-zero on at least {k} rows and zero on none or at least {k}; design column {} is not",
                    j + 1
                ),
            ));
        }
    }
    Ok(())
}

/// A train's input must cover at least k rows (its rows never leave; the train's output is
/// bounded by the `[trains]` policy).
pub fn train_input(station: &str, table: &str, k: u64, rows: u64) -> Result<(), Refusal> {
    if rows < k {
        return Err(Refusal {
            rule: Rule::MinGroupSize,
            message: format!(
                "policy: station '{station}' requires a train's input from table '{table}' to \
                 cover at least {k} rows; this one covers fewer"
            ),
        });
    }
    Ok(())
}

/// Keeps the groups whose row count (the last column) is at least `k`.
fn apply_threshold(batches: Vec<RecordBatch>, k: u64) -> Result<Released, ReleaseError> {
    let mut kept = Vec::with_capacity(batches.len());
    let (mut released, mut suppressed) = (0u64, 0u64);
    for batch in batches {
        let rows = batch
            .columns()
            .last()
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| {
                ReleaseError::Internal(format!(
                    "the aggregate has no {ROWS_COLUMN} column of type Int64"
                ))
            })?;
        let keep: BooleanArray = rows
            .iter()
            .map(|n| Some(n.is_some_and(|n| n >= 0 && n as u64 >= k)))
            .collect();
        let n = keep.true_count() as u64;
        released += n;
        suppressed += batch.num_rows() as u64 - n;
        if n as usize == batch.num_rows() {
            kept.push(batch);
        } else if n > 0 {
            kept.push(
                filter_record_batch(&batch, &keep)
                    .map_err(|e| ReleaseError::Internal(e.to_string()))?,
            );
        }
    }
    Ok(Released {
        batches: kept,
        released,
        suppressed,
    })
}

/// What the researcher learns of a fragment that failed while running: a category that names
/// no data value (execution errors can quote the value that failed to parse or cast; that
/// text stays in the station's own log).
pub fn failure_category(e: &DataFusionError) -> &'static str {
    match e.find_root() {
        DataFusionError::ArrowError(a, _) => match a.as_ref() {
            arrow::error::ArrowError::DivideByZero => "division by zero",
            arrow::error::ArrowError::CastError(_) | arrow::error::ArrowError::ParseError(_) => {
                "a value could not be converted"
            }
            arrow::error::ArrowError::ComputeError(_)
            | arrow::error::ArrowError::ArithmeticOverflow(_) => "a computation failed",
            _ => "reading or computing failed",
        },
        DataFusionError::ResourcesExhausted(_) => "resources exhausted",
        DataFusionError::IoError(_) | DataFusionError::ObjectStore(_) => {
            "the station could not read its data"
        }
        _ => "execution failed",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int32Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn groups(counts: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("g", DataType::Int32, true),
                Field::new(ROWS_COLUMN, DataType::Int64, false),
            ])),
            vec![
                Arc::new(Int32Array::from_iter_values(0..counts.len() as i32)),
                Arc::new(Int64Array::from(counts.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn groups_below_k_are_suppressed_and_a_global_aggregate_below_k_refused() {
        let grouped = Release::Groups {
            k: 5,
            global: false,
        };
        let out = release("s", "t", &grouped, vec![groups(&[4, 5, 9, 0])]).unwrap();
        assert_eq!((out.released, out.suppressed), (2, 2));
        assert_eq!(rows_of(&out.batches), 2);

        let global = Release::Groups { k: 5, global: true };
        match release("s", "t", &global, vec![groups(&[4])]) {
            Err(ReleaseError::Refused(r)) => {
                assert_eq!(r.rule, Rule::MinGroupSize);
                assert!(
                    r.message.starts_with("policy: station 's'"),
                    "{}",
                    r.message
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            release("s", "t", &global, vec![groups(&[5])])
                .unwrap()
                .released,
            1
        );
    }

    #[test]
    fn pseudonymized_rows_and_train_inputs_count_k_rows() {
        let rows = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("g", DataType::Int32, true)])),
            vec![Arc::new(Int32Array::from(vec![1, 2, 3]))],
        )
        .unwrap();
        assert!(matches!(
            release(
                "s",
                "t",
                &Release::Pseudonymized { k: 4 },
                vec![rows.clone()]
            ),
            Err(ReleaseError::Refused(Refusal {
                rule: Rule::MinGroupSize,
                ..
            }))
        ));
        assert_eq!(
            release("s", "t", &Release::Pseudonymized { k: 3 }, vec![rows])
                .unwrap()
                .released,
            3
        );
        assert_eq!(
            train_input("s", "t", 5, 4).map_err(|r| r.rule),
            Err(Rule::MinGroupSize)
        );
        assert!(train_input("s", "t", 5, 5).is_ok());
    }

    #[test]
    fn a_result_of_the_wrong_shape_is_internal() {
        let no_count = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("g", DataType::Int32, true)])),
            vec![Arc::new(Int32Array::from(vec![1]))],
        )
        .unwrap();
        let grouped = Release::Groups {
            k: 5,
            global: false,
        };
        assert!(matches!(
            release("s", "t", &grouped, vec![no_count]),
            Err(ReleaseError::Internal(_))
        ));
    }

    /// A model fragment's answer: one `glm_terms` list (q design columns) and the row count.
    fn terms(q: usize, n: f64, nonzero: &[f64]) -> RecordBatch {
        use arrow::array::{Float64Builder, ListBuilder};
        let layout = GlmLayout { q };
        let mut values = vec![0.0; layout.len()];
        values[GlmLayout::N] = n;
        values[layout.nonzero()].copy_from_slice(nonzero);
        let mut list = ListBuilder::new(Float64Builder::new());
        list.values().append_slice(&values);
        list.append(true);
        let list = list.finish();
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("terms", list.data_type().clone(), true),
                Field::new(ROWS_COLUMN, DataType::Int64, false),
            ])),
            vec![Arc::new(list), Arc::new(Int64Array::from(vec![n as i64]))],
        )
        .unwrap()
    }

    fn model_rule(k: u64, min_rows: u64, q: usize, n: f64, nonzero: &[f64]) -> Option<Rule> {
        let model = Release::Model {
            k,
            min_rows,
            parameters: q,
        };
        match release("s", "t", &model, vec![terms(q, n, nonzero)]) {
            Ok(_) => None,
            Err(ReleaseError::Refused(r)) => Some(r.rule),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn models_need_rows_parameters_and_levels_of_k() {
        // Enough rows, every design column non-zero on n rows (an intercept) or on between
        // k and n − k rows: released.
        assert_eq!(model_rule(5, 10, 2, 40.0, &[40.0, 20.0]), None);
        // Fewer complete rows than model_min_rows, or than k.
        assert_eq!(
            model_rule(5, 10, 2, 9.0, &[9.0, 5.0]),
            Some(Rule::ModelMinRows)
        );
        assert_eq!(
            model_rule(20, 10, 2, 15.0, &[15.0, 8.0]),
            Some(Rule::ModelMinRows)
        );
        // More than one parameter per three rows.
        assert_eq!(
            model_rule(1, 1, 4, 11.0, &[11.0, 5.0, 5.0, 5.0]),
            Some(Rule::ModelParameters)
        );
        // A level non-zero on fewer than k rows isolates them; so does a column zero on
        // between 1 and k − 1 rows.
        assert_eq!(
            model_rule(5, 10, 2, 40.0, &[40.0, 4.0]),
            Some(Rule::ModelLevel)
        );
        assert_eq!(
            model_rule(5, 10, 2, 40.0, &[40.0, 37.0]),
            Some(Rule::ModelLevel)
        );
        assert_eq!(model_rule(5, 10, 2, 40.0, &[40.0, 35.0]), None);
        // Terms of the wrong length are a bug, not the user's fault.
        let model = Release::Model {
            k: 5,
            min_rows: 10,
            parameters: 3,
        };
        assert!(matches!(
            release("s", "t", &model, vec![terms(2, 40.0, &[40.0, 20.0])]),
            Err(ReleaseError::Internal(_))
        ));
    }

    #[test]
    fn survival_times_that_cannot_pool_refuse_the_release() {
        use arrow::array::{Float64Builder, ListBuilder};
        let batch = |pooled: bool| {
            let mut list = ListBuilder::new(Float64Builder::new());
            if pooled {
                list.values().append_slice(&[1.0, 2.0]);
                list.append(true);
            } else {
                list.append(false);
            }
            let list = list.finish();
            RecordBatch::try_new(
                Arc::new(Schema::new(vec![
                    Field::new("terms", list.data_type().clone(), true),
                    Field::new(ROWS_COLUMN, DataType::Int64, false),
                ])),
                vec![Arc::new(list), Arc::new(Int64Array::from(vec![30]))],
            )
            .unwrap()
        };
        let survival = Release::Survival { k: 5, global: true };
        assert!(release("s", "t", &survival, vec![batch(true)]).is_ok());
        assert!(matches!(
            release("s", "t", &survival, vec![batch(false)]),
            Err(ReleaseError::Refused(Refusal {
                rule: Rule::SurvivalEvents,
                ..
            }))
        ));
    }
}
