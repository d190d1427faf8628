"""The five algorithm scripts read like their papers (issue 39): the method first, in the order of
understanding, then one banner and an appendix that is the same text in every script; a flat
`main`, an `Agent.update` that reads like the algorithm box, and family scripts whose diff against
dreamerv2.py is what their paper changes."""

import ast
import difflib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from sync_plumbing import MARKER, SCRIPTS, split  # noqa: E402  (the appendix as the sync tool sees it)

# A default's source: the paper (section, table, equation, figure, appendix, algorithm box), the
# authors' code, the official DreamerV2 configuration, or our own choice with its reason.
SOURCE = re.compile(r"paper|Sec\. ?[0-9A-Z]|Table|Eq\. ?[0-9]|Fig\. ?[0-9]|App\. ?[A-Z]|Algorithm|"
                    r"authors'|official|DreamerV2|configs\.yaml|ours")
# Run machinery that belongs to the appendix, never to the method part.
MACHINERY = re.compile(r"cudagraph|outlive|compile|autocast|found_inf|zero_grad|clip_grad|halted|"
                       r"nonlocal")
# Lines above the banner (issue 39: at most 800, dreamerv2.py 700; blast.py is BLAST's ~185 lines of
# method on top of DreamerV2's 700, which the diff goal keeps as DreamerV2's text: 890); lines of
# the appendix (issue 39 aimed at 1,700-line files, an appendix of ~900: it also holds the run's
# promises of issues 41 and 42 and the shared replay now); lines changed above the banner against
# dreamerv2.py.
METHOD_LINES = {"dreamerv2": 700, "blast": 890}
METHOD_LINES_OTHERS, APPENDIX_LINES = 800, 1030
DIFF_AGAINST_DREAMERV2 = {"blast": 500, "dreamingv2": 600}


def source(script: str) -> str:
    return (ROOT / f"{script}.py").read_text()


def method(text: str) -> str:
    """From the top to the banner line above the appendix."""
    return split(text, "script")[0]


def appendix(text: str) -> str:
    """From the banner line to the end of the file."""
    return split(text, "script")[1]


def top_level(text: str) -> dict:
    return {node.name: node for node in ast.parse(text).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def lines_changed(a: str, b: str) -> int:
    """Added plus removed lines of a unified diff (what `diff a b | grep -c '^[<>]'` counts)."""
    return sum(1 for line in difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---")))


def test_the_appendix_is_the_same_text_in_all_five_scripts():
    blocks = {script: appendix(source(script)) for script in SCRIPTS}
    for script, block in blocks.items():
        diff = "".join(difflib.unified_diff(blocks["dreamerv2"].splitlines(True), block.splitlines(True),
                                            "dreamerv2.py", f"{script}.py", n=1))
        assert block == blocks["dreamerv2"], f"the appendix of {script}.py differs:\n{diff[:3000]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_appendix_comes_last_after_main_and_defines_nothing_twice(script):
    text = source(script)
    start = len(text) - len(appendix(text))
    above, below = top_level(text[:start]), top_level(appendix(text))
    assert "main" in above and "Args" in above and "Agent" in above
    assert "RunSettings" in below and "Run" in below and "Compute" in below and "Replay" in below
    assert not set(above) & set(below), f"defined above and below the banner: {set(above) & set(below)}"
    assert appendix(text).rstrip().endswith('if __name__ == "__main__":\n    main(*parse_args())')


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_method_follows_the_order_of_understanding(script):
    """docstring -> Args -> PRESETS -> networks -> losses -> Agent -> main -> the appendix."""
    text = source(script)
    tree = ast.parse(text)
    defs = top_level(text)
    presets = next(n.lineno for n in tree.body if isinstance(n, ast.Assign)
                   and any(getattr(t, "id", None) == "PRESETS" for t in n.targets))
    line = {name: defs[name].lineno for name in ("Args", "WorldModel", "Agent", "main")}
    assert line["Args"] < presets < line["WorldModel"] < line["Agent"] < line["main"], line
    assert text.index(MARKER) > text.index("\ndef main(")
    assert ast.get_docstring(tree).count("\n") > 10  # the paper map opens the file


@pytest.mark.parametrize("script", SCRIPTS)
def test_update_reads_like_the_algorithm_box(script):
    """Agent.update: at most 25 lines with its docstring, one line per loss and optimiser step;
    zero_grad, backward, clipping, the non-finite skip and CUDA-graph marking live in the
    appendix's Optimizer and Compute."""
    agent = top_level(source(script))["Agent"]
    (update,) = [node for node in agent.body if isinstance(node, ast.FunctionDef) and node.name == "update"]
    lines = update.end_lineno - update.lineno + 1
    assert lines <= 25, f"{script}.py Agent.update is {lines} lines"
    assert not MACHINERY.findall(ast.unparse(update)) and "backward" not in ast.unparse(update)


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_is_a_flat_loop(script):
    """main: at most 80 lines, no nested function, lambda or nonlocal: set up, then one loop of
    collect, update, evaluate and log; the run object does what is not the algorithm."""
    main = top_level(source(script))["main"]
    lines = main.end_lineno - main.lineno + 1
    nested = [type(n).__name__ for n in ast.walk(main) if n is not main and isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.Nonlocal, ast.ClassDef))]
    assert lines <= 80 and not nested, (lines, nested)
    assert sum(isinstance(n, (ast.While, ast.For)) for n in main.body) == 1  # one loop


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_method_part_is_short_and_free_of_run_machinery(script):
    text = source(script)
    above = method(text)
    limit = METHOD_LINES.get(script, METHOD_LINES_OTHERS)
    below = appendix(text).count("\n")
    print(f"{script}.py: {above.count(chr(10))} lines above the banner (at most {limit}), the "
          f"appendix {below} (at most {APPENDIX_LINES}), {text.count(chr(10))} in all")
    assert above.count("\n") <= limit and below <= APPENDIX_LINES
    found = sorted(set(MACHINERY.findall(above)))
    assert not found, f"{script}.py above the banner mentions {found}: that belongs to the appendix"


@pytest.mark.parametrize("script", sorted(DIFF_AGAINST_DREAMERV2))
def test_a_family_scripts_diff_against_dreamerv2_is_its_paper(script):
    """What dreamerv2.py, blast.py and dreamingv2.py share is the same text, so that the diff of
    their method parts shows what BLAST and DreamingV2 change (CleanRL: ppo.py against
    ppo_atari.py, 59 lines)."""
    if script not in SCRIPTS:
        pytest.fail(f"{script}.py is missing")
    changed = lines_changed(method(source("dreamerv2")), method(source(script)))
    print(f"diff dreamerv2.py {script}.py above the banner: {changed} lines changed "
          f"(at most {DIFF_AGAINST_DREAMERV2[script]})")
    assert changed <= DIFF_AGAINST_DREAMERV2[script]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_algorithm_flag_names_its_source_on_its_line(script):
    """Args holds what defines the algorithm, one line per field, whose comment says where the
    default comes from (paper, authors' code, DreamerV2's configuration, or ours with the reason)."""
    text = source(script)
    lines = text.splitlines()
    args = top_level(text)["Args"]
    missing = [node.target.id for node in args.body if isinstance(node, ast.AnnAssign)
               and not SOURCE.search(lines[node.end_lineno - 1].partition("  # ")[2])]
    assert not missing, f"{script}.py: flags without a source on their line: {missing}"


def test_the_readme_is_a_landing_page():
    """At most 8,000 bytes: what, the scripts, install, three commands, how to read a script, one
    results table with its curves, links; the run notebook lives in docs/ and results/."""
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 8000, f"README.md is {size} bytes"


def test_no_reference_points_outside_the_repository():
    """A user's clone has only this repository: papers are cited by title and arXiv id, and the
    measurements a comment relies on live in results/."""
    files = [path for pattern in ("*.py", "*.md", "*.sh") for path in ROOT.rglob(pattern)
             if not any(part.startswith(".") or part == "runs" for part in path.relative_to(ROOT).parts)]
    offenders = [str(path.relative_to(ROOT)) for path in files
                 if "../shared" in path.read_text(errors="ignore") and path.name != "test_plumbing.py"]
    assert not offenders, f"these files point at ../shared, which a clone does not have: {offenders}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_global_name_the_script_uses_is_defined_or_imported(script):
    """The appendix is copied between scripts whose import blocks differ: a name it uses that a
    script does not import fails only when that code path runs (a NameError in --measure-updates).
    Every global the code looks up must be defined at module level, imported, or a builtin."""
    import builtins
    import dis

    text = source(script)
    tree = ast.parse(text)
    defined = set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__annotations__"}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    code, used, stack = compile(text, f"{script}.py", "exec"), set(), []
    stack.append(code)
    while stack:
        c = stack.pop()
        used |= {i.argval for i in dis.get_instructions(c) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        stack += [k for k in c.co_consts if hasattr(k, "co_code")]
    assert not used - defined, f"{script}.py uses undefined globals: {sorted(used - defined)}"
