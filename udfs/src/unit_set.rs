//! `unit_set(unit_hash)`: which privacy units (patients) a released value covers.
//!
//! A station's query-set auditor compares the set behind every value it releases with the
//! sets it released to the same researcher before: two sets that differ by a few patients
//! subtract to those patients. The aggregate collects the units of a group (or of the rows
//! one aggregate call reads, under its FILTER) into a [`Set`], serialized as Binary; the set
//! never leaves the station. (The station's auditor renumbers the elements densely before
//! it stores a set, and stores it as a compressed bitmap, so stored sets stay small.)
//!
//! Elements are the 64-bit unit hashes folded to 32 bits (`h ^ (h >> 32)`). Two patients
//! whose folded hashes collide count as one: with n patients a given patient shares its
//! element with another with probability about n / 2³², so a difference of one patient
//! goes unseen with that probability (2·10⁻⁴ for a million patients).
//!
//! A set is its elements ascending, without repeats, and its bytes are those elements,
//! four little-endian bytes each. Hashes scatter over the whole 32-bit range, so a roaring
//! bitmap of them (which this was) keeps one container, one allocation, per patient and
//! spends about 10 bytes on each; the sorted array spends 4, and building, merging,
//! encoding and decoding it are each one pass over a buffer.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, BooleanArray};
use arrow::buffer::{Buffer, NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::{Result, ScalarValue, exec_err, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature,
    TypeSignature, Volatility,
};

/// The function's name (a station-internal aggregate; it is never registered for SQL).
pub const UNIT_SET: &str = "unit_set";

/// The 32-bit element of a unit hash.
pub fn element(hash: u64) -> u32 {
    // Truncation is the point: the high half is folded into the low half first.
    (hash ^ (hash >> 32)) as u32
}

/// A set of unit elements: ascending, without repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Set(Vec<u32>);

impl Set {
    /// The set of `elements`, in any order, with repeats. The sort finds ascending runs
    /// and merges them, so the union of a few sets laid end to end is a merge, not a sort.
    pub fn of(mut elements: Vec<u32>) -> Self {
        elements.sort();
        elements.dedup();
        Self(elements)
    }

    /// How many elements it holds.
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The elements, ascending.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn contains(&self, element: u32) -> bool {
        self.0.binary_search(&element).is_ok()
    }

    /// The elements of `self` that `other` lacks.
    pub fn difference(&self, other: &Set) -> Set {
        let mut out = Vec::with_capacity(self.0.len());
        let mut theirs = other.0.iter().peekable();
        for &x in &self.0 {
            while theirs.next_if(|y| **y < x).is_some() {}
            if theirs.peek() != Some(&&x) {
                out.push(x);
            }
        }
        Self(out)
    }

    /// The set's bytes: each element as four little-endian bytes, ascending.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        append_encoded(&self.0, &mut bytes);
        bytes
    }

    /// A set's bytes back as the set (`None`: the bytes are not a set's: a length that is
    /// not a multiple of four, or elements that do not strictly ascend).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let mut elements = Vec::with_capacity(bytes.len() / 4);
        append_decoded(bytes, &mut elements).then_some(Self(elements))
    }
}

impl FromIterator<u32> for Set {
    fn from_iter<I: IntoIterator<Item = u32>>(elements: I) -> Self {
        Self::of(elements.into_iter().collect())
    }
}

/// Appends the elements of a set's bytes to `out`; false (with `out` partly extended) when
/// the bytes are not a set's.
fn append_decoded(bytes: &[u8], out: &mut Vec<u32>) -> bool {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return false;
    }
    let mut last: Option<u32> = None;
    for chunk in chunks {
        let x = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if last.is_some_and(|l| l >= x) {
            return false;
        }
        last = Some(x);
        out.push(x);
    }
    true
}

#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UnitSet {
    signature: Signature,
}

impl Default for UnitSet {
    fn default() -> Self {
        Self {
            signature: Signature::new(
                TypeSignature::Exact(vec![DataType::UInt64]),
                Volatility::Immutable,
            ),
        }
    }
}

/// The set aggregate, to call with a unit hash.
pub fn udaf() -> AggregateUDF {
    AggregateUDF::from(UnitSet::default())
}

impl AggregateUDFImpl for UnitSet {
    fn name(&self) -> &str {
        UNIT_SET
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(Units::default()))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(GroupUnits::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "set"),
            DataType::Binary,
            true,
        ))])
    }
}

/// Distinct values as they are collected: the first `distinct` ascend without repeats; the
/// rest are as they arrived, with repeats (a patient has many rows), sorted in when they
/// outgrow the sorted part, so that memory stays within about twice the set's.
#[derive(Debug, Clone)]
pub(crate) struct Collected<T> {
    elements: Vec<T>,
    distinct: usize,
}

impl<T> Default for Collected<T> {
    fn default() -> Self {
        Self {
            elements: Vec::new(),
            distinct: 0,
        }
    }
}

impl<T: Ord + Copy> Collected<T> {
    /// Appends to the unsorted tail with `add`; answers what `add` answers and how many
    /// elements the buffer's capacity grew by, for a caller that keeps count of its memory.
    fn append<R>(&mut self, add: impl FnOnce(&mut Vec<T>) -> R) -> (R, usize) {
        let before = self.elements.capacity();
        let answer = add(&mut self.elements);
        if self.elements.len() > 2 * self.distinct + 4096 {
            self.sorted();
        }
        (answer, self.elements.capacity() - before)
    }

    /// The distinct elements, ascending.
    pub(crate) fn sorted(&mut self) -> &[T] {
        if self.elements.len() > self.distinct {
            self.elements.sort_unstable();
            self.elements.dedup();
            self.distinct = self.elements.len();
        }
        &self.elements
    }

    /// The distinct elements, ascending, as a vector.
    pub(crate) fn into_vec(mut self) -> Vec<T> {
        self.sorted();
        self.elements
    }

    /// The buffer's capacity, in elements.
    pub(crate) fn capacity(&self) -> usize {
        self.elements.capacity()
    }
}

/// Appends a set's bytes (the elements of `set`, ascending) to `out`.
fn append_encoded(set: &[u32], out: &mut Vec<u8>) {
    out.reserve(4 * set.len());
    for x in set {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Every group's collected values, for a grouped accumulator that adds each row to its
/// group directly (DataFusion's adapter for per-group accumulators sorts a batch's rows by
/// group and copies each group's values out first), and the memory their buffers hold.
#[derive(Debug)]
pub(crate) struct Groups<T> {
    groups: Vec<Collected<T>>,
    /// The buffers' capacities, in values.
    held: usize,
}

impl<T> Default for Groups<T> {
    fn default() -> Self {
        Self {
            groups: Vec::new(),
            held: 0,
        }
    }
}

impl<T: Ord + Copy> Groups<T> {
    /// The value `of` the unit hash of each row that has one and passes the FILTER, added
    /// to the row's group.
    pub(crate) fn add_rows(
        &mut self,
        units: &ArrayRef,
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
        of: impl Fn(u64) -> T,
    ) {
        let units = units.as_primitive::<UInt64Type>();
        self.groups
            .resize_with(total_num_groups, Collected::default);
        for (r, &g) in group_indices.iter().enumerate() {
            if units.is_valid(r) && selected(opt_filter, r) {
                self.append(g, |values| values.push(of(units.value(r))));
            }
        }
    }

    /// Makes room for `total_num_groups` groups.
    pub(crate) fn resize(&mut self, total_num_groups: usize) {
        self.groups
            .resize_with(total_num_groups, Collected::default);
    }

    /// Appends to group `g`'s values with `add`; answers what `add` answers.
    pub(crate) fn append<R>(&mut self, g: usize, add: impl FnOnce(&mut Vec<T>) -> R) -> R {
        let (answer, grown) = self.groups[g].append(add);
        self.held += grown;
        answer
    }

    /// The first groups `emit_to` names, taken out.
    pub(crate) fn take(&mut self, emit_to: EmitTo) -> Vec<Collected<T>> {
        let taken = emit_to.take_needed(&mut self.groups);
        self.held -= taken.iter().map(Collected::capacity).sum::<usize>();
        taken
    }

    /// The memory held, in bytes.
    pub(crate) fn size(&self) -> usize {
        size_of::<Self>()
            + self.groups.capacity() * size_of::<Collected<T>>()
            + self.held * size_of::<T>()
    }
}

/// Whether row `r` passes an aggregate's FILTER (a NULL filter value does not).
pub(crate) fn selected(filter: Option<&BooleanArray>, r: usize) -> bool {
    filter.is_none_or(|f| f.is_valid(r) && f.value(r))
}

/// The accumulator of one group (or of a global aggregate).
#[derive(Debug, Default)]
struct Units {
    collected: Collected<u32>,
}

impl Accumulator for Units {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let [units] = values else {
            return internal_err!("{UNIT_SET} takes one argument");
        };
        let units = units.as_primitive::<UInt64Type>();
        self.collected.append(|values| {
            if units.null_count() == 0 {
                values.extend(units.values().iter().map(|h| element(*h)));
            } else {
                values.extend(units.iter().flatten().map(element));
            }
        });
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let [sets] = states else {
            return internal_err!("{UNIT_SET} has one state field");
        };
        for bytes in sets.as_binary::<i32>().iter().flatten() {
            let (set, _) = self
                .collected
                .append(|values| append_decoded(bytes, values));
            if !set {
                return internal_err!("{UNIT_SET}: a partial state is not a unit set");
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let mut bytes = Vec::new();
        append_encoded(self.collected.sorted(), &mut bytes);
        Ok(vec![ScalarValue::Binary(Some(bytes))])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let mut bytes = Vec::new();
        append_encoded(self.collected.sorted(), &mut bytes);
        Ok(ScalarValue::Binary((!bytes.is_empty()).then_some(bytes)))
    }

    fn size(&self) -> usize {
        size_of_val(self) + 4 * self.collected.capacity()
    }
}

/// The accumulator of a grouped aggregate: every group's elements.
#[derive(Debug, Default)]
struct GroupUnits {
    sets: Groups<u32>,
}

/// Sets as a Binary column, each with whether it is valid (NULL otherwise).
fn binary_column<'a>(sets: impl ExactSizeIterator<Item = (&'a [u32], bool)>) -> Result<ArrayRef> {
    let mut bytes = Vec::new();
    let mut offsets = Vec::with_capacity(sets.len() + 1);
    offsets.push(0i32);
    let mut valid = Vec::with_capacity(sets.len());
    for (set, is_valid) in sets {
        valid.push(is_valid);
        append_encoded(set, &mut bytes);
        let Ok(end) = i32::try_from(bytes.len()) else {
            return exec_err!("{UNIT_SET}: the sets of one batch exceed 2 GiB");
        };
        offsets.push(end);
    }
    let nulls = valid.iter().any(|v| !v).then(|| NullBuffer::from(valid));
    Ok(Arc::new(BinaryArray::try_new(
        OffsetBuffer::new(offsets.into()),
        Buffer::from_vec(bytes),
        nulls,
    )?))
}

/// The sets of `groups` as a Binary column; an empty set is NULL when `empty_is_null`.
fn sets_column(mut groups: Vec<Collected<u32>>, empty_is_null: bool) -> Result<ArrayRef> {
    for group in &mut groups {
        group.sorted();
    }
    binary_column(groups.iter().map(|group| {
        let set = group.elements.as_slice();
        (set, !(empty_is_null && set.is_empty()))
    }))
}

impl GroupsAccumulator for GroupUnits {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let [units] = values else {
            return internal_err!("{UNIT_SET} takes one argument");
        };
        self.sets
            .add_rows(units, group_indices, opt_filter, total_num_groups, element);
        Ok(())
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let [sets] = values else {
            return internal_err!("{UNIT_SET} has one state field");
        };
        let states = sets.as_binary::<i32>();
        self.sets.resize(total_num_groups);
        for (r, &g) in group_indices.iter().enumerate() {
            if states.is_valid(r)
                && !self
                    .sets
                    .append(g, |values| append_decoded(states.value(r), values))
            {
                return internal_err!("{UNIT_SET}: a partial state is not a unit set");
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        sets_column(self.sets.take(emit_to), true)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![sets_column(self.sets.take(emit_to), false)?])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let [units] = values else {
            return internal_err!("{UNIT_SET} takes one argument");
        };
        let units = units.as_primitive::<UInt64Type>();
        // Each row its own group: the set of its unit, or the empty set.
        let ones: Vec<Option<u32>> = (0..units.len())
            .map(|r| {
                (units.is_valid(r) && selected(opt_filter, r)).then(|| element(units.value(r)))
            })
            .collect();
        Ok(vec![binary_column(
            ones.iter().map(|one| (one.as_slice(), true)),
        )?])
    }

    fn size(&self) -> usize {
        self.sets.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{RecordBatch, UInt64Array};
    use arrow::datatypes::Schema;
    use datafusion::prelude::SessionContext;

    /// How a test runs its aggregate.
    #[derive(Clone, Copy)]
    struct Run {
        chunk: usize,
        partitions: usize,
        /// `FILTER (WHERE f)`, with `f` false on every fifth row and NULL on every seventh.
        filtered: bool,
        /// Partial aggregation skipped at once (each row converted to a state).
        skip_partial: bool,
    }

    /// `SELECT g, unit_set(u) … GROUP BY g` over `groups` and `hashes` as `run` says, against
    /// each group's distinct elements collected in a `BTreeSet`. Groups whose rows all fall
    /// outside the filter or hold no unit must answer NULL (no set).
    async fn sets_match_distinct_elements(groups: Vec<u64>, hashes: Vec<Option<u64>>, run: Run) {
        let filter: Vec<Option<bool>> = (0..groups.len())
            .map(|i| (i % 7 != 0).then_some(i % 5 != 0))
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::UInt64, false),
            Field::new("u", DataType::UInt64, true),
            Field::new("f", DataType::Boolean, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(UInt64Array::from(groups.clone())),
                Arc::new(UInt64Array::from(hashes.clone())),
                Arc::new(BooleanArray::from(filter.clone())),
            ],
        )
        .unwrap();
        let mut config =
            datafusion::prelude::SessionConfig::new().with_target_partitions(run.partitions);
        if run.skip_partial {
            let execution = &mut config.options_mut().execution;
            execution.skip_partial_aggregation_probe_rows_threshold = 10;
            execution.skip_partial_aggregation_probe_ratio_threshold = 0.0;
        }
        let ctx = SessionContext::new_with_config(config);
        let rows = batch.num_rows();
        let chunks: Vec<RecordBatch> = (0..rows.div_ceil(run.chunk))
            .map(|i| batch.slice(i * run.chunk, run.chunk.min(rows - i * run.chunk)))
            .collect();
        let table = datafusion::datasource::MemTable::try_new(schema, vec![chunks]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx.register_udaf(udaf());
        let sql = if run.filtered {
            "SELECT g, unit_set(u) FILTER (WHERE f) FROM t GROUP BY g"
        } else {
            "SELECT g, unit_set(u) FROM t GROUP BY g"
        };
        let out = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut got = std::collections::BTreeMap::new();
        for b in &out {
            let keys = b.column(0).as_primitive::<UInt64Type>();
            let sets = b.column(1).as_binary::<i32>();
            for r in 0..b.num_rows() {
                let set = sets.is_valid(r).then(|| {
                    let set = Set::decode(sets.value(r)).expect("the aggregate answers a set");
                    set.iter().collect::<Vec<u32>>()
                });
                got.insert(keys.value(r), set);
            }
        }
        let mut want: std::collections::BTreeMap<u64, std::collections::BTreeSet<u32>> =
            std::collections::BTreeMap::new();
        for (i, (g, h)) in groups.iter().zip(&hashes).enumerate() {
            let distinct = want.entry(*g).or_default();
            let counted = !run.filtered || filter[i] == Some(true);
            if let (Some(h), true) = (h, counted) {
                distinct.insert(((*h ^ (*h >> 32)) & 0xFFFF_FFFF) as u32);
            }
        }
        assert_eq!(got.len(), want.len());
        for (g, distinct) in want {
            let distinct: Option<Vec<u32>> =
                (!distinct.is_empty()).then(|| distinct.into_iter().collect());
            assert_eq!(got[&g], distinct, "group {g}");
        }
    }

    const RUN: Run = Run {
        chunk: 1000,
        partitions: 4,
        filtered: false,
        skip_partial: false,
    };

    #[tokio::test]
    async fn the_set_of_a_group_is_its_distinct_units_over_partitions() {
        let n = 20_000u64;
        let hashes: Vec<Option<u64>> = (0..n)
            .map(|i| (i % 101 != 0).then_some((i % 977).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            .collect();
        let groups: Vec<u64> = (0..n).map(|i| i % 3).collect();
        for filtered in [false, true] {
            let run = Run { filtered, ..RUN };
            sets_match_distinct_elements(groups.clone(), hashes.clone(), run).await;
        }
        // Without a GROUP BY's many groups: one row per group, some NULL or filtered out, with
        // partial aggregation skipped (each row becomes a state of its own).
        let few: Vec<u64> = (0..n).map(|i| i % 4000).collect();
        for filtered in [false, true] {
            let run = Run {
                filtered,
                skip_partial: true,
                ..RUN
            };
            sets_match_distinct_elements(few.clone(), hashes.clone(), run).await;
        }
    }

    #[tokio::test]
    async fn many_rows_per_unit_are_sorted_in_as_they_grow() {
        // 60 rows for each of 3,000 units, in one group: the collected elements outgrow the
        // sorted part several times, in one partition and across four.
        let hashes: Vec<Option<u64>> = (0..180_000u64)
            .map(|i| Some((i % 3000).wrapping_mul(0xD6E8_FEB8_6659_FD93)))
            .collect();
        for partitions in [1, 4] {
            let run = Run {
                chunk: 8192,
                partitions,
                ..RUN
            };
            sets_match_distinct_elements(vec![7; hashes.len()], hashes.clone(), run).await;
        }
    }

    /// A grouped accumulator asked for its first groups (DataFusion does so under memory
    /// pressure or over sorted input) answers those and keeps the rest, renumbered from 0,
    /// and its memory count follows.
    #[test]
    fn emitting_the_first_groups_keeps_the_others() {
        let mut acc = GroupUnits::default();
        let units: ArrayRef = Arc::new(UInt64Array::from(vec![
            Some(10),
            Some(20),
            None,
            Some(30),
            Some(10),
            Some(40),
        ]));
        acc.update_batch(&[Arc::clone(&units)], &[0, 1, 2, 1, 0, 3], None, 4)
            .unwrap();
        let held = acc.size();
        let first = acc.evaluate(EmitTo::First(2)).unwrap();
        let first = first.as_binary::<i32>();
        let decoded = |bytes: &[u8]| Set::decode(bytes).unwrap().iter().collect::<Vec<_>>();
        assert_eq!(decoded(first.value(0)), [10]);
        assert_eq!(decoded(first.value(1)), {
            let mut two = vec![20, 30];
            two.sort_unstable();
            two
        });
        assert!(
            acc.size() < held,
            "the emitted groups' memory is no longer counted"
        );
        // Former groups 2 and 3 are now 0 and 1; a new row of group 0 joins former group 2.
        acc.update_batch(&[units.slice(0, 1)], &[0], None, 2)
            .unwrap();
        let rest = acc.evaluate(EmitTo::All).unwrap();
        let rest = rest.as_binary::<i32>();
        assert_eq!(rest.len(), 2);
        assert_eq!(decoded(rest.value(0)), [10]);
        assert_eq!(decoded(rest.value(1)), [40]);
        assert_eq!(
            acc.size(),
            size_of::<GroupUnits>() + acc.sets.groups.capacity() * size_of::<Collected<u32>>()
        );
    }

    #[test]
    fn only_ascending_whole_elements_decode() {
        let set = Set::of(vec![9, 3, 3, 0, u32::MAX]);
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 3, 9, u32::MAX]);
        assert_eq!(Set::decode(&set.encode()), Some(set.clone()));
        assert_eq!(Set::decode(&[]), Some(Set::default()));
        let bytes = set.encode();
        assert_eq!(
            Set::decode(&bytes[..bytes.len() - 1]),
            None,
            "a torn element"
        );
        let repeat: Vec<u8> = [5u32, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(Set::decode(&repeat), None, "a repeated element");
        let descending: Vec<u8> = [6u32, 5].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(Set::decode(&descending), None, "descending elements");
    }

    #[test]
    fn difference_and_membership_agree_with_btreeset() {
        use std::collections::BTreeSet;
        let a: Vec<u32> = (0..500u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 1000)
            .collect();
        let b: Vec<u32> = (0..400u32).map(|i| i.wrapping_mul(40_503) % 1000).collect();
        let (sa, sb) = (Set::of(a.clone()), Set::of(b.clone()));
        let (ta, tb): (BTreeSet<u32>, BTreeSet<u32>) =
            (a.into_iter().collect(), b.into_iter().collect());
        assert_eq!(sa.len(), ta.len() as u64);
        let want: Vec<u32> = ta.difference(&tb).copied().collect();
        assert_eq!(sa.difference(&sb).iter().collect::<Vec<_>>(), want);
        let want: Vec<u32> = tb.difference(&ta).copied().collect();
        assert_eq!(sb.difference(&sa).iter().collect::<Vec<_>>(), want);
        assert!(sa.difference(&sa).is_empty());
        for x in 0..1000 {
            assert_eq!(sa.contains(x), ta.contains(&x));
        }
    }
}
