#!/bin/sh
# Soak under real KVM (runs inside the kvm rig; `cargo run --release -p bench -- soak`).
# Payload: static vmm + vmlinuz + initramfs.cpio + this script.
#   sh soak.sh [CYCLES] [BUDGET_S] [CLONES]
# Cycles of: restore /tmp/soak/store/snap (chunks verified) -> the guest works (rewrites 4 MiB of
# tmpfs, prints a tick) -> even cycles snapshot over the same path (--after stop), odd cycles
# SIGKILL the VMM. Before each snapshot/kill it records the VMM's open fds, all open fds in the
# rig, the VMM's RSS and the store's disk use. Stops early when BUDGET_S seconds have passed.
# Then CLONES restores of the one snapshot run at once; each prints random bytes read after its
# restore, which must all differ. One `SOAK-BENCH {json}` line per cycle and one for the clones.
set -u
. ./lib.sh   # now_ms, wait_for, json_num, guest_rss_kib
CYCLES=${1:-200}
BUDGET_S=${2:-660}
CLONES=${3:-20}
MEM_MIB=128
W=/tmp/soak
STORE=$W/store
SOCK=$W/api.sock
GUEST="while :; do dd if=/dev/urandom of=/tmp/work bs=1M count=4 2>/dev/null; echo SOAK-TICK \$(cut -d' ' -f1 /proc/uptime) \$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '); sleep 1; done"
mkdir -p $STORE

ticks() { [ -f "$1" ] || { echo 0; return; }; grep -c '^SOAK-TICK [0-9.]* [0-9a-f]\{32\}' "$1"; }
all_fds() { n=0; for d in /proc/[0-9]*/fd; do c=$(ls "$d" 2>/dev/null | wc -l); n=$((n + c)); done; echo $n; }
rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/$1/status 2>/dev/null; }

./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib $MEM_MIB --vcpus 1 --api-sock "$SOCK" \
    --serial $W/boot.log --cmdline "quiet vmm_run=\"$GUEST\"" </dev/null >$W/vmm.log 2>&1 &
VMM=$!
if ! wait_for "[ \$(ticks $W/boot.log) -ge 1 ]" 300; then
    echo "SOAK-BENCH {\"kind\":\"setup\",\"ok\":false,\"error\":\"guest not ready\"}"; kill -9 $VMM; exit 1
fi
./vmm snapshot --api-sock "$SOCK" --out $STORE/snap --after stop --json >$W/snap.json 2>&1
wait $VMM
start=$(now_ms)
cycle=1
while [ "$cycle" -le "$CYCLES" ] && [ $(( ($(now_ms) - start) / 1000 )) -lt "$BUDGET_S" ]; do
    rm -f "$SOCK" $W/con.log
    t0=$(now_ms)
    ./vmm restore --snapshot $STORE/snap --api-sock "$SOCK" --serial $W/con.log </dev/null >$W/restore.log 2>&1 &
    VMM=$!
    # The guest works again: a tick printed after the restore, then the next one.
    ok=true
    wait_for "[ \$(ticks $W/con.log) -ge 2 ]" 120 || ok=false
    work_ms=$(( $(now_ms) - t0 ))
    vmm_fds=$(ls /proc/$VMM/fd 2>/dev/null | wc -l)
    rss=$(rss_kib $VMM)
    fds=$(all_fds)
    if [ $((cycle % 2)) -eq 1 ]; then
        end=snapshot
        ./vmm snapshot --api-sock "$SOCK" --out $STORE/snap --after stop --json >$W/snap.json 2>&1 || ok=false
        wait $VMM || ok=false
    else
        end=kill
        kill -9 $VMM; wait $VMM 2>/dev/null
    fi
    disk=$(du -k -s $STORE | cut -f1)
    echo "SOAK-BENCH {\"kind\":\"cycle\",\"cycle\":$cycle,\"ok\":$ok,\"end\":\"$end\",\"vmm_fds\":$vmm_fds,\"all_fds\":$fds,\"vmm_rss_kib\":${rss:-null},\"store_disk_kib\":$disk,\"restore_to_work_ms\":$work_ms}"
    cycle=$((cycle + 1))
done

# Clones from the one snapshot, all at once.
i=1; pids=""
while [ "$i" -le "$CLONES" ]; do
    ./vmm restore --snapshot $STORE/snap --serial $W/clone$i.log </dev/null >$W/clone$i.err 2>&1 &
    pids="$pids $!"
    i=$((i + 1))
done
all_ticked() { j=1; while [ "$j" -le "$CLONES" ]; do [ "$(ticks $W/clone$j.log)" -ge 2 ] || return 1; j=$((j + 1)); done; }
ok=true
wait_for all_ticked 300 || ok=false
rss_total=0; running=0
for p in $pids; do r=$(rss_kib $p); [ -n "$r" ] && { rss_total=$((rss_total + r)); running=$((running + 1)); }; done
# The second tick each clone printed holds bytes read after its restore.
i=1; : >$W/randoms
while [ "$i" -le "$CLONES" ]; do
    grep '^SOAK-TICK' $W/clone$i.log | sed -n 2p | tr -d '\r' | cut -d' ' -f3 >>$W/randoms
    i=$((i + 1))
done
got=$(grep -c . $W/randoms); distinct=$(sort -u $W/randoms | grep -c .)
for p in $pids; do kill -TERM $p; done
for p in $pids; do wait $p 2>/dev/null; done
echo "SOAK-BENCH {\"kind\":\"clones\",\"ok\":$ok,\"clones\":$CLONES,\"running\":$running,\"random_lines\":$got,\"distinct\":$distinct,\"rss_total_kib\":$rss_total,\"mem_mib_each\":$MEM_MIB}"
exit 0
