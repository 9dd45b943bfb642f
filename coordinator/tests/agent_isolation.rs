//! An agent's credential reaches only the attempts assigned to it: another agent's attempt's logs,
//! artifacts and blobs are refused, and secrets travel only in the Assignment of the job naming them.

mod common;

use common::{authed, control, start, FakeAgent, T};
use drover_proto::v1 as pb;
use drover_proto::v1::agent_service_client::AgentServiceClient;
use tonic::Code;

/// The status of a client-streaming or bidi call: refused at open, or as the first answer.
async fn first_error<S: std::fmt::Debug>(
    r: Result<tonic::Response<tonic::Streaming<S>>, tonic::Status>,
) -> tonic::Status {
    match r {
        Err(s) => s,
        Ok(resp) => tokio::time::timeout(T, resp.into_inner().message())
            .await
            .expect("an answer")
            .expect_err("refused"),
    }
}

#[tokio::test]
async fn an_agent_cannot_touch_another_agents_attempt_and_secrets_go_only_to_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut admin = control(&server).await;
    admin
        .set_secret(pb::SetSecretRequest {
            name: "TOK".into(),
            value: b"only-for-a-9f3".to_vec(),
        })
        .await
        .unwrap();
    let mut a = FakeAgent::enroll(&server, &[("who", "a")], 1).await;
    let mut b = FakeAgent::enroll(&server, &[("who", "b")], 1).await;
    a.attach().await;
    b.attach().await;
    let run = admin
        .submit_run(pb::SubmitRunRequest {
            pipeline: "jobs:\n  ja:\n    agents: { who: a }\n    secrets: [TOK]\n    steps: [{ image: x, commands: [true] }]\n    artifacts: [out.txt]\n  jb:\n    agents: { who: b }\n    steps: [{ image: x, commands: [true] }]\n".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let ja = a.assignment().await;
    let jb = b.assignment().await;
    assert_eq!(ja.job, "ja");
    assert_eq!(jb.job, "jb");
    assert_eq!(
        ja.secrets.get("TOK").map(String::as_str),
        Some("only-for-a-9f3")
    );
    assert!(jb.secrets.is_empty(), "{:?}", jb.secrets);

    // B, with its own valid credential, against A's attempt.
    let mut b_client = AgentServiceClient::connect(server.url()).await.unwrap();
    let chunk = pb::LogChunk {
        attempt_id: ja.attempt_id.clone(),
        epoch: ja.epoch,
        step_index: 0,
        offset: 0,
        data: b"forged\n".to_vec().into(),
        eof: true,
        ..Default::default()
    };
    let logs = first_error(
        b_client
            .push_logs(authed(&b.cred, tokio_stream::iter(vec![chunk])))
            .await,
    )
    .await;
    assert_eq!(logs.code(), Code::PermissionDenied, "{logs:?}");

    let header = pb::ArtifactHeader {
        attempt_id: ja.attempt_id.clone(),
        epoch: ja.epoch,
        path: "out.txt".into(),
        mode: 0o644,
        size: 3,
        digest: "0".repeat(64),
        ..Default::default()
    };
    let upload = b_client
        .upload_artifact(authed(
            &b.cred,
            tokio_stream::iter(vec![
                pb::ArtifactChunk {
                    part: Some(pb::artifact_chunk::Part::Header(header)),
                },
                pb::ArtifactChunk {
                    part: Some(pb::artifact_chunk::Part::Data(b"bad".to_vec())),
                },
            ]),
        ))
        .await
        .unwrap_err();
    assert_eq!(upload.code(), Code::PermissionDenied, "{upload:?}");

    let blob = first_error(
        b_client
            .download_blob(authed(
                &b.cred,
                pb::BlobRequest {
                    attempt_id: ja.attempt_id.clone(),
                    digest: "0".repeat(64),
                    ..Default::default()
                },
            ))
            .await,
    )
    .await;
    assert_eq!(blob.code(), Code::PermissionDenied, "{blob:?}");

    // A's own writes still work, and nothing B sent ended up in A's log.
    a.run_ok(&ja).await;
    b.run_ok(&jb).await;
    let done = common::wait_run(&mut admin, &run).await;
    assert_eq!(done.state(), pb::RunState::Succeeded, "{done:#?}");
    let mut log = admin
        .follow_logs(pb::FollowLogsRequest {
            run_id: run.clone(),
            job: "ja".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(ev) = log.message().await.unwrap() {
        text.extend(ev.data);
    }
    assert_eq!(String::from_utf8_lossy(&text), "ja step 0\n");
}

/// Sends raw bytes as gRPC messages, so a test can be the hostile agent that sends what no proto encoder
/// would produce.
mod raw {
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    #[derive(Debug, Clone, Copy, Default)]
    pub(crate) struct RawCodec;
    #[derive(Debug)]
    pub(crate) struct RawEnc;
    #[derive(Debug)]
    pub(crate) struct RawDec;

    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let n = src.remaining();
            Ok(Some(src.copy_to_bytes(n).to_vec()))
        }
    }

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }
}

/// Streams `messages` (raw bytes) to AgentService method `method` with `cred`; the first error status.
async fn raw_call(
    url: &str,
    cred: &str,
    method: &'static str,
    messages: Vec<Vec<u8>>,
) -> tonic::Status {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let r = grpc
        .streaming(
            authed(cred, tokio_stream::iter(messages)),
            path,
            raw::RawCodec,
        )
        .await;
    match r {
        Err(s) => s,
        Ok(resp) => match tokio::time::timeout(T, resp.into_inner().message())
            .await
            .expect("an answer")
        {
            Err(s) => s,
            // Shown by the caller's assertion: the call was not refused.
            Ok(m) => tonic::Status::new(Code::Ok, format!("{method}: not refused, answered {m:?}")),
        },
    }
}

/// A hostile agent (valid credential) sends undecodable, oversized and out-of-order messages: each gets a
/// clear status, the coordinator does not panic, and another agent's job runs to success meanwhile.
#[tokio::test]
async fn hostile_agent_messages_get_clear_errors_and_do_not_disturb_other_jobs() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let mut admin = control(&server).await;
    let mut good = FakeAgent::enroll(&server, &[("who", "good")], 1).await;
    let mut evil = FakeAgent::enroll(&server, &[("who", "evil")], 1).await;
    good.attach().await;
    evil.attach().await;
    let run = admin
        .submit_run(pb::SubmitRunRequest {
            pipeline: "jobs:\n  g:\n    agents: { who: good }\n    steps: [{ image: x, commands: [true] }, { image: x, commands: [true] }]\n  e:\n    agents: { who: evil }\n    steps: [{ image: x, commands: [true] }]\n".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let g = good.assignment().await;
    let e = evil.assignment().await;
    let url = server.url();

    // Undecodable bytes (a field with wire type 7 does not exist) on each client stream.
    for method in [
        "/drover.v1.AgentService/PushLogs",
        "/drover.v1.AgentService/UploadArtifact",
        "/drover.v1.AgentService/Attach",
    ] {
        let s = raw_call(&url, &evil.cred, method, vec![vec![0x0f, 0xff, 0xff, 0xff]]).await;
        assert!(
            matches!(s.code(), Code::Internal | Code::InvalidArgument),
            "{method}: {s:?}"
        );
        assert!(!s.message().is_empty(), "{method}: {s:?}");
    }
    // A message over the size limit is refused by size, before it is decoded.
    let huge = pb::LogChunk {
        attempt_id: e.attempt_id.clone(),
        epoch: e.epoch,
        data: vec![b'x'; drover_proto::MAX_MESSAGE_BYTES + 1].into(),
        ..Default::default()
    }
    .encode_to_vec();
    let s = raw_call(
        &url,
        &evil.cred,
        "/drover.v1.AgentService/PushLogs",
        vec![huge],
    )
    .await;
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");

    // Out of order and out of range, each as a well-formed message.
    let chunk = |step: u32, offset: u64| pb::LogChunk {
        attempt_id: e.attempt_id.clone(),
        epoch: e.epoch,
        step_index: step,
        offset,
        data: b"x".to_vec().into(),
        ..Default::default()
    };
    for (what, c) in [
        ("a step the job does not have", chunk(7, 0)),
        ("a gap before the offset", chunk(0, 1_000_000)),
        (
            "a future epoch",
            pb::LogChunk {
                epoch: e.epoch + 5,
                ..chunk(0, 0)
            },
        ),
    ] {
        let s = raw_call(
            &url,
            &evil.cred,
            "/drover.v1.AgentService/PushLogs",
            vec![c.encode_to_vec()],
        )
        .await;
        assert!(
            matches!(
                s.code(),
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange
            ),
            "{what}: {s:?}"
        );
    }
    // An artifact whose data does not match its header.
    let header = pb::ArtifactChunk {
        part: Some(pb::artifact_chunk::Part::Header(pb::ArtifactHeader {
            attempt_id: e.attempt_id.clone(),
            epoch: e.epoch,
            path: "../../etc/passwd".into(),
            mode: 0o644,
            size: 3,
            digest: "0".repeat(64),
            ..Default::default()
        })),
    };
    let s = raw_call(
        &url,
        &evil.cred,
        "/drover.v1.AgentService/UploadArtifact",
        vec![header.encode_to_vec()],
    )
    .await;
    assert!(
        matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition),
        "{s:?}"
    );
    // More data than the header announced is refused at the first byte too many; a header over the
    // artifact limit before any data.
    let header = |size: u64| pb::ArtifactChunk {
        part: Some(pb::artifact_chunk::Part::Header(pb::ArtifactHeader {
            attempt_id: e.attempt_id.clone(),
            epoch: e.epoch,
            path: "out.bin".into(),
            mode: 0o644,
            size,
            digest: "0".repeat(64),
            ..Default::default()
        })),
    };
    let data = pb::ArtifactChunk {
        part: Some(pb::artifact_chunk::Part::Data(vec![0; 1024])),
    };
    let s = raw_call(
        &url,
        &evil.cred,
        "/drover.v1.AgentService/UploadArtifact",
        vec![header(10).encode_to_vec(), data.encode_to_vec()],
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("more data than"), "{s:?}");
    let s = raw_call(
        &url,
        &evil.cred,
        "/drover.v1.AgentService/UploadArtifact",
        vec![header(u64::MAX).encode_to_vec()],
    )
    .await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    // Attach with a heartbeat before its hello.
    let early = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default())),
    };
    let s = raw_call(
        &url,
        &evil.cred,
        "/drover.v1.AgentService/Attach",
        vec![early.encode_to_vec()],
    )
    .await;
    assert!(
        matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition),
        "{s:?}"
    );
    // A result for a step that never started, on the evil agent's live session.
    evil.send(pb::agent_message::Msg::Step(pb::StepUpdate {
        attempt_id: e.attempt_id.clone(),
        epoch: e.epoch,
        step_index: 42,
        finished: true,
        ..Default::default()
    }))
    .await;

    // Meanwhile the good agent's job runs to success, its log intact.
    good.run_ok(&g).await;
    let done = tokio::time::timeout(T, async {
        loop {
            let r = admin
                .get_run(pb::GetRunRequest {
                    run_id: run.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if r.jobs
                .iter()
                .any(|j| j.name == "g" && j.state() == pb::JobState::Succeeded)
            {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the good job finishes");
    assert!(done.jobs.iter().any(|j| j.name == "g"), "{done:#?}");
    let mut log = admin
        .follow_logs(pb::FollowLogsRequest {
            run_id: run.clone(),
            job: "g".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(ev) = log.message().await.unwrap() {
        text.extend(ev.data);
    }
    assert_eq!(String::from_utf8_lossy(&text), "g step 0\ng step 1\n");
    // The coordinator still serves.
    admin
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap();
}
