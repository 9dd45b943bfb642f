//! A real S3-compatible server for the storage tests: moto's `moto_server` (PyPI `moto[server]`),
//! started on a free loopback port and killed on drop.
//!
//! The binary is `$DROVER_MOTO_SERVER` when set (what `ensure_moto` in `scripts/lib.sh` exports), else
//! `moto_server` on `PATH`. When neither exists, [`Moto::start`] fails and says how to install it: a
//! test that needs S3 fails rather than skipping silently.
//!
//! Bucket creation and listing speak plain HTTP/1.1 to the server (moto accepts unsigned requests
//! unless told to enforce IAM), so the tests need no S3 client of their own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long the server gets to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running moto server.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    addr: SocketAddr,
}

/// The moto_server binary to run.
fn moto_binary() -> String {
    std::env::var("DROVER_MOTO_SERVER")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "moto_server".to_string())
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

impl Moto {
    /// Starts `moto_server` on a free loopback port and waits until it answers.
    pub fn start() -> Result<Moto> {
        Self::start_with_env(&[])
    }

    /// [`Moto::start`] with extra environment for the server (e.g. `INITIAL_NO_AUTH_ACTION_COUNT`).
    pub fn start_with_env(env: &[(&str, &str)]) -> Result<Moto> {
        let bin = moto_binary();
        let mut last_err = None;
        // A port found free can be taken before the server binds it: try a few.
        for _ in 0..3 {
            let port = free_port()?;
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                    "moto_server not found ({bin}): the S3 storage tests need moto's S3 server. Install it with \
                     `pip install 'moto[server]'` (or run scripts/test, whose ensure_moto does it), or point \
                     DROVER_MOTO_SERVER at the binary"
                ),
                Err(e) => return Err(e).with_context(|| format!("starting {bin}")),
            };
            let mut moto = Moto {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            match moto.wait_ready() {
                Ok(()) => return Ok(moto),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("moto_server did not start")))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("moto_server exited at startup with {status}");
            }
            if let Ok((status, _)) = self.request("GET", "/moto-api/", &[]) {
                if status < 500 {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "moto_server did not answer on {} within {START_TIMEOUT:?}",
            self.addr
        )
    }

    /// `http://127.0.0.1:PORT`, the `--s3-endpoint` of a coordinator using this server.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One plain HTTP/1.1 request; returns the status code and the body.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        self.request_with_headers(method, path, &[], body)
    }

    /// [`Moto::request`] with extra headers.
    pub fn request_with_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut response = Vec::new();
        s.read_to_end(&mut response)?;
        let text_end = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of HTTP headers in moto's answer")?;
        let head = String::from_utf8_lossy(&response[..text_end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line from moto: {head:?}"))?;
        let mut body = response[text_end + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body)?;
        }
        Ok((status, body))
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        let (status, body) = self.request("PUT", &format!("/{bucket}"), &[])?;
        if status != 200 {
            bail!(
                "creating bucket {bucket}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    /// Starts a server that checks credentials (moto's IAM enforcement), with one IAM user allowed
    /// every S3 action and the bucket `bucket`. Returns the server and the user's access key id and
    /// secret key; any other credentials are refused. Unsigned requests (like [`Moto::list`]) are
    /// refused too.
    pub fn start_enforcing_auth(bucket: &str) -> Result<(Moto, String, String)> {
        // moto lets this many authenticated actions through before it enforces IAM: exactly the four
        // set-up requests below.
        let moto = Self::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "4")])?;
        // moto routes a request to IAM by the service in the credential scope; the signature is not
        // checked during set-up.
        let auth = "AWS4-HMAC-SHA256 Credential=AKIASETUP/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0";
        let iam = |form: &str| -> Result<String> {
            let (status, body) = moto.request_with_headers(
                "POST",
                "/",
                &[
                    ("Authorization", auth),
                    ("Content-Type", "application/x-www-form-urlencoded"),
                ],
                format!("{form}&Version=2010-05-08").as_bytes(),
            )?;
            let text = String::from_utf8_lossy(&body).to_string();
            if status != 200 {
                bail!("moto IAM {form}: HTTP {status}: {text}");
            }
            Ok(text)
        };
        iam("Action=CreateUser&UserName=drover")?;
        let keys = iam("Action=CreateAccessKey&UserName=drover")?;
        let access = between(&keys, "<AccessKeyId>", "</AccessKeyId>")
            .context("no access key id in CreateAccessKey's answer")?
            .to_string();
        let secret = between(&keys, "<SecretAccessKey>", "</SecretAccessKey>")
            .context("no secret key in CreateAccessKey's answer")?
            .to_string();
        // {"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}
        let policy = "%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect%22%3A%22Allow%22%2C%22Action%22%3A%22s3%3A%2A%22%2C%22Resource%22%3A%22%2A%22%7D%5D%7D";
        iam(&format!(
            "Action=PutUserPolicy&UserName=drover&PolicyName=s3-all&PolicyDocument={policy}"
        ))?;
        moto.create_bucket(bucket)?;
        Ok((moto, access, secret))
    }

    /// Keys and sizes of the objects in `bucket` under `prefix` (every page).
    pub fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{bucket}?list-type=2&prefix={prefix}");
            if let Some(t) = &token {
                path.push_str(&format!("&continuation-token={t}"));
            }
            let (status, body) = self.request("GET", &path, &[])?;
            let xml = String::from_utf8_lossy(&body).to_string();
            if status != 200 {
                bail!("listing bucket {bucket}: HTTP {status}: {xml}");
            }
            for item in xml.split("<Contents>").skip(1) {
                let key =
                    between(item, "<Key>", "</Key>").context("a listed object without key")?;
                let size = between(item, "<Size>", "</Size>")
                    .and_then(|s| s.parse().ok())
                    .context("a listed object without size")?;
                out.push((key.to_string(), size));
            }
            match between(&xml, "<NextContinuationToken>", "</NextContinuationToken>") {
                Some(t) if xml.contains("<IsTruncated>true</IsTruncated>") => {
                    token = Some(t.to_string())
                }
                _ => return Ok(out),
            }
        }
    }

    /// Multipart uploads started and neither completed nor aborted, in `bucket`.
    pub fn open_multipart_uploads(&self, bucket: &str) -> Result<usize> {
        let (status, body) = self.request("GET", &format!("/{bucket}?uploads"), &[])?;
        let xml = String::from_utf8_lossy(&body).to_string();
        if status != 200 {
            bail!("listing multipart uploads of {bucket}: HTTP {status}: {xml}");
        }
        Ok(xml.matches("<Upload>").count())
    }
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunked body")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
