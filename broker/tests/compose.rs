//! `docker-compose.yml` is not run here (no Docker engine), so it is held honest another way:
//! it parses as YAML (Python's PyYAML, merge keys and all, as Compose reads them), every
//! `LOCKSTEP_*` variable it gives a Lockstep node is a setting the server loads (the settings
//! refuse unknown keys) with the value the file means, and the nodes it runs are the nodes
//! HAProxy's config (`config/haproxy.cfg`) sends devices to.

// figment::Jail's closures return figment::Error, which is large; fine in tests.
#![allow(clippy::result_large_err)]

use std::{collections::BTreeMap, path::Path, process::Command};

use lockstep_broker::settings::Settings;

fn repo_path(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every service of docker-compose.yml that runs the `lockstep` server (built from the
/// Dockerfile, its entrypoint not replaced), with its environment after Compose's
/// interpolation: `${VAR:-default}` is the default, `${VAR:?message}` a placeholder.
fn server_services() -> BTreeMap<String, BTreeMap<String, String>> {
    let script = r#"
import json, re, sys, yaml
compose = yaml.safe_load(open(sys.argv[1]))
def interpolate(value):
    def one(match):
        name, kind, rest = match.group(1), match.group(2), match.group(3)
        return rest if kind == ":-" else "placeholder-" + name.lower()
    return re.sub(r"\$\{([A-Z0-9_]+)(:[-?])([^}]*)\}", one, str(value))
servers = {
    name: {key: interpolate(value) for key, value in (service.get("environment") or {}).items()}
    for name, service in compose["services"].items()
    if "build" in service and "entrypoint" not in service
}
print(json.dumps(servers))
"#;
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(repo_path("docker-compose.yml"))
        .output()
        .expect("python3 with PyYAML (scripts/test installs it)");
    assert!(
        output.status.success(),
        "docker-compose.yml is not valid YAML: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the services as JSON")
}

#[test]
fn every_lockstep_setting_docker_compose_sets_is_one_the_server_loads() {
    let services = server_services();
    assert!(services.len() >= 3, "docker-compose.yml runs several nodes: {:?}", services.keys());
    for (service, environment) in &services {
        figment::Jail::expect_with(|jail| {
            for (key, value) in environment {
                if key.starts_with("LOCKSTEP_") {
                    jail.set_env(key, value);
                }
            }
            let settings = Settings::load(None).map_err(|error| format!("{service}: {error}"))?;
            // The values the file means, not silently dropped keys.
            assert_eq!(settings.kafka.replication_factor, 3, "{service}");
            let url = settings.database.url.clone().unwrap_or_default();
            assert!(url.starts_with("postgres://") && url.contains("@postgres:5432/"), "{service}: {url}");
            assert_eq!(settings.data_dir, Path::new("/var/lib/lockstep"), "{service}");
            assert!(settings.tls.allow_plaintext, "{service}: the nodes serve plaintext behind HAProxy");
            Ok(())
        });
    }
}

#[test]
fn haproxy_sends_devices_to_exactly_the_nodes_docker_compose_runs() {
    let nodes: Vec<String> = server_services().into_keys().collect();
    let config = std::fs::read_to_string(repo_path("config/haproxy.cfg")).unwrap();
    let servers: Vec<String> = config
        .lines()
        .filter_map(|line| line.trim().strip_prefix("server "))
        .map(|line| line.split_whitespace().nth(1).unwrap_or_default().to_string())
        .collect();
    let expected: Vec<String> = nodes.iter().map(|node| format!("{node}:50051")).collect();
    assert_eq!(servers, expected, "config/haproxy.cfg's servers and docker-compose.yml's nodes");
}
