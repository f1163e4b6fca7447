//! One run per thread: which run holds each thread, which runs wait for it
//! (`multitask: enqueue` or `interrupt`), taking and releasing a thread, and
//! stopping its runs.

use std::collections::{HashMap, VecDeque};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Bridge, BridgeError, Stopped};
use crate::Caller;

#[derive(Default)]
pub(super) struct Slots {
    /// The one active run of each busy thread.
    pub(super) active: HashMap<String, Active>,
    /// Runs waiting for their thread (`multitask: enqueue` or `interrupt`),
    /// at most `max_enqueued` per thread.
    waiting: HashMap<String, Vec<Waiting>>,
    /// The latest runs that ended, `(run_id, thread_id, user)`, so that a
    /// stop by run id after the end still says whose run it was.
    ended: VecDeque<(String, String, String)>,
}

/// How many ended runs `Slots::ended` remembers.
const ENDED_KEPT: usize = 4096;

pub(super) struct Active {
    run_id: String,
    /// Who started it: only this user (or a service) may stop it.
    user: String,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

/// A run waiting for its thread; cancelling it ends the wait. It becomes
/// the thread's active run when the one before it releases the thread.
struct Waiting {
    run_id: String,
    user: String,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

/// A thread taken by a run.
pub(super) struct Claim {
    /// Stops the run, or its wait.
    pub(super) cancel: CancellationToken,
    /// Set when the run releases the thread, which wakes the runs waiting for it.
    pub(super) done: watch::Sender<bool>,
}

impl Slots {
    /// Forgets a waiting run.
    fn unqueue(&mut self, thread_id: &str, run_id: &str) {
        if let Some(w) = self.waiting.get_mut(thread_id) {
            w.retain(|w| w.run_id != run_id);
            if w.is_empty() {
                self.waiting.remove(thread_id);
            }
        }
    }

    /// Gives a free thread to the first run waiting for it that was not
    /// stopped: waiting runs start in the order they came.
    fn hand_over(&mut self, thread_id: &str) {
        let Some(line) = self.waiting.get_mut(thread_id) else {
            return;
        };
        line.retain(|w| !w.cancel.is_cancelled());
        if !line.is_empty() {
            let next = line.remove(0);
            self.active.insert(
                thread_id.to_owned(),
                Active { run_id: next.run_id, user: next.user, cancel: next.cancel, done: next.done },
            );
        }
        if line.is_empty() {
            self.waiting.remove(thread_id);
        }
    }

    /// Cancels every active and waiting run, for shutdown.
    pub(super) fn cancel_all(&self) {
        let waiting = self.waiting.values().flatten().map(|w| &w.cancel);
        for token in self.active.values().map(|a| &a.cancel).chain(waiting) {
            token.cancel();
        }
    }
}

impl Bridge {
    /// Takes the thread for `run_id`: at once when it is free, after its
    /// active run ends when `multitask` is `enqueue` or `interrupt` (which
    /// also cancels that run).
    ///
    /// # Errors
    /// `ThreadBusy` when the thread is busy and the run may not wait, or too
    /// many already wait; `PermissionDenied` when another user's run holds
    /// it; `Cancelled` when the run was stopped while it waited.
    pub(super) async fn claim(
        &self,
        thread_id: &str,
        run_id: &str,
        user: &str,
        multitask: &str,
    ) -> Result<Claim, BridgeError> {
        let cancel = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(false);
        let wait = multitask == "interrupt" || multitask == "enqueue";
        let mut queued = false;
        loop {
            let mut waiting = {
                let mut slots = self.shared.slots.lock().unwrap();
                let slots = &mut *slots;
                // Stopped while it waited (the thread's run ending wakes it
                // too), perhaps just after the thread was handed to it.
                if cancel.is_cancelled() {
                    slots.unqueue(thread_id, run_id);
                    if slots.active.get(thread_id).is_some_and(|a| a.run_id == run_id) {
                        slots.active.remove(thread_id);
                        slots.hand_over(thread_id);
                        let _ = done_tx.send(true);
                    }
                    return Err(BridgeError::Cancelled);
                }
                match slots.active.get(thread_id) {
                    // Handed over by the run before it.
                    Some(a) if a.run_id == run_id => return Ok(Claim { cancel, done: done_tx }),
                    // Checked again here: the thread may have been started by
                    // another user after the owner check of admission.
                    Some(a) if a.user != user => {
                        slots.unqueue(thread_id, run_id);
                        return Err(BridgeError::not_yours(thread_id));
                    }
                    Some(_) if !wait => return Err(BridgeError::ThreadBusy(thread_id.to_owned())),
                    Some(a) => {
                        if multitask == "interrupt" {
                            a.cancel.cancel();
                        }
                        let done = a.done.clone();
                        if !queued {
                            let line = slots.waiting.entry(thread_id.to_owned()).or_default();
                            if line.len() >= self.shared.config.max_enqueued {
                                return Err(BridgeError::ThreadBusy(thread_id.to_owned()));
                            }
                            line.push(Waiting {
                                run_id: run_id.to_owned(),
                                user: user.to_owned(),
                                cancel: cancel.clone(),
                                done: done_rx.clone(),
                            });
                            queued = true;
                        }
                        done
                    }
                    None => {
                        slots.unqueue(thread_id, run_id);
                        slots.active.insert(
                            thread_id.to_owned(),
                            Active {
                                run_id: run_id.to_owned(),
                                user: user.to_owned(),
                                cancel: cancel.clone(),
                                done: done_rx,
                            },
                        );
                        return Ok(Claim { cancel, done: done_tx });
                    }
                }
            };
            // `interrupt_stream` by thread id (or this run's id) ends the wait;
            // the loop then sees the cancellation.
            tokio::select! {
                _ = waiting.wait_for(|done| *done) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// Frees the thread of `run_id`, remembering whose run it was, hands it
    /// to the first run waiting for it, and wakes them all.
    pub(super) fn release(&self, thread_id: &str, run_id: &str, done: &watch::Sender<bool>) {
        let mut slots = self.shared.slots.lock().unwrap();
        if let Some(a) = slots.active.remove(thread_id) {
            if a.run_id == run_id {
                if slots.ended.len() == ENDED_KEPT {
                    slots.ended.pop_front();
                }
                slots.ended.push_back((a.run_id, thread_id.to_owned(), a.user));
                slots.hand_over(thread_id);
            } else {
                slots.active.insert(thread_id.to_owned(), a);
            }
        }
        drop(slots);
        let _ = done.send(true);
    }

    /// Cancels the run with this run id, or every run of this thread (the
    /// active one and those waiting for it), for `caller`; idempotent. Only
    /// the user who started a run (or a service) may stop it, and only the
    /// owner of a thread may stop its runs.
    ///
    /// # Errors
    /// `PermissionDenied` when the run or the thread is another user's;
    /// nothing is cancelled then.
    pub async fn cancel(
        &self,
        run_id: Option<&str>,
        thread_id: Option<&str>,
        caller: &Caller,
    ) -> Result<Stopped, BridgeError> {
        let allowed = |user: &str| caller.is_service() || caller.user_id == user;
        {
            let slots = self.shared.slots.lock().unwrap();
            // A waiting run is found by its id through its thread's active run:
            // they belong to the same user.
            let by_run =
                |t: &String| slots.waiting.get(t).is_some_and(|w| w.iter().any(|w| Some(w.run_id.as_str()) == run_id));
            let found = slots
                .active
                .iter()
                .find(|(t, a)| Some(a.run_id.as_str()) == run_id || Some(t.as_str()) == thread_id || by_run(t));
            if let Some((thread, a)) = found {
                if !allowed(&a.user) {
                    return Err(BridgeError::PermissionDenied("the run belongs to another user".into()));
                }
                let waiting = slots.waiting.get(thread).map(Vec::as_slice).unwrap_or_default();
                let mut stopped = Stopped { run_id: a.run_id.clone(), thread_id: thread.clone(), cancelled: false };
                let mut stop = |id: &str, token: &CancellationToken| {
                    stopped.cancelled |= !token.is_cancelled();
                    token.cancel();
                    if run_id == Some(id) {
                        stopped.run_id = id.to_owned();
                    }
                };
                match run_id {
                    Some(id) => {
                        let token = waiting.iter().find(|w| w.run_id == id).map_or(&a.cancel, |w| &w.cancel);
                        stop(id, token);
                    }
                    None => {
                        stop(&a.run_id, &a.cancel);
                        for w in waiting {
                            stop(&w.run_id, &w.cancel);
                        }
                    }
                }
                return Ok(stopped);
            }
            if let Some((run, thread, user)) = slots.ended.iter().rev().find(|(r, ..)| Some(r.as_str()) == run_id) {
                if !allowed(user) {
                    return Err(BridgeError::PermissionDenied("the run belongs to another user".into()));
                }
                return Ok(Stopped { run_id: run.clone(), thread_id: thread.clone(), cancelled: false });
            }
        }
        // Nothing running: say so, unless the thread is someone else's.
        if let Some(thread) = thread_id {
            let owner = self.shared.threads.owner(thread).await.map_err(|e| BridgeError::Internal(e.to_string()))?;
            if owner.is_some_and(|o| !allowed(&o)) {
                return Err(BridgeError::not_yours(thread));
            }
        }
        Ok(Stopped {
            run_id: run_id.unwrap_or_default().to_owned(),
            thread_id: thread_id.unwrap_or_default().to_owned(),
            cancelled: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::{
        Config,
        runs::{RunSpec, Started},
        threads::Threads,
    };

    fn bridge(dir: &std::path::Path) -> Bridge {
        let config = Config { echo_delay: std::time::Duration::ZERO, eventbus_url: None, ..Config::default() };
        Bridge::new(config, Threads::open(dir, crate::threads::DEFAULT_MAX_MESSAGES).unwrap(), None, None)
    }

    fn spec(user: &str, thread: &str, multitask: &str) -> RunSpec {
        RunSpec {
            agent: "echo".into(),
            thread_id: thread.into(),
            input: json!({ "messages": [{ "id": format!("{user}-{thread}"), "role": "user", "content": user }] }),
            user_id: user.into(),
            multitask: multitask.into(),
        }
    }

    /// Drains a run's events to its end.
    async fn finish(mut started: Started) {
        while started.events.recv().await.is_some() {}
    }

    /// The race between the owner check and the per-thread wait: alice holds
    /// a new thread's slot but has not stored it yet (no owner on record), and
    /// bob asks to wait for it, or to interrupt it. He is refused at once,
    /// and alice's run is left alone.
    #[tokio::test]
    async fn a_new_thread_held_by_one_user_is_refused_to_another() {
        let dir = tempfile::tempdir().unwrap();
        let b = bridge(dir.path());
        let cancel = CancellationToken::new();
        let (_done_tx, done_rx) = watch::channel(false);
        let alice = Active { run_id: "r1".into(), user: "alice".into(), cancel: cancel.clone(), done: done_rx };
        b.shared.slots.lock().unwrap().active.insert("t".into(), alice);
        for multitask in ["enqueue", "interrupt", ""] {
            let bob = tokio::time::timeout(std::time::Duration::from_secs(5), b.start(spec("bob", "t", multitask)))
                .await
                .expect("refused at once, not left waiting");
            assert_eq!(bob.err().map(|e| e.code().to_owned()).as_deref(), Some("permission_denied"), "{multitask}");
        }
        assert!(!cancel.is_cancelled(), "bob's `interrupt` did not stop alice's run");
        assert_eq!(b.shared.threads.owner("t").await.unwrap(), None, "bob did not claim the thread");
    }

    /// Runs enqueued on a busy thread start in the order they came (they
    /// raced for the thread when it was released, and came out shuffled).
    #[tokio::test]
    async fn enqueued_runs_start_in_the_order_they_came() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(Bridge::new(
            Config { echo_delay: std::time::Duration::from_millis(5), eventbus_url: None, ..Config::default() },
            Threads::open(dir.path(), crate::threads::DEFAULT_MAX_MESSAGES).unwrap(),
            None,
            None,
        ));
        let first = b.start(spec("alice", "t", "")).await.unwrap();
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut queued = Vec::new();
        for i in 0..6 {
            let (bridge, order, count) = (b.clone(), order_tx.clone(), started.clone());
            queued.push(tokio::spawn(async move {
                let run = bridge.start(spec("alice", "t", "enqueue")).await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                order.send(i).unwrap();
                finish(run).await;
            }));
            // In line (or, on a slow machine where the run before has ended
            // already, started) before the next one comes.
            loop {
                let waiting = b.shared.slots.lock().unwrap().waiting.get("t").map_or(0, Vec::len);
                if waiting + started.load(std::sync::atomic::Ordering::SeqCst) > i {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        finish(first).await;
        for task in queued {
            task.await.unwrap();
        }
        drop(order_tx);
        let mut order = Vec::new();
        while let Some(i) = order_rx.recv().await {
            order.push(i);
        }
        assert_eq!(order, [0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn only_the_runs_user_or_a_service_may_cancel_it() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bridge::new(
            Config { echo_delay: std::time::Duration::from_secs(1), eventbus_url: None, ..Config::default() },
            Threads::open(dir.path(), crate::threads::DEFAULT_MAX_MESSAGES).unwrap(),
            None,
            None,
        );
        let started = b.start(spec("alice", "t", "")).await.unwrap();
        let bob = Caller { user_id: "bob".into(), roles: vec!["admin".into()] };
        for (run, thread) in [(Some(started.run_id.as_str()), None), (None, Some("t"))] {
            assert!(matches!(b.cancel(run, thread, &bob).await, Err(BridgeError::PermissionDenied(_))));
        }
        let alice = Caller { user_id: "alice".into(), roles: vec![] };
        let stopped = b.cancel(None, Some("t"), &alice).await.unwrap();
        assert_eq!((stopped.run_id.as_str(), stopped.cancelled), (started.run_id.as_str(), true));
        let run_id = started.run_id.clone();
        finish(started).await;
        // Ended: nothing to cancel, but still not bob's to ask about, by thread or by run.
        assert!(matches!(b.cancel(None, Some("t"), &bob).await, Err(BridgeError::PermissionDenied(_))));
        assert!(matches!(b.cancel(Some(&run_id), None, &bob).await, Err(BridgeError::PermissionDenied(_))));
        let ended = b.cancel(Some(&run_id), None, &alice).await.unwrap();
        assert_eq!((ended.thread_id.as_str(), ended.cancelled), ("t", false));
        assert!(!b.cancel(None, Some("t"), &Caller::service()).await.unwrap().cancelled);
    }
}
