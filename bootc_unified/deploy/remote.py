"""What a registry holds for an image reference, read without pulling: the manifest (its digest,
layer digests and sizes) and the config's DiffIDs. Used by `upgrade --check` and the disk-space
check before a pull (bootc reads the same through skopeo; skopeo is not in every image, so this is
a small client of the registry's HTTP API, /v2/<repository>/manifests|blobs/<reference>).

It resolves a name as the bootc store's podman does: the `[[registry]]` entries of
/etc/containers/registries.conf.d/*.conf (prefix -> location, `insecure`, `blocked`; the store's
pinned registries.conf adds nothing else), the longest matching prefix wins. An insecure
registry (or `tls_verify=False`) is tried over HTTPS without certificate checks, then over plain
HTTP, as containers/image does. Anonymous bearer tokens (`WWW-Authenticate: Bearer`) are fetched
when the registry asks; credentials are not read. Every failure is one line naming the reference.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import platform
import ssl
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootc_unified.errors import UserError

REGISTRIES_D = Path("/etc/containers/registries.conf.d")
TIMEOUT = 60.0
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[2:]


@dataclass(frozen=True)
class RemoteLayer:
    digest: str  # of the compressed blob
    size: int  # compressed bytes, as the manifest says
    diff_id: str  # the uncompressed tar's digest (from the config)


@dataclass(frozen=True)
class RemoteImage:
    ref: str
    digest: str  # this platform's image manifest
    index_digest: str | None  # the index the tag named, if it named one
    config_digest: str
    layers: tuple[RemoteLayer, ...]

    @property
    def digests(self) -> set[str]:
        """Every manifest digest a store may record for this image."""
        return {self.digest} | ({self.index_digest} if self.index_digest else set())


@dataclass(frozen=True)
class Endpoint:
    host: str  # host[:port] to connect to
    repository: str  # path on that host
    reference: str  # tag or digest
    insecure: bool


def split_ref(ref: str) -> tuple[str, str, str]:
    """`host/repo[:tag][@digest]` -> (host, repo, tag-or-digest); docker.io names completed."""
    name = ref.removeprefix("docker://")
    reference = "latest"
    if "@" in name:
        name, reference = name.split("@", 1)
    else:
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, reference = name.rsplit(":", 1)
    host, _, repo = name.partition("/")
    if not repo or not ("." in host or ":" in host or host == "localhost"):
        raise UserError(f"{ref}: not a fully qualified image reference (REGISTRY/REPOSITORY[:TAG|@DIGEST])")
    return host, repo, reference


def _registry_entries(registries_d: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not registries_d.is_dir():
        return out
    for path in sorted(registries_d.glob("*.conf")):
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise UserError(f"{path}: {e}") from e
        for entry in doc.get("registry") or []:
            if isinstance(entry, dict):
                out.append(entry)
    return out


def _prefix_matches(prefix: str, name: str) -> bool:
    return name == prefix or (name.startswith(prefix) and name[len(prefix)] in "/:@")


def resolve(ref: str, tls_verify: bool = True, registries_d: Path = REGISTRIES_D) -> Endpoint:
    """Where `ref` is fetched from, after the registries.conf.d prefix rewriting."""
    host, repo, reference = split_ref(ref)
    name = f"{host}/{repo}"
    best: dict[str, Any] | None = None
    best_prefix = ""
    for entry in _registry_entries(registries_d):
        prefix = str(entry.get("prefix") or entry.get("location") or "")
        if not prefix or prefix.startswith("*"):  # wildcard prefixes: not supported here
            continue
        if _prefix_matches(prefix, name) and len(prefix) > len(best_prefix):
            best, best_prefix = entry, prefix
    insecure = not tls_verify
    if best is not None:
        if best.get("blocked"):
            raise UserError(f"{ref}: registry {best_prefix} is blocked in registries.conf")
        location = str(best.get("location") or best_prefix)
        name = location + name[len(best_prefix) :]
        insecure = insecure or bool(best.get("insecure"))
        host, _, repo = name.partition("/")
    if host == "docker.io":
        host = "registry-1.docker.io"
        if "/" not in repo:
            repo = f"library/{repo}"
    return Endpoint(host, repo, reference, insecure)


class _Client:
    def __init__(self, ep: Endpoint, ref: str) -> None:
        self.ep, self.ref = ep, ref
        self.token: str | None = None
        self.schemes = ["https", "http"] if ep.insecure else ["https"]

    def _conn(self, scheme: str, host: str) -> http.client.HTTPConnection:
        if scheme == "http":
            return http.client.HTTPConnection(host, timeout=TIMEOUT)
        ctx = ssl.create_default_context()
        if self.ep.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, timeout=TIMEOUT, context=ctx)

    def _request(self, url: str, accept: str) -> tuple[int, dict[str, str], bytes]:
        parts = urllib.parse.urlsplit(url)
        conn = self._conn(parts.scheme, parts.netloc)
        headers = {"Accept": accept, "User-Agent": "bootc-unified"}
        if self.token and parts.netloc == self.ep.host:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
        finally:
            conn.close()

    def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() != "bearer":
            raise UserError(f"{self.ref}: the registry asks for {scheme} credentials")
        fields = dict(
            (k.strip(), v.strip().strip('"'))
            for k, _, v in (p.partition("=") for p in params.split(","))
            if k.strip()
        )
        query = {"service": fields.get("service", ""), "scope": f"repository:{self.ep.repository}:pull"}
        status, _h, body = self._request(f"{fields.get('realm', '')}?{urllib.parse.urlencode(query)}", "*/*")
        if status != 200:
            raise UserError(f"{self.ref}: token request failed (HTTP {status})")
        doc = json.loads(body)
        self.token = str(doc.get("token") or doc.get("access_token") or "")

    def get(self, kind: str, reference: str, accept: str) -> tuple[bytes, str]:
        """GET /v2/<repo>/<kind>/<reference>: (body, content type)."""
        path = f"/v2/{self.ep.repository}/{kind}/{reference}"
        last: str = ""
        while self.schemes:
            scheme = self.schemes[0]
            url = f"{scheme}://{self.ep.host}{path}"
            try:
                status, headers, body = self._request(url, accept)
                if status == 401 and self.token is None and "www-authenticate" in headers:
                    self._authenticate(headers["www-authenticate"])
                    status, headers, body = self._request(url, accept)
                for _ in range(5):  # blobs are often redirected to a CDN
                    if status not in (301, 302, 303, 307, 308) or "location" not in headers:
                        break
                    url = urllib.parse.urljoin(url, headers["location"])
                    status, headers, body = self._request(url, accept)
            except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                last = str(e) or type(e).__name__
                self.schemes.pop(0)  # insecure: fall back to plain HTTP
                continue
            if status == 404:
                raise UserError(f"{self.ref}: {kind[:-1]} {reference} not found in the registry")
            if status != 200:
                raise UserError(f"{self.ref}: registry answered HTTP {status} for {kind[:-1]} {reference}")
            return body, headers.get("content-type", "").split(";")[0].strip()
        raise UserError(f"{self.ref}: cannot reach registry {self.ep.host}: {last}")


def _json(data: bytes, ref: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise UserError(f"{ref}: the registry's {what} is not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise UserError(f"{ref}: the registry's {what} is not a JSON object")
    return doc


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def inspect(ref: str, tls_verify: bool = True, registries_d: Path = REGISTRIES_D) -> RemoteImage:
    """The image `ref` names in its registry, for this machine's platform (linux/<arch>)."""
    ep = resolve(ref, tls_verify, registries_d)
    client = _Client(ep, ref)
    raw, ctype = client.get("manifests", ep.reference, ", ".join(MANIFEST_TYPES))
    manifest = _json(raw, ref, "manifest")
    index_digest = None
    if ctype in INDEX_TYPES or "manifests" in manifest:
        index_digest = _digest(raw)
        arch = ARCH.get(platform.machine(), platform.machine())
        for m in manifest.get("manifests") or []:
            p = m.get("platform") or {}
            if p.get("os") == "linux" and p.get("architecture") == arch:
                raw, ctype = client.get("manifests", str(m["digest"]), ", ".join(MANIFEST_TYPES))
                manifest = _json(raw, ref, "manifest")
                break
        else:
            raise UserError(f"{ref}: no linux/{arch} image in the index")
    try:
        config_digest = str(manifest["config"]["digest"])
        layers = [(str(x["digest"]), int(x.get("size", 0))) for x in manifest.get("layers") or []]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{ref}: the registry's manifest has no config or layers ({e})") from e
    config_raw, _ = client.get("blobs", config_digest, "*/*")
    if _digest(config_raw) != config_digest:
        raise UserError(f"{ref}: the registry's config does not match its digest {config_digest}")
    config = _json(config_raw, ref, "config")
    diff_ids = ((config.get("rootfs") or {}).get("diff_ids")) or []
    if len(diff_ids) != len(layers):
        raise UserError(f"{ref}: the config names {len(diff_ids)} DiffIDs for {len(layers)} layers")
    return RemoteImage(
        ref=ref,
        digest=_digest(raw),
        index_digest=index_digest,
        config_digest=config_digest,
        layers=tuple(RemoteLayer(d, s, str(i)) for (d, s), i in zip(layers, diff_ids, strict=True)),
    )
