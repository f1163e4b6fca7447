//! A slow consumer is cut off with 4002 while a fast one gets everything.

use serde_json::json;
use switchboard_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_fast_consumer_gets_everything() {
    let bus = BusServer::memory().await;
    let gw = GatewayServer::start_with(&bus.url(), |c| c.limits.outbound_queue_bytes = 256 * 1024).await;
    let mut fast = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    fast.subscribe("firehose").await;
    let mut slow = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    slow.subscribe("firehose").await;

    // 8000 events of 2 KiB: far more than the slow reader's queue plus the
    // socket buffers between it and the gateway.
    const N: u64 = 8000;
    let pad = "x".repeat(2048);
    // Published in rounds that the fast reader drains before the next one,
    // so it never lags while the slow one never reads.
    const ROUND: u64 = 100;
    let mut client = bus_client(&bus.url()).await;
    for round in 0..N / ROUND {
        let requests: Vec<pb::PublishRequest> = (1..=ROUND)
            .map(|i| pb::PublishRequest {
                channel: "firehose".into(),
                event: "e".into(),
                data: json!({ "i": round * ROUND + i, "pad": pad }).to_string().into(),
                ..Default::default()
            })
            .collect();
        let mut responses = client.publish_stream(futures::stream::iter(requests)).await.unwrap().into_inner();
        while let Some(r) = responses.message().await.unwrap() {
            assert!(r.error.is_none());
        }
        for i in 1..=ROUND {
            let ev = fast.expect("event").await;
            assert_eq!(ev["offset"], round * ROUND + i, "the fast consumer sees every event in order");
        }
    }

    let (closed, frames) = slow.closed().await;
    assert_eq!(closed, Closed::Code(4002));
    let events = frames.iter().filter(|f| f["type"] == "event").count() as u64;
    assert!(events < N, "the slow consumer was cut off before the end ({events} events)");
    let offsets: Vec<u64> =
        frames.iter().filter(|f| f["type"] == "event").map(|f| f["offset"].as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "what it did get has no gap");
    assert_eq!(frames.last().unwrap()["code"], 4002);
}
