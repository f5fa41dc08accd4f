"""The first batches of a trades, mart or pgd-at run, term by term (a diagnosis, not a test).

For each batch, before the method's own training step on it: clean accuracy in train mode
(batch statistics) and in eval mode (running statistics), the largest clean logit, each term of
the method's loss with the L2 norm of its gradient over the classifier's parameters, and the
accuracy at the attack's point x'. The attack runs as the step's does (eval mode, the method's
start, steps and step size); then the step itself trains on the batch, so row k shows the net
after k steps.

    OMP_NUM_THREADS=1 PYTHONPATH=src python tools/kl_first_batches.py --method trades \\
        --init RUN --eps 0.2 --lr 0.1 --batches 12

Terms: pgd-at: CE(x'). trades: CE(x) and beta x KL(p(x) || p(x')), the latter's gradient also
split into the part through p(x) and the part through p(x'). mart: CE(x'), the margin term
-log(1.0001 - max_{k != y} p_k(x')) and beta x the weighted KL. Prints one row per batch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from learn2defend import TrainConfig
from learn2defend import methods as m
from learn2defend.attacks import kl_pgd_delta, pgd_delta
from learn2defend.distributed import Ranks
from learn2defend.runs import data_meta
from learn2defend.train import _train_loader, _training_data, build_parts  # what train itself uses


def _norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("trades", "mart", "pgd-at"), required=True)
    ap.add_argument("--init", default=None, help="run folder to start from (default: random weights)")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--beta", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=12)
    args = ap.parse_args()

    cfg = TrainConfig(method=args.method, init=args.init, dataset=args.dataset, eps=args.eps, lr=args.lr,
                      beta=args.beta, seed=args.seed, epochs=1, device="cpu", progress=False,
                      out="/nonexistent/kl_first_batches").resolve()
    device = torch.device("cpu")
    data = _training_data(cfg, device)
    parts = build_parts(cfg, data_meta(data), device)
    model, a = parts.model, cfg.attack
    params = list(model.parameters())
    loader = _train_loader(cfg, data, device, Ranks.current())
    loader.set_epoch(0)
    model.train()
    beta = cfg.loss.beta
    print(f"{args.method} from {args.init or 'random weights'}: lr {args.lr}, eps {cfg.eps}, beta {beta}, "
          f"{a.pgd_steps} steps of {a.step_size:.4f}")
    for i, (x, y) in enumerate(loader.iterate(0)):
        if i >= args.batches:
            break
        with torch.no_grad(), m.eval_mode(model):
            eval_correct = (model(x).argmax(1) == y).float().mean()
        with m.eval_mode(model):
            if args.method == "trades":
                delta = kl_pgd_delta(model, x, cfg.eps, steps=a.pgd_steps, step_size=a.step_size, start_std=0.001)
            elif args.method == "mart":
                delta = pgd_delta(model, x, y, cfg.eps, steps=a.pgd_steps, step_size=a.step_size, start_std=0.001)
            else:
                delta = pgd_delta(model, x, y, cfg.eps, steps=a.pgd_steps, step_size=a.step_size, random_start=True)
        clean, adv = model(x), model(x + delta)
        row = (f"batch {i:2d} | clean acc train/eval mode {(clean.argmax(1) == y).float().mean():.3f}/"
               f"{eval_correct:.3f} | max logit {clean.abs().max():5.1f} | acc at x' "
               f"{(adv.argmax(1) == y).float().mean():.3f} |")
        if args.method == "trades":
            ce = F.cross_entropy(clean, y)
            kl = beta * F.kl_div(adv.log_softmax(1), clean.log_softmax(1), reduction="batchmean", log_target=True)
            through_clean = beta * F.kl_div(adv.detach().log_softmax(1), clean.log_softmax(1),
                                            reduction="batchmean", log_target=True)
            through_adv = beta * F.kl_div(adv.log_softmax(1), clean.detach().log_softmax(1),
                                          reduction="batchmean", log_target=True)
            row += (f" CE(x) {ce.item():6.3f} grad {_norm(ce, params):7.3f} | beta*KL {kl.item():7.3f} grad "
                    f"{_norm(kl, params):7.3f} (via p(x) {_norm(through_clean, params):6.3f}, via p(x') "
                    f"{_norm(through_adv, params):6.3f})")
        elif args.method == "mart":
            p_adv = adv.softmax(1)
            ce = F.cross_entropy(adv, y)
            margin = -torch.log(1.0001 - p_adv.scatter(1, y[:, None], 0.0).amax(1)).mean()
            weighted = m.mart_loss(clean, adv, y, beta) - m.mart_loss(clean, adv, y, 0.0)
            weight = 1 - clean.softmax(1).gather(1, y[:, None]).mean()
            row += (f" CE(x') {ce.item():6.3f} grad {_norm(ce, params):7.3f} | margin {margin.item():6.3f} grad "
                    f"{_norm(margin, params):7.3f} | beta*weighted KL {weighted.item():7.3f} grad "
                    f"{_norm(weighted, params):7.3f} (mean weight 1 - p_y(x) {weight.item():.4f})")
        else:
            ce = F.cross_entropy(adv, y)
            row += f" CE(x') {ce.item():6.3f} grad {_norm(ce, params):7.3f}"
        print(row, flush=True)
        m.STEPS[args.method](parts.ctx, x, y)


if __name__ == "__main__":
    main()
