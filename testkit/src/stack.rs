//! Kafka + server + first device in one line:
//! `let Stack { kafka, server, device } = Stack::start("phone").await?;`
//! (or [`CliStack`] for a device driven through `lockstep-cli`).
//!
//! A stack runs on the test binary's shared broker ([`Kafka::shared`]): each
//! server names its topics and groups after fresh account ids, so tests keep
//! apart. A test that kills, restarts or reconfigures Kafka asks for a broker
//! of its own ([`Stack::start_own`], [`CliStack::start_own`]).

use std::ops::{Deref, DerefMut};

use crate::{cli::Cli, device::Device, kafka::Kafka, server::Server};

/// The broker of a stack: the test binary's shared one, or one of its own.
pub enum Broker {
    Shared(&'static Kafka),
    Own(Box<Kafka>),
}

impl Broker {
    /// The shared broker of this test binary.
    pub async fn shared() -> anyhow::Result<Self> {
        Ok(Self::Shared(Kafka::shared().await?))
    }

    /// A fresh broker of the caller's own.
    pub async fn own() -> anyhow::Result<Self> {
        Ok(Self::Own(Box::new(Kafka::start().await?)))
    }
}

impl Deref for Broker {
    type Target = Kafka;

    fn deref(&self) -> &Kafka {
        match self {
            Broker::Shared(kafka) => kafka,
            Broker::Own(kafka) => kafka,
        }
    }
}

impl DerefMut for Broker {
    /// Only a broker of the test's own may be killed, restarted or reconfigured.
    fn deref_mut(&mut self) -> &mut Kafka {
        match self {
            Broker::Shared(_) => {
                panic!("the shared Kafka of the test binary cannot be changed: start the stack with start_own")
            }
            Broker::Own(kafka) => kafka,
        }
    }
}

/// A Kafka broker, a `lockstep` server on it, and a new account whose first
/// device is `device`. Every process the stack started is killed when its part is dropped.
pub struct Stack {
    pub kafka: Broker,
    pub server: Server,
    pub device: Device,
}

impl Stack {
    /// The stack on the shared broker, with test-friendly server settings (1 s heartbeats).
    pub async fn start(device_name: &str) -> anyhow::Result<Self> {
        Self::start_with(device_name, &[]).await
    }

    /// Like [`Stack::start`], with extra `LOCKSTEP_*` settings for the server.
    pub async fn start_with(device_name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::on(Broker::shared().await?, device_name, env).await
    }

    /// Like [`Stack::start`], on a broker of its own (to kill, restart or break).
    pub async fn start_own(device_name: &str) -> anyhow::Result<Self> {
        Self::start_own_with(device_name, &[]).await
    }

    /// Like [`Stack::start_with`], on a broker of its own.
    pub async fn start_own_with(device_name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::on(Broker::own().await?, device_name, env).await
    }

    async fn on(kafka: Broker, device_name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let server = start_server(&kafka, env).await?;
        let device = Device::create_account(&server, device_name).await?;
        Ok(Self { kafka, server, device })
    }
}

/// Like [`Stack`], with the first device driven through `lockstep-cli`.
pub struct CliStack {
    pub kafka: Broker,
    pub server: Server,
    pub device: Cli,
}

impl CliStack {
    /// The shared broker, a server on it, and `lockstep-cli init` as `device_name`.
    pub async fn start(device_name: &str) -> anyhow::Result<Self> {
        Self::on(Broker::shared().await?, device_name).await
    }

    /// Like [`CliStack::start`], on a broker of its own (to kill, restart or break).
    pub async fn start_own(device_name: &str) -> anyhow::Result<Self> {
        Self::on(Broker::own().await?, device_name).await
    }

    async fn on(kafka: Broker, device_name: &str) -> anyhow::Result<Self> {
        let server = start_server(&kafka, &[]).await?;
        let device = Cli::init(device_name, &server).await?;
        Ok(Self { kafka, server, device })
    }
}

/// A server on `kafka`. On the shared broker it gets an events topic of its own
/// (unless `env` names one), so that no other test's server, worker or dashboard
/// shares its events or the offsets of its events follower.
async fn start_server(kafka: &Broker, env: &[(&str, &str)]) -> anyhow::Result<Server> {
    let events_topic = format!("lockstep.events.test-{}", uuid::Uuid::new_v4());
    let mut settings = Vec::with_capacity(env.len() + 1);
    if matches!(kafka, Broker::Shared(_)) && !env.iter().any(|(key, _)| *key == "LOCKSTEP_EVENTS__TOPIC") {
        settings.push(("LOCKSTEP_EVENTS__TOPIC", events_topic.as_str()));
    }
    settings.extend_from_slice(env);
    Server::start_with(kafka, &settings).await
}
