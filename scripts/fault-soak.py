#!/usr/bin/python3
"""Helpers of scripts/fault-soak (see its header): the driver of the fault rounds, the guest
writer with its ledger of acknowledged writes, and the checks.

Subcommands:
  run      the rounds (called by scripts/fault-soak, which builds ferry and brings up the
           two hosts of scripts/netlab, three for chain-kill-middle)
  writer   one guest: 4 KiB writes over NBD, every acknowledged write recorded in a ledger
  check    a ledger against an image (the same check the rounds run), for replaying by hand
  journal  prints a ferry journal file as the soak parses it

Ground truth comes from here, not from ferry's code: the destination's journal file is parsed
by `read_journal` (the frame and record layout of src/journal/file.rs and record.rs), and the
images are read as files and compared with what the writers' ledgers say was acknowledged.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request

BLOCK = 4096
MAGIC = b"FSOAKBLK"
HEADER = struct.Struct("<8sIIQQ")  # magic, disk, 0, block index, seq  (32 bytes)
MIB = 1 << 20
# Faults that strike after the batch switched over (no resume; `round_moved`), not in the
# default FAULTS, so that a seed replays the same rounds as before they existed.
MOVED_FAULTS = ("restart-dst-after-switch", "chain-kill-middle")


class RoundAborted(Exception):
    """A round cannot go on (its problem is already recorded)."""


# ------------------------------------------------------------------ blocks and ledgers --


def make_block(disk, index, seq):
    """The 4 KiB a writer writes for (disk, block index, seq): header, then a payload that
    depends on all three (so a torn or misplaced block never passes)."""
    header = HEADER.pack(MAGIC, disk, 0, index, seq)
    digest = hashlib.blake2b(header, digest_size=64).digest()
    return header + (digest * 64)[: BLOCK - HEADER.size]


def parse_block(data):
    """(disk, index, seq) of a block a writer wrote, or None."""
    if len(data) < HEADER.size or data[:8] != MAGIC:
        return None
    _, disk, _, index, seq = HEADER.unpack_from(data)
    return disk, index, seq


def read_ledger(path):
    """{block index: (last acknowledged seq or None, [attempted seqs])} and counters.

    Ledger lines: "A seq index" before a write is sent, "K seq index sent_at seconds" once
    it was acknowledged (when it was sent, wall clock, and how long it took), "E seq reason"
    when it failed (its outcome unknown), "C seq connected" at each (re)connection."""
    blocks = {}
    acked = attempted = 0
    with open(path, "rb") as f:
        for raw in f:
            parts = raw.split()
            if len(parts) < 3 or not raw.endswith(b"\n"):
                continue  # a line cut by kill -9
            kind = parts[0]
            if kind == b"A":
                seq, index = int(parts[1]), int(parts[2])
                entry = blocks.setdefault(index, [None, []])
                entry[1].append(seq)
                attempted += 1
            elif kind == b"K":
                seq, index = int(parts[1]), int(parts[2])
                entry = blocks.setdefault(index, [None, []])
                if entry[0] is None or seq > entry[0]:
                    entry[0] = seq
                acked += 1
    return blocks, acked, attempted


def check_image(image, ledger, disk):
    """Every block's last acknowledged write must be in `image`, or a later write that was
    attempted there (its acknowledgement not seen: it may or may not have landed).
    Returns (lost: list of descriptions, checked blocks, acked writes, phantoms)."""
    blocks, acked, _ = read_ledger(ledger)
    lost, phantoms, checked = [], [], 0
    with open(image, "rb") as f:
        for index in sorted(blocks):
            last, tried = blocks[index]
            f.seek(index * BLOCK)
            data = f.read(BLOCK)
            found = parse_block(data)
            seq = found[2] if found and found[0] == disk and found[1] == index else None
            intact = seq is not None and data == make_block(disk, index, seq)
            if last is None:
                # Never acknowledged here: whatever is there must be one of the attempts.
                if seq is not None and (not intact or seq not in tried):
                    phantoms.append(f"block {index}: holds seq {seq}, attempts {tried[-3:]}")
                continue
            checked += 1
            allowed = {last} | {s for s in tried if s > last}
            if seq in allowed and intact:
                continue
            what = (
                "no writer block"
                if found is None
                else f"seq {found[2]} of disk {found[0]} block {found[1]}"
                + ("" if intact or seq is None else " (torn)")
            )
            lost.append(f"block {index} (offset {index * BLOCK}): last acked seq {last}, holds {what}")
    return lost, checked, acked, phantoms


def ledger_guest(path):
    """What the guest went through, from its ledger: failed requests, connections made,
    and every acknowledged write as (sent at, seconds it took)."""
    failures, connects, writes = [], 0, []
    with open(path, "rb") as f:
        for raw in f:
            parts = raw.split()
            if len(parts) < 3 or not raw.endswith(b"\n"):
                continue
            if parts[0] == b"E":
                failures.append(raw.decode(errors="replace").strip())
            elif parts[0] == b"C":
                connects += 1
            elif parts[0] == b"K" and len(parts) >= 5:
                writes.append((float(parts[3]), float(parts[4])))
    return failures, connects, writes


def longest_stall(writes, start, end=None):
    """The longest time one acknowledged write took among those that ended in [start, end)
    (a write caught by a fault ends after it began). 0.0 when none ended there."""
    took = [
        seconds
        for sent, seconds in writes
        if sent + seconds >= start and (end is None or sent + seconds < end)
    ]
    return max(took, default=0.0)


# ------------------------------------------------------------------------ the writer --


def writer_main(args):
    import nbd  # python3-libnbd, under /usr/bin/python3

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    rng = random.Random(args.seed)
    nblocks = args.size // BLOCK
    hot_first = args.hot_offset // BLOCK
    hot_count = max(1, args.hot_bytes // BLOCK)
    fd = os.open(args.ledger, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    log = lambda line: os.write(fd, line.encode())  # noqa: E731 (unbuffered: survives kill -9)
    handle = None
    seq = 0
    interval = 1.0 / args.rate
    next_at = time.monotonic()
    while not stop:
        if handle is None:
            try:
                handle = nbd.NBD()
                handle.connect_uri(args.uri)
                log(f"C {seq} connected\n")
            except nbd.Error as err:
                handle = None
                time.sleep(0.05)
                continue
        if rng.random() < args.hot_fraction:
            index = hot_first + rng.randrange(hot_count)
        else:
            index = rng.randrange(nblocks)
        seq += 1
        data = make_block(args.disk, index, seq)
        log(f"A {seq} {index}\n")
        sent_at, sent_mono = time.time(), time.monotonic()
        try:
            handle.pwrite(data, index * BLOCK)
        except nbd.Error as err:
            log(f"E {seq} {str(err).replace(chr(10), ' ')[:200]}\n")
            try:
                handle.shutdown()
            except nbd.Error:
                pass
            handle = None
            time.sleep(0.05)
            continue
        # Sent at (wall clock) and how long the write took: the soak's guest stalls.
        log(f"K {seq} {index} {sent_at:.6f} {time.monotonic() - sent_mono:.6f}\n")
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:
            next_at = time.monotonic()  # do not burst after a long stall
    if handle is not None:
        try:
            handle.shutdown()
        except nbd.Error:
            pass
    os.close(fd)


# ---------------------------------------------------------------------- the journal --

_CRC32C = []


def crc32c(data, crc=0):
    if not _CRC32C:
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC32C.append(c)
    crc ^= 0xFFFFFFFF
    table = _CRC32C
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


KINDS = {
    1: "SourceStarted",
    2: "SourceSwitchoverBegun",
    3: "SourceSwitchoverCancelled",
    4: "SourceSwitched",
    5: "SourceAborted",
    6: "SourceFinished",
    7: "SourceSettings",
    8: "SourceHolder",
    9: "SourceRepointed",
    10: "SourceHolderTold",
    16: "TargetCreated",
    17: "TargetReceived",
    18: "TargetCommitted",
    19: "TargetAborted",
    20: "TargetHolder",
}


def read_journal(path):
    """[(seq, kind name, job id, fields)] of the complete, checksummed frames of a ferry
    journal (a torn last frame is left out, as replay drops it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    records = []
    pos = 16
    while pos + 16 <= len(data):
        body_len, seq, hcrc = struct.unpack_from("<IQI", data, pos)
        if crc32c(data[pos : pos + 12]) != hcrc:
            break
        end = pos + 16 + body_len + 4
        if end > len(data):
            break
        (fcrc,) = struct.unpack_from("<I", data, end - 4)
        if crc32c(data[pos : end - 4]) != fcrc:
            break
        body = data[pos + 16 : end - 4]
        kind = body[0]
        (job_id,) = struct.unpack_from("<Q", body, 1)
        fields = {}
        if kind in (1, 16):
            p = 9
            batch = None
            if body[p] == 1:
                (n,) = struct.unpack_from("<I", body, p + 1)
                batch = body[p + 5 : p + 5 + n].decode()
                p += 5 + n
            else:
                p += 1
            (n,) = struct.unpack_from("<I", body, p)
            export = body[p + 4 : p + 4 + n].decode()
            p += 4 + n
            p += 16  # size, granularity
            (n,) = struct.unpack_from("<I", body, p)
            peer = body[p + 4 : p + 4 + n].decode()
            p += 4 + n
            fields = {"batch": batch, "export": export, "peer": peer}
            if kind == 16:
                (n,) = struct.unpack_from("<I", body, p)
                fields["image"] = body[p + 4 : p + 4 + n].decode()
        records.append((seq, KINDS.get(kind, f"kind{kind}"), job_id, fields))
        pos = end
    return records


SOURCE_PHASE = {
    "SourceStarted": "copying",
    "SourceSwitchoverBegun": "switching-over",
    "SourceSwitchoverCancelled": "copying",
    "SourceSwitched": "switched",
    "SourceAborted": "aborted",
    "SourceFinished": "finished",
}
TARGET_PHASE = {
    "TargetCreated": "receiving",
    "TargetReceived": "receiving",
    "TargetCommitted": "committed",
    "TargetAborted": "aborted",
}


def journal_jobs(path, role=None):
    """{export: {"job", "role", "phase", "image"?, "records": [kinds]}} of a journal (of the
    jobs in `role` only, if given: an agent in the middle of a chain of moves has received a
    disk as a target and sent it on as a source; without `role` the later job wins).
    A job is its id and its role, as ferry keys them: the id of a job this agent received
    may also be the id of one it started (ids derive from the agents' start times)."""
    by_job = {}
    for _, kind, job, fields in read_journal(path):
        side = "target" if kind.startswith("Target") else "source"
        entry = by_job.setdefault((job, side), {"job": job, "role": side, "records": []})
        entry["records"].append(kind)
        if "export" in fields:
            entry["export"] = fields["export"]
            entry["batch"] = fields["batch"]
            if "image" in fields:
                entry["image"] = fields["image"]
        if kind in SOURCE_PHASE:
            entry["phase"] = SOURCE_PHASE[kind]
        elif kind in TARGET_PHASE:
            entry["phase"] = TARGET_PHASE[kind]
    return {
        e["export"]: e
        for e in by_job.values()
        if "export" in e and (role is None or e.get("role") == role)
    }


class DirWatch:
    """inotify on a directory: `wait` returns as soon as a file in it is written."""

    def __init__(self, path):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        # IN_MODIFY | IN_CREATE | IN_MOVED_TO (a compaction renames a new journal in)
        if libc.inotify_add_watch(self.fd, path.encode(), 0x2 | 0x100 | 0x80) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def wait(self, timeout):
        import select

        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                os.read(self.fd, 65536)
            except BlockingIOError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        os.close(self.fd)


def journal_kinds(path):
    """Kind bytes of the complete frames of a journal, fast (no checksums): for triggers."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    kinds, pos = set(), 16
    while pos + 17 <= len(data):
        (body_len,) = struct.unpack_from("<I", data, pos)
        if pos + 20 + body_len > len(data):
            break
        kinds.add(data[pos + 16])
        pos += 20 + body_len
    return kinds


# ------------------------------------------------------------------------ the rounds --


def env_size(text):
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


def table_verdict(source, target):
    """The verdict of docs/commit-protocol.md ("What `ferry status` reports") for a source
    phase and a target state (no-job, unreachable, or a phase)."""
    if target == "committed":
        return "migrated" if source not in ("no-job", "copying", "aborted") else "needs-attention"
    if source in ("switched", "finished"):
        return "migrated" if target == "unreachable" else "needs-attention"
    if source == "aborted":
        return "not-migrated"
    if source == "copying":
        return {"aborted": "not-migrated", "unreachable": "needs-attention"}.get(target, "resumable")
    if source == "switching-over":
        return {"unreachable": "needs-attention", "no-job": "needs-attention"}.get(target, "resumable")
    if source == "no-job":
        return "not-migrated" if target in ("unreachable", "no-job") else "needs-attention"
    return "?"


def mean_of(jobs, key):
    values = [job[key] for job in jobs if key in job]
    return f"{sum(values) / len(values):.3f}" if values else "-"


class Lab:
    """scripts/netlab with this soak's prefix; h1 = source, h2 = destination."""

    def __init__(self, netlab, net):
        self.netlab, self.net = netlab, net

    def ip(self, host):
        return f"{self.net}.{host[1:]}"

    def run(self, *args, check=True, timeout=60):
        return subprocess.run(
            [self.netlab, *args], check=check, timeout=timeout, capture_output=True, text=True
        )

    def exec_cmd(self, host, *cmd):
        return [self.netlab, "exec", host, *cmd]


class Agent:
    """One ferry agent in a lab host, restartable with the same addresses and state."""

    def __init__(self, soak, host, root, extra):
        self.soak, self.host, self.root, self.extra = soak, host, root, extra
        self.ip = soak.lab.ip(host)
        self.api = f"{self.ip}:7450"
        self.transfer = f"{self.ip}:7451"
        self.state = os.path.join(root, "state")
        self.socket = os.path.join(root, "nbd.sock")
        self.log_path = os.path.join(root, "agent.log")
        self.proc = None
        self.exits = []  # (how, returncode) of every end of the process

    def start(self):
        slow = self.soak.slow_sync_ms
        wrap = []
        if slow > 0:
            # A slow disk: every fdatasync/fsync of the agent takes `slow` ms longer (strace
            # injects the delay; only those two syscalls stop, through a seccomp filter).
            wrap = [
                "strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null",
                "-e", "trace=fdatasync,fsync",
                "-e", f"inject=fdatasync,fsync:delay_enter={int(slow * 1000)}",
            ]
        cmd = self.soak.lab.exec_cmd(
            self.host,
            *wrap,
            self.soak.ferry,
            "agent",
            "--socket",
            self.socket,
            "--state-dir",
            self.state,
            "--api",
            self.api,
            # A namespace address is routable: plain HTTP there needs the override.
            "--api-insecure",
            "--transfer",
            self.transfer,
            "--cluster-key",
            self.soak.key,
            "--tls-creds",
            self.soak.tls,
            *self.extra,
        )
        with open(self.log_path, "ab") as log:
            log.write(f"==== soak: start {time.strftime('%H:%M:%S')} ====\n".encode())
            log.flush()
            env = dict(os.environ, RUST_LOG="info")
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True
            )
        self.pid = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.host} exited at start:\n{self.log_tail()}")
            if os.path.exists(self.socket) and self.api_get("/v1/exports", timeout=0.5) is not None:
                self.pid = self.ferry_pid()
                return
            time.sleep(0.02)
        raise RuntimeError(f"agent {self.host} not ready after 20 s:\n{self.log_tail()}")

    def api_get(self, path, timeout=1.0):
        try:
            with open(os.path.join(self.state, "api.token")) as f:
                token = f.read().strip()
            req = urllib.request.Request(
                f"http://{self.api}{path}", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except Exception:
            return None

    def ferry_pid(self):
        """The agent's own pid (netlab exec and ip netns exec exec it; strace forks it)."""
        pid = self.proc.pid
        for _ in range(3):
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "ferry":
                    return pid
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
            if not children:
                break
            pid = int(children[0])
        raise RuntimeError(f"agent {self.host}: no ferry process under pid {self.proc.pid}")

    def signal(self, sig):
        if self.alive() and self.pid:
            os.kill(self.pid, sig)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self.exits.append(("kill", self.proc.returncode))
        self.proc = None

    def stop(self, timeout=15):
        """SIGTERM; True if it ended cleanly in time (else it is killed)."""
        if not self.alive():
            return True
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
            self.exits.append(("term", code))
            self.proc = None
            return code == 0
        except subprocess.TimeoutExpired:
            self.kill()
            return False

    def log_tail(self, lines=25):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


class Soak:
    def __init__(self, args):
        self.args = args
        self.ferry = args.ferry
        self.lab = Lab(args.netlab, os.environ.get("NETLAB_NET", "10.77.41"))
        self.work = args.work
        self.key = os.path.join(self.work, "cluster.key")
        # NBD TLS credentials every agent shares: the destinations' TCP listeners require TLS
        # and the source's forwarding hop dials with it, as in a deployment.
        self.tls = os.path.join(self.work, "tls")
        self.rounds = int(os.environ.get("ROUNDS", "200"))
        self.seed = int(os.environ["SEED"])
        self.disk_size = env_size(os.environ.get("DISK_SIZE", "64M"))
        self.prefill = float(os.environ.get("PREFILL", "0.6"))
        self.disks = int(os.environ.get("DISKS", "3"))
        self.bandwidth = os.environ.get("BANDWIDTH", "16M")
        self.rate = float(os.environ.get("WRITE_RATE", "100"))
        self.hot_bytes = env_size(os.environ.get("HOT_BYTES", "512K"))
        self.hot_fraction = float(os.environ.get("HOT_FRACTION", "0.9"))
        self.faults = os.environ.get("FAULTS", "kill-src,kill-dst,kill-both,partition").split(",")
        self.whens = os.environ.get("WHENS", "pass1,later-pass,switchover,after-commit").split(",")
        self.keep = os.environ.get("KEEP", "failed")  # failed | all | none
        self.migrate_timeout = float(os.environ.get("MIGRATE_TIMEOUT", "90"))
        self.slow_sync_ms = float(os.environ.get("SLOW_SYNC_MS", "10"))
        if self.slow_sync_ms > 0 and not shutil.which("strace"):
            print("fault-soak: strace missing: SLOW_SYNC_MS=0", file=sys.stderr)
            self.slow_sync_ms = 0
        self.python = "/usr/bin/python3"
        self.me = os.path.abspath(__file__)
        self.totals = {
            "rounds": 0,
            "verdicts": 0,
            "correct": 0,
            "final_verdicts": 0,
            "final_correct": 0,
            "lost": 0,
            "acked": 0,
            "phantoms": 0,
            "problems": 0,
            "failed_rounds": [],
            "resend": [],  # (fault, fraction) per resumed job
            "actual": {},
            "verdict_kinds": {},
        }
        self.results = open(os.path.join(self.work, "rounds.jsonl"), "a")

    # ------------------------------------------------------------------ one round --

    def prefill_disk(self, path, rng):
        chunks = self.disk_size // MIB
        target = int(chunks * self.prefill)
        filled = set()
        while len(filled) < target:
            start = rng.randrange(chunks)
            filled.update(range(start, min(chunks, start + rng.randint(1, 8))))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, self.disk_size)
        for chunk in sorted(filled):
            os.pwrite(fd, rng.randbytes(MIB), chunk * MIB)
        os.close(fd)
        return len(filled) * MIB

    def start_writers(self, root, src, rng, writers):
        """One guest writer per disk, connected to `src`'s socket, into `writers`."""
        for i, vm in enumerate(self.vm_names):
            ledger = os.path.join(root, f"{vm}.ledger")
            hot_offset = rng.randrange((self.disk_size - self.hot_bytes) // MIB + 1) * MIB
            writers[vm] = subprocess.Popen(
                [
                    self.python, self.me, "writer",
                    "--uri", f"nbd+unix:///{vm}?socket={src.socket}",
                    "--disk", str(i + 1),
                    "--size", str(self.disk_size),
                    "--ledger", ledger,
                    "--rate", str(self.rate),
                    "--hot-offset", str(hot_offset),
                    "--hot-bytes", str(self.hot_bytes),
                    "--hot-fraction", str(self.hot_fraction),
                    "--seed", str(rng.randrange(1 << 32)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(root, f"{vm}.writer.log"), "ab"),
                start_new_session=True,
            )

    def ferry_cli(self, host, agent, *args, timeout=120):
        cmd = self.lab.exec_cmd(
            host, self.ferry, *args, "--api", agent.api, "--state-dir", agent.state
        )
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def status(self, host, agent, batch):
        """`ferry status [BATCH] --json`: the agent's answer; with the agent down, its journal
        file read by `ferry status --offline`."""
        args = ["status", batch] if batch else ["status"]
        out = self.ferry_cli(host, agent, *args, "--json")
        if out.returncode != 0 and "cannot reach the agent" in out.stderr:
            out = self.ferry_cli(
                host, agent, *args, "--json", "--offline", "--cluster-key", self.key
            )
        try:
            return {line["export"]: line for line in json.loads(out.stdout)}, out
        except (ValueError, KeyError, TypeError):
            return None, out

    def snapshot(self, src, dst):
        """Both journals, per export: 's:phase t:phase'."""
        s, t = journal_jobs(os.path.join(src.state, "journal")), journal_jobs(
            os.path.join(dst.state, "journal")
        )
        return {
            vm: f"{s.get(vm, {}).get('phase', '-')}/{t.get(vm, {}).get('phase', '-')}"
            for vm in self.vm_names
        }

    @staticmethod
    def classify(snap, max_pass):
        phases = [v.split("/") for v in snap.values()]
        if any(t == "committed" for _, t in phases):
            return "after-commit"
        if any(s == "switching-over" for s, _ in phases):
            return "switchover"
        if max_pass >= 2:
            return "later-pass"
        if any(s == "copying" for s, _ in phases):
            return "pass1"
        return "before-start"

    def wait_trigger(self, when, rng, src, dst, migrate, expected_s, info):
        """Blocks until the moment `when` (or until the migration ended); returns the max
        pass number seen."""
        t0 = time.monotonic()
        max_pass = 0

        seen = {}
        info["timeline"] = []

        def passes():
            nonlocal max_pass
            jobs = src.api_get("/v1/jobs", timeout=0.5) or []
            for job in jobs:
                progress = job.get("progress") or {}
                max_pass = max(max_pass, progress.get("pass", 0))
                state = (job.get("phase"), progress.get("pass", 0))
                if seen.get(job.get("export")) != state:
                    seen[job.get("export")] = state
                    info["timeline"].append(
                        (round(time.monotonic() - t0, 3), job.get("export"), *state)
                    )
            return jobs

        if when == "pass1":
            frac = rng.uniform(0.1, 0.7)
            info["delay_s"] = round(frac * expected_s, 3)
            deadline = t0 + frac * expected_s
            while time.monotonic() < deadline and migrate.poll() is None:
                time.sleep(0.005)
            passes()
        elif when == "later-pass":
            extra = rng.uniform(0.0, 0.15)
            info["extra_s"] = round(extra, 3)
            while migrate.poll() is None:
                passes()
                if max_pass >= 2:
                    time.sleep(extra)
                    break
                time.sleep(0.01)
        else:
            # The commit window is a millisecond or two: wake on every write to the journal
            # (inotify on the state directory) and look for the record's kind byte.
            agent = src if when == "switchover" else dst
            kind = 2 if when == "switchover" else 18  # SourceSwitchoverBegun, TargetCommitted
            # With slow syncs (SLOW_SYNC_MS = s) the commit takes about 4 s: the source syncs
            # Begun, the destination syncs the image, then TargetCommitted, then the source
            # syncs Switched. `extra` spreads the strike over those steps.
            step = max(self.slow_sync_ms, 0.5) / 1000
            if when == "switchover":
                extra = rng.choice([0.0, rng.uniform(0.0, 3.5 * step)])
            else:
                extra = rng.choice([0.0, rng.uniform(0.0, 2.5 * step)])
            info["extra_s"] = round(extra, 4)
            path = os.path.join(agent.state, "journal")
            with DirWatch(agent.state) as watch:
                while migrate.poll() is None:
                    if kind in journal_kinds(path):
                        if extra:
                            time.sleep(extra)
                        break
                    watch.wait(0.05)
        info["at_s"] = round(time.monotonic() - t0, 3)
        return max_pass

    def strike(self, fault, rng, src, dst):
        """The fault itself, at once: kill -9 or cut the network."""
        if fault == "partition":
            # scripts/netlab takes 20-30 ms to install the drop rules, longer than a commit: both
            # agents are frozen (SIGSTOP) meanwhile, so the cut lands at the chosen moment.
            # What is already in their sockets is still delivered, as in a real cut.
            frozen = [a for a in (src, dst) if a.alive()]
            for agent in frozen:
                agent.signal(signal.SIGSTOP)
            try:
                self.lab.run("partition", "h1", "h2")
            finally:
                for agent in frozen:
                    agent.signal(signal.SIGCONT)
            return []
        victims = {"kill-src": [src], "kill-dst": [dst], "kill-both": [src, dst]}[fault]
        if len(victims) == 2 and rng.random() < 0.5:
            victims.reverse()
        for agent in victims:
            agent.kill()
        return victims

    def recover(self, fault, victims, rng, info):
        """After the fault's duration: heal the network, or start the killed agents again
        (same addresses and state)."""
        if fault == "partition":
            hold = rng.uniform(1.0, 4.0)
            info["hold_s"] = round(hold, 2)
            time.sleep(hold)
            self.lab.run("heal")
            return
        down = rng.uniform(0.2, 2.0)
        info["down_s"] = round(down, 2)
        time.sleep(down)
        if len(victims) == 2 and rng.random() < 0.5:
            victims.reverse()
        for agent in victims:
            agent.start()

    def round(self, number, seed):
        rng = random.Random(seed)
        batch = f"r{number}"
        root = os.path.join(self.work, batch)
        shutil.rmtree(root, ignore_errors=True)
        h1, h2 = os.path.join(root, "h1"), os.path.join(root, "h2")
        for d in (h1, h2, os.path.join(h1, "disks")):
            os.makedirs(d, exist_ok=True)
        fault, when = rng.choice(self.faults), rng.choice(self.whens)
        if fault in MOVED_FAULTS:
            return self.round_moved(number, seed, rng, fault, root)
        info = {"round": number, "seed": seed, "fault": fault, "when": when}
        problems = []
        self.vm_names = [f"vm{i + 1}" for i in range(self.disks)]
        images, allocated = {}, 0
        for vm in self.vm_names:
            images[vm] = os.path.join(h1, "disks", f"{vm}.img")
            allocated += self.prefill_disk(images[vm], rng)
        exports = []
        for vm in self.vm_names:
            exports += ["--export", f"{vm}={images[vm]},granularity=64K"]
        src = Agent(self, "h1", h1, exports)
        dst = Agent(self, "h2", h2, [f"--tcp={self.lab.ip('h2')}:10809"])
        writers = {}
        migrate = None
        try:
            src.start()
            dst.start()
            self.start_writers(root, src, rng, writers)
            time.sleep(0.5)  # the writers connect and warm up the heat
            per_disk = allocated / len(self.vm_names)
            expected_s = per_disk / env_size(self.bandwidth)
            info["expected_s"] = round(expected_s, 2)
            migrate_out = open(os.path.join(root, "migrate.json"), "w")
            migrate_err = open(os.path.join(root, "migrate.err"), "w")
            migrate = subprocess.Popen(
                self.lab.exec_cmd(
                    "h1", self.ferry, "migrate", *self.vm_names,
                    "--batch", batch,
                    "--to", dst.transfer,
                    "--concurrency", str(len(self.vm_names)),
                    "--bandwidth", self.bandwidth,
                    "--json",
                    "--api", src.api,
                    "--state-dir", src.state,
                ),
                stdout=migrate_out,
                stderr=migrate_err,
            )
            max_pass = self.wait_trigger(when, rng, src, dst, migrate, expected_s, info)
            victims = self.strike(fault, rng, src, dst)
            # Right after the strike: a killed agent's journal is what it left.
            snap = self.snapshot(src, dst)
            info["at_fault"] = snap
            info["actual"] = self.classify(snap, max_pass)
            info["max_pass"] = max_pass
            # `ferry status` during the fault too (`--offline` reads the source's journal when
            # its agent is down; the destination is unreachable or down), judged the same way.
            during = {}
            dst_journal = os.path.join(dst.state, "journal")
            src_journal = os.path.join(src.state, "journal")

            def status_during():
                during["truth"] = (journal_jobs(dst_journal), journal_jobs(src_journal))
                during["view"], during["out"] = self.status("h1", src, batch)
                during["truth_after"] = (journal_jobs(dst_journal), journal_jobs(src_journal))

            asking = threading.Thread(target=status_during, daemon=True)
            asking.start()
            self.recover(fault, victims, rng, info)
            asking.join(timeout=60)
            if "view" in during:
                (t_before, s_before), (t_after, s_after) = during["truth"], during["truth_after"]
                info["during"], info["during_correct"], during_notes = self.judge(
                    during["view"], during["out"], t_before, t_after, problems,
                    (s_before, s_after), when="during the fault",
                )
                info["during_states"] = {
                    vm: f"{s_after.get(vm, {}).get('phase', 'no-job')}/"
                    + ("unreachable" if (during["view"] or {}).get(vm, {}).get("peer_unreachable")
                       else t_after.get(vm, {}).get("phase", "no-job"))
                    for vm in self.vm_names
                }
            else:
                problems.append("ferry status during the fault did not end within 60 s")
                during_notes = []
            try:
                migrate.wait(timeout=self.migrate_timeout)
            except subprocess.TimeoutExpired:
                problems.append(
                    f"ferry migrate did not end {self.migrate_timeout:.0f} s after the fault "
                    f"(journals {self.snapshot(src, dst)})"
                )
                migrate.kill()
                migrate.wait()
            info["migrate_rc"] = migrate.returncode
            for agent in (src, dst):
                if not agent.alive():
                    problems.append(
                        f"agent {agent.host} exited by itself ({agent.proc.returncode if agent.proc else '?'}):\n"
                        + agent.log_tail()
                    )
                    if agent.proc is not None:
                        agent.exits.append(("died", agent.proc.wait()))
                        agent.proc = None
                    agent.start()

            # ---- verdicts after the fault, against the destination's journal
            truth_before, src_before = journal_jobs(dst_journal), journal_jobs(src_journal)
            view, out = self.status("h1", src, batch)
            truth_after, src_after = journal_jobs(dst_journal), journal_jobs(src_journal)
            info["verdicts"], correct, notes = self.judge(
                view, out, truth_before, truth_after, problems, (src_before, src_after)
            )
            notes += [f"during the fault: {n}" for n in during_notes]
            info["states"] = {
                vm: f"{src_after.get(vm, {}).get('phase', 'no-job')}/{truth_after.get(vm, {}).get('phase', 'no-job')}"
                for vm in self.vm_names
            }
            info["correct"] = correct
            # The destination's own `ferry status BATCH` (its journal names the batch too).
            dst_view, _ = self.status("h2", dst, batch)
            # The destination serves exactly the disks its journal says it committed.
            for attempt in range(4):
                exports = dst.api_get("/v1/exports")
                served = {e.get("name") for e in (exports or [])}
                truth = journal_jobs(dst_journal)
                mismatch = [
                    f"{vm}: destination journal says {truth.get(vm, {}).get('phase')}, "
                    f"served={vm in served}"
                    for vm in self.vm_names
                    if (truth.get(vm, {}).get("phase") == "committed") != (vm in served)
                ]
                if exports is not None and not mismatch:
                    break
                time.sleep(0.5)
            else:
                problems.append(f"destination serving vs journal: {mismatch or 'API not answering'}")
                dst_phase = (dst_view or {}).get(vm, {}).get("phase")
                journal_phase = truth_after.get(vm, {}).get("phase")
                if dst_view is not None and dst_phase != journal_phase:
                    notes.append(f"{vm}: destination `ferry status` phase {dst_phase} != journal {journal_phase}")
            info["notes"] = notes

            # ---- settle in-doubt jobs, then resume until every disk is migrated
            self.settle(src, problems)
            resend = []
            for attempt in range(3):
                jobs = journal_jobs(os.path.join(src.state, "journal"))
                if all(jobs.get(vm, {}).get("phase") == "switched" for vm in self.vm_names):
                    break
                missing = [vm for vm in self.vm_names if vm not in jobs]
                if missing:
                    out = self.ferry_cli(
                        "h1", src, "migrate", *missing, "--batch", batch, "--to", dst.transfer,
                        "--concurrency", str(len(missing)), "--json",
                    )
                    notes.append(f"migrated {missing} anew (no job in the source journal)")
                out = self.ferry_cli("h1", src, "resume", batch, "--json",
                                     "--concurrency", str(len(self.vm_names)))
                statuses = []
                try:
                    statuses = json.loads(out.stdout)
                except ValueError:
                    if "nothing to resume" not in out.stdout:
                        problems.append(f"ferry resume: {out.stdout.strip()} {out.stderr.strip()[-300:]}")
                for status in statuses:
                    report = status.get("report")
                    if status.get("phase") == "done" and report:
                        sent = report["bytes_data"] + report["bytes_zero"]
                        allocated = max(1, report["allocated_bytes"])
                        had = (view or {}).get(status.get("export"), {}).get("destination_bytes")
                        job = {
                            "export": status.get("export"),
                            "sent": sent,
                            "allocated": allocated,
                            "disk": report["disk_bytes"],
                            "destination_had": had,
                            "fraction": round(sent / allocated, 4),
                        }
                        if had is not None:
                            # Sent again: beyond what the destination lacked by its last
                            # durable checkpoint before the resume.
                            job["again"] = round(max(0, sent - (allocated - had)) / allocated, 4)
                        resend.append(job)
                    elif status.get("phase") != "done":
                        notes.append(f"resume attempt {attempt + 1}: {status.get('export')} "
                                     f"{status.get('phase')}: {status.get('error')}")
                self.settle(src, problems)
            info["resend"] = resend

            # ---- final verdicts: every disk migrated
            final_truth = journal_jobs(dst_journal)
            final_view, out = self.status("h1", src, batch)
            final, final_correct, _ = self.judge(final_view, out, final_truth, journal_jobs(dst_journal), problems)
            info["final"] = final
            info["final_correct"] = final_correct
            not_migrated = [vm for vm in self.vm_names if final_truth.get(vm, {}).get("phase") != "committed"]
            if not_migrated:
                problems.append(f"not migrated after resume: {not_migrated}")
        except Exception as err:  # a harness failure is a failed round, not a crash
            problems.append(f"harness: {type(err).__name__}: {err}")
        finally:
            for proc in writers.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for vm, proc in writers.items():
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    problems.append(f"writer {vm} stuck (a write never completed); killed")
                    proc.kill()
                    proc.wait()
            if migrate is not None and migrate.poll() is None:
                migrate.kill()
                migrate.wait()
            for agent in (src, dst):
                if agent.proc is not None and not agent.stop():
                    problems.append(f"agent {agent.host} did not stop cleanly on SIGTERM")
            self.lab.run("heal", check=False)

        # ---- no acknowledged write lost: the authoritative image holds each one
        truth = journal_jobs(os.path.join(dst.state, "journal"))
        lost_total, acked_total, phantom_total, lost_detail = 0, 0, 0, []
        for i, vm in enumerate(self.vm_names):
            ledger = os.path.join(root, f"{vm}.ledger")
            if not os.path.exists(ledger):
                continue
            entry = truth.get(vm, {})
            image = entry["image"] if entry.get("phase") == "committed" else images[vm]
            try:
                lost, _, acked, phantoms = check_image(image, ledger, i + 1)
            except OSError as err:
                problems.append(f"{vm}: cannot check {image}: {err}")
                continue
            lost_total += len(lost)
            acked_total += acked
            phantom_total += len(phantoms)
            lost_detail += [f"{vm} ({'destination' if image != images[vm] else 'source'} image): {x}" for x in lost[:5]]
            lost_detail += [f"{vm}: phantom {x}" for x in phantoms[:3]]
        info["lost"], info["acked"], info["phantoms"] = lost_total, acked_total, phantom_total
        info["problems"] = problems
        ok = (
            info.get("correct", 0) == len(self.vm_names)
            and info.get("during_correct", 0) == len(self.vm_names)
            and lost_total == 0
            and phantom_total == 0
            and not problems
        )
        info["ok"] = ok
        self.account(info, lost_detail)
        if ok and self.keep != "all" or self.keep == "none":
            shutil.rmtree(root, ignore_errors=True)
        return ok

    # ------------------------------------------------- faults after the switchover --

    def round_moved(self, number, seed, rng, fault, root):
        """A round of one of MOVED_FAULTS. The batch moves h1 -> h2 undisturbed and the
        guests keep writing through h1, which forwards to h2 on their one connection each.
        Then either (restart-dst-after-switch) h2 restarts twice, SIGTERM + start at once and
        kill -9 + 2 s down + start, in an order drawn from the seed; or (chain-kill-middle)
        the batch moves on h2 -> h3 (`ferry migrate` at h2), whose jobs end only once h1
        re-pointed its forwarding to h3, and h2 is killed with kill -9 and stays down.
        Checked: no guest request failed and no guest connected twice; `ferry status BATCH`
        at h1 while h2 is down and at the end, against h2's journal (its target jobs); h1's
        `ferry export ls` forwards to the agent holding the disk; the longest guest stall
        (one write's time) per window; every acknowledged write in the image of the agent
        that committed last."""
        batch = f"r{number}"
        chain = fault == "chain-kill-middle"
        info = {"round": number, "seed": seed, "fault": fault, "when": "after-switch"}
        problems, notes = [], []
        self.vm_names = [f"vm{i + 1}" for i in range(self.disks)]
        h1, h2, h3 = (os.path.join(root, h) for h in ("h1", "h2", "h3"))
        if chain:
            os.makedirs(h3, exist_ok=True)
        images = {}
        for vm in self.vm_names:
            images[vm] = os.path.join(h1, "disks", f"{vm}.img")
            self.prefill_disk(images[vm], rng)
        exports = []
        for vm in self.vm_names:
            exports += ["--export", f"{vm}={images[vm]},granularity=64K"]
        src = Agent(self, "h1", h1, exports)
        dst = Agent(self, "h2", h2, [f"--tcp={self.lab.ip('h2')}:10809"])
        third = Agent(self, "h3", h3, [f"--tcp={self.lab.ip('h3')}:10809"]) if chain else None
        agents = [a for a in (src, dst, third) if a is not None]
        # Where the disk went, in order: its authority is the last one that committed.
        hops = [dst, third] if chain else [dst]
        src_journal = os.path.join(src.state, "journal")
        dst_journal = os.path.join(dst.state, "journal")
        writers = {}
        windows = []  # (name, wall-clock start) of the stall windows, in order
        try:
            for agent in agents:
                agent.start()
            self.start_writers(root, src, rng, writers)
            time.sleep(0.5)  # the writers connect and warm up the heat
            self.move_batch("h1", src, batch, dst, root, "migrate", info, problems, notes)
            snap = self.snapshot(src, dst)
            info["at_fault"] = snap
            info["actual"] = (
                "after-switch" if all(v == "switched/committed" for v in snap.values()) else "not-switched"
            )
            if info["actual"] != "after-switch":
                problems.append(f"the batch did not switch over: journals {snap}")
                raise RoundAborted
            self.check_forwarding(src, dst, problems, "after h1 -> h2")
            time.sleep(rng.uniform(0.3, 1.0))
            if chain:
                self.chain_kill_middle(rng, src, dst, third, batch, root, info, windows, problems, notes)
            else:
                self.restart_dst(rng, src, dst, batch, info, windows, problems)
            for agent in (src, third or dst):
                if not agent.alive():
                    problems.append(
                        f"agent {agent.host} exited by itself "
                        f"({agent.proc.returncode if agent.proc else '?'}):\n" + agent.log_tail()
                    )
        except RoundAborted:
            pass
        except Exception as err:  # a harness failure is a failed round, not a crash
            problems.append(f"harness: {type(err).__name__}: {err}")
        finally:
            for proc in writers.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for vm, proc in writers.items():
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    problems.append(f"writer {vm} stuck (a write never completed); killed")
                    proc.kill()
                    proc.wait()
            for agent in agents:
                if agent.proc is not None and not agent.stop():
                    problems.append(f"agent {agent.host} did not stop cleanly on SIGTERM")
            self.lab.run("heal", check=False)

        # ---- the guests: no failed request, one connection each, their stalls
        failures, reconnects, writes = 0, 0, []
        lost_total, acked_total, phantom_total, lost_detail = 0, 0, 0, []
        info["authority"] = {}
        for i, vm in enumerate(self.vm_names):
            ledger = os.path.join(root, f"{vm}.ledger")
            if not os.path.exists(ledger):
                continue
            failed, connects, acked_writes = ledger_guest(ledger)
            failures += len(failed)
            reconnects += max(0, connects - 1)
            writes += acked_writes
            for line in failed[:3]:
                problems.append(f"{vm}: a guest request failed: {line}")
            if connects != 1:
                problems.append(f"{vm}: the guest connected {connects} times (one connection expected)")
            # ---- no acknowledged write lost: the image of whoever committed last
            image, holder = images[vm], "h1"
            for agent in hops:
                entry = journal_jobs(os.path.join(agent.state, "journal"), role="target").get(vm, {})
                if entry.get("phase") == "committed":
                    image, holder = entry["image"], agent.host
            info["authority"][vm] = holder
            if holder != hops[-1].host:
                problems.append(f"{vm}: the last committed copy is at {holder}, not {hops[-1].host}")
            try:
                lost, _, acked, phantoms = check_image(image, ledger, i + 1)
            except OSError as err:
                problems.append(f"{vm}: cannot check {image}: {err}")
                continue
            lost_total += len(lost)
            acked_total += acked
            phantom_total += len(phantoms)
            lost_detail += [f"{vm} ({holder}'s image): {x}" for x in lost[:5]]
            lost_detail += [f"{vm}: phantom {x}" for x in phantoms[:3]]
        info["guest_failures"], info["guest_reconnects"] = failures, reconnects
        if windows:
            first = windows[0][1]
            info["stalls"] = {"before": round(longest_stall(writes, 0.0, first), 3)}
            for n, (name, start) in enumerate(windows):
                end = windows[n + 1][1] if n + 1 < len(windows) else None
                info["stalls"][name] = round(longest_stall(writes, start, end), 3)
            info["stall_s"] = round(longest_stall(writes, first), 3)
        info["lost"], info["acked"], info["phantoms"] = lost_total, acked_total, phantom_total
        info["notes"] = notes + info.pop("notes_status", [])
        info["problems"] = problems
        n = len(self.vm_names)
        info["ok"] = (
            info.get("correct", 0) == n
            and info.get("during_correct", 0) == n
            and lost_total == 0
            and phantom_total == 0
            and not problems
        )
        self.account(info, lost_detail)
        if info["ok"] and self.keep != "all" or self.keep == "none":
            shutil.rmtree(root, ignore_errors=True)
        return info["ok"]

    def restart_dst(self, rng, src, dst, batch, info, windows, problems):
        """restart-dst-after-switch: h2 (holding the disks h1 forwards to) restarts twice."""
        order = ["term", "kill"]
        if rng.random() < 0.5:
            order.reverse()
        info["restarts"] = []
        for kind in order:
            time.sleep(rng.uniform(0.5, 1.5))  # guests write through h1 to h2
            began = time.time()
            windows.append((kind, began))
            if kind == "term":
                if not dst.stop():
                    problems.append("h2 did not stop cleanly on SIGTERM within 15 s (killed)")
                down_since = time.time()
                info["term_stop_s"] = round(down_since - began, 2)
            else:
                dst.kill()
                down_since = time.time()
                # `ferry status` at h1 while h2 is down (it cannot be asked).
                self.judged_status(src, dst, batch, info, problems, during=True)
                time.sleep(max(0.0, down_since + 2.0 - time.time()))
            dst.start()
            info["restarts"].append((kind, round(time.time() - down_since, 2)))
        time.sleep(rng.uniform(1.0, 2.0))  # guests write through the restarted h2
        self.judged_status(src, dst, batch, info, problems, during=False)
        self.check_forwarding(src, dst, problems, "after the restarts")
        self.check_serving(dst, problems)

    def chain_kill_middle(self, rng, src, dst, third, batch, root, info, windows, problems, notes):
        """chain-kill-middle: the batch moves on h2 -> h3, then h2 is killed for good."""
        onward = f"{batch}c"
        windows.append(("move", time.time()))
        statuses = self.move_batch("h2", dst, onward, third, root, "migrate-onward", info, problems, notes)
        info["holders"] = {st.get("export"): st.get("holder") for st in statuses}
        for st in statuses:
            if not str(st.get("holder") or "").endswith("re-pointed"):
                problems.append(f"{st.get('export')}: h2's job done with holder {st.get('holder')!r} "
                                f"(expected '... re-pointed')")
        self.check_forwarding(src, third, problems, "after h2 -> h3")
        self.check_serving(third, problems)
        # h2's own `ferry status` of the onward batch, against h3's journal.
        third_truth = journal_jobs(os.path.join(third.state, "journal"), role="target")
        view, out = self.status("h2", dst, onward)
        middle_sources = journal_jobs(os.path.join(dst.state, "journal"), role="source")
        info["middle"], middle_correct, middle_notes = self.judge(
            view, out, third_truth, third_truth, problems, (middle_sources, middle_sources),
            when="at h2, of the onward batch",
        )
        notes += [f"at h2: {n}" for n in middle_notes]
        if middle_correct != len(self.vm_names) or set(info["middle"].values()) != {"migrated"}:
            problems.append(f"h2's status of batch {onward}: {info['middle']} (all migrated expected)")
        time.sleep(rng.uniform(0.2, 1.0))
        windows.append(("kill", time.time()))
        dst.kill()
        phases = [
            journal_jobs(os.path.join(src.state, "journal")),
            journal_jobs(os.path.join(dst.state, "journal"), role="target"),
            journal_jobs(os.path.join(dst.state, "journal"), role="source"),
            journal_jobs(os.path.join(third.state, "journal"), role="target"),
        ]
        # h1's job / h2 received, h2's job / h3 received
        info["at_fault"] = {
            vm: "{}/{}+{}/{}".format(*(p.get(vm, {}).get("phase", "-") for p in phases))
            for vm in self.vm_names
        }
        self.judged_status(src, dst, batch, info, problems, during=True)
        hold = rng.uniform(2.0, 4.0)
        info["down_s"] = round(hold, 2)
        time.sleep(hold)  # guests write through h1 straight to h3, h2 down
        self.judged_status(src, dst, batch, info, problems, during=False)
        self.check_forwarding(src, third, problems, "with h2 down")

    def judged_status(self, src, dst, batch, info, problems, during):
        """`ferry status BATCH` at h1 judged against h2's journal (its target jobs: the
        disks h1 moved there); into info's during* or verdicts/correct (no resume follows
        these faults, so the final verdicts are the same)."""
        dst_journal = os.path.join(dst.state, "journal")
        src_journal = os.path.join(src.state, "journal")
        before, s_before = journal_jobs(dst_journal, role="target"), journal_jobs(src_journal)
        view, out = self.status("h1", src, batch)
        after, s_after = journal_jobs(dst_journal, role="target"), journal_jobs(src_journal)
        verdicts, correct, notes = self.judge(
            view, out, before, after, problems, (s_before, s_after),
            when="during the fault" if during else "after recovery",
        )
        states = {
            vm: f"{s_after.get(vm, {}).get('phase', 'no-job')}/"
            + ("unreachable" if (view or {}).get(vm, {}).get("peer_unreachable")
               else after.get(vm, {}).get("phase", "no-job"))
            for vm in self.vm_names
        }
        if during:
            info["during"], info["during_correct"], info["during_states"] = verdicts, correct, states
        else:
            info["verdicts"], info["correct"], info["states"] = verdicts, correct, states
            info["final"], info["final_correct"] = verdicts, correct
        info.setdefault("notes_status", []).extend(
            f"{'during' if during else 'after'}: {n}" for n in notes
            if "could not reach" not in n  # expected: h2 is down
        )

    def check_forwarding(self, src, holder, problems, when):
        """h1's `ferry export ls --json` forwards every disk to `holder`'s NBD address."""
        want = f"{holder.ip}:10809"
        out = self.ferry_cli("h1", src, "export", "ls", "--json")
        try:
            listed = {e["name"]: (e.get("forwarding") or {}).get("to") for e in json.loads(out.stdout)}
        except (ValueError, KeyError, TypeError):
            problems.append(f"ferry export ls at h1 ({when}) gave no JSON: {out.stdout[-300:]} {out.stderr[-300:]}")
            return
        wrong = {vm: listed.get(vm) for vm in self.vm_names if listed.get(vm) != want}
        if wrong:
            problems.append(f"h1 forwards ({when}) {wrong}, expected {want}")

    def check_serving(self, agent, problems):
        """`agent` serves every disk of the batch (what its journal says it committed)."""
        for _ in range(10):
            served = {e.get("name") for e in (agent.api_get("/v1/exports") or [])}
            if all(vm in served for vm in self.vm_names):
                return
            time.sleep(0.5)
        problems.append(f"{agent.host} serves {sorted(served)}, not every disk of the batch")

    def move_batch(self, host, agent, batch, to, root, name, info, problems, notes):
        """`ferry migrate` of every disk from `agent` (in `host`) to `to` as `batch`, until
        each job is done: a job that gave up on its pause budget ("the source stays
        authoritative", a loaded machine) is resumed, at most 3 times. Returns the jobs'
        final statuses; anything else aborts the round."""
        what = f"ferry migrate {host} -> {to.host}"

        def statuses_of(out, step):
            self.save_output(root, step, out)
            try:
                return json.loads(out.stdout)
            except ValueError:
                problems.append(f"{what}: no JSON (exit {out.returncode}): {out.stdout[-300:]} {out.stderr[-300:]}")
                raise RoundAborted

        out = self.ferry_cli(
            host, agent, "migrate", *self.vm_names, "--batch", batch, "--to", to.transfer,
            "--concurrency", str(len(self.vm_names)), "--bandwidth", self.bandwidth, "--json",
            timeout=self.migrate_timeout,
        )
        statuses = statuses_of(out, name)
        for attempt in range(1, 4):
            undone = [st for st in statuses if st.get("phase") != "done"]
            if not undone:
                break
            if not all("the source stays authoritative" in (st.get("error") or "") for st in undone):
                break
            notes.append(f"{what}: resumed " + ", ".join(
                f"{st.get('export')} ({st.get('error')})" for st in undone))
            info["resumed"] = info.get("resumed", 0) + len(undone)
            out = self.ferry_cli(
                host, agent, "resume", batch, "--json", "--concurrency", str(len(self.vm_names)),
                timeout=self.migrate_timeout,
            )
            resumed = statuses_of(out, f"{name}-resume{attempt}")
            statuses = [st for st in statuses if st.get("phase") == "done"] + resumed
        undone = [
            f"{st.get('export')} {st.get('phase')}: {st.get('error')}"
            for st in statuses
            if st.get("phase") != "done"
        ]
        if undone or sorted(st.get("export") for st in statuses) != sorted(self.vm_names):
            problems.append(f"{what}: not every job done: {undone or statuses}")
            raise RoundAborted
        return statuses

    @staticmethod
    def save_output(root, name, out):
        with open(os.path.join(root, f"{name}.json"), "w") as f:
            f.write(out.stdout)
        with open(os.path.join(root, f"{name}.err"), "w") as f:
            f.write(out.stderr)

    def judge(self, view, out, truth_before, truth_after, problems, sources=({}, {}), when="after recovery"):
        """Verdicts per disk and how many are right. Ground truth: the destination's
        journal. Committed there -> `migrated` is the only right verdict (during the fault,
        `needs-attention` too when the status could not reach the destination); not
        committed -> anything but `migrated`. Also compared (a note, counted apart) with the verdict
        docs/commit-protocol.md gives for the pair of journal states."""
        verdicts, correct, notes = {}, 0, []
        self.table_checked = getattr(self, "table_checked", 0)
        self.table_mismatch = getattr(self, "table_mismatch", 0)
        if view is None:
            problems.append(f"ferry status ({when}) gave no JSON: {out.stdout[-300:]} {out.stderr[-300:]}")
            return verdicts, 0, notes
        for vm in self.vm_names:
            line = view.get(vm)
            before = truth_before.get(vm, {}).get("phase")
            after = truth_after.get(vm, {}).get("phase")
            if line is None:
                verdicts[vm] = "no-line"
                right = before != "committed" and after != "committed"
                if right:
                    notes.append(f"{vm}: no status line (the source journal has no job)")
            else:
                verdict = line["verdict"]
                verdicts[vm] = verdict
                if verdict == "migrated":
                    right = after == "committed"
                elif verdict == "needs-attention" and line.get("peer_unreachable") and when != "after recovery":
                    # During the fault the destination may be down or cut off: a source that
                    # cannot reach it must not guess (docs/commit-protocol.md), whatever the
                    # destination's journal holds.
                    right = True
                else:
                    right = before != "committed"
                expected = {
                    table_verdict(
                        src.get(vm, {}).get("phase", "no-job"),
                        dst.get(vm, {}).get("phase", "no-job") if not line.get("peer_unreachable") else "unreachable",
                    )
                    for src in sources
                    for dst in (truth_before, truth_after)
                }
                if sources[0] or sources[1]:
                    self.table_checked += 1
                    if verdict not in expected:
                        self.table_mismatch += 1
                        notes.append(f"{vm}: verdict {verdict}, the protocol's table says {sorted(expected)}")
                if line.get("peer_unreachable"):
                    notes.append(f"{vm}: status could not reach the destination: {line['peer_unreachable']}")
                if verdict == "needs-attention":
                    notes.append(f"{vm}: needs-attention ({line.get('phase')}/{line.get('peer_state')}): {line.get('reason')}")
            if right:
                correct += 1
            else:
                problems.append(
                    f"WRONG VERDICT ({when}) {vm}: {verdicts[vm]} but the destination journal says "
                    f"{before} (before status) / {after} (after); line: {json.dumps(line)}"
                )
        return verdicts, correct, notes

    def settle(self, src, problems, timeout=30):
        """Waits until no source job is in doubt (the restarted source asks the destination)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = journal_jobs(os.path.join(src.state, "journal"))
            if not any(j.get("phase") == "switching-over" for j in jobs.values()):
                return
            time.sleep(0.1)
        problems.append(f"a source job stayed switching-over for {timeout} s: {jobs}")

    def account(self, info, lost_detail):
        t = self.totals
        n = len(self.vm_names)
        t["rounds"] += 1
        t["verdicts"] += n
        t["correct"] += info.get("correct", 0)
        t["final_verdicts"] += n
        t["final_correct"] += info.get("final_correct", 0)
        t["during_verdicts"] = t.get("during_verdicts", 0) + n
        t["during_correct"] = t.get("during_correct", 0) + info.get("during_correct", 0)
        for vm in self.vm_names:
            t.setdefault("at_fault", []).append((info.get("at_fault") or {}).get(vm, "?"))
            t.setdefault("during_pairs", []).append(
                ((info.get("during_states") or {}).get(vm, "?"), (info.get("during") or {}).get(vm, "?")))
        t["lost"] += info["lost"]
        t["acked"] += info["acked"]
        t["phantoms"] += info["phantoms"]
        t["problems"] += len(info["problems"])
        t["actual"][f"{info['when']}->{info.get('actual', '?')}"] = (
            t["actual"].get(f"{info['when']}->{info.get('actual', '?')}", 0) + 1
        )
        for vm, v in (info.get("verdicts") or {}).items():
            t["verdict_kinds"][v] = t["verdict_kinds"].get(v, 0) + 1
            t.setdefault("pairs", []).append(((info.get("states") or {}).get(vm, "?"), v))
        t["resend"] += [dict(job, fault=info["fault"]) for job in info.get("resend", [])]
        if not info["ok"]:
            t["failed_rounds"].append((info["round"], info["seed"]))
        resend = info.get("resend") or []
        verdicts = ",".join((info.get("verdicts") or {}).get(vm, "?") for vm in self.vm_names)
        timing = " ".join(
            f"{k}={info[k]}" for k in ("delay_s", "extra_s", "at_s", "down_s", "hold_s") if k in info
        )
        if info["fault"] in MOVED_FAULTS:
            # No resume after these; the guests' stalls and failures instead.
            if "restarts" in info:
                timing = " ".join(f"{k} down {v}s" for k, v in info["restarts"])
                if "term_stop_s" in info:
                    timing += f" term_stop_s={info['term_stop_s']}"
            stalls = info.get("stalls") or {}
            after = (
                f"stall={info['stall_s']:.2f}s "
                if "stall_s" in info else "stall=? "
            ) + "(" + " ".join(f"{k} {v:.2f}" for k, v in stalls.items()) + ") "
            after += (f"failed={info.get('guest_failures', '?')} "
                      f"reconnects={info.get('guest_reconnects', '?')} ")
            if info.get("resumed"):
                after += f"resumed={info['resumed']} "
            t["moves_resumed"] = t.get("moves_resumed", 0) + info.get("resumed", 0)
            if "stall_s" in info:
                t.setdefault("stalls", []).append((info["fault"], info["stall_s"], stalls))
            t["guest_failures"] = t.get("guest_failures", 0) + info.get("guest_failures", 0)
            t["guest_reconnects"] = t.get("guest_reconnects", 0) + info.get("guest_reconnects", 0)
        else:
            after = f"resend={mean_of(resend, 'fraction')} again={mean_of(resend, 'again')} "
        print(
            f"round {info['round']:>3} seed={info['seed']} fault={info['fault']:<9} "
            f"when={info['when']}->{info.get('actual', '?')} ({timing}) "
            f"verdicts={verdicts} correct={info.get('correct', 0)}/{n} "
            f"during={','.join((info.get('during') or {}).get(vm, '?') for vm in self.vm_names)} "
            f"({info.get('during_correct', 0)}/{n}) "
            f"lost={info['lost']}/{info['acked']} "
            f"{after}"
            f"{'ok' if info['ok'] else 'FAIL'}",
            flush=True,
        )
        if not info["ok"] or os.environ.get("VERBOSE"):
            print(f"    at fault: {info.get('at_fault')}  final: {info.get('final')}")
            print(f"    jobs seen (s, export, phase, pass): {info.get('timeline')}")
            for note in info.get("notes", []):
                print(f"    note: {note}")
        for problem in info["problems"]:
            print("    PROBLEM: " + problem.replace("\n", "\n      "))
        for line in lost_detail:
            print("    LOST: " + line)
        if not info["ok"]:
            print(f"    kept: {os.path.join(self.work, 'r' + str(info['round']))}")
        self.results.write(json.dumps(info) + "\n")
        self.results.flush()

    def run(self):
        with open(self.key, "w") as f:
            f.write(hashlib.sha256(str(self.seed).encode()).hexdigest() + "\n")
        os.chmod(self.key, 0o600)
        if not os.path.exists(os.path.join(self.tls, "ca-cert.pem")):
            hosts = [arg for h in ("h1", "h2", "h3") for arg in ("--host", self.lab.ip(h))]
            subprocess.run([self.ferry, "tls", "init", self.tls, *hosts], check=True,
                           stdout=subprocess.DEVNULL)
        print(f"fault-soak: SEED={self.seed} ROUNDS={self.rounds} DISK_SIZE={self.disk_size >> 20}M "
              f"BANDWIDTH={self.bandwidth} WRITE_RATE={self.rate:g}/s per disk SLOW_SYNC_MS={self.slow_sync_ms:g} "
              f"FAULTS={','.join(self.faults)} WHENS={','.join(self.whens)}; work dir {self.work}",
              flush=True)
        master = random.Random(self.seed)
        first = int(os.environ.get("FIRST_ROUND", "1"))
        seeds = [master.randrange(1 << 48) for _ in range(first + self.rounds - 1)][first - 1:]
        if os.environ.get("ROUND_SEED"):
            seeds = [int(os.environ["ROUND_SEED"])] * self.rounds
        started = time.monotonic()
        for n, seed in enumerate(seeds, start=first):
            self.round(n, seed)
        t = self.totals
        resend = t["resend"]
        print(f"\n{t['rounds']} rounds, {t['correct']} correct verdicts, {t['lost']} lost writes")
        print(f"  verdicts after the fault: {t['correct']} of {t['verdicts']} right "
              f"({', '.join(f'{k} {v}' for k, v in sorted(t['verdict_kinds'].items()))}); "
              f"after resume: {t['final_correct']} of {t['final_verdicts']} right")
        print(f"  verdicts during the fault (agent down or network cut): {t.get('during_correct', 0)} of "
              f"{t.get('during_verdicts', 0)} right")
        print(f"  acknowledged writes checked: {t['acked']}; lost {t['lost']}; phantom blocks {t['phantoms']}")
        if t.get("stalls"):
            print(f"  faults after the switchover: guest requests failed {t.get('guest_failures', 0)}, "
                  f"guests reconnected {t.get('guest_reconnects', 0)}; jobs resumed before the fault "
                  f"(they gave up on the pause budget) {t.get('moves_resumed', 0)}")
            for fault in MOVED_FAULTS:
                rounds = [(stall, parts) for f, stall, parts in t["stalls"] if f == fault]
                if not rounds:
                    continue
                per_round = [stall for stall, _ in rounds]
                kinds = {}
                for _, parts in rounds:
                    for kind, stall in parts.items():
                        kinds.setdefault(kind, []).append(stall)
                print(f"  longest guest stall per round, {fault} ({len(rounds)} rounds): "
                      f"max {max(per_round):.2f} s, median {statistics.median(per_round):.2f} s ("
                      + ", ".join(f"{k} max {max(v):.2f} median {statistics.median(v):.2f}"
                                  for k, v in kinds.items()) + ")")
        print(f"  verdicts against the table of docs/commit-protocol.md: "
              f"{getattr(self, 'table_checked', 0) - getattr(self, 'table_mismatch', 0)} of "
              f"{getattr(self, 'table_checked', 0)} match")
        pairs = {}
        for state, verdict in t.get("pairs", []):
            pairs[(state, verdict)] = pairs.get((state, verdict), 0) + 1
        print("  journal states (source/destination) and verdicts after recovery: " + ", ".join(
            f"{st} -> {v} x{n}" for (st, v), n in sorted(pairs.items())))
        during = {}
        for pair in t.get("during_pairs", []):
            during[pair] = during.get(pair, 0) + 1
        print("  ... and during the fault: " + ", ".join(
            f"{st} -> {v} x{n}" for (st, v), n in sorted(during.items())))
        at_fault = {}
        for state in t.get("at_fault", []):
            at_fault[state] = at_fault.get(state, 0) + 1
        print("  disks' journal states at the moment of the fault: " + ", ".join(
            f"{st} x{n}" for st, n in sorted(at_fault.items())))
        if resend:
            by_fault = {}
            for job in resend:
                by_fault.setdefault(job["fault"], []).append(job)
            print(f"  resume sent {mean_of(resend, 'fraction')} of the allocated disk per resumed job "
                  f"({len(resend)} jobs; " + ", ".join(
                      f"{f} {mean_of(v, 'fraction')} over {len(v)}" for f, v in sorted(by_fault.items())) + ")")
            print(f"  of which sent again (the destination had it by its last checkpoint): "
                  f"{mean_of(resend, 'again')} of the allocated disk, "
                  f"{mean_of([dict(j, a=j['again'] * j['allocated'] / j['disk']) for j in resend if 'again' in j], 'a')} "
                  f"of the whole disk (" + ", ".join(
                      f"{f} {mean_of(v, 'again')}" for f, v in sorted(by_fault.items())) + ")")
        print("  fault moments (chosen->observed): " + ", ".join(
            f"{k} {v}" for k, v in sorted(t["actual"].items())))
        print(f"  other problems: {t['problems']}; failed rounds: "
              + (" ".join(f"r{r}(seed {s})" for r, s in t["failed_rounds"]) or "none"))
        print(f"  {time.monotonic() - started:.0f} s; per round: {self.work}/rounds.jsonl")
        return 0 if not t["failed_rounds"] else 1


# ---------------------------------------------------------------------------- main --


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--ferry", required=True)
    run.add_argument("--netlab", required=True)
    run.add_argument("--work", required=True)
    w = sub.add_parser("writer")
    w.add_argument("--uri", required=True)
    w.add_argument("--disk", type=int, required=True)
    w.add_argument("--size", type=int, required=True)
    w.add_argument("--ledger", required=True)
    w.add_argument("--rate", type=float, default=100)
    w.add_argument("--hot-offset", type=int, default=0)
    w.add_argument("--hot-bytes", type=int, default=512 * 1024)
    w.add_argument("--hot-fraction", type=float, default=0.9)
    w.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check")
    c.add_argument("image")
    c.add_argument("ledger")
    c.add_argument("--disk", type=int, required=True)
    j = sub.add_parser("journal")
    j.add_argument("path")
    args = parser.parse_args()
    if args.cmd == "run":
        sys.exit(Soak(args).run())
    if args.cmd == "writer":
        writer_main(args)
    elif args.cmd == "check":
        lost, checked, acked, phantoms = check_image(args.image, args.ledger, args.disk)
        for line in lost + [f"phantom {p}" for p in phantoms]:
            print(line)
        print(f"{checked} blocks checked, {acked} acknowledged writes, {len(lost)} lost, {len(phantoms)} phantoms")
        sys.exit(1 if lost or phantoms else 0)
    elif args.cmd == "journal":
        for seq, kind, job, fields in read_journal(args.path):
            print(seq, kind, job, json.dumps(fields) if fields else "")


if __name__ == "__main__":
    main()
