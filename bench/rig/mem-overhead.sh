#!/bin/sh
# Usage: payload dir with static vmm, vmlinuz, initramfs.cpio and this script:
#   flock /tmp/kvm-rig.lock ../shared/kvm-rig/run.sh --timeout 400 PAYLOAD -- sh mem-overhead.sh
# VMM memory overhead: RSS minus the resident part of guest RAM, 128 MiB / 1 vCPU, idle guest.
for i in 1 2 3; do
  ./vmm run --kernel vmlinuz --initrd initramfs.cpio --mem-mib 128 --vcpus 1 --api-sock /tmp/m.sock \
     --cmdline 'quiet vmm_workload=idle' > /tmp/con.$i 2>/tmp/err.$i &
  P=$!
  n=0; while ! grep -q VMM-GUEST-READY /tmp/con.$i && [ $n -lt 600 ]; do sleep 0.2; n=$((n+1)); done
  sleep 2
  awk -v want=$((128*1024)) '
    /^[0-9a-f]+-[0-9a-f]+ / { split($1, r, "-"); cur = 0 }
    /^Size:/ { size = $2 }
    /^Rss:/ { total += $2; if (size == want) guest += $2 }
    END { printf "MEM run total_rss_kib=%d guest_rss_kib=%d overhead_kib=%d\n", total, guest, total - guest }' /proc/$P/smaps
  grep -E "VmHWM|VmRSS" /proc/$P/status | tr -s ' \t' ' ' | tr '\n' ' '; echo
  ./vmm stop --api-sock /tmp/m.sock >/dev/null; wait $P
done
