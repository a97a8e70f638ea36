#!/bin/sh
# /init of the vmm guest initramfs (busybox sh, runs as PID 1).
#
# Boot parameters the kernel does not know (name=value, no dot in the name) arrive here as
# environment variables, quotes stripped:
#   vmm_run="<shell command>"   run it with `sh -c`, print `VMM-RUN-EXIT <status>`, then vmm_after
#   vmm_after=shell|poweroff|halt   what to do after vmm_run (default poweroff)
#   vmm_workload=<name>         a named workload: counter | idle
#   vmm_trimmer_port=<port>     vsock port of `guest-trimmer serve` (default 52)
#   vmm_trimmer=off|lite        no guest-trimmer daemon | only its vsock ping endpoint
# With neither vmm_run nor vmm_workload an interactive shell runs on the console.
# The host watches the console for the `VMM-SYSINFO {json}` and `VMM-GUEST-READY` lines.

BB=/bin/busybox

# PID 1 must never exit: the kernel panics if it does.
die_off() {
    $BB sync
    $BB poweroff -f
    while :; do $BB sleep 3600; done
}

$BB mkdir -p /proc /sys /dev /tmp /mnt /root /bin /sbin /usr/bin /usr/sbin
# `busybox --install` reads /proc/self/exe: mount /proc first.
$BB mount -t proc proc /proc || echo "vmm-init: mounting /proc failed"
$BB --install -s || echo "vmm-init: busybox --install failed"
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
export TERM="${TERM:-linux}"
cd /root || cd /

mount -t sysfs sysfs /sys || echo "vmm-init: mounting /sys failed"
mount -t devtmpfs devtmpfs /dev || echo "vmm-init: mounting devtmpfs on /dev failed"
mount -t tmpfs -o mode=1777 tmpfs /tmp || echo "vmm-init: mounting /tmp failed"

# Kernel modules, dependencies first (order computed at image build time from modules.dep).
if [ -f /lib/modules/load-order ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        if ! err=$(insmod "/lib/modules/$mod" 2>&1); then
            echo "vmm-init: insmod $mod failed: $err"
        fi
    done < /lib/modules/load-order
fi

# The data disk (the first virtio-blk drive, `vmm image build`'s data.ext4), if attached:
# read-only on /mnt/data unless the kernel command line says vmm_data_rw=1.
if [ -b /dev/vda ]; then
    mkdir -p /mnt/data
    data_mode=ro
    [ "${vmm_data_rw:-0}" = 1 ] && data_mode=rw
    if mount -t ext4 -o "$data_mode" /dev/vda /mnt/data; then
        echo "VMM-DATA-DISK mounted /dev/vda on /mnt/data ($data_mode)"
    else
        echo "vmm-init: mounting /dev/vda ($data_mode) on /mnt/data failed"
    fi
fi

# The trim daemon: DAMON monitoring from boot and the JSON-lines control protocol on a unix
# socket and, when the VMM attached a vsock device, on vsock port vmm_trimmer_port= (default 52).
# Log in /tmp/guest-trimmer.log. vmm_trimmer=off leaves it out; vmm_trimmer=lite serves only
# `ping` on vsock (no DAMON monitoring, for guests that measure something else).
vsock_args=""
if [ -c /dev/vsock ] && ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio* >/dev/null 2>&1; then
    vsock_args="--vsock-port ${vmm_trimmer_port:-52}"
fi
if [ -x /bin/guest-trimmer ]; then
    mkdir -p /run
    case "${vmm_trimmer:-on}" in
        off) ;;
        lite)
            [ -n "$vsock_args" ] && GUEST_TRIMMER_LOG=warn /bin/guest-trimmer serve $vsock_args </dev/null &
            ;;
        *)
            /bin/guest-trimmer --log-level info daemon --unix /run/guest-trimmer.sock $vsock_args \
                </dev/null >/dev/null 2>/tmp/guest-trimmer.log &
            ;;
    esac
fi

sysinfo=""
if [ -x /bin/guest-trimmer ]; then
    sysinfo=$(/bin/guest-trimmer sysinfo --json 2>/dev/null | tr -d '\n') || sysinfo=""
fi
case "$sysinfo" in
    "{"*"}") ;;
    *) sysinfo="{}" ;;
esac
echo "VMM-SYSINFO $sysinfo"
echo "VMM-GUEST-READY"

interactive_shell() {
    if command -v cttyhack >/dev/null 2>&1; then
        setsid cttyhack sh
    else
        sh
    fi
}

if [ -n "${vmm_run:-}" ]; then
    sh -c "$vmm_run"
    status=$?
    echo "VMM-RUN-EXIT $status"
    case "${vmm_after:-poweroff}" in
        shell) interactive_shell ;;
        poweroff) ;;
        halt)
            sync
            halt -f
            ;;
        *) echo "vmm-init: unknown vmm_after=$vmm_after (expected shell, poweroff or halt)" ;;
    esac
    die_off
fi

if [ -n "${vmm_workload:-}" ]; then
    case "$vmm_workload" in
        counter)
            n=1
            while :; do
                echo "VMM-COUNTER $n"
                n=$((n + 1))
                sleep 0.1
            done
            ;;
        idle)
            while :; do sleep 3600; done
            ;;
        *)
            echo "vmm-init: unknown vmm_workload=$vmm_workload (expected counter or idle)"
            die_off
            ;;
    esac
fi

interactive_shell
die_off
