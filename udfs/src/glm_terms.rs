//! `glm_terms(family, intercept, y, x1 … xp, b1 … bq)`: one station's share of one
//! iteratively reweighted least squares (Fisher scoring) step of a generalized linear model.
//!
//! For the coefficients `b` the hub sends, every complete row (y and all x non-NULL)
//! contributes to sums that merge by addition across stations:
//!
//! ```text
//!   n, Σy, deviance, log-likelihood,  XᵀW(Wη + y − μ)/W = Xᵀ(Wη + y − μ),  XᵀWX,
//!   and per design column the number of rows where it is non-zero
//! ```
//!
//! With a canonical link (identity/gaussian, logit/binomial, log/poisson) `dμ/dη = V(μ) = W`,
//! so the working response never divides by a weight that may underflow: `XᵀWz =
//! Xᵀ(Wη + y − μ)`. The hub solves `XᵀWX · b' = XᵀWz` for the next coefficients.
//!
//! The value is the state: a `List<Float64>` laid out by [`GlmLayout`]. Rows whose outcome
//! is impossible for the family (binomial outside [0, 1], poisson below 0) are not used and
//! only counted, so that the hub can refuse the model without the station failing on a value.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, ListArray};
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};
use datafusion::physical_expr::expressions::Literal;

/// The function's SQL name.
pub const GLM_TERMS: &str = "glm_terms";

/// The response distributions, each with its canonical link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Gaussian,
    Binomial,
    Poisson,
}

impl Family {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gaussian" => Some(Family::Gaussian),
            "binomial" => Some(Family::Binomial),
            "poisson" => Some(Family::Poisson),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Gaussian => "gaussian",
            Family::Binomial => "binomial",
            Family::Poisson => "poisson",
        }
    }

    /// The linear predictor for a mean (the link).
    pub fn link(self, mu: f64) -> f64 {
        match self {
            Family::Gaussian => mu,
            Family::Binomial => (mu / (1.0 - mu)).ln(),
            Family::Poisson => mu.ln(),
        }
    }

    fn valid(self, y: f64) -> bool {
        match self {
            Family::Gaussian => y.is_finite(),
            Family::Binomial => (0.0..=1.0).contains(&y),
            Family::Poisson => y.is_finite() && y >= 0.0,
        }
    }
}

/// `x ln x` with `0 ln 0 = 0`.
fn xlogx(x: f64) -> f64 {
    if x > 0.0 { x * x.ln() } else { 0.0 }
}

/// Where each sum sits in the released vector, for `q` design columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlmLayout {
    pub q: usize,
}

impl GlmLayout {
    /// Complete rows used.
    pub const N: usize = 0;
    /// Complete rows not used because the outcome is impossible for the family.
    pub const INVALID: usize = 1;
    pub const SUM_Y: usize = 2;
    pub const DEVIANCE: usize = 3;
    /// Σ log-likelihood per row (binomial, poisson; the gaussian one needs the fitted
    /// variance and is computed by the hub from the deviance).
    pub const LOGLIK: usize = 4;
    const HEAD: usize = 5;

    pub fn xtwz(self) -> Range<usize> {
        Self::HEAD..Self::HEAD + self.q
    }

    /// Row-major q × q.
    pub fn xtwx(self) -> Range<usize> {
        let start = Self::HEAD + self.q;
        start..start + self.q * self.q
    }

    /// Rows where each design column is non-zero.
    pub fn nonzero(self) -> Range<usize> {
        let start = Self::HEAD + self.q + self.q * self.q;
        start..start + self.q
    }

    pub fn len(self) -> usize {
        Self::HEAD + 2 * self.q + self.q * self.q
    }

    pub fn is_empty(self) -> bool {
        false
    }
}

/// How a call's arguments divide: `(family, intercept, y, x1 … xp, b1 … bq)` with
/// `q = p + intercept`. Returns p.
pub fn glm_covariates(args: usize, intercept: bool) -> Option<usize> {
    let rest = args.checked_sub(3 + usize::from(intercept))?;
    (rest % 2 == 0).then_some(rest / 2)
}

/// A `List<Float64>` scalar holding `values`.
pub fn f64_list(values: &[f64]) -> ScalarValue {
    ScalarValue::List(Arc::new(
        ListArray::from_iter_primitive::<Float64Type, _, _>([Some(
            values.iter().map(|v| Some(*v)).collect::<Vec<_>>(),
        )]),
    ))
}

/// The values of a non-NULL `List<Float64>` entry.
pub fn list_values(list: &ListArray, row: usize) -> Option<Vec<f64>> {
    if list.is_null(row) {
        return None;
    }
    let values = list.value(row);
    let values = values.as_primitive_opt::<Float64Type>()?;
    Some(values.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

/// A literal argument of an accumulator call, or a planning error naming it.
pub(crate) fn literal_arg<'a>(
    args: &'a AccumulatorArgs,
    i: usize,
    what: &str,
) -> Result<&'a ScalarValue> {
    match args.exprs.get(i).and_then(|e| e.downcast_ref::<Literal>()) {
        Some(l) => Ok(l.value()),
        None => plan_err!(
            "{}: {what} (argument {}) must be a literal",
            args.name,
            i + 1
        ),
    }
}

/// A literal number argument as f64.
pub(crate) fn literal_f64(args: &AccumulatorArgs, i: usize, what: &str) -> Result<f64> {
    let value = literal_arg(args, i, what)?;
    match value.cast_to(&DataType::Float64)? {
        ScalarValue::Float64(Some(v)) if v.is_finite() => Ok(v),
        _ => plan_err!(
            "{}: {what} (argument {}) must be a finite number",
            args.name,
            i + 1
        ),
    }
}

/// Coerces every argument from `first_numeric` on to Float64 (numbers and booleans).
pub(crate) fn coerce_numeric(
    name: &str,
    arg_types: &[DataType],
    first_numeric: usize,
) -> Result<Vec<DataType>> {
    arg_types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i < first_numeric {
                return Ok(t.clone());
            }
            if t.is_numeric() || matches!(t, DataType::Boolean | DataType::Null) {
                Ok(DataType::Float64)
            } else {
                plan_err!("{name}: argument {} must be numeric, not {t}", i + 1)
            }
        })
        .collect()
}

/// The list type of the released vector.
pub fn f64_list_type() -> DataType {
    DataType::new_list(DataType::Float64, true)
}

/// Largest |η| a row's linear predictor is taken at: beyond it a binomial weight is below
/// 10⁻¹³ and a Poisson mean above 10¹³, so a coefficient chosen to make every row but one
/// vanish (or explode) is bounded, and the dominance rule sees what remains.
pub const MAX_ETA: f64 = 30.0;

/// The `glm_terms` aggregate. At a station it carries the policy's dominance rule: no
/// released sum may be dominated by one row, whatever coefficients the round was sent
/// with (see [`GlmTerms::with_dominance`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct GlmTerms {
    signature: Signature,
    /// The largest share (in thousandths) one row may hold of a released sum, measured
    /// against the sum of absolute contributions; None at the hub (it only plans).
    max_share_permille: Option<u32>,
}

impl Default for GlmTerms {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
            max_share_permille: None,
        }
    }
}

impl GlmTerms {
    /// The aggregate enforcing that no row holds more than `max_share` (0 < share ≤ 1) of any
    /// dominance-checked sum: its value is NULL otherwise, which the station refuses.
    pub fn with_dominance(max_share: f64) -> Self {
        Self {
            max_share_permille: Some((max_share.clamp(0.0, 1.0) * 1000.0).round() as u32),
            ..Self::default()
        }
    }
}

/// Whether a sum whose rows' contributions have absolute sum `abs` and largest absolute
/// value `max` is dominated by one row at `share` (`max > share · abs`).
pub fn dominated(abs: f64, max: f64, share: f64) -> bool {
    abs > 0.0 && max > share * abs
}

/// Merges the tracked sums of `other` into `sums`, both `[values | Σ|c| | max|c|]` of
/// `len` values each: the first two parts add, the last takes the larger.
pub fn merge_tracked(sums: &mut [f64], other: &[f64], len: usize) -> Result<()> {
    if sums.len() != 3 * len || other.len() != 3 * len {
        return exec_err!(
            "model terms of lengths {} and {} are not three parts of {len}",
            sums.len(),
            other.len()
        );
    }
    for (i, (a, b)) in sums.iter_mut().zip(other).enumerate() {
        if i < 2 * len {
            *a += b;
        } else {
            *a = a.max(*b);
        }
    }
    Ok(())
}

impl AggregateUDFImpl for GlmTerms {
    fn name(&self) -> &str {
        GLM_TERMS
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.len() < 4 {
            return plan_err!(
                "{GLM_TERMS}(family, intercept, y, x…, b…) needs at least four arguments"
            );
        }
        let mut types = coerce_numeric(GLM_TERMS, arg_types, 2)?;
        types[0] = DataType::Utf8;
        types[1] = DataType::Boolean;
        Ok(types)
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(f64_list_type())
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[terms]", args.name),
            f64_list_type(),
            true,
        ))])
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let family = match literal_arg(&args, 0, "the family")? {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)) => Family::parse(s),
            _ => None,
        };
        let Some(family) = family else {
            return plan_err!(
                "{GLM_TERMS}: the family must be 'gaussian', 'binomial' or 'poisson'"
            );
        };
        let intercept = match literal_arg(&args, 1, "the intercept flag")? {
            ScalarValue::Boolean(Some(b)) => *b,
            _ => return plan_err!("{GLM_TERMS}: the intercept flag must be true or false"),
        };
        let Some(p) = glm_covariates(args.exprs.len(), intercept) else {
            return plan_err!(
                "{GLM_TERMS}: expected y, p covariates and p{} coefficients",
                if intercept { " + 1" } else { "" }
            );
        };
        let q = p + usize::from(intercept);
        let beta = (0..q)
            .map(|j| literal_f64(&args, 3 + p + j, "a coefficient"))
            .collect::<Result<Vec<_>>>()?;
        let layout = GlmLayout { q };
        Ok(Box::new(GlmAccumulator {
            family,
            intercept,
            p,
            beta,
            layout,
            sums: vec![0.0; 3 * layout.len()],
            row: vec![0.0; q],
            max_share: self.max_share_permille.map(|m| f64::from(m) / 1000.0),
        }))
    }
}

#[derive(Debug)]
struct GlmAccumulator {
    family: Family,
    intercept: bool,
    p: usize,
    beta: Vec<f64>,
    layout: GlmLayout,
    /// The released sums, then for each the sum of its rows' absolute contributions, then
    /// the largest of them (the state; only the first part is released).
    sums: Vec<f64>,
    /// The design row being added (reused).
    row: Vec<f64>,
    max_share: Option<f64>,
}

impl GlmAccumulator {
    fn add_row(&mut self, y: f64) {
        let layout = self.layout;
        let (q, len) = (layout.q, layout.len());
        let eta: f64 = self.row.iter().zip(&self.beta).map(|(x, b)| x * b).sum();
        if !self.family.valid(y) || !eta.is_finite() {
            self.sums[GlmLayout::INVALID] += 1.0;
            return;
        }
        // The identity link needs no cap: its weights do not depend on η.
        let eta = match self.family {
            Family::Gaussian => eta,
            Family::Binomial | Family::Poisson => eta.clamp(-MAX_ETA, MAX_ETA),
        };
        let (mu, w, deviance, loglik) = match self.family {
            Family::Gaussian => (eta, 1.0, (y - eta) * (y - eta), 0.0),
            Family::Binomial => {
                // One exponential and one logarithm per row: with e = exp(−|η|) and
                // L = ln(1 + e), ln μ = −softplus(−η) = −(max(−η, 0) + L) and
                // ln(1 − μ) = −softplus(η) = −(max(η, 0) + L), exact for large |η|;
                // μ(1 − μ) = e / (1 + e)², without the cancellation of 1 − μ.
                let e = (-eta.abs()).exp();
                let l = e.ln_1p();
                let mu = if eta >= 0.0 {
                    1.0 / (1.0 + e)
                } else {
                    e / (1.0 + e)
                };
                let ll = -y * ((-eta).max(0.0) + l) - (1.0 - y) * (eta.max(0.0) + l);
                let saturated = if y == 0.0 || y == 1.0 {
                    0.0
                } else {
                    xlogx(y) + xlogx(1.0 - y)
                };
                (mu, e / ((1.0 + e) * (1.0 + e)), 2.0 * (saturated - ll), ll)
            }
            Family::Poisson => {
                let mu = eta.exp();
                let ll = y * eta - mu - statrs::function::gamma::ln_gamma(y + 1.0);
                let saturated = xlogx(y) - y - statrs::function::gamma::ln_gamma(y + 1.0);
                (mu, mu, 2.0 * (saturated - ll), ll)
            }
        };
        // The released sums, the sums of their rows' absolute contributions and the largest
        // of those, as three slices of one length (one bounds check each, not per update).
        let (sums, rest) = self.sums.split_at_mut(len);
        let (abs, max) = rest.split_at_mut(len);
        let (sums, abs, max) = (&mut sums[..len], &mut abs[..len], &mut max[..len]);
        let mut add = |i: usize, c: f64| {
            sums[i] += c;
            abs[i] += c.abs();
            max[i] = max[i].max(c.abs());
        };
        add(GlmLayout::DEVIANCE, deviance);
        add(GlmLayout::LOGLIK, loglik);
        let r = w * eta + (y - mu);
        let (xtwz, xtwx) = (layout.xtwz().start, layout.xtwx().start);
        let row = &self.row[..q];
        for (j, &xj) in row.iter().enumerate() {
            add(xtwz + j, xj * r);
            // XᵀWX is symmetric: its upper triangle here, mirrored by `symmetric`.
            let wx = w * xj;
            for (k, &xk) in row.iter().enumerate().skip(j) {
                add(xtwx + j * q + k, wx * xk);
            }
        }
        let nonzero = layout.nonzero().start;
        let sums = &mut self.sums[..len];
        sums[GlmLayout::N] += 1.0;
        sums[GlmLayout::SUM_Y] += y;
        for (j, &xj) in row.iter().enumerate() {
            if xj != 0.0 {
                sums[nonzero + j] += 1.0;
            }
        }
    }

    /// Copies XᵀWX's upper triangle, where rows and merged states add, to its lower one,
    /// in the sums and in their dominance sums; before the state leaves the accumulator.
    fn symmetric(&mut self) {
        let (len, q, start) = (self.layout.len(), self.layout.q, self.layout.xtwx().start);
        for part in 0..3 {
            for j in 0..q {
                for k in 0..j {
                    let at = part * len + start;
                    self.sums[at + j * q + k] = self.sums[at + k * q + j];
                }
            }
        }
    }

    /// Whether one row dominates a sum the coefficients shape: the deviance, the
    /// log-likelihood, X'Wz and X'WX (ΣW among them, with an intercept).
    fn dominated(&self, share: f64) -> bool {
        let layout = self.layout;
        let len = layout.len();
        [GlmLayout::DEVIANCE, GlmLayout::LOGLIK]
            .into_iter()
            .chain(layout.xtwz())
            .chain(layout.xtwx())
            .any(|i| dominated(self.sums[len + i], self.sums[2 * len + i], share))
    }
}

/// Adds `other` into `sums` element by element.
pub fn add_terms(sums: &mut [f64], other: &[f64]) -> Result<()> {
    if sums.len() != other.len() {
        return exec_err!(
            "model terms of different lengths ({} and {}) cannot be merged",
            sums.len(),
            other.len()
        );
    }
    for (a, b) in sums.iter_mut().zip(other) {
        *a += b;
    }
    Ok(())
}

impl Accumulator for GlmAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let column = |i: usize| -> Result<&Float64Array> {
            match values
                .get(i)
                .and_then(|a| a.as_primitive_opt::<Float64Type>())
            {
                Some(a) => Ok(a),
                None => exec_err!("{GLM_TERMS}: argument {} is not Float64", i + 1),
            }
        };
        let y = column(2)?;
        let xs = (0..self.p)
            .map(|j| column(3 + j))
            .collect::<Result<Vec<_>>>()?;
        let offset = usize::from(self.intercept);
        if self.intercept {
            self.row[0] = 1.0;
        }
        'rows: for i in 0..y.len() {
            if y.is_null(i) {
                continue;
            }
            for (j, x) in xs.iter().enumerate() {
                if x.is_null(i) {
                    continue 'rows;
                }
                self.row[offset + j] = x.value(i);
            }
            self.add_row(y.value(i));
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.symmetric();
        if self.max_share.is_some_and(|share| self.dominated(share)) {
            // The counts stay (the station's row and level rules come first); every sum is
            // NaN, which the station refuses as dominated.
            let mut marked = vec![f64::NAN; self.layout.len()];
            marked[GlmLayout::N] = self.sums[GlmLayout::N];
            let nonzero = self.layout.nonzero();
            marked[nonzero.clone()].copy_from_slice(&self.sums[nonzero]);
            return Ok(f64_list(&marked));
        }
        Ok(f64_list(&self.sums[..self.layout.len()]))
    }

    fn size(&self) -> usize {
        size_of_val(self) + 8 * (self.sums.len() + self.beta.len() + self.row.len())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.symmetric();
        Ok(vec![f64_list(&self.sums)])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(list) = states.first().and_then(|a| a.as_list_opt::<i32>()) else {
            return exec_err!("{GLM_TERMS}: the state is not a list");
        };
        for row in 0..list.len() {
            if let Some(values) = list_values(list, row) {
                merge_tracked(&mut self.sums, &values, self.layout.len())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn accumulator(beta: &[f64]) -> GlmAccumulator {
        let layout = GlmLayout { q: beta.len() };
        GlmAccumulator {
            family: Family::Binomial,
            intercept: true,
            p: beta.len() - 1,
            beta: beta.to_vec(),
            layout,
            sums: vec![0.0; 3 * layout.len()],
            row: vec![0.0; beta.len()],
            max_share: None,
        }
    }

    /// Feeds rows (y, x₁, x₂) as the accumulator receives them (two literal columns first).
    fn feed(acc: &mut GlmAccumulator, rows: &[(f64, Option<f64>, f64)]) {
        let unused: ArrayRef = Arc::new(Float64Array::from(vec![0.0; rows.len()]));
        let y: ArrayRef = Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.0)));
        let x1: ArrayRef = Arc::new(rows.iter().map(|r| r.1).collect::<Float64Array>());
        let x2: ArrayRef = Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2)));
        acc.update_batch(&[Arc::clone(&unused), unused, y, x1, x2])
            .unwrap();
    }

    fn released(acc: &mut GlmAccumulator) -> Vec<f64> {
        match acc.evaluate().unwrap() {
            ScalarValue::List(list) => list_values(&list, 0).unwrap(),
            other => panic!("not a list: {other:?}"),
        }
    }

    /// The binomial sums of one complete row by the textbook formulas (fine for moderate η).
    fn textbook(sums: &mut [f64], q: usize, beta: &[f64], y: f64, x: &[f64]) {
        let eta: f64 = x.iter().zip(beta).map(|(x, b)| x * b).sum();
        let mu = 1.0 / (1.0 + (-eta).exp());
        let w = mu * (1.0 - mu);
        let xlnx = |v: f64| if v > 0.0 { v * v.ln() } else { 0.0 };
        let ll = y * mu.ln() + (1.0 - y) * (1.0 - mu).ln();
        sums[GlmLayout::N] += 1.0;
        sums[GlmLayout::SUM_Y] += y;
        sums[GlmLayout::DEVIANCE] += 2.0 * (xlnx(y) + xlnx(1.0 - y) - ll);
        sums[GlmLayout::LOGLIK] += ll;
        let layout = GlmLayout { q };
        for j in 0..q {
            sums[layout.xtwz().start + j] += x[j] * (w * eta + y - mu);
            if x[j] != 0.0 {
                sums[layout.nonzero().start + j] += 1.0;
            }
            for k in 0..q {
                sums[layout.xtwx().start + j * q + k] += w * x[j] * x[k];
            }
        }
    }

    #[test]
    fn the_sums_equal_the_textbook_formulas_row_by_row_and_merged() {
        let beta = [-0.7, 0.9, -0.35];
        let rows: Vec<(f64, Option<f64>, f64)> = (0..40)
            .map(|i| {
                let t = f64::from(i);
                let y = match i % 5 {
                    0 => 0.25, // a proportion
                    1 | 3 => 1.0,
                    _ => 0.0,
                };
                let x1 = if i % 7 == 6 {
                    None
                } else {
                    Some((t * 0.37).sin() * 3.0)
                };
                (y, x1, (t * 0.11).cos() * 2.0 - 0.5)
            })
            .collect();
        let mut expected = vec![0.0; GlmLayout { q: 3 }.len()];
        for &(y, x1, x2) in &rows {
            if let Some(x1) = x1 {
                textbook(&mut expected, 3, &beta, y, &[1.0, x1, x2]);
            }
        }
        // Half the rows in one accumulator, half in another whose state is merged in (as
        // partial aggregates are).
        let (mut a, mut b) = (accumulator(&beta), accumulator(&beta));
        feed(&mut a, &rows[..17]);
        feed(&mut b, &rows[17..]);
        let state: Vec<ArrayRef> = b
            .state()
            .unwrap()
            .iter()
            .map(|s| s.to_array().unwrap())
            .collect();
        a.merge_batch(&state).unwrap();
        let got = released(&mut a);
        assert_eq!(got.len(), expected.len());
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(
                (g - e).abs() <= 1e-12 * e.abs().max(1.0),
                "sum {i}: {g} vs {e}"
            );
        }
    }

    #[test]
    fn far_from_the_data_the_sums_stay_exact() {
        // η = ±25 (within MAX_ETA): 1 − μ ≈ 1.4·10⁻¹¹, of which 1 − μ computed from μ
        // keeps five digits.
        let mut acc = accumulator(&[0.0, 25.0, 0.0]);
        feed(&mut acc, &[(0.0, Some(1.0), 0.0), (1.0, Some(-1.0), 0.0)]);
        let sums = released(&mut acc);
        let tail = (-25.0f64).exp();
        // Each row: log-likelihood −softplus(25) = −25 − ln(1 + e⁻²⁵), weight e⁻²⁵/(1 + e⁻²⁵)².
        let ll = 2.0 * -(25.0 + tail.ln_1p());
        assert!((sums[GlmLayout::LOGLIK] - ll).abs() <= 1e-12 * 50.0);
        assert!((sums[GlmLayout::DEVIANCE] + 2.0 * ll).abs() <= 1e-12 * 100.0);
        let w = tail / ((1.0 + tail) * (1.0 + tail));
        let xtwx = &sums[GlmLayout { q: 3 }.xtwx()];
        assert!((xtwx[0] - 2.0 * w).abs() <= 1e-12 * 2.0 * w, "{}", xtwx[0]);
        assert!(xtwx[1].abs() <= 1e-12 * w && xtwx[1] == xtwx[3]);
        assert!((xtwx[4] - 2.0 * w).abs() <= 1e-12 * 2.0 * w);
    }
}
