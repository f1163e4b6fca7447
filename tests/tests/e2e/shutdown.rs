//! Graceful shutdown: `disconnect`, close 1001, within the grace period.

use std::time::Duration;

use switchboard_tests::*;

#[tokio::test]
async fn shutdown_says_goodbye_and_returns_within_the_grace_period() {
    let bus = BusServer::memory().await;
    let mut gw = GatewayServer::start_with(&bus.url(), |c| c.shutdown_grace = Duration::from_secs(5)).await;
    let mut a = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    let mut b = Ws::connect(&gw.ws_url("/ws")).await.unwrap();
    b.subscribe("missions").await;

    let started = tokio::time::Instant::now();
    gw.shutdown();
    for ws in [&mut a, &mut b] {
        let (closed, frames) = ws.closed().await;
        assert_eq!(closed, Closed::Code(1001));
        let bye = frames.last().expect("a disconnect frame");
        assert_eq!(bye["type"], "disconnect");
        assert_eq!(bye["code"], 1001);
        assert_eq!(bye["reconnect"], true);
    }
    tokio::time::timeout(Duration::from_secs(6), gw.join()).await.expect("serve must return within the grace period");
    assert!(started.elapsed() < Duration::from_secs(6));
}
