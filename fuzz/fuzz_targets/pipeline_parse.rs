//! The pipeline parser on arbitrary text: it must return a pipeline or positioned errors, never panic,
//! and every error position must lie inside the text.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    // YAML breaks lines at \n, \r\n and a lone \r: count every break (an upper bound is enough).
    let lines = src.bytes().filter(|b| matches!(b, b'\n' | b'\r')).count() as u32 + 1;
    // Half the inputs also check `secrets:` names against a set, as submit does.
    let result = if data.len() % 2 == 0 {
        drover_coordinator::pipeline::parse(src)
    } else {
        drover_coordinator::pipeline::parse_with_secrets(src, &|n| n.len() % 2 == 0)
    };
    match result {
        Ok(p) => assert!(!p.jobs.is_empty(), "a valid pipeline has jobs"),
        Err(errors) => {
            assert!(!errors.is_empty(), "an error result names a problem");
            for e in errors {
                assert!(!e.message.is_empty());
                assert!(e.line <= lines + 1, "{e} beyond line {lines}");
            }
        }
    }
});
