#!/usr/bin/env python3
"""Helpers of scripts/bench-hop (not meant to be run by hand; /usr/bin/python3, for libnbd).

  ports N                         N distinct TCP ports of 127.0.0.1 in 20000..31999 that bind
                                  now (below the ephemeral range: an agent restarted on its
                                  port cannot find it held by a client's TIME_WAIT)
  fio JSON PREFIX                 p50/p99/mean latency (us) and IOPS of a fio run, key=value
  guest URI OUT [options]         the guest of the restart test: ONE libnbd connection; writes
                                  4 KiB blocks naming the write, reads them back, keeps a
                                  ledger of acknowledged writes and the times of every request;
                                  at the end reads the ledger back on that connection and on a
                                  fresh one; writes OUT/guest.json
  stalls GUEST_JSON RESTARTS_TSV A_LOG PREFIX
                                  per restart of the destination: its restart time, the guest's
                                  longest gap between completed requests, where the gap went
                                  (the forwarder's log: connection lost, refused dials,
                                  reconnected); a table on stderr, key=value on stdout
  basecheck GUEST_JSON RESTARTS_TSV PREFIX
                                  what a guest saw across one destination restart (base build)
  summary KV                      the summary block; exit status 1 when the current build
                                  failed a request or lost an acknowledged write
"""
import datetime
import json
import os
import random
import re
import signal
import socket
import statistics
import sys
import time

BLOCK = 4096


def kv(prefix, key, value):
    print(f"{prefix}.{key}={value}")


def load_json(path):
    text = open(path).read()
    return json.loads(text[text.index("{"):])


# ---------------------------------------------------------------------------------------------
# ports


def cmd_ports(n):
    n = int(n)
    got = []
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(20000):
        port = rng.randrange(20000, 32000)
        if port in got:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        got.append(port)
        if len(got) == n:
            print("\n".join(map(str, got)))
            return
    sys.exit("no free ports in 20000..31999")


# ---------------------------------------------------------------------------------------------
# fio


def cmd_fio(path, prefix):
    job = load_json(path)["jobs"][0]
    side = job["write"] if job["write"]["total_ios"] > job["read"]["total_ios"] else job["read"]
    lat = side.get("lat_ns") or {}
    pct = lat.get("percentile") or side.get("clat_ns", {}).get("percentile", {})
    kv(prefix, "iops", f"{side['iops']:.0f}")
    kv(prefix, "ios", side["total_ios"])
    kv(prefix, "mean_us", f"{lat.get('mean', 0) / 1000:.1f}")
    kv(prefix, "p50_us", f"{pct.get('50.000000', 0) / 1000:.1f}")
    kv(prefix, "p99_us", f"{pct.get('99.000000', 0) / 1000:.1f}")
    kv(prefix, "p999_us", f"{pct.get('99.900000', 0) / 1000:.1f}")
    kv(prefix, "error", job.get("error", 0))


# ---------------------------------------------------------------------------------------------
# guest


def pattern(seq, offset):
    """The bytes of write number `seq` at `offset`: a line naming both, repeated."""
    line = f"ferry bench-hop write {seq:010d} at {offset:014d}\n".encode()
    return (line * (BLOCK // len(line) + 1))[:BLOCK]


def cmd_guest(uri, out, *opts):
    import nbd  # python3-libnbd (Debian's, for /usr/bin/python3)

    o = dict(a.split("=", 1) for a in opts)
    span = int(o.get("span", 64 << 20))
    interval = float(o.get("interval_ms", 3)) / 1000
    max_fail = int(o.get("max_fail", 100000))
    stop_file = o.get("stop_file", os.path.join(out, "guest.stop"))
    progress = o.get("progress", os.path.join(out, "guest.progress"))
    rng = random.Random(int(o.get("seed", 42)))

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))

    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    blocks = min(span, size) // BLOCK
    can_fua, can_flush = h.can_fua(), h.can_flush()

    ledger = {}          # offset -> number of the last acknowledged write there
    keys = []            # offsets in the ledger, for picking an older one
    starts, ends, kinds = [], [], []   # every request: start, completion, w/r/f (+! failed)
    errors = []
    st = {"failed": 0, "mismatches": 0, "writes": 0, "reads": 0, "flushes": 0}

    def op(kind, fn):
        t0 = time.time()
        try:
            result, ok = fn(), True
        except nbd.Error as err:
            result, ok = None, False
            st["failed"] += 1
            if len(errors) < 50:
                errors.append({"t": time.time(), "op": kind, "error": str(err)})
        t1 = time.time()
        starts.append(t0)
        ends.append(t1)
        kinds.append(kind if ok else kind + "!")
        return ok, result

    def write_progress(dead=False):
        tmp = progress + ".tmp"
        last = ends[-1] if ends else 0.0
        with open(tmp, "w") as f:
            f.write(f"{len(ends)} {int(last * 1e6)} {st['failed']} {int(dead)}\n")
        os.replace(tmp, progress)

    def dead():
        return h.aio_is_dead() or h.aio_is_closed()

    seq = 0
    it = 0
    last_progress = 0.0
    conn_dead = False
    while not stopping and not os.path.exists(stop_file):
        it += 1
        seq += 1
        off = rng.randrange(blocks) * BLOCK
        flags = nbd.CMD_FLAG_FUA if can_fua and seq % 16 == 0 else 0
        data = pattern(seq, off)
        ok, _ = op("w", lambda: h.pwrite(data, off, flags))
        st["writes"] += 1
        if ok:
            if off not in ledger:
                keys.append(off)
            ledger[off] = seq
        elif off in ledger:
            ledger[off] = None   # unknown content now: not checked
        # Read back the block just written and, every 4th turn, an older one.
        reads = [off]
        if it % 4 == 0 and keys:
            reads.append(keys[rng.randrange(len(keys))])
        for roff in reads:
            ok, got = op("r", lambda: h.pread(BLOCK, roff))
            st["reads"] += 1
            want = ledger.get(roff)
            if ok and want is not None and got != pattern(want, roff):
                st["mismatches"] += 1
                if len(errors) < 50:
                    errors.append({"t": time.time(), "op": "r", "error":
                                   f"read at {roff}: not write {want} ({got[:40]!r})"})
        if can_flush and it % 64 == 0:
            op("f", h.flush)
            st["flushes"] += 1
        now = time.time()
        if now - last_progress >= 0.05:
            write_progress()
            last_progress = now
        if dead():
            conn_dead = True
            break
        if st["failed"] >= max_fail:
            break
        time.sleep(interval)
    write_progress(conn_dead)

    def verify(handle):
        good = bad = errs = 0
        for roff, want in sorted(ledger.items()):
            if want is None:
                continue
            try:
                got = handle.pread(BLOCK, roff)
            except nbd.Error:
                errs += 1
                if handle.aio_is_dead() or handle.aio_is_closed():
                    break
                continue
            if got == pattern(want, roff):
                good += 1
            else:
                bad += 1
        return {"good": good, "bad": bad, "errors": errs}

    checked = sum(1 for v in ledger.values() if v is not None)
    same = {"good": 0, "bad": 0, "errors": checked, "skipped": "connection dead"}
    if not dead():
        same = verify(h)
    fresh_h = nbd.NBD()
    try:
        fresh_h.connect_uri(uri)
        fresh = verify(fresh_h)
        fresh_h.shutdown()
    except nbd.Error as err:
        fresh = {"good": 0, "bad": 0, "errors": checked, "skipped": f"connect: {err}"}
    try:
        if not dead():
            h.shutdown()
    except nbd.Error:
        pass
    report = dict(st, uri=uri, ops=len(ends), ledger=checked, ledger_unknown=len(ledger) - checked,
                  conn_dead=conn_dead, errors=errors, verify_same=same, verify_fresh=fresh,
                  starts=starts, ends=ends, kinds=kinds, interval_ms=interval * 1000,
                  span=blocks * BLOCK)
    with open(os.path.join(out, "guest.json"), "w") as f:
        json.dump(report, f)


# ---------------------------------------------------------------------------------------------
# stalls


def read_restarts(path):
    rows = []
    for line in open(path):
        f = line.split()
        if len(f) >= 7:
            rows.append({"i": int(f[0]), "kind": f[1], "sig": float(f[2]), "gone": float(f[3]),
                         "start": float(f[4]), "accept": float(f[5]), "rc": f[6]})
    return rows


LOG_TS = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z ")


def read_forward_log(path):
    """(time, event) of the forwarder's lines: lost, refused (a failed dial), reconnected."""
    events = []
    if not os.path.exists(path):
        return events
    for line in open(path, errors="replace"):
        if "forward target" not in line:
            continue
        m = LOG_TS.match(line)
        if not m:
            continue
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        if "holding requests" in line and "reconnecting" in line:
            events.append((t, "lost"))
        elif "connected again" in line:
            events.append((t, "back"))
        elif line.rstrip().endswith("cannot connect"):
            events.append((t, "refused"))
        elif "resent" in line:
            events.append((t, "resent"))
    return events


def med(values):
    return statistics.median(values) if values else float("nan")


def cmd_stalls(guest_path, restarts_path, a_log, prefix):
    g = json.load(open(guest_path))
    ends, starts, kinds = g["ends"], g["starts"], g["kinds"]
    rows = read_restarts(restarts_path)
    events = read_forward_log(a_log)
    out = lambda k, v: kv(prefix, k, v)
    err = lambda s: print(s, file=sys.stderr)

    first_sig = rows[0]["sig"] if rows else float("inf")
    steady = [b - a for a, b in zip(ends, ends[1:]) if b < first_sig]
    if steady:
        out("steady_gap_median_ms", f"{med(steady) * 1000:.1f}")
        out("steady_gap_max_ms", f"{max(steady) * 1000:.1f}")
        out("steady_ops", len(steady) + 1)

    err(f"{'#':>3} {'kind':<5} {'exit':>6} {'down':>6} {'start':>6} {'restart':>7} {'outage':>7} "
        f"{'stall':>7} {'excess':>7} | {'lost':>6} {'dials':>5} {'back':>6} {'resume':>6} "
        f"{'fail':>4}")
    err(f"{'':>3} {'':<5} {'ms':>6} {'ms':>6} {'ms':>6} {'ms':>7} {'ms':>7} {'ms':>7} {'ms':>7} | "
        f"{'+sig':>6} {'':>5} {'+acc':>6} {'+back':>6} {'':>4} {'last refused dial, +acc':>24}")
    per = []
    for n, r in enumerate(rows):
        lo = r["sig"]
        hi = rows[n + 1]["sig"] if n + 1 < len(rows) else float("inf")
        # The longest gap between consecutive completions that ends in (sig, next sig]: the
        # gap a restart causes starts before its signal.
        best, gap_at = 0.0, None
        for k in range(len(ends) - 1):
            a, b = ends[k], ends[k + 1]
            if b <= lo or b > hi:
                continue
            if b - a > best:
                best, gap_at = b - a, (a, b)
        fails = sum(1 for t, kd in zip(ends, kinds) if lo <= t < hi and kd.endswith("!"))
        exit_s = r["gone"] - r["sig"]
        down_s = r["start"] - r["gone"]
        start_s = r["accept"] - r["start"]
        restart = exit_s + start_s
        outage = r["accept"] - r["sig"]
        # The forwarder's view: first loss after the signal, dials refused, reconnected.
        ev = [(t, e) for t, e in events if lo - 0.002 <= t < hi]
        lost = next((t for t, e in ev if e == "lost"), None)
        back = next((t for t, e in ev if e == "back"), None)
        refused = [t for t, e in ev if e == "refused" and (back is None or t <= back)]
        dials = len(refused)
        prev = max((t for t in refused if t <= r["accept"]), default=None)
        resume = next((t for t in ends if back is not None and t >= back), None)
        d = {"i": r["i"], "kind": r["kind"], "rc": r["rc"], "exit": exit_s, "down": down_s,
             "start": start_s, "restart": restart, "outage": outage, "stall": best,
             "excess": best - outage, "fails": fails, "gap": gap_at,
             "lost": None if lost is None else lost - r["sig"],
             "back": None if back is None else back - r["accept"],
             "resume": None if resume is None else resume - back, "dials": dials,
             "prev": None if prev is None else prev - r["accept"]}
        per.append(d)
        ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"
        err(f"{d['i']:>3} {d['kind']:<5} {ms(exit_s):>6} {ms(down_s):>6} {ms(start_s):>6} "
            f"{ms(restart):>7} {ms(outage):>7} {ms(best):>7} {ms(best - outage):>7} | "
            f"{ms(d['lost']):>6} {dials:>5} {ms(d['back']):>6} {ms(d['resume']):>6} {fails:>4} {ms(d['prev']):>24}")
        for key in ("kind", "rc"):
            out(f"r{d['i']}.{key}", d[key])
        for key in ("exit", "down", "start", "restart", "outage", "stall", "excess", "lost",
                    "back", "resume", "prev"):
            out(f"r{d['i']}.{key}_ms", ms(d[key]))
        out(f"r{d['i']}.dials_refused", dials)
        out(f"r{d['i']}.failed", fails)
    err("  exit: signal to process gone; down: deliberate downtime; start: spawn to the NBD TCP "
        "port accepting;\n  restart = exit + start; outage = signal to accepting (restart + "
        "down); stall: the guest's longest\n  gap between completed requests; excess = stall - "
        "outage (goal <= 500 ms). A's log: lost = A saw\n  the connection break (after the "
        "signal); dials = its dials refused meanwhile; back = reconnected\n  (after the port "
        "accepted); resume = the guest's next completion after that; last refused dial\n  "
        "(before the port accepted): the backoff's next dial follows it by 50 ms doubling to 1 s")
    for kind in ("term", "kill", "all"):
        sel = [d for d in per if kind == "all" or d["kind"] == kind]
        if not sel:
            continue
        for key in ("stall", "restart", "outage", "excess", "exit", "start", "lost", "resume"):
            vals = [d[key] for d in sel if d[key] is not None]
            if not vals:
                continue
            out(f"{kind}.{key}_max_ms", f"{max(vals) * 1000:.0f}")
            out(f"{kind}.{key}_median_ms", f"{med(vals) * 1000:.0f}")
        backs = [d["back"] for d in sel if d["back"] is not None]
        if backs:
            out(f"{kind}.back_max_ms", f"{max(backs) * 1000:.0f}")
            out(f"{kind}.back_median_ms", f"{med(backs) * 1000:.0f}")
        out(f"{kind}.dials_median", f'{med([d["dials"] for d in sel]):g}')
        out(f"{kind}.count", len(sel))
        out(f"{kind}.over_goal", sum(1 for d in sel if d["excess"] > 0.5))
        out(f"{kind}.failed", sum(d["fails"] for d in sel))
    out("restarts", len(per))
    out("unclean_term_exits", sum(1 for d in per if d["kind"] == "term" and d["rc"] != "0"))
    lats = [b - a for a, b in zip(starts, ends)]
    out("ops", g["ops"])
    out("writes", g["writes"])
    out("reads", g["reads"])
    out("flushes", g["flushes"])
    out("failed", g["failed"])
    out("mismatches", g["mismatches"])
    out("conn_dead", int(g["conn_dead"]))
    out("longest_request_ms", f"{max(lats) * 1000:.0f}" if lats else "-")
    out("ledger", g["ledger"])
    for side in ("same", "fresh"):
        v = g[f"verify_{side}"]
        out(f"verify_{side}.good", v["good"])
        out(f"verify_{side}.bad", v["bad"])
        out(f"verify_{side}.errors", v["errors"])
    for e in g["errors"][:5]:
        err(f"  guest error at {e['t']:.3f}: {e['op']}: {e['error']}")


def cmd_basecheck(guest_path, restarts_path, prefix):
    g = json.load(open(guest_path))
    ends, kinds = g["ends"], g["kinds"]
    rows = read_restarts(restarts_path)
    out = lambda k, v: kv(prefix, k, v)
    r = rows[0]
    before = [k for t, k in zip(ends, kinds) if t < r["sig"]]
    during = [k for t, k in zip(ends, kinds) if r["sig"] <= t < r["accept"] + 0.5]
    after = [k for t, k in zip(ends, kinds) if t >= r["accept"] + 0.5]
    cnt = lambda ks, bad: sum(1 for k in ks if k.endswith("!") == bad)
    out("before_ok", cnt(before, False))
    out("before_failed", cnt(before, True))
    out("around_ok", cnt(during, False))
    out("around_failed", cnt(during, True))
    out("after_ok", cnt(after, False))
    out("after_failed", cnt(after, True))
    out("failed", g["failed"])
    out("conn_dead", int(g["conn_dead"]))
    first = next((e for e in g["errors"] if e["t"] >= r["sig"]), None)
    if first:
        out("first_error_after_sig_ms", f"{(first['t'] - r['sig']) * 1000:.0f}")
        out("first_error", f"{first['op']}: {first['error']}".replace("\n", " "))
    out("ledger", g["ledger"])
    for side in ("same", "fresh"):
        v = g[f"verify_{side}"]
        out(f"verify_{side}.good", v["good"])
        out(f"verify_{side}.errors", v["errors"] + v["bad"])


# ---------------------------------------------------------------------------------------------
# summary


def cmd_summary(path):
    kvs = {}
    for line in open(path):
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            kvs[k] = v
    g = kvs.get
    f = lambda k: float(kvs[k]) if k in kvs and kvs[k] not in ("", "-", "nan") else None
    fails = []
    print("=" * 100)
    print("ferry bench-hop summary")
    print("=" * 100)
    print(f"current build: {g('cur.commit', '?')} ({g('cur.binary', '?')})")
    if g("base.binary"):
        print(f"base build:    {g('base.commit', '?')} ({g('base.binary')})")
    print(f"image {g('size')}, {g('rounds')} rounds x {g('runtime')} s per fio run, fio {g('fio_version')}, "
          f"libnbd {g('libnbd_version')}, {g('ncpu')} CPUs")
    for phase in ("start", "latency", "stall", "end"):
        if g(f"load.{phase}"):
            busy = g(f"busy.{phase}")
            print(f"load average at {phase + ':':<9} {g(f'load.{phase}')}"
                  + (f"   (machine busy during the phase: {busy}% of all CPUs, this run included)"
                     if busy else ""))

    # ---- hop latency
    builds = [b for b in ("cur", "base") if g(f"{b}.binary")]
    rounds = int(g("rounds") or 0)
    workloads = (g("workloads") or "").split()
    if workloads and rounds and any(k.startswith("r1.") for k in kvs):
        def medk(b, path, wl, m):
            vals = [f(f"r{r}.{b}.{path}.{wl}.{m}") for r in range(1, rounds + 1)]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else None

        print("\n1. Hop latency: fio nbd engine, 4 KiB random I/O over the whole image; direct = "
              "B's NBD TCP port,\n   via A = A's unix socket (A forwards to B over TCP). "
              f"Medians over {rounds} rounds (us).")
        hdr = (f"   {'build':<5} {'workload':<14} {'direct':>8} {'via A':>8} {'extra':>7} {'ratio':>6}"
               f" | {'direct':>8} {'via A':>8} {'extra':>7} {'ratio':>6} | {'A cpu':>6} {'B cpu':>6}")
        print(f"   {'':<5} {'':<14} {'--------- p50 ---------':>32}   {'--------- p99 ---------':>32}"
              f"   {'us/request':>13}")
        print(hdr)
        extra = {}
        for b in builds:
            for wl in workloads:
                d50, h50 = medk(b, "direct", wl, "p50_us"), medk(b, "hop", wl, "p50_us")
                d99, h99 = medk(b, "direct", wl, "p99_us"), medk(b, "hop", wl, "p99_us")
                acpu, bcpu = medk(b, "hop", wl, "a_cpu_us"), medk(b, "hop", wl, "b_cpu_us")
                if None in (d50, h50, d99, h99):
                    continue
                extra[(b, wl)] = (h50 - d50, h99 - d99, h50, h99)
                cpu = lambda v: f"{v:>6.1f}" if v is not None else f"{'-':>6}"
                print(f"   {b:<5} {wl:<14} {d50:>8.1f} {h50:>8.1f} {h50 - d50:>+7.1f} {h50 / d50:>6.2f}"
                      f" | {d99:>8.1f} {h99:>8.1f} {h99 - d99:>+7.1f} {h99 / d99:>6.2f} | "
                      f"{cpu(acpu)} {cpu(bcpu)}")
        if "base" in builds:
            print("   current vs base (via A): p50 cur/base, p99 cur/base, extra p50 cur - base (us)")
            for wl in workloads:
                c, b = extra.get(("cur", wl)), extra.get(("base", wl))
                if c and b:
                    print(f"   {wl:<20} p50 {c[2] / b[2]:.3f}   p99 {c[3] / b[3]:.3f}   "
                          f"extra p50 {c[0] - b[0]:+.1f}")
        print("   per-round p50 via A - direct (us), to judge the noise:")
        for b in builds:
            for wl in workloads:
                cells = []
                for r in range(1, rounds + 1):
                    d, h = f(f"r{r}.{b}.direct.{wl}.p50_us"), f(f"r{r}.{b}.hop.{wl}.p50_us")
                    cells.append(f"{h - d:+.0f}" if d is not None and h is not None else "-")
                print(f"     {b:<5} {wl:<14} " + " ".join(f"{c:>6}" for c in cells))

    # ---- stall
    p = "stall"
    if g(f"{p}.restarts"):
        n_term, n_kill = g(f"{p}.term.count", "0"), g(f"{p}.kill.count", "0")
        print(f"\n2. Destination restarts (current build): {g(f'{p}.restarts')} restarts of B "
              f"({n_term} SIGTERM + immediate start, {n_kill} kill -9 + "
              f"{g('down_s')} s down + start)\n   under ONE guest connection at A "
              f"(libnbd; write 4 KiB, read back, every {g('guest_interval_ms')} ms)")
        print(f"   {'':<14} {'stall max/med':>15} {'restart max/med':>17} {'outage max/med':>16} "
              f"{'excess max/med':>16} {'over 0.5 s':>10}")
        for kind, label in (("term", "SIGTERM"), ("kill", "kill -9"), ("all", "all")):
            if not g(f"{p}.{kind}.count"):
                continue
            cell = lambda k: f"{g(f'{p}.{kind}.{k}_max_ms')}/{g(f'{p}.{kind}.{k}_median_ms')} ms"
            print(f"   {label:<14} {cell('stall'):>15} {cell('restart'):>17} {cell('outage'):>16} "
                  f"{cell('excess'):>16} {g(f'{p}.{kind}.over_goal'):>10}")
            if g(f"{p}.{kind}.back_max_ms"):
                print(f"   {'':<14} A saw the break {g(f'{p}.{kind}.lost_median_ms')} ms after the "
                      f"signal, reconnected {g(f'{p}.{kind}.back_median_ms')} ms (max "
                      f"{g(f'{p}.{kind}.back_max_ms')}) after B's port accepted, after "
                      f"{g(f'{p}.{kind}.dials_median')} refused dials (medians)")
        print("   restart = B's own time (signal -> exit + start -> NBD TCP port accepts); outage ="
              " signal -> accepting\n   (restart + the deliberate 2 s down for kill -9); excess = "
              "stall - outage (goal <= 500 ms)")
        print(f"   guest: {g(f'{p}.ops')} requests ({g(f'{p}.writes')} writes, {g(f'{p}.reads')} reads,"
              f" {g(f'{p}.flushes')} flushes), steady gap median {g(f'{p}.steady_gap_median_ms')} ms"
              f" / max {g(f'{p}.steady_gap_max_ms')} ms before the first restart")
        print(f"   failed requests: {g(f'{p}.failed')} (goal 0); read-back mismatches: "
              f"{g(f'{p}.mismatches')}; connection dead: {'yes' if g(f'{p}.conn_dead') == '1' else 'no'}")
        print(f"   ledger: {g(f'{p}.ledger')} acknowledged blocks; read back through A on the same "
              f"connection: {g(f'{p}.verify_same.good')} ok, {g(f'{p}.verify_same.bad')} wrong, "
              f"{g(f'{p}.verify_same.errors')} errors; on a fresh connection: "
              f"{g(f'{p}.verify_fresh.good')} ok, {g(f'{p}.verify_fresh.bad')} wrong, "
              f"{g(f'{p}.verify_fresh.errors')} errors")
        ledger = int(g(f"{p}.ledger") or 0)
        if g(f"{p}.failed") != "0":
            fails.append(f"{g(f'{p}.failed')} failed requests")
        if g(f"{p}.mismatches") != "0":
            fails.append(f"{g(f'{p}.mismatches')} read-back mismatches")
        if g(f"{p}.conn_dead") == "1":
            fails.append("the guest's connection died")
        for side in ("same", "fresh"):
            if int(g(f"{p}.verify_{side}.good") or 0) != ledger:
                fails.append(f"ledger check ({side} connection): "
                             f"{g(f'{p}.verify_{side}.good')} of {ledger} read back")
        if g(f"{p}.unclean_term_exits", "0") != "0":
            print(f"   note: {g(f'{p}.unclean_term_exits')} SIGTERM stops did not exit 0")
    elif g("stall.skipped"):
        print(f"\n2. Destination restarts: not run ({g('stall.skipped')})")
    if g("stall.error"):
        fails.append(g("stall.error"))

    q = "basecheck"
    if g(f"{q}.failed") is not None:
        print(f"\n   base build, one SIGTERM restart of B under the same guest: "
              f"{g(f'{q}.failed')} failed requests")
        print(f"     before the restart {g(f'{q}.before_ok')} ok / {g(f'{q}.before_failed')} failed;"
              f" around it {g(f'{q}.around_ok')} ok / {g(f'{q}.around_failed')} failed; from 0.5 s"
              f" after B was back: {g(f'{q}.after_ok')} ok / {g(f'{q}.after_failed')} failed")
        if g(f"{q}.first_error"):
            print(f"     first error {g(f'{q}.first_error_after_sig_ms')} ms after the signal: "
                  f"{g(f'{q}.first_error')}")
        print(f"     connection dead: {'yes' if g(f'{q}.conn_dead') == '1' else 'no'}; ledger "
              f"{g(f'{q}.ledger')}: same connection {g(f'{q}.verify_same.good')} ok / "
              f"{g(f'{q}.verify_same.errors')} not, fresh connection {g(f'{q}.verify_fresh.good')}"
              f" ok / {g(f'{q}.verify_fresh.errors')} not")
        broke = int(g(f"{q}.failed") or 0) > 0
        print(f"     => the base build's client {'FAILS' if broke else 'did NOT fail (unexpected)'}"
              + (" and stays failed" if broke and g(f'{q}.after_ok') == "0" else ""))
    elif g("basecheck.skipped"):
        print(f"\n   base build restart check: not run ({g('basecheck.skipped')})")
    print(f"\ntotal {g('total_s', '?')} s")
    if fails:
        print("RESULT: FAIL (current build): " + "; ".join(fails))
        sys.exit(1)
    print("RESULT: ok (current build: no failed request, every acknowledged write read back)")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {"ports": cmd_ports, "fio": cmd_fio, "guest": cmd_guest, "stalls": cmd_stalls,
     "basecheck": cmd_basecheck, "summary": cmd_summary}[cmd](*args)


if __name__ == "__main__":
    main()
