//! A batch migration that runs through the manager-pair scenarios (issue 13: "a batch
//! running"): h1 serves [`DISKS`] images of pseudo-random data, and the active manager moves
//! them to h2 one at a time at a capped rate, digests compared at each switchover, while the
//! scenarios kill, cut off, pause and crash managers and hosts (h1 and h2 among them when
//! they hold the witness). A guest writes into every disk all along (the fault soak's
//! writer, `scripts/fault-soak.py writer`: libnbd through h1's socket, reconnecting after a
//! crash, every write logged before it is sent and once it is acknowledged). At the end every
//! item must be migrated by the manager's view and by h1's journal, and each image at h2
//! must hold every acknowledged write (`fault-soak.py check`): no acknowledged write lost.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{now_ms, Fleet, Lab};
use crate::common::{agent_bin, data_image};

/// Disks moved.
pub const DISKS: usize = 3;
/// Size of each.
const DISK_MIB: usize = 24;
/// The block stream's cap: the batch lasts about `DISKS x DISK_MIB` seconds, through most
/// of the scenarios.
const BANDWIDTH: &str = "1M";
/// The batch's name.
pub const NAME: &str = "lab";
/// Block-stream port of every lab agent.
const TRANSFER_PORT: u16 = 7451;
/// NBD-over-TCP port of every lab agent (a source forwards there after its switchover).
const NBD_PORT: u16 = 10809;

/// The batch's disks and where it stands.
#[derive(Debug)]
pub struct LabBatch {
    /// Copies of the disks as they were before the batch.
    originals: Vec<PathBuf>,
    /// The disks h1 serves.
    images: Vec<PathBuf>,
    /// When the batch was handed to the active manager (Unix ms).
    pub submitted_ms: Option<u64>,
    /// The guest's writers, one per disk, and their ledgers.
    writers: Vec<(Child, PathBuf)>,
}

impl LabBatch {
    /// Makes the disks (and their copies) under `root`.
    pub fn prepare(root: &Path) -> LabBatch {
        let disks = root.join("disks");
        let originals = root.join("originals");
        std::fs::create_dir_all(&disks).expect("disks dir");
        std::fs::create_dir_all(&originals).expect("originals dir");
        let mut batch = LabBatch {
            originals: Vec::new(),
            images: Vec::new(),
            submitted_ms: None,
            writers: Vec::new(),
        };
        for i in 1..=DISKS {
            let image = disks.join(format!("vm{i}.img"));
            data_image(&image, DISK_MIB, i as u8 + 40);
            let original = originals.join(format!("vm{i}.img"));
            std::fs::copy(&image, &original).expect("copy of a disk");
            batch.images.push(image);
            batch.originals.push(original);
        }
        batch
    }

    /// The agent flags of `host`: a block stream and NBD over TCP on its lab address; h1
    /// serves the disks.
    pub fn agent_flags(&self, lab: &Lab, fleet: &Fleet, host: &str) -> Vec<String> {
        let ip = lab.ip(host);
        let mut flags = vec![
            "--transfer".to_string(),
            format!("{ip}:{TRANSFER_PORT}"),
            "--cluster-key".into(),
            fleet.cluster_key.display().to_string(),
            "--tcp".into(),
            format!("{ip}:{NBD_PORT}"),
        ];
        if host == "h1" {
            for (i, image) in self.images.iter().enumerate() {
                flags.push("--export".into());
                flags.push(format!("vm{}={}", i + 1, image.display()));
            }
        }
        flags
    }

    /// How a manager names `host`'s agent: `NAME=API,TRANSFER`.
    pub fn manager_agent(lab: &Lab, host: &str, api: &str) -> String {
        format!("{host}={api},{}:{TRANSFER_PORT}", lab.ip(host))
    }

    /// Starts the guest: a writer per disk through `socket` (h1's NBD socket), 40 writes/s
    /// each, 90% of them into a hot 512 KiB, ledgers under `root`.
    pub fn start_writers(&mut self, root: &Path, socket: &Path) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fault-soak.py");
        for i in 1..=DISKS {
            let ledger = root.join(format!("ledger-vm{i}"));
            let child = Command::new("/usr/bin/python3")
                .arg(&script)
                .arg("writer")
                .arg("--uri")
                .arg(format!("nbd+unix:///vm{i}?socket={}", socket.display()))
                .args(["--disk", &i.to_string(), "--size"])
                .arg((DISK_MIB << 20).to_string())
                .arg("--ledger")
                .arg(&ledger)
                .args(["--rate", "40", "--seed", &i.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("the fault soak's writer (python3-libnbd)");
            self.writers.push((child, ledger));
        }
    }

    /// `ferry migrate vm1.. --to h2 --batch lab` through the manager at `listen`, as an
    /// operator would.
    pub fn submit(&mut self, fleet: &Fleet, listen: &str) {
        let exports: Vec<String> = (1..=DISKS).map(|i| format!("vm{i}")).collect();
        let out = Command::new(agent_bin())
            .arg("migrate")
            .args(&exports)
            .args(["--to", "h2", "--batch", NAME, "--concurrency", "1"])
            .args(["--bandwidth", BANDWIDTH, "--verify", "--no-wait"])
            .args(["--api", listen, "--token-file"])
            .arg(&fleet.token_file)
            .arg("--api-tls-creds")
            .arg(&fleet.creds)
            .output()
            .expect("ferry migrate");
        assert!(
            out.status.success(),
            "ferry migrate --batch {NAME}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.submitted_ms = Some(now_ms());
    }

    /// Waits (at most `limit`) until the active manager sees every item migrated, then
    /// checks h1's verdicts and h2's images. Returns notes and failures.
    pub fn finish(
        &mut self,
        fleet: &Fleet,
        managers: &[String],
        (h1_api, h2_dir): (&str, &Path),
        limit: Duration,
    ) -> (Vec<String>, Vec<String>) {
        let (mut notes, mut failures) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + limit;
        let mut last = String::from("no view");
        let finished = loop {
            if let Some(view) = active_view(fleet, managers) {
                last = format!("{view:?}");
                if view.items.iter().all(|item| item.state == "migrated") {
                    let jobs: Vec<String> =
                        view.items.iter().filter_map(|i| i.job.clone()).collect();
                    notes.push(format!("jobs {}", jobs.join(" ")));
                    break true;
                }
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        if !finished {
            failures.push(format!(
                "batch {NAME} not finished within {limit:?}: {last}"
            ));
            return (notes, failures);
        }
        if let Some(at) = self.submitted_ms {
            notes.push(format!(
                "all {DISKS} migrated {:.0} s after submission",
                now_ms().saturating_sub(at) as f64 / 1e3
            ));
        }
        match fleet
            .client(h1_api, Duration::from_secs(5))
            .migration_status(Some(NAME))
        {
            Ok(lines) => {
                let migrated = lines.iter().filter(|l| l.verdict == "migrated").count();
                if migrated != DISKS || lines.len() != DISKS {
                    failures.push(format!("h1's verdicts: {lines:?}"));
                }
            }
            Err(err) => failures.push(format!("h1's status: {err}")),
        }
        self.check_writes(h2_dir, &mut notes, &mut failures);
        (notes, failures)
    }
}

impl LabBatch {
    /// Stops the writers and checks every acknowledged write in h2's images (without
    /// writers: each image equal to its original).
    fn check_writes(&mut self, h2_dir: &Path, notes: &mut Vec<String>, failures: &mut Vec<String>) {
        let images: Vec<PathBuf> = (1..=DISKS)
            .map(|i| h2_dir.join(format!("state/images/vm{i}.img")))
            .collect();
        if self.writers.is_empty() {
            for (original, moved) in self.originals.iter().zip(&images) {
                let same = Command::new("cmp")
                    .arg(original)
                    .arg(moved)
                    .status()
                    .is_ok_and(|s| s.success());
                if !same {
                    failures.push(format!("{} differs from the original", moved.display()));
                }
            }
            notes.push(format!("{DISKS} images at h2 equal the originals"));
            return;
        }
        // The writers still write through h1 (forwarding to h2): a check that read the
        // ledger before a write's lines and the image after that write landed would see a
        // write the ledger does not name. Stopped first, the ledger and image are final.
        self.stop_writers();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fault-soak.py");
        for (i, ((_, ledger), image)) in self.writers.iter().zip(&images).enumerate() {
            let out = Command::new("/usr/bin/python3")
                .arg(&script)
                .arg("check")
                .arg(image)
                .arg(ledger)
                .args(["--disk", &(i + 1).to_string()])
                .output()
                .expect("fault-soak.py check");
            let said = String::from_utf8_lossy(&out.stdout);
            let last = said.lines().last().unwrap_or_default().to_string();
            if out.status.success() {
                notes.push(format!("vm{}: {last}", i + 1));
            } else {
                // Kept for a look: the temporary directory goes with the test.
                let keep = Path::new(env!("CARGO_TARGET_TMPDIR"));
                let _ = std::fs::copy(ledger, keep.join(format!("lab-ledger-vm{}", i + 1)));
                let _ = std::fs::copy(image, keep.join(format!("lab-image-vm{}", i + 1)));
                failures.push(format!(
                    "vm{}: {said} (ledger and image in {})",
                    i + 1,
                    keep.display()
                ));
            }
        }
    }

    /// Stops the guest's writers: SIGTERM, on which a writer ends after its current write
    /// (acknowledged or failed) and leaves its ledger whole; SIGKILL after 10 s. (A SIGKILL
    /// can cut the ledger's last line while the write it announces is already on the
    /// socket: the check would then find a write the ledger never named.)
    pub fn stop_writers(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for (child, _) in &mut self.writers {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (child, _) in &mut self.writers {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LabBatch {
    fn drop(&mut self) {
        self.stop_writers();
    }
}

/// The batch as the active manager sees it, if one answers as active.
fn active_view(fleet: &Fleet, managers: &[String]) -> Option<ferry::api::fleet::BatchView> {
    managers.iter().find_map(|listen| {
        let client = fleet.client(listen, Duration::from_secs(2));
        let status = client.manager_status().ok()?;
        if !status.active {
            return None;
        }
        client.manager_batch(NAME).ok()
    })
}
