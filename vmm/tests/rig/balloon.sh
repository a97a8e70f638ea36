#!/bin/sh
# The virtio-mmio transport and the balloon end to end under real KVM, in one guest boot.
#
# Runs inside the kvm rig (busybox userland). The payload directory holds a static `vmm`, the
# guest image's `vmlinuz` and `initramfs.cpio`, and this script:
#   flock /tmp/kvm-rig.lock /work/shared/kvm-rig/run.sh --timeout 600 PAYLOAD -- sh balloon.sh [DEFLATE_ON_OOM]
# First a VM without a balloon: balloon requests answer 409 and GET / lists no devices. Then it
# boots 512 MiB / 2 vCPUs with a balloon (stats every second, free page reporting, hinting;
# deflate_on_oom=$1, default true) and drives the guest through phases (the guest waits for a
# line on its console between them):
#   1. the virtio-balloon driver binds to the ACPI-declared virtio-mmio device;
#   2. inflate to 100 MiB: the guest's MemFree (and with deflate_on_oom=false its MemTotal)
#      drops ~100 MiB, the VMM's RSS does not grow;
#   3. statistics arrive; deflate to 0 gives the memory back;
#   4. the guest fills and frees 200 MiB: free page reporting marks pages Reported and the
#      VMM's RSS drops again;
#   5. a free page hinting run starts, reports its status, and stops;
#   6. no queue notification exited to the VMM (the ioeventfds absorbed them all).
# Host lines start with HOST, guest lines with GUEST; the VMM's log and the console follow.
set -u
SOCK=/tmp/vmm.sock
CON=/tmp/console.log
IN=/tmp/console.in
DEFLATE_ON_OOM=${1:-true}
BALLOON=amount_mib=0,deflate_on_oom=$DEFLATE_ON_OOM,stats_polling_interval_s=1,free_page_reporting=true,free_page_hinting=true
GUEST='cat /sys/bus/virtio/devices/*/device; echo GUEST-DRIVER $(readlink /sys/bus/virtio/devices/virtio0/driver); (while :; do echo GUEST-MEM $(grep ^Mem[TFA] /proc/meminfo); sleep 2; done) & read go; echo GUEST-FILL; dd if=/dev/zero of=/tmp/f bs=1M count=200; echo GUEST-FILLED; read go; rm /tmp/f; echo GUEST-FREED; read go; echo GUEST-END'

log() { echo "HOST [$(cut -d' ' -f1 /proc/uptime)] $*"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$VMM/status" 2>/dev/null || echo 0; }
api() { ./vmm "$@" --api-sock "$SOCK"; }
balloon_field() { api balloon status --json | tr -d ' ,' | grep "^\"$1\":" | head -n1 | cut -d: -f2; }
fail() { log "FAIL: $*"; FAILED=1; }
wait_console() {
    n=0
    while ! grep -q "$1" "$CON" 2>/dev/null; do
        n=$((n + 1))
        [ "$n" -gt "$2" ] && { fail "no '$1' on the console after $2 s"; return 1; }
        sleep 1
    done
}
wait_actual() {
    n=0
    while [ "$(balloon_field actual_mib)" != "$1" ]; do
        n=$((n + 1))
        [ "$n" -gt "$2" ] && { fail "balloon actual_mib did not reach $1 in $2 s"; return 1; }
        sleep 1
    done
}
guest_mem() { grep GUEST-MEM "$CON" | tail -n1 | tr -d '\r'; }
snapshot() {
    log "$1: VMM RSS $(rss_kib) KiB; guest: $(guest_mem)"
    api balloon status --json | tr -d '\n ' | sed 's/^/HOST   balloon: /'
    echo
}

FAILED=0
log "a VM without a balloon"
./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib 256 --vcpus 1 --api-sock "$SOCK" \
    --serial /tmp/console0.log --cmdline "quiet vmm_workload=idle" </dev/null >/tmp/vmm0.log 2>&1 &
n=0
while [ ! -S "$SOCK" ] && [ "$n" -lt 30 ]; do sleep 1; n=$((n + 1)); done
sleep 1
OUT=$(api balloon set --amount-mib 10 2>&1)
log "vmm balloon set without a balloon: $OUT"
echo "$OUT" | grep -q "HTTP 409" || fail "no 409 without a balloon"
echo "$OUT" | grep -q "must be configured at start: vmm run --balloon" || fail "409 without the hint"
api status --json | tr -d '\n ' | grep -o '"devices":\[[^]]*\]' | sed 's/^/HOST   GET \/ /'
echo
api stop

rm -f "$SOCK" "$CON" "$IN"
mkfifo "$IN"
./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib 512 --vcpus 2 \
    --balloon "$BALLOON" --api-sock "$SOCK" --serial "$CON" \
    --cmdline "quiet vmm_run=\"$GUEST\"" <"$IN" >/tmp/vmm.log 2>&1 &
VMM=$!
exec 3>"$IN"
log "vmm pid $VMM, balloon $BALLOON"

wait_console VMM-GUEST-READY 240 || { cat /tmp/vmm.log "$CON"; exit 1; }
wait_console GUEST-DRIVER 30
sleep 3
log "virtio devices (guest):"
grep -E '^0x|GUEST-DRIVER' "$CON" | tr -d '\r' | sed 's/^/HOST   /'
grep -q '^0x0005' "$CON" || fail "no virtio device 0x0005 in the guest"
grep -q 'GUEST-DRIVER.*virtio_balloon' "$CON" || fail "virtio_balloon did not bind"
api status --json | tr -d '\n ' | grep -o '"devices":\[[^]]*\]' | sed 's/^/HOST   GET \/ /'
echo
snapshot "before inflate"
RSS0=$(rss_kib)

log "vmm balloon set --amount-mib 100"
api balloon set --amount-mib 100
wait_actual 100 120
sleep 5
snapshot "inflated to 100 MiB"
RSS1=$(rss_kib)
[ "$RSS1" -le $((RSS0 + 8192)) ] || fail "RSS grew by $((RSS1 - RSS0)) KiB while inflating"

log "vmm balloon stats"
api balloon stats | sed 's/^/HOST   /'
api balloon stats --polling-interval-s 2 | sed 's/^/HOST   /'

log "vmm balloon set --amount-mib 0"
api balloon set --amount-mib 0
wait_actual 0 120
sleep 5
snapshot "deflated"

log "guest: fill 200 MiB of tmpfs"
echo go >&3
wait_console GUEST-FILLED 120
sleep 3
snapshot "guest filled 200 MiB"
RSS2=$(rss_kib)
REPORTED2=$(api balloon status --json | tr -d ' \n' | grep -o '"reported_pages":[0-9]*' | head -n1 | cut -d: -f2)

log "guest: free it"
echo go >&3
wait_console GUEST-FREED 60
sleep 25
snapshot "guest freed 200 MiB, 25 s later"
RSS3=$(rss_kib)
REPORTED3=$(api balloon status --json | tr -d ' \n' | grep -o '"reported_pages":[0-9]*' | head -n1 | cut -d: -f2)
log "RSS after fill ${RSS2} KiB -> after free ${RSS3} KiB; Reported pages ${REPORTED2:-?} -> ${REPORTED3:-?}"
[ "${REPORTED3:-0}" -gt "${REPORTED2:-0}" ] || fail "no pages became Reported"
[ "$RSS3" -lt $((RSS2 - 51200)) ] || fail "RSS did not drop by 50 MiB after the guest freed 200 MiB"

log "vmm balloon hint start"
api balloon hint start
sleep 10
api balloon hint status | sed 's/^/HOST   /'
log "vmm balloon hint stop"
api balloon hint stop
sleep 3
api balloon hint status | sed 's/^/HOST   /'
snapshot "after hinting"
EXITS=$(api status --json | tr -d '\n ' | grep -o '"exit_notifications":[0-9]*' | cut -d: -f2)
log "queue notifications that exited to the VMM: ${EXITS:-?}"
[ "${EXITS:-1}" = 0 ] || fail "queue notifications exited to the VMM (ioeventfd not used)"
FIRST_MEM=$(grep GUEST-MEM "$CON" | head -n1 | tr -d '\r')
log "guest memory at start: $FIRST_MEM"
grep GUEST-MEM "$CON" | tr -d '\r' | awk '{print $3}' | sort -n | uniq | tr '\n' ' ' | sed 's/^/HOST   MemTotal values seen (kB): /'
echo

echo go >&3
wait_console GUEST-END 30
n=0
while kill -0 "$VMM" 2>/dev/null && [ "$n" -lt 60 ]; do sleep 1; n=$((n + 1)); done
kill "$VMM" 2>/dev/null
log "--- vmm log"
cat /tmp/vmm.log
log "--- guest console"
tr -d '\r' <"$CON"
[ "$FAILED" = 0 ] && log "PASS" || log "FAILED"
exit "$FAILED"
