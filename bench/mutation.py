"""Mutation testing of the engine core: how many small faults the tests catch.

Drives mutmut (``pip install 'flows[mutation]'``; configured under
``[tool.mutmut]`` in pyproject.toml): every mutant is one small change to
one function of ``flows/_change.py``, ``_channels.py``, ``_limits.py``,
``_sink.py``, ``_runtime.py`` or ``_http.py`` (a flipped comparison or
operator, a changed constant or string, ``and``/``or`` swapped, a call's
argument removed, ...), run against only the tests that call that function.
A mutant is killed when a test fails or hangs (a timeout counts as killed).

    nice -n 10 python bench/mutation.py                   # all six modules
    nice -n 10 python bench/mutation.py limits sink       # some of them
    nice -n 10 python bench/mutation.py --report          # table of the last run
    nice -n 10 python bench/mutation.py limits --survivors  # and their diffs
    nice -n 10 python bench/mutation.py --sample 80       # 80 mutants a module
    nice -n 10 python bench/mutation.py --sample 80 --recheck  # its survivors again

Prints, per module: mutants, killed (incl. timeouts), survived (incl. "no
tests": nothing calls the function), equivalent (survivors listed in
``bench/mutation_equivalent.md``: no test can tell them from the original),
and the score, killed / (mutants - equivalent). Results are kept in
``mutants/`` (git-ignored); mutmut re-runs only what changed since.
Not part of CI: a module takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("change", "channels", "limits", "sink", "runtime", "http")
EQUIVALENT = ROOT / "bench" / "mutation_equivalent.md"

KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout",
          152: "timeout", 255: "timeout", 37: "killed"}
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}


def run_mutmut(names: list[str], max_children: int) -> None:
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names]
    subprocess.run(cmd, cwd=ROOT, check=False)


def sampled(modules: list[str], n: int, seed: int) -> dict[str, list[str]]:
    """``n`` mutants of each module, the same ones for the same seed and code."""
    if any(not results(m) for m in MODULES):
        generate()
    rng = random.Random(seed)
    drawn = {}
    for m in MODULES:  # drawn for all modules in turn: a module's sample does not
        names = sorted(results(m))  # depend on which others are asked for
        drawn[m] = sorted(rng.sample(names, min(n, len(names))))
    return {m: drawn[m] for m in modules}


def generate() -> None:
    """Have mutmut write every module's mutants and map tests to functions,
    running no mutant: a run filtered to none, which mutmut ends with
    "nothing matches" (expected, so its output is shown only on failure)."""
    print("generating the mutants and mapping tests to functions (a few minutes)...", flush=True)
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", "1", "flows._none.*"]
    done = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True)
    missing = [m for m in MODULES if not results(m)]
    if missing:
        sys.exit(f"mutmut generated no mutants for {', '.join(missing)}:\n"
                 f"{done.stdout[-3000:]}{done.stderr[-3000:]}")


def results(module: str) -> dict[str, int | None]:
    meta = ROOT / "mutants" / "flows" / f"_{module}.py.meta"
    if not meta.exists():
        return {}
    return json.loads(meta.read_text())["exit_code_by_key"]


def forget_survivors(modules: list[str]) -> None:
    """Mark survivors unchecked, so the next run judges them again (with
    the tests added since)."""
    for module in modules:
        meta = ROOT / "mutants" / "flows" / f"_{module}.py.meta"
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        for name, code in codes.items():
            if code in SURVIVED:
                codes[name] = None
        meta.write_text(json.dumps(data, indent=4))


def function_of(mutant: str) -> str:
    """``flows._limits.xǁRateLimiterǁ__init____mutmut_4`` -> ``RateLimiter.__init__``."""
    name = mutant.split(".", 2)[2].rsplit("__mutmut_", 1)[0]
    if name.startswith("xǁ"):
        return ".".join(name[2:].split("ǁ"))
    return name[2:]  # x_<function>


def diff_of(mutant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    return out.stdout


def change_of(diff: str) -> tuple[str, str]:
    """The lines a mutant removes and adds, whitespace-normalised."""
    lines = diff.splitlines()
    old = " / ".join(" ".join(x[1:].split()) for x in lines if x.startswith("-") and not x.startswith("---"))
    new = " / ".join(" ".join(x[1:].split()) for x in lines if x.startswith("+") and not x.startswith("+++"))
    return old, new


def equivalents() -> set[tuple[str, str, str, str]]:
    """(module, function, before, after) of each mutant listed as equivalent:
    table rows ``| _module | Function | `before` | `after` | why |``."""
    found = set()
    if not EQUIVALENT.exists():
        return found
    row = re.compile(r"^\|\s*_(\w+)\s*\|\s*([\w.]+)\s*\|\s*`(.*?)`\s*\|\s*`(.*?)`\s*\|")
    for line in EQUIVALENT.read_text().splitlines():
        m = row.match(line)
        if m:
            found.add((m[1], m[2], " ".join(m[3].split()), " ".join(m[4].split())))
    return found


def report(modules: list[str], show_survivors: bool, only: dict[str, list[str]] | None) -> None:
    listed = equivalents()
    rows = []
    for module in modules:
        codes = results(module)
        if only is not None:
            codes = {name: codes.get(name) for name in only[module]}
        counts: Counter[str] = Counter()
        for mutant, code in codes.items():
            if code in KILLED:
                counts["killed"] += 1
                continue
            if code is None:
                counts["not checked"] += 1
                continue
            diff = diff_of(mutant)
            old, new = change_of(diff)
            if (module, function_of(mutant), old, new) in listed:
                counts["equivalent"] += 1
                continue
            counts["survived"] += 1
            if show_survivors:
                print(f"# {mutant}: {SURVIVED.get(code, code)}\n{diff}\n")
        total = sum(counts.values()) - counts["not checked"]
        judged = total - counts["equivalent"]
        score = 100.0 * counts["killed"] / judged if judged else float("nan")
        rows.append((f"flows/_{module}.py", total, counts["killed"], counts["survived"],
                     counts["equivalent"], score))
    print("| module | mutants | killed (incl. timeouts) | survived | equivalent | score |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, total, killed, survived, equivalent, score in rows:
        print(f"| {name} | {total} | {killed} | {survived} | {equivalent} | {score:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"of {', '.join(MODULES)}")
    parser.add_argument("--report", action="store_true", help="only print the last run's table")
    parser.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    parser.add_argument("--fresh", action="store_true",
                        help="forget earlier results (after adding tests: mutmut keeps verdicts)")
    parser.add_argument("--recheck", action="store_true",
                        help="judge the last run's survivors again (after adding tests)")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="run only N mutants of each module (drawn with --seed)")
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--max-children", type=int, default=2, help="mutants run at once")
    args = parser.parse_args()
    modules = args.modules or list(MODULES)
    unknown = set(modules) - set(MODULES)
    if unknown:
        parser.error(f"unknown module(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODULES)}")
    os.chdir(ROOT)
    if args.fresh and not args.report:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    if args.recheck and not args.report:
        forget_survivors(modules)
    only = sampled(modules, args.sample, args.seed) if args.sample else None
    if not args.report:
        names = [n for m in modules for n in only[m]] if only else [f"flows._{m}.*" for m in modules]
        run_mutmut(names, args.max_children)
    report(modules, args.survivors, only)


if __name__ == "__main__":
    main()
