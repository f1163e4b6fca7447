//! The hub's channel state machine, driven directly: no bus, no sockets.
//! The link's commands are read from the hub's mpsc sender, and what a
//! client would see is read from its connection's queue.

use serde_json::json;

use super::*;
use crate::protocol::{EventRef, event_frame};

const RECOVERY_MAX: u64 = 8;

/// A hub whose link is up, and the receiving end of its link commands.
fn hub() -> (Hub, mpsc::Receiver<LinkCommand>) {
    let (tx, rx) = mpsc::channel(64);
    let hub = Hub::new(tx, RECOVERY_MAX, 16, Arc::new(Metrics::new()));
    assert_eq!(hub.relink(), Vec::new());
    (hub, rx)
}

fn connect(hub: &Hub) -> (Uuid, Arc<Outbound>) {
    let (id, queue) = (Uuid::new_v4(), Arc::new(Outbound::new(1 << 20)));
    assert!(hub.add_connection(id, queue.clone(), None, 16));
    (id, queue)
}

fn position(offset: u64, epoch: &str) -> Position {
    Position { offset, epoch: epoch.to_owned() }
}

fn since(offset: u64, epoch: &str) -> Since {
    Since { offset, epoch: epoch.to_owned() }
}

fn event(offset: u64, epoch: &str) -> Frame {
    let text = event_frame(&EventRef {
        channel: "a",
        event: "e",
        data: b"{}",
        id: &format!("id-{offset}"),
        offset,
        epoch,
        timestamp_ms: 0,
    });
    Frame { offset, epoch: Arc::from(epoch), text: Utf8Bytes::from(text), timestamp_ms: 0 }
}

fn events(offsets: std::ops::RangeInclusive<u64>) -> Vec<Frame> {
    offsets.map(|offset| event(offset, "e")).collect()
}

fn join(channel: &str, since: Option<Position>) -> LinkCommand {
    LinkCommand::Join { channel: Arc::from(channel), since }
}

fn leave(channel: &str) -> LinkCommand {
    LinkCommand::Leave { channel: Arc::from(channel) }
}

/// The commands sent to the link since the last call.
fn sent(link: &mut mpsc::Receiver<LinkCommand>) -> Vec<LinkCommand> {
    std::iter::from_fn(|| link.try_recv().ok()).collect()
}

/// What a connection's queue holds, one line per frame, and its close code;
/// taking them, so each assertion covers only what happened since the last.
fn received(queue: &Outbound) -> (Vec<String>, Option<u16>) {
    let drained = queue.drain();
    let frames = drained.frames.iter().map(|f| summary(&serde_json::from_str(f.as_str()).unwrap())).collect();
    (frames, drained.close.map(|d| d.code))
}

fn summary(frame: &Value) -> String {
    let id = &frame["id"];
    match frame["type"].as_str().unwrap() {
        "event" => format!("event {}", frame["offset"]),
        "subscribed" => {
            let mut line = format!("subscribed {id} at {}", frame["position"]["offset"]);
            if let Some(recovered) = frame.get("recovered") {
                line += &format!(" recovered={recovered} missed={}", frame["missed"]);
            }
            line
        }
        "unsubscribed" => format!("unsubscribed {id}"),
        "error" => format!("error {id} {}", frame["code"].as_str().unwrap()),
        other => panic!("unexpected frame {other}"),
    }
}

fn lines(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

#[test]
fn a_subscribe_is_answered_once_the_bus_confirms_then_gets_live_events() {
    let (hub, mut link) = hub();
    let (conn, queue) = connect(&hub);
    assert_eq!(hub.subscribe(conn, "a", None, Some(json!(1))), Ok(None));
    assert_eq!(sent(&mut link), vec![join("a", None)]);
    hub.on_events("a", &events(1..=1));
    assert_eq!(received(&queue), (vec![], None), "nothing before the bus confirms");

    assert!(hub.on_joined("a", position(5, "e"), false).is_empty());
    hub.on_events("a", &events(5..=7));
    assert_eq!(received(&queue), (lines(&["subscribed 1 at 5", "event 6", "event 7"]), None));
}

#[test]
fn a_subscribe_while_the_leave_is_pending_rejoins_once_the_bus_confirms_the_leave() {
    let (hub, mut link) = hub();
    let (first, _) = connect(&hub);
    let (second, queue) = connect(&hub);
    hub.subscribe(first, "a", None, None).unwrap();
    hub.on_joined("a", position(5, "e"), false);
    assert_eq!(hub.unsubscribe(first, "a", None), Unsubscribed::Now);
    assert_eq!(sent(&mut link), vec![join("a", None), leave("a")]);

    // Leaving -> Rejoining: the join waits for the bus to confirm the leave.
    assert_eq!(hub.subscribe(second, "a", None, Some(json!(2))), Ok(None));
    assert_eq!(sent(&mut link), vec![]);
    hub.on_events("a", &events(6..=6));
    hub.on_left("a");
    assert_eq!(sent(&mut link), vec![join("a", None)]);
    assert!(hub.on_joined("a", position(9, "e"), false).is_empty());
    hub.on_events("a", &events(10..=10));
    assert_eq!(received(&queue), (lines(&["subscribed 2 at 9", "event 10"]), None));
}

#[test]
fn a_relink_resumes_each_channel_from_the_last_event_delivered() {
    let (hub, mut link) = hub();
    let (conn, queue) = connect(&hub);
    hub.subscribe(conn, "a", None, Some(json!(1))).unwrap();
    hub.on_joined("a", position(5, "e"), false);
    hub.on_events("a", &events(6..=6));
    sent(&mut link);

    hub.link_down();
    let (other, _) = connect(&hub);
    assert_eq!(hub.subscribe(other, "b", None, None), Err(SubscribeError::Unavailable));
    assert_eq!(hub.relink(), vec![join("a", Some(position(6, "e")))]);
    assert!(hub.on_joined("a", position(6, "e"), true).is_empty());
    // The bus replays from the position it was given; what was delivered
    // before the relink is not delivered again.
    hub.on_events("a", &events(6..=8));
    assert_eq!(received(&queue), (lines(&["subscribed 1 at 5", "event 6", "event 7", "event 8"]), None));
}

#[test]
fn a_relink_the_bus_cannot_resume_closes_the_listeners_with_4004() {
    let (hub, _link) = hub();
    let (conn, queue) = connect(&hub);
    hub.subscribe(conn, "a", None, None).unwrap();
    hub.on_joined("a", position(5, "e"), false);
    hub.link_down();
    hub.relink();
    hub.on_joined("a", position(2, "f"), false);
    assert_eq!(received(&queue), (lines(&["subscribed null at 5"]), Some(4004)));
}

#[test]
fn a_recovery_merges_history_with_the_events_buffered_meanwhile() {
    let (hub, _link) = hub();
    let (conn, queue) = connect(&hub);
    assert_eq!(hub.subscribe(conn, "a", Some(since(3, "e")), Some(json!(1))), Ok(None));
    let jobs = hub.on_joined("a", position(5, "e"), false);
    let job = RecoveryJob { connection: conn, channel: Arc::from("a"), since: since(3, "e") };
    assert_eq!(jobs, vec![job]);

    // Live events while history is read are held back; history was read
    // after event 6 arrived, so 6 comes both ways and must be sent once.
    hub.on_events("a", &events(6..=7));
    assert_eq!(received(&queue), (vec![], None));
    hub.finish_recovery(&jobs[0], Some(Recovered { frames: events(4..=6), position: position(6, "e") }));
    hub.on_events("a", &events(7..=8));
    let expected = ["subscribed 1 at 7 recovered=true missed=4", "event 4", "event 5", "event 6", "event 7", "event 8"];
    assert_eq!(received(&queue), (lines(&expected), None));
}

#[test]
fn a_recovery_history_cannot_complete_is_subscribed_from_now_without_recovered() {
    let (hub, _link) = hub();
    let (conn, queue) = connect(&hub);
    hub.subscribe(conn, "a", Some(since(3, "old")), Some(json!(1))).unwrap();
    let jobs = hub.on_joined("a", position(5, "e"), false);
    hub.finish_recovery(&jobs[0], Some(Recovered { frames: events(4..=5), position: position(5, "e") }));
    hub.on_events("a", &events(6..=6));
    assert_eq!(received(&queue), (lines(&["subscribed 1 at 5 recovered=false missed=0", "event 6"]), None));
}

#[test]
fn a_recovery_whose_buffer_overflows_closes_the_listener_as_a_slow_consumer() {
    let (hub, _link) = hub();
    let (conn, queue) = connect(&hub);
    hub.subscribe(conn, "a", Some(since(3, "e")), Some(json!(1))).unwrap();
    let jobs = hub.on_joined("a", position(5, "e"), false);
    hub.on_events("a", &events(6..=6 + RECOVERY_MAX + 1));
    hub.finish_recovery(&jobs[0], Some(Recovered { frames: events(4..=5), position: position(5, "e") }));
    assert_eq!(received(&queue), (vec![], Some(Disconnect::SLOW.code)));
}

#[test]
fn an_event_that_does_not_continue_the_channel_closes_its_listeners_with_4004() {
    for (name, next) in [("a gap", event(8, "e")), ("a new epoch", event(7, "f"))] {
        let (hub, _link) = hub();
        let (conn, queue) = connect(&hub);
        hub.subscribe(conn, "a", None, None).unwrap();
        hub.on_joined("a", position(5, "e"), false);
        hub.on_events("a", &[event(6, "e"), event(6, "e"), next]);
        assert_eq!(received(&queue), (lines(&["subscribed null at 5", "event 6"]), Some(4004)), "{name}");
    }
}

#[test]
fn an_unrequested_join_that_lost_events_closes_the_listeners_with_4004() {
    let (hub, _link) = hub();
    let (conn, queue) = connect(&hub);
    hub.subscribe(conn, "a", None, None).unwrap();
    hub.on_joined("a", position(5, "e"), false);
    assert!(hub.on_joined("a", position(0, "f"), false).is_empty());
    assert_eq!(received(&queue), (lines(&["subscribed null at 5"]), Some(4004)));
}

#[test]
fn replies_to_frames_sent_before_the_bus_confirms_come_in_order_and_the_last_leave_leaves() {
    let (hub, mut link) = hub();
    let (conn, queue) = connect(&hub);
    hub.subscribe(conn, "a", None, Some(json!(1))).unwrap();
    assert_eq!(hub.unsubscribe(conn, "a", Some(json!(2))), Unsubscribed::AfterSubscribed);
    assert_eq!(hub.subscribe(conn, "a", Some(since(4, "e")), Some(json!(3))), Ok(None));
    assert_eq!(hub.unsubscribe(conn, "a", Some(json!(4))), Unsubscribed::AfterSubscribed);
    let jobs = hub.on_joined("a", position(5, "e"), false);
    hub.finish_recovery(&jobs[0], Some(Recovered { frames: events(5..=5), position: position(5, "e") }));
    let expected = [
        "subscribed 1 at 5",
        "unsubscribed 2",
        "subscribed 3 at 5 recovered=true missed=1",
        "event 5",
        "unsubscribed 4",
    ];
    assert_eq!(received(&queue), (lines(&expected), None));
    assert_eq!(sent(&mut link), vec![join("a", None), leave("a")]);

    hub.on_events("a", &events(6..=6));
    hub.on_left("a");
    assert_eq!(received(&queue), (vec![], None));
    assert_eq!(hub.channel("a"), (vec![], None));
    assert_eq!(hub.unsubscribe(conn, "a", None), Unsubscribed::NotSubscribed);
}

#[test]
fn a_recovery_that_finds_the_bus_unavailable_answers_unavailable_and_goes_live() {
    let (hub, _link) = hub();
    let (conn, queue) = connect(&hub);
    hub.subscribe(conn, "a", Some(since(3, "e")), Some(json!(1))).unwrap();
    let jobs = hub.on_joined("a", position(5, "e"), false);
    hub.finish_recovery(&jobs[0], None);
    hub.on_events("a", &events(6..=6));
    assert_eq!(received(&queue), (lines(&["error 1 unavailable", "event 6"]), None));
}

#[test]
fn a_recovery_job_that_is_not_the_listeners_own_leaves_it_to_be_answered() {
    for relinked in [false, true] {
        let (hub, _link) = hub();
        let (conn, queue) = connect(&hub);
        if relinked {
            // The channel has a position, but the bus has not confirmed it again.
            let (other, _) = connect(&hub);
            hub.subscribe(other, "a", None, None).unwrap();
            hub.on_joined("a", position(3, "e"), false);
            hub.link_down();
            hub.relink();
        }
        hub.subscribe(conn, "a", Some(since(3, "e")), Some(json!(1))).unwrap();
        // A job the hub did not hand out to this listener must not take its
        // subscribe's id, nor answer it before the bus confirms the channel.
        let stale = RecoveryJob { connection: conn, channel: Arc::from("a"), since: since(3, "e") };
        hub.finish_recovery(&stale, Some(Recovered { frames: vec![], position: position(3, "e") }));
        assert_eq!(received(&queue), (vec![], None), "relinked: {relinked}");

        let jobs = hub.on_joined("a", position(5, "e"), relinked);
        assert_eq!(jobs, vec![stale], "relinked: {relinked}");
        hub.finish_recovery(&jobs[0], Some(Recovered { frames: events(4..=5), position: position(5, "e") }));
        let expected = ["subscribed 1 at 5 recovered=true missed=2", "event 4", "event 5"];
        assert_eq!(received(&queue), (lines(&expected), None), "relinked: {relinked}");
    }
}

fn presence_join(channel: &str, connection: Uuid, user: Option<&str>) -> LinkCommand {
    let (channel, node) = (Arc::from(channel), Arc::from("g1"));
    LinkCommand::PresenceJoin { channel, connection, user_id: user.map(str::to_owned), node }
}

fn presence_leave(channel: &str, connection: Uuid) -> LinkCommand {
    LinkCommand::PresenceLeave { channel: Arc::from(channel), connection }
}

#[test]
fn listeners_of_presence_namespaces_are_announced_after_the_join_and_withdrawn_before_the_leave() {
    let (tx, mut link) = mpsc::channel(64);
    let hub = Hub::new(tx, RECOVERY_MAX, 16, Arc::new(Metrics::new()))
        .with_presence("g1", HashSet::from(["room".to_owned()]));
    hub.relink();
    let (a, queue) = connect(&hub);
    let (b, _) = connect(&hub);
    hub.subscribe(a, "room:1", None, None).unwrap();
    hub.subscribe(a, "plain", None, None).unwrap();
    assert_eq!(sent(&mut link), vec![join("room:1", None), presence_join("room:1", a, None), join("plain", None)]);
    hub.on_joined("room:1", position(3, "e"), false);
    hub.subscribe(b, "room:1", None, None).unwrap();
    assert_eq!(sent(&mut link), vec![presence_join("room:1", b, None)]);
    // Its user, once known, is announced again.
    assert!(hub.set_user(b, "bob", 16));
    assert_eq!(sent(&mut link), vec![presence_join("room:1", b, Some("bob"))]);

    // A transient event reaches live listeners and moves no position.
    received(&queue);
    let mut join_frame = event(0, "e");
    join_frame.offset = 0;
    hub.on_transient("room:1", &[join_frame]);
    hub.on_events("room:1", &events(4..=4));
    assert_eq!(received(&queue), (lines(&["event 0", "event 4"]), None));

    // After a relink, every entry again, after the joins.
    hub.link_down();
    let mut relinked = hub.relink();
    let presence = relinked.split_off(2);
    assert!(relinked.iter().all(|c| matches!(c, LinkCommand::Join { .. })), "{relinked:?}");
    assert_eq!(presence.len(), 2, "{presence:?}");
    for expected in [presence_join("room:1", a, None), presence_join("room:1", b, Some("bob"))] {
        assert!(presence.contains(&expected), "{presence:?}");
    }

    // Leaving: the entry goes before the channel does.
    hub.on_joined("room:1", position(4, "e"), true);
    hub.on_joined("plain", position(0, "e"), true);
    assert_eq!(hub.unsubscribe(b, "room:1", None), Unsubscribed::Now);
    assert_eq!(sent(&mut link), vec![presence_leave("room:1", b)]);
    hub.remove_connection(a);
    let gone = sent(&mut link);
    let at = |c: &LinkCommand| gone.iter().position(|g| g == c).unwrap_or_else(|| panic!("{c:?} not in {gone:?}"));
    assert!(at(&presence_leave("room:1", a)) < at(&leave("room:1")), "{gone:?}");
    assert_eq!(gone.len(), 3, "nothing for the plain channel but its leave: {gone:?}");
}
