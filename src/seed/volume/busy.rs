//! Whether a block device is in use, so that a raw medium is never written over a mounted
//! file system: the device or one of its partitions is mounted (`/proc/self/mountinfo`, by
//! device number and by source path), used as swap (`/proc/swaps`), or held by another
//! device such as device mapper or md (`/sys/dev/block/<dev>/holders`).
//!
//! Invariants: a file that cannot be read is an error, except sysfs entries that do not
//! exist (no partitions, no holders); the answer errs towards "in use".

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::sys::stat::{major, minor};

/// A device number as (major, minor).
pub(super) type DevNumber = (u64, u64);

/// Whether device `major:minor` or a partition of it is in use (see the module docs).
pub(super) fn device_in_use(major: u64, minor: u64) -> io::Result<bool> {
    let mut ours = vec![(major, minor)];
    ours.extend(partitions((major, minor))?);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let swaps = fs::read_to_string("/proc/swaps")?;
    let mut used = mounted_devices(&mountinfo);
    used.extend(swap_paths(&swaps).filter_map(block_device_number));
    if ours.iter().any(|dev| used.contains(dev)) {
        return Ok(true);
    }
    for dev in &ours {
        let holders = Path::new("/sys/dev/block").join(format!("{}:{}/holders", dev.0, dev.1));
        match fs::read_dir(&holders) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Ok(true);
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    Ok(false)
}

/// The partitions of a whole device, from sysfs (none when it has no sysfs entry).
fn partitions(dev: DevNumber) -> io::Result<Vec<DevNumber>> {
    let dir = Path::new("/sys/dev/block").join(format!("{}:{}", dev.0, dev.1));
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.join("partition").exists() {
            if let Some(dev) = fs::read_to_string(path.join("dev"))?
                .trim()
                .split_once(':')
                .and_then(parse_dev)
            {
                found.push(dev);
            }
        }
    }
    Ok(found)
}

fn parse_dev((major, minor): (&str, &str)) -> Option<DevNumber> {
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The device numbers mounted according to `mountinfo`: each line's `major:minor`, and the
/// device number of its source when that is a block device.
pub(super) fn mounted_devices(mountinfo: &str) -> Vec<DevNumber> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if let Some(dev) = fields
            .get(2)
            .and_then(|f| f.split_once(':'))
            .and_then(parse_dev)
        {
            found.push(dev);
        }
        let source = fields
            .iter()
            .position(|&f| f == "-")
            .and_then(|sep| fields.get(sep + 2));
        if let Some(dev) = source.and_then(|s| block_device_number(s)) {
            found.push(dev);
        }
    }
    found
}

/// The paths `/proc/swaps` lists (its first line is a heading).
pub(super) fn swap_paths(swaps: &str) -> impl Iterator<Item = &str> {
    swaps
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
}

/// The device number of `path` if it is an absolute path to a block device.
fn block_device_number(path: &str) -> Option<DevNumber> {
    if !path.starts_with('/') {
        return None;
    }
    let meta = fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| (major(meta.rdev()), minor(meta.rdev())))
}
