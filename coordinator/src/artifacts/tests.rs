use futures::TryStreamExt;
use sha2::{Digest, Sha256};

use super::*;

fn store() -> (tempfile::TempDir, BlobStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::open(dir.path().join("blobs")).expect("open store");
    (dir, store)
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn tmp_files(store: &BlobStore) -> usize {
    std::fs::read_dir(store.dir().join("tmp")).unwrap().count()
}

async fn put(
    store: &BlobStore,
    data: &[u8],
    expected: Option<&str>,
) -> Result<(String, u64), BlobError> {
    let mut writer = store.writer().await?;
    // Uneven pieces, as a gRPC stream would deliver them.
    for piece in data.chunks(70_001) {
        writer.write(piece).await?;
    }
    writer.finish(expected).await
}

async fn get(store: &BlobStore, digest: &str) -> Result<Vec<Bytes>, BlobError> {
    store.read(digest).await?.try_collect().await
}

fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 256) as u8).collect()
}

#[tokio::test]
async fn round_trip() {
    let (_dir, store) = store();
    let data = sample(drover_proto::CHUNK_BYTES * 2 + 123);
    let expected = sha(&data);
    let (digest, size) = put(&store, &data, Some(&expected)).await.unwrap();
    assert_eq!(digest, expected);
    assert_eq!(size, data.len() as u64);
    assert!(store.exists(&digest).await.unwrap());
    assert_eq!(store.size(&digest).await.unwrap(), data.len() as u64);
    assert!(store
        .dir()
        .join("sha256")
        .join(&digest[..2])
        .join(&digest)
        .is_file());

    let pieces = get(&store, &digest).await.unwrap();
    let sizes: Vec<usize> = pieces.iter().map(Bytes::len).collect();
    assert_eq!(
        sizes,
        [drover_proto::CHUNK_BYTES, drover_proto::CHUNK_BYTES, 123]
    );
    assert_eq!(pieces.concat(), data);
    assert_eq!(tmp_files(&store), 0);
}

#[tokio::test]
async fn without_an_expected_digest_the_computed_one_is_returned() {
    let (_dir, store) = store();
    let (digest, size) = put(&store, b"", None).await.unwrap();
    assert_eq!(digest, sha(b""));
    assert_eq!(size, 0);
    assert!(get(&store, &digest).await.unwrap().is_empty());
}

#[tokio::test]
async fn identical_content_is_stored_once() {
    let (_dir, store) = store();
    let data = sample(5000);
    let first = put(&store, &data, None).await.unwrap();
    let second = put(&store, &data, Some(&first.0)).await.unwrap();
    assert_eq!(first, second);
    let shard = store.dir().join("sha256").join(&first.0[..2]);
    assert_eq!(std::fs::read_dir(&shard).unwrap().count(), 1);
    assert_eq!(tmp_files(&store), 0);
    assert_eq!(get(&store, &first.0).await.unwrap().concat(), data);
}

#[tokio::test]
async fn digest_mismatch_is_rejected_and_leaves_nothing() {
    let (_dir, store) = store();
    let data = sample(1000);
    let wrong = sha(b"something else");
    let err = put(&store, &data, Some(&wrong)).await.unwrap_err();
    match err {
        BlobError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha(&data));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!store.exists(&wrong).await.unwrap());
    assert!(!store.exists(&sha(&data)).await.unwrap());
    assert_eq!(tmp_files(&store), 0);
}

#[tokio::test]
async fn invalid_digests_are_rejected() {
    let (_dir, store) = store();
    let upper = sha(b"x").to_uppercase();
    let short = "abc".to_owned();
    let long = format!("{}0", sha(b"x"));
    let escape = format!("../../{}", &sha(b"x")[6..]);
    let not_hex = "g".repeat(64);
    for bad in [upper, short, long, escape, not_hex, String::new()] {
        assert!(
            matches!(store.exists(&bad).await, Err(BlobError::Invalid(_))),
            "{bad}"
        );
        assert!(
            matches!(store.size(&bad).await, Err(BlobError::Invalid(_))),
            "{bad}"
        );
        assert!(
            matches!(store.read(&bad).await, Err(BlobError::Invalid(_))),
            "{bad}"
        );
        let err = put(&store, b"data", Some(&bad)).await.unwrap_err();
        assert!(matches!(err, BlobError::Invalid(_)), "{bad}: {err:?}");
    }
    assert_eq!(tmp_files(&store), 0);
}

#[tokio::test]
async fn missing_blobs_are_not_found() {
    let (_dir, store) = store();
    let digest = sha(b"never stored");
    assert!(!store.exists(&digest).await.unwrap());
    assert!(matches!(store.size(&digest).await, Err(BlobError::NotFound(d)) if d == digest));
    assert!(matches!(
        store.read(&digest).await,
        Err(BlobError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_dropped_writer_removes_its_upload() {
    let (_dir, store) = store();
    let mut writer = store.writer().await.unwrap();
    writer.write(b"half an upload").await.unwrap();
    assert_eq!(tmp_files(&store), 1);
    drop(writer);
    assert_eq!(tmp_files(&store), 0);
    assert!(!store.exists(&sha(b"half an upload")).await.unwrap());
}

#[tokio::test]
async fn uploads_past_the_size_limit_are_refused() {
    let (_dir, store) = store();
    let store = store.with_max_size(10);
    let mut writer = store.writer().await.unwrap();
    writer.write(b"0123456789").await.unwrap();
    let err = writer.write(b"a").await.unwrap_err();
    assert!(matches!(err, BlobError::TooLarge { limit: 10 }), "{err:?}");
    drop(writer);
    assert_eq!(tmp_files(&store), 0);
    // Exactly at the limit is fine.
    let (_, size) = put(&store, b"0123456789", None).await.unwrap();
    assert_eq!(size, 10);
}

#[tokio::test]
async fn reopening_clears_stale_uploads_and_keeps_blobs() {
    let (dir, store) = store();
    let (digest, _) = put(&store, b"kept", None).await.unwrap();
    std::fs::write(store.dir().join("tmp").join("crashed.part"), b"partial").unwrap();
    drop(store);
    let store = BlobStore::open(dir.path().join("blobs")).unwrap();
    assert_eq!(tmp_files(&store), 0);
    assert_eq!(get(&store, &digest).await.unwrap().concat(), b"kept");
}

fn ticket(id: &str, owner: &str, data: &[u8]) -> UploadTicket {
    UploadTicket {
        upload_id: id.to_owned(),
        owner: owner.to_owned(),
        digest: sha(data),
        size: data.len() as u64,
    }
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[tokio::test]
async fn reads_start_at_any_offset() {
    let (_dir, store) = store();
    let data = sample(drover_proto::CHUNK_BYTES * 2 + 77);
    let (digest, _) = put(&store, &data, None).await.unwrap();
    for offset in [
        0usize,
        1,
        drover_proto::CHUNK_BYTES,
        data.len() - 1,
        data.len(),
    ] {
        let pieces: Vec<Bytes> = store
            .read_from(&digest, offset as u64)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(pieces.concat(), &data[offset..], "offset {offset}");
    }
    let err = store
        .read_from(&digest, data.len() as u64 + 1)
        .await
        .err()
        .expect("an offset past the end is refused");
    assert!(
        matches!(err, BlobError::Invalid(ref m) if m.contains("past the end")),
        "{err}"
    );
}

#[tokio::test]
async fn an_interrupted_upload_is_parked_and_resumed_from_what_it_holds() {
    let (_dir, store) = store();
    let data = sample(300_000);
    let t = ticket("up-1", "agent-a", &data);
    let mut first = store.claim_upload(t.clone(), WAIT).await.unwrap();
    assert_eq!(first.held(), 0);
    first.write(&data[..100_000]).await.unwrap();
    // The connection breaks: the hold is dropped unfinished.
    drop(first);
    assert_eq!(store.open_uploads(), 1);
    assert_eq!(tmp_files(&store), 1);
    assert_eq!(
        store
            .upload_progress("up-1", "agent-a", WAIT)
            .await
            .unwrap(),
        100_000
    );
    // Another agent learns nothing about it and cannot take it over.
    assert_eq!(
        store
            .upload_progress("up-1", "agent-b", WAIT)
            .await
            .unwrap(),
        0
    );
    let err = store
        .claim_upload(ticket("up-1", "agent-b", &data), WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::Invalid(_)), "{err}");

    let mut second = store.claim_upload(t, WAIT).await.unwrap();
    assert_eq!(second.held(), 100_000);
    second.write(&data[100_000..]).await.unwrap();
    let (digest, size) = second.finish(Some(&sha(&data))).await.unwrap();
    assert_eq!(
        (digest.as_str(), size),
        (sha(&data).as_str(), data.len() as u64)
    );
    assert_eq!(store.open_uploads(), 0);
    assert_eq!(tmp_files(&store), 0);
    assert_eq!(get(&store, &digest).await.unwrap().concat(), data);
    // Finished: the id is free again and reports nothing held.
    assert_eq!(
        store
            .upload_progress("up-1", "agent-a", WAIT)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn a_resume_waits_for_the_connection_still_holding_the_upload() {
    let (_dir, store) = store();
    let data = sample(1000);
    let t = ticket("busy", "a", &data);
    let mut holder = store.claim_upload(t.clone(), WAIT).await.unwrap();
    holder.write(&data[..10]).await.unwrap();
    let short = std::time::Duration::from_millis(50);
    assert!(matches!(
        store.claim_upload(t.clone(), short).await,
        Err(BlobError::Busy(_))
    ));
    assert!(matches!(
        store.upload_progress("busy", "a", short).await,
        Err(BlobError::Busy(_))
    ));
    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.claim_upload(t, WAIT).await.map(|u| u.held()) }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(holder);
    assert_eq!(waiter.await.unwrap().unwrap(), 10);
}

#[tokio::test]
async fn discarded_and_expired_uploads_leave_nothing() {
    let (_dir, store) = store();
    let data = sample(1000);
    let mut once = store
        .claim_upload(ticket("once", "a", &data), WAIT)
        .await
        .unwrap();
    once.discard_on_drop();
    once.write(&data[..10]).await.unwrap();
    drop(once);
    assert_eq!((store.open_uploads(), tmp_files(&store)), (0, 0));

    let mut parked = store
        .claim_upload(ticket("parked", "a", &data), WAIT)
        .await
        .unwrap();
    parked.write(&data[..10]).await.unwrap();
    drop(parked);
    assert_eq!(store.sweep_uploads(std::time::Duration::from_secs(3600)), 0);
    assert_eq!((store.open_uploads(), tmp_files(&store)), (1, 1));
    assert_eq!(store.sweep_uploads(std::time::Duration::ZERO), 1);
    assert_eq!((store.open_uploads(), tmp_files(&store)), (0, 0));
}

#[tokio::test]
async fn upload_ids_are_checked() {
    let (_dir, store) = store();
    for bad in ["", "a/b", "../x", &"x".repeat(129)] {
        let err = store
            .claim_upload(ticket(bad, "a", b"d"), WAIT)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Invalid(_)), "{bad:?}: {err}");
    }
}

/// An upload past several background-sync marks: the syncs run beside the writes (one at a time)
/// and the stored blob is the uploaded content.
#[tokio::test]
async fn an_upload_synced_while_it_streams_stores_its_content() {
    let (_dir, store) = store();
    let data = sample(40 << 20);
    let expected = sha(&data);
    let (digest, size) = put(&store, &data, Some(&expected)).await.unwrap();
    assert_eq!(
        (digest.as_str(), size),
        (expected.as_str(), data.len() as u64)
    );
    assert_eq!(get(&store, &digest).await.unwrap().concat(), data);
    assert_eq!(tmp_files(&store), 0);
}

#[tokio::test]
async fn whole_batches_and_a_short_last_one_store_every_byte() {
    // Batches of a MiB go to the file directly (where the file system allows), the short last one
    // through the page cache: the stored blob must not tell the two apart.
    let (_dir, store) = store();
    for len in [(3 << 20) + 123, 1 << 20, 4095, 1] {
        let data: Vec<u8> = sample(len).iter().map(|b| b ^ (len % 251) as u8).collect();
        let expected = sha(&data);
        let (digest, size) = put(&store, &data, Some(&expected)).await.unwrap();
        assert_eq!((digest.as_str(), size), (expected.as_str(), len as u64));
        assert_eq!(get(&store, &digest).await.unwrap().concat(), data, "{len}");
    }
    assert_eq!(tmp_files(&store), 0);
}

#[tokio::test]
async fn a_write_dropped_midway_keeps_exactly_what_the_upload_says_it_holds() {
    // An upload's connection can end while a write waits for the batch before it: the call is then
    // dropped, and a resume sends from `size()` on. Nothing may be lost or counted twice.
    let (_dir, store) = store();
    let data = sample(5 << 20);
    let expected = sha(&data);
    let mut writer = store.writer().await.unwrap();
    let piece = 700_001;
    let mut at = 0;
    while at < data.len() {
        let end = (at + piece).min(data.len());
        // Polled once and dropped: it may finish, stop before the batch it filled is handed on, or
        // never start.
        let _ = futures::FutureExt::now_or_never(writer.write(&data[at..end]));
        at = usize::try_from(writer.size()).unwrap();
        writer.write(&data[at..end.max(at)]).await.unwrap();
        at = usize::try_from(writer.size()).unwrap();
    }
    let (digest, size) = writer.finish(Some(&expected)).await.unwrap();
    assert_eq!(
        (digest.as_str(), size),
        (expected.as_str(), data.len() as u64)
    );
    assert_eq!(get(&store, &digest).await.unwrap().concat(), data);
}

/// A tmpfs of `bytes` mounted over `dir` for the guard's life (needs root: `None` without it).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, bytes: u64) -> Option<Self> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "drover-test"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_owned()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_upload_clearly_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_disk) = SmallDisk::mount(dir.path(), 2 << 20) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let store = BlobStore::open(dir.path().join("blobs")).expect("open store");
    let data = sample(5 << 20);
    let err = put(&store, &data, Some(&sha(&data))).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("write blob upload") && text.contains("No space left on device"),
        "{text}"
    );
    assert_eq!(tmp_files(&store), 0);
    // Room again: the next upload is stored whole.
    let small = sample(100_000);
    let (digest, _) = put(&store, &small, Some(&sha(&small))).await.unwrap();
    assert_eq!(get(&store, &digest).await.unwrap().concat(), small);
}

/// An upload whose digest the agent learns only with its last byte (it streams the file as it
/// reads it) has an empty digest: it parks and resumes like any other, and is stored under the
/// digest of what arrived, which the agent then checks. Another digest for the same id is refused.
#[tokio::test]
async fn an_upload_without_a_digest_is_stored_under_the_digest_of_what_arrived() {
    let (_dir, store) = store();
    let data = sample(300_000);
    let mut t = ticket("streamed-1", "agent-a", &data);
    t.digest = String::new();
    let mut first = store.claim_upload(t.clone(), WAIT).await.unwrap();
    first.write(&data[..123_456]).await.unwrap();
    drop(first);
    let mut other = t.clone();
    other.digest = sha(&data);
    let err = store.claim_upload(other, WAIT).await.unwrap_err();
    assert!(matches!(err, BlobError::Invalid(_)), "{err}");
    let mut second = store.claim_upload(t, WAIT).await.unwrap();
    assert_eq!(second.held(), 123_456);
    second.write(&data[123_456..]).await.unwrap();
    let (digest, size) = second.finish(None).await.unwrap();
    assert_eq!((digest.as_str(), size), (sha(&data).as_str(), 300_000));
    assert_eq!(get(&store, &digest).await.unwrap().concat(), data);
    assert_eq!(tmp_files(&store), 0);
}
