//! Throwaway PostgreSQL clusters for tests and benchmarks.
//!
//! Each [`Cluster`] is `initdb`'d into its own temporary directory, listens
//! on a free port of 127.0.0.1 with its unix socket in that directory, runs
//! with `wal_level = logical`, and is stopped and deleted on drop, also
//! when a test panics (its server log is printed then). When the tests run
//! as root the server runs as the `postgres` system user, since PostgreSQL
//! refuses to run as root.
//!
//! The PostgreSQL binaries are found through `CUTOVER_PG_BINDIR`, then
//! `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

/// Environment variable naming the directory with `initdb`, `pg_ctl`, ...
pub const BINDIR_ENV: &str = "CUTOVER_PG_BINDIR";

/// How many times a start is retried when another process took the port.
const PORT_ATTEMPTS: usize = 8;

/// The superuser every cluster has; it logs in without a password over the
/// unix socket (and over TCP unless [`ClusterOptions::password_auth`]).
pub const SUPERUSER: &str = "postgres";

/// Settings for one cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines, e.g. `("logical_decoding_work_mem", "64kB")`.
    pub settings: Vec<(String, String)>,
    /// The pg_hba method for TCP connections (`trust` when `None`); the
    /// unix socket always trusts, so the harness itself never needs one.
    pub host_auth: Option<String>,
    /// Serve TLS with a certificate for `localhost` and `127.0.0.1` signed
    /// by a CA generated for this cluster ([`Cluster::ca_cert`]), and
    /// refuse unencrypted TCP connections.
    pub tls: bool,
    /// Override `wal_level` (default `logical`).
    pub wal_level: Option<String>,
    /// Run the server in this network namespace (its `nsenter --net=`
    /// path), listening on this address as well as on the namespace's
    /// loopback; TCP connections from anywhere are let in by `host_auth`.
    pub netns: Option<(String, std::net::Ipv4Addr)>,
}

impl ClusterOptions {
    /// Adds a `postgresql.conf` setting.
    pub fn setting(mut self, name: &str, value: &str) -> ClusterOptions {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Requires SCRAM passwords over TCP.
    pub fn password_auth(self) -> ClusterOptions {
        self.host_auth("scram-sha-256")
    }

    /// Sets the pg_hba method for TCP connections (`md5`, `password`, ...).
    pub fn host_auth(mut self, method: &str) -> ClusterOptions {
        self.host_auth = Some(method.to_owned());
        self
    }

    /// Serves TLS only.
    pub fn tls(mut self) -> ClusterOptions {
        self.tls = true;
        self
    }

    /// Sets `wal_level`.
    pub fn wal_level(mut self, level: &str) -> ClusterOptions {
        self.wal_level = Some(level.to_owned());
        self
    }

    /// Runs the server behind `netns` ([`crate::netns`]).
    pub fn in_netns(mut self, netns: &crate::netns::Netns) -> ClusterOptions {
        self.netns = Some((netns.path(), netns.addr));
        self
    }
}

/// A running (or stopped) throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    bindir: PathBuf,
    run_as: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
    running: bool,
    netns: Option<(String, std::net::Ipv4Addr)>,
}

impl Cluster {
    /// Starts a cluster with default settings.
    pub fn start() -> Cluster {
        Cluster::start_with(ClusterOptions::default())
    }

    /// Starts a cluster; panics with the server log when it cannot.
    pub fn start_with(options: ClusterOptions) -> Cluster {
        let bindir = bindir().clone();
        let dir = tempfile::Builder::new()
            .prefix("cutover-pg-")
            .tempdir_in("/tmp")
            .expect("create a temporary directory under /tmp");
        let run_as = server_user();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid.as_raw()), Some(gid.as_raw()))
                .expect("chown the cluster directory to postgres");
        }
        let mut cluster = Cluster {
            dir,
            port: 0,
            bindir,
            run_as,
            running: false,
            netns: options.netns.clone(),
        };
        cluster.initdb(&options);
        cluster.start_on_a_free_port();
        cluster
    }

    fn start_on_a_free_port(&mut self) {
        for attempt in 1..=PORT_ATTEMPTS {
            self.port = free_port();
            self.write_port();
            match self.pg_ctl_start() {
                Ok(()) => {
                    self.running = true;
                    return;
                }
                Err(log)
                    if log.contains("could not bind") || log.contains("Address already in use") =>
                {
                    if attempt == PORT_ATTEMPTS {
                        panic!("no free port after {PORT_ATTEMPTS} attempts:\n{log}");
                    }
                }
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
    }

    /// Another server started from a copy of this one's files, as a
    /// restored base backup or a cloned disk is: the same system
    /// identifier and databases, on its own port. This server is stopped
    /// while its files are copied, then started again.
    pub fn clone_server(&mut self) -> Cluster {
        self.stop();
        let dir = tempfile::Builder::new()
            .prefix("cutover-pg-clone-")
            .tempdir_in("/tmp")
            .expect("create a temporary directory under /tmp");
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid.as_raw()), Some(gid.as_raw()))
                .expect("chown the clone's directory to postgres");
        }
        let out = Command::new("cp")
            .arg("-a")
            .arg(self.data_dir())
            .arg(dir.path().join("data"))
            .output()
            .expect("run cp");
        assert!(
            out.status.success(),
            "copying the data directory failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.start_again();
        let conf = dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read the clone's postgresql.conf");
        let _ = writeln!(text, "unix_socket_directories = '{}'", dir.path().display());
        std::fs::write(&conf, text).expect("write the clone's postgresql.conf");
        let mut clone = Cluster {
            dir,
            port: 0,
            bindir: self.bindir.clone(),
            run_as: self.run_as,
            running: false,
            netns: self.netns.clone(),
        };
        clone.start_on_a_free_port();
        clone
    }

    /// The TCP port on [`Cluster::host`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address cutover reaches the server at over TCP: 127.0.0.1, or
    /// its namespace's address.
    pub fn host(&self) -> String {
        match &self.netns {
            Some((_, addr)) => addr.to_string(),
            None => "127.0.0.1".to_owned(),
        }
    }

    /// The directory holding the unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `key=value` connection string over TCP as `user`.
    pub fn conninfo(&self, dbname: &str, user: &str) -> String {
        format!(
            "host={} port={} dbname={dbname} user={user} sslmode=disable",
            self.host(),
            self.port
        )
    }

    /// URL over TCP as `user` with an optional password.
    pub fn url(&self, dbname: &str, user: &str, password: Option<&str>) -> String {
        let auth = match password {
            Some(p) => format!("{user}:{p}"),
            None => user.to_owned(),
        };
        format!(
            "postgres://{auth}@{}:{}/{dbname}?sslmode=disable",
            self.host(),
            self.port
        )
    }

    /// A superuser connection over the unix socket.
    pub async fn client(&self, dbname: &str) -> Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.socket_dir())
            .port(self.port)
            .user(SUPERUSER)
            .dbname(dbname)
            .application_name("cutover-tests");
        let (client, connection) = config
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to the test cluster on port {}: {e}", self.port));
        tokio::spawn(connection);
        client
    }

    /// Creates a database and returns its name.
    pub async fn create_database(&self, name: &str) -> String {
        self.execute("postgres", &format!("CREATE DATABASE \"{name}\""))
            .await;
        name.to_owned()
    }

    /// Runs SQL (several statements allowed) as the superuser.
    pub async fn execute(&self, dbname: &str, sql: &str) {
        self.client(dbname)
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("SQL failed on port {}: {e:?}\n{sql}", self.port));
    }

    /// Writes and recycles WAL in `dbname` until the server invalidates
    /// `slot`: start the cluster with a small `max_slot_wal_keep_size`. The
    /// WAL comes from a table of its own, in a schema no migration takes.
    pub async fn lose_slot(&self, dbname: &str, slot: &str) {
        self.execute(
            dbname,
            "CREATE SCHEMA IF NOT EXISTS cutover_test;
             CREATE TABLE IF NOT EXISTS cutover_test.wal_filler (v text);",
        )
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            self.execute(
                dbname,
                "INSERT INTO cutover_test.wal_filler SELECT repeat('x', 1000) FROM generate_series(1, 3000);
                 TRUNCATE cutover_test.wal_filler; SELECT pg_switch_wal(); CHECKPOINT;",
            )
            .await;
            let status: Option<String> = self
                .query_value(
                    dbname,
                    &format!(
                        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{slot}'"
                    ),
                )
                .await;
            if status.as_deref() == Some("lost") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "slot {slot} was not invalidated: {status:?}"
            );
        }
    }

    /// Runs a query returning one value of the first row's first column.
    pub async fn query_value<T>(&self, dbname: &str, sql: &str) -> T
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        self.client(dbname)
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("query failed on port {}: {e:?}\n{sql}", self.port))
            .get(0)
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&mut self) {
        if self.running {
            let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
            assert!(out.status.success(), "pg_ctl stop failed:\n{}", self.log());
            self.running = false;
        }
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`): no
    /// shutdown checkpoint, WAL not yet written from the buffers is lost,
    /// and the next start runs crash recovery.
    pub fn crash(&mut self) {
        if self.running {
            let out = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "60"]);
            assert!(
                out.status.success(),
                "pg_ctl stop -m immediate failed:\n{}",
                self.log()
            );
            self.running = false;
        }
    }

    /// Starts a stopped server on the same port.
    pub fn start_again(&mut self) {
        if !self.running {
            self.pg_ctl_start()
                .unwrap_or_else(|log| panic!("restart failed:\n{log}"));
            self.running = true;
        }
    }

    /// Stops and starts the server.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = match &self.netns {
            // nsenter enters the namespace as root, then becomes the
            // server's user: the server inherits both.
            Some((path, _)) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={path}"));
                if let Some((uid, gid)) = self.run_as {
                    cmd.arg(format!("--setuid={uid}"))
                        .arg(format!("--setgid={gid}"));
                }
                cmd.arg("--").arg(self.bindir.join(program));
                cmd
            }
            None => {
                let mut cmd = Command::new(self.bindir.join(program));
                if let Some((uid, gid)) = self.run_as {
                    cmd.uid(uid.as_raw()).gid(gid.as_raw());
                }
                cmd
            }
        };
        cmd.current_dir(self.dir.path());
        cmd.env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        cmd
    }

    fn initdb(&self, options: &ClusterOptions) {
        let data = self.data_dir();
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&data).args([
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--auth-local=trust",
        ]);
        cmd.arg(format!(
            "--auth-host={}",
            options.host_auth.as_deref().unwrap_or("trust")
        ));
        let out = cmd.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut conf = String::new();
        let _ = writeln!(conf, "\n# cutover test harness");
        match &options.netns {
            Some((_, addr)) => {
                let _ = writeln!(conf, "listen_addresses = '127.0.0.1, {addr}'");
                let method = options.host_auth.as_deref().unwrap_or("trust");
                let hba = data.join("pg_hba.conf");
                let existing = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
                std::fs::write(
                    &hba,
                    format!(
                        "{existing}\nhost all all 0.0.0.0/0 {method}\nhost replication all 0.0.0.0/0 {method}\n"
                    ),
                )
                .expect("write pg_hba.conf");
            }
            None => {
                let _ = writeln!(conf, "listen_addresses = '127.0.0.1'");
            }
        }
        let _ = writeln!(
            conf,
            "unix_socket_directories = '{}'",
            self.dir.path().display()
        );
        let _ = writeln!(
            conf,
            "wal_level = {}",
            options.wal_level.as_deref().unwrap_or("logical")
        );
        for line in [
            "max_replication_slots = 16",
            "max_wal_senders = 16",
            "max_connections = 100",
            "fsync = off",
            "full_page_writes = off",
            "shared_buffers = 64MB",
            "log_line_prefix = '%m [%p] %q%a '",
            "include_if_exists = 'port.conf'",
        ] {
            let _ = writeln!(conf, "{line}");
        }
        for (name, value) in &options.settings {
            let _ = writeln!(conf, "{name} = '{}'", value.replace('\'', "''"));
        }
        if options.tls {
            self.write_certificates();
            let _ = writeln!(conf, "ssl = on");
            let _ = writeln!(conf, "ssl_cert_file = 'server.crt'");
            let _ = writeln!(conf, "ssl_key_file = 'server.key'");
            // Plain TCP is refused, so a successful connection proves TLS.
            let hba = data.join("pg_hba.conf");
            let existing = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
            std::fs::write(
                &hba,
                format!(
                    "hostnossl all all all reject\nhostnossl replication all all reject\n{existing}"
                ),
            )
            .expect("write pg_hba.conf");
        }
        append(&data.join("postgresql.conf"), &conf);
    }

    /// The PEM file of the CA that signed the server certificate
    /// (clusters started with [`ClusterOptions::tls`]).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn write_certificates(&self) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cutover test CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("self-signed CA");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server parameters");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_key = KeyPair::generate().expect("server key");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server certificate");
        std::fs::write(self.ca_cert(), ca_cert.pem()).expect("write ca.crt");
        let data = self.data_dir();
        for (name, text, mode) in [
            ("server.crt", server_cert.pem(), 0o644),
            ("server.key", server_key.serialize_pem(), 0o600),
        ] {
            let path = data.join(name);
            std::fs::write(&path, text).expect("write a certificate file");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .expect("chmod");
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&path, Some(uid.as_raw()), Some(gid.as_raw()))
                    .expect("chown a certificate file");
            }
        }
    }

    fn write_port(&self) {
        let path = self.data_dir().join("port.conf");
        std::fs::write(&path, format!("port = {}\n", self.port)).expect("write port.conf");
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&path, Some(uid.as_raw()), Some(gid.as_raw()))
                .expect("chown port.conf");
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(args)
            .output()
            .expect("run pg_ctl")
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let log = self.log_path();
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("run pg_ctl");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}{}\n--- server log ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            ))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- server log of the cluster on port {} ({}) ---\n{}--- end of server log ---",
                self.port,
                self.dir.path().display(),
                self.log()
            );
        }
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .expect("append to postgresql.conf");
}

/// A port the kernel just handed out; another process may take it before
/// the server binds it, which [`Cluster::start_with`] retries.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// The user to run the server as: `postgres` when we are root.
fn server_user() -> Option<(nix::unistd::Uid, nix::unistd::Gid)> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name(SUPERUSER)
        .ok()
        .flatten()
        .expect("running as root, so the server must run as the 'postgres' system user, which does not exist: install the PostgreSQL server package (make test does) or run the tests as another user");
    Some((user.uid, user.gid))
}

/// The directory with the server binaries.
pub fn bindir() -> &'static PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os(BINDIR_ENV) {
            return PathBuf::from(dir);
        }
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .filter(|d| d.join("initdb").exists());
        if let Some(dir) = from_pg_config {
            return dir;
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_string_lossy().parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((version, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, dir)| dir).unwrap_or_else(|| {
            panic!("PostgreSQL server binaries not found: install them (Debian: apt-get install postgresql) or set {BINDIR_ENV}")
        })
    })
}

/// Waits up to `timeout` for `probe` to return `Some`, polling every 50 ms;
/// panics naming `what` on timeout. Never a fixed sleep.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
