//! The histogram behind `dp_quantile` / `dp_median`: counted at a station over the bins its
//! policy declares, noised there, merged and read at the hub.
//!
//! A histogram stands for a cumulative count that rises linearly inside each bin (values are
//! taken as spread uniformly over their bin). Two histograms over different bins merge
//! exactly in that reading: each is refined to the union of both sets of edges, a bin's count
//! split over its pieces in proportion to their widths, and the refined counts are added.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, ListArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::Accumulator;
use datafusion::logical_expr::function::AccumulatorArgs;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{CastExpr, Literal, TryCastExpr};

use super::DpKind;

/// Most bins a histogram of a DP quantile may have (a policy's `bins`, and a station's
/// histogram as the hub receives it).
pub const MAX_DP_BINS: usize = 1000;
/// Most bins the hub's merge of histograms over different bins may have.
pub const MAX_MERGED_BINS: usize = 100_000;

/// Why a list of bin edges cannot be used, if it cannot: 2 to [`MAX_DP_BINS`] + 1 finite
/// numbers, strictly increasing.
pub fn edges_error(edges: &[f64]) -> Option<String> {
    if edges.len() < 2 || edges.len() > MAX_DP_BINS + 1 {
        return Some(format!(
            "a histogram has 1 to {MAX_DP_BINS} bins (2 to {} edges)",
            MAX_DP_BINS + 1
        ));
    }
    if edges.iter().any(|e| !e.is_finite()) || edges.windows(2).any(|w| w[0] >= w[1]) {
        return Some("bin edges are finite numbers in strictly increasing order".to_string());
    }
    None
}

/// `n` bins of equal width from `lower` to `upper`.
pub fn equal_width_edges(lower: f64, upper: f64, n: usize) -> Vec<f64> {
    let width = (upper - lower) / n as f64;
    (0..=n)
        .map(|i| {
            if i == n {
                upper
            } else {
                lower + width * i as f64
            }
        })
        .collect()
}

/// Counts over bins; `counts.len() + 1 == edges.len()`, or both empty (no histogram yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<f64>,
}

impl Histogram {
    /// An empty histogram over `edges` (which [`edges_error`] accepts).
    pub fn over(edges: Vec<f64>) -> Self {
        let counts = vec![0.0; edges.len().saturating_sub(1)];
        Self { edges, counts }
    }

    /// Counts `x` in its bin; values beyond the first or last edge count in the first or last
    /// bin. NaN is not counted.
    pub fn add(&mut self, x: f64) {
        if x.is_nan() || self.counts.is_empty() {
            return;
        }
        // The number of edges ≤ x, less one, is x's bin (bins are closed on the left).
        let bin = self
            .edges
            .partition_point(|e| *e <= x)
            .saturating_sub(1)
            .min(self.counts.len() - 1);
        self.counts[bin] += 1.0;
    }

    /// Adds `other` to this histogram (see the module's note on different bins).
    pub fn merge(&mut self, other: &Histogram) -> Result<()> {
        if other.counts.is_empty() {
            return Ok(());
        }
        if self.counts.is_empty() {
            *self = other.clone();
            return Ok(());
        }
        if self.edges == other.edges {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a += b;
            }
            return Ok(());
        }
        let mut edges: Vec<f64> = self.edges.iter().chain(&other.edges).copied().collect();
        edges.sort_by(f64::total_cmp);
        edges.dedup();
        if edges.len() > MAX_MERGED_BINS + 1 {
            return exec_err!(
                "the stations' histograms together have more than {MAX_MERGED_BINS} bins"
            );
        }
        let a = self.refined(&edges);
        let b = other.refined(&edges);
        self.counts = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        self.edges = edges;
        Ok(())
    }

    /// The counts over `edges`, a refinement of (a superset of) this histogram's edges.
    fn refined(&self, edges: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; edges.len() - 1];
        let mut bin = 0;
        for (i, piece) in edges.windows(2).enumerate() {
            let (lo, hi) = (piece[0], piece[1]);
            while bin < self.counts.len() && self.edges[bin + 1] <= lo {
                bin += 1;
            }
            if bin == self.counts.len() || hi <= self.edges[bin] {
                continue;
            }
            let width = self.edges[bin + 1] - self.edges[bin];
            out[i] = self.counts[bin] * (hi - lo) / width;
        }
        out
    }

    /// The `q`-quantile (0 ≤ q ≤ 1): where the cumulative count, rising linearly inside each
    /// bin, reaches `q` times the total. Negative (noisy) counts are read as zero; `None`
    /// when nothing is counted.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<f64> = self.counts.iter().map(|c| c.max(0.0)).collect();
        let total: f64 = counts.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            return None;
        }
        let target = q.clamp(0.0, 1.0) * total;
        let mut below = 0.0;
        for (i, c) in counts.iter().enumerate() {
            if *c > 0.0 && below + c >= target {
                let (lo, hi) = (self.edges[i], self.edges[i + 1]);
                let within = ((target - below) / c).clamp(0.0, 1.0);
                return Some(lo + within * (hi - lo));
            }
            below += c;
        }
        // Rounding left the target just above the total: the top of the last counted bin.
        let last = counts.iter().rposition(|c| *c > 0.0)?;
        Some(self.edges[last + 1])
    }
}

/// A list of `Float64` values as one list scalar (a state field).
fn list_scalar(values: &[f64]) -> ScalarValue {
    let list = ListArray::new(
        Arc::new(Field::new_list_field(DataType::Float64, true)),
        OffsetBuffer::from_lengths([values.len()]),
        Arc::new(Float64Array::from(values.to_vec())),
        None,
    );
    ScalarValue::List(Arc::new(list))
}

/// The numbers of row `row` of a list state field (none for a NULL row).
pub fn list_values(array: &ArrayRef, row: usize) -> Result<Option<Vec<f64>>> {
    let Some(list) = array.as_list_opt::<i32>() else {
        return exec_err!("a histogram state is not a list");
    };
    if list.is_null(row) {
        return Ok(None);
    }
    let values = list.value(row);
    let Some(values) = values.as_primitive_opt::<Float64Type>() else {
        return exec_err!("a histogram state is not a list of Float64");
    };
    Ok(Some(values.iter().map(|v| v.unwrap_or(0.0)).collect()))
}

/// A constant number: a literal, possibly cast (as type coercion writes it).
fn constant(expr: &Arc<dyn PhysicalExpr>) -> Option<f64> {
    let value = if let Some(l) = expr.downcast_ref::<Literal>() {
        l.value().clone()
    } else if let Some(c) = expr.downcast_ref::<CastExpr>() {
        return constant(c.expr());
    } else if let Some(c) = expr.downcast_ref::<TryCastExpr>() {
        return constant(c.expr());
    } else {
        return None;
    };
    match value.cast_to(&DataType::Float64).ok()? {
        ScalarValue::Float64(Some(v)) => Some(v),
        _ => None,
    }
}

/// The argument types of `dp_quantile(x, q, edges…)` / `dp_median(x, edges…)`: all numbers.
pub(super) fn coerce_types(kind: DpKind, arg_types: &[DataType]) -> Result<Vec<DataType>> {
    if arg_types.len() < kind.user_args() {
        return plan_err!(
            "{}() takes {}",
            kind.name(),
            if kind.user_args() == 2 {
                "two arguments: a column and the quantile q (between 0 and 1)"
            } else {
                "one argument"
            }
        );
    }
    if let Some(t) = arg_types.iter().find(|t| !(t.is_numeric() || t.is_null())) {
        return plan_err!("{}() needs numeric arguments, not {t}", kind.name());
    }
    Ok(vec![DataType::Float64; arg_types.len()])
}

/// The exact histogram of a DP quantile at a station (over the edges appended to the call),
/// or the merge of noisy histograms at the hub.
#[derive(Debug)]
pub(super) struct QuantileAccumulator {
    kind: DpKind,
    q: f64,
    histogram: Histogram,
}

impl QuantileAccumulator {
    pub(super) fn new(kind: DpKind, args: &AccumulatorArgs) -> Result<Self> {
        let q = match kind {
            DpKind::Median => 0.5,
            _ => match args.exprs.get(1).and_then(constant) {
                Some(q) if (0.0..=1.0).contains(&q) => q,
                _ => {
                    return plan_err!(
                        "the second argument of dp_quantile() is the quantile q: a constant \
                         between 0 and 1"
                    );
                }
            },
        };
        let edges = args
            .exprs
            .iter()
            .skip(kind.user_args())
            .map(constant)
            .collect::<Option<Vec<f64>>>();
        let Some(edges) = edges else {
            return plan_err!("the bin edges of {}() are constants", kind.name());
        };
        let histogram = if edges.is_empty() {
            // The hub's half: it only merges histograms the stations counted.
            Histogram::default()
        } else {
            if let Some(why) = edges_error(&edges) {
                return plan_err!("{}(): {why}", kind.name());
            }
            Histogram::over(edges)
        };
        Ok(Self { kind, q, histogram })
    }
}

impl Accumulator for QuantileAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(values) = values.first() else {
            return Ok(());
        };
        if self.histogram.counts.is_empty() {
            return exec_err!(
                "{}() counts rows only at a station, over the bins its policy declares",
                self.kind.name()
            );
        }
        let Some(values) = values.as_primitive_opt::<Float64Type>() else {
            return exec_err!("{}() needs a numeric argument", self.kind.name());
        };
        for x in values.iter().flatten() {
            self.histogram.add(x);
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [edges, counts] = states else {
            return exec_err!("a histogram state has two fields");
        };
        for row in 0..edges.len() {
            let (Some(e), Some(c)) = (list_values(edges, row)?, list_values(counts, row)?) else {
                continue;
            };
            if e.is_empty() && c.is_empty() {
                continue;
            }
            if let Some(why) = edges_error(&e) {
                return exec_err!("a station's histogram: {why}");
            }
            if c.len() + 1 != e.len() || c.iter().any(|v| !v.is_finite()) {
                return exec_err!("a station's histogram has counts that do not fit its bins");
            }
            self.histogram.merge(&Histogram {
                edges: e,
                counts: c,
            })?;
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![
            list_scalar(&self.histogram.edges),
            list_scalar(&self.histogram.counts),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(self.histogram.quantile(self.q)))
    }

    fn size(&self) -> usize {
        size_of_val(self) + 8 * (self.histogram.edges.len() + self.histogram.counts.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(edges: &[f64], counts: &[f64]) -> Histogram {
        Histogram {
            edges: edges.to_vec(),
            counts: counts.to_vec(),
        }
    }

    #[test]
    fn values_fall_in_bins_closed_on_the_left_and_the_ends_take_the_rest() {
        let mut h = Histogram::over(vec![0.0, 10.0, 20.0]);
        for x in [-5.0, 0.0, 9.99, 10.0, 20.0, 1e9, f64::NAN] {
            h.add(x);
        }
        assert_eq!(h.counts, vec![3.0, 3.0]);
    }

    #[test]
    fn the_quantile_interpolates_inside_its_bin() {
        // 10 values spread over [0, 10) and 30 over [10, 20): the median (20th of 40) is
        // a third of the way into the second bin.
        let h = hist(&[0.0, 10.0, 20.0], &[10.0, 30.0]);
        assert!((h.quantile(0.5).unwrap() - (10.0 + 10.0 / 3.0)).abs() < 1e-12);
        assert_eq!(h.quantile(0.0), Some(0.0));
        assert_eq!(h.quantile(1.0), Some(20.0));
        assert!((h.quantile(0.25).unwrap() - 10.0).abs() < 1e-12);
        // Negative noisy counts are read as zero; nothing counted is no quantile.
        assert_eq!(
            hist(&[0.0, 1.0, 2.0], &[-3.0, 4.0]).quantile(0.5),
            Some(1.5)
        );
        assert_eq!(hist(&[0.0, 1.0], &[-1.0]).quantile(0.5), None);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn histograms_over_different_bins_merge_to_the_sum_of_their_cumulative_counts() {
        let a = hist(&[0.0, 10.0, 20.0], &[4.0, 6.0]);
        let b = hist(&[5.0, 15.0, 25.0, 30.0], &[2.0, 8.0, 1.0]);
        let mut m = a.clone();
        m.merge(&b).unwrap();
        assert_eq!(m.edges, vec![0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]);
        let cdf = |h: &Histogram, x: f64| -> f64 {
            h.counts
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (lo, hi) = (h.edges[i], h.edges[i + 1]);
                    c * ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
                })
                .sum()
        };
        for x in [0.0, 2.5, 5.0, 7.0, 12.0, 17.5, 21.0, 26.0, 30.0] {
            let want = cdf(&a, x) + cdf(&b, x);
            assert!(
                (cdf(&m, x) - want).abs() < 1e-9,
                "at {x}: {} {want}",
                cdf(&m, x)
            );
        }
        // The same bins add bin by bin.
        let mut same = a.clone();
        same.merge(&a).unwrap();
        assert_eq!(same.counts, vec![8.0, 12.0]);
    }

    #[test]
    fn edges_are_checked() {
        assert!(edges_error(&[0.0, 1.0]).is_none());
        assert!(edges_error(&[0.0]).is_some());
        assert!(edges_error(&[0.0, 0.0]).is_some());
        assert!(edges_error(&[1.0, 0.0]).is_some());
        assert!(edges_error(&[0.0, f64::INFINITY]).is_some());
        let e = equal_width_edges(0.0, 120.0, 24);
        assert_eq!(e.len(), 25);
        assert_eq!(e[0], 0.0);
        assert_eq!(e[24], 120.0);
        assert!(edges_error(&e).is_none());
    }
}
