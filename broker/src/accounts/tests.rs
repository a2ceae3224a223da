use std::time::Duration;

use super::*;
use crate::{both_backends, store::testing::TestStore};

async fn accounts(store: &TestStore, ttl: Duration) -> Accounts {
    Accounts::open(store.store.clone(), ttl).await.unwrap()
}

both_backends!(tokens_authenticate_and_survive_reopen, |store: TestStore| async move {
    let accounts = accounts(&store, Duration::from_secs(60)).await;
    let first = accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
    assert!(first.token.len() >= 40, "token too short: {}", first.token);
    let authed = accounts.authenticate(&first.token).unwrap();
    assert_eq!(&*authed.device_id, first.device_id);
    assert!(accounts.authenticate("lst_nope").is_none());
    drop(accounts);
    let reopened = Accounts::open(store.reopen().await, Duration::from_secs(60)).await.unwrap();
    assert_eq!(reopened.authenticate(&first.token).unwrap().user_id.as_ref(), "u1");
});

both_backends!(tickets_are_one_time_and_expire, |store: TestStore| async move {
    let accounts = accounts(&store, Duration::from_secs(60)).await;
    let first = accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
    let device = accounts.authenticate(&first.token).unwrap();
    let (ticket, expires) = accounts.create_pairing_ticket(&device).await.unwrap();
    assert!(expires > now_ms());
    let second = accounts.redeem_pairing_ticket(&ticket, "phone".into()).await.unwrap();
    assert_eq!(second.user_id, "u1");
    assert_ne!(second.device_id, first.device_id);
    assert!(matches!(
        accounts.redeem_pairing_ticket(&ticket, "tablet".into()).await,
        Err(AccountsError::TicketInvalid)
    ));
    assert_eq!(accounts.list_devices("u1").await.unwrap().len(), 2);

    let short = Accounts::open(store.store.clone(), Duration::from_millis(1)).await.unwrap();
    let first = short.create_account("u2".into(), "laptop".into()).await.unwrap();
    let device = short.authenticate(&first.token).unwrap();
    let (ticket, _) = short.create_pairing_ticket(&device).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(matches!(short.redeem_pairing_ticket(&ticket, "phone".into()).await, Err(AccountsError::TicketInvalid)));
});

both_backends!(revoke_is_scoped_to_the_account, |store: TestStore| async move {
    let accounts = accounts(&store, Duration::from_secs(60)).await;
    let alice = accounts.create_account("alice".into(), "laptop".into()).await.unwrap();
    let bob = accounts.create_account("bob".into(), "laptop".into()).await.unwrap();
    assert!(matches!(accounts.revoke_device("bob", &alice.device_id).await, Err(AccountsError::DeviceNotFound)));
    assert!(accounts.authenticate(&alice.token).is_some());
    let ticket = accounts.create_pairing_ticket(&accounts.authenticate(&alice.token).unwrap()).await.unwrap().0;
    accounts.revoke_device("alice", &alice.device_id).await.unwrap();
    assert!(accounts.authenticate(&alice.token).is_none());
    assert!(accounts.authenticate(&bob.token).is_some());
    // A revoked device's open tickets die with it.
    assert!(accounts.redeem_pairing_ticket(&ticket, "phone".into()).await.is_err());
    let listed = accounts.list_devices("alice").await.unwrap();
    assert!(listed[0].revoked_at_ms.is_some());
});

both_backends!(an_invite_is_spent_with_the_account_or_not_at_all, |store: TestStore| async move {
    let accounts = accounts(&store, Duration::from_secs(60)).await;
    let code = accounts.invites().create(1, Duration::from_secs(60), "").await.unwrap().remove(0).code;
    let claim = accounts.invites().claim(&code).await.unwrap();
    let invite_id = claim.invite_id();
    // Revoked while the topic was being created: no account, nothing written.
    accounts.invites().revoke(invite_id).await.unwrap();
    assert!(accounts.create_account_with_invite("u1".into(), "laptop".into(), claim).await.unwrap().is_none());
    assert!(accounts.list_devices("u1").await.unwrap().is_empty());

    let code = accounts.invites().create(1, Duration::from_secs(60), "").await.unwrap().remove(0).code;
    let claim = accounts.invites().claim(&code).await.unwrap();
    let created = accounts.create_account_with_invite("u2".into(), "laptop".into(), claim).await.unwrap().unwrap();
    assert!(accounts.authenticate(&created.token).is_some());
    let listed = accounts.invites().list().await.unwrap();
    assert_eq!(listed[1].used_by_user.as_deref(), Some("u2"));
    assert!(accounts.invites().claim(&code).await.is_err(), "spent");
});

// Many redemptions of one ticket at once, each on its own connection: exactly one pairs a
// device (PostgreSQL's READ COMMITTED re-checks the ticket's row; SQLite has one writer).
both_backends!(a_ticket_redeemed_concurrently_pairs_exactly_one_device, |store: TestStore| async move {
    let accounts = accounts(&store, Duration::from_secs(60)).await;
    let first = accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
    let device = accounts.authenticate(&first.token).unwrap();
    for round in 0..5 {
        let (ticket, _) = accounts.create_pairing_ticket(&device).await.unwrap();
        let attempts: Vec<_> = (0..4)
            .map(|attempt| {
                let (accounts, ticket) = (accounts.clone(), ticket.clone());
                tokio::spawn(async move { accounts.redeem_pairing_ticket(&ticket, format!("d{attempt}")).await })
            })
            .collect();
        let mut paired = 0;
        for attempt in attempts {
            match attempt.await.unwrap() {
                Ok(_) => paired += 1,
                Err(AccountsError::TicketInvalid) => {}
                Err(other) => panic!("round {round}: {other}"),
            }
        }
        assert_eq!(paired, 1, "round {round}");
    }
    assert_eq!(accounts.list_devices("u1").await.unwrap().len(), 6);
});

// Two redemptions of different tickets of an account at its device limit: one pairs.
both_backends!(the_device_limit_holds_under_concurrent_pairing, |store: TestStore| async move {
    let accounts = accounts(&store, Duration::from_secs(60)).await.with_max_devices(2);
    let first = accounts.create_account("u1".into(), "laptop".into()).await.unwrap();
    let device = accounts.authenticate(&first.token).unwrap();
    for _ in 0..3 {
        let (one, _) = accounts.create_pairing_ticket(&device).await.unwrap();
        let (two, _) = accounts.create_pairing_ticket(&device).await.unwrap();
        let (a, b) = tokio::join!(
            accounts.redeem_pairing_ticket(&one, "phone".into()),
            accounts.redeem_pairing_ticket(&two, "tablet".into())
        );
        let paired: Vec<NewDevice> = [a, b].into_iter().filter_map(Result::ok).collect();
        assert_eq!(paired.len(), 1);
        assert_eq!(accounts.list_devices("u1").await.unwrap().iter().filter(|d| d.revoked_at_ms.is_none()).count(), 2);
        accounts.revoke_device("u1", &paired[0].device_id).await.unwrap();
    }
});

// Two nodes on one PostgreSQL: what one writes, the other's token cache learns from the database.
both_backends!(a_token_cache_falls_back_to_the_shared_database, |store: TestStore| async move {
    let first = accounts(&store, Duration::from_secs(60)).await;
    let second = accounts(&store, Duration::from_secs(60)).await.with_token_recheck(Duration::from_millis(50));
    let alice = first.create_account("alice".into(), "laptop".into()).await.unwrap();
    if store.store.engine() == "sqlite" {
        // One node only: its cache is the whole truth, an unknown token costs no query.
        assert_eq!(second.cached(&alice.token), CachedAuth::Refused);
        assert_eq!(first.cached(&alice.token), CachedAuth::Valid(first.authenticate(&alice.token).unwrap()));
        return;
    }
    // Created after the second node loaded its cache: unknown to it, found in the database.
    assert_eq!(second.cached(&alice.token), CachedAuth::Unknown);
    let found = second.lookup(&alice.token).await.unwrap().expect("in the database");
    assert_eq!(&*found.device_id, alice.device_id);
    assert_eq!(second.cached(&alice.token), CachedAuth::Valid(found.clone()));
    // An unknown token is remembered as refused.
    assert!(second.lookup("lst_nope").await.unwrap().is_none());
    assert_eq!(second.cached("lst_nope"), CachedAuth::Refused);
    // Revoked through the first node; the second never hears of it, but checks again.
    first.revoke_device("alice", &alice.device_id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(second.cached(&alice.token), CachedAuth::Stale);
    assert!(second.lookup(&alice.token).await.unwrap().is_none());
    assert_eq!(second.cached(&alice.token), CachedAuth::Refused);
    assert!(second.authenticate(&alice.token).is_none());
});
