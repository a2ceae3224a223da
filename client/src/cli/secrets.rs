//! Secrets the CLI reads from its user: the store's passphrase and pairing
//! codes. Neither is taken from the command line by default: arguments are
//! visible to every user of the machine (`ps`) and stay in shell history.

use std::{
    io::{BufRead, IsTerminal, Read, Write},
    path::Path,
};

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use crate::{
    pairing::PairingCode,
    store::{KdfParams, Store},
};

/// Where a passphrase comes from, in this order: a file (its first line), an
/// environment variable, the terminal (without echo, only when stdin is one).
pub(super) struct PassphraseSource<'a> {
    pub file: Option<&'a Path>,
    pub env: &'static str,
}

impl PassphraseSource<'_> {
    /// The passphrase from the file or the environment; `None` if neither gives one.
    pub fn given(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        if let Some(path) = self.file {
            let text = Zeroizing::new(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the passphrase file {}", path.display()))?,
            );
            let line = text.lines().next().unwrap_or_default();
            if line.is_empty() {
                bail!("the passphrase file {} is empty: its first line is the passphrase", path.display());
            }
            return Ok(Some(Zeroizing::new(line.to_string())));
        }
        match std::env::var(self.env) {
            Ok(value) if !value.is_empty() => Ok(Some(Zeroizing::new(value))),
            _ => Ok(None),
        }
    }

    /// The passphrase from the file, the environment or the terminal; `None` if none gives one.
    pub fn get(&self, prompt: &str) -> anyhow::Result<Option<Zeroizing<String>>> {
        if let Some(passphrase) = self.given()? {
            return Ok(Some(passphrase));
        }
        if !std::io::stdin().is_terminal() {
            return Ok(None);
        }
        Ok(Some(Zeroizing::new(rpassword::prompt_password(prompt).context("reading the passphrase")?)))
    }

    /// A new passphrase: from the file or the environment, or typed twice.
    pub fn new_passphrase(&self, missing: &str) -> anyhow::Result<Zeroizing<String>> {
        if let Some(passphrase) = self.given()? {
            return Ok(passphrase);
        }
        if !std::io::stdin().is_terminal() {
            bail!("{missing}");
        }
        let first = Zeroizing::new(rpassword::prompt_password("New passphrase: ").context("reading the passphrase")?);
        let again = Zeroizing::new(rpassword::prompt_password("Same again: ").context("reading the passphrase")?);
        if first != again {
            bail!("the two passphrases differ; nothing was changed");
        }
        Ok(first)
    }
}

/// Opens a protected store's secrets: the store stays unlocked for the whole
/// command (one KDF run, also for `watch`).
pub(super) fn unlock(store: &mut Store, source: &PassphraseSource<'_>) -> anyhow::Result<()> {
    if !store.is_protected() {
        return Ok(());
    }
    let Some(passphrase) = source.get("Passphrase of the local store: ")? else {
        return Err(crate::store::StoreError::Locked.into());
    };
    store.unlock(passphrase.as_bytes())?;
    Ok(())
}

/// The KDF parameters for a passphrase set now; test parameters are said aloud.
pub(super) fn kdf_params() -> KdfParams {
    let params = KdfParams::for_new_passphrase();
    if params != KdfParams::DEFAULT {
        eprintln!("warning: LOCKSTEP_KDF_TEST_PARAMS=1: the passphrase gets weak KDF parameters meant for tests only");
    }
    params
}

/// A pairing code: from `--code-file`, from the discouraged argument (with a
/// warning; `-` still means stdin), else from stdin (with a prompt on a terminal).
pub(super) fn pairing_code(argument: Option<&str>, file: Option<&Path>) -> anyhow::Result<PairingCode> {
    let text = match (argument, file) {
        (_, Some(path)) => Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("cannot read the code file {}", path.display()))?,
        ),
        (Some(code), None) if code != "-" => {
            eprintln!(
                "warning: a pairing code on the command line is visible to other users of this machine (ps) and \
                 stays in your shell history; it holds the account key. Next time paste it when asked, or use \
                 --code-file PATH or `< code.txt`"
            );
            Zeroizing::new(code.to_string())
        }
        _ => read_code_from_stdin()?,
    };
    Ok(PairingCode::decode(&text)?)
}

fn read_code_from_stdin() -> anyhow::Result<Zeroizing<String>> {
    let stdin = std::io::stdin();
    let mut text = Zeroizing::new(String::new());
    if stdin.is_terminal() {
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "Paste the pairing code: ");
        let _ = stderr.flush();
        stdin.lock().read_line(&mut text).context("reading the pairing code")?;
    } else {
        stdin.lock().read_to_string(&mut text).context("reading the pairing code from stdin")?;
    }
    if text.trim().is_empty() {
        bail!(
            "no pairing code: pipe it in (`lockstep-cli pair redeem --name NAME < code.txt`), give --code-file PATH, \
             or run in a terminal and paste it when asked"
        );
    }
    Ok(text)
}
