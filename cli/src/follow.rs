//! `drover run --follow`: live, line-prefixed logs of every job, state changes, and a summary.
//!
//! `WatchRun` says when jobs start and finish; each job that starts gets its own
//! `FollowLogs{follow: true}` stream (all steps). Every piece of output goes through one bounded
//! channel to one printer task, so lines from concurrent jobs never interleave mid-line and a slow
//! terminal slows the log streams down instead of buffering without bound.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use drover_proto::v1::{
    FailureClass, FollowLogsRequest, GetRunRequest, Job, JobState, Run, RunState,
};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tonic::Code;

use crate::client::Coordinator;
use crate::output;

/// A line longer than this is printed in pieces rather than buffered further (a log that never
/// writes a newline must not grow memory without bound).
const MAX_PARTIAL_LINE: usize = 64 * 1024;

/// How long to wait for log streams to drain once the run has finished.
const LOG_DRAIN_GRACE: Duration = Duration::from_secs(30);

/// How many times a dropped `WatchRun` stream is reopened.
const WATCH_RETRIES: u32 = 10;

/// Foreground colours given to jobs in pipeline order (no red: that reads as an error).
const PALETTE: [&str; 10] = ["36", "33", "32", "35", "34", "96", "93", "92", "95", "94"];

/// Whether output gets ANSI colours: only on a terminal, and never with `NO_COLOR` set.
pub(crate) fn use_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Turns a byte stream into complete lines, each starting with a prefix.
///
/// A partial line is held until its newline arrives or [`LinePrefixer::finish`] is called at the
/// end of the step's log (when a newline is added so the next prefix starts a fresh line).
#[derive(Debug)]
pub(crate) struct LinePrefixer {
    prefix: Vec<u8>,
    partial: Vec<u8>,
}

impl LinePrefixer {
    /// A prefixer writing `prefix` before every line.
    pub(crate) fn new(prefix: impl Into<Vec<u8>>) -> Self {
        Self {
            prefix: prefix.into(),
            partial: Vec::new(),
        }
    }

    /// Adds bytes; returns the prefixed complete lines they finish (possibly nothing).
    pub(crate) fn push(&mut self, mut data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            out.extend_from_slice(&self.prefix);
            out.extend_from_slice(&self.partial);
            out.extend_from_slice(&data[..=pos]);
            self.partial.clear();
            data = &data[pos + 1..];
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() >= MAX_PARTIAL_LINE {
            out.extend(self.finish());
        }
        out
    }

    /// Ends the stream: returns the held partial line, prefixed and newline-terminated.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        if self.partial.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.prefix.len() + self.partial.len() + 1);
        out.extend_from_slice(&self.prefix);
        out.append(&mut self.partial);
        out.push(b'\n');
        out
    }
}

/// `job/step | `, coloured when `colour` is given.
fn line_prefix(job: &str, step: &str, colour: Option<&str>) -> String {
    match colour {
        Some(c) => format!("\x1b[{c}m{job}/{step} |\x1b[0m "),
        None => format!("{job}/{step} | "),
    }
}

/// `==> job NAME: text`, coloured like the job's log lines.
fn status_line(job: &str, text: &str, colour: Option<&str>) -> Vec<u8> {
    match colour {
        Some(c) => format!("\x1b[{c}m==> job {job}:\x1b[0m {text}\n").into_bytes(),
        None => format!("==> job {job}: {text}\n").into_bytes(),
    }
}

/// What a terminal job's status line says: `succeeded`, `failed (script, exit 2: ...)`.
fn terminal_text(job: &Job) -> String {
    let state = output::job_state_name(job.state);
    // `canceled (canceled: ...)` says it twice: when the state already names the class, the
    // reason alone explains it.
    let class_is_state =
        job.failure == FailureClass::Canceled as i32 || job.failure == FailureClass::Timeout as i32;
    let outcome = if class_is_state && !job.reason.is_empty() {
        job.reason.clone()
    } else {
        output::job_outcome(job)
    };
    if outcome.is_empty() || job.state == JobState::Succeeded as i32 {
        state.to_string()
    } else {
        format!("{state} ({outcome})")
    }
}

/// Streams one job's logs (all steps) to the printer as prefixed lines.
async fn stream_job_logs(
    coordinator: Coordinator,
    run_id: String,
    job: String,
    colour: Option<&'static str>,
    printer: mpsc::Sender<Vec<u8>>,
) {
    let request = FollowLogsRequest {
        run_id: run_id.clone(),
        job: job.clone(),
        step: String::new(),
        offset: 0,
        follow: true,
        ..Default::default()
    };
    let mut stream = match coordinator.client().follow_logs(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let err = coordinator.error(status, format!("logs of job {job}"));
            eprintln!("drover: {err:#}");
            return;
        }
    };
    // The step being printed: (index, prefixer, next expected offset).
    let mut current: Option<(u32, LinePrefixer, u64)> = None;
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(status) => {
                let err = coordinator.error(status, format!("logs of job {job}"));
                eprintln!("drover: {err:#}");
                break;
            }
        };
        if current.as_ref().map(|c| c.0) != Some(event.step_index) {
            if let Some((_, mut previous, _)) = current.take() {
                if printer.send(previous.finish()).await.is_err() {
                    return;
                }
            }
            let prefix = line_prefix(&event.job, &event.step, colour);
            current = Some((event.step_index, LinePrefixer::new(prefix), event.offset));
        }
        if let Some((_, prefixer, next)) = current.as_mut() {
            // Resent bytes (an overlap with what was printed) are dropped, so output is exact.
            let end = event.offset + event.data.len() as u64;
            if end > *next {
                let skip = next.saturating_sub(event.offset) as usize;
                let lines = prefixer.push(&event.data[skip..]);
                *next = end;
                if !lines.is_empty() && printer.send(lines).await.is_err() {
                    return;
                }
            }
            if event.eof {
                let rest = prefixer.finish();
                current = None;
                if !rest.is_empty() && printer.send(rest).await.is_err() {
                    return;
                }
            }
        }
    }
    if let Some((_, mut prefixer, _)) = current {
        let _ = printer.send(prefixer.finish()).await;
    }
}

/// The tasks a follower starts besides the watch: one log stream per job that ran, and for each
/// job that ended with its log still streaming, a finisher that prints its status line after the
/// last log line.
#[derive(Debug, Default)]
struct Tasks {
    /// Every log stream ever started, to stop them all; a finisher owns its job's `JoinHandle`,
    /// and aborting the finisher only detaches the stream (which holds a sender of the printer).
    log_streams: Vec<AbortHandle>,
    finishers: Vec<JoinHandle<()>>,
}

impl Tasks {
    /// Waits up to `grace` for the log streams to end and the finishers to print, then stops
    /// what is left; returns false if something had to be stopped. Once this returns, no task
    /// holds a sender of the printer.
    async fn drain(self, trackers: HashMap<String, JobTracker>, grace: Duration) -> bool {
        let mut pending: Vec<JoinHandle<()>> = trackers
            .into_values()
            .filter_map(|t| t.logs)
            .chain(self.finishers)
            .collect();
        let drained = tokio::time::timeout(grace, async {
            for handle in pending.iter_mut() {
                let _ = handle.await;
            }
        })
        .await
        .is_ok();
        if !drained {
            for handle in pending
                .iter()
                .map(JoinHandle::abort_handle)
                .chain(self.log_streams)
            {
                handle.abort();
            }
            // An aborted task drops its future (and its printer sender) when the runtime next
            // gets to it: wait for that, so the printer's end is the end of all output.
            for handle in pending.into_iter().filter(|h| !h.is_finished()) {
                let _ = handle.await;
            }
        }
        drained
    }
}

/// What the follower knows about one job.
#[derive(Debug, Default)]
struct JobTracker {
    state: Option<i32>,
    logs: Option<JoinHandle<()>>,
    announced_done: bool,
}

/// Follows a run until it finishes; returns exit 0 only if it succeeded.
pub(crate) async fn follow_run(
    coordinator: &Coordinator,
    run_id: &str,
) -> anyhow::Result<ExitCode> {
    let colour = use_colour();
    let (printer_tx, mut printer_rx) = mpsc::channel::<Vec<u8>>(64);
    let printer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(bytes) = printer_rx.recv().await {
            if stdout.write_all(&bytes).await.is_err() {
                // Stdout closed (e.g. piped into `head`): keep draining so senders never block.
                continue;
            }
            let _ = stdout.flush().await;
        }
    });

    let mut trackers: HashMap<String, JobTracker> = HashMap::new();
    let mut tasks = Tasks::default();
    let mut last: Option<Run> = None;
    let mut retries = 0;
    let watched = 'watch: loop {
        let mut stream = match coordinator
            .client()
            .watch_run(GetRunRequest {
                run_id: run_id.to_string(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => break 'watch Err(status),
        };
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!(
                        "\ndrover: stopped following; run {run_id} keeps running (drover cancel {run_id} stops it)"
                    );
                    return Ok(ExitCode::from(130));
                }
            };
            match next {
                Ok(Some(run)) => {
                    retries = 0;
                    observe(
                        coordinator,
                        &run,
                        colour,
                        &printer_tx,
                        &mut trackers,
                        &mut tasks,
                    )
                    .await;
                    let finished = run.state != RunState::Running as i32
                        && run.state != RunState::Unspecified as i32;
                    last = Some(run);
                    if finished {
                        break 'watch Ok(());
                    }
                }
                // The stream should end only after the final snapshot; an early end (say, the
                // coordinator restarting) is reopened like a dropped connection.
                Ok(None) if retries < WATCH_RETRIES => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue 'watch;
                }
                Ok(None) => break 'watch Ok(()),
                Err(status) if status.code() == Code::Unavailable && retries < WATCH_RETRIES => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue 'watch;
                }
                Err(status) => break 'watch Err(status),
            }
        }
    };
    if let Err(status) = watched {
        return Err(coordinator.error(status, format!("run {run_id}")));
    }

    // Let the log streams of finished jobs drain, then stop whatever is left.
    if !tasks.drain(trackers, LOG_DRAIN_GRACE).await {
        eprintln!("drover: some log streams did not finish in {LOG_DRAIN_GRACE:?}; stopped them");
    }
    drop(printer_tx);
    let _ = printer.await;

    // The final word comes from GetRun: the watch may have ended before its last snapshot.
    let run = match coordinator
        .client()
        .get_run(GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => match last {
            Some(run) => run,
            None => return Err(coordinator.error(status, format!("run {run_id}"))),
        },
    };
    println!();
    println!("run {}: {}", run.id, output::run_state_name(run.state));
    print!("{}", output::jobs_table(&run));
    Ok(if run.state == RunState::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reacts to one run snapshot: announces state changes and starts log streams.
async fn observe(
    coordinator: &Coordinator,
    run: &Run,
    colour: bool,
    printer: &mpsc::Sender<Vec<u8>>,
    trackers: &mut HashMap<String, JobTracker>,
    tasks: &mut Tasks,
) {
    for (index, job) in run.jobs.iter().enumerate() {
        let job_colour = colour.then(|| PALETTE[index % PALETTE.len()]);
        let tracker = trackers.entry(job.name.clone()).or_default();
        let changed = tracker.state != Some(job.state);
        let previous = tracker.state.replace(job.state);
        let ran = job.attempts > 0 || !job.agent_id.is_empty() || job.started_ms > 0;
        let start_logs = |tracker: &mut JobTracker, tasks: &mut Tasks| {
            if tracker.logs.is_none() {
                let handle = tokio::spawn(stream_job_logs(
                    coordinator.clone(),
                    run.id.clone(),
                    job.name.clone(),
                    job_colour,
                    printer.clone(),
                ));
                tasks.log_streams.push(handle.abort_handle());
                tracker.logs = Some(handle);
            }
        };
        if job.state == JobState::Running as i32 {
            if changed {
                let mut text = if job.agent_id.is_empty() {
                    "running".to_string()
                } else {
                    format!("running on agent {}", job.agent_id)
                };
                if job.attempts > 1 {
                    text.push_str(&format!(" (attempt {})", job.attempts));
                }
                let _ = printer
                    .send(status_line(&job.name, &text, job_colour))
                    .await;
            }
            start_logs(tracker, tasks);
        } else if job.state == JobState::Queued as i32 {
            // Only a job going back to the queue is news (an attempt was lost and is retried).
            if changed && previous == Some(JobState::Running as i32) {
                let text = match output::job_outcome(job) {
                    o if o.is_empty() => "queued again".to_string(),
                    o => format!("queued again ({o})"),
                };
                let _ = printer
                    .send(status_line(&job.name, &text, job_colour))
                    .await;
            }
        } else if output::job_is_terminal(job.state) && !tracker.announced_done {
            tracker.announced_done = true;
            // A job that ran between two snapshots still gets its log printed.
            if ran {
                start_logs(tracker, tasks);
            }
            let line = status_line(&job.name, &terminal_text(job), job_colour);
            match tracker.logs.take() {
                // The status line follows the job's last log line.
                Some(logs) => {
                    let printer = printer.clone();
                    tasks.finishers.push(tokio::spawn(async move {
                        let _ = logs.await;
                        let _ = printer.send(line).await;
                    }));
                }
                None => {
                    let _ = printer.send(line).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job's log stream that never ends (its job's finisher waiting on it) is stopped after the
    /// grace, and with it every sender of the printer, so the printer ends: `drover run --follow`
    /// once stayed parked after its run had finished because only the finisher was aborted.
    #[tokio::test]
    async fn a_log_stream_that_never_ends_is_stopped_after_the_grace() {
        let (printer_tx, mut printer_rx) = mpsc::channel::<Vec<u8>>(4);
        let mut tasks = Tasks::default();
        let stuck_printer = printer_tx.clone();
        let stream = tokio::spawn(async move {
            let _printer = stuck_printer;
            std::future::pending::<()>().await;
        });
        tasks.log_streams.push(stream.abort_handle());
        let finisher_printer = printer_tx.clone();
        tasks.finishers.push(tokio::spawn(async move {
            let _ = stream.await;
            let _ = finisher_printer.send(b"==> job j: failed\n".to_vec()).await;
        }));
        let ended = tokio::spawn(async {});

        let drained = tasks
            .drain(
                HashMap::from([(
                    "done".to_string(),
                    JobTracker {
                        logs: Some(ended),
                        ..Default::default()
                    },
                )]),
                Duration::from_millis(100),
            )
            .await;
        assert!(!drained);
        drop(printer_tx);
        let end = tokio::time::timeout(Duration::from_secs(10), printer_rx.recv())
            .await
            .expect("a stopped log stream still holds a sender of the printer");
        assert_eq!(end, None);
    }

    #[test]
    fn complete_lines_are_prefixed_partial_lines_held() {
        let mut p = LinePrefixer::new("build/test | ");
        assert_eq!(p.push(b"hel"), b"");
        assert_eq!(p.push(b"lo\nwor"), b"build/test | hello\n");
        assert_eq!(
            p.push(b"ld\n\nlast"),
            b"build/test | world\nbuild/test | \n"
        );
        assert_eq!(p.finish(), b"build/test | last\n");
        assert_eq!(p.finish(), b"");
    }

    #[test]
    fn a_line_split_across_many_chunks_comes_out_once() {
        let mut p = LinePrefixer::new("j/s | ");
        let mut out = Vec::new();
        for b in b"one two three\nfour" {
            out.extend(p.push(&[*b]));
        }
        out.extend(p.finish());
        assert_eq!(out, b"j/s | one two three\nj/s | four\n");
    }

    #[test]
    fn endless_line_is_bounded() {
        let mut p = LinePrefixer::new("j/s | ");
        let out = p.push(&vec![b'x'; MAX_PARTIAL_LINE + 10]);
        assert_eq!(out.len(), "j/s | ".len() + MAX_PARTIAL_LINE + 10 + 1);
        assert!(p.finish().is_empty());
    }

    #[test]
    fn prefixes_with_and_without_colour() {
        assert_eq!(line_prefix("build", "test", None), "build/test | ");
        assert_eq!(
            line_prefix("build", "test", Some("36")),
            "\x1b[36mbuild/test |\x1b[0m "
        );
        assert_eq!(
            status_line("build", "succeeded", None),
            b"==> job build: succeeded\n"
        );
    }

    #[test]
    fn terminal_text_explains_failures() {
        let failed = Job {
            name: "b".into(),
            state: JobState::Failed as i32,
            failure: FailureClass::Script as i32,
            exit_code: 1,
            ..Default::default()
        };
        assert_eq!(terminal_text(&failed), "failed (script, exit 1)");
        let ok = Job {
            state: JobState::Succeeded as i32,
            ..Default::default()
        };
        assert_eq!(terminal_text(&ok), "succeeded");
        let canceled = Job {
            state: JobState::Canceled as i32,
            failure: FailureClass::Canceled as i32,
            reason: "canceled by user".into(),
            ..Default::default()
        };
        assert_eq!(terminal_text(&canceled), "canceled (canceled by user)");
    }
}
