//! Latency histograms, an open-loop schedule, and the per-round figures
//! that the report summarises (median and spread over rounds).

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// Latencies in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Longest a workload waits for what it expects (deliveries, acks) before failing.
const WAIT: Duration = Duration::from_secs(180);

/// Polls `done` every 2 ms until it holds, or fails after [`WAIT`].
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    histogram.saturating_record((latency.as_micros() as u64).max(1));
}

pub fn quantile_ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// An open-loop schedule: message `seq` is due at `start + seq / rate`,
/// whether or not earlier ones were answered. Latency is measured from the
/// due time, so a stall is charged to every message it delayed (no
/// coordinated omission).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub start: Instant,
    pub interval: Duration,
}

impl Schedule {
    pub fn new(rate_per_second: f64) -> Self {
        Self {
            start: Instant::now() + Duration::from_millis(200),
            interval: Duration::from_secs_f64(1.0 / rate_per_second.max(0.001)),
        }
    }

    pub fn due(&self, seq: u64) -> Instant {
        self.start + self.interval.mul_f64(seq as f64)
    }

    pub fn latency(&self, seq: u64, now: Instant) -> Duration {
        now.saturating_duration_since(self.due(seq))
    }
}

/// Figures by name, each with one value per round.
#[derive(Default)]
pub struct Metrics {
    pub values: BTreeMap<String, BTreeMap<usize, f64>>,
    pub failures: Vec<String>,
    /// What the report should say about what did not run, and why.
    pub notes: Vec<String>,
}

impl Metrics {
    pub fn add(&mut self, round: usize, key: &str, value: f64) {
        eprintln!("    round {round}: {key} = {value:.3}");
        self.values.entry(key.to_string()).or_default().insert(round, value);
    }

    pub fn get(&self, key: &str) -> Option<&BTreeMap<usize, f64>> {
        self.values.get(key)
    }

    /// `f(a, b)` per round in which both figures exist.
    pub fn combine(&self, a: &str, b: &str, f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
        let (Some(a), Some(b)) = (self.get(a), self.get(b)) else {
            return Vec::new();
        };
        a.iter().filter_map(|(round, x)| b.get(round).map(|y| f(*x, *y))).collect()
    }

    pub fn summary(&self, key: &str) -> Option<Summary> {
        Summary::of(self.get(key)?.values().copied().collect())
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

impl Summary {
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|value| value.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let count = values.len();
        let median = if count % 2 == 1 { values[count / 2] } else { (values[count / 2 - 1] + values[count / 2]) / 2.0 };
        Some(Self { median, min: values[0], max: values[count - 1], count })
    }
}
