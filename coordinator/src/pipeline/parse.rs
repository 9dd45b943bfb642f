//! YAML -> validated [`Pipeline`].
//!
//! One walk over the positioned YAML tree builds the model and collects every problem it meets, so a
//! user fixes a file in one round trip instead of one error at a time.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::yaml::{self, Node, ScalarKind, Value};
use super::{
    CacheSpec, HostAccess, JobSpec, Pipeline, PipelineError, PullPolicy, Resources, StepSpec,
    Volume,
};

/// Keys allowed at the top level of a pipeline file.
pub(super) const TOP_KEYS: &[&str] = &["env", "jobs"];
/// Keys allowed in a job.
pub(super) const JOB_KEYS: &[&str] = &[
    "needs",
    "agents",
    "env",
    "timeout",
    "steps",
    "artifacts",
    "secrets",
    "cache",
];
/// Keys allowed in a job's `cache`.
pub(super) const CACHE_KEYS: &[&str] = &["key", "restore-keys", "paths", "scope"];
/// Most restore keys a cache may list.
const MAX_RESTORE_KEYS: usize = 16;
/// Keys allowed in a step.
pub(super) const STEP_KEYS: &[&str] = &[
    "name",
    "image",
    "commands",
    "env",
    "workdir",
    "timeout",
    "pull",
    "resources",
    "privileged",
    "volumes",
];
/// Keys allowed in a step's `resources`.
const RESOURCE_KEYS: &[&str] = &["cpus", "memory"];
/// Most CPUs a step may ask for.
const MAX_CPUS: f64 = 1024.0;
/// Least memory a step may be limited to: Docker refuses less than 6 MiB.
const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// Longest job name accepted.
const MAX_JOB_NAME: usize = 64;

/// Parse and validate a pipeline file. On failure, every problem found, each with its line and column.
pub fn parse(src: &str) -> Result<Pipeline, Vec<PipelineError>> {
    parse_with_secrets(src, &|_| true)
}

/// [`parse`], and also reports every `secrets:` entry naming a secret for which `known` is false, at
/// its line and column (the coordinator checks names against its secrets at submit).
pub fn parse_with_secrets(
    src: &str,
    known: &dyn Fn(&str) -> bool,
) -> Result<Pipeline, Vec<PipelineError>> {
    check(src)?.finish(known)
}

/// A pipeline file walked once: its model, the secrets it names and the problems found, before the
/// secret names are checked (the only part that depends on anything but the text).
#[derive(Debug, Clone)]
pub(super) struct Checked {
    pub(super) pipeline: Pipeline,
    /// Every well-formed `secrets:` entry with its line and column.
    secret_refs: Vec<(String, u32, u32)>,
    errors: Vec<PipelineError>,
}

/// Walks `src`; fails only when it is not YAML at all.
pub(super) fn check(src: &str) -> Result<Checked, Vec<PipelineError>> {
    let root = yaml::load(src).map_err(|err| vec![err])?;
    let mut checker = Checker::default();
    let pipeline = checker.pipeline(&root);
    Ok(Checked {
        pipeline,
        secret_refs: std::mem::take(&mut checker.secret_refs),
        errors: checker.errors,
    })
}

impl Checked {
    /// True when the text itself is valid (its secrets may still be unknown).
    pub(super) fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }

    /// The model, or every problem (unknown secrets among them) in the order of the file.
    pub(super) fn finish(
        self,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Pipeline, Vec<PipelineError>> {
        let mut errors = self.errors;
        for (name, line, column) in self.secret_refs {
            if !known(&name) {
                errors.push(PipelineError {
                    line,
                    column,
                    message: format!(
                        "unknown secret {name:?}; expected a secret set with `drover secrets set {name}`"
                    ),
                });
            }
        }
        if errors.is_empty() {
            Ok(self.pipeline)
        } else {
            // Stable: problems on one node stay in the order they were found.
            errors.sort_by_key(|e| (e.line, e.column));
            Err(errors)
        }
    }
}

/// Collects problems while building the model. Every check that rejects something records an error,
/// so the model is only handed out when no error was recorded.
#[derive(Debug, Default)]
struct Checker {
    errors: Vec<PipelineError>,
    /// Every well-formed `secrets:` entry with its place, checked against the known secrets at the end.
    secret_refs: Vec<(String, u32, u32)>,
}

/// A job as read, before the `needs` graph is checked.
struct JobDraft<'n> {
    spec: JobSpec,
    key: &'n Node,
    needs: Vec<(String, &'n Node)>,
}

impl Checker {
    fn error(&mut self, node: &Node, message: impl Into<String>) {
        self.errors.push(PipelineError {
            line: node.line,
            column: node.column,
            message: message.into(),
        });
    }

    fn pipeline(&mut self, root: &Node) -> Pipeline {
        if root.value == Value::Null {
            self.error(
                root,
                "the pipeline is empty; expected a mapping with a \"jobs\" key",
            );
            return Pipeline { jobs: Vec::new() };
        }
        let Some(fields) = self.fields(root, "the pipeline", TOP_KEYS) else {
            return Pipeline { jobs: Vec::new() };
        };
        let global_env = fields
            .get("env")
            .map(|(_, v)| self.env(v, "the pipeline"))
            .unwrap_or_default();
        let drafts = match fields.get("jobs") {
            None => {
                self.error(
                    root,
                    "missing key \"jobs\"; expected a mapping of job names to jobs",
                );
                Vec::new()
            }
            Some((key, value)) => self.jobs(key, value),
        };
        self.check_needs(&drafts);
        let jobs = drafts
            .into_iter()
            .map(|draft| {
                let mut spec = draft.spec;
                // Pipeline env sits under the job's: the job's own value wins.
                let mut env = global_env.clone();
                env.append(&mut spec.env);
                spec.env = env;
                spec
            })
            .collect();
        Pipeline { jobs }
    }

    fn jobs<'n>(&mut self, key: &'n Node, value: &'n Node) -> Vec<JobDraft<'n>> {
        let entries = match &value.value {
            Value::Map(entries) => entries,
            Value::Null => {
                self.error(key, "\"jobs\" is empty; expected at least one job");
                return Vec::new();
            }
            _ => {
                self.error(
                    value,
                    format!(
                        "\"jobs\" must be a mapping of job names to jobs, found {}",
                        value.kind_name()
                    ),
                );
                return Vec::new();
            }
        };
        if entries.is_empty() {
            self.error(value, "\"jobs\" is empty; expected at least one job");
        }
        let mut seen = HashSet::new();
        let mut drafts = Vec::with_capacity(entries.len());
        for (name_node, job_node) in entries {
            let Some(name) = name_node.scalar_text() else {
                self.error(
                    name_node,
                    format!(
                        "a job name must be a string, found {}",
                        name_node.kind_name()
                    ),
                );
                continue;
            };
            if !valid_job_name(name) {
                self.error(
                    name_node,
                    format!(
                        "invalid job name {name:?}; expected 1 to {MAX_JOB_NAME} characters from \
                         A-Z, a-z, 0-9, \"_\", \".\" and \"-\""
                    ),
                );
            }
            // YAML rejects repeated keys, but `1:` and `"1":` are different keys with one name.
            if !seen.insert(name.to_owned()) {
                self.error(
                    name_node,
                    format!("duplicate job name {name:?}; job names must be unique"),
                );
            }
            drafts.push(self.job(name, name_node, job_node));
        }
        drafts
    }

    fn job<'n>(&mut self, name: &str, key: &'n Node, node: &'n Node) -> JobDraft<'n> {
        let mut draft = JobDraft {
            spec: JobSpec {
                name: name.to_owned(),
                needs: Vec::new(),
                agents: BTreeMap::new(),
                env: BTreeMap::new(),
                steps: Vec::new(),
                artifacts: Vec::new(),
                timeout_secs: None,
                secrets: Vec::new(),
                cache: None,
            },
            key,
            needs: Vec::new(),
        };
        let what = format!("job {name:?}");
        if node.value == Value::Null {
            self.error(
                key,
                format!("{what} is empty; expected a mapping with at least \"steps\""),
            );
            return draft;
        }
        let Some(fields) = self.fields(node, &what, JOB_KEYS) else {
            return draft;
        };
        if let Some((_, v)) = fields.get("needs") {
            for item in self.string_list(v, &format!("\"needs\" of {what}")) {
                if let Some(need) = self.string(item, &format!("an entry of \"needs\" of {what}")) {
                    draft.needs.push((need, item));
                }
            }
            draft.spec.needs = draft.needs.iter().map(|(n, _)| n.clone()).collect();
        }
        if let Some((_, v)) = fields.get("agents") {
            draft.spec.agents = self.agents(v, &what);
        }
        if let Some((_, v)) = fields.get("env") {
            draft.spec.env = self.env(v, &what);
        }
        if let Some((_, v)) = fields.get("timeout") {
            draft.spec.timeout_secs = self.duration(v, &format!("\"timeout\" of {what}"));
        }
        match fields.get("steps") {
            None => self.error(
                key,
                format!("{what} has no \"steps\"; expected a list of steps"),
            ),
            Some((steps_key, v)) => draft.spec.steps = self.steps(steps_key, v, name),
        }
        if let Some((_, v)) = fields.get("artifacts") {
            let what = format!("\"artifacts\" of {what}");
            for item in self.string_list(v, &what) {
                if let Some(path) = self.string(item, &format!("an entry of {what}")) {
                    if let Err(problem) = check_artifact_path(&path) {
                        self.error(item, problem);
                    }
                    draft.spec.artifacts.push(path);
                }
            }
        }
        if let Some((_, v)) = fields.get("secrets") {
            draft.spec.secrets = self.secrets(v, &what);
        }
        if let Some((key, v)) = fields.get("cache") {
            draft.spec.cache = self.cache(key, v, &what);
        }
        draft
    }

    /// `cache: {key, restore-keys, paths, scope}`.
    fn cache(&mut self, key: &Node, node: &Node, owner: &str) -> Option<CacheSpec> {
        let what = format!("\"cache\" of {owner}");
        if node.value == Value::Null {
            self.error(
                key,
                format!("{what} is empty; expected a mapping with \"key\" and \"paths\""),
            );
            return None;
        }
        let fields = self.fields(node, &what, CACHE_KEYS)?;
        let mut spec = CacheSpec {
            key: String::new(),
            restore_keys: Vec::new(),
            paths: Vec::new(),
            scope: None,
        };
        let mut ok = true;
        match fields.get("key") {
            None => {
                self.error(
                    node,
                    format!(
                        "{what} has no \"key\"; expected a key template such as \
                         cargo-{{{{ hashFiles \"Cargo.lock\" }}}}"
                    ),
                );
                ok = false;
            }
            Some((_, v)) => match self.string(v, &format!("\"key\" of {what}")) {
                Some(text) => {
                    ok &= self.key_template(v, &text, &format!("\"key\" of {what}"));
                    spec.key = text;
                }
                None => ok = false,
            },
        }
        if let Some((_, v)) = fields.get("restore-keys") {
            let list_what = format!("\"restore-keys\" of {what}");
            let items = self.string_list(v, &list_what);
            if items.len() > MAX_RESTORE_KEYS {
                self.error(
                    v,
                    format!(
                        "{list_what} lists {} keys; at most {MAX_RESTORE_KEYS} are allowed",
                        items.len()
                    ),
                );
            }
            for item in items {
                if let Some(text) = self.string(item, &format!("an entry of {list_what}")) {
                    ok &= self.key_template(item, &text, &format!("an entry of {list_what}"));
                    spec.restore_keys.push(text);
                } else {
                    ok = false;
                }
            }
        }
        match fields.get("paths") {
            None => {
                self.error(
                    node,
                    format!(
                        "{what} has no \"paths\"; expected a list of workspace-relative files or \
                         directories such as [target, .cargo/registry]"
                    ),
                );
                ok = false;
            }
            Some((paths_key, v)) => {
                let list_what = format!("\"paths\" of {what}");
                let items = self.string_list(v, &list_what);
                if items.is_empty() && matches!(v.value, Value::Seq(_) | Value::Null) {
                    let at = if v.value == Value::Null { paths_key } else { v };
                    self.error(
                        at,
                        format!("{list_what} is empty; expected at least one path"),
                    );
                    ok = false;
                }
                for item in items {
                    if let Some(path) = self.string(item, &format!("an entry of {list_what}")) {
                        if let Err(problem) = check_cache_path(&path) {
                            self.error(item, problem);
                            ok = false;
                        }
                        spec.paths.push(path);
                    } else {
                        ok = false;
                    }
                }
            }
        }
        if let Some((_, v)) = fields.get("scope") {
            if let Some(scope) = self.string(v, &format!("\"scope\" of {what}")) {
                if valid_job_name(&scope) {
                    spec.scope = Some(scope);
                } else {
                    self.error(
                        v,
                        format!(
                            "invalid cache scope {scope:?} in {what}; expected 1 to {MAX_JOB_NAME} \
                             characters from A-Z, a-z, 0-9, \"_\", \".\" and \"-\""
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(spec)
    }

    /// Checks a cache key template's syntax; reports a problem at `node`. Whether it was valid.
    fn key_template(&mut self, node: &Node, text: &str, what: &str) -> bool {
        match drover_proto::cache_key::Template::parse(text) {
            Err(e) => {
                self.error(node, format!("invalid template {text:?} in {what}: {e}"));
                false
            }
            // A template of plain text can be checked as the key it will be.
            Ok(t) if t.parts().is_empty() => {
                self.error(node, format!("{what} is empty; expected a key template"));
                false
            }
            Ok(_) => true,
        }
    }

    /// `secrets: [NAME, ...]`: names that become environment variables, each once.
    fn secrets(&mut self, node: &Node, owner: &str) -> Vec<String> {
        let what = format!("\"secrets\" of {owner}");
        let mut names = Vec::new();
        for item in self.string_list(node, &what) {
            let Some(name) = self.string(item, &format!("an entry of {what}")) else {
                continue;
            };
            if !valid_env_name(&name) || name.len() > 128 {
                self.error(
                    item,
                    format!(
                        "invalid secret name {name:?} in {what}; expected a letter or \"_\" followed by \
                         letters, digits or \"_\" (at most 128)"
                    ),
                );
            } else if names.contains(&name) {
                self.error(
                    item,
                    format!("{what} lists {name:?} twice; expected each secret once"),
                );
            } else {
                self.secret_refs
                    .push((name.clone(), item.line, item.column));
                names.push(name);
            }
        }
        names
    }

    /// `resources: {cpus: 0.5, memory: 256Mi}`.
    fn resources(&mut self, node: &Node, owner: &str) -> Resources {
        let what = format!("\"resources\" of {owner}");
        let mut r = Resources::default();
        let Some(fields) = self.fields(node, &what, RESOURCE_KEYS) else {
            return r;
        };
        if let Some((_, v)) = fields.get("cpus") {
            let cpus = v.scalar_text().and_then(|t| t.trim().parse::<f64>().ok());
            match cpus {
                Some(c) if (0.001..=MAX_CPUS).contains(&c) => {
                    r.nano_cpus = Some((c * 1e9).round() as u64);
                }
                _ => {
                    let shown = v
                        .scalar_text()
                        .map_or_else(|| v.kind_name().to_owned(), |t| format!("{t:?}"));
                    self.error(
                        v,
                        format!(
                            "invalid cpus {shown} in {what}; expected a number of CPUs from 0.001 to \
                             {MAX_CPUS}, such as 0.5 or 2"
                        ),
                    );
                }
            }
        }
        if let Some((_, v)) = fields.get("memory") {
            match v.scalar_text().and_then(parse_memory) {
                Some(bytes) if bytes >= MIN_MEMORY => r.memory_bytes = Some(bytes),
                _ => {
                    let shown = v
                        .scalar_text()
                        .map_or_else(|| v.kind_name().to_owned(), |t| format!("{t:?}"));
                    self.error(
                        v,
                        format!(
                            "invalid memory {shown} in {what}; expected bytes or a size like 256Mi, \
                             1Gi, 512M, at least 6Mi"
                        ),
                    );
                }
            }
        }
        r
    }

    fn steps(&mut self, key: &Node, node: &Node, job: &str) -> Vec<StepSpec> {
        let items = match &node.value {
            Value::Seq(items) if !items.is_empty() => items,
            Value::Seq(_) | Value::Null => {
                let at = if node.value == Value::Null { key } else { node };
                self.error(
                    at,
                    format!("job {job:?} has no steps; expected a list of at least one step"),
                );
                return Vec::new();
            }
            _ => {
                self.error(
                    node,
                    format!(
                        "\"steps\" of job {job:?} must be a list of steps, found {}",
                        node.kind_name()
                    ),
                );
                return Vec::new();
            }
        };
        let mut names = HashSet::new();
        let mut steps = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let step = self.step(item, index, job);
            if !names.insert(step.name.clone()) {
                // Point at the explicit name when there is one, else at the step.
                let at = step_name_node(item).unwrap_or(item);
                self.error(
                    at,
                    format!(
                        "duplicate step name {:?} in job {job:?}; step names must be unique within a job",
                        step.name
                    ),
                );
            }
            steps.push(step);
        }
        steps
    }

    fn step(&mut self, node: &Node, index: usize, job: &str) -> StepSpec {
        let mut step = StepSpec {
            name: format!("step-{}", index + 1),
            image: String::new(),
            commands: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            timeout_secs: None,
            pull: PullPolicy::default(),
            resources: Resources::default(),
            host: HostAccess::default(),
        };
        let Some(fields) = self.fields(
            node,
            &format!("step {} of job {job:?}", index + 1),
            STEP_KEYS,
        ) else {
            return step;
        };
        if let Some((_, v)) = fields.get("name") {
            if let Some(name) = self.string(v, "a step \"name\"") {
                if name.trim().is_empty() || name.chars().any(char::is_control) {
                    self.error(
                        v,
                        format!("invalid step name {name:?}; expected non-blank text on one line"),
                    );
                }
                step.name = name;
            }
        }
        let what = format!("step {:?} of job {job:?}", step.name);
        match fields.get("image") {
            None => self.error(
                node,
                format!("{what} has no \"image\"; expected an image reference such as drover-busybox:latest"),
            ),
            Some((_, v)) => {
                if let Some(image) = self.string(v, &format!("\"image\" of {what}")) {
                    if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
                        self.error(
                            v,
                            format!(
                                "invalid image {image:?} in {what}; expected an image reference \
                                 such as drover-busybox:latest"
                            ),
                        );
                    }
                    step.image = image;
                }
            }
        }
        match fields.get("commands") {
            None => self.error(
                node,
                format!("{what} has no \"commands\"; expected a list of shell commands"),
            ),
            Some((key, v)) => {
                let items = self.string_list(v, &format!("\"commands\" of {what}"));
                if items.is_empty() && matches!(v.value, Value::Seq(_) | Value::Null) {
                    let at = if v.value == Value::Null { key } else { v };
                    self.error(
                        at,
                        format!(
                            "\"commands\" of {what} is empty; expected at least one shell command"
                        ),
                    );
                }
                for item in items {
                    if let Some(command) = self.string(item, &format!("a command of {what}")) {
                        if command.trim().is_empty() {
                            self.error(
                                item,
                                format!("blank command in {what}; expected a shell command"),
                            );
                        }
                        step.commands.push(command);
                    }
                }
            }
        }
        if let Some((_, v)) = fields.get("env") {
            step.env = self.env(v, &what);
        }
        if let Some((_, v)) = fields.get("workdir") {
            if let Some(dir) = self.string(v, &format!("\"workdir\" of {what}")) {
                if dir.is_empty() {
                    self.error(
                        v,
                        format!("empty \"workdir\" in {what}; expected a directory path"),
                    );
                } else if !is_absolute(&dir) && has_parent_component(&dir) {
                    self.error(
                        v,
                        format!(
                            "\"workdir\" {dir:?} of {what} leaves the workspace (\"..\"); \
                             expected a path inside the workspace or an absolute path"
                        ),
                    );
                }
                step.workdir = Some(dir);
            }
        }
        if let Some((_, v)) = fields.get("timeout") {
            step.timeout_secs = self.duration(v, &format!("\"timeout\" of {what}"));
        }
        if let Some((_, v)) = fields.get("pull") {
            if let Some(text) = self.string(v, &format!("\"pull\" of {what}")) {
                step.pull = match text.as_str() {
                    "if-not-present" => PullPolicy::IfNotPresent,
                    "always" => PullPolicy::Always,
                    "never" => PullPolicy::Never,
                    _ => {
                        self.error(
                            v,
                            format!(
                                "invalid pull policy {text:?} in {what}; expected one of \
                                 if-not-present, always, never"
                            ),
                        );
                        PullPolicy::default()
                    }
                };
            }
        }
        if let Some((_, v)) = fields.get("resources") {
            step.resources = self.resources(v, &what);
        }
        if let Some((_, v)) = fields.get("privileged") {
            match v.scalar_text().map(str::trim) {
                Some("true") => step.host.privileged = true,
                Some("false") => {}
                _ => self.error(v, format!("\"privileged\" of {what} must be true or false")),
            }
        }
        if let Some((_, v)) = fields.get("volumes") {
            step.host.volumes = self.volumes(v, &what);
        }
        step
    }

    /// `volumes: ["/host/path:/container/path", "/host/other:/data:ro"]`.
    fn volumes(&mut self, node: &Node, owner: &str) -> Vec<Volume> {
        let what = format!("\"volumes\" of {owner}");
        let mut out: Vec<Volume> = Vec::new();
        for item in self.string_list(node, &what) {
            let Some(text) = self.string(item, &format!("a volume of {owner}")) else {
                continue;
            };
            match parse_volume(&text) {
                Ok(v)
                    if out.iter().any(|o| {
                        o.container.trim_end_matches('/') == v.container.trim_end_matches('/')
                    }) =>
                {
                    self.error(
                        item,
                        format!(
                            "{what} mounts {:?} twice; expected each container path once",
                            v.container
                        ),
                    )
                }
                Ok(v) => out.push(v),
                Err(e) => self.error(
                    item,
                    format!(
                        "invalid volume {text:?} in {what}: {e}; expected \
                         /host/path:/container/path with an optional :ro or :rw"
                    ),
                ),
            }
        }
        out
    }

    /// The entries of a mapping whose keys must be among `allowed`; unknown keys are reported.
    fn fields<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node,
                format!(
                    "expected a mapping for {what} (keys: {}), found {}",
                    allowed.join(", "),
                    node.kind_name()
                ),
            );
            return None;
        };
        let mut fields = Fields(Vec::with_capacity(entries.len()));
        for (key, value) in entries {
            match key.scalar_text() {
                Some(name) if allowed.contains(&name) => fields.0.push((name, key, value)),
                Some(name) => {
                    let hint = closest(name, allowed)
                        .map(|k| format!(" (did you mean {k:?}?)"))
                        .unwrap_or_default();
                    self.error(
                        key,
                        format!(
                            "unknown key {name:?} in {}; expected one of {}{hint}",
                            key_owner(what),
                            allowed.join(", ")
                        ),
                    );
                }
                None => self.error(
                    key,
                    format!(
                        "a key in {what} must be a string, found {}; expected one of {}",
                        key.kind_name(),
                        allowed.join(", ")
                    ),
                ),
            }
        }
        Some(fields)
    }

    /// A scalar's text; anything else is reported.
    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match node.scalar_text() {
            Some(text) => Some(text.to_owned()),
            None => {
                self.error(
                    node,
                    format!("expected a string for {what}, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    /// The items of a list; a single scalar counts as a list of one, null as an empty list.
    fn string_list<'n>(&mut self, node: &'n Node, what: &str) -> Vec<&'n Node> {
        match &node.value {
            Value::Seq(items) => items.iter().collect(),
            Value::Scalar(_) => vec![node],
            Value::Null => Vec::new(),
            Value::Map(_) => {
                self.error(
                    node,
                    format!("expected a list of strings for {what}, found a mapping"),
                );
                Vec::new()
            }
        }
    }

    /// A mapping of strings to strings; numbers and booleans keep their spelling.
    fn string_map(&mut self, node: &Node, what: &str) -> Vec<(String, String, Node)> {
        let entries = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => return Vec::new(),
            _ => {
                self.error(
                    node,
                    format!("expected a mapping for {what}, found {}", node.kind_name()),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let Some(name) = key.scalar_text() else {
                self.error(
                    key,
                    format!(
                        "a key in {what} must be a string, found {}",
                        key.kind_name()
                    ),
                );
                continue;
            };
            let text = match &value.value {
                Value::Scalar(s) => s.text.clone(),
                Value::Null => {
                    // A null sits right after the colon, where nothing is written: point at the key.
                    self.error(
                        key,
                        format!("{name:?} in {what} has no value; expected a string (write \"\" for an empty one)"),
                    );
                    continue;
                }
                _ => {
                    self.error(
                        value,
                        format!(
                            "expected a string for {name:?} in {what}, found {}",
                            value.kind_name()
                        ),
                    );
                    continue;
                }
            };
            out.push((name.to_owned(), text, key.clone()));
        }
        out
    }

    fn env(&mut self, node: &Node, owner: &str) -> BTreeMap<String, String> {
        let what = format!("\"env\" of {owner}");
        let mut env = BTreeMap::new();
        for (name, value, key) in self.string_map(node, &what) {
            if !valid_env_name(&name) {
                self.error(
                    &key,
                    format!(
                        "invalid environment variable name {name:?} in {what}; expected a letter \
                         or \"_\" followed by letters, digits or \"_\""
                    ),
                );
            }
            env.insert(name, value);
        }
        env
    }

    fn agents(&mut self, node: &Node, owner: &str) -> BTreeMap<String, String> {
        let what = format!("\"agents\" of {owner}");
        let mut labels = BTreeMap::new();
        for (name, value, key) in self.string_map(node, &what) {
            if name.trim().is_empty() {
                self.error(
                    &key,
                    format!("empty label name in {what}; expected a label such as os"),
                );
            }
            labels.insert(name, value);
        }
        labels
    }

    /// A timeout: whole seconds as a number, or text like "90s", "10m", "1h30m".
    fn duration(&mut self, node: &Node, what: &str) -> Option<u64> {
        let expected =
            "expected a positive number of seconds or a duration like \"90s\", \"10m\", \"1h\" or \"1h30m\"";
        let parsed = match &node.value {
            Value::Scalar(s) => match s.kind {
                ScalarKind::Int(n) => u64::try_from(n).ok().filter(|n| *n > 0),
                ScalarKind::Str => parse_duration(&s.text),
                ScalarKind::Bool | ScalarKind::Float => None,
            },
            _ => None,
        };
        if parsed.is_none() {
            let shown = node
                .scalar_text()
                .map_or_else(|| node.kind_name().to_owned(), |t| format!("{t:?}"));
            self.error(
                node,
                format!("invalid duration {shown} for {what}; {expected}"),
            );
        }
        parsed
    }

    /// Unknown jobs, self-needs, duplicates and cycles in `needs`.
    fn check_needs(&mut self, drafts: &[JobDraft<'_>]) {
        let index: HashMap<&str, usize> = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| (d.spec.name.as_str(), i))
            .collect();
        // Only edges to real, other jobs take part in cycle detection: the rest are reported here.
        let mut edges: Vec<Vec<(usize, &Node)>> = vec![Vec::new(); drafts.len()];
        let known: Vec<&str> = drafts.iter().map(|d| d.spec.name.as_str()).collect();
        for (from, draft) in drafts.iter().enumerate() {
            let job = &draft.spec.name;
            let mut listed = HashSet::new();
            for (need, node) in &draft.needs {
                match index.get(need.as_str()) {
                    None => {
                        let hint = closest(need, &known)
                            .map(|k| format!(" (did you mean {k:?}?)"))
                            .unwrap_or_default();
                        self.error(
                            node,
                            format!(
                                "job {job:?} needs unknown job {need:?}; expected one of {}{hint}",
                                list_some(&known)
                            ),
                        );
                    }
                    Some(&to) if to == from => self.error(
                        node,
                        format!("job {job:?} needs itself; expected other jobs' names"),
                    ),
                    Some(&to) if !listed.insert(to) => self.error(
                        node,
                        format!(
                            "job {job:?} lists {need:?} in \"needs\" twice; expected each job once"
                        ),
                    ),
                    Some(&to) => edges[from].push((to, node)),
                }
            }
        }
        for cycle in find_cycles(&edges) {
            let names: Vec<&str> = cycle
                .iter()
                .chain(cycle.first())
                .map(|&i| drafts[i].spec.name.as_str())
                .collect();
            // The entry of the cycle's first job that names the second one.
            let next = cycle.get(1).copied();
            let at = edges[cycle[0]]
                .iter()
                .find(|(to, _)| Some(*to) == next)
                .map_or(drafts[cycle[0]].key, |(_, node)| *node);
            self.error(
                at,
                format!(
                    "cycle in needs: {}; expected jobs to form a graph without cycles",
                    names.join(" -> ")
                ),
            );
        }
    }
}

/// Known keys of a mapping with their key and value nodes.
struct Fields<'n>(Vec<(&'n str, &'n Node, &'n Node)>);

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<(&'n Node, &'n Node)> {
        self.0
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, key, value)| (*key, *value))
    }
}

/// Unknown-key messages name the kind of mapping ("step", "job"), not the full path.
fn key_owner(what: &str) -> &str {
    if what.starts_with("step ") {
        "step"
    } else if what.starts_with("job ") {
        "job"
    } else {
        what
    }
}

fn step_name_node(step: &Node) -> Option<&Node> {
    let Value::Map(entries) = &step.value else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k.scalar_text() == Some("name"))
        .map(|(_, v)| v)
}

/// Cycles in a directed graph, each as the jobs on it in `needs` order, one per back edge found.
/// Iterative, so a long chain of jobs cannot overflow the stack.
fn find_cycles(edges: &[Vec<(usize, &Node)>]) -> Vec<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; edges.len()];
    let mut cycles = Vec::new();
    for start in 0..edges.len() {
        if mark[start] != Mark::New {
            continue;
        }
        mark[start] = Mark::OnPath;
        // The current path: (job, index of its next edge to follow).
        let mut path = vec![(start, 0usize)];
        while let Some(top) = path.last_mut() {
            let job = top.0;
            let edge = edges[job].get(top.1).map(|(to, _)| *to);
            top.1 += 1;
            match edge {
                None => {
                    mark[job] = Mark::Done;
                    path.pop();
                }
                Some(to) => match mark[to] {
                    Mark::New => {
                        mark[to] = Mark::OnPath;
                        path.push((to, 0));
                    }
                    Mark::OnPath => {
                        if let Some(pos) = path.iter().position(|(j, _)| *j == to) {
                            cycles.push(path[pos..].iter().map(|(j, _)| *j).collect());
                        }
                    }
                    Mark::Done => {}
                },
            }
        }
    }
    cycles
}

/// Names for a message: all of a short list, the start of a long one.
fn list_some(names: &[&str]) -> String {
    const SHOWN: usize = 10;
    if names.len() <= SHOWN {
        names.join(", ")
    } else {
        format!("{}, ... ({} jobs)", names[..SHOWN].join(", "), names.len())
    }
}

fn valid_job_name(name: &str) -> bool {
    (1..=MAX_JOB_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A memory size: plain bytes, or a number with a suffix: Ki, Mi, Gi, Ti (powers of 1024) or k/K, M, G, T
/// (powers of 1000); `b`/`B` after the suffix is allowed.
fn parse_memory(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix(['b', 'B'])
        .filter(|r| r.ends_with(|c: char| c.is_ascii_alphabetic()))
        .unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    let bytes = n * mult as f64;
    (1.0..9.0e18).contains(&bytes).then_some(bytes as u64)
}

fn is_absolute(path: &str) -> bool {
    let bytes = path.as_bytes();
    // Windows drive paths too: agents may one day run there, and `C:x` is never workspace-relative.
    path.starts_with(['/', '\\'])
        || (bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':')
}

fn has_parent_component(path: &str) -> bool {
    path.split(['/', '\\']).any(|part| part == "..")
}

/// Artifact paths are relative to the workspace and must stay inside it.
fn check_artifact_path(path: &str) -> Result<(), String> {
    let expected =
        "expected a workspace-relative path or glob such as dist/app.txt or \"dist/**/*.tar.gz\"";
    if path.trim().is_empty() {
        Err(format!("empty artifact path; {expected}"))
    } else if is_absolute(path) {
        Err(format!("artifact path {path:?} is absolute; {expected}"))
    } else if has_parent_component(path) {
        Err(format!(
            "artifact path {path:?} leaves the workspace (\"..\"); {expected}"
        ))
    } else {
        Ok(())
    }
}

/// Cache paths are workspace-relative files or directories: the artifact rules, and no globs.
fn check_cache_path(path: &str) -> Result<(), String> {
    let expected =
        "expected a workspace-relative file or directory such as target or .cargo/registry";
    let normal = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .count();
    if path.trim().is_empty() {
        Err(format!("empty cache path; {expected}"))
    } else if is_absolute(path) {
        Err(format!("cache path {path:?} is absolute; {expected}"))
    } else if has_parent_component(path) {
        Err(format!(
            "cache path {path:?} leaves the workspace (\"..\"); {expected}"
        ))
    } else if normal == 0 {
        Err(format!(
            "cache path {path:?} is the whole workspace; {expected}"
        ))
    } else if path.contains(['*', '?', '[', '{']) {
        Err(format!(
            "cache path {path:?} is a glob; {expected} (a directory is cached with everything in it)"
        ))
    } else if path.chars().any(char::is_control) {
        Err(format!(
            "cache path {path:?} has control characters; {expected}"
        ))
    } else {
        Ok(())
    }
}

/// "90", "90s", "10m", "1h", "1h30m", "1h30m15s" -> seconds. Units in h, m, s order, each at most once.
pub(super) fn parse_duration(text: &str) -> Option<u64> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok().filter(|n| *n > 0);
    }
    let mut total: u64 = 0;
    let mut rest = text;
    let mut last_unit_rank = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let amount: u64 = rest[..digits].parse().ok()?;
        let (rank, scale) = match rest[digits..].chars().next()? {
            'h' => (1, 3600),
            'm' => (2, 60),
            's' => (3, 1),
            _ => return None,
        };
        if rank <= last_unit_rank {
            return None;
        }
        last_unit_rank = rank;
        total = total.checked_add(amount.checked_mul(scale)?)?;
        rest = &rest[digits + 1..];
    }
    (total > 0).then_some(total)
}

/// The allowed word closest to a misspelt one, if it is close enough to be a likely typo.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    // Names are short; a long word is no typo. Past a few hundred candidates a hint is not worth
    // the quadratic cost on a file with many unknown names.
    if word.len() > 2 * MAX_JOB_NAME || candidates.len() > 256 {
        return None;
    }
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2 && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Where steps see their workspace: no volume may cover it.
const WORKSPACE_DIR: &str = "/workspace";

/// Parses `/host:/container[:ro|:rw]`: both paths absolute, without `..`, the container path neither
/// `/` nor the workspace.
pub(super) fn parse_volume(text: &str) -> Result<Volume, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        [_, _, mode] => return Err(format!("mode {mode:?} is neither ro nor rw")),
        _ => return Err("expected two paths separated by a colon".into()),
    };
    for (which, p) in [("host", host), ("container", container)] {
        if !p.starts_with('/') {
            return Err(format!("the {which} path {p:?} is not absolute"));
        }
        if has_parent_component(p) || p.chars().any(char::is_control) {
            return Err(format!(
                "the {which} path {p:?} has \"..\" or control characters"
            ));
        }
    }
    let inner = container.trim_end_matches('/');
    if inner.is_empty() || inner == WORKSPACE_DIR || WORKSPACE_DIR.starts_with(&format!("{inner}/"))
    {
        return Err(format!(
            "the container path {container:?} would cover / or the workspace {WORKSPACE_DIR}"
        ));
    }
    Ok(Volume {
        host: host.to_string(),
        container: container.to_string(),
        read_only,
    })
}
