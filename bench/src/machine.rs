//! The report's machine table: what ran the benchmark (CPUs, memory, kernel,
//! Apache Kafka with its JVM options and where its log lives, Redis, Java,
//! Rust, the source) and how loaded the shared machine was.

use std::{fmt::Write as _, process::Command};

use crate::{Args, procs::command_line};

/// The machine's load averages (1, 5, 15 minutes) when the run started and ended: the
/// machine is shared, so the figures say how busy it was.
pub struct Load {
    pub start: String,
    pub end: String,
}

/// The file system under the temporary directory, where each broker keeps `log.dirs`.
fn temp_file_system() -> String {
    let dir = std::env::temp_dir();
    let described = Command::new("df")
        .arg("--output=fstype,source")
        .arg(&dir)
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.lines().last().map(|line| line.split_whitespace().collect::<Vec<_>>().join(" on ")));
    format!("{} ({})", dir.display(), described.unwrap_or_else(|| "file system unknown".into()))
}

/// The machine table: hardware, the brokers and their settings, versions, the load.
pub fn table(out: &mut String, args: &Args, load: &Load) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| info.lines().find(|line| line.starts_with("model name")).map(str::to_string))
        .and_then(|line| line.split(':').nth(1).map(|model| model.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| info.lines().next().map(str::to_string))
        .and_then(|line| line.split_whitespace().nth(1).and_then(|kib| kib.parse::<f64>().ok()))
        .map_or("unknown".into(), |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0));
    let redis = args.redis_bin.to_string_lossy();
    let rows = [
        ("CPUs (nproc)", command_line("nproc", &[])),
        ("CPU model", cpu),
        ("memory", memory),
        ("kernel", command_line("uname", &["-sr"])),
        (
            "Apache Kafka",
            format!(
                "{} (one combined KRaft node, broker + controller; JVM: {})",
                lockstep_testkit::kafka::KAFKA_VERSION,
                jvm_options()
            ),
        ),
        ("Kafka's log.dirs", temp_file_system()),
        ("java", command_line("java", &["-version"])),
        ("redis-server", command_line(&redis, &["--version"])),
        ("rustc", command_line("rustc", &["--version"])),
        ("lockstep", command_line(&args.lockstep_bin.to_string_lossy(), &["--version"])),
        ("source", command_line("git", &["describe", "--always", "--dirty"])),
        ("load average (1, 5, 15 min) at the start", load.start.clone()),
        ("load average (1, 5, 15 min) at the end", load.end.clone()),
    ];
    out.push_str("| | |\n| --- | --- |\n");
    for (name, value) in rows {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    out.push('\n');
}

/// The brokers' JVM options, one line: `scripts/kafka/jvm.options`, then what the
/// test kit adds from the environment (scripts/bench sets `LOCKSTEP_KAFKA_JVM_OPTS`,
/// blank by default: full JIT, not the tests' `-XX:TieredStopAtLevel=1`).
fn jvm_options() -> String {
    let heap = std::env::var("LOCKSTEP_KAFKA_HEAP_OPTS").ok().filter(|heap| !heap.trim().is_empty());
    let mut options: Vec<String> = lockstep_testkit::kafka::JVM_OPTIONS
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter(|line| heap.is_none() || !(line.starts_with("-Xmx") || line.starts_with("-Xms")))
        .map(String::from)
        .collect();
    options.extend(heap.iter().flat_map(|heap| heap.split_whitespace().map(String::from)));
    match std::env::var("LOCKSTEP_KAFKA_JVM_OPTS") {
        Ok(extra) if extra.trim().is_empty() => options.push("(full JIT)".into()),
        Ok(extra) => options.extend(extra.split_whitespace().map(String::from)),
        Err(_) => options.push("-XX:TieredStopAtLevel=1 (the test kit's default: C1 only)".into()),
    }
    options.join(" ")
}
