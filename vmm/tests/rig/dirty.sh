#!/bin/sh
# Dirty page tracking end to end under real KVM: pages the guest writes after the balloon marked
# them Reported or Hinted become Live in the page-state map, and what dirty logging costs.
#
# Runs inside the kvm rig (busybox userland). The payload directory holds a static `vmm`, the
# guest image's `vmlinuz` and `initramfs.cpio`, and this script:
#   flock /tmp/kvm-rig.lock /work/shared/kvm-rig/run.sh --timeout 900 PAYLOAD -- sh dirty.sh [cost]
# Guest boots of 512 MiB / 2 vCPUs (the guest waits for a line on its console between phases);
# with `cost` only part 4:
#   1. free page reporting only: the guest fills and frees 200 MiB, reporting marks it Reported;
#      the guest fills 200 MiB again: `live_pages` of GET /balloon rises by ~200 MiB and
#      `reported_pages` drops by as much.
#   2. free page hinting only (guest default init_on_alloc=1), then
#   3. the same with init_on_alloc=0: a hinting run, then the guest writes 100 MiB; pages it
#      wrote are not counted Hinted any more.
#   4. cost: a guest writing 200 MiB of tmpfs, then rewriting it 3 times, without a balloon:
#      dirty logging off, VMM_DIRTY_LOG=always (syncs every second), and always with
#      VMM_DIRTY_SYNC_MS=600000 (no periodic sync: what 4 KiB mappings alone cost); twice each.
# Host lines start with HOST, guest lines with GUEST.
set -u
SOCK=/tmp/vmm.sock
CON=/tmp/console.log
IN=/tmp/console.in
PAGES_200M=51200
PAGES_100M=25600

log() { echo "HOST [$(cut -d' ' -f1 /proc/uptime)] $*"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$VMM/status" 2>/dev/null || echo 0; }
api() { ./vmm "$@" --api-sock "$SOCK"; }
# A numeric field of GET /balloon (which syncs the dirty log first).
bfield() { api balloon status --json | tr -d ' \n' | grep -o "\"$1\":[0-9]*" | head -n1 | cut -d: -f2; }
dirty_stats() { api status --json | tr -d ' \n' | grep -o '"dirty_log":[^}]*}' || echo '"dirty_log":null'; }
fail() { log "FAIL: $*"; FAILED=1; }
wait_console() {
    n=0
    while ! grep -q "$1" "$CON" 2>/dev/null; do
        n=$((n + 1))
        [ "$n" -gt "$2" ] && { fail "no '$1' on the console after $2 s"; return 1; }
        sleep 1
    done
}
states() {
    S=$(api balloon status --json | tr -d ' \n' | grep -o '"page_states":{[^}]*}')
    log "$1: $S VMM RSS $(rss_kib) KiB"
    log "  $(dirty_stats)"
}
field_of() { echo "$S" | grep -o "\"$1\":[0-9]*" | cut -d: -f2; }
# boot BALLOON CMDLINE_EXTRA GUEST_COMMAND [ENV...]
boot() {
    rm -f "$SOCK" "$CON" "$IN"
    mkfifo "$IN"
    balloon=$1
    extra=$2
    guest=$3
    shift 3
    if [ -n "$balloon" ]; then set -- "$@" ./vmm run --balloon "$balloon"; else set -- "$@" ./vmm run; fi
    env "$@" --kernel vmlinuz --initrd initramfs.cpio --mem-mib 512 --vcpus 2 \
        --api-sock "$SOCK" --serial "$CON" --cmdline "quiet $extra vmm_run=\"$guest\"" \
        <"$IN" >/tmp/vmm.log 2>&1 &
    VMM=$!
    exec 3>"$IN"
    wait_console VMM-GUEST-READY 240 || { cat /tmp/vmm.log "$CON"; return 1; }
}
finish() {
    echo go >&3
    n=0
    while kill -0 "$VMM" 2>/dev/null && [ "$n" -lt 60 ]; do sleep 1; n=$((n + 1)); done
    kill "$VMM" 2>/dev/null
    exec 3>&-
    grep -E 'dirty|error|WARN' /tmp/vmm.log | sed 's/^/HOST   vmm: /'
}

FAILED=0
log "rig: THP $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
MODE=${1:-all}
if [ "$MODE" = all ]; then

# --- 1. reporting, then reuse
FILL='dd if=/dev/zero of=/tmp/f bs=1M count=200 2>/dev/null'
log "1. free page reporting: fill, free, refill 200 MiB"
boot amount_mib=0,deflate_on_oom=true,free_page_reporting=true \
    "page_reporting.page_reporting_order=9" \
    "read go; $FILL; echo GUEST-FILLED; read go; rm /tmp/f; echo GUEST-FREED; read go; $FILL; echo GUEST-REFILLED; read go" || exit 1
sleep 5
states "booted"
echo go >&3
wait_console GUEST-FILLED 120
sleep 2
states "guest filled 200 MiB"
R_FILLED=$(field_of reported_pages)
echo go >&3
wait_console GUEST-FREED 60
n=0
while [ "$(bfield reported_pages)" -lt $((R_FILLED + PAGES_200M * 8 / 10)) ] && [ "$n" -lt 60 ]; do
    sleep 1
    n=$((n + 1))
done
sleep 3
states "guest freed it, reported ${n}+3 s later"
L1=$(field_of live_pages)
R1=$(field_of reported_pages)
[ "$R1" -ge $((R_FILLED + PAGES_200M * 8 / 10)) ] || fail "the freed 200 MiB was not reported"
echo go >&3
wait_console GUEST-REFILLED 120
states "guest wrote 200 MiB again (GET /balloon right away)"
L2=$(field_of live_pages)
R2=$(field_of reported_pages)
log "live_pages $L1 -> $L2 (+$((L2 - L1))), reported_pages $R1 -> $R2 (-$((R1 - R2))); 200 MiB = $PAGES_200M pages"
[ $((L2 - L1)) -ge $((PAGES_200M * 9 / 10)) ] || fail "live_pages rose by less than 90% of 200 MiB"
[ $((R1 - R2)) -ge $((PAGES_200M * 9 / 10)) ] || fail "reported_pages fell by less than 90% of 200 MiB"
finish

# --- 2./3. hinting, then writes
hint_run() {
    log "$1. free page hinting ($2)"
    boot amount_mib=0,deflate_on_oom=true,free_page_hinting=true "$2" \
        "read go; dd if=/dev/zero of=/tmp/f bs=1M count=100 2>/dev/null; echo GUEST-WROTE; read go" || return 1
    sleep 5
    states "booted"
    api balloon hint start
    n=0
    while [ "$(api balloon hint status | awk '/^running/ {print $2}')" != false ] && [ "$n" -lt 60 ]; do
        sleep 1
        n=$((n + 1))
    done
    api balloon hint status | tr -s ' ' | tr '\n' ' ' | sed 's/^/HOST   hint status: /'
    echo
    states "hinting run over (the guest freed the hinted pages)"
    H1=$(field_of hinted_pages)
    L1=$(field_of live_pages)
    sleep 3
    states "3 s later, idle guest"
    H1B=$(field_of hinted_pages)
    echo go >&3
    wait_console GUEST-WROTE 120
    states "guest wrote 100 MiB"
    H2=$(field_of hinted_pages)
    L2=$(field_of live_pages)
    log "hinted_pages $H1 -> $H1B (idle) -> $H2 after the write (-$((H1B - H2))); live_pages $L1 -> $L2; 100 MiB = $PAGES_100M pages"
    if [ "$H1B" -ge "$PAGES_100M" ]; then
        # Nearly all free memory was hinted: the 100 MiB the guest wrote came from it.
        [ $((H1B - H2)) -ge $((PAGES_100M * 8 / 10)) ] || fail "pages written after hinting still count as Hinted"
    else
        log "fewer than $PAGES_100M pages stayed Hinted: nothing to check the write against"
    fi
    finish
}
hint_run 2 "" || FAILED=1
hint_run 3 "init_on_alloc=0" || FAILED=1
fi

# --- 4. cost of dirty logging
log "4. cost: write 200 MiB of tmpfs, rewrite it 3 times; dirty logging off / on"
WORK='read go; read t0 x </proc/uptime; dd if=/dev/zero of=/tmp/f bs=1M count=200 2>/dev/null; read t1 x </proc/uptime; for i in 1 2 3; do dd if=/dev/zero of=/tmp/f bs=1M count=200 conv=notrunc 2>/dev/null; done; read t2 x </proc/uptime; echo GUEST-WORK first_s=$t0..$t1 rewrites_s=$t1..$t2; read go'
for round in 1 2; do
    for mode in auto always always,600000; do
        boot "" "" "$WORK" VMM_DIRTY_LOG=${mode%,*} VMM_DIRTY_SYNC_MS=${mode#*,} || { FAILED=1; continue; }
        sleep 3
        echo go >&3
        wait_console GUEST-WORK 300
        line=$(grep GUEST-WORK "$CON" | tr -d '\r' | tail -n1)
        first=$(echo "$line" | sed 's/.*first_s=\([0-9.]*\)\.\.\([0-9.]*\).*/\1 \2/' | awk '{printf "%.2f", $2 - $1}')
        rest=$(echo "$line" | sed 's/.*rewrites_s=\([0-9.]*\)\.\.\([0-9.]*\).*/\1 \2/' | awk '{printf "%.2f", $2 - $1}')
        log "round $round VMM_DIRTY_LOG=${mode%,*} VMM_DIRTY_SYNC_MS=${mode#*,}: first write of 200 MiB ${first} s, 3 rewrites ${rest} s; $(dirty_stats)"
        finish
    done
done

[ "$FAILED" = 0 ] && log "PASS" || log "FAILED"
exit "$FAILED"
