# shellcheck shell=bash
# Shared by scripts/run and scripts/test (sourced, not run).

# Apache Kafka, the local broker of scripts/run, scripts/kafka-tool and the test kit.
# Keep equal to kafka.version in scripts/kafka/pom.xml (a testkit test checks it).
KAFKA_VERSION="4.1.1"
LOCKSTEP_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

# librdkafka is built with TLS (and so SASL PLAIN/SCRAM) against the system's
# OpenSSL: its headers and pkg-config must be there (Debian: libssl-dev).
ensure_build_packages() {
    if pkg-config --exists openssl 2>/dev/null; then
        return
    fi
    log "installing libssl-dev and pkg-config (librdkafka's TLS)"
    local sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        sudo="sudo"
    fi
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libssl-dev pkg-config >&2
}

# Makes a Python module importable, installing the PyPI package if needed.
# cargo-deny for the dependency audit (deny.toml), built from crates.io once when missing
# (measured: 4.4 min of CPU, 20 min wall at nice 19 beside two workspace builds on the 2 shared
# cores, so about 3 min on a quiet machine; later runs find it in ~/.cargo/bin).
ensure_cargo_deny() {
    cargo deny --version >/dev/null 2>&1 && return 0
    log "installing cargo-deny (cargo install --locked cargo-deny)"
    cargo install --locked cargo-deny
}

# cargo deny check: licenses, duplicate versions (warnings) and sources always; advisories
# when the RustSec database can be fetched, or with the copy fetched earlier (said so),
# else skipped with the reason printed.
run_cargo_deny() {
    local checks=(bans licenses sources) fetch_log
    fetch_log=$(mktemp)
    if timeout 120 cargo deny fetch db >"$fetch_log" 2>&1; then
        checks+=(advisories)
        cargo deny --locked check "${checks[@]}"
    elif compgen -G "${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/*/crates" >/dev/null; then
        log "cargo deny: cannot fetch the RustSec advisory database; checking advisories against the copy fetched earlier (may be stale)"
        checks+=(advisories)
        cargo deny --locked check --disable-fetch "${checks[@]}"
    else
        log "cargo deny: SKIPPING advisories: the RustSec advisory database cannot be fetched from this machine ($(grep -v "^[[:space:]]*$" "$fetch_log" | tail -n 1)); licenses, bans and sources are still checked"
        cargo deny --locked check "${checks[@]}"
    fi
    rm -f "$fetch_log"
}

ensure_python_module() {
    local module="$1" package="$2"
    if python3 -c "import $module" 2>/dev/null; then
        return
    fi
    log "installing Python package $package"
    python3 -m pip install --quiet --user "$package" 2>/dev/null \
        || python3 -m pip install --quiet --user --break-system-packages "$package" 2>/dev/null \
        || python3 -m pip install --quiet "$package"
    python3 -c "import $module"
}

# Makes a command available, installing its Debian package if needed
# (e.g. `ensure_debian_package promtool prometheus`).
ensure_debian_package() {
    local command="$1" package="$2"
    if command -v "$command" >/dev/null; then
        return
    fi
    log "installing Debian package $package (for $command)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "$package" >&2 || { apt-get update -qq && apt-get install -y -qq "$package" >&2; }
    command -v "$command" >/dev/null
}

# Runs apt-get install for Debian packages, as root or through sudo.
apt_install() {
    local sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        sudo="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq "$@" >&2 || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq "$@" >&2; }
}

# The bin directory of the newest PostgreSQL Debian installed (/usr/lib/postgresql/<major>/bin),
# or nothing.
postgres_bin_dir() {
    local dir best="" best_major=0 major
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x "$dir/initdb" && -x "$dir/postgres" ]] || continue
        major="$(basename "$(dirname "$dir")")"
        major="${major%%.*}"
        [[ "$major" =~ ^[0-9]+$ ]] || continue
        if ((major > best_major)); then
            best="$dir"
            best_major=$major
        fi
    done
    echo "$best"
}

# PostgreSQL for the tests of accounts in PostgreSQL (testkit/src/postgres.rs starts it as an
# unprivileged user in a temp directory): Debian's package, whatever its major version; exports
# LOCKSTEP_TEST_POSTGRES_BIN (its bin directory, not on PATH) for the test kit.
ensure_postgres() {
    local bin
    bin="$(postgres_bin_dir)"
    if [[ -z "$bin" ]] || ! command -v psql >/dev/null; then
        log "installing Debian package postgresql (for initdb, postgres and psql)"
        apt_install postgresql postgresql-client
        bin="$(postgres_bin_dir)"
    fi
    [[ -n "$bin" ]] || { log "no PostgreSQL under /usr/lib/postgresql/*/bin after installing it"; return 1; }
    export LOCKSTEP_TEST_POSTGRES_BIN="$bin"
}

# The major Java version of the java binary $1 (0 if it does not run).
java_major() {
    local version
    version="$("$1" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
    version="${version#1.}"
    version="${version%%.*}"
    [[ "$version" =~ ^[0-9]+$ ]] || version=0
    echo "$version"
}

# Puts a Java >= 17 first on PATH (exported: call it directly, not in $(…)):
# the one on PATH, else one in /usr/lib/jvm, else Debian's openjdk-17-jre-headless.
ensure_java() {
    local java candidate
    java="$(command -v java || true)"
    if [[ -n "$java" ]] && (($(java_major "$java") >= 17)); then
        return
    fi
    for candidate in /usr/lib/jvm/*/bin/java; do
        if [[ -x "$candidate" ]] && (($(java_major "$candidate") >= 17)); then
            PATH="$(dirname "$candidate"):$PATH"
            export PATH
            return
        fi
    done
    log "installing a Java runtime (Debian openjdk-17-jre-headless)"
    apt_install openjdk-17-jre-headless
    (($(java_major java) >= 17))
}

# Maven, to resolve Kafka's jars from Maven Central (Debian's maven).
ensure_maven() {
    if command -v mvn >/dev/null; then
        return
    fi
    log "installing Maven (Debian maven)"
    apt_install maven
}

# Where Kafka's jars are cached, outside the repository (Maven's own cache, ~/.m2, is reused).
kafka_home() {
    echo "${LOCKSTEP_KAFKA_HOME:-$HOME/.cache/lockstep/kafka-$KAFKA_VERSION}"
}

# Resolves Apache Kafka's jars (scripts/kafka/pom.xml) into $(kafka_home)/libs
# once; later calls see the marker and skip Maven. Prints the libs directory.
# Call ensure_java first, in the calling shell, so that PATH carries the JDK.
ensure_kafka() {
    local home libs stamp started
    home="$(kafka_home)"
    libs="$home/libs"
    stamp="kafka $KAFKA_VERSION pom $(sha256sum "$LOCKSTEP_SCRIPTS/kafka/pom.xml" | cut -d' ' -f1)"
    if [[ -f "$home/complete" && "$(cat "$home/complete")" == "$stamp" && -d "$libs" ]]; then
        echo "$libs"
        return
    fi
    ensure_java
    ensure_maven
    log "resolving Apache Kafka $KAFKA_VERSION from Maven Central into $libs (once)"
    started=$SECONDS
    mkdir -p "$home"
    rm -rf "$libs.tmp.$$" "$home/cds.jsa"
    mvn -q -B -Dstyle.color=never -f "$LOCKSTEP_SCRIPTS/kafka/pom.xml" dependency:copy-dependencies \
        -DoutputDirectory="$libs.tmp.$$" >&2
    rm -rf "$libs"
    mv "$libs.tmp.$$" "$libs"
    log "Kafka's jars resolved in $((SECONDS - started)) s"
    kafka_build_class_archive "$libs" || log "no class data archive for Kafka (it starts slower)"
    echo "$stamp" >"$home/complete"
    echo "$libs"
}

# A port of 127.0.0.1 nothing listens on now (for processes that cannot take port 0).
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# The class data archive (CDS) of a broker's start, if ensure_kafka could record one.
kafka_class_archive() {
    local archive
    archive="$(kafka_home)/cds.jsa"
    [[ -f "$archive" ]] && echo "$archive"
    return 0
}

# The JVM options of a Kafka broker, one a line: scripts/kafka/jvm.options,
# its heap replaced by LOCKSTEP_KAFKA_HEAP_OPTS, LOCKSTEP_KAFKA_JVM_OPTS
# appended, the class data archive if there is one, the logging config.
kafka_jvm_options() {
    local line archive
    while IFS= read -r line; do
        [[ -z "$line" || "$line" == \#* ]] && continue
        [[ -n "${LOCKSTEP_KAFKA_HEAP_OPTS:-}" && "$line" == -Xm[sx]* ]] && continue
        echo "$line"
    done <"$LOCKSTEP_SCRIPTS/kafka/jvm.options"
    # shellcheck disable=SC2086  # word splitting wanted: several options
    if [[ -n "${LOCKSTEP_KAFKA_HEAP_OPTS:-}" ]]; then printf '%s\n' $LOCKSTEP_KAFKA_HEAP_OPTS; fi
    # shellcheck disable=SC2086
    if [[ -n "${LOCKSTEP_KAFKA_JVM_OPTS:-}" ]]; then printf '%s\n' $LOCKSTEP_KAFKA_JVM_OPTS; fi
    archive="$(kafka_class_archive)"
    if [[ -n "$archive" ]]; then echo "-XX:SharedArchiveFile=$archive"; fi
    echo "-Dlog4j2.configurationFile=$LOCKSTEP_SCRIPTS/kafka/log4j2.properties"
}

# Runs a Java main class of Kafka's jars in $1 (e.g. `kafka_java LIBS kafka.tools.StorageTool …`)
# as a short-lived tool: a small heap, C1 only (starts faster), the class data archive.
kafka_java() {
    local libs="$1" archive
    shift
    local options=(-Xms32m -Xmx512m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true
        "-Dlog4j2.configurationFile=$LOCKSTEP_SCRIPTS/kafka/tools-log4j2.properties")
    archive="$(kafka_class_archive)"
    if [[ -n "$archive" ]]; then
        options+=("-XX:SharedArchiveFile=$archive" -Xlog:cds=off -Xlog:cds+dynamic=off)
    fi
    java "${options[@]}" -cp "$libs/*" "$@"
}

# The per-node lines of a combined KRaft node's server.properties, after
# scripts/kafka/server.properties: node id, client listener, controller
# listener, static quorum voters, log dir. (The test kit adds an INTERNAL
# listener for SASL tests: testkit/src/kafka/node.rs, NodeConfig::properties.)
kafka_node_properties() {
    local node_id="$1" port="$2" controller_port="$3" voters="$4" log_dir="$5"
    cat <<EOF
node.id=$node_id
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.voters=$voters
log.dirs=$log_dir
EOF
}

# Writes $1/server.properties for one combined KRaft node (broker and controller)
# listening on 127.0.0.1:$2, its controller on 127.0.0.1:$3, its log in $1/data;
# formats that log on first start only (the cluster id stays in
# $1/data/meta.properties). $4: the libs directory. Alone (scripts/run) it is node
# 1 of a static quorum of itself; as one node of a cluster (scripts/cluster), $5
# is its node id, $6 the quorum's voters (id@host:port,…), $7 the cluster id
# every node is formatted with, and the lines of $KAFKA_EXTRA_PROPERTIES (e.g.
# replication settings) follow and win over scripts/kafka/server.properties.
kafka_prepare_node() {
    local dir="$1" port="$2" controller_port="$3" libs="$4" node_id="${5:-1}" voters="${6:-1@127.0.0.1:$3}"
    local cluster_id="${7:-}"
    mkdir -p "$dir/data"
    {
        cat "$LOCKSTEP_SCRIPTS/kafka/server.properties"
        echo
        echo "# This node (scripts/lib.sh, kafka_prepare_node; rewritten at every start)."
        kafka_node_properties "$node_id" "$port" "$controller_port" "$voters" "$dir/data"
        if [[ -n "${KAFKA_EXTRA_PROPERTIES:-}" ]]; then printf '%s\n' "$KAFKA_EXTRA_PROPERTIES"; fi
    } >"$dir/server.properties"
    if [[ -f "$dir/data/meta.properties" ]]; then
        return
    fi
    # A random Kafka Uuid (16 bytes, URL-safe base64 without padding), without starting a JVM.
    [[ -n "$cluster_id" ]] || cluster_id="$(kafka_new_cluster_id)"
    log "formatting Kafka's log in $dir/data (cluster id $cluster_id)"
    kafka_java "$libs" kafka.tools.StorageTool format --cluster-id="$cluster_id" -c "$dir/server.properties" >&2
}

# A new Kafka cluster id: a random Uuid (16 bytes, URL-safe base64 without padding).
kafka_new_cluster_id() {
    head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='
}

# Whether something accepts connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts the Kafka node prepared in $1 (kafka_prepare_node) with the jars in $2,
# appending its output to $3, in a session of its own (so that Ctrl-C in the
# terminal reaches the servers first; the caller stops Kafka after them). Sets
# KAFKA_PID and KAFKA_LOG_OFFSET (where this start's lines begin in $3).
kafka_start_node() {
    local dir="$1" libs="$2" log_file="$3" jvm_options
    mapfile -t jvm_options < <(kafka_jvm_options)
    touch "$log_file"
    # shellcheck disable=SC2034  # read by the caller
    KAFKA_LOG_OFFSET="$(stat -c %s "$log_file")"
    (exec setsid java "${jvm_options[@]}" -cp "$libs/*" kafka.Kafka "$dir/server.properties" \
        >>"$log_file" 2>&1) &
    # shellcheck disable=SC2034  # read by the caller
    KAFKA_PID=$!
}

# Waits until the Kafka node of pid $1, logging to $2 since byte $3, serves on
# 127.0.0.1:$4 (registered, unfenced, listener open); fails after 120 s or when
# it exits, with the end of its log.
kafka_wait_started() {
    local pid="$1" log_file="$2" offset="$3" port="$4"
    for _ in $(seq 1 1200); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: Kafka exited at start; the end of $log_file:" >&2
            tail -n 30 "$log_file" >&2
            return 1
        fi
        kafka_started_since "$log_file" "$offset" && port_open "$port" && return 0
        sleep 0.1
    done
    echo "error: Kafka did not come up on 127.0.0.1:$port within 120 s; the end of $log_file:" >&2
    tail -n 30 "$log_file" >&2
    return 1
}

# Stops process $1 (named $2 in messages) with SIGTERM, waiting up to $3 seconds
# before SIGKILL (a Kafka node's controlled shutdown takes about 2 s; killed, its
# log recovers at the next start).
stop_within() {
    local pid="$1" name="$2" seconds="$3"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((seconds * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop within $seconds s of SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Whether the Kafka logging to $1 has said it started (broker unfenced, listeners
# open) since byte $2 of that log.
kafka_started_since() {
    tail -c "+$(($2 + 1))" "$1" 2>/dev/null | grep -q 'Kafka Server started'
}

# Records $(kafka_home)/cds.jsa, a class data archive of a broker's start and stop,
# with a throwaway broker (about 10 s, once). Measured here: a broker's start
# goes from about 5.5 s to 4 s with it, to under 3 s with -XX:TieredStopAtLevel=1 too.
kafka_build_class_archive() {
    local libs="$1" home dir pid options=()
    home="$(kafka_home)"
    dir="$(mktemp -d -t lockstep-kafka-cds-XXXXXX)"
    log "recording a class data archive of Kafka's start (once)"
    kafka_prepare_node "$dir" "$(free_port)" "$(free_port)" "$libs" 2>/dev/null
    mapfile -t options < <(kafka_jvm_options | grep -v SharedArchiveFile)
    java "${options[@]}" "-XX:ArchiveClassesAtExit=$dir/cds.jsa" -cp "$libs/*" kafka.Kafka \
        "$dir/server.properties" >"$dir/kafka.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
        kafka_started_since "$dir/kafka.log" 0 && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [[ -s "$dir/cds.jsa" ]] && kafka_started_since "$dir/kafka.log" 0; then
        mv "$dir/cds.jsa" "$home/cds.jsa"
        rm -rf "$dir"
        return 0
    fi
    rm -rf "$dir"
    return 1
}

# Node.js >= 20.19 and npm, for the browser client (clients/web; @noble's engines). False when
# either is missing or older (Debian's own nodejs may be).
have_node() {
    command -v node >/dev/null && command -v npm >/dev/null \
        && node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)'
}

# The browser client (clients/web): npm ci (package-lock.json), tsc, its tests, and the test
# vectors both ways: the Rust client's checked by the TypeScript tests, the TypeScript
# client's checked by client/tests/web_vectors.rs.
run_web_client_tests() {
    local vectors
    vectors="$(mktemp -d)"
    npm ci --no-audit --no-fund >&2
    npm run --silent build -w clients/web
    cargo run --quiet --locked -p lockstep-client --example web_vectors -- "$vectors/rust.json"
    LOCKSTEP_RUST_VECTORS="$vectors/rust.json" npm test --silent -w clients/web
    npm run --silent vectors -w clients/web -- "$vectors/web.json"
    LOCKSTEP_WEB_VECTORS="$vectors/web.json" \
        cargo test --quiet --locked -p lockstep-client --test web_vectors -- --ignored
    rm -rf "$vectors"
}
