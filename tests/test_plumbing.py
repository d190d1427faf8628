"""The five algorithm scripts read like their papers: the method first, in the order of
understanding, and one plumbing block at the end that is the same text in every script."""

import ast
import difflib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from sync_plumbing import MARKER, SCRIPTS, split  # noqa: E402  (the block as the sync tool sees it)

# A default's source: the paper (section, table, equation, figure, appendix, algorithm box), the
# authors' code, the official DreamerV2 configuration, or our own choice with its reason.
SOURCE = re.compile(r"paper|Sec\. ?[0-9A-Z]|Table|Eq\. ?[0-9]|Fig\. ?[0-9]|App\. ?[A-Z]|Algorithm|"
                    r"authors'|official|DreamerV2|configs\.yaml|ours")


def source(script: str) -> str:
    return (ROOT / f"{script}.py").read_text()


def plumbing(text: str) -> str:
    """From the block's opening rule line to the end of the file."""
    return split(text, "script")[1]


def top_level(text: str) -> dict:
    return {node.name: node for node in ast.parse(text).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_the_plumbing_block_is_the_same_text_in_all_five_scripts():
    blocks = {script: plumbing(source(script)) for script in SCRIPTS}
    for script, block in blocks.items():
        diff = "".join(difflib.unified_diff(blocks["dreamerv2"].splitlines(True), block.splitlines(True),
                                            "dreamerv2.py", f"{script}.py", n=1))
        assert block == blocks["dreamerv2"], f"the plumbing block of {script}.py differs:\n{diff[:3000]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_plumbing_block_comes_last_after_main_and_defines_nothing_twice(script):
    text = source(script)
    start = len(text) - len(plumbing(text))
    method, block = top_level(text[:start]), top_level(plumbing(text))
    assert "main" in method and "Args" in method and "Agent" in method
    assert not set(method) & set(block), f"defined in the method part and in the plumbing: {set(method) & set(block)}"
    assert plumbing(text).rstrip().endswith('if __name__ == "__main__":\n    main(parse_args())')


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_file_follows_the_order_of_understanding(script):
    """docstring -> Args -> networks -> objective -> behaviour -> Agent -> evaluation -> main -> plumbing."""
    text = source(script)
    defs = top_level(text)
    line = {name: defs[name].lineno for name in ("Args", "RSSM", "Agent", "evaluate", "main")}
    assert line["Args"] < line["RSSM"] < line["Agent"] < line["evaluate"] < line["main"], line
    assert text.index(MARKER) > text.index("\ndef main(")
    assert ast.get_docstring(ast.parse(text)).count("\n") > 10  # the paper map opens the file


@pytest.mark.parametrize("script", SCRIPTS)
def test_update_reads_like_the_algorithm_box(script):
    """Agent.update: the losses and one optimiser call per network, 35 lines with its docstring;
    zero_grad, backward, clipping and the non-finite skip live in the plumbing's Optimizer."""
    agent = top_level(source(script))["Agent"]
    (update,) = [node for node in agent.body if isinstance(node, ast.FunctionDef) and node.name == "update"]
    lines = update.end_lineno - update.lineno + 1
    assert lines <= 35, f"{script}.py Agent.update is {lines} lines"
    body = ast.unparse(update)
    for mechanics in ("zero_grad", "clip_grad_norm_", "found_inf"):
        assert mechanics not in body, f"{script}.py Agent.update still does {mechanics} itself"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_default_names_its_source(script):
    """Every Args field's docstring says where its default comes from (paper, authors' code,
    DreamerV2's configuration, or ours with the reason)."""
    args = top_level(source(script))["Args"]
    missing, body = [], args.body
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign):
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
            if not SOURCE.search(str(doc)):
                missing.append(node.target.id)
    assert not missing, f"{script}.py: defaults without a source tag: {missing}"


def test_no_reference_points_outside_the_repository():
    """A user's clone has only this repository: papers are cited by title and arXiv id, and the
    measurements a comment relies on live in results/."""
    files = [path for pattern in ("*.py", "*.md", "*.sh") for path in ROOT.rglob(pattern)
             if not any(part.startswith(".") or part == "runs" for part in path.relative_to(ROOT).parts)]
    offenders = [str(path.relative_to(ROOT)) for path in files
                 if "../shared" in path.read_text(errors="ignore") and path.name != "test_plumbing.py"]
    assert not offenders, f"these files point at ../shared, which a clone does not have: {offenders}"
