//! How the CLI shows a migration: a progress bar while it runs (pass, bytes sent, dirty rate
//! against copy rate, ETA), then the report as a table; `--json` prints the final status.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::render::human_bytes;
use super::types::{JobPhase, JobSettings, JobStatus};
use super::{Client, ClientError};

/// How often the CLI polls the agent while following a job.
const POLL: Duration = Duration::from_millis(200);

/// Follows job `id` until it ends, drawing a progress bar (when `bar`), and returns its final
/// status.
pub fn follow(
    client: &Client,
    id: u64,
    disk_bytes: u64,
    bar: bool,
) -> Result<JobStatus, ClientError> {
    let progress = if bar {
        ProgressBar::new(disk_bytes.max(1))
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} pass {prefix} [{bar:30}] {bytes}/{total_bytes} sent  {msg}",
        )
        .expect("constant template")
        .progress_chars("=> "),
    );
    loop {
        let status = client.job(id)?;
        if let Some(p) = &status.progress {
            progress.set_prefix(format!("{} ({})", p.pass, p.kind.as_str()));
            progress.set_length(p.bytes_sent.max(disk_bytes).max(1));
            progress.set_position(p.bytes_sent);
            progress.set_message(format!(
                "dirty {} at {}/s vs copy {}/s, eta {}{}{}",
                p.dirty_blocks,
                rate(p.dirty_bytes_per_s),
                rate(p.copy_bytes_per_s),
                p.eta_ms
                    .map(|ms| format!("{:.1} s", ms / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                if p.mirroring { ", mirroring" } else { "" },
                impact_text(p),
            ));
        }
        progress.tick();
        if status.phase != JobPhase::Running {
            progress.finish_and_clear();
            return Ok(status);
        }
        std::thread::sleep(POLL);
    }
}

/// The copy controller's view: the guest's p99 against its bound, the copy's cap.
fn impact_text(p: &crate::migrate::Progress) -> String {
    let Some(bound_us) = p.impact_target_us else {
        return String::new();
    };
    let ms = |us: u64| format!("{:.1} ms", us as f64 / 1000.0);
    let reads = match (p.copy_read_depth, p.copy_read_bytes) {
        (Some(depth), Some(bytes)) => format!("{depth} x {}", human_bytes(bytes as u64)),
        _ => "-".into(),
    };
    format!(
        "; guest p99 {} (bound {}), copy reads {reads}, pace {}{}",
        p.guest_p99_us.map_or_else(|| "-".into(), ms),
        ms(bound_us),
        p.copy_cap_bytes_per_s
            .map_or_else(|| "none".into(), |cap| format!("{}/s", human_bytes(cap))),
        if p.impact_conflict {
            " (the bound keeps the copy behind the guest's writes: mirroring)"
        } else {
            ""
        }
    )
}

fn rate(bytes_per_s: Option<f64>) -> String {
    bytes_per_s
        .map(|r| human_bytes(r as u64))
        .unwrap_or_else(|| "-".into())
}

/// What a job runs with, on one line.
fn settings_line(settings: &JobSettings) -> String {
    let on_off = |on: bool| if on { "on" } else { "off" };
    format!(
        "settings: policy {}, bandwidth {}, max pause {} ms, target pause {} ms, force after {}, \
         hot at heat {}, mirror {}, verify {}, yield {}\n",
        settings.policy,
        settings.bandwidth_bytes_per_s.map_or_else(
            || "uncapped".into(),
            |rate| format!("{}/s", human_bytes(rate))
        ),
        settings.max_pause_ms,
        settings.target_pause_ms,
        settings
            .force_after_ms
            .map_or_else(|| "never".into(), |ms| format!("{ms} ms")),
        settings.hot_threshold,
        on_off(settings.mirror),
        on_off(settings.verify),
        on_off(settings.yield_to_guest)
    )
}

/// The final status as a short table.
pub fn render(status: &JobStatus) -> String {
    let mut out = format!(
        "job {} {} -> {}: {:?}, {} is authoritative, {:.1} s\n",
        status.id, status.export, status.to, status.phase, status.authoritative, status.elapsed_s
    );
    if let Some(error) = &status.error {
        out.push_str(&format!("error: {error}\n"));
    }
    if let Some(settings) = &status.settings {
        out.push_str(&settings_line(settings));
    }
    if let Some(share) = &status.share {
        out.push_str(&format!(
            "share of the copying while {} jobs copied at once: {:.1}%\n",
            share.jobs, share.pct
        ));
    }
    if let Some(holder) = &status.holder {
        out.push_str(&format!("holder of the guest's connection: {holder}\n"));
    }
    if let Some(r) = &status.report {
        out.push_str(&format!(
            "policy {}: disk {}, allocated {}, sent {} data + {} zero{}, amplification {:.3}\n",
            r.policy,
            human_bytes(r.disk_bytes),
            human_bytes(r.allocated_bytes),
            human_bytes(r.bytes_data),
            human_bytes(r.bytes_zero),
            if r.bytes_mirrored > 0 {
                format!(" + {} mirrored guest writes", human_bytes(r.bytes_mirrored))
            } else {
                String::new()
            },
            r.amplification
        ));
        out.push_str(&format!(
            "converged in {:.0} ms, switchover pause {:.2} ms, {} hot blocks, {} deferrals{}{}\n",
            r.converge_ms,
            r.pause_ms,
            r.hot_blocks,
            r.deferrals,
            if r.mirrored { ", mirrored" } else { "" },
            if r.forced { ", forced" } else { "" }
        ));
        out.push_str(&format!(
            "pause: {:.2} ms draining, {:.2} ms final send, {:.2} ms commit\n",
            r.pause_drain_ms, r.pause_final_send_ms, r.pause_commit_ms
        ));
        if let Some(bound_us) = r.impact_target_us {
            out.push_str(&format!(
                "copy steered to keep the guest's p99 within {:.1} ms{}\n",
                bound_us as f64 / 1000.0,
                if r.impact_conflict {
                    "; the bound kept the copy behind the guest's writes, so writes were mirrored"
                } else {
                    ""
                }
            ));
        }
        out.push_str("PASS  KIND     DIRTY AT START   BLOCKS SENT   BYTES SENT   TIME\n");
        for pass in &r.passes {
            out.push_str(&format!(
                "{:>4}  {:<7} {:>15} {:>13} {:>12} {:>6.0} ms\n",
                pass.pass,
                pass.kind.as_str(),
                pass.dirty_blocks_at_start,
                pass.blocks_sent,
                human_bytes(pass.bytes_sent),
                pass.duration_ms
            ));
        }
    }
    if let Some(v) = &status.verify {
        out.push_str(&format!(
            "verify at the switchover point: {} (BLAKE3 {}, {:.0} ms with writes held)\n",
            if v.matched {
                "images match"
            } else {
                "IMAGES DIFFER"
            },
            &v.destination_digest[..16],
            v.elapsed_ms
        ));
    }
    if let Some(l) = &status.guest_write_latency_us {
        out.push_str(&format!(
            "guest writes during the job: {}, latency p50 {} us, p99 {} us, max {} us\n",
            status.guest_writes, l.p50, l.p99, l.max
        ));
    }
    out
}
