"""Guest write IOPS and latency per time window, from a fio per-I/O latency log.

scripts/bench-migrate takes the guest's figures for ferry and for QEMU (scripts/peers/qemu-mirror)
with this one function, so that both are measured the same way. The log is fio's
`--write_lat_log=P --log_unix_epoch=1 --log_avg_msec=0` output (P_lat.1.log): one line per I/O,
"time in ms since the epoch, latency in ns, direction (1 = write), block size[, offset, ...]".
"""


def read_writes(path):
    """[(completion time in s since the epoch, latency in us)] of the writes in the log."""
    writes = []
    with open(path) as log:
        for line in log:
            fields = line.split(",")
            if len(fields) >= 3 and fields[2].strip() == "1":
                writes.append((int(fields[0]) / 1000.0, int(fields[1]) / 1000.0))
    return writes


def percentile(ordered, p):
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not ordered:
        return float("nan")
    rank = -(-len(ordered) * p // 100)  # ceil(n * p / 100), at least 1
    return ordered[min(len(ordered), max(1, int(rank))) - 1]


def windows(path, spans):
    """{name: {n, iops, p50, p99, p999, max, secs}} for each name: (t0, t1) of `spans`
    (seconds since the epoch; a write belongs to the window its completion falls in)."""
    writes = read_writes(path)
    out = {}
    for name, (t0, t1) in spans.items():
        lat = sorted(us for t, us in writes if t0 <= t < t1)
        secs = max(t1 - t0, 1e-9)
        out[name] = {
            "n": len(lat),
            "iops": len(lat) / secs,
            "p50": percentile(lat, 50),
            "p99": percentile(lat, 99),
            "p999": percentile(lat, 99.9),
            "max": lat[-1] if lat else float("nan"),
            "secs": secs,
        }
    return out
