//! The demo's two throwaway PostgreSQL clusters: `initdb`'d into the
//! demo's directory, on free ports of 127.0.0.1, with `wal_level =
//! logical`; run as the `postgres` user when the demo runs as root, since
//! PostgreSQL refuses to run as root. Stopped when dropped, unless kept.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::DemoError;

/// The environment variable naming the server binaries' directory.
const BINDIR_ENV: &str = "CUTOVER_PG_BINDIR";

/// One running cluster.
#[derive(Debug)]
pub struct Server {
    /// `source` or `target`.
    pub name: &'static str,
    dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    bindir: PathBuf,
    run_as: Option<(u32, u32)>,
    running: bool,
    /// Left running when dropped (`--keep`).
    pub keep: bool,
}

/// The directory of `initdb`, `pg_ctl` and `postgres`: `CUTOVER_PG_BINDIR`,
/// `pg_config --bindir`, or the newest `/usr/lib/postgresql/*/bin`.
pub fn bindir() -> Result<PathBuf, DemoError> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|d| d.join("initdb").exists());
    if let Some(dir) = from_pg_config {
        return Ok(dir);
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .ok_or_else(|| {
            DemoError::Setup(format!(
                "the PostgreSQL server binaries (initdb, pg_ctl) are not installed: `make demo` installs them (Debian: apt-get install postgresql), or set {BINDIR_ENV}=/path/to/postgresql/bin"
            ))
        })
}

/// The user the servers run as: `postgres` when the demo runs as root.
pub fn server_user() -> Result<Option<(u32, u32)>, DemoError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some((user.uid.as_raw(), user.gid.as_raw()))),
        _ => Err(DemoError::Setup(
            "running as root, the servers must run as the `postgres` system user (PostgreSQL refuses root), and there is none: install the PostgreSQL server package (`make demo` does), or run the demo as another user".into(),
        )),
    }
}

fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Setup(format!("no free port on 127.0.0.1: {e}")))
}

impl Server {
    /// `initdb`s and starts the cluster `name` under `root`.
    pub fn start(
        root: &Path,
        name: &'static str,
        bindir: &Path,
        run_as: Option<(u32, u32)>,
    ) -> Result<Server, DemoError> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DemoError::Setup(format!("creating {}: {e}", dir.display())))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| {
                DemoError::Setup(format!("giving {} to postgres: {e}", dir.display()))
            })?;
        }
        let mut server = Server {
            name,
            dir,
            port: free_port()?,
            bindir: bindir.to_owned(),
            run_as,
            running: false,
            keep: false,
        };
        server.run(
            "initdb",
            &[
                "-D",
                "data",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let settings = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             max_connections = 60\nshared_buffers = 128MB\n\
             # Throwaway servers: no crash safety needed.\nfsync = off\nfull_page_writes = off\n",
            server.port,
            server.dir.display()
        );
        let conf = server.dir.join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .map_err(|e| DemoError::Setup(format!("reading {}: {e}", conf.display())))?;
        text.push_str(&settings);
        std::fs::write(&conf, text)
            .map_err(|e| DemoError::Setup(format!("writing {}: {e}", conf.display())))?;
        // Stopped when dropped even if the start fails or times out: pg_ctl
        // detaches the server, which may be up all the same.
        server.running = true;
        server.run(
            "pg_ctl",
            &["-D", "data", "-l", "server.log", "-w", "-t", "60", "start"],
        )?;
        Ok(server)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), DemoError> {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.args(args)
            .current_dir(&self.dir)
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .map_err(|e| DemoError::Setup(format!("running {program}: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        Err(DemoError::Setup(format!(
            "{program} failed for the {} server: {}{}{log}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }

    /// Its `app` database's URL.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/app?sslmode=disable",
            self.port
        )
    }

    /// `psql` to its `app` database.
    pub fn psql(&self) -> String {
        format!(
            "psql \"host=127.0.0.1 port={} user=postgres dbname=app\"",
            self.port
        )
    }

    /// How to stop it by hand (`--keep`).
    pub fn stop_command(&self) -> String {
        let user = if self.run_as.is_some() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!(
            "{user}{} -D {} stop",
            self.bindir.join("pg_ctl").display(),
            self.dir.join("data").display()
        )
    }

    /// Stops it (fast shutdown).
    pub fn stop(&mut self) {
        if self.running {
            let _ = self.run("pg_ctl", &["-D", "data", "-m", "fast", "-w", "stop"]);
            self.running = false;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.keep {
            self.stop();
        }
    }
}
