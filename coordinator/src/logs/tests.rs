use std::time::Duration;

use futures::{Stream, StreamExt};

use super::*;

const A: &str = "attempt-1";

fn store() -> (tempfile::TempDir, LogStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path().join("logs")).expect("open store");
    (dir, store)
}

/// Everything a stream yields, failing the test if it takes more than 10 s.
async fn collect(stream: impl Stream<Item = Result<LogPiece, LogError>>) -> Vec<LogPiece> {
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.map(|p| p.expect("piece")).collect(),
    )
    .await
    .expect("stream did not end")
}

fn concat(pieces: &[LogPiece]) -> Vec<u8> {
    pieces.iter().flat_map(|p| p.data.iter().copied()).collect()
}

/// Pieces are contiguous, start at `from`, fit in a chunk, and only the last may be eof.
fn assert_well_formed(pieces: &[LogPiece], from: u64) {
    let mut next = from;
    for (i, piece) in pieces.iter().enumerate() {
        assert_eq!(piece.offset, next, "piece {i} offset");
        assert!(piece.data.len() <= drover_proto::CHUNK_BYTES);
        assert!(
            !piece.eof || i == pieces.len() - 1,
            "eof before the last piece"
        );
        next += piece.data.len() as u64;
    }
}

fn live_entries(store: &LogStore) -> usize {
    store.inner.live.lock().expect("lock").len()
}

/// Wait until `n` logs are live in memory: a spawned follower holds its log from its first poll on.
async fn wait_for_live(store: &LogStore, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while live_entries(store) != n {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("followers did not start");
}

#[tokio::test]
async fn overlapping_resends_are_idempotent_and_byte_identical() {
    let (_dir, store) = store();
    store.append(A, 0, 0, b"hello ", false).await.unwrap();
    // Full resend of what is stored, plus new bytes.
    store.append(A, 0, 0, b"hello wor", false).await.unwrap();
    // Pure resend of a middle part: nothing changes.
    let st = store.append(A, 0, 2, b"llo", false).await.unwrap();
    assert_eq!(
        st,
        LogStatus {
            len: 9,
            complete: false
        }
    );
    // Overlap at the tail.
    let st = store.append(A, 0, 7, b"orld\n", false).await.unwrap();
    assert_eq!(st.len, 12);
    let st = store.sync(A, 0).await.unwrap();
    assert_eq!(
        st,
        LogStatus {
            len: 12,
            complete: false
        }
    );

    let on_disk = stored(&store.dir().join(A).join("0.log"));
    assert_eq!(on_disk, b"hello world\n");
    let pieces = collect(store.read(A, 0, 0, false)).await;
    assert_eq!(concat(&pieces), b"hello world\n");
    assert!(
        !pieces.last().unwrap().eof,
        "an incomplete log must not claim eof"
    );
}

#[tokio::test]
async fn a_gap_is_rejected_and_writes_nothing() {
    let (_dir, store) = store();
    store.append(A, 1, 0, b"abc", false).await.unwrap();
    let err = store.append(A, 1, 5, b"fgh", false).await.unwrap_err();
    assert!(
        matches!(
            err,
            LogError::Gap {
                expected: 3,
                got: 5
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        store.status(A, 1).await.unwrap(),
        LogStatus {
            len: 3,
            complete: false
        }
    );
    // A gap on a log that does not exist yet does not create it either.
    let err = store.append(A, 2, 1, b"x", false).await.unwrap_err();
    assert!(
        matches!(
            err,
            LogError::Gap {
                expected: 0,
                got: 1
            }
        ),
        "{err:?}"
    );
    assert!(!store.dir().join(A).join("2.log").exists());
}

#[tokio::test]
async fn eof_then_identical_resend_is_fine_but_more_data_is_not() {
    let (_dir, store) = store();
    store.append(A, 0, 0, b"one\n", false).await.unwrap();
    let st = store.append(A, 0, 4, b"two\n", true).await.unwrap();
    assert_eq!(
        st,
        LogStatus {
            len: 8,
            complete: true
        }
    );
    // Durable only after sync: status says complete, the durable view comes from sync.
    assert_eq!(
        store.sync(A, 0).await.unwrap(),
        LogStatus {
            len: 8,
            complete: true
        }
    );

    let st = store.append(A, 0, 4, b"two\n", true).await.unwrap();
    assert_eq!(
        st,
        LogStatus {
            len: 8,
            complete: true
        }
    );
    let st = store.append(A, 0, 0, b"one\n", false).await.unwrap();
    assert_eq!(
        st,
        LogStatus {
            len: 8,
            complete: true
        }
    );
    let err = store.append(A, 0, 8, b"three\n", false).await.unwrap_err();
    assert!(matches!(err, LogError::Complete), "{err:?}");
    let err = store
        .append(A, 0, 4, b"two\nthree", true)
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::Complete), "{err:?}");
    let err = store.append(A, 0, 0, b"one\n", true).await.unwrap_err();
    assert!(matches!(err, LogError::Invalid(_)), "{err:?}");
    assert_eq!(stored(&store.dir().join(A).join("0.log")), b"one\ntwo\n");
}

#[tokio::test]
async fn eof_cannot_cut_a_log_short() {
    let (_dir, store) = store();
    store.append(A, 0, 0, b"0123456789", false).await.unwrap();
    let err = store.append(A, 0, 2, b"23", true).await.unwrap_err();
    assert!(matches!(err, LogError::Invalid(_)), "{err:?}");
    assert_eq!(
        store.status(A, 0).await.unwrap(),
        LogStatus {
            len: 10,
            complete: false
        }
    );
}

#[tokio::test]
async fn empty_log_can_be_completed() {
    let (dir, store) = store();
    let st = store.append(A, 3, 0, b"", true).await.unwrap();
    assert_eq!(
        st,
        LogStatus {
            len: 0,
            complete: true
        }
    );
    assert_eq!(
        store.sync(A, 3).await.unwrap(),
        LogStatus {
            len: 0,
            complete: true
        }
    );
    // Nothing on disk but the index: no directory for the attempt, not even in the background.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!dir.path().join("logs").join(A).exists());
    drop(store);
    let store = LogStore::open(dir.path().join("logs")).unwrap();
    assert_eq!(
        store.status(A, 3).await.unwrap(),
        LogStatus {
            len: 0,
            complete: true
        }
    );
    let pieces = collect(store.read(A, 3, 0, true)).await;
    assert_eq!(pieces.len(), 1);
    assert!(pieces[0].eof && pieces[0].data.is_empty());
}

#[tokio::test]
async fn status_survives_reopening_the_store() {
    let (dir, store) = store();
    assert_eq!(store.status(A, 0).await.unwrap(), LogStatus::default());
    store.append(A, 0, 0, b"first step\n", true).await.unwrap();
    store.sync(A, 0).await.unwrap();
    store.append(A, 1, 0, b"partial", false).await.unwrap();
    store.sync(A, 1).await.unwrap();
    // Completed but never synced: the completion is not durable, so it is not reported after a restart.
    store.append(A, 2, 0, b"unsynced", true).await.unwrap();
    drop(store);

    let store = LogStore::open(dir.path().join("logs")).unwrap();
    assert_eq!(
        store.status(A, 0).await.unwrap(),
        LogStatus {
            len: 11,
            complete: true
        }
    );
    assert_eq!(
        store.status(A, 1).await.unwrap(),
        LogStatus {
            len: 7,
            complete: false
        }
    );
    assert_eq!(
        store.status(A, 2).await.unwrap(),
        LogStatus {
            len: 8,
            complete: false
        }
    );
    assert_eq!(store.status(A, 9).await.unwrap(), LogStatus::default());
    assert_eq!(
        store.sync(A, 1).await.unwrap(),
        LogStatus {
            len: 7,
            complete: false
        }
    );
    // The agent resumes where the ack said, and the resent eof completes the log.
    store.append(A, 2, 0, b"unsynced", true).await.unwrap();
    assert_eq!(
        store.sync(A, 2).await.unwrap(),
        LogStatus {
            len: 8,
            complete: true
        }
    );
    store.append(A, 1, 7, b" and the rest", true).await.unwrap();
    store.sync(A, 1).await.unwrap();
    let pieces = collect(store.read(A, 1, 0, false)).await;
    assert_eq!(concat(&pieces), b"partial and the rest");
    assert!(pieces.last().unwrap().eof);
}

#[tokio::test]
async fn follow_receives_appends_made_after_it_started_and_ends_on_eof() {
    let (_dir, store) = store();
    let follower = tokio::spawn(collect(store.read(A, 0, 0, true)));
    // Let the follower reach its wait on an absent log.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut expected = Vec::new();
    for i in 0..50u32 {
        let line = format!("line {i}\n");
        store
            .append(A, 0, expected.len() as u64, line.as_bytes(), false)
            .await
            .unwrap();
        expected.extend_from_slice(line.as_bytes());
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    store
        .append(A, 0, expected.len() as u64, b"", true)
        .await
        .unwrap();
    let pieces = follower.await.unwrap();
    assert_well_formed(&pieces, 0);
    assert_eq!(concat(&pieces), expected);
    assert!(pieces.last().unwrap().eof);
}

#[tokio::test]
async fn follow_from_an_offset_in_the_middle() {
    let (_dir, store) = store();
    store.append(A, 0, 0, b"0123456789", false).await.unwrap();
    let follower = tokio::spawn(collect(store.read(A, 0, 4, true)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.append(A, 0, 10, b"abc", true).await.unwrap();
    let pieces = follower.await.unwrap();
    assert_well_formed(&pieces, 4);
    assert_eq!(concat(&pieces), b"456789abc");
    assert!(pieces.last().unwrap().eof);
}

#[tokio::test]
async fn large_logs_come_in_chunk_sized_pieces() {
    let (_dir, store) = store();
    let data: Vec<u8> = (0..(drover_proto::CHUNK_BYTES * 2 + 1000))
        .map(|i| (i % 251) as u8)
        .collect();
    store.append(A, 0, 0, &data, true).await.unwrap();
    let pieces = collect(store.read(A, 0, 0, true)).await;
    assert_eq!(pieces.len(), 3);
    assert_well_formed(&pieces, 0);
    assert_eq!(concat(&pieces), data);
    assert!(pieces[2].eof);
}

#[tokio::test]
async fn reading_without_follow() {
    let (_dir, store) = store();
    // Absent log: nothing, and the stream ends.
    assert!(collect(store.read(A, 0, 0, false)).await.is_empty());
    store.append(A, 0, 0, b"abc", false).await.unwrap();
    let pieces = collect(store.read(A, 0, 1, false)).await;
    assert_eq!(concat(&pieces), b"bc");
    assert!(!pieces.iter().any(|p| p.eof));
    store.append(A, 0, 3, b"", true).await.unwrap();
    let pieces = collect(store.read(A, 0, 0, false)).await;
    assert_eq!(concat(&pieces), b"abc");
    assert!(pieces.last().unwrap().eof);
    // Past the end of a complete log: one empty eof piece.
    let pieces = collect(store.read(A, 0, 100, true)).await;
    assert_eq!(pieces.len(), 1);
    assert!(pieces[0].eof && pieces[0].data.is_empty());
}

#[tokio::test]
async fn abandon_marks_incomplete_logs_and_ends_followers() {
    let (dir, store) = store();
    store.append(A, 0, 0, b"done\n", true).await.unwrap();
    store.append(A, 1, 0, b"half a li", false).await.unwrap();
    let follow_partial = tokio::spawn(collect(store.read(A, 1, 0, true)));
    let follow_absent = tokio::spawn(collect(store.read(A, 2, 0, true)));
    // Steps 0 and 1 hold unsynced bytes; step 2 is live only through its follower.
    wait_for_live(&store, 3).await;

    // Step 3 started but nothing of it arrived; step 4 never started.
    store
        .abandon(A, &[true, true, false, true, false], "agent lost")
        .await
        .unwrap();

    let marker = b"\n[drover] log incomplete: agent lost\n";
    let partial = follow_partial.await.unwrap();
    let expected = [&b"half a li"[..], marker].concat();
    assert_eq!(concat(&partial), expected);
    assert!(partial.last().unwrap().eof);
    let absent = follow_absent.await.unwrap();
    assert_eq!(absent.len(), 1);
    assert!(absent[0].eof && absent[0].data.is_empty());

    // Durable: after a restart, the finished step is untouched, the partial one and the silent
    // one that ran are complete with the marker, and steps that never started are complete and
    // empty, without a file.
    drop(store);
    let store = LogStore::open(dir.path().join("logs")).unwrap();
    let status = |len: usize| LogStatus {
        len: len as u64,
        complete: true,
    };
    assert_eq!(store.status(A, 0).await.unwrap(), status(5));
    assert_eq!(store.status(A, 1).await.unwrap(), status(expected.len()));
    assert_eq!(stored(&store.dir().join(A).join("1.log")), expected);
    assert_eq!(store.status(A, 3).await.unwrap(), status(marker.len()));
    assert_eq!(stored(&store.dir().join(A).join("3.log")), marker);
    for never_started in [2, 4] {
        assert_eq!(store.status(A, never_started).await.unwrap(), status(0));
        assert!(!store
            .dir()
            .join(A)
            .join(format!("{never_started}.log"))
            .exists());
    }
    // A late chunk from the lost agent cannot extend the abandoned log.
    let late = vec![b'x'; 100];
    let err = store.append(A, 1, 9, &late, false).await.unwrap_err();
    assert!(matches!(err, LogError::Complete), "{err:?}");
    // One that falls inside the stored bytes counts as a resend and changes nothing.
    store.append(A, 1, 9, b"ne\n", false).await.unwrap();
    assert_eq!(stored(&store.dir().join(A).join("1.log")), expected);
}

/// A follower that arrives after an abandoned step's entry has left memory still finds the log
/// complete (the completion of a step that never started used to live in that entry only, and a
/// `drover run --follow` that looked at the log just then waited for it for good).
#[tokio::test]
async fn a_never_started_step_stays_complete_after_its_entry_leaves_memory() {
    let (_dir, store) = store();
    store.attempt_started(A, 2);
    store.abandon(A, &[false, false], "canceled").await.unwrap();
    wait_for_live(&store, 0).await;
    for step in 0..2 {
        assert_eq!(
            store.status(A, step).await.unwrap(),
            LogStatus {
                len: 0,
                complete: true
            }
        );
        let pieces = tokio::time::timeout(
            Duration::from_secs(10),
            collect(store.read(A, step, 0, true)),
        )
        .await
        .expect("a follower of an abandoned step that never started must end");
        assert_eq!(pieces.len(), 1);
        assert!(pieces[0].eof && pieces[0].data.is_empty());
    }
}

#[tokio::test]
async fn bad_attempt_ids_are_rejected() {
    let (dir, store) = store();
    for bad in [
        "",
        "..",
        "../escape",
        "a/b",
        "a\\b",
        "a b",
        "é",
        &"x".repeat(129),
    ] {
        let err = store.append(bad, 0, 0, b"x", false).await.unwrap_err();
        assert!(matches!(err, LogError::Invalid(_)), "{bad:?}: {err:?}");
        assert!(matches!(
            store.status(bad, 0).await,
            Err(LogError::Invalid(_))
        ));
        assert!(matches!(
            store.abandon(bad, &[true], "r").await,
            Err(LogError::Invalid(_))
        ));
        let mut stream = Box::pin(store.read(bad, 0, 0, true));
        assert!(matches!(
            stream.next().await,
            Some(Err(LogError::Invalid(_)))
        ));
        assert!(stream.next().await.is_none());
    }
    assert!(!dir.path().join("escape").exists());
}

#[tokio::test]
async fn memory_holds_only_logs_in_use() {
    let (_dir, store) = store();
    store.append(A, 0, 0, b"abc", false).await.unwrap();
    // Unsynced bytes keep the entry (and its durability bookkeeping) in memory.
    assert_eq!(live_entries(&store), 1);
    store.sync(A, 0).await.unwrap();
    assert_eq!(live_entries(&store), 0);
    let follower = tokio::spawn(collect(store.read(A, 0, 0, true)));
    wait_for_live(&store, 1).await;
    store.append(A, 0, 3, b"", true).await.unwrap();
    store.sync(A, 0).await.unwrap();
    assert_eq!(concat(&follower.await.unwrap()), b"abc");
    assert_eq!(live_entries(&store), 0);
    assert_eq!(
        store.status(A, 0).await.unwrap(),
        LogStatus {
            len: 3,
            complete: true
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_followers_see_every_byte_exactly_once() {
    let (_dir, store) = store();
    let followers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(collect(store.read(A, 0, 0, true))))
        .collect();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..500u32 {
                let chunk = format!("{i:05}|");
                // Every other chunk is resent with an overlap, as after a reconnect.
                let from = written.len().saturating_sub(if i % 2 == 0 { 3 } else { 0 });
                written.extend_from_slice(chunk.as_bytes());
                store
                    .append(A, 0, from as u64, &written[from..], false)
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    store.sync(A, 0).await.unwrap();
                }
            }
            store
                .append(A, 0, written.len() as u64, b"", true)
                .await
                .unwrap();
            store.sync(A, 0).await.unwrap();
            written
        })
    };
    let written = writer.await.unwrap();
    for follower in followers {
        let pieces = follower.await.unwrap();
        assert_well_formed(&pieces, 0);
        assert_eq!(concat(&pieces), written);
    }
}

/// The bytes stored for a log, whether still plain or already compressed in the background.
fn stored(log: &std::path::Path) -> Vec<u8> {
    match std::fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let zst = super::compress::zst_path(log);
            zstd::decode_all(std::fs::File::open(&zst).unwrap()).unwrap()
        }
        Err(e) => panic!("reading {}: {e}", log.display()),
    }
}

/// Waits until the log's plain file is gone and its compressed one is in place.
async fn wait_compressed(log: &std::path::Path) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while log.exists() || !super::compress::zst_path(log).exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the log was not compressed");
}

/// Stores written before the journal (a `.done` marker beside each complete log, compressed or not)
/// still read the same, and their incomplete logs can still be finished.
#[tokio::test]
async fn logs_of_a_store_with_done_markers_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("logs");
    let att = root.join(A);
    std::fs::create_dir_all(&att).unwrap();
    std::fs::write(att.join("0.log"), b"plain and complete\n").unwrap();
    std::fs::write(att.join("0.done"), b"19").unwrap();
    // Compressed by the old code: no length in the frame header, the marker says it.
    super::compress::write_compressed(&att.join("1.log.zst"), b"compressed\n").unwrap();
    std::fs::write(att.join("1.done"), b"11").unwrap();
    std::fs::write(att.join("2.log"), b"still going").unwrap();
    let store = LogStore::open(&root).unwrap();
    let status = |len, complete| LogStatus { len, complete };
    assert_eq!(store.status(A, 0).await.unwrap(), status(19, true));
    assert_eq!(store.status(A, 1).await.unwrap(), status(11, true));
    assert_eq!(store.status(A, 2).await.unwrap(), status(11, false));
    assert_eq!(
        concat(&collect(store.read(A, 0, 0, false)).await),
        b"plain and complete\n"
    );
    assert_eq!(
        concat(&collect(store.read(A, 1, 4, true)).await),
        b"ressed\n"
    );
    store.append(A, 2, 11, b"\n", true).await.unwrap();
    assert_eq!(store.sync(A, 2).await.unwrap(), status(12, true));
    // A legacy complete log is compressed when touched again, and reads the same.
    assert_eq!(store.sync(A, 0).await.unwrap(), status(19, true));
    wait_compressed(&att.join("0.log")).await;
    wait_compressed(&att.join("2.log")).await;
    drop(store);
    let store = LogStore::open(&root).unwrap();
    assert_eq!(store.status(A, 0).await.unwrap(), status(19, true));
    assert_eq!(
        concat(&collect(store.read(A, 2, 0, true)).await),
        b"still going\n"
    );
}

/// The states a coordinator killed at any point of completing and compressing a log leaves on disk:
/// each recovers to the acknowledged bytes and the right completion.
#[tokio::test]
async fn crash_states_of_completion_and_compression_recover() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("logs");
    let att = root.join(A);
    std::fs::create_dir_all(&att).unwrap();
    // Completion recorded, then more bytes written by a late append that was never acknowledged.
    std::fs::write(att.join("0.log"), b"acked\nnot acked").unwrap();
    // Data synced and acknowledged but the completion record torn by the crash: incomplete.
    std::fs::write(att.join("1.log"), b"0123456789").unwrap();
    // Compressed and renamed, the plain file not removed yet.
    std::fs::write(att.join("2.log"), b"both forms\n").unwrap();
    super::compress::compress(&att.join("2.log"), 11).unwrap();
    // An empty log completed in the journal, never compressed.
    std::fs::write(
        root.join(journal::JOURNAL),
        b"attempt-1 0 6 end\nattempt-1 3 0 end\nattempt-1 1 10 en",
    )
    .unwrap();
    let store = LogStore::open(&root).unwrap();
    let status = |len, complete| LogStatus { len, complete };
    assert_eq!(store.status(A, 0).await.unwrap(), status(6, true));
    assert_eq!(
        concat(&collect(store.read(A, 0, 0, true)).await),
        b"acked\n"
    );
    assert_eq!(store.status(A, 1).await.unwrap(), status(10, false));
    assert_eq!(store.status(A, 2).await.unwrap(), status(11, true));
    assert!(!att.join("2.log").exists(), "the leftover plain file goes");
    assert_eq!(
        concat(&collect(store.read(A, 2, 0, false)).await),
        b"both forms\n"
    );
    assert_eq!(store.status(A, 3).await.unwrap(), status(0, true));
    // The agent resends step 1's end; every non-empty completed log ends up compressed; the empty
    // one never gets a file.
    store.append(A, 1, 0, b"0123456789", true).await.unwrap();
    assert_eq!(store.sync(A, 1).await.unwrap(), status(10, true));
    assert_eq!(store.sync(A, 0).await.unwrap(), status(6, true));
    assert_eq!(store.sync(A, 3).await.unwrap(), status(0, true));
    for step in [0, 1] {
        wait_compressed(&att.join(format!("{step}.log"))).await;
    }
    drop(store);
    let store = LogStore::open(&root).unwrap();
    assert!(
        !root.join(journal::JOURNAL).exists(),
        "the text journal was imported"
    );
    assert!(!att.join("3.log").exists() && !att.join("3.log.zst").exists());
    assert_eq!(store.status(A, 0).await.unwrap(), status(6, true));
    assert_eq!(store.status(A, 1).await.unwrap(), status(10, true));
    assert_eq!(store.status(A, 3).await.unwrap(), status(0, true));
    assert!(collect(store.read(A, 3, 0, true)).await[0].eof);
}

/// Many logs completing at once all become durable and complete, and the journal's flushes are
/// shared: far fewer flushes than completions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_completions_are_all_durable() {
    let (dir, store) = store();
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let attempt = format!("att-{i}");
            let data = format!("log {i}\n");
            store
                .append(&attempt, 0, 0, data.as_bytes(), true)
                .await
                .unwrap();
            store.append(&attempt, 1, 0, b"", true).await.unwrap();
            assert!(store.sync(&attempt, 0).await.unwrap().complete);
            assert!(store.sync(&attempt, 1).await.unwrap().complete);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let flushes = store.inner.journal.flushes().await;
    // 600 completions and 300 new directories (compression adds at most one flush per log).
    assert!(flushes < 600, "{flushes} journal flushes");
    drop(store);
    let store = LogStore::open(dir.path().join("logs")).unwrap();
    for i in 0..300u32 {
        let attempt = format!("att-{i}");
        let st = store.status(&attempt, 0).await.unwrap();
        assert_eq!(
            (st.len, st.complete),
            (format!("log {i}\n").len() as u64, true)
        );
        assert!(store.status(&attempt, 1).await.unwrap().complete);
    }
}

/// Pieces appended together land one after the other; a resend overlapping several pieces writes
/// only the bytes past the stored end.
#[tokio::test]
async fn pieces_are_appended_in_order_and_resends_skip_what_is_stored() {
    let (_dir, store) = store();
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 13 % 251) as u8).collect();
    let pieces = |from: usize, cuts: &[usize]| -> Vec<bytes::Bytes> {
        let mut out = Vec::new();
        let mut at = from;
        for &cut in cuts {
            out.push(bytes::Bytes::copy_from_slice(&data[at..cut]));
            at = cut;
        }
        out
    };
    store
        .append_pieces(A, 0, 0, pieces(0, &[100, 100, 250, 400]), false)
        .await
        .unwrap();
    // Starts inside the first piece's range and covers the next stored piece entirely.
    let status = store
        .append_pieces(A, 0, 50, pieces(50, &[120, 300, 300, 700, 1000]), true)
        .await
        .unwrap();
    assert_eq!(
        status,
        LogStatus {
            len: 1000,
            complete: true
        }
    );
    store.sync(A, 0).await.unwrap();
    let got = collect(store.read(A, 0, 0, false)).await;
    assert_eq!(concat(&got), data);
}

#[tokio::test]
async fn logs_of_a_fresh_attempt_start_empty_and_reload_from_disk_once_evicted() {
    let (dir, store) = store();
    store.attempt_started(A, 3);
    // Step 0 takes the fast start, is written, synced and evicted (no handle left, nothing unsynced).
    store.append(A, 0, 0, b"hello ", false).await.unwrap();
    let s = store.sync(A, 0).await.unwrap();
    assert_eq!((s.len, s.complete), (6, false));
    assert_eq!(live_entries(&store), 0);
    // Opened again, it is read from the disk: the fresh mark was used up by the first open.
    store.append(A, 0, 6, b"world", true).await.unwrap();
    let s = store.sync(A, 0).await.unwrap();
    assert_eq!((s.len, s.complete), (11, true));
    // An empty step completes without a file, like any empty log.
    store.append(A, 1, 0, b"", true).await.unwrap();
    assert!(store.sync(A, 1).await.unwrap().complete);
    // Once the attempt ends, its unopened step is looked up on the disk like any other log.
    store.attempt_ended(A);
    assert!(store.inner.fresh.lock().unwrap().is_empty());
    let s = store.status(A, 2).await.unwrap();
    assert_eq!((s.len, s.complete), (0, false));

    // A reopened store knows nothing fresh: everything comes back from the disk.
    drop(store);
    let store = LogStore::open(dir.path().join("logs")).expect("reopen");
    let body = concat(&collect(store.read(A, 0, 0, false)).await);
    assert_eq!(body, b"hello world");
    assert!(store.status(A, 1).await.unwrap().complete);
}

#[test]
fn every_step_of_a_fresh_attempt_is_fresh_once() {
    let (_dir, store) = store();
    store.attempt_started(A, 2);
    assert!(store.take_fresh(A, 1));
    assert!(!store.take_fresh(A, 1));
    assert!(!store.take_fresh(A, 7));
    assert!(store.take_fresh(A, 0));
    // The last one taken forgets the attempt.
    assert!(store.inner.fresh.lock().unwrap().is_empty());
    store.attempt_started("other", 0);
    assert!(store.inner.fresh.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_completed_log_reads_complete_from_the_disk_after_a_restart() {
    let (dir, store) = store();
    store.append(A, 0, 0, b"out\n", true).await.unwrap();
    assert!(store.sync(A, 0).await.unwrap().complete);
    store
        .append(A, 1, 0, b"still running", false)
        .await
        .unwrap();
    store.sync(A, 1).await.unwrap();
    assert!(!store.status(A, 1).await.unwrap().complete);
    // A new process knows nothing from memory; the disk still says complete.
    drop(store);
    let store = LogStore::open(dir.path().join("logs")).expect("reopen");
    let s = store.status(A, 0).await.unwrap();
    assert_eq!((s.len, s.complete), (4, true));
    assert!(!store.status(A, 1).await.unwrap().complete);
}

#[tokio::test]
async fn the_status_of_a_recently_completed_log_comes_from_memory() {
    let (dir, store) = store();
    store.append(A, 0, 0, b"", true).await.unwrap();
    assert!(store.sync(A, 0).await.unwrap().complete);
    assert_eq!(live_entries(&store), 0);
    // Where the attempt's directory would be, a plain file: any look at the disk for this log now
    // fails ("not a directory"), so only memory can answer.
    std::fs::write(dir.path().join("logs").join(A), b"in the way").unwrap();
    let s = store.status(A, 0).await.unwrap();
    assert_eq!((s.len, s.complete), (0, true));
    // A log memory knows nothing about is still looked up on the disk, and says what failed.
    let err = store.status(A, 1).await.unwrap_err();
    assert!(err.to_string().contains(A), "{err}");
}
