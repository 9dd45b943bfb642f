//! Resumable artifact transfers at the protocol level: an upload with an id that stops short is kept,
//! QueryUpload says how much is held, a resume must start exactly there, and downloads start at any
//! offset.

mod common;

use common::{authed, control, start, FakeAgent};
use drover_proto::v1 as pb;
use drover_proto::v1::agent_service_client::AgentServiceClient;
use sha2::{Digest, Sha256};
use tonic::Code;

fn header(a: &pb::Assignment, data: &[u8], upload_id: &str, offset: u64) -> pb::ArtifactChunk {
    pb::ArtifactChunk {
        part: Some(pb::artifact_chunk::Part::Header(pb::ArtifactHeader {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            path: "big.bin".into(),
            mode: 0o644,
            size: data.len() as u64,
            digest: hex::encode(Sha256::digest(data)),
            upload_id: upload_id.into(),
            offset,
        })),
    }
}

fn data_chunks(data: &[u8]) -> Vec<pb::ArtifactChunk> {
    data.chunks(64 * 1024)
        .map(|c| pb::ArtifactChunk {
            part: Some(pb::artifact_chunk::Part::Data(c.to_vec())),
        })
        .collect()
}

#[tokio::test]
async fn an_upload_resumes_from_what_the_coordinator_holds_and_downloads_start_at_an_offset() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut admin = control(&server).await;
    let mut agent = FakeAgent::enroll(&server, &[("os", "linux")], 1).await;
    agent.attach().await;
    let run_id = admin
        .submit_run(pb::SubmitRunRequest {
            pipeline: "jobs:\n  j:\n    steps: [{ image: x, commands: [true] }]\n    artifacts: [big.bin]\n  k:\n    needs: [j]\n    steps: [{ image: x, commands: [true] }]\n".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let a = agent.assignment().await;
    let mut client = AgentServiceClient::connect(server.url()).await.unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let digest = hex::encode(Sha256::digest(&data));
    let cut = 300 * 1024;

    // The first stream stops after `cut` bytes: refused as short, but what arrived is kept.
    let mut first = vec![header(&a, &data, "up-1", 0)];
    first.extend(data_chunks(&data[..cut]));
    let err = client
        .upload_artifact(authed(&agent.cred, tokio_stream::iter(first)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let held = client
        .query_upload(authed(
            &agent.cred,
            pb::UploadQuery {
                upload_id: "up-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .held_bytes;
    assert_eq!(held, cut as u64);

    // A resume from the wrong offset is refused and changes nothing.
    let mut wrong = vec![header(&a, &data, "up-1", 0)];
    wrong.extend(data_chunks(&data));
    let err = client
        .upload_artifact(authed(&agent.cred, tokio_stream::iter(wrong)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&format!("holds {cut} bytes")),
        "{err:?}"
    );

    // From the right offset, only the rest goes up, and the blob is the whole file.
    let mut rest = vec![header(&a, &data, "up-1", cut as u64)];
    rest.extend(data_chunks(&data[cut..]));
    let uploaded = client
        .upload_artifact(authed(&agent.cred, tokio_stream::iter(rest)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uploaded.digest, digest);
    assert_eq!(uploaded.size, data.len() as u64);
    let after = client
        .query_upload(authed(
            &agent.cred,
            pb::UploadQuery {
                upload_id: "up-1".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .held_bytes;
    assert_eq!(after, 0, "a finished upload is not held any more");
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs").join("tmp"))
            .unwrap()
            .count(),
        0
    );

    // Downloads from an offset: the agent's DownloadBlob (for job k, which needs j's artifact) and the
    // client's GetArtifact.
    agent.run_ok(&a).await;
    let k = agent.assignment().await;
    assert_eq!(k.job, "k");
    let mut blob = client
        .download_blob(authed(
            &agent.cred,
            pb::BlobRequest {
                attempt_id: k.attempt_id.clone(),
                digest: digest.clone(),
                offset: 12345,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(c) = blob.message().await.unwrap() {
        got.extend(c.data);
    }
    assert!(got == data[12345..], "DownloadBlob from an offset");
    let mut art = admin
        .get_artifact(pb::GetArtifactRequest {
            run_id: run_id.clone(),
            job: "j".into(),
            path: "big.bin".into(),
            offset: 999_999,
        })
        .await
        .unwrap()
        .into_inner();
    let mut tail = Vec::new();
    while let Some(c) = art.message().await.unwrap() {
        tail.extend(c.data);
    }
    assert_eq!(tail, &data[999_999..]);
    let past = admin
        .get_artifact(pb::GetArtifactRequest {
            run_id,
            job: "j".into(),
            path: "big.bin".into(),
            offset: data.len() as u64 + 1,
        })
        .await;
    let err = match past {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}
