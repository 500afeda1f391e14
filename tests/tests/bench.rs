//! The benchmark, run on a tiny dataset so that it cannot rot: every
//! scenario `make bench` offers runs to its end and reports its figures.
//! (It asserts nothing about timings: the bench is not a test of speed.)

use std::process::Command;

#[test]
fn every_benchmark_scenario_runs_on_a_tiny_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    // More changes than rows: the stream table is seeded beyond the
    // dataset (`make bench SCENARIO=apply-1 ROWS=100000` once failed so).
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "--scenario",
            "all",
            "--rows",
            "1000",
            "--changes",
            "1500",
            "--lag-seconds",
            "2",
            "--rate",
            "100",
            "--pairs",
            "1",
            "--bulk-mb",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run the bench");
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let figures = results["figures"].as_array().expect("figures");
    for scenario in [
        "copy",
        "apply-1",
        "apply-100",
        "lag",
        "memory",
        "switch",
        "kafka",
        "verify, equal",
        "verify, 0.1% changed",
    ] {
        assert!(
            figures.iter().any(|f| f["scenario"] == scenario),
            "no figure of {scenario}:\n{said}"
        );
    }
}

#[test]
fn arguments_no_scenario_can_run_with_are_refused_by_name() {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--scenario", "apply-1", "--rows", "10"])
        .output()
        .expect("run the bench");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--rows 10: it must be at least 100"),
        "{stderr}"
    );
}
