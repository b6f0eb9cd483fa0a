//! Reading a policy file: the TOML as written (unknown keys refused), validated value by
//! value, each error naming the file and the line.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    min_group_size: Option<Spanned<u64>>,
    threshold_noise: Option<Spanned<u64>>,
    model_dominance: Option<Spanned<f64>>,
    default_visibility: Option<Visibility>,
    max_string_literal: Option<Spanned<usize>>,
    model_min_rows: Option<Spanned<u64>>,
    survival_time_resolution: Option<Spanned<f64>>,
    allow_vertical: Option<bool>,
    privacy_unit: Option<Spanned<String>>,
    query_set_audit: Option<bool>,
    max_query_sets: Option<Spanned<u64>>,
    max_fragments_per_minute: Option<u64>,
    trains: Option<TrainsFile>,
    dp: Option<DpFile>,
    #[serde(default)]
    tables: BTreeMap<Spanned<String>, TableFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpFile {
    budget: Option<Spanned<f64>>,
    max_epsilon: Option<Spanned<f64>>,
    epsilon: Option<Spanned<f64>>,
    max_rows_per_unit: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpColumnFile {
    lower: Option<f64>,
    upper: Option<f64>,
    keys: Option<Vec<toml::Value>>,
    bins: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainsFile {
    #[serde(default)]
    allowed: Vec<Spanned<String>>,
    max_output_rows: Option<Spanned<u64>>,
    max_output_bytes: Option<Spanned<u64>>,
    timeout_seconds: Option<Spanned<u64>>,
    memory_mb: Option<Spanned<u64>>,
    cpus: Option<Spanned<f64>>,
    pids: Option<Spanned<u64>>,
    max_concurrent: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    min_group_size: Option<Spanned<u64>>,
    default_visibility: Option<Visibility>,
    model_min_rows: Option<Spanned<u64>>,
    survival_time_resolution: Option<Spanned<f64>>,
    allow_vertical: Option<bool>,
    privacy_unit: Option<Spanned<String>>,
    query_set_audit: Option<bool>,
    #[serde(default)]
    columns: BTreeMap<Spanned<String>, Visibility>,
    #[serde(default)]
    dp: BTreeMap<Spanned<String>, DpColumnFile>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            origin: source.clone(),
            message: format!("cannot read the file: {e}"),
        })?;
        Self::parse(&text, &source)
    }

    /// Parses and validates policy text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, PolicyError> {
        let error = |message: String| PolicyError {
            origin: source.to_string(),
            message,
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!("line {}: ", line_of(text, s.start)))
                .unwrap_or_default();
            error(format!("{at}{}", e.message()))
        })?;
        let k = |v: &Spanned<u64>| -> Result<u64, PolicyError> {
            if *v.get_ref() == 0 {
                return Err(error(format!(
                    "line {}: min_group_size must be at least 1",
                    line_of(text, v.span().start)
                )));
            }
            Ok(*v.get_ref())
        };
        let min_rows = |v: &Spanned<u64>| -> Result<u64, PolicyError> {
            if *v.get_ref() == 0 {
                return Err(error(format!(
                    "line {}: model_min_rows must be at least 1",
                    line_of(text, v.span().start)
                )));
            }
            Ok(*v.get_ref())
        };
        let resolution = |v: &Spanned<f64>| -> Result<f64, PolicyError> {
            let r = *v.get_ref();
            if !(r.is_finite() && r >= 0.0) {
                return Err(error(format!(
                    "line {}: survival_time_resolution must be a number ≥ 0 (0 = exact times)",
                    line_of(text, v.span().start)
                )));
            }
            Ok(r)
        };
        let mut policy = Policy {
            source: source.to_string(),
            ..Policy::default()
        };
        if let Some(v) = &file.min_group_size {
            policy.min_group_size = k(v)?;
        }
        if let Some(v) = &file.threshold_noise {
            if *v.get_ref() > MAX_THRESHOLD_NOISE {
                return Err(error(format!(
                    "line {}: threshold_noise must be at most {MAX_THRESHOLD_NOISE}",
                    line_of(text, v.span().start)
                )));
            }
            policy.threshold_noise = *v.get_ref();
        }
        if let Some(v) = &file.model_dominance {
            let share = *v.get_ref();
            if !(share > 0.0 && share <= 1.0) {
                return Err(error(format!(
                    "line {}: model_dominance must be a share above 0 and at most 1",
                    line_of(text, v.span().start)
                )));
            }
            policy.model_dominance = share;
        }
        if let Some(v) = file.default_visibility {
            policy.default_visibility = v;
        }
        if let Some(v) = &file.max_string_literal {
            if *v.get_ref() == 0 {
                return Err(error(format!(
                    "line {}: max_string_literal must be at least 1",
                    line_of(text, v.span().start)
                )));
            }
            policy.max_string_literal = *v.get_ref();
        }
        if let Some(v) = &file.model_min_rows {
            policy.model_min_rows = min_rows(v)?;
        }
        if let Some(v) = &file.survival_time_resolution {
            policy.survival_time_resolution = resolution(v)?;
        }
        policy.allow_vertical = file.allow_vertical;
        if let Some(on) = file.query_set_audit {
            policy.query_set_audit = on;
        }
        if let Some(v) = &file.max_query_sets {
            if *v.get_ref() < 2 {
                return Err(error(format!(
                    "line {}: max_query_sets must be at least 2 (the oldest sets are merged \
                     into one)",
                    line_of(text, v.span().start)
                )));
            }
            policy.max_query_sets = *v.get_ref();
        }
        if let Some(v) = file.max_fragments_per_minute {
            policy.max_fragments_per_minute = v;
        }
        if let Some(unit) = &file.privacy_unit {
            policy.privacy_unit = Some(unit_name(unit, text, source)?);
        }
        if let Some(trains) = &file.trains {
            policy.trains = parse_trains(trains, text, source)?;
        }
        if let Some(dp) = &file.dp {
            policy.dp = Some(parse_dp(dp, text, source)?);
        }
        for (name, table) in file.tables {
            let min_group_size = match &table.min_group_size {
                Some(v) => Some(k(v)?),
                None => None,
            };
            let columns = table
                .columns
                .into_iter()
                .map(|(c, v)| {
                    let line = line_of(text, c.span().start);
                    (c.into_inner(), (v, line))
                })
                .collect();
            let mut dp = BTreeMap::new();
            for (c, f) in table.dp {
                let line = line_of(text, c.span().start);
                dp.insert(c.into_inner(), parse_dp_column(f, line).map_err(error)?);
            }
            policy.tables.insert(
                name.get_ref().clone(),
                TablePolicy {
                    min_group_size,
                    default_visibility: table.default_visibility,
                    model_min_rows: table.model_min_rows.as_ref().map(min_rows).transpose()?,
                    survival_time_resolution: table
                        .survival_time_resolution
                        .as_ref()
                        .map(resolution)
                        .transpose()?,
                    allow_vertical: table.allow_vertical,
                    privacy_unit: table
                        .privacy_unit
                        .as_ref()
                        .map(|u| unit_name(u, text, source))
                        .transpose()?,
                    query_set_audit: table.query_set_audit,
                    joined: false,
                    columns,
                    dp,
                    line: line_of(text, name.span().start),
                },
            );
        }
        Ok(policy)
    }
}

/// A `privacy_unit` value: a column name, or `"row"` (each row its own unit).
fn unit_name(v: &Spanned<String>, text: &str, source: &str) -> Result<PrivacyUnit, PolicyError> {
    let name = v.get_ref().trim();
    if name.is_empty() {
        return Err(PolicyError {
            origin: source.to_string(),
            message: format!(
                "line {}: privacy_unit must name a column (or be \"row\")",
                line_of(text, v.span().start)
            ),
        });
    }
    Ok(if name.eq_ignore_ascii_case("row") {
        PrivacyUnit::Row
    } else {
        PrivacyUnit::Column {
            name: name.to_string(),
            line: line_of(text, v.span().start),
        }
    })
}

fn parse_dp(file: &DpFile, text: &str, source: &str) -> Result<DpPolicy, PolicyError> {
    let positive = |v: &Option<Spanned<f64>>, name: &str, default: f64| match v {
        Some(v) if !(v.get_ref().is_finite() && *v.get_ref() > 0.0) => Err(PolicyError {
            origin: source.to_string(),
            message: format!(
                "line {}: dp.{name} must be a number > 0",
                line_of(text, v.span().start)
            ),
        }),
        Some(v) => Ok(*v.get_ref()),
        None => Ok(default),
    };
    let dp = DpPolicy {
        budget: positive(&file.budget, "budget", DEFAULT_DP_BUDGET)?,
        max_epsilon: positive(&file.max_epsilon, "max_epsilon", DEFAULT_DP_MAX_EPSILON)?,
        epsilon: positive(&file.epsilon, "epsilon", DEFAULT_DP_EPSILON)?,
        max_rows_per_unit: match &file.max_rows_per_unit {
            Some(v) if *v.get_ref() == 0 || *v.get_ref() > 1000 => {
                return Err(PolicyError {
                    origin: source.to_string(),
                    message: format!(
                        "line {}: dp.max_rows_per_unit must be between 1 and 1000",
                        line_of(text, v.span().start)
                    ),
                });
            }
            Some(v) => *v.get_ref(),
            None => DEFAULT_DP_MAX_ROWS_PER_UNIT,
        },
    };
    let at = |v: &Option<Spanned<f64>>| v.as_ref().map_or(1, |v| line_of(text, v.span().start));
    if dp.epsilon > dp.max_epsilon {
        return Err(PolicyError {
            origin: source.to_string(),
            message: format!(
                "line {}: dp.epsilon (the default ε of a query) is above dp.max_epsilon",
                at(&file.epsilon).max(at(&file.max_epsilon))
            ),
        });
    }
    if dp.max_epsilon > dp.budget {
        return Err(PolicyError {
            origin: source.to_string(),
            message: format!(
                "line {}: dp.max_epsilon is above dp.budget",
                at(&file.max_epsilon).max(at(&file.budget))
            ),
        });
    }
    Ok(dp)
}

fn parse_dp_column(file: DpColumnFile, line: usize) -> Result<DpColumn, String> {
    let bounds = match (file.lower, file.upper) {
        (None, None) => None,
        (Some(l), Some(u)) if l.is_finite() && u.is_finite() && l < u => Some((l, u)),
        (Some(_), Some(_)) => {
            return Err(format!(
                "line {line}: DP bounds need finite numbers with lower < upper"
            ));
        }
        _ => return Err(format!("line {line}: DP bounds need both lower and upper")),
    };
    let keys = match file.keys {
        None => None,
        Some(values) => {
            if values.is_empty() || values.len() > MAX_DP_GROUPS {
                return Err(format!(
                    "line {line}: a column's DP keys are 1 to {MAX_DP_GROUPS} values"
                ));
            }
            let mut keys = Vec::with_capacity(values.len());
            for v in values {
                let key = match v {
                    toml::Value::Integer(i) => DpKey::Int(i),
                    toml::Value::Float(f) if f.is_finite() => DpKey::Float(f),
                    toml::Value::String(s) => DpKey::Text(s),
                    toml::Value::Boolean(b) => DpKey::Bool(b),
                    _ => {
                        return Err(format!(
                            "line {line}: DP keys are integers, finite numbers, strings or \
                             booleans"
                        ));
                    }
                };
                if keys.contains(&key) {
                    return Err(format!("line {line}: a DP key is listed twice"));
                }
                keys.push(key);
            }
            Some(keys)
        }
    };
    let bins = match file.bins {
        None => None,
        Some(value) => Some(parse_dp_bins(value, bounds, line)?),
    };
    if bounds.is_none() && keys.is_none() && bins.is_none() {
        return Err(format!(
            "line {line}: a DP column entry needs bounds (lower, upper), bins or keys"
        ));
    }
    Ok(DpColumn {
        bounds,
        bins,
        keys,
        line,
    })
}

/// `bins = N` (N equal bins over the bounds) or `bins = [e0, e1, …]` (the edges).
fn parse_dp_bins(
    value: toml::Value,
    bounds: Option<(f64, f64)>,
    line: usize,
) -> Result<Vec<f64>, String> {
    use railyard_udfs::dp::histogram::{MAX_DP_BINS, edges_error, equal_width_edges};
    let edges = match value {
        toml::Value::Integer(n) => {
            let Some((lower, upper)) = bounds else {
                return Err(format!(
                    "line {line}: bins = {n} divides the bounds (lower, upper) into equal \
                     bins; declare the bounds, or the edges as bins = [e0, e1, …]"
                ));
            };
            if n < 1 || n as u64 > MAX_DP_BINS as u64 {
                return Err(format!("line {line}: bins is 1 to {MAX_DP_BINS}"));
            }
            equal_width_edges(lower, upper, n as usize)
        }
        toml::Value::Array(values) => values
            .into_iter()
            .map(|v| match v {
                toml::Value::Integer(i) => Some(i as f64),
                toml::Value::Float(f) => Some(f),
                _ => None,
            })
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| format!("line {line}: bin edges are numbers"))?,
        _ => {
            return Err(format!(
                "line {line}: bins is a number of equal bins or a list of edges"
            ));
        }
    };
    match edges_error(&edges) {
        Some(why) => Err(format!("line {line}: {why}")),
        None => Ok(edges),
    }
}

fn parse_trains(file: &TrainsFile, text: &str, source: &str) -> Result<TrainPolicy, PolicyError> {
    let error = |span: std::ops::Range<usize>, message: String| PolicyError {
        origin: source.to_string(),
        message: format!("line {}: {message}", line_of(text, span.start)),
    };
    let mut trains = TrainPolicy::default();
    for id in &file.allowed {
        if !is_image_id(id.get_ref()) {
            return Err(error(
                id.span(),
                "trains.allowed lists image ids: 'sha256:' and 64 hex digits, as \
                 `docker image inspect --format '{{.Id}}' IMAGE` prints them"
                    .to_string(),
            ));
        }
        trains.allowed.push(id.get_ref().clone());
    }
    let at_least = |v: &Option<Spanned<u64>>, name: &str, min: u64, default: u64| match v {
        Some(v) if *v.get_ref() < min => Err(error(
            v.span(),
            format!("trains.{name} must be at least {min}"),
        )),
        // Large enough for any machine, small enough for every conversion downstream.
        Some(v) if *v.get_ref() > 1 << 40 => {
            Err(error(v.span(), format!("trains.{name} is too large")))
        }
        Some(v) => Ok(*v.get_ref()),
        None => Ok(default),
    };
    trains.max_output_rows = at_least(
        &file.max_output_rows,
        "max_output_rows",
        1,
        trains.max_output_rows,
    )?;
    trains.max_output_bytes = at_least(
        &file.max_output_bytes,
        "max_output_bytes",
        1,
        trains.max_output_bytes,
    )?;
    trains.timeout_seconds = at_least(
        &file.timeout_seconds,
        "timeout_seconds",
        1,
        trains.timeout_seconds,
    )?;
    // Docker refuses memory limits below 6 MB.
    trains.memory_mb = at_least(&file.memory_mb, "memory_mb", 6, trains.memory_mb)?;
    trains.pids = at_least(&file.pids, "pids", 1, trains.pids)?;
    trains.max_concurrent = at_least(
        &file.max_concurrent,
        "max_concurrent",
        1,
        trains.max_concurrent,
    )?;
    if let Some(cpus) = &file.cpus {
        let c = *cpus.get_ref();
        if !(c.is_finite() && (0.01..=4096.0).contains(&c)) {
            return Err(error(
                cpus.span(),
                "trains.cpus must be a number of cores ≥ 0.01".to_string(),
            ));
        }
        trains.cpus = c;
    }
    Ok(trains)
}
