//! A child process of a test or a benchmark: killed (`kill -9`) when
//! dropped, so that a failing test never leaves a broker or a server behind.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};

use crate::{
    log_tail,
    wait::{eventually, failed, not_yet, ready},
};

pub struct Process {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Process {
    /// Starts `command` (its output already pointed at `log`).
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let child = command.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Self { child, name: name.into(), log: log.to_path_buf() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child itself (e.g. to take its stdout).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// How the process ended, if it did.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the process accepts connections on `port` of 127.0.0.1;
    /// fails with its log if it exits first or does not answer by `deadline`.
    pub async fn wait_for_port(&mut self, port: u16, deadline: Duration) -> anyhow::Result<()> {
        // `exited` needs `&mut`; the condition is called again and again.
        let this = Mutex::new(&mut *self);
        let answered = eventually(deadline, format!("a connection to port {port}"), || async {
            let mut this = this.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(status) = this.exited() {
                return failed(anyhow!("{} exited at start ({status}):\n{}", this.name, this.log_tail()));
            }
            match TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) {
                Ok(_) => ready(()),
                Err(error) => not_yet(error),
            }
        })
        .await;
        answered.map_err(|error| anyhow!("{}: {error:#}\n{}", self.name, self.log_tail()))
    }

    /// SIGTERM, then waits for the exit (`kill -9` after `deadline`, an
    /// error then). Returns whether the process exited successfully. Blocks
    /// the calling thread while it waits (test and benchmark code only).
    pub fn terminate(mut self, deadline: Duration) -> anyhow::Result<bool> {
        let sent = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status()?;
        if !sent.success() {
            bail!("kill -TERM {} failed", self.name);
        }
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Ok(status.success());
            }
            if started.elapsed() > deadline {
                bail!("{} did not stop within {deadline:?} of SIGTERM:\n{}", self.name, self.log_tail());
            }
            // A blocking wait by contract (see above): eventually is async.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
