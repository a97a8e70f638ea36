#!/bin/sh
# Layered snapshot benchmark under real KVM. A 256 MiB, 1 vCPU guest: a base snapshot after
# boot; restored, it writes a 32 MiB "runtime" and a layer on the base is taken (rt); then 10
# times: restore rt, the guest writes 4 MiB of "application" data, a layer on rt is taken
# (app_i, --after resume) and right after it a full snapshot of the same VM (full_i, --after
# stop). Then app_1 (a three-level chain) is flattened, and both are restored. Prints one
# `LAYERS-BENCH {json}` line per measurement. Runs inside the kvm rig:
#   payload = static vmm + vmlinuz + initramfs.cpio + lib.sh + this script; sh layers.sh [APPS]
set -u
. ./lib.sh   # now_ms, wait_for, json_num, guest_rss_kib
APPS=${1:-10}
SOCK=/tmp/lb.sock
CON=/tmp/lb-console.log
D=/tmp/lb
GUEST='g=$(devmem 0xff000 64); echo LB-READY; w() { while [ $(devmem 0xff000 64) = $g ]; do sleep 0.1; done; g=$(devmem 0xff000 64); }; w; dd if=/dev/urandom of=/tmp/rt bs=1M count=32 2>/dev/null; echo LB-RT; while :; do w; dd if=/dev/urandom of=/tmp/app bs=1M count=4 2>/dev/null; echo LB-APP; done'

disk_kib() { du -k -s "$1" | cut -f1; }
fail() { echo "LAYERS-BENCH {\"kind\":\"error\",\"ok\":false,\"error\":\"$1\"}"; exit 1; }

# snap NAME PARENT|- AFTER: snapshot, prints a record.
snap() {
    parent=""; [ "$2" != - ] && parent="--parent $D/$2"
    t0=$(now_ms)
    ./vmm snapshot --api-sock "$SOCK" --out "$D/$1" $parent --after "$3" --json >/tmp/lb-snap.json 2>/tmp/lb-snap.err \
        || fail "snapshot $1: $(tr -d '\"\n' < /tmp/lb-snap.err | cut -c1-300)"
    wall=$(( $(now_ms) - t0 ))
    echo "LAYERS-BENCH {\"kind\":\"snapshot\",\"name\":\"$1\",\"parent\":\"$2\",\"ok\":true,\"memory_file_bytes\":$(wc -c < $D/$1/memory),\"disk_kib\":$(disk_kib $D/$1),\"wall_ms\":$wall,\"save_state_ms\":$(json_num /tmp/lb-snap.json save_state_ms),\"write_ms\":$(json_num /tmp/lb-snap.json write_ms),\"kept_pages\":$(json_num /tmp/lb-snap.json kept),\"freed_pages\":$(json_num /tmp/lb-snap.json freed_pages)}"
}

# start_restore NAME MARKER: restores with the API socket and waits for MARKER on the console.
start_restore() {
    rm -f "$SOCK" "$CON"
    ./vmm restore --snapshot "$D/$1" --api-sock "$SOCK" --serial "$CON" --track-dirty-pages </dev/null >/tmp/lb-vmm.log 2>&1 &
    VMM=$!
    wait_for "grep -q $2 $CON 2>/dev/null" 300 || fail "restore $1: no $2"
}

rm -rf "$D"; mkdir -p "$D"; rm -f "$SOCK" "$CON"
./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib 256 --vcpus 1 --track-dirty-pages \
    --api-sock "$SOCK" --serial "$CON" --cmdline "quiet vmm_run=\"$GUEST\"" </dev/null >/tmp/lb-vmm.log 2>&1 &
VMM=$!
wait_for "grep -q LB-READY $CON 2>/dev/null" 400 || fail "guest not ready"
snap base - stop; wait $VMM
start_restore base LB-RT
snap rt base stop; wait $VMM
i=1
while [ "$i" -le "$APPS" ]; do
    start_restore rt LB-APP
    snap "app$i" rt resume
    snap "full$i" - stop
    wait $VMM
    i=$((i + 1))
done
t0=$(now_ms)
./vmm flatten --snapshot "$D/app1" --out "$D/flat1" --json >/tmp/lb-flat.json 2>&1 || fail "flatten"
echo "LAYERS-BENCH {\"kind\":\"flatten\",\"ok\":true,\"wall_ms\":$(( $(now_ms) - t0 )),\"disk_kib\":$(disk_kib $D/flat1)}"
for round in 1 2 3; do
    for s in app1 flat1 full1; do
        rm -f /tmp/lb-con2.log /tmp/lb-metrics.json
        t0=$(now_ms)
        ./vmm restore --snapshot "$D/$s" --serial /tmp/lb-con2.log --metrics-file /tmp/lb-metrics.json </dev/null >/tmp/lb-restore.log 2>&1 &
        R=$!
        ok=true
        wait_for '[ -s /tmp/lb-con2.log ]' 120 || ok=false
        wall=$(( $(now_ms) - t0 ))
        kill -TERM $R; wait $R 2>/dev/null
        phases=$(grep -o 'phases_ms=[^ ]*\( [a-z_]*_ms=[0-9.]*\)*' /tmp/lb-restore.log | head -n1 | sed 's/phases_ms=//')
        echo "LAYERS-BENCH {\"kind\":\"restore\",\"name\":\"$s\",\"round\":$round,\"ok\":$ok,\"to_vcpus_running_ms\":$(json_num /tmp/lb-metrics.json setup_ms),\"to_first_console_ms\":$(json_num /tmp/lb-metrics.json first_console_ms),\"wall_ms\":$wall,\"phases_ms\":\"$phases\"}"
    done
done
