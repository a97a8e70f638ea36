#!/bin/sh
# Balloon benchmark under real KVM: free page reporting latency (guest frees -> host RSS of guest
# RAM drops), free page hinting run duration per GiB hinted, and inflate rate in MiB/s.
# Prints one `BALLOON-BENCH {json}` line per run. Runs inside the kvm rig (busybox userland):
#   payload = static vmm + vmlinuz + initramfs.cpio (from `vmm image build`) + lib.sh + this script
#   flock /tmp/kvm-rig.lock ../shared/kvm-rig/run.sh --timeout 900 PAYLOAD -- sh balloon.sh [RUNS]
# Guest: 512 MiB, 2 vCPUs, `quiet`, balloon with reporting, hinting and 1 s statistics.
set -u
. ./lib.sh   # now_ms, wait_for, json_num, guest_rss_kib
RUNS=${1:-3}
SOCK=/tmp/bb.sock
CON=/tmp/bb-console.log
MEM_MIB=512
FREE_MIB=256
INFLATE_MIB=256
BALLOON=amount_mib=0,deflate_on_oom=true,stats_polling_interval_s=1,free_page_reporting=true,free_page_hinting=true
# The guest touches and frees FREE_MIB, then idles while the host runs hinting and inflation.
GUEST="sleep 2; guest-trimmer alloc --mib $FREE_MIB --hold-s 2; sleep 3600"

api() { ./vmm "$@" --api-sock "$SOCK"; }
field() { api balloon "$1" --json | tr -d ' ,' | grep "^\"$2\":" | head -n1 | cut -d: -f2; }

run=1
while [ "$run" -le "$RUNS" ]; do
    rm -f "$SOCK" "$CON"
    ./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib $MEM_MIB --vcpus 2 --balloon "$BALLOON" \
        --api-sock "$SOCK" --serial "$CON" --cmdline "quiet vmm_run=\"$GUEST\"" </dev/null >/tmp/bb-vmm.log 2>&1 &
    VMM=$!
    ok=true; err=""
    wait_for 'grep -q ALLOC-DONE "$CON" 2>/dev/null' 300 || { ok=false; err="guest never allocated"; }
    peak_kib=$(guest_rss_kib $VMM)
    wait_for 'grep -q ALLOC-FREED "$CON"' 30 || { ok=false; err="guest never freed"; }
    freed_at=$(now_ms)
    # Reported: the guest RAM's RSS falls by at least 80 % of what was freed.
    target_kib=$((peak_kib - FREE_MIB * 1024 * 8 / 10))
    if wait_for '[ "$(guest_rss_kib $VMM)" -le "$target_kib" ]' 60; then
        report_ms=$(( $(now_ms) - freed_at ))
    else
        report_ms=null; ok=false; err="RSS did not drop by 80 % of $FREE_MIB MiB in 60 s"
    fi
    after_kib=$(guest_rss_kib $VMM)

    sleep 2
    hint_start=$(now_ms)
    api balloon hint start >/dev/null
    wait_for '[ "$(api balloon hint status | awk "/^running/ {print \$2}")" = false ]' 120 \
        || { ok=false; err="hinting run did not end in 120 s"; }
    hint_ms=$(( $(now_ms) - hint_start ))
    hinted_pages=$(api balloon hint status | awk '/^pages_hinted/ {print $2}')
    hinted_pages=${hinted_pages:-0}

    inflate_start=$(now_ms)
    api balloon set --amount-mib $INFLATE_MIB >/dev/null
    if wait_for '[ "$(field status actual_mib)" = "$INFLATE_MIB" ]' 120; then
        inflate_ms=$(( $(now_ms) - inflate_start ))
    else
        inflate_ms=null; ok=false; err="balloon did not reach $INFLATE_MIB MiB in 120 s"
    fi
    api stop >/dev/null 2>&1
    wait $VMM

    awk -v run=$run -v ok=$ok -v err="$err" -v peak=$peak_kib -v after=$after_kib -v rep="$report_ms" \
        -v hms=$hint_ms -v hp=$hinted_pages -v ims="$inflate_ms" -v imib=$INFLATE_MIB -v fmib=$FREE_MIB 'BEGIN {
        gib = hp * 4096 / 1073741824
        printf "BALLOON-BENCH {\"run\":%d,\"ok\":%s,\"error\":\"%s\",\"freed_mib\":%d,\"guest_rss_peak_kib\":%d,\"guest_rss_after_report_kib\":%d,\"report_latency_ms\":%s,", run, ok, err, fmib, peak, after, rep
        printf "\"hint_run_ms\":%d,\"hinted_pages\":%d,\"hint_ms_per_gib\":%s,", hms, hp, (gib > 0 ? sprintf("%.0f", hms / gib) : "null")
        printf "\"inflate_mib\":%d,\"inflate_ms\":%s,\"inflate_mib_per_s\":%s}\n", imib, ims, (ims == "null" || ims == 0 ? "null" : sprintf("%.1f", imib * 1000 / ims))
    }'
    run=$((run + 1))
done
