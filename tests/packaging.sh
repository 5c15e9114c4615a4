#!/usr/bin/env bash
# Checks the packages that `make package` built, then installs the .deb and
# tests the installed server for real:
#   1. .deb metadata and contents (dpkg-deb -I/-c): Depends libnbd0, Recommends
#      qemu-utils, Installed-Size under 15 MB, binary, the standalone systemd
#      unit and no unit named cloudstack-image-server.service, the agent's
#      `imageserver` shim, conffile, copyright with the license;
#   2. .rpm metadata and contents (rpm -qp): Requires libnbd, Recommends
#      qemu-img, binary (the same size as the .deb's), the same units and
#      shim, /etc/sysconfig config file, license;
#   3. `apt-get install ./the.deb` (apt resolves the dependencies), then the
#      installed /usr/bin/cloudstack-image-server: no .debug_info section,
#      --version, shared libraries, and a GET of a qemu-nbd export whose
#      bytes must equal the image;
#      SIGTERM must stop it within the unit's TimeoutStopSec;
#   4. `systemd-analyze verify` of the installed unit (where available; the
#      service is never started: this may be a container without systemd);
#   5. the CloudStack agent's sequence against the installed package, twice:
#      tests/agent_replay.py (python3 -m imageserver from where the agent's
#      Script.findScript finds it, status, register, ovirt-imageio's client
#      over HTTPS, unregister, SIGTERM). It stands in for systemd-run; what
#      systemd-run checks first (no unit file may carry the transient unit's
#      name) is checked here, in the unit directories;
#   6. `dpkg -r` keeps the conffile, removes the shim and leaves nothing where
#      the agent looks (it finds cloudstack-common's imageserver again),
#      `dpkg --purge` removes everything.
# Usage: tests/packaging.sh [TARGET_DIR]   (default: $CARGO_TARGET_DIR or target)
# Needs root or sudo. Exits non-zero if any check fails; always cleans up.
# The checks pass `eval '...'` strings: expanded when the check runs.
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=cloudstack-image-server
TARGET_DIR=${1:-${CARGO_TARGET_DIR:-target}}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$PWD/$TARGET_DIR" ;; esac
BIN=/usr/bin/$PKG
MAX_INSTALLED_KIB=15360
UNIT_NAME=$PKG-standalone.service
# The CloudStack agent's transient unit: no unit file may have this name.
AGENT_UNIT=$PKG.service
SHIM=usr/share/cloudstack-agent/lib/scripts/vm/hypervisor/kvm/imageserver
COMMON_SHIM=/usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/imageserver
STOP_TIMEOUT=$(sed -n "s/^TimeoutStopSec=\([0-9]*\)s\?$/\1/p" packaging/$UNIT_NAME)

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "packaging: needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "packaging: this test installs the .deb: run it on Debian/Ubuntu" >&2
    exit 1
fi
# rpm (the query tool) is not installed by default on Debian.
if ! command -v rpm >/dev/null; then
    echo "packaging: installing rpm"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rpm >/dev/null
fi

passed=0
failed=0
ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
# check DESCRIPTION COMMAND...: one test, passes if COMMAND succeeds.
check() {
    local what=$1
    shift
    if "$@"; then ok "$what"; else not_ok "$what"; fi
}
# has_entry LIST WORD: WORD is one of the comma-separated entries of LIST
# (an entry may carry a version: "libnbd0 (>= 1.14)").
has_entry() {
    printf '%s\n' "$1" | tr ',' '\n' | sed 's/^ *//; s/ .*//' | grep -qx "$2"
}
finish() {
    echo "packaging: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/csis-packaging-XXXXXX")
SERVER_PID=""
NBD_PID=""
INSTALLED_BY_US=0
DECOY_COMMON=0
# The agent replay's server creates /var/run/cloudstack (its sockets are gone
# after each stop): removed again when it was not there before.
RUN_DIR_EXISTED=0
[ -e /var/run/cloudstack ] && RUN_DIR_EXISTED=1
cleanup() {
    set +e
    [ "$DECOY_COMMON" = 1 ] && $SUDO rm -rf /usr/share/cloudstack-common
    [ "$RUN_DIR_EXISTED" = 0 ] && $SUDO rmdir /var/run/cloudstack 2>/dev/null
    [ -n "$SERVER_PID" ] && kill -KILL "$SERVER_PID" 2>/dev/null
    [ -n "$NBD_PID" ] && kill "$NBD_PID" 2>/dev/null && wait "$NBD_PID" 2>/dev/null
    if [ "$INSTALLED_BY_US" = 1 ] && dpkg-query -W "$PKG" >/dev/null 2>&1; then
        $SUDO dpkg --purge "$PKG" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

VERSION=$(cargo metadata --no-deps --format-version 1 --offline |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "'$PKG'"))')
echo "packaging: $PKG $VERSION, packages under $TARGET_DIR"

shopt -s nullglob
debs=("$TARGET_DIR"/debian/"${PKG}"_*.deb)
rpms=("$TARGET_DIR"/generate-rpm/"${PKG}"-*.rpm)
shopt -u nullglob
if [ ${#debs[@]} -ne 1 ] || [ ${#rpms[@]} -ne 1 ]; then
    echo "packaging: expected one .deb and one .rpm (run make package); found: ${debs[*]-} ${rpms[*]-}" >&2
    exit 1
fi
DEB=${debs[0]}
RPM=${rpms[0]}

# --- 1. the .deb --------------------------------------------------------------
echo "# $DEB"
dpkg-deb -I "$DEB" | sed 's/^/#   /'
deb_field() { dpkg-deb -f "$DEB" "$1"; }
check "deb Package is $PKG" test "$(deb_field Package)" = "$PKG"
check "deb Version is $VERSION-<revision>" eval '[[ "$(deb_field Version)" == "$VERSION"-* ]]'
depends=$(deb_field Depends)
check "deb Depends ($depends) has libnbd0" has_entry "$depends" libnbd0
recommends=$(deb_field Recommends)
check "deb Recommends ($recommends) has qemu-utils" has_entry "$recommends" qemu-utils
# The package ships the binary without debug info (make package strips a copy).
installed_size=$(deb_field Installed-Size)
check "deb Installed-Size ($installed_size KiB) is under 15 MB ($MAX_INSTALLED_KIB KiB)" \
    eval '[ -n "$installed_size" ] && [ "$installed_size" -lt "$MAX_INSTALLED_KIB" ]'

dpkg-deb -c "$DEB" >"$WORK/deb.list"
deb_has() { # PATH MODE-PREFIX
    grep -Eq "^$2 .* \./$1\$" "$WORK/deb.list"
}
check "deb ships /usr/bin/$PKG (0755)" deb_has "usr/bin/$PKG" '-rwxr-xr-x'
if deb_has "lib/systemd/system/$UNIT_NAME" '-rw-r--r--'; then
    UNIT_IN_DEB=lib/systemd/system/$UNIT_NAME
else
    UNIT_IN_DEB=usr/lib/systemd/system/$UNIT_NAME
fi
check "deb ships the unit /$UNIT_IN_DEB" deb_has "$UNIT_IN_DEB" '-rw-r--r--'
check "deb ships no $AGENT_UNIT (the agent's transient unit name)" eval '! grep -q "/$AGENT_UNIT\$" "$WORK/deb.list"'
check "deb ships the agent's shim /$SHIM/__main__.py (0644)" deb_has "$SHIM/__main__.py" '-rw-r--r--'
check "deb ships /$SHIM/__init__.py (0644)" deb_has "$SHIM/__init__.py" '-rw-r--r--'
check "deb ships nothing under /usr/share/cloudstack-common" eval '! grep -q "\./usr/share/cloudstack-common" "$WORK/deb.list"'
check "deb ships /etc/default/$PKG" deb_has "etc/default/$PKG" '-rw-r--r--'
check "deb ships /usr/share/doc/$PKG/copyright" deb_has "usr/share/doc/$PKG/copyright" '-rw-r--r--'

mkdir "$WORK/deb-control" "$WORK/deb-root"
dpkg-deb -e "$DEB" "$WORK/deb-control"
dpkg-deb -x "$DEB" "$WORK/deb-root"
check "deb conffiles lists /etc/default/$PKG" grep -qx "/etc/default/$PKG" "$WORK/deb-control/conffiles"
check "deb unit is packaging/$UNIT_NAME" cmp -s "$WORK/deb-root/$UNIT_IN_DEB" "packaging/$UNIT_NAME"
check "deb shim is packaging/imageserver/__main__.py" cmp -s "$WORK/deb-root/$SHIM/__main__.py" packaging/imageserver/__main__.py
check "deb prerm removes the shim's bytecode cache" grep -q "^rm -rf /$SHIM/__pycache__\$" "$WORK/deb-control/prerm"
check "deb /etc/default file is packaging/$PKG.default" cmp -s "$WORK/deb-root/etc/default/$PKG" "packaging/$PKG.default"
check "deb copyright holds the Apache-2.0 text" grep -q "Apache License" "$WORK/deb-root/usr/share/doc/$PKG/copyright"
check "deb postinst does not start the service" eval '! grep -q "deb-systemd-invoke start" "$WORK/deb-control/postinst"'

# --- 2. the .rpm --------------------------------------------------------------
echo "# $RPM"
rpm -qpi "$RPM" 2>/dev/null | sed 's/^/#   /'
rpmq() { rpm -qp "$@" "$RPM" 2>/dev/null; }
check "rpm Name is $PKG" test "$(rpmq --qf '%{NAME}')" = "$PKG"
check "rpm Version is $VERSION" test "$(rpmq --qf '%{VERSION}')" = "$VERSION"
check "rpm License is Apache-2.0" test "$(rpmq --qf '%{LICENSE}')" = "Apache-2.0"
rpmq --requires >"$WORK/rpm.requires"
check "rpm Requires has libnbd" eval 'sed "s/ .*//" "$WORK/rpm.requires" | grep -qx libnbd'
check "rpm Recommends has qemu-img" eval 'rpmq --recommends | sed "s/ .*//" | grep -qx qemu-img'
rpmq --list >"$WORK/rpm.list"
check "rpm ships no $AGENT_UNIT" eval '! grep -q "/$AGENT_UNIT\$" "$WORK/rpm.list"'
for f in /usr/bin/$PKG /usr/lib/systemd/system/$UNIT_NAME /etc/sysconfig/$PKG \
    /$SHIM/__init__.py /$SHIM/__main__.py /usr/share/licenses/$PKG/LICENSE; do
    check "rpm ships $f" grep -qx "$f" "$WORK/rpm.list"
done
check "rpm marks /etc/sysconfig/$PKG as config" eval 'rpmq --configfiles | grep -qx /etc/sysconfig/$PKG'
check "rpm binary is 0755" eval 'rpmq --qf "[%{FILEMODES:perms} %{FILENAMES}\n]" | grep -qx -e "-rwxr-xr-x /usr/bin/$PKG"'
deb_bin_size=$(stat -c %s "$WORK/deb-root/usr/bin/$PKG")
check "rpm binary is the .deb's stripped one ($deb_bin_size bytes)" \
    eval 'rpmq --qf "[%{FILESIZES} %{FILENAMES}\n]" | grep -qx "$deb_bin_size /usr/bin/$PKG"'

# --- 3. install the .deb and run the installed binary --------------------------
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q "install ok installed"; then
    echo "# note: $PKG was already installed; it is replaced by this build and purged at the end"
fi
install_deb() { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --reinstall "$DEB" >"$WORK/apt.log" 2>&1; }
if install_deb || { $SUDO apt-get update -qq && install_deb; }; then
    INSTALLED_BY_US=1
    ok "apt-get install ./$(basename "$DEB")"
else
    sed 's/^/#   /' "$WORK/apt.log"
    not_ok "apt-get install ./$(basename "$DEB")"
    finish
    exit 1
fi
check "dpkg reports $PKG $(deb_field Version) installed" \
    test "$(dpkg-query -W -f='${Status} ${Version}' "$PKG")" = "install ok installed $(deb_field Version)"
check "libnbd0 installed (pulled in by Depends)" eval 'dpkg-query -W -f="\${Status}" libnbd0 | grep -q "install ok installed"'
UNIT=""
for d in /lib/systemd/system /usr/lib/systemd/system; do
    [ -f "$d/$UNIT_NAME" ] && UNIT="$d/$UNIT_NAME" && break
done
check "unit installed under /lib or /usr/lib/systemd/system" test -n "$UNIT"
check "unit $UNIT_NAME has Conflicts=$AGENT_UNIT" eval 'grep -qx "Conflicts=$AGENT_UNIT" "$UNIT"'
# systemd-run --unit=cloudstack-image-server fails with "Unit ... was already
# loaded or has a fragment file" when a unit file of that name exists in one
# of these directories; systemd is not running here, so check the files.
fragments=$(ls -d /etc/systemd/system/$AGENT_UNIT /run/systemd/system/$AGENT_UNIT \
    /lib/systemd/system/$AGENT_UNIT /usr/lib/systemd/system/$AGENT_UNIT 2>/dev/null || true)
check "no unit file $AGENT_UNIT after install (${fragments:-none}): systemd-run can create it" test -z "$fragments"
check "/etc/default/$PKG installed" test -f "/etc/default/$PKG"
check "install does not enable the service" test ! -e "/etc/systemd/system/multi-user.target.wants/$UNIT_NAME"
check "$BIN has no .debug_info section" eval '! readelf -S -W "$BIN" | grep -q "\.debug_info"'
check "$BIN finds all its shared libraries" eval '! ldd "$BIN" | grep -q "not found"'

out=$("$BIN" --version 2>&1) || true
echo "#   $BIN --version: $out"
check "$BIN --version prints $VERSION" eval '[[ "$out" == *"$VERSION"* ]]'

# A real transfer: raw image with known bytes behind qemu-nbd, the config file
# CloudStack would write, the installed server on an ephemeral port, curl GET.
ID=pkgtest-$$
IMG=$WORK/disk.raw
SOCK=$WORK/nbd.sock
mkdir "$WORK/conf"
qemu-img create -q -f raw "$IMG" 4M
qemu-io -f raw -c "write -P 0xa5 0 1M" -c "write -P 0x5c 1536k 512k" -c "write -P 0x01 4095k 1k" "$IMG" >/dev/null
qemu-nbd --socket "$SOCK" --persistent --shared=0 -f raw "$IMG" 2>"$WORK/qemu-nbd.log" &
NBD_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
printf '{"backend":"nbd","socket":"%s"}\n' "$SOCK" >"$WORK/conf/$ID"

"$BIN" --listen 127.0.0.1 --port 0 --config-dir "$WORK/conf" \
    --control-socket "$WORK/ctl.sock" --unix-socket "$WORK/http.sock" >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
PORT=""
for _ in $(seq 300); do
    PORT=$(sed -n 's|^listening on http://127\.0\.0\.1:\([0-9][0-9]*\)$|\1|p' "$WORK/server.out" | head -n 1)
    [ -n "$PORT" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if [ -n "$PORT" ]; then
    ok "installed server printed 'listening on http://127.0.0.1:$PORT'"
    if curl -sS -f --max-time 60 -o "$WORK/got.raw" "http://127.0.0.1:$PORT/images/$ID" 2>"$WORK/curl.err"; then
        check "GET /images/$ID returns the image's $(stat -c %s "$IMG") bytes" cmp "$WORK/got.raw" "$IMG"
    else
        sed 's/^/#   /' "$WORK/curl.err"
        not_ok "GET /images/$ID"
    fi
    kill -TERM "$SERVER_PID"
    stopped=""
    for _ in $(seq $((STOP_TIMEOUT * 10))); do
        kill -0 "$SERVER_PID" 2>/dev/null || { stopped=1; break; }
        sleep 0.1
    done
    rc=0
    if [ -n "$stopped" ]; then wait "$SERVER_PID" || rc=$?; fi
    SERVER_PID=""
    check "SIGTERM stops the server within ${STOP_TIMEOUT}s, cleanly (exit $rc)" \
        eval '[ -n "$stopped" ] && { [ "$rc" = 0 ] || [ "$rc" = 143 ]; }'
else
    echo "#   server stdout:" && sed 's/^/#     /' "$WORK/server.out"
    echo "#   server stderr:" && sed 's/^/#     /' "$WORK/server.err"
    not_ok "installed server printed 'listening on http://127.0.0.1:PORT' (no port: GET not tried)"
fi
kill "$NBD_PID" 2>/dev/null
wait "$NBD_PID" 2>/dev/null || true
NBD_PID=""

# --- 4. the installed unit ------------------------------------------------------
if command -v systemd-analyze >/dev/null && [ -n "$UNIT" ]; then
    if systemd-analyze verify "$UNIT" >"$WORK/verify.log" 2>&1; then
        ok "systemd-analyze verify $UNIT"
    else
        sed 's/^/#   /' "$WORK/verify.log"
        not_ok "systemd-analyze verify $UNIT"
    fi
else
    echo "# skip: systemd-analyze not available, unit not verified"
fi

# --- 5. the CloudStack agent's sequence ---------------------------------------------
# cloudstack-common's own imageserver, where the agent would find it without
# us: a stand-in when cloudstack-common is not installed (removed at the end).
if [ ! -e /usr/share/cloudstack-common ]; then
    DECOY_COMMON=1
    $SUDO mkdir -p "$COMMON_SHIM"
    printf 'raise SystemExit("cloudstack-common imageserver stand-in")\n' |
        $SUDO tee "$COMMON_SHIM/__main__.py" >/dev/null
fi
for tool in socat qemu-nbd qemu-img qemu-io openssl; do
    command -v "$tool" >/dev/null || { not_ok "$tool for the agent replay (scripts/deps.sh installs it)"; }
done
if PYTHON=$(scripts/imageio-venv.sh); then
    if $SUDO "$PYTHON" tests/agent_replay.py >"$WORK/replay.log" 2>&1; then
        ok "the agent's create -> transfer -> finalize cycle, twice (tests/agent_replay.py)"
    else
        not_ok "the agent's create -> transfer -> finalize cycle, twice (tests/agent_replay.py)"
    fi
    sed 's/^/#   /' "$WORK/replay.log"
else
    not_ok "ovirt-imageio virtualenv for the agent replay"
fi

# --- 6. removal -------------------------------------------------------------------
$SUDO dpkg -r "$PKG" >/dev/null
check "dpkg -r removes $BIN" test ! -e "$BIN"
check "dpkg -r removes the unit" eval '[ -n "$UNIT" ] && [ ! -e "$UNIT" ]'
check "dpkg -r leaves nothing of the shim (/$SHIM)" test ! -e "/$SHIM"
if [ -e "$COMMON_SHIM/__main__.py" ] && [ -n "${PYTHON:-}" ]; then
    found=$("$PYTHON" tests/agent_replay.py --find 2>&1 || true)
    check "the agent finds cloudstack-common's imageserver again ($found)" \
        test "$found" = "$COMMON_SHIM/__main__.py"
fi
check "dpkg -r keeps the conffile /etc/default/$PKG" test -f "/etc/default/$PKG"
$SUDO dpkg --purge "$PKG" >/dev/null
INSTALLED_BY_US=0
check "dpkg --purge removes /etc/default/$PKG" test ! -e "/etc/default/$PKG"
check "dpkg --purge leaves no mask of the unit" test ! -L "/etc/systemd/system/$PKG.service"

finish
