use std::collections::BTreeMap;
use std::io::Read;

use super::*;

/// A tar entry to write: (path as raw bytes, type, mode, content or link target).
enum Item<'a> {
    Dir(&'a str),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

/// Writes a plain tar of `items`; names go in raw, so `..` and absolute names can be written.
fn write_tar(path: &Path, items: &[Item<'_>]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for item in items {
        let mut h = tar::Header::new_gnu();
        let (name, data): (&str, &[u8]) = match item {
            Item::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (n, b"")
            }
            Item::File(n, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                (n, data)
            }
            Item::Symlink(n, target) | Item::HardLink(n, target) => {
                h.set_entry_type(if matches!(item, Item::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_mode(0o777);
                h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
                (n, b"")
            }
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap();
}

/// (path, type, mode, content or link target) of every entry of a plain tar.
fn read_tar(path: &Path) -> Vec<(String, char, u32, String)> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let kind = e.header().entry_type();
            let tag = match kind {
                k if k.is_dir() => 'd',
                k if k.is_symlink() => 'l',
                k if k.is_hard_link() => 'h',
                _ => 'f',
            };
            let extra = match e.link_name().unwrap() {
                Some(t) => t.to_string_lossy().into_owned(),
                None => {
                    let mut s = String::new();
                    e.read_to_string(&mut s).unwrap();
                    s
                }
            };
            (
                e.path().unwrap().to_string_lossy().into_owned(),
                tag,
                e.header().mode().unwrap() & 0o7777,
                extra,
            )
        })
        .collect()
}

#[test]
fn pack_rebases_keeps_modes_and_links_and_unpack_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    // What the executor fetches for `.cargo/registry` (entries start with the base name) and `out`.
    let registry = dir.path().join("registry.tar");
    write_tar(
        &registry,
        &[
            Item::Dir("registry"),
            Item::File("registry/bin/tool", 0o755, b"#!/bin/sh\n"),
            Item::Symlink("registry/current", "bin/tool"),
            Item::Symlink("registry/up", "../../outside-of-cargo-but-inside"),
            Item::Symlink("registry/escape", "../../../etc/passwd"),
            Item::Symlink("registry/abs", "/etc/passwd"),
            Item::HardLink("registry/tool-again", "registry/bin/tool"),
        ],
    );
    let out = dir.path().join("out.tar");
    write_tar(&out, &[Item::File("out", 0o600, b"result")]);
    let archive = dir.path().join("cache.tar.zst");
    let stats = pack(
        &[(registry, ".cargo".to_string()), (out, String::new())],
        &archive,
    )
    .unwrap();
    assert_eq!(
        stats.skipped,
        vec![".cargo/registry/escape", ".cargo/registry/abs"]
    );
    assert_eq!(stats.entries, 6);
    assert_eq!(stats.content_bytes, 16);

    let plain = dir.path().join("restore.tar");
    let restored = unpack_checked(&archive, &plain).unwrap();
    assert_eq!(restored.entries, 6);
    assert_eq!(
        read_tar(&plain),
        vec![
            (".cargo/registry".into(), 'd', 0o755, String::new()),
            (
                ".cargo/registry/bin/tool".into(),
                'f',
                0o755,
                "#!/bin/sh\n".into()
            ),
            (
                ".cargo/registry/current".into(),
                'l',
                0o777,
                "bin/tool".into()
            ),
            (
                ".cargo/registry/up".into(),
                'l',
                0o777,
                "../../outside-of-cargo-but-inside".into()
            ),
            (
                ".cargo/registry/tool-again".into(),
                'h',
                0o777,
                ".cargo/registry/bin/tool".into()
            ),
            ("out".into(), 'f', 0o600, "result".into()),
        ]
    );
}

/// A zstd-compressed tar of `items`, as a (tampered) cache archive.
fn archive_of(dir: &Path, items: &[Item<'_>]) -> PathBuf {
    let tar_path = dir.join("raw.tar");
    write_tar(&tar_path, items);
    let zst = dir.join("raw.tar.zst");
    let data = std::fs::read(&tar_path).unwrap();
    std::fs::write(&zst, zstd::encode_all(&data[..], 1).unwrap()).unwrap();
    zst
}

#[test]
fn unpack_rejects_every_way_out_of_the_workspace() {
    let cases: Vec<(Vec<Item<'_>>, &str)> = vec![
        (vec![Item::File("../x", 0o644, b"x")], "climbs out"),
        (vec![Item::File("/etc/x", 0o644, b"x")], "is absolute"),
        (
            vec![
                Item::File("ok", 0o644, b"x"),
                Item::File("a/../../x", 0o644, b"x"),
            ],
            "climbs out",
        ),
        (vec![Item::Symlink("l", "../x")], "outside the workspace"),
        (
            vec![Item::Symlink("a/b/l", "../../../x")],
            "outside the workspace",
        ),
        (vec![Item::Symlink("l", "/etc")], "outside the workspace"),
        (
            vec![Item::Symlink("l", "sub"), Item::File("l/x", 0o644, b"x")],
            "below a symlink",
        ),
        (vec![Item::HardLink("h", "/etc/passwd")], "hard link"),
        (vec![Item::HardLink("h", "never-written")], "hard link"),
    ];
    for (items, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let zst = archive_of(dir.path(), &items);
        let err = unpack_checked(&zst, &dir.path().join("out.tar")).unwrap_err();
        assert!(matches!(err, CacheError::Escape { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    // Links that stay inside are fine, also through `..`.
    let dir = tempfile::tempdir().unwrap();
    let zst = archive_of(
        dir.path(),
        &[
            Item::Symlink("a/b/l", "../../x"),
            Item::File("x", 0o644, b"x"),
            Item::HardLink("y", "x"),
        ],
    );
    assert_eq!(
        unpack_checked(&zst, &dir.path().join("out.tar"))
            .unwrap()
            .entries,
        3
    );
}

#[test]
fn seeded_files_follow_the_extraction_order() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("context.tar");
    write_tar(
        &context,
        &[
            Item::Dir("./src"),
            Item::File("./Cargo.lock", 0o644, b"v1"),
            Item::File("src/main.rs", 0o644, b"fn main() {}"),
            Item::File("gone", 0o644, b"x"),
        ],
    );
    let inputs = dir.path().join("inputs.tar");
    write_tar(
        &inputs,
        &[
            Item::File("Cargo.lock", 0o644, b"v2"),
            Item::Symlink("gone", "src"),
        ],
    );
    let all = [compile_glob("**").unwrap()];
    let files = seeded_files(&[context.clone(), inputs.clone()], &all).unwrap();
    let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
    assert_eq!(
        files,
        BTreeMap::from([
            ("Cargo.lock".to_string(), sha(b"v2")),
            ("src/main.rs".to_string(), sha(b"fn main() {}")),
        ])
    );

    let spec = CacheSpec {
        key: "cargo-{{ hashFiles \"Cargo.lock\" }}-{{ os }}".into(),
        restore_keys: vec!["cargo-".into()],
        paths: vec!["target".into()],
    };
    let only_context = seeded_files(std::slice::from_ref(&context), &all).unwrap();
    let a = render_keys(&spec, &files).unwrap();
    let b = render_keys(&spec, &only_context).unwrap();
    assert!(a.key.starts_with("cargo-"));
    assert!(a.key.ends_with(&format!("-{}", std::env::consts::OS)));
    assert_ne!(a.key, b.key, "a changed Cargo.lock changes the key");
    assert_eq!(a.restore_keys, vec!["cargo-"]);
    // Only what the templates hash is read.
    let globs = hashed_globs(&spec);
    assert_eq!(globs.len(), 1);
    assert_eq!(
        seeded_files(&[context, inputs], &globs).unwrap(),
        BTreeMap::from([("Cargo.lock".to_string(), sha(b"v2"))])
    );
    assert!(hashed_globs(&CacheSpec {
        key: "plain-{{ os }}".into(),
        ..spec.clone()
    })
    .is_empty());

    // A restore key that renders empty is dropped; an empty exact key disables the cache.
    let empty = CacheSpec {
        key: "k".into(),
        restore_keys: vec!["{{ hashFiles \"none\" }}".into(), "k-".into()],
        ..spec.clone()
    };
    assert_eq!(
        render_keys(&empty, &files).unwrap().restore_keys,
        vec!["k-"]
    );
    let empty_key = CacheSpec {
        key: "{{ hashFiles \"none\" }}".into(),
        ..spec.clone()
    };
    assert!(matches!(
        render_keys(&empty_key, &files),
        Err(CacheError::Key(_))
    ));
    let bad = CacheSpec {
        key: "{{ nope }}".into(),
        ..spec.clone()
    };
    assert!(matches!(render_keys(&bad, &files), Err(CacheError::Key(_))));
}

#[test]
fn link_destinations_are_resolved_from_the_link_directory() {
    let at = |p: &str| p.split('/').map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        link_destination(&at("a/b/l"), Path::new("../c")),
        Some(at("a/c"))
    );
    assert_eq!(link_destination(&at("l"), Path::new("./x")), Some(at("x")));
    assert_eq!(link_destination(&at("l"), Path::new("..")), None);
    assert_eq!(link_destination(&at("a/l"), Path::new("/a")), None);
}
