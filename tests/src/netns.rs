//! A server behind its own network namespace, joined to the test's by a
//! veth pair: the faults a proxy cannot make, made by the kernel. A link
//! that stops carrying packets (a black hole: no RST, no ICMP), replies
//! dropped in one direction only, a link too slow for its load (queueing
//! delay, and packets dropped when its queue overflows), and, where the
//! kernel has `sch_netem`, random loss and delay.
//!
//! Namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip`
//! (iproute2); [`Netns::create`] says why when it cannot make one, and the
//! tests skip saying so (and fail instead under `CI`, where they must run).

use std::net::Ipv4Addr;
use std::process::Command;

/// One namespace with one veth link to the test's namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// The address of the namespace's end (where its server listens).
    pub addr: Ipv4Addr,
    /// The address of the test's end (where cutover connects from).
    pub peer: Ipv4Addr,
}

/// Runs one of iproute2's programs (`ip`, `tc`); its error names the
/// command and what it said.
fn iproute2(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program} ({e}): install iproute2"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    iproute2("ip", args)
}

fn tc(args: &[&str]) -> Result<(), String> {
    iproute2("tc", args)
}

impl Netns {
    /// Makes a namespace and its link, or says why it cannot.
    pub fn create() -> Result<Netns, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("network namespaces need root".into());
        }
        // Each namespace takes a /30 of 10.213.0.0/16, free at the time:
        // the name is claimed by `ip netns add`, which fails if another
        // test (or process) holds it.
        let start = (std::process::id() as usize * 7) % 16384;
        for i in 0..16384 {
            let n = (start + i) % 16384;
            let name = format!("cutover-t{n}");
            if ip(&["netns", "add", &name]).is_err() {
                if i == 0 {
                    // Not a name clash when even the first one fails and no
                    // namespace can be made at all.
                    let probe = format!("cutover-probe{}", std::process::id());
                    ip(&["netns", "add", &probe])?;
                    let _ = ip(&["netns", "del", &probe]);
                }
                continue;
            }
            let base = Ipv4Addr::new(10, 213, (n / 64) as u8, ((n % 64) * 4) as u8);
            let peer = Ipv4Addr::from(u32::from(base) + 1);
            let addr = Ipv4Addr::from(u32::from(base) + 2);
            let netns = Netns { name, addr, peer };
            netns.link()?;
            return Ok(netns);
        }
        Err("no free namespace name".into())
    }

    fn link(&self) -> Result<(), String> {
        let host = self.host_side();
        let _ = ip(&["link", "del", &host]);
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &self.name,
        ])?;
        ip(&["addr", "add", &format!("{}/30", self.peer), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        let addr = format!("{}/30", self.addr);
        for args in [
            vec!["addr", "add", addr.as_str(), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["-n", self.name.as_str()];
            all.extend(args);
            ip(&all)?;
        }
        Ok(())
    }

    fn host_side(&self) -> String {
        // Interface names are at most 15 bytes.
        format!("cvh{}", &self.name["cutover-t".len()..])
    }

    /// The namespace's name (`ip netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file `nsenter --net=` takes.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// The link stops carrying packets both ways, silently: the server's
    /// end goes down, and what cutover sends is dropped by the link.
    pub fn black_hole(&self) {
        ip(&["-n", &self.name, "link", "set", "eth0", "down"]).expect("take the link down");
    }

    /// Packets reach the server; its replies are dropped (a one-way
    /// partition): the server's route back is a black hole.
    pub fn drop_replies(&self) {
        ip(&[
            "-n",
            &self.name,
            "route",
            "add",
            "blackhole",
            &format!("{}/32", self.peer),
        ])
        .expect("drop the server's replies");
    }

    /// The server's link sends at most `rate` (tc's units, `2mbit`) with a
    /// queue of `latency` (`100ms`): a link too slow for its load delays
    /// packets and drops what overflows the queue.
    pub fn throttle(&self, rate: &str, latency: &str) {
        tc(&[
            "-n", &self.name, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
            "burst", "16kbit", "latency", latency,
        ])
        .expect("throttle the link");
    }

    /// Random loss and delay with `netem` (`loss 5% delay 50ms`), where the
    /// kernel has it.
    pub fn netem(&self, spec: &[&str]) -> Result<(), String> {
        let mut args = vec![
            "-n", &self.name, "qdisc", "replace", "dev", "eth0", "root", "netem",
        ];
        args.extend_from_slice(spec);
        tc(&args)
    }

    /// Every fault undone: the link up, the route back, no queue limit.
    pub fn heal(&self) {
        let _ = ip(&[
            "-n",
            &self.name,
            "route",
            "del",
            "blackhole",
            &format!("{}/32", self.peer),
        ]);
        let _ = tc(&["-n", &self.name, "qdisc", "del", "dev", "eth0", "root"]);
        ip(&["-n", &self.name, "link", "set", "eth0", "up"]).expect("bring the link up");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and so
        // the pair.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_side()]);
    }
}

/// A namespace, or `None` after printing why the test is skipped; under
/// `CI` the test fails instead, since CI runs as root.
pub fn or_skip(test: &str) -> Option<Netns> {
    match Netns::create() {
        Ok(netns) => Some(netns),
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("{test}: cannot make a network namespace under CI: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: cannot make a network namespace: {why}");
            None
        }
    }
}
