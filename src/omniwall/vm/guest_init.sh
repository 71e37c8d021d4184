#!/bin/busybox sh
# The guest's /init (docs/vms.md): virtio network, the workload's addresses and routes from the kernel
# command line, responders for its servers, and a command channel on ttyS1 for the lab.
#   ow.name=tenant/name  ow.ip4=a,b  ow.ip6=x,y  ow.srv=tcp/80,tcp/8000-8003
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /run/ow
# Dependency order: the Debian kernel builds virtio as modules, and busybox insmod does not resolve.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  insmod /lib/modules/$m.ko || echo "omniwall-guest: insmod $m failed"
done
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}" ;; esac; done; }
NAME=$(arg ow.name)
IP4=$(arg ow.ip4)
IP6=$(arg ow.ip6)
SRV=$(arg ow.srv)
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
ip link set lo up
ip link set eth0 up
for a in $(echo "$IP4" | tr , ' '); do ip addr add "$a/32" dev eth0; done
ip route add 169.254.1.1 dev eth0 scope link
ip route add default via 169.254.1.1 dev eth0
for a in $(echo "$IP6" | tr , ' '); do ip -6 addr add "$a/128" dev eth0; done
[ -n "$IP6" ] && ip -6 route add default via fe80::1 dev eth0
# Resolve the gateway now (and let the host learn our MAC): a first probe must not pay for ARP under TCG.
ping -c 1 -W 2 169.254.1.1 >/dev/null 2>&1
# Responders: the same reply line as the lab's namespace responders (lab/responder.py).
for e in $(echo "$SRV" | tr , ' '); do
  case "$e" in
    tcp/*) r=${e#tcp/} ;;
    *) continue ;;
  esac
  lo=${r%-*}
  hi=${r#*-}
  for p in $(seq "$lo" "$hi"); do
    # -e runs the rest of the line per connection: one exec (echo), no shell (TCG makes each costly).
    nc -ll -p "$p" -e echo "omniwall-lab $NAME tcp/$p" &
  done
done
# Command channel: "<id> <base64 script>" in, "<id> <exit code> <base64 output>" out, one command at a
# time (concurrent replies garbled the serial line; vm/channel.py runs a batch as one script instead).
stty -F /dev/ttyS1 raw -echo
exec 3<>/dev/ttyS1
(
  while read -r id b64 <&3; do
    s=$(echo "$b64" | base64 -d)
    o=$(sh -c "$s" 2>&1 </dev/null)
    rc=$?
    e=$(printf %s "$o" | base64 | tr -d '\n')
    echo "$id $rc $e" >&3
  done
) &
echo "omniwall-guest ready $NAME"
while true; do sleep 3600; done
