#!/usr/bin/env python3
"""Write the rule groups of a PrometheusRule manifest as a plain Prometheus rules file.

The PrometheusRule in deploy/k8s/base is the single source of the alerts; promtool (and a
Prometheus without the Operator) wants a plain rules file:

    python3 deploy/scripts/extract-rules.py deploy/k8s/base/prometheusrule.yaml > adapterserve.rules.yaml

Needs PyYAML (installed with the project's `test` extra).
"""

from __future__ import annotations

import sys

import yaml


def extract(text: str) -> dict:
    docs = [d for d in yaml.safe_load_all(text) if d]
    groups = []
    for doc in docs:
        if doc.get("kind") == "PrometheusRule":
            groups.extend(doc.get("spec", {}).get("groups", []))
    if not groups:
        raise SystemExit("no PrometheusRule with spec.groups found in the input")
    return {"groups": groups}


class _Dumper(yaml.SafeDumper):
    """Keeps multi-line strings (PromQL) readable as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src = sys.stdin.read() if argv[1] == "-" else open(argv[1], encoding="utf-8").read()
    yaml.dump(extract(src), sys.stdout, Dumper=_Dumper, sort_keys=False, width=1000)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
