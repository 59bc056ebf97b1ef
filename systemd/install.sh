#!/bin/sh
# `make install`: lessord as a system service, the way the unit's hardening allows. Run as root
# from the source tree; run it again at will (each step is skipped where it is already done, and an
# edited config is never overwritten).
#   1. a venv in $PREFIX/venv (default /opt/lessor/venv) with torch as systemd/torch.sh chooses it
#      (the CPU build without nvidia-smi, as `make demo`) and lessor installed from this tree
#      (Debian 12's pip refuses to install into the system Python: externally-managed-environment);
#   2. the system user $LESSOR_USER (default lessor), made when missing;
#   3. the state directory $STATE_DIR (/var/lib/lessor) owned by that user;
#   4. $CONFIG_DIR/lessor.yaml (/etc/lessor) from examples/seed.yaml when there is none, state_dir
#      left to systemd's $STATE_DIRECTORY;
#   5. $UNIT_DIR/lessord.service (/etc/systemd/system): systemd/lessord.service, ExecStart pointing
#      at the venv, User= and Group= set.
# The unit's ProtectHome=yes hides /home, /root and /run/user from lessord, and PrivateTmp=yes gives
# it a /tmp and /var/tmp of its own: a venv there could not be run, so such a PREFIX is refused.
# LESSOR_SOURCE: what pip installs (default: this tree); PIP_ARGS: more pip arguments (the test
# installs a wheel it built with --no-deps: no download); TORCH_PIP_ARGS: systemd/torch.sh's.
# SYSTEMCTL: the command run as `$SYSTEMCTL daemon-reload` (the test's private mount namespace: true).
# LESSOR_ANY_PREFIX=1: skip that refusal (the test installs under its tmp folder, verifies the unit
# with systemd-analyze and never starts it).
set -eu
PREFIX=${PREFIX:-/opt/lessor}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
CONFIG_DIR=${CONFIG_DIR:-/etc/lessor}
STATE_DIR=${STATE_DIR:-/var/lib/lessor}
LESSOR_USER=${LESSOR_USER:-lessor}
PIP_ARGS=${PIP_ARGS:-}
PYTHON=${PYTHON:-python3}
SRC=$(cd "$(dirname "$0")/.." && pwd)
LESSOR_SOURCE=${LESSOR_SOURCE:-$SRC}

case "$PREFIX" in
    /*) ;;
    *) echo "make install: PREFIX must be an absolute path (got '$PREFIX')" >&2; exit 2 ;;
esac
if [ "${LESSOR_ANY_PREFIX:-}" != 1 ]; then
    case "$PREFIX/" in
        /home/*|/root/*|/run/user/*)
            echo "make install: PREFIX=$PREFIX is hidden from lessord by the unit's ProtectHome=yes;" \
                 "put the venv where the service can read it, e.g. PREFIX=/opt/lessor (the default)" >&2
            exit 2 ;;
        /tmp/*|/var/tmp/*)
            echo "make install: PREFIX=$PREFIX is not seen by lessord: the unit's PrivateTmp=yes gives it" \
                 "a /tmp and /var/tmp of its own; use e.g. PREFIX=/opt/lessor (the default)" >&2
            exit 2 ;;
    esac
fi

echo "==> [1/5] lessor in the venv $PREFIX/venv"
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
# torch first, by the Makefile's rule: the CPU build where there is no nvidia-smi (not the CUDA one).
sh "$SRC/systemd/torch.sh" "[1/5]" "$PREFIX/venv/bin/python"
# A plain (not editable) install: the service must not run from this checkout.
# shellcheck disable=SC2086
"$PREFIX/venv/bin/python" -m pip install -q $PIP_ARGS "$LESSOR_SOURCE"

echo "==> [2/5] the system user $LESSOR_USER"
if ! id -u "$LESSOR_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --no-log-init --shell /usr/sbin/nologin "$LESSOR_USER"
fi
GROUP=$(id -gn "$LESSOR_USER")

echo "==> [3/5] the state directory $STATE_DIR"
install -d -m 0750 -o "$LESSOR_USER" -g "$GROUP" "$STATE_DIR"

echo "==> [4/5] the config $CONFIG_DIR/lessor.yaml"
install -d -m 0755 "$CONFIG_DIR"
if [ -e "$CONFIG_DIR/lessor.yaml" ]; then
    echo "    kept as it is (already there)"
else
    # The seed's state_dir is relative to the source tree: the service's is $STATE_DIRECTORY.
    sed '/^state_dir:/d' "$SRC/examples/seed.yaml" > "$CONFIG_DIR/lessor.yaml.new"
    chmod 0640 "$CONFIG_DIR/lessor.yaml.new"
    chgrp "$GROUP" "$CONFIG_DIR/lessor.yaml.new"
    mv "$CONFIG_DIR/lessor.yaml.new" "$CONFIG_DIR/lessor.yaml"
    echo "    written from examples/seed.yaml: edit it (then: lessor check-config $CONFIG_DIR/lessor.yaml)"
fi

echo "==> [5/5] the unit $UNIT_DIR/lessord.service"
install -d -m 0755 "$UNIT_DIR"
sed -e "s|^ExecStart=/opt/lessor/venv/bin/lessord |ExecStart=$PREFIX/venv/bin/lessord |" \
    -e "s|^\[Service\]\$|[Service]\nUser=$LESSOR_USER\nGroup=$GROUP|" \
    "$SRC/systemd/lessord.service" > "$UNIT_DIR/lessord.service.new"
if [ "$CONFIG_DIR" != /etc/lessor ]; then  # systemd's ConfigurationDirectory= is always under /etc
    sed -i "s|\${CONFIGURATION_DIRECTORY}/lessor.yaml|$CONFIG_DIR/lessor.yaml|" "$UNIT_DIR/lessord.service.new"
fi
chmod 0644 "$UNIT_DIR/lessord.service.new"
mv "$UNIT_DIR/lessord.service.new" "$UNIT_DIR/lessord.service"

if [ "$UNIT_DIR" = /etc/systemd/system ] && [ -d /run/systemd/system ]; then
    ${SYSTEMCTL:-systemctl} daemon-reload
    echo "installed; start it with: systemctl enable --now lessord"
else
    echo "installed; where systemd runs: systemctl daemon-reload && systemctl enable --now lessord"
fi
