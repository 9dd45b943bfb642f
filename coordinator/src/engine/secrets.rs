//! The engine's side of secrets: set, list and delete, with deletion refused while a run still needs one.

use drover_proto::v1 as pb;

use super::Engine;
use crate::error::{CoordError, CoordResult};
use crate::secrets::Secrets;

impl Engine {
    /// The coordinator's secrets (open in memory).
    pub fn secrets(&self) -> &Secrets {
        &self.inner.secrets
    }

    /// Stores a secret; the answer carries no value.
    pub async fn set_secret(&self, name: &str, value: &[u8]) -> CoordResult<pb::SecretInfo> {
        let updated_ms = self.inner.secrets.set(name, value).await?;
        tracing::info!(secret = %name, "secret set");
        Ok(pb::SecretInfo {
            name: name.to_string(),
            updated_ms,
        })
    }

    /// Names and update times of every secret.
    pub fn list_secrets(&self) -> Vec<pb::SecretInfo> {
        self.inner
            .secrets
            .list()
            .into_iter()
            .map(|(name, updated_ms)| pb::SecretInfo { name, updated_ms })
            .collect()
    }

    /// Deletes a secret unless an unfinished run names it (its next attempts would run without it).
    pub async fn delete_secret(&self, name: &str) -> CoordResult<bool> {
        // Under `op`, so no run naming it is submitted between the check and the delete.
        let _op = self.inner.op.lock().await;
        let users: Vec<String> = {
            let st = self.lock();
            let mut users: Vec<String> = st
                .runs
                .values()
                .filter(|r| {
                    r.jobs
                        .iter()
                        .any(|j| j.spec.secrets.iter().any(|s| s == name))
                })
                .map(|r| r.id.clone())
                .collect();
            users.sort();
            users
        };
        if !users.is_empty() {
            return Err(CoordError::FailedPrecondition(format!(
                "secret {name:?} is used by unfinished run(s) {}; cancel them or wait for them to finish",
                users.join(", ")
            )));
        }
        let existed = self.inner.secrets.delete(name).await?;
        tracing::info!(secret = %name, existed, "secret deleted");
        Ok(existed)
    }
}
