//! The worker's fairness (issue 25), measured: 1,000 ordinary devices whose
//! push service answers at once, beside 50 accounts (10 devices each) whose
//! endpoints hold every request past the request timeout, each on an origin of
//! its own, under way for 3 s when the ordinary ones come. Printed: the ordinary devices'
//! wake-up latency (submit → request at the push service) without and with the
//! slow accounts, and with the lanes turned off. Asserted: the slow origins'
//! bounds held and every ordinary device was woken; no timed assertions.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Behaviour, InFlight, Listener, settings, waker, webhook};
use lockstep_push::{Settings, dispatch::Dispatcher, resolve::Lookup};

const ORDINARY: usize = 1_000;
const SLOW_ACCOUNTS: usize = 50;
const DEVICES_PER_SLOW_ACCOUNT: usize = 10;
const SLOW_HEAD_START: Duration = Duration::from_secs(3);
/// A run stops here, woken or not (the count says how many were).
const RUN_LIMIT: Duration = Duration::from_secs(15);

struct Run {
    /// Ordinary devices' latencies, sorted.
    latencies: Vec<Duration>,
    slow_max_in_flight: usize,
    slow_max_per_origin: usize,
}

async fn run(settings: Settings, slow_accounts: usize) -> Run {
    let fast = Listener::start("127.0.0.1:0", Behaviour::ok()).await;
    let slow_group = Arc::new(InFlight::default());
    let mut slow = Vec::new();
    for _ in 0..slow_accounts {
        let behaviour = Behaviour::slow(Duration::from_secs(600));
        slow.push(Listener::start_in_group("127.0.0.1:0", behaviour, slow_group.clone()).await);
    }
    let wake = settings.wake.clone();
    let mut dispatcher = Dispatcher::new(waker(settings, Lookup::System), &wake);
    for (account, listener) in slow.iter().enumerate() {
        for device in 0..DEVICES_PER_SLOW_ACCOUNT {
            dispatcher.submit((), webhook(&listener.origin(), &format!("slow-{account}-{device}")));
        }
    }
    // The slow accounts' wake-ups are under way (past their first contact) when the
    // ordinary ones come.
    let under_way = Instant::now() + SLOW_HEAD_START;
    while Instant::now() < under_way {
        tokio::select! {
            _ = dispatcher.next_done() => {}
            () = tokio::time::sleep_until(under_way.into()) => {}
        }
    }
    let started = Instant::now();
    for device in 0..ORDINARY {
        dispatcher.submit((), webhook(&fast.origin(), &format!("ordinary-{device}")));
    }
    let deadline = started + RUN_LIMIT;
    while fast.requests().len() < ORDINARY && Instant::now() < deadline {
        tokio::select! {
            _ = dispatcher.next_done() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    // Keep going a while, so the slow origins' retries show whether their bounds hold.
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        tokio::select! {
            _ = dispatcher.next_done() => {}
            () = tokio::time::sleep_until(watch_until.into()) => {}
        }
    }
    let mut latencies: Vec<Duration> = fast.requests().iter().map(|(_, at)| at.duration_since(started)).collect();
    latencies.sort();
    Run {
        latencies,
        slow_max_in_flight: slow_group.max(),
        slow_max_per_origin: slow.iter().map(|listener| listener.in_flight.max()).max().unwrap_or(0),
    }
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

fn report(what: &str, run: &Run) {
    let l = &run.latencies;
    println!(
        "{what:<48} ordinary woken {:>4}/{ORDINARY}: p50 {:>8.1} ms, p99 {:>8.1} ms, max {:>8.1} ms; slow origins: \
         at most {} in flight, {} per origin",
        l.len(),
        quantile(l, 0.5),
        quantile(l, 0.99),
        quantile(l, 1.0),
        run.slow_max_in_flight,
        run.slow_max_per_origin,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoints_do_not_delay_the_others() {
    let mut base = settings(&["127.0.0.1"]);
    base.http.request_timeout = Duration::from_secs(4);
    let wake = base.wake.clone();
    println!(
        "{ORDINARY} ordinary devices on one fast origin; {SLOW_ACCOUNTS} slow accounts × {DEVICES_PER_SLOW_ACCOUNT} \
         devices, one origin each, answering never (request timeout {:?}, {} attempts); max_concurrent {}, \
         max_per_origin {}, max_concurrent_slow {}, slow_after {:?}",
        base.http.request_timeout,
        wake.max_attempts,
        wake.max_concurrent,
        wake.max_per_origin,
        wake.max_concurrent_slow,
        wake.slow_after
    );
    let alone = run(base.clone(), 0).await;
    report("without the slow accounts", &alone);
    let beside = run(base.clone(), SLOW_ACCOUNTS).await;
    report("beside the slow accounts", &beside);
    let mut no_lanes = base.clone();
    no_lanes.wake.max_per_origin = wake.max_concurrent;
    no_lanes.wake.max_concurrent_slow = wake.max_concurrent;
    let unfair = run(no_lanes, SLOW_ACCOUNTS).await;
    report("beside them, lanes off (per-origin = slow = 64)", &unfair);

    assert_eq!(alone.latencies.len(), ORDINARY);
    assert_eq!(beside.latencies.len(), ORDINARY, "every ordinary device woken beside the slow ones");
    // New origins (one probe each) and slow ones share max_concurrent_slow slots apiece. The
    // listeners count a timed-out request until they see the connection close, which may
    // come just after the worker's next request: 2 of slack.
    assert!(beside.slow_max_in_flight <= 2 * wake.max_concurrent_slow + 2, "{}", beside.slow_max_in_flight);
    assert!(beside.slow_max_per_origin <= wake.max_per_origin);
}
