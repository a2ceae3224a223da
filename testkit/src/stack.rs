//! Kafka + server + first device in one line:
//! `let Stack { nisshi, server, device } = Stack::start("phone").await?;`
//! (or [`CliStack`] for a device driven through `lockstep-cli`).

use crate::{cli::Cli, device::Device, nisshi::Nisshi, server::Server};

/// A fresh Nisshi, a `lockstep` server on it, and a new account whose first
/// device is `device`. Every process is killed when its part is dropped.
pub struct Stack {
    pub nisshi: Nisshi,
    pub server: Server,
    pub device: Device,
}

impl Stack {
    /// The stack with test-friendly server settings (1 s heartbeats).
    pub async fn start(device_name: &str) -> anyhow::Result<Self> {
        Self::start_with(device_name, &[]).await
    }

    /// Like [`Stack::start`], with extra `LOCKSTEP_*` settings for the server.
    pub async fn start_with(device_name: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let nisshi = Nisshi::start().await?;
        let server = Server::start_with(&nisshi, env).await?;
        let device = Device::create_account(&server, device_name).await?;
        Ok(Self { nisshi, server, device })
    }
}

/// Like [`Stack`], with the first device driven through `lockstep-cli`.
pub struct CliStack {
    pub nisshi: Nisshi,
    pub server: Server,
    pub device: Cli,
}

impl CliStack {
    /// A fresh Nisshi, a server on it, and `lockstep-cli init` as `device_name`.
    pub async fn start(device_name: &str) -> anyhow::Result<Self> {
        let nisshi = Nisshi::start().await?;
        let server = Server::start(&nisshi).await?;
        let device = Cli::init(device_name, &server).await?;
        Ok(Self { nisshi, server, device })
    }
}
