#!/bin/sh
# Counter service (TCP 7000), one instance per connection: each request line L is answered with
# "<n> L", n being a counter in /run/cnt incremented per request.  Deterministic, so COLO's
# output comparison sees identical answers from primary and secondary.
while read -r line; do
    read -r n < /run/cnt
    n=$((n + 1))
    echo "$n" > /run/cnt
    echo "$n $line"
done
