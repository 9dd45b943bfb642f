//! Encrypted secrets: the store only ever sees nonce + ciphertext (see [`crate::secrets`]).

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

/// A stored secret: its value sealed with ChaCha20-Poly1305, never plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    /// Name (also the associated data of the seal).
    pub name: String,
    /// 12-byte nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext with its 16-byte tag.
    pub ciphertext: Vec<u8>,
    /// Unix milliseconds of the last set.
    pub updated_ms: i64,
}

impl Store {
    /// Inserts or replaces a secret.
    pub async fn put_secret(&self, row: SecretRow) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO secrets (name, nonce, ciphertext, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET nonce = ?2, ciphertext = ?3, updated_ms = ?4",
                params![row.name, row.nonce, row.ciphertext, row.updated_ms],
            )?;
            Ok(())
        })
        .await
    }

    /// Replaces every secret in one transaction (key rotation re-encrypts all of them at once).
    pub async fn replace_secrets(&self, rows: Vec<SecretRow>) -> Result<(), StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM secrets", [])?;
            for row in rows {
                tx.execute(
                    "INSERT INTO secrets (name, nonce, ciphertext, updated_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![row.name, row.nonce, row.ciphertext, row.updated_ms],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Deletes a secret; whether it existed.
    pub async fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.call(move |c| Ok(c.execute("DELETE FROM secrets WHERE name = ?1", params![name])? > 0))
            .await
    }

    /// Every secret, sealed, by name.
    pub async fn secrets(&self) -> Result<Vec<SecretRow>, StoreError> {
        self.call(|c| {
            let mut st =
                c.prepare("SELECT name, nonce, ciphertext, updated_ms FROM secrets ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok(SecretRow {
                    name: r.get(0)?,
                    nonce: r.get(1)?,
                    ciphertext: r.get(2)?,
                    updated_ms: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// One secret, sealed.
    pub async fn secret(&self, name: &str) -> Result<Option<SecretRow>, StoreError> {
        let name = name.to_string();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT name, nonce, ciphertext, updated_ms FROM secrets WHERE name = ?1",
                params![name],
                |r| {
                    Ok(SecretRow {
                        name: r.get(0)?,
                        nonce: r.get(1)?,
                        ciphertext: r.get(2)?,
                        updated_ms: r.get(3)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }
}
