"""The pair sources of CL-ICA runs: the data sets a ``clica`` run draws its positive pairs from.

- ``latent_mixing``: fresh latents through a frozen MLP (:class:`.latent_mixing.LatentMixing`);
- ``threedident``: 3DIdent's renderings, positives as the nearest rendered latent
  (:class:`.threedident.ThreeDIdentPairs`, files under ``data.root``/``data.split``);
- ``kitti_masks``: KITTI Masks' pedestrian masks, positives a few frames later
  (:class:`.kitti_masks.KittiPairs`, ``data.root``/kitti_peds_v2.pickle).

Each has ``device``, ``generator_device``, ``to(device)``, ``pair_batch(batch, generator) ->
(z, x, x~)``, ``eval_batch(batch, generator) -> (x, z)`` and ``raw_scores`` (whether a linear
fit of the raw observations is a meaningful reference).
"""
from __future__ import annotations

from .latent_mixing import GENERATIVE, LatentMixing

#: the image data sets of CL-ICA
CLICA_IMAGE_DATA = ("threedident", "kitti_masks")
#: every ``data.name`` a CL-ICA run trains on
CLICA_SOURCES = GENERATIVE + CLICA_IMAGE_DATA


def load_pair_source(cfg, device="cpu"):
    """The pair source of ``cfg`` (``data.name`` in :data:`CLICA_SOURCES`) on ``device``.

    Missing or malformed files raise ``FileNotFoundError``/``ValueError`` naming the file and
    where to get the data; a code dimension ``clica.n`` that does not match the data's latents
    (3DIdent) is a ``ValueError`` naming both."""
    from .latents import conditional_from_code

    d, c = cfg.data, cfg.clica
    if d.name in GENERATIVE:
        return LatentMixing(c, cfg.run.seed).to(device)
    if d.name == "threedident":
        from .threedident import ThreeDIdent, ThreeDIdentPairs

        data = ThreeDIdent(d.root, d.split or None, latent_dims=c.latent_dims or None)
        width = data.latents.shape[1]
        if width != c.n:
            raise ValueError(f"clica.n: {c.n} code dimensions, but the 3DIdent data uses {width} "
                             f"latent columns {data.latent_dims} (set clica.n = {width} or "
                             f"clica.latent_dims)")
        dist, p = conditional_from_code(c.c_p)
        return ThreeDIdentPairs(data, kind=c.latents, conditional=dist, conditional_p=p,
                                sigma=c.c_param, box_min=c.box_min, box_max=c.box_max,
                                normalize=c.normalize_images, device=device, workers=c.workers)
    if d.name == "kitti_masks":
        from .kitti_masks import KittiMasks, KittiPairs

        data = KittiMasks(d.root, max_delta_t=c.kitti_max_delta_t)
        return KittiPairs(data, augment=c.kitti_augment, device=device)
    raise ValueError(f"data.name: {d.name!r} is not a CL-ICA data set ({', '.join(CLICA_SOURCES)})")
