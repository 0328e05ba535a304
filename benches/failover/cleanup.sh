#!/bin/bash
# Removes what run.py creates: the namespaces rfb-* (bridge, replicas, client, backend)
# and every process still running inside them. Touches nothing else.
for ns in $(ip netns list | awk '{print $1}' | grep -E '^rfb-(sw|r[123]|cl|be)$'); do
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
done
sleep 0.2
for ns in $(ip netns list | awk '{print $1}' | grep -E '^rfb-(sw|r[123]|cl|be)$'); do
  ip netns del "$ns" 2>/dev/null
done
if ip netns list | grep -qE '^rfb-'; then echo "WARN: namespaces left: $(ip netns list | grep -E '^rfb-')"; fi
