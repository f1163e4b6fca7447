//! The tonic service: converts proto messages to domain types, calls the
//! `Bus`, and maps errors to statuses. Proto types go no further than here.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt, stream::FuturesOrdered};
use switchboard_proto::auth::KeyCheck;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, service::interceptor::InterceptedService};

use switchboard_proto::eventbus::v1 as pb;

use crate::{Bus, Delivery, Event, NewEvent, Position, PresenceEntry, Published};

/// Most publishes of one `PublishStream` in flight at once.
const PUBLISH_PIPELINE: usize = 256;
/// Default and largest `History` page.
const HISTORY_DEFAULT: usize = 100;
const HISTORY_MAX: usize = 10_000;

pub struct EventBusService {
    bus: Bus,
    /// Cancelled at shutdown, so that live streams end.
    shutdown: CancellationToken,
}

impl EventBusService {
    pub fn new(bus: Bus, shutdown: CancellationToken) -> Self {
        EventBusService { bus, shutdown }
    }
}

/// The service behind its key check.
pub fn with_key(
    svc: EventBusService,
    key: Option<String>,
) -> InterceptedService<pb::event_bus_server::EventBusServer<EventBusService>, KeyCheck> {
    let server = pb::event_bus_server::EventBusServer::new(svc).max_decoding_message_size(16 * 1024 * 1024);
    InterceptedService::new(server, KeyCheck::new(key.as_deref()))
}

/// The service with its key check, for a client in this process
/// (`switchboard up`'s gateway and bridge).
pub fn in_process(bus: Bus, shutdown: CancellationToken) -> switchboard_proto::client::BusTransport {
    let key = bus.config().api_key.clone();
    switchboard_proto::client::in_process(with_key(EventBusService::new(bus, shutdown), key))
}

fn new_event(req: pb::PublishRequest) -> NewEvent {
    NewEvent {
        channel: req.channel,
        name: if req.event.is_empty() { "message".to_owned() } else { req.event },
        data: req.data,
        idempotency_key: Some(req.idempotency_key).filter(|k| !k.is_empty()),
        meta: req.meta.into_iter().collect(),
    }
}

fn published(p: Published) -> pb::PublishResponse {
    pb::PublishResponse {
        event_id: p.event_id,
        offset: p.position.offset,
        epoch: p.position.epoch.to_string(),
        duplicate: p.duplicate,
        error: None,
    }
}

fn position(p: &Position) -> pb::StreamPosition {
    pb::StreamPosition { offset: p.offset, epoch: p.epoch.to_string() }
}

fn event(e: &Event) -> pb::Event {
    pb::Event {
        event_id: e.id.clone(),
        channel: e.channel.to_string(),
        event: e.name.clone(),
        data: e.data.clone(),
        offset: e.offset,
        epoch: e.epoch.to_string(),
        timestamp_ms: e.timestamp_ms,
        meta: e.meta.iter().cloned().collect(),
    }
}

fn delivery(d: Delivery) -> pb::SubscribeResponse {
    use pb::subscribe_response::Response as R;
    let response = match d {
        Delivery::Joined { channel, position: p, recovered, missed } => R::Joined(pb::Joined {
            channel: channel.to_string(),
            position: Some(position(&p)),
            recovered,
            missed,
            error: None,
        }),
        Delivery::JoinFailed { channel, code, error } => R::Joined(pb::Joined {
            channel,
            position: None,
            recovered: false,
            missed: 0,
            error: Some(pb::Error { code: code.into(), message: error }),
        }),
        Delivery::Events(events) => R::Events(pb::EventBatch { events: events.iter().map(event).collect() }),
        Delivery::Left { channel } => R::Left(pb::Left { channel: channel.to_string() }),
    };
    pb::SubscribeResponse { response: Some(response) }
}

/// One `Subscribe` stream: its requests in, its deliveries out.
struct SubscribeStream {
    inbound: Streaming<pb::SubscribeRequest>,
    subscription: crate::bus::Subscription,
    deliveries: mpsc::Receiver<Delivery>,
    lagged: CancellationToken,
    shutdown: CancellationToken,
}

impl SubscribeStream {
    /// The next answer, acting on the requests that come before it; `None`
    /// when the client ended its requests.
    async fn next(&mut self) -> Option<Result<pb::SubscribeResponse, Status>> {
        use pb::subscribe_request::Request as R;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Some(Err(Status::unavailable("the event bus is shutting down"))),
                _ = self.lagged.cancelled() => {
                    return Some(Err(Status::resource_exhausted("subscriber lagged; resubscribe from your positions")));
                }
                // Deliveries before requests: a stream that pipelines
                // thousands of joins must not queue their answers behind
                // them before the first is sent.
                Some(d) = self.deliveries.recv() => return Some(Ok(delivery(d))),
                item = self.inbound.next() => match item {
                    Some(Ok(pb::SubscribeRequest { request: Some(R::Join(join)) })) => {
                        let since = join.since.map(|s| Position { offset: s.offset, epoch: Arc::from(s.epoch) });
                        self.subscription.join(&join.channel, since);
                    }
                    Some(Ok(pb::SubscribeRequest { request: Some(R::Leave(leave)) })) => {
                        self.subscription.leave(&leave.channel);
                    }
                    Some(Ok(pb::SubscribeRequest { request: Some(R::PresenceJoin(join)) })) => {
                        let entry = PresenceEntry { connection_id: join.connection_id, user_id: join.user_id, node: join.node };
                        if let Err(e) = self.subscription.presence_join(&join.channel, entry) {
                            tracing::warn!(cause = %e, channel = %join.channel, "presence join refused");
                        }
                    }
                    Some(Ok(pb::SubscribeRequest { request: Some(R::PresenceLeave(leave)) })) => {
                        self.subscription.presence_leave(&leave.channel, &leave.connection_id);
                    }
                    Some(Ok(pb::SubscribeRequest { request: None })) => {
                        return Some(Err(Status::invalid_argument("empty subscribe request")));
                    }
                    Some(Err(_)) | None => return None,
                },
            }
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::event_bus_server::EventBus for EventBusService {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let p = self.bus.publish(new_event(request.into_inner())).await?;
        Ok(Response::new(published(p)))
    }

    type PublishStreamStream = BoxStream<pb::PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let bus = self.bus.clone();
        let (tx, rx) = mpsc::channel(PUBLISH_PIPELINE);
        tokio::spawn(async move {
            let mut in_flight = FuturesOrdered::new();
            let mut inbound_done = false;
            loop {
                tokio::select! {
                    item = inbound.next(), if !inbound_done && in_flight.len() < PUBLISH_PIPELINE => {
                        match item {
                            Some(Ok(req)) => {
                                // Submitted in request order, so stored in request order;
                                // only the acknowledgements are awaited concurrently.
                                let result = bus.submit(new_event(req)).await;
                                in_flight.push_back(async move {
                                    match result {
                                        Ok(ack) => ack.await,
                                        Err(e) => Err(e),
                                    }
                                });
                            }
                            Some(Err(status)) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                            None => inbound_done = true,
                        }
                    }
                    Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                        let response = match result {
                            Ok(p) => published(p),
                            Err(e) => pb::PublishResponse {
                                error: Some(pb::Error { code: e.code_name().into(), message: e.to_string() }),
                                ..Default::default()
                            },
                        };
                        if tx.send(Ok(response)).await.is_err() {
                            return;
                        }
                    }
                    else => return,
                }
                if inbound_done && in_flight.is_empty() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (subscription, deliveries, lagged) = self.bus.subscribe();
        let stream = SubscribeStream {
            inbound: request.into_inner(),
            subscription,
            deliveries,
            lagged,
            shutdown: self.shutdown.clone(),
        };
        // The answer stream runs the subscription as it is polled, with no
        // task and queue of its own between the bus and the transport.
        Ok(Response::new(Box::pin(futures::stream::unfold(Some(stream), |s| async move {
            let mut s = s?;
            let item = s.next().await?;
            // An error is the stream's last answer.
            let more = item.is_ok().then_some(s);
            Some((item, more))
        }))))
    }

    async fn history(&self, request: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit as usize {
            0 => HISTORY_DEFAULT,
            n => n.min(HISTORY_MAX),
        };
        let since = req.since.map(|s| s.offset);
        let (events, pos) = self.bus.history(&req.channel, since, limit, req.reverse).await?;
        Ok(Response::new(pb::HistoryResponse {
            events: events.iter().map(event).collect(),
            position: Some(position(&pos)),
        }))
    }

    async fn channels(&self, request: Request<pb::ChannelsRequest>) -> Result<Response<pb::ChannelsResponse>, Status> {
        let prefix = request.into_inner().prefix;
        let channels = self
            .bus
            .channels(&prefix)
            .await?
            .into_iter()
            .map(|(name, pos, subscribers)| pb::ChannelInfo {
                channel: name.to_string(),
                position: Some(position(&pos)),
                subscribers,
            })
            .collect();
        Ok(Response::new(pb::ChannelsResponse { channels }))
    }

    async fn presence(&self, request: Request<pb::PresenceRequest>) -> Result<Response<pb::PresenceResponse>, Status> {
        let channel = request.into_inner().channel;
        let entries = self
            .bus
            .presence(&channel)
            .await?
            .into_iter()
            .map(|e| pb::PresenceEntry { connection_id: e.connection_id, user_id: e.user_id, node: e.node })
            .collect();
        Ok(Response::new(pb::PresenceResponse { entries }))
    }

    async fn info(&self, _request: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let (channels, subscriptions, published_total) = self.bus.stats();
        Ok(Response::new(pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            backend: self.bus.backend().to_owned(),
            node: self.bus.config().node.clone(),
            channels,
            subscriptions,
            published_total,
        }))
    }
}

#[cfg(test)]
mod tests {
    use switchboard_proto::{auth::BearerKey, client::bus_over, eventbus::v1 as pb};
    use tokio_util::sync::CancellationToken;

    fn join(channel: &str) -> pb::SubscribeRequest {
        let join = pb::Join { channel: channel.to_owned(), since: None };
        pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Join(join)) }
    }

    /// The in-process transport runs the same key check, publishes and
    /// `Subscribe` stream as the network, and ends the stream at shutdown.
    #[tokio::test]
    async fn in_process_calls_check_the_key_and_stream_until_shutdown() {
        let config = crate::Config { api_key: Some("bus-key-0123456789".into()), ..crate::Config::memory() };
        let (bus, handle) = crate::open(config).await.unwrap();
        let shutdown = CancellationToken::new();
        let transport = super::in_process(bus, shutdown.clone());

        let mut stranger = bus_over(transport.clone(), BearerKey::new(Some("wrong-key-0123456789")).unwrap());
        let refused = stranger.publish(pb::PublishRequest { channel: "a".into(), ..Default::default() }).await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);

        let mut client = bus_over(transport, BearerKey::new(Some("bus-key-0123456789")).unwrap());
        let (requests, rx) = tokio::sync::mpsc::channel(4);
        requests.send(join("a")).await.unwrap();
        let mut answers = client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        let joined = answers.message().await.unwrap().unwrap();
        assert!(matches!(joined.response, Some(pb::subscribe_response::Response::Joined(_))), "{joined:?}");

        let request =
            pb::PublishRequest { channel: "a".into(), event: "tick".into(), data: "1".into(), ..Default::default() };
        let published = client.publish(request).await.unwrap().into_inner();
        let Some(pb::subscribe_response::Response::Events(batch)) = answers.message().await.unwrap().unwrap().response
        else {
            panic!("expected the published event");
        };
        assert_eq!((batch.events[0].offset, batch.events[0].event.as_str()), (published.offset, "tick"));

        shutdown.cancel();
        assert_eq!(answers.message().await.unwrap_err().code(), tonic::Code::Unavailable);
        assert!(answers.message().await.unwrap().is_none(), "the stream ends after its error");
        drop(requests);
        handle.stop().await;
    }
}
