//! `cache:` on jobs.

use super::{parse, CacheSpec};

fn job_with(cache: &str) -> String {
    format!("jobs:\n  build:\n    steps:\n      - image: x\n        commands: [echo]\n    cache:\n{cache}")
}

/// The errors of a file as (line, column, message).
fn errors(src: &str) -> Vec<(u32, u32, String)> {
    parse(src)
        .unwrap_err()
        .into_iter()
        .map(|e| (e.line, e.column, e.message))
        .collect()
}

#[test]
fn cache_is_read() {
    let p = parse(&job_with(
        "      key: cargo-{{ hashFiles \"Cargo.lock\" }}\n      restore-keys: [cargo-]\n      paths: [target, .cargo/registry]\n      scope: shared\n",
    ))
    .unwrap();
    assert_eq!(
        p.jobs[0].cache,
        Some(CacheSpec {
            key: "cargo-{{ hashFiles \"Cargo.lock\" }}".into(),
            restore_keys: vec!["cargo-".into()],
            paths: vec!["target".into(), ".cargo/registry".into()],
            scope: Some("shared".into()),
        })
    );
    // A single path and a single restore key may be written without a list.
    let p = parse(&job_with(
        "      key: k\n      restore-keys: k-\n      paths: out\n",
    ))
    .unwrap();
    let cache = p.jobs[0].cache.clone().unwrap();
    assert_eq!(
        (cache.restore_keys, cache.paths, cache.scope),
        (vec!["k-".to_string()], vec!["out".to_string()], None)
    );
    // No cache: none.
    let p = parse("jobs:\n  j:\n    steps:\n      - image: x\n        commands: [echo]\n").unwrap();
    assert_eq!(p.jobs[0].cache, None);
}

#[test]
fn template_errors_point_at_the_key() {
    let errs = errors(&job_with(
        "      key: cargo-{{ hashFiles \"Cargo.lock\"\n      paths: [target]\n",
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    let (line, column, message) = &errs[0];
    assert_eq!((*line, *column), (7, 12));
    assert!(message.contains("never closed"), "{message}");
    assert!(
        message.contains("\"key\" of \"cache\" of job \"build\""),
        "{message}"
    );

    let errs = errors(&job_with(
        "      key: k\n      restore-keys: [ok-, \"{{ sha \\\"x\\\" }}\"]\n      paths: [target]\n",
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!((errs[0].0, errs[0].1), (8, 27));
    assert!(
        errs[0].2.contains("unknown function \"sha\""),
        "{}",
        errs[0].2
    );
}

#[test]
fn missing_and_unknown_fields_are_reported() {
    let errs = errors(&job_with("      paths: [target]\n      keys: x\n"));
    let messages: Vec<&str> = errs.iter().map(|e| e.2.as_str()).collect();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        messages.iter().any(|m| m.contains("has no \"key\"")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("unknown key \"keys\"") && m.contains("did you mean \"key\"")),
        "{messages:?}"
    );
    let errs = errors(&job_with("      key: k\n"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].2.contains("has no \"paths\""), "{errs:?}");
    let errs = errors(&job_with("      key: k\n      paths: []\n"));
    assert!(errs[0].2.contains("is empty"), "{errs:?}");
    let errs =
        errors("jobs:\n  j:\n    steps:\n      - image: x\n        commands: [echo]\n    cache:\n");
    assert!(
        errs[0].2.contains("\"cache\" of job \"j\" is empty"),
        "{errs:?}"
    );
    let errs = errors(&job_with(
        "      key: k\n      paths: [a]\n      scope: \"a b\"\n",
    ));
    assert!(errs[0].2.contains("invalid cache scope"), "{errs:?}");
}

#[test]
fn paths_must_stay_in_the_workspace() {
    for (path, needle) in [
        ("/etc", "is absolute"),
        ("../up", "leaves the workspace"),
        ("a/../../up", "leaves the workspace"),
        ("\"*.o\"", "is a glob"),
        ("\".\"", "whole workspace"),
        ("\"\"", "empty cache path"),
    ] {
        let errs = errors(&job_with(&format!(
            "      key: k\n      paths: [ok, {path}]\n"
        )));
        assert_eq!(errs.len(), 1, "{path}: {errs:?}");
        assert_eq!((errs[0].0, errs[0].1), (8, 19), "{path}: {errs:?}");
        assert!(errs[0].2.contains(needle), "{path}: {errs:?}");
    }
}
