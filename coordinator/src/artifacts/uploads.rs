//! Resumable uploads: an upload named by its uploader's id survives a broken connection.
//!
//! Each upload in progress is a slot: the ticket it was opened with (who, which digest, how big), its
//! [`BlobWriter`] (temporary file + running sha256) and when it was last touched. A connection holds
//! the slot's lock while it streams; when the connection breaks, the lock is released and the slot stays
//! parked with the bytes received so far. The uploader asks how much is held and sends the rest. Slots
//! untouched for [`PARTIAL_UPLOAD_TTL`] are dropped with their temporary file by a sweeper; a restart
//! of the coordinator drops them all (the `tmp/` directory is emptied at open).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::{BlobError, BlobStore, BlobWriter, Shared};

/// How long an interrupted upload is kept for its uploader to resume it.
pub const PARTIAL_UPLOAD_TTL: Duration = Duration::from_secs(3600);
/// How often expired uploads are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Longest upload id accepted.
const MAX_UPLOAD_ID: usize = 128;

/// What an upload is: a resumed upload must present the same ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadTicket {
    /// The uploader's id for it (a UUID, say): letters, digits, `-` and `_`.
    pub upload_id: String,
    /// Who uploads (the agent id, or the API caller): nobody else can see or resume it.
    pub owner: String,
    /// The sha256 the content must have.
    pub digest: String,
    /// The size the content must have.
    pub size: u64,
}

#[derive(Debug)]
struct Parked {
    ticket: UploadTicket,
    /// `None` until the first claim opens it, and after it was finished or failed.
    writer: Option<BlobWriter>,
    touched: Instant,
}

type Slot = Arc<AsyncMutex<Parked>>;

/// The uploads in progress of a store, by upload id.
#[derive(Debug, Default)]
pub(super) struct Parking {
    /// A std mutex: held only to look up, insert or remove a slot, never across an `.await`.
    slots: std::sync::Mutex<HashMap<String, Slot>>,
}

impl Parking {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Option<Slot> {
        self.lock().get(id).cloned()
    }

    fn get_or_insert(&self, ticket: &UploadTicket) -> Slot {
        self.lock()
            .entry(ticket.upload_id.clone())
            .or_insert_with(|| {
                Arc::new(AsyncMutex::new(Parked {
                    ticket: ticket.clone(),
                    writer: None,
                    touched: Instant::now(),
                }))
            })
            .clone()
    }

    /// Whether `slot` is still the one registered under `id` (it is not once finished or swept).
    fn is_current(&self, id: &str, slot: &Slot) -> bool {
        self.lock().get(id).is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    fn remove(&self, id: &str, slot: &Slot) {
        let mut slots = self.lock();
        if slots.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            slots.remove(id);
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Drop the parked uploads untouched for `ttl` or longer (their temporary files go with their
    /// writers). Uploads a connection is streaming right now are never dropped.
    fn sweep(&self, ttl: Duration) -> usize {
        let mut expired = Vec::new();
        {
            let mut slots = self.lock();
            slots.retain(|_, slot| match slot.try_lock() {
                Ok(parked) if parked.touched.elapsed() >= ttl => {
                    expired.push(slot.clone());
                    false
                }
                _ => true,
            });
        }
        let n = expired.len();
        for slot in expired {
            if let Ok(mut parked) = slot.try_lock() {
                tracing::info!(upload = %parked.ticket.upload_id, "dropping an interrupted upload that was not resumed");
                parked.writer = None;
            }
        }
        n
    }
}

/// Sweep `shared`'s parked uploads every [`SWEEP_EVERY`] while the store exists. Detached on purpose:
/// it holds only a weak reference and ends at the first tick after the store is dropped (or with the
/// runtime). Without a runtime (a synchronous caller) nothing is spawned and expired uploads go at the
/// next restart.
pub(super) fn spawn_sweeper(shared: Weak<Shared>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.uploads.sweep(PARTIAL_UPLOAD_TTL);
        }
    });
}

fn validate_upload_id(id: &str) -> Result<(), BlobError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_UPLOAD_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BlobError::Invalid(format!(
            "upload id {id:?} is not valid: 1 to {MAX_UPLOAD_ID} letters, digits, '-' or '_'"
        )))
    }
}

impl BlobStore {
    /// Open or resume the upload `ticket.upload_id`, waiting up to `wait` for a previous connection
    /// that still streams into it to let go ([`BlobError::Busy`] after that). A resumed upload must
    /// present the same owner, digest and size. [`ResumableUpload::held`] says where to continue. An
    /// empty digest is not known up front (the content's is taken when the upload finishes).
    pub async fn claim_upload(
        &self,
        ticket: UploadTicket,
        wait: Duration,
    ) -> Result<ResumableUpload, BlobError> {
        validate_upload_id(&ticket.upload_id)?;
        if !ticket.digest.is_empty() {
            super::validate_digest(&ticket.digest)?;
        }
        let parking = &self.shared.uploads;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let slot = parking.get_or_insert(&ticket);
            let mut guard = tokio::time::timeout_at(deadline, slot.clone().lock_owned())
                .await
                .map_err(|_| BlobError::Busy(ticket.upload_id.clone()))?;
            // The connection we waited for may have finished (or the sweeper dropped) the slot.
            if !parking.is_current(&ticket.upload_id, &slot) {
                continue;
            }
            if guard.ticket != ticket {
                return Err(BlobError::Invalid(format!(
                    "upload id {:?} is already used by another upload",
                    ticket.upload_id
                )));
            }
            if guard.writer.is_none() {
                match self.writer().await {
                    Ok(w) => guard.writer = Some(w),
                    Err(e) => {
                        drop(guard);
                        parking.remove(&ticket.upload_id, &slot);
                        return Err(e);
                    }
                }
            }
            guard.touched = Instant::now();
            return Ok(ResumableUpload {
                store: self.clone(),
                id: ticket.upload_id,
                slot,
                guard: Some(guard),
                keep_on_drop: true,
            });
        }
    }

    /// How many bytes of the upload `upload_id` by `owner` are held: 0 when it is unknown (never started,
    /// finished, expired, another owner's). Waits up to `wait` for a connection still streaming into it
    /// ([`BlobError::Busy`] after that), so the answer is where the next stream must start.
    pub async fn upload_progress(
        &self,
        upload_id: &str,
        owner: &str,
        wait: Duration,
    ) -> Result<u64, BlobError> {
        validate_upload_id(upload_id)?;
        let Some(slot) = self.shared.uploads.get(upload_id) else {
            return Ok(0);
        };
        let parked = tokio::time::timeout(wait, slot.lock())
            .await
            .map_err(|_| BlobError::Busy(upload_id.to_owned()))?;
        if parked.ticket.owner != owner {
            return Ok(0);
        }
        Ok(parked.writer.as_ref().map_or(0, BlobWriter::size))
    }

    /// Uploads in progress or parked.
    pub fn open_uploads(&self) -> usize {
        self.shared.uploads.len()
    }

    /// Drop parked uploads untouched for `ttl` or longer, now; returns how many. (A background task
    /// does this every minute with [`PARTIAL_UPLOAD_TTL`].)
    pub fn sweep_uploads(&self, ttl: Duration) -> usize {
        self.shared.uploads.sweep(ttl)
    }
}

/// One connection's hold on an upload. Dropped without [`ResumableUpload::finish`] it parks the upload
/// for a later resume (or, after [`ResumableUpload::discard_on_drop`], removes it).
#[derive(Debug)]
pub struct ResumableUpload {
    store: BlobStore,
    id: String,
    slot: Slot,
    guard: Option<OwnedMutexGuard<Parked>>,
    keep_on_drop: bool,
}

impl ResumableUpload {
    fn writer(&mut self) -> Result<&mut BlobWriter, BlobError> {
        self.guard
            .as_mut()
            .and_then(|g| g.writer.as_mut())
            .ok_or_else(|| BlobError::Invalid("the upload is already finished".to_owned()))
    }

    /// Bytes held so far: the offset the next data must start at.
    pub fn held(&self) -> u64 {
        self.guard
            .as_ref()
            .and_then(|g| g.writer.as_ref())
            .map_or(0, BlobWriter::size)
    }

    /// Remove the upload (not park it) when this hold is dropped unfinished: for uploads that cannot
    /// be resumed, or that failed in a way a resume cannot fix.
    pub fn discard_on_drop(&mut self) {
        self.keep_on_drop = false;
    }

    /// Append `data`. On an error the upload is discarded (its state is no longer known to be sound).
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        let result = self.writer()?.write(data).await;
        if result.is_err() {
            self.keep_on_drop = false;
        }
        result
    }

    /// Verify and store the content (see [`BlobWriter::finish`]); the upload id is then free.
    pub async fn finish(mut self, expected: Option<&str>) -> Result<(String, u64), BlobError> {
        let writer = self
            .guard
            .as_mut()
            .and_then(|g| g.writer.take())
            .ok_or_else(|| BlobError::Invalid("the upload is already finished".to_owned()))?;
        self.keep_on_drop = false;
        writer.finish(expected).await
    }
}

impl Drop for ResumableUpload {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        if self.keep_on_drop && guard.writer.is_some() {
            guard.touched = Instant::now();
            tracing::debug!(upload = %self.id, held = guard.writer.as_ref().map_or(0, BlobWriter::size), "upload interrupted; kept for a resume");
            return;
        }
        // Removing the writer removes its temporary file.
        guard.writer = None;
        drop(guard);
        self.store.shared.uploads.remove(&self.id, &self.slot);
    }
}
