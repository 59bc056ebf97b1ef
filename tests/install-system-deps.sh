#!/bin/sh
# Servers the tests start themselves: PostgreSQL (server binaries; the tests run a private cluster).
# Installs from Debian's packages when missing and when we may; says so and carries on otherwise
# (the PostgreSQL tests then skip with that reason, or fail under LESSOR_REQUIRE_POSTGRES=1).
set -eu
have_pg() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
if have_pg; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql (Debian package) for the ledger tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
else
    echo "PostgreSQL server binaries are missing and cannot be installed here (need root and apt-get)" >&2
fi
