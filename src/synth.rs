//! Deterministic synthetic cancer-registry data (`railyard gen`, `railyard demo`, tests and
//! benches).
//!
//! Each station is a hospital with its own case mix: a university hospital with more
//! advanced lung cancers, a regional hospital with older patients, a smaller centre with more
//! breast and skin cancers. Survival follows an exponential model whose hazard depends on the
//! tumour site, stage and age, with administrative censoring at the end of follow-up and some
//! loss to follow-up, so survival queries give realistic, non-trivial answers.
//!
//! The same seed always gives the same rows (ChaCha8, fixed draw order), on every machine.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{
    ArrayRef, Date32Builder, Decimal128Builder, Int32Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Normal};

/// Default seed of `railyard gen` and `railyard demo`.
pub const DEFAULT_SEED: u64 = 20_261_128;

/// One synthetic hospital.
#[derive(Debug, Clone)]
pub struct StationProfile {
    pub name: String,
    pub patients: usize,
    /// Mean age at diagnosis.
    pub mean_age: f64,
    /// Relative weights of breast, lung, colorectal, prostate, melanoma, other.
    pub site_weights: [f64; 6],
    /// Shift towards advanced stages (0 = population average).
    pub stage_shift: f64,
}

const SITES: [&str; 6] = [
    "breast",
    "lung",
    "colorectal",
    "prostate",
    "melanoma",
    "other",
];
/// Yearly death hazard for a 65-year-old with a stage I tumour, per site.
const BASE_HAZARD: [f64; 6] = [0.015, 0.20, 0.05, 0.012, 0.02, 0.07];
/// Hazard ratio per stage (I..IV).
const STAGE_HR: [f64; 4] = [1.0, 1.9, 3.6, 9.0];

/// The three default stations, scaled to `total` patients (55% / 30% / 15%).
pub fn default_profiles(total: usize) -> Vec<StationProfile> {
    let a = total * 55 / 100;
    let b = total * 30 / 100;
    let c = total - a - b;
    vec![
        StationProfile {
            name: "station_a".into(),
            patients: a,
            mean_age: 63.0,
            site_weights: [0.24, 0.20, 0.16, 0.15, 0.07, 0.18],
            stage_shift: 0.25,
        },
        StationProfile {
            name: "station_b".into(),
            patients: b,
            mean_age: 68.0,
            site_weights: [0.22, 0.15, 0.20, 0.20, 0.05, 0.18],
            stage_shift: 0.0,
        },
        StationProfile {
            name: "station_c".into(),
            patients: c,
            mean_age: 60.0,
            site_weights: [0.30, 0.10, 0.14, 0.12, 0.16, 0.18],
            stage_shift: -0.2,
        },
    ]
}

/// The registry table's schema.
pub fn registry_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("sex", DataType::Utf8, false),
        Field::new("age", DataType::Int32, false),
        Field::new("diagnosis_date", DataType::Date32, false),
        Field::new("diagnosis_year", DataType::Int32, false),
        Field::new("site", DataType::Utf8, false),
        Field::new("stage", DataType::Int32, true),
        Field::new("bmi", DataType::Decimal128(4, 1), true),
        Field::new("vital_status", DataType::Utf8, false),
        Field::new("survival_days", DataType::Int32, false),
        Field::new(
            "last_contact",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
        ),
    ]))
}

/// Days from 1970-01-01 to 2000-01-01 and to 2025-12-31 (end of follow-up).
const DAY_2000_01_01: i32 = 10_957;
const DAY_2023_01_01: i32 = 19_358;
const DAY_2025_12_31: i32 = 20_453;

/// Generates one station's patients in batches of at most `batch_rows`. Patient ids start
/// at `first_id` so they are unique across stations.
pub fn generate(
    profile: &StationProfile,
    station_index: u64,
    first_id: i64,
    seed: u64,
    batch_rows: usize,
) -> Result<Vec<RecordBatch>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (station_index.wrapping_mul(0x9E37_79B9)));
    let age_dist = Normal::new(profile.mean_age, 11.0)?;
    let bmi_dist = Normal::new(26.5_f64, 4.5)?;
    let loss = Exp::new(0.02_f64 / 365.25)?;
    let total_weight: f64 = profile.site_weights.iter().sum();
    let mut batches = Vec::new();
    let mut done = 0;
    while done < profile.patients {
        let n = batch_rows.min(profile.patients - done);
        let mut id = Int64Builder::with_capacity(n);
        let mut sex = StringBuilder::with_capacity(n, n);
        let mut age = Int32Builder::with_capacity(n);
        let mut date = Date32Builder::with_capacity(n);
        let mut year = Int32Builder::with_capacity(n);
        let mut site = StringBuilder::with_capacity(n, n * 8);
        let mut stage = Int32Builder::with_capacity(n);
        let mut bmi = Decimal128Builder::with_capacity(n).with_precision_and_scale(4, 1)?;
        let mut vital = StringBuilder::with_capacity(n, n * 5);
        let mut days = Int32Builder::with_capacity(n);
        let mut last = TimestampMicrosecondBuilder::with_capacity(n);
        for i in 0..n {
            id.append_value(first_id + (done + i) as i64);
            // Site first: it constrains sex (prostate: male; breast: 99% female).
            let mut pick = rng.random::<f64>() * total_weight;
            let mut s = SITES.len() - 1;
            for (k, w) in profile.site_weights.iter().enumerate() {
                if pick < *w {
                    s = k;
                    break;
                }
                pick -= w;
            }
            let female = match SITES[s] {
                "prostate" => false,
                "breast" => rng.random::<f64>() < 0.99,
                _ => rng.random::<f64>() < 0.48,
            };
            sex.append_value(if female { "F" } else { "M" });
            let a = age_dist.sample(&mut rng).round().clamp(18.0, 99.0) as i32;
            age.append_value(a);
            let d = rng.random_range(DAY_2000_01_01..DAY_2023_01_01);
            date.append_value(d);
            year.append_value(year_of(d));
            site.append_value(SITES[s]);
            // Stage: a latent severity, shifted per station and worse for lung.
            let severity = rng.random::<f64>()
                + profile.stage_shift * 0.3
                + if SITES[s] == "lung" { 0.25 } else { 0.0 };
            let st = match severity {
                x if x < 0.35 => 1,
                x if x < 0.62 => 2,
                x if x < 0.85 => 3,
                _ => 4,
            };
            let unknown_stage = rng.random::<f64>() < 0.03;
            if unknown_stage {
                stage.append_null();
            } else {
                stage.append_value(st);
            }
            if rng.random::<f64>() < 0.08 {
                bmi.append_null();
            } else {
                let b = bmi_dist.sample(&mut rng).clamp(14.0, 60.0);
                bmi.append_value((b * 10.0).round() as i128);
            }
            let hazard_per_year =
                BASE_HAZARD[s] * STAGE_HR[st as usize - 1] * (0.035 * (a as f64 - 65.0)).exp();
            let death = Exp::new(hazard_per_year / 365.25)?.sample(&mut rng);
            let follow_up = (DAY_2025_12_31 - d) as f64;
            let censor = loss.sample(&mut rng).min(follow_up);
            let (t, dead) = if death <= censor {
                (death, true)
            } else {
                (censor, false)
            };
            let t = (t.floor() as i32).max(1);
            vital.append_value(if dead { "dead" } else { "alive" });
            days.append_value(t);
            let contact_day = (d + t) as i64;
            let minute_of_day = rng.random_range(8 * 60..18 * 60) as i64;
            last.append_value((contact_day * 86_400 + minute_of_day * 60) * 1_000_000);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(sex.finish()),
            Arc::new(age.finish()),
            Arc::new(date.finish()),
            Arc::new(year.finish()),
            Arc::new(site.finish()),
            Arc::new(stage.finish()),
            Arc::new(bmi.finish()),
            Arc::new(vital.finish()),
            Arc::new(days.finish()),
            Arc::new(last.finish()),
        ];
        batches.push(RecordBatch::try_new(registry_schema(), columns)?);
        done += n;
    }
    Ok(batches)
}

/// The calendar year of a day number (days since 1970-01-01): the civil-from-days
/// algorithm, year part only.
fn year_of(z: i32) -> i32 {
    let z = z as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }) as i32
}

/// Writes the registry as one Parquet file per station under `dir/registry/`, and returns
/// that directory.
pub fn write_registry(dir: &Path, profiles: &[StationProfile], seed: u64) -> Result<PathBuf> {
    let out = dir.join("registry");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut first_id = 1;
    for (i, profile) in profiles.iter().enumerate() {
        let path = out.join(format!("{}.parquet", profile.name));
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(256 * 1024))
            .build();
        let mut writer = ArrowWriter::try_new(file, registry_schema(), Some(props))?;
        for batch in generate(profile, i as u64, first_id, seed, 64 * 1024)? {
            writer.write(&batch)?;
        }
        writer.close()?;
        first_id += profile.patients as i64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn years_of_known_days() {
        assert_eq!(year_of(0), 1970);
        assert_eq!(year_of(DAY_2000_01_01), 2000);
        assert_eq!(year_of(DAY_2000_01_01 - 1), 1999);
        assert_eq!(year_of(DAY_2023_01_01), 2023);
        assert_eq!(year_of(DAY_2025_12_31), 2025);
    }

    #[test]
    fn same_seed_same_rows_other_seed_other_rows() {
        let p = &default_profiles(3_000)[0];
        let a = generate(p, 0, 1, 7, 500).unwrap();
        let b = generate(p, 0, 1, 7, 500).unwrap();
        let c = generate(p, 0, 1, 8, 500).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.iter().map(|b| b.num_rows()).sum::<usize>(), p.patients);
    }

    #[test]
    fn survival_is_plausible() {
        let p = &default_profiles(20_000)[1];
        let batches = generate(p, 1, 1, DEFAULT_SEED, 4096).unwrap();
        let mut dead = 0;
        let mut rows = 0;
        for b in &batches {
            let vital = b
                .column(8)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            let days = b
                .column(9)
                .as_any()
                .downcast_ref::<arrow::array::Int32Array>()
                .unwrap();
            for i in 0..b.num_rows() {
                rows += 1;
                dead += (vital.value(i) == "dead") as usize;
                assert!(days.value(i) >= 1 && days.value(i) <= DAY_2025_12_31 - DAY_2000_01_01);
            }
        }
        let share = dead as f64 / rows as f64;
        assert!((0.2..0.8).contains(&share), "death share {share}");
    }
}
