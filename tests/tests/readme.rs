//! The README's two-device walkthrough, run as written against a live server:
//! the block under "Two devices in a minute", with `cli` set to the built
//! `lockstep-cli` (instead of its `cargo build --release` line) and the
//! server's address put in for `scripts/run`'s 127.0.0.1:50051.

use std::path::Path;

use anyhow::Context;
use lockstep_e2e::{cli::cli_binary, kafka::Kafka, server::Server};

/// The first ```sh block after the heading `heading`.
fn shell_block(markdown: &str, heading: &str) -> Option<Vec<String>> {
    let mut lines = markdown.lines().skip_while(|line| line.trim() != heading).skip(1);
    lines.by_ref().find(|line| line.trim() == "```sh")?;
    Some(lines.take_while(|line| line.trim() != "```").map(str::to_string).collect())
}

#[test]
fn the_walkthrough_block_is_found() {
    let markdown = "# x\n```sh\nnot this\n```\n## Two devices\ntext\n```sh\na\nb\n```\n";
    assert_eq!(shell_block(markdown, "## Two devices"), Some(vec!["a".into(), "b".into()]));
    assert_eq!(shell_block(markdown, "## Missing"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_syncs_two_devices() -> anyhow::Result<()> {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path)?;
    let block = shell_block(&readme, "## Two devices in a minute").context("the README has no walkthrough block")?;
    let script = block.join("\n");
    for step in ["init --server http://127.0.0.1:50051", "put ", "sync", "pair show", "pair redeem", "list"] {
        assert!(script.contains(step), "the walkthrough lost its step {step:?}:\n{script}");
    }

    let kafka = Kafka::shared().await?;
    let events_topic = format!("lockstep.events.test-readme-{}", uuid::Uuid::new_v4());
    let server = Server::start_with(kafka, &[("LOCKSTEP_EVENTS__TOPIC", &events_topic)]).await?;
    let runnable: Vec<String> = block
        .iter()
        .filter(|line| !line.trim_start().starts_with("cargo build"))
        .map(|line| line.replace("http://127.0.0.1:50051", &server.endpoint()))
        .collect();
    let dir = tempfile::tempdir()?;
    let cli = cli_binary()?;
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\ncli={}\n{}", cli.display(), runnable.join("\n")))
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the walkthrough failed ({}):\n{stdout}\n{stderr}", output.status);
    // The phone lists the laptop's record.
    let listed = stdout.lines().last().unwrap_or_default();
    assert!(listed.contains("hunter2") && listed.contains("passwords"), "{stdout}\n{stderr}");
    Ok(())
}
