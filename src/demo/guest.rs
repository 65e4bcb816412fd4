//! The demo's guest: a deterministic PRNG, a Zipf-skewed choice of 4 KiB blocks, block
//! contents that name their offset and generation, and the ledger a read-back is checked
//! against.
//!
//! Invariant: the guest never has two writes of one block in flight. NBD does not order
//! concurrent requests, so with two in flight "the last write" of that block would be
//! undefined and a read-back could not tell a lost write from a reordered one (fio's verify
//! avoids overlapping writes for the same reason).

use std::collections::{HashMap, HashSet};

use super::DemoError;
use crate::nbd::client::NbdClient;

pub(crate) use crate::prng::SplitMix64 as Prng;
/// Bytes per guest write.
pub(crate) const WRITE_BYTES: u64 = 4096;
/// Hot regions the Zipf law picks from.
pub(crate) const REGIONS: usize = 256;
/// Zipf exponent.
pub(crate) const ZIPF_S: f64 = 1.2;

/// Region ranks scattered over the disk, and the Zipf CDF over ranks.
#[derive(Debug)]
pub(crate) struct Workload {
    regions: Vec<u64>,
    cdf: Vec<f64>,
    region_bytes: u64,
}

impl Workload {
    pub(crate) fn new(size_bytes: u64, prng: &mut Prng) -> Self {
        let mut regions: Vec<u64> = (0..REGIONS as u64).collect();
        for i in (1..regions.len()).rev() {
            regions.swap(i, prng.below(i as u64 + 1) as usize);
        }
        let weights: Vec<f64> = (1..=REGIONS)
            .map(|rank| 1.0 / (rank as f64).powf(ZIPF_S))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Workload {
            regions,
            cdf,
            region_bytes: size_bytes / REGIONS as u64,
        }
    }

    /// A 4 KiB-aligned offset: a Zipf-chosen region, then a spot inside its first 1/16th, so
    /// hot regions are rewritten often.
    pub(crate) fn offset(&mut self, prng: &mut Prng) -> u64 {
        let u = prng.unit();
        let rank = self.cdf.partition_point(|c| *c < u).min(REGIONS - 1);
        let span_blocks = (self.region_bytes / 16 / WRITE_BYTES).max(1);
        self.regions[rank] * self.region_bytes + prng.below(span_blocks) * WRITE_BYTES
    }
}

/// Block contents that name their offset and generation, so a read-back can be checked.
pub(crate) fn pattern(offset_bytes: u64, generation: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&offset_bytes.to_le_bytes());
        chunk[8..16].copy_from_slice(&(generation ^ i as u64).to_le_bytes());
    }
}

/// What the guest wrote: the last generation of every block, and the blocks with a write
/// possibly in flight since the last drain.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    last: HashMap<u64, u64>,
    in_flight: HashSet<u64>,
}

impl Ledger {
    /// Whether the guest must drain its writes before writing `offset_bytes` again.
    pub(crate) fn must_drain(&self, offset_bytes: u64) -> bool {
        self.in_flight.contains(&offset_bytes)
    }

    /// Every write sent so far has been answered.
    pub(crate) fn drained(&mut self) {
        self.in_flight.clear();
    }

    /// A write of `generation` to `offset_bytes` is being sent.
    pub(crate) fn record(&mut self, offset_bytes: u64, generation: u64) {
        self.last.insert(offset_bytes, generation);
        self.in_flight.insert(offset_bytes);
    }

    /// Distinct blocks written.
    pub(crate) fn blocks(&self) -> usize {
        self.last.len()
    }

    /// Reads back up to `limit` blocks (every write answered first) and checks each holds
    /// its last write; returns how many were checked.
    pub(crate) fn verify(&self, nbd: &mut NbdClient, limit: usize) -> Result<usize, DemoError> {
        let mut buf = vec![0u8; WRITE_BYTES as usize];
        let mut checked = 0;
        for (offset, generation) in self.last.iter().take(limit) {
            pattern(*offset, *generation, &mut buf);
            let read = nbd
                .read_at(*offset, WRITE_BYTES as u32)
                .map_err(DemoError::Nbd)?;
            if read != buf {
                return Err(DemoError::LostWrite {
                    offset_bytes: *offset,
                });
            }
            checked += 1;
        }
        Ok(checked)
    }
}
