#!/usr/bin/env python3
"""Picks the few fuzzer finds worth committing: a greedy edge cover.

Usage (from fuzz/, after `cargo +nightly fuzz build`):

    ./pick_corpus.py TARGET BUDGET CANDIDATE_DIR [LIBFUZZER_FLAG...]

Measures, for every file in corpus/TARGET/ (the seeds and earlier picks)
and every file in CANDIDATE_DIR (shrink it first with
`cargo +nightly fuzz cmin TARGET DIR`), the edges that input covers on its
own (a one-file libFuzzer merge, whose control file lists them), then copies
into corpus/TARGET/ at most BUDGET candidates, each time the one that adds
the most edges not yet covered by the corpus and the earlier picks, until
none adds any. Extra flags go to the
fuzz binary (`-detect_leaks=0` for `session`).
"""

import os
import shutil
import subprocess
import sys
import tempfile


def edges(binary, path, flags):
    """The PCs (edges) one input covers when run alone."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out, ctl = (os.path.join(tmp, d) for d in ("in", "out", "ctl"))
        os.mkdir(inp)
        os.mkdir(out)
        shutil.copy(path, inp)
        subprocess.run(
            [binary, "-merge=1", "-use_counters=0", f"-merge_control_file={ctl}", *flags, out, inp],
            capture_output=True,
            check=False,
        )
        if not os.path.exists(ctl):  # an empty input is not run
            return set()
        with open(ctl) as f:
            for line in f:
                if line.startswith("COV "):
                    return set(line.split()[2:])
    return set()


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    target, budget, cand_dir, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    binary = f"target/x86_64-unknown-linux-gnu/release/{target}"
    corpus = os.path.join("corpus", target)
    committed = sorted(os.listdir(corpus))
    seeds = [os.path.join(corpus, f) for f in committed]
    cands = [os.path.join(cand_dir, f) for f in sorted(os.listdir(cand_dir)) if f not in committed]
    covered = set()
    for s in seeds:
        covered |= edges(binary, s, flags)
    cover = {c: edges(binary, c, flags) for c in cands}
    total = covered.union(*cover.values())
    print(f"{len(seeds)} corpus files cover {len(covered)} of {len(total)} edges; {len(cands)} candidates")
    picked = 0
    while picked < budget and cover:
        best = max(cover, key=lambda c: (len(cover[c] - covered), -os.path.getsize(c)))
        if not cover[best] - covered:
            break
        covered |= cover.pop(best)
        shutil.copy(best, corpus)
        picked += 1
    print(f"picked {picked}: now {len(covered)} of {len(total)} edges")


if __name__ == "__main__":
    main()
