#!/bin/sh
# Snapshot benchmark under real KVM: snapshot bytes on disk and time (pause -> written), restore
# time (process start -> first KVM_RUN, and -> the guest's first console output) with the
# restore's phase breakdown, for our compact memory file and for a raw full dump (every page,
# as Firecracker writes it), each restored with and without chunk verification.
# Prints one `SNAPSHOT-BENCH {json}` line per measurement. Runs inside the kvm rig:
#   payload = static vmm + vmlinuz + initramfs.cpio (from `vmm image build`) + lib.sh + this script
#   flock /tmp/kvm-rig.lock ../shared/kvm-rig/run.sh --timeout 900 PAYLOAD -- sh snapshot.sh [RUNS]
# Guest: 512 MiB, 2 vCPUs, `quiet`; it fills 64 MiB of tmpfs with random bytes, then prints its
# uptime in a tight loop (so the first output after a restore comes right after it resumes).
set -u
. ./lib.sh   # now_ms, wait_for, json_num, guest_rss_kib
POLL_S=0.02
RUNS=${1:-2}
MEM_MIB=512
SOCK=/tmp/sb.sock
CON=/tmp/sb-console.log
GUEST="dd if=/dev/urandom of=/tmp/buf bs=1M count=64 2>/dev/null; echo SB-FILLED; while :; do read up rest < /proc/uptime; echo SB-TICK \$up; done"


run=1
while [ "$run" -le "$RUNS" ]; do
    for mode in compact raw; do
        rm -rf "$SOCK" "$CON" /tmp/sb-snap
        ./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib $MEM_MIB --vcpus 2 \
            --api-sock "$SOCK" --serial "$CON" --cmdline "quiet vmm_run=\"$GUEST\"" </dev/null >/tmp/sb-vmm.log 2>&1 &
        VMM=$!
        if ! wait_for 'grep -q SB-TICK "$CON" 2>/dev/null' 400; then
            echo "SNAPSHOT-BENCH {\"run\":$run,\"mode\":\"$mode\",\"ok\":false,\"error\":\"guest not ready\"}"
            kill -9 $VMM; wait $VMM 2>/dev/null
            continue
        fi
        raw=""; [ "$mode" = raw ] && raw=--raw-memory
        t0=$(now_ms)
        ./vmm snapshot --api-sock "$SOCK" --out /tmp/sb-snap $raw --after stop --json >/tmp/sb-snap.json 2>/tmp/sb-snap.err
        snap_rc=$?
        snap_wall_ms=$(( $(now_ms) - t0 ))
        wait $VMM 2>/dev/null
        file_bytes=$(wc -c < /tmp/sb-snap/memory)
        disk_kib=$(du -k -s /tmp/sb-snap | cut -f1)
        save_ms=$(json_num /tmp/sb-snap.json save_state_ms)
        write_ms=$(json_num /tmp/sb-snap.json write_ms)
        kept=$(json_num /tmp/sb-snap.json kept)
        for verify in yes no; do
            skip=--reverify; [ "$verify" = no ] && skip=--skip-memory-verify
            rm -f /tmp/sb-con2.log /tmp/sb-metrics.json
            # Drop nothing from the page cache (the rig's own caches stay warm: the file was
            # just written, as for clones started right after a snapshot).
            t0=$(now_ms)
            ./vmm restore --snapshot /tmp/sb-snap --serial /tmp/sb-con2.log --metrics-file /tmp/sb-metrics.json $skip \
                </dev/null >/tmp/sb-restore.log 2>&1 &
            R=$!
            ok=true
            wait_for '[ -s /tmp/sb-con2.log ]' 120 || ok=false
            answer_wall_ms=$(( $(now_ms) - t0 ))
            kill -TERM $R; wait $R 2>/dev/null
            setup_ms=$(json_num /tmp/sb-metrics.json setup_ms)
            console_ms=$(json_num /tmp/sb-metrics.json first_console_ms)
            phases=$(grep -o 'phases_ms=[^ ]*\( [a-z_]*_ms=[0-9.]*\)*' /tmp/sb-restore.log | head -n1 | sed 's/phases_ms=//')
            echo "SNAPSHOT-BENCH {\"run\":$run,\"mode\":\"$mode\",\"verify\":\"$verify\",\"ok\":$ok,\"snapshot_rc\":$snap_rc,\"memory_file_bytes\":$file_bytes,\"snapshot_disk_kib\":$disk_kib,\"kept_pages\":${kept:-null},\"snapshot_wall_ms\":$snap_wall_ms,\"save_state_ms\":${save_ms:-null},\"write_ms\":${write_ms:-null},\"restore_to_vcpus_running_ms\":${setup_ms:-null},\"restore_to_first_console_ms\":${console_ms:-null},\"restore_answer_wall_ms\":$answer_wall_ms,\"restore_phases_ms\":\"$phases\"}"
        done
    done
    run=$((run + 1))
done
