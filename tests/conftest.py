from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

_rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_NO_CUDA)])
def device(request) -> torch.device:
    """Each device a test should hold on: the CPU always, CUDA where there is one
    (``pytest -k cuda`` runs those alone)."""
    return torch.device(request.param)


def dense_jacobian_of(fn, x: torch.Tensor) -> torch.Tensor:
    """Per-sample dense Jacobians (B, D, D) of fn at x, from torch.func.jacrev."""
    d = x[0].numel()

    def single(xi):
        return fn(xi[None])[0]

    return torch.stack([torch.func.jacrev(single)(xi).reshape(d, d) for xi in x]).detach()


def check_bijection(
    transform, x: torch.Tensor, *, atol: float = 1e-9, inverse_atol: float = 1e-10
) -> None:
    """Checks an nflows ``Transform`` at float64 inputs ``x``: its forward log-det equals
    log|det| of the exact Jacobian (reverse mode, one backward pass per output, through
    ``torch.autograd.functional.jacobian``: ``jacrev``'s vmap cannot batch the log-det
    bookkeeping inside residual steps), its inverse gives ``x`` back, and the inverse's
    log-det is minus the forward's."""
    assert x.dtype == torch.float64, "check bijections in float64"
    y, logabsdet = transform(x)
    assert y.shape == x.shape and logabsdet.shape == (x.shape[0],)
    d = x[0].numel()
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda t: transform(t[None])[0][0], xi).reshape(d, d)
            for xi in x
        ]
    )
    expected = torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(logabsdet.detach(), expected, atol=atol, rtol=0)
    x_back, inverse_logabsdet = transform.inverse(y.detach())
    assert float((x_back.detach() - x).abs().max()) <= inverse_atol
    torch.testing.assert_close(inverse_logabsdet.detach(), -logabsdet.detach(), atol=atol, rtol=0)


def count_host_reads(fn) -> int:
    """How many scalars ``fn()`` reads back to the host (``.item()``, ``float()``,
    ``bool()`` of a tensor...): on an accelerator, each waits for the queued kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return len(reads)


def train_one_step(model):
    """One Adam step on random 8-bit images: ActNorm initialises on data, every
    parameter moves. Returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randint(0, 256, (8, *model.image_shape), dtype=torch.uint8)
    y, logdet = model.dequantize(x.to(model.device))
    loss = -(model.log_prob(y) + logdet).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return model.eval()


def stress_weights(module: torch.nn.Module, scale: float = 3.0) -> None:
    """Inflate every raw parameter so that all norm rescalings are active."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)


def write_svhn(root: Path, split: str, n: int = 5, x=None) -> np.ndarray:
    """Writes SVHN's torchvision file {split}_32x32.mat (HWCN uint8, labels 1..10)."""
    root.mkdir(parents=True, exist_ok=True)
    if x is None:
        x = _rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.arange(1, n + 1, dtype=np.uint8).reshape(n, 1) % 10 + 1  # labels 1..10
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x


def write_celeba(root: Path, n: int = 6) -> Path:
    """Writes a CelebA folder in torchvision's layout: JPEGs and the five annotation files."""
    folder = root / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    for name in names:
        pixels = _rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name, quality=95)
    partition = [0, 0, 0, 1, 2, 2][:n]
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{f} {p}\n" for f, p in zip(names, partition, strict=True))
    )
    (folder / "identity_CelebA.txt").write_text("".join(f"{f} 1\n" for f in names))
    attrs = "5_o_Clock_Shadow Smiling"
    (folder / "list_attr_celeba.txt").write_text(
        f"{n}\n{attrs}\n" + "".join(f"{f} -1  1\n" for f in names)
    )
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{f} 1 2 3 4\n" for f in names)
    )
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y\n" + "".join(f"{f} 69 109\n" for f in names)
    )
    return images
