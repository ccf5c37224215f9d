"""The sweep summary as tables: ``summary.md`` (Markdown) and ``summary.tex`` (a booktabs
``longtable`` for a paper, and the same in a complete document). Every number comes from
a row of the cell table that ``summarize.cell_table`` computes (``summary.csv`` holds the
same rows), formatted here and nowhere else; figures are drawn by ``plots.py``.
"""
import math

import toy_data
from choices import PRECISIONS


def format_pm(mean, sd, d, pm=" ± ", minus="-"):
    """'mean ± sd' with d decimals (the mean alone without an sd); the table and the figure share it."""
    if not math.isfinite(mean):
        return "—"
    f = lambda x: format(x, f".{d}f").replace("-", minus, 1)  # noqa: E731
    return f(mean) + (f"{pm}{f(sd)}" if math.isfinite(sd) else "")


def confidence(cells):
    """The level of the cells' paired intervals (``summarize.cell_table`` records it per row)."""
    return float(cells["ci_level"].iloc[0])


def _pm(mean, sd, fmt, signed=False):
    if not math.isfinite(mean):
        return "—"
    s = format(mean, ("+" if signed else "") + fmt)
    return s if not math.isfinite(sd) else f"{s} ± {format(sd, fmt)}"


def to_markdown(cells, runs):
    """summary.md: per dataset, the cell table and the paired comparisons; then every run."""
    level = confidence(cells)
    out = [f"Mean ± sd over the completed seeds (n). Paired: each cell minus the float32 run of the same solver and "
           f"seed, in test NLL (nats); the interval is {level:.0%} Student-t over the seed pairs (none for one "
           f"pair); per point: mean ± SE of the NLL difference over the shared test points.\n"]
    for data, g in cells.groupby("data", sort=True):
        floor = toy_data.ENTROPY.get(data, math.nan)
        out.append(f"### {data} (true entropy {floor:.4f} nats)\n")
        out.append("| solver | precision | scaler | n | status | test NLL | test gap | val NLL | NLL gap | val NLL exact "
                   "| disc_gap | val MMD | fwd ms/iter | bwd ms/iter | peak MB |")
        out.append("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for _, r in g.iterrows():
            out.append(
                f"| {r.solver} | {r.precision} | {r.scaler} | {r.n} | {r.status} "
                f"| {_pm(r.test_nll_mean, r.test_nll_sd, '.4f')} | {_pm(r.test_gap_mean, r.test_gap_sd, '.4f', True)} "
                f"| {_pm(r.val_nll_mean, r.val_nll_sd, '.4f')} | {_pm(r.nll_gap_mean, r.nll_gap_sd, '.4f', True)} "
                f"| {_pm(r.val_nll_exact_mean, r.val_nll_exact_sd, '.4f')} "
                f"| {_pm(r.disc_gap_mean, r.disc_gap_sd, '.1e', True)} | {_pm(r.val_mmd_mean, r.val_mmd_sd, '.2e')} "
                f"| {_pm(r.ms_fwd_mean, r.ms_fwd_sd, '.0f')} | {_pm(r.ms_bwd_mean, r.ms_bwd_sd, '.0f')} "
                f"| {_pm(r.peak_mb_mean, r.peak_mb_sd, '.0f')} |")
        out.append("")
        others = g[~g["reference"]]
        if len(others):
            out.append("Paired with float32 (same solver and seed), test NLL difference:\n")
            out.append(f"| solver | precision | scaler | pairs | mean diff ± sd | {level:.0%} CI (seeds) | CI contains 0 "
                       "| per point: mean ± SE |")
            out.append("|---|---|---|---:|---:|---|---|---:|")
            for _, r in others.iterrows():
                ci = f"[{r.diff_ci_low:+.4f}, {r.diff_ci_high:+.4f}]" if math.isfinite(r.diff_ci_low) else "—"
                contains = r.ci_contains_0 or "—"
                if r.indicative:
                    ci, contains = f"{ci} *indicative*", f"{contains} *(indicative)*"
                out.append(f"| {r.solver} | {r.precision} | {r.scaler} | {r.pairs} "
                           f"| {_pm(r.diff_mean, r.diff_sd, '.4f', True)} | {ci} | {contains} "
                           f"| {_pm(r.point_diff_mean, r.point_diff_se, '.4f', True)} |")
            out.append("")
            if others["indicative"].any():
                out.append(f"*indicative*: {INDICATIVE_TEXT}\n")
    ignored = runs[~runs["used"]]
    out.append("#### Runs\n")
    if len(ignored):
        out.append(f"{len(ignored)} run(s) repeat a (cell, seed) that has a newer or completed run and are left out "
                   f"of the statistics (marked *ignored*).\n")
    out.append("| data | solver | precision | scaler | seed | status | iter | test NLL ± SE | val NLL ± SE "
               "| disc_gap | overflow steps |")
    out.append("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for _, r in runs.iterrows():
        status = r.status if r.used else f"{r.status}, *ignored*"
        if math.isfinite(r.grid_exploited):
            status += f", **grid_exploited** at {int(r.grid_exploited)}"
        out.append(f"| {r.data} | {r.solver} | {r.precision} | {r.scaler} | {r.seed} | {status} | {r.iter} "
                   f"| {_pm(r.test_nll, r.test_nll_se, '.4f')} | {_pm(r.val_nll, r.val_nll_se, '.4f')} "
                   f"| {_pm(r.disc_gap, math.nan, '.1e', True)} | {r.overflow_steps} |")
    return "\n".join(out)


# The order a paper groups cells in: precision and scaler, then solver.
SCALER_ORDER = ("none", "grad", "dynamic", "grad+dynamic")
MARK = r"$^\dagger$"
FLAG_MARK = r"$^\ddagger$"  # a completed seed of the cell raised grid_exploited
INDICATIVE_MARK = r"$^\S$"  # the paired interval rests on fewer seed pairs than summarize.MIN_SEEDS
INDICATIVE_TEXT = ("the interval rests on fewer than 3 seed pairs: with 2 the Student-t quantile is 12.7, so it says "
                   "little; run at least 3 seeds (docs/sweeps.md).")


def cell_order(cells):
    """``cells`` sorted by dataset, then precision (PRECISIONS order) and scaler, then solver;
    unknown names go last, alphabetically."""
    prec = {p: k for k, p in enumerate(PRECISIONS)}
    scal = {s: k for k, s in enumerate(SCALER_ORDER)}
    key = lambda col, rank: col.map(lambda v: (rank.get(v, len(rank)), str(v)))  # noqa: E731
    order = sorted(range(len(cells)), key=lambda i: (
        str(cells["data"].iloc[i]), key(cells["precision"], prec).iloc[i], key(cells["scaler"], scal).iloc[i],
        str(cells["solver"].iloc[i])))
    return cells.iloc[order].reset_index(drop=True)


def decimals(se, value=math.nan):
    """Decimals that show a number down to the digit its standard error ``se`` affects: the
    SE rounded to one significant digit, two when its first digit is 1 (0.013 -> 3, 0.04 -> 2,
    37 -> 0). Without an SE: three significant digits of ``value``."""
    if math.isfinite(se) and se > 0:
        e = math.floor(math.log10(se))
        d = -e + (1 if f"{se:e}"[0] == "1" else 0)
    elif math.isfinite(value) and value != 0:
        d = 2 - math.floor(math.log10(abs(value)))
    else:
        d = 2
    return max(0, min(6, d))


def standard_error(sd, n, fallback=math.nan):
    """sd / sqrt(n) over seeds; ``fallback`` (e.g. a single run's own SE) when n < 2."""
    return sd / math.sqrt(n) if n >= 2 and math.isfinite(sd) else fallback


def tex_number(x, d, signed=False):
    s = format(x, f"{'+' if signed else ''}.{d}f")
    return s.replace("-", "$-$", 1) if s.startswith("-") else s


def tex_pm(mean, sd, d):
    """'mean $\\pm$ sd' with d decimals; the mean alone without an sd."""
    return format_pm(mean, sd, d, pm=r" $\pm$ ", minus="$-$") if math.isfinite(mean) else "---"


def tex_escape(text):
    """Text safe in LaTeX's text mode (every special character escaped)."""
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(c, c) for c in str(text))


def tex_cells(r):
    """The four metric cells of one table row: test NLL (mean $\\pm$ sd, marked), test gap,
    ms/iter and peak MB, each to the decimals its standard error over seeds supports."""
    if r.n == 0:
        what = "diverged" if r.diverged == r.runs else f"no completed seed ({r.status})"
        return [rf"\multicolumn{{4}}{{c}}{{{tex_escape(what)}}}"]
    d = decimals(standard_error(r.test_nll_sd, r.n, r.test_nll_se_mean))
    dm = decimals(standard_error(r.ms_iter_sd, r.n), r.ms_iter_mean)
    dp = decimals(standard_error(r.peak_mb_sd, r.n), r.peak_mb_mean)
    return [tex_pm(r.test_nll_mean, r.test_nll_sd, d) + tex_marks(r),
            tex_number(r.test_gap_mean, d, signed=True) if math.isfinite(r.test_gap_mean) else "---",
            tex_pm(r.ms_iter_mean, r.ms_iter_sd, dm), tex_pm(r.peak_mb_mean, r.peak_mb_sd, dp)]


def tex_marks(r):
    """The marks on a cell's test NLL: † its paired interval excludes 0, ‡ a completed seed raised
    grid_exploited, § the interval is indicative (fewer than 3 seed pairs)."""
    return ((MARK if r.ci_contains_0 == "no" else "") + (FLAG_MARK if getattr(r, "grid_exploited", 0) else "")
            + (INDICATIVE_MARK if getattr(r, "indicative", False) else ""))


def tex_caption(cells):
    """The table's caption; each mark is explained only when a cell of ``cells`` carries it."""
    done = cells[cells["n"] > 0]
    text = (r"Final test NLL (nats) as mean $\pm$ sd over the completed seeds, the test gap (test NLL minus the "
            r"dataset's true entropy, mean), training time per iteration (forward + backward, ms, mean $\pm$ sd) "
            r"and peak memory (MB, mean $\pm$ sd). Decimals follow the standard error over seeds (for one seed, "
            r"the test set's). $n$: completed seeds; $n$/$m$ when only $n$ of $m$ runs completed.")
    if (done["ci_contains_0"] == "no").any():
        text += (" " + MARK + rf": the {confidence(cells):.0%} Student-$t$ interval over seed pairs of the test-NLL "
                 r"difference to the float32 run of the same solver and seed excludes 0.")
    if (done["grid_exploited"] > 0).any():
        text += (" " + FLAG_MARK + r": the grid\_exploited flag rose in at least one completed seed (its validation "
                 r"NLL fell 3 SE below the entropy or moved from the NLL on 4$\times$ the grid's steps), so these "
                 r"numbers include a model that games its time grid.")
    if done["indicative"].any():
        text += (" " + INDICATIVE_MARK + r": indicative only: the paired interval rests on fewer than 3 seed pairs "
                 r"(with 2, the Student-$t$ quantile is 12.7).")
    return text.replace("%", r"\%")


def to_latex(cells):
    """The table body (a booktabs ``longtable``, so the full grid breaks across pages):
    datasets as row groups, precision and scaler then solver as row headers."""
    cols = r"lllrrrrr"
    head = [r"\multicolumn{3}{l}{cell} & & \multicolumn{2}{c}{test NLL (nats)} & \multicolumn{2}{c}{cost} \\",
            r"\cmidrule(lr){1-3}\cmidrule(lr){5-6}\cmidrule(lr){7-8}",
            r"precision & scaler & solver & $n$ & mean $\pm$ sd & gap & ms/iter & peak MB \\"]
    out = [rf"\begin{{longtable}}{{{cols}}}",
           rf"\caption{{{tex_caption(cells)}}}\label{{tab:cnf-summary}}\\",
           r"\toprule", *head, r"\midrule", r"\endfirsthead",
           r"\toprule", *head, r"\midrule", r"\endhead",
           r"\bottomrule", r"\endlastfoot"]
    cells = cell_order(cells)
    for k, (data, g) in enumerate(cells.groupby("data", sort=False)):
        if k:
            out.append(r"\midrule")
        floor = toy_data.ENTROPY.get(data, math.nan)
        out.append(rf"\multicolumn{{8}}{{l}}{{\textbf{{{tex_escape(data)}}} (true entropy {floor:.4f} nats)}} \\*")
        last = None
        for r in g.itertuples():
            group = (r.precision, r.scaler)
            if last is not None and group != last:
                out.append(r"\addlinespace[2pt]")
            first = [tex_escape(r.precision), tex_escape(r.scaler)] if group != last else ["", ""]
            last = group
            n = f"{r.n}" if r.n == r.runs else f"{r.n}/{r.runs}"
            out.append(" & ".join([*first, tex_escape(r.solver), n, *tex_cells(r)]) + r" \\")
    out.append(r"\end{longtable}")
    return "\n".join(out) + "\n"


def latex_standalone(body):
    """A complete document around the table: pdflatex with booktabs and longtable (tools)."""
    return "\n".join([r"\documentclass[10pt]{article}", r"\usepackage[margin=1.5cm]{geometry}",
                      r"\usepackage{booktabs}", r"\usepackage{longtable}", r"\begin{document}", r"\small",
                      body.rstrip("\n"), r"\end{document}", ""])


