//! ResolveCache / SaveCache / DownloadBlob of cache archives against a real coordinator: keys are
//! immutable, an upload is verified before it is recorded, and an agent reaches only the caches of
//! the scope of a job it is running now.

mod common;

use common::{authed, control, start, FakeAgent, T};
use drover_proto::v1 as pb;
use drover_proto::v1::agent_service_client::AgentServiceClient;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Code;

const PIPELINE: &str = "jobs:\n  ja:\n    agents: { who: a }\n    cache: { key: k, paths: [x] }\n    steps: [{ image: x, commands: [true] }]\n  jb:\n    agents: { who: b }\n    cache: { key: k, paths: [x] }\n    steps: [{ image: x, commands: [true] }]\n";

fn upload(
    cred: &str,
    a: &pb::Assignment,
    key: &str,
    data: &[u8],
    digest: Option<&str>,
) -> tonic::Request<impl tokio_stream::Stream<Item = pb::CacheChunk>> {
    let digest = digest.map_or_else(|| hex::encode(Sha256::digest(data)), str::to_string);
    let header = pb::CacheHeader {
        attempt_id: a.attempt_id.clone(),
        epoch: a.epoch,
        key: key.into(),
        size: data.len() as u64,
        digest,
    };
    authed(
        cred,
        tokio_stream::iter(vec![
            pb::CacheChunk {
                part: Some(pb::cache_chunk::Part::Header(header)),
            },
            pb::CacheChunk {
                part: Some(pb::cache_chunk::Part::Data(data.to_vec())),
            },
        ]),
    )
}

async fn resolve(
    client: &mut AgentServiceClient<Channel>,
    cred: &str,
    a: &pb::Assignment,
    key: &str,
    restore: &[&str],
) -> Result<pb::ResolveCacheResponse, tonic::Status> {
    client
        .resolve_cache(authed(
            cred,
            pb::ResolveCacheRequest {
                attempt_id: a.attempt_id.clone(),
                epoch: a.epoch,
                key: key.into(),
                restore_keys: restore.iter().map(|s| s.to_string()).collect(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn download(
    client: &mut AgentServiceClient<Channel>,
    cred: &str,
    attempt: &str,
    digest: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut s = client
        .download_blob(authed(
            cred,
            pb::BlobRequest {
                attempt_id: attempt.into(),
                digest: digest.into(),
                offset: 0,
            },
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(c) = tokio::time::timeout(T, s.message())
        .await
        .expect("in time")?
    {
        out.extend_from_slice(&c.data);
    }
    Ok(out)
}

#[tokio::test]
async fn caches_are_immutable_verified_and_scoped_to_running_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut admin = control(&server).await;
    let mut a = FakeAgent::enroll(&server, &[("who", "a")], 2).await;
    let mut b = FakeAgent::enroll(&server, &[("who", "b")], 1).await;
    a.attach().await;
    b.attach().await;
    let one = admin
        .submit_run(pb::SubmitRunRequest {
            pipeline: PIPELINE.into(),
            name: "one.yml".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let ja = a.assignment().await;
    let jb = b.assignment().await;
    assert_eq!(ja.cache.as_ref().map(|c| c.key.as_str()), Some("k"));
    let mut c = AgentServiceClient::connect(server.url()).await.unwrap();

    // Nothing yet; then A saves; the same key again keeps the first entry.
    assert!(
        !resolve(&mut c, &a.cred, &ja, "k-1", &["k-"])
            .await
            .unwrap()
            .found
    );
    let first = c
        .save_cache(upload(&a.cred, &ja, "k-1", b"first", None))
        .await
        .unwrap()
        .into_inner();
    assert!(first.stored);
    let again = c
        .save_cache(upload(&a.cred, &ja, "k-1", b"second", None))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.stored);
    assert_eq!(again.digest, first.digest);

    // A digest that does not match the bytes, or a stale epoch, stores nothing.
    let bad = c
        .save_cache(upload(&a.cred, &ja, "k-2", b"data", Some(&"0".repeat(64))))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let mut stale = ja.clone();
    stale.epoch += 1;
    let e = c
        .save_cache(upload(&a.cred, &stale, "k-2", b"data", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let hit = resolve(&mut c, &a.cred, &ja, "k-2", &["k-"]).await.unwrap();
    assert!(hit.found && !hit.exact, "{hit:?}");
    assert_eq!(hit.key, "k-1");

    // B runs a job of the same pipeline: same scope, it restores A's entry.
    let hit = resolve(&mut c, &b.cred, &jb, "k-1", &[]).await.unwrap();
    assert!(hit.found && hit.exact, "{hit:?}");
    assert_eq!(
        download(&mut c, &b.cred, &jb.attempt_id, &hit.digest)
            .await
            .unwrap(),
        b"first"
    );
    // But not through A's attempt.
    let e = resolve(&mut c, &b.cred, &ja, "k-1", &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .save_cache(upload(&b.cred, &ja, "k-3", b"x", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Another pipeline on A: its own scope sees nothing and cannot download one.yml's archive.
    admin
        .submit_run(pb::SubmitRunRequest {
            pipeline: PIPELINE.into(),
            name: "two.yml".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let jc = a.assignment().await;
    assert!(
        !resolve(&mut c, &a.cred, &jc, "k-1", &["k"])
            .await
            .unwrap()
            .found
    );
    let e = download(&mut c, &a.cred, &jc.attempt_id, &first.digest)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Operators list and delete entries.
    let listed = admin
        .list_caches(pb::ListCachesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .caches;
    let keys: Vec<(&str, &str, &str)> = listed
        .iter()
        .map(|e| (e.scope.as_str(), e.key.as_str(), e.job.as_str()))
        .collect();
    assert_eq!(keys, vec![("one.yml", "k-1", "ja")]);
    // A read token lists; deleting needs admin.
    let mut reader = server
        .control_client(drover_coordinator::access::Role::Read)
        .await
        .unwrap();
    let seen = reader
        .list_caches(pb::ListCachesRequest {
            scope: "one.yml".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .caches;
    assert_eq!(seen.len(), 1);
    let e = reader
        .delete_cache(pb::DeleteCacheRequest {
            scope: "one.yml".into(),
            key: "k-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let deleted = admin
        .delete_cache(pb::DeleteCacheRequest {
            scope: "one.yml".into(),
            key: "k-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert!(
        !resolve(&mut c, &a.cred, &ja, "k-1", &["k"])
            .await
            .unwrap()
            .found
    );

    // Once the job is over, its attempt reaches no cache.
    a.run_ok(&ja).await;
    b.run_ok(&jb).await;
    let done = common::wait_run(&mut admin, &one).await;
    assert_eq!(done.state(), pb::RunState::Succeeded, "{done:#?}");
    let e = resolve(&mut c, &a.cred, &ja, "k-1", &[]).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
}
