//! The target's disk full, during the copy and during the apply: a clear
//! error and a stop, the state store intact, and a clean resume once space
//! is back. The target's table lives in a tablespace on a small tmpfs,
//! which needs root to mount (`make test` runs as root in CI); without it
//! the test says so and fails rather than pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cutover_tests::{ClusterOptions, Daemon, Pair, run_cutover};

const WAIT: Duration = Duration::from_secs(120);

/// A tmpfs of a given size, owned by the servers' user; unmounted on drop.
struct SmallDisk {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        // The server's user goes through it to its tablespace.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).unwrap();
        let (uid, gid) = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .map_or((0, 0), |u| (u.uid.as_raw(), u.gid.as_raw()));
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},uid={uid},gid={gid},mode=0755"))
            .arg("tmpfs")
            .arg(&mount)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs for the target's tablespace, which needs root (make test runs as root in CI): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The tablespace's directory: empty, the server's own.
        let space = mount.join("space");
        std::fs::create_dir(&space).unwrap();
        std::os::unix::fs::chown(&space, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&space, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        SmallDisk { mount, _dir: dir }
    }

    fn space(&self) -> PathBuf {
        self.mount.join("space")
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.mount)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fills all but `left` bytes with a file the servers do not know.
    fn fill(&self, left: u64) -> PathBuf {
        let stat = nix::sys::statvfs::statvfs(&self.mount).unwrap();
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        let filler = self.mount.join("filler");
        let file = std::fs::File::create(&filler).unwrap();
        use std::io::Write;
        let mut file = std::io::BufWriter::new(file);
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0;
        while written + chunk.len() as u64 <= free.saturating_sub(left) {
            file.write_all(&chunk).unwrap();
            written += chunk.len() as u64;
        }
        file.flush().unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).output();
    }
}

fn stopped_with(daemon: &mut Daemon, what: &str) -> String {
    let code = daemon.wait(WAIT);
    let log = daemon.log_of_this_start();
    assert_eq!(
        code,
        Some(1),
        "{what}: the daemon must stop with exit 1:\n{log}"
    );
    log
}

fn status_reads(config: &Path) {
    let status = run_cutover(&["--config", config.to_str().unwrap(), "status"], &[]);
    assert_eq!(
        status.code,
        0,
        "the state store after a full disk:\n{}",
        status.all_output()
    );
}

#[tokio::test]
async fn a_full_target_disk_stops_the_copy_and_the_apply_clearly_and_both_resume() {
    // Declared first: unmounted after the servers stop.
    let disk = SmallDisk::mount("1M");
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.source
        .execute(
            "app",
            "CREATE TABLE items (id int PRIMARY KEY, payload text NOT NULL);
             INSERT INTO items SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 20000) g;",
        )
        .await;
    pair.target
        .execute(
            "app",
            &format!(
                "CREATE TABLESPACE small LOCATION '{}'",
                disk.space().display()
            ),
        )
        .await;
    pair.target
        .execute(
            "app",
            "CREATE TABLE items (id int PRIMARY KEY USING INDEX TABLESPACE small, payload text NOT NULL)
                 TABLESPACE small;",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path(), "");

    // The copy: 4 MB into 1 MB.
    let mut daemon = Daemon::start(&config, &["run"]);
    let log = stopped_with(&mut daemon, "the copy on a full disk");
    assert!(
        log.contains("SQLSTATE 53100") && log.contains("the target's disk is full"),
        "{log}"
    );
    status_reads(&config);

    // Space back: the copy resumes, then streams.
    disk.resize("64M");
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["items"], WAIT).await;

    // The apply: the disk fills up again while changes wait.
    let filler = disk.fill(64 * 1024);
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, repeat(md5(g::text), 6) FROM generate_series(20001, 30000) g;
             UPDATE items SET payload = 'x' WHERE id <= 10;",
        )
        .await;
    let mut daemon = Daemon::start(&config, &["run"]);
    let log = stopped_with(&mut daemon, "the apply on a full disk");
    assert!(
        log.contains("target refused") && log.contains("SQLSTATE 53100"),
        "{log}"
    );
    assert!(log.contains("nothing is lost"), "{log}");
    status_reads(&config);

    // Space back: the apply resumes where the target stopped.
    std::fs::remove_file(filler).unwrap();
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["items"], WAIT).await;
}

#[tokio::test]
async fn a_full_state_directory_stops_a_large_transaction_clearly_and_the_store_survives() {
    let disk = SmallDisk::mount("32M");
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE items (id int PRIMARY KEY, payload text NOT NULL);")
        .await;
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 1000) g",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let state = disk.mount.join("state");
    let config = cutover_tests::write_config(
        dir.path(),
        &format!(
            "[source]\nurl = \"{}\"\n[target]\nurl = \"{}\"\n[state]\ndir = \"{}\"\nlag_sample_seconds = 3600\n[apply]\nspill_mb = 1\n[http]\nlisten = \"127.0.0.1:0\"\n[console]\nlisten = \"127.0.0.1:0\"\n",
            pair.source.url("app", "postgres", None),
            pair.target.url("app", "postgres", None),
            state.display()
        ),
    );
    let mut daemon = Daemon::start_streaming(&config).await;
    // The disk of the state directory fills up while the daemon streams;
    // then a transaction too large to keep in memory comes.
    let filler = disk.fill(0);
    pair.source
        .execute(
            "app",
            "INSERT INTO items SELECT g, repeat(md5(g::text), 8) FROM generate_series(1001, 21000) g",
        )
        .await;
    let log = stopped_with(&mut daemon, "a spill on a full disk");
    assert!(
        log.contains("the disk of the state directory is full") && log.contains("nothing is lost"),
        "{log}"
    );
    // The store cannot even be opened while the disk is full: said so.
    let status = run_cutover(&["--config", config.to_str().unwrap(), "status"], &[]);
    assert_eq!(status.code, 1, "{}", status.all_output());
    assert!(
        status
            .stderr
            .contains("the disk of the state directory is full"),
        "{}",
        status.stderr
    );

    // Space back: the store is intact, and the transaction comes again
    // from the slot.
    std::fs::remove_file(filler).unwrap();
    status_reads(&config);
    let mut daemon = Daemon::start_streaming(&config).await;
    pair.finish(&mut daemon, &["items"], WAIT).await;
    status_reads(&config);
}
