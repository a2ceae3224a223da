//! Exactly one append per change id across several Lockstep nodes on one Apache Kafka and one
//! PostgreSQL (issue 21, point 3): the dedup index and the reservations taken before producing
//! are in the shared database (`gateway::reservation`). Every check reads the user's topic
//! itself, not the answers alone.
//! - a push answered on node 1 and retried on node 2 (and the reverse) is in the log once, and
//!   every answer carries the first offset; a reused change id with other content is refused
//!   on the other node too;
//! - the same push sent to two nodes at once, for 50 change ids in both orders, is in the log once
//!   each, both answers with its offset;
//! - a node killed (-9) after reserving a change, whose record reaches Kafka only after it died
//!   (held in a slow link): another node's retry waits while the lease runs, then takes the
//!   reservation over, re-reads the topic and answers with that record's offset — one append.

use std::{collections::HashMap, time::Duration};

use lockstep_e2e::{
    device::{Device, change, changes},
    free_port,
    kafka::{Kafka, KafkaOptions},
    proxy::Proxy,
    server::Server,
    user_topic,
    wait::eventually,
};
use lockstep_proto::v1::{Change, PushResult, push_result};
use lockstep_testkit::{postgres::Postgres, records::read_topic};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// A PostgreSQL server of this test and the URL of a new database in it.
async fn postgres() -> anyhow::Result<(Postgres, String)> {
    let server = tokio::task::spawn_blocking(Postgres::start).await??;
    let url = server.new_database()?;
    Ok((server, url))
}

/// Two nodes on one Kafka and one PostgreSQL, and one device connected to each (the same device).
struct TwoNodes {
    _database: Postgres,
    _nodes: [Server; 2],
    phone: Device,
    /// `phone` through node 1, then through node 2.
    on_node: [Device; 2],
}

impl TwoNodes {
    async fn start(kafka: &Kafka) -> anyhow::Result<Self> {
        let (database, url) = postgres().await?;
        let settings = [("LOCKSTEP_DATABASE__URL", url.as_str())];
        let nodes = [Server::start_with(kafka, &settings).await?, Server::start_with(kafka, &settings).await?];
        let phone = Device::create_account(&nodes[0], "phone").await?;
        let mut on_node = [phone.clone(), phone.clone()];
        on_node[1].reconnect(&nodes[1]).await?;
        Ok(Self { _database: database, _nodes: nodes, phone, on_node })
    }
}

/// The offset a push answered for its only change, or the error's code.
fn outcome(results: &[PushResult]) -> anyhow::Result<Result<(i64, bool), Code>> {
    anyhow::ensure!(results.len() == 1, "one result per change: {results:?}");
    Ok(match &results[0].result {
        Some(push_result::Result::Offset(offset)) => Ok((*offset, results[0].duplicate)),
        Some(push_result::Result::Error(error)) => Err(Code::from_i32(error.code)),
        None => anyhow::bail!("an empty result"),
    })
}

/// How many times each change id of the user's topic is there.
async fn copies(kafka: &str, device: &Device) -> anyhow::Result<HashMap<String, Vec<i64>>> {
    let mut copies: HashMap<String, Vec<i64>> = HashMap::new();
    for (offset, envelope) in read_topic(kafka, &user_topic(&device.user_id)).await? {
        copies.entry(envelope.change_id).or_default().push(offset);
    }
    Ok(copies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_retried_on_another_node_is_in_the_log_once_with_the_first_offset() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let TwoNodes { _database, _nodes, phone, on_node } = TwoNodes::start(kafka).await?;

    for (first, retry) in [(0, 1), (1, 0)] {
        let push = changes(3, 16);
        // The first attempt's answer is "lost": the device retries the same push elsewhere.
        let offsets = on_node[first].push_ok(push.clone()).await?;
        let retried = on_node[retry].push(push.clone()).await?;
        for (result, offset) in retried.iter().zip(&offsets) {
            assert_eq!(outcome(std::slice::from_ref(result))?, Ok((*offset, true)), "node {} answered", retry + 1);
        }
        // And once more through the first node, which may hold a view of the index of its own.
        let again = on_node[first].push(push).await?;
        assert_eq!(
            again.iter().map(|result| outcome(std::slice::from_ref(result))).collect::<Result<Vec<_>, _>>()?,
            offsets.iter().map(|offset| Ok((*offset, true))).collect::<Vec<_>>()
        );
    }
    // A different change under a used id is refused by the node that did not write it, too.
    let original = change("r", 16);
    let offset = on_node[0].push_ok(vec![original.clone()]).await?[0];
    let reused = Change { ciphertext: b"something else".to_vec().into(), ..original };
    assert_eq!(outcome(&on_node[1].push(vec![reused]).await?)?, Err(Code::AlreadyExists), "at offset {offset}");

    let copies = copies(kafka.bootstrap(), &phone).await?;
    assert_eq!(copies.len(), 7, "{copies:?}");
    assert!(copies.values().all(|offsets| offsets.len() == 1), "appended twice: {copies:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_push_sent_to_two_nodes_at_once_is_in_the_log_once() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let TwoNodes { _database, _nodes, phone, on_node } = TwoNodes::start(kafka).await?;

    let mut pushed = Vec::new();
    for round in 0..50 {
        let push = vec![change(&format!("r{round}"), 16)];
        // Both orders: which node gets the push first alternates. Every third round both go to
        // one node: there the attempts are told apart in memory before either reserves (a
        // reservation this process holds reads as its own finished attempt).
        let (first, second) = match round % 3 {
            0 => (&on_node[0], &on_node[1]),
            1 => (&on_node[1], &on_node[0]),
            _ => (&on_node[round % 2], &on_node[round % 2]),
        };
        let (a, b) = tokio::join!(first.push(push.clone()), second.push(push.clone()));
        let (a, b) = (outcome(&a?)?, outcome(&b?)?);
        let (Ok((offset_a, duplicate_a)), Ok((offset_b, duplicate_b))) = (a, b) else {
            anyhow::bail!("round {round}: {a:?} and {b:?}");
        };
        assert_eq!(offset_a, offset_b, "round {round}: both answers carry the one offset");
        assert!(duplicate_a != duplicate_b, "round {round}: one attempt wrote it, the other found it");
        pushed.push((push[0].change_id.clone(), offset_a));
    }
    let copies = copies(kafka.bootstrap(), &phone).await?;
    assert_eq!(copies.len(), 50, "{copies:?}");
    for (change_id, offset) in pushed {
        assert_eq!(copies.get(&change_id), Some(&vec![offset]), "{change_id}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_after_reserving_leaves_one_append_after_the_lease() -> anyhow::Result<()> {
    // Kafka behind a proxy (it advertises the proxy's port): the proxy holds node 1's produce
    // request while node 1 dies, and hands it to Kafka afterwards — a record that lands after
    // its writer died without recording it.
    let port = free_port()?;
    let proxy = Proxy::start(([127, 0, 0, 1], port).into()).await?;
    let kafka = Kafka::start_with(KafkaOptions {
        port: Some(port),
        advertised_port: Some(proxy.port()),
        ..KafkaOptions::default()
    })
    .await?;
    let bootstrap = proxy.addr().to_string();
    let (database, url) = postgres().await?;
    let database_name = url.rsplit('/').next().unwrap_or_default().to_owned();
    const LEASE: Duration = Duration::from_secs(30);
    let settings = [
        ("LOCKSTEP_DATABASE__URL", url.as_str()),
        ("LOCKSTEP_DATABASE__PUSH_RESERVATION_LEASE", "30s"),
        ("LOCKSTEP_KAFKA__PRODUCE_TIMEOUT", "3s"),
        ("LOCKSTEP_KAFKA__IN_DOUBT_WINDOW", "5s"),
    ];
    let mut node1 = Server::start_with_kafka(&bootstrap, &settings).await?;
    let node2 = Server::start_with_kafka(&bootstrap, &settings).await?;
    let phone = Device::create_account(&node1, "phone").await?;
    let mut retrying = phone.clone();
    retrying.reconnect(&node2).await?;
    // Both producers are connected to the topic's leader before the link slows down, and node 2
    // has read the user's log: it will not re-read it for the retry unless it takes a
    // reservation over (a record landing later is in no index).
    phone.push_ok(changes(1, 16)).await?;
    retrying.push_ok(changes(1, 16)).await?;

    let lost = change("lost", 16);
    let reservations = format!("SELECT count(*) FROM push_reservations WHERE change_id = '{}'", lost.change_id);
    proxy.set_delay(Duration::from_secs(6));
    let attempt = {
        let (phone, lost) = (phone.clone(), lost.clone());
        tokio::spawn(async move { phone.push(vec![lost]).await })
    };
    eventually(WAIT, "node 1 reserving the change", || async {
        anyhow::Ok(database.psql(&database_name, &reservations)?.trim() == "1")
    })
    .await?;
    let reserved_at = tokio::time::Instant::now();
    // librdkafka sends the record a few milliseconds after the reservation (linger 2 ms); the
    // proxy then holds it. The record's arrival in the topic below is the evidence it did.
    tokio::time::sleep(Duration::from_millis(500)).await;
    node1.kill9();
    proxy.set_delay(Duration::ZERO);
    let _ = attempt.await;

    let landed = eventually(WAIT, "node 1's record reaching the topic after node 1 died", || async {
        anyhow::Ok(copies(kafka.bootstrap(), &phone).await?.get(&lost.change_id).cloned())
    })
    .await?;
    assert_eq!(landed.len(), 1, "{landed:?}");

    // While node 1's lease runs, node 2 neither writes nor answers it (node 1 might still).
    let early = outcome(&retrying.push(vec![lost.clone()]).await?)?;
    assert!(reserved_at.elapsed() < LEASE, "the retry came too late for this check: {:?}", reserved_at.elapsed());
    assert_eq!(early, Err(Code::Unavailable), "a retry during the lease");
    // Past it, node 2 takes the reservation over, re-reads the log and finds the record.
    let answered = eventually(WAIT, "node 2 answering after the lease", || async {
        match outcome(&retrying.push(vec![lost.clone()]).await?)? {
            Ok(written) => Ok(Some(written)),
            Err(Code::Unavailable) => Ok(None),
            Err(code) => anyhow::bail!("{code:?}"),
        }
    })
    .await?;
    assert_eq!(answered, (landed[0], true), "the retry gets the dead node's offset");
    let copies = copies(kafka.bootstrap(), &phone).await?;
    assert_eq!(copies.get(&lost.change_id), Some(&landed), "one append: {copies:?}");
    assert_eq!(database.psql(&database_name, &reservations)?.trim(), "0", "the settled reservation is gone");
    Ok(())
}
