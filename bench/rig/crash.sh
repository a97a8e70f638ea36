#!/bin/sh
# Crash-safety trials under real KVM (runs inside the kvm rig; `cargo run --release -p bench -- crash`).
# Payload: static vmm + vmlinuz + initramfs.cpio + loop.ko (from the rig kernel) + this script.
#   sh crash.sh [TRIALS]
# 1. TRIALS times: restore a base snapshot, ask it for a snapshot over /tmp/cr/target (which holds
#    the previous one), SIGKILL the VMM after a random delay, then `vmm inspect` the path: it must
#    verify (the previous snapshot, or the new one if the write finished before the kill). Every
#    10th trial and the last restore what is there and check the guest re-hashes its buffer.
#    Then one finished snapshot must sweep the killed writers' hidden temporaries.
# 2. ENOSPC: a snapshot into an 8 MiB tmpfs fails with a clear error; the VM runs on.
# 3. A deferred write-back error: ext2 on a loop device whose backing file sits on a small tmpfs,
#    so writes succeed into the page cache and the error surfaces at fsync; the VM runs on.
# Prints one `CRASH-BENCH {json}` line per trial/case.
set -u
. ./lib.sh   # now_ms, wait_for, json_num, guest_rss_kib
TRIALS=${1:-40}
W=/tmp/cr
SOCK=$W/api.sock
GUEST="dd if=/dev/urandom of=/tmp/buf bs=1M count=64 2>/dev/null; while :; do echo CR-HASH \$(sha256sum /tmp/buf | cut -c1-64); sleep 1; done"
mkdir -p $W

running() { ./vmm status --api-sock "$SOCK" --json 2>/dev/null | grep -qi '"state": *"running"'; }
inspect_id() { # DIR: prints the snapshot ID if every checksum verifies, else nothing
    ./vmm inspect "$1" --json 2>/dev/null >$W/inspect.json && grep '"snapshot_id"' $W/inspect.json | cut -d'"' -f4
}
restore_bg() { # DIR CONSOLE [flags]: restore serving $SOCK, in the background ($VMM)
    rm -f "$SOCK"; d=$1; c=$2; shift 2
    ./vmm restore --snapshot "$d" --api-sock "$SOCK" --serial "$c" "$@" </dev/null >$W/restore.log 2>&1 &
    VMM=$!
    wait_for running 60
}
temporaries() { ls -a $W | grep -c '^\.target\.tmp-'; }

# Base: boot, wait for the buffer's hash, snapshot with --after stop.
rm -rf $W/base $W/target $W/.target.tmp-*
./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib 192 --vcpus 1 --api-sock "$SOCK" \
    --serial $W/boot.log --cmdline "quiet vmm_run=\"$GUEST\"" </dev/null >$W/vmm.log 2>&1 &
VMM=$!
if ! wait_for "grep -q CR-HASH $W/boot.log" 300; then
    echo "CRASH-BENCH {\"kind\":\"setup\",\"ok\":false,\"error\":\"guest not ready\"}"; kill -9 $VMM; exit 1
fi
HASH=$(grep CR-HASH $W/boot.log | head -n1 | cut -d' ' -f2)
./vmm snapshot --api-sock "$SOCK" --out $W/base --after stop --json >$W/base.json 2>&1
wait $VMM
WRITE_MS=$(json_num $W/base.json write_ms | cut -d. -f1)
MEM_BYTES=$(json_num $W/base.json memory_file_bytes)
cp -r $W/base $W/target
PREV=$(inspect_id $W/target)
SPAN=$(( ${WRITE_MS:-1000} * 3 / 2 + 300 ))
echo "CRASH-BENCH {\"kind\":\"setup\",\"ok\":$([ -n "$PREV" ] && echo true || echo false),\"write_ms\":${WRITE_MS:-null},\"memory_file_bytes\":${MEM_BYTES:-null},\"kill_span_ms\":$SPAN}"

i=1
while [ "$i" -le "$TRIALS" ]; do
    restore_bg $W/base $W/con.log --skip-memory-verify || { echo "CRASH-BENCH {\"kind\":\"kill\",\"trial\":$i,\"ok\":false,\"error\":\"restore not running\"}"; kill -9 $VMM; wait $VMM; i=$((i + 1)); continue; }
    delay=$(awk -v seed="$(( $(now_ms) + i ))" -v span=$SPAN 'BEGIN { srand(seed); print int(rand() * span) }')
    ./vmm snapshot --api-sock "$SOCK" --out $W/target --json >$W/snap.out 2>$W/snap.err &
    SNAP=$!
    sleep "$(awk "BEGIN{printf \"%.3f\", $delay / 1000}")"
    kill -9 $VMM; wait $VMM 2>/dev/null
    wait $SNAP; snap_rc=$?
    id=$(inspect_id $W/target)
    if [ -z "$id" ]; then
        [ -e $W/target ] && found=damaged || found=missing
    elif [ "$id" = "$PREV" ]; then found=previous
    else found=new; PREV=$id
    fi
    temps=$(temporaries); verifying=0
    for t in $(ls -a $W | grep '^\.target\.tmp-'); do
        [ -n "$(inspect_id $W/$t)" ] && verifying=$((verifying + 1))
    done
    restored=null
    if [ $((i % 10)) -eq 0 ] || [ "$i" -eq "$TRIALS" ]; then
        rm -f $W/con2.log
        restored=false
        if restore_bg $W/target $W/con2.log && wait_for "grep -q 'CR-HASH $HASH' $W/con2.log" 120; then restored=true; fi
        kill -9 $VMM; wait $VMM 2>/dev/null
    fi
    echo "CRASH-BENCH {\"kind\":\"kill\",\"trial\":$i,\"ok\":true,\"delay_ms\":$delay,\"snapshot_rc\":$snap_rc,\"found\":\"$found\",\"temporaries\":$temps,\"temporaries_verifying\":$verifying,\"restored\":$restored,\"disk_kib\":$(du -k -s $W | cut -f1)}"
    i=$((i + 1))
done

# A finished snapshot sweeps the temporaries killed writers left.
before=$(temporaries)
restore_bg $W/base $W/con.log --skip-memory-verify
./vmm snapshot --api-sock "$SOCK" --out $W/target --json >$W/snap.out 2>$W/snap.err; rc=$?
echo "CRASH-BENCH {\"kind\":\"sweep\",\"ok\":$([ $rc -eq 0 ] && [ "$(temporaries)" -eq 0 ] && echo true || echo false),\"temporaries_before\":$before,\"temporaries_after\":$(temporaries)}"

# Error cases on the still running VM: it must fail clearly and run on.
error_case() { # KIND DIR
    lines=$(grep -c CR-HASH $W/con.log)
    ./vmm snapshot --api-sock "$SOCK" --out "$2" --json >$W/err.out 2>$W/err.txt; rc=$?
    err=$(grep -m1 'error' $W/err.txt | tr -d '"\\' | cut -c1-300)
    left=$(ls -a "$(dirname "$2")" | grep -vc '^\.\.\?$\|^lost+found$')
    alive=false
    running && wait_for "[ \$(grep -c CR-HASH $W/con.log) -gt $lines ]" 60 && alive=true
    echo "CRASH-BENCH {\"kind\":\"$1\",\"ok\":$([ $rc -ne 0 ] && [ "$alive" = true ] && echo true || echo false),\"snapshot_rc\":$rc,\"error\":\"$err\",\"entries_left\":$left,\"vm_alive\":$alive}"
}
mkdir -p $W/small && mount -t tmpfs -o size=8m tmpfs $W/small && error_case enospc_tmpfs $W/small/snap
umount $W/small

if insmod ./loop.ko 2>/dev/null || [ -e /dev/loop-control ]; then
    mkdir -p $W/lodisk $W/lomnt
    mount -t tmpfs -o size=24m tmpfs $W/lodisk
    truncate -s 512M $W/lodisk/disk.img
    dev=$(losetup -f)
    if losetup "$dev" $W/lodisk/disk.img && mke2fs -q -N 64 "$dev" >/dev/null 2>&1 && mount -t ext2 "$dev" $W/lomnt; then
        error_case writeback_error_loop $W/lomnt/snap
        umount -l $W/lomnt; losetup -d "$dev"
    else
        echo "CRASH-BENCH {\"kind\":\"writeback_error_loop\",\"ok\":false,\"error\":\"could not set up ext2 on a loop device\"}"
    fi
    umount $W/lodisk
else
    echo "CRASH-BENCH {\"kind\":\"writeback_error_loop\",\"ok\":false,\"error\":\"no loop device support in the rig\"}"
fi
kill -TERM $VMM; wait $VMM 2>/dev/null
exit 0
