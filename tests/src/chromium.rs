//! A real headless Chromium driven over the Chrome DevTools Protocol, for testing the dashboard as a
//! browser renders it (JavaScript, fetch streaming and all).
//!
//! Only what the tests need: launch with `--remote-debugging-port=0`, read the port Chromium chose from
//! `DevToolsActivePort` in its profile directory, attach to its page over a websocket, then
//! `Page.navigate` and `Runtime.evaluate`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long Chromium may take to start and open its DevTools port.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// A headless Chromium process and a DevTools connection to its page; killed on drop.
#[derive(Debug)]
pub struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    next_id: u64,
}

/// The Chromium executable: `$CHROMIUM`, else the first of Debian's names found on `PATH`.
fn executable() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("no chromium on PATH: install Debian's `chromium` package (scripts/test does) or set CHROMIUM")
}

/// `GET path` on 127.0.0.1:port, the body as JSON (the DevTools HTTP endpoints are tiny). Chromium
/// keeps the connection open despite `Connection: close`, so the body is read by its Content-Length.
async fn get_json(port: u16, path: &str) -> Result<Value> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to DevTools on port {port}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                });
                if n == 0 || length.is_some_and(|len| body.len() >= len) {
                    return anyhow::Ok(body.to_string());
                }
            } else if n == 0 {
                bail!("DevTools closed the connection before answering {path}");
            }
        }
    };
    let body = tokio::time::timeout(COMMAND_TIMEOUT, read)
        .await
        .with_context(|| format!("DevTools {path}: no answer within {COMMAND_TIMEOUT:?}"))??;
    serde_json::from_str(&body).with_context(|| format!("DevTools {path} answered {body:?}"))
}

/// The port in `<profile>/DevToolsActivePort`, once Chromium has written it.
fn active_port(profile: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(profile.join("DevToolsActivePort")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

impl Chromium {
    /// Starts headless Chromium and attaches to its first page. Fails with Chromium's own output when
    /// it cannot start (tests must not silently skip).
    pub async fn launch() -> Result<Chromium> {
        let exe = executable()?;
        let profile = tempfile::Builder::new()
            .prefix("drover-chromium-")
            .tempdir()?;
        let log_path = profile.path().join("chromium.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(&exe)
            .args([
                "--headless",
                // Root in a container has no user namespace sandbox to offer.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut chromium_child = child;
        let deadline = Instant::now() + START_TIMEOUT;
        let port = loop {
            if let Some(port) = active_port(profile.path()) {
                break port;
            }
            let exited = chromium_child.try_wait()?;
            if exited.is_some() || Instant::now() > deadline {
                let _ = chromium_child.kill();
                let _ = chromium_child.wait();
                let mut out = String::new();
                if let Ok(mut f) = std::fs::File::open(&log_path) {
                    let _ = f.read_to_string(&mut out);
                }
                bail!(
                    "{} did not open its DevTools port ({}); its output:\n{out}",
                    exe.display(),
                    match exited {
                        Some(status) => format!("exited with {status}"),
                        None => format!("nothing within {START_TIMEOUT:?}"),
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The page target appears shortly after the port.
        let ws_url = loop {
            let targets = get_json(port, "/json/list").await?;
            let page = targets.as_array().and_then(|list| {
                list.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    .map(str::to_string)
            });
            if let Some(url) = page {
                break url;
            }
            if Instant::now() > deadline {
                bail!("chromium has no page target: {targets}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .with_context(|| format!("opening the DevTools websocket {ws_url}"))?;
        let mut chromium = Chromium {
            child: chromium_child,
            _profile: profile,
            socket,
            next_id: 1,
        };
        chromium.call("Page.enable", json!({})).await?;
        chromium.call("Runtime.enable", json!({})).await?;
        Ok(chromium)
    }

    /// Sends one DevTools command and returns its `result` (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket
            .send(Message::Text(request.into()))
            .await
            .with_context(|| format!("sending {method}"))?;
        let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .with_context(|| format!("{method}: no answer within {COMMAND_TIMEOUT:?}"))?
                .with_context(|| format!("{method}: the DevTools connection closed"))?
                .with_context(|| format!("{method}: reading from DevTools"))?;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("{method} failed: {e}");
            }
            return Ok(v["result"].clone());
        }
    }

    /// Opens `url` in the page.
    pub async fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {e}");
        }
        Ok(())
    }

    /// Evaluates a JavaScript expression in the page and returns its value (promises awaited).
    pub async fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expression:?} threw: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` every 100 ms until it is neither null, false, "" nor 0; returns that value.
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expression).await?;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if Instant::now() > deadline {
                let html = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await
                    .unwrap_or_default();
                bail!("{expression:?} did not hold within {timeout:?}; the page shows:\n{html}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
