//! Cache key templates: `cargo-{{ hashFiles "Cargo.lock" "**/Cargo.toml" }}-{{ os }}-{{ arch }}`.
//!
//! One place for the syntax: the coordinator parses a template when a pipeline is submitted (so a
//! syntax error comes back with its line and column), the agent parses it again and renders it over
//! the job's seeded workspace.
//!
//! Syntax: text, with expressions between `{{` and `}}`. An expression is a function name followed by
//! double-quoted arguments (`\"` and `\\` escape inside them), separated by spaces:
//! - `hashFiles "glob" ...`: one or more globs over workspace-relative paths (`*` stays within one
//!   directory, `**` crosses directories). Renders as the sha256 (hex) of the sorted list of matched
//!   regular files, each contributing its path, a NUL, the sha256 of its content and a newline (see
//!   [`hash_files`]). **When no file matches it renders as the empty string**, as GitHub's
//!   `hashFiles` does, so `cargo-{{ hashFiles "none" }}` is `cargo-`.
//! - `os` and `arch`: the agent's operating system and CPU architecture (`linux`, `x86_64`).

use std::collections::BTreeMap;
use std::fmt;

use globset::{GlobBuilder, GlobMatcher};
use sha2::{Digest, Sha256};

/// Longest rendered key accepted.
pub const MAX_KEY_BYTES: usize = 512;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text.
    Text(String),
    /// `hashFiles` with its globs (at least one).
    HashFiles(Vec<String>),
    /// `os`.
    Os,
    /// `arch`.
    Arch,
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// A syntax error in a template: where (a character offset into the template, from 0) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// Character offset of the problem in the template text.
    pub offset: usize,
    /// What was wrong and what was expected.
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at character {}: {}", self.offset + 1, self.message)
    }
}

impl std::error::Error for TemplateError {}

/// What a template is rendered against.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// Workspace-relative path (`/`-separated, no leading `./`) -> sha256 hex of the content, for
    /// every regular file of the workspace.
    pub files: &'a BTreeMap<String, String>,
    /// Operating system, e.g. `linux`.
    pub os: &'a str,
    /// CPU architecture, e.g. `x86_64`.
    pub arch: &'a str,
}

impl Template {
    /// Parses `text`; the first syntax error is returned.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let chars: Vec<char> = text.chars().collect();
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut i = 0;
        while i < chars.len() {
            if chars[i] == '{' && chars.get(i + 1) == Some(&'{') {
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                let (part, next) = parse_expression(&chars, i)?;
                parts.push(part);
                i = next;
                continue;
            }
            if chars[i].is_control() {
                return Err(TemplateError {
                    offset: i,
                    message: "control characters are not allowed in a cache key".into(),
                });
            }
            literal.push(chars[i]);
            i += 1;
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// The pieces, in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Whether rendering needs the workspace's file digests (the template calls `hashFiles`).
    pub fn hashes_files(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::HashFiles(_)))
    }

    /// The key this template stands for over `facts`.
    pub fn render(&self, facts: &Facts<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Os => out.push_str(facts.os),
                Part::Arch => out.push_str(facts.arch),
                Part::HashFiles(globs) => {
                    // Globs were compiled once at parse time; they compile again here.
                    let matchers: Vec<GlobMatcher> =
                        globs.iter().filter_map(|g| compile_glob(g).ok()).collect();
                    out.push_str(&hash_files(facts.files, &matchers));
                }
            }
        }
        out
    }
}

/// Checks a rendered key: non-empty, at most [`MAX_KEY_BYTES`], no control characters.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        Err("the cache key is empty".into())
    } else if key.len() > MAX_KEY_BYTES {
        Err(format!(
            "the cache key has {} bytes; at most {MAX_KEY_BYTES} are allowed",
            key.len()
        ))
    } else if key.chars().any(char::is_control) {
        Err("the cache key contains control characters".into())
    } else {
        Ok(())
    }
}

/// A `hashFiles` glob, compiled the way it is matched: `*` does not cross `/`, `**` does.
pub fn compile_glob(glob: &str) -> Result<GlobMatcher, String> {
    let trimmed = glob.trim_start_matches("./");
    if trimmed.is_empty() {
        return Err("an empty glob matches nothing; expected a path or glob such as Cargo.lock or \"**/package-lock.json\"".into());
    }
    if trimmed.starts_with('/') {
        return Err(format!(
            "glob {glob:?} is absolute; expected a workspace-relative glob"
        ));
    }
    if trimmed.split('/').any(|c| c == "..") {
        return Err(format!("glob {glob:?} leaves the workspace (\"..\")"));
    }
    GlobBuilder::new(trimmed)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("invalid glob {glob:?}: {e}"))
}

/// sha256 (hex) over the files of `files` that match any of `globs`, in path order: for each, its
/// path, a NUL byte, its content's sha256 (hex) and a newline. The empty string when none matches.
pub fn hash_files(files: &BTreeMap<String, String>, globs: &[GlobMatcher]) -> String {
    let mut hasher = Sha256::new();
    let mut any = false;
    for (path, digest) in files {
        if globs.iter().any(|g| g.is_match(path)) {
            any = true;
            hasher.update(path.as_bytes());
            hasher.update([0u8]);
            hasher.update(digest.as_bytes());
            hasher.update(b"\n");
        }
    }
    if any {
        hex::encode(hasher.finalize())
    } else {
        String::new()
    }
}

/// Parses the expression starting at `chars[start]` (`{{`); returns it and the index after `}}`.
fn parse_expression(chars: &[char], start: usize) -> Result<(Part, usize), TemplateError> {
    let err = |offset: usize, message: String| TemplateError { offset, message };
    let mut i = start + 2;
    let skip_spaces = |i: &mut usize| {
        while *i < chars.len() && chars[*i] == ' ' {
            *i += 1;
        }
    };
    skip_spaces(&mut i);
    let name_at = i;
    let mut name = String::new();
    while i < chars.len() && chars[i].is_ascii_alphanumeric() {
        name.push(chars[i]);
        i += 1;
    }
    if name.is_empty() {
        return Err(err(
            name_at,
            "expected a function after \"{{\": hashFiles, os or arch".into(),
        ));
    }
    let mut args = Vec::new();
    loop {
        skip_spaces(&mut i);
        match chars.get(i) {
            None => {
                return Err(err(
                    start,
                    "\"{{\" is never closed; expected \"}}\" after the expression".into(),
                ))
            }
            Some('}') if chars.get(i + 1) == Some(&'}') => {
                i += 2;
                break;
            }
            Some('"') => {
                let (arg, next) = parse_string(chars, i)?;
                args.push((arg, i));
                i = next;
            }
            Some(c) => {
                return Err(err(
                    i,
                    format!(
                        "unexpected {c:?} in the expression; expected a double-quoted argument \
                         or \"}}}}\""
                    ),
                ))
            }
        }
    }
    let part = match name.as_str() {
        "hashFiles" => {
            if args.is_empty() {
                return Err(err(
                    name_at,
                    "hashFiles needs at least one glob, such as {{ hashFiles \"Cargo.lock\" }}"
                        .into(),
                ));
            }
            for (glob, at) in &args {
                compile_glob(glob).map_err(|m| err(*at, m))?;
            }
            Part::HashFiles(args.into_iter().map(|(g, _)| g).collect())
        }
        "os" | "arch" => {
            if let Some((_, at)) = args.first() {
                return Err(err(*at, format!("{name} takes no arguments")));
            }
            if name == "os" {
                Part::Os
            } else {
                Part::Arch
            }
        }
        other => {
            return Err(err(
                name_at,
                format!("unknown function {other:?}; expected hashFiles, os or arch"),
            ))
        }
    };
    Ok((part, i))
}

/// Parses the double-quoted string starting at `chars[start]`; returns it and the index after it.
fn parse_string(chars: &[char], start: usize) -> Result<(String, usize), TemplateError> {
    let mut out = String::new();
    let mut i = start + 1;
    loop {
        match chars.get(i) {
            None => {
                return Err(TemplateError {
                    offset: start,
                    message: "string is never closed; expected a closing '\"'".into(),
                })
            }
            Some('"') => return Ok((out, i + 1)),
            Some('\\') => match chars.get(i + 1) {
                Some(c @ ('"' | '\\')) => {
                    out.push(*c);
                    i += 2;
                }
                _ => {
                    return Err(TemplateError {
                        offset: i,
                        message: "unknown escape; only \\\" and \\\\ are allowed".into(),
                    })
                }
            },
            Some(c) if c.is_control() => {
                return Err(TemplateError {
                    offset: i,
                    message: "control characters are not allowed in a cache key".into(),
                })
            }
            Some(c) => {
                out.push(*c);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn files(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter()
            .map(|(p, d)| (p.to_string(), d.to_string()))
            .collect()
    }

    fn render(t: &str, f: &BTreeMap<String, String>) -> String {
        Template::parse(t).unwrap().render(&Facts {
            files: f,
            os: "linux",
            arch: "x86_64",
        })
    }

    #[test]
    fn renders_text_os_arch_and_file_hashes() {
        let f = files(&[
            ("Cargo.lock", "aa"),
            ("sub/Cargo.lock", "bb"),
            ("x.txt", "cc"),
        ]);
        let lock = render("{{hashFiles \"Cargo.lock\"}}", &f);
        assert_eq!(lock.len(), 64);
        assert_eq!(
            render(
                "cargo-{{ hashFiles \"Cargo.lock\" }}-{{ os }}-{{ arch }}",
                &f
            ),
            format!("cargo-{lock}-linux-x86_64")
        );
        // `*` stays in its directory, `**` crosses.
        assert_eq!(render("{{ hashFiles \"*.lock\" }}", &f), lock);
        assert_ne!(render("{{ hashFiles \"**/Cargo.lock\" }}", &f), lock);
        // Several globs hash the union once.
        assert_eq!(
            render("{{ hashFiles \"Cargo.lock\" \"./Cargo.lock\" }}", &f),
            lock
        );
        assert_eq!(render("plain", &f), "plain");
    }

    #[test]
    fn no_match_renders_empty() {
        let f = files(&[("a", "aa")]);
        assert_eq!(render("k-{{ hashFiles \"nothing/*\" }}", &f), "k-");
    }

    #[test]
    fn content_and_path_both_count() {
        let a = render("{{ hashFiles \"*\" }}", &files(&[("a", "11")]));
        let b = render("{{ hashFiles \"*\" }}", &files(&[("a", "12")]));
        let c = render("{{ hashFiles \"*\" }}", &files(&[("b", "11")]));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(b, c);
    }

    #[test]
    fn syntax_errors_say_where_and_what() {
        let cases: &[(&str, usize, &str)] = &[
            ("a-{{ hashFiles \"x\"", 2, "never closed"),
            ("a-{{ }}", 5, "expected a function"),
            ("{{ hashfiles \"x\" }}", 3, "unknown function \"hashfiles\""),
            ("{{ hashFiles }}", 3, "at least one glob"),
            ("{{ hashFiles \"../x\" }}", 13, "leaves the workspace"),
            ("{{ hashFiles \"/etc/x\" }}", 13, "absolute"),
            ("{{ hashFiles \"a[\" }}", 13, "invalid glob"),
            ("{{ hashFiles \"x }}", 13, "never closed"),
            ("{{ os \"x\" }}", 6, "takes no arguments"),
            ("{{ hashFiles x }}", 13, "unexpected 'x'"),
            ("{{ hashFiles \"a\\n\" }}", 15, "unknown escape"),
            ("a\tb", 1, "control characters"),
        ];
        for (text, offset, needle) in cases {
            let e = Template::parse(text).unwrap_err();
            assert_eq!(e.offset, *offset, "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn escapes_in_arguments() {
        let t = Template::parse(r#"{{ hashFiles "a\"b" "c\\d" }}"#).unwrap();
        assert_eq!(
            t.parts(),
            &[Part::HashFiles(vec!["a\"b".into(), "c\\d".into()])]
        );
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("cargo-1").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key(&"x".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert!(check_key("a\nb").is_err());
    }

    proptest! {
        /// Parsing never panics, and text without `{{` is its own key.
        #[test]
        fn parse_never_panics(text in ".{0,64}") {
            let parsed = Template::parse(&text);
            if !text.contains("{{") && !text.chars().any(char::is_control) {
                let empty = BTreeMap::new();
                let t = parsed.unwrap();
                prop_assert_eq!(t.render(&Facts { files: &empty, os: "o", arch: "a" }), text);
            }
        }

        /// The file hash does not depend on the order the files were listed in, and changes with
        /// any matched file's content.
        #[test]
        fn hash_is_order_free_and_content_bound(
            entries in proptest::collection::btree_map("[a-c]{1,3}(/[a-c]{1,3})?", "[0-9a-f]{4}", 1..8),
            flip in 0usize..8,
        ) {
            let globs = vec![compile_glob("**").unwrap()];
            let h = hash_files(&entries, &globs);
            let mut reversed: Vec<_> = entries.iter().collect();
            reversed.reverse();
            let rebuilt: BTreeMap<String, String> =
                reversed.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            prop_assert_eq!(&hash_files(&rebuilt, &globs), &h);
            let mut changed = entries.clone();
            let key = changed.keys().nth(flip % changed.len()).unwrap().clone();
            changed.insert(key, "zzzz".into());
            prop_assert_ne!(hash_files(&changed, &globs), h);
        }
    }
}
