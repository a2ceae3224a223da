//! Every metric the server and the consumers record has help text: Prometheus' own lint
//! (`promtool check metrics`, run by the observability tests) refuses a metric without one, but
//! only for the metrics a test happens to make appear (a PostgreSQL-only counter went unseen).
//! This reads the sources: each `metrics::counter!` / `gauge!` / `histogram!` name must have a
//! `describe_*!` with the same name somewhere in the workspace.

use std::{collections::BTreeSet, path::Path};

fn sources(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            out.push(std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The first string literal after each occurrence of `macro` (which may start a new line).
fn names_after(text: &str, macro_name: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(macro_name) {
        let rest = text[at + macro_name.len()..].trim_start();
        if let Some(rest) = rest.strip_prefix('"') {
            if let Some(end) = rest.find('"') {
                names.insert(rest[..end].to_string());
            }
        }
    }
    names
}

#[test]
fn every_recorded_metric_has_help_text() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut texts = Vec::new();
    for dir in ["broker/src", "kafka/src", "consumers"] {
        sources(&root.join(dir), &mut texts);
    }
    let text = texts.join("\n");
    let mut recorded = BTreeSet::new();
    let mut described = BTreeSet::new();
    for kind in ["counter", "gauge", "histogram"] {
        recorded.extend(names_after(&text, &format!("metrics::{kind}!(")));
        described.extend(names_after(&text, &format!("describe_{kind}!(")));
    }
    assert!(recorded.len() > 20, "found only {recorded:?}: the scan is broken");
    let missing: Vec<_> = recorded.difference(&described).collect();
    assert!(missing.is_empty(), "recorded without help text (add a describe_*! where the others are): {missing:?}");
}
