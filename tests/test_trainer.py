"""trainer.py: the validation rows' randomness (fresh data, model samples, base noise) is a
function of the seed and the iteration: the same on a resume, independent across seeds."""
import torch

import cnf
import metrics
import trainer as trainer_module


def _row_noise(monkeypatch, seed, iters):
    """The generator state each validation row of a fresh Trainer (this seed) starts from."""
    seen = []
    real = metrics.evaluate

    def evaluate(*a, **kw):
        seen.append(a[5].get_state().clone())  # the generator, before it draws anything
        return real(*a, **kw)

    monkeypatch.setattr(trainer_module.metrics, "evaluate", evaluate)
    args = cnf.build_parser().parse_args(["--num_samples", "8", "--num_samples_val", "16", "--width", "8",
                                          "--hidden_dim", "8", "--num_timesteps", "3", "--seed", str(seed),
                                          "--test_freq", "1", "--grid_watch", "0"])
    cnf.validate(args, self_test=False)
    tr = trainer_module.Trainer(args, torch.device("cpu"))
    for k in iters:
        tr.iter = k
        tr.evaluate((1.0, 1.0, 1))
    monkeypatch.undo()
    return seen


def test_validation_noise_follows_seed_and_iteration(monkeypatch):
    a = _row_noise(monkeypatch, 0, (0, 50, 100))
    assert all(torch.equal(x, y) for x, y in zip(a, _row_noise(monkeypatch, 0, (0, 50, 100))))  # resume: the same
    b = _row_noise(monkeypatch, 1, (0, 50, 100))
    states = a + b  # every (seed, iteration) its own stream: seeds are independent replications
    assert len({bytes(s.numpy()) for s in states}) == len(states)
