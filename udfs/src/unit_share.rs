//! `unit_max_sum(unit_hash, size)`: the largest total of `size` that one privacy unit (one
//! patient) contributes to a group.
//!
//! The dominance rule withholds a group in which one contributor holds more than a share of
//! a released sum. When a patient has many rows (diagnoses, measurements), the contributor
//! is the patient, not the row: forty rows of one patient can dominate a sum over a group of
//! five patients although no single row does. A station therefore compares this value with
//! the group's total `sum(size)`.
//!
//! Units are given by a 64-bit hash of their id (the station's `row_hash` of the unit
//! column). Two units whose hashes collide are counted as one, which can only make the
//! largest share larger: never less protective. NULL sizes contribute nothing; a NULL unit
//! is its own unit (a row without a patient is one contributor).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, ListArray, UInt64Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Float64Type, UInt64Type};
use datafusion::common::{Result, ScalarValue, internal_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature,
    TypeSignature, Volatility,
};

use crate::unit_set::{Collected, Groups, selected};

/// How the aggregates here hash unit hashes: foldhash, seeded per process. The keys are
/// the station's hashes of its own units' ids, which no researcher chooses; std's SipHash
/// cost about a hundred instructions per row here.
pub type UnitHashing = foldhash::fast::RandomState;

/// The function's name (a station-internal aggregate; it is never registered for SQL).
pub const UNIT_MAX_SUM: &str = "unit_max_sum";
/// The variant that considers only units with more than one row.
pub const UNIT_MAX_SUM_SEVERAL: &str = "unit_max_sum_several";
/// The largest deviation of a unit's total from the group's median unit total.
pub const UNIT_MAX_DEVIATION: &str = "unit_max_deviation";
/// The sum of the units' deviations from the group's median unit total.
pub const UNIT_SUM_DEVIATION: &str = "unit_sum_deviation";

/// What the aggregate answers from the units' totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    /// The largest total.
    Max,
    /// The largest total of a unit with more than one row: a patient whose *several* rows
    /// add up (one row's own size is the single-row rule's business).
    MaxSeveral,
    /// The largest |total − median total|: one patient standing out from a baseline the
    /// others share (a padded outer join gives every other patient exactly one row).
    MaxDeviation,
    /// Σ |total − median total|.
    SumDeviation,
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UnitMaxSum {
    signature: Signature,
    mode: Mode,
}

impl UnitMaxSum {
    fn new(mode: Mode) -> Self {
        Self {
            signature: Signature::new(
                TypeSignature::Exact(vec![DataType::UInt64, DataType::Float64]),
                Volatility::Immutable,
            ),
            mode,
        }
    }
}

/// The largest unit's deviation from the median unit total, and the total deviation: the
/// dominance rule on these withholds a group in which one patient's contribution alone
/// departs from what the others share.
pub fn deviation_udafs() -> (AggregateUDF, AggregateUDF) {
    (
        AggregateUDF::from(UnitMaxSum::new(Mode::MaxDeviation)),
        AggregateUDF::from(UnitMaxSum::new(Mode::SumDeviation)),
    )
}

/// The aggregate, to call with a unit hash and a non-negative size: the largest unit total.
pub fn udaf() -> AggregateUDF {
    AggregateUDF::from(UnitMaxSum::new(Mode::Max))
}

/// The largest total among units with more than one contributing row (NULL if none).
pub fn several_rows_udaf() -> AggregateUDF {
    AggregateUDF::from(UnitMaxSum::new(Mode::MaxSeveral))
}

impl AggregateUDFImpl for UnitMaxSum {
    fn name(&self) -> &str {
        match self.mode {
            Mode::Max => UNIT_MAX_SUM,
            Mode::MaxSeveral => UNIT_MAX_SUM_SEVERAL,
            Mode::MaxDeviation => UNIT_MAX_DEVIATION,
            Mode::SumDeviation => UNIT_SUM_DEVIATION,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.len() != 2 {
            return plan_err!("{UNIT_MAX_SUM} takes a unit hash and a size");
        }
        Ok(DataType::Float64)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(PerUnit::new(self.mode)))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(GroupTotals {
            mode: self.mode,
            groups: Vec::new(),
            held: 0,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let list = |name: &str, item: DataType| {
            Arc::new(Field::new(
                format_state_name(args.name, name),
                DataType::List(Arc::new(Field::new_list_field(item, true))),
                true,
            ))
        };
        Ok(vec![
            list("units", DataType::UInt64),
            list("sums", DataType::Float64),
            list("rows", DataType::UInt64),
        ])
    }
}

/// Each unit's total and row count so far. Rows whose unit is NULL are each their own
/// contributor (one row: never "several").
#[derive(Debug)]
struct PerUnit {
    sums: HashMap<u64, (f64, u64), UnitHashing>,
    unkeyed_max: Option<f64>,
    /// Sizes of rows without a unit (each its own contributor), for the deviation modes.
    unkeyed: Vec<f64>,
    mode: Mode,
}

/// A state's three lists, flattened: each entry a unit (NULL: a row without one), its
/// total and its row count.
#[derive(Debug, Default)]
struct Entries {
    units: Vec<Option<u64>>,
    sums: Vec<f64>,
    rows: Vec<u64>,
}

impl Entries {
    fn push(&mut self, unit: Option<u64>, sum: f64, rows: u64) {
        self.units.push(unit);
        self.sums.push(sum);
        self.rows.push(rows);
    }

    /// The three state columns, a list of `lengths[i]` entries for the i-th state.
    fn columns(self, lengths: Vec<usize>) -> Vec<ArrayRef> {
        let offsets = OffsetBuffer::from_lengths(lengths);
        let list = |values: ArrayRef| list_column(values, offsets.clone());
        vec![
            list(Arc::new(UInt64Array::from(self.units))),
            list(Arc::new(Float64Array::from(self.sums))),
            list(Arc::new(UInt64Array::from(self.rows))),
        ]
    }
}

impl PerUnit {
    fn new(mode: Mode) -> Self {
        Self {
            sums: HashMap::default(),
            unkeyed_max: None,
            unkeyed: Vec::new(),
            mode,
        }
    }

    fn deviations(&self) -> bool {
        matches!(self.mode, Mode::MaxDeviation | Mode::SumDeviation)
    }

    fn add(&mut self, unit: Option<u64>, size: f64, rows: u64) {
        match unit {
            Some(u) => {
                let e = self.sums.entry(u).or_insert((0.0, 0));
                e.0 += size;
                e.1 += rows;
            }
            None => {
                self.unkeyed_max = Some(self.unkeyed_max.map_or(size, |m| m.max(size)));
                if self.deviations() {
                    self.unkeyed.push(size);
                }
            }
        }
    }

    /// Adds row `r` of the state lists (another partition's units of one group).
    fn merge_row(&mut self, units: &ListArray, sums: &ListArray, rows: &ListArray, r: usize) {
        if units.is_null(r) || sums.is_null(r) || rows.is_null(r) {
            return;
        }
        let (u, s, n) = (units.value(r), sums.value(r), rows.value(r));
        let u = u.as_primitive::<UInt64Type>();
        let s = s.as_primitive::<Float64Type>();
        let n = n.as_primitive::<UInt64Type>();
        for i in 0..s.len() {
            if s.is_null(i) {
                continue;
            }
            self.add(u.is_valid(i).then(|| u.value(i)), s.value(i), n.value(i));
        }
    }

    /// Appends this accumulator's state entries; answers how many.
    fn push_state(&self, out: &mut Entries) -> usize {
        let before = out.sums.len();
        for (u, (s, n)) in &self.sums {
            out.push(Some(*u), *s, *n);
        }
        if self.deviations() {
            // Every row without a unit is its own contributor.
            for v in &self.unkeyed {
                out.push(None, *v, 1);
            }
        } else if let Some(m) = self.unkeyed_max {
            // A NULL unit merges as one more single-row contributor of the largest size.
            out.push(None, m, 1);
        }
        out.sums.len() - before
    }

    /// The answer from the units' totals (NULL when there are none to answer from).
    fn value(&self) -> Option<f64> {
        if self.deviations() {
            let mut totals: Vec<f64> = self.sums.values().map(|(s, _)| *s).collect();
            totals.extend(self.unkeyed.iter().copied());
            if totals.is_empty() {
                return None;
            }
            totals.sort_by(f64::total_cmp);
            let n = totals.len();
            let median = if n % 2 == 1 {
                totals[n / 2]
            } else {
                (totals[n / 2 - 1] + totals[n / 2]) / 2.0
            };
            let deviations = totals.iter().map(|t| (t - median).abs());
            return Some(match self.mode {
                Mode::MaxDeviation => deviations.fold(0.0, f64::max),
                _ => deviations.sum(),
            });
        }
        let several = self.mode == Mode::MaxSeveral;
        let keyed = self
            .sums
            .values()
            .filter(|(_, n)| !several || *n > 1)
            .fold(None, |m: Option<f64>, (s, _)| {
                Some(m.map_or(*s, |m| m.max(*s)))
            });
        let unkeyed = if several { None } else { self.unkeyed_max };
        match (keyed, unkeyed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The memory its map and list hold, in bytes.
    fn held(&self) -> usize {
        self.sums.capacity() * size_of::<(u64, (f64, u64))>() + self.unkeyed.capacity() * 8
    }
}

impl Accumulator for PerUnit {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [units, sizes] = values else {
            return internal_err!("{UNIT_MAX_SUM} takes two arguments");
        };
        let units = units.as_primitive::<UInt64Type>();
        let sizes = sizes.as_primitive::<Float64Type>();
        for r in 0..sizes.len() {
            if sizes.is_null(r) {
                continue;
            }
            let unit = units.is_valid(r).then(|| units.value(r));
            self.add(unit, sizes.value(r).abs(), 1);
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [units, sums, rows] = states else {
            return internal_err!("{UNIT_MAX_SUM} has three state fields");
        };
        let (units, sums, rows) = (units.as_list(), sums.as_list(), rows.as_list());
        for r in 0..units.len() {
            self.merge_row(units, sums, rows, r);
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let mut entries = Entries::default();
        let n = self.push_state(&mut entries);
        entries
            .columns(vec![n])
            .into_iter()
            .map(|list| ScalarValue::try_from_array(&list, 0))
            .collect()
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(self.value()))
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.held()
    }
}

/// The units' totals of a grouped aggregate, each row added to its group directly
/// (DataFusion's adapter sorts a batch's rows by group and copies each group's out first).
#[derive(Debug)]
struct GroupTotals {
    mode: Mode,
    groups: Vec<PerUnit>,
    /// The groups' maps and lists, in bytes.
    held: usize,
}

impl GroupTotals {
    fn resize(&mut self, total_num_groups: usize) {
        let mode = self.mode;
        self.groups
            .resize_with(total_num_groups, || PerUnit::new(mode));
    }

    /// Changes group `g` with `change`, keeping count of its memory.
    fn change(&mut self, g: usize, change: impl FnOnce(&mut PerUnit)) {
        let group = &mut self.groups[g];
        let before = group.held();
        change(group);
        // Maps and lists only grow until their group is taken.
        self.held += group.held() - before;
    }

    /// The first groups `emit_to` names, taken out.
    fn take(&mut self, emit_to: EmitTo) -> Vec<PerUnit> {
        let taken = emit_to.take_needed(&mut self.groups);
        self.held -= taken.iter().map(PerUnit::held).sum::<usize>();
        taken
    }
}

impl GroupsAccumulator for GroupTotals {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let [units, sizes] = values else {
            return internal_err!("{UNIT_MAX_SUM} takes two arguments");
        };
        let units = units.as_primitive::<UInt64Type>();
        let sizes = sizes.as_primitive::<Float64Type>();
        self.resize(total_num_groups);
        for (r, &g) in group_indices.iter().enumerate() {
            if sizes.is_null(r) || !selected(opt_filter, r) {
                continue;
            }
            let unit = units.is_valid(r).then(|| units.value(r));
            self.change(g, |group| group.add(unit, sizes.value(r).abs(), 1));
        }
        Ok(())
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let [units, sums, rows] = values else {
            return internal_err!("{UNIT_MAX_SUM} has three state fields");
        };
        let (units, sums, rows) = (units.as_list(), sums.as_list(), rows.as_list());
        self.resize(total_num_groups);
        for (r, &g) in group_indices.iter().enumerate() {
            self.change(g, |group| group.merge_row(units, sums, rows, r));
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let values: Float64Array = self.take(emit_to).iter().map(PerUnit::value).collect();
        Ok(Arc::new(values))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let taken = self.take(emit_to);
        let mut entries = Entries::default();
        let lengths = taken
            .iter()
            .map(|group| group.push_state(&mut entries))
            .collect();
        Ok(entries.columns(lengths))
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let [units, sizes] = values else {
            return internal_err!("{UNIT_MAX_SUM} takes two arguments");
        };
        let units = units.as_primitive::<UInt64Type>();
        let sizes = sizes.as_primitive::<Float64Type>();
        // Each row its own group: its unit with its size, or no entry.
        let mut entries = Entries::default();
        let lengths = (0..sizes.len())
            .map(|r| {
                let counted = sizes.is_valid(r) && selected(opt_filter, r);
                if counted {
                    let unit = units.is_valid(r).then(|| units.value(r));
                    entries.push(unit, sizes.value(r).abs(), 1);
                }
                usize::from(counted)
            })
            .collect();
        Ok(entries.columns(lengths))
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.groups.capacity() * size_of::<PerUnit>() + self.held
    }
}

/// `unit_digest(unit_hash)`: the XOR of the distinct unit hashes of a group (NULL for none),
/// which seeds the noisy margin of a threshold with *which* patients contribute, however
/// many rows each has. (DataFusion's `bit_xor(DISTINCT …)` declares a non-nullable result it
/// cannot keep under a FILTER.)
pub const UNIT_DIGEST: &str = "unit_digest";

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UnitDigest {
    signature: Signature,
}

impl Default for UnitDigest {
    fn default() -> Self {
        Self {
            signature: Signature::new(
                TypeSignature::Exact(vec![DataType::UInt64]),
                Volatility::Immutable,
            ),
        }
    }
}

/// The digest aggregate, to call with a unit hash.
pub fn digest_udaf() -> AggregateUDF {
    AggregateUDF::from(UnitDigest::default())
}

impl AggregateUDFImpl for UnitDigest {
    fn name(&self) -> &str {
        UNIT_DIGEST
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt64)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(DistinctHashes::default()))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(GroupDigests::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "units"),
            DataType::List(Arc::new(Field::new_list_field(DataType::UInt64, true))),
            true,
        ))])
    }
}

#[derive(Debug, Default)]
struct DistinctHashes {
    seen: HashSet<u64, UnitHashing>,
}

impl Accumulator for DistinctHashes {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [units] = values else {
            return internal_err!("{UNIT_DIGEST} takes one argument");
        };
        self.seen
            .extend(units.as_primitive::<UInt64Type>().iter().flatten());
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [units] = states else {
            return internal_err!("{UNIT_DIGEST} has one state field");
        };
        let units = units.as_list::<i32>();
        for r in 0..units.len() {
            if units.is_valid(r) {
                let u = units.value(r);
                self.seen
                    .extend(u.as_primitive::<UInt64Type>().iter().flatten());
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let hashes = hash_lists(std::iter::once(self.seen.iter().copied().collect()));
        Ok(vec![ScalarValue::try_from_array(&hashes, 0)?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::UInt64(
            (!self.seen.is_empty()).then(|| self.seen.iter().fold(0, |a, b| a ^ b)),
        ))
    }

    fn size(&self) -> usize {
        size_of_val(self) + self.seen.capacity() * 8
    }
}

/// The digest of a grouped aggregate: every group's distinct hashes.
#[derive(Debug, Default)]
struct GroupDigests {
    hashes: Groups<u64>,
}

/// Each group's distinct hashes as the digest's state: one list per group.
fn hash_lists(groups: impl ExactSizeIterator<Item = Vec<u64>>) -> ArrayRef {
    let mut lengths = Vec::with_capacity(groups.len());
    let mut values = Vec::new();
    for hashes in groups {
        lengths.push(hashes.len());
        values.extend(hashes);
    }
    list_column(
        Arc::new(UInt64Array::from(values)),
        OffsetBuffer::from_lengths(lengths),
    )
}

/// `values` cut into lists at `offsets`: a state column of one list per state.
fn list_column(values: ArrayRef, offsets: OffsetBuffer<i32>) -> ArrayRef {
    Arc::new(ListArray::new(
        Arc::new(Field::new_list_field(values.data_type().clone(), true)),
        offsets,
        values,
        None,
    ))
}

impl GroupsAccumulator for GroupDigests {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let [units] = values else {
            return internal_err!("{UNIT_DIGEST} takes one argument");
        };
        self.hashes
            .add_rows(units, group_indices, opt_filter, total_num_groups, |h| h);
        Ok(())
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let [lists] = values else {
            return internal_err!("{UNIT_DIGEST} has one state field");
        };
        let lists = lists.as_list::<i32>();
        let hashes = lists.values().as_primitive::<UInt64Type>();
        let offsets = lists.value_offsets();
        self.hashes.resize(total_num_groups);
        for (r, &g) in group_indices.iter().enumerate() {
            if lists.is_null(r) {
                continue;
            }
            let (start, end) = (offsets[r] as usize, offsets[r + 1] as usize);
            let part = (start..end)
                .filter(|i| hashes.is_valid(*i))
                .map(|i| hashes.value(i));
            self.hashes.append(g, |values| values.extend(part));
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let digests: UInt64Array = self
            .hashes
            .take(emit_to)
            .into_iter()
            .map(|mut group| {
                let hashes = group.sorted();
                (!hashes.is_empty()).then(|| hashes.iter().fold(0, |a, b| a ^ b))
            })
            .collect();
        Ok(Arc::new(digests))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let taken = self.hashes.take(emit_to);
        Ok(vec![hash_lists(taken.into_iter().map(Collected::into_vec))])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let [units] = values else {
            return internal_err!("{UNIT_DIGEST} takes one argument");
        };
        let units = units.as_primitive::<UInt64Type>();
        // Each row its own group: its unit's hash, or none.
        Ok(vec![hash_lists((0..units.len()).map(|r| {
            if units.is_valid(r) && selected(opt_filter, r) {
                vec![units.value(r)]
            } else {
                Vec::new()
            }
        }))])
    }

    fn size(&self) -> usize {
        self.hashes.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::RecordBatch;
    use arrow::datatypes::Schema;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn the_largest_unit_total_matches_a_two_level_aggregate() {
        // Many rows per unit, several partitions: compare with GROUP BY unit, then max.
        let n = 5000u64;
        let units: Vec<Option<u64>> = (0..n)
            .map(|i| (i % 97 != 0).then_some((i * 7919) % 23))
            .collect();
        let sizes: Vec<Option<f64>> = (0..n)
            .map(|i| (i % 13 != 0).then_some(((i * 31) % 101) as f64 - 50.0))
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("u", DataType::UInt64, true),
            Field::new("s", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(UInt64Array::from(units)),
                Arc::new(Float64Array::from(sizes)),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new_with_config(
            datafusion::prelude::SessionConfig::new().with_target_partitions(4),
        );
        let chunks: Vec<RecordBatch> = (0..10).map(|i| batch.slice(i * 500, 500)).collect();
        let table = datafusion::datasource::MemTable::try_new(schema, vec![chunks]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx.register_udaf(udaf());
        let got = ctx
            .sql("SELECT unit_max_sum(u, s) FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        // The reference: per-unit sums of |s| (NULL units one row each), then their max.
        let want = ctx
            .sql(
                "SELECT max(t) FROM (SELECT u, sum(abs(s)) AS t FROM t WHERE u IS NOT NULL \
                 GROUP BY u UNION ALL SELECT u, abs(s) FROM t WHERE u IS NULL)",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let value = |b: &[RecordBatch]| b[0].column(0).as_primitive::<Float64Type>().value(0);
        assert_eq!(value(&got), value(&want));
        // With a filter and beside other aggregates, as a station's approved plan runs it.
        let got = ctx
            .sql(
                "SELECT unit_max_sum(u, s) FILTER (WHERE s IS NOT NULL), sum(abs(s)), \
                 count(DISTINCT u) FROM t",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(value(&got), value(&want));

        // Deviations from the median unit total, against the same computed in SQL.
        let (dev_max, dev_sum) = deviation_udafs();
        ctx.register_udaf(dev_max);
        ctx.register_udaf(dev_sum);
        let got = ctx
            .sql("SELECT unit_max_deviation(u, s), unit_sum_deviation(u, s) FROM t WHERE u IS NOT NULL")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let want = ctx
            .sql(
                "WITH per AS (SELECT u, sum(abs(s)) AS t FROM t WHERE u IS NOT NULL \
                 AND s IS NOT NULL GROUP BY u), m AS (SELECT median(t) AS m FROM per) \
                 SELECT max(abs(t - m)), sum(abs(t - m)) FROM per, m",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let pair = |b: &[RecordBatch]| {
            (
                b[0].column(0).as_primitive::<Float64Type>().value(0),
                b[0].column(1).as_primitive::<Float64Type>().value(0),
            )
        };
        let (g, w) = (pair(&got), pair(&want));
        assert!(
            (g.0 - w.0).abs() < 1e-9 && (g.1 - w.1).abs() < 1e-6 * w.1.max(1.0),
            "{g:?} {w:?}"
        );

        // Units with several rows only: the same reference over units of two rows or more.
        ctx.register_udaf(several_rows_udaf());
        let got = ctx
            .sql("SELECT unit_max_sum_several(u, s) FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let want = ctx
            .sql(
                "SELECT max(t) FROM (SELECT u, sum(abs(s)) AS t FROM t WHERE u IS NOT NULL \
                 AND s IS NOT NULL GROUP BY u HAVING count(*) > 1)",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(value(&got), value(&want));
    }

    /// The rows of the grouped tests' table.
    const ROWS: u64 = 20_000;

    /// 20,000 rows in 20 batches, grouped two ways: `g`, three groups of many rows, and
    /// `h`, 4,000 groups of five; then `columns`.
    fn grouped_rows(columns: Vec<(Field, ArrayRef)>) -> (Arc<Schema>, Vec<RecordBatch>) {
        let n = ROWS;
        let mut fields = vec![
            Field::new("g", DataType::UInt64, false),
            Field::new("h", DataType::UInt64, false),
        ];
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from((0..n).map(|i| i % 3).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(
                (0..n).map(|i| i % 4000).collect::<Vec<_>>(),
            )),
        ];
        for (field, array) in columns {
            fields.push(field);
            arrays.push(array);
        }
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(Arc::clone(&schema), arrays).unwrap();
        let chunks = (0..20).map(|i| batch.slice(i * 1000, 1000)).collect();
        (schema, chunks)
    }

    /// A session over those rows as table `t`, in four partitions; with `skip_partial`,
    /// DataFusion skips partial aggregation at once (every row converted to a state).
    fn grouped_session(
        schema: &Arc<Schema>,
        chunks: &[RecordBatch],
        skip_partial: bool,
    ) -> SessionContext {
        let mut config = datafusion::prelude::SessionConfig::new().with_target_partitions(4);
        if skip_partial {
            let execution = &mut config.options_mut().execution;
            execution.skip_partial_aggregation_probe_rows_threshold = 10;
            execution.skip_partial_aggregation_probe_ratio_threshold = 0.0;
        }
        let ctx = SessionContext::new_with_config(config);
        let table =
            datafusion::datasource::MemTable::try_new(Arc::clone(schema), vec![chunks.to_vec()])
                .unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    /// What `sql` answers in `ctx` (a failure names the query).
    async fn answer(ctx: &SessionContext, sql: &str) -> Vec<RecordBatch> {
        let frame = ctx.sql(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        frame
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// A FILTER column for `n` rows: true, false, and NULL (which does not pass).
    fn filter_column(n: u64) -> ArrayRef {
        Arc::new(BooleanArray::from(
            (0..n)
                .map(|i| (i % 7 != 0).then_some(i % 5 != 0))
                .collect::<Vec<_>>(),
        ))
    }

    /// `unit_digest` per group, with and without a FILTER, over partitions and with partial
    /// aggregation skipped, against DataFusion's own `bit_xor(DISTINCT …)`.
    #[tokio::test]
    async fn a_groups_digest_is_the_xor_of_its_distinct_units() {
        let n = ROWS;
        let units: Vec<Option<u64>> = (0..n)
            .map(|i| (i % 89 != 0).then_some((i % 1201).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        let (schema, chunks) = grouped_rows(vec![
            (
                Field::new("u", DataType::UInt64, true),
                Arc::new(UInt64Array::from(units)),
            ),
            (Field::new("f", DataType::Boolean, true), filter_column(n)),
        ]);
        for skip_partial in [false, true] {
            let ctx = grouped_session(&schema, &chunks, skip_partial);
            ctx.register_udaf(digest_udaf());
            // Few groups of many rows, and (with h) many groups of a few rows.
            for key in ["g", "h"] {
                for filter in ["", " FILTER (WHERE f)"] {
                    let rows = |sql: String| {
                        let ctx = ctx.clone();
                        async move {
                            let out = answer(&ctx, &sql).await;
                            let mut rows = Vec::new();
                            for b in &out {
                                let k = b.column(0).as_primitive::<UInt64Type>();
                                let d = b.column(1).as_primitive::<UInt64Type>();
                                for r in 0..b.num_rows() {
                                    rows.push((k.value(r), d.is_valid(r).then(|| d.value(r))));
                                }
                            }
                            rows.sort_unstable();
                            rows
                        }
                    };
                    let got = rows(format!(
                        "SELECT {key}, unit_digest(u){filter} FROM t GROUP BY {key}"
                    ))
                    .await;
                    // (DataFusion's distinct `bit_xor` fails under a FILTER; a CASE that
                    // makes the filtered rows' units NULL is the same question.)
                    let unit = if filter.is_empty() {
                        "u"
                    } else {
                        "CASE WHEN f THEN u END"
                    };
                    let want = rows(format!(
                        "SELECT {key}, bit_xor(DISTINCT {unit}) FROM t GROUP BY {key}"
                    ))
                    .await;
                    assert_eq!(got.len(), if key == "g" { 3 } else { 4000 });
                    assert_eq!(got, want, "by {key}{filter}, skip_partial {skip_partial}");
                }
            }
        }
    }

    /// Every mode per group, with and without a FILTER (NULL does not pass), over
    /// partitions and with partial aggregation skipped, against the same computed in SQL
    /// from a GROUP BY of (group, unit).
    #[tokio::test]
    async fn each_groups_unit_totals_match_a_two_level_aggregate() {
        let n = ROWS;
        // Within a group of `h` (five rows), units repeat; within a group of `g`, each of
        // 39 units has many rows. Some units, sizes and filter values are NULL.
        let units: Vec<Option<u64>> = (0..n)
            .map(|i| (i % 89 != 0).then_some((i / 8000) * 1000 + (i % 4000) % 13))
            .collect();
        let sizes: Vec<Option<f64>> = (0..n)
            .map(|i| (i % 17 != 0).then_some(((i * 31) % 101) as f64 - 50.0))
            .collect();
        let (schema, chunks) = grouped_rows(vec![
            (
                Field::new("u", DataType::UInt64, true),
                Arc::new(UInt64Array::from(units)),
            ),
            (
                Field::new("s", DataType::Float64, true),
                Arc::new(Float64Array::from(sizes)),
            ),
            (Field::new("f", DataType::Boolean, true), filter_column(n)),
        ]);
        for skip_partial in [false, true] {
            let ctx = grouped_session(&schema, &chunks, skip_partial);
            let (dev_max, dev_sum) = deviation_udafs();
            for f in [udaf(), several_rows_udaf(), dev_max, dev_sum] {
                ctx.register_udaf(f);
            }
            let rows = |sql: String| {
                let ctx = ctx.clone();
                async move {
                    let out = answer(&ctx, &sql).await;
                    let mut rows = Vec::new();
                    for b in &out {
                        let k = b.column(0).as_primitive::<UInt64Type>();
                        let values: Vec<_> = (1..b.num_columns())
                            .map(|c| b.column(c).as_primitive::<Float64Type>())
                            .collect();
                        for r in 0..b.num_rows() {
                            let row: Vec<Option<f64>> = values
                                .iter()
                                .map(|v| v.is_valid(r).then(|| v.value(r)))
                                .collect();
                            rows.push((k.value(r), row));
                        }
                    }
                    rows.sort_unstable_by_key(|(k, _)| *k);
                    rows
                }
            };
            // Few groups of many rows, and many groups of a few rows.
            for key in ["g", "h"] {
                for filter in ["", " FILTER (WHERE f)"] {
                    let args = format!("(u, s){filter}");
                    let got = rows(format!(
                        "SELECT {key}, unit_max_sum{args}, unit_max_sum_several{args}, \
                         unit_max_deviation{args}, unit_sum_deviation{args} \
                         FROM t GROUP BY {key}"
                    ))
                    .await;
                    // The reference: each unit's total and rows per group (a row without
                    // a unit is its own), the median of the totals, and each group kept.
                    let kept = if filter.is_empty() { "" } else { " AND f" };
                    let want = rows(format!(
                        "WITH per AS (\
                           SELECT {key} AS k, u, sum(abs(s)) AS t, count(*) AS n FROM t \
                           WHERE u IS NOT NULL AND s IS NOT NULL{kept} GROUP BY {key}, u \
                           UNION ALL SELECT {key}, u, abs(s), 1 FROM t \
                           WHERE u IS NULL AND s IS NOT NULL{kept}), \
                         m AS (SELECT k, median(t) AS m FROM per GROUP BY k) \
                         SELECT keys.k, max(per.t), \
                           max(per.t) FILTER (WHERE per.u IS NOT NULL AND per.n > 1), \
                           max(abs(per.t - m.m)), sum(abs(per.t - m.m)) \
                         FROM (SELECT DISTINCT {key} AS k FROM t) keys \
                         LEFT JOIN per ON per.k = keys.k LEFT JOIN m ON m.k = keys.k \
                         GROUP BY keys.k"
                    ))
                    .await;
                    assert_eq!(got.len(), if key == "g" { 3 } else { 4000 });
                    // Whole-number sizes: every total, median and deviation is exact.
                    assert_eq!(got, want, "by {key}{filter}, skip_partial {skip_partial}");
                }
            }
        }
    }

    /// A grouped accumulator asked for its first groups answers those and keeps the rest,
    /// renumbered from 0, and its memory count follows.
    #[test]
    fn emitting_the_first_groups_of_totals_keeps_the_others() {
        let mut acc = GroupTotals {
            mode: Mode::Max,
            groups: Vec::new(),
            held: 0,
        };
        let units: ArrayRef = Arc::new(UInt64Array::from(vec![
            Some(10),
            Some(20),
            None,
            Some(20),
            Some(10),
            Some(40),
        ]));
        let sizes: ArrayRef = Arc::new(Float64Array::from(vec![1.0, 2.0, -8.0, 3.0, 4.0, 7.0]));
        acc.update_batch(
            &[Arc::clone(&units), Arc::clone(&sizes)],
            &[0, 1, 2, 1, 0, 3],
            None,
            4,
        )
        .unwrap();
        let held = acc.size();
        let first = acc.evaluate(EmitTo::First(2)).unwrap();
        assert_eq!(first.as_primitive::<Float64Type>().values(), &[5.0, 5.0]);
        assert!(
            acc.size() < held,
            "the emitted groups' memory is no longer counted"
        );
        // Former groups 2 and 3 are now 0 and 1; unit 40's new row joins former group 3.
        acc.update_batch(&[units.slice(5, 1), sizes.slice(5, 1)], &[1], None, 2)
            .unwrap();
        let rest = acc.evaluate(EmitTo::All).unwrap();
        assert_eq!(rest.as_primitive::<Float64Type>().values(), &[8.0, 14.0]);
        assert_eq!(acc.held, 0);
    }
}
