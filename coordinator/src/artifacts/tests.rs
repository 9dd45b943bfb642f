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
