#!/usr/bin/env python3
"""Validate custom resources (Prometheus Operator kinds) against the JSON schemas in deploy/schemas.

kubernetes-validate bundles schemas for the built-in Kubernetes kinds only; for the CRD kinds it
prints a WARN and passes. This checks those kinds instead, offline:

    kubectl kustomize deploy/k8s/overlays/cpu | python3 deploy/scripts/validate-crds.py -

A schema file is named <kind>-<group>-<version>.json (lower-case kind). Resources of kinds with no
schema here are left to kubernetes-validate and listed as "skip". Exit status: 0 all checked
resources valid, 1 a resource is invalid, 2 bad input. Needs PyYAML and jsonschema (both come
with kubernetes-validate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def schema_path(api_version: str, kind: str, schema_dir: Path = SCHEMA_DIR) -> Path:
    group, _, version = api_version.rpartition("/")
    return schema_dir / f"{kind.lower()}-{group or 'core'}-{version}.json"


def validate_docs(docs: list[dict], schema_dir: Path = SCHEMA_DIR) -> tuple[list[str], list[str], list[str]]:
    """Returns (ok, skipped, errors) as printable lines."""
    ok: list[str] = []
    skipped: list[str] = []
    errors: list[str] = []
    for doc in docs:
        kind = str(doc.get("kind", "?"))
        name = str((doc.get("metadata") or {}).get("name", "?"))
        path = schema_path(str(doc.get("apiVersion", "")), kind, schema_dir)
        if not path.is_file():
            skipped.append(f"skip {kind}/{name}: no schema {path.name} (left to kubernetes-validate)")
            continue
        schema = json.loads(path.read_text(encoding="utf-8"))
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
        problems = sorted(validator_cls(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
        if problems:
            for err in problems:
                where = ".".join(str(p) for p in err.absolute_path) or "<root>"
                errors.append(f"ERROR {kind}/{name}: {where}: {err.message}")
        else:
            ok.append(f"OK {kind}/{name} against {path.name}")
    return ok, skipped, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="YAML files with one or more documents, or - for stdin")
    parser.add_argument("--schema-dir", type=Path, default=SCHEMA_DIR)
    parser.add_argument("--require-kind", action="append", default=[],
                        help="fail unless at least one resource of this kind was checked (repeatable)")
    args = parser.parse_args(argv)

    docs: list[dict] = []
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
            docs.extend(d for d in yaml.safe_load_all(text) if d)
        except (OSError, yaml.YAMLError) as exc:
            print(f"FATAL cannot read {name}: {exc}", file=sys.stderr)
            return 2
    ok, skipped, errors = validate_docs(docs, args.schema_dir)
    for line in ok + skipped + errors:
        print(line)
    checked_kinds = {line.split()[1].split("/")[0] for line in ok + errors}
    missing = [k for k in args.require_kind if k not in checked_kinds]
    for kind in missing:
        print(f"ERROR no {kind} found in the input")
    return 1 if errors or missing else 0


if __name__ == "__main__":
    sys.exit(main())
