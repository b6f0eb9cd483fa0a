use super::*;

#[test]
fn no_file_means_aggregate_only_with_k_5() {
    let p = Policy::default();
    assert_eq!(p.visibility("lung", "age"), Visibility::Aggregate);
    assert_eq!(p.min_group_size("lung"), 5);
}

#[test]
fn the_issue_example_parses() {
    let p = Policy::parse(
        "min_group_size = 5\n[tables.lung]\nmin_group_size = 10\n[tables.lung.columns]\n\
         time = \"public\"\npatient_id = \"hidden\"\n",
        "test",
    )
    .unwrap();
    assert_eq!(p.min_group_size("lung"), 10);
    assert_eq!(p.min_group_size("other"), 5);
    assert_eq!(p.visibility("lung", "time"), Visibility::Public);
    assert_eq!(p.visibility("lung", "patient_id"), Visibility::Hidden);
    assert_eq!(p.visibility("lung", "age"), Visibility::Aggregate);
}

#[test]
fn unknown_keys_and_bad_values_name_their_line() {
    let err = Policy::parse("min_group_size = 5\nmin_grup_size = 3\n", "p.toml").unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    assert!(err.to_string().contains("min_grup_size"), "{err}");

    let err = Policy::parse(
        "[tables.lung.columns]\nage = \"aggregate\"\ntime = \"publik\"\n",
        "p.toml",
    )
    .unwrap_err();
    assert!(err.to_string().contains("line 3"), "{err}");
    assert!(err.to_string().contains("publik"), "{err}");

    let err = Policy::parse("\n\nmin_group_size = 0\n", "p.toml").unwrap_err();
    assert!(err.to_string().contains("line 3"), "{err}");

    let err = Policy::parse("[tables.lung]\nminimum = 3\n", "p.toml").unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn a_misspelt_column_is_refused_with_its_line() {
    let p = Policy::parse("[tables.lung.columns]\npatinet_id = \"hidden\"\n", "p.toml").unwrap();
    let schema = Schema::new(vec![arrow::datatypes::Field::new(
        "patient_id",
        arrow::datatypes::DataType::Int64,
        false,
    )]);
    let err = p.validate_table("lung", &schema).unwrap_err().to_string();
    assert!(
        err.contains("line 2") && err.contains("patinet_id"),
        "{err}"
    );
    assert!(p.validate_table("other", &schema).is_ok());
}

#[test]
fn model_and_survival_settings_default_validate_and_override_per_table() {
    let p = Policy::default();
    assert_eq!(p.model_min_rows("lung"), DEFAULT_MODEL_MIN_ROWS);
    assert_eq!(p.survival_time_resolution("lung"), 7.0);
    let p = Policy::parse(
        "model_min_rows = 20\nsurvival_time_resolution = 30.5\n\
         [tables.lung]\nsurvival_time_resolution = 0\n",
        "p.toml",
    )
    .unwrap();
    assert_eq!(p.model_min_rows("lung"), 20);
    assert_eq!(p.survival_time_resolution("lung"), 0.0);
    assert_eq!(p.survival_time_resolution("other"), 30.5);
    for (text, line) in [
        ("model_min_rows = 0", 1),
        ("\nsurvival_time_resolution = -1.0", 2),
        ("[tables.t]\nsurvival_time_resolution = nan", 2),
    ] {
        let err = Policy::parse(text, "p.toml").unwrap_err().to_string();
        assert!(err.contains(&format!("line {line}")), "{text}: {err}");
    }
}

#[test]
fn trains_are_off_by_default_and_their_limits_validate() {
    let p = Policy::default();
    assert!(p.trains.allowed.is_empty());
    assert_eq!(p.trains.max_output_rows, 100);
    let id = format!("sha256:{}", "ab".repeat(32));
    let p = Policy::parse(
        &format!("[trains]\nallowed = [\"{id}\"]\nmax_output_rows = 7\ncpus = 0.5\n"),
        "p.toml",
    )
    .unwrap();
    assert!(p.allows_train(&id));
    assert!(!p.allows_train(&format!("sha256:{}", "cd".repeat(32))));
    assert_eq!(p.trains.max_output_rows, 7);
    assert_eq!(p.trains.cpus, 0.5);
    assert_eq!(p.trains.timeout_seconds, DEFAULT_TRAIN_TIMEOUT_SECONDS);
    for (text, line, what) in [
        (
            "[trains]\nallowed = [\"railyard/histogram:dev\"]",
            2,
            "sha256:",
        ),
        ("[trains]\n\nmax_output_rows = 0", 3, "max_output_rows"),
        ("[trains]\nmemory_mb = 1", 2, "memory_mb"),
        ("[trains]\nmemory_mb = 9223372036854775807", 2, "memory_mb"),
        ("[trains]\nmax_concurrent = 0", 2, "max_concurrent"),
        ("[trains]\ncpus = 0.0", 2, "cpus"),
        ("[trains]\nnetwork = true", 2, "network"),
    ] {
        let err = Policy::parse(text, "p.toml").unwrap_err().to_string();
        assert!(
            err.contains(&format!("line {line}")) && err.contains(what),
            "{text}: {err}"
        );
    }
}

#[test]
fn dp_is_off_by_default_and_its_settings_validate() {
    assert!(Policy::default().dp.is_none());
    let p = Policy::parse(
        "[dp]\nbudget = 3.0\n[tables.lung.dp]\nage = { lower = 0, upper = 120 }\n\
         sex = { keys = [1, 2] }\nsite = { keys = [\"a\", \"b\"] }\n",
        "p.toml",
    )
    .unwrap();
    let dp = p.dp.clone().unwrap();
    assert_eq!(
        (dp.budget, dp.max_epsilon, dp.epsilon),
        (3.0, DEFAULT_DP_MAX_EPSILON, DEFAULT_DP_EPSILON)
    );
    assert_eq!(
        p.dp_column("lung", "age").unwrap().bounds,
        Some((0.0, 120.0))
    );
    assert_eq!(
        p.dp_column("lung", "sex").unwrap().keys,
        Some(vec![DpKey::Int(1), DpKey::Int(2)])
    );
    use arrow::datatypes::{DataType, Field};
    let schema = Schema::new(vec![
        Field::new("age", DataType::Int64, true),
        Field::new("sex", DataType::Int32, true),
        Field::new("site", DataType::Utf8, true),
    ]);
    assert!(p.validate_table("lung", &schema).is_ok());
    let wrong_type = Schema::new(vec![
        Field::new("age", DataType::Int64, true),
        Field::new("sex", DataType::Utf8, true),
        Field::new("site", DataType::Int64, true),
    ]);
    let err = p
        .validate_table("lung", &wrong_type)
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 6") && err.contains("site"), "{err}");
    // 1 and 1.0 are one value of an integer column.
    let p = Policy::parse("[dp]\n[tables.t.dp]\nx = { keys = [1, 1.0] }\n", "p.toml").unwrap();
    let int = Schema::new(vec![Field::new("x", DataType::Int64, true)]);
    let err = p.validate_table("t", &int).unwrap_err().to_string();
    assert!(
        err.contains("line 3") && err.contains("same value"),
        "{err}"
    );
    for (text, line, what) in [
        ("[dp]\nbudget = 0", 2, "dp.budget"),
        ("[dp]\nepsilon = 2.0", 2, "dp.epsilon"),
        ("[dp]\nbudget = 0.5", 2, "dp.max_epsilon"),
        ("[dp]\ndelta = 1e-6", 2, "delta"),
        (
            "[tables.t.dp]\nx = { lower = 5, upper = 1 }",
            2,
            "lower < upper",
        ),
        ("[tables.t.dp]\nx = { lower = 5 }", 2, "both"),
        ("[tables.t.dp]\n\nx = { keys = [] }", 3, "keys"),
        ("[tables.t.dp]\nx = { keys = [1, 1] }", 2, "twice"),
        ("[tables.t.dp]\nx = {}", 2, "needs bounds"),
        ("[tables.t.dp]\nx = { bins = 4 }", 2, "declare the bounds"),
        (
            "[tables.t.dp]\nx = { lower = 0, upper = 1, bins = 0 }",
            2,
            "bins is 1 to",
        ),
        (
            "[tables.t.dp]\nx = { lower = 0, upper = 1, bins = 1001 }",
            2,
            "bins is 1 to",
        ),
        ("[tables.t.dp]\nx = { bins = [1, 1, 2] }", 2, "increasing"),
        ("[tables.t.dp]\nx = { bins = [3] }", 2, "edges"),
        ("[tables.t.dp]\nx = { bins = [1, \"a\"] }", 2, "numbers"),
        ("[tables.t.dp]\nx = { bins = 1.5 }", 2, "list of edges"),
    ] {
        let err = Policy::parse(text, "p.toml").unwrap_err().to_string();
        assert!(
            err.contains(&format!("line {line}")) && err.contains(what),
            "{text}: {err}"
        );
    }
}

#[test]
fn dp_bins_are_equal_over_the_bounds_or_the_edges_given() {
    let p = Policy::parse(
        "[dp]\n[tables.t.dp]\nx = { lower = 0, upper = 120, bins = 4 }\n\
         y = { bins = [0, 30, 365.25] }\nz = { lower = -1, upper = 1 }\nk = { keys = [1] }\n",
        "p.toml",
    )
    .unwrap();
    assert_eq!(
        p.dp_quantile_edges("t", "x"),
        Some(vec![0.0, 30.0, 60.0, 90.0, 120.0])
    );
    assert_eq!(p.dp_quantile_edges("t", "y"), Some(vec![0.0, 30.0, 365.25]));
    let z = p.dp_quantile_edges("t", "z").unwrap();
    assert_eq!(z.len(), DEFAULT_DP_BINS + 1);
    assert_eq!((z[0], z[DEFAULT_DP_BINS]), (-1.0, 1.0));
    assert_eq!(p.dp_quantile_edges("t", "k"), None);
    assert_eq!(p.dp_quantile_edges("t", "nothing"), None);
    // Bins need a numeric column.
    use arrow::datatypes::{DataType, Field};
    let p = Policy::parse("[dp]\n[tables.t.dp]\nx = { bins = [0, 1] }\n", "p.toml").unwrap();
    let text = Schema::new(vec![Field::new("x", DataType::Utf8, true)]);
    let err = p.validate_table("t", &text).unwrap_err().to_string();
    assert!(err.contains("not numeric"), "{err}");
}

#[test]
fn dp_keys_convert_only_to_values_of_the_column_type() {
    use arrow::datatypes::DataType;
    use datafusion::common::ScalarValue;
    assert_eq!(
        DpKey::Int(2).to_scalar(&DataType::Int32),
        Some(ScalarValue::Int32(Some(2)))
    );
    assert_eq!(DpKey::Int(300).to_scalar(&DataType::Int8), None);
    assert_eq!(DpKey::Float(1.5).to_scalar(&DataType::Int64), None);
    assert_eq!(DpKey::Text("x".into()).to_scalar(&DataType::Int64), None);
    assert_eq!(
        DpKey::Int(2).to_scalar(&DataType::Float64),
        Some(ScalarValue::Float64(Some(2.0)))
    );
}

#[test]
fn table_defaults_sit_between_columns_and_the_file_default() {
    let p = Policy::parse(
        "default_visibility = \"hidden\"\n[tables.t]\ndefault_visibility = \"public\"\n\
         [tables.t.columns]\nx = \"aggregate\"\n",
        "p.toml",
    )
    .unwrap();
    assert_eq!(p.visibility("t", "x"), Visibility::Aggregate);
    assert_eq!(p.visibility("t", "y"), Visibility::Public);
    assert_eq!(p.visibility("u", "y"), Visibility::Hidden);
}
