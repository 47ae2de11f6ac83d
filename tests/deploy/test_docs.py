"""docs/operations.md stays in step with the manifests: runbook anchors, settings, metrics, links."""

from __future__ import annotations

import re

from .conftest import REPO
from .test_alerts import rule_alerts
from .test_contract import COUNTERS, GAUGES, HISTOGRAMS, SETTINGS

OPS = REPO / "docs" / "operations.md"


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", markdown, re.M)}


def test_every_alert_runbook_anchor_exists():
    found = anchors(OPS.read_text())
    for r in rule_alerts():
        anchor = r["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in found, f"{r['alert']}: no heading for #{anchor} in docs/operations.md"


def test_internal_links_resolve():
    text = OPS.read_text()
    found = anchors(text)
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in found, f"broken link #{target}"
    for path in re.findall(r"`((?:deploy|tests|docs)/[\w./-]+)`", text):
        assert (REPO / path.rstrip("/")).exists(), f"docs/operations.md names a missing path: {path}"


def test_reference_tables_are_complete():
    text = OPS.read_text()
    for name in SETTINGS:
        assert f"| `{name}` |" in text, f"{name} missing from the settings table"
    metrics = {f"adapterserve_{c}_total" for c in COUNTERS} | {f"adapterserve_{n}" for n in HISTOGRAMS | GAUGES}
    for name in metrics:
        assert f"| `{name}` |" in text, f"{name} missing from the metrics table"


def test_docs_cover_the_operations_topics():
    text = OPS.read_text()
    for heading in ("Deploy to Kubernetes", "Scaling out", "Sizing the adapter cache", "Graceful drain",
                    "Metrics", "Alerts", "Validation in CI"):
        assert re.search(rf"^## {heading}$", text, re.M), heading
    assert "No image can be built on our CI machines" in text
    assert "upstream-hash-by" in text and "ReadWriteMany" in text


def test_readme_links_the_operations_guide():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Deploy", 1)
    assert len(section) == 2, "README.md has a Deploy heading"
    assert "(docs/operations.md)" in section[1].split("\n## ", 1)[0]
