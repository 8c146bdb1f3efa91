"""Signed bundles: what a trusted key signed loads; anything changed, added, removed or signed by another key does not.

Every test signs a private copy of a real exported bundle with real keys (model-signing, P-256),
tampers with it the way an attacker who can write the folder would, and asserts the exact reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from export.bundle import SIGNATURE_FILE, Bundle, BundleError, SignatureError, load_bundle, resolve_bundle
from export.signing import (
    PASSWORD_ENV,
    BundleSigner,
    KeyFileError,
    TrustedKeys,
    check_public_key_file,
    generate_key_pair,
    key_id,
)
from models.main import main
from tests.helpers.serving import forge


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two key pairs: ``a`` (the trusted signer) and ``b`` (someone else's)."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        out[f"{name}.pub"] = generate_key_pair(root / f"{name}.pem")
        out[f"{name}.pem"] = root / f"{name}.pem"
    return out


@pytest.fixture
def copy(bundles: dict[str, Bundle], tmp_path: Path) -> Path:
    dst = tmp_path / "lma" / "1"
    shutil.copytree(bundles["lma"].path, dst)
    return dst


@pytest.fixture
def signed(copy: Path, keys: dict[str, Path]) -> Path:
    BundleSigner(keys["a.pem"]).sign(copy)
    return copy


def trust(keys: dict[str, Path], *names: str) -> TrustedKeys:
    return TrustedKeys.from_files([keys[f"{n}.pub"] for n in names])


def refused(path: Path, keys: TrustedKeys) -> SignatureError:
    with pytest.raises(SignatureError) as info:
        load_bundle(path, keys)
    return info.value


def pub_id(path: Path) -> str:
    return key_id(check_public_key_file(path))


def payload(path: Path) -> dict:
    return json.loads(base64.b64decode(json.loads((path / SIGNATURE_FILE).read_text())["dsseEnvelope"]["payload"]))


def test_sign_then_verify(signed: Path, keys: dict[str, Path]) -> None:
    bundle = load_bundle(signed, trust(keys, "a"))
    assert bundle.signed_by == pub_id(keys["a.pub"])
    assert load_bundle(signed).signed_by is None  # without trusted keys nothing reads the signature
    statement = payload(signed)
    assert statement["subject"][0]["name"] == "lma/1"
    assert statement["predicate"]["serialization"] == {
        "method": "files", "allow_symlinks": False, "ignore_paths": [SIGNATURE_FILE], "hash_type": "sha256",
    }  # fmt: skip
    files = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    assert files == {
        "manifest.json": hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest(),
        **{name: entry["sha256"] for name, entry in bundle.manifest["files"].items()},
    }
    # The standard format: model-signing's own public verifier accepts the bundle as it is.
    import model_signing.verifying

    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["a.pub"]).verify(
        signed, signed / SIGNATURE_FILE
    )


def test_a_changed_model_with_its_manifest_sha256_rewritten_is_refused(signed: Path, keys: dict[str, Path]) -> None:
    forge(signed)
    assert load_bundle(signed).signed_by is None  # checksums alone accept the forgery
    e = refused(signed, trust(keys, "a"))
    assert e.reason == "file_changed"
    assert str(e).startswith(f"{signed / 'manifest.json'}: sha256 ")
    assert str(e).endswith("; the manifest was changed after signing")


@pytest.mark.parametrize("name", ["model.onnx", "model.ts"])
def test_a_changed_model_file_is_refused(signed: Path, keys: dict[str, Path], name: str) -> None:
    data = bytearray((signed / name).read_bytes())
    data[-1] ^= 0xFF
    (signed / name).write_bytes(bytes(data))
    e = refused(signed, trust(keys, "a"))
    assert e.reason == "file_changed"
    assert f"{signed / name}: sha256 " in str(e) and str(e).endswith("the file was changed after signing")


@pytest.mark.parametrize("name", ["extra.onnx", ".gitignore", "sub"])
def test_a_file_added_is_refused(signed: Path, keys: dict[str, Path], name: str) -> None:
    if name == "sub":
        (signed / name).mkdir()
    else:
        (signed / name).write_bytes(b"x")
    assert load_bundle(signed).name == "lma"  # checksums do not look at other files
    e = refused(signed, trust(keys, "a"))
    assert (e.reason, str(e)) == (
        "file_added",
        f"{signed}: holds {name}, which the signature does not cover (added after signing)",
    )


def test_a_file_removed_is_refused(signed: Path, keys: dict[str, Path]) -> None:
    (signed / "model.ts").unlink()
    e = refused(signed, trust(keys, "a"))
    assert (e.reason, str(e)) == ("file_removed", f"{signed}: signed file model.ts is missing (removed after signing)")


def test_another_key_is_refused(copy: Path, keys: dict[str, Path]) -> None:
    BundleSigner(keys["b.pem"]).sign(copy)
    e = refused(copy, trust(keys, "a"))
    assert (e.reason, str(e)) == (
        "untrusted_key",
        f"{copy / SIGNATURE_FILE}: signed by key {pub_id(keys['b.pub'])[:16]}, which is not a trusted key"
        f" (trusted: {pub_id(keys['a.pub'])[:16]})",
    )


def test_unsigned_is_refused_when_keys_are_trusted(copy: Path, keys: dict[str, Path]) -> None:
    e = refused(copy, trust(keys, "a"))
    assert (e.reason, str(e)) == (
        "unsigned",
        f"{copy}: unsigned (no model.sig); only bundles signed by a trusted key ({pub_id(keys['a.pub'])[:16]})"
        " are loaded: sign it with `lma sign`",
    )


def test_several_trusted_keys_accept_either_signer(copy: Path, keys: dict[str, Path]) -> None:
    both = trust(keys, "a", "b", "a")  # the same key twice counts once
    assert both.ids == [pub_id(keys["a.pub"])[:16], pub_id(keys["b.pub"])[:16]]
    for signer in ("a.pem", "b.pem"):  # rotation: old and new trusted side by side
        BundleSigner(keys[signer]).sign(copy)  # a new signature replaces the old one
        assert load_bundle(copy, both).signed_by == pub_id(keys[signer.replace("pem", "pub")])


def test_a_forged_signature_is_refused(signed: Path, keys: dict[str, Path]) -> None:
    """The digests inside the signed payload rewritten (to match a changed model): the signature no longer verifies."""
    sig = json.loads((signed / SIGNATURE_FILE).read_text())
    statement = payload(signed)
    statement["predicate"]["resources"][1]["digest"] = "0" * 64
    sig["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (signed / SIGNATURE_FILE).write_text(json.dumps(sig))
    e = refused(signed, trust(keys, "a"))
    assert e.reason == "bad_signature"
    assert str(e).startswith(
        f"{signed / SIGNATURE_FILE}: does not verify with trusted key {pub_id(keys['a.pub'])[:16]}"
    )
    assert str(e).endswith("the signature or the file list it signs was altered")


def test_a_signature_by_another_key_claiming_a_trusted_key_id_is_refused(copy: Path, keys: dict[str, Path]) -> None:
    BundleSigner(keys["b.pem"]).sign(copy)
    sig = json.loads((copy / SIGNATURE_FILE).read_text())
    sig["verificationMaterial"]["publicKey"]["hint"] = pub_id(keys["a.pub"])
    (copy / SIGNATURE_FILE).write_text(json.dumps(sig))
    assert refused(copy, trust(keys, "a")).reason == "bad_signature"


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"mediaType": "x"}', b"\xff\xfe"])
def test_a_malformed_signature_file_is_refused(copy: Path, keys: dict[str, Path], content: bytes) -> None:
    (copy / SIGNATURE_FILE).write_bytes(content)
    e = refused(copy, trust(keys, "a"))
    assert e.reason == "malformed_signature"
    assert str(e).startswith(f"{copy / SIGNATURE_FILE}: not a model-signing signature (")


def test_a_file_swapped_after_verification_is_refused_not_parsed(signed: Path, keys: dict[str, Path]) -> None:
    bundle = load_bundle(signed, trust(keys, "a"))
    assert bundle.read_verified("onnx") == (signed / "model.onnx").read_bytes()
    data = bytearray((signed / "model.ts").read_bytes())
    data[0] ^= 0xFF
    (signed / "model.ts").write_bytes(bytes(data))
    with pytest.raises(SignatureError, match=r"model\.ts: changed on disk after the bundle was verified") as info:
        bundle.read_verified("torchscript")
    assert info.value.reason == "file_changed"


def test_signing_refuses_a_corrupt_bundle_or_stray_files(copy: Path, keys: dict[str, Path]) -> None:
    signer = BundleSigner(keys["a.pem"])
    (copy / "notes.txt").write_text("scratch")
    with pytest.raises(BundleError, match=r"holds notes\.txt, which its manifest does not list; not signing it"):
        signer.sign(copy)
    (copy / "notes.txt").unlink()
    data = bytearray((copy / "model.onnx").read_bytes())
    data[5] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 .* does not match the manifest's"):
        signer.sign(copy)
    assert not (copy / SIGNATURE_FILE).exists()
    assert sorted(p.name for p in copy.parent.iterdir()) == ["1"]  # no temporary signature left beside it


# --- key files ---


def test_trusted_key_file_errors(tmp_path: Path, keys: dict[str, Path]) -> None:
    writable = tmp_path / "writable.pub"
    shutil.copyfile(keys["a.pub"], writable)
    writable.chmod(0o666)
    with pytest.raises(KeyFileError, match=rf"^{writable}: writable by group or others \(mode 0666\); .*chmod 644"):
        check_public_key_file(writable)
    with pytest.raises(KeyFileError, match=rf"^{keys['a.pem']}: is a private key; the server needs only the public"):
        check_public_key_file(keys["a.pem"])
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFileError, match=rf"^{garbage}: not a PEM public key \("):
        check_public_key_file(garbage)
    rsa_pub = tmp_path / "rsa.pub"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_pub.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match=rf"^{rsa_pub}: is a RSAPublicKey, not an elliptic-curve key"):
        check_public_key_file(rsa_pub)
    with pytest.raises(KeyFileError, match=rf"^{tmp_path / 'none.pub'}: no such file"):
        check_public_key_file(tmp_path / "none.pub")
    with pytest.raises(KeyFileError, match=rf"^{tmp_path}: not a regular file"):
        check_public_key_file(tmp_path)


def test_private_key_file_errors(tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    loose = tmp_path / "loose.pem"
    shutil.copyfile(keys["a.pem"], loose)
    loose.chmod(0o644)
    with pytest.raises(KeyFileError, match=rf"^{loose}: readable or writable by group or others \(mode 0644\)"):
        BundleSigner(loose)
    with pytest.raises(KeyFileError, match=rf"^{keys['a.pub']}: not a PEM private key \(this is a public key"):
        BundleSigner(keys["a.pub"])
    locked = tmp_path / "locked.pem"
    private = serialization.load_pem_private_key(keys["a.pem"].read_bytes(), None)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"s3cret")
    )
    locked.write_bytes(pem)
    locked.chmod(0o600)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(KeyFileError, match=rf"the private key is encrypted; put its password in \${PASSWORD_ENV}"):
        BundleSigner(locked)
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(KeyFileError, match=rf"wrong password in \${PASSWORD_ENV}"):
        BundleSigner(locked)
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    assert BundleSigner(locked).key_id == pub_id(keys["a.pub"])


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    public = generate_key_pair(tmp_path / "k.pem", curve="P-384")
    assert public == tmp_path / "k.pub"
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert check_public_key_file(public).curve.name == "secp384r1"
    with pytest.raises(KeyFileError, match=r"k\.pem: exists; not overwriting a key"):
        generate_key_pair(tmp_path / "k.pem")
    # the README's `lma keygen keys/lma-signing.pem` on a fresh clone, where keys/ does not exist yet
    assert generate_key_pair(tmp_path / "keys" / "s.pem") == tmp_path / "keys" / "s.pub"
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(KeyFileError, match=r"file: not a directory, so no key can be written in it"):
        generate_key_pair(tmp_path / "file" / "s.pem")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_keys_made_by_the_documented_openssl_commands_work(copy: Path, tmp_path: Path) -> None:
    key, pub = tmp_path / "key.pem", tmp_path / "key.pub"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
    os.chmod(key, 0o600)
    subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    BundleSigner(key).sign(copy)
    assert load_bundle(copy, TrustedKeys.from_files([pub])).signed_by == pub_id(pub)


# --- the commands ---


def test_sign_and_verify_commands(copy: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a = pub_id(keys["a.pub"])[:16]
    assert main(["verify", str(copy), "--key", str(keys["a.pub"])]) == 1
    assert capsys.readouterr().err.startswith(f"lma verify: REFUSED (unsigned): {copy}: unsigned (no model.sig)")
    assert main(["sign", str(copy.parent), "--key", str(keys["a.pem"])]) == 0  # artifacts/NAME: its latest
    out = capsys.readouterr().out
    assert out == f"signed {copy}: 3 files (manifest.json, model.onnx, model.ts) by key {a}\n  -> {copy}/model.sig\n"
    assert main(["verify", str(copy), "--key", str(keys["b.pub"]), "--key", str(keys["a.pub"])]) == 0
    assert capsys.readouterr().out == f"verified lma version 1 ({copy}): signed by key {a}, 3 files intact\n"
    assert main(["verify", str(copy), "--key", str(keys["b.pub"])]) == 1
    assert capsys.readouterr().err.startswith("lma verify: REFUSED (untrusted_key): ")
    (copy / "model.ts").unlink()
    assert main(["verify", str(copy), "--key", str(keys["a.pub"])]) == 1
    assert "REFUSED (file_removed)" in capsys.readouterr().err
    assert main(["verify", str(copy), "--key", str(keys["a.pem"])]) == 2  # a private key is not a trusted key
    assert "is a private key" in capsys.readouterr().err
    # no bundle there: bad input, not a bundle refused (it once read "REFUSED (checksum)")
    assert main(["verify", str(copy.parent / "nodir"), "--key", str(keys["a.pub"])]) == 2
    assert capsys.readouterr().err.startswith(f"lma verify: error: {copy.parent / 'nodir'}")


def test_keygen_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", str(tmp_path / "lma.pem")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"private key {tmp_path / 'lma.pem'} (mode 0600")
    assert out[1].startswith(f"public key  {tmp_path / 'lma.pub'} (key id {pub_id(tmp_path / 'lma.pub')[:16]};")
    assert main(["keygen", str(tmp_path / "lma.pem")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"lma keygen: error: {tmp_path / 'lma.pem'}: exists; not overwriting a key"
    )


def test_export_with_sign_key(tiny_runs: dict, keys: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "artifacts" / "ctr"
    assert main(["export", str(tiny_runs["hash"].run_dir), "--out", str(out), "--sign-key", str(keys["a.pem"])]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"signed: {out / '1' / SIGNATURE_FILE} by key {pub_id(keys['a.pub'])[:16]} ({keys['a.pem']})"
    )
    assert load_bundle(out / "1", trust(keys, "a")).signed_by == pub_id(keys["a.pub"])
    assert payload(out / "1")["subject"][0]["name"] == "ctr/1"  # not the exporter's temporary folder
    assert sorted(p.name for p in out.iterdir()) == ["1"]
    bad = tmp_path / "bad.pem"
    bad.write_text("nope")
    bad.chmod(0o600)
    assert main(["export", str(tiny_runs["hash"].run_dir), "--out", str(out), "--sign-key", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"lma export: error: {bad}: not a PEM private key"
    assert sorted(p.name for p in out.iterdir()) == ["1"]  # refused before exporting anything


# --- bundle resolution: the one place that knows the layout ---


def test_resolve_bundle(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for version in ("1", "2", "10"):
        shutil.copytree(bundles["lma"].path, repo / "lma" / version)
    shutil.copytree(bundles["hash"].path, repo / "hash" / "3")
    assert resolve_bundle(repo / "lma" / "2") == repo / "lma" / "2"  # a bundle
    assert resolve_bundle(repo / "lma" / "2", version="10") == repo / "lma" / "10"  # its sibling
    assert resolve_bundle(repo / "lma") == repo / "lma" / "10"  # a model's folder: the latest
    assert resolve_bundle(repo / "lma", version="1") == repo / "lma" / "1"
    assert resolve_bundle(repo, name="hash") == repo / "hash" / "3"  # a repository
    assert resolve_bundle(repo, name="lma", version="2") == repo / "lma" / "2"
    with pytest.raises(BundleError, match=r"repo: holds 2 models \['hash', 'lma'\]; say which one"):
        resolve_bundle(repo)
    with pytest.raises(BundleError, match=r"repo: holds no bundle of model 'avazu'; it holds \['hash', 'lma'\]"):
        resolve_bundle(repo, name="avazu")
    with pytest.raises(BundleError, match=r"lma/7: no such version \(no manifest\.json there\)"):
        resolve_bundle(repo / "lma", version="7")
    with pytest.raises(BundleError, match=r"version must be a positive integer as text, got '07'"):
        resolve_bundle(repo / "lma", version="07")
    shutil.rmtree(repo / "hash")
    assert resolve_bundle(repo) == repo / "lma" / "10"  # a one-model repository
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"empty: holds no bundle \(expected manifest\.json"):
        resolve_bundle(tmp_path / "empty")
    with pytest.raises(BundleError, match=r"nowhere: not a directory"):
        resolve_bundle(tmp_path / "nowhere")
