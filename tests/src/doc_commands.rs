//! Whether a command the docs show names what really exists: the program, its subcommands
//! and its flags, as the workspace's binaries' own `--help` lists them. The test that keeps
//! the docs working (`tests/tests/docs.rs`) checks every command of the README and `docs/`
//! with it, those it also runs and those it cannot run alike.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

use crate::server::workspace_binary;

/// The workspace's binaries by the names the docs call them, with the crate each is built from.
const BINARIES: &[(&str, &str)] = &[
    ("lockstep-cli", "client"),
    ("lockstep", "broker"),
    ("lockstep-push", "consumers/push"),
    ("lockstep-dashboard", "consumers/dashboard"),
    ("lockstep-bench", "bench"),
];

/// The binary a command's first word runs: a workspace binary by name or path, `$cli` (the
/// docs' name for the built `lockstep-cli`), or a script that hands its flags to one
/// (`scripts/run` to the server, `scripts/bench` to `lockstep-bench`).
pub fn binary_of(word: &str) -> Option<&'static str> {
    let name = word.rsplit('/').next().unwrap_or(word);
    match word {
        "$cli" | "\"$cli\"" => return Some("lockstep-cli"),
        "scripts/run" => return Some("lockstep"),
        "scripts/bench" => return Some("lockstep-bench"),
        _ => {}
    }
    let is_path_to_binary = !word.contains('/') || word.starts_with("target/");
    BINARIES.iter().map(|(binary, _)| *binary).find(|binary| *binary == name && is_path_to_binary)
}

/// The `--help` of the workspace's binaries and their subcommands, each run once.
pub struct Programs {
    binaries: HashMap<&'static str, PathBuf>,
    helps: HashMap<(String, Vec<String>), String>,
}

impl Programs {
    /// Fails when a binary is missing or older than its sources (`cargo build --bins`).
    pub fn new() -> anyhow::Result<Self> {
        let mut binaries = HashMap::new();
        for (name, crate_dir) in BINARIES {
            binaries.insert(*name, workspace_binary(name, crate_dir)?);
        }
        Ok(Self { binaries, helps: HashMap::new() })
    }

    pub fn binary(&self, name: &str) -> &Path {
        &self.binaries[name]
    }

    /// `binary <path…> --help`.
    pub fn help(&mut self, binary: &str, path: &[String]) -> anyhow::Result<String> {
        let key = (binary.to_string(), path.to_vec());
        if let Some(help) = self.helps.get(&key) {
            return Ok(help.clone());
        }
        let output = Command::new(self.binary(binary))
            .args(path)
            .arg("--help")
            .env_remove("LOCKSTEP_STORE")
            .output()
            .with_context(|| format!("running {binary} {} --help", path.join(" ")))?;
        anyhow::ensure!(
            output.status.success(),
            "{binary} {} --help failed: {}",
            path.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        let help = String::from_utf8(output.stdout)?;
        self.helps.insert(key, help.clone());
        Ok(help)
    }

    /// Every flag any binary or subcommand of the workspace takes.
    pub fn every_flag(&mut self) -> anyhow::Result<BTreeSet<String>> {
        let mut flags = BTreeSet::new();
        for (binary, _) in BINARIES {
            let mut pending = vec![Vec::<String>::new()];
            while let Some(path) = pending.pop() {
                let help = self.help(binary, &path)?;
                flags.extend(flags_in(&help));
                for subcommand in subcommands(&help).into_iter().filter(|name| name != "help") {
                    let mut deeper = path.clone();
                    deeper.push(subcommand);
                    pending.push(deeper);
                }
            }
        }
        Ok(flags)
    }

    /// What is wrong with `words` (a command whose first word [`binary_of`] knows): a
    /// subcommand or flag its help does not list, a word where a subcommand belongs that is
    /// none, or, with `needs_subcommand`, no subcommand where the binary requires one.
    /// `PLACEHOLDER` stands for a `<placeholder>` of the docs and may be anything.
    pub fn check(&mut self, words: &[String], needs_subcommand: bool) -> anyhow::Result<Vec<String>> {
        let Some(binary) = words.first().and_then(|word| binary_of(word)) else {
            return Ok(Vec::new());
        };
        let mut problems = Vec::new();
        let mut path: Vec<String> = Vec::new();
        let mut help = self.help(binary, &path)?;
        let mut asked_for_help = false;
        let mut value_expected = false;
        for word in &words[1..] {
            let command =
                || std::iter::once(binary).chain(path.iter().map(String::as_str)).collect::<Vec<_>>().join(" ");
            if word.starts_with('-') && word.len() > 1 && word != "--" {
                let (flag, value) =
                    word.split_once('=').map_or((word.as_str(), None), |(flag, value)| (flag, Some(value)));
                asked_for_help |= matches!(flag, "-h" | "--help" | "-V" | "--version");
                value_expected = value.is_none() && takes_value(&help, flag);
                if !lists_flag(&help, flag) && !self.accepts_hidden(binary, &path, flag)? {
                    problems.push(format!("`{}` has no flag {flag}", command()));
                }
            } else if std::mem::take(&mut value_expected) {
                continue;
            } else if subcommands(&help).iter().any(|subcommand| subcommand == word) {
                path.push(word.clone());
                help = self.help(binary, &path)?;
            } else if !subcommands(&help).is_empty() && !word.contains("PLACEHOLDER") && word != "…" {
                let listed = subcommands(&help).join(", ");
                problems.push(format!("`{}` has no subcommand {word} (it has: {listed})", command()));
                break;
            }
        }
        let requires_subcommand = help.lines().any(|line| line.starts_with("Usage:") && line.contains("<COMMAND>"));
        if needs_subcommand && requires_subcommand && !asked_for_help && problems.is_empty() {
            let listed = subcommands(&help).join(", ");
            problems.push(format!("`{}` names no subcommand of {binary} (it has: {listed})", words.join(" ")));
        }
        Ok(problems)
    }

    /// Whether `binary <path…>` takes `flag` though its help hides it (clap names an unknown
    /// flag "unexpected argument"; a known one fails otherwise, for its missing value, or prints help).
    pub fn accepts_hidden(&self, binary: &str, path: &[String], flag: &str) -> anyhow::Result<bool> {
        let output = Command::new(self.binary(binary))
            .args(path)
            .args([flag, "--help"])
            .env_remove("LOCKSTEP_STORE")
            .output()
            .with_context(|| format!("running {binary} {} {flag} --help", path.join(" ")))?;
        Ok(!String::from_utf8_lossy(&output.stderr).contains("unexpected argument"))
    }
}

/// The subcommands a clap help lists under "Commands:".
pub fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect()
}

fn flags_in(help: &str) -> Vec<String> {
    help.lines().flat_map(option_words).filter(|word| word.starts_with('-')).map(str::to_string).collect()
}

/// The flags and value names an options line of a clap help starts with.
fn option_words(line: &str) -> Vec<&str> {
    let line = line.trim_start();
    if !line.starts_with('-') {
        return Vec::new();
    }
    line.split(|c: char| c.is_whitespace() || c == ',')
        .take_while(|word| word.starts_with('-') || word.starts_with('<') || word.is_empty())
        .filter(|word| !word.is_empty())
        .collect()
}

/// Whether an options section of `help` lists `flag` (`--store <STORE>`, `-c, --collection`).
pub fn lists_flag(help: &str, flag: &str) -> bool {
    help.lines().any(|line| option_words(line).contains(&flag))
}

/// Whether `flag`'s line in `help` names a value (`--store <STORE>`).
fn takes_value(help: &str, flag: &str) -> bool {
    help.lines()
        .map(option_words)
        .find(|words| words.contains(&flag))
        .is_some_and(|words| words.iter().any(|word| word.starts_with('<')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP: &str = "Usage: lockstep-cli [OPTIONS] <COMMAND>\n\nCommands:\n  init  Create\n  pair  Add a \
                        device\n\nOptions:\n  -c, --collection <C>  A --fake mention\n      --json\n  -h, --help  \
                        Print help\n";

    #[test]
    fn subcommands_and_flags_are_read_from_a_help() {
        assert_eq!(subcommands(HELP), vec!["init".to_string(), "pair".to_string()]);
        assert!(lists_flag(HELP, "--collection") && lists_flag(HELP, "-c") && lists_flag(HELP, "--json"));
        assert!(!lists_flag(HELP, "--fake"), "a flag named in a description is not listed");
        assert!(!lists_flag(HELP, "--js"));
        assert!(takes_value(HELP, "-c") && !takes_value(HELP, "--json"));
    }

    #[test]
    fn a_command_is_known_by_its_first_word() {
        assert_eq!(binary_of("$cli"), Some("lockstep-cli"));
        assert_eq!(binary_of("target/release/lockstep-dashboard"), Some("lockstep-dashboard"));
        assert_eq!(binary_of("scripts/run"), Some("lockstep"));
        assert_eq!(binary_of("lockstep"), Some("lockstep"));
        assert_eq!(binary_of("scripts/kafka-tool"), None);
        assert_eq!(binary_of("cargo"), None);
    }
}
