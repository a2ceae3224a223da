//! Accounts in PostgreSQL (`database.url`, issue 21): the real `lockstep` binary with Debian's
//! PostgreSQL started by the test kit, against a real Apache Kafka. The same flows as with
//! SQLite — account, pairing, push and live delivery, revocation, restart — and what only a
//! shared database shows: two nodes racing to redeem one pairing ticket.

use std::time::Duration;

use anyhow::Context as _;
use lockstep_e2e::{
    device::{Device, changes, receive_changes, with_token},
    kafka::Kafka,
    server::Server,
};
use lockstep_proto::{
    retry,
    v1::{
        CreatePairingTicketRequest, ListDevicesRequest, PushRequest, RedeemPairingTicketRequest, RevokeDeviceRequest,
    },
};
use lockstep_testkit::postgres::Postgres;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// A PostgreSQL server of this test, a database in it, and that database's URL.
async fn postgres() -> anyhow::Result<(Postgres, String, String)> {
    let server = tokio::task::spawn_blocking(Postgres::start).await??;
    let url = server.new_database()?;
    let database = url.rsplit('/').next().unwrap_or_default().to_string();
    Ok((server, url, database))
}

fn count(postgres: &Postgres, database: &str, sql: &str) -> anyhow::Result<i64> {
    Ok(postgres.psql(database, sql)?.trim().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_in_postgresql_pair_sync_revoke_and_survive_a_restart() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let (database_server, url, database) = postgres().await?;
    let mut server = Server::start_with(kafka, &[("LOCKSTEP_DATABASE__URL", &url)]).await?;
    let mut phone = Device::create_account(&server, "phone").await?;
    let laptop = phone.pair(&server, "laptop").await?;
    assert_eq!(laptop.user_id, phone.user_id);

    // Push on one device, live delivery on the other.
    let mut stream = laptop.subscribe(None).await?;
    let pushed = changes(5, 64);
    let offsets = phone.push_ok(pushed.clone()).await?;
    assert_eq!(offsets, [0, 1, 2, 3, 4]);
    let received = receive_changes(&mut stream, 5, WAIT).await?;
    assert_eq!(received.offsets(), offsets);

    // The accounts and the dedup index are in PostgreSQL, not in the node-local SQLite.
    let user_filter = format!("user_id = '{}'", phone.user_id);
    assert_eq!(count(&database_server, &database, &format!("SELECT count(*) FROM devices WHERE {user_filter}"))?, 2);
    let shared_index = format!("SELECT count(*) FROM pushed_changes WHERE {user_filter}");
    assert_eq!(count(&database_server, &database, &shared_index)?, 5);
    let local = rusqlite::Connection::open(server.data_dir().join("lockstep.db"))?;
    let local_devices: i64 = local.query_row("SELECT count(*) FROM devices", [], |row| row.get(0))?;
    let local_index: i64 = local.query_row("SELECT count(*) FROM pushed_changes", [], |row| row.get(0))?;
    assert_eq!((local_devices, local_index), (0, 0));
    drop(local);

    // Revoked: the laptop's token is refused, on this process and after a restart.
    phone
        .accounts
        .clone()
        .revoke_device(phone.request(RevokeDeviceRequest { device_id: laptop.device_id.clone() }))
        .await?;
    let refused = laptop.push(changes(1, 8)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    server.restart().await?;
    phone.reconnect(&server).await?;
    let mut laptop = laptop;
    laptop.reconnect(&server).await?;
    let refused = laptop.push(changes(1, 8)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // The phone's account, devices and dedup index are all still there: a retry of a change
    // pushed before the restart gets its first offset, a new change the next one.
    assert_eq!(phone.push_ok(pushed[..1].to_vec()).await?, [0]);
    assert_eq!(phone.push_ok(changes(1, 8)).await?, [5]);
    let listed = phone.accounts.clone().list_devices(phone.request(ListDevicesRequest {})).await?.into_inner();
    assert_eq!(listed.devices.len(), 2);
    let revoked = listed.devices.iter().find(|device| device.device_id == laptop.device_id).expect("listed");
    assert!(revoked.revoked_at_ms > 0, "{revoked:?}");
    Ok(())
}

/// Two nodes on one PostgreSQL redeem the same pairing ticket at the same moment: exactly one
/// gets a device, again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pairing_ticket_redeemed_on_two_nodes_at_once_pairs_exactly_one_device() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let (database_server, url, database) = postgres().await?;
    let settings = [("LOCKSTEP_DATABASE__URL", url.as_str())];
    let (first, second) = (Server::start_with(kafka, &settings).await?, Server::start_with(kafka, &settings).await?);
    let phone = Device::create_account(&first, "phone").await?;
    for round in 0..10 {
        let ticket = phone
            .accounts
            .clone()
            .create_pairing_ticket(phone.request(CreatePairingTicketRequest {}))
            .await?
            .into_inner()
            .ticket;
        let (mut to_first, mut to_second) = (first.accounts().await?, second.accounts().await?);
        let request = |name: &str| RedeemPairingTicketRequest { ticket: ticket.clone(), device_name: name.into() };
        let (on_first, on_second) =
            tokio::join!(to_first.redeem_pairing_ticket(request("a")), to_second.redeem_pairing_ticket(request("b")));
        let paired = [&on_first, &on_second].iter().filter(|outcome| outcome.is_ok()).count();
        assert_eq!(paired, 1, "round {round}: {on_first:?} / {on_second:?}");
        let status = [on_first, on_second].into_iter().find_map(Result::err).expect("one refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let devices = count(
        &database_server,
        &database,
        &format!("SELECT count(*) FROM devices WHERE user_id = '{}'", phone.user_id),
    )?;
    assert_eq!(devices, 11);
    Ok(())
}

/// A server whose PostgreSQL is unreachable does not start: it exits non-zero and says why
/// (without the password), no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgresql_stops_the_start_with_a_readable_error() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("postgres://lockstep:hunter2@127.0.0.1:{port}/lockstep");
    let data = tempfile::tempdir()?;
    let mut command = std::process::Command::new(lockstep_e2e::server::lockstep_binary()?);
    for (variable, _) in std::env::vars_os() {
        if variable.to_string_lossy().starts_with("LOCKSTEP_") {
            command.env_remove(variable);
        }
    }
    let output = command
        .args(["--listen", "127.0.0.1:0", "--kafka-brokers", kafka.bootstrap(), "--data-dir"])
        .arg(data.path())
        .env("LOCKSTEP_DATABASE__URL", &url)
        .env("LOCKSTEP_ADMIN_LISTEN_ADDR", "127.0.0.1:0")
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let expected = format!("cannot connect to PostgreSQL at postgres://lockstep:***@127.0.0.1:{port}/lockstep");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("hunter2") && !stderr.contains("panicked"), "{stderr}");
    Ok(())
}

/// `lockstep_token_lookups_total{found="no"}`: database lookups that found no device.
async fn unknown_token_lookups(server: &Server) -> anyhow::Result<f64> {
    let admin = server.admin_addr().context("the server printed its admin address")?;
    let (_, metrics) = lockstep_e2e::http_get(admin, "/metrics").await?;
    Ok(metrics
        .lines()
        .find_map(|line| line.strip_prefix("lockstep_token_lookups_total{found=\"no\"} "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or_default())
}

/// With a shared database a node asks it about every token it has not seen, so made-up tokens
/// would each cost a query: past `rate_limits.unknown_token_lookups_per_address` they are shed
/// (RESOURCE_EXHAUSTED, retryable) without one, while known tokens and tokens already found
/// unknown are answered from the cache as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_tokens_cost_the_shared_database_a_bounded_number_of_lookups() -> anyhow::Result<()> {
    let kafka = Kafka::shared().await?;
    let (_database_server, url, _) = postgres().await?;
    let server = Server::start_with(
        kafka,
        &[
            ("LOCKSTEP_DATABASE__URL", &url),
            ("LOCKSTEP_RATE_LIMITS__UNKNOWN_TOKEN_LOOKUPS_PER_ADDRESS__BURST", "5"),
            ("LOCKSTEP_RATE_LIMITS__UNKNOWN_TOKEN_LOOKUPS_PER_ADDRESS__PER_HOUR", "1"),
        ],
    )
    .await?;
    let phone = Device::create_account(&server, "phone").await?;
    let push_as = |token: String| {
        let mut sync = phone.sync.clone();
        async move { sync.push(with_token(PushRequest { changes: changes(1, 8) }, &token)).await.map(|_| ()) }
    };
    let made_up: Vec<String> = (0..8).map(|index| format!("lst_made_up_{index}_{}", phone.user_id)).collect();

    // The first five are looked up (and not found): refused as unknown.
    for token in &made_up[..5] {
        let refused = push_as(token.clone()).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
    assert_eq!(unknown_token_lookups(&server).await?, 5.0);
    // The rest are shed before the database is asked.
    for token in &made_up[5..] {
        let shed = push_as(token.clone()).await.unwrap_err();
        assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
        assert!(retry::is_retryable(&shed), "{shed:?}");
        assert!(retry::retry_after(&shed).is_some_and(|wait| wait > Duration::ZERO), "{shed:?}");
        assert!(shed.message().contains("unknown device tokens"), "{shed:?}");
    }
    assert_eq!(unknown_token_lookups(&server).await?, 5.0, "no lookup past the limit");
    // A token found unknown before is refused from the negative cache, as unknown, with no lookup;
    // the account's own device is served from the cache.
    let refused = push_as(made_up[0].clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(phone.push_ok(changes(2, 8)).await?, [0, 1]);
    assert_eq!(unknown_token_lookups(&server).await?, 5.0);
    Ok(())
}
