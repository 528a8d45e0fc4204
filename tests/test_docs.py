"""The front door and its pages: README.md ≤ 200 lines; every generated block of README.md and docs/
is what its source renders (report.PAGES); Alg. 1's table points at lines that hold its code; every
relative link resolves; no page narrates its own making."""

import json
import re
import sys
from pathlib import Path

import pytest

import report
from analysis import equivalent_noise, tsne
from analysis.readings import SWEEP_W

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import cost_report  # noqa: E402
import quality_report  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def expected(key: str) -> str:
    """What block `key` must hold, rendered from the committed JSON or markdown it comes from."""
    if key.startswith("quality_"):
        s = json.loads(
            (RESULTS / f"quality_digits_{key.removeprefix('quality_')}.json").read_text()
        )
        return quality_report.readme_markdown({**s, "claims": quality_report.claims(s)})
    if key in ("equivalent_noise", "tsne"):
        script = {"equivalent_noise": equivalent_noise, "tsne": tsne}[key]
        numbers = json.loads((ROOT / "docs" / f"{key}.json").read_text())
        # the committed figures are the defaults' (digits, the full CFG sweep): --out docs --readme
        assert numbers["args"]["backbone"] == "digits" and tuple(numbers["args"]["w"]) == SWEEP_W
        return script.summary(numbers)
    if key == "gpu_memory":
        return cost_report.gpu_memory(json.loads((RESULTS / "cost_paper-sana.json").read_text()))
    return (RESULTS / f"{key}.md").read_text()  # a bench's own markdown (report.publish)


def test_readme_is_a_front_door():
    """≤ 200 lines, and the two commands a reader comes for."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "pip install -r requirements.txt && python train.py" in text
    assert "pip install -r requirements.txt && python -m pytest -q" in text


@pytest.mark.parametrize("key", sorted(report.PAGES))
def test_generated_blocks_are_their_sources(key):
    """Each block of report.PAGES, in its page, is what its source renders."""
    assert report.block(report.page(key), key) == expected(key).rstrip("\n")


def test_every_block_in_the_pages_is_known():
    """A block in README.md or docs/ that report.PAGES does not list would go unchecked."""
    for page in PAGES:
        for key in re.findall(r"^<!-- ([\w-]+) -->$", page.read_text(), flags=re.M):
            assert report.PAGES.get(key) == page.relative_to(ROOT).as_posix(), (page, key)


def test_cost_markdown_is_its_json():
    """The committed paper-shape and sweep tables are what their renderers make of the JSON."""
    paper = json.loads((RESULTS / "cost_paper-sana.json").read_text())
    assert cost_report.paper_table(paper).strip() == expected("cost_paper-sana").strip()
    sweep = json.loads((RESULTS / "cost_small-sana_sweep.json").read_text())
    assert cost_report.sweep_table(sweep).strip() == expected("cost_small-sana_sweep").strip()
    small = json.loads((RESULTS / "cost_small-sana.json").read_text())
    assert expected("cost_small-sana").startswith(cost_report.table(small["variants"]))


def test_algorithm_table_points_at_its_code():
    """README's Alg. 1 table: each `file.py:N` line holds the code quoted beside it."""
    rows = re.findall(r"^\| [\d–]+ \| .* \| `(.+)` \| `([\w/]+\.py):(\d+)` \|$", _readme(), re.M)
    assert len(rows) >= 10
    for code, file, line in rows:
        lines = (ROOT / file).read_text().splitlines()
        assert code in lines[int(line) - 1], f"{file}:{line} does not hold {code!r}"


def test_relative_links_resolve():
    """Every [text](path) and ![picture](path) of the pages names a file of the repository."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not re.match(r"https?://", target):
                assert (page.parent / target).exists(), f"{page.name}: {target}"


HISTORY = re.compile(
    r"\bsessions?\b|earlier (run|version|session)|previous (run|version|session)|this machine|"
    r"our machines|as before|\bhere\b|\bwas\b|\bnow\b|added in|a later",
    re.I,
)


def test_pages_state_facts_not_history():
    """No page narrates its own making: no run or version before this one, no "was" or "now", no
    "here" standing for a machine (commands, output and generated blocks aside)."""
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # commands and output
        text = re.sub(r"<!-- ([\w-]+) -->.*?<!-- /\1 -->", "", text, flags=re.S)  # generated
        hits = [m.group(0) for m in HISTORY.finditer(text)]
        assert not hits, f"{page.name}: {hits}"


def _readme() -> str:
    return (ROOT / "README.md").read_text()


STORY = re.compile(
    r'(?<!scope=")\bsessions?\b|(earlier|previous) (run|version|session)|this machine|'
    r"our machines|as before",
    re.I,
)


def test_no_file_tells_its_history():
    """Code, comments, tests and CI state what is true now; how it came to be lives in git log."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("*/*.py"), *PAGES, ROOT / ".ci" / "run"]
    for path in files:
        if path.name != "test_docs.py":
            hits = [m.group(0) for m in STORY.finditer(path.read_text(encoding="utf-8"))]
            assert not hits, f"{path.relative_to(ROOT)}: {hits}"
