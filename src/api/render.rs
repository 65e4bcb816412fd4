//! Terminal rendering of API answers for the CLI: tables of exports, trackers and migration
//! verdicts (`ferry status`), and the write-heat map that `ferry heat EXPORT` prints.
//!
//! Invariants: output is plain text ending in a newline; columns are aligned by character
//! count (not bytes), numbers right-aligned, text left-aligned; colour (ANSI SGR) only when
//! asked for, and every coloured row ends with a reset, so a cut-off output never leaves the
//! terminal coloured. Rendering is pure: the same input gives the same text.

use std::fmt::Write as _;

use super::types::{
    DiskStatus, ExportStatus, Forwarding, HeatMap, StaleImage, TrackerState, TrackerStatus,
};
use crate::dirty::heat::{heat_bucket, HEAT_BUCKET_LOWER_BOUNDS, HOT_THRESHOLD};

/// Heat shades, coldest first: index 0 is "never written or fully cooled".
pub const HEAT_RAMP: [char; 6] = [' ', '·', '░', '▒', '▓', '█'];
/// ANSI foreground colours of the ramp levels 1..=5 (blue to red).
const HEAT_COLORS: [&str; 5] = ["34", "36", "32", "33", "1;31"];
const RESET: &str = "\x1b[0m";

/// `bytes` in binary units: `512 B`, `64 KiB`, `1.5 GiB` (one decimal unless exact).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 2)) > 0 {
        unit += 1;
    }
    let scale = 1u64 << (10 * (unit + 1));
    if bytes % scale == 0 {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

/// A duration in milliseconds: `250 ms`, `30 s`, `1.5 min`, `2 h`.
pub fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms < 1000 => format!("{ms} ms"),
        ms if ms < 60_000 => trim_decimal(ms as f64 / 1000.0, "s"),
        ms if ms < 3_600_000 => trim_decimal(ms as f64 / 60_000.0, "min"),
        ms => trim_decimal(ms as f64 / 3_600_000.0, "h"),
    }
}

/// A latency in microseconds: `85 µs`, `1.2 ms`, `3.40 s`.
pub fn human_us(us: u64) -> String {
    match us {
        us if us < 1000 => format!("{us} µs"),
        us if us < 1_000_000 => format!("{:.1} ms", us as f64 / 1000.0),
        us => format!("{:.2} s", us as f64 / 1_000_000.0),
    }
}

fn trim_decimal(value: f64, unit: &str) -> String {
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {unit}")
}

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A text table: a header row, then rows, columns padded to the widest cell.
#[derive(Debug)]
struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        assert_eq!(
            row.len(),
            self.columns.len(),
            "row width matches the header"
        );
        self.rows.push(row);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .map(|(h, _)| h.chars().count())
            .collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let header: Vec<String> = self.columns.iter().map(|(h, _)| h.to_string()).collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - cell.chars().count());
                match self.columns[i].1 {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `forwarding → HOST:PORT since 2026-12-05 08:59:21Z`, and while the destination is away
/// ` (holding since 2026-12-05 09:10:02Z, 3 requests)`.
pub fn forwarding_text(forwarding: &Forwarding) -> String {
    let mut text = format!("forwarding → {}", forwarding.to);
    if let Some(ms) = forwarding.since_unix_ms {
        text.push_str(&format!(" since {}", utc_text(ms)));
    }
    if let Some(holding) = &forwarding.holding {
        let plural = if holding.requests == 1 { "" } else { "s" };
        text.push_str(&format!(
            " (holding since {}, {} request{plural})",
            utc_text(holding.since_unix_ms),
            holding.requests
        ));
    }
    text
}

/// `YYYY-MM-DD HH:MM:SSZ` of a time in ms since the Unix epoch (civil-from-days, UTC).
fn utc_text(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The `ferry export ls` table.
pub fn exports_table(exports: &[ExportStatus]) -> String {
    if exports.is_empty() {
        return "no exports\n".to_string();
    }
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("MODE", Align::Left),
        ("GRANULARITY", Align::Right),
        ("CONNS", Align::Right),
        ("READ", Align::Right),
        ("WRITTEN", Align::Right),
        ("P99", Align::Right),
        ("TRACKERS", Align::Left),
        ("PATH", Align::Left),
    ]);
    for export in exports {
        let latency = &export.stats.latency_us;
        let trackers: Vec<String> = export
            .trackers
            .iter()
            .map(|t| {
                if t.lost {
                    format!("{}(lost)", t.name)
                } else {
                    t.name.clone()
                }
            })
            .collect();
        table.push(vec![
            export.name.clone(),
            human_bytes(export.size_bytes),
            if export.read_only { "ro" } else { "rw" }.to_string(),
            human_bytes(export.granularity_bytes),
            export.connections.to_string(),
            human_bytes(export.stats.counts.read_bytes),
            human_bytes(export.stats.counts.write_bytes),
            if latency.count == 0 {
                "-".to_string()
            } else {
                human_us(latency.p99)
            },
            if trackers.is_empty() {
                "-".to_string()
            } else {
                trackers.join(",")
            },
            match &export.forwarding {
                // Its image here is stale: never shown as where the disk is.
                Some(forwarding) => forwarding_text(forwarding),
                None => export.path.display().to_string(),
            },
        ]);
    }
    table.render()
}

/// The `ferry tracker ls` table.
pub fn trackers_table(trackers: &[TrackerStatus]) -> String {
    if trackers.is_empty() {
        return "no trackers\n".to_string();
    }
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("GRANULARITY", Align::Right),
        ("BLOCKS", Align::Right),
        ("DIRTY BLOCKS", Align::Right),
        ("DIRTY", Align::Right),
        ("DIRTY%", Align::Right),
        ("HALF-LIFE", Align::Right),
        ("MEMORY", Align::Right),
        ("STATE FILE", Align::Right),
        ("DURABLE", Align::Left),
        ("STATE", Align::Left),
    ]);
    for tracker in trackers {
        let percent = if tracker.block_count == 0 {
            0.0
        } else {
            100.0 * tracker.dirty_blocks as f64 / tracker.block_count as f64
        };
        table.push(vec![
            tracker.name.clone(),
            human_bytes(tracker.granularity_bytes),
            tracker.block_count.to_string(),
            tracker.dirty_blocks.to_string(),
            human_bytes(tracker.dirty_bytes),
            format!("{percent:.1}%"),
            human_ms(tracker.half_life_ms),
            human_bytes(tracker.memory_bytes),
            if tracker.state_bytes == 0 {
                "-".to_string()
            } else {
                human_bytes(tracker.state_bytes)
            },
            if tracker.durable { "yes" } else { "no" }.to_string(),
            tracker_state(tracker),
        ]);
    }
    table.render()
}

/// The STATE cell of `tracker ls`: the state and what it means for a backup.
fn tracker_state(tracker: &TrackerStatus) -> String {
    match tracker.state {
        // An older agent reports no state, only the flag.
        TrackerState::Ok if tracker.lost => "lost (unclean stop: all dirty)".to_string(),
        TrackerState::Ok => "ok".to_string(),
        TrackerState::Lost => "lost (unclean stop: all dirty)".to_string(),
        TrackerState::Recovered { bound_bytes } => {
            format!("recovered (over-marks <= {})", human_bytes(bound_bytes))
        }
    }
}

/// The `ferry export gc` table: each stale image, its size on disk and what became of it.
pub fn stale_images(images: &[StaleImage], dry_run: bool) -> String {
    if images.is_empty() {
        return "no stale images\n".to_string();
    }
    let mut table = Table::new(&[
        ("EXPORT", Align::Left),
        ("JOB", Align::Right),
        ("ON DISK", Align::Right),
        ("PATH", Align::Left),
        ("", Align::Left),
    ]);
    for image in images {
        let fate = match (&image.kept_because, image.removed, dry_run) {
            (Some(reason), _, _) => format!("kept: {reason}"),
            (None, true, _) => "removed".to_string(),
            (None, false, true) => "would be removed".to_string(),
            (None, false, false) => "kept".to_string(),
        };
        table.push(vec![
            image.export.clone(),
            image.job_id.to_string(),
            human_bytes(image.allocated_bytes),
            image.path.display().to_string(),
            fate,
        ]);
    }
    table.render()
}

/// The `ferry status` table: one line per disk, with the verdict, the reason and what to
/// do next; then, for each export this agent forwards now, where to and whether it holds.
pub fn status_table(lines: &[DiskStatus]) -> String {
    if lines.is_empty() {
        return "no migrations in the journal\n".to_string();
    }
    let mut table = Table::new(&[
        ("JOB", Align::Right),
        ("EXPORT", Align::Left),
        ("BATCH", Align::Left),
        ("ROLE", Align::Left),
        ("PHASE", Align::Left),
        ("VERDICT", Align::Left),
        ("REASON", Align::Left),
    ]);
    for line in lines {
        table.push(vec![
            line.job_id.to_string(),
            line.export.clone(),
            line.batch.clone().unwrap_or_else(|| "-".into()),
            line.role.clone(),
            line.phase.clone(),
            line.verdict.clone(),
            line.reason.clone(),
        ]);
    }
    let mut text = table.render();
    // What each export forwarded now does, below the table (too wide for a column).
    for line in lines {
        if let Some(forwarding) = &line.forwarding {
            let said = forwarding_text(forwarding);
            text.push_str(&format!("{} (job {}): {said}\n", line.export, line.job_id));
        }
    }
    text
}

/// Maps heat buckets to ramp levels, scaled so the hottest cell gets the darkest shade.
/// Buckets are log2 ranges (see [`HEAT_BUCKET_LOWER_BOUNDS`]), so the ramp is logarithmic.
#[derive(Debug, Clone, Copy)]
struct HeatScale {
    hottest: u8,
    top_bucket: usize,
}

impl HeatScale {
    fn new(hottest: u8) -> Self {
        HeatScale {
            hottest,
            top_bucket: heat_bucket(hottest).max(1),
        }
    }

    /// Ramp level 0..=5 of a cell's heat.
    fn level(&self, heat: u8) -> usize {
        self.level_of_bucket(heat_bucket(heat).min(self.top_bucket))
    }

    /// `'·' 1  '░' 2-3 ...`: the heat range each used shade stands for.
    fn legend(&self) -> String {
        let mut parts = vec![format!("'{}' 0", HEAT_RAMP[0])];
        for (level, shade) in HEAT_RAMP.iter().enumerate().skip(1) {
            let buckets: Vec<usize> = (1..=self.top_bucket)
                .filter(|&b| self.level_of_bucket(b) == level)
                .collect();
            let (Some(&first), Some(&last)) = (buckets.first(), buckets.last()) else {
                continue;
            };
            let low = HEAT_BUCKET_LOWER_BOUNDS[first];
            let high = HEAT_BUCKET_LOWER_BOUNDS
                .get(last + 1)
                .map_or(u8::MAX, |next| next - 1)
                .min(self.hottest.max(low));
            let range = if low == high {
                low.to_string()
            } else {
                format!("{low}-{high}")
            };
            parts.push(format!("'{shade}' {range}"));
        }
        parts.join("  ")
    }

    /// Ramp level of a heat bucket (0..=top_bucket). Ceiling division: any written cell
    /// shows at least the faintest shade, and the hottest cell always gets the darkest.
    fn level_of_bucket(&self, bucket: usize) -> usize {
        (bucket * (HEAT_RAMP.len() - 1)).div_ceil(self.top_bucket)
    }
}

/// The `ferry heat` picture: the export as a grid of `width` cells per row (disk order, left
/// to right, top to bottom), each shaded by the hottest block in it, then a legend.
pub fn heat_map(map: &HeatMap, width: usize, color: bool) -> String {
    let width = width.max(1);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "write heat of {}/{}: {} cells of {} ({} blocks of {})",
        map.export,
        map.tracker,
        map.cells.len(),
        human_bytes(map.cell_bytes),
        map.block_count,
        human_bytes(map.granularity_bytes),
    );
    let hottest = map.cells.iter().copied().max().unwrap_or(0);
    let scale = HeatScale::new(hottest);
    let rows: Vec<&[u8]> = map.cells.chunks(width).collect();
    let row_bytes = map.cell_bytes.saturating_mul(width as u64);
    let labels: Vec<String> = (0..rows.len() as u64)
        .map(|row| human_bytes(row.saturating_mul(row_bytes)))
        .collect();
    let label_width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    for (row, label) in rows.iter().zip(&labels) {
        let _ = write!(out, "{label:>label_width$} │");
        render_row(&mut out, row, width, &scale, color);
        out.push_str("│\n");
    }
    let _ = writeln!(out, "shades (log scale): {}", scale.legend());
    let _ = writeln!(
        out,
        "cell {} · hottest heat {hottest} · {} hot blocks (heat ≥ {HOT_THRESHOLD}) of {}",
        human_bytes(map.cell_bytes),
        map.hot_blocks,
        map.block_count,
    );
    let _ = writeln!(out, "blocks by heat: {}", histogram_line(&map.histogram));
    out
}

/// One grid row, padded with blanks to `width` (the last row may be short).
fn render_row(out: &mut String, cells: &[u8], width: usize, scale: &HeatScale, color: bool) {
    let mut current_color = None;
    for &heat in cells {
        let level = scale.level(heat);
        if color {
            let wanted = level.checked_sub(1).map(|i| HEAT_COLORS[i]);
            if wanted != current_color {
                if current_color.is_some() {
                    out.push_str(RESET);
                }
                if let Some(code) = wanted {
                    let _ = write!(out, "\x1b[{code}m");
                }
                current_color = wanted;
            }
        }
        out.push(HEAT_RAMP[level]);
    }
    if current_color.is_some() {
        out.push_str(RESET);
    }
    for _ in cells.len()..width {
        out.push(' ');
    }
}

/// `0: 15900 · 1: 300 · 2-3: 120`: non-empty heat buckets, coldest first.
fn histogram_line(histogram: &[(u8, u64)]) -> String {
    let parts: Vec<String> = histogram
        .iter()
        .enumerate()
        .filter(|(_, (_, blocks))| *blocks > 0)
        .map(|(i, (low, blocks))| {
            let high = histogram
                .get(i + 1)
                .map_or(u8::MAX, |(next, _)| next.saturating_sub(1));
            if high <= *low {
                format!("{low}: {blocks}")
            } else {
                format!("{low}-{high}: {blocks}")
            }
        })
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(" · ")
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::api::types::Holding;
    use crate::api::types::{CounterSnapshot, ExportStats};

    fn tracker(name: &str, lost: bool) -> TrackerStatus {
        TrackerStatus {
            name: name.into(),
            granularity_bytes: 65536,
            block_count: 16384,
            dirty_blocks: 4096,
            dirty_bytes: 4096 * 65536,
            lost,
            half_life_ms: 30_000,
            memory_bytes: 12 << 10,
            state_bytes: if lost { 0 } else { 1500 },
            durable: false,
            state: if lost {
                TrackerState::Lost
            } else {
                TrackerState::Ok
            },
        }
    }

    fn heat(cells: Vec<u8>) -> HeatMap {
        HeatMap {
            export: "vm1".into(),
            tracker: "backup".into(),
            granularity_bytes: 65536,
            block_count: 16384,
            cell_bytes: 1 << 20,
            cells,
            histogram: vec![
                (0, 16000),
                (1, 300),
                (2, 0),
                (4, 84),
                (8, 0),
                (16, 0),
                (32, 0),
                (64, 0),
                (128, 0),
            ],
            hot_blocks: 12,
        }
    }

    #[test]
    fn human_units() {
        // Goal: sizes and durations read naturally. Method: boundary values.
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(65536), "64 KiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_ms(250), "250 ms");
        assert_eq!(human_ms(30_000), "30 s");
        assert_eq!(human_ms(90_000), "1.5 min");
        assert_eq!(human_ms(7_200_000), "2 h");
        assert_eq!(human_us(85), "85 µs");
        assert_eq!(human_us(1250), "1.2 ms");
    }

    #[test]
    fn exports_table_aligns_columns() {
        // Goal: one header and one row per export, columns starting at the same character.
        // Method: two exports with names of different lengths; compare column offsets.
        let export = |name: &str, trackers| ExportStatus {
            name: name.into(),
            path: PathBuf::from(format!("/images/{name}.raw")),
            read_only: name.len() > 3,
            size_bytes: 10 << 30,
            granularity_bytes: 65536,
            connections: 1,
            trackers,
            forwarding: None,
            forward_hold_ms: None,
            stats: ExportStats {
                counts: CounterSnapshot {
                    read_bytes: 5 << 20,
                    write_bytes: 1 << 20,
                    ..CounterSnapshot::default()
                },
                ..ExportStats::default()
            },
        };
        let text = exports_table(&[
            export("vm1", vec![tracker("backup", false), tracker("t2", true)]),
            export("database-01", vec![]),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("NAME "));
        let column = |line: &str, needle: &str| line.find(needle).expect(needle);
        assert_eq!(column(lines[0], "SIZE") + 4, column(lines[1], "10 GiB") + 6);
        assert_eq!(column(lines[1], "/images"), column(lines[2], "/images"));
        assert!(lines[1].contains("backup,t2(lost)"));
        assert!(lines[1].contains(" rw "));
        assert!(lines[2].contains(" ro "));
        assert!(text.ends_with('\n'));
        assert_eq!(exports_table(&[]), "no exports\n");
    }

    #[test]
    fn trackers_table_shows_dirty_share() {
        // Goal: the table shows dirty blocks, bytes, share and state. Method: render two.
        let text = trackers_table(&[tracker("backup", false), tracker("since-monday", true)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].contains("256 MiB"), "{text}");
        assert!(lines[1].contains("25.0%"));
        assert!(lines[1].contains("30 s"));
        assert!(lines[1].ends_with("ok"));
        assert!(lines[2].contains("lost"));
        assert_eq!(trackers_table(&[]), "no trackers\n");
    }

    #[test]
    fn trackers_table_shows_memory_state_file_and_durability() {
        // Goal: the memory, state file size, durability and each state render. Method: two
        // trackers (one never saved) and a recovered one; check columns and cells.
        let mut recovered = tracker("log", false);
        recovered.state = TrackerState::Recovered {
            bound_bytes: 4 << 20,
        };
        recovered.durable = true;
        let text = trackers_table(&[
            tracker("backup", false),
            tracker("since-monday", true),
            recovered,
        ]);
        let lines: Vec<&str> = text.lines().collect();
        for column in ["MEMORY", "STATE FILE", "DURABLE", "STATE"] {
            assert!(lines[0].contains(column), "{text}");
        }
        assert!(lines[1].contains("12 KiB"), "{text}");
        assert!(
            lines[1].contains("1.5 KiB") || lines[1].contains("1500"),
            "{text}"
        );
        assert!(lines[1].contains(" no "), "{text}");
        assert!(lines[2].contains(" - "), "never saved: {text}");
        assert!(lines[3].contains(" yes "), "{text}");
        assert!(
            lines[3].ends_with("recovered (over-marks <= 4 MiB)"),
            "{text}"
        );
    }

    #[test]
    fn heat_map_grid_and_legend() {
        // Goal: `width` cells per row, cold cells blank, hottest darkest, legend facts right.
        // Method: 10 cells at width 4 (3 rows, the last short), no colour.
        let map = heat(vec![0, 1, 3, 200, 0, 0, 8, 0, 255, 2]);
        let text = heat_map(&map, 4, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("vm1/backup") && lines[0].contains("10 cells of 1 MiB"),
            "{text}"
        );
        let grid: Vec<String> = lines[1..4]
            .iter()
            .map(|l| l.split('│').nth(1).expect("framed row").to_string())
            .collect();
        assert_eq!(grid, vec![" ·░█", "  ▒ ", "█░  "], "{text}");
        assert!(lines[1].starts_with("  0 B │"), "{text}");
        assert!(lines[2].starts_with("4 MiB │"), "{text}");
        assert!(text.contains("hottest heat 255"));
        assert!(text.contains("12 hot blocks (heat ≥ 8) of 16384"));
        assert!(text.contains("'█' 64-255"), "{text}");
        assert!(
            text.contains("blocks by heat: 0: 16000 · 1: 300 · 4-7: 84"),
            "{text}"
        );
    }

    #[test]
    fn heat_map_scales_to_the_hottest_cell() {
        // Goal: a lukewarm map still uses the darkest shade for its hottest cell, and the
        // legend says which heat that is. Method: cells of heat 0..=3.
        let text = heat_map(&heat(vec![0, 1, 2, 3]), 8, false);
        assert!(text.contains("│ ▒██    │"), "{text}");
        assert!(text.contains("'▒' 1  '█' 2-3"), "{text}");
        let cold = heat_map(&heat(vec![0; 4]), 2, false);
        assert!(cold.contains("│  │"), "{cold}");
        assert!(cold.contains("hottest heat 0"));
    }

    #[test]
    fn heat_map_color_resets_each_row() {
        // Goal: colour codes appear only with `color`, and each row ends reset.
        // Method: render the same map both ways.
        let map = heat(vec![255, 255, 1, 0]);
        let plain = heat_map(&map, 2, false);
        assert!(!plain.contains('\x1b'));
        let colored = heat_map(&map, 2, true);
        assert!(colored.contains("\x1b[1;31m██"), "{colored:?}");
        for line in colored.lines().filter(|l| l.contains('\x1b')) {
            let last_escape = line.rfind('\x1b').expect("has an escape");
            assert!(line[last_escape..].starts_with(RESET), "{line:?}");
        }
    }

    // Goal: a forwarded export says where its disk is and since when, in UTC, and its stale
    // local path is not shown. Method: known instants (a leap day included) and one table.
    #[test]
    fn forwarding_is_said_with_its_time() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc_text(1_796_461_161_000), "2026-12-05 08:59:21Z");
        assert_eq!(utc_text(1_709_247_605_000), "2024-02-29 23:00:05Z");
        let mut forwarding = Forwarding {
            to: "10.0.0.2:10809".into(),
            since_unix_ms: Some(1_796_461_161_000),
            holding: None,
        };
        assert_eq!(
            forwarding_text(&forwarding),
            "forwarding → 10.0.0.2:10809 since 2026-12-05 08:59:21Z"
        );
        forwarding.holding = Some(Holding {
            since_unix_ms: 1_796_461_802_000,
            requests: 3,
        });
        assert_eq!(
            forwarding_text(&forwarding),
            "forwarding → 10.0.0.2:10809 since 2026-12-05 08:59:21Z \
             (holding since 2026-12-05 09:10:02Z, 3 requests)"
        );
        let one = Forwarding {
            since_unix_ms: None,
            holding: Some(Holding {
                since_unix_ms: 0,
                requests: 1,
            }),
            ..forwarding.clone()
        };
        assert_eq!(
            forwarding_text(&one),
            "forwarding → 10.0.0.2:10809 (holding since 1970-01-01 00:00:00Z, 1 request)"
        );
        let export = ExportStatus {
            name: "vm1".into(),
            path: "/images/vm1.img".into(),
            read_only: false,
            size_bytes: 1 << 30,
            granularity_bytes: 65536,
            connections: 1,
            trackers: Vec::new(),
            stats: ExportStats::default(),
            forwarding: Some(forwarding),
            forward_hold_ms: None,
        };
        let table = exports_table(&[export]);
        assert!(table.contains("forwarding → 10.0.0.2:10809"), "{table}");
        assert!(table.contains("(holding since 2026-12-05 09:10:02Z, 3 requests)"));
        assert!(!table.contains("/images/vm1.img"), "{table}");
    }

    // Goal: `ferry status` says, below its table, what a forwarded export does now, holding
    // included, and nothing for lines without it. Method: two lines, one forwarding.
    #[test]
    fn status_table_says_forwarding_below() {
        let line = |job_id: u64, export: &str| DiskStatus {
            job_id,
            batch: Some("b".into()),
            export: export.into(),
            role: "source".into(),
            phase: "switched".into(),
            peer_state: Some("committed".into()),
            peer_unreachable: None,
            destination_bytes: None,
            verdict: "migrated".into(),
            reason: "the target committed and serves the disk".into(),
            action: "none".into(),
            forwarding: None,
            seed: None,
        };
        let mut moved = line(3, "vm1");
        moved.forwarding = Some(Forwarding {
            to: "10.0.0.2:10809".into(),
            since_unix_ms: Some(1_796_461_161_000),
            holding: Some(Holding {
                since_unix_ms: 1_796_461_802_000,
                requests: 2,
            }),
        });
        let text = status_table(&[moved, line(4, "vm2")]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[3],
            "vm1 (job 3): forwarding → 10.0.0.2:10809 since 2026-12-05 08:59:21Z \
             (holding since 2026-12-05 09:10:02Z, 2 requests)"
        );
    }
}
