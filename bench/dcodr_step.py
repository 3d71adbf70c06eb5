"""One DCoDR / DCoDR-norec training step: an official-style re-creation against fastipirm's.

    python -m bench dcodr-step                  # CPU at small width (the default here)
    python -m bench dcodr-step --width 64 --generator-width 256 --device cuda   # full size

A step is one batch of ``domains x per_domain`` 64 x 64 anchors (official 4 x 32) and one
positive each, through the encoder (:class:`fastipirm.models.dcodr_encoder.DCoDREncoder`), the
contrastive loss, for ``dcodr`` the generator and the perceptual loss, backward and Adam.

* official-style (written from the specification of the official code, fp32): the positives made
  per image on the host from uint8 PIL images (one of Gaussian blur 5/1, contrast and saturation
  ``ImageEnhance`` with factors in [1.8, 3], a resized crop of scale 0.5-1) then stacked and
  moved; the loss with per-anchor ``np.random.choice`` negative index lists built on the host
  (:func:`bench.masked.dcodr_official`); VGG16 with ``requires_grad`` left on (its weight
  gradients computed and dropped);
* fastipirm: the positives batched on the device (:func:`fastipirm.data.dcodr_augment.
  dcodr_positive_views`), :func:`fastipirm.losses.dcodr.dcodr_contrastive_loss` on the masked op,
  VGG16 frozen.

Both use the same networks and the same random weights; the table gives the median step time and
the official-style time over ours. The VGG weights are random (their values do not change the
cost).
"""
from __future__ import annotations

import argparse

from .harness import fmt, ratio

NAME = "dcodr_step"
COMMON_OPTIONS = ("no_save", "results_dir")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--width", type=int, default=8, help="ResNet-50 base width (official 64)")
    ap.add_argument("--generator-width", type=int, default=32,
                    help="generator channels (official 256)")
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--per-domain", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)


def _official_positives(images, rng):
    """Per image on the host, as the official DataLoader workers: PIL, one augmentation."""
    import numpy as np
    import torch
    from PIL import Image, ImageEnhance, ImageFilter

    out = []
    for img in images:
        pil = Image.fromarray(img)
        k = rng.randint(4)
        if k == 0:
            pil = pil.filter(ImageFilter.GaussianBlur(1))
        elif k == 1:
            pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(1.8, 3))
        elif k == 2:
            s = np.sqrt(rng.uniform(0.5, 1.0))
            w = int(64 * s)
            x0, y0 = rng.randint(0, 65 - w), rng.randint(0, 65 - w)
            pil = pil.crop((x0, y0, x0 + w, y0 + w)).resize((64, 64), Image.BILINEAR)
        else:
            pil = ImageEnhance.Color(pil).enhance(rng.uniform(1.8, 3))
        out.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from fastipirm.data.dcodr_augment import dcodr_positive_views
    from fastipirm.losses.dcodr import dcodr_contrastive_loss
    from fastipirm.losses.perceptual import PerceptualDistance, VGG16Features
    from fastipirm.models.dcodr_encoder import DCoDREncoder
    from fastipirm.models.dcodr_generator import DCoDRGenerator

    from .harness import environment, measure
    from .masked import dcodr_official

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    n_dom, per = args.domains, args.per_domain
    b = n_dom * per
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (b, 64, 64, 3)).astype(np.uint8)
    domains_np = np.repeat(np.arange(n_dom), per)
    domains = torch.from_numpy(domains_np).to(device)
    anchors = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device)
    rows = []
    for method in ("dcodr_norec", "dcodr"):
        for impl in ("official-style", "fastipirm"):
            torch.manual_seed(1)
            enc = DCoDREncoder(128, width=args.width).to(device)
            gen = DCoDRGenerator(n_dom, width=args.generator_width).to(device)
            vgg = VGG16Features().to(device)
            official = impl == "official-style"
            if not official:
                for p in vgg.parameters():
                    p.requires_grad_(False)
            perceptual = PerceptualDistance(vgg).to(device)
            params = list(enc.parameters()) + (list(gen.parameters()) if method == "dcodr"
                                               else [])
            opt = torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.999))
            gen_t = torch.Generator(device=device).manual_seed(2)

            def step(i, official=official, method=method, enc=enc, gen=gen,
                     perceptual=perceptual, opt=opt, gen_t=gen_t):
                if official:
                    pos = _official_positives(images, rng).to(device)
                else:
                    pos = dcodr_positive_views(anchors, gen_t)
                z, z_pos = enc(anchors), enc(pos)
                if official:
                    zn = torch.nn.functional.normalize(z, dim=1)
                    zp = torch.nn.functional.normalize(z_pos, dim=1)
                    loss = dcodr_official(zn, zp, domains_np, 0.2, 64, rng)
                else:
                    loss = dcodr_contrastive_loss(z, z_pos, domains, temperature=0.2,
                                                  check_values=False)
                if method == "dcodr":
                    loss = loss + 0.3 * perceptual(gen(z, domains), anchors)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if official:
                    loss.item()                  # the official logs every step's loss
            res = measure(step, device=args.device, warmup=1, repeats=args.repeats)
            rows.append({"method": method, "impl": impl, **res})
    for r in rows:
        ref = next(x for x in rows if x["method"] == r["method"] and x["impl"] == "official-style")
        r["official_over_this"] = ratio(ref["median_ms"], r["median_ms"])
    return {"benchmark": NAME, "environment": environment(),
            "settings": {"device": args.device, "width": args.width,
                         "generator_width": args.generator_width, "batch": b,
                         "image_size": 64, "threads": args.threads},
            "rows": rows}


def format_table(record: dict) -> str:
    lines = [f"{'method':<12} {'implementation':<15} {'median ms':>10} {'p20-p80 ms':>17} "
             f"{'official / this':>16}"]
    for r in record["rows"]:
        lines.append(f"{r['method']:<12} {r['impl']:<15} {fmt(r['median_ms'], '.1f'):>10} "
                     f"{fmt(r['p20_ms'], '.1f') + '-' + fmt(r['p80_ms'], '.1f'):>17} "
                     f"{fmt(r['official_over_this'], '.2f'):>16}")
    return "\n".join(lines)
