# Shell helpers every benchmark script sources (`. ./lib.sh`); it travels in each payload.

# Milliseconds since boot.
now_ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }

# wait_for PREDICATE-COMMAND LIMIT_S: polls every ${POLL_S:-0.05} s; fails once LIMIT_S passed.
wait_for() {
    deadline=$(( $(now_ms) + $2 * 1000 ))
    while ! eval "$1"; do
        [ "$(now_ms)" -gt "$deadline" ] && return 1
        sleep "${POLL_S:-0.05}"
    done
}

# json_num FILE KEY: the first number (or string) under "KEY" in a JSON file, flat search.
json_num() { tr ',{}' '\n\n\n' < "$1" | grep "\"$2\":" | head -n1 | cut -d: -f2 | tr -d ' "'; }

# guest_rss_kib PID: resident KiB of the guest RAM mapping (the mapping of $MEM_MIB MiB).
guest_rss_kib() {
    awk -v want=$((MEM_MIB * 1024)) '/^Size:/ { size = $2 } /^Rss:/ { if (size == want) rss += $2 } END { print rss + 0 }' "/proc/$1/smaps"
}
