#!/usr/bin/env python3
"""A registry token server on 127.0.0.1 for the oci:// end-to-end tests (distribution
`docs/spec/auth/token.md`): GET /token?service=..&scope=repository:<name>:<actions> with Basic
auth answers a JWT (RS256, the signing certificate in `x5c`) that Debian's docker-registry
verifies against DIR/cert.pem. Right user and password: the actions asked for; anyone else: none
(an anonymous token with empty access, as public registries do); a wrong password: 401.
Signs with the `openssl` command (no Python packages needed).

    oci_token_server.py DIR PORT USER PASSWORD ISSUER SERVICE

Writes DIR/{key,cert}.pem, prints `ready` once listening, serves until killed.
"""
import base64
import http.server
import json
import os
import subprocess
import sys
import time
import urllib.parse

DIR, PORT, USER, PASSWORD, ISSUER, SERVICE = sys.argv[1], int(sys.argv[2]), *sys.argv[3:7]
KEY, CERT = os.path.join(DIR, "key.pem"), os.path.join(DIR, "cert.pem")
subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", KEY, "-out", CERT,
                "-days", "2", "-subj", "/CN=lora-test-token"], check=True, capture_output=True)
DER = subprocess.run(["openssl", "x509", "-in", CERT, "-outform", "DER"], check=True, capture_output=True).stdout


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(sub: str, access: list) -> str:
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(DER).decode()]}
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": sub, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
              "jti": f"{now}-{os.getpid()}-{time.monotonic_ns()}", "access": access}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", KEY], input=signing_input.encode(),
                         check=True, capture_output=True).stdout
    return f"{signing_input}.{b64url(sig)}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path != "/token":
            return self.answer(404, {"error": "not found"})
        q = urllib.parse.parse_qs(url.query)
        user = None
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
            if (u, p) != (USER, PASSWORD):
                return self.answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "wrong user or password"}]})
            user = u
        access = []
        for scope in q.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if user and kind == "repository":
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        t = token(user or "", access)
        self.answer(200, {"token": t, "access_token": t, "expires_in": 300})


server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print("ready", flush=True)
server.serve_forever()
