//! Cache key templates on arbitrary text: a template or an error inside the text, never a panic; a
//! parsed template renders, and `hashFiles` renders as empty or 64 hex digits.

#![no_main]

use std::collections::BTreeMap;

use drover_proto::cache_key::{Facts, Part, Template};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Template::parse(text) {
        Err(e) => {
            assert!(e.offset <= text.chars().count(), "{e} beyond the text");
            assert!(!e.message.is_empty());
        }
        Ok(t) => {
            let files: BTreeMap<String, String> = [("Cargo.lock", "aa"), ("a/b.txt", "bb")]
                .into_iter()
                .map(|(p, d)| (p.to_string(), d.to_string()))
                .collect();
            let facts = Facts {
                files: &files,
                os: "linux",
                arch: "x86_64",
            };
            let _ = t.render(&facts);
            for part in t.parts() {
                if let Part::HashFiles(globs) = part {
                    let one = Template::parse(&format!(
                        "{{{{ hashFiles {} }}}}",
                        globs
                            .iter()
                            .map(|g| format!("\"{}\"", g.replace('\\', "\\\\").replace('"', "\\\"")))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ))
                    .expect("a parsed hashFiles call parses again");
                    let h = one.render(&facts);
                    assert!(h.is_empty() || h.len() == 64, "{h}");
                }
            }
        }
    }
});
