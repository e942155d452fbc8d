#!/bin/sh
# Disk writer service (TCP 7100), strictly request/response so that both COLO VMs, receiving the
# same requests, give the same answers:
#   w N        write record N (sector N, fsync)      -> "ok N"
#   r N        read sector N bypassing the cache     -> "rec N" | "bad N"
#   check A B  check sectors A..B inclusive          -> "checked A B missing K first_missing M|-"
# A record is "ftd-record N" padded with spaces to 511 bytes plus a newline: one 512-byte
# sector.  Sector 0 stays free (partition tables, probes).  Bad requests get "err ...".
dev=/dev/vda

record() {
    printf '%-511s\n' "ftd-record $1"
}

is_sector() {
    case "$1" in
        '' | *[!0-9]*) return 1 ;;
    esac
    [ "$1" -ge 1 ]
}

# O_DIRECT reads go to the disk, not to a page cache the guest may have filled itself.
read_sectors() {
    dd if="$dev" bs=64k iflag=direct,skip_bytes,count_bytes skip=$(($1 * 512)) \
        count=$(($2 * 512)) 2>/dev/null
}

# One dd of the whole range, NULs made printable, then awk: a sector holding its record ends
# with the record's newline, so it is the last 511 bytes of a line ending at a sector boundary.
check() {
    read_sectors "$1" $(($2 - $1 + 1)) | tr '\000' '.' | awk -v a="$1" -v b="$2" '
        {
            len = length($0)
            off += len + 1
            if (off % 512 == 0 && len >= 511) {
                s = a + off / 512 - 1
                if (substr($0, len - 510) == sprintf("%-511s", "ftd-record " s)) ok[s] = 1
            }
        }
        END {
            missing = 0
            first = "-"
            for (s = a; s <= b; s++) {
                if (!(s in ok)) {
                    missing++
                    if (first == "-") first = s
                }
            }
            print "checked " a " " b " missing " missing " first_missing " first
        }'
}

while read -r cmd a b extra; do
    case "$cmd" in
        w)
            if is_sector "$a" && [ -z "$b" ]; then
                if err=$(record "$a" | dd of="$dev" bs=512 seek="$a" count=1 \
                    conv=fsync,notrunc 2>&1 >/dev/null); then
                    echo "ok $a"
                else
                    # Say why on the console too: the kernel's I/O error lines are there.
                    echo "disk writer: write $a failed: $err" >/dev/console
                    dmesg | tail -n 5 >/dev/console
                    echo "err write $a failed: $(echo "$err" | tr '\n' ' ')"
                fi
            else
                echo "err bad request: w $a $b"
            fi
            ;;
        r)
            if is_sector "$a" && [ -z "$b" ]; then
                got=$(read_sectors "$a" 1 | tr '\000' '.')
                if [ "$got" = "$(record "$a")" ]; then
                    echo "rec $a"
                else
                    echo "bad $a"
                fi
            else
                echo "err bad request: r $a $b"
            fi
            ;;
        check)
            if is_sector "$a" && is_sector "$b" && [ "$a" -le "$b" ] && [ -z "$extra" ]; then
                check "$a" "$b"
            else
                echo "err bad request: check $a $b $extra"
            fi
            ;;
        *) echo "err unknown request: $cmd" ;;
    esac
done
