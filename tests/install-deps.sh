#!/usr/bin/env bash
# Installs what `make test` needs and a fresh Debian machine lacks:
# PostgreSQL server binaries (initdb, pg_ctl, postgres), what librdkafka's
# build needs (make, pkg-config, libssl-dev) and the toolchain's clippy and
# rustfmt. As root it installs them with apt-get;
# otherwise it says exactly what to install.
set -euo pipefail

# apt-get install, with the package lists fetched first if they are stale.
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    }
}

have_server_binaries() {
    if [[ -n "${CUTOVER_PG_BINDIR:-}" && -x "${CUTOVER_PG_BINDIR}/initdb" ]]; then
        return 0
    fi
    if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        return 0
    fi
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if ! have_server_binaries; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: PostgreSQL server binaries missing; installing the Debian package postgresql"
        # The tests start their own clusters: do not create or start a default one.
        mkdir -p /etc/postgresql-common
        if ! grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
            echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends postgresql postgresql-contrib >/dev/null
    else
        cat >&2 <<'MSG'
install-deps: PostgreSQL server binaries (initdb, pg_ctl, postgres) not found.
  Debian/Ubuntu: sudo apt-get install postgresql
  Other systems: install the PostgreSQL server package, then either put
  pg_config on PATH or set CUTOVER_PG_BINDIR=/path/to/postgresql/bin
MSG
        exit 1
    fi
fi

# Client tools the tests drive as an operator would: psql against the admin
# console, promtool to check the /metrics exposition format and the alert
# rules, Chromium to load the status page.
need=()
psql_found() {
    command -v psql >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/psql' >/dev/null ||
        [[ -n "${CUTOVER_PG_BINDIR:-}" && -x "${CUTOVER_PG_BINDIR}/psql" ]]
}
psql_found || need+=(postgresql-client)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The status page's test loads it in headless Chromium.
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 ||
    [[ -n "${CUTOVER_CHROMIUM:-}" ]] || need+=(chromium)
# systemd-analyze verifies deploy/cutover.service.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# openssl makes the certificates of the console's TLS test.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if (( ${#need[@]} > 0 )); then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: installing ${need[*]} (the tools the tests drive)"
        apt_install "${need[@]}"
        # The prometheus package may start a server of its own: not ours.
        if command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now prometheus >/dev/null 2>&1 || true
        fi
    else
        echo "install-deps: missing ${need[*]}: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi

# A German locale, for the test that runs the servers with lc_messages in
# another language (tests/tests/language.rs); PostgreSQL's translations
# come with its server package.
if ! locale -a 2>/dev/null | grep -qiE '^de_DE\.utf-?8$'; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: generating the de_DE.UTF-8 locale"
        command -v locale-gen >/dev/null 2>&1 || apt_install locales
        if grep -qE '^# *de_DE\.UTF-8 UTF-8' /etc/locale.gen; then
            sed -i 's/^# *de_DE\.UTF-8 UTF-8/de_DE.UTF-8 UTF-8/' /etc/locale.gen
        elif ! grep -qE '^de_DE\.UTF-8 UTF-8' /etc/locale.gen; then
            echo 'de_DE.UTF-8 UTF-8' >> /etc/locale.gen
        fi
        locale-gen >/dev/null
    else
        echo "install-deps: the de_DE.UTF-8 locale is missing: sudo locale-gen de_DE.UTF-8" >&2
        exit 1
    fi
fi

# The Kafka feed's librdkafka is built from source by the rdkafka crate,
# with OpenSSL for TLS and SASL: it needs make, pkg-config and OpenSSL's
# headers.
build_need=()
command -v make >/dev/null 2>&1 || build_need+=(make)
command -v pkg-config >/dev/null 2>&1 || build_need+=(pkg-config)
{ command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; } || build_need+=(libssl-dev)
if (( ${#build_need[@]} > 0 )); then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: installing ${build_need[*]} (librdkafka's build)"
        apt_install "${build_need[@]}"
    else
        echo "install-deps: missing ${build_need[*]} (to build librdkafka): sudo apt-get install ${build_need[*]}" >&2
        exit 1
    fi
fi

if [[ "$(id -u)" == 0 ]] && ! id postgres >/dev/null 2>&1; then
    echo "install-deps: tests run as root start PostgreSQL as the 'postgres' user; creating it"
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

for component in clippy rustfmt; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            rustup component add "$component"
        else
            echo "install-deps: cargo $component is missing: install the $component component of your Rust toolchain" >&2
            exit 1
        fi
    fi
done
