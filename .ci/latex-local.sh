#!/usr/bin/env bash
# A minimal LaTeX for the table test (tests/test_summarize.py compiles summary_standalone.tex):
# pdflatex with booktabs (texlive-latex-recommended) and longtable (texlive-latex-base's tools),
# from Debian's packages, without recommends: 18 packages, about 145 MB installed, about 20 s
# (apt-get update included) on this project's Debian 12 machine.
#
#   bash .ci/latex-local.sh     install if pdflatex or booktabs is missing; then print the version
set -euo pipefail
if ! command -v pdflatex >/dev/null || ! kpsewhich booktabs.sty >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends texlive-latex-base texlive-latex-recommended >/dev/null
fi
pdflatex --version | head -1
kpsewhich booktabs.sty longtable.sty >/dev/null
