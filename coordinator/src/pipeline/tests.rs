//! Tests of the pipeline parser: the model it builds, every rejection with its position, the JSON Schema
//! kept in step with it, and properties over arbitrary input.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::parse::{parse_duration, JOB_KEYS, STEP_KEYS, TOP_KEYS};
use super::{parse, CacheSpec, JobSpec, Pipeline, PipelineError, PullPolicy, StepSpec};

const REFERENCE: &str = include_str!("../../../examples/reference.yml");
const DEMO: &str = include_str!("../../../examples/demo.yml");
const SCHEMA: &str = include_str!("../../../schema/pipeline.schema.json");

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn errors(src: &str) -> Vec<PipelineError> {
    match parse(src) {
        Ok(p) => panic!("expected errors, parsed {p:?}"),
        Err(errors) => errors,
    }
}

/// Exactly one error, at this line and column, whose message contains every fragment.
#[track_caller]
fn assert_one_error(src: &str, line: u32, column: u32, fragments: &[&str]) {
    let errors = errors(src);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    let err = &errors[0];
    assert_eq!(
        (err.line, err.column),
        (line, column),
        "wrong position for {:?}",
        err.message
    );
    for fragment in fragments {
        assert!(
            err.message.contains(fragment),
            "message {:?} lacks {fragment:?}",
            err.message
        );
    }
}

/// A valid one-job pipeline with `extra` spliced into its (only) step, at 6 spaces of indent.
fn with_step_lines(extra: &str) -> String {
    format!(
        "jobs:\n  build:\n    steps:\n      - image: drover-busybox:latest\n        commands: [echo hi]\n{extra}"
    )
}

#[test]
fn reference_example_parses_to_the_expected_model() {
    let expected = Pipeline {
        jobs: vec![
            JobSpec {
                name: "build".into(),
                needs: vec![],
                agents: map(&[("os", "linux")]),
                env: map(&[("GREETING", "hello"), ("LEVEL", "2"), ("VERSION", "1.10")]),
                steps: vec![
                    StepSpec {
                        name: "compile".into(),
                        image: "drover-busybox:latest".into(),
                        commands: strings(&[
                            "mkdir -p dist/reports",
                            "echo \"$GREETING v$VERSION level $LEVEL\" > dist/app.txt",
                            "seq 1 3 > dist/reports/numbers.txt",
                        ]),
                        env: BTreeMap::new(),
                        workdir: None,
                        timeout_secs: None,
                        pull: PullPolicy::IfNotPresent,
                        resources: Default::default(),
                        host: Default::default(),
                    },
                    StepSpec {
                        name: "step-2".into(),
                        image: "drover-busybox:latest".into(),
                        commands: strings(&["sha256sum app.txt > app.txt.sha256"]),
                        env: map(&[("MODE", "release")]),
                        workdir: Some("dist".into()),
                        timeout_secs: Some(90),
                        pull: PullPolicy::IfNotPresent,
                        resources: Default::default(),
                        host: Default::default(),
                    },
                ],
                artifacts: strings(&["dist/app.txt", "dist/app.txt.sha256", "dist/reports/*.txt"]),
                timeout_secs: Some(600),
                secrets: Vec::new(),
                cache: Some(CacheSpec {
                    key: "reference-{{ hashFiles \"**/*.lock\" }}-{{ os }}-{{ arch }}".into(),
                    restore_keys: strings(&["reference-"]),
                    paths: strings(&[".cache/reference"]),
                    scope: Some("reference".into()),
                }),
            },
            JobSpec {
                name: "test".into(),
                needs: strings(&["build"]),
                agents: map(&[("os", "linux")]),
                env: map(&[("GREETING", "hello"), ("LEVEL", "1")]),
                steps: vec![StepSpec {
                    name: "verify".into(),
                    image: "drover-busybox:latest".into(),
                    commands: strings(&[
                        "cat dist/app.txt",
                        "(cd dist && sha256sum -c app.txt.sha256)",
                        "test \"$(head -n 1 dist/reports/numbers.txt)\" = 1",
                    ]),
                    env: BTreeMap::new(),
                    workdir: None,
                    timeout_secs: Some(60),
                    pull: PullPolicy::Never,
                    resources: Default::default(),
                    host: Default::default(),
                }],
                artifacts: vec![],
                timeout_secs: Some(5400),
                secrets: Vec::new(),
                cache: None,
            },
        ],
    };
    assert_eq!(parse(REFERENCE), Ok(expected));
}

#[test]
fn demo_pipeline_is_valid() {
    let pipeline = parse(DEMO).unwrap_or_else(|e| panic!("demo.yml: {e:#?}"));
    let names: Vec<&str> = pipeline.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["build", "test"]);
    assert_eq!(pipeline.jobs[1].needs, ["build"]);
    assert!(pipeline.jobs[0]
        .artifacts
        .iter()
        .any(|a| a.starts_with("dist")));
    for step in pipeline.jobs.iter().flat_map(|j| &j.steps) {
        assert_eq!(step.image, "drover-busybox:latest");
    }
}

#[test]
fn jobs_keep_file_order_and_scalars_are_stringified() {
    let src = "jobs:\n  zeta:\n    agents: { gpu: true, cores: 8, os: linux }\n    env: { ON: yes, PI: 3.140, HEX: 0x1F }\n    steps: [{ image: x, commands: [true, 42] }]\n  alpha:\n    steps: [{ image: x, commands: echo }]\n";
    let p = parse(src).unwrap();
    assert_eq!(p.jobs[0].name, "zeta");
    assert_eq!(p.jobs[1].name, "alpha");
    assert_eq!(
        p.jobs[0].agents,
        map(&[("gpu", "true"), ("cores", "8"), ("os", "linux")])
    );
    assert_eq!(
        p.jobs[0].env,
        map(&[("ON", "yes"), ("PI", "3.140"), ("HEX", "0x1F")])
    );
    assert_eq!(p.jobs[0].steps[0].commands, ["true", "42"]);
    assert_eq!(p.jobs[1].steps[0].commands, ["echo"]);
}

#[test]
fn pipeline_env_merges_under_job_env() {
    let src = "env: { A: global, B: global }\njobs:\n  j:\n    env: { B: job, C: job }\n    steps: [{ image: x, commands: echo }]\n";
    let p = parse(src).unwrap();
    assert_eq!(
        p.jobs[0].env,
        map(&[("A", "global"), ("B", "job"), ("C", "job")])
    );
}

#[test]
fn anchors_and_merge_keys_work() {
    let src = "x-step: &step { image: drover-busybox:latest, commands: echo }\njobs:\n  j:\n    steps: [*step]\n";
    // `x-step` is not a pipeline key: anchors must live inside known keys.
    assert_one_error(
        src,
        1,
        1,
        &["unknown key \"x-step\"", "expected one of env, jobs"],
    );
    let src = "jobs:\n  a:\n    steps:\n      - &s { image: drover-busybox:latest, commands: echo }\n  b:\n    steps:\n      - <<: *s\n        name: other\n";
    let p = parse(src).unwrap();
    assert_eq!(p.jobs[1].steps[0].image, "drover-busybox:latest");
    assert_eq!(p.jobs[1].steps[0].name, "other");
}

#[test]
fn yaml_syntax_error_has_the_library_position() {
    assert_one_error(
        "jobs:\n  build: [1, 2\n",
        2,
        10,
        &["invalid YAML", "unclosed bracket"],
    );
    assert_one_error(
        "jobs:\n  a: 1\n  a: 2\n",
        3,
        3,
        &["invalid YAML", "duplicate"],
    );
}

#[test]
fn unknown_keys_at_every_level() {
    assert_one_error(
        &with_step_lines("        imag: x\n"),
        6,
        9,
        &[
            "unknown key \"imag\" in step",
            "expected one of name, image, commands, env, workdir, timeout, pull",
            "did you mean \"image\"",
        ],
    );
    assert_one_error(
        "jobs:\n  build:\n    step: []\n    steps: [{ image: x, commands: echo }]\n",
        3,
        5,
        &[
            "unknown key \"step\" in job",
            "expected one of needs, agents, env, timeout, steps, artifacts",
        ],
    );
    assert_one_error(
        "job: {}\njobs:\n  a:\n    steps: [{ image: x, commands: echo }]\n",
        1,
        1,
        &[
            "unknown key \"job\" in the pipeline",
            "expected one of env, jobs",
        ],
    );
}

#[test]
fn wrong_types_are_named() {
    assert_one_error(
        "- a\n- b\n",
        1,
        1,
        &["expected a mapping for the pipeline", "found a list"],
    );
    assert_one_error(
        "jobs: [a, b]\n",
        1,
        7,
        &["\"jobs\" must be a mapping", "found a list"],
    );
    assert_one_error(
        "jobs:\n  a:\n    env: [A, B]\n    steps: [{ image: x, commands: echo }]\n",
        3,
        10,
        &[
            "expected a mapping for \"env\" of job \"a\"",
            "found a list",
        ],
    );
    assert_one_error(
        "jobs:\n  a:\n    steps: { image: x }\n",
        3,
        12,
        &["\"steps\" of job \"a\" must be a list", "found a mapping"],
    );
    assert_one_error(
        &with_step_lines("        commands: { a: b }\n")
            .replace("        commands: [echo hi]\n", ""),
        5,
        19,
        &[
            "expected a list of strings for \"commands\"",
            "found a mapping",
        ],
    );
    assert_one_error(
        "jobs:\n  a:\n    agents: { os: [linux] }\n    steps: [{ image: x, commands: echo }]\n",
        3,
        19,
        &[
            "expected a string for \"os\" in \"agents\" of job \"a\"",
            "found a list",
        ],
    );
    assert_one_error(
        "jobs:\n  a:\n    steps:\n      - just-a-string\n",
        4,
        9,
        &[
            "expected a mapping for step 1 of job \"a\"",
            "found a string",
        ],
    );
}

#[test]
fn missing_or_empty_jobs() {
    assert_one_error("", 1, 1, &["the pipeline is empty", "\"jobs\""]);
    assert_one_error("env: { A: b }\n", 1, 1, &["missing key \"jobs\""]);
    assert_one_error(
        "jobs: {}\n",
        1,
        7,
        &["\"jobs\" is empty", "at least one job"],
    );
    assert_one_error("jobs:\n", 1, 1, &["\"jobs\" is empty"]);
}

#[test]
fn job_names_are_checked() {
    assert_one_error(
        "jobs:\n  \"has space\":\n    steps: [{ image: x, commands: echo }]\n",
        2,
        3,
        &["invalid job name \"has space\"", "1 to 64 characters"],
    );
    let long = "a".repeat(65);
    assert_one_error(
        &format!("jobs:\n  {long}:\n    steps: [{{ image: x, commands: echo }}]\n"),
        2,
        3,
        &["invalid job name", "1 to 64"],
    );
    assert!(parse(&format!(
        "jobs:\n  {}:\n    steps: [{{ image: x, commands: echo }}]\n",
        "A-z_0.9".repeat(9)
    ))
    .is_ok());
    assert_one_error(
        "jobs:\n  1:\n    steps: [{ image: x, commands: echo }]\n  \"1\":\n    steps: [{ image: x, commands: echo }]\n",
        4,
        3,
        &["duplicate job name \"1\""],
    );
}

#[test]
fn jobs_need_steps_and_steps_need_image_and_commands() {
    assert_one_error("jobs:\n  a:\n", 2, 3, &["job \"a\" is empty", "\"steps\""]);
    assert_one_error(
        "jobs:\n  a:\n    timeout: 5\n",
        2,
        3,
        &["job \"a\" has no \"steps\""],
    );
    assert_one_error(
        "jobs:\n  a:\n    steps: []\n",
        3,
        12,
        &["job \"a\" has no steps"],
    );
    assert_one_error(
        "jobs:\n  a:\n    steps:\n      - name: s\n        commands: echo\n",
        4,
        9,
        &["step \"s\" of job \"a\" has no \"image\""],
    );
    assert_one_error(
        "jobs:\n  a:\n    steps:\n      - image: \"\"\n        commands: echo\n",
        4,
        16,
        &["invalid image \"\"", "expected an image reference"],
    );
    assert_one_error(
        "jobs:\n  a:\n    steps:\n      - image: x\n",
        4,
        9,
        &["step \"step-1\" of job \"a\" has no \"commands\""],
    );
    assert_one_error(
        "jobs:\n  a:\n    steps:\n      - image: x\n        commands: []\n",
        5,
        19,
        &["\"commands\" of step \"step-1\" of job \"a\" is empty"],
    );
    assert_one_error(
        "jobs:\n  a:\n    steps:\n      - image: x\n        commands: [echo, \"  \"]\n",
        5,
        26,
        &["blank command"],
    );
}

#[test]
fn step_names_are_unique_including_defaults() {
    assert_one_error(
        "jobs:\n  a:\n    steps:\n      - { name: s, image: x, commands: echo }\n      - { name: s, image: x, commands: echo }\n",
        5,
        17,
        &["duplicate step name \"s\" in job \"a\""],
    );
    // The second step defaults to "step-2", which the first one already took.
    assert_one_error(
        "jobs:\n  a:\n    steps:\n      - { name: step-2, image: x, commands: echo }\n      - { image: x, commands: echo }\n",
        5,
        9,
        &["duplicate step name \"step-2\""],
    );
    // The same name in different jobs is fine.
    assert!(parse(
        "jobs:\n  a:\n    steps: [{ name: s, image: x, commands: echo }]\n  b:\n    steps: [{ name: s, image: x, commands: echo }]\n"
    )
    .is_ok());
}

#[test]
fn needs_are_checked() {
    let base = "jobs:\n  a:\n    steps: [{ image: x, commands: echo }]\n";
    assert_one_error(
        &format!("{base}  b:\n    needs: [a, nope]\n    steps: [{{ image: x, commands: echo }}]\n"),
        5,
        16,
        &[
            "job \"b\" needs unknown job \"nope\"",
            "expected one of a, b",
        ],
    );
    assert_one_error(
        &format!("{base}  b:\n    needs: b\n    steps: [{{ image: x, commands: echo }}]\n"),
        5,
        12,
        &["job \"b\" needs itself"],
    );
    assert_one_error(
        &format!("{base}  b:\n    needs: [a, a]\n    steps: [{{ image: x, commands: echo }}]\n"),
        5,
        16,
        &["lists \"a\" in \"needs\" twice"],
    );
    assert_one_error(
        &format!(
            "{base}  b:\n    needs: [{{ a: 1 }}]\n    steps: [{{ image: x, commands: echo }}]\n"
        ),
        5,
        13,
        &[
            "expected a string for an entry of \"needs\"",
            "found a mapping",
        ],
    );
}

#[test]
fn cycles_in_needs_are_named() {
    let src = "jobs:\n  a:\n    needs: [c]\n    steps: [{ image: x, commands: echo }]\n  b:\n    needs: [a]\n    steps: [{ image: x, commands: echo }]\n  c:\n    needs: [b]\n    steps: [{ image: x, commands: echo }]\n";
    assert_one_error(src, 3, 13, &["cycle in needs: a -> c -> b -> a"]);
    let src = "jobs:\n  a:\n    needs: b\n    steps: [{ image: x, commands: echo }]\n  b:\n    needs: a\n    steps: [{ image: x, commands: echo }]\n";
    assert_one_error(src, 3, 12, &["cycle in needs: a -> b -> a"]);
    // A diamond is not a cycle.
    let src = "jobs:\n  a: { steps: [{ image: x, commands: echo }] }\n  b: { needs: a, steps: [{ image: x, commands: echo }] }\n  c: { needs: a, steps: [{ image: x, commands: echo }] }\n  d: { needs: [b, c], steps: [{ image: x, commands: echo }] }\n";
    assert!(parse(src).is_ok());
}

#[test]
fn long_needs_chain_does_not_overflow() {
    let mut src = String::from("jobs:\n");
    for i in 0..5000 {
        let needs = if i == 0 {
            "j4999".to_owned()
        } else {
            format!("j{}", i - 1)
        };
        src.push_str(&format!(
            "  j{i}: {{ needs: {needs}, steps: [{{ image: x, commands: echo }}] }}\n"
        ));
    }
    let errors = errors(&src);
    assert_eq!(errors.len(), 1, "{:?}", &errors[..errors.len().min(3)]);
    assert!(errors[0]
        .message
        .starts_with("cycle in needs: j0 -> j4999 -> j4998"));
}

#[test]
fn durations() {
    for (text, secs) in [
        ("90", 90),
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1h30m15s", 5415),
        ("2h15s", 7215),
    ] {
        assert_eq!(parse_duration(text), Some(secs), "{text}");
    }
    for text in [
        "",
        "0",
        "0s",
        "1m1h",
        "1x",
        "h",
        "1hh",
        "1h1h",
        "99999999999999999999h",
        "1.5h",
        " 1h",
        "-1",
        "1h ",
        "30 m",
    ] {
        assert_eq!(parse_duration(text), None, "{text:?}");
    }
    let p = parse(
        "jobs:\n  a:\n    timeout: 3600\n    steps: [{ image: x, commands: echo, timeout: 1m }]\n",
    )
    .unwrap();
    assert_eq!(p.jobs[0].timeout_secs, Some(3600));
    assert_eq!(p.jobs[0].steps[0].timeout_secs, Some(60));
    assert_one_error(
        &with_step_lines("        timeout: 5 minutes\n"),
        6,
        18,
        &[
            "invalid duration \"5 minutes\" for \"timeout\" of step \"step-1\"",
            "\"1h30m\"",
        ],
    );
    assert_one_error(
        &with_step_lines("        timeout: -3\n"),
        6,
        18,
        &["invalid duration \"-3\""],
    );
    assert_one_error(
        &with_step_lines("        timeout: 1.5\n"),
        6,
        18,
        &["invalid duration \"1.5\""],
    );
    assert_one_error(
        &with_step_lines("        timeout: [1]\n"),
        6,
        18,
        &["invalid duration a list"],
    );
}

#[test]
fn pull_policies() {
    for (text, policy) in [
        ("if-not-present", PullPolicy::IfNotPresent),
        ("always", PullPolicy::Always),
        ("never", PullPolicy::Never),
    ] {
        let p = parse(&with_step_lines(&format!("        pull: {text}\n"))).unwrap();
        assert_eq!(p.jobs[0].steps[0].pull, policy);
    }
    assert_one_error(
        &with_step_lines("        pull: sometimes\n"),
        6,
        15,
        &[
            "invalid pull policy \"sometimes\"",
            "expected one of if-not-present, always, never",
        ],
    );
}

#[test]
fn artifact_paths_stay_in_the_workspace() {
    let job = |artifacts: &str| {
        format!("jobs:\n  a:\n    steps: [{{ image: x, commands: echo }}]\n    artifacts: {artifacts}\n")
    };
    assert!(parse(&job(
        "[out.txt, \"dist/**/*.tar.gz\", reports/, ./x, a..b/c]"
    ))
    .is_ok());
    assert_one_error(
        &job("[/etc/passwd]"),
        4,
        17,
        &["artifact path \"/etc/passwd\" is absolute"],
    );
    assert_one_error(
        &job("[ok, ../up]"),
        4,
        21,
        &["artifact path \"../up\" leaves the workspace"],
    );
    assert_one_error(&job("[a/../../b]"), 4, 17, &["leaves the workspace"]);
    assert_one_error(&job("[\"\"]"), 4, 17, &["empty artifact path"]);
    assert_one_error(&job("[\"C:\\\\x\"]"), 4, 17, &["is absolute"]);
}

#[test]
fn workdir_is_checked() {
    let p = parse(&with_step_lines("        workdir: /tmp\n")).unwrap();
    assert_eq!(p.jobs[0].steps[0].workdir.as_deref(), Some("/tmp"));
    assert_one_error(
        &with_step_lines("        workdir: ../x\n"),
        6,
        18,
        &["leaves the workspace"],
    );
    assert_one_error(
        &with_step_lines("        workdir: \"\"\n"),
        6,
        18,
        &["empty \"workdir\""],
    );
}

#[test]
fn env_names_are_checked() {
    assert_one_error(
        "env: { GOOD_1: x, 1BAD: y }\njobs:\n  a:\n    steps: [{ image: x, commands: echo }]\n",
        1,
        19,
        &[
            "invalid environment variable name \"1BAD\"",
            "a letter or \"_\"",
        ],
    );
    assert_one_error(
        &with_step_lines("        env: { \"A-B\": x }\n"),
        6,
        16,
        &["invalid environment variable name \"A-B\" in \"env\" of step \"step-1\""],
    );
    assert_one_error(
        &with_step_lines("        env:\n          EMPTY:\n"),
        7,
        11,
        &["\"EMPTY\" in \"env\" of step \"step-1\" of job \"build\" has no value"],
    );
    let p = parse(&with_step_lines("        env: { _X: \"\", y2: 0 }\n")).unwrap();
    assert_eq!(p.jobs[0].steps[0].env, map(&[("_X", ""), ("y2", "0")]));
}

#[test]
fn all_problems_are_reported_sorted_by_line() {
    let src = "\
jobs:
  build:
    steps:
      - name: compile
        imag: busybox
        commands: []
    artifacts: [/abs]
  test:
    needs: [biuld]
    timeout: soon
    steps: [{ image: x, commands: echo, pull: maybe }]
extra: 1
";
    let errors = errors(src);
    let found: Vec<(u32, u32)> = errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(
        found,
        [
            (4, 9),
            (5, 9),
            (6, 19),
            (7, 17),
            (9, 13),
            (10, 14),
            (11, 47),
            (12, 1)
        ],
        "{errors:#?}"
    );
    assert!(errors[0].message.contains("has no \"image\""));
    assert!(errors[1].message.contains("unknown key \"imag\""));
    assert!(errors[4].message.contains("did you mean \"build\""));
    assert!(
        errors.iter().all(|e| e.message.contains("expected")),
        "{errors:#?}"
    );
}

#[test]
fn error_display_has_the_position() {
    let err = &errors("jobs: {}\n")[0];
    assert_eq!(
        err.to_string(),
        "line 1, column 7: \"jobs\" is empty; expected at least one job"
    );
}

fn schema() -> serde_json::Value {
    serde_json::from_str(SCHEMA).expect("schema/pipeline.schema.json is valid JSON")
}

fn property_names(object: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = object["properties"]
        .as_object()
        .expect("a properties object")
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

fn sorted(keys: &[&str]) -> Vec<String> {
    let mut keys = strings(keys);
    keys.sort();
    keys
}

#[test]
fn schema_matches_the_parser() {
    let schema = schema();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let job = &schema["$defs"]["job"];
    let step = &schema["$defs"]["step"];
    assert_eq!(property_names(&schema), sorted(TOP_KEYS));
    assert_eq!(property_names(job), sorted(JOB_KEYS));
    assert_eq!(property_names(step), sorted(STEP_KEYS));
    for (what, object) in [("top level", &schema), ("job", job), ("step", step)] {
        assert_eq!(
            object["additionalProperties"], false,
            "{what} must reject unknown keys"
        );
        let properties = object["properties"].as_object().unwrap();
        for (key, value) in properties {
            assert!(
                value["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{what}.{key} lacks a description"
            );
        }
    }
    assert_eq!(schema["required"], serde_json::json!(["jobs"]));
    assert_eq!(job["required"], serde_json::json!(["steps"]));
    assert_eq!(step["required"], serde_json::json!(["image", "commands"]));
    assert_eq!(
        step["properties"]["pull"]["enum"],
        serde_json::json!(["if-not-present", "always", "never"])
    );
    assert_eq!(
        schema["properties"]["jobs"]["propertyNames"]["pattern"],
        "^[A-Za-z0-9_.-]{1,64}$"
    );
    assert_eq!(
        schema["$defs"]["env"]["propertyNames"]["pattern"],
        "^[A-Za-z_][A-Za-z0-9_]*$"
    );
}

/// Valid pipelines to mutate: the examples plus a flow-style one.
fn seeds() -> Vec<&'static str> {
    vec![
        REFERENCE,
        DEMO,
        "jobs: { a: { steps: [{ image: x, commands: [echo] }] }, b: { needs: [a], steps: [{ image: y, commands: z }] } }\n",
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    Replace(usize, char),
    SwapLines(usize, usize),
}

fn apply(src: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = src.chars().collect();
    for edit in edits {
        let len = chars.len().max(1);
        match edit {
            Edit::Delete(at, n) => {
                let at = at % len;
                let end = (at + n).min(chars.len());
                if at < end {
                    chars.drain(at..end);
                }
            }
            Edit::Insert(at, text) => {
                let at = (at % len).min(chars.len());
                chars.splice(at..at, text.chars());
            }
            Edit::Replace(at, c) => {
                if !chars.is_empty() {
                    let at = at % chars.len();
                    chars[at] = *c;
                }
            }
            Edit::SwapLines(a, b) => {
                let text: String = chars.iter().collect();
                let mut lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let (a, b) = (a % lines.len(), b % lines.len());
                    lines.swap(a, b);
                }
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

fn edit() -> impl Strategy<Value = Edit> {
    // Characters that matter to YAML, so mutations reach the parser's interesting paths.
    let yamlish = prop::sample::select(vec![
        ' ', '\n', '\t', ':', '-', '[', ']', '{', '}', ',', '&', '*', '!', '#', '"', '\'', '|',
        '>', '?', '%', '@', '`', '~', '0', 'a', '.', '/', '\\', 'é',
    ]);
    let words = prop::sample::select(vec![
        "needs: [build]",
        "steps:",
        "- image: x",
        "commands: []",
        "env:",
        "<<: *a",
        "&a ",
        "*a",
        "timeout: 1h",
        "pull: never",
        "jobs:",
        "  ",
        "\n  x:\n",
        "..",
        "/",
        "~",
        "null",
    ]);
    prop_oneof![
        (any::<usize>(), 1usize..20).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), words).prop_map(|(at, w)| Edit::Insert(at, w.to_owned())),
        (any::<usize>(), "\\PC{0,8}").prop_map(|(at, s)| Edit::Insert(at, s)),
        (any::<usize>(), yamlish).prop_map(|(at, c)| Edit::Replace(at, c)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
    ]
}

/// What every parse result must satisfy, valid or not.
fn check_result(src: &str, result: &Result<Pipeline, Vec<PipelineError>>) {
    match result {
        Ok(pipeline) => {
            assert!(!pipeline.jobs.is_empty());
            for job in &pipeline.jobs {
                assert!(!job.steps.is_empty());
                for step in &job.steps {
                    assert!(!step.image.is_empty() && !step.commands.is_empty());
                }
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            let lines = src.lines().count().max(1) as u32;
            for pair in errors.windows(2) {
                assert!((pair[0].line, pair[0].column) <= (pair[1].line, pair[1].column));
            }
            for err in errors {
                assert!(!err.message.is_empty());
                // A position, when known, is inside the file (the end of the last line included).
                assert!(err.line <= lines + 1, "{err} beyond line {lines}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_text(src in "\\PC{0,300}") {
        let result = parse(&src);
        check_result(&src, &result);
    }

    #[test]
    fn never_panics_on_mutated_pipelines(
        seed in prop::sample::select(seeds()),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let src = apply(seed, &edits);
        let result = parse(&src);
        check_result(&src, &result);
    }
}
