//! What `status`, `check` and `sync` print: text for people, one JSON document with `--json`.

use serde_json::{Map, Value, json};

use crate::hlc::unix_ms as now_ms;
use crate::{
    record::{PARENT_FIELD, UNFILED},
    store::{ResyncState, Status, Store},
    sync::Report,
};

pub(super) fn status(status: &Status, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_value(status)?);
    } else {
        println!("device      {} ({}) of user {}", status.device_name, status.device_id, status.user_id);
        println!("server      {}", status.server);
        println!("cursor      {}", status.cursor.map_or("none yet".into(), |cursor| cursor.to_string()));
        match (status.lag_at_last_sync, status.last_sync_ms) {
            (Some(lag), Some(at)) => {
                println!("lag         {lag} changes at the last sync, {} s ago", (now_ms() - at).max(0) / 1000)
            }
            _ => println!("lag         never synced"),
        }
        println!("outbox      {} changes to push", status.outbox);
        if status.outbox_rejected > 0 {
            println!("rejected    {} changes the server refused (kept locally)", status.outbox_rejected);
        }
        println!("records     {} ({} deleted)", status.records, status.deleted_records);
        match status.server_key_epoch {
            Some(current) if current > status.key_epoch => println!(
                "key epoch   {} (the account is at epoch {current}: waiting for another device to share its key; \
                 sync again once a device that has it synced)",
                status.key_epoch
            ),
            _ => println!("key epoch   {}", status.key_epoch),
        }
        if status.revoked_devices > 0 {
            println!("revoked     {} devices (no epoch key is sealed to them)", status.revoked_devices);
        }
        if status.protected {
            println!("secrets     sealed under a passphrase");
        } else {
            println!("secrets     in the clear in the store file (`lockstep-cli passphrase set` seals them)");
        }
        if status.problems > 0 {
            println!("problems    {} incoming changes not applied: `lockstep-cli check`", status.problems);
        }
        if status.deferred > 0 {
            println!(
                "deferred    {} incoming changes waiting to apply (clock ahead, newer format): `lockstep-cli check`",
                status.deferred
            );
        }
        if let Some(resync) = &status.resync {
            println!("resync      {}", describe_resync(resync));
        }
        if let Some(problem) = &status.server_problem {
            println!("server      problem at the last sync: {problem}");
        }
    }
    Ok(())
}

/// Orphans (moved to "unfiled" with `fix`), problems, deferred and rejected
/// changes, the last resync and a server problem.
pub(super) fn check(store: &mut Store, fix: bool, as_json: bool) -> anyhow::Result<()> {
    store.account()?;
    let orphans = store.orphans()?;
    let problems = store.problems()?;
    let deferred = store.deferred()?;
    let status = store.status()?;
    let rejected: Vec<Value> = store
        .rejected()?
        .into_iter()
        .map(|(record_id, reason)| json!({"record_id": record_id, "reason": reason}))
        .collect();
    let mut moved = Vec::new();
    if fix {
        for orphan in &orphans {
            let mut fields = Map::new();
            fields.insert(PARENT_FIELD.into(), Value::String(UNFILED.into()));
            fields.insert("previous_parent".into(), Value::String(orphan.parent.clone()));
            store.put(&orphan.collection, Some(&orphan.record_id), &fields)?;
            moved.push(orphan.record_id.clone());
        }
    }
    if as_json {
        println!(
            "{}",
            json!({
                "orphans": orphans,
                "moved_to_unfiled": moved,
                "problems": problems,
                "deferred": deferred,
                "rejected": rejected,
                "resync": status.resync,
                "server_problem": status.server_problem,
            })
        );
    } else {
        if orphans.is_empty()
            && problems.is_empty()
            && rejected.is_empty()
            && deferred.is_empty()
            && status.server_problem.is_none()
        {
            println!("ok: no orphans, every incoming change applied, every local change accepted");
        }
        if let Some(resync) = &status.resync {
            println!("resync   {}", describe_resync(resync));
        }
        if let Some(problem) = &status.server_problem {
            println!("server   problem at the last sync: {problem}");
        }
        for change in &deferred {
            println!(
                "deferred offset {} record {} from device {}: {} ({}); retried at every sync",
                change.offset, change.record_id, change.origin_device_id, change.kind, change.reason
            );
        }
        for entry in &rejected {
            println!("rejected {} : {} (kept on this device only)", entry["record_id"], entry["reason"]);
        }
        for orphan in &orphans {
            println!(
                "orphan   {} ({}) : parent {} is {}",
                orphan.record_id, orphan.collection, orphan.parent, orphan.parent_is
            );
        }
        if !orphans.is_empty() {
            if fix {
                println!("moved {} orphans to parent \"{UNFILED}\"; `lockstep-cli sync` sends the change", moved.len());
            } else {
                println!("`lockstep-cli check --fix` moves them to parent \"{UNFILED}\"");
            }
        }
        for problem in &problems {
            println!(
                "problem  offset {} record {} from device {}: {} ({})",
                problem.offset, problem.record_id, problem.origin_device_id, problem.kind, problem.detail
            );
        }
    }
    Ok(())
}

/// One line about a rebuild from the log start (in progress or the last one).
pub(super) fn describe_resync(resync: &ResyncState) -> String {
    let ago = |at: i64| (now_ms() - at).max(0) / 1000;
    match (resync.completed_at_ms, resync.repushed) {
        (Some(done), Some(repushed)) => format!(
            "{} ({} s ago): rebuilt from offset {}, every record kept, {repushed} records pushed back",
            resync.reason.describe(),
            ago(done),
            resync.log_start.map_or("-".into(), |start| start.to_string())
        ),
        _ => format!(
            "{} ({} s ago): rebuilding, resumes at the next sync; every record is kept",
            resync.reason.describe(),
            ago(resync.started_at_ms)
        ),
    }
}

pub(super) fn print_report(report: &Report, as_json: bool) {
    if as_json {
        let mut document = serde_json::to_value(report).expect("reports serialize");
        if let (Some(notice), Value::Object(fields)) = (report.notice(), &mut document) {
            fields.insert("notice".into(), Value::String(notice));
        }
        println!("{document}");
        return;
    }
    println!(
        "pushed {} ({} already on the server), received {} ({} records changed), at offset {}",
        report.pushed,
        report.duplicates,
        report.received,
        report.changed_records,
        report.cursor.map_or("-".into(), |cursor| cursor.to_string())
    );
    if report.rejected > 0 {
        println!("{} changes were refused by the server and kept locally: `lockstep-cli status`", report.rejected);
    }
    if report.problems > 0 {
        println!("{} incoming changes could not be applied: `lockstep-cli check`", report.problems);
    }
    if report.deferred > 0 {
        println!("{} incoming changes wait until they can apply: `lockstep-cli check`", report.deferred);
    }
    if let Some(notice) = report.notice() {
        println!("{notice}");
    }
}
