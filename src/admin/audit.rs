//! The admin audit log: one JSON object per line in `data_dir/audit.log`.
//!
//! It owns that file and its format: who (a token fingerprint), from where,
//! what, when and with which parameters. It decides nothing about what is
//! allowed, and it never records message bodies or tokens. File I/O runs
//! in `spawn_blocking`, never on an async worker; appends are serialised
//! and synced to disk before the action they record runs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::warn;

/// Bytes read per step when reading the log backwards.
const TAIL_CHUNK: u64 = 64 * 1024;

/// One audited admin action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    /// When, RFC 3339 UTC.
    pub ts: String,
    /// When, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Who: `token:` and a fingerprint of the admin token used.
    pub who: String,
    /// The admin client's address, when known.
    pub remote: Option<String>,
    /// What: `kick_session`, `kick_user`, `publish`, `export_user`, `erase_user`.
    pub action: String,
    /// The action's parameters (ids, names, sizes; never bodies).
    pub params: serde_json::Value,
}

/// Why the audit log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot write the audit log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the audit log {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode an audit entry")]
    Encode(#[source] serde_json::Error),
    #[error("an audit task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// The append-only audit log file.
#[derive(Debug)]
pub struct AuditLog {
    path: Arc<PathBuf>,
    /// One append at a time, so lines never interleave.
    writing: Mutex<()>,
}

impl AuditLog {
    pub fn new(path: PathBuf) -> AuditLog {
        AuditLog {
            path: Arc::new(path),
            writing: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `entry` as one line and syncs it to disk.
    pub async fn append(&self, entry: &AuditEntry) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(entry).map_err(AuditError::Encode)?;
        line.push(b'\n');
        let _guard = self.writing.lock().await;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_line(&path, &line))
            .await
            .map_err(AuditError::Join)?
    }

    /// The last `limit` entries, oldest first.
    pub async fn tail(&self, limit: usize) -> Result<Vec<AuditEntry>, AuditError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || read_tail(&path, limit))
            .await
            .map_err(AuditError::Join)?
    }
}

fn write_line(path: &Path, line: &[u8]) -> Result<(), AuditError> {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        file.write_all(line)?;
        file.sync_data()
    };
    write().map_err(|source| AuditError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Reads whole lines backwards from the end until it has `limit` of them.
fn read_tail(path: &Path, limit: usize) -> Result<Vec<AuditEntry>, AuditError> {
    let read_err = |source| AuditError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_err(e)),
    };
    let len = file.metadata().map_err(read_err)?.len();
    let mut start = len;
    let mut buf: Vec<u8> = Vec::new();
    // Stop once the buffer holds more than `limit` line breaks (so the
    // first line kept is whole) or the whole file is read.
    while start > 0 && buf.iter().filter(|b| **b == b'\n').count() <= limit {
        let step = TAIL_CHUNK.min(start);
        start -= step;
        let mut chunk = vec![0; usize::try_from(step).unwrap_or(0)];
        file.seek(SeekFrom::Start(start)).map_err(read_err)?;
        file.read_exact(&mut chunk).map_err(read_err)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if start > 0 && !lines.is_empty() {
        // The first line may be cut.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(limit);
    Ok(lines
        .into_iter()
        .skip(skip)
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(e) => Some(e),
            Err(e) => {
                warn!(error = %e, "unreadable audit line skipped");
                None
            }
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            ts: super::super::rfc3339(i),
            ts_ms: i,
            who: "token:00000000".into(),
            remote: None,
            action: "kick_user".into(),
            params: serde_json::json!({ "user": format!("u{i}"), "pad": "x".repeat(300) }),
        }
    }

    #[tokio::test]
    async fn tail_returns_the_last_entries_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("sub").join("audit.log"));
        assert!(log.tail(10).await.unwrap().is_empty(), "no file yet");
        for i in 0..500 {
            log.append(&entry(i)).await.unwrap();
        }
        let tail = log.tail(3).await.unwrap();
        assert_eq!(tail, vec![entry(497), entry(498), entry(499)]);
        // Larger than one chunk: crosses chunk boundaries.
        let tail = log.tail(400).await.unwrap();
        assert_eq!(tail.len(), 400);
        assert_eq!(tail[0], entry(100));
        assert_eq!(log.tail(1000).await.unwrap().len(), 500);
    }
}
