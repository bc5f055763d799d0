#!/usr/bin/env bash
# Run the core of the suite against each Debian release's packaged libraries (Debian 12:
# PyYAML 6.0, python-daemon 2.3.2, structlog 22.3, uvloop 0.17 on Python 3.11; Debian 13:
# PyYAML 6.0.2, python-daemon 3.1, structlog 25.1, uvloop 0.21 on Python 3.13) with that
# release's own python3, whichever release the host runs: the host's release with
# /usr/bin/python3 (the packages installed with apt-get if missing), the other in a root
# file system of it under systemd-nspawn (tests/in-debian.sh). Each release prints the
# versions it tested.
#
# Usage: tests/debian-libs.sh [PYTEST_ARG]...        (default: the core subset below)
# Environment: RELEASES="bookworm trixie" (the default) chooses the releases.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(python3-yaml python3-daemon python3-structlog python3-setproctitle python3-uvloop
          python3-prometheus-client python3-pytest python3-pytest-timeout)
releases=(${RELEASES:-bookworm trixie})
host=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

versions='
import platform
from importlib.metadata import version
from pathlib import Path
names = ["PyYAML", "python-daemon", "structlog", "uvloop", "setproctitle",
         "prometheus_client", "pytest", "pytest-timeout"]
debian = Path("/etc/debian_version").read_text().strip()
found = ", ".join(f"{n} {version(n)}" for n in names)
print(f"Debian {debian} libraries, Python {platform.python_version()}: {found}", flush=True)
'

if (($# == 0)); then
    set -- tests/unit tests/integration/test_echo.py tests/integration/test_config_cli.py \
        tests/integration/test_daemonize.py tests/integration/test_daemon_cli.py \
        tests/integration/test_reload.py tests/integration/test_logging.py \
        tests/integration/test_metrics_http.py
fi

host_packages() {
    local missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

status=0
for release in "${releases[@]}"; do
    started=$SECONDS
    skip=()
    if [[ $release == "$host" ]]; then
        host_packages
        run=(env PYTHONDONTWRITEBYTECODE=1)
    else
        run=(bash tests/in-debian.sh "$release" env)
        # promtool is a host tool (.ci/run installs prometheus), not in the release's tree.
        skip=(--deselect tests/integration/test_metrics_http.py::test_promtool_accepts_the_exposition
              --deselect tests/integration/test_metrics_http.py::test_promtool_catches_a_bad_exposition)
    fi
    echo "== $release: $( [[ $release == "$host" ]] && echo host || echo nspawn)"
    "${run[@]}" /usr/bin/python3 -c "$versions"
    "${run[@]}" /usr/bin/python3 -m pytest -p no:cacheprovider -m "not e2e" "${skip[@]}" "$@" ||
        status=$?
    echo "== $release: exit $status, $((SECONDS - started)) s"
done
exit "$status"
