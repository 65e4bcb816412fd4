//! Two agents on loopback sharing a cluster key (source serving `vm1`, destination serving
//! NBD over TCP), and the guest (fio's nbd engine with crc32c verify headers) that writes
//! into them: shared by the migration and journal tests.

use std::path::Path;
use std::process::{Child, Command};

use super::{free_port, run_ok, stdout, AgentProc};

/// One MiB.
pub const MIB: u64 = 1 << 20;

pub fn write_key(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("cluster.key");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(
        &mut file,
        b"5eed000000000000000000000000000000000000000000000000000000c0ffee\n",
    )
    .unwrap();
    path
}

/// Source and destination agents on loopback; the destination serves NBD over TCP (the
/// source forwards there after the switchover).
pub struct Pair {
    pub source: AgentProc,
    pub destination: AgentProc,
    pub destination_transfer: String,
    /// The cluster key both agents use.
    pub key_path: std::path::PathBuf,
    source_exports: Vec<String>,
    source_extra: Vec<String>,
    source_transfer: String,
    _keys: tempfile::TempDir,
}

impl Pair {
    /// Starts the (stopped or killed) source agent again, same state and addresses.
    pub fn restart_source(&mut self) {
        let key = self.key_path.to_str().unwrap().to_string();
        let mut extra = vec!["--transfer", &self.source_transfer, "--cluster-key", &key];
        extra.extend(self.source_extra.iter().map(String::as_str));
        self.source.restart(&self.source_exports, &extra);
    }

    /// Starts the (stopped or killed) destination agent again, same state and addresses.
    pub fn restart_destination(&mut self) {
        let key = self.key_path.to_str().unwrap().to_string();
        let extra = [
            "--tcp",
            "--transfer",
            &self.destination_transfer,
            "--cluster-key",
            &key,
        ];
        self.destination.restart(&[], &extra);
    }

    /// `ferry status --json` as `agent` sees it (the agent reads its journal and asks its
    /// peers).
    pub fn status(&self, agent: &AgentProc) -> serde_json::Value {
        self.batch_status(agent, None)
    }

    /// `ferry ARGS --json` against the source agent, in the background (stdout and stderr
    /// piped).
    pub fn background(&self, args: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .arg("--json")
            .args(["--api", &self.source.api, "--state-dir"])
            .arg(&self.source.state_dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `ferry status [BATCH] --json`, answered by `agent` through its API.
    pub fn batch_status(&self, agent: &AgentProc, batch: Option<&str>) -> serde_json::Value {
        let mut args = vec!["status", "--json"];
        args.extend(batch);
        json_of(&agent.cli(&args))
    }

    /// `ferry status --offline [BATCH] --json` for `agent` (its journal file read by the CLI,
    /// the agent not asked; the agent may be down) and what the CLI said on stderr.
    pub fn offline_status(
        &self,
        agent: &AgentProc,
        batch: Option<&str>,
    ) -> (serde_json::Value, String) {
        let key = self.key_path.to_str().unwrap();
        let mut args = vec!["status", "--offline", "--json", "--cluster-key", key];
        args.extend(batch);
        let out = agent.cli(&args);
        (
            json_of(&out),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The JSON a CLI call printed.
pub fn json_of(out: &std::process::Output) -> serde_json::Value {
    let text = stdout(out);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "ferry output ({e}):\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn pair(image: &Path, granularity: &str) -> Pair {
    pair_of(vec![format!(
        "vm1={},granularity={granularity}",
        image.display()
    )])
}

/// A pair whose source serves `source_exports` (`NAME=PATH[,opts]`).
pub fn pair_of(source_exports: Vec<String>) -> Pair {
    pair_with(source_exports, &[])
}

/// A pair whose source serves `source_exports` and gets `source_extra` flags (also on
/// restarts).
pub fn pair_with(source_exports: Vec<String>, source_extra: &[&str]) -> Pair {
    let keys = super::scratch_dir();
    let key = write_key(keys.path());
    let key = key.to_str().unwrap().to_string();
    let src_transfer = format!("127.0.0.1:{}", free_port());
    let dst_transfer = format!("127.0.0.1:{}", free_port());
    let mut extra = vec!["--transfer", &src_transfer, "--cluster-key", &key];
    extra.extend_from_slice(source_extra);
    let source = AgentProc::start(&source_exports, &extra);
    let destination = AgentProc::start(
        &[],
        &["--tcp", "--transfer", &dst_transfer, "--cluster-key", &key],
    );
    Pair {
        source,
        destination,
        destination_transfer: dst_transfer,
        key_path: key.into(),
        source_exports,
        source_extra: source_extra.iter().map(|s| s.to_string()).collect(),
        source_transfer: src_transfer,
        _keys: keys,
    }
}

/// The guest of the fault tests: fio writing 6000 verified zipf blocks at 1000 IOPS.
pub fn start_guest(uri: &str) -> Child {
    fio_zipf(uri, 1000, 6000, &["--do_verify=1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// `ferry migrate vm1 --json --bandwidth 16M --to DESTINATION EXTRA...` in the background.
pub fn migrate_background(pair: &Pair, extra: &[&str]) -> Child {
    let to = pair.destination_transfer.clone();
    let mut args = vec!["migrate", "vm1", "--bandwidth", "16M", "--to", &to];
    args.extend(extra);
    pair.background(&args)
}

/// `ferry migrate EXPORT --batch BATCH --bandwidth 8M` at the source, in the background (a
/// 16 MiB send is confirmed every 2 s, so faults can land between sends).
pub fn slow_migration(pair: &Pair, export: &str, batch: &str) -> Child {
    let to = pair.destination_transfer.clone();
    pair.background(&[
        "migrate",
        export,
        "--batch",
        batch,
        "--bandwidth",
        "8M",
        "--to",
        &to,
    ])
}

/// Random data in the first `len` bytes (the rest stays a hole).
pub fn prefill(image: &Path, len: u64) {
    run_ok(
        Command::new("fio")
            .args([
                "--name=prefill",
                "--rw=write",
                "--bs=1M",
                "--direct=1",
                "--refill_buffers",
            ])
            .arg(format!("--filename={}", image.display()))
            .arg(format!("--size={len}"))
            .args(["--output-format=terse"]),
    );
}

pub fn fio_zipf(uri: &str, iops: u32, ios: u32, extra: &[&str]) -> Command {
    let target = ["--ioengine=nbd".to_string(), format!("--uri={uri}")];
    fio_zipf_on(&target, iops, ios, extra)
}

/// The guest's fio job on `target` (`--ioengine=...` and where it writes).
fn fio_zipf_on(target: &[String], iops: u32, ios: u32, extra: &[&str]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=guest")
        .args(target)
        .args(["--rw=randwrite", "--bs=4k", "--iodepth=8"])
        .args([
            "--random_distribution=zipf:1.2",
            "--randseed=42",
            "--verify=crc32c",
        ])
        .args(["--verify_state_save=0", "--size=128M"])
        .arg(format!("--rate_iops={iops}"))
        .arg(format!("--number_ios={ios}"))
        .args(extra);
    cmd
}

/// fio reads back the last version of every block the guest's `ios` writes touched, at `uri`.
pub fn verify_only(uri: &str, ios: u32) {
    let out = fio_zipf(uri, 0, ios, &["--verify_only"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Like `verify_only`, in an image file read directly (psync), not through NBD.
pub fn verify_only_file(image: &Path, ios: u32) {
    let target = [
        "--ioengine=psync".to_string(),
        format!("--filename={}", image.display()),
    ];
    let out = fio_zipf_on(&target, 0, ios, &["--verify_only"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("verify: bad"), "{text}");
}

pub fn wait_fio(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed:\n{text}");
    assert!(
        !text.contains("verify: bad") && !text.contains("err=") || text.contains("err= 0"),
        "{text}"
    );
    text
}

pub fn migrate(agent: &AgentProc, to: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["migrate", "vm1", "--to", to, "--json"];
    args.extend_from_slice(extra);
    let out = agent.cli(&args);
    let text = stdout(&out);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "migrate output ({e}):\n{text}\n{}\nsource log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        )
    })
}
