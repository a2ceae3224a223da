//! What `lockstep-cli` tells a person in the first hour: every command's help,
//! the progress of `watch`, what `server-info` shows a web app, and which
//! address to use when the scheme does not match the server (issue 23).

use std::process::Command;

use anyhow::{Context, bail};
use lockstep_e2e::{
    cli::{Cli, cli_binary},
    kafka::Kafka,
    server::Server,
    stack::CliStack,
};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};

/// `lockstep-cli <path…> --help`: it must exit 0; returns its stdout.
fn help(path: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(cli_binary()?).args(path).arg("--help").output()?;
    let stdout = String::from_utf8(output.stdout)?;
    if !output.status.success() {
        bail!("{path:?} --help exited {}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(stdout)
}

/// The subcommands a help text lists under "Commands:" (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_help_answers_and_the_common_commands_show_examples() -> anyhow::Result<()> {
    let top = help(&[])?;
    assert!(top.contains("pair redeem") && top.contains("init --server"), "the two-device walkthrough: {top}");
    let mut pending: Vec<Vec<String>> = subcommands(&top).into_iter().map(|name| vec![name]).collect();
    assert!(pending.len() >= 19, "every command listed: {pending:?}");
    let mut seen = Vec::new();
    while let Some(path) = pending.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args)?;
        assert!(text.contains("Usage: lockstep-cli"), "{path:?}: {text}");
        for sub in subcommands(&text) {
            pending.push([path.clone(), vec![sub]].concat());
        }
        seen.push((path.join(" "), text));
    }
    for name in ["init", "pair", "put", "sync"] {
        let (_, text) = seen.iter().find(|(path, _)| path == name).with_context(|| format!("{name} not listed"))?;
        let examples = text.split("Examples:").nth(1).with_context(|| format!("{name} --help: no example: {text}"))?;
        let runs_it = |line: &str| {
            line.trim_start().starts_with("lockstep-cli ") && line.split_whitespace().any(|word| word == name)
        };
        assert!(examples.lines().any(runs_it), "{name} --help: no example runs it: {text}");
    }
    for nested in ["pair show", "pair redeem", "push set", "account delete", "passphrase set"] {
        assert!(seen.iter().any(|(path, _)| path == nested), "{nested} --help was not run: {seen:?}");
    }
    Ok(())
}

/// The next stderr line of `watch` that `wanted` accepts.
async fn next_line(
    lines: &mut Lines<BufReader<tokio::process::ChildStderr>>,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let found = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if wanted(&line) {
                return Ok::<_, anyhow::Error>(Some(line));
            }
        }
        Ok(None)
    })
    .await
    .context("no such progress line within 60 s")??;
    found.context("watch ended")
}

/// "received 3 changes (at offset 7 of 7)" → (7, 7).
fn offset_and_end(line: &str) -> Option<(i64, i64)> {
    let inner = line.split("(at offset ").nth(1)?.strip_suffix(')')?;
    let (offset, end) = inner.split_once(" of ")?;
    Some((offset.parse().ok()?, end.parse().ok()?))
}

/// A live batch reaches `watch` before the heartbeat that tells the new log
/// end; its progress line used to show the old end ("at offset 5 of 0").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_progress_never_shows_the_log_end_below_the_offset() -> anyhow::Result<()> {
    assert_eq!(offset_and_end("received 5 changes (at offset 5 of 0)"), Some((5, 0)));
    let CliStack { kafka: _kafka, server: _server, device: phone } = CliStack::start("phone").await?;
    let laptop = phone.pair("laptop").await?;
    let mut watch = laptop.spawn(&["watch"])?;
    let mut lines = BufReader::new(watch.stderr.take().context("piped stderr")?).lines();
    next_line(&mut lines, |line| line.starts_with("up to date at offset")).await?;

    // Progress is shown at most every 200 ms, so a round's "received" line may be
    // skipped; a round ends when the watch is up to date with what the phone wrote.
    let mut shown = Vec::new();
    for round in 0..20 {
        phone.json(&["put", "-c", "notes", &format!(r#"{{"round":{round}}}"#)]).await?;
        let log_end = phone.sync().await?["cursor"].as_i64().context("the phone's cursor")?;
        loop {
            let line =
                next_line(&mut lines, |line| line.starts_with("received") || line.starts_with("up to date")).await?;
            if line.starts_with("received") {
                shown.push(line);
            } else if line.strip_prefix("up to date at offset ").and_then(|at| at.parse::<i64>().ok()) >= Some(log_end)
            {
                break;
            }
        }
        if shown.len() >= 3 {
            break;
        }
    }
    println!("watch showed: {shown:?}");
    assert!(!shown.is_empty(), "watch never showed a received change");
    for line in &shown {
        let (offset, end) = offset_and_end(line).with_context(|| format!("no log end in {line:?}"))?;
        assert!(end >= offset, "the log end shown is stale: {line:?}");
    }
    watch.start_kill()?;
    Ok(())
}

/// The P-256 generator as an uncompressed point, base64url: a valid public key.
const VAPID_PUBLIC_KEY: &str =
    "BGsX0fLhLEJH-Lzm5WOkQPJ3A32BLeszoPShOUXYmMKWT-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU";

/// A web app needs the VAPID public key to subscribe; `server-info` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_info_shows_the_vapid_public_key() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let events = |name: &str| format!("lockstep.events.test-{name}-{}", uuid::Uuid::new_v4());
    let (with_key, without_key) = (events("vapid"), events("none"));
    let push_server = Server::start_with(
        kafka,
        &[("LOCKSTEP_PUSH__VAPID_PUBLIC_KEY", VAPID_PUBLIC_KEY), ("LOCKSTEP_EVENTS__TOPIC", &with_key)],
    )
    .await?;
    let plain_server = Server::start_with(kafka, &[("LOCKSTEP_EVENTS__TOPIC", &without_key)]).await?;
    let cli = Cli::new("newcomer")?;

    let info = cli.json(&["server-info", "--server", &push_server.endpoint()]).await?;
    assert_eq!(info["web_push"], true, "{info}");
    assert_eq!(info["vapid_public_key"], VAPID_PUBLIC_KEY, "{info}");
    let text = cli.run(&["server-info", "--server", &push_server.endpoint()]).await?;
    assert!(text.contains(&format!("VAPID public key {VAPID_PUBLIC_KEY}")), "{text}");

    let info = cli.json(&["server-info", "--server", &plain_server.endpoint()]).await?;
    assert_eq!(info["web_push"], false, "{info}");
    assert!(info["vapid_public_key"].is_null(), "{info}");
    let text = cli.run(&["server-info", "--server", &plain_server.endpoint()]).await?;
    assert!(text.contains("web push wake-ups: not configured"), "{text}");

    // The reverse of tls.rs's plaintext-to-TLS case: https:// to a plaintext server.
    let error = cli.fail(&["init", "--server", &plain_server.https_endpoint(), "--name", "x"]).await?;
    println!("TLS to the plaintext port: {error}");
    assert!(error.contains("cannot reach the server at https://"), "{error}");
    assert!(error.contains("http://"), "told that the server speaks plaintext: {error}");
    Ok(())
}
