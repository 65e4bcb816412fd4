#!/usr/bin/python3
"""Helpers of scripts/bench-seed (not meant to be run by hand; /usr/bin/python3, for libnbd).

  plan SIZE PCT SEED ZIPF OUT     the changed blocks of a case: exactly round(PCT % of the
                                  4 KiB blocks of SIZE bytes) distinct blocks, drawn without
                                  replacement with zipf weights (rank k weighs k^-ZIPF; the
                                  ranks are laid over the disk by a seeded permutation, so the
                                  hot blocks are scattered as fio's zipf scatters them); the
                                  sorted block indexes go to OUT (uint64, native order);
                                  key=value on stdout (changed_blocks, changed_bytes, changed_runs:
                                  runs of adjacent changed blocks)
  write-nbd URI PLAN SEED QD      writes the plan's blocks through an NBD export (libnbd, QD
                                  requests in flight, then a flush); the new contents of every
                                  block come from SEED, in block order, so every system gets
                                  the same bytes
  write-file PATH PLAN SEED       the same writes straight into a file (pwrite, fdatasync)
  bitmap-copy URI BITMAP DST QD   QEMU's incremental path: the dirty extents of the persistent
                                  dirty bitmap BITMAP (meta context qemu:dirty-bitmap:BITMAP,
                                  NBD block status over the whole export) read from URI (QD
                                  reads in flight, at most 4 MiB each) and written at the same
                                  offsets into the file DST (then fdatasync); key=value: its
                                  own wall time (connect to fdatasync), the status and copy
                                  phases (fdatasync's share apart), dirty extents and bytes,
                                  payload read, and what this process read and wrote at the
                                  storage layer (/proc/self/io)
  run -- CMD...                   runs CMD; key=value: wall_s, and read_bytes / write_bytes
                                  the command (and its children) did at the storage layer
                                  (/proc/self/io of this process once CMD is reaped)
  drop-cache FILE...              fdatasync, then POSIX_FADV_DONTNEED: the files' pages leave
                                  the page cache (these files only, the rest of the machine
                                  keeps its cache)
  json JSON PREFIX                a JSON document (ferry's --json reports) as PREFIX.key=value,
                                  nested keys joined by dots, lists by index
  rsync-stats FILE PREFIX         rsync's --stats as key=value (bytes sent and received,
                                  literal and matched data)
  fio JSON RW PREFIX              fio's bandwidth of direction RW in MiB/s
  summary KV                      the tables, goal verdicts and README table (key=value in)
"""
import array
import functools
import heapq
import json
import math
import os
import random
import re
import subprocess
import sys
import time

BLOCK = 4096
MAX_COPY = 4 << 20


def kv(prefix, key, value):
    print(f"{prefix}.{key}={value}" if prefix else f"{key}={value}")


def load_json(path):
    text = open(path).read()
    return json.loads(text[text.index("{"):])


def proc_io(pid="self"):
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


# ---------------------------------------------------------------------------------------------
# the changed blocks


def cmd_plan(size, pct, seed, theta, out):
    n = int(size) // BLOCK
    want = round(n * float(pct) / 100)
    if not 0 < want <= n:
        sys.exit(f"plan: {pct}% of {n} blocks is {want} blocks")
    rng = random.Random(int(seed))
    where = list(range(n))
    rng.shuffle(where)  # rank -> block
    theta = float(theta)
    # Efraimidis-Spirakis: the `want` smallest keys E/w (E exponential, w = rank^-theta) are a
    # weighted draw without replacement, i.e. the first `want` distinct blocks of an endless
    # sequence of zipf draws.
    keys = [-math.log(1.0 - rng.random()) * (k + 1) ** theta for k in range(n)]
    ranks = heapq.nsmallest(want, range(n), key=keys.__getitem__)
    blocks = sorted(where[r] for r in ranks)
    with open(out, "wb") as f:
        array.array("Q", blocks).tofile(f)
    runs = sum(1 for i, b in enumerate(blocks) if i == 0 or blocks[i - 1] != b - 1)
    kv("", "changed_blocks", len(blocks))
    kv("", "changed_bytes", len(blocks) * BLOCK)
    kv("", "changed_runs", runs)


def load_plan(path):
    a = array.array("Q")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a


def contents(plan, seed):
    """(offset, 4 KiB of new data) for every block of the plan, the same for every caller."""
    rng = random.Random(int(seed) ^ 0x5EED5EED)
    for b in plan:
        yield b * BLOCK, rng.randbytes(BLOCK)


# ---------------------------------------------------------------------------------------------
# writers


def connect(uri, meta=None):
    import nbd

    h = nbd.NBD()
    if meta:
        h.add_meta_context(meta)
    h.connect_uri(uri)
    return h


def cmd_write_nbd(uri, plan_path, seed, qd):
    import nbd

    plan = load_plan(plan_path)
    h = connect(uri)
    qd = int(qd)
    errors = []

    def done(err):
        if err.value:
            errors.append(err.value)
        return 1

    t0 = time.monotonic()
    for off, data in contents(plan, seed):
        while h.aio_in_flight() >= qd:
            h.poll(-1)
        h.aio_pwrite(nbd.Buffer.from_buffer(bytearray(data)), off, done)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    if errors:
        sys.exit(f"write-nbd: {len(errors)} writes failed (errno {errors[0]})")
    h.flush()
    h.shutdown()
    kv("", "rewrite_s", f"{time.monotonic() - t0:.3f}")
    kv("", "rewrite_blocks", len(plan))


def cmd_write_file(path, plan_path, seed):
    plan = load_plan(plan_path)
    fd = os.open(path, os.O_WRONLY)
    t0 = time.monotonic()
    try:
        for off, data in contents(plan, seed):
            os.pwrite(fd, data, off)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    kv("", "rewrite_s", f"{time.monotonic() - t0:.3f}")
    kv("", "rewrite_blocks", len(plan))


# ---------------------------------------------------------------------------------------------
# QEMU's incremental path


def cmd_bitmap_copy(uri, bitmap, dst, qd):
    import nbd

    io0 = proc_io()
    t0 = time.monotonic()
    ctx = f"qemu:dirty-bitmap:{bitmap}"
    h = connect(uri, ctx)
    if not h.can_meta_context(ctx):
        sys.exit(f"bitmap-copy: the server offers no {ctx}")
    size = h.get_size()
    dirty = []  # [offset, length], adjacent extents merged

    def extent(metacontext, offset, entries, err):
        if metacontext != ctx:
            return 0
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            if flags & 1:
                if dirty and dirty[-1][0] + dirty[-1][1] == offset:
                    dirty[-1][1] += length
                else:
                    dirty.append([offset, length])
            offset += length
        got[0] = offset
        return 0

    got = [0]
    pos = 0
    statuses = 0
    while pos < size:
        got[0] = pos
        h.block_status(min(size - pos, 1 << 30), pos, extent)
        statuses += 1
        if got[0] <= pos:
            sys.exit(f"bitmap-copy: no progress in block status at {pos}")
        pos = min(got[0], size)
    t_status = time.monotonic()

    fd = os.open(dst, os.O_WRONLY)
    errors = []
    copied = [0]
    qd = int(qd)
    # QD request slots, each with its buffer kept while requests of its size follow.
    bufs = [nbd.Buffer(BLOCK) for _ in range(qd)]
    lens = [BLOCK] * qd
    free = list(range(qd))
    where = [0] * qd

    def done(slot, err):
        if err.value:
            errors.append(err.value)
        else:
            os.pwrite(fd, bufs[slot].to_buffer(), where[slot])
            copied[0] += lens[slot]
        free.append(slot)
        return 1

    callbacks = [functools.partial(done, i) for i in range(qd)]
    reads = 0
    for off, length in dirty:
        end = min(off + length, size)
        while off < end:
            n = min(end - off, MAX_COPY)
            while not free:
                h.poll(-1)
            slot = free.pop()
            if lens[slot] != n:
                bufs[slot] = nbd.Buffer(n)
                lens[slot] = n
            where[slot] = off
            h.aio_pread(bufs[slot], off, callbacks[slot])
            reads += 1
            off += n
    while len(free) < qd:
        h.poll(-1)
    t_read = time.monotonic()
    os.fdatasync(fd)
    os.close(fd)
    t1 = time.monotonic()
    h.shutdown()
    if errors:
        sys.exit(f"bitmap-copy: {len(errors)} reads failed (errno {errors[0]})")
    io1 = proc_io()
    kv("", "client_s", f"{t1 - t0:.3f}")
    kv("", "status_s", f"{t_status - t0:.3f}")
    kv("", "copy_s", f"{t1 - t_status:.3f}")
    kv("", "fdatasync_s", f"{t1 - t_read:.3f}")
    kv("", "block_status_requests", statuses)
    kv("", "dirty_extents", len(dirty))
    kv("", "dirty_bytes", sum(length for _, length in dirty))
    kv("", "read_requests", reads)
    kv("", "payload_bytes", copied[0])
    kv("", "client_read_bytes", io1["read_bytes"] - io0["read_bytes"])
    kv("", "client_write_bytes", io1["write_bytes"] - io0["write_bytes"])


# ---------------------------------------------------------------------------------------------
# small tools


def cmd_run(*cmd):
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    io0 = proc_io()
    t0 = time.monotonic()
    rc = subprocess.run(cmd).returncode
    t1 = time.monotonic()
    io1 = proc_io()  # a reaped child's I/O counts in its parent's
    kv("", "wall_s", f"{t1 - t0:.3f}")
    kv("", "read_bytes", io1["read_bytes"] - io0["read_bytes"])
    kv("", "write_bytes", io1["write_bytes"] - io0["write_bytes"])
    kv("", "rc", rc)
    sys.exit(rc)


def cmd_drop_cache(*paths):
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cmd_json(path, prefix):
    try:
        doc = load_json(path)
    except (OSError, ValueError) as err:
        kv(prefix, "json_error", str(err).replace("\n", " "))
        return

    def walk(key, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}.{k}" if key else k, x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(f"{key}.{i}", x)
        else:
            kv(prefix, key, str(v).replace("\n", " "))

    walk("", doc)


def cmd_rsync_stats(path, prefix):
    names = {"Total bytes sent": "bytes_sent", "Total bytes received": "bytes_received",
             "Literal data": "literal_bytes", "Matched data": "matched_bytes",
             "Total file size": "file_bytes", "Total transferred file size": "transferred_bytes"}
    for line in open(path, errors="replace"):
        if ":" not in line:
            continue
        name, value = line.split(":", 1)
        if name.strip() in names:
            m = re.match(r"\s*([\d,.]+)", value)
            if m:
                kv(prefix, names[name.strip()], m.group(1).replace(",", "").replace(".", ""))


def cmd_fio(path, rw, prefix):
    job = load_json(path)["jobs"][0]
    kv(prefix, f"{rw}_mibs", f"{job[rw]['bw_bytes'] / 2**20:.0f}")


# ---------------------------------------------------------------------------------------------
# summary

SYSTEMS = (("ferry", "ferry seed sync"),
           ("rsync", "rsync daemon, -I --inplace --no-whole-file"),
           ("qemu", "QEMU qcow2 overlay + 4 KiB dirty bitmap, libnbd copy"),
           ("full", "full copy (qemu-img convert, O_DIRECT)"))


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def cmd_summary(path):
    raw = {}
    for line in open(path):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            raw[k] = v

    def g(*parts):
        return num(raw.get(".".join(parts)))

    def t(*parts):
        return raw.get(".".join(parts))

    def mib(x, ref=None):
        if x is None:
            return "-"
        s = f"{x / 2**20:.1f}"
        return s + (f" ({x / ref:.3f}x)" if ref else "")

    cases = sorted({k.split(".", 1)[0] for k in raw if re.match(r"c[\d.]+\.", k)},
                   key=lambda c: float(c[1:]))
    rows = []
    for c in cases:
        changed = g(c, "changed_bytes")
        for s, label in SYSTEMS:
            if t(c, s, "status") is None:
                continue
            wall = g(c, s, "wall_s")
            note = []
            if t(c, s, "status") != "done":
                note.append(t(c, s, "status"))
            if t(c, s, "error"):
                note.append(t(c, s, "error"))
            extra = t(c, s, "note")
            if extra:
                note.append(extra)
            rows.append(dict(
                case=c[1:], s=s, label=label,
                wall="-" if wall is None else f"{wall:.3f}",
                wire=mib(g(c, s, "wire_bytes"), changed),
                lo=mib(g(c, s, "lo_bytes")),
                src=mib(g(c, s, "src_read_bytes"), changed),
                dst=mib(g(c, s, "dst_read_bytes")),
                match=t(c, s, "match") or "-",
                note="; ".join(note)))

    print(f"\n== catch-up after a seed: {raw.get('size', '?')} of random data, "
          f"4 KiB blocks rewritten (zipf {raw.get('zipf', '?')}), cold page cache: "
          f"{raw.get('cold', '?')}")
    print(f"{'case':<6}{'system':<52}{'wall_s':>9}{'  wire MiB (x changed)':<24}"
          f"{'lo MiB':>9}{'  src read MiB (x changed)':<28}{'dst read MiB':>13}{'match':>7}  note")
    for r in rows:
        print(f"{r['case'] + '%':<6}{r['label']:<52}{r['wall']:>9}  {r['wire']:<22}{r['lo']:>9}"
              f"  {r['src']:<26}{r['dst']:>13}{r['match']:>7}  {r['note']}")
    for c in cases:
        print(f"  {c[1:]}%: {t(c, 'changed_blocks')} blocks changed = "
              f"{mib(g(c, 'changed_bytes'))} MiB in {t(c, 'changed_runs')} runs")

    goals = []

    def verdict(x, limit, le=True):
        if x is None:
            return "n/a"
        return "PASS" if (x <= limit if le else x >= limit) else "MISS"

    def ratio(a, b):
        return None if a is None or not b else a / b

    for c in cases:
        p = c[1:] + "%"
        if t(c, "ferry", "status") is None:
            continue
        if t(c, "ferry", "status") != "done":
            goals.append(f"{p}: ferry's catch-up did not complete ({t(c, 'ferry', 'status')}: "
                         f"{t(c, 'ferry', 'error') or ''}); no ratios -> MISS")
            continue
        changed = g(c, "changed_bytes")
        if t(c, "ferry", "match") != "yes":
            goals.append(f"{p}: the destination does not match the source after the sync "
                         f"(compare: {t(c, 'ferry', 'match')}) -> MISS")
        r = ratio(g(c, "ferry", "wire_bytes"), changed)
        goals.append(f"{p}: sent {mib(g(c, 'ferry', 'wire_bytes'))} MiB = "
                     f"{'-' if r is None else f'{r:.3f}'}x the changed bytes "
                     f"(goal <= 1.05x) -> {verdict(r, 1.05)}")
        r = ratio(g(c, "ferry", "src_read_bytes"), changed)
        goals.append(f"{p}: source read {mib(g(c, 'ferry', 'src_read_bytes'))} MiB = "
                     f"{'-' if r is None else f'{r:.3f}'}x the changed bytes "
                     f"(goal <= 1.1x) -> {verdict(r, 1.1)}")
        d = g(c, "ferry", "dst_read_bytes")
        goals.append(f"{p}: destination read {'-' if d is None else f'{d:.0f}'} bytes "
                     f"(goal: nothing; under 1 MiB counts, the agent's own files) -> "
                     f"{verdict(d, 2**20)}")
        w = g(c, "ferry", "wall_s")
        q = g(c, "qemu", "wall_s")
        r = ratio(w, q)
        ms = g(c, "ferry", "sync", "elapsed_ms")
        r2 = ratio(None if ms is None else ms / 1000, q)
        goals.append(f"{p}: wall {'-' if w is None else f'{w:.3f}'} s vs QEMU bitmap path "
                     f"{'-' if q is None else f'{q:.3f}'} s: {'-' if r is None else f'{r:.3f}'}x "
                     f"(goal <= 1.0x) -> {verdict(r, 1.0)}"
                     + ("" if r2 is None else f" (by the report's elapsed_ms: {r2:.3f}x)"))
        q = g(c, "rsync", "wall_s")
        r = ratio(w, q)
        goals.append(f"{p}: wall vs rsync {'-' if q is None else f'{q:.3f}'} s: "
                     f"{'-' if r is None else f'{r:.4f}'}x (goal <= 0.05x) -> {verdict(r, 0.05)}")
    wr, rd = g("medium", "write_mibs"), g("medium", "read_mibs")
    for c in cases:
        p = c[1:] + "%"
        x = g(c, "ferry", "export_mibs")
        if x is not None:
            r = ratio(x, wr)
            goals.append(f"{p}: seed export wrote {x:.0f} MiB/s vs fio 1M O_DIRECT seq write "
                         f"{'-' if wr is None else f'{wr:.0f}'} MiB/s: "
                         f"{'-' if r is None else f'{r:.3f}'}x (goal >= 0.9x) -> "
                         f"{verdict(r, 0.9, le=False)}")
        x = g(c, "ferry", "import_mibs")
        if x is not None:
            r = ratio(x, rd)
            goals.append(f"{p}: seed import verified {x:.0f} MiB/s vs fio 1M O_DIRECT seq read "
                         f"{'-' if rd is None else f'{rd:.0f}'} MiB/s: "
                         f"{'-' if r is None else f'{r:.3f}'}x (goal >= 0.9x) -> "
                         f"{verdict(r, 0.9, le=False)}")
    print("\n== goals (ferry)")
    if not goals:
        print("  (no ferry run)")
    for line in goals:
        print("  " + line)
    print(f"  medium: fio 1M O_DIRECT io_uring seq write {t('medium', 'write_mibs') or '-'} / "
          f"read {t('medium', 'read_mibs') or '-'} MiB/s")

    print("\nREADME table:\n")
    print("| changed | system | catch-up wall (s) | on the wire, MiB (x changed) | "
          "loopback, MiB | read at source, MiB (x changed) | read at destination, MiB | "
          "images match | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']}% | {r['label']} | {r['wall']} | {r['wire']} | {r['lo']} | "
              f"{r['src']} | {r['dst']} | {r['match']} | {r['note']} |")
    for c in cases:
        if g(c, "ferry", "export_mibs") is not None:
            print(f"\nseed export {g(c, 'ferry', 'export_mibs'):.0f} MiB/s, import "
                  f"{(g(c, 'ferry', 'import_mibs') or 0):.0f} MiB/s ({c[1:]}% run); medium "
                  f"(fio) write {t('medium', 'write_mibs') or '-'} / read "
                  f"{t('medium', 'read_mibs') or '-'} MiB/s")
    if goals:
        print("\nGoals:\n")
        for line in goals:
            print(f"- {line}")
    bad = [r for r in rows if r["match"] in ("no", "error")]
    if bad:
        print("\nMISMATCH: " + ", ".join(f"{r['case']}% {r['s']}" for r in bad))
        sys.exit(1)


def main():
    cmds = {"plan": cmd_plan, "write-nbd": cmd_write_nbd, "write-file": cmd_write_file,
            "bitmap-copy": cmd_bitmap_copy, "run": cmd_run, "drop-cache": cmd_drop_cache,
            "json": cmd_json, "rsync-stats": cmd_rsync_stats, "fio": cmd_fio,
            "summary": cmd_summary}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
