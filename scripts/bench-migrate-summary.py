#!/usr/bin/env python3
"""Helpers of scripts/bench-migrate (not meant to be run by hand).

  windows LOG PREFIX NAME=T0:T1 ...   guest write IOPS and latency (p50/p99/p999/max) in each
                                      time window of a fio latency log; computed with
                                      scripts/peers/latency.py, as scripts/peers/qemu-mirror
                                      does, so ferry and QEMU figures are taken the same way
  fio JSON PREFIX                     the writer's totals (IOPS, writes, error)
  report JSON DISK_BYTES PREFIX       ferry's JobStatus (`ferry migrate --json`) as key=value
  unwritten SRC DST LOG BS PREFIX     compares the two images on every BS block the guest never
                                      wrote (they must be equal: the copy of the prefill)
  summary KV                          tables, goal ratios, README table (key=value in, text out)
"""
import json
import os
import statistics
import struct
import sys
from collections import defaultdict


def kv(prefix, key, value):
    print(f"{prefix}.{key}={value}")


def load_json(path):
    text = open(path).read()
    return json.loads(text[text.index("{"):])


def cmd_windows(log, prefix, *specs):
    peers = os.environ.get("PEERS") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
    sys.path.insert(0, peers)
    from latency import windows  # the same statistics qemu-mirror takes for QEMU

    spans = {}
    for spec in specs:
        name, span = spec.split("=", 1)
        a, b = span.split(":")
        spans[name] = (float(a), float(b))
    for name, s in windows(log, spans).items():
        kv(prefix, f"{name}.secs", f"{s['secs']:.2f}")
        kv(prefix, f"{name}.writer_iops", f"{s['iops']:.0f}")
        for p in ("p50", "p99", "p999", "max"):
            kv(prefix, f"{name}.write_lat_{p}_us", f"{s[p]:.0f}")


def cmd_fio(path, prefix):
    try:
        job = load_json(path)["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as err:
        kv(prefix, "writer_error", f"no fio json ({err})".replace("\n", " "))
        return
    w = job["write"]
    kv(prefix, "writer_iops_achieved", f"{w['iops']:.0f}")
    kv(prefix, "writer_writes", w["total_ios"])
    kv(prefix, "writer_error", job.get("error", 0))


def cmd_report(path, disk_bytes, prefix):
    try:
        st = load_json(path)
    except (OSError, ValueError) as err:
        kv(prefix, "phase", "no-json")
        kv(prefix, "error", f"migrate printed no JSON ({err})".replace("\n", " "))
        return
    kv(prefix, "phase", st.get("phase"))
    err = st.get("error")
    if err:
        kv(prefix, "error", str(err).replace("\n", " "))
    kv(prefix, "elapsed_s", st.get("elapsed_s"))
    rep = st.get("report") or {}
    if rep:
        # Mirrored guest writes travel too: they count as sent.
        sent = rep["bytes_data"] + rep["bytes_zero"] + rep.get("bytes_mirrored", 0)
        for k in ("policy", "disk_bytes", "allocated_bytes", "bytes_data", "bytes_zero",
                  "bytes_mirrored", "blocks_resent", "hot_blocks", "deferrals", "mirrored",
                  "forced",
                  "converge_ms", "pause_ms", "pause_drain_ms", "pause_final_send_ms",
                  "pause_commit_ms", "amplification"):
            kv(prefix, k, rep.get(k))
        kv(prefix, "resent_bytes", sent - rep["allocated_bytes"])
        kv(prefix, "passes", len(rep.get("passes", [])))
        kv(prefix, "passes_detail", " ".join(
            f"{p.get('kind')}:{p.get('dirty_blocks_at_start')}/{p.get('blocks_sent')}"
            f"/{p.get('duration_ms')}ms" for p in rep.get("passes", [])))
    lat = st.get("guest_write_latency_us") or {}
    for k in ("count", "p50", "p99", "max"):
        if k in lat:
            kv(prefix, f"agent_write_lat_{k}", lat[k])
    if "guest_writes" in st:
        kv(prefix, "agent_guest_writes", st["guest_writes"])


# fio's verify header (fio 3.33 verify.h): magic, type, len, rand_seed, offset, time_sec,
# time_nsec, thread, numberio, crc32; little-endian.
FIO_HEADER = struct.Struct("<HHIQQIIHHI")
FIO_MAGIC = 0xACCA


def written_at_destination(src, dst, written, bs):
    """Every block the guest wrote: at the destination, fio's header names the block and is
    no older than the source's at the switchover (the source's image is frozen from then on,
    so a destination block older than it is an acknowledged write lost). fio --verify_only
    replays only the first pass over the disk of a time-based writer; this covers them all.
    Returns (stale blocks, first stale offset)."""
    stale, first = 0, None
    fs, fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDONLY)
    try:
        for blk in sorted(written):
            off = blk * bs
            a = FIO_HEADER.unpack(os.pread(fs, FIO_HEADER.size, off).ljust(FIO_HEADER.size, b"\0"))
            b = FIO_HEADER.unpack(os.pread(fd, FIO_HEADER.size, off).ljust(FIO_HEADER.size, b"\0"))
            ok = b[0] == FIO_MAGIC and b[4] == off
            if ok and a[0] == FIO_MAGIC and a[4] == off:
                ok = (b[5], b[6]) >= (a[5], a[6])
            if not ok:
                stale += 1
                first = off if first is None else first
    finally:
        os.close(fs)
        os.close(fd)
    return stale, first


def cmd_unwritten(src, dst, log, bs, prefix):
    bs = int(bs)
    written = set()
    with open(log) as f:
        for line in f:
            parts = line.split(",")
            if len(parts) >= 5 and parts[2].strip() == "1":
                off, size = int(parts[4]), int(parts[3])
                for b in range(off // bs, (off + size + bs - 1) // bs):
                    written.add(b)
    chunk = 1 << 20
    differ = checked = 0
    first = None
    with open(src, "rb", buffering=0) as fs, open(dst, "rb", buffering=0) as fd:
        off = 0
        while True:
            a, b = fs.read(chunk), fd.read(chunk)
            if not a and not b:
                break
            if a != b:
                n = max(len(a), len(b))
                for i in range(0, n, bs):
                    blk = (off + i) // bs
                    if blk in written:
                        continue
                    if a[i:i + bs] != b[i:i + bs]:
                        differ += 1
                        first = off + i if first is None else first
            off += max(len(a), len(b))
        checked = off // bs - len(written)
    kv(prefix, "written_blocks", len(written))
    stale, first_stale = written_at_destination(src, dst, written, bs)
    kv(prefix, "written_blocks_checked", len(written))
    kv(prefix, "written_blocks_stale", stale)
    if first_stale is not None:
        kv(prefix, "first_stale_offset", first_stale)
    kv(prefix, "unwritten_blocks_checked", checked)
    kv(prefix, "unwritten_blocks_differing", differ)
    if first is not None:
        kv(prefix, "first_differing_offset", first)


# ---------------------------------------------------------------------------------- summary
SYSTEMS = [  # key, label
    ("ferry-heat", "ferry (heat)"),
    ("ferry-naive", "ferry (naive)"),
    ("ferry-mirror", "ferry (heat, --mirror)"),
    ("ferry-yield", "ferry (heat, --yield)"),
    ("ferry-off", "ferry (heat, --max-impact off)"),
    ("ferry-strict", "ferry (heat, --max-impact 2x)"),
    ("ferry-heat64k", "ferry (heat, --granularity 64K)"),
    ("ferry-heat-forced", "ferry (heat, --force-after 30000)"),
    ("ferry-naive-forced", "ferry (naive, --force-after 30000)"),
    ("qemu-bg64k", "QEMU mirror background, 64 KiB"),
    ("qemu-bg4k", "QEMU mirror background, 4 KiB"),
    ("qemu-wb", "QEMU mirror write-blocking"),
]
QEMU = ["qemu-bg64k", "qemu-bg4k", "qemu-wb"]
QEMU_BG = ["qemu-bg64k", "qemu-bg4k"]


def num(v):
    try:
        x = float(v)
        return x if x == x else None
    except (TypeError, ValueError):
        return None


def stream_lines(g, workloads, verdict):
    """Sealed against insecure (STREAM=both): the idle copy rate and each pause."""
    lines = []
    sealed, plain = g("idle", "-", "copy_mibs"), g("idle-insecure", "-", "copy_mibs")
    if sealed and plain:
        r = sealed / plain
        lines.append(f"sealed stream: idle copy rate {sealed:.0f} MiB/s vs insecure "
                     f"{plain:.0f} MiB/s: {r:.3f}x (goal >= 0.9x) -> {verdict(r, 0.9, le=False)}")
        ps, pi = g("idle", "-", "pause_ms"), g("idle-insecure", "-", "pause_ms")
        if ps is not None and pi is not None:
            lines.append(f"sealed stream: idle pause {ps:.1f} ms vs insecure {pi:.1f} ms")
    for s in ("heat", "naive", "mirror", "yield", "heat64k"):
        for w in workloads:
            ps, pi = g(f"ferry-{s}", w, "pause_ms"), g(f"ferry-{s}-insecure", w, "pause_ms")
            cs, ci = g(f"ferry-{s}", w, "converge_s"), g(f"ferry-{s}-insecure", w, "converge_s")
            if ps is not None and pi is not None:
                lines.append(f"sealed stream, ferry ({s}) at {w[1:]} IOPS: pause {ps:.1f} ms vs "
                             f"insecure {pi:.1f} ms; converge {cs} s vs {ci} s")
    return lines


def impact_lines(g, t, workloads, verdict):
    """Issue 14's goals (the guest spared): ferry's default and its strict 2x bound against
    QEMU's background mirror and the guest's own no-job latency."""
    lines = []
    for w in workloads:
        base_p99 = g("ferry-base", w, "job_p99_us")
        base_iops, target = g("ferry-base", w, "job_iops"), g("ferry-base", w, "target_iops")
        # A configuration that never converged is no reference (as in `best`).
        qp99 = min([g(q, w, "job_p99_us") for q in QEMU_BG
                    if g(q, w, "job_p99_us") and t(q, w, "status") == "done"], default=None)
        qconv, qres = g("qemu-bg4k", w, "converge_s"), g("qemu-bg4k", w, "resent_bytes")
        for s in ("ferry-heat", "ferry-strict"):
            if t(s, w, "status") != "done":
                continue
            name = "default (auto)" if s == "ferry-heat" else "strict 2x"
            iops, p99 = g(s, w, "job_iops"), g(s, w, "job_p99_us")
            conv, res = g(s, w, "converge_s"), g(s, w, "resent_bytes")
            parts = []
            if iops is not None and target:
                r = iops / min(target, base_iops or target)
                parts.append(f"IOPS kept {r:.3f} (>= 0.9: {verdict(r, 0.9, le=False)})")
            if p99 is not None and qp99:
                r = p99 / qp99
                parts.append(f"p99 {p99:.0f} us = {r:.3f}x QEMU background's (<= 0.3x: "
                             f"{verdict(r, 0.3)})")
            if p99 is not None and base_p99:
                r = p99 / base_p99
                parts.append(f"{r:.2f}x its own {base_p99:.0f} us (<= 3x: {verdict(r, 3.0)})")
            if conv is not None and qconv:
                r = conv / qconv
                parts.append(f"converge {conv:.2f} s = {r:.2f}x QEMU bg 4 KiB's (<= 1.5x: "
                             f"{verdict(r, 1.5)})")
            if res is not None and qres is not None:
                r = res / qres if qres > 0 else (0.0 if res <= 0 else None)
                parts.append(f"re-sent {res / 2**20:.0f} MiB = {f'{r:.2f}' if r is not None else 'inf'}x"
                             f" QEMU bg 4 KiB's (<= 1x: "
                             f"{verdict(r, 1.0) if r is not None else 'NOT MET'})")
            lines.append(f"{w} {name}: " + "; ".join(parts))
    rate, local = g("idle", "-", "copy_mibs"), g("idle", "-", "local_copy_mibs")
    if rate and local:
        r = rate / local
        lines.append(f"idle copy {rate:.0f} MiB/s = {r:.3f}x a same-disk qemu-img convert "
                     f"(>= 1.0x: {verdict(r, 1.0, le=False)})")
    return lines


def cmd_summary(path):
    raw = {}
    for line in open(path):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            raw[k] = v
    # r<round>.<system>.w<iops>.<metric>  |  r<round>.idle.<metric>
    runs = defaultdict(list)        # (system, workload, metric) -> [values over rounds]
    texts = defaultdict(list)
    for k, v in raw.items():
        parts = k.split(".", 3)
        if len(parts) < 3 or not parts[0].startswith("r"):
            continue
        if parts[1] in ("idle", "idle-insecure"):
            key = (parts[1], "-", k.split(".", 2)[2])
        elif len(parts) == 4:
            key = (parts[1], parts[2], parts[3])
        else:
            continue
        texts[key].append(v)
        x = num(v)
        if x is not None:
            runs[key].append(x)
    med = {k: statistics.median(v) for k, v in runs.items()}
    workloads = sorted({w for (_, w, _) in runs if w.startswith("w")}, key=lambda w: int(w[1:]))

    def g(s, w, m):
        return med.get((s, w, m))

    def t(s, w, m):
        v = texts.get((s, w, m))
        return "/".join(sorted(set(v))) if v else None

    def f(x, fmt="{:.2f}", dash="-"):
        return dash if x is None else fmt.format(x)

    rows = []
    for w in workloads:
        target = g("ferry-base", w, "target_iops") or g("qemu-base", w, "target_iops")
        for s, label in SYSTEMS:
            if not any(k[0] == s and k[1] == w for k in texts):
                continue
            disk = g(s, w, "disk_bytes")
            res = g(s, w, "resent_bytes")
            conv = g(s, w, "converge_s")
            conv_txt = f(conv) if conv is not None else (t(s, w, "converge_s") or "-")
            status = t(s, w, "status") or "-"
            err = t(s, w, "error")
            rows.append(dict(
                w=w, s=s, label=label, target=target,
                conv=conv_txt,
                res=(f"{res / 2**20:.0f} ({res / disk:.3f}x)" if res is not None and disk
                     else "-"),
                amp=f(g(s, w, "amplification"), "{:.3f}"),
                pause=f(g(s, w, "pause_ms"), "{:.1f}"),
                iops=f(g(s, w, "job_iops"), "{:.0f}"),
                lat=f"{f(g(s, w, 'job_p50_us'), '{:.0f}')} / {f(g(s, w, 'job_p99_us'), '{:.0f}')}"
                    f" / {f(g(s, w, 'job_max_us'), '{:.0f}')}",
                match=t(s, w, "match") or "-",
                note=(status if status not in ("-", "done") else "")
                     + (f": {err}" if err else ""),
            ))

    print(f"\n== live migration, {raw.get('size', '?')} of random data, guest fio nbd 4k "
          "randwrite zipf:1.2 QD8")
    hdr = (f"{'workload':<9}{'system':<36}{'conv_s':>8}{'re-sent MiB (x disk)':>22}{'amplif':>8}"
           f"{'pause_ms':>10}{'g_iops':>8}{'  p50 / p99 / max us':<26}{'match':>6}  note")
    print(hdr)
    for r in rows:
        print(f"{r['w']:<9}{r['label']:<36}{r['conv']:>8}{r['res']:>22}{r['amp']:>8}"
              f"{r['pause']:>10}{r['iops']:>8}  {r['lat']:<24}{r['match']:>6}  {r['note']}")
    for w in workloads:
        fine, coarse = g("ferry-heat", w, "resent_bytes"), g("ferry-heat64k", w, "resent_bytes")
        if fine is not None and coarse is not None:
            print(f"job tracking at {w[1:]} IOPS: re-sent 4 KiB {fine / 2**20:.1f} MiB vs 64 KiB "
                  f"{coarse / 2**20:.1f} MiB ({fine / max(coarse, 1):.3f}x); guest IOPS "
                  f"{f(g('ferry-heat', w, 'job_iops'), '{:.0f}')} vs "
                  f"{f(g('ferry-heat64k', w, 'job_iops'), '{:.0f}')}, p99 "
                  f"{f(g('ferry-heat', w, 'job_p99_us'), '{:.0f}')} vs "
                  f"{f(g('ferry-heat64k', w, 'job_p99_us'), '{:.0f}')} us")
    print("\nno-job baselines (writer only, same windows method):")
    for w in workloads:
        for s in ("ferry-base", "qemu-base"):
            if g(s, w, "job_iops") is not None:
                print(f"  {w} {s:<11} target {f(g(s, w, 'target_iops'), '{:.0f}')} IOPS, got "
                      f"{f(g(s, w, 'job_iops'), '{:.0f}')}; p50/p99/max "
                      f"{f(g(s, w, 'job_p50_us'), '{:.0f}')}/{f(g(s, w, 'job_p99_us'), '{:.0f}')}/"
                      f"{f(g(s, w, 'job_max_us'), '{:.0f}')} us")

    # ----- goals: ferry (heat) against the best QEMU configuration on each figure
    print("\n== goals: ferry (heat) / best QEMU configuration, per workload")
    goal_lines = []

    def best(systems, w, m):
        # a configuration that never converged (timeout) cannot be the best one on any figure
        vals = [(g(s, w, m), s) for s in systems
                if g(s, w, m) is not None and t(s, w, "status") == "done"]
        return min(vals) if vals else (None, None)

    def verdict(ratio, limit, le=True):
        if ratio is None:
            return "n/a"
        ok = ratio <= limit if le else ratio >= limit
        return "MET" if ok else "NOT MET"

    for w in workloads:
        heat_ok = t("ferry-heat", w, "status") == "done"
        fk = "ferry-heat" if heat_ok else (
            "ferry-heat-forced" if t("ferry-heat-forced", w, "status") == "done" else None)
        if fk is None:
            goal_lines.append(f"{w}: ferry (heat) did not complete a migration; no ratios")
            continue
        tag = "" if fk == "ferry-heat" else " [forced run]"
        first_line = len(goal_lines)
        skipped = [s for s in QEMU if t(s, w, "status") not in (None, "done")]
        if skipped:
            goal_lines.append(f"{w}: left out of 'best QEMU' (did not converge): "
                              + ", ".join(skipped))
        res, disk = g(fk, w, "resent_bytes"), g(fk, w, "disk_bytes")
        qres, qs = best(QEMU, w, "resent_bytes")
        if res is not None and qres is not None:
            r = res / qres if qres > 0 else (0.0 if res <= 0 else None)
            goal_lines.append(
                f"{w}: re-sent bytes {res / 2**20:.0f} MiB vs best QEMU ({qs}) "
                f"{qres / 2**20:.0f} MiB: {f(r, '{:.3f}', 'inf')}x (goal <= 0.5x) -> "
                f"{verdict(r, 0.5) if r is not None else 'NOT MET (QEMU re-sent nothing)'}")
            bres, bs = best(QEMU_BG, w, "resent_bytes")
            if bres is not None and bs != qs and bres > 0:
                goal_lines.append(f"{w}:   (vs best background mirror {bs}: {res / bres:.3f}x)")
        conv = g(fk, w, "converge_s")
        qconv, qs = best(QEMU, w, "converge_s")
        if conv is not None and qconv:
            r = conv / qconv
            goal_lines.append(f"{w}: time to converge {conv:.2f} s vs best QEMU ({qs}) "
                              f"{qconv:.2f} s: {r:.3f}x (goal <= 1.0x) -> {verdict(r, 1.0)}")
        p99 = g(fk, w, "job_p99_us")
        qp99, qs = best(QEMU_BG, w, "job_p99_us")
        if p99 is not None and qp99:
            r = p99 / qp99
            goal_lines.append(f"{w}: guest p99 write latency during the job {p99:.0f} us vs "
                              f"QEMU background ({qs}, the lower) {qp99:.0f} us: {r:.3f}x "
                              f"(goal <= 0.5x) -> {verdict(r, 0.5)}")
        iops, target = g(fk, w, "job_iops"), g("ferry-base", w, "target_iops")
        base = g("ferry-base", w, "job_iops")
        if iops is not None and target:
            r = iops / target
            ref = min(target, base) if base else target
            r2 = iops / ref
            goal_lines.append(f"{w}: guest IOPS during the job {iops:.0f} = {r:.3f}x the target "
                              f"{target:.0f}, {r2:.3f}x min(target, no-job baseline "
                              f"{f(base, '{:.0f}')}) (goal >= 0.9x) -> {verdict(r2, 0.9, le=False)}")
        for i in range(first_line, len(goal_lines)):
            goal_lines[i] += tag
    pauses = [x for (s, w, m), v in runs.items() if s == "ferry-heat" and m == "pause_ms"
              for x in v]
    if pauses:
        pm, px = statistics.median(pauses), max(pauses)
        goal_lines.append(f"switchover pause, ferry (heat), {len(pauses)} runs: median "
                          f"{pm:.1f} ms (goal <= 10) -> {verdict(pm, 10)}; max {px:.1f} ms "
                          f"(goal <= 50) -> {verdict(px, 50)}")
    rate = g("idle", "-", "copy_mibs")
    rd, wr = g("idle", "-", "disk_read_mibs"), g("idle", "-", "disk_write_mibs")
    if rate and rd and wr:
        r = rate / min(rd, wr)
        goal_lines.append(f"idle disk: ferry copy rate {rate:.0f} MiB/s vs fio O_DIRECT 1M seq read "
                          f"{rd:.0f} / write {wr:.0f} MiB/s: {r:.3f}x the slower (goal >= 0.9x) -> "
                          f"{verdict(r, 0.9, le=False)}")
        local = g("idle", "-", "local_copy_mibs")
        if local:
            goal_lines.append(f"idle disk, same-disk reference: qemu-img convert (O_DIRECT) "
                              f"{local:.0f} MiB/s; ferry {rate / local:.3f}x of a local copy")
    elif texts.get(("idle", "-", "status")):
        goal_lines.append(f"idle disk: ferry run {t('idle', '-', 'status')}: "
                          f"{t('idle', '-', 'error') or ''}")
    goal_lines.extend(stream_lines(g, workloads, verdict))
    for line in goal_lines:
        print("  " + line)
    print("\n== goals of the copy controller (issue 14), one run")
    for line in impact_lines(g, t, workloads, verdict):
        print("  " + line)

    print("\nREADME table:\n")
    print("| guest IOPS target | system | time to converge (s) | re-sent MiB (x disk) | "
          "amplification | switchover pause (ms) | guest IOPS during job | guest write "
          "p50 / p99 / max (us) | images match | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['w'][1:]} | {r['label']} | {r['conv']} | {r['res']} | {r['amp']} | "
              f"{r['pause']} | {r['iops']} | {r['lat']} | {r['match']} | {r['note']} |")
    for w in workloads:
        for s, label in (("ferry-base", "no job (ferry)"), ("qemu-base", "no job (QEMU qsd)")):
            if g(s, w, "job_iops") is not None:
                print(f"| {w[1:]} | {label} | - | - | - | - | {g(s, w, 'job_iops'):.0f} | "
                      f"{f(g(s, w, 'job_p50_us'), '{:.0f}')} / {f(g(s, w, 'job_p99_us'), '{:.0f}')}"
                      f" / {f(g(s, w, 'job_max_us'), '{:.0f}')} | - | |")
    if rate:
        print(f"| idle | ferry (heat), no guest | {f(g('idle', '-', 'converge_s'))} | "
              f"{f(g('idle', '-', 'resent_bytes'), '{:.0f}')} | "
              f"{f(g('idle', '-', 'amplification'), '{:.3f}')} | "
              f"{f(g('idle', '-', 'pause_ms'), '{:.1f}')} | - | - | - | copy {rate:.0f} MiB/s; "
              f"fio 1M O_DIRECT read {f(rd, '{:.0f}')} / write {f(wr, '{:.0f}')} MiB/s; "
              f"local copy (qemu-img convert) {f(g('idle', '-', 'local_copy_mibs'), '{:.0f}')} "
              f"MiB/s |")
    print("\nGoals:\n")
    for line in goal_lines:
        print(f"- {line}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"windows": cmd_windows, "fio": cmd_fio, "report": cmd_report,
     "unwritten": cmd_unwritten, "summary": cmd_summary}[cmd](*args)


if __name__ == "__main__":
    main()
