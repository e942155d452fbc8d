#!/bin/sh
# Stats service (TCP 7002): one line "work <MiB dirtied so far> uptime <seconds>", then close.
# The uptime differs between COLO primary and secondary: query it rarely during a COLO run.
read -r work < /run/work
read -r up _ < /proc/uptime
echo "work $work uptime $up"
