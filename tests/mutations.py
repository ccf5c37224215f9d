"""Do the tests catch realistic bugs? Single-line mutations of the core modules, each run
against that module's tests.

    python tests/mutations.py                  # every mutation (over 90 minutes on a loaded 2-core machine)
    python tests/mutations.py metrics toy_data # those whose file path or description contains a word
    python tests/mutations.py --list           # what would run, numbered
    python tests/mutations.py --from 70        # from the 70th chosen on (a long run that was stopped)

Each mutation is applied to a scratch copy of the working tree (the files git tracks or
would track, in a temporary folder), never to the tree itself. The module's test files run
there with ``pytest -x -q`` and OMP_NUM_THREADS=1. CAUGHT: a test failed (its first error
line is shown, to check that it names the real cause); MISSED: every test passed, a gap in
the tests; STALE: the module no longer holds the text to change. Exit code 1 unless every
mutation was caught. pytest does not collect this file (its name does not start with
``test_``).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests that hold each module (the slow end-to-end files are left out where a module
# has direct tests of its own).
TESTS = {
    "hyper_trace.py": ["test_hyper_trace.py", "tests/test_model.py"],
    "torchmpnode/": ["tests/test_torchmpnode.py", "tests/test_torchdiffeq_port.py", "tests/test_scaling.py",
                     "tests/test_host_syncs.py"],
    "metrics.py": ["tests/test_metrics.py", "tests/test_grid_watch.py"],
    "schedule.py": ["tests/test_schedule.py"],
    "precision.py": ["tests/test_precision.py", "tests/test_scaling.py", "tests/test_cnf.py"],
    "choices.py": ["tests/test_precision.py", "tests/test_scaling.py", "tests/test_cnf.py"],
    "model.py": ["tests/test_model.py", "tests/test_regularizers.py", "tests/test_metrics.py",
                 "tests/test_torchdiffeq_port.py::test_the_kits_integrator_gives_both_solvers_the_same_3_8_scheme",
                 "tests/test_cnf_kernels.py::test_a_method_the_kernels_do_not_fuse_is_said_not_crashed"],
    "trainer.py": ["tests/test_trainer.py", "tests/test_regularizers.py", "tests/test_host_syncs.py",
                   "tests/test_grid_watch.py", "tests/test_reliability.py", "tests/test_cnf.py"],
    "toy_data.py": ["tests/test_toy_data.py"],
    "summarize.py": ["tests/test_summary_stats.py", "tests/test_sweeps.py",
                     "tests/test_summarize.py::test_unreadable_runs_are_listed_and_skipped"],
    "experiment.py": ["tests/test_reliability.py", "tests/test_cnf.py", "tests/test_busy_machine.py",
                      "tests/test_tensorboard.py"],
    "cnf_kernels.py": ["tests/test_scaling.py", "tests/test_cnf_kernels.py"],
    "sweep_status.py": ["tests/test_sweep_status.py"],
    "runtime.py": ["tests/test_busy_machine.py::test_thread_choice_order_and_cap",
                   "tests/test_busy_machine.py::test_idle_cores_from_proc_stat",
                   "tests/test_busy_machine.py::test_idle_cores_sees_a_busy_core",
                   "tests/test_busy_machine.py::test_a_resume_keeps_the_checkpoints_thread_count_and_continues_bit_for_bit",
                   "tests/test_bench_options.py::test_the_speed_probe_is_one_honest_line",
                   "tests/test_reliability.py::test_signal_checkpoints_and_resume_is_bitwise[10]"],
    "tables.py": ["tests/test_summary_stats.py", "tests/test_summarize.py"],
    "plots.py": ["tests/test_plots.py"],
    "run_cnf.sh": ["tests/test_busy_machine.py::test_a_local_cpu_sweep_skips_tfloat32",
                   "tests/test_sweeps.py::test_the_paper_study_lists_exactly_its_grid",
                   "tests/test_sweeps.py::test_the_cpu_study_lists_exactly_its_grid",
                   "tests/test_sweeps.py::test_local_cells_are_spread_over_gpus_at_most_k_each",
                   "tests/test_sweeps.py::test_a_python_without_torch_is_refused_and_a_resume_keeps_the_env_setup"],
    "flow.py": ["tests/test_flow.py"],
    "tests/fast_interpreter.py": ["tests/test_cnf_kernels.py::test_the_tests_faster_interpreter_computes_the_same_bits"],
    "cnf.py": ["tests/test_tensorboard.py", "tests/test_busy_machine.py::test_a_stop_signal_in_any_phase_is_answered",
               "tests/test_busy_machine.py::test_a_resume_keeps_the_checkpoints_thread_count_and_continues_bit_for_bit",
               "tests/test_cnf.py::test_no_figures_leaves_them_to_plots_py",
               "tests/test_cnf.py::test_a_run_projects_its_training_time_once_within_its_first_iterations"],
    "bench.py": ["tests/test_bench_options.py::test_the_speed_probe_is_one_honest_line",
                 "tests/test_bench.py::test_bench_rejects_bad_input", "tests/test_bench.py::test_bench_times_a_study_cell"],
}

# (file, text as it is, text with the bug, what the bug is). Each text occurs once in its file.
MUTATIONS = [
    # hyper_trace.py
    ("hyper_trace.py", "c4 = (4.0 / w) * (U * W).sum(-1)", "c4 = (2.0 / w) * (U * W).sum(-1)",
     "trace coefficient halved"),
    ("hyper_trace.py", "torch.addcmul(s, s, s, value=-1)", "torch.addcmul(s, s, s, value=1)",
     "sigmoid' as s(1+s)"),
    ("hyper_trace.py", "ga = torch.addcmul(gs, s, O, value=-2) * terms",
     "ga = torch.addcmul(gs, s, O, value=2) * terms", "VJP: sign of the trace's second derivative"),
    ("hyper_trace.py", "torch.mm(gf.t(), s),  # gUw2T", "torch.mm(gf.t(), terms),  # gUw2T",
     "VJP: U's cotangent from the wrong activation"),
    ("hyper_trace.py", "return (terms * c4.to(terms.dtype)).sum(1, keepdim=True, dtype=acc)",
     "return (terms * c4.to(terms.dtype)).sum(1, keepdim=True)", "width sum accumulated in the low precision"),
    ("hyper_trace.py", "return (2 * torch.randint(0, 2, like.shape, generator=generator, device=dev) - 1).to(like)",
     "return torch.randint(0, 2, like.shape, generator=generator, device=dev).to(like)",
     "Rademacher noise drawn as 0/1"),
    ("hyper_trace.py", "    acc = acc.add_(0.0)  # the sum starts from +0", "    acc = acc  # the sum starts from +0",
     "float16 emulation: a sum of -0 products left -0"),
    ("hyper_trace.py", "        acc = acc.add_(bias.float())\n", "        acc = (bias.float() + acc).to(torch.bfloat16).float()\n",
     "float16 emulation: the bias added in another rounding"),
    ("hyper_trace.py", "            ga = b.mm(grad.t()).t() if col else grad.mm(b.t())",
     "            ga = grad.float().mm(b.t().float()).to(grad.dtype)",
     "float16 emulation's backward: a float32 product instead of torch's"),
    ("cnf.py", "        _write_rows(tr, run, self.rows)\n        if stop.received:", "        ex.write_csv(run.csv, self.rows)\n        if stop.received:",
     "the end's test columns in the CSV but not in the TensorBoard events"),
    ("cnf.py", "        if a.viz and a.figures:", "        if a.viz:", "--no-figures still draws the flow frames"),
    ("cnf.py", "plots.csv_figures(self.run.path)) if self.rows and self.tr.args.figures else []",
     "plots.csv_figures(self.run.path)) if self.rows else []", "--no-figures: a run that stops early draws its figures"),
    ("plots.py", "    return (own / base).to_numpy(dtype=float)", "    return (base / own).to_numpy(dtype=float)",
     "answer.png: float32 over the cell instead of the cell over float32"),
    # torchmpnode/
    ("torchmpnode/_solver.py", "                    acc.add_(g, alpha=inv)\n        else:",
     "                    acc.add_(g)\n        else:", "grid path: parameter cotangents not unscaled"),
    ("torchmpnode/_solver.py", "a_new = tuple(x + g[i] for x, g in zip(a_new, grads))",
     "a_new = tuple(x + g[i + 1] for x, g in zip(a_new, grads))", "incoming gradient added at the wrong grid point"),
    ("torchmpnode/methods.py", "b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),", "b=(1 / 6, 1 / 3, 1 / 6, 1 / 3),",
     "rk4 weights swapped"),
    ("torchmpnode/scaler.py", "self._scale = self.scale / 2.0", "self._scale = self.scale / 4.0",
     "overflow retry quarters the scale"),
    ("torchmpnode/scaler.py", "while amax > 0.0 and amax * scale * 2.0 <= target:",
     "while amax > 0.0 and amax * scale <= target:", "the scale grows one doubling past the target"),
    ("torchmpnode/scaler.py", "self._scale = 2.0 ** math.floor(math.log2(self.target(numel_per_sample) / amax))",
     "self._scale = 2.0 ** math.ceil(math.log2(self.target(numel_per_sample) / amax))", "the anchor above the target"),
    ("torchmpnode/scaler.py", "exponent = torch.frexp(x).exponent - 1", "exponent = torch.frexp(x).exponent",
     "the device anchor (fused path) one doubling above the target"),
    ("torchmpnode/scaler.py", "self._scale = scales.min()", "self._scale = scales.max()",
     "fused: the largest block scale reported"),
    ("torchmpnode/scaler.py", "self._overflow_dev = k if self._overflow_dev is None else self._overflow_dev + k",
     "self._overflow_dev = k", "fused: retries not accumulated over solves"),
    ("torchmpnode/_odeint.py", "return DynamicScaler(low) if low == torch.float16 else None",
     "return DynamicScaler(low) if low in _LOW else None", "automatic scaler for bfloat16 too"),
    # metrics.py
    ("metrics.py", "MMD_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)", "MMD_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0)",
     "one MMD bandwidth dropped"),
    ("metrics.py", "(kxx.sum() - nk * m) / (m * (m - 1))", "(kxx.sum() - m) / (m * (m - 1))",
     "MMD: the diagonal removed once, not once per bandwidth"),
    ("metrics.py", "return float(nll.mean()), float(nll.std() / math.sqrt(nll.numel()))",
     "return float(nll.mean()), float(nll.std() / nll.numel())", "standard error over n, not sqrt(n)"),
    ("metrics.py", "train_mmd=mmd2(z0, base),", "train_mmd=mmd2(model_x, base),",
     "train_mmd of the model's samples, not the pulled-back points"),
    ("metrics.py", "nll_gap=val_loss - toy_data.ENTROPY[data],", "nll_gap=val_loss_se - toy_data.ENTROPY[data],",
     "nll_gap from the wrong number"),
    ("metrics.py", "return dict(val_loss_exact=exact, disc_gap=val_loss - exact)",
     "return dict(val_loss_exact=exact, disc_gap=exact - val_loss)", "disc_gap's sign"),
    ("metrics.py", 'if below > 3 * row["val_loss_se"]:', 'if below > 30 * row["val_loss_se"]:',
     "grid watch: the entropy test at 30 SE"),
    ("metrics.py", "if gap is not None and not abs(gap) <= gap_max:", "if gap is not None and abs(gap) > gap_max:",
     "grid watch: a NaN grid_gap raises no flag"),
    # schedule.py
    ("schedule.py", "return gamma ** (k // step)", "return gamma ** ((k + 1) // step)", "step decays one update early"),
    ("schedule.py", "progress = min(k - warmup, span) / span", "progress = min(k, span) / span",
     "cosine counts the warmup's updates"),
    ("schedule.py", "return (k + 1) / warmup", "return k / warmup", "warmup's first update at rate 0"),
    ("schedule.py", "return floor + (1.0 - floor) * 0.5", "return (1.0 - floor) * 0.5", "cosine ignores --lr_min"),
    # precision.py
    ("choices.py", '(odeint == "torchdiffeq" and not no_grad_scaler) or grad_scaler)',
     '(odeint == "torchdiffeq") or grad_scaler)', "--no_grad_scaler ignored"),
    ("choices.py", 'use_dynamic = fp16 and odeint == "torchmpnode"', 'use_dynamic = odeint == "torchmpnode"',
     "DynamicScaler on in every precision"),
    ("precision.py", "return torch.autocast(self.device_type, dtype=self.low)",
     'return torch.autocast("cuda", dtype=self.low)', "CUDA autocast on every device (a CPU run silently float32)"),
    ("choices.py", '"bfloat16": PrecisionSpec("bfloat16", "bf16"),', '"bfloat16": PrecisionSpec("float16", "bf16"),',
     "bfloat16 runs as float16"),
    # model.py
    ("model.py", "logp = standard_normal_logprob(z_t[-1]) - dlogp_t[-1, :, 0].to(torch.promote_types(x.dtype, "
     "torch.float32))\n    return (logp",
     "logp = standard_normal_logprob(z_t[-1]) + dlogp_t[-1, :, 0].to(torch.promote_types(x.dtype, "
     "torch.float32))\n    return (logp", "log_prob: the log-determinant's sign"),
    ("model.py", "return -0.5 * (z.shape[1] * math.log(2 * math.pi)", "return -0.5 * (math.log(2 * math.pi)",
     "base density: the normalizer once, not once per dimension"),
    ("model.py", "return flow_from_base(cnf, z, integ, generator=generator)[0][-1].float()",
     "return flow_from_base(cnf, z, integ, generator=generator)[0][0].float()", "sample returns the base noise"),
    ("model.py", "torch.stack([kin_t[-1].mean(), jac_t[-1].mean()])", "torch.stack([jac_t[-1].mean(), kin_t[-1].mean()])",
     "penalties returned in swapped order"),
    ("model.py", "logp = standard_normal_logprob(zs[-1]) - (dl[-1] - dl)[..., 0]",
     "logp = standard_normal_logprob(zs[-1]) - (dl - dl[-1])[..., 0]", "flow frames: the partial log-det's sign"),
    # trainer.py
    ("trainer.py", "return nll + self.args.kinetic * pen[0] + self.args.jacobian * pen[1]",
     "return nll + self.args.kinetic * pen[1] + self.args.jacobian * pen[0]", "penalty weights swapped"),
    ("trainer.py", "if all(ok and (gok or grad_scaled) for _, ok, gok in values):",
     "if all(ok for _, ok, gok in values):", "an unchecked non-finite gradient (no GradScaler) not rolled back"),
    ("trainer.py", "% a.grid_watch == 0 or self.iter == a.niters)", "% a.grid_watch == 0)",
     "the last validation without the finer grid"),
    ("trainer.py", "gen = torch.Generator().manual_seed(a.seed * 1_000_003 + self.iter)",
     "gen = torch.Generator().manual_seed(self.iter)", "validation noise independent of the seed"),
    # toy_data.py
    ("toy_data.py", '"rings": 2.6232,', '"rings": 2.5732,', "rings entropy off by 0.05"),
    ("toy_data.py", "    return x + rng.normal(0.0, 0.08, (n, 2))", "    return x + rng.normal(0.0, 0.1, (n, 2))",
     "rings noise 0.1 instead of 0.08"),
    ("toy_data.py", "0.25 * np.exp(f[:, 0])", "0.2 * np.exp(f[:, 0])", "pinwheel arms twisted less"),
    ("toy_data.py", "m = np.sqrt(rng.random(n)) * 3 * np.pi", "m = rng.random(n) * 3 * np.pi",
     "2spirals without the sqrt (points crowd the centre)"),
    ("toy_data.py", "t = rng.uniform(1.5 * np.pi, 4.5 * np.pi, n)", "t = rng.uniform(1.5 * np.pi, 4 * np.pi, n)",
     "swissroll half a turn short"),
    # summarize.py
    ("summarize.py", "float(math.sqrt(sum(s * s for s in ses)) / k)",
     "float(math.sqrt(sum(s * s for s in ses)) / math.sqrt(k))", "pointwise standard error over sqrt(seeds)"),
    ("summarize.py", "ses.append(d.std(ddof=1) / math.sqrt(len(d)))", "ses.append(d.std(ddof=1))",
     "pointwise standard error is the sd"),
    ("summarize.py", 'keep = (done if len(done) else g).sort_values(["_stamp", "run"]).index[-1]',
     'keep = (done if len(done) else g).sort_values(["_stamp", "run"]).index[0]', "duplicates: the oldest run kept"),
    ("summarize.py", "half = special.stdtrit(n - 1, 0.5 + confidence / 2) * sd / math.sqrt(n)",
     "half = special.ndtri(0.5 + confidence / 2) * sd / math.sqrt(n)", "normal quantile instead of Student-t"),
    ("summarize.py", "return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)",
     "return float(v.mean()), float(v.std(ddof=0)) if len(v) > 1 else math.nan, len(v)", "population sd"),
    ("summarize.py", "    if a.figures:", "    if True:", "--no-figures draws the figures all the same"),
    ("summarize.py", "stale = [f for f in FIGURES if not a.figures and", "stale = [f for f in FIGURES if False and",
     "--no-figures is silent about figures left from an earlier summary"),
    # experiment.py
    ("experiment.py", "        return int(v)\n", "        return float(v)\n", "CSV integers read back as floats"),
    ("experiment.py", "if k != \"iter\" and isinstance(r.get(k), (int, float))", "if k != \"iter\" and isinstance(r.get(k), float)",
     "TensorBoard events without the integer columns"),
    ("experiment.py", "    os.replace(pending, os.path.join(folder, EVENTS_FILE))", "    os.replace(pending, os.path.join(folder, EVENTS_FILE + \".1\"))",
     "the events under a name that is not the stream's"),
    ("experiment.py", "for k in keys if saved.get(k) != wanted.get(k)]",
     "for k in keys if saved.get(k) == wanted.get(k)]", "config differences inverted"),
    ("experiment.py", 'return self._named(".csv", other_files=("args.csv",))', 'return self._named(".csv")',
     "renamed run: args.csv taken for the run's CSV"),
    ("runtime.py", 'SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")', 'SIGNALS = ("SIGTERM", "SIGINT")',
     "SLURM's warning signal not caught"),
    ("experiment.py", 'if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or "config" not in state:',
     'if not isinstance(state, dict) or "config" not in state:', "checkpoint format not checked"),
    # the failure paths (the second set: written from the behaviour a user relies on)
    ("torchmpnode/scaler.py", "        if step >= 0:", "        if step > 0:",
     "fused: a failure at step 0 (t = 0) reported as none"),
    ("torchmpnode/scaler.py", "if self._attempts >= self.max_attempts:", "if self._attempts > self.max_attempts:",
     "one halving more than max_attempts"),
    ("torchmpnode/_solver.py", "            scaler.on_overflow(i, pb.t_list[i])", "            scaler.on_overflow(i, pb.t_list[i + 1])",
     "the failed step's time misnamed"),
    ("cnf_kernels.py", "                        failed = tl.maximum(failed, i * 1.0)",
     "                        failed = tl.maximum(failed, i - 1.0)", "fused: the failed step reported one too low"),
    ("cnf_kernels.py", "                    if attempts >= max_attempts:  # give up",
     "                    if attempts > max_attempts:  # give up", "fused: one halving more than max_attempts"),
    ("experiment.py", '    tmp = f"{path}.tmp-{os.getpid()}"\n    try:',
     '    tmp = os.path.join("/tmp", os.path.basename(path) + f".tmp-{os.getpid()}")\n    try:',
     "atomic write: the temporary file on another filesystem"),
    ("experiment.py", "        with contextlib.suppress(OSError):\n            os.remove(tmp)\n        if is_disk_full(e)",
     "        if is_disk_full(e)", "atomic write: the temporary file left after a failure"),
    ("experiment.py", "            raise DiskFull(path, len(data), e) from None",
     "            raise", "a full disk raised as a bare OSError (a traceback)"),
    ("experiment.py", "        if not norm.startswith(KIT_DIR + os.sep):\n            return False\n", "",
     "the code snapshot keeps loaded sources from outside the kit"),
    ("experiment.py", '("tests", "tools", ".venv") or parts[-1]', '("tools", ".venv") or parts[-1]',
     "the code snapshot keeps the tests' helpers"),
    ("experiment.py", '\n                    or "site-packages" in parts or "dist-packages" in parts)', ")",
     "the code snapshot keeps the packages of a virtual environment in the kit's folder"),
    ("summarize.py", 'row["grid_exploited"] = int(ok["grid_exploited"].notna().sum())',
     'row["grid_exploited"] = int(g["grid_exploited"].notna().sum())', "the grid mark counts seeds left out of the statistics"),
    ("summarize.py", "indicative=bool(math.isfinite(lo) and len(pairs) < MIN_SEEDS))",
     "indicative=bool(math.isfinite(lo) and len(pairs) <= MIN_SEEDS))", "three seed pairs marked indicative"),
    ("sweep_status.py", 'if log is not None and log["rc"] is None and (log["attempts"] > 0 or log.get("starting")):',
     'if log is not None and log["rc"] is None:', "a job that died before its first line listed as running"),
    ("sweep_status.py", 'if log is not None and log["rc"] is None and (log["attempts"] > 0 or log.get("starting")):',
     'if log is not None and log["rc"] is None and log["attempts"] > 0:', "a job whose log is still empty listed as failed to start"),
    ("sweep_status.py", 'elif log is not None and log["rc"] == EXIT_DISK_FULL:', 'elif log is None:',
     "a disk-full cell listed as failed"),
    # the busy-machine work
    ("runtime.py", "    elif previous is not None:", "    elif False:", "a resume ignores its checkpoint's thread count"),
    ("runtime.py", "n = max(1, min(cores, int(idle + 1 - IDLE_SHARE)))", "n = max(1, min(cores, math.ceil(idle)))",
     "a core busy 90 % of the time counted as idle"),
    ("runtime.py", "ticks[3] + ticks[4]", "ticks[0] + ticks[1]", "busy time read as idle"),
    ("tables.py", '+ (INDICATIVE_MARK if getattr(r, "indicative", False) else ""))', '+ "")',
     "an indicative interval not marked in summary.tex"),
    ("plots.py", '    a.plot(df["iter"], df["val_mmd"], "o-", ms=3, label="val: model samples vs data")',
     '    a.plot(df["iter"], df["val_mmd"].clip(lower=1e-6), "o-", ms=3, label="val: model samples vs data")',
     "MMD^2 clipped at 1e-6"),
    ("plots.py", '          title="validation NLL gap" + (f', '          title="validation NLL gap" + 0 * (f',
     "the compare figure's cut axis not said"),
    ("plots.py", '    caption = "dashed: where a run\'s grid_exploited flag rose" if flagged else ""',
     '    caption = "dashed: where a run\'s grid_exploited flag rose"', "a caption where no flag rose"),
    ("run_cnf.sh", '    if valid "$p" "${CPU_PRECISIONS[@]}"; then kept+=("$p"); else',
     '    if true; then kept+=("$p"); else', "tfloat32 cells run on a CPU"),
    # cnf_kernels.py
    ("cnf_kernels.py", "new_z = a_z + ybar * inv + g_z", "new_z = a_z + ybar + g_z", "fused: adjoint VJP not unscaled"),
    ("cnf_kernels.py", "_store_row(part, i - r0, R, WIDTH, _row_mul(q0, inv), D, DP, WP)",
     "_store_row(part, i - r0, R, WIDTH, q0, D, DP, WP)", "fused: one step's parameter cotangents not unscaled"),
    ("cnf_kernels.py", "tr = tl.sum(_round(terms * p[3][None, :], LOW), axis=1)  # [B]",
     "tr = tl.sum(terms * p[3][None, :], axis=1)  # [B]", "fused: trace terms not rounded to the low precision"),
    # flow.py, torchmpnode's torchdiffeq call patterns, stop signals, projection, backend method, probe
    ('flow.py', 'prec = Precision(metrics_precision(config["precision"]) if precision is None else precision, device)', 'prec = Precision(config["precision"] if precision is None else precision, device)',
     "default precision: the run's autocast, not its metrics' float32"),
    ('flow.py', 'generator = metrics.final_noise(self.config["seed"])', 'generator = torch.Generator().manual_seed(self.config["seed"])',
     "Hutchinson default noise: not that of the run's test metrics"),
    ('flow.py', 'return metrics.exact_log_prob(self._exact, x)', 'return metrics.log_prob_batched(self._exact, x.double(), self._integ)',
     "exact=True: float64 on the run's grid, not the adaptive solve"),
    ('flow.py', 'return metrics.sample_batched(self.model, int(n), self._integ, self.device, generator=generator)', 'return metrics.sample_batched(self.model, int(n), self._integ, self.device)',
     'sample ignores its generator'),
    ('flow.py', 'return self.log_prob(points.reshape(-1, 2), exact=exact, generator=generator)', 'return self.log_prob(points.reshape(-1, 2), generator=generator)',
     'density ignores exact'),
    ('torchmpnode/_odeint.py', 'niters = torch.ceil((sign * t1 - sign * t0) / step_size + 1).item()', 'niters = torch.ceil((sign * t1 - sign * t0) / step_size).item()',
     "step_size grid: one point short of torchdiffeq's (the last step twice as long)"),
    ('torchmpnode/_odeint.py', 'if j < len(tv) and abs(g - tv[j]) <= tol:', 'if j < len(tv) and g >= tv[j] - tol:',
     'an output time off the fine grid is read at the next grid point instead of refused'),
    ('torchmpnode/_odeint.py', '    if adjoint_params is None:\n        return tuple(p for p', '    if adjoint_params is None or isinstance(func, nn.Module):\n        return tuple(p for p',
     "an nn.Module's adjoint_params ignored: all its parameters differentiated"),
    ('torchmpnode/_odeint.py', 'pb.probe = adjoint_params is None and not isinstance(func, nn.Module) and torch.is_grad_enabled()', 'pb.probe = adjoint_params is None and not isinstance(func, nn.Module)',
     'the lost-gradient warning also under no_grad'),
    ('torchmpnode/methods.py', 'a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),', 'a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, 1.0, -1.0)),',
     "rk4_38: stage 4's input weights swapped"),
    ('torchmpnode/_odeint.py', 'return _derived(t, ("cast", dtype), lambda: (t.to(dtype), None))', 'return _derived(t, ("cast", dtype), lambda: (t, None))',
     "t not cast to y0's dtype"),
    ('cnf.py', '    runtime.StopSignals(f"cnf.py: {INTERRUPTED_EARLY}", ex.EXIT_CTRL_C).install()\n', '',
     'stop signals taken only once main() starts: a signal during the imports is lost'),
    ('cnf.py', 'if self.disk_full is not None or (stop is not None and stop.received):', 'if self.disk_full is not None:',
     'a stop signal while drawing the figures does not skip the rest'),
    ('cnf.py', 'PROJECT_AFTER = 10  #', 'PROJECT_AFTER = 100  #',
     'the projected training time printed only after 100 iterations'),
    ('model.py', '    if method not in cnf_kernels.METHOD_CODES:\n', '    if method not in (*cnf_kernels.METHOD_CODES, "rk4_38"):\n',
     'rk4_38 taken for a method the kernels fuse'),
    ('model.py', 'TORCHDIFFEQ_METHOD = {"rk4_38": "rk4"}', 'TORCHDIFFEQ_METHOD = {}',
     'torchdiffeq given the name rk4_38, which it lacks'),
    ('runtime.py', 'return {"gflops": 2 * n * k * m / ms / 1e6,', 'return {"gflops": n * k * m / ms / 1e6,',
     'the speed probe counts one flop per multiply-add'),
    ('runtime.py', '    ms = statistics.median(times) * 1e3\n', '    ms = min(times) * 1e3\n',
     'the speed probe takes the best call, not the median'),
    ("run_cnf.sh", "FP16_SCALERS_torchdiffeq=(grad none); FP16_SCALERS_torchmpnode=(dynamic none)",
     "FP16_SCALERS_torchdiffeq=(grad none); FP16_SCALERS_torchmpnode=(dynamic grad none)",
     "the paper study gains torchmpnode's GradScaler cells, which the published table lacks"),
    ("run_cnf.sh", '    for ((k = 0; k < per_gpu; k++)); do SLOTS+=("${GPUS[@]}"); done',
     '    for ((k = 0; k < per_gpu; k++)); do SLOTS+=("${GPUS[0]}"); done', "local cells: every slot on the first GPU"),
    ("run_cnf.sh", '  echo "$dev" >&3\n', '  echo "${SLOTS[0]}" >&3\n', "local cells: an ended cell hands back the first slot, not its own"),
    ("run_cnf.sh", '  check_cell_python\n  mkdir -p "$results"', '  mkdir -p "$results"',
     "a new local sweep starts its cells with a Python that has no torch"),
    ("run_cnf.sh", '  [ -n "$env_setup" ] || env_setup=$(cat "$SWEEP/env_setup.sh" 2>/dev/null || true)\n', '',
     "a resume without --env-setup blanks the sweep's env setup line"),
    ("bench.py", '                cmd += ["--num_timesteps", str(cfg["num_timesteps"]), "--batch", str(cfg["batch"])]',
     '                cmd += ["--num_timesteps", str(cfg["num_timesteps"])]', "--batch not passed on to the path's process"),
    ("bench.py", '              *(_path("torchdiffeq", p) for p, spec in PRECISIONS.items() if spec.tag),',
     '              *(_path("torchdiffeq", p) for p, spec in PRECISIONS.items() if spec.tag == "fp16"),',
     "torchdiffeq-bf16 not a bench path"),
    ("plots.py", '    if point.any():\n        a.errorbar(g["point_diff_mean"][point]',
     '    if True:\n        a.errorbar(g["point_diff_mean"][point]', "answer.png: the per-point legend entry drawn with no per-point value"),
    ("tests/fast_interpreter.py", "        if key in done:\n", "        if done:\n",
     "the tests' interpreter skips the set-up of language modules its launch has not set up yet"),
]


def tests_for(path):
    return next(t for prefix, t in TESTS.items() if path.startswith(prefix))


def scratch_copy():
    """The working tree's files (tracked, and untracked but not ignored) in a temporary folder."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    dst = tempfile.mkdtemp(prefix="cnf-mutations-")
    for f in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))
    return dst


def run_one(work, path, old, new):
    """Apply one mutation in ``work``, run its tests, restore. Returns (caught, first error line, seconds)."""
    target = os.path.join(work, path)
    text = open(target).read()
    if text.count(old) != 1:  # the module changed since the mutation was written
        return None, f"not run: the text to change occurs {text.count(old)} times in {path}: {old!r}", 0.0
    open(target, "w").write(text.replace(old, new))
    t0 = time.time()
    try:
        tests = [t for t in tests_for(path) if os.path.exists(os.path.join(work, t.split("::")[0]))]
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=work,
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        open(target, "w").write(text)
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("E ")]
    first = errors[0][1:].strip() if errors else proc.stdout.strip().splitlines()[-1]
    return proc.returncode != 0, first, time.time() - t0


def main(argv):
    start = 1
    if "--from" in argv:
        i = argv.index("--from")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
            print("mutations.py: --from takes a number from 1 (--list numbers the mutations)", file=sys.stderr)
            return 2
        start = int(argv.pop(i + 1))
        argv = argv[:i] + argv[i + 1:]
    words = [a for a in argv if not a.startswith("-")]
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] or w in m[3] for w in words)]  # path or description
    if "--list" in argv:
        for k, (path, _, _, what) in enumerate(chosen, 1):
            print(f"{k:3d} {path:24s} {what}  [{' '.join(tests_for(path))}]")
        return 0
    chosen = chosen[start - 1:]
    work = scratch_copy()
    counts = {"CAUGHT": 0, "MISSED": 0, "STALE": 0}
    try:
        for path, old, new, what in chosen:
            caught, line, secs = run_one(work, path, old, new)
            verdict = "STALE" if caught is None else "CAUGHT" if caught else "MISSED"
            counts[verdict] += 1
            print(f"{verdict} {path}: {what} ({secs:.0f} s)\n    {line[:300]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{counts['CAUGHT']} of {len(chosen)} caught, {counts['MISSED']} missed, {counts['STALE']} not run (STALE: "
          "update the mutation's text)")
    return 1 if counts["MISSED"] or counts["STALE"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
