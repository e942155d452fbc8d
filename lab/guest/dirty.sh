#!/bin/sh
# Memory-dirtying workload: N MiB/s for ON seconds, then idle OFF seconds, repeating (OFF=0 is a
# steady rate).  Validates its arguments, then detaches into the background.
# The source is random, not zeros: migration sends a zero page as a marker, so zeros would
# dirty RAM without loading the checkpoint stream.  /run/work counts MiB dirtied so far.
mib=$1 on=$2 off=$3
for v in "$mib" "$on" "$off"; do
    case "$v" in
        '' | *[!0-9]*) exit 1 ;;
    esac
done
[ "$mib" -ge 1 ] && [ "$on" -ge 1 ] || exit 1

dd if=/dev/urandom of=/run/dirty-src bs=1M count=1 2>/dev/null || exit 1
(
    work=0
    while true; do
        s=0
        while [ "$s" -lt "$on" ]; do
            i=0
            while [ "$i" -lt "$mib" ]; do
                dd if=/run/dirty-src of=/run/dirty bs=1M count=1 seek="$i" conv=notrunc 2>/dev/null
                i=$((i + 1))
            done
            work=$((work + mib))
            echo "$work" > /run/work
            sleep 1
            s=$((s + 1))
        done
        [ "$off" -gt 0 ] && sleep "$off"
    done
) &
