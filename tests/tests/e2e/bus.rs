//! The EventBus gRPC API on its own.

use std::time::Duration;

use serde_json::json;
use switchboard_tests::*;

#[tokio::test]
async fn idempotent_publish_returns_the_first_result_and_stores_once() {
    let bus = BusServer::memory().await;
    let mut client = bus_client(&bus.url()).await;
    let req = pb::PublishRequest {
        channel: "missions".into(),
        event: "created".into(),
        data: br#"{"id":1}"#.to_vec().into(),
        idempotency_key: "mission-1-created".into(),
        ..Default::default()
    };
    let first = client.publish(req.clone()).await.unwrap().into_inner();
    let again = client.publish(req.clone()).await.unwrap().into_inner();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!((again.offset, &again.event_id, &again.epoch), (first.offset, &first.event_id, &first.epoch));
    // The same key on another channel is another event.
    let other = client.publish(pb::PublishRequest { channel: "tasks".into(), ..req }).await.unwrap().into_inner();
    assert!(!other.duplicate);
    let h = client.history(pb::HistoryRequest { channel: "missions".into(), ..Default::default() }).await.unwrap();
    assert_eq!(h.into_inner().events.len(), 1);
}

#[tokio::test]
async fn publish_stream_answers_in_order_and_goes_on_after_a_failure() {
    let bus = BusServer::memory().await;
    let mut client = bus_client(&bus.url()).await;
    let requests: Vec<pb::PublishRequest> = (0..200)
        .map(|i| pb::PublishRequest {
            channel: "task:1".into(),
            event: "step".into(),
            data: if i == 100 { b"{broken".to_vec().into() } else { json!({ "i": i }).to_string().into() },
            ..Default::default()
        })
        .collect();
    let mut responses = client.publish_stream(futures::stream::iter(requests)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(r) = responses.message().await.unwrap() {
        got.push(r);
    }
    assert_eq!(got.len(), 200);
    let mut expected = 1;
    for (i, r) in got.iter().enumerate() {
        if i == 100 {
            assert_eq!(r.error.as_ref().unwrap().code, "invalid_argument");
        } else {
            assert!(r.error.is_none());
            assert_eq!(r.offset, expected, "responses come in request order");
            expected += 1;
        }
    }
    let h = client
        .history(pb::HistoryRequest { channel: "task:1".into(), limit: 1000, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.events.len(), 199);
    assert_eq!(h.events[100].data, json!({ "i": 101 }).to_string().as_bytes());
}

#[tokio::test]
async fn subscribe_stream_joins_replays_and_leaves() {
    let bus = BusServer::memory().await;
    let mut client = bus_client(&bus.url()).await;
    let epoch = publish(&mut client, "a", "e", json!(1)).await.epoch;
    publish(&mut client, "a", "e", json!(2)).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut stream = client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let join = |channel: &str, since: Option<u64>| pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Join(pb::Join {
            channel: channel.into(),
            since: since.map(|offset| pb::StreamPosition { offset, epoch: epoch.clone() }),
        })),
    };
    tx.send(join("a", Some(1))).await.unwrap();
    tx.send(join("b", None)).await.unwrap();
    use pb::subscribe_response::Response as R;
    // A join that replays is answered once its replay is read, so answers to
    // different channels may come in any order; a channel's own come in order.
    let mut seen = Vec::new();
    for _ in 0..3 {
        match next(&mut stream).await {
            R::Joined(j) => seen.push(format!("joined {} {} {}", j.channel, j.recovered, j.missed)),
            R::Events(batch) => {
                let offsets: Vec<_> = batch.events.iter().map(|e| format!("{}/{}", e.channel, e.offset)).collect();
                seen.push(format!("events {}", offsets.join(",")));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let a: Vec<_> = seen.iter().filter(|s| !s.contains(" b ")).collect();
    assert_eq!(a, ["joined a true 1", "events a/2"], "{seen:?}");
    assert!(seen.contains(&"joined b false 0".to_owned()), "{seen:?}");
    publish(&mut client, "b", "e", json!("live")).await;
    let R::Events(batch) = next(&mut stream).await else { panic!("expected a live event") };
    assert_eq!(batch.events[0].channel, "b");
    tx.send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Leave(pb::Leave { channel: "b".into() })),
    })
    .await
    .unwrap();
    let R::Left(l) = next(&mut stream).await else { panic!("expected left") };
    assert_eq!(l.channel, "b");
}

async fn next(s: &mut tonic::Streaming<pb::SubscribeResponse>) -> pb::subscribe_response::Response {
    tokio::time::timeout(WAIT, s.message()).await.unwrap().unwrap().unwrap().response.unwrap()
}

#[tokio::test]
async fn history_size_and_ttl_are_enforced_in_memory() {
    retention(eventbus::Config::memory()).await;
}

#[tokio::test]
async fn history_size_and_ttl_are_enforced_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    retention(eventbus::Config { data_dir: dir.path().to_owned(), ..eventbus::Config::default() }).await;
}

async fn retention(mut config: eventbus::Config) {
    config.namespaces.insert("small".into(), eventbus::HistoryPolicy { size: 3, ttl: Duration::from_secs(3600) });
    config.namespaces.insert("brief".into(), eventbus::HistoryPolicy { size: 100, ttl: Duration::from_millis(300) });
    let bus = BusServer::start(config).await;
    let mut client = bus_client(&bus.url()).await;
    for i in 0..10 {
        publish(&mut client, "small:x", "e", json!(i)).await;
        publish(&mut client, "brief:x", "e", json!(i)).await;
    }
    let h = client
        .history(pb::HistoryRequest { channel: "small:x".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.events.iter().map(|e| e.offset).collect::<Vec<_>>(), [8, 9, 10]);
    assert_eq!(h.position.unwrap().offset, 10);
    let newest = client
        .history(pb::HistoryRequest { channel: "small:x".into(), limit: 2, reverse: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(newest.events.iter().map(|e| e.offset).collect::<Vec<_>>(), [10, 9]);

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let h = client
            .history(pb::HistoryRequest { channel: "brief:x".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        if h.events.is_empty() {
            assert_eq!(h.position.unwrap().offset, 10, "offsets survive expiry");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "events never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Offsets go on after expiry.
    assert_eq!(publish(&mut client, "brief:x", "e", json!(11)).await.offset, 11);
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let bus =
        BusServer::start(eventbus::Config { api_key: Some("bus-key-0123456789".into()), ..eventbus::Config::memory() })
            .await;
    let mut client = bus_client(&bus.url()).await;
    let req = pb::PublishRequest { channel: "a".into(), data: b"1".to_vec().into(), ..Default::default() };
    let status = client.publish(req.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(req.clone());
    wrong.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(client.publish(wrong).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    let mut right = tonic::Request::new(req);
    right.metadata_mut().insert("authorization", "Bearer bus-key-0123456789".parse().unwrap());
    assert_eq!(client.publish(right).await.unwrap().into_inner().offset, 1);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let bus = BusServer::memory().await;
    let channel = tonic::transport::Endpoint::from_shared(bus.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest { service: "switchboard.eventbus.v1.EventBus".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = reflection.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    assert!(list.service.iter().any(|s| s.name == "switchboard.eventbus.v1.EventBus"));
}

#[tokio::test]
async fn embedded_store_keeps_events_offsets_and_epoch_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut bus = BusServer::embedded(dir.path().to_owned()).await;
    let mut client = bus_client(&bus.url()).await;
    let first = publish(&mut client, "missions", "e", json!({ "n": 1 })).await;
    publish(&mut client, "missions", "e", json!({ "n": 2 })).await;
    bus.restart().await;
    let mut client = bus_client(&bus.url()).await;
    let h = client
        .history(pb::HistoryRequest { channel: "missions".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.events.len(), 2);
    assert_eq!(h.events[0].data, json!({ "n": 1 }).to_string().as_bytes());
    assert_eq!(h.events[0].event_id, first.event_id);
    assert_eq!(h.position.as_ref().unwrap().epoch, first.epoch, "same directory, same epoch");
    let next = publish(&mut client, "missions", "e", json!({ "n": 3 })).await;
    assert_eq!(next.offset, 3);

    let other = tempfile::tempdir().unwrap();
    let fresh = BusServer::embedded(other.path().to_owned()).await;
    let r = publish(&mut bus_client(&fresh.url()).await, "missions", "e", json!(1)).await;
    assert_ne!(r.epoch, first.epoch, "a new directory has a new epoch");
    assert_eq!(r.offset, 1);
}

#[tokio::test]
async fn a_second_bus_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bus = BusServer::embedded(dir.path().to_owned()).await;
    // The first bus has opened its store once it answers.
    publish(&mut bus_client(&bus.url()).await, "a", "e", json!(1)).await;
    let err = eventbus::open(eventbus::Config { data_dir: dir.path().to_owned(), ..eventbus::Config::default() })
        .await
        .err()
        .expect("the directory is in use");
    assert!(matches!(err, eventbus::StoreError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn embedded_store_keeps_trimmed_histories_of_channels_committed_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = eventbus::Config { data_dir: dir.path().to_owned(), ..eventbus::Config::default() };
    config.namespaces.insert("small".into(), eventbus::HistoryPolicy { size: 3, ttl: Duration::from_secs(3600) });
    let mut bus = BusServer::start(config).await;
    let mut client = bus_client(&bus.url()).await;
    // One pipelined stream over three channels in turn: commit groups hold several
    // channels, each with runs longer than one stored chunk (64 events).
    let channels = ["small:a", "small:b", "missions"];
    let requests: Vec<pb::PublishRequest> = (0..600)
        .map(|i| pb::PublishRequest {
            channel: channels[i % 3].into(),
            event: "e".into(),
            data: json!({ "i": i }).to_string().into(),
            ..Default::default()
        })
        .collect();
    let mut acks = client.publish_stream(futures::stream::iter(requests)).await.unwrap().into_inner();
    let mut acked = 0;
    while let Some(ack) = acks.message().await.unwrap() {
        assert!(ack.error.is_none(), "{:?}", ack.error);
        acked += 1;
    }
    assert_eq!(acked, 600);

    // The k-th event (from 1) of channel c carries i = 3 (k - 1) + c.
    let check = |h: pb::HistoryResponse, c: usize, offsets: std::ops::RangeInclusive<u64>| {
        assert_eq!(h.position.unwrap().offset, 200, "{}", channels[c]);
        let got: Vec<(u64, Vec<u8>)> = h.events.into_iter().map(|e| (e.offset, e.data.to_vec())).collect();
        let want: Vec<(u64, Vec<u8>)> =
            offsets.map(|k| (k, json!({ "i": 3 * (k - 1) as usize + c }).to_string().into_bytes())).collect();
        assert_eq!(got, want, "{}", channels[c]);
    };
    for round in ["before", "after"] {
        if round == "after" {
            bus.restart().await;
            client = bus_client(&bus.url()).await;
        }
        for (c, channel) in channels.iter().enumerate() {
            let req = pb::HistoryRequest { channel: (*channel).into(), limit: 1000, ..Default::default() };
            let h = client.history(req).await.unwrap().into_inner();
            check(h, c, if c < 2 { 198..=200 } else { 1..=200 });
        }
    }

    // Recovery from below the trimmed history is refused; from within it, replays the rest.
    let epoch = publish(&mut client, "other", "e", json!(1)).await.epoch;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut stream = client.subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    for (channel, since) in [("small:a", 100), ("small:b", 198)] {
        tx.send(pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Join(pb::Join {
                channel: channel.into(),
                since: Some(pb::StreamPosition { offset: since, epoch: epoch.clone() }),
            })),
        })
        .await
        .unwrap();
    }
    use pb::subscribe_response::Response as R;
    let R::Joined(j) = next(&mut stream).await else { panic!("expected joined") };
    assert_eq!((j.channel.as_str(), j.recovered, j.missed), ("small:a", false, 0));
    let R::Joined(j) = next(&mut stream).await else { panic!("expected joined") };
    assert_eq!((j.channel.as_str(), j.recovered, j.missed), ("small:b", true, 2));
    let R::Events(batch) = next(&mut stream).await else { panic!("expected the replay") };
    let replay: Vec<(u64, Vec<u8>)> = batch.events.into_iter().map(|e| (e.offset, e.data.to_vec())).collect();
    let want: Vec<(u64, Vec<u8>)> =
        (199..=200).map(|k| (k, json!({ "i": 3 * (k - 1) as usize + 1 }).to_string().into_bytes())).collect();
    assert_eq!(replay, want);
}

#[tokio::test]
async fn data_that_is_not_utf8_is_refused_and_nothing_is_stored() {
    let bus = BusServer::memory().await;
    let mut client = bus_client(&bus.url()).await;
    let bad = |data: &[u8]| pb::PublishRequest {
        channel: "missions".into(),
        event: "created".into(),
        data: data.to_vec().into(),
        ..Default::default()
    };
    // Inside a string (serde_json would skip it) and outside of one.
    for data in [&b"{\"s\":\"\xff\xfe\"}"[..], &b"[1,\xc3]"[..]] {
        let status = client.publish(bad(data)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("UTF-8"), "{}", status.message());
    }
    // Valid UTF-8 whose escape is a lone surrogate: no JSON reader takes it.
    for data in [&br#"{"s":"\ud800"}"#[..], &br#"["\udc00x"]"#[..]] {
        let status = client.publish(bad(data)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("not valid JSON"), "{}", status.message());
    }
    // A surrogate pair is one character, and fine.
    assert_eq!(client.publish(bad(br#"{"s":"\ud83d\ude00"}"#)).await.unwrap().into_inner().offset, 1);
    let mut responses =
        client.publish_stream(futures::stream::iter([bad(b"{\"s\":\"\xff\"}")])).await.unwrap().into_inner();
    let r = responses.message().await.unwrap().unwrap();
    assert_eq!(r.error.unwrap().code, "invalid_argument");
    let h = client.history(pb::HistoryRequest { channel: "missions".into(), ..Default::default() }).await.unwrap();
    let h = h.into_inner();
    assert_eq!(h.events.len(), 1, "only the surrogate pair is stored");
    assert_eq!(h.position.unwrap().offset, 1);
}

fn join(channel: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Join(pb::Join { channel: channel.into(), since: None })),
    }
}

fn leave(channel: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Leave(pb::Leave { channel: channel.into() })) }
}

/// A request stream that stays open until the sender is dropped.
fn held(
    requests: impl IntoIterator<Item = pb::SubscribeRequest>,
) -> (tokio::sync::mpsc::UnboundedSender<pb::SubscribeRequest>, impl futures::Stream<Item = pb::SubscribeRequest>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for r in requests {
        tx.send(r).unwrap();
    }
    (tx, tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
}

async fn known_channels(client: &mut BusClient) -> u64 {
    client.info(pb::InfoRequest {}).await.unwrap().into_inner().channels
}

#[tokio::test]
async fn channels_without_events_are_forgotten_when_their_last_subscriber_leaves() {
    let bus = BusServer::memory().await;
    let mut client = bus_client(&bus.url()).await;
    publish(&mut client, "kept", "e", json!(1)).await;
    assert_eq!(known_channels(&mut client).await, 1);

    const N: usize = 10_000;
    let requests = (0..N)
        .flat_map(|i| [join(&format!("fresh:{i}")), leave(&format!("fresh:{i}"))])
        .chain([join("kept")])
        .collect::<Vec<_>>();
    let (held_open, requests) = held(requests);
    let mut stream = client.subscribe(requests).await.unwrap().into_inner();
    use pb::subscribe_response::Response as R;
    let (mut joined, mut left) = (0, 0);
    loop {
        match next(&mut stream).await {
            R::Joined(j) if j.channel == "kept" => {
                assert_eq!(j.position.unwrap().offset, 1);
                break;
            }
            R::Joined(j) => {
                assert!(j.error.is_none(), "{j:?}");
                joined += 1;
            }
            R::Left(_) => left += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((joined, left), (N, N));
    // Only the channel that stored an event is still known.
    assert_eq!(known_channels(&mut client).await, 1);
    let listed = client.channels(pb::ChannelsRequest { prefix: String::new() }).await.unwrap().into_inner().channels;
    assert_eq!(listed.iter().map(|c| (c.channel.as_str(), c.subscribers)).collect::<Vec<_>>(), [("kept", 1)]);

    // A channel that was forgotten starts again at its first event.
    let (watcher_open, requests) = held([join("fresh:7")]);
    let mut watcher = client.subscribe(requests).await.unwrap().into_inner();
    let R::Joined(j) = next(&mut watcher).await else { panic!("expected joined") };
    assert_eq!(j.position.unwrap().offset, 0);
    assert_eq!(publish(&mut client, "fresh:7", "e", json!("first")).await.offset, 1);
    let R::Events(batch) = next(&mut watcher).await else { panic!("expected the event") };
    assert_eq!(batch.events[0].offset, 1);
    drop((held_open, stream, watcher_open, watcher));
    // Ending the streams leaves what they held; channels with events stay.
    tokio::time::timeout(WAIT, async {
        while client.info(pb::InfoRequest {}).await.unwrap().into_inner().subscriptions > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the bus noticed the streams ended");
    assert_eq!(known_channels(&mut client).await, 2);
}

#[tokio::test]
async fn a_subscribe_stream_holds_at_most_max_stream_channels() {
    let bus = BusServer::start(eventbus::Config { max_stream_channels: 3, ..eventbus::Config::memory() }).await;
    let mut client = bus_client(&bus.url()).await;
    let requests = ["a", "b", "c", "d", "a", "c"].map(join).into_iter().chain([leave("a"), join("d")]);
    // Kept open so that what the stream holds is still held at the end.
    let (_open, requests) = held(requests);
    let mut stream = client.subscribe(requests).await.unwrap().into_inner();
    use pb::subscribe_response::Response as R;
    let mut answers = Vec::new();
    for _ in 0..8 {
        match next(&mut stream).await {
            R::Joined(j) => answers.push(format!("{}:{}", j.channel, j.error.map_or("ok".into(), |e| e.code))),
            R::Left(l) => answers.push(format!("left {}", l.channel)),
            other => panic!("unexpected {other:?}"),
        }
    }
    // A channel already held is answered; a fourth is refused until one is left.
    assert_eq!(answers, ["a:ok", "b:ok", "c:ok", "d:limit_exceeded", "a:ok", "c:ok", "left a", "d:ok"]);
    assert_eq!(known_channels(&mut client).await, 3);
}
