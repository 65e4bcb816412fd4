#!/usr/bin/env python3
"""The kill -9 failover of a `ferry manager` pair, measured RUNS times (scripts/bench-failover).

Three agents and two managers on loopback (plain HTTP, which ferry allows on loopback only),
sharing one fleet token. Each run: wait until the pair is settled (one active, the standby
hears it, both recorded the same witness, no move pending), kill -9 the active, and time
until the standby is active: by its log line `manager role: active (epoch N)` (millisecond
timestamps, the precise figure) and by polling its status every 50 ms (a check on the
first). The kill comes a random 0..1 s after the pair settled, so it falls anywhere between
two renewals. The killed manager is started again (it comes back standby) before the next run.

Only processes this script started are ever signalled, by their pid; all of them are killed
on exit, even on failure or Ctrl-C.
"""

import argparse
import datetime
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

TOKEN = "0123456789abcdef" * 4
LIMIT_S = 5.0  # the goal: lease (4 s) + 1 s


def free_port(taken):
    """A free loopback port below the ephemeral range (as tests/common does)."""
    while True:
        port = random.randrange(20000, 32000)
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port


class Proc:
    """A ferry process with its log file; restartable."""

    def __init__(self, name, argv, log_path):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.popen = None

    def start(self):
        log = open(self.log_path, "ab")
        env = dict(os.environ, RUST_LOG="info")
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
        log.close()

    def kill(self):
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        if self.popen:
            self.popen.wait()
        self.popen = None

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def wait_listening(proc, addr, limit_s=20):
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            sys.exit(f"{proc.name} exited:\n{proc.log()}")
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{proc.name}: nothing listens on {addr} after {limit_s} s:\n{proc.log()}")


def status(addr):
    request = urllib.request.Request(
        f"http://{addr}/v1/manager/status", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=0.5) as reply:
            return json.load(reply)
    except (OSError, ValueError):
        return None


def settled(statuses):
    """The active's index if the pair is settled, else None."""
    if any(s is None for s in statuses):
        return None
    actives = [i for i, s in enumerate(statuses) if s["active"]]
    if len(actives) != 1:
        return None
    act, stb = statuses[actives[0]], statuses[1 - actives[0]]
    heard = lambda ms: ms is not None and ms < 1500  # noqa: E731
    ok = (
        stb["peer"]["active"]
        and heard(stb["peer"]["heard_ms_ago"])
        and heard(act["peer"]["heard_ms_ago"])
        and act["witness"] is not None
        and act["witness"] == stb["witness"]
        and act["pending"] is None
        and stb["pending"] is None
        and act["lease_remaining_ms"] > 2500
    )
    return actives[0] if ok else None


def role_lines(log):
    """(unix seconds, active, epoch) of every `manager role:` line."""
    lines = []
    for line in log.splitlines():
        head, _, message = line.partition("] ")
        if not message.startswith("manager role: ") or not head.startswith("["):
            continue
        stamp = head[1:].split()[0]
        when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
        when = when.replace(tzinfo=datetime.timezone.utc).timestamp()
        role, _, rest = message[len("manager role: ") :].partition(" (epoch ")
        lines.append((when, role == "active", int(rest.split(")")[0])))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ferry", required=True, help="the ferry binary")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="ferry-bench-failover-", dir="/var/tmp")
    token_file = os.path.join(work, "fleet.token")
    with open(token_file, "w") as f:
        f.write(TOKEN)
    taken = set()
    procs = []
    try:
        agents = []
        for i in range(1, 4):
            state = os.path.join(work, f"h{i}", "state")
            os.makedirs(state)
            with open(os.path.join(state, "api.token"), "w") as f:
                f.write(TOKEN)
            api = f"127.0.0.1:{free_port(taken)}"
            argv = [args.ferry, "agent", "--socket", os.path.join(work, f"h{i}", "nbd.sock"),
                    "--state-dir", state, "--api", api,
                    "--transfer", f"127.0.0.1:{free_port(taken)}"]
            agent = Proc(f"h{i}", argv, os.path.join(work, f"h{i}.log"))
            procs.append(agent)
            agent.start()
            wait_listening(agent, api)
            agents.append(f"h{i}={api}")
        listens = [f"127.0.0.1:{free_port(taken)}" for _ in range(2)]
        ids = ["m1", "m2"]
        managers = []
        for i in range(2):
            argv = [args.ferry, "manager", "--id", ids[i], "--listen", listens[i],
                    "--peer", f"{ids[1 - i]}={listens[1 - i]}",
                    "--manager-dir", os.path.join(work, ids[i]), "--token-file", token_file]
            for agent in agents:
                argv += ["--agent", agent]
            manager = Proc(ids[i], argv, os.path.join(work, f"{ids[i]}.log"))
            procs.append(manager)
            managers.append(manager)
            manager.start()
            wait_listening(manager, listens[i])

        results, witnesses, moves = [], [], 0
        for run in range(1, args.runs + 1):
            deadline = time.monotonic() + 30
            while (active := settled([status(a) for a in listens])) is None:
                if time.monotonic() > deadline:
                    sys.exit(f"run {run}: the pair did not settle in 30 s\n"
                             + "\n".join(m.log() for m in managers))
                time.sleep(0.05)
            standby = 1 - active
            # The pair settles when the restarted standby hears the active's heartbeat, which
            # leaves with a renewal: wait a random part of the renewal interval, so the kill
            # falls anywhere between two renewals (failover = lease - that part, + a round trip).
            phase_s = random.random()
            time.sleep(phase_s)
            before = status(listens[active])
            epoch, witness = before["epoch"], before["witness"]
            if witnesses and witnesses[-1] != witness:
                moves += 1
            witnesses.append(witness)
            killed_wall, killed_mono = time.time(), time.monotonic()
            managers[active].kill()
            poll_s = None
            while time.monotonic() - killed_mono < 15:
                s = status(listens[standby])
                if s is not None and s["active"]:
                    poll_s = time.monotonic() - killed_mono
                    break
                time.sleep(0.05)
            if poll_s is None:
                sys.exit(f"run {run}: no failover in 15 s\n{managers[standby].log()}")
            took = [w - killed_wall for (w, act, e) in role_lines(managers[standby].log())
                    if act and e > epoch and w >= killed_wall - 0.01]
            log_s = min(took) if took else poll_s
            results.append(log_s)
            print(f"run {run:2}: {ids[active]} killed at epoch {epoch} ({phase_s * 1000:.0f} ms "
                  f"after settling; witness {witness['host']} g{witness['generation']}), "
                  f"{ids[standby]} active after {log_s * 1000:.0f} ms "
                  f"(poll {poll_s * 1000:.0f} ms)", flush=True)
            managers[active].start()
            wait_listening(managers[active], listens[active])

        ok = sum(1 for r in results if r <= LIMIT_S)
        print(f"failover after kill -9 of the active, {len(results)} runs: "
              f"min {min(results) * 1000:.0f} ms, median {statistics.median(results) * 1000:.0f} ms, "
              f"max {max(results) * 1000:.0f} ms; {ok}/{len(results)} within {LIMIT_S:.0f} s")
        print(f"witness moves between runs (no fault ever touched a witness): {moves}")
        return 0 if ok == len(results) else 1
    finally:
        for proc in procs:
            proc.kill()
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    sys.exit(main())
