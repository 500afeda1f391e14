//! deploy/ as an operator takes it: the Dockerfile (no image can be built
//! here: what it copies exists, and it runs as a user with a health
//! check), the Kubernetes manifests' config and environment accepted by
//! `cutover check` against real servers, and the systemd unit verified by
//! systemd.

use std::path::{Path, PathBuf};
use std::process::Command;

use cutover_tests::cli::{cutover_bin, run_cutover, write_config};
use cutover_tests::{ClusterOptions, Pair};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The Dockerfile's instructions, continuation lines joined.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[test]
fn the_dockerfile_copies_what_exists_and_runs_as_a_user_with_a_health_check() {
    let text = read("deploy/Dockerfile");
    // hadolint is not installable here; where it is, it judges too.
    if Command::new("hadolint").arg("--version").output().is_ok() {
        let lint = Command::new("hadolint")
            .arg(repo().join("deploy/Dockerfile"))
            .output()
            .unwrap();
        assert!(
            lint.status.success(),
            "hadolint:\n{}",
            String::from_utf8_lossy(&lint.stdout)
        );
    }
    let steps = instructions(&text);
    let from: Vec<&String> = steps.iter().filter(|s| s.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "a build stage and a runtime stage: {from:?}");
    for stage in &from {
        let image = stage.split_whitespace().nth(1).unwrap();
        assert!(
            image.contains(':') && !image.ends_with(":latest"),
            "{image}: pin the base image's tag"
        );
    }
    // The workspace's toolchain builds it.
    let toolchain = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap();
    assert!(
        from[0].contains(&format!("rust:{toolchain}")),
        "{} is not the workspace's rust-version {toolchain}",
        from[0]
    );
    let mut copied = 0;
    for step in steps.iter().filter(|s| s.starts_with("COPY ")) {
        let words: Vec<&str> = step.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        let (sources, _dest) = words.split_at(words.len() - 1);
        for source in sources {
            assert!(
                repo().join(source).exists(),
                "COPY {source}: no such path in the repository"
            );
            copied += 1;
        }
    }
    // Every workspace member's manifest is in the build context.
    let members = read("Cargo.toml");
    let members = members
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .unwrap();
    for member in members.trim_matches(['[', ']']).split(',') {
        let member = member.trim().trim_matches('"');
        assert!(
            steps
                .iter()
                .any(|s| s.starts_with(&format!("COPY {member} "))),
            "the build lacks the workspace member {member}"
        );
    }
    assert!(copied >= 6, "{copied} paths copied");
    let user = steps
        .iter()
        .rfind(|s| s.starts_with("USER "))
        .expect("a USER");
    assert!(!user.contains("root") && !user.ends_with(" 0"), "{user}");
    let health = steps
        .iter()
        .find(|s| s.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    // Alive, not healthy: /health fails during a copy.
    assert!(health.contains("/live"), "{health}");
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with("VOLUME ") && s.contains("/var/lib/cutover"))
    );
    for install in steps.iter().filter(|s| s.contains("apt-get install")) {
        assert!(
            install.contains("--no-install-recommends")
                && install.contains("rm -rf /var/lib/apt/lists"),
            "{install}"
        );
    }
    // The runtime's binary is the one the build stage made.
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with("COPY --from=build /src/target/release/cutover "))
    );
}

/// The `cutover.toml` embedded in the ConfigMap.
fn configmap_toml(manifest: &str) -> String {
    let start = manifest
        .find("cutover.toml: |\n")
        .expect("a ConfigMap with cutover.toml");
    let body = &manifest[start + "cutover.toml: |\n".len()..];
    let end = body.find("\n---").unwrap_or(body.len());
    body[..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `CUTOVER__…` names in `text`.
fn env_names(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            // `CUTOVER__SECTION__KEY`, not a comment's `CUTOVER__*__KEY`.
            w.strip_prefix("CUTOVER__")
                .and_then(|rest| rest.split_once("__"))
                .is_some_and(|(section, key)| !section.is_empty() && !key.is_empty())
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn cutover_check_takes_the_kubernetes_config_and_every_environment_key_deploy_sets() {
    let pair = Pair::start(ClusterOptions::default()).await;
    pair.both("CREATE TABLE items (id int PRIMARY KEY, v text);")
        .await;
    let manifest = read("deploy/kubernetes/cutover.yaml");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The manifest's config, pointed at this test's servers.
    let toml: String = configmap_toml(&manifest)
        .lines()
        .map(|line| {
            if line.starts_with("url = ") && line.contains("old-db") {
                format!("url = \"{}\"", pair.source.url("app", "postgres", None))
            } else if line.starts_with("url = ") && line.contains("new-db") {
                format!("url = \"{}\"", pair.target.url("app", "postgres", None))
            } else if line.starts_with("dir = ") {
                format!("dir = \"{}\"", state.display())
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(toml.contains("[replication]") && toml.contains("listen = \"0.0.0.0:9187\""));
    let config = write_config(dir.path(), &toml);
    // Every CUTOVER__ variable the manifests, the Dockerfile and the unit
    // set; cutover refuses a name it does not know.
    let mut names = env_names(&manifest);
    names.extend(env_names(&read("deploy/Dockerfile")));
    names.extend(env_names(&read("deploy/cutover.service")));
    names.sort();
    names.dedup();
    assert!(
        names.contains(&"CUTOVER__SOURCE__PASSWORD".to_owned()),
        "{names:?}"
    );
    let state_text = state.display().to_string();
    let env: Vec<(&str, &str)> = names
        .iter()
        .map(|name| {
            let value = match name.as_str() {
                "CUTOVER__STATE__DIR" => state_text.as_str(),
                "CUTOVER__HTTP__LISTEN" => "0.0.0.0:9187",
                // Trust authentication: any password is taken.
                _ => "from-the-secret",
            };
            (name.as_str(), value)
        })
        .collect();
    let config = config.to_str().unwrap();
    let out = run_cutover(&["--config", config, "check"], &env);
    assert_eq!(out.code, 0, "{}", out.all_output());
    assert!(!out.all_output().contains("from-the-secret"));
    // The probes and the Service use the port the config listens on.
    for wanted in [
        "containerPort: 9187",
        "path: /ready",
        "path: /live",
        "publishNotReadyAddresses: true",
        "path: /metrics",
        "replicas: 1",
    ] {
        assert!(manifest.contains(wanted), "the manifests lack {wanted}");
    }
}

#[test]
fn systemd_verifies_the_unit() {
    let unit = read("deploy/cutover.service")
        .replace("/usr/local/bin/cutover", cutover_bin().to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cutover.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (systemd) to verify the unit");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Only its own lines count: the machine's other units are not ours.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("cutover.service"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{said}");
}
