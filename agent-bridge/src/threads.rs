//! Durable threads: who owns each, and its messages (user, assistant, tool)
//! in AG-UI form, in one redb file.

use std::path::Path;

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;

const OWNERS: TableDefinition<'static, &str, &str> = TableDefinition::new("owners");
const MESSAGES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("messages");

/// File name of the thread store inside the data directory.
pub const FILE_NAME: &str = "threads.redb";
/// redb's page cache for the threads file (its default, 1 GiB, is far more
/// than message histories read once per run need).
const CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error("cannot open thread store {path}: {cause}")]
    Open { path: String, cause: String },
    #[error("thread store {path} is in use by another process")]
    Locked { path: String },
    /// The thread exists and belongs to this other user.
    #[error("the thread belongs to another user")]
    NotOwner(String),
    #[error("thread store: {0}")]
    Io(String),
}

fn io(e: impl std::fmt::Display) -> ThreadError {
    ThreadError::Io(e.to_string())
}

pub struct Threads {
    db: Database,
}

impl Threads {
    /// Opens (or creates) the store in `dir`.
    ///
    /// # Errors
    /// When the directory cannot be used, or another process holds the store.
    pub fn open(dir: &Path) -> Result<Self, ThreadError> {
        let path = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| ThreadError::Open { path: path.clone(), cause: e.to_string() })?;
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(dir.join(FILE_NAME)).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => ThreadError::Locked { path: path.clone() },
            other => ThreadError::Open { path: path.clone(), cause: other.to_string() },
        })?;
        let txn = db.begin_write().map_err(io)?;
        txn.open_table(OWNERS).map_err(io)?;
        txn.open_table(MESSAGES).map_err(io)?;
        txn.commit().map_err(io)?;
        Ok(Threads { db })
    }

    /// Returns the owner of a thread, if it exists.
    pub fn owner(&self, thread: &str) -> Result<Option<String>, ThreadError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(OWNERS).map_err(io)?;
        Ok(table.get(thread).map_err(io)?.map(|v| v.value().to_owned()))
    }

    /// Returns a thread's messages, oldest first.
    pub fn messages(&self, thread: &str) -> Result<Vec<Value>, ThreadError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(MESSAGES).map_err(io)?;
        match table.get(thread).map_err(io)? {
            Some(v) => serde_json::from_slice(v.value()).map_err(io),
            None => Ok(Vec::new()),
        }
    }

    /// Creates the thread for `owner` if new, and appends messages to it,
    /// durably. The owner check and the append are one transaction, so two
    /// users racing to start the same new thread cannot both write to it.
    ///
    /// # Errors
    /// `NotOwner` when the thread belongs to another user (nothing is written).
    pub fn append(&self, thread: &str, owner: &str, new: &[Value]) -> Result<(), ThreadError> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut owners = txn.open_table(OWNERS).map_err(io)?;
            let existing = owners.get(thread).map_err(io)?.map(|v| v.value().to_owned());
            match existing {
                Some(other) if other != owner => return Err(ThreadError::NotOwner(other)),
                Some(_) => {}
                None => {
                    owners.insert(thread, owner).map_err(io)?;
                }
            }
            let mut messages = txn.open_table(MESSAGES).map_err(io)?;
            let mut all: Vec<Value> = match messages.get(thread).map_err(io)? {
                Some(v) => serde_json::from_slice(v.value()).map_err(io)?,
                None => Vec::new(),
            };
            all.extend(new.iter().cloned());
            let bytes = serde_json::to_vec(&all).map_err(io)?;
            messages.insert(thread, bytes.as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn threads_keep_owner_and_history_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = Threads::open(dir.path()).unwrap();
            t.append("t1", "alice", &[json!({ "role": "user", "content": "hi" })]).unwrap();
            t.append("t1", "alice", &[json!({ "role": "assistant", "content": "hello" })]).unwrap();
            let refused = t.append("t1", "bob", &[json!({ "role": "user", "content": "mine now" })]);
            assert!(matches!(refused, Err(ThreadError::NotOwner(owner)) if owner == "alice"));
        }
        let t = Threads::open(dir.path()).unwrap();
        assert_eq!(t.owner("t1").unwrap().as_deref(), Some("alice"), "the first writer owns the thread");
        assert_eq!(t.messages("t1").unwrap().len(), 2, "bob's message was not written");
        assert_eq!(t.owner("nope").unwrap(), None);
        assert!(t.messages("nope").unwrap().is_empty());
    }
}
