use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn step(commands: &[&str]) -> StepRun {
    StepRun {
        index: 0,
        image: "ignored".to_string(),
        commands: commands.iter().map(|c| c.to_string()).collect(),
        env: vec![("GREETING".to_string(), "hello there".to_string())],
        workdir: String::new(),
        nano_cpus: 0,
        memory_bytes: 0,
        privileged: false,
        binds: Vec::new(),
    }
}

fn never() -> std::future::Pending<Duration> {
    std::future::pending()
}

async fn executor() -> (tempfile::TempDir, ShellExecutor, Workspace) {
    let dir = tempfile::tempdir().unwrap();
    let exec = ShellExecutor::new(dir.path().join("shell")).unwrap();
    let ws = exec.create_workspace("agent-1", "att-1").await.unwrap();
    (dir, exec, ws)
}

#[tokio::test]
async fn runs_the_commands_in_the_workspace_with_the_step_env_and_keeps_output_order() {
    let (_dir, exec, ws) = executor().await;
    std::env::set_var("DROVER_SHELL_TEST_AGENT_SECRET", "s3cret");
    let mut out = Vec::new();
    let s = step(&[
        "echo \"$GREETING\"",
        "echo to-stderr >&2",
        "pwd",
        "echo made > file.txt",
        "env",
    ]);
    let end = exec
        .run_step(&ws, &s, &mut out, None, never())
        .await
        .unwrap();
    assert_eq!(
        end,
        StepEnd::Exited {
            code: 0,
            oom_killed: false
        }
    );
    let text = String::from_utf8(out).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hello there"));
    assert_eq!(
        lines.next(),
        Some("to-stderr"),
        "stderr interleaved in order"
    );
    assert_eq!(
        lines.next(),
        Some(ws.volume.as_str()),
        "runs in the workspace"
    );
    assert!(text.contains(&format!("{WORKSPACE_ENV}={}", ws.volume)));
    assert!(
        !text.contains("DROVER_SHELL_TEST_AGENT_SECRET"),
        "the agent's own environment does not leak into steps: {text}"
    );
    let made = std::fs::read_to_string(Path::new(&ws.volume).join("file.txt")).unwrap();
    assert_eq!(made, "made\n");
}

#[tokio::test]
async fn a_failing_command_stops_the_script_with_its_exit_code() {
    let (_dir, exec, ws) = executor().await;
    let mut out = Vec::new();
    let s = step(&["echo before", "exit 7", "echo after"]);
    let end = exec
        .run_step(&ws, &s, &mut out, None, never())
        .await
        .unwrap();
    assert_eq!(
        end,
        StepEnd::Exited {
            code: 7,
            oom_killed: false
        }
    );
    assert_eq!(out, b"before\n");
    let mut out = Vec::new();
    let end = exec
        .run_step(
            &ws,
            &step(&["false", "echo after"]),
            &mut out,
            None,
            never(),
        )
        .await
        .unwrap();
    assert_eq!(
        end,
        StepEnd::Exited {
            code: 1,
            oom_killed: false
        },
        "sh -e"
    );
    assert!(out.is_empty());
}

fn alive(pid: i32) -> bool {
    // A zombie has exited; only a process still running counts.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn the_deadline_kills_the_whole_process_group() {
    let (_dir, exec, ws) = executor().await;
    let mut out = Vec::new();
    let s = step(&["sleep 30 &", "echo $! > bg.pid", "echo started", "sleep 30"]);
    let t0 = Instant::now();
    let end = exec
        .run_step(
            &ws,
            &s,
            &mut out,
            Some(Instant::now() + Duration::from_millis(300)),
            never(),
        )
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(end, StepEnd::TimedOut { code: 137 });
    assert_eq!(out, b"started\n");
    let bg: i32 = std::fs::read_to_string(Path::new(&ws.volume).join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let gone = Instant::now() + Duration::from_secs(5);
    while alive(bg) {
        assert!(Instant::now() < gone, "the background sleep {bg} survived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !exec.pgid_path(&ws.attempt_id).exists(),
        "the process group file goes with the step"
    );
}

#[tokio::test]
async fn a_stop_sends_sigterm_then_sigkill_after_the_grace_period() {
    let (_dir, exec, ws) = executor().await;
    // Handles SIGTERM: exits by itself with its own code.
    let mut out = Vec::new();
    let s = step(&[
        "trap 'echo terminated; exit 3' TERM",
        "echo ready",
        "sleep 30 & wait",
    ]);
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Duration::from_secs(10)
    };
    let t0 = Instant::now();
    let end = exec.run_step(&ws, &s, &mut out, None, stop).await.unwrap();
    assert_eq!(end, StepEnd::Stopped { code: 3 });
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(String::from_utf8_lossy(&out), "ready\nterminated\n");
    // Ignores SIGTERM: killed once the grace period is over.
    let mut out = Vec::new();
    let s = step(&[
        "trap '' TERM",
        "echo ready",
        "while true; do sleep 0.05; done",
    ]);
    let stop = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Duration::from_millis(300)
    };
    let t0 = Instant::now();
    let end = exec.run_step(&ws, &s, &mut out, None, stop).await.unwrap();
    assert_eq!(end, StepEnd::Stopped { code: 137 });
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn archives_go_in_and_come_out_and_paths_stay_in_the_workspace() {
    let (dir, exec, ws) = executor().await;
    let helper = exec.archive_helper(&ws, "ignored").await.unwrap();
    // In: a tar with a file (mode kept) under a directory.
    let tar_in = dir.path().join("in.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tar_in).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o750);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "src/run.sh", &b"hi\n"[..]).unwrap();
        b.finish().unwrap();
    }
    exec.put_archive(&helper, WORKSPACE_DIR, &tar_in)
        .await
        .unwrap();
    let run_sh = Path::new(&ws.volume).join("src/run.sh");
    assert_eq!(std::fs::read(&run_sh).unwrap(), b"hi\n");
    assert_eq!(
        std::fs::metadata(&run_sh).unwrap().permissions().mode() & 0o777,
        0o750
    );
    std::os::unix::fs::symlink("/etc/passwd", Path::new(&ws.volume).join("out")).unwrap();
    let info = exec
        .stat_path(&helper, "/workspace/src")
        .await
        .unwrap()
        .unwrap();
    assert!(info.is_dir && info.link_target.is_none());
    let link = exec
        .stat_path(&helper, "/workspace/out")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(link.link_target.as_deref(), Some("/etc/passwd"));
    assert!(exec
        .stat_path(&helper, "/workspace/nope")
        .await
        .unwrap()
        .is_none());
    // Out: named by the fetched path's last component, as Docker's archives are.
    let tar_out = dir.path().join("out.tar");
    exec.get_archive(&helper, "/workspace/src", &tar_out)
        .await
        .unwrap();
    let mut names: Vec<String> = tar::Archive::new(std::fs::File::open(&tar_out).unwrap())
        .entries()
        .unwrap()
        .map(|e| {
            let name = e.unwrap().path().unwrap().to_string_lossy().into_owned();
            // Directory entries may carry a trailing slash, as in Docker's archives.
            name.trim_end_matches('/').to_string()
        })
        .collect();
    names.sort();
    assert_eq!(names, vec!["src", "src/run.sh"]);
    // The symlink is archived as a link, never followed out of the workspace.
    exec.get_archive(&helper, "/workspace/out", &tar_out)
        .await
        .unwrap();
    let mut archive = tar::Archive::new(std::fs::File::open(&tar_out).unwrap());
    let entry = archive.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(entry.header().entry_type(), tar::EntryType::Symlink);
    assert!(matches!(
        exec.get_archive(&helper, "/workspace/nope", &tar_out).await,
        Err(ExecError::NotFound(_))
    ));
    for bad in ["/etc/passwd", "/workspace/../etc", "/workspacex"] {
        assert!(
            matches!(
                exec.stat_path(&helper, bad).await,
                Err(ExecError::Escape(_))
            ),
            "{bad}"
        );
    }
    exec.remove_helper(helper).await.unwrap();
}

#[tokio::test]
async fn leftovers_of_a_crashed_agent_are_found_and_removed() {
    let (_dir, exec, ws) = executor().await;
    // What a crash leaves: the workspace and the process group of a running step.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()
        .unwrap();
    std::fs::write(exec.pgid_path(&ws.attempt_id), child.id().to_string()).unwrap();
    let mut found = exec.leftovers("agent-1").await.unwrap();
    found.sort_by_key(|l| matches!(l, Leftover::Volume { .. }));
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().all(|l| l.attempt() == "att-1"));
    for l in &found {
        exec.remove_leftover(l).await.unwrap();
    }
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the step's group was killed");
    assert!(!Path::new(&ws.volume).exists());
    assert!(exec.leftovers("agent-1").await.unwrap().is_empty());
}

#[tokio::test]
async fn workspaces_are_removed_and_bad_attempt_ids_refused() {
    let (_dir, exec, ws) = executor().await;
    std::fs::write(Path::new(&ws.volume).join("x"), b"x").unwrap();
    exec.remove_workspace(&ws).await.unwrap();
    assert!(!Path::new(&ws.volume).exists());
    assert!(matches!(
        exec.create_workspace("a", "../up").await,
        Err(ExecError::Escape(_))
    ));
}

#[test]
fn steps_start_their_shell_by_absolute_path() {
    // By name (with a PATH for the child) the standard library would fork the whole agent per step.
    let sh = find_sh();
    assert!(sh.is_absolute(), "{}", sh.display());
    assert!(sh.is_file(), "{}", sh.display());
}
