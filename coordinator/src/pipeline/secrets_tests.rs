//! `secrets:` on jobs and `resources:` on steps.

use super::{parse, parse_with_secrets, Resources};

const SRC: &str = "jobs:\n  deploy:\n    secrets: [DEPLOY_KEY, TOKEN]\n    steps:\n      - image: x\n        commands: [echo]\n        resources: { cpus: 0.5, memory: 256Mi }\n";

#[test]
fn secrets_are_read_and_checked_against_the_known_ones() {
    let p = parse(SRC).unwrap();
    assert_eq!(p.jobs[0].secrets, vec!["DEPLOY_KEY", "TOKEN"]);
    let errs = parse_with_secrets(SRC, &|n| n == "TOKEN").unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!((errs[0].line, errs[0].column), (3, 15));
    assert!(
        errs[0].message.contains("unknown secret \"DEPLOY_KEY\""),
        "{errs:?}"
    );
    assert!(parse_with_secrets(SRC, &|_| true).is_ok());
    // A single name is a list of one; bad and duplicate names are refused where they stand.
    let one = SRC.replace("[DEPLOY_KEY, TOKEN]", "TOKEN");
    assert_eq!(parse(&one).unwrap().jobs[0].secrets, vec!["TOKEN"]);
    for (bad, why) in [
        ("[1X]", "invalid secret name"),
        ("[A-B]", "invalid secret name"),
        ("[A, A]", "twice"),
    ] {
        let src = SRC.replace("[DEPLOY_KEY, TOKEN]", bad);
        let errs = parse(&src).unwrap_err();
        assert!(
            errs.iter().any(|e| e.message.contains(why) && e.line == 3),
            "{bad}: {errs:?}"
        );
    }
}

#[test]
fn resources_are_parsed_and_bounded() {
    let p = parse(SRC).unwrap();
    assert_eq!(
        p.jobs[0].steps[0].resources,
        Resources {
            nano_cpus: Some(500_000_000),
            memory_bytes: Some(256 << 20)
        }
    );
    for (res, cpus, mem) in [
        ("{ cpus: 2 }", Some(2_000_000_000), None),
        ("{ memory: 1Gi }", None, Some(1u64 << 30)),
        ("{ memory: 512M }", None, Some(512_000_000)),
        ("{ memory: 10485760 }", None, Some(10_485_760)),
        (
            "{ memory: 64MiB, cpus: \"0.25\" }",
            Some(250_000_000),
            Some(64 << 20),
        ),
    ] {
        let src = SRC.replace("{ cpus: 0.5, memory: 256Mi }", res);
        let r = parse(&src).unwrap_or_else(|e| panic!("{res}: {e:?}")).jobs[0].steps[0].resources;
        assert_eq!((r.nano_cpus, r.memory_bytes), (cpus, mem), "{res}");
    }
    for (res, why) in [
        ("{ cpus: 0 }", "invalid cpus"),
        ("{ cpus: -1 }", "invalid cpus"),
        ("{ cpus: lots }", "invalid cpus"),
        ("{ cpus: 5000 }", "invalid cpus"),
        ("{ memory: 1Mi }", "at least 6Mi"),
        ("{ memory: 12Xi }", "invalid memory"),
        ("{ memory: [1] }", "invalid memory"),
        ("{ disk: 1 }", "disk"),
        ("12", "resources"),
    ] {
        let src = SRC.replace("{ cpus: 0.5, memory: 256Mi }", res);
        let errs = parse(&src).unwrap_err();
        assert!(
            errs.iter().any(|e| e.message.contains(why) && e.line == 7),
            "{res}: {errs:?}"
        );
    }
}
