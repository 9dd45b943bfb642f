//! Who may call what on the ControlService: API bearer tokens with a role (`read` < `submit` < `admin`),
//! stored hashed; the first start writes an admin token to `<data>/admin.token` (mode 0600).
//!
//! The check runs in [`crate::api::guard`] in front of the service, keyed by method name, so an rpc added
//! later is admin-only until it is classified in [`required_role`].

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use drover_proto::v1::control_service_client::ControlServiceClient;
use rand::RngCore;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::engine::{now_ms, sha256_hex};
use crate::error::{CoordError, CoordResult};
use crate::store::{ApiTokenRec, EnrollmentTokenInfo, Store};
use drover_proto::v1 as pb;

/// What a caller may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read runs, logs, artifacts, agents.
    Read,
    /// Read, and submit and cancel runs.
    Submit,
    /// Everything: agents, tokens, secrets.
    Admin,
}

impl Role {
    /// The role's name on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Admin => "admin",
        }
    }

    /// Parses `read`, `submit` or `admin`.
    pub fn parse(s: &str) -> CoordResult<Role> {
        match s.trim() {
            "read" => Ok(Role::Read),
            "submit" => Ok(Role::Submit),
            "admin" => Ok(Role::Admin),
            other => Err(CoordError::InvalidArgument(format!(
                "role {other:?}: expected read, submit or admin"
            ))),
        }
    }
}

/// The role a ControlService method needs. Unknown methods need admin: secure by default.
/// Admin-only by name (listed for review): CreateToken, CreateApiToken, ListTokens, RevokeToken,
/// RevokeAgent, DrainAgent, PauseAgent, ResumeAgent, SetSecret, ListSecrets, DeleteSecret, DeleteCache.
pub fn required_role(method: &str) -> Role {
    match method {
        "ValidatePipeline" | "GetRun" | "ListRuns" | "WatchRun" | "FollowLogs"
        | "ListArtifacts" | "GetArtifact" | "ListAgents" | "ExplainJob" | "ListCaches" => {
            Role::Read
        }
        "UploadContext" | "SubmitRun" | "CancelRun" | "CancelJob" | "RetryRun" | "RetryJob" => {
            Role::Submit
        }
        _ => Role::Admin,
    }
}

/// The API tokens, cached in memory (every call is checked without touching the store).
#[derive(Debug, Clone)]
pub struct AccessControl {
    store: Store,
    /// sha256 of token -> role. A std mutex: held for a lookup or an insert, never across an await.
    tokens: Arc<Mutex<HashMap<String, Role>>>,
}

/// Where the bootstrap admin token is written.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!("drv_{}", hex::encode(b))
}

impl AccessControl {
    /// Loads the tokens. When there are none (first start), creates an admin token and writes it to
    /// `<data>/admin.token` (0600); returns that path then.
    pub async fn open(
        store: Store,
        data_dir: &Path,
    ) -> CoordResult<(AccessControl, Option<PathBuf>)> {
        let mut map = HashMap::new();
        for t in store.api_tokens().await? {
            // A role this version does not know grants nothing.
            if let Ok(role) = Role::parse(&t.role) {
                map.insert(t.hash, role);
            }
        }
        let access = AccessControl {
            store,
            tokens: Arc::new(Mutex::new(map)),
        };
        if !access.lock().is_empty() {
            return Ok((access, None));
        }
        let token = access.create(Role::Admin, "bootstrap admin").await?;
        let path = admin_token_path(data_dir);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()
        })();
        written.map_err(|e| {
            CoordError::Internal(format!(
                "cannot write the admin token to {}: {e}",
                path.display()
            ))
        })?;
        Ok((access, Some(path)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Role>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a token with `role`; returns it (shown once, stored hashed).
    pub async fn create(&self, role: Role, name: &str) -> CoordResult<String> {
        let token = new_token();
        let hash = sha256_hex(&token);
        self.store
            .create_api_token(ApiTokenRec {
                hash: hash.clone(),
                role: role.as_str().into(),
                name: name.into(),
                created_ms: now_ms(),
            })
            .await?;
        self.lock().insert(hash, role);
        Ok(token)
    }

    /// Checks an `authorization` header value against the role `method` needs.
    pub fn check(&self, authorization: Option<&str>, method: &str) -> CoordResult<Role> {
        self.check_role(authorization, required_role(method), method)
    }

    /// Checks an `authorization` header value for at least role `needed`; `what` names the call in
    /// refusals.
    pub fn check_role(
        &self,
        authorization: Option<&str>,
        needed: Role,
        method: &str,
    ) -> CoordResult<Role> {
        let v = authorization.ok_or_else(|| {
            CoordError::Unauthenticated(format!(
                "{method} needs an API token with role {} or higher: send `authorization: Bearer TOKEN` \
                 (drover: --token or DROVER_TOKEN; the first admin token is in the coordinator's admin.token)",
                needed.as_str()
            ))
        })?;
        let token = v.strip_prefix("Bearer ").map(str::trim).ok_or_else(|| {
            CoordError::Unauthenticated("authorization must be `Bearer TOKEN`".into())
        })?;
        let role = self
            .lock()
            .get(&sha256_hex(token))
            .copied()
            .ok_or_else(|| CoordError::Unauthenticated("unknown API token".into()))?;
        if role < needed {
            return Err(CoordError::PermissionDenied(format!(
                "{method} needs role {} but this token has role {}",
                needed.as_str(),
                role.as_str()
            )));
        }
        Ok(role)
    }
}

/// Length of a token's id: that many leading hex digits of its sha256 (the coordinator keeps nothing else).
pub const TOKEN_ID_LEN: usize = 12;

/// Shortest id prefix `revoke` accepts.
const MIN_ID_LEN: usize = 8;

impl AccessControl {
    /// Every API token and enrollment token, by id: never the token.
    pub async fn list(&self) -> CoordResult<Vec<pb::TokenInfo>> {
        let mut api = self.store.api_tokens().await?;
        api.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.hash.cmp(&b.hash)));
        let enrollment = self.store.enrollment_tokens().await?;
        Ok(api
            .into_iter()
            .map(|t| api_info(&t))
            .chain(enrollment.into_iter().map(|t| enrollment_info(&t)))
            .collect())
    }

    /// Revokes the token whose sha256 starts with `id` (its listed id, or a longer prefix): it is
    /// refused from the next call on. The last admin API token cannot be revoked.
    pub async fn revoke(&self, id: &str) -> CoordResult<pb::TokenInfo> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() < MIN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CoordError::InvalidArgument(format!(
                "token id {id:?}: expected at least {MIN_ID_LEN} hex digits, as `drover tokens list` shows"
            )));
        }
        let api = self.store.api_tokens().await?;
        let enrollment = self.store.enrollment_tokens().await?;
        let api_hits: Vec<&ApiTokenRec> = api.iter().filter(|t| t.hash.starts_with(&id)).collect();
        let enr_hits: Vec<&EnrollmentTokenInfo> = enrollment
            .iter()
            .filter(|t| t.hash.starts_with(&id))
            .collect();
        match (api_hits.as_slice(), enr_hits.as_slice()) {
            ([], []) => Err(CoordError::NotFound(format!(
                "no token with id {id}; `drover tokens list` lists them"
            ))),
            ([t], []) => {
                let admins = api
                    .iter()
                    .filter(|a| a.role == Role::Admin.as_str())
                    .count();
                if t.role == Role::Admin.as_str() && admins <= 1 {
                    return Err(CoordError::FailedPrecondition(format!(
                        "token {id} is the last admin token: create another admin token first \
                         (drover tokens create --kind api --role admin)"
                    )));
                }
                self.store.delete_api_token(t.hash.clone()).await?;
                self.lock().remove(&t.hash);
                tracing::warn!(token = %&t.hash[..TOKEN_ID_LEN], name = %t.name, "API token revoked");
                Ok(api_info(t))
            }
            ([], [t]) => {
                self.store.delete_enrollment_token(t.hash.clone()).await?;
                tracing::warn!(token = %&t.hash[..TOKEN_ID_LEN], "enrollment token revoked");
                Ok(enrollment_info(t))
            }
            _ => Err(CoordError::InvalidArgument(format!(
                "token id {id} matches several tokens; give more of its digits"
            ))),
        }
    }
}

fn short_id(hash: &str) -> String {
    hash.chars().take(TOKEN_ID_LEN).collect()
}

fn api_info(t: &ApiTokenRec) -> pb::TokenInfo {
    pb::TokenInfo {
        id: short_id(&t.hash),
        kind: "api".into(),
        role: t.role.clone(),
        name: t.name.clone(),
        created_ms: t.created_ms,
        ..Default::default()
    }
}

fn enrollment_info(t: &EnrollmentTokenInfo) -> pb::TokenInfo {
    pb::TokenInfo {
        id: short_id(&t.hash),
        kind: "enrollment".into(),
        labels: t.labels.clone().into_iter().collect(),
        expires_ms: t.expires_ms,
        uses_left: t.uses_left,
        ..Default::default()
    }
}

/// Adds `authorization: Bearer TOKEN` to every call: for Rust clients of the ControlService.
#[derive(Debug, Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

impl BearerToken {
    /// An interceptor sending `token`.
    pub fn new(token: &str) -> CoordResult<Self> {
        format!("Bearer {}", token.trim())
            .parse()
            .map(BearerToken)
            .map_err(|_| {
                CoordError::InvalidArgument(
                    "the token has characters not allowed in a header".into(),
                )
            })
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A ControlService client that sends an API token.
pub type ControlClient = ControlServiceClient<InterceptedService<Channel, BearerToken>>;

/// Connect to `url` with a new token of `role` from `access` (in-process servers, tests).
pub async fn connect_with_role(
    url: &str,
    access: &AccessControl,
    role: Role,
) -> CoordResult<ControlClient> {
    let token = access.create(role, "in-process client").await?;
    let channel = Channel::from_shared(url.to_string())
        .map_err(|e| CoordError::InvalidArgument(format!("{url}: {e}")))?
        .connect()
        .await
        .map_err(|e| CoordError::Unavailable(format!("{url}: {e}")))?;
    Ok(
        ControlServiceClient::with_interceptor(channel, BearerToken::new(&token)?)
            .max_decoding_message_size(drover_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(drover_proto::MAX_MESSAGE_BYTES),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roles_are_ordered_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_memory().unwrap();
        let (access, path) = AccessControl::open(store.clone(), dir.path())
            .await
            .unwrap();
        let path = path.expect("first start writes the admin token");
        let admin = std::fs::read_to_string(&path).unwrap().trim().to_string();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let read = access.create(Role::Read, "r").await.unwrap();
        let submit = access.create(Role::Submit, "s").await.unwrap();
        let b = |t: &str| format!("Bearer {t}");
        assert_eq!(
            access.check(Some(&b(&admin)), "CreateToken").unwrap(),
            Role::Admin
        );
        assert!(access.check(Some(&b(&submit)), "SubmitRun").is_ok());
        assert!(access.check(Some(&b(&read)), "GetRun").is_ok());
        let e = access.check(Some(&b(&read)), "SubmitRun").unwrap_err();
        assert!(matches!(e, CoordError::PermissionDenied(_)));
        assert!(e.to_string().contains("needs role submit"), "{e}");
        let e = access
            .check(Some(&b(&submit)), "SomeFutureRpc")
            .unwrap_err();
        assert!(e.to_string().contains("needs role admin"), "{e}");
        assert!(matches!(
            access.check(None, "GetRun"),
            Err(CoordError::Unauthenticated(_))
        ));
        assert!(matches!(
            access.check(Some("Bearer nope"), "GetRun"),
            Err(CoordError::Unauthenticated(_))
        ));
        // Only the hash is stored, and a reopen finds the tokens without writing a new admin token.
        assert!(store
            .api_tokens()
            .await
            .unwrap()
            .iter()
            .all(|t| t.hash != admin));
        let (again, path2) = AccessControl::open(store, dir.path()).await.unwrap();
        assert!(path2.is_none());
        assert!(again.check(Some(&b(&read)), "ListRuns").is_ok());
    }

    #[tokio::test]
    async fn tokens_are_listed_by_id_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_memory().unwrap();
        let (access, _) = AccessControl::open(store.clone(), dir.path())
            .await
            .unwrap();
        let read = access.create(Role::Read, "ci reader").await.unwrap();
        let list = access.list().await.unwrap();
        assert_eq!(list.len(), 2);
        let r = list.iter().find(|t| t.name == "ci reader").unwrap();
        assert_eq!((r.kind.as_str(), r.role.as_str()), ("api", "read"));
        assert_eq!(r.id, sha256_hex(&read)[..TOKEN_ID_LEN]);
        assert!(list
            .iter()
            .all(|t| !read.contains(&t.id) || t.id.len() < 20));
        // The only admin token stays.
        let admin = list.iter().find(|t| t.role == "admin").unwrap();
        let e = access.revoke(&admin.id).await.unwrap_err();
        assert!(e.to_string().contains("last admin token"), "{e}");
        for bad in ["", "xyz12345", "abc"] {
            assert!(matches!(
                access.revoke(bad).await,
                Err(CoordError::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            access.revoke("00000000").await,
            Err(CoordError::NotFound(_)) | Err(CoordError::InvalidArgument(_))
        ));
        let gone = access.revoke(&r.id).await.unwrap();
        assert_eq!(gone.name, "ci reader");
        assert!(matches!(
            access.check(Some(&format!("Bearer {read}")), "ListRuns"),
            Err(CoordError::Unauthenticated(_))
        ));
        assert_eq!(access.list().await.unwrap().len(), 1);
    }
}
