//! Per-stage timing: the server's Prometheus histograms of its catch-up and
//! push stages (`lockstep_catchup_stage_seconds{stage=...}`,
//! `lockstep_push_stage_seconds{stage=...}`), scraped from its admin
//! listener's `/metrics` before and after a workload. Each family may be
//! absent (an older server); then the report says so.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stats::Metrics;

/// The histogram families read, and the short name their figures carry.
pub const FAMILIES: [(&str, &str); 2] =
    [("lockstep_catchup_stage_seconds", "catchup"), ("lockstep_push_stage_seconds", "push")];

/// `/metrics` of the server's admin listener (plain HTTP/1.1, one request per connection).
pub async fn scrape(admin: SocketAddr) -> anyhow::Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await?;
        stream
            .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange).await.context("scraping /metrics")??;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "/metrics answered {}", head.lines().next().unwrap_or(""));
    Ok(body.to_string())
}

/// Count and sum (seconds) per family and stage, summed over any other labels.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stages {
    pub present: Vec<&'static str>,
    pub totals: BTreeMap<(&'static str, String), (f64, f64)>,
}

fn stage_label(labels: &str) -> Option<String> {
    let start = labels.find("stage=\"")? + "stage=\"".len();
    let end = labels[start..].find('"')?;
    Some(labels[start..start + end].to_string())
}

pub fn parse(text: &str) -> Stages {
    let mut stages = Stages::default();
    for (family, short) in FAMILIES {
        if text.lines().any(|line| line.starts_with(family)) {
            stages.present.push(short);
        }
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(family) else { continue };
            let (is_count, rest) = if let Some(rest) = rest.strip_prefix("_count{") {
                (true, rest)
            } else if let Some(rest) = rest.strip_prefix("_sum{") {
                (false, rest)
            } else {
                continue;
            };
            let Some((labels, value)) = rest.split_once('}') else { continue };
            let (Some(stage), Some(value)) =
                (stage_label(labels), value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
            else {
                continue;
            };
            let entry = stages.totals.entry((short, stage)).or_default();
            if is_count {
                entry.0 += value;
            } else {
                entry.1 += value;
            }
        }
    }
    stages
}

/// A scrape taken before a workload; `record` subtracts it from one taken after.
pub struct StageSnapshot {
    admin: Option<SocketAddr>,
    before: Option<Stages>,
}

impl StageSnapshot {
    pub async fn take(admin: Option<SocketAddr>) -> Self {
        let before = match admin {
            Some(admin) => scrape(admin).await.ok().map(|text| parse(&text)),
            None => None,
        };
        Self { admin, before }
    }

    /// Records, per family present and stage, `stage.{workload}.{family}.{stage}.count` and `.mean_ms`
    /// over the workload, and `stages.{family}.present` (1 or 0).
    pub async fn record(self, metrics: &mut Metrics, round: usize, workload: &str) {
        let (Some(admin), Some(before)) = (self.admin, self.before) else { return };
        let Ok(text) = scrape(admin).await else { return };
        let after = parse(&text);
        for (_, short) in FAMILIES {
            metrics.add(round, &format!("stages.{short}.present"), f64::from(u8::from(after.present.contains(&short))));
        }
        for ((family, stage), (count, sum)) in &after.totals {
            let (count_before, sum_before) = before.totals.get(&(*family, stage.clone())).copied().unwrap_or_default();
            let count = count - count_before;
            if count <= 0.0 {
                continue;
            }
            let key = format!("stage.{workload}.{family}.{stage}");
            metrics.add(round, &format!("{key}.count"), count);
            metrics.add(round, &format!("{key}.mean_ms"), (sum - sum_before) / count * 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_stage_over_other_labels_and_skips_buckets() {
        let text = "# TYPE lockstep_push_stage_seconds histogram\n\
                    lockstep_push_stage_seconds_bucket{stage=\"produce\",le=\"0.001\"} 3\n\
                    lockstep_push_stage_seconds_sum{stage=\"produce\",node=\"a\"} 0.5\n\
                    lockstep_push_stage_seconds_count{stage=\"produce\",node=\"a\"} 10\n\
                    lockstep_push_stage_seconds_sum{node=\"b\",stage=\"produce\"} 0.25\n\
                    lockstep_push_stage_seconds_count{node=\"b\",stage=\"produce\"} 5\n\
                    lockstep_other_seconds_count{stage=\"x\"} 1\n";
        let stages = parse(text);
        assert_eq!(stages.present, vec!["push"]);
        assert_eq!(stages.totals.get(&("push", "produce".to_string())), Some(&(15.0, 0.75)));
        assert_eq!(stages.totals.len(), 1);
    }

    #[test]
    fn absent_families_are_not_present() {
        assert_eq!(parse("lockstep_pushes_total 3\n"), Stages::default());
    }
}
