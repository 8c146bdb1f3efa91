"""Bundle signatures: OpenSSF model-signing, key-based, with elliptic-curve keys; works offline.

A signed bundle holds :data:`export.bundle.SIGNATURE_FILE` (``model.sig``) beside its files: a
Sigstore bundle (JSON) whose DSSE envelope carries an in-toto statement listing the sha256 of
every other file of the folder, ``manifest.json`` included, signed with ECDSA (P-256, P-384 or
P-521). It is the format of the `model-signing` package and its CLI, so a bundle signed here
verifies with the standard tool too::

    model_signing verify key artifacts/criteo/3 --signature artifacts/criteo/3/model.sig --public_key key.pub

What the pieces do:

- :func:`generate_key_pair` (``lma keygen``): a new P-256 key pair, the private key mode 0600.
- :class:`BundleSigner` (``lma sign``, ``lma export --sign-key``): loads a private key once and signs
  bundles. It signs only a bundle whose checksums pass and whose folder holds nothing but its files.
- :class:`TrustedKeys` (``lma verify --key``, the server's ``LMA_TRUSTED_KEYS``, ``lma publish``):
  public keys; :meth:`TrustedKeys.verify` checks a bundle's signature and returns the digests it
  signs. :func:`export.bundle.load_bundle` then holds the folder's files to those digests.
- :func:`check_public_key_file`: the start-up check of one trusted key file (permissions, PEM, curve).

Why two internal classes of `model-signing` are used (its version is pinned): the public
``model_signing.verifying.Config.verify`` hashes the files on disk and returns nothing, so the
server would have to read ``manifest.json`` and the graph again afterwards, and a file swapped in
between would be parsed unverified. Here the signature is verified on its own
(``sign_ec_key.Verifier.verify`` returns the signed digests), and the bundle loader checks the very
bytes it parses against those digests. Signing uses the public hashing API and the same signer the
public API uses, only with the subject named ``NAME/VERSION`` instead of the folder's name (the
exporter signs in a temporary folder).

Example::

    >>> signer = BundleSigner(Path("keys/lma-signing.pem"))          # doctest: +SKIP
    >>> signer.sign(Path("artifacts/criteo/3")).key_id[:16]           # doctest: +SKIP
    '5f0c1e...'
    >>> trust = TrustedKeys.from_files([Path("keys/lma-signing.pub")])  # doctest: +SKIP
    >>> load_bundle("artifacts/criteo/3", trust).signed_by            # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from export.bundle import MANIFEST_FILE, SIGNATURE_FILE, BundleError, SignatureError, load_bundle

CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
PASSWORD_ENV = "LMA_SIGNING_KEY_PASSWORD"  # password of an encrypted private key
_MAX_KEY_BYTES = 64 << 10  # a PEM key is under 1 KB
_MAX_SIGNATURE_BYTES = 1 << 20  # a signature of a few files is a few KB
KEYGEN_HINT = "lma keygen KEY.pem, or: openssl ecparam -name prime256v1 -genkey -noout -out KEY.pem"


class KeyFileError(ValueError):
    """A key file cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class SignedFiles:
    """What a verified signature says: the key that signed it and the sha256 of each file it covers."""

    key_id: str  # sha256 (hex) of the signer's public key, PEM SubjectPublicKeyInfo: the id model-signing records
    digests: dict[str, str]  # file name -> sha256 hex, every file of the bundle folder but the signature


def key_id(public_key: Any) -> str:
    """The id of a public key: sha256 of its PEM SubjectPublicKeyInfo, as model-signing writes it in a signature."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _read_key_file(path: Path, what: str) -> tuple[bytes, os.stat_result]:
    try:
        st = path.stat()  # follows symlinks: Kubernetes mounts secrets as links into ..data/
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file ({what})") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file ({what})")
    if st.st_size > _MAX_KEY_BYTES:
        raise KeyFileError(f"{path}: {st.st_size:,} bytes; not a PEM key ({what})")
    try:
        return path.read_bytes(), st
    except OSError as e:
        raise KeyFileError(f"{path}: cannot be read ({e.strerror})") from None


def _check_curve(path: Path, key: Any, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        raise KeyFileError(
            f"{path}: is a {type(key).__name__.lstrip('_')}, not an elliptic-curve key; model-signing key-based"
            f" signatures use P-256, P-384 or P-521 keys ({KEYGEN_HINT})"
        )
    if key.curve.name not in _CURVE_NAMES:
        raise KeyFileError(f"{path}: curve {key.curve.name} is not supported; use P-256, P-384 or P-521 ({what})")


def check_public_key_file(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Load one trusted public key, refusing what a server must not trust; raises :class:`KeyFileError`.

    Refused: a missing or unreadable file; one writable by group or others (whoever can replace it
    chooses which bundles the server loads); a private key (it belongs on the signing machine, not
    on a server); anything but a PEM elliptic-curve public key on a curve model-signing supports.
    """
    path = Path(path)
    data, st = _read_key_file(path, "a trusted public key")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KeyFileError(
            f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); whoever can replace a trusted"
            f" key decides which bundles the server loads: chmod 644 {path}"
        )
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError(
            f"{path}: is a private key; the server needs only the public key (openssl ec -in {path.name} -pubout"
            f" -out KEY.pub), and the private key belongs on the signing machine alone"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not a PEM public key ({e})") from None
    _check_curve(path, key, "a trusted public key")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _load_private_key(path: Path, password: str | None) -> ec.EllipticCurvePrivateKey:
    data, st = _read_key_file(path, "a private signing key")
    if b"PRIVATE KEY-----" not in data:
        hint = " (this is a public key; signing needs the private one)" if b"PUBLIC KEY-----" in data else ""
        raise KeyFileError(f"{path}: not a PEM private key{hint}")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); a signing key"
            f" must be private to its owner: chmod 600 {path}"
        )
    secret = password.encode() if password is not None else None
    try:
        key = serialization.load_pem_private_key(data, secret)
    except TypeError:  # encrypted without a password, or a password for a key that has none
        if secret is None:
            raise KeyFileError(f"{path}: the private key is encrypted; put its password in ${PASSWORD_ENV}") from None
        raise KeyFileError(f"{path}: the private key is not encrypted; unset ${PASSWORD_ENV}") from None
    except ValueError as e:
        if secret is not None and b"ENCRYPTED" in data:
            raise KeyFileError(f"{path}: wrong password in ${PASSWORD_ENV}, or a damaged key") from None
        raise KeyFileError(f"{path}: not a usable PEM private key ({e})") from None
    _check_curve(path, key, "a private signing key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def generate_key_pair(private_path: str | Path, public_path: str | Path | None = None, curve: str = "P-256") -> Path:
    """Write a new key pair: ``private_path`` (PEM PKCS#8, mode 0600) and its public key (default ``.pub`` beside).

    Returns the public key's path. Refuses to overwrite either file; creates missing folders (mode 0700).
    """
    if curve not in CURVES:
        raise ValueError(f"curve must be one of {sorted(CURVES)}, got {curve!r}")
    private_path = Path(private_path)
    public = Path(public_path) if public_path is not None else private_path.with_suffix(".pub")
    if public == private_path:
        raise ValueError(f"{private_path}: the public key needs another file name")
    for p in (private_path, public):
        if p.exists():
            raise KeyFileError(f"{p}: exists; not overwriting a key")
    for folder in {private_path.parent, public.parent}:  # e.g. keys/ of the README's command, on a fresh clone
        if folder.exists() and not folder.is_dir():
            raise KeyFileError(f"{folder}: not a directory, so no key can be written in it")
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVES[curve])
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(
        private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
    )  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(public, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(pub)
    return public


def _hashing_config() -> Any:
    """Per-file sha256 of every file of the folder but the signature; git files are not skipped (none belong)."""
    from model_signing import hashing

    return (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)
    )


class BundleSigner:
    """Signs bundles with one private key (loaded once: a bad key fails before a long export starts).

    Args:
        private_key: PEM elliptic-curve private key, mode 0600 (an encrypted one reads its password
            from ``$LMA_SIGNING_KEY_PASSWORD``).
        password: overrides that variable.
    """

    def __init__(self, private_key: str | Path, password: str | None = None) -> None:
        from model_signing._signing import sign_ec_key

        self.path = Path(private_key)
        password = password if password is not None else os.environ.get(PASSWORD_ENV) or None
        key = _load_private_key(self.path, password)  # clear errors first; model-signing's are raw
        self.key_id = key_id(key.public_key())
        # bytes, although model-signing 1.1.1 annotates str: it hands the password to cryptography, which needs bytes
        # (its own CLI's --password fails with a TypeError for that reason).
        self._signer = sign_ec_key.Signer(self.path, password.encode() if password is not None else None)  # type: ignore[arg-type]
        if key_id(self._signer._private_key.public_key()) != self.key_id:  # the file changed under us
            raise KeyFileError(f"{self.path}: changed while it was being read")

    def sign(self, path: str | Path) -> SignedFiles:
        """Sign the bundle folder ``path`` (writes ``path/model.sig``, replacing an older signature).

        Raises:
            BundleError: the bundle's checksums fail, or its folder holds files its manifest does not list.
        """
        from model_signing import manifest as ms_manifest
        from model_signing._signing import signing as ms_signing

        path = Path(path)
        bundle = load_bundle(path)  # never sign what is already corrupt
        expected = {name: entry["sha256"] for name, entry in bundle.manifest["files"].items()}
        extra = sorted({p.name for p in path.iterdir()} - {*expected, MANIFEST_FILE, SIGNATURE_FILE})
        if extra:
            raise BundleError(f"{path}: holds {', '.join(extra)}, which its manifest does not list; not signing it")
        hashed = _hashing_config().hash(path)
        digests = {rd.identifier: rd.digest.digest_hex for rd in hashed.resource_descriptors()}
        if set(digests) != {*expected, MANIFEST_FILE} or any(digests[n] != d for n, d in expected.items()):
            raise BundleError(f"{path}: changed while it was being signed; sign it again")
        # Name the subject NAME/VERSION (the public API names it after the folder, a temporary one during export).
        kind = ms_manifest.SerializationType.from_args(hashed.serialization_type)
        items = [kind.new_item(rd.identifier, rd.digest) for rd in hashed.resource_descriptors()]
        signed = ms_manifest.Manifest(f"{bundle.name}/{bundle.version}", items, kind)
        signature = self._signer.sign(ms_signing.Payload(signed))
        # Written beside the folder, then moved in: the folder never holds a half-written or stray file.
        tmp = path.parent / f".{path.name}.{SIGNATURE_FILE}.{uuid.uuid4().hex[:8]}"
        try:
            signature.write(tmp)
            os.replace(tmp, path / SIGNATURE_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        return SignedFiles(self.key_id, digests)


@dataclass(frozen=True)
class TrustedKey:
    path: Path
    key_id: str
    verifier: Any  # model_signing._signing.sign_ec_key.Verifier


class TrustedKeys:
    """The public keys whose signatures a server (or ``lma verify``, ``lma publish``) accepts.

    Several keys at once are how a key is rotated: trust old and new, re-sign or re-export with the
    new one, then drop the old. Built with :meth:`from_files`.
    """

    def __init__(self, keys: Sequence[TrustedKey]) -> None:
        if not keys:
            raise ValueError("TrustedKeys needs at least one key")
        self.keys = tuple(keys)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path]) -> TrustedKeys:
        """Load each public key file (:func:`check_public_key_file`); the same key twice counts once."""
        from model_signing._signing import sign_ec_key

        keys: dict[str, TrustedKey] = {}
        for p in paths:
            path = Path(p)
            kid = key_id(check_public_key_file(path))
            verifier = sign_ec_key.Verifier(path)
            if key_id(verifier._public_key) != kid:
                raise KeyFileError(f"{path}: changed while it was being read")
            keys.setdefault(kid, TrustedKey(path, kid, verifier))
        return cls(list(keys.values()))

    @property
    def ids(self) -> list[str]:
        """Short ids (16 hex digits) of the keys, for messages."""
        return [k.key_id[:16] for k in self.keys]

    def describe(self) -> str:
        return ", ".join(f"{k.key_id[:16]} ({k.path})" for k in self.keys)

    def verify(self, path: str | Path) -> SignedFiles:
        """Verify ``path/model.sig`` with the trusted key it names; returns the digests it signs.

        Only the signature is read here; the caller holds the folder's files to the digests
        (:func:`export.bundle.load_bundle`). Raises :class:`SignatureError` with its reason.
        """
        from model_signing._signing import sign_sigstore_pb

        path = Path(path)
        sig_path = path / SIGNATURE_FILE
        if not sig_path.is_file():
            raise SignatureError(
                "unsigned",
                f"{path}: unsigned (no {SIGNATURE_FILE}); only bundles signed by a trusted key"
                f" ({', '.join(self.ids)}) are loaded: sign it with `lma sign`",
            )
        if sig_path.stat().st_size > _MAX_SIGNATURE_BYTES:
            raise SignatureError(
                "malformed_signature", f"{sig_path}: {sig_path.stat().st_size:,} bytes; not a signature"
            )
        try:
            signature = sign_sigstore_pb.Signature.read(sig_path)
            material = signature.bundle.verification_material
        except Exception as e:  # JSON, protobuf-model and shape errors of a file that is not a signature
            raise SignatureError(
                "malformed_signature", f"{sig_path}: not a model-signing signature ({type(e).__name__}: {e})"
            ) from None
        if material.public_key is None:
            raise SignatureError(
                "unsupported_signature",
                f"{sig_path}: signed with a certificate or a Sigstore identity, not a key (lma sign)",
            )
        hint = material.public_key.hint
        candidates = [k for k in self.keys if k.key_id == hint] if hint else list(self.keys)
        if not candidates:
            raise SignatureError(
                "untrusted_key",
                f"{sig_path}: signed by key {str(hint)[:16]}, which is not a trusted key"
                f" (trusted: {', '.join(self.ids)})",
            )
        problems = []
        for key in candidates:
            try:
                signed = key.verifier.verify(signature)
                break
            except Exception as e:  # cryptography's InvalidSignature, or a payload that is not a model manifest
                problems.append(f"{key.key_id[:16]}: {type(e).__name__} {e}".strip())
        else:
            raise SignatureError(
                "bad_signature",
                f"{sig_path}: does not verify with trusted key {'; '.join(problems)}; the signature or the file list"
                " it signs was altered",
            )
        kind = signed.serialization_type
        if kind.get("method") != "files" or kind.get("hash_type") != "sha256":
            raise SignatureError(
                "unsupported_signature",
                f"{sig_path}: signs {kind.get('method')} with {kind.get('hash_type')} digests; this server checks"
                " per-file sha256 signatures: sign it with `lma sign`",
            )
        digests = {rd.identifier: rd.digest.digest_hex for rd in signed.resource_descriptors()}
        return SignedFiles(key.key_id, digests)
