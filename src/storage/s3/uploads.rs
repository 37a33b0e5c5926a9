//! Multipart uploads begun and not yet completed or aborted.
//!
//! An upload left open keeps its parts in the bucket, billed, until a
//! lifecycle rule (if any) removes them. A put whose future is dropped (a
//! sync cut off by `watch`'s shutdown deadline, a command stopped by a
//! signal) aborts its upload from a spawned task, which the runtime's own
//! shutdown would drop unrun: so every open upload is also registered here,
//! and [`abort_unfinished`] aborts what is left just before the process
//! exits.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;

#[derive(Clone)]
struct Upload {
    client: Client,
    bucket: String,
    key: String,
    /// An abort request is on its way: no second one is sent (a store may
    /// answer it with an error, s3s-fs does with AccessDenied).
    aborting: bool,
}

/// Open uploads by upload id.
static OPEN: Mutex<BTreeMap<String, Upload>> = Mutex::new(BTreeMap::new());

fn open() -> MutexGuard<'static, BTreeMap<String, Upload>> {
    // One insert or remove per change: consistent whatever panicked.
    OPEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An open upload: aborted unless disarmed, also when dropped.
pub(super) struct Guard {
    upload_id: Option<String>,
}

impl Guard {
    pub(super) fn new(client: &Client, bucket: &str, key: &str, upload_id: &str) -> Self {
        open().insert(
            upload_id.to_string(),
            Upload {
                client: client.clone(),
                bucket: bucket.to_string(),
                key: key.to_string(),
                aborting: false,
            },
        );
        Self {
            upload_id: Some(upload_id.to_string()),
        }
    }

    /// The upload completed: nothing to abort.
    pub(super) fn disarm(&mut self) {
        if let Some(id) = self.upload_id.take() {
            open().remove(&id);
        }
    }

    pub(super) async fn abort(&mut self) {
        if let Some(id) = self.upload_id.take() {
            abort(id).await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(id) = self.upload_id.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            // Left registered until it is done: if the runtime drops this
            // task, `abort_unfinished` aborts the upload.
            handle.spawn(abort(id));
        }
    }
}

/// Whether upload `id` is one of this process's, still open.
pub(super) fn is_open_here(id: &str) -> bool {
    open().contains_key(id)
}

/// Aborts upload `id` if it is still open here and no abort of it is on its
/// way, and forgets it once the store has (an upload the store no longer
/// knows is gone already).
async fn abort(id: String) {
    let upload = {
        let mut open = open();
        match open.get_mut(&id) {
            Some(upload) if !upload.aborting => {
                upload.aborting = true;
                upload.clone()
            }
            _ => return,
        }
    };
    let result = upload
        .client
        .abort_multipart_upload()
        .bucket(&upload.bucket)
        .key(&upload.key)
        .upload_id(&id)
        .send()
        .await;
    let mut open = open();
    match result {
        Ok(_) => {}
        Err(err) if err.code() == Some("NoSuchUpload") => {}
        Err(err) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            tracing::warn!(
                key = upload.key,
                upload_id = id,
                error = %super::readable_message(&err, status),
                "could not abort a multipart upload (tried again at exit; \
                 a lifecycle rule removes what is left, see docs/operations.md)"
            );
            if let Some(upload) = open.get_mut(&id) {
                upload.aborting = false;
            }
            return;
        }
    }
    open.remove(&id);
}

/// Aborts every upload still open, waiting at most `limit`: called once,
/// as the process ends. Says what it could not abort.
pub async fn abort_unfinished(limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let ids: Vec<String> = open().keys().cloned().collect();
    if ids.is_empty() {
        return;
    }
    let aborts = futures_util::future::join_all(ids.into_iter().map(abort));
    let _ = tokio::time::timeout_at(deadline, aborts).await;
    // Aborts a dropped put spawned are on their way too: wait for them.
    while open().values().any(|u| u.aborting) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<String> = open().values().map(|u| u.key.clone()).collect();
    if !left.is_empty() {
        tracing::warn!(
            count = left.len(),
            keys = %left.join(", "),
            "multipart uploads left unfinished at exit: their parts stay in the bucket until \
             a lifecycle rule removes them (see docs/operations.md)"
        );
    }
}
