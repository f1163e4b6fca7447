//! Durable threads: who owns each, and its messages (user, assistant, tool)
//! in AG-UI form. `ThreadStore` is where a bridge keeps them: `Threads`
//! (here), one row per message in the bridge's own redb file, or
//! `bus::BusThreads`, on the event bus, where every bridge of a cluster
//! reads them.
//!
//! Appending writes only the new rows and a small meta row, so a long thread
//! appends as fast as a new one; a thread keeps its newest `max_messages`
//! and drops the oldest as it grows. No call runs on an async worker thread:
//! appends go to one writer thread that commits everything queued in one
//! transaction (one sync for all of them), and reads run on tokio's blocking
//! pool (redb's read transactions do not wait for the writer).

use std::{path::Path, sync::Arc, thread::JoinHandle};

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub mod bus;

/// Where a bridge keeps its threads.
#[derive(Clone)]
pub enum ThreadStore {
    /// The bridge's own file: threads that only this bridge serves.
    Local(Threads),
    /// The event bus: threads any bridge may serve.
    Bus(bus::BusThreads),
}

impl From<Threads> for ThreadStore {
    fn from(t: Threads) -> Self {
        ThreadStore::Local(t)
    }
}

impl ThreadStore {
    /// Messages each thread keeps.
    pub fn max_messages(&self) -> usize {
        match self {
            ThreadStore::Local(t) => t.max_messages(),
            ThreadStore::Bus(t) => t.max_messages(),
        }
    }

    /// Returns the owner of a thread, if it exists.
    pub async fn owner(&self, thread: &str) -> Result<Option<String>, ThreadError> {
        match self {
            ThreadStore::Local(t) => t.owner(thread).await,
            ThreadStore::Bus(t) => t.owner(thread).await,
        }
    }

    /// Returns a thread's messages, oldest first: its newest `max_messages`.
    pub async fn messages(&self, thread: &str) -> Result<Vec<Value>, ThreadError> {
        match self {
            ThreadStore::Local(t) => t.messages(thread).await,
            ThreadStore::Bus(t) => t.messages(thread).await,
        }
    }

    /// Creates the thread for `owner` if new, and appends messages to it.
    ///
    /// # Errors
    /// `NotOwner` when the thread belongs to another user (nothing is written).
    pub async fn append(&self, thread: &str, owner: &str, messages: Vec<Value>) -> Result<(), ThreadError> {
        match self {
            ThreadStore::Local(t) => t.append(thread, owner, messages).await,
            ThreadStore::Bus(t) => t.append(thread, owner, messages).await,
        }
    }
}

const OWNERS: TableDefinition<'static, &str, &str> = TableDefinition::new("owners");
/// One row per message, keyed by `(thread, seq)`; a thread's seqs are
/// consecutive, from its meta row's `first` up to `next` (excluded).
const ROWS: TableDefinition<'static, (&str, u64), &[u8]> = TableDefinition::new("thread_messages");
/// Per thread, `(first, next)`: the seq of its oldest kept message and the
/// seq its next message gets.
const META: TableDefinition<'static, &str, (u64, u64)> = TableDefinition::new("thread_meta");
/// The format before rows: each thread's whole history as one JSON array,
/// rewritten on every append. Moved into rows (and dropped) when opened.
const LEGACY: TableDefinition<'static, &str, &[u8]> = TableDefinition::new(LEGACY_NAME);
const LEGACY_NAME: &str = "messages";

/// File name of the thread store inside the data directory.
pub const FILE_NAME: &str = "threads.redb";
/// Messages a thread keeps by default (`agents.thread_max_messages`).
pub const DEFAULT_MAX_MESSAGES: usize = 1000;
/// redb's page cache for the threads file (its default, 1 GiB, is far more
/// than message histories read once per run need).
const CACHE_BYTES: usize = 16 << 20;
/// Appends waiting for the writer. Each run appends twice, so this holds the
/// appends of hundreds of runs starting or ending at once; past it, appending
/// waits for room.
const QUEUE: usize = 1024;
/// Most appends committed in one transaction.
const BATCH: usize = 256;

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

/// The thread store: a cheap handle; the last one dropped stops the writer
/// and closes the file.
#[derive(Clone)]
pub struct Threads {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared with the writer thread and with reads on the blocking pool.
    db: Arc<Database>,
    /// Messages kept per thread, the newest.
    max_messages: u64,
    /// Appends for the writer; `None` once dropping.
    appends: Option<mpsc::Sender<Append>>,
    /// Joined on drop, so that the file is released when the store is.
    writer: Option<JoinHandle<()>>,
}

/// One append, waiting for the writer's next commit.
struct Append {
    thread: String,
    owner: String,
    messages: Vec<Value>,
    done: oneshot::Sender<Result<(), ThreadError>>,
}

impl Threads {
    /// Opens (or creates) the store in `dir`, keeping the newest
    /// `max_messages` (at least 1) of each thread. A file of the format
    /// before rows is converted in place, in one transaction, each thread
    /// trimmed to the bound.
    ///
    /// # Errors
    /// When the directory cannot be used, or another process holds the store.
    pub fn open(dir: &Path, max_messages: usize) -> Result<Self, ThreadError> {
        let path = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|e| ThreadError::Open { path: path.clone(), cause: e.to_string() })?;
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(dir.join(FILE_NAME)).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => ThreadError::Locked { path: path.clone() },
            other => ThreadError::Open { path: path.clone(), cause: other.to_string() },
        })?;
        let max_messages = max_messages.max(1) as u64;
        let txn = db.begin_write().map_err(io)?;
        txn.open_table(OWNERS).map_err(io)?;
        txn.open_table(ROWS).map_err(io)?;
        txn.open_table(META).map_err(io)?;
        let legacy = txn.list_tables().map_err(io)?.any(|t| t.name() == LEGACY_NAME);
        if legacy {
            let moved = migrate(&txn, max_messages)?;
            txn.delete_table(LEGACY).map_err(io)?;
            tracing::info!(threads = moved, "thread store converted to one row per message");
        }
        txn.commit().map_err(io)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("thread-writer".into())
            .spawn(move || write_loop(&writer_db, max_messages, rx))
            .map_err(|e| ThreadError::Open { path, cause: e.to_string() })?;
        Ok(Threads { inner: Arc::new(Inner { db, max_messages, appends: Some(tx), writer: Some(writer) }) })
    }

    /// Messages each thread keeps.
    pub fn max_messages(&self) -> usize {
        self.inner.max_messages as usize
    }

    /// Returns the owner of a thread, if it exists.
    pub async fn owner(&self, thread: &str) -> Result<Option<String>, ThreadError> {
        let (db, thread) = (self.inner.db.clone(), thread.to_owned());
        blocking(move || {
            let txn = db.begin_read().map_err(io)?;
            let table = txn.open_table(OWNERS).map_err(io)?;
            Ok(table.get(thread.as_str()).map_err(io)?.map(|v| v.value().to_owned()))
        })
        .await
    }

    /// Returns a thread's messages, oldest first: its newest `max_messages`.
    pub async fn messages(&self, thread: &str) -> Result<Vec<Value>, ThreadError> {
        let (db, thread, max) = (self.inner.db.clone(), thread.to_owned(), self.inner.max_messages);
        blocking(move || {
            let txn = db.begin_read().map_err(io)?;
            let meta = txn.open_table(META).map_err(io)?;
            let Some((first, next)) = meta.get(thread.as_str()).map_err(io)?.map(|v| v.value()) else {
                return Ok(Vec::new());
            };
            let rows = txn.open_table(ROWS).map_err(io)?;
            // A bound lowered since the last append is applied on reading too.
            let from = first.max(next.saturating_sub(max));
            let mut out = Vec::with_capacity((next - from) as usize);
            for row in rows.range((thread.as_str(), from)..(thread.as_str(), next)).map_err(io)? {
                let (_, v) = row.map_err(io)?;
                out.push(serde_json::from_slice(v.value()).map_err(io)?);
            }
            Ok(out)
        })
        .await
    }

    /// Creates the thread for `owner` if new, and appends messages to it,
    /// durably, dropping its oldest beyond the bound. The owner check and the
    /// append are one transaction, so two users racing to start the same new
    /// thread cannot both write to it.
    ///
    /// # Errors
    /// `NotOwner` when the thread belongs to another user (nothing is written).
    pub async fn append(&self, thread: &str, owner: &str, messages: Vec<Value>) -> Result<(), ThreadError> {
        let (done, answer) = oneshot::channel();
        let append = Append { thread: thread.to_owned(), owner: owner.to_owned(), messages, done };
        let appends = self.inner.appends.as_ref().ok_or_else(|| io("the thread store is closed"))?;
        appends.send(append).await.map_err(|_| io("the thread writer stopped"))?;
        answer.await.map_err(|_| io("the thread writer stopped"))?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer commits what is queued, then ends.
        self.appends.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ThreadError> + Send + 'static,
) -> Result<T, ThreadError> {
    tokio::task::spawn_blocking(f).await.map_err(io)?
}

/// The writer thread: takes every queued append (up to `BATCH`), commits
/// them in one transaction, and answers each.
fn write_loop(db: &Database, max: u64, mut appends: mpsc::Receiver<Append>) {
    while let Some(first) = appends.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match appends.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        match commit(db, max, &batch) {
            Ok(results) => {
                for (a, result) in batch.into_iter().zip(results) {
                    let _ = a.done.send(result);
                }
            }
            Err(e) => {
                tracing::error!(cause = %e, appends = batch.len(), "cannot store thread messages");
                for a in batch {
                    let _ = a.done.send(Err(io(&e)));
                }
            }
        }
    }
}

/// Writes a batch of appends in one transaction: each gets its own result
/// (another user's thread is refused and writes nothing); a storage error
/// fails them all.
fn commit(db: &Database, max: u64, batch: &[Append]) -> Result<Vec<Result<(), ThreadError>>, ThreadError> {
    let txn = db.begin_write().map_err(io)?;
    let mut results = Vec::with_capacity(batch.len());
    for a in batch {
        match append_in(&txn, max, &a.thread, &a.owner, a.messages.iter()) {
            // Dropping the transaction aborts it: nothing of the batch is written.
            Err(ThreadError::Io(e)) => return Err(ThreadError::Io(e)),
            result => results.push(result),
        }
    }
    txn.commit().map_err(io)?;
    Ok(results)
}

/// Appends `new` to a thread in `txn`, claiming it for `owner` if new, and
/// trims it to its newest `max`.
fn append_in<'a>(
    txn: &WriteTransaction,
    max: u64,
    thread: &str,
    owner: &str,
    new: impl ExactSizeIterator<Item = &'a Value>,
) -> Result<(), ThreadError> {
    let mut owners = txn.open_table(OWNERS).map_err(io)?;
    let existing = owners.get(thread).map_err(io)?.map(|v| v.value().to_owned());
    match existing {
        Some(other) if other != owner => return Err(ThreadError::NotOwner(other)),
        Some(_) => {}
        None => {
            owners.insert(thread, owner).map_err(io)?;
        }
    }
    let mut meta = txn.open_table(META).map_err(io)?;
    let (first, old_next) = meta.get(thread).map_err(io)?.map_or((0, 0), |v| v.value());
    let n = new.len() as u64;
    // Messages that would be trimmed at once are never written.
    let skip = n.saturating_sub(max);
    let mut next = old_next + skip;
    let mut rows = txn.open_table(ROWS).map_err(io)?;
    for m in new.skip(skip as usize) {
        let bytes = serde_json::to_vec(m).map_err(io)?;
        rows.insert((thread, next), bytes.as_slice()).map_err(io)?;
        next += 1;
    }
    let kept_from = first.max(next.saturating_sub(max));
    for seq in first..kept_from.min(old_next) {
        rows.remove((thread, seq)).map_err(io)?;
    }
    meta.insert(thread, (kept_from, next)).map_err(io)?;
    Ok(())
}

/// Moves every thread of the legacy table into rows, in `txn`; returns how
/// many threads it moved.
fn migrate(txn: &WriteTransaction, max: u64) -> Result<usize, ThreadError> {
    let legacy = txn.open_table(LEGACY).map_err(io)?;
    let mut moved = 0;
    for entry in legacy.iter().map_err(io)? {
        let (thread, bytes) = entry.map_err(io)?;
        let messages: Vec<Value> = serde_json::from_slice(bytes.value()).map_err(io)?;
        let thread = thread.value();
        // The owner was stored with the messages, by the same transaction.
        let owner = txn.open_table(OWNERS).map_err(io)?.get(thread).map_err(io)?.map(|v| v.value().to_owned());
        let Some(owner) = owner else { continue };
        append_in(txn, max, thread, &owner, messages.iter())?;
        moved += 1;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;
    use serde_json::json;

    fn msg(i: usize) -> Value {
        json!({ "id": format!("m{i}"), "role": "user", "content": format!("message {i}") })
    }

    fn contents(messages: &[Value]) -> Vec<String> {
        messages.iter().map(|m| m["content"].as_str().unwrap().to_owned()).collect()
    }

    fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("message {i}")).collect()
    }

    #[tokio::test]
    async fn threads_keep_owner_and_history_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = Threads::open(dir.path(), DEFAULT_MAX_MESSAGES).unwrap();
            t.append("t1", "alice", vec![json!({ "role": "user", "content": "hi" })]).await.unwrap();
            t.append("t1", "alice", vec![json!({ "role": "assistant", "content": "hello" })]).await.unwrap();
            let refused = t.append("t1", "bob", vec![json!({ "role": "user", "content": "mine now" })]).await;
            assert!(matches!(refused, Err(ThreadError::NotOwner(owner)) if owner == "alice"));
        }
        let t = Threads::open(dir.path(), DEFAULT_MAX_MESSAGES).unwrap();
        assert_eq!(t.owner("t1").await.unwrap().as_deref(), Some("alice"), "the first writer owns the thread");
        assert_eq!(contents(&t.messages("t1").await.unwrap()), ["hi", "hello"], "bob's message was not written");
        assert_eq!(t.owner("nope").await.unwrap(), None);
        assert!(t.messages("nope").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn appends_keep_their_order_and_threads_stay_apart() {
        let dir = tempfile::tempdir().unwrap();
        let t = Threads::open(dir.path(), DEFAULT_MAX_MESSAGES).unwrap();
        // Concurrent appends to two threads: each thread's own appends, awaited
        // in turn, keep their order, and nothing leaks between threads.
        let (a, b) = (t.clone(), t.clone());
        let one = tokio::spawn(async move {
            for i in 0..50 {
                a.append("one", "alice", vec![msg(2 * i), msg(2 * i + 1)]).await.unwrap();
            }
        });
        let two = tokio::spawn(async move {
            for i in 0..30 {
                b.append("two", "bob", vec![msg(i)]).await.unwrap();
            }
        });
        one.await.unwrap();
        two.await.unwrap();
        assert_eq!(contents(&t.messages("one").await.unwrap()), numbered(0..100));
        assert_eq!(contents(&t.messages("two").await.unwrap()), numbered(0..30));
        // A thread whose id is a prefix of another's is its own.
        t.append("on", "alice", vec![msg(7)]).await.unwrap();
        assert_eq!(contents(&t.messages("on").await.unwrap()), numbered(7..8));
        assert_eq!(t.messages("one").await.unwrap().len(), 100);
    }

    #[tokio::test]
    async fn a_thread_keeps_its_newest_messages_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        {
            let t = Threads::open(dir.path(), 5).unwrap();
            assert_eq!(t.max_messages(), 5);
            for i in 0..3 {
                t.append("t", "alice", vec![msg(i)]).await.unwrap();
            }
            assert_eq!(contents(&t.messages("t").await.unwrap()), numbered(0..3), "under the bound nothing goes");
            t.append("t", "alice", vec![msg(3), msg(4), msg(5), msg(6)]).await.unwrap();
            assert_eq!(contents(&t.messages("t").await.unwrap()), numbered(2..7), "the oldest went first");
            // One append over the bound on its own keeps its own newest.
            t.append("t", "alice", (7..20).map(msg).collect()).await.unwrap();
            assert_eq!(contents(&t.messages("t").await.unwrap()), numbered(15..20));
        }
        // The trimmed rows are gone from the file, not only hidden.
        let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(ROWS).unwrap().len().unwrap(), 5);
        assert_eq!(txn.open_table(META).unwrap().get("t").unwrap().unwrap().value(), (15, 20));
        drop(txn);
        drop(db);
        // A lower bound on reopening applies at once, and to the next append.
        let t = Threads::open(dir.path(), 2).unwrap();
        assert_eq!(contents(&t.messages("t").await.unwrap()), numbered(18..20));
        t.append("t", "alice", vec![msg(20)]).await.unwrap();
        assert_eq!(contents(&t.messages("t").await.unwrap()), numbered(19..21));
    }

    #[tokio::test]
    async fn a_file_of_the_old_format_is_converted_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What the store wrote before rows: one JSON array per thread.
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut owners = txn.open_table(OWNERS).unwrap();
                let mut legacy = txn.open_table(LEGACY).unwrap();
                for (thread, owner, n) in [("short", "alice", 3), ("long", "bob", 12)] {
                    owners.insert(thread, owner).unwrap();
                    let all: Vec<Value> = (0..n).map(msg).collect();
                    legacy.insert(thread, serde_json::to_vec(&all).unwrap().as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        {
            let t = Threads::open(dir.path(), 10).unwrap();
            assert_eq!(contents(&t.messages("short").await.unwrap()), numbered(0..3));
            assert_eq!(contents(&t.messages("long").await.unwrap()), numbered(2..12), "trimmed to the bound");
            assert_eq!(t.owner("long").await.unwrap().as_deref(), Some("bob"));
            t.append("short", "alice", vec![msg(3)]).await.unwrap();
            assert!(matches!(t.append("short", "bob", vec![msg(9)]).await, Err(ThreadError::NotOwner(_))));
        }
        // Converted once: the old table is gone, and reopening keeps the rows.
        let t = Threads::open(dir.path(), 10).unwrap();
        assert_eq!(contents(&t.messages("short").await.unwrap()), numbered(0..4));
        let db = t.inner.db.clone();
        let txn = db.begin_write().unwrap();
        assert!(!txn.list_tables().unwrap().any(|h| h.name() == LEGACY_NAME));
        txn.abort().unwrap();
    }

    #[tokio::test]
    async fn the_store_is_released_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let t = Threads::open(dir.path(), 10).unwrap();
        assert!(matches!(Threads::open(dir.path(), 10), Err(ThreadError::Locked { .. })));
        t.append("t", "alice", vec![msg(0)]).await.unwrap();
        drop(t);
        let t = Threads::open(dir.path(), 10).expect("reopened at once: the writer let go of the file");
        assert_eq!(t.messages("t").await.unwrap().len(), 1);
    }
}
