//! The `redis` engine: every bus node on the same Redis shares channels,
//! offsets, history and idempotency keys.
//!
//! Per channel `c`, three keys (one hash slot, `{c}`):
//! - `sb:{c}:m`, a hash: `top` (the newest offset) and `epoch`;
//! - `sb:{c}:s`, a stream whose entry ids are `<offset>-1`, one field `e`
//!   holding the encoded event, trimmed to the history size (`MAXLEN`);
//! - `sb:{c}:i:<key>`, a hash per idempotency key, for five minutes;
//! - `sb:{c}:presence`, a hash of presence entries (`RedisPresence`, at the end).
//!
//! One Lua script (`PUBLISH_LUA`) checks the idempotency key, increments the
//! offset, appends to the stream, sets the TTLs and publishes the event with
//! its offset and epoch on the Pub/Sub channel `sb:{c}:p`, atomically: the
//! order of Pub/Sub messages is the order of offsets. Each node subscribes
//! once per channel it has subscribers for (see `Bus::on_live`), and checks
//! every message it hears against the offset before it: a gap (messages
//! lost while its Pub/Sub connection was down, a failover that lost writes,
//! a flushed Redis: a new epoch) starts a resync that reads the missing
//! events from the stream, or tells subscribers that they cannot continue.
//!
//! The stream expires `history_ttl` after the last publish and each entry is
//! served only within its TTL; the meta hash lives twice as long (at least
//! two days), so offsets do not restart while clients may hold positions.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::{
    StreamExt,
    future::{BoxFuture, FutureExt},
};
use redis::{AsyncCommands, ErrorKind, ServerErrorKind, aio::ConnectionManager};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Event, IDEMPOTENCY_WINDOW, NewEvent, Position, Published,
    broker::{Broker, Listed, Reply, Tasks, decode, encode, new_epoch},
    bus::{Bus, Engine},
    config::Config,
    error::{BusError, StoreError},
    now_ms,
    presence::{PRESENCE_QUEUE, PresenceEntry, PresenceStore},
};

/// Checks the idempotency key, numbers, stores, expires and publishes one event.
///
/// KEYS: meta, stream[, idempotency]. ARGV: epoch for a new channel, event
/// id, encoded event, history size, stream TTL, meta TTL, idempotency TTL
/// (ms), Pub/Sub channel. Returns `{duplicate, offset, epoch, event id}`.
const PUBLISH_LUA: &str = r"
if #KEYS == 3 then
  local seen = redis.call('HMGET', KEYS[3], 'offset', 'epoch', 'id')
  if seen[1] then return {1, tonumber(seen[1]), seen[2], seen[3]} end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
end
-- Appended first: a refused append (a stream ahead of its meta) burns no offset.
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0') + 1
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], top .. '-1', 'e', ARGV[3])
redis.call('HSET', KEYS[1], 'top', top)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
if #KEYS == 3 then
  redis.call('HSET', KEYS[3], 'offset', top, 'epoch', epoch, 'id', ARGV[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
redis.call('PUBLISH', ARGV[8], top .. ' ' .. epoch .. ' ' .. ARGV[3])
return {0, top, epoch, ARGV[2]}
";

/// Returns a channel's `{top, epoch}`, giving a channel without one its epoch.
///
/// KEYS: meta, stream. ARGV: epoch for a new channel, meta TTL (ms).
const POSITION_LUA: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {tonumber(redis.call('HGET', KEYS[1], 'top')), epoch}
";

/// Starts a new epoch for a channel, unless another node did already.
///
/// KEYS: meta. ARGV: the epoch that lost events, the new one. Returns `{top, epoch}`.
const ROTATE_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
end
return {tonumber(redis.call('HGET', KEYS[1], 'top')), redis.call('HGET', KEYS[1], 'epoch')}
";

/// Most publishes sent to Redis in one pipeline.
const MAX_PIPELINE: usize = 1024;

/// How long a command to Redis may take before it is failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the Pub/Sub connection is checked with a `PING`: a connection
/// whose peer vanished without a reset would otherwise look open forever.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Most channels `Channels` lists (it scans the keyspace).
const MAX_LISTED: usize = 10_000;

fn meta_key(channel: &str) -> String {
    format!("sb:{{{channel}}}:m")
}

fn stream_key(channel: &str) -> String {
    format!("sb:{{{channel}}}:s")
}

fn idempotency_key(channel: &str, key: &str) -> String {
    format!("sb:{{{channel}}}:i:{key}")
}

pub(crate) fn pubsub_channel(channel: &str) -> String {
    format!("sb:{{{channel}}}:p")
}

fn channel_of_pubsub(name: &str) -> Option<&str> {
    name.strip_prefix("sb:{")?.strip_suffix("}:p")
}

/// Decodes a Pub/Sub message: `<offset> <epoch> <encoded event>`.
fn decode_message(channel: &Arc<str>, payload: &[u8]) -> Option<Event> {
    let mut parts = payload.splitn(3, |&b| b == b' ');
    let offset = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let epoch: Arc<str> = Arc::from(std::str::from_utf8(parts.next()?).ok()?);
    decode(channel, offset, &epoch, parts.next()?)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn redis_error(e: redis::RedisError) -> BusError {
    BusError::Store(StoreError::Io(format!("redis: {e}")))
}

/// What the Pub/Sub task is asked to do, in the order the bus decided it.
enum Control {
    Listen(Arc<str>),
    Unlisten(Arc<str>),
}

/// The engine's handle, held by the bus.
#[derive(Clone)]
pub(crate) struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    /// The bus's configuration, for history bounds.
    config: Config,
    conn: ConnectionManager,
    publish: mpsc::Sender<Call>,
    control: mpsc::UnboundedSender<Control>,
    publish_script: redis::Script,
    position: redis::Script,
    rotate: redis::Script,
}

/// Connects to Redis at `url` and returns a bus on it.
pub(crate) async fn open(config: Config, url: &str) -> Result<(Bus, Tasks), StoreError> {
    let unreachable = |e: &dyn std::fmt::Display| StoreError::Unreachable { url: url.to_owned(), cause: e.to_string() };
    let client = redis::Client::open(url).map_err(|e| unreachable(&e))?;
    let manager = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        // redis-rs's default of 500 ms would fail pipelines of large events
        // that Redis still runs: acknowledged as failed, yet stored.
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_max_delay(Duration::from_secs(2));
    let conn = client.get_connection_manager_with_config(manager).await.map_err(|e| unreachable(&e))?;
    let pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|e| unreachable(&e))?
        .map_err(|e| unreachable(&e))?;
    let (publish, publish_rx) = mpsc::channel(8192);
    let (control, control_rx) = mpsc::unbounded_channel();
    let position = redis::Script::new(POSITION_LUA);
    let publish_script = redis::Script::new(PUBLISH_LUA);
    let rotate = redis::Script::new(ROTATE_LUA);
    let inner = Inner { config: config.clone(), conn, publish, control, publish_script, position, rotate };
    let redis = Redis { inner: Arc::new(inner) };
    let bus = Bus::with_engine(config, Engine::Shared(Arc::new(redis.clone())), Arc::from(""));
    let stop = CancellationToken::new();
    let handles = vec![
        tokio::spawn(publisher(redis, publish_rx, stop.clone())),
        tokio::spawn(feed(bus.clone(), client, pubsub, control_rx, stop.clone())),
    ];
    Ok((bus, Tasks { stop, handles }))
}

impl Broker for Redis {
    fn publish(&self, event: NewEvent, reply: Reply) -> BoxFuture<'_, Result<(), BusError>> {
        async move {
            let cmd = self.call(&event)?;
            self.inner.publish.send(Call { cmd, reply }).await.map_err(|_| BusError::ShuttingDown)
        }
        .boxed()
    }

    fn listen(&self, channel: Arc<str>) {
        let _ = self.inner.control.send(Control::Listen(channel));
    }

    fn unlisten(&self, channel: Arc<str>) {
        let _ = self.inner.control.send(Control::Unlisten(channel));
    }

    fn presence(&self) -> Arc<dyn PresenceStore> {
        Arc::new(RedisPresence::new(self.inner.conn.clone(), self.inner.config.presence_ttl))
    }

    fn sync(
        &self,
        channel: Arc<str>,
        had: Option<Position>,
    ) -> BoxFuture<'static, Result<(Position, Vec<Event>), BusError>> {
        let redis = self.clone();
        async move { redis.position_and_fill(&channel, had).await }.boxed()
    }

    fn range(&self, channel: Arc<str>, after: u64, to: u64) -> BoxFuture<'static, Result<Vec<Event>, BusError>> {
        let redis = self.clone();
        async move { redis.read(&channel, after, to).await }.boxed()
    }

    fn history(
        &self,
        channel: Arc<str>,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> BoxFuture<'static, Result<(Vec<Event>, Position), BusError>> {
        let redis = self.clone();
        async move { redis.history(&channel, since, limit, reverse).await }.boxed()
    }

    fn channels(&self, prefix: String) -> BoxFuture<'static, Result<Listed, BusError>> {
        let redis = self.clone();
        async move { redis.channels(&prefix).await }.boxed()
    }
}

impl Redis {
    fn ttl(&self, channel: &str) -> Duration {
        self.inner.config.history_of(channel).ttl
    }

    /// `Broker::sync`: the position from the meta hash (rotating the epoch
    /// when Redis lost writes), and the events after `had`.
    async fn position_and_fill(
        &self,
        channel: &Arc<str>,
        had: Option<Position>,
    ) -> Result<(Position, Vec<Event>), BusError> {
        let mut conn = self.inner.conn.clone();
        let (top, epoch): (u64, String) = self
            .inner
            .position
            .key(meta_key(channel))
            .key(stream_key(channel))
            .arg(new_epoch())
            .arg(ms(meta_ttl(self.ttl(channel))))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut position = Position { offset: top, epoch: Arc::from(epoch) };
        if let Some(had) = had.as_ref().filter(|had| *had.epoch == *position.epoch && top < had.offset) {
            // Redis lost writes (a restart, a failover): the offsets after
            // `top` were delivered once and must not be given again in this
            // epoch. A new one starts, if no other node has started it yet.
            tracing::warn!(channel = &**channel, top, delivered = had.offset, "Redis lost events; new epoch");
            let (top, epoch): (u64, String) = self
                .inner
                .rotate
                .key(meta_key(channel))
                .arg(&*had.epoch)
                .arg(new_epoch())
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            position = Position { offset: top, epoch: Arc::from(epoch) };
        }
        let fill = match had {
            Some(had) if *had.epoch == *position.epoch && had.offset < top => {
                self.read(channel, had.offset, top).await?
            }
            _ => Vec::new(),
        };
        Ok((position, fill))
    }

    /// Reads the events after `after` up to `to`, leaving out those past
    /// their TTL, labelled with the epoch read in the same transaction: a
    /// channel that started again meanwhile shows in their epoch.
    async fn read(&self, channel: &Arc<str>, after: u64, to: u64) -> Result<Vec<Event>, BusError> {
        let mut conn = self.inner.conn.clone();
        let count = to.saturating_sub(after);
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HGET").arg(meta_key(channel)).arg("epoch");
        pipe.cmd("XRANGE").arg(stream_key(channel)).arg(format!("{}-0", after + 1)).arg(format!("{to}-1"));
        pipe.arg("COUNT").arg(count);
        type Reply = (Option<String>, Vec<(String, Vec<Vec<u8>>)>);
        let (epoch, raw): Reply = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        let Some(epoch) = epoch else {
            return Ok(Vec::new());
        };
        Ok(self.decode_entries(channel, &Arc::from(epoch), raw))
    }

    fn decode_entries(&self, channel: &Arc<str>, epoch: &Arc<str>, raw: Vec<(String, Vec<Vec<u8>>)>) -> Vec<Event> {
        let oldest = now_ms().saturating_sub(i64::try_from(self.ttl(channel).as_millis()).unwrap_or(i64::MAX));
        raw.into_iter()
            .filter_map(|(id, fields)| {
                let offset = id.split('-').next()?.parse().ok()?;
                let text = fields.get(1)?;
                decode(channel, offset, epoch, text)
            })
            .filter(|e| e.timestamp_ms >= oldest)
            .collect()
    }

    /// Reads history for `Bus::history`.
    async fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Result<(Vec<Event>, Position), BusError> {
        let mut conn = self.inner.conn.clone();
        let after = since.unwrap_or(0);
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("HMGET").arg(meta_key(channel)).arg("top").arg("epoch");
        if reverse {
            pipe.cmd("XREVRANGE").arg(stream_key(channel)).arg("+").arg(format!("{}-0", after + 1));
        } else {
            pipe.cmd("XRANGE").arg(stream_key(channel)).arg(format!("{}-0", after + 1)).arg("+");
        }
        pipe.arg("COUNT").arg(limit);
        type Reply = ((Option<u64>, Option<String>), Vec<(String, Vec<Vec<u8>>)>);
        let ((top, epoch), raw): Reply = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        let channel: Arc<str> = Arc::from(channel);
        let epoch: Arc<str> = Arc::from(epoch.unwrap_or_default());
        let events = if limit == 0 { Vec::new() } else { self.decode_entries(&channel, &epoch, raw) };
        Ok((events, Position { offset: top.unwrap_or(0), epoch }))
    }

    /// Lists channels with a position in Redis (at most `MAX_LISTED`).
    async fn channels(&self, prefix: &str) -> Result<Vec<(Arc<str>, Position)>, BusError> {
        let mut conn = self.inner.conn.clone();
        let mut names = Vec::new();
        {
            let pattern = format!("sb:{{{prefix}*");
            let mut keys = conn.scan_match::<_, String>(pattern).await.map_err(redis_error)?;
            while let Some(key) = keys.next().await {
                let key = key.map_err(redis_error)?;
                if let Some(name) = key.strip_prefix("sb:{").and_then(|k| k.strip_suffix("}:m")) {
                    names.push(name.to_owned());
                    if names.len() >= MAX_LISTED {
                        break;
                    }
                }
            }
        }
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("HMGET").arg(meta_key(name)).arg("top").arg("epoch");
        }
        let metas: Vec<(Option<u64>, Option<String>)> = pipe.query_async(&mut conn).await.map_err(redis_error)?;
        Ok(names
            .into_iter()
            .zip(metas)
            .filter_map(|(name, (top, epoch))| {
                Some((Arc::from(name), Position { offset: top?, epoch: Arc::from(epoch?) }))
            })
            .collect())
    }
}

fn meta_ttl(history_ttl: Duration) -> Duration {
    (history_ttl * 2).max(Duration::from_secs(2 * 24 * 3600))
}

/// A publish ready for Redis: its script call is built by the publishing
/// task, so that the one publisher task only sends and answers.
pub(crate) struct Call {
    cmd: redis::Cmd,
    reply: Reply,
}

impl Redis {
    fn call(&self, event: &NewEvent) -> Result<redis::Cmd, BusError> {
        let id = uuid::Uuid::now_v7().to_string();
        let encoded = encode(&id, event, now_ms())?;
        let policy = self.inner.config.history_of(&event.channel);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.inner.publish_script.get_hash());
        let keys = if event.idempotency_key.is_some() { 3 } else { 2 };
        cmd.arg(keys).arg(meta_key(&event.channel)).arg(stream_key(&event.channel));
        if let Some(key) = &event.idempotency_key {
            cmd.arg(idempotency_key(&event.channel, key));
        }
        cmd.arg(new_epoch())
            .arg(id)
            .arg(encoded)
            .arg(policy.size.max(1))
            .arg(ms(policy.ttl))
            .arg(ms(meta_ttl(policy.ttl)))
            .arg(ms(IDEMPOTENCY_WINDOW))
            .arg(pubsub_channel(&event.channel));
        Ok(cmd)
    }
}

/// Sends queued publishes to Redis, everything queued at once in one
/// pipeline, in queue order (so in the order they were submitted).
async fn publisher(redis: Redis, mut rx: mpsc::Receiver<Call>, stop: CancellationToken) {
    let (script, mut conn) = (&redis.inner.publish_script, redis.inner.conn.clone());
    let mut queued = Vec::with_capacity(MAX_PIPELINE);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut queued, MAX_PIPELINE) => n,
            _ = stop.cancelled() => {
                // What was submitted before the stop is still published.
                while let Ok(call) = rx.try_recv() {
                    queued.push(call);
                }
                if !queued.is_empty() {
                    publish_all(&mut conn, script, std::mem::take(&mut queued)).await;
                }
                return;
            }
        };
        if n == 0 {
            return;
        }
        publish_all(&mut conn, script, std::mem::take(&mut queued)).await;
    }
}

async fn publish_all(conn: &mut ConnectionManager, script: &redis::Script, mut calls: Vec<Call>) {
    // Twice at most: a Redis that restarted has forgotten the script, and
    // the calls it refused for that have not run.
    for attempt in 0..2 {
        if calls.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for call in &calls {
            pipe.add_command(call.cmd.clone());
        }
        let results: Vec<redis::RedisResult<(u8, u64, String, String)>> = match pipe.query_async(conn).await {
            Ok(results) => results,
            Err(e) => {
                tracing::error!(cause = %e, "redis publish failed");
                for call in calls {
                    let _ = call.reply.send(Err(redis_error(e.clone())));
                }
                return;
            }
        };
        let mut retry = Vec::new();
        for (call, result) in calls.into_iter().zip(results) {
            match result {
                Ok((duplicate, offset, epoch, event_id)) => {
                    let position = Position { offset, epoch: Arc::from(epoch) };
                    let _ = call.reply.send(Ok(Published { event_id, position, duplicate: duplicate == 1 }));
                }
                Err(e) if attempt == 0 && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => retry.push(call),
                Err(e) => {
                    let _ = call.reply.send(Err(redis_error(e)));
                }
            }
        }
        if !retry.is_empty()
            && let Err(e) = script.prepare_invoke().load_async(conn).await
        {
            tracing::error!(cause = %e, "cannot load the publish script");
        }
        calls = retry;
    }
}

/// Hears the live feed: subscribes and unsubscribes as the bus asks, hands
/// every message to `Bus::on_live`, and after a lost connection reconnects,
/// subscribes again to every channel and resyncs them all.
async fn feed(
    bus: Bus,
    client: redis::Client,
    pubsub: redis::aio::PubSub,
    mut control: mpsc::UnboundedReceiver<Control>,
    stop: CancellationToken,
) {
    let mut listening: HashSet<Arc<str>> = HashSet::new();
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut lost = false;
    loop {
        if lost {
            tracing::warn!("lost the Redis Pub/Sub connection; reconnecting");
            let Some((new_sink, new_messages)) = reconnect(&client, &listening, &stop).await else {
                return;
            };
            (sink, messages) = (new_sink, new_messages);
            lost = false;
            bus.resync_all();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ping.tick() => {
                let pong = tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<String>()).await;
                lost = !matches!(pong, Ok(Ok(_)));
            }
            command = control.recv() => match command {
                Some(Control::Listen(channel)) => {
                    listening.insert(channel.clone());
                    // Heard from the confirmation on, then synced (again, if
                    // a reconnect synced it before it was subscribed).
                    let subscribed = tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(pubsub_channel(&channel))).await;
                    match subscribed {
                        Ok(Ok(())) => bus.listened(&channel),
                        _ => lost = true,
                    }
                }
                Some(Control::Unlisten(channel)) => {
                    // A channel listened to again since is listened to still.
                    if bus.channel(&channel).is_none() {
                        listening.remove(&channel);
                        let unsubscribed = tokio::time::timeout(RESPONSE_TIMEOUT, sink.unsubscribe(pubsub_channel(&channel))).await;
                        lost = !matches!(unsubscribed, Ok(Ok(())));
                    }
                }
                None => return,
            },
            message = messages.next() => match message {
                Some(message) => {
                    let Some(name) = channel_of_pubsub(message.get_channel_name()) else { continue };
                    let Some(ch) = bus.channel(name) else { continue };
                    // Joins and leaves: transient, outside the offset checks.
                    if let Some((change, data)) = crate::presence::decode_message(message.get_payload_bytes()) {
                        bus.on_presence(&ch.name, change, data);
                        continue;
                    }
                    match decode_message(&ch.name, message.get_payload_bytes()) {
                        Some(event) => bus.on_live(&ch.name, vec![event]),
                        None => tracing::error!(channel = name, "undecodable event on the live feed"),
                    }
                }
                None => lost = true,
            },
        }
    }
}

/// Opens a new Pub/Sub connection subscribed to `channels`, retrying with backoff.
async fn reconnect(
    client: &redis::Client,
    channels: &HashSet<Arc<str>>,
    stop: &CancellationToken,
) -> Option<(redis::aio::PubSubSink, redis::aio::PubSubStream)> {
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = async {
            let (mut sink, messages) = client.get_async_pubsub().await?.split();
            let names: Vec<String> = channels.iter().map(|c| pubsub_channel(c)).collect();
            for chunk in names.chunks(1000) {
                sink.subscribe(chunk).await?;
            }
            redis::RedisResult::Ok((sink, messages))
        };
        tokio::select! {
            _ = stop.cancelled() => return None,
            result = tokio::time::timeout(Duration::from_secs(2), attempt) => match result {
                Ok(Ok(connected)) => {
                    tracing::info!(channels = channels.len(), "Redis Pub/Sub connection back");
                    return Some(connected);
                }
                Ok(Err(e)) => tracing::warn!(cause = %e, "cannot reconnect to Redis Pub/Sub"),
                Err(_) => tracing::warn!("cannot reconnect to Redis Pub/Sub: timed out"),
            },
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

// === presence ===

/// Records entries and, for a new one, announces the join.
///
/// KEYS: the presence hash. ARGV: TTL (ms), `add` or `refresh`, Pub/Sub
/// channel, owner, then pairs of connection id and entry JSON. A field holds
/// `<expires ms> <owner> <entry JSON>`, by Redis's clock, so the nodes'
/// clocks do not matter. `refresh` leaves entries another owner holds
/// alone; `add` takes them over (a gateway that relinked) without a join.
const SET_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = string.format('%.0f', now + tonumber(ARGV[1]))
for i = 5, #ARGV, 2 do
  local live = nil
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    local e, o = string.match(old, '^(%d+) (%S+) ')
    if e and tonumber(e) >= now then live = o end
  end
  if ARGV[2] == 'add' or live == nil or live == ARGV[4] then
    redis.call('HSET', KEYS[1], ARGV[i], expires .. ' ' .. ARGV[4] .. ' ' .. ARGV[i + 1])
  end
  if ARGV[2] == 'add' and live == nil then
    redis.call('PUBLISH', ARGV[3], 'presence join ' .. ARGV[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
";

/// Removes an entry its owner still holds, and announces the leave.
///
/// KEYS: the presence hash. ARGV: Pub/Sub channel, owner, connection id.
const REMOVE_LUA: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[3])
if not old then return 0 end
local _, o, entry = string.match(old, '^(%d+) (%S+) (.*)$')
if o ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[1], 'presence leave ' .. entry)
return 1
";

/// Returns the live entries' JSON, deleting those past their expiry.
///
/// KEYS: the presence hash.
const LIST_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local e, _, entry = string.match(all[i + 1], '^(%d+) (%S+) (.*)$')
  if e and tonumber(e) >= now then
    table.insert(live, entry)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return live
";

/// A channel's presence hash, in the slot of its other keys .
fn presence_key(channel: &str) -> String {
    format!("sb:{{{channel}}}:presence")
}

/// The entry as kept in Redis and announced: the event data itself.
fn entry_json(entry: &PresenceEntry) -> String {
    String::from_utf8(entry.data().to_vec()).expect("JSON is UTF-8")
}

enum Op {
    Add { channel: Arc<str>, owner: String, connection_id: String, entry: String },
    Remove { channel: Arc<str>, owner: String, connection_id: String },
    Refresh(Vec<(Arc<str>, String, PresenceEntry)>),
}

/// Presence in Redis: a hash per channel (`sb:{c}:presence`), joins and
/// leaves published on the channel's Pub/Sub channel with its events, and
/// one task that applies operations in order.
pub(crate) struct RedisPresence {
    ops: mpsc::Sender<Op>,
    conn: ConnectionManager,
    list: Arc<redis::Script>,
}

impl RedisPresence {
    /// Starts the task that applies operations on `conn`; it ends, after
    /// what is queued, when the store is dropped.
    pub(crate) fn new(conn: ConnectionManager, ttl: Duration) -> RedisPresence {
        let (ops, rx) = mpsc::channel(PRESENCE_QUEUE);
        tokio::spawn(apply(conn.clone(), rx, ttl));
        RedisPresence { ops, conn, list: Arc::new(redis::Script::new(LIST_LUA)) }
    }

    fn queue(&self, op: Op) {
        if self.ops.try_send(op).is_err() {
            tracing::warn!("presence queue full; an operation was dropped");
        }
    }
}

impl PresenceStore for RedisPresence {
    fn add(&self, channel: &Arc<str>, owner: &str, entry: &PresenceEntry) {
        let (channel, owner, connection_id) = (channel.clone(), owner.to_owned(), entry.connection_id.clone());
        self.queue(Op::Add { channel, owner, connection_id, entry: entry_json(entry) });
    }

    fn remove(&self, channel: &Arc<str>, owner: &str, entry: &PresenceEntry) {
        let connection_id = entry.connection_id.clone();
        self.queue(Op::Remove { channel: channel.clone(), owner: owner.to_owned(), connection_id });
    }

    fn refresh(&self, entries: Vec<(Arc<str>, String, PresenceEntry)>) {
        self.queue(Op::Refresh(entries));
    }

    fn list(&self, channel: Arc<str>) -> BoxFuture<'static, Result<Vec<PresenceEntry>, BusError>> {
        let (mut conn, script) = (self.conn.clone(), self.list.clone());
        async move {
            let raw: Vec<String> =
                script.key(presence_key(&channel)).invoke_async(&mut conn).await.map_err(redis_error)?;
            Ok(raw.iter().filter_map(|json| serde_json::from_str(json).ok()).collect())
        }
        .boxed()
    }
}

/// Applies presence operations in the order they were queued.
async fn apply(mut conn: ConnectionManager, mut rx: mpsc::Receiver<Op>, ttl: Duration) {
    let (set, remove) = (redis::Script::new(SET_LUA), redis::Script::new(REMOVE_LUA));
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    while let Some(op) = rx.recv().await {
        let result = match op {
            Op::Add { channel, owner, connection_id, entry } => {
                let mut call = set_call(&set, ttl_ms, &channel, "add", &owner);
                call.arg(connection_id).arg(entry);
                call.invoke_async::<()>(&mut conn).await
            }
            Op::Remove { channel, owner, connection_id } => {
                let mut call = remove.key(presence_key(&channel));
                call.arg(crate::redis::pubsub_channel(&channel)).arg(owner).arg(connection_id);
                call.invoke_async::<()>(&mut conn).await
            }
            Op::Refresh(entries) => refresh(&mut conn, &set, ttl_ms, entries).await,
        };
        if let Err(e) = result {
            tracing::warn!(cause = %e, "presence update failed");
        }
    }
}

/// A call of `SET_LUA` without its entries.
fn set_call<'s>(
    set: &'s redis::Script,
    ttl_ms: u64,
    channel: &str,
    mode: &str,
    owner: &str,
) -> redis::ScriptInvocation<'s> {
    let mut call = set.key(presence_key(channel));
    call.arg(ttl_ms).arg(mode).arg(crate::redis::pubsub_channel(channel)).arg(owner);
    call
}

/// Refreshes entries, one script call per channel and owner.
async fn refresh(
    conn: &mut ConnectionManager,
    set: &redis::Script,
    ttl_ms: u64,
    entries: Vec<(Arc<str>, String, PresenceEntry)>,
) -> redis::RedisResult<()> {
    let mut grouped: HashMap<(Arc<str>, String), Vec<PresenceEntry>> = HashMap::new();
    for (channel, owner, entry) in entries {
        grouped.entry((channel, owner)).or_default().push(entry);
    }
    let mut result = Ok(());
    for ((channel, owner), entries) in grouped {
        let mut call = set_call(set, ttl_ms, &channel, "refresh", &owner);
        for entry in &entries {
            call.arg(&entry.connection_id).arg(entry_json(entry));
        }
        if let Err(e) = call.invoke_async::<()>(conn).await {
            result = Err(e);
        }
    }
    result
}
