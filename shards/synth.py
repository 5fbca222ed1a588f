"""The synthetic mixture-of-modality world: content that carries meaning, in two domains.

Items have latent attributes (category, colour, pattern, style). A text item's title names them
("vintage red striped mug by Norvak"); an image item is a small picture that shows them: the
category is the shape, the colour its fill, the pattern a texture inside it, the style the
background. Users have tastes over the attributes and produce time-ordered sequences: the next item
is drawn from a softmax over taste, popularity (Zipf-like skew) and the attributes shared with the
last few items, with slow taste drift; no item is consumed twice.

A *source* and a *target* domain share the attribute semantics and vocabulary but have disjoint
item and user ids (prefixes ``s-``/``t-``), different title templates and different drawing details
(shape scale, offset, outline), so a content-based model transfers and an ID-based one cannot.
Everything is deterministic for a seed; the domain name enters the random stream too.

**How much content tells** (``content_signal`` F, default 1). Real titles say only part of what
drives co-consumption. At F < 1 each attribute an item shows is its true one with probability F and
a random one otherwise, and every item gets an idiosyncratic appeal (``1 - F`` standard deviations)
that no content shows; tastes, recency and popularity follow the true attributes. At F = 0 content
is noise for the task, and only an item's identity (an ID, or a title memorised as one) carries
what users follow. F = 1 is the same world, byte for byte, as a world made without the knob.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from transrec.shards.format import DatasetWriter

CATEGORIES = ("shirt", "shoe", "bag", "hat", "lamp", "mug", "book", "chair")
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
COLOURS = {
    "red": (205, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
    "purple": (140, 50, 170), "orange": (240, 130, 30), "black": (30, 30, 30), "white": (235, 235, 235),
}
PATTERNS = ("plain", "striped", "dotted", "checked")
STYLES = {"classic": (222, 205, 170), "modern": (150, 160, 175), "sporty": (120, 200, 200),
          "vintage": (150, 110, 80)}
ATTRIBUTES = ("category", "colour", "pattern", "style")
SIZES = (len(CATEGORIES), len(COLOURS), len(PATTERNS), len(STYLES))

_BRAND_A = ("nor", "vel", "kai", "lum", "dor", "zen", "mar", "tri", "sol", "bex", "quo", "fen")
_BRAND_B = ("vak", "ora", "ix", "den", "ton", "ly", "mo", "rix", "gard", "sen", "tal", "po")

TEMPLATES = {
    "source": ("{style} {colour} {pattern} {category}",
               "{colour} {pattern} {category} , {style}",
               "{style} {category} in {colour} , {pattern}"),
    "target": ("{category} : {colour} , {pattern} , {style} look",
               "{pattern} {colour} {category} for {style} fans",
               "{colour} {category} with {pattern} finish ( {style} )"),
}

# Per-domain defaults: the source is large, the target scarce so that pretraining pays off.
DOMAIN_DEFAULTS = {
    "source": dict(n_users=2000, n_items=800, min_len=5, max_len=20),
    "target": dict(n_users=400, n_items=300, min_len=5, max_len=15),
}
_DOMAIN_CODE = {"source": 1, "target": 2}


def _brand(rng: np.random.Generator) -> str:
    return (_BRAND_A[rng.integers(len(_BRAND_A))] + _BRAND_B[rng.integers(len(_BRAND_B))]).capitalize()


def make_title(attrs: np.ndarray, domain: str, rng: np.random.Generator) -> str:
    """A title naming the item's attributes (template and brand noise per domain)."""
    cat, col, pat, sty = (int(a) for a in attrs)
    words = dict(category=CATEGORIES[cat], colour=list(COLOURS)[col], pattern=PATTERNS[pat],
                 style=list(STYLES)[sty])
    templates = TEMPLATES[domain]
    title = templates[rng.integers(len(templates))].format(**words)
    if rng.random() < 0.6:
        title += f" by {_brand(rng)}"
    return title


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    def ring(n: int, rad: np.ndarray, phase: float) -> list[tuple[float, float]]:
        ang = phase + 2 * np.pi * np.arange(n) / n
        return [(cx + float(q) * np.cos(a), cy + float(q) * np.sin(a)) for a, q in zip(ang, rad)]
    if shape == "square":
        return ring(4, np.full(4, r * 1.2), np.pi / 4)
    if shape == "diamond":
        return ring(4, np.full(4, r * 1.1), 0.0)
    if shape == "triangle":
        return ring(3, np.full(3, r * 1.2), -np.pi / 2)
    if shape == "hexagon":
        return ring(6, np.full(6, r), 0.0)
    if shape == "star":
        return ring(10, np.tile([r * 1.15, r * 0.5], 5), -np.pi / 2)
    if shape == "cross":
        w = r * 0.38
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    return None  # circle / ring are ellipses


def render_image(attrs: np.ndarray, domain: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Draw an item: shape = category, fill = colour, texture = pattern, background = style."""
    cat, col, pat, sty = (int(a) for a in attrs)
    s = 4 * size  # draw supersampled, then downscale (anti-aliasing)

    def jitter(rgb, amount):
        return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)

    bg = jitter(list(STYLES.values())[sty], 18)
    fill = jitter(list(COLOURS.values())[col], 22)
    dark = tuple(int(c * 0.45) for c in fill) if sum(fill) > 200 else tuple(min(255, c + 150) for c in fill)
    img = Image.new("RGB", (s, s), bg)
    if domain == "target":  # drawing details differ: smaller, offset shapes with an outline
        r = s * rng.uniform(0.26, 0.34)
        cx, cy = s / 2 + rng.uniform(-0.08, 0.08) * s, s / 2 + rng.uniform(-0.08, 0.08) * s
    else:
        r = s * rng.uniform(0.33, 0.4)
        cx, cy = s / 2, s / 2
    mask = Image.new("L", (s, s), 0)
    md = ImageDraw.Draw(mask)
    shape = SHAPES[cat]
    poly = _shape_polygon(shape, cx, cy, r)
    if poly is not None:
        md.polygon(poly, fill=255)
    else:
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            md.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=0)
    tex = Image.new("RGB", (s, s), fill)
    td = ImageDraw.Draw(tex)
    step = s // 8
    off = int(rng.integers(step))
    if PATTERNS[pat] == "striped":
        for x in range(-s, 2 * s, step):
            td.line([(x + off, 0), (x + off + s, s)], fill=dark, width=max(1, step // 3))
    elif PATTERNS[pat] == "dotted":
        for y in range(off % step, s, step):
            for x in range(off % step, s, step):
                td.ellipse([x, y, x + step // 2.5, y + step // 2.5], fill=dark)
    elif PATTERNS[pat] == "checked":
        for y in range(0, s, step):
            for x in range(0, s, step):
                if ((x + y) // step) % 2 == 0:
                    td.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    img.paste(tex, (0, 0), mask)
    if domain == "target":
        ImageDraw.Draw(img).polygon(poly, outline=(20, 20, 20), width=s // 32) if poly else \
            ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], outline=(20, 20, 20), width=s // 32)
    return img.resize((size, size), Image.BILINEAR)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def check_content_signal(content_signal: float) -> float:
    f = float(content_signal)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"content_signal must be in [0, 1], got {content_signal}")
    return f


def item_appeal(n_items: int, seed: int, domain: str, content_signal: float) -> np.ndarray:
    """Each item's idiosyncratic appeal, a term of every user's logits that no content shows:
    ``(1 - content_signal)`` standard normal draws (zero at 1: the world whose content tells all).
    Its own random stream, so the rest of the world does not move with the knob."""
    f = check_content_signal(content_signal)
    rng = np.random.default_rng([int(seed), _DOMAIN_CODE[domain], 2])
    return ((1.0 - f) * rng.standard_normal(n_items)).astype(np.float64)


def shown_attributes(attrs: np.ndarray, seed: int, domain: str, content_signal: float) -> np.ndarray:
    """The attributes an item's title or picture shows: each (item, attribute) is its true value with
    probability ``content_signal``, else a value drawn at random, independent of the true one. At 1
    content shows the attributes that drive tastes; at 0 it is noise for the task."""
    f = check_content_signal(content_signal)
    if f == 1.0:
        return attrs
    rng = np.random.default_rng([int(seed), _DOMAIN_CODE[domain], 3])
    noise = np.stack([rng.integers(k, size=attrs.shape[0]) for k in SIZES], axis=1)
    keep = rng.random(attrs.shape) < f
    return np.where(keep, attrs, noise)


def generate_world(*, domain: str, n_users: int, n_items: int, seed: int, min_len: int, max_len: int,
                   popularity: float = 0.5, taste_concentration: float = 0.35, recency: float = 2.5,
                   drift: float = 0.08, temperature: float = 1.0, content_signal: float = 1.0,
                   chunk_cells: int = 1 << 22):
    """The latent world: item attributes [n_items, 4], item log popularity, and user sequences (lists
    of item indices). Deterministic for (seed, domain).

    Every user steps through time together with a block of others (vectorised): at each step the
    next item is drawn (Gumbel-max, no repeats) from a softmax over
    ``sum_a w_a log taste_a[attr_a(item)] + log popularity + appeal(item) + recency * shared(item,
    recent items)``, where ``shared`` counts attributes in common with the last three items (weights
    1, .6, .36) and ``appeal`` is :func:`item_appeal` (zero at ``content_signal`` 1); with
    probability ``drift`` per step a user's taste for one attribute moves.
    """
    rng = np.random.default_rng([int(seed), _DOMAIN_CODE[domain], 0])
    attrs = np.stack([rng.integers(k, size=n_items) for k in SIZES], axis=1)
    pop_rank = rng.permutation(n_items) + 1
    log_pop = -popularity * np.log(pop_rank)
    prior = log_pop + item_appeal(n_items, seed, domain, content_signal)
    weights = np.array([1.6, 1.3, 0.6, 0.5])  # how much each attribute matters to taste
    offsets = np.concatenate([[0], np.cumsum(SIZES)[:-1]])
    onehot = np.zeros((n_items, sum(SIZES)), dtype=np.float32)  # all attributes one-hot, side by side
    onehot[np.arange(n_items)[:, None], attrs + offsets] = 1.0
    onehot_t = np.ascontiguousarray(onehot.T)
    lengths = np.minimum(rng.integers(min_len, max_len + 1, size=n_users), n_items)
    lag_w = (np.array([1.0, 0.6, 0.36]) * recency / 2 / temperature).astype(np.float32)
    taste_w = np.repeat(weights, SIZES)
    sequences: list[list[int]] = []
    block = max(1, chunk_cells // n_items)
    for lo in range(0, n_users, block):
        u = min(block, n_users - lo)
        tastes = np.concatenate([rng.dirichlet(np.full(k, taste_concentration), size=u) for k in SIZES], 1)

        def base(t):
            return (((np.log(t + 1e-3) * taste_w) @ onehot_t + prior) / temperature).astype(np.float32)

        logits = base(tastes)
        used = np.zeros((u, n_items), dtype=bool)
        steps = int(lengths[lo:lo + u].max())
        picks = np.zeros((u, steps), dtype=np.int64)
        rows = np.arange(u)
        z = np.empty((u, n_items), dtype=np.float32)
        g = np.empty((u, n_items), dtype=np.float32)
        for s in range(steps):
            recent = np.zeros((u, onehot.shape[1]), dtype=np.float32)
            for lag in range(min(3, s)):
                recent += lag_w[lag] * onehot[picks[:, s - 1 - lag]]
            np.matmul(recent, onehot_t, out=z)
            z += logits
            np.copyto(z, -np.inf, where=used)
            # Gumbel-max: z + Gumbel noise, with Gumbel = -log(-log U)
            rng.random(out=g, dtype=np.float32)
            np.maximum(g, np.float32(1e-12), out=g)
            np.log(g, out=g)
            np.negative(g, out=g)
            np.log(g, out=g)
            z -= g
            j = z.argmax(axis=1)
            picks[:, s] = j
            used[rows, j] = True
            moved = np.flatnonzero(rng.random(u) < drift)
            if moved.size:  # taste drift: part of one attribute's taste moves
                a = rng.integers(len(SIZES), size=moved.size)
                for m, att in zip(moved, a):
                    sl = slice(offsets[att], offsets[att] + SIZES[att])
                    tastes[m, sl] = 0.6 * tastes[m, sl] + 0.4 * rng.dirichlet(np.full(SIZES[att],
                                                                                       taste_concentration))
                logits[moved] = base(tastes[moved])
        sequences.extend(picks[i, :lengths[lo + i]].tolist() for i in range(u))
    return attrs, log_pop, sequences


def synthesize(out_dir: str | Path, *, domain: str = "source", n_users: int | None = None,
               n_items: int | None = None, image_frac: float = 0.5, seed: int = 0, image_size: int = 32,
               min_len: int | None = None, max_len: int | None = None, popularity: float = 0.5,
               taste_concentration: float = 0.35, recency: float = 2.5, drift: float = 0.08,
               temperature: float = 1.0, content_signal: float = 1.0, shard_size: int | None = None,
               seq_shard_size: int | None = None, progress: bool = False) -> Path:
    """Write a synthetic dataset folder for ``domain`` ("source" or "target") and return its path.

    Sizes default to ``DOMAIN_DEFAULTS[domain]``; ``image_frac`` is the share of image items.
    ``content_signal`` (0 to 1) is how much of what drives tastes an item's content shows
    (:func:`shown_attributes`, :func:`item_appeal`); 1 is a world whose titles and pictures show it
    all, 0 one where content is noise for the task and only an item's identity carries it.
    Item ids are ``s-i000123`` / ``t-i000123`` and user ids ``s-u000123`` / ``t-u000123``.
    """
    if domain not in DOMAIN_DEFAULTS:
        raise ValueError(f"domain must be one of {sorted(DOMAIN_DEFAULTS)}, got {domain!r}")
    d = DOMAIN_DEFAULTS[domain]
    n_users = int(n_users if n_users is not None else d["n_users"])
    n_items = int(n_items if n_items is not None else d["n_items"])
    min_len = int(min_len if min_len is not None else d["min_len"])
    max_len = int(max_len if max_len is not None else d["max_len"])
    if n_users < 1 or n_items < 2 or not 1 <= min_len <= max_len:
        raise ValueError("need n_users >= 1, n_items >= 2 and 1 <= min_len <= max_len")
    if not 0.0 <= image_frac <= 1.0:
        raise ValueError("image_frac must be in [0, 1]")
    if image_size < 32:
        raise ValueError("image_size must be at least 32")
    attrs, log_pop, sequences = generate_world(
        domain=domain, n_users=n_users, n_items=n_items, seed=seed, min_len=min_len, max_len=max_len,
        popularity=popularity, taste_concentration=taste_concentration, recency=recency, drift=drift,
        temperature=temperature, content_signal=content_signal)
    shown = shown_attributes(attrs, seed, domain, content_signal)
    rng = np.random.default_rng([int(seed), _DOMAIN_CODE[domain], 1])
    is_image = rng.random(n_items) < image_frac
    p = domain[0]
    params = dict(domain=domain, n_users=n_users, n_items=n_items, image_frac=image_frac, seed=seed,
                  image_size=image_size, min_len=min_len, max_len=max_len, popularity=popularity,
                  taste_concentration=taste_concentration, recency=recency, drift=drift,
                  temperature=temperature)
    if content_signal != 1.0:  # a world of today's kind keeps today's manifest
        params["content_signal"] = float(content_signal)
    writer = DatasetWriter(out_dir, shard_size=shard_size or max(64, -(-n_items // 4)),
                           seq_shard_size=seq_shard_size or max(16, -(-n_users // 8)),
                           name=f"synthetic-{domain}", domain=domain, extra={"synthetic": params})
    names = [CATEGORIES, list(COLOURS), PATTERNS, list(STYLES)]
    items = range(n_items)
    if progress:
        items = tqdm(items, desc=f"synth {domain} items", unit="item")
    for i in items:
        meta = {a: names[k][int(shown[i, k])] for k, a in enumerate(ATTRIBUTES)}  # what the catalogue says
        meta["log_popularity"] = round(float(log_pop[i]), 4)
        if is_image[i]:
            writer.add_item(f"{p}-i{i:06d}", image=_png(render_image(shown[i], domain, rng, image_size)),
                            image_ext="png", meta=meta)
        else:
            writer.add_item(f"{p}-i{i:06d}", title=make_title(shown[i], domain, rng), meta=meta)
    for u, seq in enumerate(sequences):
        writer.add_sequence(f"{p}-u{u:06d}", [f"{p}-i{j:06d}" for j in seq])
    return writer.close()
