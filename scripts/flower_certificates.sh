#!/usr/bin/env bash
# Trial credentials for a Flower deployment with TLS and SuperNode authentication (docs/flower.md,
# "Several machines"):
#
#   scripts/flower_certificates.sh DIR NODES [HOST ...]
#
# writes into DIR (made if missing, refused if it already holds credentials):
#   ca.crt, ca.key                 a self-signed certificate authority (EC P-384, 365 days)
#   superlink.crt, superlink.key   the SuperLink's certificate, signed by the CA, valid for each HOST
#                                  (a DNS name or an IP address) and for localhost, 127.0.0.1 and ::1
#                                  (the SuperLink's own ServerApp runner connects to it locally)
#   node-0 .. node-(NODES-1)       SuperNode key pairs (ECDSA P-384, OpenSSH format; node-i.pub is what
#                                  `flwr supernode register` takes)
# Give ca.crt to every SuperNode and to whoever runs `flwr`; keep ca.key, superlink.key and node-i
# secret (node-i belongs on node i's machine only). For a real federation use a CA you already run, and
# let each node make its own key pair (ssh-keygen -t ecdsa -b 384 -N "" -f KEY) and send only KEY.pub.
set -euo pipefail
if [[ $# -lt 2 || ! $2 =~ ^[0-9]+$ ]]; then
    echo "usage: $0 DIR NODES [HOST ...]" >&2
    exit 2
fi
dir=$1
nodes=$2
shift 2
mkdir -p "$dir"
if [[ -e $dir/ca.key || -e $dir/superlink.key ]]; then
    echo "$dir already holds credentials; remove them or pick another directory" >&2
    exit 1
fi
umask 077
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 -days 365 \
    -subj "/CN=Fed-PLoRA trial CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 \
    -subj "/CN=${1:-localhost}" -keyout "$dir/superlink.key" -out "$dir/superlink.csr" 2>/dev/null
openssl x509 -req -in "$dir/superlink.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -sha384 -days 365 -out "$dir/superlink.crt" \
    -extfile <(printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
        "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid") 2>/dev/null
rm -f "$dir/superlink.csr" "$dir/ca.srl"
chmod 644 "$dir/ca.crt" "$dir/superlink.crt"
for ((i = 0; i < nodes; i++)); do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "node-$i" -f "$dir/node-$i"
    chmod 644 "$dir/node-$i.pub"
done
names=${san//DNS:/}
echo "wrote $dir: ca.crt, ca.key, superlink.crt and superlink.key (for ${names//IP:/}), $nodes node key pairs"
