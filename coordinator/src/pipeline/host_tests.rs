//! `privileged:` and `volumes:` on steps.

use proptest::prelude::*;

use super::parse::parse_volume;
use super::{parse, Volume};

fn step_with(extra: &str) -> String {
    format!("jobs:\n  j:\n    steps:\n      - image: x\n        commands: [echo]\n{extra}")
}

#[test]
fn privileged_and_volumes_are_read() {
    let p = parse(&step_with(
        "        privileged: true\n        volumes: [\"/srv/cache:/cache\", \"/etc/ssl:/ssl:ro\"]\n",
    ))
    .unwrap();
    let host = &p.jobs[0].steps[0].host;
    assert!(host.privileged);
    assert_eq!(
        host.volumes,
        vec![
            Volume {
                host: "/srv/cache".into(),
                container: "/cache".into(),
                read_only: false
            },
            Volume {
                host: "/etc/ssl".into(),
                container: "/ssl".into(),
                read_only: true
            },
        ]
    );
    let needs = p.jobs[0].host_needs();
    assert!(needs.privileged);
    assert_eq!(needs.host_paths, vec!["/srv/cache", "/etc/ssl"]);
    // Nothing asked: nothing needed.
    let plain = parse(&step_with("")).unwrap();
    assert!(plain.jobs[0].host_needs().is_empty());
}

#[test]
fn bad_values_are_refused_where_they_stand() {
    for (extra, line, fragment) in [
        (
            "        privileged: yes please\n",
            6,
            "must be true or false",
        ),
        ("        volumes: [\"cache:/cache\"]\n", 6, "not absolute"),
        ("        volumes: [\"/a:b\"]\n", 6, "not absolute"),
        ("        volumes: [\"/a/../etc:/b\"]\n", 6, "\"..\""),
        ("        volumes: [\"/a:/b:rx\"]\n", 6, "neither ro nor rw"),
        ("        volumes: [\"/a\"]\n", 6, "two paths"),
        ("        volumes: [\"/a:/workspace\"]\n", 6, "workspace"),
        ("        volumes: [\"/a:/\"]\n", 6, "workspace"),
        ("        volumes: [\"/a:/b\", \"/c:/b/\"]\n", 6, "twice"),
        ("        volumes: [\"/a:/b\", \"/c:/b\"]\n", 6, "twice"),
    ] {
        let errs = parse(&step_with(extra)).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.line == line && e.message.contains(fragment)),
            "{extra}: {errs:?}"
        );
    }
}

proptest! {
    /// Any text: a volume or a clear error, and an accepted volume has absolute paths without `..`
    /// that do not cover the workspace.
    #[test]
    fn parse_volume_never_accepts_an_unsafe_mount(text in "[/a-z.:]{0,24}") {
        if let Ok(v) = parse_volume(&text) {
            prop_assert!(v.host.starts_with('/') && v.container.starts_with('/'));
            prop_assert!(!v.host.split('/').any(|c| c == ".."));
            prop_assert!(!v.container.split('/').any(|c| c == ".."));
            prop_assert!(v.container.trim_end_matches('/') != "/workspace");
            prop_assert!(!v.container.trim_end_matches('/').is_empty());
        }
    }
}
