//! Where an interrupted verify resumes, like Vitess's VDiff: per table,
//! the last chunk compared and the counts so far, in
//! `verify_progress.json` in the state directory (a file, not the store:
//! a running daemon holds the store).
//!
//! Snapshots die with the process, so a resumed verify takes a new
//! position for what is left: every chunk is still compared exactly as of
//! one position (the table's report lists them), and no chunk is compared
//! twice. The file is written after every chunk (to a temporary file
//! renamed over it, so a crash leaves the old one or the new one) and
//! removed when the verify finishes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::VerifyError;
use super::report::TableReport;

/// The file, in the state directory.
pub const PROGRESS_FILE: &str = "verify_progress.json";

/// One table's progress.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TableProgress {
    /// Every row is compared.
    pub done: bool,
    /// The key (as text) after which the next chunk starts.
    pub after: Option<Vec<String>>,
    /// The counts and samples so far.
    pub report: TableReport,
    /// The source rows' digest so far.
    pub source_digest: String,
    /// The target rows' digest so far.
    pub target_digest: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    tables: BTreeMap<String, TableProgress>,
}

/// The progress of the verify under way.
#[derive(Debug)]
pub struct ProgressFile {
    path: PathBuf,
    saved: Mutex<Saved>,
}

impl ProgressFile {
    /// The progress left by an interrupted verify in `dir`, or a fresh one
    /// (`fresh`, or none left).
    pub fn open(dir: &Path, fresh: bool) -> Result<ProgressFile, VerifyError> {
        let path = dir.join(PROGRESS_FILE);
        let saved = match std::fs::read(&path) {
            Ok(bytes) if !fresh => {
                serde_json::from_slice(&bytes).map_err(|e| VerifyError::Write {
                    path: path.display().to_string(),
                    detail: format!(
                        "{e}: the progress of an interrupted verify is unreadable; remove the file to start over"
                    ),
                })?
            }
            _ => Saved::default(),
        };
        if !saved.tables.is_empty() {
            let done = saved.tables.values().filter(|t| t.done).count();
            tracing::info!(
                tables_done = done,
                tables_started = saved.tables.len() - done,
                "resuming an interrupted verify"
            );
        }
        Ok(ProgressFile {
            path,
            saved: Mutex::new(saved),
        })
    }

    /// What an earlier run did of `table`.
    pub fn table(&self, table: &str) -> Option<TableProgress> {
        self.lock().tables.get(table).cloned()
    }

    /// Records `table`'s progress and writes the file.
    pub fn save(&self, table: &str, progress: TableProgress) -> Result<(), VerifyError> {
        let mut saved = self.lock();
        saved.tables.insert(table.to_owned(), progress);
        let write = || -> std::io::Result<()> {
            let json = serde_json::to_vec(&*saved).map_err(std::io::Error::other)?;
            let temporary = self.path.with_extension("json.tmp");
            std::fs::write(&temporary, json)?;
            std::fs::rename(&temporary, &self.path)
        };
        write().map_err(|e| VerifyError::Write {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        })
    }

    /// The verify finished: nothing is left to resume.
    pub fn finish(self) {
        let _ = std::fs::remove_file(&self.path);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Saved> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }
}
