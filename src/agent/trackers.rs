//! Trackers of the agent's exports as the control API manages them: list, add (validated,
//! recorded as running before it is used), remove (with its file), and the heat map.
//!
//! Invariant: a tracker added at run time is recorded as running in its export's tracker
//! directory before the call returns, so a crash from then on brings it back lost rather
//! than trusted.

use std::sync::Arc;

use crate::agent::exports::Exports;
use crate::api::types::{HeatMap, TrackerAdd, TrackerStatus};
use crate::api::ControlError;
use crate::dirty::{TrackerSpec, HOT_THRESHOLD};

/// The trackers of every export.
#[derive(Debug)]
pub struct Trackers {
    exports: Arc<Exports>,
}

impl Trackers {
    /// Trackers of `exports`.
    pub fn new(exports: Arc<Exports>) -> Self {
        Trackers { exports }
    }

    /// The trackers of `export`.
    pub fn trackers(&self, export: &str) -> Result<Vec<TrackerStatus>, ControlError> {
        let export = self.exports.get(export)?;
        Ok(export
            .trackers()
            .list()
            .iter()
            .map(|t| TrackerStatus::of(t))
            .collect())
    }

    /// Adds a tracker to `export`, recorded as running before it returns.
    pub fn add_tracker(
        &self,
        export: &str,
        add: TrackerAdd,
    ) -> Result<TrackerStatus, ControlError> {
        let export = self.exports.get(export)?;
        crate::name::validate(&add.name).map_err(|err| ControlError::Invalid(err.to_string()))?;
        let granularity_bytes = add.granularity_bytes.unwrap_or(export.granularity_bytes());
        crate::dirty::validate_granularity(granularity_bytes)
            .map_err(|err| ControlError::Invalid(err.to_string()))?;
        if export.trackers().get(&add.name).is_some() {
            return Err(ControlError::Exists(format!(
                "export '{}' already has a tracker '{}'",
                export.name(),
                add.name
            )));
        }
        let spec = TrackerSpec {
            name: add.name,
            granularity_bytes,
            half_life_ms: add
                .half_life_ms
                .unwrap_or(self.exports.half_life_ms())
                .max(1),
            durable: add.durable,
        };
        let tracker = export
            .trackers()
            .add(spec)
            .map_err(|err| ControlError::Invalid(err.to_string()))?;
        self.exports.save_active(&export)?;
        Ok(TrackerStatus::of(&tracker))
    }

    /// Removes a tracker and its file.
    pub fn remove_tracker(&self, export: &str, tracker: &str) -> Result<(), ControlError> {
        let export = self.exports.get(export)?;
        export.trackers().remove(tracker).map_err(|_| {
            ControlError::NotFound(format!(
                "export '{}' has no tracker '{tracker}'",
                export.name()
            ))
        })?;
        // The set removed its file and log.
        Ok(())
    }

    /// The heat map of one tracker (the first when none is named), in at most `cells` cells.
    pub fn heat(
        &self,
        export: &str,
        tracker: Option<&str>,
        cells: usize,
    ) -> Result<HeatMap, ControlError> {
        let export = self.exports.get(export)?;
        let tracker = match tracker {
            Some(name) => export.trackers().get(name).ok_or_else(|| {
                ControlError::NotFound(format!(
                    "export '{}' has no tracker '{name}'",
                    export.name()
                ))
            })?,
            None => export.trackers().list().into_iter().next().ok_or_else(|| {
                ControlError::NotFound(format!(
                    "export '{}' has no tracker: add one with `ferry tracker add {} NAME`",
                    export.name(),
                    export.name()
                ))
            })?,
        };
        let cells = cells.clamp(1, 65_536).min(tracker.block_count() as usize);
        let map = tracker.heat_map(cells);
        let cell_bytes = export.size_bytes().div_ceil(map.len().max(1) as u64);
        Ok(HeatMap {
            export: export.name().to_string(),
            tracker: tracker.name().to_string(),
            granularity_bytes: tracker.granularity_bytes(),
            block_count: tracker.block_count(),
            cell_bytes,
            cells: map,
            histogram: tracker.heat_histogram_pairs(),
            hot_blocks: tracker.hot_count(HOT_THRESHOLD),
        })
    }
}
