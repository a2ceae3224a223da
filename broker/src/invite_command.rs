//! `lockstep invite …`: the operator's invite codes, made, listed and revoked in
//! the server's own database (`<data_dir>/lockstep.db`, the same `--config`,
//! `--data-dir` and `LOCKSTEP_*` settings as the server). It works while the
//! server runs — SQLite in WAL mode with a busy timeout serialises the two
//! processes' writes — and the server reads invites from the database at each
//! CreateAccount, so a new code works at once. Run it as the server's user: the
//! database is that user's alone (0600).

use std::{path::Path, time::Duration};

use clap::Subcommand;
use serde_json::json;

use crate::{
    Settings,
    accounts::{Invites, invites::CreatedInvite},
    store::Store,
};

#[derive(Debug, Subcommand)]
pub enum InviteCommand {
    /// Make invite codes, each good for one new account. The codes are printed once, one per
    /// line on stdout; the server keeps only their hashes.
    Create {
        /// How many codes.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// How long the codes stay valid, e.g. 90m, 7d, 4w.
        #[arg(long, default_value = "7d", value_parser = humantime_serde::re::humantime::parse_duration)]
        expires_in: Duration,
        /// A note for `invite list` (who the codes are for); never shown to their users.
        #[arg(long, default_value = "")]
        note: String,
        /// Print one JSON document: [{"invite_id", "code", "expires_at_ms"}].
        #[arg(long)]
        json: bool,
    },
    /// List every invite and its state (unused, used, revoked, expired); never the codes.
    List {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused invite: its code stops working.
    Revoke {
        /// The invite's id, as `invite create` and `invite list` show it.
        invite_id: i64,
    },
}

/// Runs `command` against the database of `settings.data_dir`, which must exist already: a
/// mistyped `--data-dir` would otherwise make codes in a database no server reads.
pub async fn run(settings: &Settings, command: InviteCommand) -> anyhow::Result<()> {
    let database = settings.data_dir.join("lockstep.db");
    anyhow::ensure!(
        database.exists(),
        "no server database at {}: start the server once, or pass its --data-dir (or --config)",
        database.display()
    );
    let store = Store::open(&settings.data_dir, &settings.database).await?;
    let invites = Invites::new(store, settings.limits.request_timeout);
    match command {
        InviteCommand::Create { count, expires_in, note, json } => {
            let created = invites.create(count, expires_in, &note).await?;
            print_created(&created, json, &settings.data_dir);
        }
        InviteCommand::List { json } => {
            let listed = invites.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listed)?);
                return Ok(());
            }
            println!("{:>5}  {:<8}  {:<20}  {:<20}  {:<36}  note", "id", "state", "created", "expires", "used by");
            for invite in &listed {
                println!(
                    "{:>5}  {:<8}  {:<20}  {:<20}  {:<36}  {}",
                    invite.invite_id,
                    invite.state.as_str(),
                    timestamp(invite.created_at_ms),
                    timestamp(invite.expires_at_ms),
                    invite.used_by_user.as_deref().unwrap_or("-"),
                    invite.note
                );
            }
            if listed.is_empty() {
                eprintln!("no invites yet: `lockstep invite create`");
            }
        }
        InviteCommand::Revoke { invite_id } => {
            invites.revoke(invite_id).await?;
            eprintln!("invite {invite_id} revoked");
        }
    }
    Ok(())
}

fn print_created(created: &[CreatedInvite], json: bool, data_dir: &Path) {
    if json {
        println!("{}", json!(created));
        return;
    }
    for invite in created {
        println!("{}", invite.code);
    }
    let (first, last) = (created.first().map_or(0, |i| i.invite_id), created.last().map_or(0, |i| i.invite_id));
    let expires = created.first().map_or_else(String::new, |invite| timestamp(invite.expires_at_ms));
    let ids = if first == last { format!("id {first}") } else { format!("ids {first}-{last}") };
    eprintln!(
        "{} invite code(s) ({ids}) in {}, valid until {expires} UTC, one account each; they are shown only now \
         (`lockstep-cli init --invite CODE`)",
        created.len(),
        data_dir.display()
    );
}

/// `2026-11-28 13:40:00`, UTC.
fn timestamp(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime_serde::re::humantime::format_rfc3339_seconds(time).to_string().replace('T', " ").replace('Z', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_seconds() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(timestamp(1_795_873_200_000), "2026-11-28 13:40:00");
    }
}
