#!/usr/bin/env python3
"""A catalogue of attacks on a live NOPS kernel's identity and access layer.

Tokens are minted by an outside library (PyJWT), keys are rotated while requests keep coming,
and every attack must get the right 401/403 and leave no trace of success.

    catalogue.py keys DIR                      write the test issuers' keys, JWKS and SPIFFE bundle
    catalogue.py attack BASE BOOTSTRAP_KEY DIR run the catalogue; print one line per case; exit 1
                                               if any case did not get what it should

The kernel under test trusts (see tests/it/attacks.rs for its nops.toml):
  - issuer https://idp.test (audience nops) with the JWKS in DIR/jwks.json (ES256 kid es-1,
    RS256 kid rs-1, EdDSA kid ed-1);
  - the SPIFFE trust domain edge.test (audience nops) with the bundle DIR/bundle.json, its
    workloads in tenant acme with scopes agents:* self:read.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://idp.test"
AUDIENCE = "nops"
TRUST_DOMAIN = "edge.test"


# --- keys ------------------------------------------------------------------------------------

def pem_private(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_public(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk_of(key, kid, alg, use=None):
    doc = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    doc["kid"] = kid
    doc["alg"] = alg
    if use:
        doc["use"] = use
    return doc


def write_keys(directory):
    os.makedirs(directory, exist_ok=True)
    keys = {
        "es-1": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "rs-1": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        "ed-1": (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        "attacker": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "svid-1": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "other-domain": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    }
    for kid, (key, _) in keys.items():
        with open(os.path.join(directory, f"{kid}.pem"), "wb") as f:
            f.write(pem_private(key))
    with open(os.path.join(directory, "rs-1.pub.pem"), "wb") as f:
        f.write(pem_public(keys["rs-1"][0]))
    jwks = {"keys": [jwk_of(keys[k][0], k, keys[k][1]) for k in ("es-1", "rs-1", "ed-1")]}
    with open(os.path.join(directory, "jwks.json"), "w") as f:
        json.dump(jwks, f)
    bundle = {"keys": [jwk_of(keys["svid-1"][0], "svid-1", "ES256", use="jwt-svid"),
                       jwk_of(keys["other-domain"][0], "x509-only", "ES256", use="x509-svid")]}
    with open(os.path.join(directory, "bundle.json"), "w") as f:
        json.dump(bundle, f)


def load_key(directory, kid):
    with open(os.path.join(directory, f"{kid}.pem"), "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


# --- HTTP ------------------------------------------------------------------------------------

class Client:
    def __init__(self, base):
        self.base = base.rstrip("/")

    def call(self, method, path, credential=None, tenant=None, body=None):
        data = None
        headers = {}
        if credential is not None:
            headers["Authorization"] = f"Bearer {credential}"
        if tenant is not None:
            headers["X-Nops-Tenant"] = tenant
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read()
                return response.status, (json.loads(text) if text else None), dict(response.headers)
        except urllib.error.HTTPError as err:
            text = err.read()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text.decode(errors="replace")
            return err.code, parsed, dict(err.headers)


# --- tokens ----------------------------------------------------------------------------------

def claims(sub="user-1", **extra):
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300,
            "nops_tenant": "acme", "nops_role": "admin", "scope": "*"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header, payload, key=None):
    """A token assembled by hand: for algorithms PyJWT rightly refuses to produce."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if key is not None:
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- the catalogue ---------------------------------------------------------------------------

class Catalogue:
    def __init__(self, base, bootstrap, directory):
        self.http = Client(base)
        self.bootstrap = bootstrap
        self.dir = directory
        self.failures = 0

    def expect(self, name, got, want, detail=""):
        ok = got == want
        if not ok:
            self.failures += 1
        print(f"{'ok  ' if ok else 'FAIL'} {name}: got {got}, want {want}{' — ' + detail if detail and not ok else ''}")
        sys.stdout.flush()

    def token(self, kid, alg, payload, headers=None):
        header = {"kid": kid}
        header.update(headers or {})
        return jwt.encode(payload, load_key(self.dir, kid), algorithm=alg, headers=header)

    def agents(self, tenant):
        status, body, _ = self.http.call("GET", "/api/v1/agents", self.bootstrap, tenant)
        assert status == 200, body
        return [a["name"] for a in body["items"]]

    def whoami(self, credential, tenant=None):
        return self.http.call("GET", "/api/v1/whoami", credential, tenant)

    def run(self):
        self.tokens()
        self.workloads()
        self.escalation_and_isolation()
        self.keys()
        self.rotation_under_load()
        return self.failures

    def tokens(self):
        for kid, alg in (("es-1", "ES256"), ("rs-1", "RS256"), ("ed-1", "EdDSA")):
            status, body, _ = self.whoami(self.token(kid, alg, claims(sub=f"user-{alg}")))
            self.expect(f"valid {alg} token is accepted", status, 200, str(body))
            if status == 200:
                self.expect(f"{alg} principal", (body["subject"], body["method"], body["tenant"]),
                            (f"user-{alg}", "jwt", "acme"))
        now = int(time.time())
        cases = [
            ("expired token", self.token("es-1", "ES256", claims(exp=now - 60))),
            ("token not yet valid", self.token("es-1", "ES256", claims(nbf=now + 120))),
            ("wrong audience", self.token("es-1", "ES256", claims(aud="someone-else"))),
            ("wrong issuer", self.token("es-1", "ES256", claims(iss="https://evil.test"))),
            ("no exp", self.token("es-1", "ES256", claims(exp=None))),
            ("alg none", jwt.encode(claims(), None, algorithm="none", headers={"kid": "es-1"})),
            ("alg none, hand made", hand_made({"alg": "none", "kid": "es-1"}, claims())),
            ("HS256 keyed with the RS256 public key (algorithm confusion)",
             hand_made({"alg": "HS256", "kid": "rs-1", "typ": "JWT"}, claims(),
                       key=open(os.path.join(self.dir, "rs-1.pub.pem"), "rb").read())),
            ("RS256 header on an ES256 key", hand_made({"alg": "RS256", "kid": "es-1"}, claims(), key=b"x")),
            ("forged kid: attacker's key named es-1",
             jwt.encode(claims(), load_key(self.dir, "attacker"), algorithm="ES256", headers={"kid": "es-1"})),
            ("unknown kid", jwt.encode(claims(), load_key(self.dir, "attacker"), algorithm="ES256",
                                       headers={"kid": "kid-that-does-not-exist"})),
            ("tampered payload", self.tamper(self.token("es-1", "ES256", claims(nops_role="viewer")))),
            ("unknown role claim", self.token("es-1", "ES256", claims(nops_role="root"))),
        ]
        for name, token in cases:
            status, body, headers = self.http.call(
                "POST", "/api/v1/agents", token, "acme", {"name": f"intruder-{len(name)}"})
            self.expect(name, status, 401, str(body))
            self.expect(f"{name}: bearer challenge", headers.get("www-authenticate") or headers.get("WWW-Authenticate"), "Bearer")
        self.expect("no agent was created by any refused token", self.agents("acme"), [])

    def tamper(self, token):
        header, payload, signature = token.split(".")
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        data["nops_role"] = "admin"
        return f"{header}.{b64(json.dumps(data).encode())}.{signature}"

    def svid(self, kid, sub, **extra):
        now = int(time.time())
        payload = {"sub": sub, "aud": AUDIENCE, "exp": now + 300, "iat": now}
        payload.update(extra)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, load_key(self.dir, kid), algorithm="ES256", headers={"kid": kid})

    def workloads(self):
        good = self.svid("svid-1", f"spiffe://{TRUST_DOMAIN}/edge/agent-7")
        status, body, _ = self.whoami(good)
        self.expect("valid JWT-SVID is accepted", status, 200, str(body))
        if status == 200:
            self.expect("workload principal", (body["subject"], body["method"], body["role"], body["tenant"]),
                        (f"spiffe://{TRUST_DOMAIN}/edge/agent-7", "workload", "agent", "acme"))
        cases = [
            ("SVID of another trust domain", self.svid("svid-1", "spiffe://other.test/edge/agent-7")),
            ("SVID with a malformed SPIFFE ID", self.svid("svid-1", f"spiffe://{TRUST_DOMAIN}/../agent")),
            ("SVID without an audience", self.svid("svid-1", f"spiffe://{TRUST_DOMAIN}/a", aud=None)),
            ("SVID signed by a key the bundle marks x509-svid",
             jwt.encode({"sub": f"spiffe://{TRUST_DOMAIN}/a", "aud": AUDIENCE, "exp": int(time.time()) + 60},
                        load_key(self.dir, "other-domain"), algorithm="ES256", headers={"kid": "x509-only"})),
            ("SVID with HS256", hand_made({"alg": "HS256", "kid": "svid-1"},
                                          {"sub": f"spiffe://{TRUST_DOMAIN}/a", "aud": AUDIENCE,
                                           "exp": int(time.time()) + 60}, key=b"guess")),
        ]
        for name, token in cases:
            status, body, _ = self.whoami(token)
            self.expect(name, status, 401, str(body))
        # A workload reads agents of its tenant, and nothing of another.
        status, _, _ = self.http.call("GET", "/api/v1/agents", good)
        self.expect("a workload's scopes are its trust domain's defaults", status, 403)

    def escalation_and_isolation(self):
        viewer = self.token("es-1", "ES256", claims(sub="viewer-1", nops_role="viewer", scope="agents:read agents:list self:read"))
        status, body, _ = self.http.call("POST", "/api/v1/agents", viewer, None, {"name": "by-viewer"})
        self.expect("scope escalation: a read-only token writes", status, 403, str(body))
        status, body, _ = self.http.call("POST", "/api/v1/admin/api-keys", viewer, None,
                                         {"name": "mine", "role": "admin", "scopes": ["*"]})
        self.expect("scope escalation: a read-only token mints a key", status, 403, str(body))
        manager = self.token("es-1", "ES256", claims(sub="mgr", scope="keys:* self:read"))
        status, body, _ = self.http.call("POST", "/api/v1/admin/api-keys", manager, None,
                                         {"name": "wider", "role": "admin", "scopes": ["*"]})
        self.expect("scope escalation: a key manager hands out more than it holds", status, 422, str(body))
        acme_admin = self.token("es-1", "ES256", claims(sub="acme-admin"))
        status, victim, _ = self.http.call("POST", "/api/v1/agents", self.bootstrap, "beta", {"name": "victim"})
        assert status == 201, victim
        for method, path, body in (
            ("GET", "/api/v1/agents", None),
            ("GET", f"/api/v1/agents/{victim['id']}", None),
            ("PATCH", f"/api/v1/agents/{victim['id']}", {"labels": {"owned": "yes"}}),
            ("DELETE", f"/api/v1/agents/{victim['id']}", None),
            ("POST", "/api/v1/agents", {"name": "planted"}),
            ("GET", "/api/v1/admin/api-keys", None),
            ("POST", "/api/v1/admin/api-keys", {"name": "mole", "role": "admin"}),
            ("GET", "/api/v1/plugins", None),
        ):
            status, answer, _ = self.http.call(method, path, acme_admin, "beta", body)
            self.expect(f"cross-tenant {method} {path}", status, 403, str(answer))
        self.expect("beta is untouched", self.agents("beta"), ["victim"])
        _, keys, _ = self.http.call("GET", "/api/v1/admin/api-keys", self.bootstrap, "beta")
        self.expect("no key was planted in beta", keys["keys"], [])

    def create_key(self, tenant, **body):
        payload = {"name": "attack-test", "role": "admin"}
        payload.update(body)
        status, created, _ = self.http.call("POST", "/api/v1/admin/api-keys", self.bootstrap, tenant, payload)
        assert status == 201, created
        return created["secret"], created["key"]["id"]

    def keys(self):
        secret, key_id = self.create_key("acme")
        self.expect("a new key works", self.whoami(secret)[0], 200)
        status, _, _ = self.http.call("POST", f"/api/v1/admin/api-keys/{key_id}/revoke", self.bootstrap, "acme")
        self.expect("revoke", status, 200)
        status, body, _ = self.http.call("POST", "/api/v1/agents", secret, None, {"name": "after-revoke"})
        self.expect("a revoked key is refused", status, 401, str(body))
        self.expect("nothing was created with the revoked key", "after-revoke" in self.agents("acme"), False)
        look_alike = secret[:-1] + ("A" if secret[-1] != "A" else "B")
        self.expect("a look-alike key (bad checksum) is refused", self.whoami(look_alike)[0], 401)

    def rotation_under_load(self):
        secret, key_id = self.create_key("acme", name="rotating")
        results = {"old": [], "new": []}
        stop = threading.Event()
        current = {"old": secret, "new": None}

        def hammer(which):
            while not stop.is_set():
                credential = current[which]
                if credential is None:
                    time.sleep(0.005)
                    continue
                results[which].append((time.monotonic(), self.whoami(credential)[0]))

        threads = [threading.Thread(target=hammer, args=(w,)) for w in ("old", "new")]
        for t in threads:
            t.start()
        time.sleep(0.5)
        grace_s = 2
        status, rotated, _ = self.http.call("POST", f"/api/v1/admin/api-keys/{key_id}/rotate", self.bootstrap, "acme",
                                            {"grace_s": grace_s})
        rotated_at = time.monotonic()
        self.expect("rotate mid-load", status, 200, str(rotated))
        current["new"] = rotated["secret"]
        time.sleep(grace_s + 1.5)
        stop.set()
        for t in threads:
            t.join()
        in_grace = [s for (at, s) in results["old"] if at < rotated_at + grace_s - 0.2]
        after = [s for (at, s) in results["old"] if at > rotated_at + grace_s + 0.2]
        self.expect("the old key works until the grace ends (failures among %d calls)" % len(in_grace),
                    [s for s in in_grace if s != 200], [])
        self.expect("the old key fails after the grace (successes among %d calls)" % len(after),
                    [s for s in after if s != 401], [])
        self.expect("the new key works throughout (failures among %d calls)" % len(results["new"]),
                    [s for (_, s) in results["new"] if s != 200], [])
        self.expect("calls were made in each phase", bool(in_grace and after and results["new"]), True)


def main(argv):
    if len(argv) == 3 and argv[1] == "keys":
        write_keys(argv[2])
        return 0
    if len(argv) == 5 and argv[1] == "attack":
        failures = Catalogue(argv[2], argv[3], argv[4]).run()
        print(f"{failures} failure(s)")
        return 1 if failures else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
