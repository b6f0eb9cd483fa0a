//! The post-run half of the rules: what of an approved fragment's result may leave.
//!
//! The check ([`crate::check`]) decided the [`Release`] before anything ran; here the
//! result is held to it: groups below k are suppressed, a global aggregate below k is refused,
//! model terms must cover enough rows and levels, survival times must pool, pseudonymized rows
//! and a train's input must cover k rows. Nothing here reads or writes anything: the station
//! audits what these functions decide.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, Float64Array, Int64Array, RecordBatch, UInt64Array,
};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::error::DataFusionError;
use railyard_udfs::glm_terms::GlmLayout;
use railyard_udfs::unit_set::Set as UnitSet;

use crate::check::contributors::{
    CONTRIBUTORS_PREFIX, DIGEST_PREFIX, DOMINANCE_MAX_PREFIX, DOMINANCE_SUM_PREFIX, ROWS_DIGEST,
    UNITS_PREFIX, UNITS_ROWS, is_internal,
};
use crate::check::{ROWS_COLUMN, Release};
use crate::rule::{Refusal, Rule};

/// A released set of units as the release finds it: unit elements (folded hashes).
pub type ReleasedUnits = crate::queryset::ReleasedSet<UnitSet>;

/// The station's secret key of its noisy thresholds: without it the margin a set of rows
/// meets cannot be computed, so it cannot be subtracted out.
#[derive(Clone)]
pub struct ThresholdKey {
    key: railyard_udfs::pseudonym::PseudonymKey,
    /// The largest margin (the policy's `threshold_noise`).
    noise: u64,
    /// The largest share one row may hold of a non-linear value (the policy's
    /// `model_dominance`).
    dominance: f64,
}

impl std::fmt::Debug for ThresholdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str("ThresholdKey(…)")
    }
}

impl ThresholdKey {
    /// The key `bytes`, drawing margins of 0 to `noise` rows.
    pub fn new(bytes: [u8; 32], noise: u64) -> Self {
        Self {
            key: railyard_udfs::pseudonym::PseudonymKey::new(&bytes),
            noise,
            dominance: crate::file::DEFAULT_MODEL_DOMINANCE,
        }
    }

    /// The same key, holding non-linear values to `share` (the policy's `model_dominance`).
    pub fn with_dominance(self, share: f64) -> Self {
        Self {
            dominance: share,
            ..self
        }
    }

    /// The largest margin it draws.
    pub fn noise(&self) -> u64 {
        self.noise
    }

    /// The margin over `k` that the rows of `digest` must clear, uniform on 0..=noise: a
    /// keyed hash of which rows they are, so the same rows always meet the same threshold.
    pub fn margin(&self, digest: u64, k: u64) -> u64 {
        if self.noise == 0 {
            return 0;
        }
        let mut text = [0u8; 16];
        text[..8].copy_from_slice(&digest.to_le_bytes());
        text[8..].copy_from_slice(&k.to_le_bytes());
        let mac = self.key.of(&text);
        let draw = u64::from_le_bytes([
            mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], mac[6], mac[7],
        ]);
        draw % (self.noise + 1)
    }
}

/// The schema of what leaves, given the schema of the approved plan: without the station's
/// own contributor counts and digests.
pub fn released_schema(schema: &SchemaRef) -> SchemaRef {
    if !schema.fields().iter().any(|f| is_internal(f.name())) {
        return Arc::clone(schema);
    }
    Arc::new(Schema::new_with_metadata(
        schema
            .fields()
            .iter()
            .filter(|f| !is_internal(f.name()))
            .cloned()
            .collect::<Vec<_>>(),
        schema.metadata().clone(),
    ))
}

/// `schema` saying how many groups its release withheld below k
/// ([`WITHHELD_METADATA`](railyard_contract::WITHHELD_METADATA)), as
/// [`Released::announced`] allows: a count, or only that the withheld groups hold fewer than
/// k rows (possibly none). What a station's answer to an aggregate fragment announces, so
/// the researcher learns the answer is partial.
pub fn announcing_withheld(schema: &SchemaRef, groups: Option<u64>) -> SchemaRef {
    let mut metadata = schema.metadata().clone();
    metadata.insert(
        railyard_contract::WITHHELD_METADATA.to_string(),
        groups.map_or_else(
            || railyard_contract::WITHHELD_FEW.to_string(),
            |n| n.to_string(),
        ),
    );
    Arc::new(schema.as_ref().clone().with_metadata(metadata))
}

fn strip(batch: &RecordBatch) -> Result<RecordBatch, ReleaseError> {
    let keep: Vec<usize> = (0..batch.num_columns())
        .filter(|i| !is_internal(batch.schema().field(*i).name()))
        .collect();
    if keep.len() == batch.num_columns() {
        return Ok(batch.clone());
    }
    batch
        .project(&keep)
        .map_err(|e| ReleaseError::Internal(e.to_string()))
}

/// What leaves: the batches, and how many groups (or rows) were released and suppressed.
#[derive(Debug)]
pub struct Released {
    pub batches: Vec<RecordBatch>,
    pub released: u64,
    pub suppressed: u64,
    /// The number of suppressed groups the station may tell the researcher. The count is a
    /// release too: `WHERE patient_id = 1 AND age >= 70 GROUP BY sex` withholds one group or
    /// none, and saying which is the patient's age. So it is told only when the withheld
    /// groups together count at least k rows (plus the noisy margin of which rows they
    /// are), like any released count; otherwise `None`: "fewer than k rows, possibly none".
    pub announced: Option<u64>,
    /// The sets of units (patients) behind what leaves, for the query-set auditor (empty
    /// when the release is not watched): each released group's set and each value's
    /// contributor set, and for a grouped release also the union of each over the
    /// released groups (what a total minus the groups would isolate). Distinct sets only.
    pub sets: Vec<ReleasedUnits>,
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

/// A refusal decided on the result. It does not name the station: through the hub, which
/// station refused after running could tell where a patient is.
fn refuse(_station: &str, rule: Rule, why: String) -> ReleaseError {
    ReleaseError::Refused(Refusal {
        rule,
        message: format!("policy: a station {why}"),
    })
}

fn rows_of(batches: &[RecordBatch]) -> u64 {
    batches.iter().map(|b| b.num_rows() as u64).sum()
}

/// Applies `release` to the result of the fragment over `table`, with the station's noisy
/// threshold `key`. What it returns has the [`released_schema`].
pub fn release(
    station: &str,
    table: &str,
    release: &Release,
    batches: Vec<RecordBatch>,
    key: &ThresholdKey,
) -> Result<Released, ReleaseError> {
    let mut out = release_unstripped(station, table, release, batches, key)?;
    let grouped = matches!(
        release,
        Release::Groups { global: false, .. } | Release::Survival { global: false, .. }
    );
    out.sets = released_sets(&out.batches, grouped)?;
    out.batches = out.batches.iter().map(strip).collect::<Result<_, _>>()?;
    Ok(out)
}

/// The distinct unit sets of the released rows' `__units_*` columns, each with the released
/// group it belongs to, and (for a grouped release of disjoint groups) the union of each
/// column over the released groups.
fn released_sets(
    batches: &[RecordBatch],
    grouped: bool,
) -> Result<Vec<ReleasedUnits>, ReleaseError> {
    use std::collections::BTreeMap;
    let mut sets: Vec<ReleasedUnits> = Vec::new();
    // Per column: the released groups' elements (each group's once), and the sum of their
    // sizes.
    let mut unions: BTreeMap<String, (Vec<u32>, u64)> = BTreeMap::new();
    let add = |released: ReleasedUnits, sets: &mut Vec<ReleasedUnits>| {
        if !released.set.is_empty() && !sets.iter().any(|s| s.set == released.set) {
            sets.push(released);
        }
    };
    let mut first_row = 0usize;
    for batch in batches {
        let schema = batch.schema();
        for (i, field) in schema.fields().iter().enumerate() {
            let name = field.name();
            if !(name.starts_with(UNITS_PREFIX) || name == UNITS_ROWS) {
                continue;
            }
            let Some(column) = batch.column(i).as_binary_opt::<i32>() else {
                return Err(ReleaseError::Internal(format!(
                    "{name} is not a Binary set"
                )));
            };
            for (r, bytes) in column.iter().enumerate() {
                let Some(bytes) = bytes else { continue };
                let set = UnitSet::decode(bytes)
                    .ok_or_else(|| ReleaseError::Internal(format!("{name} holds no unit set")))?;
                if grouped {
                    let (union, sizes) = unions.entry(name.clone()).or_default();
                    union.extend(set.iter());
                    *sizes += set.len();
                }
                let group = Some(first_row + r);
                add(ReleasedUnits { group, set }, &mut sets);
            }
        }
        first_row += batch.num_rows();
    }
    // Only groups that share no patient subtract from a total: with overlapping groups
    // (a patient in several drug groups) their counts add up to more than the union, and
    // the total minus them isolates nobody.
    for (_, (union, sizes)) in unions {
        let union = UnitSet::of(union);
        if union.len() == sizes {
            add(
                ReleasedUnits {
                    group: None,
                    set: union,
                },
                &mut sets,
            );
        }
    }
    Ok(sets)
}

fn release_unstripped(
    station: &str,
    table: &str,
    release: &Release,
    batches: Vec<RecordBatch>,
    key: &ThresholdKey,
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
                announced: Some(0),
                sets: Vec::new(),
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
                announced: Some(0),
                sets: Vec::new(),
            })
        }
        Release::Groups { k, global } | Release::Survival { k, global } => {
            let mut kept = apply_threshold(batches, *k, key, !*global)?;
            if *global && kept.released == 0 {
                return Err(refuse(
                    station,
                    Rule::MinGroupSize,
                    format!(
                        "requires every released aggregate of table '{table}' to cover at least {k} rows (of {k} distinct patients where the table has a privacy unit), and each of its values at least {k} contributors (plus a noisy margin) none of which dominates it; this one does not"
                    ),
                ));
            }
            // The survival_terms value: the last column before the row count that is not
            // one of the station's own (contributors, digests).
            let terms = |b: &RecordBatch| {
                let schema = b.schema();
                (0..b.num_columns())
                    .rev()
                    .find(|i| {
                        let name = schema.field(*i).name();
                        name != ROWS_COLUMN && !is_internal(name)
                    })
                    .map(|i| b.column(i).clone())
            };
            if *global {
                // Released whole (or refused above): nothing was withheld, as the
                // researcher can tell from the answer itself.
                kept.announced = Some(0);
            }
            if matches!(release, Release::Survival { .. })
                && kept.batches.iter().any(|b| {
                    terms(b).is_some_and(|t| {
                        t.as_list_opt::<i32>().is_some_and(|l| {
                            (0..l.len()).any(|r| l.is_valid(r) && l.value_length(r) == 0)
                        })
                    })
                })
            {
                // survival_terms answers an empty list when one row dominates a sum.
                return Err(refuse(
                    station,
                    Rule::ModelDominance,
                    format!(
                        "releases no survival sums of table '{table}' that one row dominates: with these coefficients one row holds too large a share of a risk or death sum"
                    ),
                ));
            }
            if matches!(release, Release::Survival { .. })
                && kept
                    .batches
                    .iter()
                    .any(|b| terms(b).is_some_and(|t| t.null_count() > 0))
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
                announced: Some(0),
                sets: Vec::new(),
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
    let list = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| b.column(0).as_list_opt::<i32>());
    let terms = list.and_then(|l| railyard_udfs::glm_terms::list_values(l, 0));
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
    // The fragment's unit count (distinct patients when the table has a privacy unit): a
    // model over k rows of fewer than k patients is refused like any release.
    let units = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| int64(b, ROWS_COLUMN))
        .filter(|c| c.is_valid(0))
        .map_or(0, |c| c.value(0));
    if (units as u64) < k {
        return Err(refuse(
            station,
            Rule::MinGroupSize,
            format!(
                "requires a model over table '{table}' to cover at least {k} units (patients); this one covers fewer"
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
    // The station's glm_terms answers NaN sums when one row dominates one of them.
    if terms.iter().any(|v| v.is_nan()) {
        return Err(refuse(
            station,
            Rule::ModelDominance,
            format!(
                "releases no model term of table '{table}' that one row dominates: with these coefficients one row holds too large a share of a sum"
            ),
        ));
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

/// A count column of a result and the digest of the rows it counts (if the plan has one).
struct Counted<'a> {
    counts: &'a Int64Array,
    digests: Option<&'a UInt64Array>,
}

fn int64<'a>(batch: &'a RecordBatch, name: &str) -> Option<&'a Int64Array> {
    batch
        .column_by_name(name)?
        .as_any()
        .downcast_ref::<Int64Array>()
}

fn uint64<'a>(batch: &'a RecordBatch, name: &str) -> Option<&'a UInt64Array> {
    batch
        .column_by_name(name)?
        .as_any()
        .downcast_ref::<UInt64Array>()
}

/// Keeps the groups whose row count (the last column) and every contributor count reach
/// `k` plus the noisy margin of the rows they count.
fn apply_threshold(
    batches: Vec<RecordBatch>,
    k: u64,
    key: &ThresholdKey,
    grouped: bool,
) -> Result<Released, ReleaseError> {
    // First pass: which groups each rule keeps.
    let mut keeps: Vec<Vec<bool>> = Vec::with_capacity(batches.len());
    for batch in &batches {
        let rows = batch
            .columns()
            .last()
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| {
                ReleaseError::Internal(format!(
                    "the aggregate has no {ROWS_COLUMN} column of type Int64"
                ))
            })?;
        let mut counted = vec![Counted {
            counts: rows,
            digests: uint64(batch, ROWS_DIGEST),
        }];
        for field in batch.schema().fields() {
            if let Some(i) = field.name().strip_prefix(CONTRIBUTORS_PREFIX) {
                let counts = int64(batch, field.name()).ok_or_else(|| {
                    ReleaseError::Internal(format!("{} is not an Int64 count", field.name()))
                })?;
                counted.push(Counted {
                    counts,
                    digests: uint64(batch, &format!("{DIGEST_PREFIX}{i}")),
                });
            }
        }
        let mut dominance: Vec<(&Float64Array, &Float64Array)> = Vec::new();
        for field in batch.schema().fields() {
            if let Some(suffix) = field.name().strip_prefix(DOMINANCE_MAX_PREFIX) {
                let column = |name: &str| {
                    batch
                        .column_by_name(name)
                        .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
                        .ok_or_else(|| {
                            ReleaseError::Internal(format!("{name} is not a Float64 sum"))
                        })
                };
                dominance.push((
                    column(field.name())?,
                    column(&format!("{DOMINANCE_SUM_PREFIX}{suffix}"))?,
                ));
            }
        }
        let keep: Vec<bool> = (0..batch.num_rows())
            .map(|r| {
                let dominated = dominance.iter().any(|(max, sum)| {
                    max.is_valid(r)
                        && sum.is_valid(r)
                        && sum.value(r) > 0.0
                        && max.value(r) > key.dominance * sum.value(r)
                });
                !dominated
                    && counted.iter().all(|c| {
                        let n = if c.counts.is_valid(r) {
                            c.counts.value(r)
                        } else {
                            0
                        };
                        let margin = c
                            .digests
                            .filter(|d| d.is_valid(r))
                            .map_or(0, |d| key.margin(d.value(r), k));
                        n >= 0 && n as u64 >= k + margin
                    })
            })
            .collect();
        keeps.push(keep);
    }
    if grouped {
        secondary_suppression(&batches, &mut keeps, k, key)?;
    }
    // Second pass: what leaves, and what the researcher is told of the rest.
    let mut kept = Vec::with_capacity(batches.len());
    let (mut released, mut suppressed) = (0u64, 0u64);
    // The withheld groups as one set of rows: how many, and the digest of which.
    let (mut withheld_rows, mut withheld_digest) = (0u64, 0u64);
    for (batch, keep) in batches.into_iter().zip(keeps) {
        let rows = batch
            .columns()
            .last()
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| ReleaseError::Internal(format!("{ROWS_COLUMN} is not an Int64")))?;
        let keep = BooleanArray::from(keep);
        let n = keep.true_count() as u64;
        released += n;
        suppressed += batch.num_rows() as u64 - n;
        let digests = uint64(&batch, ROWS_DIGEST);
        for r in (0..batch.num_rows()).filter(|r| !keep.value(*r)) {
            if rows.is_valid(r) {
                withheld_rows += rows.value(r).max(0) as u64;
            }
            if let Some(d) = digests.filter(|d| d.is_valid(r)) {
                withheld_digest ^= d.value(r);
            }
        }
        if n as usize == batch.num_rows() {
            kept.push(batch);
        } else if n > 0 {
            kept.push(
                filter_record_batch(&batch, &keep)
                    .map_err(|e| ReleaseError::Internal(e.to_string()))?,
            );
        }
    }
    let announced = (withheld_rows >= k + key.margin(withheld_digest, k)).then_some(suppressed);
    Ok(Released {
        batches: kept,
        released,
        suppressed,
        announced,
        sets: Vec::new(),
    })
}

/// Secondary suppression, for the query-set auditor: when the groups withheld below k hold
/// between one and k (plus the noisy margin of which patients) patients that no released
/// group holds, the total minus the released groups would be those patients. The smallest
/// released groups are then withheld too, until the patients only withheld groups hold are
/// at least that many (or every group is withheld). Runs only when the plan collected the
/// groups' unit sets (`__units_rows`) and the groups share no patient.
fn secondary_suppression(
    batches: &[RecordBatch],
    keeps: &mut [Vec<bool>],
    k: u64,
    key: &ThresholdKey,
) -> Result<(), ReleaseError> {
    let mut groups: Vec<(usize, usize, i64, UnitSet)> = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let Some(sets) = batch.column_by_name(UNITS_ROWS) else {
            return Ok(());
        };
        let sets = sets
            .as_binary_opt::<i32>()
            .ok_or_else(|| ReleaseError::Internal(format!("{UNITS_ROWS} is not Binary")))?;
        let rows = int64(batch, ROWS_COLUMN)
            .ok_or_else(|| ReleaseError::Internal(format!("{ROWS_COLUMN} is not an Int64")))?;
        for r in 0..batch.num_rows() {
            let set = if sets.is_valid(r) {
                UnitSet::decode(sets.value(r)).ok_or_else(|| {
                    ReleaseError::Internal(format!("{UNITS_ROWS} holds no unit set"))
                })?
            } else {
                UnitSet::default()
            };
            let n = if rows.is_valid(r) { rows.value(r) } else { 0 };
            groups.push((b, r, n, set));
        }
    }
    // Nothing withheld: nothing to subtract to.
    if groups.iter().all(|(b, r, _, _)| keeps[*b][*r]) {
        return Ok(());
    }
    // Groups that share patients (a patient in several drug groups) do not subtract from
    // a total: nothing to protect by withholding more.
    let all = UnitSet::from_iter(groups.iter().flat_map(|(_, _, _, set)| set.iter()));
    let sizes: u64 = groups.iter().map(|(_, _, _, set)| set.len()).sum();
    if all.len() != sizes {
        return Ok(());
    }
    loop {
        let of = |kept: bool| {
            UnitSet::from_iter(
                groups
                    .iter()
                    .filter(|(b, r, _, _)| keeps[*b][*r] == kept)
                    .flat_map(|(_, _, _, set)| set.iter()),
            )
        };
        let withheld = of(false);
        if withheld.is_empty() {
            return Ok(());
        }
        let withheld = withheld.difference(&of(true));
        if withheld.is_empty() {
            return Ok(());
        }
        if withheld.len() >= crate::queryset::threshold(withheld.iter(), k, key, &|x| x) {
            return Ok(());
        }
        let smallest = groups
            .iter()
            .filter(|(b, r, _, _)| keeps[*b][*r])
            .min_by_key(|(_, _, n, _)| *n)
            .map(|(b, r, _, _)| (*b, *r));
        match smallest {
            Some((b, r)) => keeps[b][r] = false,
            None => return Ok(()),
        }
    }
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
        DataFusionError::ResourcesExhausted(_) => "resources exhausted (limit query_memory_bytes)",
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

    fn release(
        station: &str,
        table: &str,
        release: &Release,
        batches: Vec<RecordBatch>,
    ) -> Result<Released, ReleaseError> {
        super::release(
            station,
            table,
            release,
            batches,
            &ThresholdKey::new([7; 32], 3),
        )
    }

    /// Groups with their row counts, the contributors of one value, and digests.
    fn counted(rows: &[i64], contributors: &[i64], digests: &[u64]) -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("g", DataType::Int32, true),
                Field::new("__contributors_0", DataType::Int64, false),
                Field::new("__digest_0", DataType::UInt64, true),
                Field::new("__digest_rows", DataType::UInt64, true),
                Field::new(ROWS_COLUMN, DataType::Int64, false),
            ])),
            vec![
                Arc::new(Int32Array::from_iter_values(0..rows.len() as i32)),
                Arc::new(Int64Array::from(contributors.to_vec())),
                Arc::new(UInt64Array::from(digests.to_vec())),
                Arc::new(UInt64Array::from(digests.to_vec())),
                Arc::new(Int64Array::from(rows.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn every_value_needs_k_contributors_and_internal_columns_never_leave() {
        let grouped = Release::Groups {
            k: 5,
            global: false,
        };
        // 200 rows, but one contributor: withheld. Digest 0 meets no margin here only if
        // its margin is 0, so use counts past k + threshold_noise to test the count alone.
        let big = (5 + 4) as i64;
        let out = release(
            "s",
            "t",
            &grouped,
            vec![counted(&[200, 200, 200], &[1, big, 4], &[1, 2, 3])],
        )
        .unwrap();
        assert_eq!((out.released, out.suppressed), (1, 2));
        let fields: Vec<String> = out.batches[0]
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(fields, ["g", ROWS_COLUMN]);
        let schema = counted(&[1], &[1], &[1]).schema();
        assert_eq!(released_schema(&schema).fields().len(), 2);
        // A global aggregate whose value has too few contributors is refused.
        let global = Release::Groups { k: 5, global: true };
        assert!(matches!(
            release("s", "t", &global, vec![counted(&[200], &[3], &[9])]),
            Err(ReleaseError::Refused(Refusal {
                rule: Rule::MinGroupSize,
                ..
            }))
        ));
    }

    #[test]
    fn the_noisy_margin_is_a_function_of_the_rows_and_never_lowers_k() {
        let key = ThresholdKey::new([7; 32], 3);
        let margins: Vec<u64> = (0..4000u64).map(|d| key.margin(d, 5)).collect();
        // The same rows meet the same threshold.
        assert!((0..4000u64).all(|d| key.margin(d, 5) == margins[d as usize]));
        // Every margin is taken, roughly equally often, and none is negative.
        for m in 0..4 {
            let n = margins.iter().filter(|x| **x == m).count();
            assert!((800..1200).contains(&n), "margin {m} drawn {n} times");
        }
        assert!(margins.iter().all(|m| *m <= 3));
        // Without noise the threshold is k exactly.
        assert!((0..100u64).all(|d| ThresholdKey::new([7; 32], 0).margin(d, 5) == 0));
        // Another key draws other margins.
        let other = ThresholdKey::new([8; 32], 3);
        assert!((0..100u64).any(|d| other.margin(d, 5) != key.margin(d, 5)));
        // Below k nothing is released, whatever the digest; at k + 3 always.
        let grouped = Release::Groups {
            k: 5,
            global: false,
        };
        for d in 0..50u64 {
            let below = counted(&[4], &[4], &[d]);
            assert_eq!(
                release("s", "t", &grouped, vec![below]).unwrap().released,
                0
            );
            let sure = (5 + 3) as i64;
            let above = counted(&[sure], &[sure], &[d]);
            assert_eq!(
                release("s", "t", &grouped, vec![above]).unwrap().released,
                1
            );
        }
    }

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
    fn the_withheld_count_is_told_only_for_k_rows_or_more() {
        let grouped = Release::Groups {
            k: 5,
            global: false,
        };
        // One small group or none: the same answer, "fewer than k rows" (the count would be
        // whether that one patient matched).
        for counts in [&[9][..], &[9, 1], &[9, 4]] {
            let out = release("s", "t", &grouped, vec![groups(counts)]).unwrap();
            assert_eq!(out.announced, None, "{counts:?}");
        }
        // Withheld groups of k rows and more in all (past any margin): their number is told.
        let out = release("s", "t", &grouped, vec![groups(&[9, 4, 4, 1])]).unwrap();
        assert_eq!((out.suppressed, out.announced), (3, Some(3)));
        // A global aggregate, released whole, withheld nothing.
        let global = Release::Groups { k: 5, global: true };
        let out = release("s", "t", &global, vec![groups(&[9])]).unwrap();
        assert_eq!(out.announced, Some(0));
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
                assert!(r.message.starts_with("policy: a station "), "{}", r.message);
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
        // Sums marked NaN by the station's glm_terms: one row dominates them.
        let mut dominated = terms(2, 40.0, &[40.0, 20.0]);
        {
            use arrow::array::{Float64Builder, ListBuilder};
            let layout = GlmLayout { q: 2 };
            let mut values = vec![f64::NAN; layout.len()];
            values[GlmLayout::N] = 40.0;
            values[layout.nonzero()].copy_from_slice(&[40.0, 20.0]);
            let mut list = ListBuilder::new(Float64Builder::new());
            list.values().append_slice(&values);
            list.append(true);
            let mut columns = dominated.columns().to_vec();
            columns[0] = Arc::new(list.finish());
            dominated = RecordBatch::try_new(dominated.schema(), columns).unwrap();
        }
        let model = Release::Model {
            k: 5,
            min_rows: 10,
            parameters: 2,
        };
        assert!(matches!(
            release("s", "t", &model, vec![dominated]),
            Err(ReleaseError::Refused(Refusal {
                rule: Rule::ModelDominance,
                ..
            }))
        ));
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
