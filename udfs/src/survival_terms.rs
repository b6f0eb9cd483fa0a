//! `survival_terms(time, event, resolution, min_rows, min_events, x1 … xp, b1 … bp)`: one
//! station's event table, and with covariates its share of a Cox model's Newton step.
//!
//! Per released time `t` (ascending):
//!
//! ```text
//!   rows, events                                       (p = 0: a Kaplan–Meier event table)
//!   S0 = Σ e, S1 = Σ x·e, S2 = Σ x xᵀ·e                over the rows at t, e = exp(xᵀb)
//!   D0, D1, D2: the same over the deaths at t, DX = Σ x over the deaths
//! ```
//!
//! The hub merges stations by adding the vectors of equal times, forms risk sets by summing
//! from the latest time down, and evaluates the Efron partial likelihood. Nothing but sums
//! of rows that share a released time leaves the station.
//!
//! Disclosure control happens in [`Accumulator::evaluate`], on the station's complete
//! table: times are floored to multiples of `resolution` (0 keeps them exact), then
//! consecutive times are pooled (at the earliest time of the pool) until every released
//! time covers at least `min_rows` rows and either no death or at least `min_events`. If no
//! pooling can satisfy that, the value is NULL and the station refuses the release.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

use crate::glm_terms::{
    MAX_ETA, add_terms, coerce_numeric, dominated, f64_list, f64_list_type, list_values,
    literal_f64, merge_tracked,
};

/// The function's SQL name.
pub const SURVIVAL_TERMS: &str = "survival_terms";

/// Leading literal arguments: time, event, resolution, min_rows, min_events.
const FIXED_ARGS: usize = 5;

/// Where each sum sits in one time's vector, for `p` covariates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SurvivalLayout {
    pub p: usize,
}

impl SurvivalLayout {
    pub const ROWS: usize = 0;
    pub const EVENTS: usize = 1;

    fn block(self) -> usize {
        1 + self.p + self.p * self.p
    }

    /// Start of the risk block (S0, S1, S2) and the death block (D0, D1, D2).
    pub fn rows_block(self) -> usize {
        2
    }

    pub fn deaths_block(self) -> usize {
        2 + self.block()
    }

    /// Σ x over the deaths.
    pub fn death_x(self) -> usize {
        2 + 2 * self.block()
    }

    /// Values per time (without the time itself).
    pub fn len(self) -> usize {
        if self.p == 0 {
            2
        } else {
            2 + 2 * self.block() + self.p
        }
    }

    pub fn is_empty(self) -> bool {
        false
    }
}

/// The number of covariates of a call with `args` arguments.
pub fn survival_covariates(args: usize) -> Option<usize> {
    let rest = args.checked_sub(FIXED_ARGS)?;
    (rest % 2 == 0).then_some(rest / 2)
}

/// Splits a released value `[t, v…, t, v…]` into (time, vector) pairs.
pub fn survival_entries(values: &[f64], layout: SurvivalLayout) -> Result<Vec<(f64, Vec<f64>)>> {
    entries(values, 1 + layout.len())
}

/// Splits `[t, v…, t, v…]` with vectors of `stride - 1` values.
fn entries(values: &[f64], stride: usize) -> Result<Vec<(f64, Vec<f64>)>> {
    if !values.len().is_multiple_of(stride) {
        return exec_err!(
            "{SURVIVAL_TERMS}: {} values do not divide into times of {stride}",
            values.len()
        );
    }
    Ok(values
        .chunks(stride)
        .map(|c| (c[0], c[1..].to_vec()))
        .collect())
}

/// One released time and its sums.
type Entry = (f64, Vec<f64>);

/// Per time, the sums of the rows at that time.
pub type EventTable = BTreeMap<Time, Vec<f64>>;

/// Adds a released value `[t, v…, t, v…]` into `table`, summing the vectors of equal times
/// (how a station merges its partitions, and the hub its stations).
pub fn add_entries(table: &mut EventTable, values: &[f64], layout: SurvivalLayout) -> Result<()> {
    for (t, v) in survival_entries(values, layout)? {
        match table.get_mut(&Time(t)) {
            Some(sums) => add_terms(sums, &v)?,
            None => {
                table.insert(Time(t), v);
            }
        }
    }
    Ok(())
}

/// The `survival_terms` aggregate. At a station it carries the policy's dominance rule (see
/// [`SurvivalTerms::with_dominance`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SurvivalTerms {
    signature: Signature,
    /// As for [`crate::glm_terms::GlmTerms`]: the largest share (in thousandths) one row
    /// may hold of a released risk or death sum.
    max_share_permille: Option<u32>,
}

impl Default for SurvivalTerms {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
            max_share_permille: None,
        }
    }
}

impl SurvivalTerms {
    /// The aggregate enforcing that no row holds more than `max_share` of any released
    /// S0, S1, S2, D0, D1 or D2 sum: its value is an empty list otherwise, which the station
    /// refuses (`model_dominance`).
    pub fn with_dominance(max_share: f64) -> Self {
        Self {
            max_share_permille: Some((max_share.clamp(0.0, 1.0) * 1000.0).round() as u32),
            ..Self::default()
        }
    }
}

impl AggregateUDFImpl for SurvivalTerms {
    fn name(&self) -> &str {
        SURVIVAL_TERMS
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if survival_covariates(arg_types.len()).is_none() {
            return plan_err!(
                "{SURVIVAL_TERMS}(time, event, resolution, min_rows, min_events, x…, b…) needs \
                 five arguments and as many coefficients as covariates"
            );
        }
        coerce_numeric(SURVIVAL_TERMS, arg_types, 0)
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(f64_list_type())
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[times]", args.name),
            f64_list_type(),
            true,
        ))])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let Some(p) = survival_covariates(args.exprs.len()) else {
            return plan_err!("{SURVIVAL_TERMS}: as many coefficients as covariates are needed");
        };
        let resolution = literal_f64(&args, 2, "the time resolution")?;
        let min_rows = literal_f64(&args, 3, "the minimum rows per time")?;
        let min_events = literal_f64(&args, 4, "the minimum deaths per time")?;
        if resolution < 0.0 || min_rows < 1.0 || min_events < 0.0 {
            return plan_err!(
                "{SURVIVAL_TERMS}: the resolution must be ≥ 0, min_rows ≥ 1 and min_events ≥ 0"
            );
        }
        let beta = (0..p)
            .map(|j| literal_f64(&args, FIXED_ARGS + p + j, "a coefficient"))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(SurvivalAccumulator {
            layout: SurvivalLayout { p },
            resolution,
            min_rows,
            min_events,
            beta,
            times: BTreeMap::new(),
            x: vec![0.0; p],
            max_share: self.max_share_permille.map(|m| f64::from(m) / 1000.0),
        }))
    }
}

/// A time as a map key, ordered as a number (`total_cmp`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Time(pub f64);

impl Eq for Time {}

impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Time {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Debug)]
struct SurvivalAccumulator {
    layout: SurvivalLayout,
    resolution: f64,
    min_rows: f64,
    min_events: f64,
    beta: Vec<f64>,
    /// Per (floored) time, the sums of its rows, then for each the sum of the rows'
    /// absolute contributions and the largest of them (for the dominance rule, never
    /// released).
    times: EventTable,
    x: Vec<f64>,
    max_share: Option<f64>,
}

impl SurvivalAccumulator {
    fn add_row(&mut self, time: f64, death: bool) {
        let layout = self.layout;
        let (p, len) = (layout.p, layout.len());
        let key = if self.resolution > 0.0 {
            (time / self.resolution).floor() * self.resolution
        } else {
            time
        };
        let v = self
            .times
            .entry(Time(key))
            .or_insert_with(|| vec![0.0; 3 * len]);
        let mut add = |i: usize, c: f64| {
            v[i] += c;
            v[len + i] += c.abs();
            v[2 * len + i] = v[2 * len + i].max(c.abs());
        };
        add(SurvivalLayout::ROWS, 1.0);
        if death {
            add(SurvivalLayout::EVENTS, 1.0);
        }
        if p == 0 {
            return;
        }
        let eta = self
            .x
            .iter()
            .zip(&self.beta)
            .map(|(x, b)| x * b)
            .sum::<f64>();
        let e = eta.clamp(-MAX_ETA, MAX_ETA).exp();
        let x = &self.x;
        let mut add_block = |start: usize| {
            add(start, e);
            for j in 0..p {
                add(start + 1 + j, x[j] * e);
                for k in 0..p {
                    add(start + 1 + p + j * p + k, x[j] * x[k] * e);
                }
            }
        };
        add_block(layout.rows_block());
        if death {
            add_block(layout.deaths_block());
            for (j, xj) in x.iter().enumerate() {
                add(layout.death_x() + j, *xj);
            }
        }
    }

    /// Whether one row dominates a released risk or death sum of a pooled time.
    fn dominated(&self, entries: &[Entry], share: f64) -> bool {
        let layout = self.layout;
        if layout.p == 0 {
            // Without coefficients there are only counts, pooled to their own rules.
            return false;
        }
        let len = layout.len();
        let block = layout.death_x() - layout.deaths_block();
        let checked: Vec<usize> = (layout.rows_block()..layout.rows_block() + block)
            .chain(layout.deaths_block()..layout.deaths_block() + block)
            .collect();
        entries.iter().any(|(_, v)| {
            checked
                .iter()
                .any(|i| dominated(v[len + i], v[2 * len + i], share))
        })
    }

    fn releasable(&self, v: &[f64]) -> bool {
        let events = v[SurvivalLayout::EVENTS];
        v[SurvivalLayout::ROWS] >= self.min_rows && (events == 0.0 || events >= self.min_events)
    }

    /// The released times: pooled so that every one is releasable; None if that is
    /// impossible.
    fn pooled(&self) -> Result<Option<Vec<Entry>>> {
        let len = self.layout.len();
        let mut out: Vec<Entry> = Vec::new();
        let mut open: Option<Entry> = None;
        for (time, v) in &self.times {
            match &mut open {
                None => open = Some((time.0, v.clone())),
                Some((_, sums)) => merge_tracked(sums, v, len)?,
            }
            if let Some((_, sums)) = &open
                && self.releasable(sums)
            {
                out.extend(open.take());
            }
        }
        if let Some((_, rest)) = open {
            let Some((_, last)) = out.last_mut() else {
                return Ok(None);
            };
            merge_tracked(last, &rest, len)?;
            // The tail may have broken the last time's rule: pool backwards until it holds.
            while let Some((_, last)) = out.last()
                && !self.releasable(last)
            {
                let (_, last) = out.pop().unwrap_or_default();
                let Some((_, previous)) = out.last_mut() else {
                    return Ok(None);
                };
                merge_tracked(previous, &last, len)?;
            }
        }
        Ok(Some(out))
    }

    /// `[t, v…, t, v…]` with the first `width` values of each vector.
    fn flat(entries: impl IntoIterator<Item = (f64, Vec<f64>)>, width: usize) -> Vec<f64> {
        let mut values = Vec::new();
        for (t, v) in entries {
            values.push(t);
            values.extend(&v[..width]);
        }
        values
    }
}

impl Accumulator for SurvivalAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let column = |i: usize| -> Result<&Float64Array> {
            match values
                .get(i)
                .and_then(|a| a.as_primitive_opt::<Float64Type>())
            {
                Some(a) => Ok(a),
                None => exec_err!("{SURVIVAL_TERMS}: argument {} is not Float64", i + 1),
            }
        };
        let (time, event) = (column(0)?, column(1)?);
        let xs = (0..self.layout.p)
            .map(|j| column(FIXED_ARGS + j))
            .collect::<Result<Vec<_>>>()?;
        'rows: for i in 0..time.len() {
            if time.is_null(i) || event.is_null(i) || time.value(i).is_nan() {
                continue;
            }
            for (j, x) in xs.iter().enumerate() {
                if x.is_null(i) {
                    continue 'rows;
                }
                self.x[j] = x.value(i);
            }
            self.add_row(time.value(i), event.value(i) != 0.0);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(match self.pooled()? {
            Some(entries)
                if self
                    .max_share
                    .is_some_and(|share| self.dominated(&entries, share)) =>
            {
                f64_list(&[])
            }
            Some(entries) => f64_list(&Self::flat(entries, self.layout.len())),
            None => ScalarValue::List(Arc::new(arrow::array::ListArray::new_null(
                Arc::new(Field::new_list_field(DataType::Float64, true)),
                1,
            ))),
        })
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.times.len() * 8 * (1 + 3 * self.layout.len())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let entries = self.times.iter().map(|(t, v)| (t.0, v.clone()));
        Ok(vec![f64_list(&Self::flat(entries, 3 * self.layout.len()))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(list) = states.first().and_then(|a| a.as_list_opt::<i32>()) else {
            return exec_err!("{SURVIVAL_TERMS}: the state is not a list");
        };
        let stride = 1 + 3 * self.layout.len();
        for row in 0..list.len() {
            if let Some(values) = list_values(list, row) {
                for (t, v) in entries(&values, stride)? {
                    match self.times.get_mut(&Time(t)) {
                        Some(sums) => merge_tracked(sums, &v, self.layout.len())?,
                        None => {
                            self.times.insert(Time(t), v);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
