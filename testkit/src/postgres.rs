//! PostgreSQL from Debian's package for tests: `initdb` in a temp directory, `postgres` as the
//! current (unprivileged) user on a free port of 127.0.0.1 with its unix socket in the same
//! directory, one database per test ([`Postgres::new_database`]); stopped and removed on drop.
//!
//! std, anyhow and tempfile only: the broker's own unit tests include this file too (they
//! cannot depend on the test kit, which depends on the broker).

use std::{
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

const START_DEADLINE: Duration = Duration::from_secs(60);
const USER: &str = "lockstep";

/// The directory of `initdb`, `pg_ctl` and `postgres`: `$LOCKSTEP_TEST_POSTGRES_BIN`, else the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian's layout; `scripts/test` installs it).
pub fn postgres_binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LOCKSTEP_TEST_POSTGRES_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).context(
        "no PostgreSQL under /usr/lib/postgresql/*/bin (install Debian's postgresql package, or set \
         LOCKSTEP_TEST_POSTGRES_BIN)",
    )
}

/// A command for PostgreSQL's own programs. PostgreSQL refuses to run as root: as root (a
/// container), they run as `$LOCKSTEP_TEST_POSTGRES_USER` (default `postgres`, which Debian's package
/// creates) through `setpriv`, and the directory is given to that user.
fn postgres_command(program: &Path, dir: &Path) -> anyhow::Result<Command> {
    let running_as_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false);
    let mut command = if running_as_root {
        let user = std::env::var("LOCKSTEP_TEST_POSTGRES_USER").unwrap_or_else(|_| "postgres".into());
        let owned = Command::new("chown").arg("-R").arg(format!("{user}:")).arg(dir).status()?;
        if !owned.success() {
            bail!("cannot give {} to the user {user} (PostgreSQL does not run as root)", dir.display());
        }
        let mut command = Command::new("setpriv");
        command.args([&format!("--reuid={user}"), &format!("--regid={user}"), "--clear-groups", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    };
    command.current_dir(dir);
    Ok(command)
}

/// One PostgreSQL server of a test.
pub struct Postgres {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// initdb and start (a second or two); blocks the calling thread.
    pub fn start() -> anyhow::Result<Self> {
        let bin = postgres_binaries()?;
        let mut dir = tempfile::Builder::new().prefix("lockstep-postgres-").tempdir()?;
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let initdb = postgres_command(&bin.join("initdb"), dir.path())?
            .args(["--auth=trust", "--encoding=UTF8", "--no-sync", "--username", USER, "-D"])
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .context("cannot run initdb")?;
        if !initdb.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        }
        // A port taken meanwhile by another process makes postgres exit at once: try another.
        let mut last_error = None;
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
            let child = postgres_command(&bin.join("postgres"), dir.path())?
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-k"])
                .arg(dir.path())
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "shared_buffers=16MB"])
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .spawn()
                .context("cannot start postgres")?;
            let mut server = Self { child: Some(child), port, dir };
            match server.wait_ready() {
                Ok(()) => return Ok(server),
                Err(error) => {
                    last_error = Some(error);
                    server.stop();
                    dir = std::mem::replace(&mut server.dir, tempfile::tempdir()?);
                }
            }
        }
        let mut text = String::new();
        let _ = std::fs::File::open(&log).and_then(|mut file| file.read_to_string(&mut text));
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("postgres did not start"))).context(text)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("postgres exited at start ({status})");
                }
            }
            if self.psql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_DEADLINE {
                bail!("postgres did not answer within {START_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of its unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs one SQL command with psql (over the unix socket) in `database`; its output.
    pub fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let output = Command::new("psql")
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database, "-X", "-A", "-t", "-v"])
            .args(["ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("cannot run psql")?;
        if !output.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A new, empty database with a name no other test uses; its `postgres://` URL.
    pub fn new_database(&self) -> anyhow::Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("lockstep_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// The URL of `database` (TCP on 127.0.0.1, as a server elsewhere would be reached).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server now (SIGQUIT, PostgreSQL's immediate shutdown, which also ends its
    /// backends; its data is thrown away with the directory).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
