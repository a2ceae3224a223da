//! Push targets cannot reach inside the network (issue 25): targets naming
//! internal addresses, names resolving to them and redirects to them are
//! refused or never contacted — local listeners count the connections they
//! get — and a huge answer is not read past `http.max_response_bytes`.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use common::{Behaviour, Listener, settings, waker, webhook};
use lockstep_push::{
    resolve::Lookup,
    wake::{AttemptEnd, AttemptState},
};
use lockstep_schemas::WakeUpOutcome;

fn table(entries: &[(&str, &str)]) -> Lookup {
    let mut table = HashMap::new();
    for (name, ip) in entries {
        table.insert(name.to_string(), vec![ip.parse().unwrap()]);
    }
    Lookup::Table(Arc::new(table))
}

#[tokio::test]
async fn targets_naming_internal_addresses_are_refused_before_any_connection() {
    let v4 = Listener::start("127.0.0.1:0", Behaviour::ok()).await;
    let v6 = match tokio::net::TcpListener::bind("[::1]:0").await {
        Ok(_) => Some(Listener::start("[::1]:0", Behaviour::ok()).await),
        Err(_) => None, // no IPv6 loopback here: the policy test in schemas covers [::1]
    };
    let waker = waker(settings(&[]), Lookup::System);
    let mut targets = vec![
        format!("http://{}", v4.addr),
        format!("http://localhost:{}", v4.addr.port()),
        format!("https://0x7f.0.0.1:{}", v4.addr.port()),
        "https://10.0.0.1".to_string(),
        "https://169.254.169.254".to_string(),
        "https://[fd00::1]".to_string(),
    ];
    if let Some(v6) = &v6 {
        targets.push(format!("http://{}", v6.addr));
        targets.push(format!("http://[::ffff:127.0.0.1]:{}", v4.addr.port()));
    }
    for base in &targets {
        let started = Instant::now();
        let report = waker.attempt(&webhook(base, "d"), AttemptState::FIRST, false).await;
        // Refused outright: no request, no retry (a connection attempt would retry).
        match report.end {
            AttemptEnd::Done(result) => assert_eq!(result.outcome, WakeUpOutcome::Failed, "{base}"),
            AttemptEnd::Retry { .. } => panic!("{base} was attempted"),
        }
        assert!(started.elapsed() < Duration::from_secs(1), "{base}: {:?}", started.elapsed());
    }
    assert_eq!(v4.connections(), 0, "127.0.0.1 was contacted");
    if let Some(v6) = &v6 {
        assert_eq!(v6.connections(), 0, "[::1] was contacted");
    }
}

#[tokio::test]
async fn a_name_resolving_to_an_internal_address_is_never_contacted() {
    let listener = Listener::start("127.0.0.1:0", Behaviour::ok()).await;
    let port = listener.addr.port();
    let lookup = table(&[("push.rebind.test", "127.0.0.1")]);
    let order = webhook(&format!("https://push.rebind.test:{port}"), "d");

    let refusing = waker(settings(&[]), lookup.clone());
    let report = refusing.attempt(&order, AttemptState::FIRST, false).await;
    assert!(matches!(report.end, AttemptEnd::Retry { .. }), "no answer: {report:?}");
    assert_eq!(listener.connections(), 0, "the resolver let 127.0.0.1 through");

    // The control: allowed, the same name does reach the listener (a TLS hello it cannot answer).
    let allowing = waker(settings(&["127.0.0.1"]), lookup);
    allowing.attempt(&order, AttemptState::FIRST, false).await;
    assert_eq!(listener.connections(), 1, "the test would have seen a connection");
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let inside = Listener::start("127.0.0.2:0", Behaviour::ok()).await;
    let location = format!("http://{}/_matrix/push/v1/notify", inside.addr);
    let redirecting = Listener::start(
        "127.0.0.1:0",
        Behaviour::Answer { status: 307, delay: Duration::ZERO, headers: vec![("Location".into(), location)] },
    )
    .await;
    // Even with all of 127/8 allowed, the redirect target is not contacted.
    let waker = waker(settings(&["127.0.0.0/8"]), Lookup::System);
    let report = waker.attempt(&webhook(&redirecting.origin(), "d"), AttemptState::FIRST, false).await;
    assert!(matches!(report.end, AttemptEnd::Done(r) if r.outcome == WakeUpOutcome::Failed), "{report:?}");
    assert_eq!(redirecting.requests().len(), 1);
    assert_eq!(inside.connections(), 0, "the redirect was followed");
}

#[tokio::test]
async fn a_1_gib_answer_is_not_read_past_the_bound() {
    const GIB: u64 = 1 << 30;
    let listener = Listener::start("127.0.0.1:0", Behaviour::Stream { bytes: GIB }).await;
    let mut settings = settings(&["127.0.0.1"]);
    settings.http.request_timeout = Duration::from_secs(60);
    let bound = settings.http.max_response_bytes;
    let waker = waker(settings, Lookup::System);
    let started = Instant::now();
    let report = waker.attempt(&webhook(&listener.origin(), "d"), AttemptState::FIRST, false).await;
    let answered_in = started.elapsed();
    assert!(matches!(report.end, AttemptEnd::Done(r) if r.outcome == WakeUpOutcome::Sent), "{report:?}");
    // The listener stops when its writes fail: the worker closed the connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listener.stream_ended.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = listener.body_bytes_sent.load(Ordering::SeqCst);
    println!(
        "1 GiB answer: the listener managed to send {:.1} MiB (bound {bound} bytes read, the rest sat in socket \
         buffers) before the worker closed the connection; attempt took {answered_in:?}",
        sent as f64 / (1 << 20) as f64
    );
    assert!(listener.stream_ended.load(Ordering::SeqCst), "the worker kept reading");
    assert!(sent < 64 << 20, "{sent} bytes sent: read past the bound");
}
