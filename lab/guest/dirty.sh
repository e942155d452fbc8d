#!/bin/sh
# Memory-dirtying workload: N MiB/s for ON seconds, then idle OFF seconds, repeating (OFF=0 is a
# steady rate); JITTER > 0 lengthens each quiet spell by a random 0..JITTER s (in tenths), so
# bursts do not keep one phase against a timer (real bursts are not periodic).  The N MiB of
# each second go to the next N MiB of a REGION-MiB buffer, round
# robin (REGION defaults to N: every second rewrites the same N MiB; a larger REGION makes the
# pages dirtied since the last checkpoint grow with the time since it, up to REGION, as a batch
# job or a database load writing new data does).  Validates its arguments, then detaches into
# the background.
# The source is random, not zeros: migration sends a zero page as a marker, so zeros would
# dirty RAM without loading the checkpoint stream.  Two sources alternate lap by lap, so that
# every write changes the page's content: QEMU's page-sampling dirty rate hashes sampled pages
# and cannot see a page rewritten with the bytes it already held (one source made this guest
# look almost idle to it after the first lap).  /run/work counts MiB dirtied so far.
mib=$1 on=$2 off=$3 region=${4:-$1} jitter=${5:-0}
for v in "$mib" "$on" "$off" "$region" "$jitter"; do
    case "$v" in
        '' | *[!0-9]*) exit 1 ;;
    esac
done
[ "$mib" -ge 1 ] && [ "$on" -ge 1 ] && [ "$region" -ge "$mib" ] || exit 1

dd if=/dev/urandom of=/run/dirty-src0 bs=1M count=1 2>/dev/null || exit 1
dd if=/dev/urandom of=/run/dirty-src1 bs=1M count=1 2>/dev/null || exit 1
(
    work=0
    pos=0
    lap=0
    while true; do
        s=0
        while [ "$s" -lt "$on" ]; do
            i=0
            while [ "$i" -lt "$mib" ]; do
                dd if=/run/dirty-src$lap of=/run/dirty bs=1M count=1 seek="$pos" conv=notrunc 2>/dev/null
                pos=$(((pos + 1) % region))
                [ "$pos" -eq 0 ] && lap=$((1 - lap))
                i=$((i + 1))
            done
            work=$((work + mib))
            echo "$work" > /run/work
            sleep 1
            s=$((s + 1))
        done
        [ "$off" -gt 0 ] && sleep "$off"
        if [ "$jitter" -gt 0 ]; then
            t=$((RANDOM % (jitter * 10 + 1)))
            sleep "$((t / 10)).$((t % 10))"
        fi
    done
) &
