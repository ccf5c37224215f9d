"""The training state of one run and its iteration: model, optimizer, schedule, scalers,
data streams, the deferred finiteness checks and the validation rows.

``cnf.py`` builds a ``Trainer`` from the parsed config and drives its loop; the
checkpoint is ``Trainer.state_dict``, and restoring it continues a run bitwise.
"""
import copy
import json
import time

import torch

import experiment as ex
import metrics
import schedule
import toy_data
from model import CNF, Integrator, log_prob, nll_and_penalties
from precision import Precision, Scalers
from torchmpnode._host import host_read


class Trainer:
    """Everything a run builds and mutates. ``state_dict`` is the one checkpoint
    content: restoring it continues the run bitwise."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.prec = Precision(args.precision, device)
        self.scalers = Scalers(args.odeint, self.prec, device, args.no_grad_scaler, args.no_dynamic_scaler,
                               args.grad_scaler)
        self.integ = Integrator(args.odeint, args.method, args.num_timesteps, self.scalers.solver_scaler, args.adjoint)
        self.fine_integ = metrics.fine_integrator(self.integ)  # the grid watch's
        torch.manual_seed(args.seed)
        self.cnf = CNF(2, args.hidden_dim, args.width, args.trace, args.backend).to(device)
        self.kernel_errors = ()  # what a failed fused kernel raises
        if args.backend == "triton":
            import cnf_kernels

            self.kernel_errors = (cnf_kernels.KernelError,)
        # fused: one kernel for every parameter's update (CUDA); its step counters live on the GPU
        self.opt = torch.optim.Adam(self.cnf.parameters(), lr=args.lr, fused=True if args.fused_adam else None)
        # the rate of update k+1 is lr * lr_factor(k): a function of the iteration alone, so a resume
        # (which restores last_epoch) continues it exactly
        plan = dict(schedule=args.lr_schedule, step=args.lr_step, gamma=args.lr_gamma, lr=args.lr,
                    lr_min=args.lr_min, warmup=args.warmup, niters=args.niters)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda k: schedule.lr_factor(k, **plan))
        streams = toy_data.seed_streams(args.seed)
        self.data_rng = streams["train"]
        x_val = toy_data.inf_train_gen(args.data, args.num_samples_val, streams["val"])
        self.x_val = torch.from_numpy(x_val).to(device)  # fixed validation set
        self.noise_gen = torch.Generator().manual_seed(args.seed + 1)  # Hutchinson noise
        self.iter, self.running, self.sums = 0, None, [0.0, 0.0]  # sums: forward, backward seconds
        # GradScaler's step reads its inf check on the host every iteration anyway: those runs
        # check each iteration; the others read the device only at rows and checkpoints
        self.checked = self.scalers.grad.is_enabled()
        self.pending = []  # (loss, [loss finite, gradient finite]) of each iteration not yet settled
        self.events = []  # log lines for the loop to print
        self.seen = (0, 0)  # (iteration, DynamicScaler retries) at the last settled state
        self.good = None  # the last settled state, unless every iteration is checked
        self.regularized = args.kinetic > 0 or args.jacobian > 0
        self.penalties = None  # the last batch's [kinetic, jacobian] integrals (a tensor: read at validation only)
        self.grid_flag = None  # where and why grid_exploited first rose

    def state_dict(self, config):
        s = self.scalers
        return {
            "model": self.cnf.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "grad_scaler": s.grad.state_dict() if s.grad.is_enabled() else {},
            "dynamic_scaler": s.dynamic.state_dict() if s.dynamic is not None else {},
            "rng": {"numpy": json.dumps(self.data_rng.bit_generator.state), "noise": self.noise_gen.get_state(),
                    "torch": torch.get_rng_state()},
            "iter": self.iter, "running_loss": self.running, "time_sums": tuple(self.sums), "config": config,
            "grid_flag": self.grid_flag,
        }

    def load_state_dict(self, state):
        self.cnf.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        # the schedule is the lambda built from the config; a checkpoint of the seed's StepLR holds none
        self.sched.load_state_dict({"lr_lambdas": [None], **state["scheduler"]})
        if state["grad_scaler"]:
            self.scalers.grad.load_state_dict(state["grad_scaler"])
        if self.scalers.dynamic is not None and state["dynamic_scaler"]:
            self.scalers.dynamic.load_state_dict(state["dynamic_scaler"])
        self.data_rng.bit_generator.state = json.loads(state["rng"]["numpy"])
        self.noise_gen.set_state(state["rng"]["noise"])
        torch.set_rng_state(state["rng"]["torch"])
        self.iter, self.running, self.sums = state["iter"], state["running_loss"], list(state["time_sums"])
        self.seen = (self.iter, self.scalers.overflow_steps())
        self.grid_flag = state.get("grid_flag")  # absent in checkpoints from before the grid watch

    def step(self, checked=None):
        """One iteration. Returns (forward s, backward s, failure or None).

        ``checked`` (default: ``self.checked``) reads whether the loss and the gradient
        are finite before the update, and on failure updates nothing, so the parameters
        stay those of the last good iteration. Unchecked, the iteration reads nothing
        from the device (no host sync on a GPU besides the timing's own); ``settle``
        then checks the iterations since the last settled one, and rolls back and
        replays them checked if one failed."""
        a, s, dev = self.args, self.scalers, self.device
        checked = (self.checked if checked is None else checked) or s.grad.is_enabled()  # GradScaler reads anyway
        x = torch.from_numpy(toy_data.inf_train_gen(a.data, a.num_samples, self.data_rng))
        # a pageable host-to-GPU copy waits for the device; a pinned one does not
        x = x.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else x.to(dev)
        _sync(dev)
        t0 = time.perf_counter()
        try:
            with self.prec.autocast():
                loss = self.objective(x)
        except self.kernel_errors as e:  # a fused kernel failed: stop like a divergence, keeping the last checkpoint
            return 0.0, 0.0, str(e)
        _sync(dev)
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        scale_before = s.loss_scale() if s.grad.is_enabled() else None  # GradScaler runs are always checked
        try:
            s.grad.scale(loss).backward()
        except RuntimeError as e:  # DynamicScaler gave up (the gradient itself is not finite), or a kernel failed
            return t1 - t0, 0.0, str(e)
        s.grad.unscale_(self.opt)
        gnorm = torch.nn.utils.get_total_norm([p.grad for p in self.cnf.parameters() if p.grad is not None])
        flags = torch.stack([torch.isfinite(loss.detach()), torch.isfinite(gnorm)])
        if checked:
            loss_ok, grad_ok = host_read(flags)
            if not loss_ok or (not grad_ok and not s.grad.is_enabled()):
                what = "loss" if not loss_ok else "gradient"
                return t1 - t0, 0.0, f"non-finite {what} (lr {self.sched.get_last_lr()[0]:g})"
        s.grad.step(self.opt)  # GradScaler skips the step itself on inf/NaN gradients
        s.grad.update()
        self.sched.step()
        _sync(dev)
        t2 = time.perf_counter()
        self.iter += 1
        self.pending.append((loss.detach(), flags))
        self.sums[0] += t1 - t0
        self.sums[1] += t2 - t1
        if scale_before is not None and s.loss_scale() != scale_before:
            self.events.append(f"iter {self.iter}: GradScaler scale {scale_before:g} -> {s.loss_scale():g}"
                               + ("" if grad_ok else " (step skipped: inf/NaN gradient)"))
        return t1 - t0, t2 - t1, None

    def settle(self, failure=None):
        """Read the losses and flags of the iterations since the last settled one (one host
        read), fold the losses into the running loss, and mark this state good. If one of
        them failed, roll back to the last good state and replay them checked, stopping
        at the first failure. ``failure``: what the iteration after them raised (it
        updated nothing). Returns the failure or None; after a failure the state is that
        of the last good iteration, as if every iteration had been checked."""
        target = self.iter + (failure is not None)
        grad_scaled = self.scalers.grad.is_enabled()  # then a non-finite gradient only skips the step
        values = host_read(torch.stack([torch.cat([lv.double().reshape(1), f.double()]) for lv, f in self.pending])) \
            if self.pending else []
        self.pending = []
        if all(ok and (gok or grad_scaled) for _, ok, gok in values):
            for lv, _, _ in values:
                self.running = lv if self.running is None else 0.9 * self.running + 0.1 * lv
            # a failed iteration updates nothing: after good ones, this is the last good state
            return failure if failure is not None else self._mark_good()
        # an unchecked iteration failed and later ones built on it: redo them checked
        self.load_state_dict(self.good)
        while self.iter < target:
            failure = self.step(checked=True)[2]
            if failure:
                return self.settle(failure)
        return self.settle()

    def _mark_good(self):
        """Remember this state (in memory) as the one to roll back to; log the scaler's news."""
        s = self.scalers
        if s.dynamic is not None:
            overflow = s.overflow_steps()
            if overflow != self.seen[1]:
                self.events.append(f"iter {self.iter}: DynamicScaler retried {overflow - self.seen[1]} overflowing "
                                   f"step(s) since iteration {self.seen[0]}; scale now {s.dynamic.scale:g}")
            self.seen = (self.iter, overflow)
        if not self.checked:
            self.good = copy.deepcopy(self.state_dict(None))
        return None

    def objective(self, x):
        """The training loss of batch x: the mean NLL, plus the weighted penalties when on."""
        if not self.regularized:
            return -log_prob(self.cnf, x, self.integ, generator=self.noise_gen).mean()
        nll, pen = nll_and_penalties(self.cnf, x, self.integ, generator=self.noise_gen)
        self.penalties = pen.detach()
        return nll + self.args.kinetic * pen[0] + self.args.jacobian * pen[1]

    def evaluate(self, window):
        """One CSV row; ``window`` holds (forward s, backward s, iterations) since the last row.
        Every --grid_watch-th validation (counted from iteration 0, so the same on resume) and
        the last also solve on the finer grid; the row says whether it raises grid_exploited."""
        a = self.args
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + self.iter)  # same on resume
        watch = a.grid_watch > 0 and ((self.iter // a.test_freq) % a.grid_watch == 0 or self.iter == a.niters)
        m = metrics.evaluate(self.cnf, self.integ, self.x_val, a.data, self.prec, gen,
                             self.fine_integ if watch else None)
        m["grid_exploit_reason"] = metrics.grid_exploit_reason(m, toy_data.ENTROPY[a.data], a.grid_gap_max)
        m["grid_exploited"] = int(m["grid_exploit_reason"] is not None)
        if self.penalties is not None:
            m["kinetic"], m["jacobian"] = self.penalties.tolist()
        return {"iter": self.iter, "lr": self.sched.get_last_lr()[0], "running_loss": self.running, **m,
                "time_fwd": window[0] / window[2], "time_bwd": window[1] / window[2],
                "time_fwd_sum": self.sums[0], "time_bwd_sum": self.sums[1],
                "max_memory_mb": ex.peak_memory_mb(self.device), "loss_scale": self.scalers.loss_scale(),
                "overflow_steps": self.scalers.overflow_steps()}

    def final_evaluation(self, val_loss):
        """The end-of-run metrics (ex.FINAL_COLUMNS), the per-point test log-densities
        [n] and the seconds each part took."""
        a = self.args
        x_test = toy_data.inf_train_gen(a.data, a.num_samples_test, toy_data.seed_streams(a.seed)["test"])
        gen = metrics.final_noise(a.seed)  # Hutchinson noise only; the same as flow.py's and checkpoint_metrics's
        t0 = time.perf_counter()
        test, logp = metrics.test_metrics(self.cnf, self.integ, torch.from_numpy(x_test).to(self.device), a.data, gen)
        t1 = time.perf_counter()
        exact = metrics.exact_metrics(self.cnf, self.x_val, val_loss)
        return {**test, **exact}, logp, (t1 - t0, time.perf_counter() - t1)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
