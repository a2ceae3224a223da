use super::*;

const MIN_INTERVAL: i64 = 60_000;

fn event(at_ms: i64, node: &str, body: EventBody) -> Event {
    Event { user_id: "u".into(), node_id: node.into(), at_ms, body }
}

fn appended(log_end: i64, origin: &str) -> EventBody {
    EventBody::LogAppended {
        log_generation: 0,
        first_offset: log_end - 1,
        log_end,
        count: 1,
        origin_device_id: origin.into(),
        first_received_at_ms: 0,
    }
}

fn acked(device: &str, committed_offset: i64) -> EventBody {
    EventBody::DeviceAcked { device_id: device.into(), log_generation: 0, committed_offset }
}

fn target() -> PushTarget {
    PushTarget::WebPush { endpoint: "https://push.example/abc".into(), p256dh: vec![4; 65], auth: vec![1; 16] }
}

fn with_target(state: &mut State, device: &str) {
    state.apply(0, 0, &event(0, "n1", EventBody::PushTargetSet { device_id: device.into(), target: target() }));
}

fn wake_event(at_ms: i64, log_end: i64, outcome: WakeUpOutcome) -> Event {
    event(at_ms, "push-1", EventBody::WakeUp { device_id: "d".into(), log_end, outcome, http_status: 201 })
}

#[test]
fn a_behind_offline_device_with_a_target_is_woken_once_per_log_end() {
    let mut state = State::new(MIN_INTERVAL, 100, TargetPolicy::public_only());
    with_target(&mut state, "d");
    state.apply(0, 1, &event(0, "n1", acked("d", 5)));
    assert_eq!(state.decide("u", "d", 1_000), Decision::Idle, "no log end known yet");
    for end in 6..=1_005 {
        state.apply(0, end, &event(0, "n1", appended(end, "other")));
    }
    assert_eq!(state.decide("u", "d", 1_000), Decision::Wake { target: target(), log_end: 1_005 });
    state.device_mut("u", "d").unwrap().wake_in_flight = true;
    assert_eq!(state.decide("u", "d", 1_000), Decision::Idle, "one in flight");
    state.device_mut("u", "d").unwrap().wake_in_flight = false;
    state.apply(0, 2_000, &wake_event(1_000, 1_005, WakeUpOutcome::Sent));
    assert_eq!(state.decide("u", "d", 500_000), Decision::Idle, "already woken for this log end");
    state.apply(0, 2_001, &event(0, "n1", appended(1_006, "other")));
    assert_eq!(state.decide("u", "d", 2_000), Decision::Later(61_000), "min_interval");
    assert!(matches!(state.decide("u", "d", 61_000), Decision::Wake { log_end: 1_006, .. }));
}

#[test]
fn connected_acked_targetless_and_revoked_devices_are_not_woken() {
    let mut state = State::new(MIN_INTERVAL, 100, TargetPolicy::public_only());
    state.apply(0, 0, &event(0, "n1", appended(10, "other")));
    state.apply(0, 1, &event(0, "n1", acked("d", 3)));
    assert_eq!(state.decide("u", "d", 0), Decision::Idle, "no target");
    with_target(&mut state, "d");
    state.apply(
        0,
        2,
        &event(
            0,
            "n1",
            EventBody::DeviceConnected { device_id: "d".into(), lease_until_ms: 90_000, stream_started_ms: None },
        ),
    );
    state.apply(
        0,
        3,
        &event(
            0,
            "n2",
            EventBody::DeviceConnected { device_id: "d".into(), lease_until_ms: 50_000, stream_started_ms: None },
        ),
    );
    assert_eq!(state.decide("u", "d", 1_000), Decision::Later(90_000), "connected until the latest lease ends");
    state.apply(0, 4, &event(0, "n1", EventBody::DeviceDisconnected { device_id: "d".into() }));
    assert_eq!(state.decide("u", "d", 1_000), Decision::Later(50_000), "still connected on n2");
    assert!(matches!(state.decide("u", "d", 50_000), Decision::Wake { .. }), "n2's lease ran out");
    state.apply(0, 5, &event(0, "n1", acked("d", 10)));
    assert_eq!(state.decide("u", "d", 50_000), Decision::Idle, "acked to the end");
    state.apply(0, 6, &event(0, "n1", acked("d", 4)));
    assert_eq!(state.decide("u", "d", 50_000), Decision::Idle, "an older ack does not move it back");
    state.apply(0, 7, &event(0, "n1", appended(11, "other")));
    state.apply(0, 8, &event(0, "n1", EventBody::DeviceRevoked { device_id: "d".into() }));
    assert_eq!(state.decide("u", "d", 50_000), Decision::Idle, "revoked");
}

#[test]
fn unknown_offsets_are_looked_up_and_a_device_is_not_woken_for_its_own_pushes() {
    let mut state = State::new(MIN_INTERVAL, 100, TargetPolicy::public_only());
    with_target(&mut state, "d");
    state.apply(0, 1, &event(0, "n1", appended(10, "other")));
    assert_eq!(state.decide("u", "d", 0), Decision::LookUpOffset);
    state.set_looked_up_offset("u", "d", Some(10));
    assert_eq!(state.decide("u", "d", 0), Decision::Idle);
    state.apply(
        0,
        2,
        &event(
            0,
            "n1",
            EventBody::LogAppended {
                log_generation: 0,
                first_offset: 10,
                log_end: 20,
                count: 10,
                origin_device_id: "d".into(),
                first_received_at_ms: 0,
            },
        ),
    );
    assert_eq!(state.decide("u", "d", 0), Decision::Idle, "it pushed these itself");
    state.apply(0, 3, &event(0, "n1", appended(21, "other")));
    assert!(matches!(state.decide("u", "d", 0), Decision::Wake { log_end: 21, .. }));
}

#[test]
fn replays_and_out_of_order_own_attempts_keep_the_latest_wake_up() {
    let mut state = State::new(MIN_INTERVAL, 100, TargetPolicy::public_only());
    with_target(&mut state, "d");
    state.apply(0, 1, &event(0, "n1", acked("d", 0)));
    state.apply(0, 2, &event(0, "n1", appended(5, "other")));
    state.apply(0, 3, &wake_event(2_000, 5, WakeUpOutcome::Sent));
    state.apply(0, 4, &wake_event(1_000, 5, WakeUpOutcome::Retrying));
    assert_eq!(state.device("u", "d").unwrap().last_wake.unwrap().outcome, WakeUpOutcome::Sent);
    assert_eq!(state.decide("u", "d", 10_000_000), Decision::Idle);
    // A failed attempt is retried after min_interval.
    state.apply(0, 5, &event(0, "n1", appended(6, "other")));
    state.apply(0, 6, &wake_event(3_000, 6, WakeUpOutcome::Failed));
    assert_eq!(state.decide("u", "d", 3_000), Decision::Later(63_000));
}

#[test]
fn the_device_limit_drops_new_devices_and_partitions_are_forgotten() {
    let mut state = State::new(MIN_INTERVAL, 1, TargetPolicy::public_only());
    assert!(state.apply(3, 0, &event(0, "n1", acked("d", 0))).is_some());
    assert!(state.apply(3, 1, &event(0, "n1", acked("e", 0))).is_none());
    assert_eq!(state.devices_of_partition(3), vec![("u".to_string(), "d".to_string())]);
    state.drop_partition(3);
    assert_eq!(state.device_count(), 0);
    assert!(state.apply(3, 2, &event(0, "n1", acked("e", 0))).is_some());
}

#[test]
fn a_refused_target_read_back_from_the_events_topic_is_no_target() {
    let mut state = State::new(MIN_INTERVAL, 100, TargetPolicy::public_only());
    with_target(&mut state, "d");
    assert!(state.device("u", "d").unwrap().target.is_some());
    for endpoint in
        ["http://127.0.0.1:8080/x", "https://169.254.169.254/latest", "https://[::1]/x", "https://10.0.0.1/x"]
    {
        let target = PushTarget::WebPush { endpoint: endpoint.into(), p256dh: vec![4; 65], auth: vec![1; 16] };
        state.apply(0, 1, &event(0, "n1", EventBody::PushTargetSet { device_id: "d".into(), target }));
        assert!(state.device("u", "d").unwrap().target.is_none(), "{endpoint}");
        with_target(&mut state, "d");
    }
    state.apply(0, 2, &event(0, "n1", acked("d", 0)));
    state.apply(0, 3, &event(0, "n1", appended(5, "other")));
    let local = TargetPolicy::allowing(&["127.0.0.1".into()]).unwrap();
    let mut tests = State::new(MIN_INTERVAL, 100, local);
    let target =
        PushTarget::WebPush { endpoint: "http://127.0.0.1:8080/x".into(), p256dh: vec![4; 65], auth: vec![1; 16] };
    tests.apply(0, 0, &event(0, "n1", EventBody::PushTargetSet { device_id: "d".into(), target }));
    assert!(tests.device("u", "d").unwrap().target.is_some(), "allowed by the list");
}
