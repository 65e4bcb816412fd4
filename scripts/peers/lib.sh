# shellcheck shell=bash disable=SC2034  # (the variables are for the scripts that source it)
# scripts/peers/lib.sh - helpers of ferry's benchmarks (scripts/bench-nbd, scripts/bench-migrate,
# scripts/bench-hop; sourced, not run). Every process a benchmark starts is tracked by its pid
# and stopped by that pid, never by name, so benchmarks can share the machine with other work.
#
#   PY                    /usr/bin/python3 (Debian's: python3-libnbd is installed for it)
#   QEMU_BIN              directory of the QEMU tools (default: the one holding qemu-nbd on
#                         PATH); QEMU_NBD, QEMU_IMG, QSD (qemu-storage-daemon), QEMU_VERSION
#   NCPU, CLK_TCK         CPUs of the machine, clock ticks per second
#   log MSG | die MSG     a timestamped line on stderr | and exit 1
#   track PID | untrack PID | stop_pid PID [SIGNAL] | cleanup_pids
#                         stop_pid sends SIGNAL (TERM), waits up to 10 s, then sends KILL;
#                         cleanup_pids stops every tracked pid (call it from an EXIT trap)
#   cpu_ticks PID         user + system CPU of PID, all its threads, in clock ticks
#   now                   seconds since the epoch, with nanoseconds
#   free_port             a TCP port of 127.0.0.1 nobody listens on
#   wait_nbd URI PID      returns once an NBD server answers at URI (dies after 15 s or when
#                         PID exits first)
#   prefill PATH SIZE     SIZE bytes of incompressible data, different in every block (fio,
#                         O_DIRECT, seed $SEED or 4242), so that every copy is a real copy
#   fio_json FILE         the JSON document in fio's output FILE (fio may print notes first)
#   sys_busy_ticks        busy CPU ticks of the whole machine since boot (/proc/stat)
#   self_tree_ticks       CPU ticks of this shell and of its children it has waited for
#   wait_idle             waits until a 2 s window has the machine under IDLE_BUSY_PCT (10) %
#                         busy, at most WAIT_IDLE_S (60) s; sets IDLE_WAITED and IDLE_BUSY

PY=${PY:-/usr/bin/python3}
QEMU_BIN=${QEMU_BIN:-$(dirname "$(command -v qemu-nbd || echo /usr/bin/qemu-nbd)")}
QEMU_NBD=$QEMU_BIN/qemu-nbd
QEMU_IMG=$QEMU_BIN/qemu-img
QSD=$QEMU_BIN/qemu-storage-daemon
QEMU_VERSION=$("$QEMU_NBD" --version 2>/dev/null | awk 'NR == 1 { print $2 }')
NCPU=$(nproc)
CLK_TCK=$(getconf CLK_TCK)

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }

PIDS=()
track() { PIDS+=("$1"); }
untrack() {
  local pid rest=()
  for pid in "${PIDS[@]}"; do [[ $pid == "$1" ]] || rest+=("$pid"); done
  PIDS=("${rest[@]}")
}
stop_pid() {
  local pid=$1 sig=${2:-TERM} i
  [[ -n $pid ]] || return 0
  if kill "-$sig" "$pid" 2>/dev/null; then
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid still running 10 s after SIG$sig: KILL"
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup_pids() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  PIDS=()
}

# Fields 14 and 15 of /proc/PID/stat: utime and stime, summed over the threads (io_uring
# workers included).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

now() { date +%s.%N; }

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_nbd() {
  local uri=$1 pid=$2 i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || die "the server at $uri (pid $pid) exited"
    nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "no NBD server at $uri after 15 s"
}

prefill() {
  rm -f "$1"
  fio --name=prefill --filename="$1" --size="$2" --rw=write --bs=1M --iodepth=8 --direct=1 \
    --ioengine=io_uring --refill_buffers --randseed="${SEED:-4242}" --output-format=terse \
    >/dev/null || die "could not prefill $1"
}

fio_json() {
  "$PY" -c 'import sys; t = open(sys.argv[1]).read(); print(t[t.index("{"):])' "$1"
}

# user nice system irq softirq steal (idle and iowait left out)
sys_busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
# utime stime cutime cstime of this shell
self_tree_ticks() { awk '{ print $14 + $15 + $16 + $17 }' "/proc/$$/stat"; }

wait_idle() {
  local limit=${WAIT_IDLE_S:-60} max=${IDLE_BUSY_PCT:-10} waited=0 a b busy
  while :; do
    a=$(sys_busy_ticks)
    sleep 2
    b=$(sys_busy_ticks)
    busy=$(((b - a) * 100 / (2 * CLK_TCK * NCPU)))
    if ((busy < max)); then break; fi
    waited=$((waited + 2))
    if ((waited >= limit)); then
      log "the machine is still ${busy}% busy after ${waited} s; going on. Busiest processes:"
      ps -eo pid,pcpu,etime,comm --sort=-pcpu | head -6 >&2
      break
    fi
    ((waited % 20)) || log "waiting for a quiet machine (${busy}% busy)"
  done
  IDLE_WAITED=$waited
  IDLE_BUSY=$busy
}
