//! Every command the docs show works: the README, `docs/*.md`, `client/README.md` and
//! `clients/web/README.md`.
//!
//! - Every shell block (```sh, ```bash, ```shell, ```console, …) is either run here against a
//!   live server ([`RUNS`] says what its output must show) or carries a marker on the line
//!   above it, `<!-- checked-by: WHAT (why it cannot run here); … -->`, where each WHAT is an
//!   executable script (`scripts/bench`) or a test function (`tests/tests/tls.rs::name`) that
//!   exists. A block with neither fails, naming its file and line and what to do.
//! - Every fence has a language (`text` for a picture), and no page has an indented code
//!   block: a command in either would escape this test.
//! - Every command in a block or an inline code span that runs a workspace binary
//!   (`lockstep-cli …`, `$cli …`, `lockstep invite …`, `scripts/run …`, a bare `pair redeem
//!   --name`) names subcommands and flags that binary's `--help` lists; a bare `--flag` is one
//!   some binary takes; `scripts/…` exists and is executable; `cargo test -p P --test T` names a
//!   real test target.
//!
//! Blocks run as written, with three substitutions: no `cargo build` (the test kit's debug
//! binaries are on PATH under their names, so `target/release/` is dropped), and the server's
//! address for `http://127.0.0.1:50051` (scripts/run's) and `https://sync.example.org`. `lockstep`
//! runs on the live server's data directory. Each block gets its own directory, HOME and server.

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt, path::Path, process::Stdio, time::Duration};

use anyhow::Context;
use lockstep_e2e::{
    doc_commands::{Programs, binary_of},
    kafka::Kafka,
    markdown::{self, Page},
    server::Server,
};

/// A shell block this test runs: the first line it starts with, the server settings it
/// needs, and what its stdout must hold (`last_line_has`: its last line).
struct Run {
    page: &'static str,
    first_line: &'static str,
    server_env: &'static [(&'static str, &'static str)],
    stdout_has: &'static [&'static str],
    last_line_has: &'static [&'static str],
}

const RUNS: &[Run] = &[
    // The newcomer's two devices: the phone lists the laptop's record.
    Run {
        page: "README.md",
        first_line: "cargo build --release -p lockstep-client && cli=target/release/lockstep-cli",
        server_env: &[],
        stdout_has: &["LOCKSTEP1:"],
        last_line_has: &["passwords", "hunter2"],
    },
    Run {
        page: "docs/devices.md",
        first_line: "cargo build --release -p lockstep-client && cli=target/release/lockstep-cli",
        server_env: &[],
        stdout_has: &["LOCKSTEP1:"],
        last_line_has: &["passwords", "hunter2"],
    },
    // Both edit one password while apart; the later edit wins on both, the fields merge.
    Run {
        page: "client/README.md",
        first_line: "cargo build --release -p lockstep-client",
        server_env: &[],
        stdout_has: &[r#"{"note":"new field","password":"from-laptop","site":"mail"}"#],
        last_line_has: &[],
    },
    // An invite-only server: codes made, listed, one revoked, another one makes an account.
    Run {
        page: "docs/operating.md",
        first_line: "lockstep invite create --count 3",
        server_env: &[("LOCKSTEP_ACCOUNTS__INVITE_ONLY", "true")],
        // `invite list` after the init: one code used (its state column), one revoked, one unused.
        stdout_has: &["lsi_", "  used  ", "  revoked  ", "  unused  ", "the Smiths"],
        last_line_has: &[],
    },
];

fn workspace_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The pages this test holds to their commands, by their path from the workspace root.
fn pages() -> anyhow::Result<BTreeMap<String, String>> {
    let root = workspace_root();
    let mut names = vec!["README.md".to_string(), "client/README.md".to_string(), "clients/web/README.md".to_string()];
    for entry in std::fs::read_dir(root.join("docs"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            names.push(format!("docs/{name}"));
        }
    }
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(root.join(&name)).with_context(|| format!("reading {name}"))?;
            Ok((name, text))
        })
        .collect()
}

fn run_of<'a>(runs: &'a [Run], page: &str, fence: &markdown::Fence) -> Option<&'a Run> {
    let first = fence.body.iter().map(|line| line.trim()).find(|line| !line.is_empty())?;
    runs.iter().find(|run| run.page == page && first.starts_with(run.first_line))
}

/// How much of the docs the check saw.
#[derive(Debug, Default)]
struct Tally {
    blocks_run: usize,
    blocks_marked: usize,
    /// Commands of a workspace binary or script, or `cargo test`, checked in blocks and spans.
    block_commands: usize,
    span_commands: usize,
}

fn is_checked_command(words: &[String]) -> bool {
    words.first().is_some_and(|first| {
        binary_of(first).is_some()
            || first.starts_with("scripts/")
            || (first == "cargo" && words.get(1).is_some_and(|w| w == "test"))
    })
}

/// What is wrong with the commands of `pages`; empty when every one is run or checked.
fn problems(
    pages: &BTreeMap<String, String>,
    runs: &[Run],
    programs: &mut Programs,
    tally: &mut Tally,
) -> anyhow::Result<Vec<String>> {
    let every_flag = programs.every_flag()?;
    let mut problems = Vec::new();
    let mut runs_found = vec![0; runs.len()];
    for (name, text) in pages {
        let Page { fences, indented_blocks, code_spans } = markdown::parse(text);
        for line in indented_blocks {
            problems.push(format!(
                "{name}:{line}: an indented code block; make it a fenced block with a language (```sh for commands, \
                 ```text otherwise) so that this test sees it"
            ));
        }
        for fence in &fences {
            let at = format!("{name}:{}", fence.line);
            if fence.language.is_empty() {
                problems.push(format!("{at}: a fence without a language: ```sh for commands, ```text for a picture"));
                continue;
            }
            if !fence.is_shell() {
                continue;
            }
            let run = run_of(runs, name, fence);
            if let Some(run) = run {
                runs_found[runs.iter().position(|known| std::ptr::eq(known, run)).expect("from runs")] += 1;
            }
            match (&fence.checked_by, run) {
                (Some(_), Some(_)) => problems.push(format!("{at}: this block is run here and marked too; drop one")),
                (Some(marker), None) => {
                    tally.blocks_marked += 1;
                    problems.extend(check_marker(marker).into_iter().map(|p| format!("{at}: {p}")));
                }
                (None, Some(_)) => tally.blocks_run += 1,
                (None, None) => problems.push(format!(
                    "{at}: a shell block that nothing runs. Add it to RUNS in tests/tests/docs.rs (with what its output \
                     must show), or, if it cannot run in a test, put `<!-- checked-by: WHAT (why) -->` on the line \
                     above it, WHAT being the script or the test function (`tests/tests/FILE.rs::name`) that runs it"
                )),
            }
            for (offset, line) in fence.body.iter().enumerate() {
                let at = format!("{name}:{}", fence.line + 1 + offset);
                for words in markdown::commands(line) {
                    tally.block_commands += usize::from(is_checked_command(&words));
                    problems.extend(check_command(&words, true, programs)?.into_iter().map(|p| format!("{at}: {p}")));
                }
                problems.extend(check_assignments(line, programs)?.into_iter().map(|p| format!("{at}: {p}")));
            }
        }
        for (line, span) in code_spans {
            let at = format!("{name}:{line}: `{span}`");
            problems.extend(check_span(&span, programs, &every_flag, tally)?.into_iter().map(|p| format!("{at}: {p}")));
        }
    }
    for (run, found) in runs.iter().zip(runs_found) {
        if found != 1 {
            problems.push(format!(
                "RUNS in tests/tests/docs.rs: {} has {found} shell blocks starting with {:?} (one expected)",
                run.page, run.first_line
            ));
        }
    }
    Ok(problems)
}

/// `scripts/bench (why); tests/tests/tls.rs::name (why)`: each named thing exists.
fn check_marker(marker: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut depth = 0_i32;
    let items = marker.split(|c| {
        depth += match c {
            '(' => 1,
            ')' => -1,
            _ => 0,
        };
        c == ';' && depth == 0
    });
    for item in items.map(str::trim) {
        let (what, why) = item.split_once(' ').unwrap_or((item, ""));
        if why.trim().is_empty() {
            problems.push(format!("checked-by {what:?} says not why the block cannot run in a test"));
        }
        if let Some((file, function)) = what.split_once("::") {
            let source = std::fs::read_to_string(workspace_root().join(file)).unwrap_or_default();
            if !source.contains(&format!("fn {function}(")) {
                problems.push(format!("checked-by names {what}, but {file} has no fn {function}"));
            }
        } else if !is_executable(&workspace_root().join(what)) {
            problems.push(format!("checked-by names {what}, which is no executable file of the repository"));
        }
    }
    problems
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

/// One command of a block or span: its binary's subcommands and flags, its script, its cargo test.
fn check_command(words: &[String], needs_subcommand: bool, programs: &mut Programs) -> anyhow::Result<Vec<String>> {
    let Some(first) = words.first() else { return Ok(Vec::new()) };
    let mut problems = Vec::new();
    // A script run (a block's line, a span with arguments) is executable; one only named exists.
    let named_only = !needs_subcommand && words.len() == 1;
    if first.starts_with("scripts/") && !first.contains(['*', '…']) {
        let path = workspace_root().join(first);
        if named_only && !path.exists() {
            problems.push(format!("{first} does not exist"));
        } else if !named_only && !is_executable(&path) {
            problems.push(format!("{first} is no executable script"));
        }
    }
    if first == "cargo" && words.get(1).is_some_and(|word| word == "test") {
        problems.extend(check_cargo_test(words));
    }
    if binary_of(first).is_some() {
        problems.extend(programs.check(words, needs_subcommand)?);
    }
    Ok(problems)
}

/// `NAME=value scripts/run …`, `NAME=value lockstep …`: the binary's help names the variable
/// (`[env: NAME=]`), or the script or `scripts/lib.sh` reads it.
fn check_assignments(line: &str, programs: &mut Programs) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    for (variable, program) in markdown::assignments(line) {
        let Some(binary) = binary_of(&program) else { continue };
        let mut readers = programs.help(binary, &[])?;
        if program.starts_with("scripts/") {
            for script in [program.as_str(), "scripts/lib.sh"] {
                readers.push_str(&std::fs::read_to_string(workspace_root().join(script)).unwrap_or_default());
            }
        }
        if !readers.contains(&variable) {
            problems.push(format!("{program} reads no {variable}"));
        }
    }
    Ok(problems)
}

/// `cargo test -p PACKAGE --test TARGET`: the package is a workspace member with that test file.
fn check_cargo_test(words: &[String]) -> Vec<String> {
    let value_of = |flag: &str| words.iter().position(|word| word == flag).and_then(|at| words.get(at + 1));
    let Some(package) = value_of("-p") else { return Vec::new() };
    let root = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap_or_default();
    let members = root.lines().find_map(|line| line.strip_prefix("members = ")).unwrap_or_default();
    let directory = members.split('"').skip(1).step_by(2).find(|member| {
        let manifest = std::fs::read_to_string(workspace_root().join(member).join("Cargo.toml")).unwrap_or_default();
        manifest.lines().any(|line| line.trim() == format!("name = \"{package}\""))
    });
    match (directory, value_of("--test")) {
        (None, _) => vec![format!("no workspace package is named {package}")],
        (Some(directory), Some(target))
            if !workspace_root().join(directory).join(format!("tests/{target}.rs")).exists() =>
        {
            vec![format!("{package} has no test {target} ({directory}/tests/{target}.rs)")]
        }
        _ => Vec::new(),
    }
}

/// An inline code span that is a command: of a binary (`lockstep-cli leave --yes [--wipe]`),
/// `lockstep-cli`'s subcommands without its name (`pair redeem --name NAME`), bare flags.
fn check_span(
    span: &str,
    programs: &mut Programs,
    every_flag: &std::collections::BTreeSet<String>,
    tally: &mut Tally,
) -> anyhow::Result<Vec<String>> {
    // Placeholders and optional parts read as plain words: `<user id>`, `[--wipe]`, `…`.
    let mut plain = String::new();
    let mut in_placeholder = false;
    for c in span.chars() {
        match c {
            '<' if !in_placeholder => in_placeholder = true,
            '>' if in_placeholder => {
                in_placeholder = false;
                plain.push_str("PLACEHOLDER");
            }
            '[' | ']' => plain.push(' '),
            _ if in_placeholder => {}
            c => plain.push(c),
        }
    }
    let mut problems = check_assignments(&plain, programs)?;
    for mut words in markdown::commands(&plain) {
        let Some(first) = words.first().cloned() else { continue };
        if first.starts_with("--") {
            for flag in words.iter().filter(|word| word.starts_with("--")) {
                let flag = flag.split_once('=').map_or(flag.as_str(), |(flag, _)| flag);
                if !every_flag.contains(flag) && !accepted_hidden(programs, flag)? {
                    problems.push(format!("no binary of the workspace takes {flag}"));
                }
            }
            continue;
        }
        let cli_subcommands = lockstep_e2e::doc_commands::subcommands(&programs.help("lockstep-cli", &[])?);
        if words.len() > 1 && binary_of(&first).is_none() && cli_subcommands.contains(&first) {
            words.insert(0, "lockstep-cli".to_string());
        }
        tally.span_commands += usize::from(is_checked_command(&words));
        problems.extend(check_command(&words, false, programs)?);
    }
    Ok(problems)
}

/// Whether some binary takes `flag` at its top level though its help hides it.
fn accepted_hidden(programs: &Programs, flag: &str) -> anyhow::Result<bool> {
    for binary in ["lockstep-cli", "lockstep", "lockstep-push", "lockstep-dashboard"] {
        if programs.accepts_hidden(binary, &[], flag)? {
            return Ok(true);
        }
    }
    Ok(false)
}

#[test]
fn every_command_in_the_docs_is_run_or_checked() -> anyhow::Result<()> {
    let mut programs = Programs::new()?;
    let mut tally = Tally::default();
    let problems = problems(&pages()?, RUNS, &mut programs, &mut tally)?;
    eprintln!("{tally:?}");
    assert!(problems.is_empty(), "{} problems in the docs' commands:\n{}", problems.len(), problems.join("\n"));
    // A parser that stopped seeing the docs would pass them all.
    assert!(tally.blocks_run == RUNS.len() && tally.blocks_marked >= 3, "{tally:?}");
    assert!(tally.block_commands >= 20 && tally.span_commands >= 30, "{tally:?}");
    Ok(())
}

/// The check fails where it should: an unmarked block, a marker naming nothing, a bad flag.
#[test]
fn a_block_nothing_runs_and_a_flag_nothing_takes_are_found() -> anyhow::Result<()> {
    let mut programs = Programs::new()?;
    let page = "# Page\n\n```sh\necho hi\n```\n\n<!-- checked-by: scripts/nothing (gone) -->\n```bash\nlockstep-cli \
                sync --no-such-flag\nLOCKSTEP_NOPE=1 lockstep-cli sync\n```\n\n```\npicture\n```\n\nRun `lockstep-cli frobnicate` or `pair redeem \
                --nam x`, `--wipe`, `--nowhere`.\n\n    indented\n";
    let pages = BTreeMap::from([("docs/x.md".to_string(), page.to_string())]);
    let problems = problems(&pages, &[], &mut programs, &mut Tally::default())?.join("\n");
    for expected in [
        "docs/x.md:3: a shell block that nothing runs. Add it to RUNS",
        "docs/x.md:8: checked-by names scripts/nothing, which is no executable file",
        "docs/x.md:9: `lockstep-cli sync` has no flag --no-such-flag",
        "docs/x.md:10: lockstep-cli reads no LOCKSTEP_NOPE",
        "docs/x.md:13: a fence without a language",
        "docs/x.md:17: `lockstep-cli frobnicate`: `lockstep-cli` has no subcommand frobnicate",
        "`lockstep-cli pair redeem` has no flag --nam",
        "no binary of the workspace takes --nowhere",
        "docs/x.md:19: an indented code block",
    ] {
        assert!(problems.contains(expected), "missing {expected:?} in:\n{problems}");
    }
    assert!(!problems.contains("--wipe"), "{problems}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shell_block_of_the_docs_runs_against_a_live_server() -> anyhow::Result<()> {
    let pages = pages()?;
    let programs = Programs::new()?;
    let kafka = Kafka::shared().await?;
    let mut ran = 0;
    for (name, text) in &pages {
        for fence in markdown::parse(text).fences.iter().filter(|fence| fence.is_shell()) {
            let Some(run) = run_of(RUNS, name, fence) else { continue };
            let events_topic = format!("lockstep.events.test-docs-{}", uuid::Uuid::new_v4());
            let mut env = vec![("LOCKSTEP_EVENTS__TOPIC", events_topic.as_str())];
            env.extend_from_slice(run.server_env);
            let server = Server::start_with(kafka, &env).await?;
            run_block(&format!("{name}:{}", fence.line), &fence.body, run, &server, &programs).await?;
            ran += 1;
        }
    }
    assert_eq!(ran, RUNS.len(), "every entry of RUNS names one block");
    Ok(())
}

async fn run_block(at: &str, body: &[String], run: &Run, server: &Server, programs: &Programs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin)?;
    std::os::unix::fs::symlink(programs.binary("lockstep-cli"), bin.join("lockstep-cli"))?;
    // `lockstep invite` works on the server's database, as it would on the server's machine with
    // the server's settings: its data directory, and its PostgreSQL when it has one.
    let database = server.database_url().map(|url| format!("LOCKSTEP_DATABASE__URL='{url}' ")).unwrap_or_default();
    let wrapper = format!(
        "#!/bin/sh\n{database}LOCKSTEP_DATA_DIR='{}' exec '{}' \"$@\"\n",
        server.data_dir().display(),
        programs.binary("lockstep").display()
    );
    std::fs::write(bin.join("lockstep"), wrapper)?;
    std::fs::set_permissions(bin.join("lockstep"), std::fs::Permissions::from_mode(0o755))?;
    let home = dir.path().join("home");
    std::fs::create_dir(&home)?;

    let script: Vec<String> = body
        .iter()
        .filter_map(|line| {
            let line = match line.trim_start().strip_prefix("cargo build") {
                Some(rest) => rest.split_once("&& ")?.1,
                None => line.as_str(),
            };
            Some(
                line.replace("target/release/", "")
                    .replace("http://127.0.0.1:50051", &server.endpoint())
                    .replace("https://sync.example.org", &server.endpoint()),
            )
        })
        .collect();
    let script = format!("set -euo pipefail\n{}", script.join("\n"));
    let mut command = tokio::process::Command::new("bash");
    for (variable, _) in std::env::vars_os() {
        if variable.to_string_lossy().starts_with("LOCKSTEP_") {
            command.env_remove(variable);
        }
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    command
        .arg("-c")
        .arg(&script)
        .current_dir(&home)
        .env("HOME", &home)
        .env("PATH", path)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .with_context(|| format!("{at}: the block did not finish within 120 s:\n{script}"))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = format!("{at}, run as:\n{script}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}");
    assert!(output.status.success(), "the block failed ({}): {report}", output.status);
    for expected in run.stdout_has {
        assert!(stdout.contains(expected), "its output lacks {expected:?}: {report}");
    }
    let last_line = stdout.lines().last().unwrap_or_default();
    for expected in run.last_line_has {
        assert!(last_line.contains(expected), "its last line lacks {expected:?}: {report}");
    }
    eprintln!("{at}: ran, exit 0, output as expected");
    Ok(())
}
