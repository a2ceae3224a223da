# shellcheck shell=bash
# Shared by scripts/run and scripts/test (sourced, not run).

NISSHI_VERSION="0.7.0-pre.2"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

# Installs Nisshi (the Apache-Kafka-compatible local broker, formerly Tansu)
# unless it is installed already. Prints the binary's path.
ensure_nisshi() {
    local bin
    bin="$(command -v nisshi || true)"
    if [[ -z "$bin" && -x "$HOME/.cargo/bin/nisshi" ]]; then
        bin="$HOME/.cargo/bin/nisshi"
    fi
    if [[ -n "$bin" ]]; then
        echo "$bin"
        return
    fi
    log "installing nisshi $NISSHI_VERSION (once; about 11 minutes on 2 cores)"
    cargo install nisshi --version "$NISSHI_VERSION" --locked --features libsql,dynostore >&2
    echo "$HOME/.cargo/bin/nisshi"
}

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
