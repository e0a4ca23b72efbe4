"""Where a training step's time goes: forward vs backward, and the top operators of each.

No data set and no Ray: a random batch of the configured shape (images, people with affines
onto a central box, skeleton features, binary targets) and the model of the config, on CPU.
Each setting is timed (CPU time of the process, and wall) over ``--steps`` steps after one
warm-up step, then one step is run under
``torch.profiler`` for the operator table. Relative shares are meaningful on a loaded machine,
absolute times are not.

python benchmarks/profile_step.py                                   # the default run's model
python benchmarks/profile_step.py --preset paper --batch 4 --people 12
python benchmarks/profile_step.py --memory-format both --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

PRESETS = {
    # The default run: configs/default.yaml.
    "default": {},
    # The paper's sizes: ResNet-50-FPN-256, 512 px, S = 64 (SegModule as configured).
    "paper": {
        "model.backbone_depth": 50,
        "model.fpn_channels": 256,
        "model.roi_size": 64,
        "data.input_size": 512,
    },
}


def make_batch(config, *, batch: int, people: int, seed: int = 0):
    """A random PersonBatch of ``batch`` images and ``people`` people (spread over the images)."""
    import torch

    from pose2seg.batch import PersonBatch
    from pose2seg.skeleton import NUM_SKELETON_CHANNELS

    g = torch.Generator().manual_seed(seed)
    size, s = config.data.input_size, config.model.roi_size
    images = torch.randn(batch, 3, size, size, generator=g)
    batch_index = torch.arange(people) % batch
    affines = torch.zeros(people, 2, 3)
    for p in range(people):
        # A random box of 30-60 % of the image mapped onto the S x S RoI.
        w = float(size) * (0.3 + 0.3 * torch.rand(1, generator=g).item())
        x0 = float(size - w) * torch.rand(1, generator=g).item()
        y0 = float(size - w) * torch.rand(1, generator=g).item()
        affines[p] = torch.tensor([[s / w, 0.0, -x0 * s / w], [0.0, s / w, -y0 * s / w]])
    skeleton = torch.rand(people, NUM_SKELETON_CHANNELS, s, s, generator=g)
    targets = (torch.rand(people, s, s, generator=g) > 0.5).float()
    return PersonBatch(
        images=images,
        batch_index=batch_index,
        affines=affines,
        skeleton=skeleton,
        targets=targets,
        image_ids=torch.arange(batch),
        person_ids=torch.arange(people),
    )


def measure(config, batch, *, channels_last: bool, steps: int, profile_rows: int):
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from pose2seg.arch import build_model
    from pose2seg.engine import build_optimizer
    from pose2seg.loss import mask_loss

    torch.manual_seed(0)
    model = build_model(config.model, input_size=config.data.input_size).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.train)

    def step(timings=None):
        # CPU time of this process (all its threads): robust to other load on the machine.
        w0, c0 = time.perf_counter(), time.process_time()
        logits = model(batch.images, batch.batch_index, batch.affines, batch.skeleton)
        loss = mask_loss(logits.float(), batch.targets, dice_weight=config.train.dice_weight)
        w1, c1 = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        w2, c2 = time.perf_counter(), time.process_time()
        optimizer.step()
        if timings is not None:
            timings.append((c1 - c0, c2 - c1, w1 - w0, w2 - w1))

    step()  # warm-up (oneDNN primitive caches)
    timings: list[tuple[float, float]] = []
    for _ in range(steps):
        step(timings)

    def median(i):
        return sorted(t[i] for t in timings)[len(timings) // 2]

    fwd, bwd = median(0), median(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:profile_rows]
    return {
        "channels_last": channels_last,
        "median_forward_cpu_s": fwd,
        "median_backward_cpu_s": bwd,
        "median_forward_wall_s": median(2),
        "median_backward_wall_s": median(3),
        "backward_over_forward": bwd / max(fwd, 1e-9),
        "top_ops_self_cpu_share": [
            {"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in top
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser, "profile_step")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument(
        "--batch", type=int, default=None, help="images (default: train.batch_size)"
    )
    parser.add_argument("--people", type=int, default=None, help="people (default: 3 per image)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--memory-format", choices=["channels_last", "contiguous", "both"], default="both"
    )
    parser.add_argument("--rows", type=int, default=12, help="operators listed per setting")
    args = parser.parse_args(argv)
    args.overrides = [f"{k}={v}" for k, v in PRESETS[args.preset].items()] + args.overrides
    config = common.config_from_args(args)

    import torch

    torch.set_num_threads(args.threads)
    machine = common.machine_info()
    common.print_header(f"training step profile ({args.preset})", machine)
    batch_n = args.batch or config.train.batch_size
    batch = make_batch(config, batch=batch_n, people=args.people or 3 * batch_n)
    formats = {"both": [True, False], "channels_last": [True], "contiguous": [False]}
    results = []
    for cl in formats[args.memory_format]:
        r = measure(config, batch, channels_last=cl, steps=args.steps, profile_rows=args.rows)
        results.append(r)
        print(
            f"{'channels_last' if cl else 'contiguous':>13}: CPU time forward "
            f"{r['median_forward_cpu_s']:.3f} s  backward {r['median_backward_cpu_s']:.3f} s  "
            f"ratio {r['backward_over_forward']:.2f}  (wall {r['median_forward_wall_s']:.3f} + "
            f"{r['median_backward_wall_s']:.3f} s)",
            flush=True,
        )
        for op in r["top_ops_self_cpu_share"]:
            print(f"    {100 * op['share']:5.1f}%  {op['op']}  x{op['calls']}")
    out = {
        "preset": args.preset,
        "batch_images": batch_n,
        "people": batch.num_people,
        "threads": args.threads,
        "input_size": config.data.input_size,
        "model": {k: v for k, v in config.to_flat().items() if k.startswith("model.")},
        "results": results,
        "load_average_end": common.load_average(),
    }
    print("wrote", common.write_json(args.out, out, machine=machine))
    return 0


if __name__ == "__main__":
    common.main_guard(main)
