//! `passphrase set|remove`: the store's secrets under a passphrase, or in the clear.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::{
    Args, open_store,
    secrets::{PassphraseSource, kdf_params},
};

#[derive(Debug, Subcommand)]
pub(super) enum PassphraseCommand {
    /// Seal the store's secrets under a passphrase (Argon2id, 64 MiB), or change it. The first
    /// passphrase comes like any (--passphrase-file, LOCKSTEP_PASSPHRASE, the terminal); to change
    /// one, the current one comes so and the new one from --new-passphrase-file,
    /// LOCKSTEP_NEW_PASSPHRASE or the terminal.
    Set {
        /// The new passphrase, as the first line of this file.
        #[arg(long, env = "LOCKSTEP_NEW_PASSPHRASE_FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Keep the store's secrets in the clear again (the store file's permissions protect them).
    Remove,
}

/// `passphrase set` and `passphrase remove`.
pub(super) fn run(args: &Args, command: &PassphraseCommand) -> anyhow::Result<()> {
    let mut store = open_store(args)?;
    match command {
        PassphraseCommand::Set { new_passphrase_file } => {
            let new = if store.is_protected() {
                PassphraseSource { file: new_passphrase_file.as_deref(), env: "LOCKSTEP_NEW_PASSPHRASE" }
                    .new_passphrase(
                        "this store has a passphrase: give the new one with --new-passphrase-file PATH or \
                     LOCKSTEP_NEW_PASSPHRASE, or run in a terminal to be asked",
                    )?
            } else {
                PassphraseSource {
                    file: new_passphrase_file.as_deref().or(args.passphrase_file.as_deref()),
                    env: "LOCKSTEP_PASSPHRASE",
                }
                .new_passphrase(
                    "give the passphrase with --passphrase-file PATH (its first line), LOCKSTEP_PASSPHRASE, or run \
                     in a terminal to be asked",
                )?
            };
            let params = kdf_params();
            let scrubbed = store.protect(new.as_bytes(), params)?;
            if args.json {
                println!("{}", json!({"protected": true, "kdf": params, "plaintext_removed": scrubbed}));
            } else {
                println!("the store's secrets are sealed under the passphrase ({params}); every command now needs it");
            }
            if !scrubbed {
                eprintln!(
                    "warning: another process has {} open: the old plaintext may stay in its -wal file until \
                     it closes; run `lockstep-cli passphrase set` again once it has",
                    args.store.display()
                );
            }
        }
        PassphraseCommand::Remove => {
            let was = store.is_protected();
            store.remove_protection()?;
            if args.json {
                println!("{}", json!({"protected": false}));
            } else if was {
                println!(
                    "the store's secrets are in the clear again (readable by whoever can read {})",
                    args.store.display()
                );
            } else {
                println!("this store has no passphrase");
            }
        }
    }
    Ok(())
}
