//! The layout rules of docs/architecture.md, checked on the sources: the
//! decoder, the sinks and the store do not reach into each other, SQL is
//! quoted in one place, no file grows past about 1,000 lines without a
//! reason at its top, and nothing points outside the repository.

use std::path::{Path, PathBuf};

/// The repository's root (this crate is `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The code of a file without its comment lines.
fn code(path: &Path) -> String {
    read(path)
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn sources() -> Vec<PathBuf> {
    [
        "replication/src",
        "daemon/src",
        "conflict/src",
        "tests/src",
        "tests/tests",
    ]
    .iter()
    .flat_map(|d| rust_files(&root().join(d)))
    .collect()
}

#[test]
fn the_sinks_never_see_the_wire_and_the_decoder_never_sees_a_sink() {
    let replication = root().join("replication/src");
    for file in rust_files(&replication.join("sink")) {
        let code = code(&file);
        for forbidden in ["crate::pgoutput", "crate::stream", "crate::session"] {
            assert!(
                !code.contains(forbidden),
                "{} uses {forbidden}: a sink takes the pipeline's types (crate::change) only",
                file.display()
            );
        }
    }
    for name in ["pgoutput.rs", "change.rs", "stream.rs", "session.rs"] {
        let file = replication.join(name);
        assert!(
            !code(&file).contains("crate::sink"),
            "{} uses crate::sink: the decoder and the wire know nothing of the sinks",
            file.display()
        );
    }
    let store = root().join("daemon/src/store.rs");
    let store_code = code(&store);
    for forbidden in ["sink::", "pgoutput::", "crate::run"] {
        assert!(
            !store_code.contains(forbidden),
            "{} uses {forbidden}: the store holds plans and progress, not pipeline internals",
            store.display()
        );
    }
}

#[test]
fn sql_is_quoted_by_one_module() {
    let quoting = root().join("replication/src/sql.rs");
    for file in sources() {
        if file == quoting || file.starts_with(root().join("tests")) {
            continue;
        }
        let code = code(&file);
        for hand_made in [
            "fn quote_ident",
            "fn quote_literal",
            "replace('\"', \"\\\"\\\"\")",
        ] {
            assert!(
                !code.contains(hand_made),
                "{} quotes SQL by hand ({hand_made}): use cutover_replication::sql",
                file.display()
            );
        }
    }
}

#[test]
fn no_source_file_is_over_about_a_thousand_lines_without_a_reason() {
    for file in sources() {
        let text = read(&file);
        let lines = text.lines().count();
        if lines > 1_050 {
            let head: String = text.lines().take(15).collect::<Vec<_>>().join("\n");
            assert!(
                head.contains("Long file:"),
                "{} has {lines} lines: split it by job, or say at its top why not (\"Long file: ...\")",
                file.display()
            );
        }
    }
}

#[test]
fn nothing_refers_to_a_path_outside_the_repository() {
    let mut files = sources();
    files.extend(
        [
            "README.md",
            "Makefile",
            "docs/architecture.md",
            "docs/benchmarks.md",
        ]
        .iter()
        .map(|f| root().join(f)),
    );
    for file in files {
        // This file names what it looks for.
        if file.ends_with("tests/layout.rs") {
            continue;
        }
        let text = read(&file);
        for outside in ["../shared", "DESIGN.md"] {
            assert!(
                !text.contains(outside),
                "{} refers to {outside}: the design is docs/architecture.md",
                file.display()
            );
        }
    }
}
