"""Procedural chest-CT nodule phantom (benign vs malignant), rendered in Hounsfield units.

Every patch is ``size x size`` pixels (default 64); pixel-unit lengths below are quoted for
size 64 and scale linearly with ``size``. All randomness comes from the key passed in; image
``i`` of :func:`render_patches` uses ``jax.random.fold_in(key, i)`` only.

Clean anatomy (HU), drawn back to front:

* air -1000 outside an elliptical body; body semi-axes ``U(0.38, 0.44) * size`` (x) and
  ``U(0.30, 0.36) * size`` (y), centre jitter ``U(-1.5, 1.5)`` px; a subcutaneous fat rim
  ``U(-120, -80)`` HU, ``U(2, 3.5)`` px thick; soft tissue ``U(30, 50) + 0.25 * contrast_hu``.
* one lung ellipse inside the body (wall ``U(5, 8)`` px): parenchyma ``U(-870, -830)`` plus
  smooth texture (white noise blurred with sigma 2 px, std ``U(8, 22)`` HU).
* 8 vessels: segments of length ``U(0, 9)`` px (length near 0 = blob, i.e. a vessel in
  cross-section), half-width ``U(0.5, 1.3)`` px, ``40 + contrast_hu`` HU, inside the lung.
* one nodule, centre offset ``U(-4, 4)`` px from the patch centre. Radius
  ``r0 = exp(N(log m, 0.28))`` px with median ``m`` = 7.0 (malignant) / 5.0 (benign),
  clipped to [2, 12]. Margin ``r(theta) = r0 * (1 + lobulation + spiculation)``:
  lobulation ``a * cos(f * theta + phi)``, ``f`` in {2, 3, 4}, ``a ~ U(0, 0.15)`` (malignant)
  / ``U(0, 0.10)`` (benign); spiculation (present with p = 0.70 malignant / 0.10 benign)
  ``b * sum_k max(cos(f_k theta + phi_k), 0) ** 8`` over 3 components, ``f_k`` in [5, 12],
  ``b ~ U(0.25, 0.8)``. Edge softness ``U(0.35, 0.8)`` px (malignant) / ``U(0.3, 0.7)``
  (benign), x1.5 for ground glass. Texture type (solid, part-solid, ground-glass,
  calcified) with probabilities (0.55, 0.30, 0.12, 0.03) malignant / (0.45, 0.12, 0.28,
  0.15) benign: solid ``U(-20, 60) + 0.1 * contrast_hu``; ground-glass ``U(-600, -300)``;
  part-solid = ground-glass with a solid core of ``U(0.35, 0.7) * r``; calcified = solid
  with a central ``U(250, 900)`` HU core of ``U(0.3, 0.9) * r``. Nodule texture: smooth
  noise, std 10 HU.

Scanner (per hospital, :class:`ScannerProfile`): clean -> Gaussian blur ``blur_sigma``
(separable, rows renormalised at the border) -> ``hu_scale * img + hu_shift`` ->
``+ N(0, noise_std)``.

Difficulty (measured at size 64): logistic regression on the latent parameters
(log r0, spiculation, lobulation, edge, type) ~0.93 AUC; a linear probe on four hand
features (dense / calcified / ground-glass / edge pixel counts) ~0.78; the classes overlap
by design (size and margin distributions overlap, 10% of benign nodules are spiculated,
30% of malignant ones are not).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ScannerProfile(NamedTuple):
    """Per-scanner acquisition parameters (fields may be stacked arrays)."""

    hu_scale: float
    hu_shift: float
    noise_std: float
    blur_sigma: float
    contrast_hu: float


VENDORS = ("GE", "Philips", "Siemens", "Toshiba")

REFERENCE_PROFILE = ScannerProfile(
    hu_scale=1.0, hu_shift=0.0, noise_std=15.0, blur_sigma=0.6, contrast_hu=0.0
)

VENDOR_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(hu_scale=1.00, hu_shift=12.0, noise_std=18.0, blur_sigma=0.8, contrast_hu=0.0),
    ScannerProfile(
        hu_scale=1.03, hu_shift=-20.0, noise_std=25.0, blur_sigma=1.2, contrast_hu=180.0
    ),
    ScannerProfile(hu_scale=0.96, hu_shift=25.0, noise_std=11.0, blur_sigma=0.45, contrast_hu=0.0),
    ScannerProfile(
        hu_scale=1.05, hu_shift=-28.0, noise_std=33.0, blur_sigma=1.45, contrast_hu=120.0
    ),
)

_NUM_VESSELS = 8
_NUM_SPIKES = 3
# Texture-type probabilities (solid, part-solid, ground-glass, calcified) per label.
_TYPE_PROBS = np.array([[0.45, 0.12, 0.28, 0.15], [0.55, 0.30, 0.12, 0.03]], np.float32)


def window(hu: jax.Array, level: float = -300.0, width: float = 1400.0) -> jax.Array:
    """Map HU to [0, 1] with a display window (default: lung window)."""
    lo = level - width / 2.0
    return jnp.clip((jnp.asarray(hu, jnp.float32) - lo) / width, 0.0, 1.0)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Full-precision f32 matmul (no TF32 on GPUs)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _blur_matrix(sigma: jax.Array, size: int, radius: int) -> jax.Array:
    """[size, size] 1-D Gaussian blur matrix, rows renormalised at the borders; sigma 0 = identity."""
    d = np.arange(size)[None, :] - np.arange(size)[:, None]
    s = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)
    g = jnp.where(np.abs(d) <= radius, jnp.exp(-0.5 * (d.astype(np.float32) / s) ** 2), 0.0)
    return g / jnp.sum(g, axis=1, keepdims=True)


def _blur(img: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur of a [S, S] image (sigma may be traced)."""
    b = _blur_matrix(sigma, img.shape[0], radius)
    return _mm(_mm(b, img), b.T)


def _smooth_noise(z: jax.Array, sigma: float) -> jax.Array:
    """Unit-variance white noise ``z`` smoothed with a Gaussian of the given sigma (pixels)."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    size = z.shape[0]
    d = np.arange(size)[None, :] - np.arange(size)[:, None]
    g = np.where(np.abs(d) <= radius, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
    g = g / g[size // 2].sum()  # interior rows: unit-variance output
    g = g / np.sqrt(np.sum(g[size // 2] ** 2))
    b = jnp.asarray(g, jnp.float32)
    return _mm(_mm(b, z), b.T)


class _Uniforms:
    """Hands out slices of one pre-drawn uniform vector (keeps the traced graph small)."""

    def __init__(self, u: jax.Array):
        self.u = u
        self.i = 0

    def __call__(self, lo: float = 0.0, hi: float = 1.0, n: int | None = None) -> jax.Array:
        """U(lo, hi): a scalar, or an [n] vector."""
        m = 1 if n is None else n
        v = self.u[self.i : self.i + m]
        self.i += m
        if self.i > self.u.shape[0]:
            raise ValueError("uniform stream exhausted")
        v = lo + (hi - lo) * v
        return v[0] if n is None else v


_NUM_UNIFORMS = 96


def _normal(u: jax.Array) -> jax.Array:
    """Standard normals from uniforms in [0, 1) (inverse CDF, as jax.random.normal does)."""
    lim = np.nextafter(np.float32(1.0), np.float32(0.0))
    return np.float32(np.sqrt(2.0)) * jax.scipy.special.erfinv(jnp.clip(2.0 * u - 1.0, -lim, lim))


def _draw_uniforms(key: jax.Array, size: int) -> jax.Array:
    """All randomness of one patch in a single call: parameters, texture noise, scanner noise."""
    return jax.random.uniform(key, (_NUM_UNIFORMS + 2 * size * size,), jnp.float32)


def _sample_params(u_all: jax.Array, label: jax.Array, size: int) -> dict[str, jax.Array]:
    """Latent generative parameters of one patch (pixel units at ``size``) from its uniforms."""
    s = size / 64.0
    c = (size - 1) / 2.0
    u = _Uniforms(u_all[: _NUM_UNIFORMS - 1])
    lab = jnp.asarray(label, jnp.int32)
    mal = lab == 1
    p = {}
    p["body_cx"] = c + u(-1.5, 1.5) * s
    p["body_cy"] = c + u(-1.5, 1.5) * s
    p["body_rx"] = u(0.38, 0.44) * size
    p["body_ry"] = u(0.30, 0.36) * size
    p["fat_w"] = u(2.0, 3.5) * s
    p["fat_hu"] = u(-120.0, -80.0)
    p["tissue_hu"] = u(30.0, 50.0)
    p["lung_rx"] = p["body_rx"] - u(5.0, 8.0) * s
    p["lung_ry"] = p["body_ry"] - u(5.0, 8.0) * s
    p["lung_hu"] = u(-870.0, -830.0)
    p["lung_tex"] = u(8.0, 22.0)
    # Vessels: uniform start inside 90% of the lung ellipse.
    nv = _NUM_VESSELS
    rr = jnp.sqrt(u(n=nv)) * 0.9
    th = u(0.0, 2 * np.pi, nv)
    p["ves_x0"] = p["body_cx"] + rr * jnp.cos(th) * p["lung_rx"]
    p["ves_y0"] = p["body_cy"] + rr * jnp.sin(th) * p["lung_ry"]
    vdir = u(0.0, 2 * np.pi, nv)
    vlen = u(0.0, 9.0, nv) * s
    vlen = jnp.where(vlen < 2.0 * s, 0.0, vlen)  # ~ 2/9 of the vessels are round blobs
    p["ves_x1"] = p["ves_x0"] + vlen * jnp.cos(vdir)
    p["ves_y1"] = p["ves_y0"] + vlen * jnp.sin(vdir)
    p["ves_w"] = u(0.5, 1.3, nv) * s
    # Nodule.
    p["nod_cx"] = c + u(-4.0, 4.0) * s
    p["nod_cy"] = c + u(-4.0, 4.0) * s
    med = jnp.where(mal, 7.0, 5.0)
    r0 = med * jnp.exp(0.28 * _normal(u_all[_NUM_UNIFORMS - 1]))
    p["nod_r0"] = jnp.clip(r0, 2.0, 12.0) * s
    p["lob_amp"] = u() * jnp.where(mal, 0.15, 0.10)
    p["lob_f"] = jnp.floor(u(2.0, 5.0))
    p["lob_phi"] = u(0.0, 2 * np.pi)
    spic = u() < jnp.where(mal, 0.70, 0.10)
    p["spic_amp"] = jnp.where(spic, u(0.25, 0.8), 0.0)
    p["spic_f"] = jnp.floor(u(5.0, 13.0, _NUM_SPIKES))
    p["spic_phi"] = u(0.0, 2 * np.pi, _NUM_SPIKES)
    p["edge"] = jnp.where(mal, u(0.35, 0.8), u(0.3, 0.7)) * s
    cdf = jnp.cumsum(jnp.asarray(_TYPE_PROBS), axis=1)[lab]
    p["nod_type"] = jnp.minimum(jnp.sum(u() >= cdf[:-1]), 3).astype(jnp.int32)
    p["solid_hu"] = u(-20.0, 60.0)
    p["ggo_hu"] = u(-600.0, -300.0)
    p["core_frac"] = u(0.35, 0.7)
    p["calc_frac"] = u(0.3, 0.9)
    p["calc_hu"] = u(250.0, 900.0)
    return p


def _draw(
    p: dict[str, jax.Array], white: jax.Array, size: int, contrast_hu: jax.Array
) -> jax.Array:
    """Render the clean HU image of one patch from its latent parameters and white noise."""
    s = size / 64.0
    yy, xx = jnp.meshgrid(
        jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32), indexing="ij"
    )

    def ellipse_mask(cx, cy, rx, ry, soft=0.6):
        d = jnp.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        return jax.nn.sigmoid((1.0 - d) * jnp.minimum(rx, ry) / (soft * s))

    bx, by = p["body_cx"], p["body_cy"]
    body = ellipse_mask(bx, by, p["body_rx"], p["body_ry"])
    inner = ellipse_mask(bx, by, p["body_rx"] - p["fat_w"], p["body_ry"] - p["fat_w"])
    lung = ellipse_mask(bx, by, p["lung_rx"], p["lung_ry"])

    img = jnp.full((size, size), -1000.0, jnp.float32)
    img = img + body * (p["fat_hu"] + 1000.0)
    img = img + inner * (p["tissue_hu"] + 0.25 * contrast_hu - p["fat_hu"])
    parench = p["lung_hu"] + p["lung_tex"] * _smooth_noise(white, 2.0 * s)
    img = img + lung * (parench - img)

    # Vessels: soft masks on the distance to each segment (unrolled: keeps XLA fused).
    best = jnp.full((size, size), -1e9, jnp.float32)
    for j in range(_NUM_VESSELS):
        x0, y0 = p["ves_x0"][j], p["ves_y0"][j]
        dx, dy = p["ves_x1"][j] - x0, p["ves_y1"][j] - y0
        inv = 1.0 / jnp.maximum(dx * dx + dy * dy, 1e-6)
        t = jnp.clip(((xx - x0) * dx + (yy - y0) * dy) * inv, 0.0, 1.0)
        d = jnp.sqrt((xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2)
        best = jnp.maximum(best, p["ves_w"][j] - d)
    ves = jax.nn.sigmoid(best / (0.35 * s))
    img = img + lung * ves * (40.0 + contrast_hu - img)

    # Nodule.
    dxn, dyn = xx - p["nod_cx"], yy - p["nod_cy"]
    dist = jnp.sqrt(dxn**2 + dyn**2)
    theta = jnp.arctan2(dyn, dxn)
    lob = p["lob_amp"] * jnp.cos(p["lob_f"] * theta + p["lob_phi"])
    spikes = sum(
        jnp.maximum(jnp.cos(p["spic_f"][j] * theta + p["spic_phi"][j]), 0.0) ** 8
        for j in range(_NUM_SPIKES)
    )
    r_theta = p["nod_r0"] * (1.0 + lob + p["spic_amp"] * spikes)
    t = p["nod_type"]
    edge = jnp.where(t == 2, 1.5, 1.0) * p["edge"]
    m = jax.nn.sigmoid((r_theta - dist) / edge)
    solid = p["solid_hu"] + 0.1 * contrast_hu
    base_hu = jnp.where((t == 1) | (t == 2), p["ggo_hu"], solid)
    inner_hu = jnp.select([t == 2, t == 3], [p["ggo_hu"], p["calc_hu"]], solid)
    frac = jnp.where(t == 3, p["calc_frac"], p["core_frac"])
    core = jax.nn.sigmoid((frac * r_theta - dist) / (0.5 * s))
    nod_hu = base_hu + core * (inner_hu - base_hu) + 10.0 * _smooth_noise(white, 1.0 * s)
    return img + m * (nod_hu - img)


def _render_one(key: jax.Array, label: jax.Array, profile: ScannerProfile, size: int) -> jax.Array:
    """Render one patch through a scanner profile (HU)."""
    u = _draw_uniforms(key, size)
    params = _sample_params(u, label, size)
    z = _normal(u[_NUM_UNIFORMS:]).reshape(2, size, size)
    clean = _draw(params, z[0], size, jnp.asarray(profile.contrast_hu, jnp.float32))
    img = _blur(clean, profile.blur_sigma, radius=max(4, round(7 * size / 64)))
    img = profile.hu_scale * img + profile.hu_shift
    return img + profile.noise_std * z[1]


def render_patches(
    key: jax.Array, labels: jax.Array, profile: ScannerProfile, size: int = 64
) -> jax.Array:
    """Render ``[n, size, size]`` float32 HU patches; image i uses ``fold_in(key, i)``."""
    n = np.shape(labels)[0]
    return jnp.asarray(_render_images(key, np.arange(n, dtype=np.int32), labels, profile, size))


def clean_patches(key: jax.Array, labels: jax.Array, size: int = 64) -> jax.Array:
    """Noise-free, unblurred, contrast-free HU patches with the same anatomy as render_patches."""
    neutral = ScannerProfile(
        hu_scale=1.0, hu_shift=0.0, noise_std=0.0, blur_sigma=0.0, contrast_hu=0.0
    )
    return render_patches(key, labels, neutral, size)


def latent_params(key: jax.Array, labels: jax.Array, size: int = 64) -> dict[str, jax.Array]:
    """Latent generative parameters of the patches render_patches(key, labels, .) draws."""
    n = np.shape(labels)[0]
    return _batched(_latent_core, size, _raw_key(key), np.arange(n, dtype=np.int32), labels)


# Rendering runs in fixed-size padded chunks so that only a couple of shapes are ever
# compiled; host-side preparation uses numpy (eager jnp ops would compile per shape).
_SMALL, _CHUNK = 64, 256


def _bucket(n: int) -> int:
    """Padded batch length: 64, or a multiple of 256."""
    return _SMALL if n <= _SMALL else -(-n // _CHUNK) * _CHUNK


def _raw_key(key: jax.Array) -> jax.Array:
    """Legacy uint32[..., 2] key data (typed keys are unwrapped)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def _render_images(
    keys: jax.Array, idx: np.ndarray, labels: jax.Array, profile: ScannerProfile, size: int
):
    """HU images; image j uses ``fold_in(keys[j], idx[j])`` (keys/profile broadcast over n)."""
    return _batched(_render_core, size, _raw_key(keys), idx, labels, *profile)


def _batched(core, size: int, keys, idx, labels, *prof):
    """Run a jitted per-image core over padded chunks; numpy on the host unless traced."""
    n = np.shape(labels)[0]
    xp = jnp if _traced(keys, idx, labels, prof) else np
    keys = xp.broadcast_to(xp.asarray(keys, dtype=np.uint32), (n, 2))
    cols = [xp.asarray(idx, dtype=np.int32), xp.asarray(labels, dtype=np.int32)]
    cols += [xp.broadcast_to(xp.asarray(f, dtype=np.float32), (n,)) for f in prof]
    if n == 0:
        return core(keys, *cols, size=size)
    total = _bucket(n)
    cols = [xp.concatenate([c, xp.repeat(c[:1], total - n, axis=0)]) for c in [keys, *cols]]
    step = min(total, _CHUNK)
    outs = [core(*(c[s : s + step] for c in cols), size=size) for s in range(0, total, step)]
    if xp is jnp:
        return jax.tree.map(lambda *a: jnp.concatenate(a)[:n], *outs)
    return jax.tree.map(lambda *a: np.concatenate([np.asarray(x) for x in a])[:n], *outs)


@functools.partial(jax.jit, static_argnames="size")
def _render_core(keys, idx, labels, *prof, size: int) -> jax.Array:
    def one(k, i, y, *p):
        return _render_one(jax.random.fold_in(k, i), y, ScannerProfile(*p), size)

    return jax.vmap(one)(keys, idx, labels, *prof)


@functools.partial(jax.jit, static_argnames="size")
def _latent_core(keys, idx, labels, size: int) -> dict[str, jax.Array]:
    def one(k, i, y):
        return _sample_params(_draw_uniforms(jax.random.fold_in(k, i), size), y, size)

    return jax.vmap(one)(keys, idx, labels)


@jax.jit
def _fold_in_many(key: jax.Array, ids: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def fold_in_range(key: jax.Array, n: int) -> np.ndarray:
    """``[fold_in(key, i) for i in range(n)]`` as host uint32 key data (few compilations)."""
    ids = np.arange(_bucket(n), dtype=np.int32)
    return np.asarray(_fold_in_many(_raw_key(key), ids))[:n]


@jax.jit
def _profile_noise(key: jax.Array, ids: jax.Array) -> jax.Array:
    """[len(ids), 5]: 4 standard normals and 1 uniform per hospital id."""

    def one(i):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        return jnp.concatenate([jax.random.normal(k1, (4,)), jax.random.uniform(k2, (1,))])

    return jax.vmap(one)(ids)


def hospital_profiles(
    key: jax.Array, num_hospitals: int, scanner_shift: float
) -> tuple[ScannerProfile, np.ndarray]:
    """Per-hospital scanner profiles: vendor round-robin + jitter, deviation scaled by shift."""
    vendor_ids = np.arange(num_hospitals) % len(VENDORS)
    base = np.asarray(VENDOR_PROFILES, np.float32)[vendor_ids]  # [N, 5]
    ref = np.asarray(REFERENCE_PROFILE, np.float32)
    ids = np.arange(_bucket(num_hospitals), dtype=np.int32)
    z = np.asarray(_profile_noise(_raw_key(key), ids))[:num_hospitals]
    vend = np.stack(
        [
            base[:, 0] + 0.01 * z[:, 0],
            base[:, 1] + 5.0 * z[:, 1],
            base[:, 2] * np.exp(0.15 * z[:, 2]),
            np.maximum(base[:, 3] + 0.1 * z[:, 3], 0.0),
            base[:, 4] * (0.8 + 0.4 * z[:, 4]),
        ],
        axis=1,
    ).astype(np.float32)
    prof = ref + np.float32(scanner_shift) * (vend - ref)
    lower = np.array([0.5, -np.inf, 0.0, 0.0, 0.0], np.float32)
    prof = np.maximum(prof, lower).astype(np.float32)
    fields = ScannerProfile(*(jnp.asarray(prof[:, j]) for j in range(prof.shape[1])))
    return fields, vendor_ids
