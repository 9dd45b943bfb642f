//! What an agent can send, decoded from arbitrary bytes and handed to the engine the way the AgentService
//! does: Attach messages to the engine's fenced handlers, log chunks to the log store's append (offsets,
//! eof, sizes), artifact headers to the path and digest checks. Errors are fine; panics are not.

#![no_main]

use std::sync::OnceLock;

use drover_coordinator::config::Config;
use drover_coordinator::engine::Engine;
use drover_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

struct World {
    rt: tokio::runtime::Runtime,
    engine: Engine,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let engine = rt
            .block_on(Engine::open(Config::with_data_dir(dir.path())))
            .expect("engine");
        World {
            rt,
            engine,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    w.rt.block_on(async {
        match kind % 3 {
            0 => {
                let Ok(m) = pb::AgentMessage::decode(body) else {
                    return;
                };
                let agent = "agent-fuzz";
                let _ = match m.msg {
                    Some(pb::agent_message::Msg::Accepted(a)) => w.engine.accepted(agent, &a),
                    Some(pb::agent_message::Msg::Step(u)) => w.engine.step_update(agent, u).await,
                    Some(pb::agent_message::Msg::Result(r)) => w.engine.job_result(agent, r).await,
                    _ => Ok(()),
                };
            }
            1 => {
                let Ok(c) = pb::LogChunk::decode(body) else {
                    return;
                };
                let _ = w.engine.check_attempt("agent-fuzz", &c.attempt_id, c.epoch);
                // The store under the fence: a few attempts and steps so appends meet earlier ones.
                let attempt = format!("fuzz-{}", c.attempt_id.len() % 3);
                let _ = w
                    .engine
                    .logs()
                    .append(&attempt, c.step_index % 4, c.offset, &c.data, c.eof)
                    .await;
            }
            _ => {
                let Ok(a) = pb::ArtifactChunk::decode(body) else {
                    return;
                };
                if let Some(pb::artifact_chunk::Part::Header(h)) = a.part {
                    let _ = drover_coordinator::artifacts::validate_digest(&h.digest);
                    let _ = w.engine.check_attempt("agent-fuzz", &h.attempt_id, h.epoch);
                }
            }
        }
    });
});
