"""The docs stay honest: every repository path they name exists, every relative link
resolves, every command line they show uses flags its script has, and every other --flag
they name belongs to one of the project's scripts."""
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["train.py", "AGW/train.py", "AGW/test.py", "DDAG/train_ddag.py", "DDAG/test_ddag.py",
           "pre_process_sysu.py", "tools/make_synthetic.py", "tools/study.py", "tools/analyze.py",
           "tools/plot_log.py", "bench/bench_train.py", "bench/bench_test.py", "bench/bench_eval.py",
           "bench/bench_rerank.py"]
# flags of other programs the docs show (pytest, torchrun, tensorboard, pip)
# (and --bogus: the bad-input table's example of an unknown flag)
FOREIGN = {"--dist", "--logdir", "--logdir_spec", "--nproc_per_node", "--nnodes", "--node_rank",
           "--master_addr", "--master_port", "--quiet", "--bogus",
           # tensorboard's and Chromium's, in the recipe of the TensorBoard screenshot
           "--host", "--port", "--headless", "--no-sandbox", "--disable-gpu", "--window-size",
           "--virtual-time-budget", "--screenshot"}
OUTPUTS = ("save_model", "log", "data")   # folders of generated files: their files are examples
TRACKED_TOP = {"AGW", "DDAG", "bench", "tools", "tests", "study", "docs", ".ci"}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


@pytest.fixture(scope="module")
def helps():
    def one(s):
        res = subprocess.run([sys.executable, str(ROOT / s), "--help"], capture_output=True, text=True,
                             cwd=(ROOT / s).parent, timeout=300)
        assert res.returncode == 0, (s, res.stderr[-500:])
        return set(FLAG.findall(res.stdout))
    with ThreadPoolExecutor(2) as pool:   # two at a time: each mostly waits on importing torch
        return dict(zip(SCRIPTS, pool.map(one, SCRIPTS)))


def _commands(text):
    """(script, command line) for every `python SCRIPT ...` line of the code blocks, with the
    folder a preceding `cd AGW` / `cd DDAG` line (or an inline `cd X &&`) moved into."""
    out = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        cwd = ""
        for line in block.splitlines():
            cd = re.match(r"\s*cd (\S+)\s*(&&)?", line)
            if cd and not cd.group(2):
                cwd = "" if cd.group(1) == ".." else cd.group(1)
                continue
            m = re.search(r"(?:cd (\S+) *&& *)?python3? (?:-m \S+ )?(\S+\.py)", line)
            if m and not line.lstrip().startswith("torchrun"):
                folder = m.group(1) if m.group(1) else cwd
                out.append((f"{folder}/{m.group(2)}" if folder else m.group(2), line.split("#")[0]))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_paths_and_links_exist(doc):
    text = doc.read_text()
    missing = []
    for token in re.findall(r"`([^`\s]+)`", text):
        path = token.rstrip(".,:;")
        top = path.split("/")[0]
        if re.search(r"[<>{}*]|\.\.\.|…", path) or ("/" not in path and not re.fullmatch(r"[\w-]+\.(py|sh|md)", path)):
            continue
        if top in OUTPUTS or path.split("/")[1:2] and path.split("/")[1] in OUTPUTS:
            continue
        if top in TRACKED_TOP and not (ROOT / path).exists():
            missing.append(path)
        elif "/" not in path and not list(ROOT.glob(f"**/{path}")):   # a bare file name: somewhere
            missing.append(path)
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not link.startswith("http") and not (doc.parent / link).exists():
            missing.append(link)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_command_lines_use_flags_their_script_has(doc, helps):
    bad = []
    for script, cmd in _commands(doc.read_text()):
        if script in helps:
            bad += [(script, f) for f in FLAG.findall(cmd) if f not in helps[script]]
    assert not bad, f"{doc.name}: flags not in the script's --help: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_flag_named_belongs_to_a_script(doc, helps):
    known = set().union(*helps.values()) | FOREIGN
    unknown = sorted({f for f in FLAG.findall(doc.read_text()) if f not in known})
    assert not unknown, f"{doc.name} names flags no script has: {unknown}"
