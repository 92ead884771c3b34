"""How close each attention kind's certified bound is to what its branch reaches.

For every registered kind, an ``iresnet-attn`` model (size tiny) on the embedded digits
(or ``--dataset``) is built, then trained ``--steps`` steps. At initialisation and after
training, at the inputs its attention step sees for 8 test images, it prints:

* the certified l-inf bound L of the attention branch;
* ``local``: the largest l-inf Jacobian norm at those inputs (exact, dense Jacobians)
  as a share of L (issue 30 asks for at least 10% at initialisation);
* ``ascent``: the largest l-inf Jacobian norm gradient ascent on the input finds
  (:func:`flowattn.capacity.worst_case_norm`, from the same 8 inputs and from the same
  inputs scaled by 3), as a share of L (a bound within 2x of the worst case has a
  share of at least 50%).

Shares are scale-free (the output map's factor s cancels), so they measure the bound's
slack, not the weights' size.

Usage:
    python -m experiments.bench.bound_tightness
    python -m experiments.bench.bound_tightness --steps 600 --kinds external dot
    python -m experiments.bench.bound_tightness --dataset cifar10 --downsample 4
    python -m experiments.bench.bound_tightness --similarity_init random  # PyTorch's init
"""

from __future__ import annotations

import argparse

import torch

from flowattn.capacity import budget_use, worst_case_norm
from flowattn.data import load_dataset, stack_images
from flowattn.models import build_model
from flowattn.nn.attention_kinds import KINDS
from flowattn.nn.lipschitz_attention import SIMILARITY_INITS
from flowattn.precision import use_ieee_float32
from flowattn.training import Trainer


def attention_inputs(step, model, x: torch.Tensor) -> torch.Tensor:
    """The inputs the model's attention step ``step`` sees for the images x."""
    seen = []
    handle = step.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        model.encode(x)
    finally:
        handle.remove()
    return seen[0]


def measure(model, x_test: torch.Tensor, args) -> tuple[float, float, float]:
    """(bound, local share, ascent share) of the attention step."""
    (use,) = budget_use(model, x_test, attention_only=True)
    step = next(s for n, s in model.residual_steps() if n == use.name)
    h = attention_inputs(step, model, x_test).double()
    branch = step.branch.double()
    ascent = worst_case_norm(branch, torch.cat([h, 3 * h]), steps=args.ascent_steps)
    step.branch.float()
    return use.bound, use.share, ascent / use.bound


def main() -> None:
    use_ieee_float32()  # as the flowattn command does (flowattn.precision says why)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--downsample", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ascent_steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--similarity_init", default="selection", choices=SIMILARITY_INITS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = stack_images(load_dataset(args.dataset, "train"), 2000)
    test = stack_images(load_dataset(args.dataset, "test"), 8)
    if args.downsample > 1:
        pool = torch.nn.functional.avg_pool2d
        train, test = (
            pool(t.float(), args.downsample).round().to(torch.uint8) for t in (train, test)
        )
    shape = tuple(train.shape[1:])
    print(
        f"{args.dataset} {shape}, iresnet-attn tiny, {args.steps} training steps, similarity "
        f"maps started as {args.similarity_init}; shares of the certified l-inf bound of the "
        "attention branch"
    )
    print(
        f"{'kind':<18} {'bound':>7} {'init local':>10} {'init ascent':>11} "
        f"{'trained local':>13} {'trained ascent':>14}"
    )
    for kind in args.kinds:
        torch.manual_seed(0)
        options = {"similarity_init": args.similarity_init}  # gaussian has no such maps
        model = build_model(
            "iresnet-attn",
            image_shape=shape,
            size="tiny",
            attention=kind,
            attention_options=options,
        )
        bound, local0, ascent0 = measure(model, test, args)
        Trainer(model, train, batch_size=64, lr=1e-3).run(None, args.steps, progress=False)
        _, local1, ascent1 = measure(model, test, args)
        print(
            f"{kind:<18} {bound:>7.3f} {local0:>10.1%} {ascent0:>11.1%} {local1:>13.1%} "
            f"{ascent1:>14.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
