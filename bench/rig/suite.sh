#!/bin/sh
# Benchmark suite under real KVM: ours (raw full dump, compact untrimmed, trimmed with the
# default and the aggressive policy) and QEMU (plain `migrate` to a file, and `mapped-ram` after
# an in-guest cache drop with free page reporting at order 0) on the same S512 guest, in one rig
# boot. Prints one `SUITE-BENCH {json}` line per variant and run (and `SUITE-SNAPJSON` lines with
# our `vmm snapshot --json` output); `bench suite` reads them. Runs inside the kvm rig:
#   payload = static vmm + static bench (QMP client) + vmlinuz + initrd + data.ext4 + lib.sh + QEMU
#             (lib/, fw/) + qemu-append.txt (our default kernel command line) + this script
#   cargo run --release -p bench -- suite [--runs N]   (or scripts/bench-suite)
# Environment: SUITE_COLD_WAIT_S (cold set idle before our snapshots, default 25: past the
# default policy's 20 s cold age), SUITE_QEMU_MAPPED_RAM=0 (the QEMU has no mapped-ram: skip it,
# with the reason in SUITE_QEMU_MAPPED_RAM_WHY).
# The guest answers on its console: `P` -> `SUITE-PONG`, `H` -> re-reads the hot set and prints
# `SUITE-HOT <uptime before> <idle> <uptime after> <idle>`, `D` -> drops caches, compacts, waits
# 5 s for free page reporting, `SUITE-DROPPED`, `K` -> the end of the kernel log, `SUITE-KDONE`.
set -u
. ./lib.sh   # now_ms, wait_for, json_num, guest_rss_kib
POLL_S=0.02
# Settings from the host side (bench suite).
[ -f ./suite.env ] && . ./suite.env
RUNS=${1:-5}
COLD_WAIT_S=${SUITE_COLD_WAIT_S:-25}
MAPPED_RAM=${SUITE_QEMU_MAPPED_RAM:-1}
MAPPED_RAM_WHY=${SUITE_QEMU_MAPPED_RAM_WHY:-}
W=/tmp/suite
GUEST="G=guest-trimmer; \$G workload runtime --mib 64 --pid-file /run/rt.pid --socket /run/rt.sock --register-hook-in /run/guest-trimmer/hooks.d & \
\$G workload live-anon --mib 64 --check-file /run/chk & \$G workload cold-read /mnt/data/cold; \
\$G workload hot-loop /mnt/data/hot & echo SUITE-WORKLOAD-READY; \
while read c; do case \$c in P*) echo SUITE-PONG;; \
H*) a=\$(cat /proc/uptime); \$G workload cold-read /mnt/data/hot >/dev/null; echo SUITE-HOT \$a \$(cat /proc/uptime);; \
D*) sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory; sleep 5; echo SUITE-DROPPED;; \
K*) dmesg | tail -n 12; echo SUITE-KDONE;; \
esac; done"
# Development: SUITE_ONLY=ours|qemu runs one side; SUITE_QEMU_ACCEL replaces `-enable-kvm -cpu host`.
ONLY=${SUITE_ONLY:-}
# Our VMM runs with its seccomp filters, as users run it; SUITE_SECCOMP=0 turns them off.
SECCOMP=""
[ "${SUITE_SECCOMP:-1}" = 0 ] && SECCOMP=--no-seccomp
PREFAULT=""
[ "${SUITE_PREFAULT:-0}" = 1 ] && PREFAULT=--prefault
QEMU="./lib/ld-linux-x86-64.so.2 --library-path ./lib ./qemu-system-x86_64 -L ./fw ${SUITE_QEMU_ACCEL:--enable-kvm -cpu host} \
-M microvm,acpi=on -m 512 -smp 2 -nodefaults -no-user-config -display none -serial stdio \
-no-reboot -kernel vmlinuz -initrd initrd \
-drive id=data,file=data.ext4,format=raw,if=none,readonly=on -device virtio-blk-device,drive=data \
-device virtio-balloon-device,free-page-reporting=on"
QEMU_APPEND="$(cat qemu-append.txt) quiet page_reporting.page_reporting_order=0 vmm_trimmer=off vmm_run=\"$GUEST\""

# Allocated (st_blocks * 512) and apparent bytes of the files below $1: "ALLOC APPARENT".
disk_bytes() {
    find "$1" -type f -exec stat -c '%b %B %s' {} \; | awk '{a += $1 * $2; s += $3} END {if (NR == 0) printf "null null"; else printf "%d %d", a, s}'
}
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
# Opens fifo $1 on fd 3 (read-write: never blocks) for a VMM's stdin (its serial console input).
open_fifo() { rm -f "$1"; mkfifo "$1"; exec 3<>"$1"; }
close_fifo() { exec 3>&-; }
# ping CONSOLE LIMIT_S: sends `P` every 50 ms until the guest answers.
ping_guest() {
    deadline=$(( $(now_ms) + $2 * 1000 ))
    while ! grep -q SUITE-PONG "$1" 2>/dev/null; do
        [ "$(now_ms)" -gt "$deadline" ] && return 1
        echo P >&3
        sleep 0.05
    done
}
# hot_request CONSOLE: asks for the hot set re-read; sets hot_guest_ms and hot_wall_ms.
hot_request() {
    t=$(now_ms)
    echo H >&3
    hot_guest_ms=null; hot_wall_ms=null
    hot_con=$1
    wait_for 'grep -q "SUITE-HOT " "$hot_con"' 120 || return 1
    hot_wall_ms=$(( $(now_ms) - t ))
    hot_guest_ms=$(grep -a -o 'SUITE-HOT .*' "$hot_con" | head -n1 | tr -d '\r' | awk '{printf "%d", ($4 - $2) * 1000}')
}
emit() { echo "SUITE-BENCH {\"run\":$run,\"variant\":\"$1\",$2}"; }
fail() { emit "$1" "\"ok\":false,\"error\":\"$2\""; }

# record_working_set VARIANT: an unmeasured clone of $W/$VARIANT answers, serves a first request
# and records the guest pages it touched in its first SUITE_RECORD_MS ms (working-set.json in the
# snapshot), which the measured restore then brings in ($SUITE_WORKING_SET_MODE: from a thread while
# its vCPUs run, or before they run).
record_working_set() {
    rcon=$W/reccon-$1.log; rm -f "$rcon" $W/rec.sock
    open_fifo $W/rin-$1
    ./vmm restore $SECCOMP --record-working-set-ms "${SUITE_RECORD_MS:-15000}" --snapshot "$W/$1" --serial "$rcon" \
        --api-sock $W/rec.sock <$W/rin-$1 >$W/rec-$1.log 2>&1 &
    RR=$!
    ping_guest "$rcon" 120 && hot_request "$rcon"
    wait_for "grep -q 'working set recorded' $W/rec-$1.log" 120
    grep -a "working set" $W/rec-$1.log | sed "s/^/SUITE-LOG $1 record: /"
    ./vmm stop --api-sock $W/rec.sock >/dev/null 2>&1 || kill -TERM $RR
    wait $RR
    close_fifo
}

# restore_ours VARIANT: restores $W/$VARIANT, first answer, first request, RSS; one result line.
restore_ours() {
    v=$1; con=$W/con-$v.log; rm -f "$con" $W/rm.json $W/rs.sock
    [ "${SUITE_WORKING_SET:-0}" = 1 ] && record_working_set "$v"
    open_fifo $W/in-$v
    t0=$(now_ms)
    # The timeline milestones (metrics.rs) log at debug level.
    VMM_LOG=${SUITE_RESTORE_LOG:-info,vmm::metrics=debug} \
    ./vmm restore $SECCOMP $PREFAULT --working-set "${SUITE_WORKING_SET_MODE:-before-start}" \
        --snapshot "$W/$v" --serial "$con" --api-sock $W/rs.sock --metrics-file $W/rm.json \
        <$W/in-$v >$W/restore-$v.log 2>&1 &
    R=$!
    ok=true; err=""
    ping_guest "$con" 120 || { ok=false; err="no answer after restore"; }
    answer_ms=$(( $(now_ms) - t0 ))
    $ok && { hot_request "$con" || { ok=false; err="no answer to the hot-set request"; }; }
    rss=$(status_kib $R VmRSS); anon=$(status_kib $R RssAnon); file=$(status_kib $R RssFile)
    # The guest kernel's log after the restore (clock, RCU or watchdog complaints show there).
    echo K >&3
    wait_for 'grep -q SUITE-KDONE "$con"' 60
    grep -a -v -E '^P?.?$|SUITE-PONG' "$con" | tail -n 16 | sed "s/^/SUITE-LOG $v console: /"
    ./vmm stop --api-sock $W/rs.sock >/dev/null 2>&1 || kill -TERM $R
    wait $R
    close_fifo
    running=$(json_num $W/rm.json setup_ms)
    echo "SUITE-LOG $v restore timeline (ms since process start): $(tr -d ' \n' < $W/rm.json)"
    grep -a -E 'milestone|vsock|after.restore|restored|working set|memory ready' $W/restore-$v.log | sed "s/^/SUITE-LOG $v restore: /"
    set -- $(disk_bytes "$W/$v")
    emit "$v" "\"ok\":$ok,\"error\":\"$err\",\"boot_ms\":$boot_ms,\"snapshot_ms\":${snap_ms_of_v:-null},\"snapshot_wall_ms\":${snap_wall_of_v:-null},\"snapshot_alloc_bytes\":$1,\"snapshot_apparent_bytes\":$2,\"restore_running_ms\":${running:-null},\"restore_answer_ms\":$answer_ms,\"first_request_ms\":$hot_guest_ms,\"first_request_wall_ms\":$hot_wall_ms,\"rss_kib\":${rss:-null},\"rss_anon_kib\":${anon:-null},\"rss_file_kib\":${file:-null}"
    rm -rf "${W:?}/$v"
}

# ours_run: one boot, four snapshots (raw, untrimmed, default, aggressive), four restores.
ours_run() {
    rm -rf $W/raw $W/untrimmed $W/default $W/aggressive; rm -f $W/api.sock $W/v.sock $W/con.log
    open_fifo $W/in
    t0=$(now_ms)
    ./vmm run $SECCOMP --kernel vmlinuz --initrd initrd --mem-mib 512 --vcpus 2 --disk data.ext4,ro \
        --balloon amount_mib=0,free_page_reporting=true --vsock-uds $W/v.sock --api-sock $W/api.sock \
        --serial $W/con.log --cmdline "quiet vmm_run=\"$GUEST\"" <$W/in >$W/vmm.log 2>&1 &
    VMM=$!
    if ! wait_for 'grep -q VMM-GUEST-READY $W/con.log 2>/dev/null' 300; then
        for v in raw untrimmed default aggressive; do fail $v "our guest did not boot"; done
        kill -9 $VMM; wait $VMM; close_fifo; return
    fi
    boot_ms=$(( $(now_ms) - t0 ))
    if ! wait_for 'grep -q SUITE-WORKLOAD-READY $W/con.log' 300; then
        for v in raw untrimmed default aggressive; do fail $v "our workload did not start"; done
        kill -9 $VMM; wait $VMM; close_fifo; return
    fi
    sleep "$COLD_WAIT_S"
    # The same question to the running original: the answer time without a restore before it.
    t=$(now_ms)
    ping_guest $W/con.log 60 && echo "SUITE-LOG original VM (no restore): answer in $(( $(now_ms) - t )) ms"
    for v in raw untrimmed default aggressive; do
        case $v in
            raw) a="--raw-memory --after resume" ;;
            untrimmed) a="--no-trim --after resume" ;;
            default) a="--policy default --after resume" ;;
            aggressive) a="--policy aggressive --after stop" ;;
        esac
        t=$(now_ms)
        ./vmm snapshot --api-sock $W/api.sock --out $W/$v $a --json >$W/snap-$v.json 2>$W/snap-$v.err
        rc=$?
        eval "wall_$v=$(( $(now_ms) - t ))"
        eval "rc_$v=$rc"
        echo "SUITE-SNAPJSON $run $v $(tr -d '\n' < $W/snap-$v.json)"
    done
    # The last snapshot stops the VM; if it failed, stop it here.
    kill -0 $VMM 2>/dev/null && { ./vmm stop --api-sock $W/api.sock >/dev/null 2>&1 || kill -9 $VMM; }
    wait $VMM
    vmm_rc=$?
    close_fifo
    if [ "$rc_raw$rc_untrimmed$rc_default$rc_aggressive" != 0000 ]; then
        echo "SUITE-LOG our VMM ended with $vmm_rc; the end of its log:"
        tail -n 25 $W/vmm.log | sed 's/^/SUITE-LOG vmm: /'
        dmesg | tail -n 8 | sed 's/^/SUITE-LOG dmesg: /'
    fi
    for v in raw untrimmed default aggressive; do
        if [ "$(eval echo \$rc_$v)" != 0 ]; then
            fail $v "vmm snapshot failed: $(head -c 300 $W/snap-$v.err | tr -d '\"\\\n')"
            continue
        fi
        s=$(json_num $W/snap-$v.json save_state_ms); w=$(json_num $W/snap-$v.json write_ms)
        snap_ms_of_v=$(awk -v a="${s:-0}" -v b="${w:-0}" 'BEGIN {printf "%.3f", a + b}')
        snap_wall_of_v=$(eval echo \$wall_$v)
        restore_ours $v
    done
}

# qemu_restore VARIANT CAPS: -incoming restore of $W/qemu-$VARIANT; one result line.
qemu_restore() {
    v=$1; con=$W/con-$v.log; rm -f "$con" $W/qr.sock
    open_fifo $W/in-$v
    t0=$(now_ms)
    # exec: $! is QEMU itself (its RSS is read from /proc/$Q), not a subshell around it.
    eval "exec $QEMU -append '$QEMU_APPEND' -qmp unix:$W/qr.sock,server=on,wait=off -incoming defer" \
        <$W/in-$v >"$con" 2>$W/qemu-restore-$v.log &
    Q=$!
    ok=true; err=""; running=null
    if ./bench rig-qmp load --sock $W/qr.sock --uri "file:$W/qemu-$v" $2 >$W/qmp-load.json 2>&1; then
        at=$(json_num $W/qmp-load.json running_at_ms)
        running=$(( ${at%.*} - t0 ))
        ping_guest "$con" 120 || { ok=false; err="no answer after restore"; }
    else
        ok=false; err="load failed: $(head -c 300 $W/qmp-load.json | tr -d '\"\\\n')"
    fi
    answer_ms=$(( $(now_ms) - t0 ))
    $ok && { hot_request "$con" || { ok=false; err="no answer to the hot-set request"; }; }
    rss=$(status_kib $Q VmRSS); anon=$(status_kib $Q RssAnon); file=$(status_kib $Q RssFile)
    ./bench rig-qmp quit --sock $W/qr.sock >/dev/null 2>&1 || kill -TERM $Q
    wait $Q
    close_fifo
    set -- $(disk_bytes "$W/qemu-$v")
    emit "qemu-$v" "\"ok\":$ok,\"error\":\"$err\",\"boot_ms\":$boot_ms,\"snapshot_ms\":${save_ms:-null},\"snapshot_alloc_bytes\":$1,\"snapshot_apparent_bytes\":$2,\"restore_running_ms\":$running,\"restore_answer_ms\":$answer_ms,\"first_request_ms\":$hot_guest_ms,\"first_request_wall_ms\":$hot_wall_ms,\"rss_kib\":${rss:-null},\"rss_anon_kib\":${anon:-null},\"rss_file_kib\":${file:-null}"
    rm -f "$W/qemu-$v"
}

# qemu_run: one boot, a plain save, (cont, cache drop) a mapped-ram save, two restores.
qemu_run() {
    rm -f $W/qemu-plain $W/qemu-mapped-ram $W/qs.sock $W/qcon.log
    open_fifo $W/qin
    t0=$(now_ms)
    eval "exec $QEMU -append '$QEMU_APPEND' -qmp unix:$W/qs.sock,server=on,wait=off" \
        <$W/qin >$W/qcon.log 2>$W/qemu.log &
    Q=$!
    if ! wait_for 'grep -q VMM-GUEST-READY $W/qcon.log 2>/dev/null' 300; then
        fail qemu-plain "QEMU's guest did not boot: $(tail -c 200 $W/qemu.log | tr -d '\"\\\n')"
        kill -9 $Q; wait $Q; close_fifo; return
    fi
    boot_ms=$(( $(now_ms) - t0 ))
    if ! wait_for 'grep -q SUITE-WORKLOAD-READY $W/qcon.log' 300; then
        fail qemu-plain "the workload did not start under QEMU"
        kill -9 $Q; wait $Q; close_fifo; return
    fi
    sleep "$COLD_WAIT_S"
    ./bench rig-qmp save --sock $W/qs.sock --uri file:$W/qemu-plain >$W/qmp-plain.json 2>&1
    plain_rc=$?
    plain_ms=$(json_num $W/qmp-plain.json save_ms)
    ./bench rig-qmp cont --sock $W/qs.sock >/dev/null 2>&1
    mr_rc=1
    if [ "$MAPPED_RAM" = 1 ]; then
        echo D >&3
        wait_for 'grep -q SUITE-DROPPED $W/qcon.log' 120
        ./bench rig-qmp save --sock $W/qs.sock --uri file:$W/qemu-mapped-ram --mapped-ram >$W/qmp-mr.json 2>&1
        mr_rc=$?
        mr_ms=$(json_num $W/qmp-mr.json save_ms)
    fi
    ./bench rig-qmp quit --sock $W/qs.sock >/dev/null 2>&1 || kill -TERM $Q
    wait $Q
    close_fifo
    if [ "$plain_rc" = 0 ]; then
        save_ms=$plain_ms; qemu_restore plain ""
    else
        fail qemu-plain "save failed: $(head -c 300 $W/qmp-plain.json | tr -d '\"\\\n')"
    fi
    if [ "$MAPPED_RAM" != 1 ]; then
        fail qemu-mapped-ram "mapped-ram unavailable: $MAPPED_RAM_WHY"
    elif [ "$mr_rc" = 0 ]; then
        save_ms=$mr_ms; qemu_restore mapped-ram --mapped-ram
    else
        fail qemu-mapped-ram "save failed: $(head -c 300 $W/qmp-mr.json | tr -d '\"\\\n')"
    fi
}

mkdir -p $W
echo "SUITE-INFO {\"runs\":$RUNS,\"cold_wait_s\":$COLD_WAIT_S,\"qemu\":\"$(eval "${QEMU%% -L*} --version" | head -n1)\"}"
run=1
while [ "$run" -le "$RUNS" ]; do
    [ "$ONLY" = qemu ] || ours_run
    [ "$ONLY" = ours ] || qemu_run
    run=$((run + 1))
done
echo SUITE-END
