#!/bin/sh
# Trim benchmark under real KVM: what the guest-trimmer daemon costs while idle (kdamond and
# daemon CPU time, daemon RSS), and a trim's time and bytes freed per step, measured in the
# guest (/proc/meminfo) and on the host (RSS of guest RAM before and after).
# Prints one `TRIM-BENCH {json}` line per run. Runs inside the kvm rig (busybox userland):
#   payload = static vmm + vmlinuz + initramfs.cpio + data.ext4 (from `vmm image build`) + lib.sh + this script
#   cargo run --release -p bench -- trim [--runs N]   (or by hand:)
#   flock /tmp/kvm-rig.lock ../shared/kvm-rig/run.sh --timeout 1200 PAYLOAD -- sh trim.sh [RUNS]
# Each run boots one guest per variant (TRIM_BENCH_VARIANTS, comma-separated): `trim-intervals` (s512 as
# shipped: DAMON switched to short intervals for the trim), `idle-intervals` (s512 with
# `trim --idle-intervals`: the daemon's idle intervals throughout) and `fast` (fast.json: no
# compaction, no reporting wait; the runtime registers its release hook, which every policy's
# hooks step runs), so they compare in one rig boot. Each guest also times fixed CPU loops (`guest-trimmer cpu-calibrate`) after the trim,
# for scaling its CPU time to the host's.
# Guest: 512 MiB, 2 vCPUs, `quiet`, balloon with free page reporting, the S512 data disk
# read-only. Workload (the standard scenario S512): a runtime with a 64 MiB heap cache released
# by its hook, 64 MiB of live anonymous data, 256 MiB of files read once from the data disk
# (cold), 32 MiB re-read in a loop until the trim (hot). Policy: the built-in `s512`
# (default.json plus the runtime hook). After the trim: page cache residency of both sets.
set -u
. ./lib.sh   # now_ms, wait_for, json_num, guest_rss_kib
POLL_S=0.1
RUNS=${1:-3}
IDLE_S=${TRIM_BENCH_IDLE_S:-40}
VARIANTS=$(echo "${TRIM_BENCH_VARIANTS:-trim-intervals,idle-intervals}" | tr , ' ')
SOCK=/tmp/tb.sock
CON=/tmp/tb-console.log
MEM_MIB=512
BALLOON=amount_mib=0,free_page_reporting=true
# Guest script (kernel command line: no double quotes; `@` becomes `"` through `j`); $1: trim
# arguments.
guest_script() {
    printf %s "set -f; j(){ printf '%s\\n' \$1 | tr @ '\\042'; }; G=guest-trimmer; C=/run/guest-trimmer.sock; \
i=0; while [ ! -S \$C ] && [ \$i -lt 300 ]; do sleep 0.1; i=\$((i+1)); done; \
\$G workload runtime --mib 64 --pid-file /run/rt.pid --socket /run/rt.sock --register-hook-in /run/guest-trimmer/hooks.d & \
\$G workload live-anon --mib 64 --check-file /run/chk & sleep 5; \
\$G workload cold-read /mnt/data/cold; \$G workload hot-loop /mnt/data/hot --until-file /run/stophot & \
echo TB-IDLE0 \$(cat /proc/uptime) \$(\$G ctl --unix \$C \$(j {@op@:@stats@})); sleep $IDLE_S; \
echo TB-IDLE1 \$(cat /proc/uptime) \$(\$G ctl --unix \$C \$(j {@op@:@stats@})); \
echo TB-GO; sleep 2; echo TB-TRIM \$(\$G trim $1 --unix \$C --json); touch /run/stophot; \
\$G workload mincore /mnt/data/cold --label cold; \$G workload mincore /mnt/data/hot --label hot; \
touch /run/chk; sleep 1; echo TB-CAL \$(\$G cpu-calibrate); echo TB-DONE; sleep 3600"
}

line_of() { grep -a "$1" "$CON" | head -n1 | sed "s/.*$1 //" | tr -d '\r'; }

run=1
while [ "$run" -le "$RUNS" ]; do
  for variant in $VARIANTS; do
    case $variant in
        trim-intervals) flags="--builtin s512" ;;
        idle-intervals) flags="--builtin s512 --idle-intervals" ;;
        fast) flags="--builtin fast" ;;
        *) echo "trim.sh: unknown variant $variant" >&2; exit 2 ;;
    esac
    rm -f "$SOCK" "$CON"
    ./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib $MEM_MIB --vcpus 2 --balloon "$BALLOON" \
        --disk data.ext4,ro \
        --api-sock "$SOCK" --serial "$CON" --cmdline "quiet vmm_run=\"$(guest_script "$flags")\"" </dev/null >/tmp/tb-vmm.log 2>&1 &
    VMM=$!
    ok=true; err=""
    wait_for 'grep -q TB-GO "$CON" 2>/dev/null' $((300 + IDLE_S)) || { ok=false; err="guest never reached the trim"; }
    rss_before=$(guest_rss_kib $VMM)
    wait_for 'grep -q "TB-TRIM " "$CON"' 300 || { ok=false; err="trim did not finish in 300 s"; }
    # Reporting continues after the trim's bounded wait: sample the host side 3 s later too.
    rss_after=$(guest_rss_kib $VMM)
    sleep 3
    rss_after3=$(guest_rss_kib $VMM)
    # A booted guest has resident memory: 0 means the guest RAM mapping was not found in smaps
    # (e.g. merged with a neighbouring mapping), not a measurement.
    [ "$rss_before" -gt 0 ] && [ "$rss_after" -gt 0 ] || { ok=false; err="${err:-no ${MEM_MIB} MiB guest RAM mapping in /proc/$VMM/smaps}"; }
    wait_for 'grep -q TB-DONE "$CON"' 300 || { ok=false; err="${err:-guest did not finish after the trim}"; }
    check=$(line_of WORKLOAD-LIVE-ANON-CHECK)
    cold=$(line_of "WORKLOAD-MINCORE cold"); hot=$(line_of "WORKLOAD-MINCORE hot")
    idle0=$(line_of TB-IDLE0); idle1=$(line_of TB-IDLE1); trim=$(line_of TB-TRIM)
    cal=$(line_of "TB-CAL CPU-CALIBRATE")
    ./vmm stop --api-sock "$SOCK" >/dev/null 2>&1
    wait $VMM
    [ -n "$trim" ] || { trim=null; ok=false; err="${err:-no trim reply}"; }
    [ -n "$cal" ] || cal=null
    # idle lines: `<uptime> <idle> {json}`
    up0=${idle0%% *}; up1=${idle1%% *}
    j0=${idle0#* }; j0=${j0#* }; j1=${idle1#* }; j1=${j1#* }
    [ -n "$j0" ] || j0=null
    [ -n "$j1" ] || j1=null
    printf 'TRIM-BENCH {"run":%d,"variant":"%s","ok":%s,"error":"%s","idle_s":%s,"uptime0_s":%s,"uptime1_s":%s,"stats0":%s,"stats1":%s,"host_rss_before_kib":%d,"host_rss_after_kib":%d,"host_rss_after_3s_kib":%d,"live_anon_check":"%s","cold_resident":"%s","hot_resident":"%s","calibration":%s,"reply":%s}\n' \
        "$run" "$variant" "$ok" "$err" "$IDLE_S" "${up0:-0}" "${up1:-0}" "$j0" "$j1" "$rss_before" "$rss_after" "$rss_after3" "$check" "$cold" "$hot" "$cal" "$trim"
  done
  run=$((run + 1))
done
