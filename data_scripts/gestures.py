"""Synthetic hand-gesture clips modelled on the Jester classes.

An object (varied shape, colour and texture) moves over a cluttered, noisy background. The pairs
swipe left/right, swipe up/down, zoom in/out and rotate clockwise/counter-clockwise are exact
time-reverses of each other (:func:`render` of one is the other's frames reversed), so a model that
ignores frame order cannot tell them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data_scripts.clips import article, distinct, noisy_frame

CLASSES = [
    "swipe_left",
    "swipe_right",
    "swipe_up",
    "swipe_down",
    "zoom_in",
    "zoom_out",
    "rotate_clockwise",
    "rotate_counterclockwise",
    "shake",
    "no_gesture",
]
# Each class on the left is rendered as the time-reverse of the class on the right.
REVERSE_OF = {
    "swipe_left": "swipe_right",
    "swipe_up": "swipe_down",
    "zoom_out": "zoom_in",
    "rotate_counterclockwise": "rotate_clockwise",
}
SIZES = [(128, 96), (144, 112), (160, 120), (176, 132), (192, 144)]
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
TEXTURES = ["solid", "stripes", "checker"]


@dataclass(frozen=True)
class Params:
    """Everything that varies between clips, drawn by :func:`sample_params`."""

    width: int
    height: int
    fps: int
    frames: int
    shape: str
    texture: str
    colour: tuple[int, int, int]
    radius: float  # object size, pixels
    start: tuple[float, float]  # start position as a fraction of the frame
    extent: float  # how far the motion goes, as a fraction of the frame
    motion_from: float  # the motion happens between these fractions of the clip
    motion_to: float
    shake_hz: float
    noise: float  # std of per-frame Gaussian noise, grey levels
    seed: int  # background clutter and noise


def sample_params(rng: np.random.Generator) -> Params:
    width, height = SIZES[rng.integers(len(SIZES))]
    fps = int(rng.choice([25, 30]))
    span = float(rng.uniform(0.55, 0.9))  # slower gestures take more of the clip
    begin = float(rng.uniform(0.0, 1.0 - span))
    return Params(
        width=width,
        height=height,
        fps=fps,
        frames=int(round(rng.uniform(1.5, 3.0) * fps)),
        shape=SHAPES[rng.integers(len(SHAPES))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
        colour=tuple(int(c) for c in rng.integers(90, 256, 3)),
        radius=float(rng.uniform(0.09, 0.16) * height),
        start=(float(rng.uniform(0.2, 0.35)), float(rng.uniform(0.25, 0.75))),
        extent=float(rng.uniform(0.35, 0.55)),
        motion_from=begin,
        motion_to=begin + span,
        shake_hz=float(rng.uniform(2.5, 4.5)),
        noise=float(rng.uniform(0.0, 8.0)),
        seed=int(rng.integers(2**31)),
    )


def _sprite(p: Params, radius: float) -> Image.Image:
    """The object as an RGBA image of side 2 * radius, with its texture."""
    side = max(4, int(round(2 * radius)))
    canvas = np.zeros((side, side, 3), np.uint8)
    canvas[:] = p.colour
    yy, xx = np.mgrid[0:side, 0:side]
    period = max(2, side // 4)
    dark = np.array(p.colour) // 3
    if p.texture == "stripes":
        canvas[(xx // period) % 2 == 1] = dark
    elif p.texture == "checker":
        canvas[((xx // period) + (yy // period)) % 2 == 1] = dark
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    s = side - 1
    if p.shape == "circle":
        draw.ellipse([0, 0, s, s], fill=255)
    elif p.shape == "square":
        draw.rectangle([s * 0.1, s * 0.1, s * 0.9, s * 0.9], fill=255)
    elif p.shape == "triangle":
        draw.polygon([(s / 2, 0), (s, s), (0, s)], fill=255)
    elif p.shape == "diamond":
        draw.polygon([(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)], fill=255)
    else:  # cross
        draw.rectangle([s * 0.35, 0, s * 0.65, s], fill=255)
        draw.rectangle([0, s * 0.35, s, s * 0.65], fill=255)
    sprite = Image.fromarray(canvas).convert("RGBA")
    sprite.putalpha(mask)
    return sprite


def _background(p: Params, rng: np.random.Generator) -> Image.Image:
    base = tuple(int(c) for c in rng.integers(0, 120, 3))
    image = Image.new("RGB", (p.width, p.height), base)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):  # static clutter
        x0, y0 = rng.uniform(0, p.width), rng.uniform(0, p.height)
        w, h = rng.uniform(5, p.width / 3), rng.uniform(5, p.height / 3)
        fill = tuple(int(c) for c in rng.integers(0, 160, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x0 + w, y0 + h], fill=fill)
    return image


def _trajectory(name: str, p: Params) -> list[tuple[float, float, float, float]]:
    """Per frame: centre x, centre y (pixels), scale factor and rotation (degrees, clockwise)."""
    out = []
    x0, y0 = p.start[0] * p.width, p.start[1] * p.height
    for i in range(p.frames):
        t = i / max(1, p.frames - 1)
        u = min(1.0, max(0.0, (t - p.motion_from) / (p.motion_to - p.motion_from)))
        u = 0.5 - 0.5 * math.cos(math.pi * u)  # ease in and out
        x, y, scale, angle = x0, y0, 1.0, 0.0
        if name == "swipe_right":
            x = x0 + u * p.extent * p.width
        elif name == "swipe_down":
            x, y = p.width / 2 + (p.start[1] - 0.5) * p.width * 0.5, (0.2 + u * p.extent * 1.2) * p.height
        elif name == "zoom_in":
            x, y, scale = p.width / 2, p.height / 2, 0.6 + 1.6 * u
        elif name == "rotate_clockwise":  # an orbit; with y pointing down, a growing angle turns clockwise
            r = 0.28 * p.height
            phi = -math.pi / 2 + u * 1.5 * math.pi
            x, y, angle = (
                p.width / 2 + r * math.cos(phi),
                p.height / 2 + r * math.sin(phi),
                math.degrees(u * 1.5 * math.pi),
            )
        elif name == "shake":
            x = p.width / 2 + 0.12 * p.width * math.sin(2 * math.pi * p.shake_hz * i / p.fps) * (
                1.0 if 0 < u < 1 else 0.0
            )
            y = p.height / 2
        elif name == "no_gesture":
            x, y = p.width * (0.3 + 0.4 * p.start[0]), y0
        else:
            raise ValueError(f"not a forward gesture class: {name!r}")
        out.append((x, y, scale, angle))
    return out


def render(name: str, p: Params) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of gesture ``name`` with parameters ``p``."""
    if name in REVERSE_OF:
        return render(REVERSE_OF[name], p)[::-1].copy()
    rng = np.random.default_rng(p.seed)
    background = _background(p, rng)
    base_sprite = _sprite(p, p.radius)
    frames = np.empty((p.frames, p.height, p.width, 3), np.uint8)
    for i, (x, y, scale, angle) in enumerate(_trajectory(name, p)):
        sprite = base_sprite
        if scale != 1.0:
            side = max(4, int(round(base_sprite.width * scale)))
            sprite = sprite.resize((side, side), Image.BILINEAR)
        if angle:
            sprite = sprite.rotate(-angle, resample=Image.BILINEAR, expand=True)
        image = background.copy()
        image.paste(sprite, (int(round(x - sprite.width / 2)), int(round(y - sprite.height / 2))), sprite)
        frames[i] = noisy_frame(image, p.noise, rng)
    return frames


# Captions: what the renderer knows it drew, in varied words. Every phrase of a class names its
# motion and direction with one of the class's MOTION_WORDS and no other class's.
MOTIONS = {
    "swipe_left": [
        "moves to the left",
        "slides left",
        "swipes to the left",
        "travels left",
        "glides to the left",
    ],
    "swipe_right": [
        "moves to the right",
        "slides right",
        "swipes to the right",
        "travels right",
        "glides to the right",
    ],
    "swipe_up": ["moves up", "rises upwards", "swipes up", "slides up", "travels upwards"],
    "swipe_down": ["moves down", "drops downwards", "swipes down", "slides down", "travels downwards"],
    "zoom_in": [
        "grows larger",
        "grows toward the camera",
        "zooms in and grows",
        "grows bigger",
        "approaches and grows",
    ],
    "zoom_out": [
        "shrinks",
        "shrinks away from the camera",
        "zooms out and shrinks",
        "shrinks smaller",
        "recedes and shrinks",
    ],
    "rotate_clockwise": ["circles clockwise", "turns clockwise", "orbits clockwise", "goes round clockwise"],
    "rotate_counterclockwise": [
        "circles counterclockwise",
        "turns anticlockwise",
        "orbits counterclockwise",
        "goes round anticlockwise",
    ],
    "shake": [
        "shakes from side to side",
        "shakes back and forth",
        "wobbles from side to side",
        "shakes to and fro",
    ],
    "no_gesture": ["stays still", "remains still", "sits motionless", "stays motionless", "does not move"],
}
MOTION_WORDS = {
    "swipe_left": ["left"],
    "swipe_right": ["right"],
    "swipe_up": ["up", "upwards"],
    "swipe_down": ["down", "downwards"],
    "zoom_in": ["grows"],
    "zoom_out": ["shrinks"],
    "rotate_clockwise": ["clockwise"],
    "rotate_counterclockwise": ["counterclockwise", "anticlockwise"],
    "shake": ["shakes", "wobbles"],
    "no_gesture": ["still", "motionless", "does not move"],
}
SHAPE_WORDS = {
    "circle": ["circle", "disc"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "diamond": ["diamond"],
    "cross": ["cross", "plus sign"],
}
TEXTURE_WORDS = {"solid": ["plain", ""], "stripes": ["striped"], "checker": ["checkered"]}


def colour_name(rgb: tuple[int, int, int]) -> str:
    """The everyday name of a colour, by hue (grey or white when unsaturated)."""
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    if s < 0.25:
        return "white" if v > 0.85 else "grey"
    hue = h * 360
    for limit, name in (
        (15, "red"),
        (45, "orange"),
        (70, "yellow"),
        (160, "green"),
        (200, "cyan"),
        (260, "blue"),
        (300, "purple"),
        (345, "pink"),
    ):
        if hue < limit:
            return name
    return "red"


def captions(name: str, p: Params, rng: np.random.Generator, count: int = 12) -> list[str]:
    """``count`` different descriptions of the clip ``render(name, p)`` draws: the object's size, colour,
    texture and shape, its motion and direction, and how fast it moves."""
    size = "small" if p.radius < 0.11 * p.height else "large" if p.radius > 0.14 * p.height else ""
    seconds = (p.motion_to - p.motion_from) * p.frames / p.fps
    speed = (
        ""
        if name in ("no_gesture", "shake")
        else "quickly"
        if seconds < 1.3
        else "slowly"
        if seconds > 2.0
        else ""
    )
    colour = colour_name(p.colour)

    def draw() -> str:
        keep = rng.random(4) < [0.5, 0.8, 0.5, 0.8]  # size, colour, texture, speed
        shape = SHAPE_WORDS[p.shape][rng.integers(len(SHAPE_WORDS[p.shape]))]
        texture = TEXTURE_WORDS[p.texture][rng.integers(len(TEXTURE_WORDS[p.texture]))]
        motion = MOTIONS[name][rng.integers(len(MOTIONS[name]))]
        words = [
            size if keep[0] else "",
            colour if keep[1] else "",
            texture if keep[2] else "",
            shape,
            motion,
            speed if keep[3] else "",
        ]
        return article(" ".join(w for w in words if w), definite=rng.random() >= 0.7)

    return distinct(draw, count)
