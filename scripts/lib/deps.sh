# shellcheck shell=bash
# scripts/lib/deps.sh - Debian packages ferry's scripts need, installed only when missing.
#
# Sourced (not run) by scripts/test, scripts/fault-soak, scripts/netlab, scripts/bench-nbd,
# scripts/bench-migrate and scripts/bench-hop:
#
#   deps_cmd CMD PKG      PKG is needed when the command CMD is not on PATH
#   deps_py MODULE PKG    PKG is needed when /usr/bin/python3 cannot import MODULE
#   deps_install WHO      installs what the calls above found missing: one `apt-get update`,
#                         then one `apt-get install --no-install-recommends`; WHO names the
#                         caller in its messages. Nothing happens when nothing is missing.
#
# QEMU is never installed: the machine comes with qemu-utils 10.0 (qemu-img, qemu-io, qemu-nbd,
# qemu-storage-daemon) and Debian 12's older qemu-utils or qemu-system-* must not replace it.
# A missing QEMU tool is reported instead (deps_install fails), whatever the caller asked for.

DEPS_MISSING=()

deps_cmd() { command -v "$1" >/dev/null 2>&1 || DEPS_MISSING+=("$2"); }
deps_py() { /usr/bin/python3 -c "import $1" >/dev/null 2>&1 || DEPS_MISSING+=("$2"); }

deps_install() {
  local who=${1:-ferry} pkgs=() qemu=() p
  ((${#DEPS_MISSING[@]})) || return 0
  for p in $(printf '%s\n' "${DEPS_MISSING[@]}" | sort -u); do
    case $p in
      qemu-utils | qemu-system-* | qemu-block-*) qemu+=("$p") ;;
      *) pkgs+=("$p") ;;
    esac
  done
  DEPS_MISSING=()
  if ((${#pkgs[@]})); then
    echo "$who: installing ${pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Another apt run on the machine holds the lock for a while: wait for it.
    apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${pkgs[@]}" \
      >/dev/null
  fi
  if ((${#qemu[@]})); then
    echo "$who: QEMU tools missing (${qemu[*]}): ferry's scripts need the QEMU 10.0 the machine" \
      "comes with and never install Debian's QEMU packages" >&2
    return 1
  fi
}
