"""Synthetic human actions: the six KTH classes performed by an articulated stick figure.

The figure is drawn in profile (facing left or right) with varied scale, position, limb proportions,
colours and background. Walking, jogging and running share one gait model and differ by tempo
(steps per second), stride (leg swing and knee flexion) and ground speed, not by appearance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data_scripts.clips import article, distinct, noisy_frame

CLASSES = ["walking", "jogging", "running", "boxing", "handwaving", "handclapping"]
SIZES = [(160, 120), (176, 132), (192, 144)]
# Gait: (cycles per second, thigh swing degrees, knee flexion degrees, speed in body heights per second,
# vertical bounce as a fraction of the body height).
GAITS = {
    "walking": (0.9, 22.0, 20.0, 0.45, 0.01),
    "jogging": (1.35, 32.0, 55.0, 0.8, 0.03),
    "running": (1.8, 42.0, 85.0, 1.2, 0.05),
}


@dataclass(frozen=True)
class Params:
    width: int
    height: int
    fps: int
    frames: int
    body: float  # figure height, pixels
    facing: int  # +1 right, -1 left
    x: float  # centre of the path, fraction of the width
    ground: float  # feet level, fraction of the height
    legs: float  # limb proportions (multipliers)
    arms: float
    tempo: float  # multiplies the class's cycles per second
    phase: float
    colour: tuple[int, int, int]
    background: tuple[int, int, int]
    noise: float
    seed: int


def sample_params(rng: np.random.Generator) -> Params:
    width, height = SIZES[rng.integers(len(SIZES))]
    fps = 25
    background = tuple(int(c) for c in rng.integers(60, 200, 3))
    colour = tuple(int((c + 128) % 256) for c in background)  # contrasting figure
    return Params(
        width=width,
        height=height,
        fps=fps,
        frames=int(round(rng.uniform(1.6, 2.4) * fps)),
        body=float(rng.uniform(0.55, 0.75) * height),
        facing=int(rng.choice([-1, 1])),
        x=float(rng.uniform(0.4, 0.6)),
        ground=float(rng.uniform(0.8, 0.92)),
        legs=float(rng.uniform(0.85, 1.15)),
        arms=float(rng.uniform(0.85, 1.15)),
        tempo=float(rng.uniform(0.9, 1.1)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        colour=colour,
        background=background,
        noise=float(rng.uniform(0, 6)),
        seed=int(rng.integers(2**31)),
    )


def _limb(origin, angle_deg, length, facing):
    """End point of a limb of ``length`` from ``origin``; angle from straight down, positive = forward."""
    a = math.radians(angle_deg)
    return origin[0] + facing * length * math.sin(a), origin[1] + length * math.cos(a)


def _pose(name: str, p: Params, t: float):
    """Joint positions at time ``t`` seconds: a list of line segments and the head centre."""
    unit = p.body / 7.0  # the body is about 7 head heights
    thigh, shin = 1.7 * unit * p.legs, 1.6 * unit * p.legs
    torso, upper, fore = 2.6 * unit, 1.3 * unit * p.arms, 1.2 * unit * p.arms
    leg_len = thigh + shin
    lean, bounce = 0.0, 0.0
    if name in GAITS:
        hz, swing, knee, speed, bob = GAITS[name]
        phi = 2 * math.pi * hz * p.tempo * t + p.phase
        # Ground speed follows stride: path centred on p.x, crossing it at mid-clip.
        mid = p.frames / p.fps / 2
        hip_x = p.x * p.width + p.facing * speed * p.body * (t - mid)
        bounce = bob * p.body * abs(math.sin(phi))
        lean = {"walking": 2.0, "jogging": 6.0, "running": 12.0}[name]
        legs = [
            (
                swing * math.sin(phi + k * math.pi),
                knee * max(0.0, math.sin(phi + k * math.pi + math.pi / 2)) + 5,
            )
            for k in (0, 1)
        ]
        arm_bend = {"walking": 10.0, "jogging": 80.0, "running": 95.0}[name]
        arms = [(-0.8 * swing * math.sin(phi + k * math.pi), arm_bend) for k in (0, 1)]
    else:
        hip_x = p.x * p.width
        legs = [(8.0, 5.0), (-6.0, 5.0)]
        w = 2 * math.pi * (1.8 * p.tempo) * t + p.phase
        if name == "boxing":  # alternate straight punches forward
            arms = []
            for k in (0, 1):
                reach = max(0.0, math.sin(w + k * math.pi))
                arms.append((60 + 30 * reach, 110 * (1 - reach) + 5))
        elif name == "handwaving":  # both arms raised, forearms swinging overhead
            arms = [(160.0, 20 + 35 * math.sin(w + k * 0.4)) for k in (0, 1)]
        elif name == "handclapping":  # both forearms open and close together in front of the chest
            arms = [(35.0, 60 + 45 * math.sin(w)) for _ in (0, 1)]
        else:
            raise ValueError(f"unknown action {name!r}")
    hip = (hip_x, p.ground * p.height - leg_len - bounce)
    neck = _limb(hip, 180 - lean, torso, p.facing)
    segments = [(hip, neck)]
    for thigh_a, knee_a in legs:
        knee_p = _limb(hip, thigh_a, thigh, p.facing)
        segments += [(hip, knee_p), (knee_p, _limb(knee_p, thigh_a - knee_a, shin, p.facing))]
    for upper_a, elbow_a in arms:
        elbow = _limb(neck, upper_a, upper, p.facing)
        segments += [(neck, elbow), (elbow, _limb(elbow, upper_a + elbow_a, fore, p.facing))]
    head = _limb(neck, 180 - lean, 0.6 * unit, p.facing)
    return segments, head, 0.5 * unit


def render(name: str, p: Params) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of action ``name`` with parameters ``p``."""
    rng = np.random.default_rng(p.seed)
    background = Image.new("RGB", (p.width, p.height), p.background)
    draw = ImageDraw.Draw(background)
    shade = tuple(max(0, c - 40) for c in p.background)
    draw.rectangle([0, int(p.ground * p.height), p.width, p.height], fill=shade)  # floor
    for _ in range(int(rng.integers(1, 4))):  # static props
        x0, h = rng.uniform(0, p.width), rng.uniform(0.1, 0.4) * p.height
        draw.rectangle(
            [x0, p.ground * p.height - h, x0 + rng.uniform(4, 20), p.ground * p.height], fill=shade
        )
    width = max(3, int(round(p.body / 10)))  # limbs as thick as a person's, not hairlines
    frames = np.empty((p.frames, p.height, p.width, 3), np.uint8)
    for i in range(p.frames):
        image = background.copy()
        draw = ImageDraw.Draw(image)
        segments, head, radius = _pose(name, p, i / p.fps)
        for a, b in segments:
            draw.line([a, b], fill=p.colour, width=width)
        draw.ellipse([head[0] - radius, head[1] - radius, head[0] + radius, head[1] + radius], fill=p.colour)
        frames[i] = noisy_frame(image, p.noise, rng)
    return frames


# Captions: the action, the way the figure faces (and walks), and its tempo, in varied words.
ACTION_PHRASES = {
    "walking": ["walks", "is walking", "strolls"],
    "jogging": ["jogs", "is jogging", "jogs along"],
    "running": ["runs", "is running", "sprints"],
    "boxing": ["boxes", "throws punches", "is boxing"],
    "handwaving": ["waves both arms", "waves overhead", "is waving"],
    "handclapping": ["claps", "claps hands", "is clapping"],
}
MOTION_WORDS = {
    "walking": ["walks", "walking", "strolls"],
    "jogging": ["jogs", "jogging"],
    "running": ["runs", "running", "sprints"],
    "boxing": ["boxes", "boxing", "punches"],
    "handwaving": ["waves", "waving"],
    "handclapping": ["claps", "clapping"],
}
SUBJECTS = ["person", "figure", "stick figure", "someone"]


def captions(name: str, p: Params, rng: np.random.Generator, count: int = 12) -> list[str]:
    """``count`` different descriptions of the clip ``render(name, p)`` draws: who, the action, the
    direction the figure faces or moves, and its tempo."""
    side = "right" if p.facing > 0 else "left"
    tempo = "slowly" if p.tempo < 0.95 else "briskly" if p.tempo > 1.05 else ""

    def draw() -> str:
        subject = SUBJECTS[rng.integers(len(SUBJECTS))]
        action = ACTION_PHRASES[name][rng.integers(len(ACTION_PHRASES[name]))]
        if name in GAITS:
            where = [f"to the {side}", f"towards the {side}", f"{side}wards"][rng.integers(3)]
        else:
            where = [f"facing {side}", f"facing to the {side}", ""][rng.integers(3)]
        words = [action, where, tempo if rng.random() < 0.7 else ""]
        caption = " ".join(w for w in words if w)
        if subject == "someone":
            return f"someone {caption}"
        return article(f"{subject} {caption}", rng.random() >= 0.7)

    return distinct(draw, count)
