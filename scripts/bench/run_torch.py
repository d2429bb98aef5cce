"""Benchmark worker: plain PyTorch, eager and channels-last (or `--compile`: torch.compile), on
the Keras-layout architectures of torch_models.py; bfloat16 autocast on GPUs (cuDNN's
autotuner on, as for any fixed-shape run). SGD with momentum, cross-entropy; the frozen
step trains the head only, with the backbone's BatchNorm in eval mode (as Keras's
`trainable=False`)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch_models  # noqa: E402


def program(kind: str, args, x, y, device, dtype):
    """A no-argument call running `kind` once on a freshly built model."""
    torch.manual_seed(0)
    model = torch_models.create(args.model, args.classes, args.size).to(device)
    model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=dtype == torch.bfloat16)
    if kind == "inference":
        model.eval()

        def infer():
            with torch.inference_mode(), autocast:
                return run(x)

        return infer
    model.train()
    if kind == "frozen_step":
        for m in torch_models.backbone(model):
            m.eval()
            m.requires_grad_(False)
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.01,
                          momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(run(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args()
    name = "torch-compile" if args.compile else "torch"
    if args.model not in torch_models.MODELS:
        common.fail(name, args.model, f"no PyTorch peer written for {args.model}")
    least = torch_models.MIN_SIZE[args.model]
    if args.size < least:
        common.fail(name, args.model, f"{args.model} takes inputs of at least {least}x{least} "
                    f"(as Keras's), got {args.size}x{args.size}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    else:
        torch.set_num_threads(os.cpu_count())
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 255).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)

    def sync(out):
        if cuda:
            torch.cuda.synchronize()
        return out

    result = {"framework": name, "model": args.model, "batch": args.batch, "size": args.size,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "version": torch.__version__, "dtype": str(dtype).replace("torch.", "")}
    def prepare(kind):
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def after():
            return {"peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if cuda
                                       else common.peak_rss_mb())}

        return program(kind, args, x, y, device, dtype), {}, after

    common.run(args.kinds.split(","), prepare, sync, args, result)


if __name__ == "__main__":
    main()
