//! Optional `perf` profiles of the server during a workload, summarised by
//! thread and by symbol for the report.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Profiler {
    name: String,
    child: Child,
    data: PathBuf,
}

pub struct Profile {
    pub name: String,
    pub by_thread: String,
    pub by_symbol: String,
}

impl Profiler {
    /// Starts `perf record` on `pid` when `enabled` and perf is there.
    pub fn start_if(enabled: bool, pid: u32, name: &str) -> Option<Self> {
        if !enabled {
            return None;
        }
        let data = std::env::temp_dir().join(format!("lockstep-bench-{name}-{pid}.perf.data"));
        let child = Command::new("perf")
            .args(["record", "-F", "499", "-g", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| eprintln!("  perf is not available: {error}"))
            .ok()?;
        std::thread::sleep(Duration::from_millis(300));
        Some(Self { name: name.to_string(), child, data })
    }

    pub fn finish(mut self) -> Profile {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let report = |sort: &str, limit: usize| {
            let output = Command::new("perf")
                .args(["report", "--no-children", "--stdio", "-g", "none", "--percent-limit", "1", "--sort", sort])
                .arg("-i")
                .arg(&self.data)
                .stderr(Stdio::null())
                .output();
            match output {
                Ok(output) => String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
                    .take(limit)
                    .map(|line| line.trim_end_matches([' ', '-']))
                    .collect::<Vec<_>>()
                    .join("\n"),
                Err(error) => format!("(perf report failed: {error})"),
            }
        };
        let profile =
            Profile { name: self.name.clone(), by_thread: report("comm", 12), by_symbol: report("dso,symbol", 20) };
        let _ = std::fs::remove_file(&self.data);
        profile
    }
}
