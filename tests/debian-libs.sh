#!/usr/bin/env bash
# Run the core of the suite against Debian 12's packaged libraries (PyYAML 6.0,
# python-daemon 2.3.2, structlog 22.3, uvloop 0.17, prometheus_client 0.16) with Debian's own
# python3, so that the older generation of every dependency is tested on every run, not only
# the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(python3-yaml python3-daemon python3-structlog python3-setproctitle python3-uvloop
          python3-prometheus-client python3-pytest python3-pytest-timeout)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
/usr/bin/python3 - <<'PY'
import daemon, prometheus_client, structlog, yaml
from importlib.metadata import version
print(f"Debian libraries: PyYAML {version('PyYAML')}, python-daemon {version('python-daemon')}, structlog {version('structlog')}, prometheus_client {version('prometheus_client')}")
PY
if (($# == 0)); then
    set -- tests/unit tests/integration/test_echo.py tests/integration/test_config_cli.py \
        tests/integration/test_daemonize.py tests/integration/test_daemon_cli.py \
        tests/integration/test_reload.py tests/integration/test_logging.py \
        tests/integration/test_metrics_http.py
fi
exec /usr/bin/python3 -m pytest -p no:cacheprovider -m "not e2e" "$@"
