//! Differentially private releases: the noise a station adds to its own DP aggregate states
//! before they leave, and the ε that costs.
//!
//! ```text
//!   fragment  SELECT sex, partial_dp_count(1), partial_dp_avg(CAST(age AS DOUBLE)) … GROUP BY sex
//!     │ check: DP calls only, columns unchanged, bounds and public keys from the policy
//!     │ ε: the ticket's (SET railyard.epsilon) or the policy default, ≤ dp.max_epsilon
//!     │ split: ε / (number of noised state fields) per field
//!     │        count: 1 field, sum: 1, avg: 2, quantile: 1 (its histogram; the edges are public)
//!     │ ledger: charge ε (durable) or refuse                 nothing runs before this
//!     ▼
//!   aggregate over clamped values → exact states per group
//!     │ complete: exactly one row per declared key combination (missing ones are zero,
//!     │           rows with undeclared keys are dropped)
//!     │ noise: per state field, OpenDP's vector Laplace mechanism over all groups (and
//!     │        over every bin of every group for a histogram)
//!     ▼
//!   release (audited with ε)
//! ```
//!
//! The privacy unit is a patient (the table's `privacy_unit`, whose rows beyond
//! `max_rows_per_unit` = m are left out), or one row in a table without one (m = 1). Adding or
//! removing one patient changes the counts of all groups together by at most m, the bins of
//! a histogram by at most m, and the clamped sums by at most m·max(|lower|, |upper|); so
//! the vector of one state field over all groups has that L1 sensitivity and one Laplace
//! measurement over the vector costs ε/fields (groups and bins are disjoint: parallel
//! composition). The fields of a release compose sequentially, so the release costs ε.
//! Groups come only from the policy's public keys and bins from its edges, so which groups
//! and bins exist reveals nothing.
//!
//! OpenDP measurements are not `Send`: they are built and used inside [`add_noise`], a plain
//! function that never crosses an `await`.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, ListArray, RecordBatch, StructArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type};
use datafusion::common::ScalarValue;
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_laplace;
use opendp::measures::MaxDivergence;
use opendp::metrics::L1Distance;
use railyard_policy::dp::DpRelease;
use railyard_udfs::dp::DpField;
use railyard_udfs::dp::histogram::list_values;

/// The noise of one state field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FieldNoise {
    pub field: DpField,
    /// The field's L1 sensitivity over all groups.
    pub sensitivity: f64,
    /// The Laplace scale.
    pub scale: f64,
    /// The ε OpenDP's privacy map gives for the sensitivity.
    pub epsilon: f64,
}

/// The noise of a whole release: one entry per state field, aggregate by aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct NoisePlan {
    pub fields: Vec<Vec<FieldNoise>>,
    /// The ε charged: the one asked for, never below the sum of the fields' ε.
    epsilon: f64,
}

impl NoisePlan {
    /// The ε the release costs and the station charges: the ε asked for, which is at least
    /// the sequential composition of its fields (their sum, rounded up where the
    /// floating-point sum is inexact), so the ledger never records less than was spent.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }
}

/// The sum of the fields' ε, rounded up where the floating-point sum is inexact.
fn composed(fields: &[Vec<FieldNoise>]) -> f64 {
    fields
        .iter()
        .flatten()
        .fold(0.0, |sum, f| add_rounding_up(sum, f.epsilon))
}

/// `a + b`, rounded up to the next float when the sum is not exact (Knuth's TwoSum gives
/// the rounding error exactly).
fn add_rounding_up(a: f64, b: f64) -> f64 {
    let sum = a + b;
    let b_part = sum - a;
    let error = (a - (sum - b_part)) + (b - b_part);
    if error > 0.0 { sum.next_up() } else { sum }
}

/// Why a release cannot be noised (never names a data value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoiseError(pub String);

fn opendp_error(e: opendp::error::Error) -> NoiseError {
    NoiseError(format!(
        "OpenDP: {}",
        e.message.unwrap_or_else(|| format!("{:?}", e.variant))
    ))
}

/// Splits `epsilon` evenly over the noised state fields of `release` and derives each
/// field's Laplace scale; the ε of each field is what OpenDP's privacy map reports for it.
/// Where floating-point rounding would make the fields' ε add up to more than `epsilon`
/// (a third of 0.5, three times), each share is lowered by an ulp until they do not.
pub fn plan_noise(release: &DpRelease, epsilon: f64) -> Result<NoisePlan, NoiseError> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(NoiseError("ε must be a number > 0".to_string()));
    }
    let n: usize = release
        .aggregates
        .iter()
        .map(|a| a.kind.fields().iter().filter(|f| f.noised()).count())
        .sum();
    let mut share = epsilon / n.max(1) as f64;
    for _ in 0..1000 {
        let fields = plan_fields(release, share)?;
        if composed(&fields) <= epsilon {
            return Ok(NoisePlan { fields, epsilon });
        }
        share = share.next_down();
    }
    Err(NoiseError(
        "ε cannot be split over the release's fields".to_string(),
    ))
}

/// The noise of every field of `release` at `share` of ε per noised field.
fn plan_fields(release: &DpRelease, share: f64) -> Result<Vec<Vec<FieldNoise>>, NoiseError> {
    // How many rows one patient (or one row, without a privacy unit) adds to a count.
    let rows = release.rows_per_unit.max(1.0).round();
    let mut fields = Vec::new();
    for a in &release.aggregates {
        let mut of = Vec::new();
        for field in a.kind.fields() {
            if !field.noised() {
                of.push(FieldNoise {
                    field: *field,
                    sensitivity: 0.0,
                    scale: 0.0,
                    epsilon: 0.0,
                });
                continue;
            }
            let sensitivity = match field {
                DpField::Count | DpField::Histogram => rows,
                DpField::Sum => a.bound,
                DpField::Edges => unreachable!("public"),
            };
            let scale = sensitivity / share;
            let epsilon = match field {
                // A histogram is a vector of counts; one patient's rows change it by at
                // most `rows` in L1, however they spread over bins (and groups).
                DpField::Count | DpField::Histogram => count_measurement(scale)?
                    .map(&(rows as i64))
                    .map_err(opendp_error)?,
                DpField::Sum => sum_measurement(scale)?
                    .map(&sensitivity)
                    .map_err(opendp_error)?,
                DpField::Edges => unreachable!("public"),
            };
            of.push(FieldNoise {
                field: *field,
                sensitivity,
                scale,
                epsilon,
            });
        }
        fields.push(of);
    }
    Ok(fields)
}

type CountMeasurement = opendp::core::Measurement<
    VectorDomain<AtomDomain<i64>>,
    L1Distance<i64>,
    MaxDivergence,
    Vec<i64>,
>;
type SumMeasurement = opendp::core::Measurement<
    VectorDomain<AtomDomain<f64>>,
    L1Distance<f64>,
    MaxDivergence,
    Vec<f64>,
>;

/// The (discrete) Laplace mechanism over a vector of counts.
fn count_measurement(scale: f64) -> Result<CountMeasurement, NoiseError> {
    make_laplace(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L1Distance::<i64>::default(),
        scale,
        None,
    )
    .map_err(opendp_error)
}

/// The Laplace mechanism over a vector of finite sums (OpenDP samples it exactly on a fine
/// lattice).
fn sum_measurement(scale: f64) -> Result<SumMeasurement, NoiseError> {
    make_laplace(
        VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
        L1Distance::<f64>::default(),
        scale,
        None,
    )
    .map_err(opendp_error)
}

/// Largest magnitude of a released noisy count. OpenDP saturates at the ends of `i64`, and
/// the hub adds stations' counts: clamped here (post-processing, which DP allows), the
/// counts of 65,536 stations add up without wrapping.
pub const MAX_NOISY_COUNT: i64 = i64::MAX >> 16;

/// Noises a vector of counts with scale `scale` (OpenDP's discrete Laplace).
pub fn noisy_counts(counts: Vec<i64>, scale: f64) -> Result<Vec<i64>, NoiseError> {
    let noisy = count_measurement(scale)?
        .invoke(&counts)
        .map_err(opendp_error)?;
    Ok(noisy
        .into_iter()
        .map(|c| c.clamp(-MAX_NOISY_COUNT, MAX_NOISY_COUNT))
        .collect())
}

/// Noises a vector of sums with scale `scale` (OpenDP's Laplace).
pub fn noisy_sums(sums: Vec<f64>, scale: f64) -> Result<Vec<f64>, NoiseError> {
    if sums.iter().any(|s| !s.is_finite()) {
        return Err(NoiseError("a computation failed".to_string()));
    }
    sum_measurement(scale)?.invoke(&sums).map_err(opendp_error)
}

/// One list of numbers per row.
fn lists(rows: Vec<Vec<f64>>) -> ArrayRef {
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    let values: Vec<f64> = rows.into_iter().flatten().collect();
    Arc::new(ListArray::new(
        Arc::new(Field::new_list_field(DataType::Float64, true)),
        OffsetBuffer::from_lengths(lengths),
        Arc::new(Float64Array::from(values)),
        None,
    ))
}

/// The exact states of an aggregate's output, completed to exactly one row per declared key
/// combination and noised per `plan`, projected to the fragment's output columns.
pub fn add_noise(
    release: &DpRelease,
    plan: &NoisePlan,
    batches: &[RecordBatch],
) -> Result<RecordBatch, NoiseError> {
    let internal = |what: &str| NoiseError(format!("internal: {what}"));
    // A grouped aggregate over no rows produces no batch at all: that is zero rows, and
    // every declared key is released (noised zeros) exactly as when rows exist.
    let batch =
        concat_batches(&release.aggregate_schema, batches).map_err(|e| internal(&e.to_string()))?;
    let g = release.groups.len();
    if batch.num_columns() != g + release.aggregates.len() {
        return Err(internal("the aggregate's columns do not match the release"));
    }
    // Every key combination, in a fixed order (the first column varies slowest).
    let mut cells: Vec<Vec<usize>> = vec![Vec::new()];
    for group in &release.groups {
        cells = cells
            .into_iter()
            .flat_map(|prefix| {
                (0..group.keys.len()).map(move |k| {
                    let mut c = prefix.clone();
                    c.push(k);
                    c
                })
            })
            .collect();
    }
    // The aggregate row of each combination, if the data has one.
    let mut row_of: Vec<Option<usize>> = vec![None; cells.len()];
    let mut strides = vec![1usize; g];
    for i in (0..g.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * release.groups[i + 1].keys.len();
    }
    'rows: for row in 0..batch.num_rows() {
        let mut cell = 0;
        for (i, group) in release.groups.iter().enumerate() {
            let value = ScalarValue::try_from_array(batch.column(i), row)
                .map_err(|e| internal(&e.to_string()))?;
            // Rows of undeclared keys (and NULL keys) are not released.
            let Some(k) = group.keys.iter().position(|key| *key == value) else {
                continue 'rows;
            };
            cell += k * strides[i];
        }
        row_of[cell] = Some(row);
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (i, group) in release.groups.iter().enumerate() {
        let values = cells.iter().map(|c| group.keys[c[i]].clone());
        let array = ScalarValue::iter_to_array(values).map_err(|e| internal(&e.to_string()))?;
        let array = if array.data_type() == batch.column(i).data_type() {
            array
        } else {
            arrow::compute::cast(&array, batch.column(i).data_type())
                .map_err(|e| internal(&e.to_string()))?
        };
        columns.push(array);
    }
    for (j, (spec, noise)) in release.aggregates.iter().zip(&plan.fields).enumerate() {
        let states = batch
            .column(g + j)
            .as_struct_opt()
            .ok_or_else(|| internal("a DP state is not a struct"))?;
        if states.num_columns() != spec.kind.fields().len() {
            return Err(internal("a DP state has the wrong number of fields"));
        }
        let mut noised: Vec<ArrayRef> = Vec::with_capacity(noise.len());
        for (f, field_noise) in noise.iter().enumerate() {
            let column = states.column(f);
            let array: ArrayRef = match field_noise.field {
                DpField::Count => {
                    let exact = column
                        .as_primitive_opt::<Int64Type>()
                        .ok_or_else(|| internal("a DP count is not Int64"))?;
                    let values = row_of
                        .iter()
                        .map(|r| r.map_or(0, |r| exact.value(r)))
                        .collect();
                    Arc::new(Int64Array::from(noisy_counts(values, field_noise.scale)?))
                }
                DpField::Sum => {
                    let exact = column
                        .as_primitive_opt::<Float64Type>()
                        .ok_or_else(|| internal("a DP sum is not Float64"))?;
                    let values = row_of
                        .iter()
                        .map(|r| r.map_or(0.0, |r| exact.value(r)))
                        .collect();
                    Arc::new(Float64Array::from(noisy_sums(values, field_noise.scale)?))
                }
                // The edges are the policy's, for every group (the data's are the same).
                DpField::Edges => lists(vec![spec.edges.clone(); row_of.len()]),
                DpField::Histogram => {
                    let bins = spec.edges.len().saturating_sub(1);
                    let mut exact = Vec::with_capacity(row_of.len() * bins);
                    for r in &row_of {
                        let counts = match r {
                            Some(r) => list_values(column, *r)
                                .map_err(|e| internal(&e.to_string()))?
                                .unwrap_or_default(),
                            None => Vec::new(),
                        };
                        let counts = if counts.is_empty() {
                            vec![0.0; bins]
                        } else {
                            counts
                        };
                        if counts.len() != bins {
                            return Err(internal("a histogram does not fit its bins"));
                        }
                        exact.extend(counts.into_iter().map(|c| c as i64));
                    }
                    // One measurement over every bin of every group (disjoint: parallel
                    // composition).
                    let noisy = noisy_counts(exact, field_noise.scale)?;
                    lists(
                        noisy
                            .chunks(bins.max(1))
                            .map(|c| c.iter().map(|v| *v as f64).collect())
                            .collect(),
                    )
                }
            };
            noised.push(array);
        }
        let fields = match states.data_type() {
            DataType::Struct(fields) => fields.clone(),
            _ => return Err(internal("a DP state is not a struct")),
        };
        let array =
            StructArray::try_new(fields, noised, None).map_err(|e| internal(&e.to_string()))?;
        columns.push(Arc::new(array));
    }
    let output = release
        .output
        .iter()
        .map(|i| {
            columns
                .get(*i)
                .cloned()
                .ok_or_else(|| internal("an output column cannot be traced"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(&release.schema), output).map_err(|e| internal(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use railyard_policy::dp::DpAggregateSpec;
    use railyard_udfs::dp::DpKind;

    use super::*;

    /// The probability that a Laplace(0, b) variable's absolute value exceeds t.
    fn tail(t: f64, b: f64) -> f64 {
        (-t / b).exp()
    }

    #[test]
    fn saturated_noisy_counts_are_clamped_so_the_hub_can_add_them() {
        let noisy = noisy_counts(vec![i64::MAX, i64::MIN, 7], 1.0).unwrap();
        assert!(
            noisy.iter().all(|c| c.abs() <= MAX_NOISY_COUNT),
            "{noisy:?}"
        );
        // What 65,536 stations could send adds up without wrapping.
        assert!(noisy[0].checked_mul(1 << 16).is_some());
        assert!(noisy[1].checked_mul(1 << 16).is_some());
    }

    #[test]
    fn counts_get_laplace_noise_of_the_planned_scale() {
        // 20 000 draws of discrete Laplace noise with scale 4. For a continuous Laplace
        // the mean absolute deviation is b and P(|X| > t) = exp(-t/b); the discrete one
        // is within a few percent of both at this scale. Each check is a binomial/normal
        // bound with a failure probability below 1e-9 under the right scale, and a scale
        // off by 25 % fails it.
        let n = 20_000;
        let b = 4.0;
        let noise = noisy_counts(vec![100; n], b).unwrap();
        let dev: Vec<f64> = noise.iter().map(|v| (*v - 100) as f64).collect();
        let mean_abs = dev.iter().map(|d| d.abs()).sum::<f64>() / n as f64;
        // Var|X| = b² for Laplace: the standard error of the mean is b/√n.
        let se = b / (n as f64).sqrt();
        assert!(
            (mean_abs - b).abs() < 0.1 * b + 6.0 * se,
            "mean |noise| {mean_abs} for scale {b}"
        );
        let mean = dev.iter().sum::<f64>() / n as f64;
        // Var X = 2b²: the mean is 0 within 6 standard errors.
        assert!(
            mean.abs() < 6.0 * (2.0f64).sqrt() * b / (n as f64).sqrt(),
            "mean {mean}"
        );
        for t in [4.0, 8.0, 12.0] {
            let p = tail(t, b);
            let observed = dev.iter().filter(|d| d.abs() > t).count() as f64 / n as f64;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            // Discrete noise: |X| > t for integer X is |X| ≥ t + 1; allow for the
            // discretization between t and t + 1.
            let p_low = tail(t + 1.0, b);
            assert!(
                observed > p_low - 6.0 * sd && observed < p + 6.0 * sd,
                "P(|noise| > {t}) = {observed}, expected between {p_low} and {p}"
            );
        }
    }

    #[test]
    fn sums_get_laplace_noise_of_the_planned_scale() {
        let n = 20_000;
        let b = 120.0 / 0.25;
        let noise = noisy_sums(vec![1000.0; n], b).unwrap();
        let dev: Vec<f64> = noise.iter().map(|v| v - 1000.0).collect();
        let mean_abs = dev.iter().map(|d| d.abs()).sum::<f64>() / n as f64;
        let se = b / (n as f64).sqrt();
        assert!(
            (mean_abs - b).abs() < 6.0 * se,
            "mean |noise| {mean_abs} for scale {b}"
        );
        for t in [0.5 * b, b, 2.0 * b, 4.0 * b] {
            let p = tail(t, b);
            let observed = dev.iter().filter(|d| d.abs() > t).count() as f64 / n as f64;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (observed - p).abs() < 6.0 * sd,
                "P(|noise| > {t}) = {observed}, expected {p}"
            );
        }
        // The noise is symmetric: as many draws above as below, within 6 standard errors.
        let above = dev.iter().filter(|d| **d > 0.0).count() as f64 / n as f64;
        assert!(
            (above - 0.5).abs() < 6.0 * (0.25 / n as f64).sqrt(),
            "{above}"
        );
    }

    fn release(kinds: &[DpKind], bound: f64) -> DpRelease {
        DpRelease {
            table: "t".to_string(),
            groups: vec![],
            aggregates: kinds
                .iter()
                .map(|k| DpAggregateSpec {
                    kind: *k,
                    column: Some("x".to_string()),
                    bound,
                    edges: Vec::new(),
                })
                .collect(),
            rows_per_unit: 1.0,
            aggregate_schema: Arc::new(arrow::datatypes::Schema::empty()),
            output: vec![],
            schema: Arc::new(arrow::datatypes::Schema::empty()),
        }
    }

    #[test]
    fn the_charged_epsilon_is_never_below_the_sum_of_the_fields() {
        // Ten quantiles at ε = 1 (0.1 ten times), three fields at 0.5 (a third, three
        // times), …: whatever the split, the fields' ε, summed and rounded up, stay within
        // the ε charged, which is the ε asked for.
        for (kinds, epsilon) in [
            (vec![DpKind::Median; 10], 1.0),
            (vec![DpKind::Count, DpKind::Avg], 0.5),
            (vec![DpKind::Count, DpKind::Avg], 1.5),
            (vec![DpKind::Sum; 7], 0.3),
            (vec![DpKind::Avg; 3], 1e-3),
        ] {
            let plan = plan_noise(&release(&kinds, 120.0), epsilon).unwrap();
            assert_eq!(plan.epsilon(), epsilon);
            let exact_up = composed(&plan.fields);
            assert!(exact_up <= epsilon, "{kinds:?} at {epsilon}: {exact_up}");
            // And the split loses next to nothing.
            assert!(exact_up > epsilon * (1.0 - 1e-12), "{exact_up}");
        }
        assert_eq!(add_rounding_up(0.5, 0.25), 0.75);
        // 0.1 + 0.2 rounds up in floats already; 0.1 + 0.7 rounds down and is bumped.
        assert_eq!(add_rounding_up(0.1, 0.2), 0.1 + 0.2);
        assert_eq!(add_rounding_up(0.1, 0.7), (0.1f64 + 0.7).next_up());
    }

    #[test]
    fn a_patients_rows_scale_the_noise_of_counts_and_histograms_too() {
        // With up to 3 rows per patient, one patient moves a count (and a histogram) by 3
        // and a sum by 3 × 120: every field's scale is 3 times the one-row scale.
        let mut r = release(&[DpKind::Count, DpKind::Avg, DpKind::Median], 120.0 * 3.0);
        r.rows_per_unit = 3.0;
        let plan = plan_noise(&r, 0.8).unwrap();
        let fields: Vec<_> = plan.fields.iter().flatten().collect();
        // count, avg's sum and count, the median's edges (public) and histogram.
        assert_eq!(fields.len(), 5);
        let share = 0.8 / 4.0;
        assert!(
            (fields[0].scale - 3.0 / share).abs() < 1e-9,
            "{:?}",
            fields[0]
        );
        assert!(
            (fields[1].scale - 360.0 / share).abs() < 1e-6,
            "{:?}",
            fields[1]
        );
        assert!(
            (fields[2].scale - 3.0 / share).abs() < 1e-9,
            "{:?}",
            fields[2]
        );
        assert_eq!((fields[3].field, fields[3].epsilon), (DpField::Edges, 0.0));
        assert!(
            (fields[4].scale - 3.0 / share).abs() < 1e-9,
            "{:?}",
            fields[4]
        );
        for f in [fields[0], fields[1], fields[2], fields[4]] {
            assert!((f.epsilon - share).abs() < 1e-9, "{f:?}");
        }
        assert!((plan.epsilon() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn every_bin_of_every_group_is_noised_and_the_edges_are_the_policys() {
        use arrow::datatypes::{Field, Fields, Schema};
        // Two groups (sex 1 and 2) of a median over 3 bins; the data has only group 1.
        let list = DpField::Histogram.data_type();
        let state = Fields::from(vec![
            Field::new("s0", list.clone(), true),
            Field::new("s1", list, true),
        ]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("sex", DataType::Int64, true),
            Field::new("m", DataType::Struct(state.clone()), true),
        ]));
        let n = 4000;
        let exact = [10.0, 20.0, 30.0];
        let states = StructArray::try_new(
            state,
            vec![
                lists(vec![vec![0.0, 1.0, 2.0, 3.0]]),
                lists(vec![exact.to_vec()]),
            ],
            None,
        )
        .unwrap();
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![1])), Arc::new(states)],
        )
        .unwrap();
        let mut r = release(&[DpKind::Median], 1.0);
        r.aggregates[0].edges = vec![0.0, 1.0, 2.0, 3.0];
        r.groups = vec![railyard_policy::dp::DpGroup {
            column: "sex".to_string(),
            keys: vec![ScalarValue::Int64(Some(1)), ScalarValue::Int64(Some(2))],
        }];
        r.aggregate_schema = Arc::clone(&schema);
        r.schema = Arc::clone(&schema);
        r.output = vec![0, 1];
        let plan = plan_noise(&r, 0.5).unwrap();
        let b = plan.fields[0][1].scale;
        assert!((b - 2.0).abs() < 1e-12, "one field: scale 1/0.5");
        // Many releases: every bin's noise has the planned spread, the missing group is
        // released as noised zeros, and the edges are the policy's in every group.
        let mut deviations = vec![Vec::new(); 6];
        for _ in 0..n {
            let out = add_noise(&r, &plan, std::slice::from_ref(&batch)).unwrap();
            assert_eq!(out.num_rows(), 2);
            let s = out.column(1).as_struct();
            for g in 0..2 {
                let edges = list_values(s.column(0), g).unwrap().unwrap();
                assert_eq!(edges, vec![0.0, 1.0, 2.0, 3.0]);
                let counts = list_values(s.column(1), g).unwrap().unwrap();
                for (i, c) in counts.iter().enumerate() {
                    let want = if g == 0 { exact[i] } else { 0.0 };
                    deviations[g * 3 + i].push(c - want);
                }
            }
        }
        for d in &deviations {
            let mean_abs = d.iter().map(|x| x.abs()).sum::<f64>() / n as f64;
            // The discrete Laplace's mean |X| is within a few percent of b at this scale.
            assert!(
                (mean_abs - b).abs() < 0.15 * b,
                "mean |noise| {mean_abs}, scale {b}"
            );
            let mean = d.iter().sum::<f64>() / n as f64;
            assert!(
                mean.abs() < 6.0 * 2f64.sqrt() * b / (n as f64).sqrt(),
                "{mean}"
            );
        }
    }

    #[test]
    fn epsilon_is_split_over_state_fields_and_scales_follow_sensitivity() {
        let plan = plan_noise(&release(&[DpKind::Count, DpKind::Avg], 120.0), 0.6).unwrap();
        // Three fields: count, then the mean's sum and count, 0.2 each.
        let fields: Vec<_> = plan.fields.iter().flatten().collect();
        assert_eq!(fields.len(), 3);
        for f in &fields {
            assert!((f.epsilon - 0.2).abs() < 1e-12, "{f:?}");
        }
        assert!((fields[0].scale - 5.0).abs() < 1e-12);
        assert!((fields[1].scale - 600.0).abs() < 1e-9);
        assert_eq!(fields[1].sensitivity, 120.0);
        assert!((plan.epsilon() - 0.6).abs() < 1e-12);
        assert!(plan_noise(&release(&[DpKind::Count], 1.0), 0.0).is_err());
        assert!(plan_noise(&release(&[DpKind::Count], 1.0), f64::NAN).is_err());
    }
}
