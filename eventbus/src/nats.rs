//! The `nats` engine: every bus node on the same NATS JetStream shares
//! channels, offsets, history and idempotency keys.
//!
//! **Each channel is its own stream.** JetStream numbers messages per
//! stream, gap-free, so a stream per channel makes its sequence the
//! channel's offset with nothing to coordinate: nodes publish to it
//! concurrently and pipelined, and the server orders them. The other design,
//! one stream for every channel with a per-channel count written under
//! `Nats-Expected-Last-Subject-Sequence`, would make each publish of a
//! channel wait for the one before it (the expected sequence is only known
//! from its ack) and retry whenever two nodes publish to it at once. A stream
//! per channel also gives each namespace its own limits (`max_msgs` is the
//! history size, `max_age` its TTL, both enforced by the server) and its
//! own five-minute duplicate window for `Nats-Msg-Id`. What it costs is a
//! stream to create on a channel's first publish or join, and server state
//! per channel (see BENCHMARKS.md for both, measured).
//!
//! Per channel `c` (`t` is `c` made into a subject token, see `token`):
//! - the stream `SB_t`, whose description holds `{"channel": c, "epoch": e}`,
//!   taking the subject `sb.in.t`;
//! - its republish of every stored message to `sb.live.t.e`: the live feed
//!   carries only what the stream stored, in its order, with its sequence in
//!   `Nats-Sequence` and its epoch in the subject. Each node subscribes to
//!   `sb.live.t.*` once per channel it has subscribers for, and the bus core
//!   checks every offset against the one before it (`Bus::on_live`).
//!
//! Presence entries of every node are in one memory stream, `SB_PRESENCE`,
//! which keeps the last message of each subject `sbp.t.<connection>` for
//! `presence_ttl`: a node refreshes its entries by publishing them again,
//! so those of a node that vanished go by themselves. Joins and leaves are
//! published on `sb.live.t.~presence`, which every node hearing the channel
//! already subscribes to (`~` is in no epoch).
//!
//! The epoch is chosen by the node that creates the stream. A stream deleted
//! and created again (its history lost) has a new one; a node that finds the
//! stream holding fewer events than it delivered (NATS lost writes in a
//! crash) deletes it and starts it again in a new epoch, since those offsets
//! must not be given twice.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::{
    self, ErrorCode,
    consumer::{AckPolicy, DeliverPolicy, pull},
    context::PublishErrorKind,
    message::PublishMessage,
    stream::{self, DiscardPolicy, Republish, StorageType},
};
use futures::{
    StreamExt, TryStreamExt,
    future::{BoxFuture, FutureExt},
};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    Event, IDEMPOTENCY_WINDOW, NewEvent, Position, Published,
    broker::{Broker, Listed, Reply, Tasks, decode, encode, new_epoch},
    bus::{Bus, Engine},
    config::Config,
    error::{BusError, StoreError},
    now_ms,
    presence::{Change, PRESENCE_QUEUE, PresenceEntry, PresenceStore, change_message},
};

/// How long a request to NATS may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most channels `Channels` lists.
const MAX_LISTED: usize = 10_000;

/// Most events one fetch of a replay asks for.
const FETCH_BATCH: usize = 1000;

/// Streams of channels start with this; nothing else of ours does.
const STREAM_PREFIX: &str = "SB_";

/// Subject prefix of the live feed.
const LIVE_PREFIX: &str = "sb.live.";

/// Longest token used as it is; longer names are hashed (a stream's name is
/// a directory name on the server).
const MAX_TOKEN: usize = 200;

/// A channel name as one subject token and part of a stream name: `.`
/// (the subject separator) and `=` (the escape) are escaped as `=2E` and
/// `=3D`; every other character a channel name may have is allowed in both.
/// A token longer than `MAX_TOKEN` is `~` and the name's SHA-256 instead
/// (`~` is in no channel name, so the two kinds never meet).
fn token(channel: &str) -> String {
    let escaped = channel.replace('=', "=3D").replace('.', "=2E");
    if escaped.len() + STREAM_PREFIX.len() <= MAX_TOKEN {
        return escaped;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(channel.as_bytes());
    let mut out = String::with_capacity(65);
    out.push('~');
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

fn stream_name(channel: &str) -> String {
    format!("{STREAM_PREFIX}{}", token(channel))
}

fn ingest_subject(channel: &str) -> String {
    format!("sb.in.{}", token(channel))
}

/// What a stream's description holds.
#[derive(Serialize, Deserialize)]
struct Description {
    channel: String,
    epoch: String,
}

fn describe(info: &stream::Info) -> Option<Description> {
    serde_json::from_str(info.config.description.as_deref()?).ok()
}

fn nats_error(e: impl std::fmt::Display) -> BusError {
    BusError::Store(StoreError::Io(format!("nats: {e}")))
}

fn not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// What the feed task is asked to do, in the order the bus decided it.
enum Control {
    Listen(Arc<str>),
    Unlisten(Arc<str>),
}

/// The engine's handle, held by the bus.
#[derive(Clone)]
pub(crate) struct Nats {
    inner: Arc<Inner>,
}

struct Inner {
    /// The bus's configuration, for history bounds.
    config: Config,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Streams known to exist, by channel, with their epoch; an entry goes
    /// when its stream is deleted (the server's advisory) or found missing.
    known: Mutex<HashMap<Arc<str>, Arc<str>>>,
    control: mpsc::UnboundedSender<Control>,
    presence: Arc<NatsPresence>,
}

/// Connects to NATS at `url` and returns a bus on it.
pub(crate) async fn open(config: Config, url: &str) -> Result<(Bus, Tasks), StoreError> {
    let unreachable = |e: &dyn std::fmt::Display| StoreError::Unreachable { url: url.to_owned(), cause: e.to_string() };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let options = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(RESPONSE_TIMEOUT))
        .event_callback(move |event| {
            let events = events_tx.clone();
            async move {
                let _ = events.send(event);
            }
        });
    let client = tokio::time::timeout(Duration::from_secs(3), options.connect(url))
        .await
        .map_err(|e| unreachable(&e))?
        .map_err(|e| unreachable(&e))?;
    let js = jetstream::ContextBuilder::new().ack_timeout(RESPONSE_TIMEOUT).build(client.clone());
    // Fails early, naming the URL, when the server has no JetStream: a
    // stream that cannot exist is reported missing only by JetStream.
    match js.get_stream(format!("{STREAM_PREFIX}~")).await {
        Err(e) if not_found(&e) => {}
        Err(e) => return Err(unreachable(&format!("no JetStream: {e}"))),
        Ok(_) => {}
    }
    let deleted = client.subscribe("$JS.EVENT.ADVISORY.STREAM.DELETED.*").await.map_err(|e| unreachable(&e))?;
    let (control, control_rx) = mpsc::unbounded_channel();
    let presence = Arc::new(NatsPresence::open(client.clone(), js.clone(), config.presence_ttl).await?);
    let inner = Inner { config: config.clone(), client, js, known: Mutex::new(HashMap::new()), control, presence };
    let nats = Nats { inner: Arc::new(inner) };
    let bus = Bus::with_engine(config, Engine::Shared(Arc::new(nats.clone())), Arc::from(""));
    let stop = CancellationToken::new();
    let handles = vec![
        tokio::spawn(feed(bus.clone(), nats.clone(), control_rx, stop.clone())),
        tokio::spawn(connection_events(bus.clone(), nats.clone(), events_rx, deleted, stop.clone())),
    ];
    Ok((bus, Tasks { stop, handles }))
}

impl Broker for Nats {
    fn publish(&self, event: NewEvent, reply: Reply) -> BoxFuture<'_, Result<(), BusError>> {
        async move {
            let id = uuid::Uuid::now_v7().to_string();
            let payload = encode(&id, &event, now_ms())?;
            let channel: Arc<str> = Arc::from(event.channel.as_str());
            let (payload, key) = (bytes::Bytes::from(payload), event.idempotency_key);
            // Sent here, in the caller's order; the ack is awaited apart,
            // so that publishes are pipelined.
            let (epoch, ack) = self.send(&channel, payload.clone(), key.as_deref()).await?;
            let nats = self.clone();
            tokio::spawn(async move {
                let mut acked = ack.await.map(|ack| (epoch, ack));
                if acked.as_ref().is_err_and(|e| e.kind() == PublishErrorKind::StreamNotFound) {
                    // Its stream was deleted since this node learnt its
                    // epoch: sent once more, to the stream made anew.
                    nats.forget(&channel);
                    acked = match nats.send(&channel, payload, key.as_deref()).await {
                        Ok((epoch, ack)) => ack.await.map(|ack| (epoch, ack)),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return;
                        }
                    };
                }
                let result = match acked {
                    Ok((epoch, ack)) if ack.duplicate => nats.duplicate(&channel, ack.sequence, epoch).await,
                    Ok((epoch, ack)) => {
                        let position = Position { offset: ack.sequence, epoch };
                        Ok(Published { event_id: id, position, duplicate: false })
                    }
                    Err(e) => Err(nats_error(e)),
                };
                let _ = reply.send(result);
            });
            Ok(())
        }
        .boxed()
    }

    fn listen(&self, channel: Arc<str>) {
        let _ = self.inner.control.send(Control::Listen(channel));
    }

    fn unlisten(&self, channel: Arc<str>) {
        let _ = self.inner.control.send(Control::Unlisten(channel));
    }

    fn sync(
        &self,
        channel: Arc<str>,
        had: Option<Position>,
    ) -> BoxFuture<'static, Result<(Position, Vec<Event>), BusError>> {
        let nats = self.clone();
        async move { nats.position_and_fill(&channel, had).await }.boxed()
    }

    fn range(&self, channel: Arc<str>, after: u64, to: u64) -> BoxFuture<'static, Result<Vec<Event>, BusError>> {
        let nats = self.clone();
        async move { nats.read(&channel, after, to).await }.boxed()
    }

    fn history(
        &self,
        channel: Arc<str>,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> BoxFuture<'static, Result<(Vec<Event>, Position), BusError>> {
        let nats = self.clone();
        async move { nats.history(&channel, since, limit, reverse).await }.boxed()
    }

    fn channels(&self, prefix: String) -> BoxFuture<'static, Result<Listed, BusError>> {
        let nats = self.clone();
        async move { nats.channels(&prefix).await }.boxed()
    }

    fn presence(&self) -> Arc<dyn PresenceStore> {
        self.inner.presence.clone()
    }
}

impl Nats {
    /// The configuration of a channel's stream in `epoch`.
    fn stream_config(&self, channel: &str, epoch: &str) -> stream::Config {
        let policy = self.inner.config.history_of(channel);
        let token = token(channel);
        let description = Description { channel: channel.to_owned(), epoch: epoch.to_owned() };
        let max_age = policy.ttl.max(Duration::from_secs(1));
        stream::Config {
            name: format!("{STREAM_PREFIX}{token}"),
            description: Some(serde_json::to_string(&description).expect("strings serialize")),
            subjects: vec![format!("sb.in.{token}")],
            max_messages: i64::try_from(policy.size.max(1)).unwrap_or(i64::MAX),
            max_age,
            discard: DiscardPolicy::Old,
            storage: StorageType::File,
            // The server refuses a window longer than the history's TTL.
            duplicate_window: IDEMPOTENCY_WINDOW.min(max_age),
            republish: Some(Republish {
                source: format!("sb.in.{token}"),
                destination: format!("{LIVE_PREFIX}{token}.{epoch}"),
                headers_only: false,
            }),
            ..Default::default()
        }
    }

    /// The epoch of a channel's stream, creating the stream when there is none.
    async fn ensure(&self, channel: &Arc<str>) -> Result<Arc<str>, BusError> {
        if let Some(epoch) = self.inner.known.lock().unwrap().get(channel) {
            return Ok(epoch.clone());
        }
        let (_, epoch) = self.stream(channel, true).await?.expect("created when missing");
        Ok(epoch)
    }

    /// Sends an event to its channel's stream (made first, when this node
    /// knows of none); returns the stream's epoch and the ack to come.
    async fn send(
        &self,
        channel: &Arc<str>,
        payload: bytes::Bytes,
        key: Option<&str>,
    ) -> Result<(Arc<str>, jetstream::context::PublishAckFuture), BusError> {
        let epoch = self.ensure(channel).await?;
        let mut message = PublishMessage::build().payload(payload);
        if let Some(key) = key {
            message = message.message_id(key);
        }
        let ack = self.inner.js.send_publish(ingest_subject(channel), message).await.map_err(nats_error)?;
        Ok((epoch, ack))
    }

    fn forget(&self, channel: &str) {
        self.inner.known.lock().unwrap().remove(channel);
    }

    /// Reads a channel's stream and its epoch (creating it in a new epoch
    /// when it is missing and `create`), and remembers the epoch.
    async fn stream(&self, channel: &Arc<str>, create: bool) -> Result<Option<(stream::Info, Arc<str>)>, BusError> {
        let name = stream_name(channel);
        let info = match self.inner.js.get_stream(&name).await {
            Ok(stream) => stream.cached_info().clone(),
            Err(e) if not_found(&e) && create => {
                match self.inner.js.create_stream(self.stream_config(channel, &new_epoch())).await {
                    Ok(stream) => stream.cached_info().clone(),
                    // Another node created it first: theirs it is.
                    Err(_) => self.inner.js.get_stream(&name).await.map_err(nats_error)?.cached_info().clone(),
                }
            }
            Err(e) if not_found(&e) => {
                self.forget(channel);
                return Ok(None);
            }
            Err(e) => return Err(nats_error(e)),
        };
        let Some(described) = describe(&info).filter(|d| *d.channel == **channel) else {
            return Err(nats_error(format!("stream {name} is not a Switchboard channel's")));
        };
        let epoch: Arc<str> = Arc::from(described.epoch);
        self.inner.known.lock().unwrap().insert(channel.clone(), epoch.clone());
        Ok(Some((info, epoch)))
    }

    /// The answer to a publish the stream found to repeat an idempotency
    /// key: the first publish's position and event id.
    async fn duplicate(&self, channel: &Arc<str>, offset: u64, epoch: Arc<str>) -> Result<Published, BusError> {
        let stream = self.inner.js.get_stream(stream_name(channel)).await.map_err(nats_error)?;
        let message = stream.get_raw_message(offset).await.map_err(nats_error)?;
        let first = decode(channel, offset, &epoch, &message.payload)
            .ok_or_else(|| nats_error(format!("undecodable event {offset} in {channel}")))?;
        Ok(Published { event_id: first.id, position: Position { offset, epoch }, duplicate: true })
    }

    /// `Broker::sync`: the stream's last sequence and epoch (starting a new
    /// epoch when NATS lost writes), and the events after `had`.
    async fn position_and_fill(
        &self,
        channel: &Arc<str>,
        had: Option<Position>,
    ) -> Result<(Position, Vec<Event>), BusError> {
        let (info, epoch) = self.stream(channel, true).await?.expect("created when missing");
        let top = info.state.last_sequence;
        let mut position = Position { offset: top, epoch };
        if let Some(had) = had.as_ref().filter(|had| *had.epoch == *position.epoch && top < had.offset) {
            tracing::warn!(channel = &**channel, top, delivered = had.offset, "NATS lost events; new epoch");
            position = self.rotate(channel, &had.epoch).await?;
        }
        let fill = match had {
            Some(had) if *had.epoch == *position.epoch && had.offset < position.offset => {
                self.read(channel, had.offset, position.offset).await?
            }
            _ => Vec::new(),
        };
        Ok((position, fill))
    }

    /// Starts a channel's stream again in a new epoch, unless another node
    /// already has (its epoch is no longer `old`).
    async fn rotate(&self, channel: &Arc<str>, old: &str) -> Result<Position, BusError> {
        if let Some((info, epoch)) = self.stream(channel, false).await?
            && *epoch != *old
        {
            return Ok(Position { offset: info.state.last_sequence, epoch });
        }
        self.forget(channel);
        let _ = self.inner.js.delete_stream(stream_name(channel)).await;
        let (info, epoch) = self.stream(channel, true).await?.expect("created when missing");
        Ok(Position { offset: info.state.last_sequence, epoch })
    }

    /// Reads the events after `after` up to `to`, with an ephemeral consumer
    /// starting at `after + 1`, labelled with the stream's epoch.
    async fn read(&self, channel: &Arc<str>, after: u64, to: u64) -> Result<Vec<Event>, BusError> {
        if to <= after {
            return Ok(Vec::new());
        }
        let stream = match self.inner.js.get_stream(stream_name(channel)).await {
            Ok(stream) => stream,
            Err(e) if not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(nats_error(e)),
        };
        let Some(epoch) = describe(stream.cached_info()).map(|d| Arc::<str>::from(d.epoch)) else {
            return Ok(Vec::new());
        };
        let start = DeliverPolicy::ByStartSequence { start_sequence: after + 1 };
        let want = usize::try_from(to - after).unwrap_or(usize::MAX);
        let mut events = Vec::with_capacity(want.min(FETCH_BATCH));
        for message in fetch(&stream, String::new(), start, Some(want)).await? {
            let offset = message.info().map_err(nats_error)?.stream_sequence;
            if offset > to {
                break;
            }
            match decode(channel, offset, &epoch, &message.payload) {
                Some(event) => events.push(event),
                None => tracing::error!(channel = &**channel, offset, "undecodable event in the stream"),
            }
        }
        Ok(events)
    }

    async fn history(
        &self,
        channel: &Arc<str>,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Result<(Vec<Event>, Position), BusError> {
        let Some((info, epoch)) = self.stream(channel, false).await? else {
            return Ok((Vec::new(), Position { offset: 0, epoch: Arc::from("") }));
        };
        let (top, first) = (info.state.last_sequence, info.state.first_sequence);
        let after = since.unwrap_or(0).max(first.saturating_sub(1));
        let n = (limit as u64).min(top.saturating_sub(after));
        let events = if reverse {
            let mut events = self.read(channel, top - n, top).await?;
            events.reverse();
            events
        } else {
            self.read(channel, after, after + n).await?
        };
        Ok((events, Position { offset: top, epoch }))
    }

    async fn channels(&self, prefix: &str) -> Result<Vec<(Arc<str>, Position)>, BusError> {
        let mut streams = self.inner.js.streams();
        let mut out = Vec::new();
        while let Some(info) = streams.try_next().await.map_err(nats_error)? {
            if !info.config.name.starts_with(STREAM_PREFIX) {
                continue;
            }
            let Some(described) = describe(&info).filter(|d| d.channel.starts_with(prefix)) else {
                continue;
            };
            let position = Position { offset: info.state.last_sequence, epoch: Arc::from(described.epoch) };
            out.push((Arc::from(described.channel), position));
            if out.len() >= MAX_LISTED {
                break;
            }
        }
        Ok(out)
    }
}

/// Reads messages of `stream` through an ephemeral consumer (of the
/// subjects `filter`, all when empty) from `start`: `want` of them, or with
/// `None` as many as it had pending when created. The consumer is deleted
/// after (and expires by itself if that fails).
async fn fetch(
    stream: &jetstream::stream::Stream,
    filter: String,
    start: DeliverPolicy,
    want: Option<usize>,
) -> Result<Vec<jetstream::Message>, BusError> {
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter,
            deliver_policy: start,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(nats_error)?;
    let want = want.unwrap_or_else(|| usize::try_from(consumer.cached_info().num_pending).unwrap_or(usize::MAX));
    let mut messages = Vec::with_capacity(want.min(FETCH_BATCH));
    while messages.len() < want {
        let asked = (want - messages.len()).min(FETCH_BATCH);
        let mut batch = consumer.fetch().max_messages(asked).messages().await.map_err(nats_error)?;
        let before = messages.len();
        while let Some(message) = batch.try_next().await.map_err(nats_error)? {
            messages.push(message);
        }
        if messages.len() == before {
            break; // Nothing more is stored.
        }
    }
    let name = consumer.cached_info().name.clone();
    let _ = stream.delete_consumer(&name).await;
    Ok(messages)
}

/// Parses a live message: the epoch from its subject, the offset from
/// `Nats-Sequence`.
fn decode_live(channel: &Arc<str>, message: &async_nats::Message) -> Option<Event> {
    let (_, epoch) = message.subject.as_str().strip_prefix(LIVE_PREFIX)?.rsplit_once('.')?;
    let offset = message.headers.as_ref()?.get(async_nats::header::NATS_SEQUENCE)?.as_str().parse().ok()?;
    decode(channel, offset, &Arc::from(epoch), &message.payload)
}

/// Hears the live feed: one subscription per channel the bus listens to,
/// each feeding `Bus::on_live` from its own task.
async fn feed(bus: Bus, nats: Nats, mut control: mpsc::UnboundedReceiver<Control>, stop: CancellationToken) {
    let mut listening: HashMap<Arc<str>, JoinHandle<()>> = HashMap::new();
    loop {
        let command = tokio::select! {
            _ = stop.cancelled() => break,
            command = control.recv() => match command {
                Some(command) => command,
                None => break,
            },
        };
        match command {
            Control::Listen(channel) => {
                if let Some(old) = listening.remove(&channel) {
                    old.abort();
                }
                // Heard from the server's confirmation (the flush) on, then synced.
                let subject = format!("{LIVE_PREFIX}{}.*", token(&channel));
                let subscribed = async {
                    let subscriber = nats.inner.client.subscribe(subject).await.map_err(nats_error)?;
                    nats.inner.client.flush().await.map_err(nats_error)?;
                    Ok::<_, BusError>(subscriber)
                };
                match tokio::time::timeout(RESPONSE_TIMEOUT, subscribed).await {
                    Ok(Ok(subscriber)) => {
                        listening.insert(channel.clone(), tokio::spawn(hear(bus.clone(), channel.clone(), subscriber)));
                        bus.listened(&channel);
                    }
                    Ok(Err(e)) => tracing::error!(cause = %e, channel = &*channel, "cannot hear channel"),
                    Err(_) => tracing::error!(channel = &*channel, "cannot hear channel: timed out"),
                }
            }
            Control::Unlisten(channel) => {
                // A channel listened to again since is listened to still.
                if bus.channel(&channel).is_none()
                    && let Some(task) = listening.remove(&channel)
                {
                    task.abort();
                }
            }
        }
    }
    for task in listening.into_values() {
        task.abort();
    }
}

/// Hands a channel's live messages to the bus, in the order they came.
async fn hear(bus: Bus, channel: Arc<str>, mut subscriber: async_nats::Subscriber) {
    while let Some(message) = subscriber.next().await {
        if message.subject.ends_with(PRESENCE_TOKEN) {
            match crate::presence::decode_message(&message.payload) {
                Some((change, data)) => bus.on_presence(&channel, change, data),
                None => tracing::error!(channel = &*channel, "undecodable presence change on the live feed"),
            }
            continue;
        }
        match decode_live(&channel, &message) {
            Some(event) => bus.on_live(&channel, vec![event]),
            None => tracing::error!(channel = &*channel, "undecodable event on the live feed"),
        }
    }
}

/// Follows the connection: after a reconnect, whatever was published while
/// it was down is read from the streams (the client subscribes again by
/// itself); a deleted stream's epoch is forgotten.
async fn connection_events(
    bus: Bus,
    nats: Nats,
    mut events: mpsc::UnboundedReceiver<async_nats::Event>,
    mut deleted: async_nats::Subscriber,
    stop: CancellationToken,
) {
    let mut lost = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            event = events.recv() => match event {
                Some(async_nats::Event::Disconnected) => {
                    tracing::warn!("lost the NATS connection; reconnecting");
                    lost = true;
                }
                Some(async_nats::Event::Connected) if lost => {
                    lost = false;
                    tracing::info!("NATS connection back");
                    let _ = nats.inner.client.flush().await;
                    nats.inner.known.lock().unwrap().clear();
                    bus.resync_all();
                }
                Some(_) => {}
                None => return,
            },
            advisory = deleted.next() => {
                let Some(advisory) = advisory else { return };
                if let Some(name) = advisory.subject.as_str().rsplit('.').next() {
                    nats.inner.known.lock().unwrap().retain(|channel, _| stream_name(channel) != name);
                }
            }
        }
    }
}

// === presence ===

const PRESENCE_STREAM: &str = "SB_PRESENCE";

/// Last token of the subject joins and leaves are announced on.
const PRESENCE_TOKEN: &str = ".~presence";

fn presence_subject(channel: &str, connection_id: &str) -> String {
    format!("sbp.{}.{}", token(channel), token(connection_id))
}

/// Presence in NATS (see the module's doc): entries kept as `<owner> <entry
/// JSON>` messages, one subject per channel and connection; one task applies
/// a node's changes in the order they were made.
pub(crate) struct NatsPresence {
    ops: mpsc::Sender<PresenceOp>,
    stream: jetstream::stream::Stream,
}

enum PresenceOp {
    Add { channel: Arc<str>, owner: String, entry: PresenceEntry },
    Remove { channel: Arc<str>, owner: String, entry: PresenceEntry },
    Refresh(Vec<(Arc<str>, String, PresenceEntry)>),
}

impl NatsPresence {
    async fn open(
        client: async_nats::Client,
        js: jetstream::Context,
        ttl: Duration,
    ) -> Result<NatsPresence, StoreError> {
        let config = stream::Config {
            name: PRESENCE_STREAM.to_owned(),
            description: Some("Switchboard presence entries".to_owned()),
            subjects: vec!["sbp.>".to_owned()],
            max_messages_per_subject: 1,
            max_age: ttl,
            storage: StorageType::Memory,
            ..Default::default()
        };
        let unusable = |e: &dyn std::fmt::Display| StoreError::Io(format!("nats: presence stream: {e}"));
        let stream = match js.get_stream(PRESENCE_STREAM).await {
            // Made with another TTL (the setting changed): this node's it is.
            Ok(stream) if stream.cached_info().config.max_age != ttl => {
                js.update_stream(config).await.map_err(|e| unusable(&e))?;
                js.get_stream(PRESENCE_STREAM).await.map_err(|e| unusable(&e))?
            }
            Ok(stream) => stream,
            Err(e) if not_found(&e) => match js.create_stream(config).await {
                Ok(stream) => stream,
                Err(_) => js.get_stream(PRESENCE_STREAM).await.map_err(|e| unusable(&e))?,
            },
            Err(e) => return Err(unusable(&e)),
        };
        let (ops, rx) = mpsc::channel(PRESENCE_QUEUE);
        tokio::spawn(apply_presence(client, js, stream.clone(), rx));
        Ok(NatsPresence { ops, stream })
    }

    fn queue(&self, op: PresenceOp) {
        if self.ops.try_send(op).is_err() {
            tracing::warn!("presence queue full; a change was dropped");
        }
    }
}

impl PresenceStore for NatsPresence {
    fn add(&self, channel: &Arc<str>, owner: &str, entry: &PresenceEntry) {
        self.queue(PresenceOp::Add { channel: channel.clone(), owner: owner.to_owned(), entry: entry.clone() });
    }

    fn remove(&self, channel: &Arc<str>, owner: &str, entry: &PresenceEntry) {
        self.queue(PresenceOp::Remove { channel: channel.clone(), owner: owner.to_owned(), entry: entry.clone() });
    }

    fn refresh(&self, entries: Vec<(Arc<str>, String, PresenceEntry)>) {
        self.queue(PresenceOp::Refresh(entries));
    }

    fn list(&self, channel: Arc<str>) -> BoxFuture<'static, Result<Vec<PresenceEntry>, BusError>> {
        let stream = self.stream.clone();
        async move {
            let subject = format!("sbp.{}.*", token(&channel));
            let kept = fetch(&stream, subject, DeliverPolicy::LastPerSubject, None).await?;
            let entries = kept.iter().filter_map(|message| held(&message.payload).map(|(_, entry)| entry)).collect();
            Ok(entries)
        }
        .boxed()
    }
}

/// Parses a kept entry: its owner and the entry.
fn held(payload: &[u8]) -> Option<(&str, PresenceEntry)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (owner, json) = text.split_once(' ')?;
    Some((owner, serde_json::from_str(json).ok()?))
}

/// The owner of a connection's live entry in a channel, if it has one.
async fn owner_of(stream: &jetstream::stream::Stream, subject: &str) -> Option<String> {
    let message = stream.get_last_raw_message_by_subject(subject).await.ok()?;
    held(&message.payload).map(|(owner, _)| owner.to_owned())
}

/// Applies presence changes in the order they were queued.
async fn apply_presence(
    client: async_nats::Client,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    mut rx: mpsc::Receiver<PresenceOp>,
) {
    while let Some(op) = rx.recv().await {
        let result = match op {
            PresenceOp::Add { channel, owner, entry } => {
                let new = owner_of(&stream, &presence_subject(&channel, &entry.connection_id)).await.is_none();
                match keep(&js, &channel, &owner, &entry).await {
                    Ok(()) if new => announce(&client, &channel, Change::Join, &entry).await,
                    other => other,
                }
            }
            PresenceOp::Remove { channel, owner, entry } => {
                let subject = presence_subject(&channel, &entry.connection_id);
                if owner_of(&stream, &subject).await.is_some_and(|o| o == owner) {
                    match stream.purge().filter(subject).await {
                        Ok(_) => announce(&client, &channel, Change::Leave, &entry).await,
                        Err(e) => Err(nats_error(e)),
                    }
                } else {
                    Ok(())
                }
            }
            PresenceOp::Refresh(entries) => {
                let kept = entries.iter().map(|(channel, owner, entry)| keep(&js, channel, owner, entry));
                futures::future::try_join_all(kept).await.map(|_| ())
            }
        };
        if let Err(e) = result {
            tracing::warn!(cause = %e, "presence update failed");
        }
    }
}

/// Keeps (or refreshes) an entry as `owner`'s.
async fn keep(js: &jetstream::Context, channel: &str, owner: &str, entry: &PresenceEntry) -> Result<(), BusError> {
    let mut payload = format!("{owner} ").into_bytes();
    payload.extend_from_slice(&entry.data());
    let subject = presence_subject(channel, &entry.connection_id);
    js.publish(subject, payload.into()).await.map_err(nats_error)?.await.map_err(nats_error)?;
    Ok(())
}

/// Tells every node hearing the channel of a join or leave.
async fn announce(
    client: &async_nats::Client,
    channel: &str,
    change: Change,
    entry: &PresenceEntry,
) -> Result<(), BusError> {
    let subject = format!("{LIVE_PREFIX}{}{PRESENCE_TOKEN}", token(channel));
    client.publish(subject, change_message(change, entry).into()).await.map_err(nats_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Delivery, config::HistoryPolicy};

    fn nats_url() -> String {
        std::env::var("SWITCHBOARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
    }

    fn event(channel: &str, i: u64) -> NewEvent {
        let data = bytes::Bytes::from(i.to_string());
        NewEvent { channel: channel.to_owned(), name: "tick".into(), data, idempotency_key: None, meta: Vec::new() }
    }

    /// The namespace's history size and the recovery rule hold on NATS: the
    /// stream keeps the newest five, a join from inside them replays the
    /// rest, a join from before them is not recovered and gets nothing.
    #[tokio::test]
    async fn a_namespaces_history_bound_is_the_streams() {
        let small = HistoryPolicy { size: 5, ttl: Duration::from_secs(60) };
        let url = nats_url();
        let config = Config {
            backend: crate::Backend::Nats { url: url.clone() },
            namespaces: HashMap::from([("small".to_owned(), small)]),
            ..Config::default()
        };
        let (bus, tasks) = open(config, &url).await.unwrap();
        let channel = format!("small:{}.x", uuid::Uuid::now_v7().simple());
        let mut epoch = None;
        for i in 1..=8 {
            let published = bus.publish(event(&channel, i)).await.unwrap();
            assert_eq!(published.position.offset, i);
            epoch = Some(published.position.epoch);
        }
        let epoch = epoch.unwrap();
        let (events, position) = bus.history(&channel, None, 100, false).await.unwrap();
        assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), [4, 5, 6, 7, 8]);
        assert_eq!(position, Position { offset: 8, epoch: epoch.clone() });
        let (newest, _) = bus.history(&channel, Some(2), 2, true).await.unwrap();
        assert_eq!(newest.iter().map(|e| e.offset).collect::<Vec<_>>(), [8, 7]);

        let (mut subscription, mut rx, _) = bus.subscribe();
        subscription.join(&channel, Some(Position { offset: 5, epoch: epoch.clone() }));
        match rx.recv().await.unwrap() {
            Delivery::Joined { recovered, position, .. } => assert!(recovered && position.offset == 8),
            other => panic!("{other:?}"),
        }
        match rx.recv().await.unwrap() {
            Delivery::Events(events) => assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), [6, 7, 8]),
            other => panic!("{other:?}"),
        }
        let (mut late, mut late_rx, _) = bus.subscribe();
        late.join(&channel, Some(Position { offset: 1, epoch }));
        match late_rx.recv().await.unwrap() {
            Delivery::Joined { recovered, position, .. } => assert!(!recovered && position.offset == 8),
            other => panic!("{other:?}"),
        }
        // Live from here, on both.
        bus.publish(event(&channel, 9)).await.unwrap();
        for rx in [&mut rx, &mut late_rx] {
            match rx.recv().await.unwrap() {
                Delivery::Events(events) => assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), [9]),
                other => panic!("{other:?}"),
            }
        }
        tasks.stop().await;
    }

    #[test]
    fn tokens_are_subject_tokens_and_never_collide() {
        assert_eq!(token("task:42"), "task:42");
        assert_eq!(token("a.b"), "a=2Eb");
        assert_eq!(token("a=2Eb"), "a=3D2Eb");
        assert_eq!(token("thread:7f3c#alice,bob@x"), "thread:7f3c#alice,bob@x");
        for name in ["a.b", "a=2Eb", "x".repeat(255).as_str(), ".".repeat(255).as_str()] {
            let t = token(name);
            assert!(!t.contains('.') && !t.contains('*') && !t.contains('>') && !t.contains(' '), "{t}");
            assert!(t.len() + STREAM_PREFIX.len() <= MAX_TOKEN, "{} long", t.len());
        }
        assert_ne!(token(&".".repeat(255)), token(&".".repeat(254)));
    }
}
