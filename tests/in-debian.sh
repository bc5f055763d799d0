#!/usr/bin/env bash
# Run a command in a root file system of a Debian release, with that release's own python3
# and libraries: the "dev" tree of tests/e2e/container.py (echod's dependencies, pytest,
# lintian; built by debootstrap on first use, cached under /var/cache/echod-e2e by its
# contents), entered with systemd-nspawn. The source tree is bind-mounted read-only at /src
# (the working directory); writes inside land on a throw-away overlay, so the cached tree
# never changes. The host's network namespace is shared (loopback for the integration
# tests); nothing inside needs the network.
#
# Usage: tests/in-debian.sh [--bench] [--bind PATH[:INSIDE]]... [--bind-ro PATH[:INSIDE]]...
#                           RELEASE COMMAND [ARG]...
#   --bench            the tree with what the benchmark's smoke test needs too (git, matplotlib)
#   --bind, --bind-ro  also bind PATH (read-write, read-only) at INSIDE (default: PATH)
# Needs root. Exits with the command's status.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
binds=()
tree_kind=--dev
if [[ ${1:-} == --bench ]]; then
    tree_kind=--bench
    shift
fi
while [[ ${1:-} == --bind || ${1:-} == --bind-ro ]]; do
    binds+=("$1=$2")
    shift 2
done
(($# >= 2)) || { echo "usage: $0 [--bind[-ro] PATH[:INSIDE]]... RELEASE COMMAND [ARG]..." >&2; exit 64; }
release=$1
shift
((EUID == 0)) || { echo "in-debian: needs root (systemd-nspawn)" >&2; exit 77; }
tree=$(/usr/bin/python3 "$top/tests/e2e/container.py" rootfs "$tree_kind" --suite "$release")
# --as-pid2: a stub init reaps orphans and forwards signals, as PID 1 should; the tests'
# own processes then behave as they do on a host. nspawn gives its payload a NOTIFY_SOCKET
# (for a booted init to report to): unset, or `echod start` would take itself for a
# systemd service and stay in the foreground. CAP_NET_ADMIN, which nspawn drops, is root's
# on the host too: the fault tests put a socket in TCP repair mode to vanish silently.
exec systemd-nspawn --quiet -D "$tree" -M "echod-$release-$$" --register=no --keep-unit \
    --volatile=overlay --as-pid2 --console=pipe --capability=CAP_NET_ADMIN \
    --bind-ro="$top:/src" --chdir=/src "${binds[@]}" \
    --setenv=LANG=C.UTF-8 --setenv=PYTHONDONTWRITEBYTECODE=1 --setenv=PYTHONPATH=/src \
    -- /usr/bin/env -u NOTIFY_SOCKET "$@"
