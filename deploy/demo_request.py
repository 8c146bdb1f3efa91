"""The README's demo request, read from README.md: the one body that `make demo` prints, the CI smoke
(.ci/demo_smoke.py) and the image check (deploy/check-image.sh) score. Editing the README's curl command
changes all three; a README without it fails them.

    python deploy/demo_request.py --curl http://127.0.0.1:8000    # the README's curl command for that server
    python deploy/demo_request.py --body                          # its JSON body
    python deploy/demo_request.py --score http://127.0.0.1:8000   # POST it; print the predictions or exit 1

Standard library only: it runs with any Python 3.11, inside or outside the project's environment.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
# The first curl command of the README that POSTs to a :predict route, continued over a backslash line break.
CURL = re.compile(
    r"curl -s -X POST (?P<url>http://\S+?)(?P<path>/v1/models/\w+:predict) -H 'content-type: application/json' \\\n"
    r"\s*-d '(?P<body>[^']+)'"
)


def readme_request(readme: Path = README) -> tuple[str, str]:
    """(path, body) of the README's demo curl command; ValueError if the README has none."""
    match = CURL.search(readme.read_text())
    if match is None:
        raise ValueError(f"{readme}: no `curl -s -X POST http://.../v1/models/NAME:predict ... -d '...'` command")
    body = match.group("body")
    json.loads(body)  # the README's body must be JSON
    return match.group("path"), body


def score(base_url: str, timeout_s: float = 30.0) -> list[float]:
    """POST the README's body to ``base_url``; the predictions, each checked to be a probability in (0, 1)."""
    path, body = readme_request()
    req = urllib.request.Request(
        base_url.rstrip("/") + path, data=body.encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        raise ValueError(f"POST {path}: HTTP {e.code}: {e.read()[:500]!r}") from None
    if status != 200:
        raise ValueError(f"POST {path}: HTTP {status}, expected 200")
    predictions = json.loads(payload)["predictions"]
    if not predictions or not all(isinstance(p, float) and 0.0 < p < 1.0 for p in predictions):
        raise ValueError(f"POST {path}: predictions {predictions} are not probabilities in (0, 1)")
    return predictions


def main() -> int:
    p = argparse.ArgumentParser(description="The README's demo request (see the module docstring).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--curl", metavar="BASE_URL", help="print the README's curl command for this server")
    g.add_argument("--body", action="store_true", help="print the JSON body")
    g.add_argument("--score", metavar="BASE_URL", help="POST the body, print the predictions (exit 1 if bad)")
    args = p.parse_args()
    try:
        path, body = readme_request()
        if args.curl:
            url = args.curl.rstrip("/") + path
            sys.stdout.write(f"  curl -s -X POST {url} -H 'content-type: application/json' \\\n    -d '{body}'\n")
        elif args.body:
            sys.stdout.write(body + "\n")
        else:
            sys.stdout.write(json.dumps({"predictions": score(args.score)}) + "\n")
    except (ValueError, OSError) as e:
        sys.stderr.write(f"demo_request: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
