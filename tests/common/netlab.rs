//! A scripts/netlab lab for the integration tests: network namespaces h1..hN with a root
//! link, a prefix and subnet of its own, torn down (every process in it killed) on drop, even
//! when the test fails.

use std::process::Command;

use super::run_ok;

/// A scripts/netlab lab with a prefix and a subnet of its own and a root link; `down` on
/// drop (every process in it killed), even when the test fails.
#[derive(Debug)]
pub struct Lab {
    pub prefix: String,
    pub net: String,
}

impl Lab {
    /// `hosts` hosts. The prefix and subnet depend on the pid, as in tests/seed.rs, in a range
    /// no other user of netlab takes (seed: 10.78.*, fault-soak: 10.77.41, selftest: 10.77.9).
    pub fn up(tag: &str, net_base: &str, hosts: u32) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            prefix: format!("{tag}{}", pid % 10_000),
            net: format!("{net_base}.{}", 20 + pid % 200),
        };
        let _ = lab.command().arg("down").output(); // a leftover of a killed run
        run_ok(
            lab.command()
                .args(["up", &hosts.to_string(), "--root-link"]),
        );
        lab
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netlab"));
        cmd.env("NETLAB_PREFIX", &self.prefix)
            .env("NETLAB_NET", &self.net);
        cmd
    }

    /// `netlab ARGS`, which must succeed.
    pub fn run(&self, args: &[&str]) {
        run_ok(self.command().args(args));
    }

    /// The address of lab host `host` ("h3"), or of the root link ("root").
    pub fn ip(&self, host: &str) -> String {
        match host {
            "root" => format!("{}.254", self.net),
            _ => format!("{}.{}", self.net, &host[1..]),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.command().arg("down").output();
    }
}
