#!/bin/sh
# A/B of two VMM builds restoring one snapshot, alternately, in one rig boot. Payload: vmm-old,
# vmm-new (static), vmlinuz, initrd. Run: ../shared/kvm-rig/run.sh --smp 1 PAYLOAD -- sh /payload/restore-ab.sh
# (copy this script into the payload). Prints one "AB old|new {metrics}" line per restore.
cd /tmp
/payload/vmm-new run --kernel /payload/vmlinuz --initrd /payload/initrd --mem-mib 512 --vcpus 2 --balloon amount_mib=0,free_page_reporting=true --vsock-cid 3 --vsock-uds /tmp/vs --api-sock /tmp/api --serial /tmp/console.log > /tmp/run.log 2>&1 &
for i in $(seq 1 180); do grep -q VMM-GUEST-READY /tmp/console.log 2>/dev/null && break; sleep 1; done
echo "AB-READY after ${i}s"
sleep 5
/payload/vmm-new snapshot --api-sock /tmp/api --out /tmp/snap --after stop
wait
ls -la /tmp/snap
for i in 1 2 3 4 5 6; do for v in old new; do
  rm -f /tmp/vs /tmp/m.json
  /payload/vmm-$v restore --snapshot /tmp/snap --metrics-file /tmp/m.json --serial /tmp/c2.log > /tmp/r.log 2>&1 &
  p=$!; sleep 5; kill -TERM $p; wait $p
  echo "AB $v $(tr -d '\n' < /tmp/m.json)"
done; done
