//! Receiving: subscribe from the cursor, apply each batch, ack it.
//!
//! - A batch is applied (merged, cursor moved) in one local transaction and
//!   acked only after it committed; a batch that skips offsets is refused
//!   (`StoreError::Gap`, transient: the stream is restarted from the cursor).
//! - A Resync rebuilds from the log start without deleting anything
//!   (`store::resync`); once caught up the device queues what the log lacks.
//! - DATA_LOSS from Subscribe or Ack (the server's log lost changes), and
//!   OUT_OF_RANGE from Subscribe (the cursor is past the log end), make the
//!   device subscribe again with `repair = true` and do the same rebuild.
//! - The first answer must come within the RPC deadline, and then something
//!   (at least a heartbeat) every three heartbeat intervals.

use std::time::Duration;

use lockstep_proto::v1::{
    AckRequest, DeliveredChange, ResyncReason as WireReason, SubscribeRequest, SubscribeResponse,
    subscribe_response::Event, sync_client::SyncClient,
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

use super::{Progress, Report, SyncError, Syncer, authed, rpc};
use crate::store::{Incoming, ProblemKind, REVOCATIONS_COLLECTION, ResyncReason, Sealed, open_change};

/// Stop receiving when caught up with the log end, or keep going (watch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    CaughtUp,
    Stopped,
}

/// While watching, keys are synced every this many push ticks (10 s).
const KEY_SYNC_TICKS: u32 = 20;

/// How often in a row the server may answer DATA_LOSS to one receive.
const MAX_REPAIR_REQUESTS: u32 = 3;

/// A stream silent for this long is dead.
fn idle_limit(heartbeat_interval_ms: u32) -> Duration {
    match heartbeat_interval_ms {
        0 => Duration::from_secs(90),
        interval => Duration::from_millis(3 * u64::from(interval)).max(Duration::from_secs(1)),
    }
}

/// The log end as known after a batch moved the cursor: the last heartbeat's,
/// but never below the cursor (the log holds what was just applied). A live
/// batch arrives before the heartbeat that tells the new end; without this,
/// progress read "at offset 5 of 0". Unknown stays unknown (no heartbeat yet).
fn log_end_after_batch(known: Option<i64>, cursor: i64) -> Option<i64> {
    known.map(|end| end.max(cursor))
}

fn reason_of(reason: i32) -> ResyncReason {
    match WireReason::try_from(reason) {
        Ok(WireReason::HistoryExpired) => ResyncReason::HistoryExpired,
        Ok(WireReason::LogLost) => ResyncReason::LogLost,
        _ => ResyncReason::Unspecified,
    }
}

impl Syncer {
    fn incoming(&self, delivered: DeliveredChange) -> Incoming {
        let change = delivered.change.unwrap_or_default();
        if !delivered.undecodable.is_empty() {
            return Incoming {
                offset: delivered.offset,
                record_id: change.record_id,
                collection: change.collection,
                origin_device_id: delivered.origin_device_id,
                content: Err((
                    ProblemKind::Undecodable,
                    format!("the server cannot read the record at this offset: {}", delivered.undecodable),
                )),
                sealed: None,
            };
        }
        let sealed = Sealed {
            op: change.op,
            hlc: change.hlc,
            key_epoch: change.key_epoch,
            nonce: change.nonce.to_vec(),
            ciphertext: change.ciphertext.to_vec(),
        };
        let content =
            open_change(&self.account, &change.record_id, &change.collection, &sealed, self.store.payload_reader());
        Incoming {
            offset: delivered.offset,
            record_id: change.record_id,
            collection: change.collection,
            origin_device_id: delivered.origin_device_id,
            content,
            sealed: Some(sealed),
        }
    }

    /// Before a batch applies: every epoch it uses must be held, or fetched
    /// now; a change is never filed as undecryptable for a key that is on its way.
    async fn ensure_epoch_keys(&mut self, changes: &[DeliveredChange]) -> Result<(), SyncError> {
        let missing = |syncer: &Self| {
            changes
                .iter()
                .filter_map(|delivered| delivered.change.as_ref().map(|change| change.key_epoch))
                .find(|epoch| *epoch > 1 && syncer.account.epoch_keys.get(*epoch).is_none())
        };
        if missing(self).is_none() {
            return Ok(());
        }
        // No sharing yet: the batch may hold a revocation record not applied yet.
        self.sync_keys_before_receiving().await?;
        match missing(self) {
            None => Ok(()),
            Some(epoch) => Err(SyncError::MissingEpochKey { epoch }),
        }
    }

    /// Receives changes from the device's cursor and applies them, until caught
    /// up or, with `Until::Stopped`, until `stop` resolves or the stream fails.
    /// While receiving, local edits are pushed every half second.
    pub async fn receive(
        &mut self,
        until: Until,
        report: &mut Report,
        progress: &mut dyn FnMut(Progress),
        stop: &mut (dyn std::future::Future<Output = ()> + Unpin + Send),
    ) -> Result<(), SyncError> {
        let retried = self.store.retry_deferred()?;
        report.applied_from_deferred += retried.from_deferred as u64;
        report.changed_records += retried.changed_records as u64;
        let mut repair_requests = 0;
        loop {
            match self.receive_stream(until, report, progress, stop).await {
                Err(error) if error.is_data_loss() && repair_requests < MAX_REPAIR_REQUESTS => {
                    // The log lost changes it had acknowledged: repair, never start over empty.
                    repair_requests += 1;
                    tracing::warn!(%error, "the server's log lost changes; repairing");
                    self.store.request_repair(ResyncReason::LogLost)?;
                    report.log_lost = true;
                    report.resync_reason = Some(ResyncReason::LogLost);
                }
                Err(error) if error.is_data_loss() => {
                    let problem = format!("the server keeps answering DATA_LOSS after this device repaired: {error}");
                    self.store.note_server_problem(Some(&problem))?;
                    return Err(error);
                }
                outcome => return outcome,
            }
        }
    }

    async fn receive_stream(
        &mut self,
        until: Until,
        report: &mut Report,
        progress: &mut dyn FnMut(Progress),
        stop: &mut (dyn std::future::Future<Output = ()> + Unpin + Send),
    ) -> Result<(), SyncError> {
        let (mut sync, limits) = self.connection().await?;
        let idle = idle_limit(limits.heartbeat_interval_ms);
        let (mut stream, mut repairing) = self.subscribe(&mut sync).await?;
        let mut log_end = None;
        let mut push_tick = tokio::time::interval(Duration::from_millis(500));
        let mut silent_until = Instant::now() + self.rpc_timeout.max(idle);
        let mut heard = false;
        let mut ticks = 0u32;
        loop {
            // Silence counts from when this device is ready for more: applying
            // and acking the last batch (slow on a busy machine) is not the server's.
            if std::mem::take(&mut heard) {
                silent_until = Instant::now() + idle;
            }
            let message = tokio::select! {
                message = stream.next() => message,
                () = tokio::time::sleep_until(silent_until) => return Err(SyncError::StreamIdle(idle)),
                () = &mut *stop => return Ok(()),
                _ = push_tick.tick(), if until == Until::Stopped => {
                    ticks += 1;
                    if ticks % KEY_SYNC_TICKS == 0 {
                        // Devices paired meanwhile get the epoch keys; a due rotation happens.
                        self.sync_keys().await?;
                    }
                    if self.store.outbox_len()? > 0 {
                        self.push(report, progress).await?;
                    }
                    continue;
                }
            };
            heard = true;
            let Some(message) = message else { return Err(SyncError::StreamEnded) };
            let event = message.map_err(rpc("Subscribe"))?.event;
            if let Some(reason) = repairing.take()
                && !matches!(event, Some(Event::Resync(_)))
            {
                // A server that does not know `repair` started where asked: at 0.
                self.start_resync(reason, 0, report, progress)?;
            }
            match event {
                Some(Event::Changes(batch)) => {
                    let Some(last) = batch.changes.last().map(|change| change.offset) else { continue };
                    self.ensure_epoch_keys(&batch.changes).await?;
                    let incoming: Vec<Incoming> =
                        batch.changes.into_iter().map(|change| self.incoming(change)).collect();
                    let revocations = incoming.iter().any(|change| change.collection == REVOCATIONS_COLLECTION);
                    let applied = self.store.apply(&incoming)?;
                    // Committed locally: now the server may forget it for this device.
                    let ack = authed(&self.account.token, AckRequest { offset: last }, Some(self.rpc_timeout))?;
                    sync.ack(ack).await.map_err(rpc("Ack"))?;
                    if revocations {
                        // Learned of a revocation: an epoch after it must exist (started here if not).
                        self.sync_keys().await?;
                    }
                    report.received += applied.changes as u64;
                    report.changed_records += applied.changed_records as u64;
                    report.problems += applied.problems as u64;
                    report.deferred += applied.deferred as u64;
                    report.applied_from_deferred += applied.from_deferred as u64;
                    let cursor = self.store.cursor()?.unwrap_or(last + 1);
                    report.cursor = Some(cursor);
                    log_end = log_end_after_batch(log_end, cursor);
                    progress(Progress::Received { applied: report.received, cursor, log_end });
                }
                Some(Event::Heartbeat(heartbeat)) => {
                    log_end = Some(heartbeat.log_end_offset);
                    let cursor = self.store.cursor()?.unwrap_or(0);
                    self.store.note_sync(heartbeat.log_end_offset)?;
                    if cursor >= heartbeat.log_end_offset {
                        self.caught_up(report, progress)?;
                        progress(Progress::CaughtUp { cursor });
                        if until == Until::CaughtUp {
                            return Ok(());
                        }
                    }
                }
                Some(Event::Resync(resync)) => {
                    let reason = reason_of(resync.reason);
                    let requested = repairing.is_some() || self.awaiting_resync()?;
                    if !requested && self.is_resync_loop(resync.log_start_offset)? {
                        let error = SyncError::ResyncLoop { log_start: resync.log_start_offset };
                        self.store.note_server_problem(Some(&error.to_string()))?;
                        return Err(error);
                    }
                    repairing = None;
                    self.start_resync(reason, resync.log_start_offset, report, progress)?;
                }
                None => {}
            }
        }
    }

    fn start_resync(
        &mut self,
        reason: ResyncReason,
        log_start: i64,
        report: &mut Report,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), SyncError> {
        let state = self.store.begin_resync(reason, log_start)?;
        report.resyncs += 1;
        report.resync_reason = Some(state.reason);
        report.log_lost |= state.reason == ResyncReason::LogLost;
        progress(Progress::Resync { log_start, reason: state.reason });
        Ok(())
    }

    /// Caught up with the log end: a rebuild under way ends here, queueing what the log lacks.
    fn caught_up(&mut self, report: &mut Report, progress: &mut dyn FnMut(Progress)) -> Result<(), SyncError> {
        if let Some(done) = self.store.finish_resync()? {
            let repushed = done.repushed.unwrap_or(0);
            report.repushed += repushed;
            report.resync_reason = Some(done.reason);
            report.log_lost |= done.reason == ResyncReason::LogLost;
            progress(Progress::Rebuilt { reason: done.reason, repushed });
        }
        self.store.note_server_problem(None)?;
        Ok(())
    }

    /// The device asked to repair and the server's Resync has not come yet.
    fn awaiting_resync(&self) -> Result<bool, SyncError> {
        Ok(self.store.pending_resync()?.is_some_and(|pending| pending.log_start.is_none()))
    }

    /// A Resync the device did not ask for, to the same log start as the last
    /// one, with nothing applied since: obeying it again would loop.
    fn is_resync_loop(&self, log_start: i64) -> Result<bool, SyncError> {
        let previous = match self.store.pending_resync()? {
            Some(pending) => Some(pending),
            None => self.store.last_resync()?,
        };
        let previous_start = previous.and_then(|previous| previous.log_start);
        Ok(previous_start == Some(log_start) && self.store.cursor()? == Some(log_start))
    }

    /// Subscribes from the cursor, or with `repair = true` when a repair is
    /// pending; returns the stream and the reason of the repair it asked for.
    async fn subscribe(
        &mut self,
        sync: &mut SyncClient<Channel>,
    ) -> Result<(tonic::Streaming<SubscribeResponse>, Option<ResyncReason>), SyncError> {
        let mut repairing = self.store.pending_resync()?.filter(|pending| pending.log_start.is_none());
        for _ in 0..2 {
            let (from_offset, repair) = match &repairing {
                // From 0: a server that does not know `repair` starts there too.
                Some(_) => (Some(0), true),
                None => (self.store.cursor()?, false),
            };
            let request = authed(&self.account.token, SubscribeRequest { from_offset, repair }, None)?;
            let answer = tokio::time::timeout(self.rpc_timeout, sync.subscribe(request)).await.map_err(|_| {
                rpc("Subscribe")(tonic::Status::deadline_exceeded(format!(
                    "no answer within {} s",
                    self.rpc_timeout.as_secs()
                )))
            })?;
            match answer {
                Ok(response) => return Ok((response.into_inner(), repairing.map(|pending| pending.reason))),
                // The cursor is past the log end: the log is not the one this
                // device synced with. Repair from the log start; delete nothing.
                Err(status) if status.code() == Code::OutOfRange && !repair => {
                    tracing::warn!(message = status.message(), "this device's position is past the log end; repairing");
                    repairing = Some(self.store.request_repair(ResyncReason::CursorPastLogEnd)?);
                }
                Err(status) => return Err(rpc("Subscribe")(status)),
            }
        }
        Err(rpc("Subscribe")(tonic::Status::out_of_range("the server refused a repair subscription")))
    }

    /// Push, then receive until caught up, then push what arrived meanwhile
    /// (and what a rebuild found the log lacks).
    pub async fn sync_once(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<Report, SyncError> {
        let mut report = Report::default();
        // Keys are shared once received: a revocation record in the log counts first.
        self.sync_keys_before_receiving().await?;
        match self.push(&mut report, progress).await {
            // The log lost changes: receiving repairs it first, then the push goes through.
            Err(error) if error.is_data_loss() => tracing::warn!(%error, "push refused until this device repairs"),
            outcome => outcome?,
        }
        self.receive(Until::CaughtUp, &mut report, progress, &mut std::future::pending()).await?;
        self.sync_keys().await?;
        self.push(&mut report, progress).await?;
        report.cursor = self.store.cursor()?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_dead_after_three_silent_heartbeat_intervals() {
        assert_eq!(idle_limit(10_000), Duration::from_secs(30));
        assert_eq!(idle_limit(100), Duration::from_secs(1), "at least a second");
        assert_eq!(idle_limit(0), Duration::from_secs(90), "a server that does not say");
    }

    #[test]
    fn the_log_end_shown_is_never_below_the_cursor() {
        assert_eq!(log_end_after_batch(Some(0), 5), Some(5), "a live batch after a heartbeat at an empty log");
        assert_eq!(log_end_after_batch(Some(10_000), 500), Some(10_000), "a catch-up under way");
        assert_eq!(log_end_after_batch(None, 5), None, "no heartbeat yet: not known");
    }

    #[test]
    fn resync_reasons_from_the_wire() {
        assert_eq!(reason_of(WireReason::HistoryExpired as i32), ResyncReason::HistoryExpired);
        assert_eq!(reason_of(WireReason::LogLost as i32), ResyncReason::LogLost);
        assert_eq!(reason_of(0), ResyncReason::Unspecified);
        assert_eq!(reason_of(99), ResyncReason::Unspecified);
    }
}
