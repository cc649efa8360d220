"""Copy orchestration/serve_config.yaml into k8s/rayservice.yaml's spec.serveConfigV2, verbatim.

    python k8s/sync_serve_config.py            # rewrite the embedded copy in place
    python k8s/sync_serve_config.py --check    # exit 1 when the embedded copy is out of date (CI)
    python k8s/sync_serve_config.py --config site/serve_config.yaml --manifest site/serve-config-patch.yaml

Only the serveConfigV2 value is replaced (by a literal block); the rest of the file, comments included,
is kept. The file may also be a kustomize patch holding just the RayService's name and serveConfigV2.
The result is parsed back and must hold the config's exact text, or nothing is written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "orchestration" / "serve_config.yaml"
MANIFEST = ROOT / "k8s" / "rayservice.yaml"
KEY = re.compile(r"^(?P<indent> *)serveConfigV2:(?:[ \t].*)?$")  # any value: a block, "" for a new patch


def embed(manifest: str, config: str) -> str:
    """`manifest` with its serveConfigV2 replaced by a literal block holding exactly `config`."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if KEY.match(line.rstrip("\n"))]
    if len(starts) != 1:
        raise ValueError(f"expected one 'serveConfigV2:' key, found {len(starts)}")
    start = starts[0]
    indent = len(KEY.match(lines[start].rstrip("\n")).group("indent"))
    end = start + 1  # the block runs while lines are blank or indented deeper than the key
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
        end += 1
    body = config.rstrip("\n")
    if not body:
        raise ValueError("the serve config is empty")
    trailing = len(config) - len(body)
    chomp = "-" if trailing == 0 else ("" if trailing == 1 else "+")
    if chomp != "+":  # blank lines after the block stay outside it (a kept block would swallow them)
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
    pad = " " * (indent + 2)
    header = f"{' ' * indent}serveConfigV2: |{'2' if body.startswith(' ') else ''}{chomp}\n"
    block = [f"{pad}{line}\n" if line else "\n" for line in body.split("\n")] + ["\n"] * (trailing - 1)
    result = "".join(lines[:start] + [header] + block + lines[end:])
    embedded = yaml.safe_load(result)["spec"]["serveConfigV2"]
    if embedded != config:
        raise ValueError("the rewritten manifest does not hold the serve config verbatim")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="serve config to embed (%(default)s)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help="RayService manifest to read (%(default)s)")
    parser.add_argument("--output", type=Path, help="where to write (default: the manifest itself)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the copy is out of date")
    args = parser.parse_args(argv)
    current = args.manifest.read_text()
    try:
        updated = embed(current, args.config.read_text())
    except ValueError as exc:
        print(f"sync_serve_config: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if updated != current:
            print(f"{args.manifest}: serveConfigV2 differs from {args.config}; run k8s/sync_serve_config.py",
                  file=sys.stderr)
            return 1
        return 0
    (args.output or args.manifest).write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
