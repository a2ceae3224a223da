//! The client's secrets at rest, end to end: real `lockstep-cli` processes, the
//! real server, a real Nisshi. A store that already synced gets a passphrase:
//! its file and WAL keep no account key, token or device key; every command
//! works with the passphrase and fails clearly without it or with a wrong one;
//! a device paired from it reads the code from stdin and is protected from the
//! start; removing the passphrase restores plain operation.

use std::path::Path;

use anyhow::Context;
use lockstep_e2e::{cli::Cli, stack::CliStack};
use serde_json::json;

/// Cheap Argon2id parameters: the stored parameters say which, so only these
/// test stores are weak (users get 64 MiB, 3 passes).
const TEST_KDF: (&str, &str) = ("LOCKSTEP_KDF_TEST_PARAMS", "1");

/// The meta values a store without a passphrase holds in the clear.
fn plaintext_secrets(store: &Path) -> anyhow::Result<Vec<String>> {
    let conn = rusqlite::Connection::open(store)?;
    ["account_key", "device_token", "device_secret"]
        .iter()
        .map(|key| {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| row.get::<_, String>(0))
                .with_context(|| format!("meta {key}"))
        })
        .collect()
}

/// `args` after `--passphrase-file FILE`.
fn with<'a>(file: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    [&["--passphrase-file", file.to_str().expect("a utf-8 temporary path")][..], args].concat()
}

/// Which of `needles` the store's files (database, WAL) hold, byte for byte.
fn found_in_files(store: &Path, needles: &[String]) -> Vec<String> {
    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(content) = std::fs::read(format!("{}{suffix}", store.display())) {
            bytes.extend(content);
        }
    }
    needles
        .iter()
        .filter(|needle| bytes.windows(needle.len()).any(|window| window == needle.as_bytes()))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_protects_a_synced_store_and_pairing_reads_codes_from_stdin() -> anyhow::Result<()> {
    let CliStack { kafka: _kafka, server, device: phone } = CliStack::start("phone").await?;
    let phone = phone.with_env(TEST_KDF.0, TEST_KDF.1);
    phone.json(&["put", "--id", "before", r#"{"text":"before the passphrase"}"#]).await?;
    phone.sync().await?;
    // Paired through stdin, as a person pastes the code.
    let laptop = phone.pair("laptop").await?;
    laptop.sync().await?;
    assert_eq!(laptop.get("before").await?["fields"]["text"], "before the passphrase");

    let secrets = plaintext_secrets(&phone.store)?;
    assert_eq!(found_in_files(&phone.store, &secrets), secrets, "the check sees plaintext where it is");
    let passphrase = phone.write_file("passphrase.txt", "correct horse battery staple\nignored\n")?;
    let set = phone.json(&with(&passphrase, &["passphrase", "set"])).await?;
    assert_eq!((&set["protected"], &set["plaintext_removed"]), (&json!(true), &json!(true)), "{set}");
    assert_eq!(found_in_files(&phone.store, &secrets), Vec::<String>::new(), "plaintext left in the store files");

    // Without the passphrase, or with a wrong one: a clear error, nothing changed.
    for command in [&["sync"][..], &["list"], &["status"], &["pair", "show"]] {
        let error = phone.fail(command).await?;
        assert!(error.contains("protected by a passphrase") && error.contains("--passphrase-file"), "{error}");
    }
    let wrong = phone.write_file("wrong.txt", "correct horse battery stapler")?;
    let error = phone.fail(&with(&wrong, &["sync"])).await?;
    assert!(error.contains("wrong passphrase"), "{error}");

    // With it, from the file or the environment, every command works.
    phone.json(&with(&passphrase, &["put", "--id", "after", r#"{"text":"after the passphrase"}"#])).await?;
    let report = phone.json(&with(&passphrase, &["sync"])).await?;
    assert_eq!(report["pushed"], 1, "{report}");
    let status = phone.json(&with(&passphrase, &["status"])).await?;
    assert_eq!((&status["protected"], &status["outbox"]), (&json!(true), &json!(0)), "{status}");
    let output =
        phone.command(&["list"], true).env("LOCKSTEP_PASSPHRASE", "correct horse battery staple").output().await?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    laptop.sync().await?;
    assert_eq!(laptop.get("after").await?["fields"]["text"], "after the passphrase");
    assert_eq!(found_in_files(&phone.store, &secrets), Vec::<String>::new(), "still no plaintext after syncing");

    // A device paired from the protected one: the code from stdin, a passphrase
    // from the start (its account key never written in the clear).
    let tablet = Cli::new("tablet")?.with_env(TEST_KDF.0, TEST_KDF.1);
    let tablet_passphrase = tablet.write_file("passphrase.txt", "tablet passphrase")?;
    let shown = phone.json(&with(&passphrase, &["pair", "show"])).await?;
    let code = shown["code"].as_str().context("pair show --json has a code")?;
    tablet.json_with_input(&with(&tablet_passphrase, &["pair", "redeem", "--name", "tablet"]), code).await?;
    assert_eq!(tablet.json(&with(&tablet_passphrase, &["status"])).await?["protected"], true);
    tablet.json(&with(&tablet_passphrase, &["sync"])).await?;
    assert_eq!(tablet.json(&with(&tablet_passphrase, &["list"])).await?.as_array().map(Vec::len), Some(2));
    assert_eq!(found_in_files(&tablet.store, &secrets[..1]), Vec::<String>::new(), "the account key stays sealed");
    assert!(tablet.fail(&["sync"]).await?.contains("protected by a passphrase"));

    // `init` given a passphrase: a new account whose key is never written in the clear.
    let desk = Cli::new("desk")?.with_env(TEST_KDF.0, TEST_KDF.1);
    let desk_passphrase = desk.write_file("passphrase.txt", "desk passphrase")?;
    desk.json(&with(&desk_passphrase, &["init", "--server", &server.endpoint(), "--name", "desk"])).await?;
    assert_eq!(desk.json(&with(&desk_passphrase, &["status"])).await?["protected"], true);
    assert!(desk.fail(&["status"]).await?.contains("protected by a passphrase"));
    let desk_secrets_in_the_clear = {
        let conn = rusqlite::Connection::open(&desk.store)?;
        conn.query_row(
            "SELECT count(*) FROM meta WHERE key IN ('account_key', 'device_token', 'device_secret')",
            [],
            |row| row.get::<_, i64>(0),
        )?
    };
    assert_eq!(desk_secrets_in_the_clear, 0, "no secret in the clear in a store protected from the start");

    // `pair show` tells a person to paste the code, not to put it in a command line.
    let text = phone.run(&with(&passphrase, &["pair", "show", "--no-qr"])).await?;
    assert!(text.contains("lockstep-cli pair redeem --name <its name>, then paste the code"), "{text}");

    // Removed: the store works without a passphrase again, its secrets as they were.
    let removed = phone.json(&with(&passphrase, &["passphrase", "remove"])).await?;
    assert_eq!(removed["protected"], false);
    phone.sync().await?;
    assert_eq!(phone.json(&["status"]).await?["protected"], false);
    assert_eq!(plaintext_secrets(&phone.store)?, secrets);
    Ok(())
}
