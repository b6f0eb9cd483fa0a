//! The query-set auditor's rule (Denning; Dobkin, Jones and Lipton): no two released sets
//! of patients may differ by a few patients.
//!
//! Thresholds count each released value's patients, but two values that each pass can
//! still subtract to one patient: `sum(age)` over everyone and over everyone but patient 1
//! give patient 1's age; a grouped release that withholds a group of one, subtracted from an
//! earlier total, gives that patient. A station therefore remembers, per researcher, the
//! set of patients behind every value it released ([`crate::release::Released::sets`]) and
//! refuses a release with a set that differs from a remembered one, or from another set of
//! the same release, by more than none and fewer than k patients (the size of the
//! symmetric difference). Identical sets are allowed: a query run again, or a model's
//! rounds over the same rows, releases nothing new about who is in them.
//!
//! The decision is itself a release: a set built as an earlier one plus k − 1 known
//! patients plus "patient P if P is over 70" would be refused or answered depending on P.
//! So the threshold is k plus a margin of 0..=`threshold_noise` drawn from a keyed hash of
//! *which* patients make the difference, as for the below-k refusal of a released value:
//! the same difference always meets the same threshold, a difference by one more patient
//! meets another. Below k nothing is released, whatever the margin.
//!
//! Pure: the station's store (`station/src/queryset.rs`) keeps the sets, durably.

use roaring::RoaringBitmap;

use crate::release::ThresholdKey;
use crate::rule::{Refusal, Rule};

/// A set released before: which query released it (its id in the audit log), and the set.
#[derive(Debug, Clone, Copy)]
pub struct Earlier<'a> {
    pub query_id: &'a str,
    pub set: &'a RoaringBitmap,
}

/// One set of a release: a released group's (its `count(*)`) or one of its values'
/// contributors (`group`: the group's row), or the union of disjoint released groups
/// (`group: None`). `S`: the set, as the release found it (a
/// [`railyard_udfs::unit_set::Set`] of unit elements) or as the station's auditor numbers
/// it (a bitmap).
#[derive(Debug, Clone, PartialEq)]
pub struct ReleasedSet<S = RoaringBitmap> {
    pub group: Option<usize>,
    pub set: S,
}

/// Refuses `sets` (one release) if one of them differs by more than none and fewer than k
/// (plus the noisy margin) patients from an `earlier` set or from another of `sets`.
/// `query_id` names the release in the message of a conflict inside it.
///
/// Every pair is compared, the groups of one `GROUP BY` too: over a relational input
/// (`UNION ALL` of the table and the table without patient 1, grouped by which part) two
/// groups can be the same patients but one.
///
/// `unit` maps an element of the sets to the unit's 32-bit hash (the identity when the sets
/// hold the hashes themselves; a station that numbers its patients densely maps the number
/// back), so the margin of a difference depends only on which patients differ.
pub fn check(
    table: &str,
    query_id: &str,
    sets: &[ReleasedSet],
    earlier: &[Earlier<'_>],
    k: u64,
    key: &ThresholdKey,
    unit: &dyn Fn(u32) -> u32,
) -> Result<(), Refusal> {
    for (i, new) in sets.iter().enumerate() {
        for other in earlier {
            if too_close(&new.set, other.set, k, key, unit) {
                return Err(refusal(table, other.query_id, k));
            }
        }
        for before in &sets[..i] {
            // The union of the released groups differs from one of them by the others,
            // which are released too: nothing new to compare.
            if new.group.is_none() != before.group.is_none() {
                continue;
            }
            if too_close(&new.set, &before.set, k, key, unit) {
                return Err(refusal(table, query_id, k));
            }
        }
    }
    Ok(())
}

/// Whether two sets differ by more than none and fewer than the noisy threshold.
pub fn too_close(
    a: &RoaringBitmap,
    b: &RoaringBitmap,
    k: u64,
    key: &ThresholdKey,
    unit: &dyn Fn(u32) -> u32,
) -> bool {
    let most = k + key.noise();
    // The symmetric difference is at least the difference in size: most pairs stop here.
    if a.len().abs_diff(b.len()) >= most {
        return false;
    }
    let common = a.intersection_len(b);
    let differ = (a.len() - common) + (b.len() - common);
    if differ == 0 || differ >= most {
        return false;
    }
    if differ < k {
        return true;
    }
    // Between k and k + noise: the margin of which patients differ decides.
    differ < threshold((a ^ b).iter(), k, key, unit)
}

/// The number of patients a difference (`set`: its elements, each once) must reach to be
/// no disclosure: k plus the margin drawn by which patients they are. (A release's
/// secondary suppression uses the same threshold, so what it lets out is never refused for
/// the same difference.)
pub fn threshold(
    set: impl Iterator<Item = u32>,
    k: u64,
    key: &ThresholdKey,
    unit: &dyn Fn(u32) -> u32,
) -> u64 {
    k + key.margin(digest(set, unit), k ^ DIFFERENCING_TAG)
}

/// Separates the auditor's margins from the release thresholds' (a set of patients that
/// is both a group and a difference draws independent margins).
const DIFFERENCING_TAG: u64 = 0x5155_4552_5953_4554;

/// A 64-bit digest of which elements a set holds (each once, in any order).
fn digest(set: impl Iterator<Item = u32>, unit: &dyn Fn(u32) -> u32) -> u64 {
    set.fold(0u64, |acc, x| {
        // splitmix64 of each unit, XORed: order-free.
        let mut z = u64::from(unit(x)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        acc ^ z ^ (z >> 31)
    })
}

/// The refusal: names the rule and the earlier query, never a value or a count of it.
pub fn refusal(table: &str, earlier_query: &str, k: u64) -> Refusal {
    Refusal {
        rule: Rule::Differencing,
        message: format!(
            "policy: a station refuses this release of table '{table}': the patients it \
             covers differ from those of what query {earlier_query} released to you by fewer \
             than {k} (plus a noisy margin), so the two would subtract to those patients \
             (query-set auditing)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(x: u32) -> u32 {
        x
    }

    fn key(noise: u64) -> ThresholdKey {
        ThresholdKey::new([7u8; 32], noise)
    }

    fn set(range: std::ops::Range<u32>) -> RoaringBitmap {
        range.collect()
    }

    #[test]
    fn a_total_and_the_total_without_one_patient_are_refused() {
        let all = set(0..228);
        let mut but_one = all.clone();
        but_one.remove(17);
        let earlier = [Earlier {
            query_id: "q1",
            set: &all,
        }];
        let refused = check(
            "lung",
            "q2",
            &[global(but_one)],
            &earlier,
            5,
            &key(3),
            &same,
        )
        .unwrap_err();
        assert_eq!(refused.rule, Rule::Differencing);
        assert!(refused.message.contains("q1"), "{}", refused.message);
        // Identical sets (a query run again, a model's rounds) pass.
        check(
            "lung",
            "q3",
            &[global(all.clone())],
            &earlier,
            5,
            &key(3),
            &same,
        )
        .unwrap();
    }

    fn global(set: RoaringBitmap) -> ReleasedSet {
        ReleasedSet {
            group: Some(0),
            set,
        }
    }

    #[test]
    fn every_set_of_a_release_is_compared_with_every_other() {
        // count(*) over 50 beside a value whose contributors leave two out: refused.
        let group = ReleasedSet {
            group: Some(0),
            set: set(0..50),
        };
        let value = ReleasedSet {
            group: Some(0),
            set: set(0..48),
        };
        let refused = check("t", "q", &[group.clone(), value], &[], 5, &key(0), &same).unwrap_err();
        assert!(refused.message.contains("query q "), "{}", refused.message);
        // Two groups of one GROUP BY one patient apart (UNION ALL of the table and the
        // table without patient 0, grouped by part): refused too.
        let other = ReleasedSet {
            group: Some(1),
            set: set(1..50),
        };
        assert!(check("t", "q", &[group.clone(), other], &[], 5, &key(0), &same).is_err());
        // The union of disjoint groups is not compared with the groups it is made of (it
        // differs from one by the others, which are released too).
        let small = ReleasedSet {
            group: Some(1),
            set: set(200..205),
        };
        let union = ReleasedSet {
            group: None,
            set: set(0..50) | set(200..205),
        };
        check(
            "t",
            "q",
            &[group.clone(), small, union],
            &[],
            5,
            &key(20),
            &same,
        )
        .unwrap();
        // Disjoint groups pass, and so does the same release again.
        let far = ReleasedSet {
            group: Some(1),
            set: set(100..150),
        };
        let both = [group, far];
        check("t", "q", &both, &[], 5, &key(0), &same).unwrap();
        let earlier: Vec<Earlier<'_>> = both
            .iter()
            .map(|s| Earlier {
                query_id: "q",
                set: &s.set,
            })
            .collect();
        check("t", "again", &both, &earlier, 5, &key(0), &same).unwrap();
    }

    #[test]
    fn the_threshold_is_k_plus_a_margin_drawn_by_which_patients_differ() {
        let k = 5;
        let base = set(0..100);
        // Differences of exactly k patients: some meet a margin above 0 and are refused,
        // others pass; the same difference always gets the same answer.
        let mut refused = 0;
        let mut passed = 0;
        for start in 0..200u32 {
            let more: RoaringBitmap = base
                .iter()
                .chain(1000 + start * 10..1000 + start * 10 + 5)
                .collect();
            let first = too_close(&more, &base, k, &key(3), &same);
            assert_eq!(first, too_close(&base, &more, k, &key(3), &same));
            if first {
                refused += 1;
            } else {
                passed += 1;
            }
        }
        assert!(
            refused > 100 && passed > 20,
            "{refused} refused, {passed} passed"
        );
        // Below k: always refused; from k + noise on: never.
        for d in 1..k as u32 {
            let more: RoaringBitmap = base.iter().chain(500..500 + d).collect();
            assert!(too_close(&more, &base, k, &key(3), &same), "difference {d}");
        }
        let far: RoaringBitmap = base.iter().chain(500..508).collect();
        assert!(!too_close(&far, &base, k, &key(3), &same));
        // Without noise the threshold is exactly k.
        let exact: RoaringBitmap = base.iter().chain(500..505).collect();
        assert!(!too_close(&exact, &base, k, &key(0), &same));
    }

    #[test]
    fn a_swap_of_patients_counts_both_sides() {
        // {1..50} and {2..51}: sizes equal, but two patients differ.
        let a = set(1..51);
        let b = set(2..52);
        assert!(too_close(&a, &b, 5, &key(0), &same));
    }
}
