//! Exactly one append per change id across nodes: a reservation in the shared database before
//! producing. Used when several nodes share the store (`database.url`); one node alone needs
//! none (its pushes of a user are ordered in memory, `pipeline`).
//!
//! Before a push produces a change, it inserts `(user, device, change id, digest, holder,
//! expiry)` into `push_reservations`; the primary key lets one attempt, on any node, win. The
//! winner produces and then records the offset in the dedup index and drops its reservation in
//! one transaction (`dedup`), so a change is never unreserved before it is indexed. A loser
//! waits, at most `kafka.produce_timeout`, for the winner's index entry and answers with it
//! (the first offset), or UNAVAILABLE (retryable) past that. A reservation outlives a dead or
//! failed holder only until it expires: whoever takes it over first re-reads the user's topic
//! from the index's mark (`Gateway::reindex`) before producing, so a change the old holder did
//! append is found, not appended again.
//!
//! # Why a reservation, not per-user ownership with Kafka transactional fencing
//! Fencing (a transactional producer per user owner, handed over through a consumer group) makes
//! a zombie's late write impossible, but it costs a transactional id and producer per owned
//! user (or a partition-to-node routing layer, i.e. forwarding pushes between nodes: a cluster
//! protocol of our own), two more round trips and a commit marker per push — markers take
//! offsets, so a user's offsets would no longer be contiguous, which the index's mark, the log
//! guard and the devices' cursors rely on — and read_committed readers everywhere. A
//! reservation is one more statement on a database the nodes already share, changes nothing in
//! Kafka, and any node can serve any push.
//!
//! # The residual risk, and why the lease covers it
//! A reservation proves nothing about Kafka: a holder that stopped answering may still have a
//! produce request on its way. librdkafka gives up on a record `kafka.produce_timeout` after
//! the produce (`message.timeout.ms`), and a request Kafka had not answered may still commit
//! until the leader drops a stalled follower (`kafka.in_doubt_window`). The lease
//! (`database.push_reservation_lease`) must exceed both together (settings validate it), counted
//! from the claim made right before the produce (a claim older than that, after a wait or a
//! re-read, is renewed first). Expiry is the database's clock (PostgreSQL's
//! `clock_timestamp()`), so node clocks do not matter. What is left: a produce request held in
//! the network longer than the lease (Kafka appends a request whenever it arrives), or a node
//! frozen (a paused VM, SIGSTOP) for longer than the lease between its claim and handing the
//! record to librdkafka; either appends a change a second time, as without any reservation.
//! A holder is one process (`<node id>/<random>`): a restarted node does not take its previous
//! process's reservations for its own, whose requests may still land.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use super::dedup::{Digest, lookup_many, lookup_one};
use crate::{
    db::{DbError, now_ms},
    store::{Conn, Sql, Store, Value},
    values,
};

/// What a push may do with one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Already in the index: answered from it (the digest tells a retry from a reused id).
    Indexed { offset: i64, digest: Digest },
    /// Reserved by this attempt: produce it.
    Won,
    /// Reserved by this attempt after its holder's lease ended (`from_self`: this process held it,
    /// an attempt that finished without indexing it). Re-read the topic before producing: the
    /// old holder may have appended it.
    TakenOver { from_self: bool },
    /// Another attempt holds it until its lease ends.
    Held,
}

#[derive(Clone)]
pub struct Reservations {
    store: Store,
    holder: Arc<str>,
    lease: Duration,
}

/// Rounds of insert / look up / take over for one change within one claim, before it is
/// reported as held (a reservation that came and went meanwhile, each time).
const ATTEMPTS: usize = 3;

impl Reservations {
    pub fn new(store: Store, holder: &str, lease: Duration) -> Self {
        Self { store, holder: holder.into(), lease }
    }

    pub fn holder(&self) -> &Arc<str> {
        &self.holder
    }

    /// Claims each of `changes` (change id, digest) of the device for this process. The claims
    /// come back in the order of `changes`.
    ///
    /// The common case, changes nobody holds, costs two statements ([`reserve_unheld`]). What
    /// they did not reserve (held by another attempt, indexed, expired) goes through
    /// [`claim_one`] in one transaction, in id order.
    pub async fn claim(
        &self,
        user_id: &str,
        device_id: &str,
        changes: Vec<(String, Digest)>,
    ) -> Result<Vec<Claim>, DbError> {
        let (user, device, holder) = (user_id.to_owned(), device_id.to_owned(), self.holder.clone());
        let lease_ms = self.lease.as_millis() as i64;
        self.store
            .call(move |connection| {
                let order = id_order(&changes);
                let mut claims: Vec<Option<Claim>> = vec![None; changes.len()];
                let reserved = reserve_unheld(connection, (&user, &device, &holder), &changes, &order, lease_ms)?;
                for &index in &order {
                    claims[index] = reserved.get(&changes[index].0).copied();
                }
                let rest: Vec<usize> = order.iter().copied().filter(|index| claims[*index].is_none()).collect();
                if !rest.is_empty() {
                    let now = database_now_ms(connection)?;
                    let transaction = connection.transaction()?;
                    for index in rest {
                        let (change_id, digest) = &changes[index];
                        let key = Key { user: &user, device: &device, change_id };
                        claims[index] = Some(claim_one(&transaction, key, digest, &holder, now, now + lease_ms)?);
                    }
                    transaction.commit()?;
                }
                // An id given twice is claimed once: its other places are held (by this attempt).
                Ok(claims.into_iter().map(|claim| claim.unwrap_or(Claim::Held)).collect())
            })
            .await
    }

    /// Only the common case of [`Self::claim`]: reserves those of `changes` that nobody holds, and
    /// tells which of them the index already has. Each answer is [`Claim::Won`] or
    /// [`Claim::Indexed`]; a change it leaves out needs [`Self::claim`].
    pub async fn claim_unheld(
        &self,
        user_id: &str,
        device_id: &str,
        changes: Vec<(String, Digest)>,
    ) -> Result<HashMap<String, Claim>, DbError> {
        let (user, device, holder) = (user_id.to_owned(), device_id.to_owned(), self.holder.clone());
        let lease_ms = self.lease.as_millis() as i64;
        self.store
            .call(move |connection| {
                let order = id_order(&changes);
                reserve_unheld(connection, (&user, &device, &holder), &changes, &order, lease_ms)
            })
            .await
    }

    /// The database's clock (for [`Self::sweep`]).
    pub async fn database_now_ms(&self) -> Result<i64, DbError> {
        self.store.call(|connection| database_now_ms(connection)).await
    }

    /// After the user's topic was re-read to its end from a point past `expired_before_ms`: drops
    /// the user's reservations whose change is indexed, and those that expired before then (their
    /// holder's write, had it landed, would have been read). Returns how many went.
    pub async fn sweep(&self, user_id: &str, expired_before_ms: i64) -> Result<u64, DbError> {
        let user = user_id.to_owned();
        self.store
            .call(move |connection| {
                connection.execute(
                    "DELETE FROM push_reservations WHERE user_id = ?1 AND (expires_at_ms < ?2 OR EXISTS (
                         SELECT 1 FROM pushed_changes p WHERE p.user_id = push_reservations.user_id
                         AND p.device_id = push_reservations.device_id AND p.change_id = push_reservations.change_id))",
                    values![user, expired_before_ms],
                )
            })
            .await
    }
}

#[derive(Clone, Copy)]
struct Key<'a> {
    user: &'a str,
    device: &'a str,
    change_id: &'a str,
}

fn claim_one(
    transaction: &impl Sql,
    key: Key<'_>,
    digest: &Digest,
    holder: &str,
    now: i64,
    expires: i64,
) -> Result<Claim, DbError> {
    let Key { user, device, change_id } = key;
    for _ in 0..ATTEMPTS {
        // The insert decides between concurrent attempts; the index is read after it, so an
        // entry committed (with its reservation dropped) just before the insert is seen.
        let inserted = transaction.execute(
            "INSERT INTO push_reservations (user_id, device_id, change_id, digest, holder, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            values![user, device, change_id, digest.as_slice(), holder, expires],
        )? == 1;
        if let Some((offset, digest)) = lookup_one(transaction, user, device, change_id)? {
            if inserted {
                release(transaction, key, holder)?;
            }
            return Ok(Claim::Indexed { offset, digest });
        }
        if inserted {
            return Ok(Claim::Won);
        }
        let Some(row) = transaction.query_opt(
            "SELECT holder, expires_at_ms FROM push_reservations
             WHERE user_id = ?1 AND device_id = ?2 AND change_id = ?3",
            values![user, device, change_id],
        )?
        else {
            continue;
        };
        let (current, current_expiry): (String, i64) = (row.get(0)?, row.get(1)?);
        let from_self = current == holder;
        if !from_self && current_expiry > now {
            return Ok(Claim::Held);
        }
        // Expired, or this process's own finished attempt: taken over unless another attempt
        // took it first (the row is then no longer the one read).
        let taken = transaction.execute(
            "UPDATE push_reservations SET holder = ?4, expires_at_ms = ?5, digest = ?6
             WHERE user_id = ?1 AND device_id = ?2 AND change_id = ?3 AND holder = ?7 AND expires_at_ms = ?8",
            values![user, device, change_id, holder, expires, digest.as_slice(), &current, current_expiry],
        )? == 1;
        if taken {
            return Ok(Claim::TakenOver { from_self });
        }
    }
    Ok(Claim::Held)
}

/// The places of `changes` in change id order, each id once: two batches sharing ids take their
/// rows in one order, and wait for each other instead of deadlocking.
fn id_order(changes: &[(String, Digest)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..changes.len()).collect();
    order.sort_by(|a, b| changes[*a].0.cmp(&changes[*b].0));
    order.dedup_by(|a, b| changes[*a].0 == changes[*b].0);
    order
}

/// Two statements, each committing on its own: one insert of every reservation nobody holds,
/// then one read of the index for those it inserted (an entry committed, with its reservation
/// dropped, before the insert is seen: read committed, a statement after it). An indexed one's
/// reservation goes again. The changes it reserved, each `Won` or `Indexed`.
fn reserve_unheld(
    connection: &Conn<'_>,
    owner: (&str, &str, &str),
    changes: &[(String, Digest)],
    order: &[usize],
    lease_ms: i64,
) -> Result<HashMap<String, Claim>, DbError> {
    let (user, device, holder) = owner;
    let inserted = insert_unheld(connection, owner, changes, order, lease_ms)?;
    if inserted.is_empty() {
        return Ok(HashMap::new());
    }
    let indexed = lookup_many(connection, user, device, inserted.iter().map(String::as_str))?;
    let mut claims = HashMap::with_capacity(inserted.len());
    for change_id in inserted {
        let claim = match indexed.get(&change_id) {
            Some(&(offset, digest)) => {
                release(connection, Key { user, device, change_id: &change_id }, holder)?;
                Claim::Indexed { offset, digest }
            }
            None => Claim::Won,
        };
        claims.insert(change_id, claim);
    }
    Ok(claims)
}

/// Inserts a reservation for each change at `order` that has none, in that order; the ids it
/// inserted. The expiry is the database's clock plus the lease (PostgreSQL's
/// `clock_timestamp()`; SQLite, one node, this process's).
fn insert_unheld(
    connection: &Conn<'_>,
    (user, device, holder): (&str, &str, &str),
    changes: &[(String, Digest)],
    order: &[usize],
    lease_ms: i64,
) -> Result<HashSet<String>, DbError> {
    if order.is_empty() {
        return Ok(HashSet::new());
    }
    let (expiry, lease) = if connection.is_postgres() {
        ("(extract(epoch FROM clock_timestamp()) * 1000)::bigint + ?4", lease_ms)
    } else {
        ("?4", now_ms() + lease_ms)
    };
    let mut params = vec![Value::from(user), Value::from(device), Value::from(holder), Value::from(lease)];
    let mut rows = Vec::with_capacity(order.len());
    for &index in order {
        let (change_id, digest) = &changes[index];
        let at = params.len() + 1;
        rows.push(format!("(?1, ?2, ?{at}, ?{}, ?3, {expiry})", at + 1));
        params.push(Value::from(change_id.as_str()));
        params.push(Value::from(digest.as_slice()));
    }
    let sql = format!(
        "INSERT INTO push_reservations (user_id, device_id, change_id, digest, holder, expires_at_ms) VALUES {}
         ON CONFLICT DO NOTHING RETURNING change_id",
        rows.join(", ")
    );
    connection.query(&sql, &params)?.into_iter().map(|row| row.get::<String>(0)).collect()
}

fn release(transaction: &impl Sql, key: Key<'_>, holder: &str) -> Result<(), DbError> {
    transaction.execute(
        "DELETE FROM push_reservations WHERE user_id = ?1 AND device_id = ?2 AND change_id = ?3 AND holder = ?4",
        values![key.user, key.device, key.change_id, holder],
    )?;
    Ok(())
}

/// Milliseconds since the epoch by the database's clock: one clock for every node's leases.
fn database_now_ms(connection: &Conn<'_>) -> Result<i64, DbError> {
    if connection.is_postgres() {
        connection.query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint", &[])?.get(0)
    } else {
        Ok(now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        both_backends,
        gateway::dedup::{DedupIndex, IndexEntry},
        store::testing::TestStore,
    };

    const LEASE: Duration = Duration::from_secs(60);

    fn change(id: &str) -> (String, Digest) {
        (id.to_owned(), [id.len() as u8; 16])
    }

    /// Ends every reservation of the user now (a lease that ran out).
    async fn expire_all(store: &Store) {
        store
            .call(|connection| {
                connection.execute("UPDATE push_reservations SET expires_at_ms = 0", &[])?;
                Ok(())
            })
            .await
            .unwrap();
    }

    both_backends!(one_attempt_wins_the_other_waits_for_its_entry, |test: TestStore| async move {
        let store = test.store.clone();
        test.insert_user("u").await;
        let (node1, node2) =
            (Reservations::new(store.clone(), "n1/a", LEASE), Reservations::new(store.clone(), "n2/b", LEASE));
        assert_eq!(node1.claim("u", "d", vec![change("c1"), change("c22")]).await.unwrap(), [Claim::Won, Claim::Won]);
        // The same changes through another node, in the other order: held, each in its place.
        assert_eq!(node2.claim("u", "d", vec![change("c22"), change("c1")]).await.unwrap(), [Claim::Held, Claim::Held]);
        // Another device's change of the same id is another change.
        assert_eq!(node2.claim("u", "e", vec![change("c1")]).await.unwrap(), [Claim::Won]);
        // The winner records c1's offset: its reservation goes in the same transaction.
        let index = DedupIndex::new(store.clone()).with_reservations("n1/a", LEASE);
        let entry = IndexEntry { device_id: "d".into(), change_id: "c1".into(), offset: 7, digest: change("c1").1 };
        index.record("u", vec![entry], None).await.unwrap();
        let claims = node2.claim("u", "d", vec![change("c1"), change("c22")]).await.unwrap();
        assert_eq!(claims, [Claim::Indexed { offset: 7, digest: change("c1").1 }, Claim::Held]);
        let left: i64 = store
            .call(|connection| {
                connection
                    .query_one(
                        "SELECT count(*) FROM push_reservations WHERE change_id = 'c1' AND device_id = 'd'",
                        &[],
                    )?
                    .get(0)
            })
            .await
            .unwrap();
        assert_eq!(left, 0, "an indexed change is no longer reserved");
    });

    both_backends!(one_claim_mixes_new_held_and_indexed_changes, |test: TestStore| async move {
        let store = test.store.clone();
        test.insert_user("u").await;
        let (node1, node2) =
            (Reservations::new(store.clone(), "n1/a", LEASE), Reservations::new(store.clone(), "n2/b", LEASE));
        assert_eq!(
            node1.claim("u", "d", vec![change("held"), change("done")]).await.unwrap(),
            [Claim::Won, Claim::Won]
        );
        let index = DedupIndex::new(store.clone()).with_reservations("n1/a", LEASE);
        let entry = IndexEntry { device_id: "d".into(), change_id: "done".into(), offset: 4, digest: change("done").1 };
        index.record("u", vec![entry], None).await.unwrap();
        // New (reserved by the first statement), held (by node 1), indexed (read from the index,
        // its reservation gone with the entry): each answered in its place.
        let claims = node2.claim("u", "d", vec![change("new"), change("held"), change("done")]).await.unwrap();
        assert_eq!(claims, [Claim::Won, Claim::Held, Claim::Indexed { offset: 4, digest: change("done").1 }]);
        assert_eq!(node1.claim("u", "d", vec![change("new")]).await.unwrap(), [Claim::Held], "node 2 holds it now");
    });

    both_backends!(an_expired_reservation_is_taken_over_once, |test: TestStore| async move {
        let store = test.store.clone();
        test.insert_user("u").await;
        let dead = Reservations::new(store.clone(), "n1/dead", LEASE);
        let (node2, node3) =
            (Reservations::new(store.clone(), "n2/b", LEASE), Reservations::new(store.clone(), "n3/c", LEASE));
        assert_eq!(dead.claim("u", "d", vec![change("c1")]).await.unwrap(), [Claim::Won]);
        assert_eq!(node2.claim("u", "d", vec![change("c1")]).await.unwrap(), [Claim::Held], "the lease still runs");
        expire_all(&store).await;
        assert_eq!(node2.claim("u", "d", vec![change("c1")]).await.unwrap(), [Claim::TakenOver { from_self: false }]);
        // The new holder's lease runs again: a third node waits.
        assert_eq!(node3.claim("u", "d", vec![change("c1")]).await.unwrap(), [Claim::Held]);
        // The holder claiming again (after its re-read) renews its own reservation.
        assert_eq!(node2.claim("u", "d", vec![change("c1")]).await.unwrap(), [Claim::TakenOver { from_self: true }]);
        // A restarted process is another holder: the old process's reservation is not its own.
        let restarted = Reservations::new(store.clone(), "n1/new", LEASE);
        assert_eq!(restarted.claim("u", "d", vec![change("c1")]).await.unwrap(), [Claim::Held]);
    });

    both_backends!(concurrent_claims_have_one_winner_per_change, |test: TestStore| async move {
        let store = test.store.clone();
        test.insert_user("u").await;
        let ids: Vec<_> = (0..20).map(|n| change(&format!("c{n}"))).collect();
        let mut reversed = ids.clone();
        reversed.reverse();
        let nodes: Vec<_> = (0..4).map(|n| Reservations::new(store.clone(), &format!("n{n}/x"), LEASE)).collect();
        let claims = futures::future::join_all(nodes.iter().enumerate().map(|(n, node)| {
            let batch = if n % 2 == 0 { ids.clone() } else { reversed.clone() };
            async move { (n, node.claim("u", "d", batch).await.unwrap()) }
        }))
        .await;
        for (position, (id, _)) in ids.iter().enumerate() {
            let winners = claims
                .iter()
                .filter(|(n, claims)| {
                    let at = if n % 2 == 0 { position } else { ids.len() - 1 - position };
                    claims[at] == Claim::Won
                })
                .count();
            assert_eq!(winners, 1, "{id}: {claims:?}");
        }
    });

    both_backends!(a_sweep_after_a_reread_drops_resolved_and_expired_reservations, |test: TestStore| async move {
        let store = test.store.clone();
        test.insert_user("u").await;
        let node = Reservations::new(store.clone(), "n1/a", LEASE);
        node.claim("u", "d", vec![change("gone"), change("indexed"), change("live")]).await.unwrap();
        store
            .call(|connection| {
                connection.execute("UPDATE push_reservations SET expires_at_ms = 0 WHERE change_id = 'gone'", &[])?;
                connection.execute(
                    "INSERT INTO pushed_changes (user_id, device_id, change_id, kafka_offset, digest) VALUES ('u', 'd', 'indexed', 3, ?1)",
                    values![vec![0u8; 16]],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let before_reread = node.database_now_ms().await.unwrap();
        assert_eq!(node.sweep("u", before_reread).await.unwrap(), 2);
        let other = Reservations::new(store.clone(), "n2/b", LEASE);
        assert_eq!(other.claim("u", "d", vec![change("live")]).await.unwrap(), [Claim::Held], "a live lease stays");
        assert_eq!(other.claim("u", "d", vec![change("gone")]).await.unwrap(), [Claim::Won]);
    });
}
