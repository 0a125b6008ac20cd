"""Trial credentials for a Flower deployment with TLS and SuperNode authentication (docs/flower.md,
"Several machines"), made with ``cryptography`` (installed with Flower):

    python scripts/flower_certificates.py DIR NODES [HOST ...]

writes into DIR (made if missing, refused if it already holds credentials):

- ``ca.crt``, ``ca.key``: a self-signed certificate authority (EC P-384, 365 days);
- ``superlink.crt``, ``superlink.key``: the SuperLink's certificate, signed by the CA, valid for each HOST
  (a DNS name or an IP address) and for localhost, 127.0.0.1 and ::1 (the SuperLink's own ServerApp runner
  connects to it locally);
- ``node-0`` .. ``node-<NODES-1>``: SuperNode key pairs (ECDSA P-384, OpenSSH format; ``node-i.pub`` is
  what ``flwr supernode register`` takes).

Give ``ca.crt`` to every SuperNode and to whoever runs ``flwr``; keep ``ca.key``, ``superlink.key`` and
``node-i`` secret (``node-i`` belongs on node i's machine only). For a real federation use a CA you already
run, and let each node make its own key pair (``ssh-keygen -t ecdsa -b 384 -N "" -f KEY``) and send only
``KEY.pub``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 365


def write(path: Path, data: bytes, secret: bool) -> None:
    """Write ``data`` to ``path``, readable by its owner only when ``secret``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    """``localhost``, ``127.0.0.1``, ``::1`` and ``hosts``, each as an IP address or a DNS name."""
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", "::1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def certificate(subject: str, key, issuer: str, issuer_key, is_ca: bool, names: list[x509.GeneralName]) -> x509.Certificate:
    """A certificate of ``key`` for ``subject`` signed by ``issuer_key``: a CA's, or a TLS server's for ``names``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def make_credentials(directory: Path, nodes: int, hosts: list[str]) -> None:
    """Write the CA, the SuperLink's certificate for ``hosts`` and ``nodes`` node key pairs into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.key").exists() or (directory / "superlink.key").exists():
        raise SystemExit(f"{directory} already holds credentials; remove them or pick another directory")
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = "Fed-PLoRA trial CA"
    ca = certificate(ca_name, ca_key, ca_name, ca_key, True, [])
    server = certificate((hosts or ["localhost"])[0], server_key, ca_name, ca_key, False, subject_names(hosts))
    write(directory / "ca.key", private_pem(ca_key), secret=True)
    write(directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), secret=False)
    write(directory / "superlink.key", private_pem(server_key), secret=True)
    write(directory / "superlink.crt", server.public_bytes(serialization.Encoding.PEM), secret=False)
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        write(directory / f"node-{i}", private, secret=True)
        write(directory / f"node-{i}.pub", public + f" node-{i}\n".encode(), secret=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="where to write the credentials")
    parser.add_argument("nodes", type=int, help="how many SuperNode key pairs")
    parser.add_argument("hosts", nargs="*", help="the SuperLink's DNS names or IP addresses, as the nodes dial it")
    args = parser.parse_args()
    make_credentials(args.directory, args.nodes, args.hosts)
    names = ", ".join(["localhost", "127.0.0.1", "::1", *args.hosts])
    print(f"wrote {args.directory}: ca.crt, ca.key, superlink.crt and superlink.key (for {names}), {args.nodes} node key pairs")


if __name__ == "__main__":
    main()
