"""Plant known bugs in a copy of the book and require the tests to catch each one.

Usage: python scripts/planted_bugs.py [--list] [NAME ...]   (default: every bug)

Each bug is one textual change to bnlib in a temporary copy of the repository. For each bug, the
unit tests and the notebook tests (nbval, with the portable comparison) run on the copy, stopping
at the first failure, and BOTH must fail: a suite that lets a planted bug through has a check that
cannot fail, or a tolerance that is too loose. A control run (nothing planted) must pass the same
tests, so that a failure is the bug's doing and not the copy's. Exits non-zero when a bug goes uncaught, or when a
bug can no longer be planted because the code it targets changed (update the bug, do not drop it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Unit tests that run in seconds; the site, browser, install and determinism tests are left out.
UNIT_TESTS = [
    "tests/test_reference.py",
    "tests/test_dropin.py",
    "tests/test_torch_parity.py",
    "tests/test_robustness.py",
    "tests/test_population.py",
    "tests/test_fusion.py",
    "tests/test_norms.py",
]


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    path: str  # file in the repository
    old: str  # text that occurs exactly once in it
    new: str
    notebooks: tuple[str, ...]  # the chapters whose stored outputs must expose it


BUGS = [
    Bug(
        "running-variance-biased",
        "the running variance is updated with the biased batch variance (no m/(m-1))",
        "bnlib/norm/channels.py",
        "running_average_(running_var, var * (count / (count - 1)), momentum)",
        "running_average_(running_var, var, momentum)",
        ("book/train_vs_inference.ipynb",),
    ),
    Bug(
        "eps-on-std",
        "eps is added to the standard deviation instead of the variance",
        "bnlib/norm/functional.py",
        "inv_std = torch.rsqrt(var + eps)",
        "inv_std = 1 / (var.sqrt() + eps)",
        ("book/formulas.ipynb",),
    ),
    Bug(
        "backward-drops-mean-term",
        "the backward pass drops the -sum(dy)/m term (the gradient of the mean)",
        "bnlib/norm/functional.py",
        "c = -a * sum_dy / m - b * d",
        "c = -b * d",
        ("book/formulas.ipynb",),
    ),
    Bug(
        "momentum-flipped",
        "the momentum convention is flipped (momentum weighs the old running value)",
        "bnlib/norm/channels.py",
        "return running.mul_(1 - momentum).add_(value.to(running.dtype), alpha=momentum)",
        "return running.mul_(momentum).add_(value.to(running.dtype), alpha=1 - momentum)",
        ("book/train_vs_inference.ipynb",),
    ),
    Bug(
        "normalize-with-unbiased-variance",
        "training normalizes with the unbiased variance (divides by m - 1)",
        "bnlib/norm/functional.py",
        "var = (torch.mul(x_c, x_c).sum(dims) / m - d * d)",
        "var = (torch.mul(x_c, x_c).sum(dims) / (m - 1) - d * d)",
        ("book/formulas.ipynb",),
    ),
    Bug(
        "reference-backward-drops-projection",
        "the NumPy reference backward drops the x_hat * sum(dx_hat * x_hat) term",
        "bnlib/norm/reference.py",
        " - x_hat * (dx_hat * x_hat).sum(axis=0)) / (m * cache.std)",
        ") / (m * cache.std)",
        ("book/formulas.ipynb",),
    ),
    Bug(
        "eval-uses-batch-statistics",
        "eval mode normalizes with the batch's statistics instead of the running ones",
        "bnlib/norm/modules.py",
        "use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)",
        "use_batch_stats = True",
        ("book/train_vs_inference.ipynb",),
    ),
]


def checkout_copy(target: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored files), copied to target."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


# The control: the same copy and the same tests with nothing planted must pass, or "caught" means nothing.
CONTROL = Bug("control", "nothing planted: the same tests must pass", "", "", "", ())


def plant(copy: Path, bug: Bug) -> None:
    if bug is CONTROL:
        return
    path = copy / bug.path
    text = path.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"cannot plant {bug.name}: {bug.path} no longer contains {bug.old!r} exactly once")
    path.write_text(text.replace(bug.old, bug.new))


def fails(copy: Path, args: list[str]) -> tuple[bool, float, str]:
    """Run pytest on the copy (its bnlib first on the path); True when some test fails."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q", "--no-header", *args],
        cwd=copy, env=env, capture_output=True, text=True,
    )
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    return result.returncode == 1, time.perf_counter() - start, summary


def check(bug: Bug) -> tuple[Bug, bool, str]:
    """Plant ``bug`` in a fresh copy and run the tests; True when they catch it (for the control: pass)."""
    notebooks = sorted({n for b in BUGS for n in b.notebooks}) if bug is CONTROL else list(bug.notebooks)
    with tempfile.TemporaryDirectory(prefix=f"planted-{bug.name}-") as tmp:
        copy = Path(tmp)
        checkout_copy(copy)
        plant(copy, bug)
        probe = f"import bnlib, pathlib; assert pathlib.Path(bnlib.__file__).is_relative_to({str(copy)!r})"
        subprocess.run([sys.executable, "-c", probe], cwd=copy, check=True, env={**os.environ, "PYTHONPATH": str(copy)})
        unit, unit_s, unit_out = fails(copy, UNIT_TESTS)
        nbval = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg"]
        book, book_s, book_out = fails(copy, [*nbval, *notebooks])
    if bug is CONTROL:
        caught = not unit and not book
        verdict = "clean" if caught else "BROKEN"
    else:
        caught = unit and book
        verdict = "caught" if caught else "MISSED"
    report = (
        f"{verdict}  {bug.name}: {bug.what}\n"
        f"    unit tests: {'fail' if unit else 'PASS'} in {unit_s:.0f} s ({unit_out})\n"
        f"    notebooks {', '.join(Path(n).stem for n in notebooks)}: {'fail' if book else 'PASS'} "
        f"in {book_s:.0f} s ({book_out})"
    )
    return bug, caught, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="bugs to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    parser.add_argument("--jobs", type=int, default=2, help="bugs checked at once (default 2)")
    args = parser.parse_args()
    if args.list:
        for bug in BUGS:
            print(f"{bug.name}: {bug.what}")
        return 0
    unknown = set(args.names) - {b.name for b in BUGS}
    if unknown:
        parser.error(f"unknown bugs: {sorted(unknown)}")
    chosen = [b for b in BUGS if not args.names or b.name in args.names]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(check, [CONTROL, *chosen]))
    for _, _, report in results:
        print(report)
    if not results[0][1]:
        print("the tests fail on the copy with nothing planted: fix that first")
        return 1
    results = results[1:]
    missed = [bug.name for bug, caught, _ in results if not caught]
    print(f"{len(chosen) - len(missed)} of {len(chosen)} planted bugs caught in {time.perf_counter() - start:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
