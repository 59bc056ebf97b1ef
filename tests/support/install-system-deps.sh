#!/bin/sh
# Servers the tests start themselves (each on a free loopback port): PostgreSQL (a private cluster)
# and mosquitto (an MQTT broker); Debian's chromium, which the dashboard's test runs headless; and
# systemd-analyze, which checks the service's unit (installing the package starts no systemd here).
# Installs the missing ones from Debian's packages when we may; says so and carries on otherwise
# (those tests then skip with that reason, or fail under LESSOR_REQUIRE_POSTGRES=1 /
# LESSOR_REQUIRE_MOSQUITTO=1 / CI=true, as in CI).
set -eu
missing=""
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$missing chromium"
# nginx: bench/router_overhead.py's reference proxy (its own config on a free port)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
# systemd-analyze: tests/system/test_systemd.py verifies the unit, shipped and as `make install` writes it
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing$missing (Debian packages) for the tests"
    apt-get update -qq
    # The packages' own services are not wanted: the tests start private instances.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
    echo "missing:$missing; cannot install here (need root and apt-get)" >&2
fi
